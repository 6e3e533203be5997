"""The ring's contract as one hypothesis state machine, for split and packed alike.

* Any interleaving of driver adds / refill bursts / kicks / device pops / pop
  bursts / unpops / used pushes (single and burst) / flushes / driver gets (single
  and burst) returns every token exactly once, with the length the device gave and
  every byte the device wrote; the driver's free count always matches what is in
  flight.
* Notifications are never lost: if the driver waits for an interrupt and the device
  published used buffers, the device asked for one (2.7.7.2 / 2.8.10, the
  enable_cb_prepare/poll race included); if the device waits for a kick and the
  driver published and kicked, the driver asked for one. With EVENT_IDX and without.

The layouts' own machines (test_split_properties.py, test_packed_properties.py) say
how their queue is made and read; everything else is here, once.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.virtio.mock import DATA_SLOT, MockPackedQueue, MockSplitQueue
from virtnet.virtio.errors import QueueFullError

MockQueue = MockSplitQueue | MockPackedQueue
SLOTS = 32
MAX_SEG = 256  # 8 segments * 256 bytes fit a 4 KiB data slot
SETTINGS = settings(
    max_examples=250,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


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


class RingMachine(RuleBasedStateMachine):
    """A driver and a device sharing one ring, and a model of what must come back.

    The rules, the model and the invariants are the ring's contract, the same for both
    layouts; a subclass makes the queue (its ``@initialize``, which calls ``start``) and
    answers the four questions only its layout can: ``avail_mark`` (the published state a
    refused add must leave alone), ``burst_heads`` (the heads a refill burst published),
    ``used_published`` and ``avail_published`` (what the other side has not seen yet).
    """

    def __init__(self) -> None:
        super().__init__()
        self.q: MockQueue | None = None

    def start(self, q: MockQueue) -> None:
        self.q = q
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
            before = self.avail_mark()
            try:
                drv.add(out, in_, token)
            except QueueFullError:
                assert self.avail_mark() == before
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
        before = self.avail_mark()
        assert drv.add_inbufs(bufs) == expect
        for head, (addr, n, token) in zip(self.burst_heads(before, expect), bufs, strict=False):
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
        used = [(chain.head, self._fill(chain, token, how_much))
                for chain, token in self.popped[:count]]  # fmt: skip
        del self.popped[:count]
        self.dev.push_used_burst(used)

    def _fill(self, chain, token: int, how_much: int) -> int:
        """The device writes its bytes into a popped chain; returns the used length."""
        if self.last_pop == token:
            self.last_pop = None
        length = chain.in_len if how_much % 3 == 0 else how_much % (chain.in_len + 1)
        data = memoryview(device_bytes(token, length))
        for view in chain.writable:
            n = min(len(view), len(data))
            view[:n] = data[:n]
            data = data[n:]
        self.pushed.append((token, length))
        return length

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
        self.dev.push_used(chain.head, self._fill(chain, token, how_much))

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

    # -- what only the layout knows -----------------------------------------------------------

    def avail_mark(self) -> object:
        raise NotImplementedError

    def burst_heads(self, before: object, count: int) -> list[int]:
        raise NotImplementedError

    def used_published(self) -> bool:
        raise NotImplementedError

    def avail_published(self) -> bool:
        raise NotImplementedError

    # -- what must always hold ----------------------------------------------------------------

    @invariant()
    def no_lost_interrupt(self) -> None:
        if self.q is None or self.cb_state != "armed":
            return
        if self.used_published():
            assert self.interrupt_pending, "used entries published, no interrupt requested"

    @invariant()
    def no_lost_kick(self) -> None:
        if self.q is None or not self.dev_waiting or self.adds_since_kick:
            return
        if self.avail_published():
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
