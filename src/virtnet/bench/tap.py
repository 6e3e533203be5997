"""``virtnet bench --tap``: the seed's netperf experiment with real packets (root).

Two namespaces, "guest" and "host", each with a TAP (mtu 1500, TSO on). The
virtnet driver (a vhost-user front-end process) owns the guest tap, the
virtnet device (the back-end process) the host tap, so every frame between
the namespaces crosses driver → virtqueues in shared memory → device. Then
iperf3: TCP guest→host and host→guest (netperf TCP_STREAM's analogue) and
UDP host→guest at a high offered rate (the seed's drop-rate observation).

Baselines in the same run, between fresh namespaces of the same shape: a
veth pair (``veth``, the kernel's limit) and a bare single-process Python
relay between two offloaded taps (``relay``, Python's ceiling).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from virtnet.ports.iperf import IperfResult, start_client, start_server
from virtnet.ports.netns import Topology, run_in_netns, stop_process
from virtnet.ports.relay import iperf_over_veth, iperf_through_relay, relay_topology

GUEST_CIDR, HOST_CIDR = "10.77.2.2/24", "10.77.2.1/24"
HOST_IP = HOST_CIDR.split("/")[0]
MTU = 1500
UDP_RATE = "2G"
READY_TIMEOUT = 10.0  # seconds for the path to carry a ping after the processes start
GUEST_TO_HOST, HOST_TO_GUEST = "guest-to-host", "host-to-guest"


class TapBenchError(RuntimeError):
    """A case that could not run (a process died, the path never came up)."""


@dataclass(frozen=True)
class TapCase:
    strategy: str  # an rx strategy, or "veth" / "relay" for the baselines
    direction: str
    protocol: str = "tcp"
    seconds: float = 5.0

    def label(self) -> str:
        return f"{self.strategy} {self.direction} {self.protocol}"


def _virtnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtnet", *args]


def _wait_path(netns: str, proc_checks: list[subprocess.Popen]) -> None:
    """Ping until the guest reaches the host through virtnet (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        for p in proc_checks:
            if p.poll() is not None:
                raise TapBenchError(f"{p.args[3]} exited with {p.returncode} before traffic")
        r = run_in_netns(netns, ["ping", "-c", "1", "-W", "1", HOST_IP],
                         capture_output=True, timeout=5)  # fmt: skip
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise TapBenchError(f"no ping through virtnet within {READY_TIMEOUT:g}s")


def _iperf(topo: Topology, client_ns: str, server_ns: str, case: TapCase) -> IperfResult:
    """Client in the guest; -R turns it into host → guest, the server sending."""
    start_server(topo, server_ns, HOST_IP)
    extra = ("-R",) if case.direction == HOST_TO_GUEST else ()
    kw = {"udp": True, "bitrate": UDP_RATE} if case.protocol == "udp" else {}
    return start_client(topo, client_ns, HOST_IP, case.seconds, extra=extra, **kw).result()


def run_virtnet_case(case: TapCase) -> dict:
    with Topology() as topo, tempfile.TemporaryDirectory(prefix="virtnet-bench-") as tmp:
        guest, host = topo.add_netns("guest"), topo.add_netns("host")
        tap_g = topo.add_tap(guest, GUEST_CIDR, mtu=MTU)
        tap_h = topo.add_tap(host, HOST_CIDR, mtu=MTU)
        sock = os.path.join(tmp, "vhost-user.sock")
        dev_json, drv_json = os.path.join(tmp, "device.json"), os.path.join(tmp, "driver.json")
        dev = subprocess.Popen(
            _virtnet("device", "--socket-path", sock, "--backend", f"tapfd:{tap_h.fileno()}",
                     "--json", dev_json, "--quiet"),
            pass_fds=[tap_h.fileno()], stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while not os.path.exists(sock):
                if dev.poll() is not None or time.monotonic() > deadline:
                    raise TapBenchError(f"virtnet device did not listen: {dev.stderr.read()}")
                time.sleep(0.02)
            drv = subprocess.Popen(
                _virtnet("driver", "--socket-path", sock, "--backend",
                         f"tapfd:{tap_g.fileno()}", "--strategy", case.strategy,
                         "--json", drv_json, "--quiet"),
                pass_fds=[tap_g.fileno()], stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                _wait_path(guest, [dev, drv])
                result = _iperf(topo, guest, host, case)
            finally:
                stop_process(drv)
        finally:
            stop_process(dev)
        drv_stats, dev_stats = _load(drv_json, "driver_stats"), _load(dev_json, "device_stats")
        return _record(case, result, drv_stats, dev_stats)


def _load(path: str, key: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f).get(key, {})
    except (OSError, ValueError):
        return {}


def run_baseline_case(case: TapCase) -> dict:
    """veth or the bare relay, same namespaces shape, same iperf3 run."""
    kw = {"udp": True, "bitrate": UDP_RATE} if case.protocol == "udp" else {}
    if case.direction == HOST_TO_GUEST:
        kw["extra"] = ("-R",)
    with Topology() as topo:
        if case.strategy == "veth":
            a, b = topo.add_netns("guest"), topo.add_netns("host")
            run = iperf_over_veth(topo, a, b, case.seconds, **kw)
        else:
            a, b, tap_a, tap_b = relay_topology(topo, mtu=MTU)
            run = iperf_through_relay(topo, a, b, tap_a, tap_b, case.seconds, **kw)
    return _record(case, run.iperf, {}, {})


def _record(case: TapCase, r: IperfResult, driver_stats: dict, device_stats: dict) -> dict:
    rec = {
        "mode": "tap",
        "strategy": case.strategy,
        "direction": case.direction,
        "protocol": case.protocol,
        "payload": MTU,
        "seconds": r.seconds,
        "packets": _packets(case, driver_stats),
        "bytes": r.bytes,
        "gbps": r.bits_per_second / 1e9,
        "pps": _packets(case, driver_stats) / r.seconds if r.seconds else 0.0,
        "retransmits": r.retransmits,
        "driver_stats": driver_stats,
        "device_stats": device_stats,
    }
    if case.protocol == "udp":
        rec["loss_pct"] = r.lost_percent
    return rec


def _packets(case: TapCase, driver_stats: dict) -> int:
    key = "tx_packets" if case.direction == GUEST_TO_HOST else "rx_packets"
    return driver_stats.get(key, 0)


def run_tap_case(case: TapCase, tick: Callable[[float], None] | None = None) -> dict:
    if case.strategy in ("veth", "relay"):
        rec = run_baseline_case(case)
    else:
        rec = run_virtnet_case(case)
    if tick is not None:
        tick(1.0)
    return rec


def tap_cases(strategies: list[str], seconds: float, runs: int) -> list[TapCase]:
    cases = []
    for direction in (GUEST_TO_HOST, HOST_TO_GUEST):
        for s in ("veth", "relay"):
            cases.append(TapCase(s, direction, "tcp", seconds))
        for s in strategies:
            cases += [TapCase(s, direction, "tcp", seconds) for _ in range(runs)]
    cases.append(TapCase("relay", HOST_TO_GUEST, "udp", seconds))
    cases += [TapCase(s, HOST_TO_GUEST, "udp", seconds) for s in strategies]
    return cases


def unavailable_reason() -> str | None:
    """Why --tap cannot run here, or None."""
    import shutil

    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("iperf3") is None:
        return "iperf3 is not installed (apt-get install iperf3)"
    if shutil.which("ping") is None:
        return "ping is not installed (apt-get install iputils-ping)"
    return None
