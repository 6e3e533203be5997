"""Where a device's or a driver's packets come from and go to.

``--backend`` on ``virtnet device`` / ``virtnet driver``:

* ``sink`` — count what arrives; check virtnet's own generated stream (every
  frame's length, sequence number and bytes: ``sink_short``, ``sink_lost``, ...),
  just count foreign frames (DPDK's, a guest's);
* ``gen:SIZE`` — send a verifiable stream of SIZE-byte frames, as fast as
  the other side posts room (and sink what comes back);
* ``loopback`` — echo every frame back where it came from;
* ``tap:IFNAME`` — a TAP device with IFF_VNET_HDR: the tap's header *is*
  the virtio-net header, so frames move with one readv/writev and no copy;
* ``tapfd:FD[,FD...]`` — inherited tap fds, one per queue pair.

With N queue pairs (``--queues N``) every pair gets a backend of its own
(:func:`device_backends`, :func:`driver_backends`): its own generator, sink or
echo queue, and for a tap one queue (fd) of an IFF_MULTI_QUEUE tap — the
kernel spreads the flows over the queues by their hash, like a multi-queue NIC.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeAlias, TypeVar, final

from virtnet._mypyc import mypyc_attr
from virtnet.net.constants import GOOD_COPY_LEN, MAX_GSO_FRAME, PAGE_SIZE
from virtnet.net.device import VirtnetDevice
from virtnet.net.driver import VirtnetDriver
from virtnet.net.header import MRG_HDR_LEN, strip_hdr
from virtnet.net.skb import PageFrag, SkBuff
from virtnet.ports.synthetic import FrameGen, FrameSink

if TYPE_CHECKING:
    from virtnet.ports.tap import Tap

BACKENDS = ("sink", "gen:SIZE", "loopback", "tap:IFNAME", "tapfd:FD[,FD...]")

# `--backend` help for the CLI (argparse "R|": kept as written).
BACKEND_HELP_TEXT = """R|\
where the packets come from and go to; with --queues N, one per queue pair:
  sink          count what arrives; verify every byte of virtnet's own stream
  gen:SIZE      send a verifiable stream of SIZE-byte frames (and sink what returns)
  loopback      echo every frame back
  tap:IFNAME    a TAP device with IFF_VNET_HDR (root); created if missing; with
                --queues N > 1 an IFF_MULTI_QUEUE tap, one fd (queue) per pair
  tapfd:FD[,FD...]
                inherited, configured tap fds (like QEMU's -netdev tap,fds=...):
                one fd per queue pair, all queues of one multi-queue tap if N > 1
"""
LOOPBACK_QUEUE = 1024  # frames held for echo before loopback drops (a NIC's queue)


class BackendError(ValueError):
    """A --backend value that names nothing virtnet has."""


class TapQueue(Protocol):
    """What a back-end asks of one queue (fd) of a tap: ports.tap.Tap, or a test's double."""

    multi_queue: bool

    def fileno(self) -> int: ...

    def set_offload(self, offloads: int) -> None: ...

    def set_queue_enabled(self, enabled: bool) -> None: ...

    def readv_into(self, buffers: Sequence[memoryview | bytearray]) -> int: ...

    def writev(self, buffers: Sequence[memoryview | bytes | bytearray]) -> int: ...

    def close(self) -> None: ...


# Where the taps of a --backend tap: or tapfd: come from: (kind, arg, queues) -> one
# per queue (open_taps, or a test's); the one-queue form is (kind, arg) -> one.
TapFactory: TypeAlias = Callable[[str, str, int], Sequence[TapQueue]]
OneTapFactory: TypeAlias = Callable[[str, str], TapQueue]


def parse_backend(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if kind in ("sink", "loopback") and not arg:
        return kind, ""
    if kind == "gen":
        try:
            FrameGen(int(arg))
        except ValueError as e:
            raise BackendError(f"--backend {spec}: gen needs a frame size: {e}") from None
        return kind, arg
    if kind == "tap" and arg:
        return kind, arg
    if kind == "tapfd" and all(fd.isdigit() for fd in arg.split(",")):
        return kind, arg
    raise BackendError(f"--backend {spec!r}: expected one of {', '.join(BACKENDS)}")


# -- device side (host) -------------------------------------------------------


@mypyc_attr(allow_interpreted_subclasses=True)
class Backend:
    """What both ends share: a sink that checks what arrives, an optional fd to
    poll, the negotiated features, and the counters."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.sink = FrameSink()

    def fileno(self) -> int | None:
        return None

    def on_features(self, features: int) -> None:
        """The negotiated virtio features (a tap sets its offloads from them)."""

    def on_guest_offloads(self, offloads: int) -> None:
        """CTRL_GUEST_OFFLOADS_SET: the GUEST_* offloads the guest takes now."""

    def on_queue_enabled(self, enabled: bool) -> None:
        """The queue pair this back-end serves started or stopped (a multi-queue tap
        detaches a stopped pair's queue, as QEMU does, so the kernel steers its flows
        to the queues still running)."""

    def stats(self) -> dict[str, int]:
        st = self.sink.stats
        out = {"sink_packets": st.packets, "sink_bytes": st.bytes}
        for kind, n in st.counts().items():
            out["sink_" + kind] = n
        return out

    def close(self) -> None:
        pass


# One side's backend class (DeviceBackend or DriverBackend), for what both sides share.
B = TypeVar("B", bound=Backend)


@mypyc_attr(allow_interpreted_subclasses=True)
class DeviceBackend(Backend):
    """The host end of a virtnet device."""

    def has_rx(self) -> bool:
        """Whether host→guest frames are waiting without an fd to say so."""
        return False

    def fill_rx(self, dev: VirtnetDevice, budget: int) -> int:
        """Deliver up to ``budget`` host→guest frames, stopping early once
        ``dev.rx_batch_full()`` (the caller publishes and comes back); how many."""
        return 0

    def on_connect(self) -> None:
        """A new front-end (a new guest): its generated stream starts again at frame 0."""
        self.sink.restart()

    def xmit(self, views: list[memoryview], frame_len: int) -> bool:
        """A guest→host frame (virtio-net header first); False = back-pressure."""
        self.sink.receive(strip_hdr(views, MRG_HDR_LEN))
        return True


@final
class SinkDevice(DeviceBackend):
    name: ClassVar[str] = "sink"


@final
class GenDevice(DeviceBackend):
    name: ClassVar[str] = "gen"

    def __init__(self, size: int) -> None:
        super().__init__()
        self.gen = FrameGen(size)
        self.sent_before = 0  # frames sent to earlier front-ends

    def on_connect(self) -> None:
        # The new guest's sink expects frame 0: restart the stream, or it counts
        # everything the previous guest got as lost.
        super().on_connect()
        self.sent_before += self.gen.seq
        self.gen.seq = 0

    def has_rx(self) -> bool:
        return True

    def fill_rx(self, dev: VirtnetDevice, budget: int) -> int:
        gen = self.gen
        n = 0
        while n < budget and not dev.rx_batch_full() and dev.has_room(gen.size):
            dev.receive_packet(gen.peek(), gen.hdr)
            gen.advance()
            n += 1
        return n

    def stats(self) -> dict[str, int]:
        return super().stats() | {"gen_packets": self.sent_before + self.gen.seq}


@final
class LoopbackDevice(DeviceBackend):
    """Echo: every tx frame (header included) is queued for the rx ring."""

    name: ClassVar[str] = "loopback"

    def __init__(self) -> None:
        super().__init__()
        self.queue: deque[bytes] = deque()
        self.dropped = 0

    def has_rx(self) -> bool:
        return bool(self.queue)

    def on_connect(self) -> None:
        super().on_connect()
        self.dropped += len(self.queue)  # the previous guest's frames are not the new one's
        self.queue.clear()

    def xmit(self, views: list[memoryview], frame_len: int) -> bool:
        if len(self.queue) >= LOOPBACK_QUEUE:
            self.dropped += 1
        else:
            self.queue.append(b"".join(views))  # the tx buffer goes back to the guest
        self.sink.stats.packets += 1
        self.sink.stats.bytes += frame_len
        return True

    def fill_rx(self, dev: VirtnetDevice, budget: int) -> int:
        q = self.queue
        n = 0
        while q and n < budget and not dev.rx_batch_full():
            frame = q[0]
            if not dev.has_room(len(frame) - MRG_HDR_LEN):
                break
            q.popleft()
            mv = memoryview(frame)
            dev.receive_packet([mv[MRG_HDR_LEN:]], frame[:MRG_HDR_LEN])
            n += 1
        return n

    def stats(self) -> dict[str, int]:
        # Every echo is delivered, dropped (queue full) or still queued: nothing vanishes.
        return super().stats() | {"loopback_dropped": self.dropped,
                                  "loopback_queued": len(self.queue)}  # fmt: skip


@final
class TapDevice(DeviceBackend):
    """A TAP device: guest frames are written to it, its frames go to the guest."""

    name: ClassVar[str] = "tap"

    def __init__(self, tap: TapQueue) -> None:
        super().__init__()
        self.tap = tap
        self.tx_eagain = 0
        self.tx_errors = 0  # frames the tap refused (bad vnet header, ...)

    def fileno(self) -> int | None:
        return self.tap.fileno()

    def on_features(self, features: int) -> None:
        from virtnet.ports.tap import offloads_for_guest_features

        # Frames read from this tap go to the guest's rx queue: its GUEST_* offloads.
        self.tap.set_offload(offloads_for_guest_features(features))

    def on_guest_offloads(self, offloads: int) -> None:
        self.on_features(offloads)  # the same GUEST_* bits: TUNSETOFFLOAD again

    def on_queue_enabled(self, enabled: bool) -> None:
        if self.tap.multi_queue:
            self.tap.set_queue_enabled(enabled)

    def xmit(self, views: list[memoryview], frame_len: int) -> bool:
        try:
            self.tap.writev(views)
        except BlockingIOError:
            self.tx_eagain += 1
            return False
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EIO):  # a frame the tap refuses
                self.tx_errors += 1
                return True
            raise
        st = self.sink.stats
        st.packets += 1
        st.bytes += frame_len
        return True

    def fill_rx(self, dev: VirtnetDevice, budget: int) -> int:
        readv = self.tap.readv_into
        n = 0
        while n < budget and not dev.rx_batch_full():
            try:
                got = dev.receive_from(readv)
            except BlockingIOError:
                break
            if got <= 0:
                break
            n += 1
        return n

    def stats(self) -> dict[str, int]:
        return super().stats() | {"tap_tx_eagain": self.tx_eagain, "tap_tx_errors": self.tx_errors}

    def close(self) -> None:
        self.tap.close()


# -- driver side (guest) ------------------------------------------------------


@mypyc_attr(allow_interpreted_subclasses=True)  # bench.rtt.EchoProbe, interpreted
class DriverBackend(Backend):
    """The guest stack above a virtnet driver."""

    def has_tx(self) -> bool:
        return False

    def netif_receive_skb(self, skb: SkBuff) -> None:
        self.sink.receive(skb.to_bytes())
        skb.free()

    def produce(self, drv: VirtnetDriver, budget: int) -> int:
        """Transmit up to ``budget`` guest→host frames; returns how many."""
        return 0

    def release(self, drv: VirtnetDriver) -> None:
        """The rings are stopped: give back what is held of the driver's pages."""

    def xdp_redirect(self, views: list[memoryview]) -> bool:
        """XDP_REDIRECT to this port: the frame without an skb (views valid only now)."""
        self.sink.receive(views)
        return True


@final
class SinkDriver(DriverBackend):
    name: ClassVar[str] = "sink"


def skb_from_gen(drv: VirtnetDriver, gen: FrameGen) -> SkBuff | None:
    """Build the next frame the way a guest stack does: prefix in the head, data in pages."""
    whole = gen.whole()
    data = gen.payload()
    if len(data) > GOOD_COPY_LEN and drv.pool.available < len(data) // PAGE_SIZE + 1:
        return None  # the socket's send buffer is full: wait for tx completions
    skb = drv.skbs.alloc(GOOD_COPY_LEN)
    if skb is None:
        return None
    skb.vnet_hdr = gen.hdr
    if whole is not None:  # a small frame in one piece: all linear, one copy
        skb.put(whole)
        gen.advance()
        return skb
    skb.put(gen.prefix())
    if len(data) <= skb.tailroom:
        skb.put(data)  # a small frame is all linear, as a stack builds it
        gen.advance()
        return skb
    for off in range(0, len(data), PAGE_SIZE):
        page = drv.pool.alloc_page()
        assert page is not None  # pool.available was checked above for a paged frame
        chunk = data[off : off + PAGE_SIZE]
        page.view[: len(chunk)] = chunk
        skb.add_frag(page, 0, len(chunk))
    gen.advance()
    return skb


@final
class GenDriver(DriverBackend):
    name: ClassVar[str] = "gen"

    def __init__(self, size: int) -> None:
        super().__init__()
        self.gen = FrameGen(size)
        self.pending: SkBuff | None = None  # refused by a full ring, sent next time

    def has_tx(self) -> bool:
        return True

    def produce(self, drv: VirtnetDriver, budget: int) -> int:
        n = 0
        while n < budget:
            skb = self.pending or skb_from_gen(drv, self.gen)
            self.pending = None
            if skb is None:
                break
            if not drv.start_xmit(skb):
                self.pending = skb
                break
            n += 1
        return n

    def stats(self) -> dict[str, int]:
        return super().stats() | {"gen_packets": self.gen.seq}

    def close(self) -> None:
        if self.pending is not None:
            self.pending.free()
            self.pending = None


@final
class LoopbackDriver(DriverBackend):
    """The guest echoes every frame it receives (rx skb → tx, frags not copied)."""

    name: ClassVar[str] = "loopback"

    def __init__(self) -> None:
        super().__init__()
        self.drv: VirtnetDriver | None = None  # set once the driver is built
        self.dropped = 0

    def netif_receive_skb(self, skb: SkBuff) -> None:
        st = self.sink.stats
        st.packets += 1
        st.bytes += skb.len
        hdr = bytearray(skb.vnet_hdr)
        hdr[10:12] = b"\0\0"  # num_buffers means nothing on tx
        skb.vnet_hdr = bytes(hdr)
        if self.drv is None or not self.drv.start_xmit(skb):
            self.dropped += 1
            skb.free()

    def stats(self) -> dict[str, int]:
        return super().stats() | {"loopback_dropped": self.dropped}


@final
class TapDriver(DriverBackend):
    """A TAP device as the guest's stack: rx skbs are written to it, its frames sent.

    Frames are read into page frags carved from 32 KiB compound pages (Linux's
    tun_get_user → skb_page_frag_refill), so a 64 KiB TSO frame is two or three
    contiguous runs — two or three tx descriptors, not 17.
    """

    name: ClassVar[str] = "tap"

    def __init__(self, tap: TapQueue) -> None:
        super().__init__()
        self.tap = tap
        self.hdr = bytearray(MRG_HDR_LEN)
        self.frag: PageFrag | None = None  # the driver's pool is known at the first read
        self.hdr_zero = bytes(MRG_HDR_LEN)  # a redirected frame's header: no offloads
        self.pending: SkBuff | None = None  # read, but refused by a full tx ring
        self.rx_errors = 0

    def fileno(self) -> int | None:
        return self.tap.fileno()

    def on_features(self, features: int) -> None:
        from virtnet.ports.tap import offloads_for_host_features

        # Frames read from this tap are transmitted to the device: its HOST_* offloads.
        self.tap.set_offload(offloads_for_host_features(features))

    def xdp_redirect(self, views: list[memoryview]) -> bool:
        try:
            self.tap.writev([self.hdr_zero, *views])
        except OSError:
            self.rx_errors += 1
            return False
        st = self.sink.stats
        st.packets += 1
        st.bytes += sum(len(v) for v in views)
        return True

    def netif_receive_skb(self, skb: SkBuff) -> None:
        try:
            self.tap.writev([skb.vnet_hdr, *skb.data_views()])
            st = self.sink.stats
            st.packets += 1
            st.bytes += skb.len
        except OSError:
            self.rx_errors += 1
        skb.free()

    def produce(self, drv: VirtnetDriver, budget: int) -> int:
        n = 0
        if self.pending is not None:
            # The ring was full: send the held frame first, and read nothing more until
            # it went — the tap's queue (and TCP's) is the back-pressure, not a drop.
            if not drv.start_xmit(self.pending):
                return 0
            self.pending = None
            n = 1
        if self.frag is None:
            self.frag = PageFrag(drv.pool)
        frag = self.frag
        while n < budget:
            if not frag.refill(MAX_GSO_FRAME):
                return n  # the socket's memory is exhausted until tx completes
            try:
                got = self.tap.readv_into([self.hdr, *frag.views()])
            except BlockingIOError:
                return n
            frame_len = got - MRG_HDR_LEN
            if frame_len <= 0:
                continue
            skb = drv.skbs.alloc(0)
            if skb is None:
                return n
            skb.vnet_hdr = bytes(self.hdr)
            for page, off, size in frag.commit(frame_len):
                skb.add_frag(page, off, size)
            if not drv.start_xmit(skb):
                self.pending = skb
                return n
            n += 1
        return n

    def has_tx(self) -> bool:
        return self.pending is not None  # retry it without waiting for the tap

    def release(self, drv: VirtnetDriver) -> None:
        if self.frag is not None:
            self.frag.release()
        if self.pending is not None:
            self.pending.free()
            self.pending = None

    def close(self) -> None:
        self.tap.close()


def device_backend(spec: str, tap_factory: OneTapFactory | None = None) -> DeviceBackend:
    """The backend of a one-queue-pair device."""
    return device_backends(spec, 1, _one_queue(tap_factory))[0]


def driver_backend(spec: str, tap_factory: OneTapFactory | None = None) -> DriverBackend:
    """The backend of a one-queue-pair driver."""
    return driver_backends(spec, 1, _one_queue(tap_factory))[0]


def device_backends(
    spec: str, queues: int, tap_factory: TapFactory | None = None
) -> list[DeviceBackend]:
    """One backend per queue pair, each for the worker that serves that pair.

    A tap gives each pair one queue (fd) of a multi-queue tap; the others each get an
    instance of their own (a generator per pair, a sink per pair, an echo per pair).
    """
    return _backends(spec, queues, tap_factory, TapDevice, SinkDevice, GenDevice, LoopbackDevice)


def driver_backends(
    spec: str, queues: int, tap_factory: TapFactory | None = None
) -> list[DriverBackend]:
    """:func:`device_backends` for the driver's side."""
    return _backends(spec, queues, tap_factory, TapDriver, SinkDriver, GenDriver, LoopbackDriver)


def _backends(
    spec: str,
    queues: int,
    tap_factory: TapFactory | None,
    tap: Callable[[TapQueue], B],
    sink: Callable[[], B],
    gen: Callable[[int], B],
    loopback: Callable[[], B],
) -> list[B]:
    """One side's backends for ``spec``, made with that side's four classes."""
    kind, arg = parse_backend(spec)
    _check_queues(spec, queues)
    if kind in ("tap", "tapfd"):
        return [tap(q) for q in (tap_factory or open_taps)(kind, arg, queues)]
    if kind == "sink":
        return [sink() for _ in range(queues)]
    if kind == "gen":
        return [gen(int(arg)) for _ in range(queues)]
    return [loopback() for _ in range(queues)]


def open_taps(kind: str, arg: str, queues: int) -> list[Tap]:
    """The taps of ``tap:IFNAME`` / ``tapfd:FD,...``: one per queue pair."""
    from virtnet.ports.tap import Tap, TapError, open_tap, open_tap_queues

    if kind == "tap":
        if queues > 1:
            return open_tap_queues(arg, queues)  # IFF_MULTI_QUEUE, one fd per queue
        # One queue: a plain tap, as before multi-queue; an existing (persistent)
        # multi-queue tap refuses that, so attach one of its queues instead.
        try:
            return [open_tap(arg)]
        except TapError as e:
            if e.errno != errno.EINVAL:
                raise
            try:
                return [open_tap(arg, multi_queue=True)]
            except TapError:
                raise e from None
    fds = [int(fd) for fd in arg.split(",")]
    if len(fds) != queues:
        raise BackendError(_tapfd_count_reason(arg, len(fds), queues))
    if len(set(fds)) != len(fds):
        raise BackendError(f"--backend tapfd:{arg}: an fd is named twice; each is one queue")
    taps = [Tap.from_fd(fd) for fd in fds]  # inherited, like QEMU's -netdev tap,fds=A:B
    if queues > 1:
        single = [f"{fd} ({t.name})" for fd, t in zip(fds, taps, strict=True) if not t.multi_queue]
        if single:
            raise BackendError(
                f"--backend tapfd:{arg}: fd {', '.join(single)} is a single-queue tap; "
                f"{queues} queue pairs need {queues} fds of one IFF_MULTI_QUEUE tap"
            )
        names = sorted({t.name for t in taps})
        if len(names) > 1:
            raise BackendError(
                f"--backend tapfd:{arg}: the fds are queues of different taps "
                f"({', '.join(names)}); the queue pairs of one device share one tap"
            )
    return taps


def _tapfd_count_reason(arg: str, got: int, queues: int) -> str:
    what = f"--backend tapfd:{arg} names {got} fd(s) for {queues} queue pair(s)"
    if queues == 1:
        return f"{what}: pass one fd, or --queues {got} (one fd per queue pair)"
    want = ",".join(f"FD{i}" for i in range(1, min(queues, 3) + 1)) + (",..." * (queues > 3))
    return (f"{what}: one inherited fd is one queue of a tap, so pass tapfd:{want} "
            f"({queues} fds of one multi-queue tap)")  # fmt: skip


def _check_queues(spec: str, queues: int) -> None:
    if isinstance(queues, bool) or not isinstance(queues, int) or queues < 1:
        raise BackendError(f"--backend {spec}: {queues!r} queue pairs; at least 1 is needed")


def _one_queue(tap_factory: OneTapFactory | None) -> TapFactory | None:
    if tap_factory is None:
        return None
    return lambda kind, arg, queues: [tap_factory(kind, arg)]
