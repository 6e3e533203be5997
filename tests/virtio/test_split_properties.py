"""Properties of the split ring, driver and device together (hypothesis).

* The ring's contract (tests/virtio/ring_machine.py) over queue sizes 2..32768 and
  starting indices near the 16-bit wrap (2.7.7.2, 2.7.10 "avail_event"/"used_event").
* The 16-bit indices wrap past 65536, the long way, with every needed notification.
* Garbage in the descriptor table is either a chain inside guest memory or a
  DescriptorError: no other exception, no endless walk, no wedged queue.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize

from tests.virtio.mock import MockSplitQueue
from tests.virtio.ring_machine import SETTINGS, SLOTS, RingMachine
from virtnet.virtio.errors import DescriptorError
from virtnet.virtio.ring.layout import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT

ALL_SIZES = [1 << k for k in range(1, 16)]  # 2 .. 32768
SMALL_SIZES = [2, 4, 8, 16]


class SplitRingMachine(RingMachine):
    """The split ring: any queue size 2..32768, starting indices near the 16-bit wrap."""

    @initialize(
        num=st.one_of(st.sampled_from(SMALL_SIZES), st.sampled_from(ALL_SIZES)),
        start_idx=st.one_of(st.integers(0xFFF8, 0xFFFF), st.just(0), st.integers(0, 0xFFFF)),
        event_idx=st.booleans(),
        indirect_max=st.sampled_from([0, 2, 8]),
    )
    def setup(self, num: int, start_idx: int, event_idx: bool, indirect_max: int) -> None:
        self.start(MockSplitQueue(
            num, event_idx=event_idx, indirect_max=indirect_max, data_slots=SLOTS,
            start_idx=start_idx,
        ))  # fmt: skip

    def avail_mark(self) -> int:
        return self.q.avail_idx

    def burst_heads(self, before: int, count: int) -> list[int]:
        assert self.q.avail_idx == (before + count) & 0xFFFF  # one avail-index publish
        return [self.q.avail_ring(before + k) for k in range(count)]

    def used_published(self) -> bool:
        return self.q.used_idx != self.drv.last_used_idx

    def avail_published(self) -> bool:
        return self.q.avail_idx != self.dev.last_avail_idx


SplitRingMachine.TestCase.settings = SETTINGS
TestSplitRing = SplitRingMachine.TestCase


# -- wrap-around of the 16-bit indices, the long way ------------------------------------------


def test_indices_wrap_past_65536_and_every_needed_notification_is_asked_for():
    # 70 000 buffers through a 2-entry queue: avail idx, used idx, used_event and
    # avail_event all wrap. Each round, under EVENT_IDX: the sleeping device is
    # kicked for the first chain and not the second; the waiting driver is
    # interrupted for the first used entry and not the second.
    q = MockSplitQueue(2, event_idx=True, data_slots=2)
    drv, dev = q.driver(), q.device()
    assert drv.enable_cb() is True
    assert dev.enable_notify() is False
    for n in range(0, 70_000, 2):
        drv.add_inbuf(q.data(0), 8, n)
        assert drv.kick_prepare() is True
        drv.add_inbuf(q.data(1), 8, n + 1)
        assert drv.kick_prepare() is False
        dev.disable_notify()
        first, second = dev.pop(), dev.pop()
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
    assert q.avail_idx == q.used_idx == 70_000 & 0xFFFF
    assert q.used_event == q.avail_event == 70_000 & 0xFFFF
    assert drv.num_free == 2


# -- garbage descriptors ---------------------------------------------------------------------


def _desc_strategy(num: int, q_end: int):
    addrs = st.one_of(
        st.integers(0x10_0000, q_end),  # somewhere in (or just past) guest memory
        st.integers(0, (1 << 64) - 1),
        st.sampled_from([0, q_end - 16, (1 << 64) - 16]),
    )
    lengths = st.one_of(
        st.integers(0, 64), st.sampled_from([16, 32, 48, 24, 0xFFFF_FFFF]), st.integers(0, 1 << 32)
    )
    flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
    nexts = st.one_of(st.integers(0, num + 1), st.integers(0, 0xFFFF))
    return st.tuples(addrs, lengths.map(lambda n: n & 0xFFFF_FFFF), flags, nexts)


@st.composite
def garbage_rings(draw):
    num = draw(st.sampled_from([2, 4, 8, 16]))
    q = MockSplitQueue(num, data_slots=4, guard=64)
    descs = draw(st.lists(_desc_strategy(num, q.end), min_size=num, max_size=num))
    # Indirect tables in the data area, pointed at by some descriptors.
    tables = draw(st.lists(_desc_strategy(num, q.end), max_size=8))
    heads = draw(st.lists(st.integers(0, num + 2), min_size=1, max_size=num))
    return q, descs, tables, heads


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage_rings(), st.data())
def test_garbage_descriptors_give_a_chain_or_a_descriptor_error(ring, data):
    q, descs, tables, heads = ring
    table_gpa = q.data(0)
    q.table(table_gpa, tables)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        if flags & VRING_DESC_F_INDIRECT and data.draw(st.booleans()):
            addr, length = table_gpa, 16 * len(tables)
        q.desc(i, addr, length, flags, nxt)
    for head in heads:
        q.make_available(head)
    dev = q.device()
    for _ in heads:
        try:
            chain = dev.pop()
        except DescriptorError as e:
            assert e.head is None or 0 <= e.head < q.num
            continue
        assert chain is not None
        for addr, length, _ in chain.segments:
            assert q.gpa <= addr and addr + length <= q.end
        assert chain.out_len + chain.in_len <= 1 << 32
        assert len(chain.segments) <= q.num * max(1, len(tables))
    # Every entry consumed; the queue still takes a good chain.
    assert dev.avail_pending() == 0 and dev.pop() is None
    q.desc(0, q.data(1), 8, 0)
    q.make_available(0)
    assert dev.pop().segments == [(q.data(1), 8, False)]
    assert q.guards_intact()


@settings(max_examples=100, deadline=None)
@given(
    num=st.sampled_from(ALL_SIZES),
    start_idx=st.integers(0, 0xFFFF),
    length=st.integers(1, 16),
)
def test_a_chain_of_any_length_up_to_the_queue_size_round_trips(num, start_idx, length):
    length = min(length, num)
    q = MockSplitQueue(num, data_slots=1, start_idx=start_idx)
    drv, dev = q.driver(), q.device()
    segs = [(q.data(0, 16 * k), 16) for k in range(length)]
    head = drv.add(segs[: length // 2], segs[length // 2 :], "t")
    chain = dev.pop()
    assert chain.head == head and len(chain.segments) == length
    flags = [q.read_desc(i).flags for i in range(num)]
    assert sum(1 for f in flags if f & VRING_DESC_F_NEXT) >= length - 1
    dev.push_used(head, chain.in_len)
    dev.flush_used()
    assert drv.get_buf() == ("t", chain.in_len)
    assert q.used_idx == (start_idx + 1) & 0xFFFF
