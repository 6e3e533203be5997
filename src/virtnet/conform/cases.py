"""The cases ``virtnet conform`` runs against a vhost-user net back-end.

Each case gets a fresh connection (``Context.session``), does one thing, and returns a
line saying what the back-end did -- or raises ``CaseFailure`` (what it did wrong) or
``CaseSkipped`` (it does not offer what the case needs). The runner then checks, after
every case, that the back-end still serves a normal session.

conformance cases need a back-end that echoes tx frames to rx unchanged, each queue pair
to itself: ``virtnet device --backend loopback --queues 2``, DPDK testpmd
``--forward-mode=io --rxq=2 --txq=2`` on a single port with ``queues=2``. The multiqueue
cases (``mq-*``) are skipped unless the back-end has PROTOCOL_F_MQ and two queue pairs.
The data cases run once per cell of a matrix (``Cell``): split or packed rings, EVENT_IDX
acked or not; a cell the back-end does not offer is "not offered". cases_packed.py and
cases_net.py add their cases to the same list.
robustness cases need nothing from the back-end but to survive them: each one is
something a hostile or broken front-end sends, and what the back-end answers is
reported; they fail only where the spec leaves no choice (a REPLY_ACK success for a
request it says is invalid) or when the back-end dies or hangs.
"""

from __future__ import annotations

import inspect
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from virtnet.conform.guest import (
    DATA,
    QUEUE_SIZE,
    SLOT,
    Guest,
    RawRing,
    Region,
    Rings,
    frame,
    good_chain,
    one_region,
)
from virtnet.conform.session import (
    BASE_FEATURES,
    CaseFailure,
    CaseNotOffered,
    CaseSkipped,
    Session,
    ack_text,
    feature_names,
)
from virtnet.net.features import VirtioNetF
from virtnet.net.guest import RX, TX
from virtnet.vhost_user.messages import (
    HEADER,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_IDX_MASK,
    FrontendRequest,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    ProtocolFeature,
    VringAddr,
    VringState,
    encode,
)
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.ring.layout import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)

R = FrontendRequest
NEED_REPLY = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK
MRG = bit(VirtioNetF.MRG_RXBUF)
INDIRECT = bit(VirtioF.RING_INDIRECT_DESC)
QUIET = 0.5  # "nothing happens": how long a disabled or stopped ring is watched
# Multiqueue as QEMU negotiates it: VIRTIO_NET_F_MQ needs CTRL_VQ (VIRTIO 1.2 5.1.3.1); the
# control queue stays the front-end's (vhost-user carries data rings only).
MQ_FEATURES = bit(VirtioNetF.MQ) | bit(VirtioNetF.CTRL_VQ)
MQ_PROTOCOL = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MQ)


RING_KINDS = ("split", "packed")
EVENT_IDX_SETTINGS = ("on", "off")


@dataclass(frozen=True)
class Cell:
    """One cell of the data-case matrix: the ring kind and whether EVENT_IDX is acked."""

    ring: str  # "split" or "packed"
    event_idx: bool

    @property
    def name(self) -> str:
        return f"{self.ring}/event-idx-{'on' if self.event_idx else 'off'}"

    @property
    def features(self) -> int:
        """What the cell acks on top of the case's own features (and must be offered)."""
        return (bit(VirtioF.RING_PACKED) if self.ring == "packed" else 0) | \
            (bit(VirtioF.RING_EVENT_IDX) if self.event_idx else 0)  # fmt: skip


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # "conformance" or "robustness"
    summary: str  # one line: what is sent and what must happen
    rule: str  # where the spec says so
    run: Callable[[Context], str]
    matrix: bool = False  # run once per Cell (ring kind x EVENT_IDX)
    # Nothing in the spec says what the back-end must answer: the case checks only that
    # it survives (reported as "survived", not "passed").
    survive: bool = False
    cell: Cell | None = None  # set on the expanded copies of a matrix case
    base: str = ""  # a matrix cell's case name without the cell

    @property
    def family(self) -> str:
        return self.base or self.name


CASES: list[Case] = []


def case(name: str, group: str, summary: str = "", rule: str = "", *, matrix: bool = False,
         survive: bool = False):  # fmt: skip
    """Register the decorated function as case ``name`` of ``group``.

    The function's docstring says what the case is: its first paragraph the summary (what
    is sent and what must happen), its second the rule (where the spec says so), as
    ``virtnet conform --list`` prints them. A summary that names a module constant is
    passed as an argument instead, because a docstring cannot be an f-string.
    """

    def register(fn: Callable[[Context], str]) -> Callable[[Context], str]:
        doc_summary, doc_rule = docstring_paragraphs(fn)
        CASES.append(Case(name, group, summary or doc_summary, rule or doc_rule, fn,
                          matrix=matrix, survive=survive))  # fmt: skip
        return fn

    return register


def docstring_paragraphs(fn: Callable[..., object]) -> tuple[str, str]:
    """The first two paragraphs of ``fn``'s docstring, each on one line; placeholders
    under ``python -OO``, which strips docstrings."""
    if fn.__doc__ is None:
        return f"{fn.__name__} (docstrings stripped)", "-"
    paragraphs = [" ".join(p.split()) for p in inspect.cleandoc(fn.__doc__).split("\n\n")]
    return paragraphs[0], paragraphs[1] if len(paragraphs) > 1 else "-"


def cells(rings: tuple[str, ...] | list[str] = RING_KINDS,
          event_idx: tuple[str, ...] | list[str] = EVENT_IDX_SETTINGS) -> list[Cell]:  # fmt: skip
    return [Cell(r, e == "on") for r in rings for e in event_idx]


def expand(cases: list[Case], matrix: list[Cell] | None = None) -> list[Case]:
    """Each matrix case once per cell (named ``case/ring/event-idx-on|off``), the rest as
    they are."""
    matrix = cells() if matrix is None else matrix
    out: list[Case] = []
    for c in cases:
        if not c.matrix:
            out.append(c)
            continue
        out += [replace(c, name=f"{c.name}/{cell.name}", cell=cell, base=c.name)
                for cell in matrix]  # fmt: skip
    return out


class Context:
    """What a case may open; everything is closed by ``close()`` (the runner's)."""

    def __init__(self, path: str, cell: Cell | None = None) -> None:
        self.path = path
        self.cell = cell
        self._sessions: list[Session] = []
        self._guests: list[Guest] = []
        self._closers: list[Callable[[], None]] = []

    def negotiate(self, s: Session, want: int = BASE_FEATURES, *,
                  require: int = BASE_FEATURES, **kw: int) -> int:  # fmt: skip
        """``s.negotiate`` with the cell's ring kind and EVENT_IDX setting on top: a cell
        the back-end does not offer is "not offered", not failed."""
        extra = self.cell.features if self.cell is not None else 0
        try:
            return s.negotiate(want | extra, require=require | extra, **kw)
        except CaseNotOffered as e:
            if self.cell is not None:
                raise CaseNotOffered(f"{e} ({self.cell.name})") from None
            raise

    def session(self) -> Session:
        s = Session(self.path)
        self._sessions.append(s)
        return s

    def guest(self, guest: Guest | None = None) -> Guest:
        g = guest or one_region()
        self._guests.append(g)
        return g

    def running(self, want: int = BASE_FEATURES, *, require: int = BASE_FEATURES,
                rx_size: int = SLOT,
                rx_count: int = QUEUE_SIZE) -> tuple[Session, Rings]:  # fmt: skip
        """A session with memory mapped, both rings running and rx buffers posted."""
        s = self.session()
        self.negotiate(s, want, require=require)
        g = self.guest()
        g.set_mem_table(s)
        rings = Rings.for_pair(g, 0, indirect=bool(s.features & INDIRECT), features=s.features)
        rings.setup(s)
        rings.post_rx(rx_count, rx_size)
        return s, rings

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` at ``close()``, after the sessions (a log memfd, ...)."""
        self._closers.append(fn)

    def close(self) -> None:
        for s in self._sessions:
            s.close()
        for g in self._guests:
            g.close()
        for fn in self._closers:
            fn()


# -- helpers --------------------------------------------------------------------------


def echo(rings: Rings, frames: list[bytes], *, mergeable: bool, pieces: int = 1,
         indirect: bool = False) -> list[int]:  # fmt: skip
    """Send ``frames``; they must come back on rx intact, plain headers; buffers per frame.
    With EVENT_IDX, rx asks for a notification at the next used buffer: one must come."""
    if rings.event_idx:
        rings.arm_rx_call()
    rings.send(frames, pieces=pieces, indirect=indirect)
    rings.wait_tx(len(frames))
    packets = rings.receive(len(frames), mergeable=mergeable)
    if rings.event_idx:
        notified(rings, len(packets))
    for k, (sent, got) in enumerate(zip(frames, packets, strict=True)):
        if got.frame != sent:
            how = "different" if len(got.frame) == len(sent) else "cut"
            raise CaseFailure(f"frame {k} ({len(sent)} bytes) came back as "
                              f"{len(got.frame)} bytes, {how}")  # fmt: skip
        h = got.hdr
        if h.flags or h.gso_type:
            # No GUEST_CSUM / GUEST_TSO negotiated: 5.1.6.4.1 leaves flags and gso_type 0.
            raise CaseFailure(f"frame {k}: header flags {h.flags:#x} gso_type {h.gso_type} "
                              "without GUEST_CSUM/GUEST_TSO negotiated")  # fmt: skip
        if not mergeable and h.num_buffers != 1:
            raise CaseFailure(f"frame {k}: num_buffers {h.num_buffers} without MRG_RXBUF "
                              "(5.1.6.4: MUST be 1)")  # fmt: skip
    return [p.buffers for p in packets]


def notified(rings: Rings, used: int) -> None:
    """The device passed rx's used_event (split) / event descriptor (packed): it MUST have
    signalled the call eventfd. It may signal just after the used index moves: 0.2 s."""
    deadline = time.monotonic() + 0.2
    while not rings.rx_calls():
        if time.monotonic() >= deadline:
            where = "event descriptor (off_wrap)" if rings.packed else "used_event"
            raise CaseFailure(f"rx: {used} buffers used past the driver's {where}, no "
                              "notification on the call eventfd (EVENT_IDX: 2.7.10, "
                              "2.8.10: the device MUST notify)")  # fmt: skip
        time.sleep(0.005)


def seq_of(f: bytes) -> int:
    """The sequence number ``guest.frame`` put after the Ethernet header (-1: too short)."""
    return int.from_bytes(f[14:18], "big") if len(f) >= 18 else -1


def echo_seqs(rings: Rings, mergeable: bool, seconds: float = 0.3) -> list[int]:
    """The sequence numbers of the frames that come back on rx within ``seconds``."""
    return [seq_of(p.frame) for p in rings.drain_rx(seconds, mergeable=mergeable)]


def frames(first: int, sizes: list[int]) -> list[bytes]:
    return [frame(first + k, n) for k, n in enumerate(sizes)]


def receive_seqs(rings: Rings, wanted: list[bytes], mergeable: bool) -> int:
    """Read rx until ``wanted`` arrived in order (earlier frames may come first); extras."""
    extras = 0
    k = 0
    deadline = time.monotonic() + 5.0
    while k < len(wanted):
        if time.monotonic() > deadline:
            raise CaseFailure(f"{k} of {len(wanted)} frames came back after the ring was enabled")
        (got,) = rings.receive(1, mergeable=mergeable)
        if got.frame == wanted[k]:
            k += 1
        elif k:
            raise CaseFailure("frames after re-enabling came back out of order or changed")
        else:
            extras += 1
    return extras


# -- conformance ----------------------------------------------------------------------


@case("handshake", "conformance")
def handshake(ctx: Context) -> str:
    """QEMU's opening: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
    SET_FEATURES; VERSION_1 offered; GET_FEATURES stable

    vhost-user.rst Communication, Protocol features; VIRTIO 1.2 6.1 (VERSION_1)
    """
    s = ctx.session()
    s.negotiate()
    if s.get_u64(R.GET_FEATURES) != s.offered:
        raise CaseFailure("GET_FEATURES changed after SET_FEATURES")
    pairs = ""
    if s.offered & bit(VHOST_USER_F_PROTOCOL_FEATURES):
        pf = s.get_u64(R.GET_PROTOCOL_FEATURES)
        if pf & bit(ProtocolFeature.MQ):
            n = s.get_u64(R.GET_QUEUE_NUM)
            if n < 1:
                raise CaseFailure(f"GET_QUEUE_NUM {n}: at least one queue pair")
            pairs = f", {n} queue pairs"
        pairs = f"; protocol features {pf:#x}{pairs}"
    return f"offers {feature_names(s.offered & ((1 << 64) - 1))}{pairs}"


@case("reply-ack", "conformance")
def reply_ack(ctx: Context) -> str:
    """REPLY_ACK: NEED_REPLY gets exactly one u64 0, no NEED_REPLY gets nothing, NEED_REPLY on
    GET_FEATURES gets the features only

    vhost-user.rst REPLY_ACK
    """
    s = ctx.session()
    s.negotiate()
    if not s.has_protocol(ProtocolFeature.REPLY_ACK):
        raise CaseSkipped("REPLY_ACK not offered")
    if s.request_ack(R.SET_FEATURES, U64(s.features)) != 0:
        raise CaseFailure("SET_FEATURES with NEED_REPLY: non-zero ack")
    if s.request_ack(R.SET_VRING_NUM, VringState(0, QUEUE_SIZE)) != 0:
        raise CaseFailure("SET_VRING_NUM with NEED_REPLY: non-zero ack")
    s.send(R.SET_VRING_NUM, VringState(0, QUEUE_SIZE))  # no NEED_REPLY: no reply
    s.expect_silence(R.SET_VRING_NUM)
    s.send(R.GET_FEATURES, need_reply=True)  # a reply body already: "no behavioural change"
    if s.reply(R.GET_FEATURES).payload_as(U64).value != s.offered:
        raise CaseFailure("GET_FEATURES with NEED_REPLY: not the features")
    if s.get_u64(R.GET_FEATURES) != s.offered:
        raise CaseFailure("an extra reply followed GET_FEATURES with NEED_REPLY")
    return "acks with 0, silent without NEED_REPLY, one reply to GET_FEATURES"


@case("mem-regions", "conformance", matrix=True)
def mem_regions(ctx: Context) -> str:
    """SET_MEM_TABLE with 3 memfds (adjacent and behind a hole, non-zero mmap_offset), rx ring in
    region 2, tx ring and buffers in region 3: frames echo intact

    vhost-user.rst Memory regions description, SET_MEM_TABLE
    """
    s = ctx.session()
    ctx.negotiate(s, BASE_FEATURES | MRG)
    g = ctx.guest(Guest([Region(0x0, 1 << 20), Region(0x10_0000, 1 << 20, offset=0x1_0000),
                         Region(0x100_0000, 2 << 20, offset=0x20_0000)]))  # fmt: skip
    g.set_mem_table(s)
    rings = Rings(g, (0x10_1000, 0x100_0000), 0x100_0000 + 0x1_0000, 1 << 20,
                  packed=s.has(VirtioF.RING_PACKED), event_idx=s.has(VirtioF.RING_EVENT_IDX))
    rings.setup(s)
    rings.post_rx(QUEUE_SIZE)
    echo(rings, frames(0, [60, 1514, 200, 1000]), mergeable=s.has(VirtioNetF.MRG_RXBUF))
    return "4 frames echoed through rings and buffers in regions 2 and 3"


@case("data-mergeable", "conformance", matrix=True)
def data_mergeable(ctx: Context) -> str:
    """MRG_RXBUF: 1 KiB rx buffers, frames of 60..1514 bytes echo intact, num_buffers = buffers
    used, header flags/gso_type 0

    VIRTIO 1.2 5.1.6.3.1, 5.1.6.4 (num_buffers)
    """
    s, rings = ctx.running(BASE_FEATURES | MRG, require=BASE_FEATURES | MRG, rx_size=1024)
    sizes = [60, 64, 500, 1012, 1013, 1514, 1514, 128]
    used = echo(rings, frames(0, sizes), mergeable=True)
    return f"{len(sizes)} frames, buffers per frame {used}"


@case("data-nonmergeable", "conformance", matrix=True)
def data_nonmergeable(ctx: Context) -> str:
    """no MRG_RXBUF: 2 KiB rx buffers, frames echo intact, num_buffers 1, header 12 bytes

    VIRTIO 1.2 5.1.6.4: num_buffers MUST be 1 without MRG_RXBUF
    """
    s, rings = ctx.running(BASE_FEATURES)
    if s.has(VirtioNetF.MRG_RXBUF):
        raise CaseFailure("MRG_RXBUF not acked but taken")
    sizes = [60, 1514, 300, 1514]
    echo(rings, frames(0, sizes), mergeable=False)
    return f"{len(sizes)} frames, one buffer each"


@case("tx-chains", "conformance", matrix=True)
def tx_chains(ctx: Context) -> str:
    """tx frames as 3-descriptor chains (header alone first) and, if offered, through an indirect
    table: echo intact

    VIRTIO 1.2 2.7.4, 2.7.5.3 (indirect), 5.1.6.2 (no layout assumption)
    """
    s, rings = ctx.running(BASE_FEATURES | MRG | INDIRECT)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    echo(rings, frames(0, [1514, 60, 700]), mergeable=mrg, pieces=3)
    if not s.has(VirtioF.RING_INDIRECT_DESC):
        return "3-descriptor chains echo (INDIRECT_DESC not offered)"
    echo(rings, frames(10, [1514, 60]), mergeable=mrg, pieces=3, indirect=True)
    return "3-descriptor chains and indirect tables echo"


@case("ring-wrap", "conformance", matrix=True)
def ring_wrap(ctx: Context) -> str:
    """6 batches of frames, 1- and 3-descriptor chains (300 tx descriptors, 180 rx buffers): both
    rings go round several times, packed chains cross the ring's end; every frame echoes intact
    (with EVENT_IDX: every kick the device asks for, no more, and rx notified each batch)

    VIRTIO 1.2 2.7.13 (split ring indices wrap), 2.8.1 (packed wrap counters flip at the end),
    2.7.10 / 2.8.10 (event suppression)
    """
    s, rings = ctx.running(BASE_FEATURES | MRG)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    descs = frames_sent = 0
    for batch in range(6):
        pieces, count = (3, 20) if batch % 2 else (1, 40)  # 60 or 40 slots of 64
        sizes = [60 + (37 * k) % 1450 for k in range(count)]
        echo(rings, frames(100 * batch, sizes), mergeable=mrg, pieces=pieces)
        rings.post_rx(QUEUE_SIZE)
        descs += pieces * count
        frames_sent += count
    return (f"{frames_sent} frames echoed, {descs} tx descriptors: the tx ring went round "
            f"{descs // QUEUE_SIZE} times, rx {frames_sent // QUEUE_SIZE}")


@case("get-vring-base", "conformance", matrix=True)
def get_vring_base(ctx: Context) -> str:
    """GET_VRING_BASE stops the ring and returns the next avail index: tx base = frames used, a
    frame kicked afterwards is not used until the ring is set up again

    vhost-user.rst GET_VRING_BASE, Ring states (stopped)
    """
    s, rings = ctx.running(BASE_FEATURES | MRG)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    echo(rings, frames(0, [100, 200, 300]), mergeable=mrg)
    tx_raw = rings.vring_base(s, TX)
    tx_base = rings.consumed(tx_raw)
    if tx_base != 3:
        raise CaseFailure(f"GET_VRING_BASE tx: {tx_raw:#x} ({tx_base} descriptors), 3 "
                          "chains were used")  # fmt: skip
    rx_raw = rings.vring_base(s, RX)
    rx_base = rings.consumed(rx_raw)
    if not 3 <= rx_base <= QUEUE_SIZE:
        raise CaseFailure(f"GET_VRING_BASE rx: {rx_raw:#x} ({rx_base} descriptors), 3 "
                          f"buffers were used of {QUEUE_SIZE}")  # fmt: skip
    rings.send([frame(9, 64)])
    if rings.tx_used_within(QUIET):
        raise CaseFailure("a tx frame kicked after GET_VRING_BASE was used: the ring did not stop")
    return f"bases tx {tx_base} rx {rx_base}; the stopped ring took nothing"


@case("ring-restart", "conformance", matrix=True)
def ring_restart(ctx: Context) -> str:
    """set up, echo, GET_VRING_BASE both, set up again from those bases (QEMU's stop/start), echo
    again

    vhost-user.rst Starting and stopping rings, SET_VRING_BASE
    """
    s, rings = ctx.running(BASE_FEATURES | MRG)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    echo(rings, frames(0, [100, 1514]), mergeable=mrg)
    bases = (rings.vring_base(s, RX), rings.vring_base(s, TX))
    rings.setup(s, bases=bases)
    rings.post_rx(4)
    echo(rings, frames(2, [64, 1514, 800]), mergeable=mrg)
    bases2 = (rings.vring_base(s, RX), rings.vring_base(s, TX))
    if rings.consumed(bases2[TX]) != 5:
        raise CaseFailure(f"GET_VRING_BASE tx after restart: {bases2[TX]:#x}, expected 5 "
                          "descriptors taken")  # fmt: skip
    return (f"bases ({bases[0]:#x}, {bases[1]:#x}) then ({bases2[0]:#x}, {bases2[1]:#x}); "
            "echo before and after the restart")


@case("vring-enable", "conformance", matrix=True)
def vring_enable(ctx: Context) -> str:
    """with PROTOCOL_FEATURES rings start disabled: no rx before SET_VRING_ENABLE 1, echo after;
    SET_VRING_ENABLE 0 on rx stops rx, 1 resumes it

    vhost-user.rst Ring states, SET_VRING_ENABLE
    """
    s = ctx.session()
    ctx.negotiate(s, BASE_FEATURES | MRG)
    if not s.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
        raise CaseSkipped("PROTOCOL_FEATURES not offered: rings start enabled")
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    g = ctx.guest()
    g.set_mem_table(s)
    rings = Rings.for_pair(g, features=s.features)
    rings.setup(s, enable=False)
    rings.post_rx(QUEUE_SIZE)
    rings.send(frames(0, [64, 64]))
    if rings.rx_used_within(QUIET):
        raise CaseFailure("rx buffers used while both rings were disabled")
    for q in (RX, TX):
        s.must_ack(R.SET_VRING_ENABLE, VringState(q, 1))
    rings.send(frames(10, [64, 1514]))
    early = receive_seqs(rings, frames(10, [64, 1514]), mrg)
    s.must_ack(R.SET_VRING_ENABLE, VringState(RX, 0))
    rings.send(frames(20, [64]))
    if rings.rx_used_within(QUIET):
        raise CaseFailure("rx buffers used after SET_VRING_ENABLE 0 on rx")
    s.must_ack(R.SET_VRING_ENABLE, VringState(RX, 1))
    rings.send(frames(30, [64, 64]))
    late = receive_seqs(rings, frames(30, [64, 64]), mrg)
    return (f"disabled: no rx; enabled: echo ({early} frames sent while disabled came back); "
            f"rx off/on: {late} held frames delivered after")  # fmt: skip


def queue_pairs(s: Session) -> int:
    """GET_QUEUE_NUM when PROTOCOL_F_MQ was negotiated; one pair without it."""
    return s.get_u64(R.GET_QUEUE_NUM) if s.has_protocol(ProtocolFeature.MQ) else 1


def mq_guest(ctx: Context, want: int) -> tuple[Session, Guest, int]:
    """A session with MQ negotiated and memory mapped, no ring set up: (session, guest,
    queue pairs). Skipped unless the back-end has at least two pairs."""
    s = ctx.session()
    ctx.negotiate(s, want | MQ_FEATURES, protocol=MQ_PROTOCOL)
    if not s.has_protocol(ProtocolFeature.MQ):
        raise CaseSkipped("PROTOCOL_F_MQ not offered: one queue pair")
    pairs = s.get_u64(R.GET_QUEUE_NUM)
    if pairs < 2:
        raise CaseSkipped(f"GET_QUEUE_NUM {pairs}: fewer than 2 queue pairs")
    g = ctx.guest()
    g.set_mem_table(s)
    return s, g, pairs


def strays(pairs: list[Rings], p: int) -> str:
    """What arrived on the rx rings of the pairs other than ``p`` ("" if nothing)."""
    out = []
    for q, other in enumerate(pairs):
        if q != p and (n := other.rx_used_within(0.05)):
            out.append(f"; {n} rx buffers of pair {q} were used")
    return "".join(out)


def echo_on(pairs: list[Rings], p: int, sent: list[bytes], mergeable: bool) -> None:
    """Echo on pair ``p``: a loopback answers each frame on the pair it came from (5.1.6.5.5
    steers a flow's rx to the pair its tx used), so no other pair's rx may see a buffer used."""
    try:
        echo(pairs[p], sent, mergeable=mergeable)
    except CaseFailure as e:
        raise CaseFailure(f"pair {p}: {e}{strays(pairs, p)}") from None
    if stray := strays(pairs, p):
        raise CaseFailure(f"pair {p}: frames sent there echoed{stray}")


@case("mq-pairs", "conformance", matrix=True)
def mq_pairs(ctx: Context) -> str:
    """PROTOCOL_F_MQ with GET_QUEUE_NUM >= 2: pairs 0 and 1 (vrings 0..3, each its own rings and
    buffers) echo each frame on the pair it was sent on; SET_VRING_ENABLE 0 on vrings 2 and 3: pair
    0 still echoes, pair 1 uses no rx buffer; 1 again: pair 1 echoes again (frames it held may come
    first)

    vhost-user.rst Multiple queue support, Ring states, SET_VRING_ENABLE; VIRTIO 1.2 5.1.6.5.5
    (receive steering in multiqueue mode)
    """
    s, g, n = mq_guest(ctx, BASE_FEATURES | MRG)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    pairs = [Rings.for_pair(g, p, features=s.features) for p in range(2)]
    for rings in pairs:
        rings.setup(s)
        rings.post_rx(QUEUE_SIZE)
    for p in range(2):
        try:
            echo_on(pairs, p, frames(100 * p, [64, 1514, 300]), mrg)
        except CaseFailure as e:  # a back-end that offers more pairs than it serves
            raise CaseFailure(f"{e} (GET_QUEUE_NUM said {n} queue pairs)") from None
    pairs[1].enable(s, False)
    pairs[1].send(frames(120, [64, 64]))
    if used := pairs[1].rx_used_within(QUIET):
        raise CaseFailure(f"pair 1: {used} rx buffers used after SET_VRING_ENABLE 0 on "
                          "vrings 2 and 3")  # fmt: skip
    echo_on(pairs, 0, frames(10, [64, 1000]), mrg)
    # vhost-user.rst: a disabled ring "must process and discard any TX packets"; holding
    # them until re-enabled (Linux vhost-net's and DPDK's way) is reported, not failed.
    discarded = pairs[1].tx_used_within(0.05)
    pairs[1].enable(s, True)
    again = frames(130, [64, 1514])
    pairs[1].send(again)
    try:
        held = receive_seqs(pairs[1], again, mrg)
    except CaseFailure as e:
        raise CaseFailure(f"pair 1 after SET_VRING_ENABLE 1: {e}") from None
    echo_on(pairs, 0, frames(20, [64]), mrg)
    tx = ("its 2 tx frames discarded" if discarded == 2
          else f"{discarded} of its 2 tx frames used" if discarded else "its tx frames held")
    return (f"{n} queue pairs; pairs 0 and 1 echo on their own rings; pair 1 disabled: no rx, "
            f"{tx}, pair 0 echoes; re-enabled: echo ({held} held frames came first)")


# -- robustness: framing ---------------------------------------------------------------


def survived(kind: str, what: str) -> str:
    return {"reply": f"answered {what}", "closed": "closed the connection",
            "silent": "said nothing"}[kind]  # fmt: skip


def send_acked(s: Session, request: R, payload, fds=()) -> tuple[str, str]:
    """``request`` with NEED_REPLY where REPLY_ACK was negotiated: how it went ("reply",
    "closed", "silent"; "sent" without REPLY_ACK) and what the back-end said."""
    ack = s.has_protocol(ProtocolFeature.REPLY_ACK)
    s.send(request, payload, fds, need_reply=ack)
    if not ack:
        return "sent", "sent"
    kind, msg = s.outcome(request)
    return kind, ack_text(msg) if msg is not None else survived(kind, "")


def refused(s: Session, request: R, what: str) -> str:
    """After a request with NEED_REPLY the spec calls invalid: a failure ack, or hang-up."""
    kind, msg = s.outcome(request)
    if msg is not None and isinstance(msg.payload, U64) and msg.payload.value == 0:
        raise CaseFailure(f"{what}: acked with 0 (success)")
    if kind == "silent":
        raise CaseFailure(f"{what}: no REPLY_ACK in 5s although NEED_REPLY was set")
    if msg is not None:
        return f"refused ({ack_text(msg)})"
    return "closed the connection"


def need_reply_ack(s: Session, protocol: int = bit(ProtocolFeature.REPLY_ACK)) -> None:
    s.negotiate(protocol=protocol)
    if not s.has_protocol(ProtocolFeature.REPLY_ACK):
        raise CaseSkipped("REPLY_ACK not offered: the refusal cannot be seen")


@case("truncated-header", "robustness", survive=True)
def truncated_header(ctx: Context) -> str:
    """7 of the 12 header bytes, then the front-end shuts its side

    vhost-user.rst Message Specification
    """
    s = ctx.session()
    s.send_raw(b"\x01\x00\x00\x00\x01\x00\x00")
    s.sock.shutdown(socket.SHUT_WR)
    return survived(s.outcome(R.GET_FEATURES)[0], "something")


@case("truncated-payload", "robustness", survive=True)
def truncated_payload(ctx: Context) -> str:
    """SET_FEATURES whose header says 8 payload bytes, 3 sent, then shutdown

    vhost-user.rst Message Specification
    """
    s = ctx.session()
    s.send_raw(HEADER.pack(R.SET_FEATURES, VHOST_USER_VERSION, 8) + b"\0\0\0")
    s.sock.shutdown(socket.SHUT_WR)
    return survived(s.outcome(R.SET_FEATURES)[0], "something")


@case("bad-version", "robustness", survive=True)
def bad_version(ctx: Context) -> str:
    """GET_FEATURES with version bits 0 and 2 (flags 0x0, 0x2)

    vhost-user.rst Header: version
    """
    out = []
    for flags in (0x0, 0x2):
        s = ctx.session()
        s.send_raw(HEADER.pack(R.GET_FEATURES, flags, 0))
        out.append(f"{flags:#x}: {survived(s.outcome(R.GET_FEATURES)[0], 'it')}")
        s.close()
    return "; ".join(out)


@case("oversized-payload", "robustness", survive=True)
def oversized_payload(ctx: Context) -> str:
    """a header claiming a 1 GiB payload, and a SET_FEATURES with 64 KiB of payload

    vhost-user.rst Message Specification (payload is a union, at most a page)
    """
    s = ctx.session()
    s.send_raw(HEADER.pack(R.SET_MEM_TABLE, NEED_REPLY, 1 << 30))
    first = survived(s.outcome(R.SET_MEM_TABLE)[0], "it")
    s = ctx.session()
    try:
        s.send_raw(HEADER.pack(R.SET_FEATURES, NEED_REPLY, 1 << 16) + bytes(1 << 16))
    except OSError as e:
        return f"1 GiB: {first}; 64 KiB: send failed ({e.strerror})"
    return f"1 GiB: {first}; 64 KiB: {survived(s.outcome(R.SET_FEATURES)[0], 'it')}"


@case("too-many-fds", "robustness", survive=True)
def too_many_fds(ctx: Context) -> str:
    """SET_VRING_CALL carrying 12 fds (a message may carry 8)

    vhost-user.rst Communication
    """
    s = ctx.session()
    s.negotiate()
    fds = [s.eventfd() for _ in range(12)]
    s.send_raw(HEADER.pack(R.SET_VRING_CALL, NEED_REPLY, 8) + bytes(8), fds)
    return survived(s.outcome(R.SET_VRING_CALL)[0], "it")


@case("wrong-fd-count", "robustness", survive=True)
def wrong_fd_count(ctx: Context) -> str:
    """SET_VRING_CALL (NEED_REPLY) with 3 fds instead of 1

    vhost-user.rst SET_VRING_CALL
    """
    s = ctx.session()
    need_reply_ack(s)
    fds = [s.eventfd() for _ in range(3)]
    s.send_raw(encode(Message(R.SET_VRING_CALL, NEED_REPLY, U64(0), tuple(fds[:1]))), fds)
    return survived(s.outcome(R.SET_VRING_CALL)[0], "it")


@case("missing-fd", "robustness")
def missing_fd(ctx: Context) -> str:
    """SET_MEM_TABLE (NEED_REPLY) naming one region but carrying no fd: must be refused

    vhost-user.rst SET_MEM_TABLE (one fd per region)
    """
    s = ctx.session()
    need_reply_ack(s)
    table = MemoryTable((MemoryRegionDesc(0, 1 << 20, 0x7F00_0000_0000, 0),))
    s.send_raw(HEADER.pack(R.SET_MEM_TABLE, NEED_REPLY, len(table.pack())) + table.pack())
    return refused(s, R.SET_MEM_TABLE, "a region without its fd")


@case("wrong-payload-size", "robustness")
def wrong_payload_size(ctx: Context) -> str:
    """SET_VRING_NUM (NEED_REPLY) with a 12-byte payload (a vring state is 8): must be refused

    vhost-user.rst A vring state description
    """
    s = ctx.session()
    need_reply_ack(s)
    s.send_raw(HEADER.pack(R.SET_VRING_NUM, NEED_REPLY, 12) + VringState(0, 64).pack() + bytes(4))
    return refused(s, R.SET_VRING_NUM, "a 12-byte vring state")


@case("unknown-request", "robustness")
def unknown_request(ctx: Context) -> str:
    """request number 99 with NEED_REPLY: must not be acked as success

    vhost-user.rst REPLY_ACK (non-zero on failure)
    """
    s = ctx.session()
    need_reply_ack(s)
    s.send_raw(HEADER.pack(99, NEED_REPLY, 8) + bytes(8))
    return _raw_outcome(s)


def _raw_outcome(s: Session) -> str:
    """The reply to an unknown request number (the codec cannot name it): read by hand."""
    s.sock.settimeout(5.0)
    try:
        head = s.sock.recv(HEADER.size, socket.MSG_WAITALL)
        if not head:
            return "closed the connection"
        request, flags, size = HEADER.unpack(head)
        body = s.sock.recv(size, socket.MSG_WAITALL) if size else b""
    except (TimeoutError, BlockingIOError):
        raise CaseFailure("no reply in 5s although NEED_REPLY was set") from None
    except ConnectionError:
        return "closed the connection"
    finally:
        s.sock.settimeout(None)
    if request == 99 and size == 8 and U64.unpack(body).value == 0:
        raise CaseFailure("an unknown request acked with 0 (success)")
    return f"answered request {request} size {size}" + (
        f" (REPLY_ACK {U64.unpack(body).value})" if size == 8 else "")


@case("vring-index-out-of-range", "robustness")
def vring_index_out_of_range(ctx: Context) -> str:
    """SET_VRING_NUM / SET_VRING_ENABLE / SET_VRING_CALL for the first vring past the back-end's
    queue pairs (2 x GET_QUEUE_NUM, PROTOCOL_F_MQ negotiated when offered; NEED_REPLY): must be
    refused

    vhost-user.rst Multiple queue support (vring index < 2 x queue pairs)
    """
    out = []
    bad = None
    for request in (R.SET_VRING_NUM, R.SET_VRING_ENABLE, R.SET_VRING_CALL):
        s = ctx.session()
        need_reply_ack(s, MQ_PROTOCOL)
        if bad is None:  # two vrings per queue pair the back-end has
            pairs = queue_pairs(s)
            bad = 2 * max(pairs, 1)
            out.append(f"vring {bad} ({pairs} queue pair{'s' if pairs > 1 else ''})")
        if request is R.SET_VRING_CALL:
            if bad > VHOST_USER_VRING_IDX_MASK:
                out.append(f"SET_VRING_CALL: vring {bad} not expressible (8-bit index)")
                s.close()
                continue
            s.send(request, U64(bad), [s.eventfd()], need_reply=True)
        else:
            s.send(request, VringState(bad, 64 if request is R.SET_VRING_NUM else 1),
                   need_reply=True)  # fmt: skip
        out.append(f"{request.name}: {refused(s, request, f'{request.name} for vring {bad}')}")
        s.close()
    return "; ".join(out)


@case("mq-enable-unset-ring", "robustness")
def mq_enable_unset_ring(ctx: Context) -> str:
    """pair 0 running, SET_VRING_ENABLE 1 (NEED_REPLY) on vring 3, which never got a size, address
    or kick: acked or refused, but the back-end stays up and pair 0 keeps echoing (needs a loopback,
    as the conformance cases)

    vhost-user.rst Multiple queue support, SET_VRING_ENABLE (vring 3 < 2 x GET_QUEUE_NUM: a valid
    index)
    """
    s, g, _ = mq_guest(ctx, BASE_FEATURES | MRG)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    rings = Rings.for_pair(g, 0, features=s.features)
    rings.setup(s)
    rings.post_rx(QUEUE_SIZE)
    echo(rings, frames(0, [64, 1514]), mergeable=mrg)
    unset = 2 * 1 + TX
    ack = s.has_protocol(ProtocolFeature.REPLY_ACK)
    s.send(R.SET_VRING_ENABLE, VringState(unset, 1), need_reply=ack)
    said = "sent (no REPLY_ACK)"
    if ack:
        kind, msg = s.outcome(R.SET_VRING_ENABLE)
        if kind == "silent":
            raise CaseFailure(f"SET_VRING_ENABLE 1 on vring {unset}: no REPLY_ACK in 5s")
        if msg is None:  # "closed"
            raise CaseFailure(f"SET_VRING_ENABLE 1 on vring {unset} (a valid index): the "
                              "back-end closed the connection, pair 0 with it")  # fmt: skip
        said = ack_text(msg)
    try:
        echo(rings, frames(10, [64, 1514, 300]), mergeable=mrg)
    except CaseFailure as e:
        raise CaseFailure(f"after SET_VRING_ENABLE 1 on vring {unset} ({said}): pair 0: "
                          f"{e}") from None  # fmt: skip
    return f"SET_VRING_ENABLE 1 on unset vring {unset}: {said}; pair 0 still echoes"


@case("queue-size-not-power-of-2", "robustness")
def queue_size(ctx: Context) -> str:
    """SET_VRING_NUM 0, 100 and 65536 on a split ring (NEED_REPLY): must be refused

    VIRTIO 1.2 2.7: split queue size is a power of 2, at most 32768
    """
    out = []
    for num in (0, 100, 65536):
        s = ctx.session()
        need_reply_ack(s)
        s.send(R.SET_VRING_NUM, VringState(0, num), need_reply=True)
        out.append(f"{num}: {refused(s, R.SET_VRING_NUM, f'queue size {num}')}")
        s.close()
    return "; ".join(out)


@case("mem-region-overflow", "robustness", survive=True)
def mem_region_overflow(ctx: Context) -> str:
    """SET_MEM_TABLE regions whose gpa + size or uva + size pass 2^64, and one larger than its file

    vhost-user.rst Memory regions description
    """
    out = []
    for label, desc, file_size in (
        ("gpa wraps", MemoryRegionDesc((1 << 64) - 0x1000, 1 << 20, 0x7F00_0000_0000, 0), 1 << 20),
        ("uva wraps", MemoryRegionDesc(0, 1 << 20, (1 << 64) - 0x1000, 0), 1 << 20),
        ("size > file", MemoryRegionDesc(0, 1 << 30, 0x7F00_0000_0000, 0), 4096),
        ("offset wraps", MemoryRegionDesc(0, 1 << 20, 0x7F00_0000_0000, (1 << 64) - 4096), 1 << 20),
    ):
        s = ctx.session()
        s.negotiate()
        fd = os.memfd_create("conform-overflow", os.MFD_CLOEXEC)
        s.fds.append(fd)
        os.ftruncate(fd, file_size)
        out.append(f"{label}: {send_acked(s, R.SET_MEM_TABLE, MemoryTable((desc,)), [fd])[1]}")
        s.close()
    return "; ".join(out)


# -- robustness: rings -------------------------------------------------------------------


def hostile_tx(ctx: Context, write: Callable[[RawRing, Guest], list[int]],
               want: int = BASE_FEATURES | INDIRECT) -> str:  # fmt: skip
    """Rings running; ``write`` lays chains on the tx ring by hand and returns the heads to
    publish (the last one a good frame); one kick. Reports what the back-end used."""
    s = ctx.session()
    s.negotiate(want)
    g = ctx.guest()
    g.set_mem_table(s)
    rings = Rings.for_pair(g)
    rings.setup(s)
    raw = RawRing(g, rings.split_addrs(TX))
    heads = write(raw, g)
    raw.publish(*heads)
    os.eventfd_write(rings.kick[TX], 1)
    used = raw.wait_used(len(heads), 1.0)
    return f"used {used} of {len(heads)} chains {used_entries(raw, used)}"


def used_entries(raw: RawRing, used: int) -> str:
    shown = [raw.used(i) for i in range(min(used, 6))]
    return f"{shown}{' ...' if used > 6 else ''}"


DATA_GPA = DATA + 0x1000


@case("desc-loop", "robustness", survive=True)
def desc_loop(ctx: Context) -> str:
    """a tx chain whose NEXT fields loop (0 -> 1 -> 0), then a good frame

    VIRTIO 1.2 2.7.5.3.1 (device MUST handle loops); rust-vmm ttl
    """
    def write(raw: RawRing, g: Guest) -> list[int]:
        raw.desc(0, DATA_GPA, 64, VRING_DESC_F_NEXT, 1)
        raw.desc(1, DATA_GPA, 64, VRING_DESC_F_NEXT, 0)
        good_chain(raw, 2, DATA_GPA + SLOT, 1)
        return [0, 2]
    return hostile_tx(ctx, write)


@case("desc-out-of-range", "robustness", survive=True)
def desc_out_of_range(ctx: Context) -> str:
    """tx descriptors at 1 TiB (no region), at the end of memory (crossing it), and naming next
    index 200 >= queue size

    VIRTIO 1.2 2.7.5 (addresses are guest memory)
    """
    def write(raw: RawRing, g: Guest) -> list[int]:
        end = g.regions[-1].gpa + g.regions[-1].size
        raw.desc(0, 1 << 40, 1512)
        raw.desc(1, end - 16, 64)
        raw.desc(2, DATA_GPA, 64, VRING_DESC_F_NEXT, 200)
        good_chain(raw, 3, DATA_GPA + SLOT, 1)
        return [0, 1, 2, 3]
    return hostile_tx(ctx, write)


@case("desc-overflow", "robustness", survive=True)
def desc_overflow(ctx: Context) -> str:
    """tx descriptors whose addr + len pass 2^64, and a 0xFFFFFFFF length; chains summing past 2^32

    VIRTIO 1.2 2.7.5.2 (chain at most 2^32 bytes)
    """
    def write(raw: RawRing, g: Guest) -> list[int]:
        raw.desc(0, (1 << 64) - 16, 64)
        raw.desc(1, DATA_GPA, 0xFFFF_FFFF)
        raw.desc(2, DATA_GPA, 0x8000_0000, VRING_DESC_F_NEXT, 3)
        raw.desc(3, DATA_GPA, 0x8000_0000, VRING_DESC_F_NEXT, 4)
        raw.desc(4, DATA_GPA, 0x8000_0000)
        good_chain(raw, 5, DATA_GPA + SLOT, 1)
        return [0, 1, 2, 5]
    return hostile_tx(ctx, write)


@case("head-out-of-range", "robustness", survive=True)
def head_out_of_range(ctx: Context) -> str:
    """the avail ring names head 65535 (queue size 64), then a good frame

    VIRTIO 1.2 2.7.6 (avail ring entries are descriptor heads)
    """
    def write(raw: RawRing, g: Guest) -> list[int]:
        good_chain(raw, 1, DATA_GPA + SLOT, 1)
        return [0xFFFF, 1]
    return hostile_tx(ctx, write)


@case("avail-index-jump", "robustness")
def avail_index_jump(ctx: Context) -> str:
    """the avail index moves 30000 entries ahead (queue 64): a ring cannot hold more than 64
    available chains, so using more than 64 is taking chains that were never made available

    VIRTIO 1.2 2.7.6 (idx - last_avail <= queue size); Linux vhost 'Guest moved avail index', QEMU
    virtqueue_num_heads: the device treats it as broken
    """
    def write(raw: RawRing, g: Guest) -> list[int]:
        good_chain(raw, 0, DATA_GPA, 0)
        raw.avail_idx = 30000 - 1
        return [0]
    detail = hostile_tx(ctx, write)
    used = int(detail.split()[1])
    if used > QUEUE_SIZE:
        raise CaseFailure(f"{detail}: took {used} chains from a {QUEUE_SIZE}-entry ring")
    return detail


@case("indirect-nested", "robustness", survive=True)
def indirect_nested(ctx: Context) -> str:
    """an indirect table whose entry is itself INDIRECT

    VIRTIO 1.2 2.7.5.3.1 (MUST NOT nest)
    """
    def write(raw: RawRing, g: Guest) -> list[int]:
        table = DATA + 0x8000
        n = raw.table(table, [(table, 32, VRING_DESC_F_INDIRECT, 0), (DATA_GPA, 64, 0, 0)])
        raw.desc(0, table, n, VRING_DESC_F_INDIRECT)
        good_chain(raw, 1, DATA_GPA + SLOT, 1)
        return [0, 1]
    return hostile_tx(ctx, write)


@case("indirect-bad-length", "robustness", survive=True)
def indirect_bad_length(ctx: Context) -> str:
    """indirect descriptors with length 0, 24 (not a multiple of 16), 2^31, and INDIRECT|NEXT
    together

    VIRTIO 1.2 2.7.5.3.1
    """
    def write(raw: RawRing, g: Guest) -> list[int]:
        table = DATA + 0x8000
        raw.table(table, [(DATA_GPA, 64, 0, 0), (DATA_GPA, 64, 0, 0)])
        raw.desc(0, table, 0, VRING_DESC_F_INDIRECT)
        raw.desc(1, table, 24, VRING_DESC_F_INDIRECT)
        raw.desc(2, table, 1 << 31, VRING_DESC_F_INDIRECT)
        raw.desc(3, table, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 4)
        raw.desc(4, DATA_GPA, 64)
        good_chain(raw, 5, DATA_GPA + SLOT, 1)
        return [0, 1, 2, 3, 5]
    return hostile_tx(ctx, write)


@case("indirect-misaligned", "robustness", survive=True)
def indirect_misaligned(ctx: Context) -> str:
    """an indirect table at an address not 16-byte aligned, and one outside guest memory

    VIRTIO 1.2 2.7.5.3 (table in guest memory)
    """
    def write(raw: RawRing, g: Guest) -> list[int]:
        table = DATA + 0x8000 + 8
        n = raw.table(table, [(DATA_GPA, 64, 0, 0)])
        raw.desc(0, table, n, VRING_DESC_F_INDIRECT)
        raw.desc(1, 1 << 40, 32, VRING_DESC_F_INDIRECT)
        good_chain(raw, 2, DATA_GPA + SLOT, 1)
        return [0, 1, 2]
    return hostile_tx(ctx, write)


@case("readable-after-writable", "robustness", survive=True)
def readable_after_writable(ctx: Context) -> str:
    """a tx chain with a device-writable descriptor before a readable one

    VIRTIO 1.2 2.7.4.2 (readable before writable)
    """
    def write(raw: RawRing, g: Guest) -> list[int]:
        raw.desc(0, DATA_GPA, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
        raw.desc(1, DATA_GPA + 64, 64)
        good_chain(raw, 2, DATA_GPA + SLOT, 1)
        return [0, 2]
    return hostile_tx(ctx, write)


@case("ring-in-unmapped-memory", "robustness", survive=True)
def ring_in_unmapped_memory(ctx: Context) -> str:
    """SET_VRING_ADDR naming addresses in no region (NEED_REPLY), then KICK/CALL/ENABLE and a kick

    vhost-user.rst SET_VRING_ADDR (front-end virtual addresses)
    """
    s = ctx.session()
    s.negotiate()
    g = ctx.guest()
    g.set_mem_table(s)
    bad = 0x10_0000_0000
    s.send(R.SET_VRING_NUM, VringState(TX, QUEUE_SIZE))
    s.send(R.SET_VRING_BASE, VringState(TX, 0))
    kind, said = send_acked(s, R.SET_VRING_ADDR,
                            VringAddr(TX, 0, bad, bad + 0x2000, bad + 0x1000, 0))  # fmt: skip
    if kind == "closed":
        return said
    kick = s.eventfd()
    try:
        s.send(R.SET_VRING_KICK, U64(TX), [kick])
        s.send(R.SET_VRING_CALL, U64(TX), [s.eventfd()])
        s.send(R.SET_VRING_ENABLE, VringState(TX, 1))
        os.eventfd_write(kick, 1)
        time.sleep(0.2)
    except CaseFailure:
        pass  # the back-end hung up on the way: allowed
    return f"SET_VRING_ADDR: {said}; kicked"


def shrink_then_kick(ctx: Context, sealing: bool) -> str:
    """Map 1 MiB, start the rings in page 0, truncate the memfd to that page, kick a tx
    buffer at 128 KiB (past the new end: a SIGBUS for a back-end that touches it)."""
    s = ctx.session()
    s.negotiate()
    g = ctx.guest(Guest([Region(0, 1 << 20, sealing=sealing)]))
    g.set_mem_table(s)
    rings = Rings(g, (0x0, 0x800), 0x10000, 1 << 16, num=16)  # both rings in page 0
    rings.setup(s)
    raw = RawRing(g, rings.split_addrs(TX))
    good_chain(raw, 0, 0x2_0000, 0)
    try:
        os.ftruncate(g.regions[0].fd, 4096)  # from here on we touch only page 0
        shrunk = "shrunk to 4 KiB"
    except PermissionError:
        shrunk = "ftruncate refused: the back-end sealed the memfd (F_SEAL_SHRINK)"
    raw.publish(0)
    os.eventfd_write(rings.kick[TX], 1)
    used = raw.wait_used(1, 1.0)
    return f"{shrunk}; used {used} of 1 chains" + (f" {raw.used(0)}" if used else "")


@case("memfd-shrunk", "robustness", survive=True)
def memfd_shrunk(ctx: Context) -> str:
    """the front-end truncates its memfd (made with MFD_ALLOW_SEALING, like QEMU's
    memory-backend-memfd) to one page after SET_MEM_TABLE, then kicks a tx buffer past the new end;
    a back-end that seals the memfd is immune

    vhost-user.rst Memory access (the back-end maps what the front-end shares)
    """
    return shrink_then_kick(ctx, sealing=True)


@case("memfd-shrunk-unsealable", "robustness", survive=True)
def memfd_shrunk_unsealable(ctx: Context) -> str:
    """the same with a memfd that allows no seals (a hostile front-end's): only a back-end that
    contains the SIGBUS (or never touches the page) survives

    vhost-user.rst Memory access
    """
    return shrink_then_kick(ctx, sealing=False)


@case("frontend-stops-reading", "robustness", survive=True)
def frontend_stops_reading(ctx: Context) -> str:
    """the front-end sends GET_FEATURES for 2 s without reading a reply, then leaves

    vhost-user.rst Communication (a back-end must not hang on one front-end)
    """
    s = ctx.session()
    s.send(R.SET_OWNER)
    s.sock.setblocking(False)
    msg = encode(Message(R.GET_FEATURES, VHOST_USER_VERSION))
    sent = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            s.sock.send(msg)
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)
        except OSError as e:
            return f"{sent} requests sent, then the back-end hung up ({e.strerror})"
    return f"{sent} requests sent unread replies, then left"


@case("rx-never-drained", "robustness", matrix=True, survive=True)
def rx_never_drained(ctx: Context) -> str:
    """a guest that stops taking rx: 2 rx buffers posted, 48 frames sent to be echoed; the control
    channel must still answer (GET_VRING_BASE) and the session end cleanly

    vhost-user.rst GET_VRING_BASE; VIRTIO 1.2 5.1.6.3 (rx buffers belong to the driver)
    """
    s, rings = ctx.running(BASE_FEATURES | MRG, rx_count=2)
    rx_posted = rings.vqs[RX].num - rings.vqs[RX].num_free
    rings.send(frames(0, [64] * 40))
    time.sleep(QUIET)
    rings.send(frames(100, [64] * 8))
    time.sleep(QUIET)
    tx_used = rings.tx_used_within(QUIET)
    bases = (rings.vring_base(s, RX), rings.vring_base(s, TX))
    return (f"{rx_posted} rx buffers, 48 frames sent: {tx_used} tx used; "
            f"GET_VRING_BASE answered {bases}")


@case("disconnect-mid-setup", "robustness", survive=True)
def disconnect_mid_setup(ctx: Context) -> str:
    """memory mapped, one ring half set up (no kick), then the front-end disconnects

    vhost-user.rst (a disconnected front-end's state is dropped)
    """
    s = ctx.session()
    s.negotiate()
    g = ctx.guest()
    g.set_mem_table(s)
    s.send(R.SET_VRING_NUM, VringState(0, QUEUE_SIZE))
    s.send(R.SET_VRING_BASE, VringState(0, 0))
    uva = g.uva(0)
    s.send(R.SET_VRING_ADDR, VringAddr(0, 0, uva, uva + 0x2000, uva + 0x1000, 0))
    s.send(R.SET_VRING_CALL, U64(0), [s.eventfd()])
    s.close()
    return "left mid-setup"


def by_name(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


# The cases of the other modules register themselves here, after this module's own.
from virtnet.conform import (  # noqa: E402, F401
    cases_lifecycle,
    cases_memslots,
    cases_migration,
    cases_net,
    cases_packed,
)


# Used by the liveness check and tests: what a normal front-end does.
def normal_session(path: str) -> str:
    """Negotiate, map memory, start both rings, send one frame and see it used, stop."""
    ctx = Context(path)
    try:
        s, rings = ctx.running(BASE_FEATURES | MRG)
        rings.send([frame(0, 64)])
        rings.wait_tx(1)
        rings.vring_base(s, RX)
        rings.vring_base(s, TX)
        return "served a normal session"
    finally:
        ctx.close()


