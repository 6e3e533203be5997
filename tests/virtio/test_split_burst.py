"""The burst calls of the split ring: the same checks as the single ones, bad
entries in the middle of a burst handled exactly once, impossible ring states
breaking the queue instead of being walked."""

from __future__ import annotations

import pytest

from tests.virtio.mock import MockSplitQueue
from virtnet.virtio.errors import AvailIndexError, DescriptorError, UsedIndexError, UsedRingError
from virtnet.virtio.ring.layout import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE


def posted(q: MockSplitQueue, n: int):
    drv = q.driver()
    assert drv.add_inbufs([(q.data(i), 64, f"t{i}") for i in range(n)]) == n
    return drv


def test_add_inbufs_publishes_once_and_stops_when_full():
    q = MockSplitQueue(8)
    drv = q.driver()
    assert drv.add_inbufs([(q.data(i % 8), 100 + i, i + 1) for i in range(10)]) == 8
    assert q.avail_idx == 8 and drv.num_free == 0
    assert [q.read_desc(q.avail_ring(k)).len for k in range(8)] == [100 + k for k in range(8)]
    assert drv.add_inbufs([(q.data(0), 1, 99)]) == 0


def test_add_inbufs_refuses_a_none_token_after_publishing_the_rest():
    q = MockSplitQueue(8)
    drv = q.driver()
    with pytest.raises(ValueError, match="token"):
        drv.add_inbufs([(q.data(0), 10, 1), (q.data(1), 10, None)])
    assert q.avail_idx == 1 and drv.num_free == 7


def test_get_bufs_takes_a_burst_and_stops_before_a_bad_entry():
    q = MockSplitQueue(8)
    drv = posted(q, 6)
    for head in (0, 1):
        q.put_used(head, 10)
    q.put_used(7, 10)  # not in flight
    q.put_used(2, 10)
    assert drv.get_bufs(64) == [("t0", 10), ("t1", 10)]
    with pytest.raises(UsedRingError, match="used id 7"):
        drv.get_bufs(64)
    assert drv.get_bufs(64) == [("t2", 10)]
    assert drv.num_free == 8 - 3


def test_get_bufs_carries_the_token_of_an_overlong_first_entry():
    q = MockSplitQueue(8)
    drv = posted(q, 2)
    q.put_used(0, 65)
    q.put_used(1, 64)
    with pytest.raises(UsedRingError) as e:
        drv.get_bufs(8)
    assert e.value.token == "t0"
    assert drv.get_bufs(8) == [("t1", 64)]


def test_a_used_index_jump_breaks_the_queue_once():
    q = MockSplitQueue(256)
    drv = posted(q, 4)
    q.set_used_idx(30000)
    with pytest.raises(UsedIndexError, match="30000 ahead"):
        drv.get_bufs(64)
    assert drv.broken
    assert drv.get_bufs(64) == [] and drv.get_buf() is None
    assert not drv.more_used() and not drv.poll(drv.enable_cb_prepare())


def test_pop_burst_stops_before_a_bad_chain_and_raises_for_it_next():
    q = MockSplitQueue(8)
    for head in range(4):
        q.desc(head, q.data(head), 32, VRING_DESC_F_WRITE)
    q.desc(2, 0xDEAD_0000_0000, 32, VRING_DESC_F_WRITE)  # outside guest memory
    for head in range(4):
        q.make_available(head)
    dev = q.device()
    assert [c.head for c in dev.pop_burst(64)] == [0, 1]
    with pytest.raises(DescriptorError) as e:
        dev.pop_burst(64)
    assert e.value.head == 2
    assert [c.head for c in dev.pop_burst(64)] == [3]
    assert dev.pop_burst(64) == []


def test_pop_burst_names_an_impossible_head_first():
    q = MockSplitQueue(8)
    q.make_available(9)
    dev = q.device()
    with pytest.raises(DescriptorError, match="head 9"):
        dev.pop_burst(4)
    assert dev.last_avail_idx == 1


def test_pop_burst_refuses_an_avail_index_jump_without_consuming():
    q = MockSplitQueue(8)
    q.set_avail_idx(100)
    dev = q.device()
    with pytest.raises(AvailIndexError):
        dev.pop_burst(4)
    assert dev.last_avail_idx == 0


def test_push_used_burst_is_published_by_one_flush():
    q = MockSplitQueue(8)
    drv = posted(q, 3)
    dev = q.device()
    chains = dev.pop_burst(8)
    dev.push_used_burst([(c.head, 7) for c in chains])
    assert q.used_idx == 0
    dev.flush_used()
    assert q.used_entries(0) == [(0, 7), (1, 7), (2, 7)]
    assert drv.get_bufs(8) == [("t0", 7), ("t1", 7), ("t2", 7)]


def _mixed_ring() -> MockSplitQueue:
    """Heads 3, 1, 6, 0, 5, 2 (one run of the table, in another order): direct ones
    both ways, a two-descriptor chain at 6 -> 7 and an indirect one at 5."""
    q = MockSplitQueue(8)
    for head in (0, 1, 2, 3):
        q.desc(head, q.data(head), 16 + head, VRING_DESC_F_WRITE if head % 2 else 0)
    q.desc(6, q.data(6), 10, VRING_DESC_F_NEXT, next=7)
    q.desc(7, q.data(7), 20, VRING_DESC_F_WRITE)
    q.desc(5, q.data(5), q.table(q.data(5), [(q.data(4), 8, 0, 0)]), VRING_DESC_F_INDIRECT)
    for head in (3, 1, 6, 0, 5, 2):
        q.make_available(head)
    return q


def test_pop_burst_over_one_run_of_the_table_gives_what_pop_gives():
    # Six heads spanning eight descriptors: pop_burst reads them with one slice.
    one, burst = _mixed_ring().device(), _mixed_ring().device()
    singles = [one.pop() for _ in range(6)]
    chains = burst.pop_burst(64)
    assert [(c.head, c.segments, c.out_len, c.in_len) for c in chains] == [
        (c.head, c.segments, c.out_len, c.in_len) for c in singles if c is not None
    ]
    assert [c.head for c in chains] == [3, 1, 6, 0, 5, 2]
    assert burst.last_avail_idx == one.last_avail_idx == 6
