"""SplitQueueDriver: adding buffers, kicks, used buffers, callbacks, teardown.

The device side is played by hand through the mock (``put_used``, raw flags),
so a test can lie to the driver the way a hostile or buggy device would.
"""

from __future__ import annotations

import pytest

from tests.virtio.mock import MockSplitQueue
from virtnet.virtio.errors import QueueFullError, UsedRingError, VirtioError
from virtnet.virtio.ring.layout import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)


def chain_of(q: MockSplitQueue, head: int) -> list[tuple[int, int, int]]:
    """(addr, len, flags) of the direct chain at ``head``, following NEXT."""
    out = []
    i = head
    for _ in range(q.num):
        d = q.read_desc(i)
        out.append((d.addr, d.len, d.flags))
        if not d.flags & VRING_DESC_F_NEXT:
            return out
        i = d.next
    raise AssertionError("driver wrote a looping chain")


# -- adding buffers -----------------------------------------------------------------------


def test_an_inbuf_is_one_device_writable_descriptor_made_available():
    q = MockSplitQueue(8)
    drv = q.driver()
    head = drv.add_inbuf(q.data(0), 1500, "rx0")
    assert chain_of(q, head) == [(q.data(0), 1500, VRING_DESC_F_WRITE)]
    assert q.avail_idx == 1 and q.avail_ring(0) == head
    assert drv.num_free == 7 and drv.in_flight == 1


def test_a_chain_is_readable_segments_then_writable_ones():
    q = MockSplitQueue(8)
    drv = q.driver()
    out = [(q.data(0), 10), (q.data(1), 20)]
    in_ = [(q.data(2), 30), (q.data(3), 40)]
    head = drv.add(out, in_, "tx0")
    assert chain_of(q, head) == [
        (q.data(0), 10, VRING_DESC_F_NEXT),
        (q.data(1), 20, VRING_DESC_F_NEXT),
        (q.data(2), 30, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
        (q.data(3), 40, VRING_DESC_F_WRITE),
    ]
    assert drv.num_free == 4


def test_each_buffer_gets_distinct_descriptors():
    q = MockSplitQueue(8)
    drv = q.driver()
    heads = [drv.add([(q.data(k), 1)], [(q.data(k, 8), 1)], k) for k in range(4)]
    used = set()
    for head in heads:
        i = head
        used.add(i)
        used.add(q.read_desc(i).next)
    assert len(used) == 8 and drv.num_free == 0


@pytest.mark.parametrize(
    ("out", "in_", "token", "error"),
    [
        ([], [], "t", ValueError),
        ([(0x1000, 1)], [], None, ValueError),
    ],
    ids=["no segments", "None token"],
)
def test_a_buffer_needs_a_segment_and_a_token(out, in_, token, error):
    q = MockSplitQueue(4)
    drv = q.driver()
    with pytest.raises(error):
        drv.add(out, in_, token)
    with pytest.raises(ValueError):
        drv.add_inbuf(0x1000, 1, None)
    assert drv.num_free == 4 and q.avail_idx == 0


def test_a_full_queue_refuses_more_buffers_until_one_is_used():
    q = MockSplitQueue(4)
    drv = q.driver()
    heads = [drv.add_inbuf(q.data(k), 64, k) for k in range(4)]
    with pytest.raises(QueueFullError):
        drv.add_inbuf(q.data(0), 64, "one too many")
    with pytest.raises(QueueFullError, match="2 descriptors wanted, 0 free"):
        drv.add([(q.data(0), 1)], [(q.data(0), 1)], "also")
    assert q.avail_idx == 4  # nothing half-published
    q.put_used(heads[2], 7)
    assert drv.get_buf() == (2, 7)
    assert drv.add_inbuf(q.data(2), 64, "again") == heads[2]


def test_a_chain_longer_than_the_free_descriptors_is_refused_whole():
    q = MockSplitQueue(4)
    drv = q.driver()
    drv.add_inbuf(q.data(0), 1, "a")
    with pytest.raises(QueueFullError, match="4 descriptors wanted, 3 free"):
        drv.add([(q.data(1), 1)] * 2, [(q.data(2), 1)] * 2, "b")
    assert drv.num_free == 3 and q.avail_idx == 1


def test_freed_descriptors_are_reused_and_the_free_count_returns_to_num():
    q = MockSplitQueue(8)
    drv = q.driver()
    for round_ in range(20):
        heads = [drv.add([(q.data(0), 1)] * 2, [(q.data(1), 1)], (round_, k)) for k in range(2)]
        for head in reversed(heads):  # completed out of order
            q.put_used(head, 1)
        assert drv.get_buf() == ((round_, 1), 1)
        assert drv.get_buf() == ((round_, 0), 1)
        assert drv.get_buf() is None
        assert drv.num_free == 8 and drv.in_flight == 0


# -- indirect descriptors (2.7.5.3) ----------------------------------------------------------


def test_a_multi_segment_buffer_takes_one_ring_descriptor_when_indirect():
    q = MockSplitQueue(4, indirect_max=8)
    drv = q.driver()
    head = drv.add([(q.data(0), 12)], [(q.data(1), 1500)] * 3, "tx")
    d = q.read_desc(head)
    assert d.flags == VRING_DESC_F_INDIRECT and d.len == 4 * 16
    assert [t.len for t in q.read_table(d.addr, 4)] == [12, 1500, 1500, 1500]
    assert drv.num_free == 3
    q.put_used(head, 4500)
    assert drv.get_buf() == ("tx", 4500)
    assert drv.num_free == 4


def test_a_single_segment_never_goes_indirect():
    q = MockSplitQueue(4, indirect_max=8)
    drv = q.driver()
    head = drv.add([], [(q.data(0), 64)], "rx")
    assert q.read_desc(head).flags == VRING_DESC_F_WRITE


def test_more_segments_than_an_indirect_slot_holds_fall_back_to_direct():
    q = MockSplitQueue(8, indirect_max=2)
    drv = q.driver()
    head = drv.add([(q.data(0), 1)] * 3, [], "big")
    assert len(chain_of(q, head)) == 3 and drv.num_free == 5


def test_indirect_lets_a_long_chain_into_the_last_free_descriptor():
    q = MockSplitQueue(2, indirect_max=8)
    drv = q.driver()
    drv.add_inbuf(q.data(0), 1, "a")
    head = drv.add([(q.data(1), 1)] * 6, [(q.data(1), 1)], "b")
    assert q.read_desc(head).flags == VRING_DESC_F_INDIRECT
    assert drv.num_free == 0


# -- kicks ---------------------------------------------------------------------------------


def test_kick_follows_the_devices_no_notify_flag():
    q = MockSplitQueue(8)
    drv = q.driver()
    drv.add_inbuf(q.data(0), 1, "a")
    assert drv.kick_prepare() is True
    q.used_flags = VRING_USED_F_NO_NOTIFY
    drv.add_inbuf(q.data(1), 1, "b")
    assert drv.kick_prepare() is False


def test_with_event_idx_the_kick_is_wanted_when_avail_idx_passes_avail_event():
    q = MockSplitQueue(8, event_idx=True)
    drv = q.driver()
    q.avail_event = 2  # the device wants a kick once entry 2 is published
    drv.add_inbuf(q.data(0), 1, "a")
    drv.add_inbuf(q.data(1), 1, "b")
    assert drv.kick_prepare() is False  # entries 0, 1
    drv.add_inbuf(q.data(2), 1, "c")
    assert drv.kick_prepare() is True  # entry 2
    drv.add_inbuf(q.data(3), 1, "d")
    assert drv.kick_prepare() is False  # entry 3: already kicked for 2
    assert drv.kick_prepare() is False  # nothing new


def test_with_event_idx_a_batch_spanning_avail_event_kicks_once():
    q = MockSplitQueue(8, event_idx=True)
    drv = q.driver()
    q.avail_event = 1
    for k in range(4):
        drv.add_inbuf(q.data(k), 1, k)
    assert drv.kick_prepare() is True
    assert drv.kick_prepare() is False


# -- used buffers --------------------------------------------------------------------------


def test_get_buf_returns_tokens_in_used_order_with_their_lengths():
    q = MockSplitQueue(8)
    drv = q.driver()
    heads = {name: drv.add_inbuf(q.data(k), 100, name) for k, name in enumerate("abc")}
    assert drv.get_buf() is None
    q.put_used(heads["c"], 3)
    q.put_used(heads["a"], 0)
    assert drv.more_used()
    assert drv.get_buf() == ("c", 3)
    assert drv.get_buf() == ("a", 0)
    assert not drv.more_used() and drv.get_buf() is None
    assert drv.in_flight == 1


def test_a_used_length_equal_to_the_writable_length_is_fine():
    q = MockSplitQueue(8)
    drv = q.driver()
    head = drv.add([(q.data(0), 500)], [(q.data(1), 100), (q.data(2), 28)], "t")
    q.put_used(head, 128)
    assert drv.get_buf() == ("t", 128)


# Driver side of the malformed-input table: what a lying device can put in the used ring.
# The entry is consumed either way, so the next good entry is processed.
@pytest.mark.parametrize(
    "lie",
    ["id out of range", "id of a free descriptor", "id not a head", "id already returned"],
)
def test_a_used_entry_naming_no_buffer_in_flight_is_refused(lie):
    q = MockSplitQueue(8)
    drv = q.driver()
    first = drv.add([(q.data(0), 1)], [(q.data(0), 1)], "first")
    second = drv.add_inbuf(q.data(1), 1, "second")
    if lie == "id out of range":
        bogus = 8
    elif lie == "id of a free descriptor":
        bogus = 7
    elif lie == "id not a head":
        bogus = q.read_desc(first).next
    else:
        q.put_used(first, 1)
        assert drv.get_buf() == ("first", 1)
        bogus = first
    q.put_used(bogus, 1)
    q.put_used(second, 1)
    free_before = drv.num_free
    with pytest.raises(UsedRingError, match=f"used id {bogus} is not a buffer in flight"):
        drv.get_buf()
    assert drv.num_free == free_before  # nothing freed twice
    assert drv.get_buf() == ("second", 1)


@pytest.mark.parametrize("huge", [0xFFFF_FFFF, 1 << 31])
def test_a_used_entry_with_an_id_beyond_u16_is_refused(huge):
    q = MockSplitQueue(8)
    drv = q.driver()
    head = drv.add_inbuf(q.data(0), 1, "t")
    q.put_used(huge, 0)
    q.put_used(head, 0)
    with pytest.raises(UsedRingError):
        drv.get_buf()
    assert drv.get_buf() == ("t", 0)


def test_a_used_length_beyond_the_writable_bytes_is_refused_with_the_token():
    q = MockSplitQueue(8)
    drv = q.driver()
    head = drv.add([(q.data(0), 1000)], [(q.data(1), 100)], "tok")
    q.put_used(head, 101)  # readable bytes do not count
    with pytest.raises(UsedRingError, match="101") as e:
        drv.get_buf()
    assert e.value.token == "tok"
    assert isinstance(e.value, VirtioError)
    # The buffer is detached, so the caller can recycle it; nothing leaked.
    assert drv.num_free == 8 and drv.in_flight == 0
    assert drv.get_buf() is None


def test_the_driver_never_trusts_descriptor_links_in_shared_memory():
    # A device scribbling over the descriptor table must not corrupt the free list.
    q = MockSplitQueue(8)
    drv = q.driver()
    heads = [drv.add([(q.data(0), 1)] * 3, [(q.data(1), 1)], k) for k in range(2)]
    for i in range(8):
        q.desc(i, 0xDEAD, 0xBEEF, 0xFFFF, next=i)  # every descriptor a self-loop
    for head in heads:
        q.put_used(head, 0)
    assert drv.get_buf() == (0, 0) and drv.get_buf() == (1, 0)
    assert drv.num_free == 8
    heads = [drv.add([(q.data(0), 1)] * 3, [(q.data(1), 1)], k) for k in range(2)]
    assert all(len(chain_of(q, h)) == 4 for h in heads)


# -- callbacks (used buffer notifications) ----------------------------------------------------


def test_disable_and_enable_cb_flip_no_interrupt():
    q = MockSplitQueue(8)
    drv = q.driver()
    assert q.avail_flags == 0
    drv.disable_cb()
    assert q.avail_flags == VRING_AVAIL_F_NO_INTERRUPT
    assert drv.enable_cb() is True
    assert q.avail_flags == 0


def test_enable_cb_reports_buffers_used_while_callbacks_were_off():
    q = MockSplitQueue(8)
    drv = q.driver()
    head = drv.add_inbuf(q.data(0), 1, "t")
    drv.disable_cb()
    q.put_used(head, 1)
    assert drv.enable_cb() is False  # poll again, or this buffer waits forever
    assert drv.get_buf() == ("t", 1)
    assert drv.enable_cb() is True


@pytest.mark.parametrize("event_idx", [False, True])
def test_enable_cb_prepare_then_poll_catches_a_completion_in_between(event_idx):
    q = MockSplitQueue(8, event_idx=event_idx)
    drv = q.driver()
    head = drv.add_inbuf(q.data(0), 1, "t")
    drv.disable_cb()
    opaque = drv.enable_cb_prepare()
    assert drv.poll(opaque) is False
    q.put_used(head, 1)  # the device completes between prepare and poll
    assert drv.poll(opaque) is True


def test_with_event_idx_get_buf_moves_used_event_only_while_callbacks_are_on():
    q = MockSplitQueue(8, event_idx=True)
    drv = q.driver()
    heads = [drv.add_inbuf(q.data(k), 1, k) for k in range(3)]
    for head in heads:
        q.put_used(head, 0)
    drv.get_buf()
    assert q.used_event == 1
    drv.disable_cb()
    assert q.avail_flags == 0  # EVENT_IDX: the flag is not used
    drv.get_buf()
    assert q.used_event == 1
    assert drv.enable_cb_prepare() == 2 and q.used_event == 2


# -- teardown --------------------------------------------------------------------------------


def test_detach_unused_buf_returns_every_buffer_once_after_reset():
    q = MockSplitQueue(8, indirect_max=4)
    drv = q.driver()
    drv.add_inbuf(q.data(0), 1, "a")
    drv.add([(q.data(1), 1)], [(q.data(2), 1)], "b")  # indirect
    drv.add([(q.data(3), 1)] * 5, [], "c")  # direct, 5 descriptors
    tokens = []
    while (t := drv.detach_unused_buf()) is not None:
        tokens.append(t)
    assert sorted(tokens) == ["a", "b", "c"]
    assert drv.num_free == 8 and drv.in_flight == 0
    assert q.avail_idx == 0


def test_a_kick_is_asked_for_even_after_65536_adds_without_kick_prepare():
    # The device busy-polls, so the driver never kicks; once it sleeps, the next
    # add must kick although num_added no longer fits the 16-bit window.
    q = MockSplitQueue(2, event_idx=True, data_slots=1)
    drv, dev = q.driver(), q.device()
    for n in range(0xFFFF):  # with the one below: 65536 adds since the last kick_prepare
        drv.add_inbuf(q.data(0), 1, n)
        dev.push_used(dev.pop().head, 0)
        dev.flush_used()
        drv.get_buf()
    assert dev.enable_notify() is False  # the device goes to sleep
    drv.add_inbuf(q.data(0), 1, "wake up")
    assert drv.kick_prepare() is True
