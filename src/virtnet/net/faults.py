"""``virtnet device --faults``: a device that lies on purpose, to test drivers.

The kinds of lie are named once here. The device counts what it injects as
``fault_KIND`` (device_stats) and the driver counts what it meets under the same
names (driver_stats, net/ratelimit.py), so a run is checked by comparing the two.

``FaultyQueue`` sits between the device and its ring (sans-I/O, like the ring): it
forwards everything and, when the seeded plan says so, changes a used entry, the
packet header the device just wrote, the used index (a packed ring's: the wrap
counter a batch is written with), or the answer to needs_notify. Every kind lies on
split and packed rings alike.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, final

from virtnet.net.constants import ETH_HLEN
from virtnet.net.header import (
    HDR,
    NUM_BUFFERS,
    NUM_BUFFERS_OFFSET,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
)
from virtnet.virtio.dirtylog import DirtyLog
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.chain import Chain
from virtnet.virtio.ring.packed import PackedQueueDevice
from virtnet.virtio.ring.queue import RingDevice
from virtnet.virtio.ring.split import SplitQueueDevice

if TYPE_CHECKING:
    # Only for annotations: device.py imports this module.
    from virtnet.net.device import VirtnetDevice

# kind -> what the device does (``virtnet device --help`` prints these)
FAULT_KINDS: dict[str, str] = {
    "bad_id": "an extra used entry with an id beyond the ring",
    "dup_id": "a used id returned twice in a row",
    "bad_len": "a used length beyond the buffer (rx)",
    "idx_jump": "the used index jumps over a ring's worth ahead (packed: a batch "
    "written with the other lap's wrap counter)",
    "num_buffers_big": "num_buffers beyond every buffer posted",
    "num_buffers_small": "num_buffers one less than used (0 if one)",
    "short": "a packet shorter than header + Ethernet header",
    "bad_csum": "NEEDS_CSUM with csum_start+offset past the frame",
    "bad_gso": "gso_type TCPV4 with gso_size 0",
    "irq_drop": "an interrupt the driver asked for is not sent",
    "irq_late": "an interrupt held 50 ms (sent at the next flush)",
    "hold": "a tx chain sent but kept, never used, until its ring stops (tx): chains in "
    "flight, completed out of order, for a restart to find",
}

# -- the fault plan (``--faults SPEC --seed N``) --------------------------------------------

log = logging.getLogger("virtnet.device")

DEFAULT_RATE = 0.01  # a fault at one opportunity in a hundred unless the spec says
LATE_SECONDS = 0.05  # irq_late: the interrupt goes at the first flush after this
RX_Q, TX_Q = 0, 1
# Where each kind applies unless ``q=`` says otherwise: lies about received data exist
# on the rx queue only; a used ring or an interrupt can lie on either.
DEFAULT_QUEUES = {kind: (RX_Q,) for kind in FAULT_KINDS} | {
    "irq_drop": (RX_Q, TX_Q),
    "irq_late": (RX_Q, TX_Q),
    "hold": (TX_Q,),
}
ANY_QUEUE = frozenset(("bad_id", "dup_id", "idx_jump", "irq_drop", "irq_late"))
# One lie per used entry (a driver stops at the first it sees); tried in this order.
ENTRY_KINDS = ("bad_id", "dup_id", "bad_len")
PACKET_KINDS = ("short", "num_buffers_big", "num_buffers_small", "bad_csum", "bad_gso")


class FaultSpecError(ValueError):
    """A --faults spec that cannot be parsed; the text names the part."""


@dataclass
class FaultRule:
    """One kind: injected at ``rate`` of its opportunities, after the first ``after``,
    at most ``count`` times (0: no limit), on ``queues``."""

    kind: str
    rate: float = DEFAULT_RATE
    count: int = 0
    after: int = 0
    queues: tuple[int, ...] = ()
    seen: int = 0
    injected: int = 0


@dataclass
class FaultPlan:
    """The faults a device injects, drawn from one ``random.Random(seed)``: the same
    seed and the same traffic repeat a run exactly."""

    rules: dict[str, FaultRule]
    seed: int = 0
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> FaultPlan:
        """``KIND[:rate=R][:count=N][:after=N][:q=rx|tx|both]``, comma separated."""
        rules: dict[str, FaultRule] = {}
        for item in (x.strip() for x in spec.split(",")):
            if not item:
                continue
            kind, *opts = item.split(":")
            if kind not in FAULT_KINDS:
                raise FaultSpecError(
                    f"unknown fault kind {kind!r}: one of {', '.join(FAULT_KINDS)}"
                )
            rule = FaultRule(kind, queues=DEFAULT_QUEUES[kind])
            for opt in opts:
                rule_option(rule, opt)
            rules[kind] = rule
        if not rules:
            raise FaultSpecError("no fault kind given")
        return cls(rules, seed)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)

    def fire(self, kind: str, q: int) -> bool:
        """One opportunity for ``kind`` on queue ``q``: True if the fault goes in now."""
        rule = self.rules.get(kind)
        if rule is None or q not in rule.queues:
            return False
        rule.seen += 1
        if rule.seen <= rule.after or rule.count and rule.injected >= rule.count:
            return False
        if self.rng.random() >= rule.rate:
            return False
        rule.injected += 1
        return True

    def install(self, dev: VirtnetDevice) -> None:
        """Put the fault layer between ``dev`` and its rings. A ring that has one
        already gets this plan's instead: layers do not stack."""
        dev.rxq = FaultyQueue(_ring_of(dev.rxq), self, dev, RX_Q)
        dev.txq = FaultyQueue(_ring_of(dev.txq), self, dev, TX_Q)

    @staticmethod
    def release(dev: VirtnetDevice) -> None:
        """The rings stop: every chain ``hold`` kept is used now (length 0), so a clean
        stop leaves none of the driver's buffers behind."""
        for q in (dev.rxq, dev.txq):
            if isinstance(q, FaultyQueue):
                q.release_held()


def rule_option(rule: FaultRule, opt: str) -> None:
    name, _, value = opt.partition("=")
    try:
        if name == "rate":
            rule.rate = float(value)
            if not 0 < rule.rate <= 1:
                raise ValueError("must be in (0, 1]")
        elif name in ("count", "after"):
            setattr(rule, name, int(value))
            if getattr(rule, name) < 0:
                raise ValueError("must be >= 0")
        elif name == "q":
            queues = {"rx": (RX_Q,), "tx": (TX_Q,), "both": (RX_Q, TX_Q)}[value]
            if rule.kind == "hold" and queues != (TX_Q,):
                raise ValueError("hold keeps sent chains: tx only")
            if queues != (RX_Q,) and rule.kind not in ANY_QUEUE | {"hold"}:
                raise ValueError(f"{rule.kind} lies about received data: rx only")
            rule.queues = queues
        else:
            raise ValueError("unknown option (rate, count, after, q)")
    except (ValueError, KeyError) as e:
        raise FaultSpecError(f"{rule.kind}: {opt!r}: {e}") from None


def _write_at(views: Sequence[memoryview], offset: int, data: bytes) -> None:
    """``data`` at ``offset`` of the concatenation of ``views`` (a header may straddle)."""
    for v in views:
        if offset >= len(v):
            offset -= len(v)
            continue
        n = min(len(data), len(v) - offset)
        v[offset : offset + n] = data[:n]
        data = data[n:]
        offset = 0
        if not data:
            return


def _read_at(views: Sequence[memoryview], offset: int, n: int) -> bytes:
    out = b""
    for v in views:
        if offset >= len(v):
            offset -= len(v)
            continue
        out += bytes(v[offset : offset + n - len(out)])
        offset = 0
        if len(out) == n:
            break
    return out


def _ring_of(q: RingDevice | FaultyQueue) -> RingDevice:
    return q.ring if isinstance(q, FaultyQueue) else q


@final
class FaultyQueue:
    """A device-side ring that lies: wraps a SplitQueueDevice or PackedQueueDevice,
    forwards what the device and the vhost-user worker call, and changes used
    entries, headers, the used index and notifications per the plan.

    Sans-I/O like the ring: it only edits what the device writes into guest memory
    and what ``needs_notify`` answers; the caller signals as usual.
    """

    def __init__(self, q: RingDevice, plan: FaultPlan, dev: VirtnetDevice, index: int) -> None:
        self._q = q
        self._plan = plan
        self._dev = dev  # for its stats (replaced at each session's accumulate) and hdr
        self._index = index
        self._chains: dict[int, Chain] = {}  # popped, not yet used: head -> Chain
        self._followers = 0  # buffers still to come of the packet being pushed
        self._late_due: float | None = None
        self._held: list[int] = []  # hold: heads kept from the used ring

    @property
    def ring(self) -> RingDevice:
        """The ring this layer lies in front of."""
        return self._q

    # -- the ring's interface, forwarded (the lies are in the methods further down) --

    @property
    def num(self) -> int:
        return self._q.num

    @property
    def index(self) -> int:
        return self._q.index

    @property
    def memory(self) -> GuestMemory:
        return self._q.memory

    @property
    def last_avail_idx(self) -> int:
        return self._q.last_avail_idx

    def avail_pending(self) -> int:
        return self._q.avail_pending()

    def vring_base(self, unpopped: int = 0) -> int:
        return self._q.vring_base(unpopped)

    def disable_notify(self) -> None:
        self._q.disable_notify()

    @property
    def dirty(self) -> DirtyLog | None:
        return self._q.dirty

    def set_dirty_log(self, log: DirtyLog | None, desc_gpa: int, used_gpa: int) -> None:
        self._q.set_dirty_log(log, desc_gpa, used_gpa)  # its lies are logged by the ring

    def enable_notify(self) -> bool:
        return self._q.enable_notify()

    def _count(self, kind: str, what: str) -> None:
        stats = self._dev.stats
        name = "fault_" + kind
        stats.bump(name)
        log.warning("fault %s injected: vq %d: %s", kind, self._index, what)

    # -- chains ------------------------------------------------------------------

    def pop(self) -> Chain | None:
        chain = self._q.pop()
        if chain is not None:
            self._chains[chain.head] = chain
        return chain

    def pop_burst(self, budget: int) -> list[Chain]:
        chains = self._q.pop_burst(budget)
        for chain in chains:
            self._chains[chain.head] = chain
        return chains

    def unpop(self, n: int = 1) -> None:
        self._q.unpop(n)  # the chains come back from pop: their records are replaced

    # -- used entries ------------------------------------------------------------

    def push_used(self, head: int, length: int) -> None:
        self._push(head, length)

    def push_used_burst(self, used: Sequence[tuple[int, int]]) -> None:
        for head, length in used:
            self._push(head, length)

    def release_held(self) -> None:
        if self._held:
            log.info("vq %d: %d held chains used at the ring's stop", self._index,
                     len(self._held))  # fmt: skip
            for head in self._held:
                self._q.push_used(head, 0)
            self._held.clear()
            self._q.flush_used()

    def _push(self, head: int, length: int) -> None:
        plan, q, i = self._plan, self._q, self._index
        if i == TX_Q and plan.fire("hold", i):
            self._chains.pop(head, None)
            self._held.append(head)
            self._count("hold", f"tx chain {head} sent and kept ({len(self._held)} held)")
            return
        chain = self._chains.pop(head, None)
        packet: int | None = None  # buffers of the packet this one starts, if it does
        if i == RX_Q and chain is not None:
            if self._followers:
                self._followers -= 1
            elif length >= self._dev.hdr_len:
                packet = self._packet_buffers(chain)
                self._followers = packet - 1
        if plan.fire("bad_id", i):
            bogus = plan.rng.randrange(q.num, 0x10000)
            self._count("bad_id", f"used id {bogus} (no such descriptor) before id {head}")
            self._push_lie(bogus, length)
        elif plan.fire("dup_id", i):
            self._count("dup_id", f"used id {head} len {length} returned twice")
            q.push_used(head, length)
            self._push_lie(head, length)
            return
        elif chain is not None and i == RX_Q and plan.fire("bad_len", i):
            bad = chain.in_len + plan.rng.randint(1, 4096)
            self._count("bad_len", f"used id {head} len {bad} > buffer {chain.in_len}")
            length = bad
        elif packet is not None and chain is not None:  # (packet is only set with a chain)
            length = self._packet_fault(chain, head, length, packet)
        q.push_used(head, length)

    def _push_lie(self, head: int, length: int) -> None:
        """A used entry for an id that is no buffer in flight. A split ring writes any
        id; a packed ring refuses one it did not hand out, so the lie goes round it."""
        q = self._q
        if isinstance(q, PackedQueueDevice):
            q.push_used_unchecked(head, length)
        else:
            q.push_used(head, length)

    def _packet_buffers(self, chain: Chain) -> int:
        if not self._dev.mergeable:
            return 1
        raw = _read_at(chain.writable, NUM_BUFFERS_OFFSET, 2)
        if len(raw) != 2:
            return 1
        (num,) = NUM_BUFFERS.unpack(raw)
        return max(1, int(num))

    def _packet_fault(self, chain: Chain, head: int, length: int, num: int) -> int:
        """At most one lie about this packet (its first buffer is ``chain``); returns
        the used length to push for that buffer."""
        plan, mergeable = self._plan, self._dev.mergeable
        for kind in PACKET_KINDS:
            if kind == "short" and num != 1 or kind.startswith("num_") and not mergeable:
                continue
            if not plan.fire(kind, RX_Q):
                continue
            if kind == "short":
                return self._lie_short(head, length)
            if kind.startswith("num_"):
                self._lie_num_buffers(kind, chain, head, num)
            else:
                self._lie_header(kind, chain, head, length, num)
            return length
        return length

    def _lie_short(self, head: int, length: int) -> int:
        short = self._plan.rng.randrange(0, self._dev.hdr_len + ETH_HLEN)
        self._count("short", f"used id {head} len {short} (was {length})")
        return short

    def _lie_num_buffers(self, kind: str, chain: Chain, head: int, num: int) -> None:
        if kind == "num_buffers_big":  # beyond any buffer the driver can have posted
            lie = min(num + self._q.num + self._plan.rng.randrange(0, 64), 0xFFFF)
        else:
            lie = num - 1
        _write_at(chain.writable, NUM_BUFFERS_OFFSET, NUM_BUFFERS.pack(lie))
        self._count(kind, f"used id {head}: num_buffers {lie} for {num} buffers")

    def _lie_header(self, kind: str, chain: Chain, head: int, length: int, num: int) -> None:
        views = chain.writable
        flags, gso, h_len, gso_size, start, off = HDR.unpack(_read_at(views, 0, HDR.size))
        if kind == "bad_csum":
            if num == 1:  # the frame's length is known: end the checksum just past it
                frame = length - self._dev.hdr_len
                start, off = frame - self._plan.rng.randrange(0, 2), 16
                past = f"the {frame}-byte frame"
            else:  # past any frame (MAX_GSO_FRAME < 0xFFFF + 0x100)
                start, off, past = 0xFFFF, 0x100, "any frame"
            flags |= VIRTIO_NET_HDR_F_NEEDS_CSUM
            what = f"csum_start {start} + csum_offset {off} past {past}"
        else:
            gso, gso_size = VIRTIO_NET_HDR_GSO_TCPV4, 0
            what = "gso_type TCPV4 with gso_size 0"
        _write_at(views, 0, HDR.pack(flags, gso, h_len, gso_size, start, off))
        self._count(kind, f"used id {head}: {what}")

    def flush_used(self) -> None:
        q = self._q
        if not q.has_unflushed() or not self._plan.fire("idx_jump", self._index):
            q.flush_used()
        elif isinstance(q, SplitQueueDevice):
            jump = self._plan.rng.randint(q.num + 1, 0x7FFF)
            self._count("idx_jump", f"used idx {q.used_idx} -> {(q.used_idx + jump) & 0xFFFF} "
                        f"(+{jump}, ring of {q.num})")  # fmt: skip
            q.used_idx = (q.used_idx + jump) & 0xFFFF
            q.flush_used()
        else:
            # A packed ring has no used index: its jump is the wrap counter's. This batch
            # is written with the other lap's AVAIL/USED bits, as if the used position
            # were a ring's worth ahead; the counter is put back for the notification.
            lap = q.used_wrap ^ 1
            self._count("idx_jump", f"used descriptors from {q.used_pos} written with wrap "
                        f"counter {lap}, not {q.used_wrap} (ring of {q.num})")  # fmt: skip
            q.used_wrap ^= 1
            q.flush_used()
            q.used_wrap ^= 1

    # -- notifications -----------------------------------------------------------

    def _late_now(self) -> bool:
        return self._late_due is not None and self._plan.clock() >= self._late_due

    def has_unflushed(self) -> bool:
        # A late interrupt that fell due counts as work: flush_rx/flush_tx then asks
        # needs_notify, which sends it.
        return self._q.has_unflushed() or self._late_now()

    def needs_notify(self) -> bool:
        want = self._q.needs_notify()
        if want:
            if self._plan.fire("irq_drop", self._index):
                self._count("irq_drop", "interrupt not sent")
                return False
            if self._plan.fire("irq_late", self._index):
                if self._late_due is None:
                    self._late_due = self._plan.clock() + LATE_SECONDS
                self._count("irq_late", f"interrupt held {LATE_SECONDS * 1000:g} ms")
                return False
            self._late_due = None  # this interrupt carries the late one too
            return True
        if self._late_now():
            self._late_due = None
            return True
        return False
