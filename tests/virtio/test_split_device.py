"""SplitQueueDevice: popping chains, refusing malformed ones, returning used buffers.

Descriptors and avail entries are written by hand through the mock, so each
test states the chain it builds, good or hostile.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.conftest import skip_or_fail
from tests.virtio.mock import MockSplitQueue
from virtnet.virtio.errors import DescriptorError, VirtioError
from virtnet.virtio.memory import MemoryRegion
from virtnet.virtio.ring.layout import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
U64_MAX = (1 << 64) - 1


# -- good chains -------------------------------------------------------------------------


def test_nothing_available_pops_nothing():
    q = MockSplitQueue(8)
    dev = q.device()
    assert dev.pop() is None
    assert dev.avail_pending() == 0


def test_a_chain_pops_as_readable_then_writable_views_of_guest_memory():
    q = MockSplitQueue(8)
    q.write(q.data(0), b"request")
    q.desc(5, q.data(0), 7, NEXT, next=2)
    q.desc(2, q.data(1), 16, WRITE | NEXT, next=7)
    q.desc(7, q.data(2), 4, WRITE)
    q.make_available(5)
    dev = q.device()
    assert dev.avail_pending() == 1
    chain = dev.pop()
    assert chain.head == 5
    assert [bytes(v) for v in chain.readable] == [b"request"]
    assert [len(v) for v in chain.writable] == [16, 4]
    assert (chain.out_len, chain.in_len) == (7, 20)
    assert chain.segments == [(q.data(0), 7, False), (q.data(1), 16, True), (q.data(2), 4, True)]
    assert "head=5" in repr(chain)
    chain.writable[1][:] = b"resp"
    assert q.read(q.data(2), 4) == b"resp"
    assert dev.pop() is None


def test_zero_length_descriptors_are_empty_segments():
    q = MockSplitQueue(8)
    q.desc(0, q.data(0), 0, NEXT, next=1)
    q.desc(1, q.data(1), 0, WRITE)
    q.make_available(0)
    chain = q.device().pop()
    assert (chain.out_len, chain.in_len) == (0, 0) and len(chain.segments) == 2


def test_a_chain_as_long_as_the_queue_is_fine():
    q = MockSplitQueue(8)
    for i in range(8):
        q.desc(i, q.data(i), 1, WRITE | (NEXT if i < 7 else 0), next=i + 1)
    q.make_available(0)
    assert len(q.device().pop().writable) == 8


def test_an_indirect_table_is_walked_like_a_chain():
    q = MockSplitQueue(8)
    table = q.data(7)
    n = q.table(table, [
        (q.data(0), 10, NEXT, 1),
        (q.data(1), 20, WRITE | NEXT, 2),
        (q.data(2), 30, WRITE, 0),
    ])  # fmt: skip
    q.desc(3, table, n, INDIRECT)
    q.make_available(3)
    chain = q.device().pop()
    assert chain.head == 3
    assert chain.segments == [(q.data(0), 10, False), (q.data(1), 20, True), (q.data(2), 30, True)]


def test_direct_descriptors_may_lead_to_an_indirect_table():
    # 2.7.5.3.2: "zero or more normal chained descriptors followed by a single
    # descriptor with flags&VIRTQ_DESC_F_INDIRECT".
    q = MockSplitQueue(8)
    table = q.data(7)
    n = q.table(table, [(q.data(1), 20, WRITE, 0)])
    q.desc(0, q.data(0), 10, NEXT, next=1)
    q.desc(1, table, n, INDIRECT)
    q.make_available(0)
    chain = q.device().pop()
    assert chain.segments == [(q.data(0), 10, False), (q.data(1), 20, True)]


def test_the_indirect_flag_ignores_a_write_flag_on_its_descriptor():
    # 2.7.5.3.2: "The device MUST ignore the write-only flag ... in a descriptor
    # that refers to an indirect table."
    q = MockSplitQueue(8)
    n = q.table(q.data(7), [(q.data(0), 10, 0, 0)])
    q.desc(0, q.data(7), n, INDIRECT | WRITE)
    q.make_available(0)
    assert q.device().pop().segments == [(q.data(0), 10, False)]


# -- malformed chains -----------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A hostile chain at head 0 (unless the case says otherwise) and the error it must give."""

    rule: str
    build: Callable[[MockSplitQueue], None]
    match: str
    head: int | None = 0


def _loop(q: MockSplitQueue) -> None:
    q.desc(0, q.data(0), 1, NEXT, next=1)
    q.desc(1, q.data(1), 1, NEXT, next=0)


def _self_loop(q: MockSplitQueue) -> None:
    q.desc(0, q.data(0), 1, NEXT, next=0)


def _longer_than_queue(q: MockSplitQueue) -> None:
    # 0 -> 1 -> 2 -> 3 -> 1 -> ...: a tail into a loop, so the chain never ends.
    for i in range(4):
        q.desc(i, q.data(i), 1, NEXT, next=i + 1 if i < 3 else 1)


def _indirect(q: MockSplitQueue, descs: list[tuple[int, int, int, int]], length=None):
    n = q.table(q.data(7), descs)
    q.desc(0, q.data(7), n if length is None else length, INDIRECT)


BAD_CHAINS = [
    Bad(
        "2.7.5.2: next must name a descriptor of the table",
        lambda q: q.desc(0, q.data(0), 1, NEXT, next=q.num),
        r"next index 8 >= table size 8",
    ),
    Bad(
        "2.7.5.2: next far out of range",
        lambda q: q.desc(0, q.data(0), 1, NEXT, next=0xFFFF),
        r"next index 65535",
    ),
    Bad("2.7.5.2: a chain that loops (0 -> 1 -> 0)", _loop, r"loop or chain longer"),
    Bad("2.7.5.2: a descriptor that names itself", _self_loop, r"loop or chain longer"),
    Bad("2.7.5.2: chain longer than the queue size", _longer_than_queue, r"\(8 descriptors\)"),
    Bad(
        "2.7.5: buffer address past guest memory",
        lambda q: q.desc(0, q.end, 1, WRITE),
        r"descriptor 0: guest access",
    ),
    Bad(
        "2.7.5: buffer straddles the end of guest memory",
        lambda q: q.desc(0, q.end - 4, 8, WRITE),
        r"outside guest memory",
    ),
    Bad(
        "2.7.5: buffer below guest memory",
        lambda q: q.desc(0, q.gpa - 1, 1, 0),
        r"outside guest memory",
    ),
    Bad(
        "2.7.5: address + length overflows u64",
        lambda q: q.desc(0, U64_MAX - 7, 16, WRITE),
        r"outside guest memory",
    ),
    Bad(
        "2.7.5: length 2^32-1 from a valid address",
        lambda q: q.desc(0, q.data(0), 0xFFFF_FFFF, WRITE),
        r"outside guest memory",
    ),
    Bad(
        "2.7.5: second descriptor out of range, first fine",
        lambda q: (q.desc(0, q.data(0), 1, NEXT, next=1), q.desc(1, 1 << 63, 1, WRITE)),
        r"descriptor 1: guest access",
    ),
    Bad(
        "2.7.4.2: device-readable after device-writable",
        lambda q: (q.desc(0, q.data(0), 1, WRITE | NEXT, next=1), q.desc(1, q.data(1), 1, 0)),
        r"descriptor 1: device-readable after device-writable \(2.7.4.2\)",
    ),
    Bad(
        "2.7.4.2: readable after writable inside an indirect table",
        lambda q: _indirect(q, [(q.data(0), 1, WRITE | NEXT, 1), (q.data(1), 1, 0, 0)]),
        r"device-readable after device-writable",
    ),
    Bad(
        "2.7.5.3.1: nested indirect table",
        lambda q: _indirect(q, [(q.data(6), 16, INDIRECT, 0)]),
        r"nested indirect table \(2.7.5.3.1\)",
    ),
    Bad(
        "2.7.5.3.1: indirect table length not a multiple of 16",
        lambda q: _indirect(q, [(q.data(0), 1, 0, 0)] * 2, length=24),
        r"indirect table length 24 is not a non-zero multiple of 16",
    ),
    Bad(
        "2.7.5.3.1: indirect table of length 0",
        lambda q: _indirect(q, [], length=0),
        r"indirect table length 0 is not a non-zero multiple of 16",
    ),
    Bad(
        "2.7.5.3.1: INDIRECT together with NEXT",
        lambda q: (q.desc(0, q.data(7), 16, INDIRECT | NEXT, next=1), q.desc(1, q.data(1), 1, 0)),
        r"INDIRECT together with NEXT",
    ),
    Bad(
        "2.7.5.3: indirect table outside guest memory",
        lambda q: q.desc(0, q.end - 16, 32, INDIRECT),
        r"indirect table: guest access",
    ),
    Bad(
        "2.7.5.3: indirect table address overflows u64",
        lambda q: q.desc(0, U64_MAX - 15, 32, INDIRECT),
        r"indirect table: guest access",
    ),
    Bad(
        "2.7.5.3: next beyond the indirect table",
        lambda q: _indirect(q, [(q.data(0), 1, NEXT, 2), (q.data(1), 1, 0, 0)]),
        r"next index 2 >= table size 2",
    ),
    Bad(
        "2.7.5.3: loop inside an indirect table",
        lambda q: _indirect(q, [(q.data(0), 1, NEXT, 1), (q.data(1), 1, NEXT, 0)]),
        r"loop or chain longer than its indirect table \(2 descriptors\)",
    ),
    Bad(
        "2.7.5.3: indirect buffer address out of range",
        lambda q: _indirect(q, [(q.end, 1, WRITE, 0)]),
        r"descriptor 0: guest access",
    ),
]


@pytest.mark.parametrize("case", BAD_CHAINS, ids=[c.rule for c in BAD_CHAINS])
def test_a_malformed_chain_is_refused_by_name_and_the_queue_goes_on(case: Bad):
    q = MockSplitQueue(8, guard=256)
    dev = q.device()
    case.build(q)
    q.make_available(0)
    # The next chain, good, behind it.
    q.desc(4, q.data(4), 3, WRITE)
    q.make_available(4)

    with pytest.raises(DescriptorError, match=case.match) as e:
        dev.pop()
    assert isinstance(e.value, VirtioError)
    assert e.value.head == case.head
    assert f"chain at head {case.head}" in str(e.value)
    # The bad chain is consumed and returned with length 0; the next one pops.
    dev.push_used(e.value.head, 0)
    good = dev.pop()
    assert good.head == 4 and good.segments == [(q.data(4), 3, True)]
    dev.push_used(good.head, 3)
    dev.flush_used()
    assert q.used_entries(0) == [(0, 0), (4, 3)]
    assert dev.pop() is None
    assert q.guards_intact()


@pytest.mark.parametrize("head", [8, 9, 0x8000, 0xFFFF])
def test_an_avail_entry_naming_no_descriptor_is_refused_without_a_head(head):
    # 2.7.6: ring[] entries are descriptor-chain heads, so < queue size.
    q = MockSplitQueue(8, guard=64)
    dev = q.device()
    q.make_available(head)
    q.desc(1, q.data(1), 1, WRITE)
    q.make_available(1)
    with pytest.raises(DescriptorError, match=f"avail ring names head {head} >= 8") as e:
        dev.pop()
    assert e.value.head is None
    assert dev.pop().head == 1
    assert q.guards_intact()


@pytest.mark.parametrize("ahead", [9, 100, 0x8000, 0xFFFF])
def test_avail_idx_more_than_the_queue_size_ahead_is_refused(ahead):
    # 2.7.6: the driver can't have more than queue-size chains outstanding.
    q = MockSplitQueue(8, start_idx=0xFFF0)
    dev = q.device()
    q.set_avail_idx(0xFFF0 + ahead)
    with pytest.raises(DescriptorError, match=f"is {ahead} ahead of last_avail_idx 65520") as e:
        dev.pop()
    assert e.value.head is None
    with pytest.raises(DescriptorError, match="more than the queue size 8"):
        dev.avail_pending()
    assert dev.last_avail_idx == 0xFFF0  # nothing consumed


def test_avail_idx_exactly_the_queue_size_ahead_is_fine():
    q = MockSplitQueue(8)
    for i in range(8):
        q.desc(i, q.data(i), 1, WRITE)
        q.make_available(i)
    dev = q.device()
    assert dev.avail_pending() == 8
    assert [dev.pop().head for _ in range(8)] == list(range(8))


def test_a_chain_longer_than_4_gib_is_refused():
    # 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes
    # in total". Needs 2 GiB of real addresses: a lazily mapped anonymous mmap.
    size = 1 << 31
    try:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        big = mmap.mmap(-1, size, flags=flags)
    except OSError as err:  # pragma: no cover - depends on the host
        skip_or_fail(f"no 2 GiB anonymous mapping: {err}")
    try:
        q = MockSplitQueue(8)
        big_gpa = 1 << 40
        q.memory.add_region(MemoryRegion(big_gpa, memoryview(big)))
        for i in range(3):  # 3 * 2^31 > 2^32
            q.desc(i, big_gpa, size, WRITE | (NEXT if i < 2 else 0), next=i + 1)
        q.make_available(0)
        dev = q.device()
        with pytest.raises(DescriptorError, match=r"longer than 2\^32 bytes \(2.7.5.2\)") as e:
            dev.pop()
        assert e.value.head == 0
        del e  # its traceback holds views of the mapping
        q.desc(3, big_gpa, size, WRITE | NEXT, next=4)  # exactly 2^32: allowed
        q.desc(4, big_gpa, size, WRITE)
        q.make_available(3)
        chain = dev.pop()
        assert chain.in_len == 1 << 32
        del chain
    finally:
        q.memory.remove_region(1 << 40).buffer.release()
        big.close()


def test_a_bad_chain_from_a_real_driver_goes_back_with_length_0():
    # End to end: the driver posts, something corrupts the descriptor, the device
    # refuses it and returns the head, and the driver gets its token back.
    q = MockSplitQueue(8)
    drv, dev = q.driver(), q.device()
    head = drv.add_inbuf(q.data(0), 64, "rx0")
    drv.add_inbuf(q.data(1), 64, "rx1")
    q.desc(head, q.end + 4096, 64, WRITE)
    with pytest.raises(DescriptorError) as e:
        dev.pop()
    dev.push_used(e.value.head, 0)
    chain = dev.pop()
    dev.push_used(chain.head, 10)
    dev.flush_used()
    assert drv.get_buf() == ("rx0", 0)
    assert drv.get_buf() == ("rx1", 10)
    assert drv.num_free == 8


# -- unpop, used ring, notifications ------------------------------------------------------------


def test_unpop_gives_the_last_chains_back_in_order():
    q = MockSplitQueue(8)
    for i in range(3):
        q.desc(i, q.data(i), 1, WRITE)
        q.make_available(i)
    dev = q.device()
    assert [dev.pop().head for _ in range(3)] == [0, 1, 2]
    dev.unpop(2)
    assert dev.avail_pending() == 2
    assert [dev.pop().head for _ in range(2)] == [1, 2]


def test_used_entries_are_batched_until_flush():
    q = MockSplitQueue(8)
    dev = q.device()
    dev.push_used(3, 10)
    dev.push_used(1, 20)
    assert q.used_idx == 0
    dev.flush_used()
    assert q.used_idx == 2 and q.used_entries(0) == [(3, 10), (1, 20)]


def test_a_device_picks_up_where_the_ring_says_on_reconnect():
    # vhost_vq_init_access: used idx from the ring, last_avail_idx from the front-end.
    q = MockSplitQueue(8)
    q.set_used_idx(5)
    q.set_avail_idx(6)
    q.desc(2, q.data(2), 1, WRITE)
    q.make_available(2)  # avail slot 6
    dev = q.device(last_avail_idx=6)
    assert dev.used_idx == 5 and dev.pop().head == 2
    dev.push_used(2, 1)
    dev.flush_used()
    assert q.used_idx == 6 and q.used_elem(5) == (2, 1)


@pytest.mark.parametrize("stale", [3, 7, 0xFFFE])  # behind, ahead, behind across the wrap
def test_a_stale_base_continues_from_the_used_index(stale):
    # QEMU after a back-end crash: SET_VRING_BASE from a used->idx read before the dead
    # back-end's last writes. Popping from it would return chains the driver has back.
    q = MockSplitQueue(8)
    q.set_used_idx(5)
    q.set_avail_idx(5)
    q.desc(4, q.data(4), 1, WRITE)
    q.make_available(4)  # avail slot 5
    dev = q.device(last_avail_idx=stale)
    assert dev.sync_last_avail_to_used() == stale
    assert dev.last_avail_idx == 5 and dev.pop().head == 4
    dev.unpop()
    assert dev.sync_last_avail_to_used() is None  # agreeing: nothing changes


def test_needs_notify_follows_no_interrupt_without_event_idx():
    q = MockSplitQueue(8)
    dev = q.device()
    dev.push_used(0, 0)
    dev.flush_used()
    assert dev.needs_notify() is True
    q.avail_flags = VRING_AVAIL_F_NO_INTERRUPT
    dev.push_used(1, 0)
    dev.flush_used()
    assert dev.needs_notify() is False


def test_needs_notify_with_event_idx_fires_when_used_idx_passes_used_event():
    q = MockSplitQueue(8, event_idx=True)
    dev = q.device()
    q.used_event = 2
    dev.push_used(0, 0)
    dev.flush_used()
    assert dev.needs_notify() is True  # the first notification is always sent
    dev.push_used(1, 0)
    dev.flush_used()
    assert dev.needs_notify() is False  # entry 1: the driver asked for 2
    dev.push_used(2, 0)
    dev.push_used(3, 0)
    dev.flush_used()
    assert dev.needs_notify() is True  # entries 2, 3
    dev.push_used(4, 0)
    dev.flush_used()
    assert dev.needs_notify() is False
    q.avail_flags = VRING_AVAIL_F_NO_INTERRUPT  # ignored under EVENT_IDX
    q.used_event = 5
    dev.push_used(5, 0)
    dev.flush_used()
    assert dev.needs_notify() is True


def test_enable_notify_reports_chains_that_arrived_meanwhile():
    q = MockSplitQueue(8)
    dev = q.device()
    dev.disable_notify()
    assert q.used_flags == VRING_USED_F_NO_NOTIFY
    q.desc(0, q.data(0), 1, WRITE)
    q.make_available(0)
    assert dev.enable_notify() is True
    assert q.used_flags == 0
    dev.pop()
    assert dev.enable_notify() is False


def test_with_event_idx_enable_notify_sets_avail_event_and_leaves_the_flag():
    q = MockSplitQueue(8, event_idx=True, start_idx=0xFFFE)
    dev = q.device()
    dev.disable_notify()
    assert q.used_flags == 0
    q.desc(0, q.data(0), 1, WRITE)
    q.make_available(0)
    assert dev.enable_notify() is True
    assert q.avail_event == 0xFFFE
    dev.pop()
    assert dev.enable_notify() is False
    assert q.avail_event == 0xFFFF


def test_has_unflushed_tells_pushed_from_published():
    q = MockSplitQueue(8)
    dev = q.device()
    assert not dev.has_unflushed()
    dev.push_used(0, 1)
    assert dev.has_unflushed()
    dev.flush_used()
    assert not dev.has_unflushed()


def test_an_interrupt_is_asked_for_even_after_65536_entries_without_needs_notify():
    # The driver busy-polls, so the device never asks; once the driver waits
    # again, the next entry must interrupt although signalled_used is a whole
    # 16-bit turn behind (vhost_add_used_n invalidates it for the same reason).
    q = MockSplitQueue(2, event_idx=True, data_slots=1)
    drv, dev = q.driver(), q.device()
    drv.add_inbuf(q.data(0), 1, "first")
    dev.push_used(dev.pop().head, 0)
    dev.flush_used()
    assert dev.needs_notify() is True
    drv.get_buf()
    drv.disable_cb()
    for n in range(0xFFFF):  # with the one below: 65536 entries since needs_notify
        drv.add_inbuf(q.data(0), 1, n)
        dev.push_used(dev.pop().head, 0)
        dev.flush_used()
        drv.get_buf()
    assert drv.enable_cb() is True  # the driver waits
    drv.add_inbuf(q.data(0), 1, "last")
    dev.push_used(dev.pop().head, 0)
    dev.flush_used()
    assert dev.needs_notify() is True


def test_a_loop_in_a_huge_indirect_table_ends_within_2_16_descriptors():
    # next is 16 bits wide, so no chain reaches past entry 65535: a 1 Mi-entry
    # table with a loop is refused after at most 2^16 steps, not 2^20.
    q = MockSplitQueue(8)
    table_gpa, entries = 1 << 32, 1 << 20
    q.memory.add_region(MemoryRegion(table_gpa, memoryview(bytearray(16 * entries))))
    q.memory.write(table_gpa, struct.pack("<QIHH", q.data(0), 1, NEXT, 0))
    q.desc(0, table_gpa, 16 * entries, INDIRECT)
    q.make_available(0)
    with pytest.raises(DescriptorError, match=r"loop .* indirect table \(65536 descriptors\)"):
        q.device().pop()
