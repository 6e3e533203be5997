"""The bare Python TAP relay: the benchmark's pure-Python ceiling.

Two offloaded taps, each in its own namespace, and one loop that moves every frame,
vnet header and all, from one to the other: ``readv`` into a preallocated buffer, write
the same bytes out, epoll, drain each fd until EAGAIN (or a NAPI-like budget, so one busy
direction cannot starve the other). No virtqueue, no skb, no copy in Python: whatever
virtnet's full path (driver + device + rings) costs on top of this is its own overhead.

    python -m virtnet.ports.relay --seconds 5            # relay, TSO on, + veth reference
    python -m virtnet.ports.relay --seconds 5 --no-tso   # relay with MTU-sized frames
"""

from __future__ import annotations

import argparse
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from virtnet.ports.iperf import RESULT_MARGIN, IperfResult, run_iperf, start_client, start_server
from virtnet.ports.netns import Topology
from virtnet.ports.tap import MAX_FRAME_LEN, TUN_F_CSUM, TUN_F_DEFAULT, Tap

RELAY_BUDGET = 64  # frames per fd per wake-up, as NAPI_POLL_WEIGHT: fairness between ways
CHECK_INTERVAL = 0.1  # seconds between checks of the deadline and the ``until`` callback

# The relay's two sides: 10.77.0.0/24 over the taps, 10.77.1.0/24 over the veth reference.
RELAY_CIDR_A, RELAY_CIDR_B = "10.77.0.1/24", "10.77.0.2/24"
VETH_CIDR_A, VETH_CIDR_B = "10.77.1.1/24", "10.77.1.2/24"


@dataclass(slots=True)
class Direction:
    """One way through the relay: its fds, its buffer, its counters."""

    src: int
    dst: int
    hdr_len: int
    buf: bytearray
    frames: int = 0
    bytes: int = 0  # frame bytes, vnet header excluded
    largest_frame: int = 0  # vnet header excluded
    truncated: int = 0  # frames that filled the whole buffer: cut by the tap, dropped
    write_errors: int = 0  # frames the destination tap refused, dropped
    view: memoryview = field(init=False, repr=False)
    iov: list[memoryview] = field(init=False, repr=False)  # readv's argument, made once

    def __post_init__(self) -> None:
        self.view = memoryview(self.buf)
        self.iov = [self.view]

    def as_dict(self) -> dict[str, int]:
        return {
            "frames": self.frames,
            "bytes": self.bytes,
            "largest_frame": self.largest_frame,
            "truncated": self.truncated,
            "write_errors": self.write_errors,
        }


@dataclass(frozen=True, slots=True)
class RelayStats:
    seconds: float
    a_to_b: dict[str, int]
    b_to_a: dict[str, int]

    @property
    def largest_frame(self) -> int:
        return max(self.a_to_b["largest_frame"], self.b_to_a["largest_frame"])

    @property
    def frames(self) -> int:
        return self.a_to_b["frames"] + self.b_to_a["frames"]


class Relay:
    """Move frames between ``tap_a`` and ``tap_b`` unchanged, in this thread."""

    def __init__(self, tap_a: Tap, tap_b: Tap, budget: int = RELAY_BUDGET) -> None:
        if tap_a.vnet_hdr_size != tap_b.vnet_hdr_size:
            raise ValueError(
                f"taps disagree on the vnet header: {tap_a.name} {tap_a.vnet_hdr_size}, "
                f"{tap_b.name} {tap_b.vnet_hdr_size}; the relay forwards it unchanged"
            )
        self.budget = budget
        hdr = tap_a.vnet_hdr_size
        # One buffer per way, big enough for a 64 KiB TSO frame plus its header: the tap
        # truncates a frame silently when the buffer is short.
        size = hdr + MAX_FRAME_LEN
        self.a_to_b = Direction(tap_a.fileno(), tap_b.fileno(), hdr, bytearray(size))
        self.b_to_a = Direction(tap_b.fileno(), tap_a.fileno(), hdr, bytearray(size))

    def run(self, seconds: float, until: Callable[[], bool] | None = None) -> RelayStats:
        """Relay for at most ``seconds``, or until ``until()`` is true (polled every 0.1 s)."""
        start = time.monotonic()
        deadline = start + seconds
        by_fd = {self.a_to_b.src: self.a_to_b, self.b_to_a.src: self.b_to_a}
        with select.epoll() as ep:
            for fd in by_fd:
                ep.register(fd, select.EPOLLIN)
            next_check = start
            while (now := time.monotonic()) < deadline:
                if now >= next_check:
                    if until is not None and until():
                        break
                    next_check = now + CHECK_INTERVAL
                for fd, _ in ep.poll(min(CHECK_INTERVAL, deadline - now)):
                    self._drain(by_fd[fd])
        return RelayStats(time.monotonic() - start, self.a_to_b.as_dict(), self.b_to_a.as_dict())

    def _drain(self, way: Direction) -> None:
        # The hot loop: locals only, one preallocated buffer, one memoryview slice per
        # frame (the only object made per frame), header and frame in one syscall each way.
        readv, write = os.readv, os.write
        src, dst, hdr, budget = way.src, way.dst, way.hdr_len, self.budget
        view, iov = way.view, way.iov
        cap = len(view)
        frames = nbytes = truncated = errors = 0
        largest = way.largest_frame + hdr
        for _ in range(budget):
            try:
                n = readv(src, iov)
            except BlockingIOError:
                break
            if n >= cap:
                truncated += 1
                continue
            try:
                # write() of one contiguous buffer is writev() of one iovec: header then frame.
                write(dst, view[:n])
            except OSError:
                errors += 1
                continue
            frames += 1
            nbytes += n
            if n > largest:
                largest = n
        way.frames += frames
        way.bytes += nbytes - frames * hdr
        way.largest_frame = largest - hdr
        way.truncated += truncated
        way.write_errors += errors


# --- scenarios: the relay and the veth reference, with iperf3 ------------------------------


@dataclass(frozen=True, slots=True)
class RelayRun:
    iperf: IperfResult
    relay: RelayStats | None  # None for the veth reference (no relay in the path)


def relay_topology(
    topo: Topology, offloads: int = TUN_F_DEFAULT, mtu: int | None = None
) -> tuple[str, str, Tap, Tap]:
    """Namespaces a and b, each with a tap (10.77.0.1 / .2); the relay joins the taps."""
    a, b = topo.add_netns("a"), topo.add_netns("b")
    tap_a = topo.add_tap(a, RELAY_CIDR_A, offloads=offloads, mtu=mtu)
    tap_b = topo.add_tap(b, RELAY_CIDR_B, offloads=offloads, mtu=mtu)
    return a, b, tap_a, tap_b


def iperf_through_relay(
    topo: Topology, a: str, b: str, tap_a: Tap, tap_b: Tap, seconds: float, **iperf: object
) -> RelayRun:
    """iperf3 from a to b over the taps, the relay running in this thread meanwhile."""
    server = RELAY_CIDR_B.split("/")[0]
    start_server(topo, b, server)
    client = start_client(topo, a, server, seconds, **iperf)
    stats = Relay(tap_a, tap_b).run(seconds + RESULT_MARGIN, until=client.done)
    return RelayRun(client.result(), stats)


def iperf_over_veth(topo: Topology, a: str, b: str, seconds: float, **iperf: object) -> RelayRun:
    """The kernel-only reference: iperf3 from a to b over a veth pair (10.77.1.0/24)."""
    topo.add_veth(a, VETH_CIDR_A, b, VETH_CIDR_B)
    server = VETH_CIDR_B.split("/")[0]
    return RelayRun(run_iperf(topo, a, b, server, seconds, **iperf), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m virtnet.ports.relay", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 -t (default 5)")
    parser.add_argument("--no-tso", action="store_true", help="taps with TUN_F_CSUM only")
    parser.add_argument("--no-veth", action="store_true", help="skip the veth reference")
    parser.add_argument("--udp", metavar="RATE", help="UDP at iperf3 -b RATE instead of TCP")
    args = parser.parse_args(argv)
    offloads = TUN_F_CSUM if args.no_tso else TUN_F_DEFAULT
    iperf: dict[str, object] = {"udp": True, "bitrate": args.udp} if args.udp else {}
    with Topology() as topo:
        a, b, tap_a, tap_b = relay_topology(topo, offloads)
        if not args.no_veth:
            _report(f"veth  {a} -> {b}", iperf_over_veth(topo, a, b, args.seconds, **iperf))
        run = iperf_through_relay(topo, a, b, tap_a, tap_b, args.seconds, **iperf)
        _report(f"relay offloads={offloads:#x}", run)


def _report(label: str, run: RelayRun) -> None:
    r = run.iperf
    line = f"{label}: {r.protocol} {r.gbps:.2f} Gb/s, {r.bytes} bytes in {r.seconds:.1f} s"
    if r.retransmits is not None:
        line += f", {r.retransmits} retransmits"
    if r.lost_percent is not None:
        line += f", {r.lost_percent:.2f}% lost"
    if run.relay is not None:
        s = run.relay
        line += (
            f"; relay {s.frames} frames, largest {s.largest_frame} B, "
            f"a->b {s.a_to_b}, b->a {s.b_to_a}"
        )
    print(line)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the Topology has cleaned up by now
        raise SystemExit(130) from None
