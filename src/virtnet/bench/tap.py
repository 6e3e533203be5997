"""``virtnet bench --tap``: the seed's netperf experiment with real packets (root).

Two namespaces, "guest" and "host", each with a TAP (mtu 1500, TSO on). The
virtnet driver (a vhost-user front-end process) owns the guest tap, the
virtnet device (the back-end process) the host tap, so every frame between
the namespaces crosses driver → virtqueues in shared memory → device. Then
iperf3: TCP guest→host and host→guest (netperf TCP_STREAM's analogue) and
UDP host→guest at a high offered rate (the seed's drop-rate observation).
Before each iperf3 run, ``ping -c 100 -i 0.01`` guest→host measures the
path's round trip at rest, reported next to the rate (``rtt_ms``).

Baselines in the same run, between fresh namespaces of the same shape: a
veth pair (``veth``, the kernel's limit) and a bare single-process Python
relay between two offloaded taps (``relay``, Python's ceiling).

``--queues 1,2``: the taps are IFF_MULTI_QUEUE taps with one queue per pair and
iperf3 runs MQ_STREAMS parallel TCP streams (``-P``), so that the kernel's flow
hash spreads them over the pairs; the baselines run the same ``-P``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from virtnet._build import build_name
from virtnet.bench.builds import child_env, processes_build
from virtnet.bench.ping import parse_ping, ping_argv, ping_in, ping_timeout
from virtnet.bench.runner import busy_share, cpu_ticks
from virtnet.ports.iperf import IperfResult, run_iperf, start_client, start_server
from virtnet.ports.netns import Topology, iproute, link_index, run_in_netns, stop_process
from virtnet.ports.relay import (
    RELAY_CIDR_B,
    VETH_CIDR_A,
    VETH_CIDR_B,
    Relay,
    iperf_through_relay,
    relay_topology,
)

GUEST_CIDR, HOST_CIDR = "10.77.2.2/24", "10.77.2.1/24"
GUEST_IP, HOST_IP = GUEST_CIDR.split("/")[0], HOST_CIDR.split("/")[0]
MTU = 1500
UDP_RATE = "2G"
READY_TIMEOUT = 10.0  # seconds for the path to carry a ping after the processes start
GUEST_TO_HOST, HOST_TO_GUEST = "guest-to-host", "host-to-guest"
MQ_STREAMS = 4  # iperf3 -P with --queues: enough flows that two queues both get some
TAP_STATS = ("rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes", "tx_dropped")


class TapBenchError(RuntimeError):
    """A case that could not run (a process died, the path never came up)."""


@dataclass(frozen=True)
class TapCase:
    strategy: str  # an rx strategy, or "veth" / "relay" for the baselines
    direction: str
    protocol: str = "tcp"
    seconds: float = 5.0
    queues: int | None = None  # virtnet's queue pairs (None: 1, and not a --queues run)
    streams: int = 1  # iperf3 -P
    build: str = ""  # virtnet's processes: "pure", "compiled" (bench/builds.py) or as this one

    def label(self) -> str:
        pairs = f" {self.queues}q" if self.queues else ""
        streams = f" -P {self.streams}" if self.streams > 1 else ""
        build = f" {self.build}" if self.build else ""
        return f"{self.strategy} {self.direction} {self.protocol}{pairs}{streams}{build}"


# virtnet_probe picks big/small buffers from the features, not from a wish: these are
# the bits the driver must not ack for each non-mergeable strategy.
FEATURES_OFF = {"big": "MRG_RXBUF", "small": "MRG_RXBUF,GUEST_TSO4,GUEST_TSO6"}


def _virtnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtnet", *args]


@dataclass
class VirtnetPath:
    """A running guest ⇄ host path through virtnet, and where its processes report.

    ``stop()`` stops the driver first (it drains tx and reaps what the device
    finished, so both ends count the same packets), then the device; each
    writes its ``--json`` on the way out.
    """

    topo: Topology
    guest: str  # namespace with the driver's tap (GUEST_CIDR)
    host: str  # namespace with the device's tap (HOST_CIDR)
    guest_tap: str
    host_tap: str
    device: subprocess.Popen
    driver: subprocess.Popen
    device_json: str
    driver_json: str
    device_log: str
    driver_log: str
    device_pcap: str | None = None
    driver_pcap: str | None = None

    def stop(self) -> tuple[dict, dict]:
        """Stop both processes (idempotent); returns their JSON (driver, device)."""
        stop_process(self.driver)
        stop_process(self.device)
        return _load(self.driver_json), _load(self.device_json)

    def tap_stats(self) -> dict[str, dict[str, int]]:
        """The kernel's counters of both taps (``guest``, ``host``): rx is what virtnet
        wrote into a tap, tx what it read out (or, as tx_dropped, never read)."""
        out = {}
        for side, netns, ifname in (("guest", self.guest, self.guest_tap),
                                    ("host", self.host, self.host_tap)):  # fmt: skip
            with iproute(netns) as ipr:
                link = ipr.get_links(link_index(ipr, ifname, netns))[0]
            st = link.get("IFLA_STATS64")
            out[side] = {k: st[k] for k in TAP_STATS}
        return out

    def logs(self) -> str:
        return f"device: {_tail(self.device_log)}\ndriver: {_tail(self.driver_log)}"


@contextlib.contextmanager
def virtnet_path(
    strategy: str = "deferred",
    *,
    features_off: str | None = None,
    queue_size: int | None = None,
    pcap: bool = False,
    workdir: str | None = None,
    device_args: tuple[str, ...] = (),
    queues: int = 1,
    build: str = "",
) -> Iterator[VirtnetPath]:
    """Namespaces, taps, ``virtnet device`` and ``virtnet driver``, carrying pings.

    ``queues`` > 1: each tap is an IFF_MULTI_QUEUE tap whose ``queues`` fds go to the
    process as ``tapfd:FD1,...`` with ``--queues N``, one per queue pair.

    ``features_off`` defaults to what ``strategy`` needs (FEATURES_OFF); the JSON,
    logs and pcaps go to ``workdir`` (default: a temporary directory, gone on exit,
    so read them before leaving the block). Everything is stopped and deleted on
    exit, also when the body raises. ``build``: "pure" or "compiled" for both processes
    (bench/builds.py), "" for this process's own.
    """
    if features_off is None:
        features_off = FEATURES_OFF.get(strategy)
    with contextlib.ExitStack() as stack:
        topo = stack.enter_context(Topology())
        # The socket lives in its own short directory: a unix socket path is at most 107 bytes.
        sockdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="virtnet-vu-"))
        files = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="virtnet-tap-"))
        guest, host = topo.add_netns("guest"), topo.add_netns("host")
        taps_g = topo.add_tap_queues(guest, GUEST_CIDR, queues, mtu=MTU)
        taps_h = topo.add_tap_queues(host, HOST_CIDR, queues, mtu=MTU)
        fds_g, fds_h = [t.fileno() for t in taps_g], [t.fileno() for t in taps_h]
        sock = os.path.join(sockdir, "vhost-user.sock")
        out = {name: os.path.join(files, name) for name in (
            "device.json", "driver.json", "device.log", "driver.log",
            "device.pcap", "driver.pcap")}  # fmt: skip
        dev_args = ["device", "--socket-path", sock, "--backend", _tapfd(fds_h),
                    "--json", out["device.json"], "--quiet", *device_args]  # fmt: skip
        drv_args = ["driver", "--socket-path", sock, "--backend", _tapfd(fds_g),
                    "--strategy", strategy, "--json", out["driver.json"], "--quiet"]  # fmt: skip
        if queues > 1:
            dev_args += ["--queues", str(queues)]
            drv_args += ["--queues", str(queues)]
        if features_off:
            drv_args += ["--features-off", features_off]
        if queue_size is not None:
            drv_args += ["--queue-size", str(queue_size)]
        if pcap:
            dev_args += ["--pcap", out["device.pcap"]]
            drv_args += ["--pcap", out["driver.pcap"]]
        env = child_env(build)
        dev = _start(stack, dev_args, fds_h, out["device.log"], env)
        deadline = time.monotonic() + READY_TIMEOUT
        while not os.path.exists(sock):
            if dev.poll() is not None or time.monotonic() > deadline:
                raise TapBenchError(f"virtnet device did not listen: {_tail(out['device.log'])}")
            time.sleep(0.02)
        drv = _start(stack, drv_args, fds_g, out["driver.log"], env)
        path = VirtnetPath(
            topo, guest, host, taps_g[0].name, taps_h[0].name, dev, drv,
            device_json=out["device.json"], driver_json=out["driver.json"],
            device_log=out["device.log"], driver_log=out["driver.log"],
            device_pcap=out["device.pcap"] if pcap else None,
            driver_pcap=out["driver.pcap"] if pcap else None,
        )  # fmt: skip
        _wait_path(path)
        yield path


def _tapfd(fds: list[int]) -> str:
    return "tapfd:" + ",".join(map(str, fds))


def _start(
    stack: contextlib.ExitStack, args: list[str], fds: list[int], log_path: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """A virtnet process holding ``fds``; stopped when ``stack`` closes (before the taps)."""
    # stderr to a file, not a pipe nobody reads: a chatty process must never block on it.
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_virtnet(*args), pass_fds=fds, stdout=subprocess.DEVNULL,
                                stderr=log, env=env)  # fmt: skip
    stack.callback(stop_process, proc)
    return proc


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:].strip() or "(no output)"
    except OSError:
        return "(no log)"


def _wait_path(path: VirtnetPath) -> None:
    """Ping until the guest reaches the host through virtnet (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        for name, p in (("device", path.device), ("driver", path.driver)):
            if p.poll() is not None:
                raise TapBenchError(
                    f"virtnet {name} exited with {p.returncode} before traffic\n{path.logs()}"
                )
        r = run_in_netns(path.guest, ["ping", "-c", "1", "-W", "1", HOST_IP],
                         capture_output=True, timeout=5)  # fmt: skip
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise TapBenchError(f"no ping through virtnet within {READY_TIMEOUT:g}s\n{path.logs()}")


def _iperf(topo: Topology, client_ns: str, server_ns: str, case: TapCase) -> IperfResult:
    """Client in the guest; -R turns it into host → guest, the server sending."""
    start_server(topo, server_ns, HOST_IP)
    extra = _extra(case)
    kw = {"udp": True, "bitrate": UDP_RATE} if case.protocol == "udp" else {}
    return start_client(topo, client_ns, HOST_IP, case.seconds, extra=extra, **kw).result()


def _extra(case: TapCase) -> tuple[str, ...]:
    """iperf3 client options beyond the defaults: -R for host → guest, -P streams."""
    extra = ("-R",) if case.direction == HOST_TO_GUEST else ()
    return extra + (("-P", str(case.streams)) if case.streams > 1 else ())


def run_virtnet_case(case: TapCase) -> dict:
    with virtnet_path(case.strategy, queues=case.queues or 1, build=case.build) as path:
        rtt = ping_in(path.guest, HOST_IP)
        before = cpu_ticks()
        result = _iperf(path.topo, path.guest, path.host, case)
        busy = busy_share(before, cpu_ticks())
        drv, dev = path.stop()
    rec = _record(case, result, drv.get("driver_stats", {}), dev.get("device_stats", {}), rtt)
    rec["build"] = processes_build(case.build, drv, dev)  # what the processes ran
    if case.queues:
        rec.update(_cpu_record(drv, dev, case), machine_busy=busy)
    return rec


def _cpu_record(drv: dict, dev: dict, case: TapCase) -> dict:
    """Each side's CPU seconds (its process and workers; its workers alone) and what each
    pair carried (the driver's tx for guest → host, rx for host → guest)."""
    q = "tx" if case.direction == GUEST_TO_HOST else "rx"
    stats = drv.get("driver_stats", {})
    queues = case.queues or 1
    if queues == 1:
        per_pair = [stats.get(f"{q}_packets", 0)]
    else:
        per_pair = [stats.get(f"{q}_queue_{p}_packets", 0) for p in range(queues)]
    return {
        "driver_cpu_seconds": drv.get("cpu_seconds"),
        "device_cpu_seconds": dev.get("cpu_seconds"),
        "driver_worker_cpu_seconds": drv.get("worker_cpu_seconds", []),
        "device_worker_cpu_seconds": dev.get("worker_cpu_seconds", []),
        "queue_packets": per_pair,
    }


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_baseline_case(case: TapCase) -> dict:
    """veth or the bare relay, same namespaces shape, same iperf3 run."""
    kw = {"udp": True, "bitrate": UDP_RATE} if case.protocol == "udp" else {}
    kw["extra"] = _extra(case)
    with Topology() as topo:
        if case.strategy == "veth":
            a, b = topo.add_netns("guest"), topo.add_netns("host")
            topo.add_veth(a, VETH_CIDR_A, b, VETH_CIDR_B)
            server = VETH_CIDR_B.split("/")[0]
            rtt = ping_in(a, server)
            before = cpu_ticks()
            result = run_iperf(topo, a, b, server, case.seconds, **kw)
        else:
            a, b, tap_a, tap_b = relay_topology(topo, mtu=MTU)
            rtt = _ping_through_relay(topo, a, tap_a, tap_b)
            before = cpu_ticks()
            result = iperf_through_relay(topo, a, b, tap_a, tap_b, case.seconds, **kw).iperf
        busy = busy_share(before, cpu_ticks())
    rec = _record(case, result, {}, {}, rtt)
    if case.queues or case.streams > 1:
        rec["machine_busy"] = busy
    return rec


def _ping_through_relay(topo: Topology, a: str, tap_a, tap_b) -> dict:
    """Ping from a to b, the relay running in this thread meanwhile (it is the path)."""
    proc = topo.popen(a, ping_argv(RELAY_CIDR_B.split("/")[0]), stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True)  # fmt: skip
    Relay(tap_a, tap_b).run(ping_timeout(), until=lambda: proc.poll() is not None)
    try:
        out, _ = proc.communicate(timeout=5)
    finally:
        stop_process(proc)
    return parse_ping(out)


def _record(
    case: TapCase, r: IperfResult, driver_stats: dict, device_stats: dict, rtt: dict
) -> dict:
    rec = {
        "mode": "tap",
        # A baseline runs no virtnet data plane (veth: the kernel; relay: this process,
        # control-plane code): this process's build; run_virtnet_case puts its processes'.
        "build": build_name(),
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
        "queues": case.queues,
        "streams": case.streams,
        "rtt_ms": rtt,  # ping through the same path just before, at rest
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


def tap_cases(
    strategies: list[str], seconds: float, runs: int, queues: list[int] | None = None,
    builds: list[str] | None = None,
) -> list[TapCase]:
    """The seed's cases; with ``queues``, TCP both ways with MQ_STREAMS streams, each
    strategy once per number of queue pairs in a run, next to the baselines. With
    ``builds``, each virtnet case once per build, one after the other (the baselines
    run no virtnet build: once)."""
    each = builds or [""]
    cases = []
    if queues:
        for direction in (GUEST_TO_HOST, HOST_TO_GUEST):
            cases += [TapCase(s, direction, "tcp", seconds, streams=MQ_STREAMS)
                      for s in ("veth", "relay")]  # fmt: skip
            cases += [TapCase(s, direction, "tcp", seconds, queues=q, streams=MQ_STREAMS,
                              build=b)
                      for _ in range(runs) for s in strategies for q in queues
                      for b in each]  # fmt: skip
        return cases
    for direction in (GUEST_TO_HOST, HOST_TO_GUEST):
        for s in ("veth", "relay"):
            cases.append(TapCase(s, direction, "tcp", seconds))
        for s in strategies:
            cases += [TapCase(s, direction, "tcp", seconds, build=b)
                      for _ in range(runs) for b in each]  # fmt: skip
    cases.append(TapCase("relay", HOST_TO_GUEST, "udp", seconds))
    cases += [TapCase(s, HOST_TO_GUEST, "udp", seconds, build=b)
              for s in strategies for b in each]  # fmt: skip
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
