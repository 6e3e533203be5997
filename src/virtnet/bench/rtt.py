"""Round trip over vhost-user: one frame in flight, driver → device loopback → driver.

``virtnet bench --mode vhost-user`` has no network stack to ping through, so the
round trip is measured the way ping does it, one level down: ``virtnet device
--backend loopback`` (a separate process, as in the A/B) echoes every frame the
guest sends; the driver here sends one 64-byte frame of the verifiable stream, waits
for its echo, times it, and only then sends the next — every wake-up on the path
(kick, device loop, interrupt, driver loop) is paid once per sample. The driver runs
in this process (the same ``DriverClient`` as ``virtnet driver``) so that it can time
each frame; every echo is checked by the sink like any other frame.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from virtnet.net.skb import SkBuff
from virtnet.ports.backends import DriverBackend, skb_from_gen
from virtnet.ports.netns import stop_process
from virtnet.ports.synthetic import SINK_COUNTS, FrameGen

RTT_SECONDS = 1.0  # ping-pong time per strategy
RTT_FRAME = 64
START_TIMEOUT = 10.0


class RoundTripError(RuntimeError):
    """The loopback device did not start, or the driver could not run."""


class EchoProbe(DriverBackend):
    """The guest's side of the ping-pong: a frame goes out only when the last came back."""

    name = "probe"

    def __init__(self, size: int = RTT_FRAME) -> None:
        super().__init__()
        self.gen = FrameGen(size)
        # Readable = "send the next one": the driver's loop polls it like a tap's fd.
        self.wake = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.pending: SkBuff | None = None  # refused by a full ring (not expected: 1 in flight)
        self.in_flight = False
        self.sent_ns = 0
        self.rtts_ns: list[int] = []

    def fileno(self) -> int:
        return self.wake

    def has_tx(self) -> bool:
        return not self.in_flight

    def produce(self, drv, budget: int) -> int:
        try:
            os.eventfd_read(self.wake)
        except BlockingIOError:
            pass
        if self.in_flight or budget < 1:
            return 0
        skb = self.pending or skb_from_gen(drv, self.gen)
        self.pending = None
        if skb is None:
            return 0
        self.sent_ns = time.perf_counter_ns()
        if not drv.start_xmit(skb):
            self.pending = skb
            return 0
        self.in_flight = True
        return 1

    def netif_receive_skb(self, skb: SkBuff) -> None:
        now = time.perf_counter_ns()
        super().netif_receive_skb(skb)  # the sink checks the echo, then frees it
        if self.in_flight:
            self.rtts_ns.append(now - self.sent_ns)
            self.in_flight = False
            os.eventfd_write(self.wake, 1)

    def close(self) -> None:
        if self.pending is not None:
            self.pending.free()
            self.pending = None
        if self.wake >= 0:
            os.close(self.wake)
            self.wake = -1


def rtt_summary(rtts_ns: list[int], sent: int) -> dict:
    """The shape ``virtnet.bench.ping.parse_ping`` gives, so tables treat both alike."""
    ms = [x / 1e6 for x in rtts_ns]
    return {
        "sent": sent,
        "received": len(ms),
        "min_ms": min(ms) if ms else None,
        "avg_ms": statistics.fmean(ms) if ms else None,
        "max_ms": max(ms) if ms else None,
        "mdev_ms": statistics.pstdev(ms) if ms else None,
    }


def round_trip(strategy: str, queue_size: int = 256, seconds: float = RTT_SECONDS) -> dict:
    """Ping-pong for ``seconds`` against a ``virtnet device --backend loopback`` process."""
    from virtnet.vhost_user.driver_loop import PairDrivers
    from virtnet.vhost_user.frontend import DriverClient

    with tempfile.TemporaryDirectory(prefix="vn-rtt-") as tmp:
        sock = os.path.join(tmp, "vu.sock")
        log_path = os.path.join(tmp, "device.log")
        with open(log_path, "w") as log:
            dev = subprocess.Popen([sys.executable, "-m", "virtnet", "device", "--socket-path",
                                    sock, "--backend", "loopback", "--quiet"],
                                   stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not os.path.exists(sock):
                if dev.poll() is not None or time.monotonic() > deadline:
                    with open(log_path) as f:
                        raise RoundTripError(f"virtnet device did not start: {f.read()[-500:]}")
                time.sleep(0.02)
            probe = EchoProbe()
            client = DriverClient(sock, PairDrivers([probe], strategy=strategy),
                                  queue_size=queue_size)  # fmt: skip
            try:
                client.setup()
                client.run(seconds)
            finally:
                stats = client.close()
        finally:
            stop_process(dev)
    sink = stats.get("backend", {})
    return rtt_summary(probe.rtts_ns, probe.gen.seq) | {
        "integrity": {k: sink.get(f"sink_{k}", 0) for k in SINK_COUNTS},
        "frame": RTT_FRAME,
        "path": "driver -> vhost-user -> device loopback -> driver",
    }
