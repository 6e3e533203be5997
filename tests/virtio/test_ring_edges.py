"""The rings at their boundaries: a whole queue's worth is legal, one more is a lie.

Each rule that refuses a peer's index, head or id is tested on both sides of its
limit -- ``num`` (taken), ``num + 1`` and ``2 * num`` (refused); ``num - 1`` (taken),
``num`` (refused) -- for split and packed rings, driver and device, the single call
and the burst. A limit moved by one either way, or doubled, fails one of them; a
check that lets an out-of-range head through fails as an ``IndexError`` here, not
as the typed error the caller counts.
"""

from __future__ import annotations

import pytest

from tests.virtio.mock import MockPackedQueue, MockSplitQueue
from virtnet.virtio.errors import (
    AvailIndexError,
    DescriptorError,
    UsedIndexError,
    UsedRingError,
)
from virtnet.virtio.ring.layout import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from virtnet.virtio.ring.packed import decode_base, encode_base

N = 8
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
CALLS = ["single", "burst"]
# Start at 0 and just before the 16-bit wrap, so the boundary is tested across it too.
STARTS = [0, 0x10000 - 3]


# -- helpers: one call or the other, until the ring says there is nothing more -------------


def _drain(one, burst, call: str) -> list:
    """Everything ``one()`` (None when empty) or ``burst(64)`` ([] when empty) gives."""
    out = []
    while True:
        got = [x for x in [one()] if x is not None] if call == "single" else burst(64)
        if not got:
            return out
        out += got


def take(drv, call: str) -> list:
    """Every used buffer the split or packed driver gives, one call at a time or in bursts."""
    return _drain(drv.get_buf, drv.get_bufs, call)


def pop(dev, call: str) -> list:
    """Every chain the split or packed device takes, by ``pop`` or by ``pop_burst``."""
    return _drain(dev.pop, dev.pop_burst, call)


def split_in_flight(q: MockSplitQueue):
    """A driver with all ``num`` buffers out, and the device having used every one."""
    drv = q.driver()
    assert drv.add_inbufs([(q.data(i), 64, f"t{i}") for i in range(q.num)]) == q.num
    for head in range(q.num):
        q.put_used(head, 10)
    return drv


def split_available(q: MockSplitQueue) -> None:
    """Every one of the ``num`` descriptors made available, one chain each."""
    for head in range(q.num):
        q.desc(head, q.data(head), 32, WRITE)
        q.make_available(head)


# -- split: the used index (driver) ----------------------------------------------------------


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("call", CALLS)
def test_split_driver_takes_a_used_index_exactly_a_queue_ahead(call, start):
    q = MockSplitQueue(N, start_idx=start)
    drv = split_in_flight(q)
    assert (q.used_idx - drv.last_used_idx) & 0xFFFF == N
    assert take(drv, call) == [(f"t{i}", 10) for i in range(N)]
    assert not drv.broken and drv.num_free == N


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("extra", [1, N], ids=["num+1", "2num"])
@pytest.mark.parametrize("call", CALLS)
def test_split_driver_breaks_the_queue_on_a_used_index_past_a_queue(call, extra, start):
    q = MockSplitQueue(N, start_idx=start)
    drv = split_in_flight(q)
    q.set_used_idx(q.used_idx + extra)
    with pytest.raises(UsedIndexError, match=f"is {N + extra} ahead"):
        take(drv, call)
    assert drv.broken and drv.num_free == 0  # nothing taken from a ring that lies
    assert take(drv, "single") == take(drv, "burst") == [] and not drv.more_used()


# -- split: the avail index (device) ---------------------------------------------------------


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("call", CALLS)
def test_split_device_takes_an_avail_index_exactly_a_queue_ahead(call, start):
    q = MockSplitQueue(N, start_idx=start)
    split_available(q)
    dev = q.device()
    assert dev.avail_pending() == N
    assert [c.head for c in pop(dev, call)] == list(range(N))


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("extra", [1, N], ids=["num+1", "2num"])
@pytest.mark.parametrize("call", CALLS)
def test_split_device_refuses_an_avail_index_past_a_queue_without_consuming(call, extra, start):
    q = MockSplitQueue(N, start_idx=start)
    split_available(q)
    q.set_avail_idx(q.avail_idx + extra)
    dev = q.device()
    with pytest.raises(AvailIndexError, match=f"is {N + extra} ahead"):
        pop(dev, call)
    assert dev.last_avail_idx == start  # nothing consumed: not one chain of garbage walked


# -- split: heads and next indices at the table's size (device) -----------------------------


@pytest.mark.parametrize("call", CALLS)
def test_split_device_takes_head_num_minus_1(call):
    q = MockSplitQueue(N)
    q.desc(N - 1, q.data(0), 32, WRITE)
    q.make_available(N - 1)
    assert [c.head for c in pop(q.device(), call)] == [N - 1]


@pytest.mark.parametrize("call", CALLS)
def test_split_device_refuses_head_num_with_a_descriptor_error(call):
    q = MockSplitQueue(N)
    q.make_available(N)
    dev = q.device()
    with pytest.raises(DescriptorError, match=f"names head {N} >= {N}"):
        pop(dev, call)
    assert dev.last_avail_idx == 1  # consumed: one bad entry does not wedge the queue


def test_split_pop_burst_ends_before_head_num_and_refuses_it_next():
    q = MockSplitQueue(N)
    q.desc(0, q.data(0), 32, WRITE)
    q.make_available(0)
    q.make_available(N)
    q.desc(1, q.data(1), 32, WRITE)
    q.make_available(1)
    dev = q.device()
    assert [c.head for c in dev.pop_burst(64)] == [0]
    with pytest.raises(DescriptorError, match=f"names head {N} >= {N}"):
        dev.pop_burst(64)
    assert [c.head for c in dev.pop_burst(64)] == [1]


@pytest.mark.parametrize("call", CALLS)
def test_split_device_follows_next_num_minus_1_and_refuses_next_num(call):
    q = MockSplitQueue(N)
    q.desc(0, q.data(0), 16, WRITE | NEXT, next=N - 1)
    q.desc(N - 1, q.data(1), 16, WRITE)
    q.make_available(0)
    q.desc(1, q.data(2), 16, WRITE | NEXT, next=N)
    q.make_available(1)
    dev = q.device()
    take_one = dev.pop if call == "single" else lambda: dev.pop_burst(64)[0]
    assert take_one().in_len == 32
    with pytest.raises(DescriptorError, match=f"next index {N} >= table size {N}") as e:
        take_one()
    assert e.value.head == 1


@pytest.mark.parametrize("call", CALLS)
def test_split_device_indirect_next_at_the_table_size(call):
    q = MockSplitQueue(N)
    k = 4
    table_a, table_b = q.data(4), q.data(5)
    good = [(q.data(0), 8, WRITE | NEXT, k - 1)] + [(0, 0, 0, 0)] * (k - 2) + [
        (q.data(0, 8), 8, WRITE, 0)
    ]
    bad = [(q.data(1), 8, WRITE | NEXT, k)] + [(q.data(1), 8, WRITE, 0)] * (k - 1)
    q.desc(0, table_a, q.table(table_a, good), INDIRECT)
    q.desc(1, table_b, q.table(table_b, bad), INDIRECT)
    q.make_available(0)
    q.make_available(1)
    dev = q.device()
    take_one = dev.pop if call == "single" else lambda: dev.pop_burst(64)[0]
    assert take_one().in_len == 16
    with pytest.raises(DescriptorError, match=f"next index {k} >= table size {k}"):
        take_one()


@pytest.mark.parametrize("call", CALLS)
def test_split_device_takes_a_chain_of_the_whole_table_and_refuses_a_loop(call):
    q = MockSplitQueue(N)
    for i in range(N):  # 0 -> 1 -> ... -> N-1: as long as a chain can be
        q.desc(i, q.data(i), 16, WRITE | (NEXT if i < N - 1 else 0), next=i + 1)
    q.make_available(0)
    dev = q.device()
    take_one = dev.pop if call == "single" else lambda: dev.pop_burst(64)[0]
    assert take_one().in_len == 16 * N
    q.desc(N - 1, q.data(N - 1), 16, WRITE | NEXT, next=0)  # now it never ends
    q.make_available(0)
    with pytest.raises(DescriptorError, match=f"loop or chain longer than its table \\({N} "):
        take_one()


@pytest.mark.parametrize("call", CALLS)
def test_split_device_stops_a_loop_of_the_whole_table_before_reading_a_descriptor_twice(call):
    # 0 -> 1 -> ... -> N-1 -> 0, readable then writable: the N-th step ends the walk (a
    # chain is never longer than its table). One step more would read descriptor 0 again
    # and refuse it for another rule, readable after writable.
    q = MockSplitQueue(N)
    for i in range(N):
        q.desc(i, q.data(i), 16, (WRITE if i == N - 1 else 0) | NEXT, next=(i + 1) % N)
    q.make_available(0)
    dev = q.device()
    take_one = dev.pop if call == "single" else lambda: dev.pop_burst(64)[0]
    with pytest.raises(DescriptorError, match=f"loop or chain longer than its table \\({N} "):
        take_one()


# -- split: used ids at the queue size (driver) ----------------------------------------------


@pytest.mark.parametrize("call", CALLS)
def test_split_driver_takes_used_id_num_minus_1_and_refuses_id_num(call):
    q = MockSplitQueue(N)
    drv = q.driver()
    assert drv.add_inbufs([(q.data(i), 64, f"t{i}") for i in range(N)]) == N
    q.put_used(N - 1, 10)
    assert take(drv, call) == [(f"t{N - 1}", 10)]
    q.put_used(N, 10)
    with pytest.raises(UsedRingError, match=f"used id {N} is not a buffer in flight"):
        take(drv, call)
    assert drv.num_free == 1  # only t7 came back


# -- packed: buffer ids at the queue size (device) -------------------------------------------


@pytest.mark.parametrize("descs", [1, 2], ids=["one-descriptor", "chain"])
@pytest.mark.parametrize("call", CALLS)
def test_packed_device_takes_id_num_minus_1_and_refuses_id_num(call, descs):
    q = MockPackedQueue(N)
    q.post([(q.data(0, 16 * d), 16, WRITE) for d in range(descs)], bid=N - 1)
    q.post([(q.data(1, 16 * d), 16, WRITE) for d in range(descs)], bid=N)
    q.post([(q.data(2, 16 * d), 16, WRITE) for d in range(descs)], bid=0)
    dev = q.device()
    take_one = dev.pop if call == "single" else lambda: dev.pop_burst(64)[0]
    assert take_one().head == N - 1
    with pytest.raises(DescriptorError, match=f"buffer id {N} >= queue size {N}") as e:
        take_one()
    assert e.value.head is None  # an id out of range names no buffer to give back
    assert take_one().head == 0  # consumed exactly its slots: the next chain is intact


def test_packed_pop_burst_ends_before_id_num_and_refuses_it_next():
    q = MockPackedQueue(N)
    q.post([(q.data(0), 16, WRITE)], bid=0)
    q.post([(q.data(1), 16, WRITE)], bid=N)
    q.post([(q.data(2), 16, WRITE)], bid=1)
    dev = q.device()
    assert [c.head for c in dev.pop_burst(64)] == [0]
    with pytest.raises(DescriptorError, match=f"buffer id {N} >= queue size {N}"):
        dev.pop_burst(64)
    assert [c.head for c in dev.pop_burst(64)] == [1]


@pytest.mark.parametrize(("pos", "ok"), [(N - 1, True), (N, False)])
def test_packed_vring_base_index_at_the_queue_size(pos, ok):
    base = encode_base(pos, 1)
    if ok:
        assert decode_base(base, N) == (pos, 1)
    else:
        with pytest.raises(ValueError, match=f"index {N} >= queue size {N}"):
            decode_base(base, N)


# -- packed: used ids at the queue size (driver) ---------------------------------------------


@pytest.mark.parametrize("call", CALLS)
def test_packed_driver_takes_used_id_num_minus_1_and_breaks_on_id_num(call):
    q = MockPackedQueue(N)
    drv = q.driver()
    assert drv.add_inbufs([(q.data(i), 64, f"t{i}") for i in range(N)]) == N
    q.mark_used(N - 1, 10)
    assert take(drv, call) == [(f"t{N - 1}", 10)]
    q.mark_used(N, 10)
    with pytest.raises(UsedRingError, match=f"names buffer id {N}, which is not a buffer"):
        take(drv, call)
    assert drv.broken and take(drv, "single") == take(drv, "burst") == []
