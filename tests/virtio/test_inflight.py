"""In-flight tracking of a split ring (vhost-user.rst "Inflight I/O tracking"): a
device that dies anywhere between its stores and is replaced by a new one on the same
ring and region returns every chain the driver posted exactly once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.virtio.mock import MockSplitQueue
from virtnet.virtio.errors import DescriptorError
from virtnet.virtio.ring.inflight import (
    INFLIGHT_VERSION,
    InflightError,
    InflightSplit,
    split_region_size,
)
from virtnet.virtio.ring.split import SplitQueueDevice

NUM = 16


def region(num: int = NUM) -> memoryview:
    return memoryview(bytearray(split_region_size(num)))


def tracked(q: MockSplitQueue, mem: memoryview) -> tuple[SplitQueueDevice, list[int]]:
    dev = q.device()
    resub = dev.set_inflight(InflightSplit(mem, q.num))
    return dev, resub


def popped(n: int, posted: int | None = None, *, rx: bool = False):
    """A ring with ``posted`` (default ``n``) chains posted, tx or rx, and the first ``n``
    of them popped by a tracked device."""
    q = MockSplitQueue(NUM)
    drv = q.driver()
    add = drv.add_inbuf if rx else drv.add_outbuf
    for i in range(n if posted is None else posted):
        add(q.data(i), 64, f"t{i}")
    mem = region()
    dev, _ = tracked(q, mem)
    return q, drv, mem, dev, [dev.pop() for _ in range(n)]


def test_the_layout_is_the_specs():
    mem = region()
    assert split_region_size(NUM) == 320  # 16 + 16 * 16, rounded up to 64
    assert split_region_size(3) == 64
    q = MockSplitQueue(NUM)
    drv = q.driver()
    drv.add_outbuf(q.data(0), 64, "a")
    dev, resub = tracked(q, mem)
    assert resub == []
    raw = bytes(mem)
    assert int.from_bytes(raw[8:10], "little") == INFLIGHT_VERSION
    assert int.from_bytes(raw[10:12], "little") == NUM  # desc_num
    chain = dev.pop()
    assert chain is not None
    at = 16 + 16 * chain.head
    raw = bytes(mem)
    assert raw[at] == 1 and int.from_bytes(raw[at + 8 : at + 16], "little") == 1  # counter
    dev.push_used(chain.head, 0)
    raw = bytes(mem)
    assert raw[at] == 1  # not published yet
    assert int.from_bytes(raw[12:14], "little") == chain.head  # last_batch_head
    dev.flush_used()
    raw = bytes(mem)
    assert raw[at] == 0 and int.from_bytes(raw[14:16], "little") == 1  # used_idx


# Each step of the old device: pop one, use one of the popped (by position), flush, or
# die. Death can come between any two of them: before a flush, after pushes.
steps = st.lists(st.one_of(st.just(("pop",)), st.tuples(st.just("use"), st.integers(0, 64)),
                           st.just(("flush",)), st.just(("unpop",))), max_size=60)


@settings(max_examples=300, deadline=None)
@given(posted=st.integers(1, NUM), script=steps, second=steps)
def test_every_chain_comes_back_exactly_once_across_two_deaths(posted, script, second):
    q = MockSplitQueue(NUM)
    drv = q.driver()
    for i in range(posted):
        drv.add_outbuf(q.data(i), 64, f"t{i}")
    mem = region()
    for plan in (script, second):  # two devices die, each after its script
        dev, _ = tracked(q, mem)
        held: list[int] = []  # popped, not used
        order: list[int] = []  # popped, newest last: what unpop may give back
        for step in plan:
            if step[0] == "pop":
                chain = dev.pop()
                if chain is not None:
                    held.append(chain.head)
                    order.append(chain.head)
            elif step[0] == "use" and held:
                dev.push_used(held.pop(step[1] % len(held)), 0)  # out of order
            elif step[0] == "flush":
                dev.flush_used()
            elif step[0] == "unpop" and order and order[-1] in held:
                # vhost_discard_vq_desc's contract: the newest popped, still unused
                dev.unpop(1)
                held.remove(order.pop())
        # dies here: pushed entries not flushed are lost with it
    dev, _ = tracked(q, mem)  # the last device completes everything
    while (chain := dev.pop()) is not None:
        dev.push_used(chain.head, 0)
    dev.flush_used()
    got = [token for token, _len in drv.get_bufs(64)]
    assert sorted(got) == sorted(f"t{i}" for i in range(posted))  # none lost, none twice
    assert drv.get_bufs(64) == []


def test_without_tracking_an_out_of_order_completion_is_lost_and_another_returned_twice():
    """The control: what the used index alone gives a restarted device."""
    q = MockSplitQueue(NUM)
    drv = q.driver()
    for i in range(4):
        drv.add_outbuf(q.data(i), 64, f"t{i}")
    dev = q.device()
    chains = [dev.pop() for _ in range(4)]
    for c in chains[1:]:
        dev.push_used(c.head, 0)  # chain 0 held, the rest used
    dev.flush_used()
    dev = q.device(last_avail_idx=0)
    dev.sync_last_avail_to_used()  # continue from used idx 3
    chain = dev.pop()
    assert chain is not None and chain.head == chains[3].head  # t3 again, t0 never
    # ... and with tracking, t0 alone is resubmitted:
    q2, _drv2, mem, dev2, chains = popped(4)
    for c in chains[1:]:
        dev2.push_used(c.head, 0)
    dev2.flush_used()
    dev2, resub = tracked(q2, mem)
    assert resub == [chains[0].head]
    assert dev2.last_avail_idx == 4 and dev2.avail_pending() == 1


def test_a_death_after_the_used_index_but_before_the_flags_clears_the_last_batch():
    q, drv, mem, dev, chains = popped(3)
    for c in chains[:2]:
        dev.push_used(c.head, 0)
    q.set_used_idx(dev.used_idx)  # the used index reached the ring; then it died
    dev2, resub = tracked(q, mem)
    assert resub == [chains[2].head]
    assert [t for t, _ in drv.get_bufs(8)] == ["t0", "t1"]


def test_resubmission_keeps_the_order_the_chains_were_taken_in():
    q, _drv, mem, dev, chains = popped(6)
    for c in (chains[1], chains[4]):
        dev.push_used(c.head, 0)
    dev.flush_used()
    _, resub = tracked(q, mem)
    assert resub == [chains[i].head for i in (0, 2, 3, 5)]


def test_a_resubmitted_chain_given_back_is_taken_again_first():
    q, _drv, mem, dev, first = popped(2, posted=4)
    dev, resub = tracked(q, mem)
    assert resub == [c.head for c in first]
    burst = dev.pop_burst(8)  # the two resubmitted ones: a burst does not mix them
    assert [c.head for c in burst] == resub
    dev.unpop(2)
    again = dev.pop_burst(8)
    assert [c.head for c in again] == resub
    rest = dev.pop_burst(8)
    assert len(rest) == 2 and dev.pop() is None


def test_a_region_for_another_queue_size_or_a_used_index_past_it_is_refused():
    q = MockSplitQueue(NUM)
    q.driver().add_outbuf(q.data(0), 64, "a")
    mem = region(32)
    tracked(q, memoryview(mem))
    with pytest.raises(InflightError, match="queue of 16 descriptors, the ring has 32"):
        MockSplitQueue(32).device().set_inflight(InflightSplit(mem, 32))
    q.set_used_idx(40)
    with pytest.raises(InflightError, match="40 is 40 past"):
        q.device().set_inflight(InflightSplit(memoryview(mem)[: split_region_size(NUM)], NUM))
    with pytest.raises(InflightError, match="needs"):
        InflightSplit(memoryview(bytearray(20)), NUM)


def test_clear_makes_a_region_fresh():
    q = MockSplitQueue(NUM)
    q.driver().add_outbuf(q.data(0), 64, "a")
    mem = region()
    dev, _ = tracked(q, mem)
    dev.pop()
    dev.inflight.clear()
    _, resub = tracked(q, mem)
    assert resub == []


def test_a_chain_given_back_is_not_in_flight_and_a_clean_stop_leaves_nothing():
    """vhost_discard_vq_desc: the chains a stop gives back (rx buffers cached ahead of
    frames) are the available ring's again; GET_VRING_BASE leaves them out and so does
    the region."""
    q, _drv, mem, dev, chains = popped(5, rx=True)
    dev.push_used(chains[0].head, 10)
    dev.flush_used()
    dev.unpop(4)
    assert not any(dev.inflight.is_inflight(c.head) for c in chains)
    assert dev.vring_base() == 1
    dev2, resub = tracked(q, mem)
    assert resub == [] and dev2.last_avail_idx == 1


def test_a_bad_resubmitted_chain_after_good_ones_ends_the_burst_unconsumed():
    q, _drv, mem, _dev, first = popped(3)
    q.desc(first[1].head, 1 << 40, 64)  # the driver scribbled on it meanwhile
    dev, resub = tracked(q, mem)
    assert resub == [c.head for c in first]
    assert [c.head for c in dev.pop_burst(8)] == [first[0].head]
    with pytest.raises(DescriptorError) as e:
        dev.pop_burst(8)
    assert e.value.head == first[1].head  # consumed now: its used entry (len 0) follows
    assert [c.head for c in dev.pop_burst(8)] == [first[2].head]
