"""PackedQueueDevice: popping chains, refusing malformed ones, returning used buffers.

Descriptors are written by hand through the mock (``post`` is a driver that
breaks whichever rule a case wants), so each test states the ring it builds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.virtio.mock import P_AVAIL, P_USED, MockPackedQueue, avail_flags, used_flags
from virtnet.virtio.errors import AvailIndexError, DescriptorError, VirtioError
from virtnet.virtio.ring.layout import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    PackedAddrs,
    PackedViews,
)
from virtnet.virtio.ring.packed import PackedQueueDevice

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
U64_MAX = (1 << 64) - 1


# -- good chains -------------------------------------------------------------------------


def test_nothing_available_pops_nothing():
    q = MockPackedQueue(8)
    dev = q.device()
    assert dev.pop() is None
    assert dev.avail_pending() == 0
    assert dev.pop_burst(8) == []


def test_a_chain_pops_as_readable_then_writable_views_with_the_id_of_its_last_descriptor():
    q = MockPackedQueue(8)
    dev = q.device()
    q.write(q.data(0), b"hello")
    q.post([(q.data(0), 5, 0), (q.data(1), 16, WRITE), (q.data(2), 8, WRITE)], bid=5)
    assert dev.avail_pending() == 1
    chain = dev.pop()
    assert chain.head == 5
    assert [bytes(v) for v in chain.readable] == [b"hello"]
    assert [len(v) for v in chain.writable] == [16, 8]
    assert (chain.out_len, chain.in_len) == (5, 24)
    chain.writable[0][:3] = b"abc"
    assert q.read(q.data(1), 3) == b"abc"
    assert dev.last_avail == 3 and dev.avail_wrap == 1
    assert dev.pop() is None


def test_the_id_is_taken_from_the_last_descriptor_only():
    # 2.8.6: "Buffer ID is included in the last descriptor in the list"; the others'
    # id fields are reserved. Linux writes it in every one, DPDK's vhost reads the last.
    q = MockPackedQueue(8)
    dev = q.device()
    q.desc(1, q.data(1), 4, 3, WRITE | avail_flags(1))
    q.desc(0, q.data(0), 4, 7, NEXT | avail_flags(1))
    chain = dev.pop()
    assert chain.head == 3 and len(chain.segments) == 2


@pytest.mark.parametrize("num", [1, 3, 5, 7, 100, 255, 1000, 32767, 32768])
def test_queue_sizes_that_are_not_powers_of_two_wrap_at_their_size(num):
    q = MockPackedQueue(num, data_slots=2)
    dev = q.device()
    # Three laps of one- and two-descriptor chains: positions and wrap counters flip at num.
    laps = 3 if num <= 1000 else 1
    popped = 0
    total_slots = 0
    while total_slots < laps * num + 1:
        slots = 2 if num > 1 and popped % 3 == 0 else 1
        bid = popped % num
        q.post([(q.data(0), 4, 0)] * (slots - 1) + [(q.data(1), 4, WRITE)], bid=bid)
        chain = dev.pop()
        assert chain.head == bid and len(chain.segments) == slots
        dev.push_used(bid, 4)
        dev.flush_used()
        q_used = q.read_desc((total_slots) % num)
        assert q_used.id == bid and q_used.len == 4
        total_slots += slots
        popped += 1
        q.used_pos, q.used_wrap = dev.used_pos, dev.used_wrap
        assert dev.last_avail == total_slots % num
        assert dev.avail_wrap == (1 + total_slots // num) % 2
        assert (dev.used_pos, dev.used_wrap) == (dev.last_avail, dev.avail_wrap)


def test_a_chain_may_wrap_round_the_end_of_the_ring():
    q = MockPackedQueue(5, start=(3, 1))
    dev = q.device()
    q.post([(q.data(0), 1, 0), (q.data(1), 1, 0), (q.data(2), 1, 0), (q.data(3), 2, WRITE)], 2)
    # Slots 3, 4 of lap 1 then 0, 1 of lap 0: the last two carry the flipped wrap counter.
    assert q.read_desc(0).flags & (P_AVAIL | P_USED) == avail_flags(0)
    chain = dev.pop()
    assert chain.head == 2 and chain.out_len == 3 and chain.in_len == 2
    assert (dev.last_avail, dev.avail_wrap) == (2, 0)
    dev.push_used(2, 2)
    dev.flush_used()
    used = q.read_desc(3)
    assert used.flags == used_flags(1) | WRITE and used.id == 2 and used.len == 2
    assert (dev.used_pos, dev.used_wrap) == (2, 0)


def test_an_indirect_table_is_walked_in_order_and_its_other_flags_are_ignored():
    q = MockPackedQueue(8)
    dev = q.device()
    # 2.8.19: in a table only WRITE counts; NEXT, ids and AVAIL/USED are ignored.
    n = q.table(q.data(7), [(q.data(0), 4, 9, NEXT), (q.data(1), 8, 0, WRITE | P_USED),
                            (q.data(2), 2, 0, WRITE)])  # fmt: skip
    q.post([(q.data(7), n, INDIRECT)], bid=4)
    chain = dev.pop()
    assert chain.head == 4
    assert chain.segments == [(q.data(0), 4, False), (q.data(1), 8, True), (q.data(2), 2, True)]
    assert (chain.out_len, chain.in_len) == (4, 10)
    assert dev.last_avail == 1  # one ring slot for the whole table


# -- malformed chains -----------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A hostile chain posted at slot 0 as id 0 and the error it must give."""

    rule: str
    build: Callable[[MockPackedQueue], None]
    match: str
    head: int | None = 0


def _indirect(q: MockPackedQueue, descs, length=None, flags=0) -> None:
    n = q.table(q.data(7), descs)
    q.post([(q.data(7), n if length is None else length, INDIRECT | flags)], bid=0)


BAD_CHAINS = [
    Bad(
        "2.8.4: buffer address past guest memory",
        lambda q: q.post([(q.end, 1, WRITE)], bid=0),
        r"descriptor 0: guest access",
    ),
    Bad(
        "2.8.4: buffer straddles the end of guest memory",
        lambda q: q.post([(q.end - 4, 8, WRITE)], bid=0),
        r"outside guest memory",
    ),
    Bad(
        "2.8.4: address + length overflows u64",
        lambda q: q.post([(U64_MAX - 7, 16, WRITE)], bid=0),
        r"outside guest memory",
    ),
    Bad(
        "2.8.4: length 2^32-1 from a valid address",
        lambda q: q.post([(q.data(0), 0xFFFF_FFFF, WRITE)], bid=0),
        r"outside guest memory",
    ),
    Bad(
        "2.8.4: second descriptor out of range, first fine",
        lambda q: q.post([(q.data(0), 1, 0), (1 << 63, 1, WRITE)], bid=0),
        r"descriptor 1: guest access",
    ),
    Bad(
        "2.8.6: device-readable after device-writable",
        lambda q: q.post([(q.data(0), 1, WRITE), (q.data(1), 1, 0)], bid=0),
        r"descriptor 1: device-readable after device-writable",
    ),
    Bad(
        "2.8.6: readable after writable inside an indirect table",
        lambda q: _indirect(q, [(q.data(0), 1, 0, WRITE), (q.data(1), 1, 0, 0)]),
        r"indirect entry 1: device-readable after device-writable",
    ),
    Bad(
        "2.8.19: nested indirect table",
        lambda q: _indirect(q, [(q.data(6), 16, 0, INDIRECT)]),
        r"nested indirect table",
    ),
    Bad(
        "2.8.19: indirect table length not a multiple of 16",
        lambda q: _indirect(q, [(q.data(0), 1, 0, 0)] * 2, length=24),
        r"indirect table length 24 is not a non-zero multiple of 16",
    ),
    Bad(
        "2.8.19: indirect table of length 0",
        lambda q: _indirect(q, [], length=0),
        r"indirect table length 0",
    ),
    Bad(
        "2.8.19: INDIRECT together with NEXT",
        lambda q: q.post([(q.data(7), 16, INDIRECT), (q.data(1), 1, 0)], bid=0),
        r"INDIRECT together with NEXT",
    ),
    Bad(
        "2.8.19: INDIRECT inside a NEXT chain",
        lambda q: (q.table(q.data(7), [(q.data(0), 1, 0, 0)]),
                   q.post([(q.data(1), 1, 0), (q.data(7), 16, INDIRECT)], bid=0)),  # fmt: skip
        r"descriptor 1: INDIRECT inside a NEXT chain",
    ),
    Bad(
        "2.8.19: indirect table outside guest memory",
        lambda q: q.post([(q.end - 16, 32, INDIRECT)], bid=0),
        r"indirect table: guest access",
    ),
    Bad(
        "2.8.19: indirect table address overflows u64",
        lambda q: q.post([(U64_MAX - 15, 32, INDIRECT)], bid=0),
        r"indirect table: guest access",
    ),
    Bad(
        "2.8.19: indirect table of more than 2^16 entries",
        lambda q: q.post([(q.data(0), 16 * (1 << 16) + 16, INDIRECT)], bid=0),
        r"indirect table of 65537 entries",
    ),
    Bad(
        "2.8.19: indirect buffer address out of range",
        lambda q: _indirect(q, [(q.end, 1, 0, WRITE)]),
        r"indirect entry 0: guest access",
    ),
    Bad(
        "2.8.2: a buffer id out of range",
        lambda q: q.post([(q.data(0), 1, WRITE)], bid=8),
        r"buffer id 8 >= queue size 8",
        None,
    ),
    Bad(
        "2.8.2: a buffer id far out of range, in a chain",
        lambda q: q.post([(q.data(0), 1, 0), (q.data(1), 1, WRITE)], bid=0xFFFF),
        r"buffer id 65535 >= queue size 8",
        None,
    ),
]


@pytest.mark.parametrize("case", BAD_CHAINS, ids=[c.rule for c in BAD_CHAINS])
def test_a_malformed_chain_is_refused_by_name_and_the_queue_goes_on(case: Bad):
    q = MockPackedQueue(8, guard=256)
    dev = q.device()
    case.build(q)
    slots = q.avail_pos
    q.post([(q.data(4), 3, WRITE)], bid=4)  # the next chain, good, behind it

    with pytest.raises(DescriptorError, match=case.match) as e:
        dev.pop()
    assert isinstance(e.value, VirtioError) and not isinstance(e.value, AvailIndexError)
    assert e.value.head == case.head
    assert "vq 0: chain at descriptor 0" in str(e.value)
    assert dev.last_avail == slots  # the whole bad chain is consumed
    if e.value.head is not None:
        dev.push_used(e.value.head, 0)  # handed back with length 0
    good = dev.pop()
    assert good.head == 4 and good.segments == [(q.data(4), 3, True)]
    dev.push_used(good.head, 3)
    dev.flush_used()
    if case.head is None:
        used = [q.read_desc(0)]
    else:
        used = [q.read_desc(0), q.read_desc(slots)]
        assert (used[0].id, used[0].len, used[0].flags) == (0, 0, used_flags(1))
    assert (used[-1].id, used[-1].len, used[-1].flags) == (4, 3, used_flags(1) | WRITE)
    assert dev.pop() is None
    assert q.guards_intact()


def test_an_id_reused_while_in_flight_is_refused_and_the_first_buffer_still_returns():
    q = MockPackedQueue(8)
    dev = q.device()
    q.post([(q.data(0), 4, WRITE)], bid=3)
    q.post([(q.data(1), 1, 0), (q.data(2), 4, WRITE)], bid=3)
    q.post([(q.data(3), 4, WRITE)], bid=5)
    first = dev.pop()
    with pytest.raises(DescriptorError, match=r"buffer id 3 is already in flight") as e:
        dev.pop()
    assert e.value.head is None
    assert dev.last_avail == 3  # both slots of the bad chain consumed
    third = dev.pop()
    assert third.head == 5
    dev.push_used(first.head, 4)
    dev.push_used(third.head, 4)
    dev.flush_used()
    assert [(q.read_desc(i).id, q.read_desc(i).len) for i in (0, 1)] == [(3, 4), (5, 4)]
    # Once returned, id 3 may come again.
    q.post([(q.data(0), 4, WRITE)], bid=3)
    assert dev.pop().head == 3


def test_a_head_made_available_before_the_rest_of_its_chain_stops_the_queue():
    # 2.8.21: the driver makes the head available last; a tail still stale is a
    # ring that can't be walked (its extent is unknown): nothing is consumed.
    q = MockPackedQueue(8)
    dev = q.device()
    q.desc(0, q.data(0), 1, 0, NEXT | avail_flags(1))
    with pytest.raises(AvailIndexError, match=r"vq 0: chain at descriptor 0: descriptor 1 "
                                              r".*not available with wrap counter 1"):  # fmt: skip
        dev.pop()
    assert dev.last_avail == 0 and dev.avail_wrap == 1


def test_a_chain_round_the_whole_ring_stops_the_queue():
    # Every descriptor NEXT and available, forever: a chain can't be longer than the ring.
    q = MockPackedQueue(4)
    dev = q.device()
    for i in range(4):
        q.desc(i, q.data(i), 1, 0, NEXT | avail_flags(1))
    with pytest.raises(AvailIndexError, match=r"(runs round the whole ring|not available)"):
        dev.pop()
    assert dev.last_avail == 0


def test_a_driver_that_does_not_flip_its_wrap_counter_is_not_seen():
    # Past the ring's end a driver must flip; one that does not writes flags that say
    # "available in the previous lap", which is what a stale slot says: nothing pops.
    q = MockPackedQueue(4)
    dev = q.device()
    for bid in range(4):
        q.post([(q.data(0), 1, WRITE)], bid=bid)
        assert dev.pop().head == bid
        dev.push_used(bid, 1)
    dev.flush_used()
    assert (q.avail_pos, q.avail_wrap) == (0, 0)
    q.avail_wrap = 1  # the lie: lap 2 written with lap 1's wrap counter
    q.post([(q.data(0), 1, WRITE)], bid=1)
    assert dev.avail_pending() == 0
    assert dev.pop() is None
    assert dev.enable_notify() is False
    # The driver corrects itself (wrap counter 0 in lap 2): the chain pops.
    q.avail_pos, q.avail_wrap = 0, 0
    q.post([(q.data(0), 1, WRITE)], bid=2)
    assert dev.pop().head == 2


def test_a_chain_whose_tail_past_the_end_keeps_the_old_wrap_counter_stops_the_queue():
    q = MockPackedQueue(4, start=(2, 1))
    dev = q.device()
    q.post([(q.data(0), 1, 0), (q.data(1), 1, 0), (q.data(2), 1, WRITE)], bid=0, flip=False)
    with pytest.raises(AvailIndexError, match=r"descriptor 0 .*not available with wrap counter 0"):
        dev.pop()
    assert (dev.last_avail, dev.avail_wrap) == (2, 1)  # nothing consumed


def test_avail_flags_that_say_used_in_the_current_lap_are_a_lie_that_stops_the_queue():
    q = MockPackedQueue(8)
    dev = q.device()
    q.desc(0, q.data(0), 1, 0, used_flags(1))  # AVAIL = USED = 1 where the device is in lap 1
    with pytest.raises(AvailIndexError, match=r"descriptor 0 has AVAIL=USED=1"):
        dev.pop()
    with pytest.raises(AvailIndexError):
        dev.pop_burst(4)
    assert dev.last_avail == 0


def test_unpop_gives_back_exactly_the_slots_each_chain_took():
    q = MockPackedQueue(6)
    dev = q.device()
    q.post([(q.data(0), 1, 0), (q.data(1), 1, WRITE)], bid=0)
    q.post([(q.data(2), 1, WRITE)], bid=1)
    q.post([(q.data(3), 1, 0), (q.data(3), 1, 0), (q.data(4), 1, WRITE)], bid=2)
    chains = dev.pop_burst(3)
    assert [c.head for c in chains] == [0, 1, 2]
    assert (dev.last_avail, dev.avail_wrap) == (0, 0)
    dev.unpop(2)
    assert (dev.last_avail, dev.avail_wrap) == (2, 1)
    assert dev.vring_base() == 2 | 1 << 15
    again = dev.pop_burst(5)
    assert [c.head for c in again] == [1, 2]
    assert dev.vring_base(unpopped=2) == 2 | 1 << 15
    assert dev.vring_base(unpopped=3) == 0 | 1 << 15
    with pytest.raises(ValueError, match="unpop"):
        dev.unpop(4)


def test_unpop_counts_a_refused_chain_too():
    # The net device's rx cache holds refused chains "dead" and gives back all it holds.
    q = MockPackedQueue(8)
    dev = q.device()
    q.post([(q.data(0), 1, 0), (q.end, 1, WRITE)], bid=0)
    with pytest.raises(DescriptorError):
        dev.pop()
    dev.unpop(1)
    assert dev.last_avail == 0
    with pytest.raises(DescriptorError) as e:
        dev.pop()
    assert e.value.head == 0


def test_a_bad_chain_after_good_ones_ends_a_burst_unconsumed():
    q = MockPackedQueue(8)
    dev = q.device()
    q.post([(q.data(0), 1, WRITE)], bid=0)
    q.post([(q.data(1), 1, WRITE)], bid=1)
    q.post([(q.end, 1, WRITE)], bid=2)
    q.post([(q.data(3), 1, WRITE)], bid=3)
    assert [c.head for c in dev.pop_burst(8)] == [0, 1]
    assert dev.last_avail == 2
    with pytest.raises(DescriptorError, match="guest access") as e:
        dev.pop_burst(8)
    assert e.value.head == 2
    assert [c.head for c in dev.pop_burst(8)] == [3]


def test_push_used_refuses_an_id_not_in_flight():
    q = MockPackedQueue(8)
    dev = q.device()
    with pytest.raises(ValueError, match="buffer id 3, not in flight"):
        dev.push_used(3, 0)
    q.post([(q.data(0), 1, WRITE)], bid=3)
    dev.pop()
    dev.push_used(3, 1)
    with pytest.raises(ValueError, match="not in flight"):
        dev.push_used(3, 1)


def test_used_descriptors_are_batched_until_flush_and_skip_each_chains_slots():
    q = MockPackedQueue(8)
    dev = q.device()
    q.post([(q.data(0), 1, 0), (q.data(1), 1, 0), (q.data(2), 8, WRITE)], bid=6)
    q.post([(q.data(3), 8, WRITE)], bid=2)
    a, b = dev.pop(), dev.pop()
    dev.push_used_burst([(b.head, 5), (a.head, 0)])  # out of order: allowed
    assert dev.has_unflushed()
    assert not q.is_used(0, 1)
    dev.flush_used()
    assert not dev.has_unflushed()
    d0, d1 = q.read_desc(0), q.read_desc(1)
    assert (d0.id, d0.len, d0.flags) == (2, 5, used_flags(1) | WRITE)
    # b took one slot, so a's used descriptor goes in slot 1; then 3 slots skipped.
    assert (d1.id, d1.len, d1.flags) == (6, 0, used_flags(1))
    assert dev.used_pos == 4


class RecordingDesc:
    """A view of the descriptor ring, recording the order of the stores."""

    def __init__(self, view) -> None:
        self.view = view
        self.stores: list[int] = []

    def __getitem__(self, i):
        return self.view[i]

    def __setitem__(self, i, value) -> None:
        self.stores.append(i)
        self.view[i] = value


def test_a_flushed_batch_becomes_visible_with_its_first_descriptor_stored_last():
    """A driver reads used descriptors in order: storing the batch's first one last means
    it sees a mergeable packet's buffers all at once, never the head alone."""
    q = MockPackedQueue(8)
    dev = q.device()
    for bid in range(4):
        q.post([(q.data(bid), 8, WRITE)], bid=bid)
    chains = [dev.pop() for _ in range(4)]
    dev.push_used_burst([(c.head, 8) for c in chains])
    rec = dev._desc32 = RecordingDesc(dev._desc32)
    dev.flush_used()
    # Per slot the length (32-bit word 4*slot+2), then id | flags (4*slot+3) last.
    assert rec.stores == [4 * s + k for s in (1, 2, 3, 0) for k in (2, 3)]
    assert all(q.is_used(slot, 1) for slot in range(4))


def test_a_device_picks_up_at_the_base_it_is_given_on_reconnect():
    q = MockPackedQueue(8, start=(5, 0))
    q.post([(q.data(0), 1, WRITE)], bid=1)
    dev = q.device()  # last_avail_idx = 5 | 0 << 15
    assert dev.pop().head == 1
    dev.push_used(1, 1)
    dev.flush_used()
    assert q.is_used(5, 0)
    assert dev.last_avail_idx == 6
    again = PackedQueueDevice(q.views(), q.memory, last_avail_idx=dev.last_avail_idx)
    assert (again.last_avail, again.avail_wrap, again.used_pos, again.used_wrap) == (6, 0, 6, 0)
    with pytest.raises(ValueError, match="index 9 >= queue size 8"):
        PackedQueueDevice(q.views(), q.memory, last_avail_idx=9)


def test_packed_views_refuse_short_areas_and_bad_sizes():
    q = MockPackedQueue(8)
    with pytest.raises(ValueError, match="not in 1..32768"):
        PackedAddrs.contiguous(0, 32769)
    with pytest.raises(ValueError, match="not in 1..32768"):
        PackedAddrs.contiguous(0, 0)
    mem = q.memory
    with pytest.raises(ValueError, match="short"):
        PackedViews(8, mem.view(q.addrs.desc, 16 * 7), mem.view(q.addrs.avail, 4),
                    mem.view(q.addrs.used, 4))  # fmt: skip
    with pytest.raises(ValueError, match="4 bytes"):
        PackedViews(8, mem.view(q.addrs.desc, 128), mem.view(q.addrs.avail, 2),
                    mem.view(q.addrs.used, 4))  # fmt: skip
    a = PackedAddrs.contiguous(0x1003, 3)
    assert a.desc == 0x1010 and a.avail == 0x1010 + 48 and a.used == a.avail + 4
    assert a.end == a.used + 4


# -- notifications ----------------------------------------------------------------------------


def test_needs_notify_follows_the_driver_flags_without_event_idx():
    q = MockPackedQueue(8)
    dev = q.device()
    q.post([(q.data(0), 1, WRITE)], bid=0)
    dev.push_used(dev.pop().head, 1)
    dev.flush_used()
    assert dev.needs_notify() is True
    q.set_driver_event(0, VRING_PACKED_EVENT_FLAG_DISABLE)
    assert dev.needs_notify() is False
    # DESC is only meaningful with EVENT_IDX: without it, notify.
    q.set_driver_event(0x7FFF, VRING_PACKED_EVENT_FLAG_DESC)
    assert dev.needs_notify() is True


def test_with_event_idx_needs_notify_fires_when_the_used_position_passes_the_event():
    q = MockPackedQueue(4, event_idx=True, data_slots=4)
    dev = q.device()
    # The driver wants to hear when slot 2 of lap 1 is used.
    q.set_driver_event(2 | 1 << 15, VRING_PACKED_EVENT_FLAG_DESC)
    for bid in range(4):
        q.post([(q.data(bid), 1, WRITE)], bid=bid)
    chains = dev.pop_burst(4)
    dev.push_used(chains[0].head, 1)
    dev.flush_used()
    assert dev.needs_notify() is True  # the first is always notified (signalled_used_valid)
    dev.push_used(chains[1].head, 1)
    dev.flush_used()
    assert dev.needs_notify() is False  # used slot 1: before the event slot 2
    dev.push_used(chains[2].head, 1)
    dev.flush_used()
    assert dev.needs_notify() is True  # slot 2 now used
    dev.push_used(chains[3].head, 1)
    dev.flush_used()
    assert dev.needs_notify() is False
    # The event in the next lap (wrap 0), slot 0: fires when that slot is used.
    q.set_driver_event(0 | 0 << 15, VRING_PACKED_EVENT_FLAG_DESC)
    q.post([(q.data(0), 1, WRITE)], bid=0)
    dev.push_used(dev.pop().head, 1)
    dev.flush_used()
    assert dev.needs_notify() is True
    # ENABLE with EVENT_IDX: every flush is notified; DISABLE: none.
    q.set_driver_event(0, VRING_PACKED_EVENT_FLAG_ENABLE)
    q.post([(q.data(1), 1, WRITE)], bid=1)
    dev.push_used(dev.pop().head, 1)
    dev.flush_used()
    assert dev.needs_notify() is True


def test_an_interrupt_is_asked_for_after_a_whole_ring_without_needs_notify():
    q = MockPackedQueue(2, event_idx=True, data_slots=2)
    dev = q.device()
    q.set_driver_event(0 | 1 << 15, VRING_PACKED_EVENT_FLAG_DESC)
    assert dev.needs_notify() is True  # first call: not valid yet
    for n in range(3):
        q.post([(q.data(0), 1, WRITE)], bid=n % 2)
        dev.push_used(dev.pop().head, 1)
        dev.flush_used()
    # Three slots in a ring of 2 since the last check: the event slot was passed, whatever it is.
    assert dev.needs_notify() is True


def test_enable_notify_reports_chains_that_arrived_meanwhile():
    q = MockPackedQueue(8)
    dev = q.device()
    dev.disable_notify()
    assert q.device_event[1] == VRING_PACKED_EVENT_FLAG_DISABLE
    assert dev.enable_notify() is False
    assert q.device_event[1] == VRING_PACKED_EVENT_FLAG_ENABLE
    q.post([(q.data(0), 1, WRITE)], bid=0)
    assert dev.enable_notify() is True


def test_with_event_idx_enable_notify_writes_its_position_and_wrap_then_desc():
    q = MockPackedQueue(4, event_idx=True, start=(3, 0))
    dev = q.device()
    q.post([(q.data(0), 1, WRITE)], bid=0)
    dev.pop()
    assert dev.enable_notify() is False
    assert q.device_event == (0 | 1 << 15, VRING_PACKED_EVENT_FLAG_DESC)  # slot 0 of lap 1
    dev.disable_notify()
    assert q.device_event[1] == VRING_PACKED_EVENT_FLAG_DISABLE
