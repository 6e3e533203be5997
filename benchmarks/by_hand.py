"""The issue's by-hand rows: `virtnet device` and `virtnet driver` started as a user would,
with default options, measured from the outside.

(a) tap ↔ tap (root): ``virtnet device --backend tap:IF`` inside one namespace and
    ``virtnet driver --backend tap:IF`` inside another, each creating its own tap, which
    is then addressed and set up the way a user does after starting them; ping RTT
    through the path, then iperf3 -t 4 guest→host and host→guest.
(b) gen ↔ sink (no root): ``virtnet device --backend gen:SIZE`` with ``virtnet driver
    --backend sink`` (host→guest) and the reverse (guest→host), 5 s, each frame size;
    the rates come from the processes' --json (frames the sink verified / the driver's
    run time).

    python benchmarks/by_hand.py                  # everything, one table
    python benchmarks/by_hand.py --json by_hand.json --sizes 64,1500,65536

No option of device or driver is set beyond the socket, the backend, --seconds, --json
and --quiet (which only silences the once-a-second counter line): defaults are what
users run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.table import Table

from virtnet.bench.ping import ping_in, rtt_text
from virtnet.bench.tap import GUEST_CIDR, HOST_CIDR, HOST_IP, unavailable_reason
from virtnet.ports.iperf import start_client, start_server
from virtnet.ports.netns import (
    Topology,
    add_address,
    iproute,
    run_in_netns,
    set_link,
    stop_process,
    unique_ifname,
)
from virtnet.ports.synthetic import SINK_COUNTS

START_TIMEOUT = 10.0  # seconds for a process's socket / tap / the path to appear
H2G, G2H = "host-to-guest", "guest-to-host"


class ByHandError(RuntimeError):
    """A process died or the path never came up; the message carries its log."""


def virtnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtnet", *args]


def _wait(what: str, ready, procs: list[subprocess.Popen], logs: list[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(Path(x).read_text(errors="replace")[-1500:] for x in logs
                              if os.path.exists(x))  # fmt: skip
            raise ByHandError(f"{what}: {'a process exited' if dead else 'timed out'}\n{tails}")
        time.sleep(0.05)


def _link_exists(netns: str, ifname: str) -> bool:
    with iproute(netns) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def _load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


# --- (a) tap <-> tap, iperf3 -------------------------------------------------------------


def tap_rows(seconds: float) -> list[dict]:
    with ExitStack() as stack:
        topo = stack.enter_context(Topology())
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="vn-byhand-"))
        sock = os.path.join(tmp, "vu.sock")
        guest, host = topo.add_netns("guest"), topo.add_netns("host")
        tap_g, tap_h = unique_ifname("g"), unique_ifname("h")
        f = {n: os.path.join(tmp, n) for n in ("dev.json", "drv.json", "dev.log", "drv.log")}
        logs = [f["dev.log"], f["drv.log"]]
        with open(f["dev.log"], "w") as log:
            dev = topo.popen(host, virtnet("device", "--socket-path", sock, "--backend",
                                           f"tap:{tap_h}", "--json", f["dev.json"], "--quiet"),
                             stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        _wait("virtnet device", lambda: os.path.exists(sock), [dev], logs)
        _wait("device tap", lambda: _link_exists(host, tap_h), [dev], logs)
        with open(f["drv.log"], "w") as log:
            drv = topo.popen(guest, virtnet("driver", "--socket-path", sock, "--backend",
                                            f"tap:{tap_g}", "--json", f["drv.json"], "--quiet"),
                             stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        _wait("driver tap", lambda: _link_exists(guest, tap_g), [dev, drv], logs)
        # What a user does next: ip addr add ... dev IF; ip link set IF up (in each netns).
        for ns, ifname, cidr in ((host, tap_h, HOST_CIDR), (guest, tap_g, GUEST_CIDR)):
            add_address(ns, ifname, cidr)
            set_link(ns, ifname, up=True)

        def pings() -> bool:
            return run_in_netns(guest, ["ping", "-c", "1", "-W", "1", HOST_IP],
                                capture_output=True, timeout=5).returncode == 0  # fmt: skip

        _wait("ping through virtnet", pings, [dev, drv], logs)
        rtt = ping_in(guest, HOST_IP)
        results = {}
        for direction in (G2H, H2G):
            start_server(topo, host, HOST_IP)
            extra = ("-R",) if direction == H2G else ()
            results[direction] = start_client(topo, guest, HOST_IP, seconds, extra=extra).result()
        stop_process(drv)  # the driver first: it drains tx and writes its JSON
        stop_process(dev)
        drv_json, dev_json = _load(f["drv.json"]), _load(f["dev.json"])
    rows = []
    for direction, r in results.items():
        rows.append({
            "run": "tap <-> tap, iperf3 TCP", "direction": direction, "frame": "mtu 1500",
            "seconds": r.seconds, "gbps": r.gbps, "kpps": None, "retransmits": r.retransmits,
            "rtt_ms": rtt, "driver_stats": drv_json.get("driver_stats", {}),
            "device_stats": dev_json.get("device_stats", {}),
        })  # fmt: skip
    return rows


# --- (b) gen <-> sink ---------------------------------------------------------------------


def gen_sink_row(direction: str, size: int, seconds: float) -> dict:
    h2g = direction == H2G
    dev_backend, drv_backend = (f"gen:{size}", "sink") if h2g else ("sink", f"gen:{size}")
    with tempfile.TemporaryDirectory(prefix="vn-byhand-") as tmp:
        sock = os.path.join(tmp, "vu.sock")
        dev_json, drv_json = os.path.join(tmp, "dev.json"), os.path.join(tmp, "drv.json")
        log = os.path.join(tmp, "dev.log")
        with open(log, "w") as err:
            dev = subprocess.Popen(virtnet("device", "--socket-path", sock, "--backend",
                                           dev_backend, "--json", dev_json, "--quiet"),
                                   stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            _wait("virtnet device", lambda: os.path.exists(sock), [dev], [log])
            drv = subprocess.run(virtnet("driver", "--socket-path", sock, "--backend",
                                         drv_backend, "--seconds", f"{seconds:g}", "--json",
                                         drv_json, "--quiet"),
                                 capture_output=True, text=True, timeout=seconds + 60)  # fmt: skip
            if drv.returncode != 0:
                raise ByHandError(f"virtnet driver exited {drv.returncode}: {drv.stderr}")
        finally:
            stop_process(dev)
        driver, device = _load(drv_json), _load(dev_json)
    sink = (driver if h2g else device).get("backend", {})
    secs = driver.get("seconds") or seconds
    return {
        "run": f"device {dev_backend} <-> driver {drv_backend}", "direction": direction,
        "frame": f"{size}B", "seconds": secs,
        "gbps": sink.get("sink_bytes", 0) * 8 / secs / 1e9,
        "kpps": sink.get("sink_packets", 0) / secs / 1e3,
        "driver_cpu_seconds": driver.get("cpu_seconds"),
        "integrity": {k: sink.get(f"sink_{k}", 0) for k in SINK_COUNTS},
        "driver_stats": driver.get("driver_stats", {}),
        "device_stats": device.get("device_stats", {}),
    }  # fmt: skip


# --- report -------------------------------------------------------------------------------


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for name in ("run", "direction", "frame", "kpps", "Gb/s", "notes"):
        t.add_column(name, justify="right" if name in ("kpps", "Gb/s") else "left")
    for r in rows:
        if "rtt_ms" in r:
            notes = f"ping {rtt_text([r['rtt_ms']])} ms, {r['retransmits']} retransmits"
        else:
            bad = {k: v for k, v in r["integrity"].items() if v}
            notes = f"INTEGRITY {bad}" if bad else "every frame verified"
            if r.get("driver_cpu_seconds") is not None:
                notes += f", driver cpu {r['driver_cpu_seconds'] / r['seconds']:.0%}"
        kpps = "-" if r["kpps"] is None else f"{r['kpps']:,.1f}"
        t.add_row(r["run"], r["direction"], r["frame"], kpps, f"{r['gbps']:.2f}", notes)
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,65536", help="gen:SIZE frame sizes (default 64,65536)")
    ap.add_argument("--gen-seconds", type=float, default=5.0, help="driver --seconds (default 5)")
    ap.add_argument("--iperf-seconds", type=float, default=4.0, help="iperf3 -t (default 4)")
    ap.add_argument("--no-tap", action="store_true", help="skip (a), the root part")
    ap.add_argument("--json", metavar="FILE", help="write every row as JSON")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x]
    except ValueError:
        ap.error(f"--sizes: not a list of integers: {args.sizes!r}")
    console = Console(width=None if sys.stdout.isatty() else 140)
    rows: list[dict] = []
    reason = "skipped (--no-tap)" if args.no_tap else unavailable_reason()
    if reason is None:
        rows += tap_rows(args.iperf_seconds)
    else:
        print(f"(a) tap <-> tap: {reason}", file=sys.stderr)
    for size in sizes:
        for direction in (H2G, G2H):
            rows.append(gen_sink_row(direction, size, args.gen_seconds))
    title = (f"virtnet device/driver by hand, default options — {platform.node()}, "
             f"{os.cpu_count()} cores, Python {platform.python_version()}")  # fmt: skip
    console.print(table(rows, title))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]},
                                              indent=2, default=str) + "\n")  # fmt: skip
    bad = [r for r in rows if any(r.get("integrity", {}).values())]
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ByHandError as e:
        print(f"by_hand: {e}", file=sys.stderr)
        sys.exit(1)
