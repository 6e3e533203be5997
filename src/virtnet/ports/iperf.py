"""iperf3 inside network namespaces: start a one-shot server, run a bounded client, parse -J.

The client runs in the background (``start_client``) because the path under test may need
a driving loop in this process (the TAP relay, the virtnet device) while it runs; for a
path that needs none (veth) ``run_iperf`` does it all in one call.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from virtnet.ports.netns import Topology, run_in_netns, stop_process

IPERF3 = "iperf3"
IPERF_PORT = 5201
LISTEN_TIMEOUT = 5.0  # seconds for a server to start listening
RESULT_MARGIN = 10.0  # seconds past -t before a client counts as hung and is killed


class IperfError(RuntimeError):
    """iperf3 is missing, failed, or reported an error; the message says which."""


@dataclass(frozen=True, slots=True)
class IperfResult:
    """One iperf3 test, as the receiver saw it (what crossed the path under test)."""

    protocol: str  # "tcp" or "udp"
    seconds: float
    bits_per_second: float
    bytes: int
    retransmits: int | None = None  # TCP only: the sender's retransmitted segments
    lost_percent: float | None = None  # UDP only: datagrams the receiver never saw

    @property
    def gbps(self) -> float:
        return self.bits_per_second / 1e9


def iperf3_path() -> str:
    path = shutil.which(IPERF3)
    if path is None:
        raise IperfError("iperf3 not found on PATH: install it (Debian: apt-get install iperf3)")
    return path


def parse_iperf_json(text: str) -> IperfResult:
    """Parse a client's ``iperf3 -J`` output; an iperf3-reported error raises IperfError."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise IperfError(f"iperf3 output is not JSON ({e}): {text[:200]!r}") from None
    if doc.get("error"):
        raise IperfError(f"iperf3: {doc['error']}")
    protocol = doc.get("start", {}).get("test_start", {}).get("protocol", "TCP").lower()
    end = doc.get("end", {})
    # The client's JSON carries the server's view as sum_received (TCP, and UDP since 3.x);
    # older UDP output only has "sum".
    received = end.get("sum_received") or end.get("sum")
    if not received:
        raise IperfError(f"iperf3 JSON has no end.sum_received/end.sum: keys {sorted(end)}")
    sent = end.get("sum_sent", {})
    return IperfResult(
        protocol=protocol,
        seconds=float(received["seconds"]),
        bits_per_second=float(received["bits_per_second"]),
        bytes=int(received["bytes"]),
        retransmits=sent.get("retransmits") if protocol == "tcp" else None,
        lost_percent=float(received.get("lost_percent", 0.0)) if protocol == "udp" else None,
    )


def client_argv(
    server: str,
    seconds: float,
    *,
    udp: bool = False,
    bitrate: str | None = None,
    port: int = IPERF_PORT,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``iperf3 -c`` arguments; ``bitrate`` is iperf3's ``-b`` (``"1G"``, ``"500M"``)."""
    if seconds <= 0:
        raise IperfError(f"iperf3 -t must be positive, got {seconds}")
    argv = [iperf3_path(), "-c", server, "-p", str(port), "-t", f"{seconds:g}", "-J"]
    if udp:
        argv.append("-u")
    if bitrate is not None:
        argv += ["-b", bitrate]
    return argv + list(extra)


def start_server(topo: Topology, netns: str, bind: str, port: int = IPERF_PORT) -> None:
    """A one-shot (``-1``) server in ``netns`` on ``bind``:``port``, returned once listening."""
    argv = [iperf3_path(), "-s", "-1", "-B", bind, "-p", str(port)]
    proc = topo.popen(netns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_listening(netns, port, proc)


def _wait_listening(netns: str, port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise IperfError(f"iperf3 server in {netns} exited ({proc.returncode}): {err}")
        ss = run_in_netns(
            netns, ["ss", "-Hltn", f"sport = :{port}"], timeout=LISTEN_TIMEOUT,
            capture_output=True, text=True,
        )  # fmt: skip
        if ss.stdout.strip():
            return
        time.sleep(0.05)
    raise IperfError(f"iperf3 server in {netns} not listening on :{port} after {LISTEN_TIMEOUT}s")


class IperfClient:
    """A running ``iperf3 -c``; ``done()`` to poll, ``result()`` to collect."""

    def __init__(self, proc: subprocess.Popen, seconds: float) -> None:
        self.proc = proc
        self.deadline = time.monotonic() + seconds + RESULT_MARGIN

    def done(self) -> bool:
        return self.proc.poll() is not None or time.monotonic() >= self.deadline

    def result(self) -> IperfResult:
        timeout = max(0.0, self.deadline - time.monotonic())
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            raise IperfError("iperf3 client did not finish within -t + margin") from None
        if not out.strip():
            raise IperfError(f"iperf3 client exited {self.proc.returncode} without JSON: {err}")
        return parse_iperf_json(out)


def start_client(topo: Topology, netns: str, server: str, seconds: float, **kw: Any) -> IperfClient:
    """Start ``iperf3 -c server`` in ``netns`` in the background (see ``client_argv``)."""
    argv = client_argv(server, seconds, **kw)
    proc = topo.popen(netns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return IperfClient(proc, seconds)


def run_iperf(
    topo: Topology,
    client_netns: str,
    server_netns: str,
    server: str,
    seconds: float,
    **kw: Any,
) -> IperfResult:
    """Server + client, blocking: for paths the kernel carries on its own (veth)."""
    start_server(topo, server_netns, server, kw.get("port", IPERF_PORT))
    return start_client(topo, client_netns, server, seconds, **kw).result()
