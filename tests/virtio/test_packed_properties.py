"""Properties of the packed ring, driver and device together (hypothesis).

The split ring's state machine, ported (tests/virtio/test_split_properties.py):

* Any interleaving of driver adds / refill bursts / kicks / device pops / pop
  bursts / unpops / used pushes (single and burst) / flushes / driver gets (single
  and burst), over random buffer shapes, any queue size 1..32768 (powers of two or
  not) and any starting slot and wrap counter, returns every token exactly once,
  with the length the device gave and every byte the device wrote; the driver's
  free count always matches what is in flight.
* Notifications are never lost: if the driver waits for an interrupt and the
  device marked buffers used, the device asked for one (2.8.10, 2.8.21.3, the
  enable_cb_prepare/poll race included); if the device waits for a kick and the
  driver made buffers available and kicked, the driver asked for one. Both with
  EVENT_IDX (DESC and off_wrap) and without (ENABLE/DISABLE).
* Garbage in the ring is a chain inside guest memory, a DescriptorError, or an
  AvailIndexError that stops the queue: no other exception, no endless walk.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.virtio.mock import DATA_SLOT, MockPackedQueue
from virtnet.virtio.errors import AvailIndexError, DescriptorError, QueueFullError
from virtnet.virtio.ring.layout import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT

ALL_SIZES = [1 << k for k in range(0, 16)]  # 1 .. 32768
SMALL_SIZES = [1, 2, 3, 5, 7, 8, 16]
SLOTS = 32
MAX_SEG = 256  # 8 segments * 256 bytes fit a 4 KiB data slot


def out_bytes(token: int, n: int) -> bytes:
    return random.Random(token).randbytes(n)


def device_bytes(token: int, n: int) -> bytes:
    return random.Random(~token).randbytes(n)


@dataclass
class Buf:
    token: int
    head: int
    out: list[tuple[int, int]]
    in_: list[tuple[int, int]]
    slot: int
    ndescs: int

    @property
    def in_len(self) -> int:
        return sum(n for _, n in self.in_)


class PackedRingMachine(RuleBasedStateMachine):
    """A driver and a device sharing one ring, and a model of what must come back."""

    def __init__(self) -> None:
        super().__init__()
        self.q: MockPackedQueue | None = None

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
        start = (int(where * num), wrap)
        self.q = MockPackedQueue(
            num, event_idx=event_idx, indirect_max=indirect_max, data_slots=SLOTS,
            start=start,
        )  # fmt: skip
        self.drv = self.q.driver()
        self.dev = self.q.device()
        self.next_token = 1
        self.free_slots = list(range(SLOTS))
        self.bufs: dict[int, Buf] = {}  # token -> buffer, from add to return
        self.by_head: dict[int, int] = {}  # head -> token, while in flight
        self.avail_order: deque[int] = deque()  # heads published, not popped
        self.popped: list[tuple[object, int]] = []  # (chain, token), not pushed
        self.last_pop: int | None = None  # token of the latest pop, for unpop
        self.pushed: list[tuple[int, int]] = []  # (token, len) pushed, not flushed
        self.flushed: deque[tuple[int, int]] = deque()  # visible, not got
        self.returned: set[int] = set()
        # Notification model.
        self.drv.disable_cb()
        self.cb_state = "polling"  # polling | preparing | armed
        self.opaque = 0
        self.interrupt_pending = False
        self.dev.disable_notify()
        self.dev_waiting = False
        self.kick_pending = False
        self.adds_since_kick = 0

    # -- driver ------------------------------------------------------------------------------

    @precondition(lambda self: self.q is not None and self.free_slots)
    @rule(
        outs=st.lists(st.integers(0, MAX_SEG), max_size=3),
        ins=st.lists(st.integers(0, MAX_SEG), max_size=3),
        inbuf=st.booleans(),
    )
    def add(self, outs: list[int], ins: list[int], inbuf: bool) -> None:
        if not outs and not ins:
            ins = [64]
        q, drv = self.q, self.drv
        token = self.next_token
        slot = self.free_slots[-1]
        addr = q.data(slot)
        out, in_ = [], []
        for lengths, segs in ((outs, out), (ins, in_)):
            for n in lengths:
                segs.append((addr, n))
                addr += n
        assert addr <= q.data(slot) + DATA_SLOT
        total = len(out) + len(in_)
        ind = q.indirect_max
        ndescs = 1 if ind and 1 < total <= ind and drv.num_free else total
        if drv.num_free < ndescs:
            before = (drv.next_avail, drv.avail_wrap, q.read_desc(drv.next_avail))
            try:
                drv.add(out, in_, token)
            except QueueFullError:
                assert (drv.next_avail, drv.avail_wrap, q.read_desc(drv.next_avail)) == before
                return
            raise AssertionError(f"{total} segments added with {drv.num_free} free")
        q.write(q.data(slot), out_bytes(token, sum(n for _, n in out)))
        for a, n in in_:
            q.write(a, b"\xee" * n)
        if inbuf and not out and len(in_) == 1:
            head = drv.add_inbuf(*in_[0], token)
        else:
            head = drv.add(out, in_, token)
        assert head not in self.by_head
        self.next_token += 1
        self.free_slots.pop()
        self.bufs[token] = Buf(token, head, out, in_, slot, ndescs)
        self.by_head[head] = token
        self.avail_order.append(head)
        self.adds_since_kick += 1

    @precondition(lambda self: self.q is not None and self.free_slots)
    @rule(lengths=st.lists(st.integers(0, MAX_SEG), min_size=1, max_size=12))
    def add_inbufs(self, lengths: list[int]) -> None:
        """A refill burst: one-descriptor writable buffers, one avail-index publish."""
        q, drv = self.q, self.drv
        lengths = lengths[: len(self.free_slots)]
        bufs = []
        for k, n in enumerate(lengths):
            slot = self.free_slots[-1 - k]
            q.write(q.data(slot), b"\xee" * n)
            bufs.append((q.data(slot), n, self.next_token + k))
        expect = min(len(bufs), drv.num_free)
        pos = drv.next_avail
        assert drv.add_inbufs(bufs) == expect
        assert drv.next_avail == (pos + expect) % q.num
        for k, (addr, n, token) in enumerate(bufs[:expect]):
            head = q.read_desc((pos + k) % q.num).id
            assert head not in self.by_head
            slot = self.free_slots.pop()
            self.bufs[token] = Buf(token, head, [], [(addr, n)], slot, 1)
            self.by_head[head] = token
            self.avail_order.append(head)
        self.next_token += expect
        self.adds_since_kick += expect

    @precondition(lambda self: self.q is not None)
    @rule()
    def kick(self) -> None:
        if self.drv.kick_prepare():
            self.kick_pending = True
        self.adds_since_kick = 0

    # With callbacks on too (Linux frees tx buffers that way): each get_buf then
    # moves used_event, and once drained, only a new interrupt may wake the driver.
    @precondition(lambda self: self.q is not None and self.cb_state != "preparing")
    @rule(budget=st.integers(1, 8))
    def get_bufs(self, budget: int) -> None:
        for _ in range(budget):
            got = self.drv.get_buf()
            if not self.flushed:
                assert got is None
                break
            token, length = self.flushed.popleft()
            assert got == (token, length)
            self._check_returned(token, length)
        if self.cb_state == "armed" and not self.flushed:
            self.interrupt_pending = False

    @precondition(lambda self: self.q is not None and self.cb_state != "preparing")
    @rule(budget=st.integers(1, 40))
    def get_bufs_burst(self, budget: int) -> None:
        got = self.drv.get_bufs(budget)
        assert len(got) == min(budget, len(self.flushed))
        for entry in got:
            token, length = self.flushed.popleft()
            assert entry == (token, length)
            self._check_returned(token, length)
        if self.cb_state == "armed" and not self.flushed:
            self.interrupt_pending = False

    def _check_returned(self, token: int, length: int | None) -> None:
        assert token not in self.returned, f"token {token} returned twice"
        buf = self.bufs.pop(token)
        self.returned.add(token)
        del self.by_head[buf.head]
        self.free_slots.append(buf.slot)
        if length is None:
            return
        written = b"".join(self.q.read(a, n) for a, n in buf.in_)
        assert written[:length] == device_bytes(token, length)
        assert written[length:] == b"\xee" * (len(written) - length)

    @precondition(lambda self: self.q is not None and self.cb_state == "polling")
    @rule()
    def enable_cb_prepare(self) -> None:
        self.interrupt_pending = False
        self.opaque = self.drv.enable_cb_prepare()
        self.cb_state = "preparing"

    @precondition(lambda self: self.q is not None and self.cb_state == "preparing")
    @rule()
    def poll(self) -> None:
        if self.drv.poll(self.opaque):
            self.drv.disable_cb()
            self.cb_state = "polling"
        else:
            self.cb_state = "armed"

    @precondition(lambda self: self.q is not None and self.cb_state == "polling")
    @rule()
    def enable_cb(self) -> None:
        self.interrupt_pending = False
        if self.drv.enable_cb():
            self.cb_state = "armed"
        else:
            self.drv.disable_cb()

    @precondition(lambda self: self.q is not None and self.cb_state == "armed")
    @rule()
    def interrupt(self) -> None:
        if self.interrupt_pending:
            self.interrupt_pending = False
            self.drv.disable_cb()
            self.cb_state = "polling"

    # -- device ------------------------------------------------------------------------------

    @precondition(lambda self: self.q is not None and not self.dev_waiting)
    @rule()
    def pop(self) -> None:
        chain = self.dev.pop()
        if not self.avail_order:
            assert chain is None
            return
        head = self.avail_order.popleft()
        assert chain is not None and chain.head == head
        token = self.by_head[head]
        buf = self.bufs[token]
        assert chain.segments == [(a, n, False) for a, n in buf.out] + [
            (a, n, True) for a, n in buf.in_
        ]
        assert b"".join(bytes(v) for v in chain.readable) == out_bytes(
            token, sum(n for _, n in buf.out)
        )
        assert chain.in_len == buf.in_len
        self.popped.append((chain, token))
        self.last_pop = token

    @precondition(lambda self: self.q is not None and not self.dev_waiting)
    @rule(budget=st.integers(1, 40))
    def pop_burst(self, budget: int) -> None:
        chains = self.dev.pop_burst(budget)
        assert len(chains) == min(budget, len(self.avail_order))
        for chain in chains:
            head = self.avail_order.popleft()
            assert chain.head == head
            token = self.by_head[head]
            buf = self.bufs[token]
            assert chain.segments == [(a, n, False) for a, n in buf.out] + [
                (a, n, True) for a, n in buf.in_
            ]
            assert chain.in_len == buf.in_len
            self.popped.append((chain, token))
            self.last_pop = token

    @precondition(lambda self: self.q is not None and self.popped)
    @rule(count=st.integers(1, 40), how_much=st.integers(0, 1 << 16))
    def push_used_burst(self, count: int, how_much: int) -> None:
        used = []
        for chain, token in self.popped[:count]:
            if self.last_pop == token:
                self.last_pop = None
            length = chain.in_len if how_much % 3 == 0 else how_much % (chain.in_len + 1)
            data = memoryview(device_bytes(token, length))
            for view in chain.writable:
                n = min(len(view), len(data))
                view[:n] = data[:n]
                data = data[n:]
            used.append((chain.head, length))
            self.pushed.append((token, length))
        del self.popped[:count]
        self.dev.push_used_burst(used)

    # A device gives chains back before it goes to sleep (vhost: discard, then
    # enable_notify re-checks); giving back while asleep would hide them.
    @precondition(
        lambda self: self.q is not None and self.last_pop is not None and not self.dev_waiting
    )
    @rule()
    def unpop(self) -> None:
        token = self.last_pop
        self.last_pop = None
        self.dev.unpop(1)
        i = next(k for k, (_, t) in enumerate(self.popped) if t == token)
        del self.popped[i]
        self.avail_order.appendleft(self.bufs[token].head)

    @precondition(lambda self: self.q is not None and self.popped)
    @rule(pick=st.integers(0, 1 << 16), how_much=st.integers(0, 1 << 16))
    def push_used(self, pick: int, how_much: int) -> None:
        chain, token = self.popped.pop(pick % len(self.popped))
        if self.last_pop == token:
            self.last_pop = None
        length = chain.in_len if how_much % 3 == 0 else how_much % (chain.in_len + 1)
        data = memoryview(device_bytes(token, length))
        for view in chain.writable:
            n = min(len(view), len(data))
            view[:n] = data[:n]
            data = data[n:]
        self.dev.push_used(chain.head, length)
        self.pushed.append((token, length))

    @precondition(lambda self: self.q is not None)
    @rule()
    def flush(self) -> None:
        self.dev.flush_used()
        self.flushed.extend(self.pushed)
        self.pushed.clear()
        if self.dev.needs_notify():
            self.interrupt_pending = True

    @precondition(lambda self: self.q is not None and not self.dev_waiting)
    @rule()
    def device_sleep(self) -> None:
        self.kick_pending = False
        if self.dev.enable_notify():
            self.dev.disable_notify()  # more arrived: keep polling
        else:
            self.dev_waiting = True

    @precondition(lambda self: self.q is not None and self.dev_waiting and self.kick_pending)
    @rule()
    def device_wake(self) -> None:
        self.kick_pending = False
        self.dev_waiting = False
        self.dev.disable_notify()

    # -- what must always hold ----------------------------------------------------------------

    @invariant()
    def no_lost_interrupt(self) -> None:
        if self.q is None or self.cb_state != "armed":
            return
        if self.q.is_used(self.drv.last_used, self.drv.used_wrap):
            assert self.interrupt_pending, "used entries published, no interrupt requested"

    @invariant()
    def no_lost_kick(self) -> None:
        if self.q is None or not self.dev_waiting or self.adds_since_kick:
            return
        if self.q.is_avail(self.dev.last_avail, self.dev.avail_wrap):
            assert self.kick_pending, "chains published and kicked, no kick requested"

    @invariant()
    def descriptors_are_accounted_for(self) -> None:
        if self.q is None:
            return
        in_use = sum(b.ndescs for b in self.bufs.values())
        assert self.drv.num_free == self.q.num - in_use

    def teardown(self) -> None:
        if self.q is None:
            return
        if self.next_token % 2:
            # Device reset: every buffer not yet returned comes back from detach.
            detached = []
            while (token := self.drv.detach_unused_buf()) is not None:
                detached.append(token)
            assert sorted(detached) == sorted(self.bufs)
            for token in detached:
                self._check_returned(token, None)
        else:
            # Orderly drain: the device finishes everything, the driver gets it all.
            self.dev_waiting = False
            while self.avail_order:
                self.pop()
            while self.popped:
                self.push_used(0, 0)
            self.flush()
            self.cb_state = "polling"
            self.get_bufs(len(self.flushed) + 1)
            assert self.drv.get_buf() is None
        assert not self.bufs
        assert self.returned == set(range(1, self.next_token))
        assert self.drv.num_free == self.q.num


PackedRingMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
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
