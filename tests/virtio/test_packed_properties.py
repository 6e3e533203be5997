"""Properties of the packed ring, driver and device together (hypothesis).

* The ring's contract (tests/virtio/ring_machine.py) over any queue size 1..32768
  (powers of two or not), any starting slot and wrap counter, with EVENT_IDX (DESC and
  off_wrap) and without (ENABLE/DISABLE) (2.8.10, 2.8.21.3).
* The wrap counters flip lap after lap, with every needed notification.
* Garbage in the ring is a chain inside guest memory, a DescriptorError, or an
  AvailIndexError that stops the queue: no other exception, no endless walk.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize

from tests.virtio.mock import MockPackedQueue
from tests.virtio.ring_machine import SETTINGS, SLOTS, RingMachine
from virtnet.virtio.errors import AvailIndexError, DescriptorError
from virtnet.virtio.ring.layout import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT

ALL_SIZES = [1 << k for k in range(0, 16)]  # 1 .. 32768
SMALL_SIZES = [1, 2, 3, 5, 7, 8, 16]


class PackedRingMachine(RingMachine):
    """The packed ring: any queue size 1..32768, any starting slot and wrap counter."""

    @initialize(
        num=st.one_of(st.sampled_from(SMALL_SIZES), st.sampled_from(ALL_SIZES),
                      st.integers(1, 40), st.integers(1, 32768)),
        where=st.floats(0, 1, exclude_max=True),
        wrap=st.integers(0, 1),
        event_idx=st.booleans(),
        indirect_max=st.sampled_from([0, 2, 8]),
    )
    def setup(self, num: int, where: float, wrap: int, event_idx: bool,
              indirect_max: int) -> None:  # fmt: skip
        self.start(MockPackedQueue(
            num, event_idx=event_idx, indirect_max=indirect_max, data_slots=SLOTS,
            start=(int(where * num), wrap),
        ))  # fmt: skip

    def avail_mark(self) -> tuple[int, int, object]:
        drv = self.drv
        return drv.next_avail, drv.avail_wrap, self.q.read_desc(drv.next_avail)

    def burst_heads(self, before: tuple[int, int, object], count: int) -> list[int]:
        pos, num = before[0], self.q.num
        assert self.drv.next_avail == (pos + count) % num
        return [self.q.read_desc((pos + k) % num).id for k in range(count)]

    def used_published(self) -> bool:
        return self.q.is_used(self.drv.last_used, self.drv.used_wrap)

    def avail_published(self) -> bool:
        return self.q.is_avail(self.dev.last_avail, self.dev.avail_wrap)


PackedRingMachine.TestCase.settings = SETTINGS
TestPackedRing = PackedRingMachine.TestCase


# -- the wrap counters, the long way ------------------------------------------------------------


@pytest.mark.parametrize("num", [2, 3])
def test_wrap_counters_flip_lap_after_lap_and_every_needed_notification_is_asked_for(num):
    # 40 000 buffers, two per round: slots and both wrap counters go round thousands of
    # times (with 3 the rounds straddle the end). Under EVENT_IDX, each round: the
    # sleeping device is kicked for the first buffer and not the second; the waiting
    # driver is interrupted for the first used buffer and not the second.
    q = MockPackedQueue(num, event_idx=True, data_slots=2)
    drv, dev = q.driver(), q.device()
    assert drv.enable_cb() is True
    assert dev.enable_notify() is False
    flips = 0
    for n in range(0, 40_000, 2):
        wrap = drv.avail_wrap
        drv.add_inbuf(q.data(0), 8, n)
        assert drv.kick_prepare() is True
        drv.add_inbuf(q.data(1), 8, n + 1)
        assert drv.kick_prepare() is False
        flips += drv.avail_wrap != wrap
        dev.disable_notify()
        first, second = dev.pop_burst(2)
        first.writable[0][:4] = n.to_bytes(4, "little")
        dev.push_used(first.head, 4)
        dev.flush_used()
        assert dev.needs_notify() is True
        dev.push_used(second.head, 0)
        dev.flush_used()
        assert dev.needs_notify() is False
        drv.disable_cb()
        assert drv.get_buf() == (n, 4)
        assert q.read(q.data(0), 4) == n.to_bytes(4, "little")
        assert drv.get_buf() == (n + 1, 0)
        assert drv.enable_cb() is True
        assert dev.enable_notify() is False
    assert flips == 40_000 // num
    assert (drv.next_avail, drv.avail_wrap) == (dev.last_avail, dev.avail_wrap)
    assert (drv.last_used, drv.used_wrap) == (dev.used_pos, dev.used_wrap)
    assert drv.num_free == num


# -- garbage descriptors ---------------------------------------------------------------------


def _desc_strategy(num: int, q_end: int):
    addrs = st.one_of(
        st.integers(0x10_0000, q_end),
        st.integers(0, (1 << 64) - 1),
        st.sampled_from([0, q_end - 16, (1 << 64) - 16]),
    )
    lengths = st.one_of(
        st.integers(0, 64), st.sampled_from([16, 32, 48, 24, 0xFFFF_FFFF]), st.integers(0, 1 << 32)
    )
    # Mostly plausible flags (the chain bits with AVAIL/USED of either lap), some anything.
    flags = st.one_of(
        st.tuples(st.integers(0, 7), st.sampled_from([0x80, 0x8000, 0x8080, 0])).map(
            lambda t: t[0] | t[1]
        ),
        st.integers(0, 0xFFFF),
    )
    ids = st.one_of(st.integers(0, num + 1), st.integers(0, 0xFFFF))
    return st.tuples(addrs, lengths.map(lambda n: n & 0xFFFF_FFFF), ids, flags)


@st.composite
def garbage_rings(draw):
    num = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16]))
    q = MockPackedQueue(num, data_slots=4, guard=64)
    descs = draw(st.lists(_desc_strategy(num, q.end), min_size=num, max_size=num))
    tables = draw(st.lists(_desc_strategy(num, q.end), max_size=8))
    return q, descs, tables


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage_rings(), st.data())
def test_garbage_descriptors_give_a_chain_or_a_typed_error(ring, data):
    q, descs, tables = ring
    table_gpa = q.data(0)
    q.table(table_gpa, tables)
    for i, (addr, length, bid, flags) in enumerate(descs):
        if flags & VRING_DESC_F_INDIRECT and data.draw(st.booleans()):
            addr, length = table_gpa, 16 * len(tables)
        q.desc(i, addr, length, bid, flags)
    dev = q.device()
    burst = data.draw(st.booleans())
    seen = 0
    for _ in range(3 * q.num + 2):
        try:
            chains = dev.pop_burst(data.draw(st.integers(1, 4))) if burst else [dev.pop()]
        except AvailIndexError as e:
            assert e.head is None and "vq 0" in str(e)
            break  # the queue is stopped: nothing was consumed
        except DescriptorError as e:
            assert e.head is None or 0 <= e.head < q.num
            assert "vq 0" in str(e)
            if e.head is not None:
                dev.push_used(e.head, 0)
            continue
        if not chains or chains[0] is None:
            break
        for chain in chains:
            for addr, length, _ in chain.segments:
                assert q.gpa <= addr and addr + length <= q.end
            assert chain.out_len + chain.in_len <= 1 << 32
            assert 0 <= chain.head < q.num
            dev.push_used(chain.head, 0)
            seen += 1
    dev.flush_used()
    assert seen <= 3 * q.num + 2
    assert q.guards_intact()


@settings(max_examples=100, deadline=None)
@given(
    num=st.one_of(st.sampled_from(ALL_SIZES), st.integers(1, 32768)),
    where=st.floats(0, 1, exclude_max=True),
    wrap=st.integers(0, 1),
    length=st.integers(1, 16),
)
def test_a_chain_of_any_length_up_to_the_queue_size_round_trips(num, where, wrap, length):
    length = min(length, num)
    start = (int(where * num), wrap)
    q = MockPackedQueue(num, data_slots=1, start=start)
    drv, dev = q.driver(), q.device()
    segs = [(q.data(0, 16 * k), 16) for k in range(length)]
    bid = drv.add(segs[: length // 2], segs[length // 2 :], "t")
    chain = dev.pop()
    assert chain.head == bid and len(chain.segments) == length
    nexts = [q.read_desc((start[0] + k) % num).flags & VRING_DESC_F_NEXT for k in range(length)]
    assert nexts == [VRING_DESC_F_NEXT] * (length - 1) + [0]
    dev.push_used(bid, chain.in_len)
    dev.flush_used()
    assert drv.get_buf() == ("t", chain.in_len)
    end = start[0] + length
    assert (drv.last_used, drv.used_wrap) == (end % num, wrap ^ (end >= num))
    assert q.read_desc(start[0]).flags & 0x8080 == (0x8080 if wrap else 0)
