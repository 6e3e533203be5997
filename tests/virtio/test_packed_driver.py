"""PackedQueueDriver: what it writes (read back raw at the spec's offsets) and how it
takes a device's answers, including a device that lies."""

from __future__ import annotations

import pytest

from tests.virtio.mock import P_AVAIL, P_USED, MockPackedQueue, avail_flags, used_flags
from virtnet.virtio.errors import QueueFullError, UsedIndexError, UsedRingError
from virtnet.virtio.ring.layout import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
)

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT


def test_a_fresh_driver_clears_the_ring_and_enables_interrupts():
    q = MockPackedQueue(4)
    for i in range(4):
        q.desc(i, 0xDEAD, 7, 3, 0xFFFF)
    q.set_driver_event(0x1234, 0x3)
    q.driver()
    assert all(q.read_desc(i).flags == 0 for i in range(4))
    assert q.driver_event == (0, VRING_PACKED_EVENT_FLAG_ENABLE)


def test_add_writes_the_chain_with_its_id_in_every_descriptor_and_avail_flags():
    q = MockPackedQueue(8)
    drv = q.driver()
    bid = drv.add([(q.data(0), 10)], [(q.data(1), 20), (q.data(2), 30)], "tok")
    assert bid == 0
    d = [q.read_desc(i) for i in range(3)]
    assert [(x.addr, x.len, x.id) for x in d] == [
        (q.data(0), 10, 0), (q.data(1), 20, 0), (q.data(2), 30, 0)
    ]
    assert [x.flags for x in d] == [
        NEXT | P_AVAIL, NEXT | WRITE | P_AVAIL, WRITE | P_AVAIL
    ]
    assert drv.num_free == 5 and drv.in_flight == 3 and drv.num_added == 3
    assert drv.add_inbuf(q.data(3), 5, "b") == 1  # the next id from the free list
    assert q.read_desc(3).flags == WRITE | P_AVAIL
    assert drv.add_outbuf(q.data(4), 7, "c") == 2
    d4 = q.read_desc(4)
    assert (d4.addr, d4.len, d4.id, d4.flags) == (q.data(4), 7, 2, P_AVAIL)
    chains = q.device().pop_burst(8)
    assert [(c.head, c.out_len, c.in_len) for c in chains] == [(0, 10, 50), (1, 0, 5), (2, 7, 0)]


def test_past_the_end_the_driver_flips_its_wrap_counter_mid_chain():
    q = MockPackedQueue(3)
    drv, dev = q.driver(), q.device()
    drv.add_inbuf(q.data(0), 1, "a")
    drv.add_inbuf(q.data(0), 1, "b")
    assert [c.head for c in dev.pop_burst(2)] == [0, 1]
    dev.push_used_burst([(0, 1), (1, 1)])
    dev.flush_used()
    assert drv.get_bufs(4) == [("a", 1), ("b", 1)]
    bid = drv.add([(q.data(0), 1)], [(q.data(1), 2)], "c")  # slots 2 (lap 1) and 0 (lap 0)
    assert q.read_desc(2).flags == NEXT | avail_flags(1)
    assert q.read_desc(0).flags == WRITE | avail_flags(0)
    assert (drv.next_avail, drv.avail_wrap) == (1, 0)
    chain = dev.pop()
    assert chain.head == bid and chain.in_len == 2


def test_indirect_tables_are_one_ring_slot_and_carry_only_write_flags():
    q = MockPackedQueue(4, indirect_max=4)
    drv = q.driver()
    bid = drv.add([(q.data(0), 10), (q.data(1), 11)], [(q.data(2), 12)], "t")
    d = q.read_desc(0)
    assert d.flags == INDIRECT | P_AVAIL and d.len == 48 and d.id == bid
    assert d.addr == q.indirect_gpa + bid * 4 * 16
    table = q.read_table(d.addr, 3)
    assert [(e.addr, e.len, e.flags) for e in table] == [
        (q.data(0), 10, 0), (q.data(1), 11, 0), (q.data(2), 12, WRITE)
    ]
    assert drv.num_free == 3
    chain = q.device().pop()
    assert chain.head == bid and (chain.out_len, chain.in_len) == (21, 12)


def test_a_full_queue_is_refused_before_anything_is_written():
    q = MockPackedQueue(2)
    drv = q.driver()
    drv.add_inbuf(q.data(0), 1, "a")
    with pytest.raises(QueueFullError, match="vq 0: 2 descriptors wanted, 1 free"):
        drv.add([(q.data(0), 1)], [(q.data(1), 1)], "b")
    assert q.read_desc(1).flags == 0
    drv.add_inbuf(q.data(1), 1, "c")
    with pytest.raises(QueueFullError):
        drv.add_inbuf(q.data(1), 1, "d")
    assert drv.add_inbufs([(q.data(1), 1, "e")]) == 0


def test_add_inbufs_adds_what_fits_with_ids_from_the_free_list():
    q = MockPackedQueue(5)
    drv = q.driver()
    assert drv.add_inbufs([(q.data(k % 5), 8, k) for k in range(7)]) == 5
    assert [q.read_desc(i).id for i in range(5)] == [0, 1, 2, 3, 4]
    assert drv.num_free == 0 and drv.num_added == 5
    q2 = MockPackedQueue(5)
    drv2 = q2.driver()
    with pytest.raises(ValueError, match="buffer 1 of the burst; 1 added"):
        drv2.add_inbufs([(q2.data(0), 1, "a"), (q2.data(1), 1, None)])
    assert drv2.num_free == 4 and drv2.next_avail == 1


def test_a_used_id_not_in_flight_breaks_the_queue():
    # The slots that buffer took are unknown: nothing after it can be found (BAD_RING).
    q = MockPackedQueue(8)
    drv = q.driver()
    drv.add_inbuf(q.data(0), 8, "a")
    q.mark_used(5, 4)
    with pytest.raises(UsedRingError, match=r"vq 0: used descriptor 0 names buffer id 5") as e:
        drv.get_buf()
    assert (e.value.head, e.value.token) == (5, None)
    assert drv.broken
    assert drv.get_buf() is None and drv.get_bufs(4) == [] and not drv.more_used()
    assert drv.poll(drv.enable_cb_prepare()) is False


@pytest.mark.parametrize("bid", [8, 0xFFFF])
def test_a_used_id_out_of_range_breaks_the_queue(bid):
    q = MockPackedQueue(8)
    drv = q.driver()
    drv.add_inbuf(q.data(0), 8, "a")
    q.mark_used(bid, 0)
    with pytest.raises(UsedRingError, match=f"buffer id {bid}"):
        drv.get_bufs(4)
    assert drv.broken


def test_a_used_length_larger_than_the_buffer_is_raised_with_the_token():
    q = MockPackedQueue(8)
    drv = q.driver()
    drv.add_inbuf(q.data(0), 8, "a")
    drv.add_inbuf(q.data(1), 8, "b")
    q.mark_used(0, 9)
    q.mark_used(1, 8)
    with pytest.raises(UsedRingError, match="used len 9 > buffer 0's writable 8") as e:
        drv.get_buf()
    assert (e.value.head, e.value.token) == (0, "a")
    assert not drv.broken
    assert drv.get_buf() == ("b", 8)
    assert drv.num_free == 8


def test_a_bad_entry_after_good_ones_ends_the_burst_before_it():
    q = MockPackedQueue(8)
    drv = q.driver()
    for k in range(3):
        drv.add_inbuf(q.data(k), 8, k)
    q.mark_used(0, 1)
    q.mark_used(1, 100)
    q.mark_used(2, 1)
    assert drv.get_bufs(8) == [(0, 1)]
    with pytest.raises(UsedRingError) as e:
        drv.get_bufs(8)
    assert e.value.token == 1
    assert drv.get_bufs(8) == [(2, 1)]


def test_a_used_length_without_write_counts_as_0():
    # 2.8.4: a used descriptor's length is meaningful only with WRITE set.
    q = MockPackedQueue(8)
    drv = q.driver()
    drv.add_inbuf(q.data(0), 8, "a")
    q.mark_used(0, 5, flags=used_flags(1))
    assert drv.get_buf() == ("a", 0)


def test_the_driver_skips_as_many_slots_as_its_own_record_says_not_the_device():
    q = MockPackedQueue(8)
    drv = q.driver()
    drv.add([(q.data(0), 1), (q.data(0), 1)], [(q.data(1), 4)], "three")
    drv.add_inbuf(q.data(2), 4, "one")
    q.mark_used(0, 4, slots=3)
    q.mark_used(1, 4)
    assert drv.get_bufs(4) == [("three", 4), ("one", 4)]
    assert drv.last_used == 4


def test_detach_unused_buf_returns_each_buffer_in_flight_once():
    q = MockPackedQueue(4)
    drv = q.driver()
    drv.add([(q.data(0), 1)], [(q.data(1), 1)], "a")
    drv.add_inbuf(q.data(2), 1, "b")
    got = {drv.detach_unused_buf(), drv.detach_unused_buf()}
    assert got == {"a", "b"} and drv.detach_unused_buf() is None
    assert drv.num_free == 4 and (drv.next_avail, drv.avail_wrap) == (0, 1)


def test_kick_prepare_follows_the_device_flags_without_event_idx():
    q = MockPackedQueue(8)
    drv = q.driver()
    drv.add_inbuf(q.data(0), 1, "a")
    assert drv.kick_prepare() is True
    q.set_device_event(0, VRING_PACKED_EVENT_FLAG_DISABLE)
    drv.add_inbuf(q.data(0), 1, "b")
    assert drv.kick_prepare() is False
    q.set_device_event(0x7FFF, VRING_PACKED_EVENT_FLAG_DESC)  # DESC without EVENT_IDX: kick
    drv.add_inbuf(q.data(0), 1, "c")
    assert drv.kick_prepare() is True


def test_with_event_idx_the_kick_is_asked_for_when_the_event_slot_is_passed():
    q = MockPackedQueue(4, event_idx=True)
    drv = q.driver()
    q.set_device_event(1 | 1 << 15, VRING_PACKED_EVENT_FLAG_DESC)
    drv.add_inbuf(q.data(0), 1, 0)
    assert drv.kick_prepare() is False  # slot 0 only
    drv.add_inbuf(q.data(0), 1, 1)
    assert drv.kick_prepare() is True  # slot 1
    drv.add_inbuf(q.data(0), 1, 2)
    assert drv.kick_prepare() is False
    assert drv.kick_prepare() is False  # nothing added
    # Event at slot 0 of lap 0 (the next lap): passed when slot 3 then 0 are written.
    q.set_device_event(0 | 0 << 15, VRING_PACKED_EVENT_FLAG_DESC)
    drv.add_inbuf(q.data(0), 1, 3)
    assert drv.kick_prepare() is False
    for k in range(4):  # the device returns them all
        q.mark_used(k, 0)
    assert len(drv.get_bufs(8)) == 4
    drv.add_inbuf(q.data(0), 1, 4)
    assert drv.kick_prepare() is True


def test_disable_and_enable_cb_write_the_driver_event_area():
    q = MockPackedQueue(4, event_idx=True, start=(2, 0))
    drv = q.driver()
    drv.disable_cb()
    assert q.driver_event[1] == VRING_PACKED_EVENT_FLAG_DISABLE
    token = drv.enable_cb_prepare()
    assert token == 2  # slot 2, wrap 0
    assert q.driver_event == (2, VRING_PACKED_EVENT_FLAG_DESC)
    assert drv.poll(token) is False
    drv.add_inbuf(q.data(0), 1, "a")
    q.mark_used(0, 0)
    assert drv.poll(token) is True
    assert drv.enable_cb() is False  # already pending
    assert drv.get_buf() == ("a", 0)
    assert q.driver_event == (3, VRING_PACKED_EVENT_FLAG_DESC)  # moved on with get_buf
    q2 = MockPackedQueue(4)
    drv2 = q2.driver()
    drv2.disable_cb()
    assert drv2.enable_cb() is True
    assert q2.driver_event[1] == VRING_PACKED_EVENT_FLAG_ENABLE
    assert (P_AVAIL, P_USED) == (1 << 7, 1 << 15)  # the mock's wire bits are the spec's (2.8.1)


# -- a used descriptor of the other lap (issue 18.7: the packed ring's idx_jump) ------------


@pytest.mark.parametrize("lie", [0, P_USED], ids=["both-0", "swapped"])
def test_a_descriptor_of_the_other_lap_where_a_buffer_is_in_flight_breaks_the_queue(lie):
    q = MockPackedQueue(4)
    drv = q.driver()
    for k in range(3):
        drv.add_inbuf(q.data(k), 64, k)
    q.mark_used(0, 64)
    assert drv.get_buf() == (0, 64)
    # Slot 1 holds buffer 1, made available in this lap (AVAIL=1 USED=0). Anything but
    # that or "used in this lap" (both 1) at the driver's position is the other lap's.
    q.set_flags(1, lie)
    with pytest.raises(UsedIndexError, match=r"vq 0: descriptor 1 has AVAIL=0 USED=\d .*lap"):
        drv.get_buf()
    assert drv.broken and drv.get_buf() is None and drv.get_bufs(4) == []
    assert not drv.more_used()


def test_the_other_lap_is_caught_by_a_burst_after_the_good_entries():
    q = MockPackedQueue(4)
    drv = q.driver()
    for k in range(3):
        drv.add_inbuf(q.data(k), 64, k)
    q.mark_used(0, 64)
    q.set_flags(1, 0)  # AVAIL = USED = 0: lap 0's mark, this is lap 1
    assert drv.get_bufs(4) == [(0, 64)]  # the good one first, as a burst ends before a bad one
    with pytest.raises(UsedIndexError):
        drv.get_bufs(4)
    assert drv.broken


def test_with_nothing_in_flight_an_old_lap_in_the_slot_is_no_lie():
    q = MockPackedQueue(2)
    drv = q.driver()
    assert drv.get_buf() is None  # a fresh ring: flags 0 (AVAIL = USED = 0) everywhere
    for lap in range(3):  # whole laps: the slot at last_used holds the lap before's mark
        ids = [drv.add_inbuf(q.data(k), 64, (lap, k)) for k in range(2)]
        for bid in ids:
            q.mark_used(bid, 64)
        assert drv.get_bufs(4) == [((lap, 0), 64), ((lap, 1), 64)]
        assert drv.get_buf() is None and not drv.broken
