"""``virtnet bench --mode vhost-user``: the embedded A/B across two processes.

The device (``virtnet device``) and the driver (``virtnet driver``) run as
separate processes sharing the guest memory and rings over vhost-user,
exactly as a VM and its back-end do. host-to-guest: device ``gen:SIZE`` →
driver ``sink`` (the seed's rx path); guest-to-host: driver ``gen:SIZE`` →
device ``sink``. The strategies take turns in short runs (A B A B ...) so
that both meet the same machine; every byte is checked by the sink.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from virtnet.bench.embedded import HOST_TO_GUEST, Case
from virtnet.virtio.features import VirtioF, has

TURN = 1.0  # seconds per turn of one strategy
START_TIMEOUT = 10.0


class VhostUserBenchError(RuntimeError):
    """A run whose processes failed; the message carries their stderr."""


def _virtnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtnet", *args]


def _one_turn(case: Case, seconds: float, tmp: str) -> tuple[dict, dict]:
    sock = os.path.join(tmp, "vu.sock")
    dev_json, drv_json = os.path.join(tmp, "dev.json"), os.path.join(tmp, "drv.json")
    h2g = case.direction == HOST_TO_GUEST
    dev_backend = f"gen:{case.payload}" if h2g else "sink"
    drv_backend = "sink" if h2g else f"gen:{case.payload}"
    dev = subprocess.Popen(
        _virtnet("device", "--socket-path", sock, "--backend", dev_backend,
                 "--json", dev_json, "--quiet"),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(sock):
            if dev.poll() is not None or time.monotonic() > deadline:
                raise VhostUserBenchError(f"virtnet device did not start: {dev.stderr.read()}")
            time.sleep(0.02)
        # Both ends offer RING_PACKED: split rings are asked for by turning it off.
        ring = ("--features-off", "RING_PACKED") if case.ring == "split" else ()
        drv = subprocess.run(
            _virtnet("driver", "--socket-path", sock, "--backend", drv_backend,
                     "--strategy", case.strategy, "--queue-size", str(case.queue_size),
                     "--seconds", f"{seconds:g}", "--json", drv_json, "--quiet", *ring,
                     *(("--xdp", case.xdp) if case.xdp else ())),
            capture_output=True, text=True, timeout=seconds + 30,
        )  # fmt: skip
        if drv.returncode != 0:
            raise VhostUserBenchError(f"virtnet driver failed: {drv.stderr}")
    finally:
        dev.terminate()
        try:
            dev.wait(10)
        except subprocess.TimeoutExpired:
            dev.kill()
            dev.wait()
    with open(drv_json) as f:
        driver = json.load(f)
    if has(driver.get("features", 0), VirtioF.RING_PACKED) != (case.ring == "packed"):
        raise VhostUserBenchError(f"{case.ring} rings asked for, features {driver['features']:#x}")
    with open(dev_json) as f:
        device = json.load(f)
    if os.path.exists(sock):
        os.unlink(sock)
    return driver, device


def run_vhost_user_group(
    cases: list[Case], tick: Callable[[float], None] | None = None
) -> list[dict]:
    """Each case runs ``case.seconds`` in all, in TURN-second turns, taking turns."""
    acc: list[dict] = [{} for _ in cases]
    done = [0.0] * len(cases)
    total = sum(c.seconds for c in cases)
    with tempfile.TemporaryDirectory(prefix="vn-bench-") as tmp:
        while any(done[i] < c.seconds for i, c in enumerate(cases)):
            for i, case in enumerate(cases):
                if done[i] >= case.seconds:
                    continue
                turn = min(TURN, case.seconds - done[i])
                driver, device = _one_turn(case, turn, tmp)
                _accumulate(acc[i], driver, device)
                done[i] += turn
                if tick is not None:
                    tick(min(1.0, sum(done) / total))
    return [_record(c, a) for c, a in zip(cases, acc, strict=True)]


def _accumulate(acc: dict, driver: dict, device: dict) -> None:
    acc["seconds"] = acc.get("seconds", 0.0) + driver.get("seconds", 0.0)
    acc["cpu_seconds"] = acc.get("cpu_seconds", 0.0) + driver.get("cpu_seconds", 0.0)
    for key, src in (("driver_stats", driver["driver_stats"]), ("device_stats",
                     device["device_stats"]), ("driver_backend", driver["backend"]),
                     ("device_backend", device["backend"])):  # fmt: skip
        bag = acc.setdefault(key, {})
        for k, v in src.items():
            if isinstance(v, int | float):
                bag[k] = max(bag.get(k, 0), v) if k.endswith("_max") else bag.get(k, 0) + v


def _record(case: Case, acc: dict) -> dict:
    h2g = case.direction == HOST_TO_GUEST
    sink = acc["driver_backend"] if h2g else acc["device_backend"]
    if h2g and case.xdp == "tx":  # XDP_TX sends the stream back: the device's sink checks it
        sink = acc["device_backend"]
    elif h2g and case.xdp == "drop":  # dropped before any skb: counted, nothing to verify
        n = acc["driver_stats"].get("rx_xdp_drops", 0)
        sink = {"sink_packets": n, "sink_bytes": n * case.payload}
    seconds = acc["seconds"] or 1e-9
    return {
        "mode": "vhost-user",
        "strategy": case.strategy,
        "direction": case.direction,
        "payload": case.payload,
        "queue_size": case.queue_size,
        "ring": case.ring,
        "seconds": round(seconds, 4),
        "cpu_seconds": round(acc["cpu_seconds"], 4),
        "packets": sink.get("sink_packets", 0),
        "bytes": sink.get("sink_bytes", 0),
        "gbps": sink.get("sink_bytes", 0) * 8 / seconds / 1e9,
        "pps": sink.get("sink_packets", 0) / seconds,
        "integrity": sink_integrity(sink),
        "acks": 0,
        "xdp": case.xdp,
        "driver_stats": acc["driver_stats"],
        "device_stats": acc["device_stats"],
    }


def sink_integrity(sink: dict) -> dict:
    """What the receiving process's sink measured (its ``sink_*`` counters), as the
    record's ``integrity``: every key is a count the sink kept, none a constant."""
    return {
        "corrupt": sink.get("sink_corrupt", 0),
        "lost": sink.get("sink_lost", 0),
        # A frame whose sequence number goes backwards: duplicated or reordered.
        "reordered": sink.get("sink_reordered", 0),
        # A frame that is not the generator's: nothing in this bench sends one.
        "foreign": sink.get("sink_foreign", 0),
        "messages": [],
    }
