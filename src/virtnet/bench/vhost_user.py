"""``virtnet bench --mode vhost-user``: the embedded A/B across two processes.

The device (``virtnet device``) and the driver (``virtnet driver``) run as
separate processes sharing the guest memory and rings over vhost-user,
exactly as a VM and its back-end do. host-to-guest: device ``gen:SIZE`` →
driver ``sink`` (the seed's rx path); guest-to-host: driver ``gen:SIZE`` →
device ``sink``. The strategies take turns in short runs (A B A B ...) so
that both meet the same machine; every byte is checked by the sink.

With ``queues`` > 1 both processes run that many queue pairs, one worker process
per pair on each side, one generator or sink per pair; a case with 1 pair and one
with 2 take turns the same way. Each pair's count of the measured direction must
be the same at both ends (``queue_mismatch``): no frame may go missing between them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import zip_longest

from virtnet.bench.builds import TURN, child_env, processes_build
from virtnet.bench.embedded import HOST_TO_GUEST, Case
from virtnet.bench.runner import busy_share, cpu_ticks
from virtnet.ports.synthetic import SINK_COUNTS
from virtnet.virtio.features import VirtioF, has

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
    pairs = ("--queues", str(case.queues))
    env = child_env(case.build)  # both processes run the case's build
    dev = subprocess.Popen(
        _virtnet("device", "--socket-path", sock, "--backend", dev_backend,
                 "--json", dev_json, "--quiet", *pairs),
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert dev.stderr is not None  # stderr=PIPE
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(sock):
            if dev.poll() is not None or time.monotonic() > deadline:
                raise VhostUserBenchError(f"virtnet device did not start: {dev.stderr.read()}")
            time.sleep(0.02)
        # Both ends offer RING_PACKED: split rings are asked for by turning it off.
        ring = ("--features-off", "RING_PACKED") if case.ring == "split" else ()
        ticks = cpu_ticks()
        drv = subprocess.run(
            _virtnet("driver", "--socket-path", sock, "--backend", drv_backend,
                     "--strategy", case.strategy, "--queue-size", str(case.queue_size),
                     "--seconds", f"{seconds:g}", "--json", drv_json, "--quiet", *ring, *pairs,
                     *(("--xdp", case.xdp) if case.xdp else ())),
            capture_output=True, text=True, timeout=seconds + 30, env=env,
        )  # fmt: skip
        if drv.returncode != 0:
            raise VhostUserBenchError(f"virtnet driver failed: {drv.stderr}")
        after = cpu_ticks()
    finally:
        dev.terminate()
        try:
            dev.wait(10)
        except subprocess.TimeoutExpired:
            dev.kill()
            dev.wait()
    with open(drv_json) as f:
        driver = json.load(f)
    if ticks and after:  # the whole machine's, the driver's start-up included
        driver["machine_ticks"] = (after[0] - ticks[0], after[1] - ticks[1])
    if has(driver.get("features", 0), VirtioF.RING_PACKED) != (case.ring == "packed"):
        raise VhostUserBenchError(f"{case.ring} rings asked for, features {driver['features']:#x}")
    with open(dev_json) as f:
        device = json.load(f)
    driver["build"] = processes_build(case.build, driver, device)
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
                acc[i].setdefault("queue_messages", []).extend(queue_mismatches(
                    case, driver["driver_stats"], device["device_stats"]))  # fmt: skip
                done[i] += turn
                if tick is not None:
                    tick(min(1.0, sum(done) / total))
    return [_record(c, a) for c, a in zip(cases, acc, strict=True)]


def _accumulate(acc: dict, driver: dict, device: dict) -> None:
    acc["build"] = driver.get("build")  # the device's too (checked per turn)
    acc["seconds"] = acc.get("seconds", 0.0) + driver.get("seconds", 0.0)
    acc["cpu_seconds"] = acc.get("cpu_seconds", 0.0) + driver.get("cpu_seconds", 0.0)
    acc["device_cpu_seconds"] = acc.get("device_cpu_seconds", 0.0) + device.get("cpu_seconds", 0.0)
    busy, total = driver.get("machine_ticks", (0, 0))
    acc["machine_ticks"] = [a + b for a, b in zip(acc.get("machine_ticks", (0, 0)), (busy, total),
                                                  strict=True)]  # fmt: skip
    for key, src in (("driver_worker_cpu_seconds", driver), ("device_worker_cpu_seconds", device)):
        workers = src.get("worker_cpu_seconds", [])
        acc[key] = [a + b for a, b in zip_longest(acc.get(key, []), workers, fillvalue=0.0)]
    for key, src in (("driver_stats", driver["driver_stats"]), ("device_stats",
                     device["device_stats"]), ("driver_backend", driver["backend"]),
                     ("device_backend", device["backend"])):  # fmt: skip
        bag = acc.setdefault(key, {})
        for k, v in src.items():
            if isinstance(v, int | float):
                bag[k] = max(bag.get(k, 0), v) if k.endswith("_max") else bag.get(k, 0) + v


def measured_queue(case: Case) -> str | None:
    """The queue whose frames the sink counts, "rx" or "tx", as both ends name it; None
    when XDP decides their fate (dropped or sent back: the rx counts differ by design)."""
    if case.xdp:
        return None
    return "rx" if case.direction == HOST_TO_GUEST else "tx"


def queue_packets(stats: dict, q: str, queues: int) -> list[int | None]:
    """Per pair ``{q}_queue_P_packets`` (a single pair's driver only has the total)."""
    if queues == 1:
        return [stats.get(f"{q}_queue_0_packets", stats.get(f"{q}_packets"))]
    return [stats.get(f"{q}_queue_{p}_packets") for p in range(queues)]


def queue_mismatches(case: Case, driver_stats: dict, device_stats: dict) -> list[str]:
    """Each pair's measured count at the driver against the device's, for one turn.

    The driver stops first and reaps all the device finished, so the counts are
    exact: any difference is a frame lost or invented between the two processes.
    """
    q = measured_queue(case)
    if q is None:
        return []
    drv = queue_packets(driver_stats, q, case.queues)
    dev = queue_packets(device_stats, q, case.queues)
    return [f"pair {p}: driver {q}_queue_{p}_packets {a}, device {b}"
            for p, (a, b) in enumerate(zip(drv, dev, strict=True))
            if a is None or a != b]  # fmt: skip


def _record(case: Case, acc: dict) -> dict:
    h2g = case.direction == HOST_TO_GUEST
    sink = acc["driver_backend"] if h2g else acc["device_backend"]
    if h2g and case.xdp == "tx":  # XDP_TX sends the stream back: the device's sink checks it
        sink = acc["device_backend"]
    elif h2g and case.xdp == "drop":  # dropped before any skb: counted, nothing to verify
        n = acc["driver_stats"].get("rx_xdp_drops", 0)
        sink = {"sink_packets": n, "sink_bytes": n * case.payload}
    seconds = acc["seconds"] or 1e-9
    integrity = sink_integrity(sink)
    mismatched = acc.get("queue_messages", [])
    integrity["queue_mismatch"] = len(mismatched)
    integrity["messages"] += mismatched
    q = measured_queue(case)
    return {
        "mode": "vhost-user",
        "build": acc.get("build"),  # of the device and driver processes
        "strategy": case.strategy,
        "direction": case.direction,
        "payload": case.payload,
        "queue_size": case.queue_size,
        "ring": case.ring,
        "queues": case.queues,
        "seconds": round(seconds, 4),
        "cpu_seconds": round(acc["cpu_seconds"], 4),  # the driver's (kept: older readers)
        "driver_cpu_seconds": round(acc["cpu_seconds"], 4),
        "device_cpu_seconds": round(acc.get("device_cpu_seconds", 0.0), 4),
        # Per pair's worker process; the rest of each side's CPU is its control process.
        **{k: [round(x, 4) for x in acc.get(k, [])]
           for k in ("driver_worker_cpu_seconds", "device_worker_cpu_seconds")},
        # What each pair carried of the measured direction (the driver's count).
        "queue_packets": queue_packets(acc["driver_stats"], q, case.queues) if q else [],
        # All cores' busy share while the driver ran (its start-up too), whoever used them.
        "machine_busy": busy_share((0, 0), tuple(acc.get("machine_ticks", (0, 0)))),
        "packets": sink.get("sink_packets", 0),
        "bytes": sink.get("sink_bytes", 0),
        "gbps": sink.get("sink_bytes", 0) * 8 / seconds / 1e9,
        "pps": sink.get("sink_packets", 0) / seconds,
        "integrity": integrity,
        "acks": 0,
        "xdp": case.xdp,
        "driver_stats": acc["driver_stats"],
        "device_stats": acc["device_stats"],
    }


def sink_integrity(sink: dict) -> dict:
    """What the receiving process's sink measured (its ``sink_*`` counters), as the
    record's ``integrity``: every key is a count the sink kept, none a constant.
    Nothing in this bench loses, duplicates, reorders, cuts or sends a foreign frame."""
    out: dict = {k: sink.get(f"sink_{k}", 0) for k in SINK_COUNTS}
    out["messages"] = []
    return out
