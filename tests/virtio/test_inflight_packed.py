"""In-flight tracking of a packed ring (vhost-user.rst "Inflight I/O tracking",
QueueRegionPacked): a device that dies anywhere between its stores, while the driver
goes on reusing the slots it gets back, is replaced by a new one on the same ring and
region, and every chain the driver posted comes back exactly once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.virtio.mock import MockPackedQueue
from virtnet.virtio.errors import DescriptorError
from virtnet.virtio.ring.inflight import (
    INFLIGHT_VERSION,
    InflightError,
    InflightPacked,
    packed_region_size,
    region_size,
)
from virtnet.virtio.ring.packed import PackedQueueDevice, PackedQueueDriver

NUM = 16


def region(num: int = NUM) -> memoryview:
    return memoryview(bytearray(packed_region_size(num)))


def u16(mem: memoryview, at: int) -> int:
    return int.from_bytes(mem[at : at + 2], "little")


def tracked(q: MockPackedQueue, mem: memoryview) -> tuple[PackedQueueDevice, list[int]]:
    dev = q.device()  # SET_VRING_BASE's fresh base: a tracked restart does not use it
    resub = dev.set_inflight(InflightPacked(mem, q.num))
    return dev, resub


def posted(n: int, *, rx: bool = False):
    """A ring with ``n`` one-descriptor chains posted (tx, or rx buffers) and a tracked
    device on it: (queue, driver, region, device)."""
    q = MockPackedQueue(NUM)
    drv = q.driver()
    add = drv.add_inbuf if rx else drv.add_outbuf
    for i in range(n):
        add(q.data(i), 64, f"{'r' if rx else 't'}{i}")
    mem = region()
    dev, _ = tracked(q, mem)
    return q, drv, mem, dev


def test_the_layout_is_the_specs():
    assert packed_region_size(NUM) == 576  # 32 + 32 * 16, rounded up to 64
    assert packed_region_size(3) == 128 and region_size(3, packed=False) == 64
    q = MockPackedQueue(NUM)
    drv = q.driver()
    mem = region()
    dev, resub = tracked(q, mem)
    assert resub == []
    assert u16(mem, 8) == INFLIGHT_VERSION and u16(mem, 10) == NUM  # version, desc_num
    assert mem[20] == mem[21] == 1  # used_wrap_counter, old_used_wrap_counter
    drv.add([(q.data(0), 100), (q.data(1), 50)], [], "two")
    chain = dev.pop()
    assert chain is not None
    head = 0  # the free list's first entry
    at = 32 + 32 * head
    assert mem[at] == 1  # inflight
    assert u16(mem, at + 4) == 1 and u16(mem, at + 6) == 2  # last, num
    assert int.from_bytes(mem[at + 8 : at + 16], "little") == 1  # counter
    assert int.from_bytes(mem[at + 20 : at + 24], "little") == 100  # len
    assert int.from_bytes(mem[at + 24 : at + 32], "little") == q.data(0)  # addr
    assert u16(mem, 32 + 32 + 16) == chain.head  # the last entry's id
    assert u16(mem, 12) == u16(mem, 14) == 2  # free_head, old_free_head: past both
    dev.push_used(chain.head, 0)
    assert mem[at] == 1  # pushed, not written to the ring yet
    dev.flush_used()
    assert mem[at] == 0
    assert u16(mem, 12) == u16(mem, 14) == 0  # its entries back at the front
    assert u16(mem, 16) == u16(mem, 18) == 2  # used_idx, old_used_idx: two slots on


# The old device's steps, and the driver's: it reaps what came back and posts again,
# into slots the device wrote used descriptors to, over chains the device still holds.
dev_steps = st.one_of(st.just(("pop",)), st.tuples(st.just("use"), st.integers(0, 64)),
                      st.just(("flush",)), st.just(("unpop",)), st.just(("reap",)),
                      st.tuples(st.just("post"), st.integers(1, 3)))  # fmt: skip
# How it dies: at a step's end, or inside a flush (before or after its first used
# descriptor's flags reached the ring).
deaths = st.sampled_from(["between", "flush-before-flags", "flush-after-flags"])


class World:
    def __init__(self, posted: int) -> None:
        self.q = MockPackedQueue(NUM, data_slots=64)
        self.drv: PackedQueueDriver = self.q.driver()
        self.mem = region()
        self.posted: list[str] = []
        self.returned: list[str] = []
        for _ in range(posted):
            self.post(1)

    def post(self, descs: int) -> None:
        if self.drv.num_free < descs:
            return
        n = len(self.posted)
        token = f"t{n}"
        self.drv.add([(self.q.data(n % 64), 64 + d) for d in range(descs)], [], token)
        self.posted.append(token)

    def reap(self) -> None:
        for token, _len in self.drv.get_bufs(64):
            assert token not in self.returned, f"{token} returned twice"
            self.returned.append(token)


def die_in_flush(dev: PackedQueueDevice, mem: memoryview, after_flags: bool) -> None:
    """A flush cut short: the region's entries freed and used_idx stored, then the
    batch's first used descriptor (after_flags: also its flags) and nothing more."""
    region = dev.inflight
    assert region is not None
    heads = [region._entry[(w >> 32) & 0xFFFF] for w, _s in dev._shadow]
    old = bytes(mem[14:16]), bytes(mem[18:20]), mem[21]
    first = dev.used_pos
    ring = dev.ring.desc.cast("B")
    before = bytes(ring[16 * first : 16 * first + 16])
    dev.flush_used()
    mem[14:16], mem[18:20], mem[21] = old  # the old_* updates never happened
    for e in heads:
        if e >= 0:
            mem[32 + 32 * e] = 1  # nor the inflight clears
    if not after_flags:
        ring[16 * first : 16 * first + 16] = before


@settings(max_examples=300, deadline=None)
@given(posted=st.integers(1, NUM), lives=st.lists(st.tuples(st.lists(dev_steps, max_size=50),
                                                            deaths), min_size=1, max_size=3))
def test_every_chain_comes_back_exactly_once_across_deaths(posted, lives):
    w = World(posted)
    for script, death in lives:
        dev, _ = tracked(w.q, w.mem)
        held: list[int] = []
        order: list[int] = []
        for step in script:
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
                dev.unpop(1)  # vhost_discard_vq_desc: the newest popped, still unused
                held.remove(order.pop())
            elif step[0] == "reap":
                w.reap()
            elif step[0] == "post" and len(w.posted) < 60:
                w.post(step[1])
        if death != "between" and dev.has_unflushed():
            die_in_flush(dev, w.mem, death == "flush-after-flags")
        w.reap()
    dev, _ = tracked(w.q, w.mem)  # the last device completes everything
    for _ in range(4 * NUM):
        chain = dev.pop()
        if chain is None:
            break
        dev.push_used(chain.head, 0)
    dev.flush_used()
    w.reap()
    assert sorted(w.returned) == sorted(w.posted)  # none lost, none twice
    assert w.drv.num_free == NUM


def test_a_restart_resumes_at_the_regions_positions_not_the_base():
    q = MockPackedQueue(NUM)
    drv = q.driver()
    for i in range(5):
        drv.add([(q.data(i), 64)] * (1 + i % 2), [], f"t{i}")  # 1, 2, 1, 2, 1 slots
    mem = region()
    dev, _ = tracked(q, mem)
    chains = [dev.pop() for _ in range(5)]
    for c in (chains[1], chains[3]):  # 2 + 2 slots used, out of order
        dev.push_used(c.head, 0)
    dev.flush_used()
    dev2, resub = tracked(q, mem)
    assert resub == [chains[i].head for i in (0, 2, 4)]  # oldest first
    assert (dev2.used_pos, dev2.used_wrap) == (4, 1)
    assert dev2.last_avail_idx == 7 | 1 << 15  # 4 used + 3 in flight
    got = dev2.pop_burst(8)
    assert [c.head for c in got] == resub
    assert [bytes(s) for s in got[0].readable] == [bytes(q.read(q.data(0), 64))]
    for c in got:
        dev2.push_used(c.head, 0)
    dev2.flush_used()
    assert sorted(t for t, _ in drv.get_bufs(8)) == ["t0", "t1", "t2", "t3", "t4"]


def test_the_region_keeps_a_chain_the_driver_overwrote_in_the_ring():
    """What the copies are for: chain 0 is held while 1.. are used; the driver reuses
    their slots, the used descriptors among them, so the ring no longer has chain 0."""
    q = MockPackedQueue(NUM, data_slots=64)
    drv = q.driver()
    q.write(q.data(0), b"held" * 16)
    for i in range(NUM):
        drv.add([(q.data(i), 64)], [], f"t{i}")
    mem = region()
    dev, _ = tracked(q, mem)
    chains = [dev.pop() for _ in range(NUM)]
    for c in chains[1:]:
        dev.push_used(c.head, 0)
    dev.flush_used()
    assert len(drv.get_bufs(NUM)) == NUM - 1
    for i in range(NUM - 1):
        drv.add([(q.data(20 + i), 64)], [], f"n{i}")  # over slot 0 too
    assert q.read_desc(0).addr != q.data(0)
    dev2, resub = tracked(q, mem)
    assert resub == [chains[0].head]
    first = dev2.pop()
    assert first is not None and first.head == chains[0].head
    assert bytes(first.readable[0]) == b"held" * 16


def test_a_resubmitted_chain_given_back_is_taken_again_first():
    q, drv, mem, dev = posted(4)
    first = [dev.pop(), dev.pop()]
    dev, resub = tracked(q, mem)
    assert resub == [c.head for c in first]
    burst = dev.pop_burst(8)
    assert [c.head for c in burst] == resub
    dev.unpop(2)
    assert [c.head for c in dev.pop_burst(8)] == resub
    rest = dev.pop_burst(8)
    assert len(rest) == 2 and dev.pop() is None
    dev.unpop(1)  # a fresh one given back: not in flight, its slot the ring's again
    assert not dev.inflight.is_inflight(rest[1].head)
    assert dev.pop().head == rest[1].head


def test_a_clean_stop_leaves_nothing_in_flight():
    q, drv, mem, dev = posted(5, rx=True)
    chains = dev.pop_burst(5)
    dev.push_used(chains[0].head, 10)
    dev.flush_used()
    dev.unpop(4)
    assert dev.vring_base() == 1 | 1 << 15
    dev2, resub = tracked(q, mem)
    assert resub == [] and dev2.last_avail_idx == 1 | 1 << 15


def test_a_bad_resubmitted_chain_is_consumed_with_its_id():
    q, drv, mem, dev = posted(3)
    first = [dev.pop() for _ in range(3)]
    e = 1  # entry 1 holds the second chain's copy: point it outside guest memory
    mem[32 + 32 * e + 24 : 32 + 32 * e + 32] = (1 << 40).to_bytes(8, "little")
    dev, resub = tracked(q, mem)
    assert [c.head for c in dev.pop_burst(8)] == [first[0].head]
    with pytest.raises(DescriptorError, match="resubmitted after a restart") as err:
        dev.pop_burst(8)
    assert err.value.head == first[1].head
    dev.push_used(first[1].head, 0)  # handed back with length 0
    assert [c.head for c in dev.pop_burst(8)] == [first[2].head]


def test_a_region_that_does_not_fit_is_refused_by_name():
    q, drv, mem, dev = posted(3)
    dev.pop(), dev.pop()
    with pytest.raises(InflightError, match="needs"):
        InflightPacked(memoryview(bytearray(64)), NUM)
    with pytest.raises(InflightError, match="queue of 16 descriptors, the ring has 32"):
        MockPackedQueue(32).device().set_inflight(_as_other_size(mem))
    loop = bytearray(mem)
    loop[32 + 32 * 2 + 2 : 32 + 32 * 2 + 4] = (2).to_bytes(2, "little")  # entry 2 -> 2
    with pytest.raises(InflightError, match="free list loops at entry 2"):
        q.device().set_inflight(InflightPacked(memoryview(loop), NUM))
    twice = bytearray(mem)
    twice[32 + 32 * 1 + 16 : 32 + 32 * 1 + 18] = twice[32 + 16 : 32 + 18]  # same id
    with pytest.raises(InflightError, match="in flight twice"):
        q.device().set_inflight(InflightPacked(memoryview(twice), NUM))


def _as_other_size(mem: memoryview) -> InflightPacked:
    big = memoryview(bytearray(packed_region_size(32)))
    big[: len(mem)] = mem
    return InflightPacked(big, 32)


def test_clear_makes_a_region_fresh():
    q = MockPackedQueue(NUM)
    q.driver().add_outbuf(q.data(0), 64, "a")
    mem = region()
    dev, _ = tracked(q, mem)
    dev.pop()
    dev.inflight.clear()
    _, resub = tracked(q, mem)
    assert resub == []


# -- without the region: a stale base from QEMU 7.2 ------------------------------------


@settings(max_examples=200, deadline=None)
@given(rounds=st.lists(st.tuples(st.integers(0, NUM), st.integers(0, NUM), st.booleans()),
                       min_size=1, max_size=12),
       taken=st.integers(0, NUM))  # fmt: skip
def test_a_device_given_the_rings_start_finds_its_used_position(rounds, taken):
    """One-slot chains, in-order completion: the device dies (its last chains taken, not
    used) after any number of laps, and the next one gets QEMU's stale base (0, wrap 1)."""
    q = MockPackedQueue(NUM, data_slots=64)
    drv = q.driver()
    dev = q.device()
    posted: list[str] = []
    returned: list[str] = []
    for post, use, reap in rounds:
        for _ in range(min(post, drv.num_free)):
            drv.add_outbuf(q.data(len(posted) % 64), 64, f"t{len(posted)}")
            posted.append(f"t{len(posted)}")
        for _ in range(use):
            chain = dev.pop()
            if chain is None:
                break
            dev.push_used(chain.head, 0)
        dev.flush_used()
        if reap:
            returned += [t for t, _len in drv.get_bufs(NUM)]
    for _ in range(taken):
        dev.pop()  # taken and never used: the death
    new = q.device()  # last_avail_idx: the ring's start, whatever the ring says
    new.sync_last_avail_to_used()
    assert (new.used_pos, new.used_wrap) == (dev.used_pos, dev.used_wrap)
    while (chain := new.pop()) is not None:
        new.push_used(chain.head, 0)
    new.flush_used()
    returned += [t for t, _len in drv.get_bufs(NUM)]
    assert sorted(returned) == sorted(posted)


def test_a_right_base_and_a_ring_of_longer_chains_are_left_alone():
    q = MockPackedQueue(NUM, data_slots=64)
    drv = q.driver()
    dev = q.device()
    for i in range(NUM // 2):
        drv.add_outbuf(q.data(i), 64, f"t{i}")
    for _ in range(NUM // 2):
        dev.push_used(dev.pop().head, 0)
    dev.flush_used()
    drv.get_bufs(NUM)
    right = q.device(last_avail_idx=dev.last_avail_idx)
    assert right.sync_last_avail_to_used() is None  # not stale: kept
    # Two-slot chains: the second slot of each keeps the driver's flags, the bits flip
    # more than once, and a stale base stands (pop names the ring's state, as before).
    q2 = MockPackedQueue(NUM, data_slots=64)
    drv2 = q2.driver()
    dev2 = q2.device()
    for i in range(3):
        drv2.add([(q2.data(2 * i), 64), (q2.data(2 * i + 1), 64)], [], f"c{i}")
    for _ in range(3):
        dev2.push_used(dev2.pop().head, 0)
    dev2.flush_used()
    stale = q2.device()
    assert stale.sync_last_avail_to_used() is None
    assert stale.last_avail_idx == 1 << 15


def test_chains_owed_after_a_restart_are_work_without_a_kick():
    q, drv, mem, dev = posted(2)
    dev.pop(), dev.pop()  # all the ring had
    dev, resub = tracked(q, mem)
    assert len(resub) == 2 and dev.avail_pending() == 2
    assert dev.enable_notify()  # nothing new in the ring, but two chains owed
    dev.pop_burst(8)
    assert not dev.enable_notify()
