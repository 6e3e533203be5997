"""A stop signal to the whole process group is a stop, not a death.

An operator stops a service by signalling its group (systemd's default
``KillMode=control-group``, ``timeout``, ``kill -- -PGID``): the workers get the
SIGTERM as well as the control process. Each end runs here as the leader of a
group of its own; SIGTERM to the group must end it as cleanly as SIGTERM to the
control process alone: exit 0, no worker named dead, every pair's counters kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.vhost_user.conftest import (
    DRIVER_SLACK,
    STOP_TIMEOUT,
    VIRTNET,
    DeviceProcess,
    driver_argv,
)

RUN = 60.0  # --seconds of the end not stopped by the test: far past the test's own stop


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def stop_group(proc: subprocess.Popen, order: str = "group") -> int:
    """SIGTERM to the process group ``proc`` leads; its exit status. ``order``: "group"
    (one killpg), "twice" (a second while it stops), "workers-first" (each worker, a
    moment before the control process)."""
    if order == "workers-first":
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        if order == "twice":
            time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)
        pytest.fail("the group ignored SIGTERM")


def check_counters(stats: dict, queues: int, per_queue: bool = True) -> None:
    """Packets went out, and (``per_queue``) each pair's tx count adds up to the total."""
    assert stats["tx_packets"] > 0, stats
    if per_queue:
        for pair in range(queues):
            assert f"tx_queue_{pair}_packets" in stats, sorted(stats)
        assert sum(stats[f"tx_queue_{p}_packets"] for p in range(queues)) == stats["tx_packets"]


def wait_running(dev: DeviceProcess, queues: int) -> None:
    dev.wait_for_log(f"device running: queue pair {queues - 1}", timeout=DRIVER_SLACK)
    time.sleep(0.5)  # let packets flow


@pytest.mark.parametrize(("queues", "order"), [(1, "group"), (2, "group"), (2, "twice"),
                                               (2, "workers-first")])  # fmt: skip
def test_sigterm_to_the_device_group_stops_it_cleanly(tmp_path, queues: int, order: str) -> None:
    sock, out, err = tmp_path / "dev.sock", tmp_path / "dev.json", tmp_path / "dev.stderr"
    with open(err, "wb") as f:
        dev_proc = subprocess.Popen(
            [*VIRTNET, "device", "--socket-path", str(sock), "--backend", "sink",
             "--queues", str(queues), "--json", str(out), "--quiet", "-v"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f,
            start_new_session=True,
        )  # fmt: skip
    dev = DeviceProcess(dev_proc, str(sock), out, err)
    argv = driver_argv(str(sock), "gen:64", tmp_path / "drv.json", seconds=RUN,
                       extra=("--queues", str(queues)))  # fmt: skip
    drv = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_running(dev, queues)
        rc = stop_group(dev_proc, order)
    finally:
        for p in (drv, dev_proc):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=STOP_TIMEOUT)
    log = dev.stderr()
    assert rc == 0, log
    assert "its worker" not in log and "worker_deaths" not in log, log
    result = json.loads(out.read_text())
    assert result["worker_deaths"] == 0
    check_counters(result["device_stats"], queues)


@pytest.mark.parametrize(("queues", "order"), [(1, "group"), (2, "group"), (2, "twice"),
                                               (2, "workers-first")])  # fmt: skip
def test_sigterm_to_the_driver_group_stops_it_cleanly(device_factory, tmp_path,
                                                      queues: int, order: str) -> None:  # fmt: skip
    dev = device_factory("sink", extra=("--queues", str(queues)))
    out = tmp_path / "drv.json"
    argv = driver_argv(dev.socket_path, "gen:64", out, seconds=RUN,
                       extra=("--queues", str(queues)))  # fmt: skip
    drv = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)  # fmt: skip
    try:
        wait_running(dev, queues)
        rc = stop_group(drv, order)
        log = drv.stderr.read() if drv.stderr else ""
    finally:
        if drv.poll() is None:
            drv.kill()
            drv.wait(timeout=STOP_TIMEOUT)
    assert rc == 0, log
    assert "its worker" not in log, log
    # One pair runs in the driver's own process: its JSON names no queue then.
    check_counters(json.loads(out.read_text())["driver_stats"], queues, per_queue=queues > 1)
    # The device saw the same packets the driver says it sent.
    assert dev.stop()["device_stats"]["tx_packets"] == json.loads(out.read_text())[
        "driver_stats"]["tx_packets"]  # fmt: skip
