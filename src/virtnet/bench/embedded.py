"""The embedded A/B: driver and device over real rings in one guest memory.

One case = one strategy × one direction × one frame size, run for a fixed
time — or, with ``packets``, until the receiving side has that many frames
(instruction counts under valgrind, where a timed run is mostly set-up).
The device side is driven exactly as a back-end would drive it (batches of
packets, one flush and notification decision per batch), the driver side
as NAPI would (poll with a budget, refill below half). Both sides run in
this process, so the figures are the sum of both sides' CPU per packet —
the quantity the strategies differ in.

This module is data plane (``virtnet._build.DATA_PLANE``): its loops and the
callbacks the driver and device call per packet are part of the measured
figure, so it is compiled with the rest. Hence concrete types, ``@final``
classes, and no bound-method aliases or closures on the per-packet path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from virtnet._build import build_name
from virtnet._mypyc import mypyc_attr
from virtnet.net.constants import NAPI_POLL_WEIGHT
from virtnet.net.device import VirtnetDevice
from virtnet.net.driver import VirtnetDriver
from virtnet.net.features import SUPPORTED
from virtnet.net.guest import build_device, build_driver
from virtnet.net.header import strip_hdr
from virtnet.net.layout import GuestLayout
from virtnet.net.skb import SkBuff
from virtnet.net.xdp import BUILTIN as XDP_BUILTIN
from virtnet.net.xdp import XdpHook
from virtnet.ports.backends import GenDriver
from virtnet.ports.synthetic import ACK_FRAME, FrameGen, FrameSink
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.memory import GuestMemory

HOST_TO_GUEST: Final = "host-to-guest"
GUEST_TO_HOST: Final = "guest-to-host"
DIRECTIONS: Final = (HOST_TO_GUEST, GUEST_TO_HOST)
DEVICE_BATCH: Final = 64  # packets per device-side notification, vhost-net's VHOST_NET_BATCH

# A result record (the JSON ``results`` entry, schema in DESIGN.md): built once per case.
Record = dict[str, object]


# mypyc compiles a frozen dataclass as a native class (dataclasses.replace and
# asdict, which bench/builds.py uses, work on it).
@final
@dataclass(frozen=True)
class Case:
    strategy: str
    direction: str
    payload: int
    seconds: float = 3.0
    queue_size: int = 256
    features: int = SUPPORTED
    packets: int = 0  # > 0: run until the sink has exactly this many frames, not seconds
    xdp: str | None = None  # a built-in XDP program on the driver's rx (net/xdp.py)
    ring: str = "split"  # "packed": RING_PACKED negotiated, packed rings (VIRTIO 1.2, 2.8)
    queues: int = 1  # queue pairs (--mode vhost-user: one worker process per pair per side)
    # "pure" or "compiled": run in processes of that build (bench/builds.py); "": this one's
    build: str = ""

    def label(self) -> str:
        xdp = f" xdp:{self.xdp}" if self.xdp else ""
        pairs = f" {self.queues}q" if self.queues > 1 else ""
        build = f" {self.build}" if self.build else ""
        return f"{self.strategy} {self.direction} {self.payload}B{xdp}{pairs}{build}"


def make_pair(
    case: Case, netif_receive_skb: Callable[[SkBuff], None]
) -> tuple[VirtnetDriver, VirtnetDevice]:
    packed = case.ring == "packed"
    features = case.features | bit(VirtioF.RING_PACKED) if packed else case.features
    layout = GuestLayout(case.queue_size, GuestLayout.pages_for(case.queue_size), packed=packed)
    memory = GuestMemory.from_buffer(bytearray(layout.size))
    drv = build_driver(memory, layout, features, case.strategy,
                       netif_receive_skb=netif_receive_skb)  # fmt: skip
    dev = build_device(memory, layout.ring_views(memory), features)
    return drv, dev


def _discard(views: list[memoryview], frame_len: int) -> bool:
    """The host's xmit at teardown: what is still in flight is consumed, unchecked."""
    return True


@final
class EmbeddedRun:
    """The state of one running case: the pair, the generators, the sinks."""

    def __init__(self, case: Case) -> None:
        self.case = case
        # What the per-packet path asks of the case, resolved once.
        self.packets = case.packets  # > 0: count-based (frames to generate)
        self.queue_size = case.queue_size
        self.h2g = case.direction == HOST_TO_GUEST  # step(): which direction
        self.xdp_tx = case.xdp == "tx"  # host-to-guest frames come back to the host
        self.rx_sink = FrameSink()  # what the guest received (data or ACKs)
        self.tx_sink = FrameSink()  # what the host received from the guest
        self.drv, self.dev = make_pair(case, self._netif_receive_skb)
        self.gen = FrameGen(case.payload)
        self.acks = FrameGen(ACK_FRAME)
        self.sender = GenDriver(case.payload)  # the guest's stack, when it transmits
        self.sent = 0
        # Where the measured frames end up (XDP_TX: back at the host).
        self.sink = self.rx_sink if self.h2g and not self.xdp_tx else self.tx_sink
        if case.xdp:
            hook = XdpHook(XDP_BUILTIN[case.xdp], self.drv.stats, name=case.xdp)
            self.drv.rx.attach_xdp(hook)
        self.drv.try_fill_recv()

    def step(self) -> None:
        """One device batch and the NAPI polls it calls for, in the case's direction.

        A flag and an if, not a bound method chosen once: compiled, a direct call
        of a native method costs far less than a call through a method object."""
        if self.h2g:
            self.host_to_guest()
        else:
            self.guest_to_host()

    def _netif_receive_skb(self, skb: SkBuff) -> None:
        self.rx_sink.check(skb.to_bytes())
        skb.free()

    def _allowed(self, budget: int, gen: FrameGen, held: bool = False) -> int:
        """``budget``, or fewer so that a count-based case generates exactly
        ``case.packets`` frames: two counts differenced then leave the per-packet
        cost alone, with no overshoot of a batch to blur it. ``held``: a frame
        already generated waits to be sent (it needs a turn of its own)."""
        if not self.packets:
            return budget
        return min(budget, self.packets - gen.seq + (1 if held else 0))

    def done(self, seconds: float) -> bool:
        """Whether the case has run its time (or, count-based, received its frames)."""
        if self.packets:
            return self.sink.stats.packets >= self.packets
        return seconds >= self.case.seconds

    def napi(self) -> None:
        """Poll until a poll returns under budget with no kick owed (NAPI's loop)."""
        while True:
            received, kick = self.drv.poll(NAPI_POLL_WEIGHT)
            if received < NAPI_POLL_WEIGHT and not kick:
                return

    def host_to_guest(self) -> None:
        dev, gen = self.dev, self.gen
        size = gen.size
        for _ in range(self._allowed(DEVICE_BATCH, gen)):
            if not dev.has_room(size):
                break
            dev.receive_packet(gen.peek(), gen.hdr)
            gen.advance()
        dev.flush_rx()
        self.napi()
        if self.xdp_tx:  # the frames XDP_TX sent back: the host checks them
            dev.process_tx(self._xdp_returned, budget=self.queue_size)
            dev.flush_tx()
            self.drv.free_old_xmit_skbs()

    def _xdp_returned(self, views: list[memoryview], frame_len: int) -> bool:
        self.tx_sink.receive(strip_hdr(views, self.dev.hdr_len))
        return True

    def guest_to_host(self) -> None:
        drv, dev = self.drv, self.dev
        sender = self.sender
        sender.produce(drv, self._allowed(self.queue_size, sender.gen,
                                          sender.pending is not None))  # fmt: skip
        drv.tx_kick()
        dev.process_tx(self._host_xmit, budget=self.queue_size)
        dev.flush_tx()
        dev.flush_rx()
        self.napi()

    def _host_xmit(self, views: list[memoryview], frame_len: int) -> bool:
        self.tx_sink.receive(strip_hdr(views, self.dev.hdr_len))
        self.sent += 1
        # TCP's reverse stream: one ACK-sized frame for every two segments.
        acks, dev = self.acks, self.dev
        if self.sent % 2 == 0 and dev.has_room(acks.size):
            dev.receive_packet(acks.peek(), acks.hdr)
            acks.advance()
        return True

    def result_sink(self) -> FrameSink:
        """Where the measured frames end up: the guest's stack, or with XDP_TX the
        host (frames sent back), or with XDP_DROP nowhere (counted, not verifiable)."""
        if self.case.direction != HOST_TO_GUEST:
            return self.tx_sink
        if self.case.xdp == "tx":
            return self.tx_sink
        if self.case.xdp == "drop":
            dropped = FrameSink()
            dropped.stats.packets = self.drv.stats.rx_xdp_drops
            dropped.stats.bytes = dropped.stats.packets * self.case.payload
            return dropped
        return self.rx_sink

    def finish(self) -> None:
        """Let the device finish what is in flight, then tear both sides down."""
        drv, dev = self.drv, self.dev
        self.sender.close()  # frees a frame the full ring refused
        dev.process_tx(_discard, budget=1 << 16)
        dev.flush_tx()
        dev.flush_rx()
        drv.free_old_xmit_skbs()
        self.napi()
        dev.reset()
        drv.remove()


SLICE: Final = 0.05  # seconds a run gets before the next run of its group takes a turn


# A Python class, not a native one: mypyc's native classes can derive from
# Exception but not from RuntimeError, which the CLI catches it as.
@mypyc_attr(native_class=False)
class EmbeddedStall(RuntimeError):
    """A count-based case whose frames stopped arriving before its count."""


def _fraction(run: EmbeddedRun, seconds: float) -> float:
    case = run.case
    done = run.sink.stats.packets / case.packets if case.packets else seconds / case.seconds
    return min(1.0, done)


def run_case(case: Case, tick: Callable[[float], None] | None = None) -> Record:
    """Run one case alone; ``tick(fraction_done)`` is called for progress bars."""
    return run_interleaved([case], tick)[0]


def run_interleaved(cases: list[Case], tick: Callable[[float], None] | None = None) -> list[Record]:
    """Run ``cases`` side by side in short alternating slices.

    This 2-core machine is shared and noisy: a strategy measured a few
    seconds after the other can meet a different machine. Alternating
    slices of SLICE seconds gives every case the same conditions, so the
    ratio between them — the A/B the seed is about — stays honest. Each
    case still gets ``case.seconds`` of wall time in all (or, count-based,
    runs until its ``case.packets`` frames arrived); its CPU time is reported too.
    """
    runs = [EmbeddedRun(case) for case in cases]
    wall = [0.0] * len(runs)
    cpu = [0.0] * len(runs)
    while True:
        pending = [i for i, run in enumerate(runs) if not run.done(wall[i])]
        if not pending:
            break
        for i in pending:
            run = runs[i]
            case, received = run.case, run.sink.stats.packets
            t0, c0 = time.perf_counter(), time.process_time()
            end = t0 + (SLICE if case.packets else min(SLICE, case.seconds - wall[i]))
            while True:
                for _ in range(4):
                    run.step()
                now = time.perf_counter()
                if now >= end or (case.packets and run.done(0.0)):
                    break
            wall[i] += now - t0
            cpu[i] += time.process_time() - c0
            if case.packets and run.sink.stats.packets == received:
                raise EmbeddedStall(f"{case.label()}: no frame arrived in a {SLICE:g} s slice "
                                    f"({received} of {case.packets})")  # fmt: skip
        if tick is not None:
            tick(sum(map(_fraction, runs, wall)) / len(runs))
    out: list[Record] = []
    for i, run in enumerate(runs):
        run.finish()
        rec = result_record(run.case, "embedded", wall[i], run.result_sink(), run)
        rec["cpu_seconds"] = round(cpu[i], 4)
        out.append(rec)
    return out


def integrity(run: EmbeddedRun) -> dict[str, object]:
    """What both sinks counted against their streams (the measured frames in one, the
    ACKs or nothing in the other): every count must be 0, and the messages say why not."""
    out: dict[str, object] = {}
    rx, tx = run.rx_sink.stats, run.tx_sink.stats
    for kind, n in rx.counts().items():
        out[kind] = n + tx.counts()[kind]
    out["messages"] = rx.errors + tx.errors
    return out


def result_record(
    case: Case, mode: str, elapsed: float, sink: FrameSink, run: EmbeddedRun
) -> Record:
    """One entry of the JSON ``results`` list (schema in DESIGN.md)."""
    st = sink.stats
    return {
        "mode": mode,
        "build": build_name(),  # this process's: it moved the packets
        "strategy": case.strategy,
        "direction": case.direction,
        "payload": case.payload,
        "queue_size": case.queue_size,
        "ring": case.ring,
        "seconds": round(elapsed, 4),
        "packets": st.packets,
        "bytes": st.bytes,
        "gbps": st.bytes * 8 / elapsed / 1e9,
        "pps": st.packets / elapsed,
        "integrity": integrity(run),
        "acks": run.rx_sink.stats.packets if case.direction == GUEST_TO_HOST else 0,
        "xdp": case.xdp,
        "driver_stats": run.drv.stats.as_dict(),
        "device_stats": run.dev.stats.as_dict(),
    }
