"""``--queues N``: N queue pairs, each in a worker process of its own, on both ends.

Exact counts per queue on both ends, the control queue's VQ_PAIRS_SET followed by
the device (SET_VRING_ENABLE), refusals that name what was wrong, and a worker
killed under a running session: named, the session failed, the next one served.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest

from tests.vhost_user.conftest import DRIVER_SLACK, driver_argv, run_driver

PAIRS = 2


def per_queue(stats: dict, pair: int, side: str, name: str = "packets") -> int:
    return stats[f"{side}_queue_{pair}_{name}"]


def resume(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def worker_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


@contextmanager
def running_driver(dev, tmp_path, name: str, seconds: float):
    """``virtnet driver --queues PAIRS`` (gen:64) running against ``dev``; killed if still
    running when the block ends."""
    argv = driver_argv(dev.socket_path, "gen:64", tmp_path / f"{name}.json", seconds=seconds,
                       extra=("--queues", str(PAIRS)))  # fmt: skip
    drv = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        dev.wait_for_log("device running: queue pair 1")
        yield drv
    finally:
        if drv.poll() is None:
            drv.kill()
            drv.wait()


def driver_workers(drv) -> list[int]:
    deadline = time.monotonic() + 5
    while len(worker_pids(drv.pid)) < PAIRS and time.monotonic() < deadline:
        time.sleep(0.05)
    return worker_pids(drv.pid)


def check_exact_per_queue(run, dev_stats: dict) -> None:
    """Both ends counted the same on every pair, both ways, and nothing was lost."""
    drv = run.stats
    for pair in range(PAIRS):
        # guest→host: what each driver tx queue sent, that device tx queue consumed
        sent = per_queue(drv, pair, "tx")
        assert sent > 0 and per_queue(dev_stats, pair, "tx") == sent
        # host→guest: the loopback echoes each pair's frames on the same pair
        got = per_queue(drv, pair, "rx")
        assert got > 0 and per_queue(dev_stats, pair, "rx") == got
    assert drv["tx_packets"] == sum(per_queue(drv, p, "tx") for p in range(PAIRS))
    assert drv["pages_outstanding"] == 0
    assert run.backend["sink_corrupt"] == 0 and run.backend["sink_reordered"] == 0
    assert run.result["queues"] == PAIRS


def test_two_pairs_carry_exact_counts_per_queue_both_ways(device_factory, tmp_path):
    dev = device_factory("loopback", extra=("--queues", str(PAIRS)))
    run = run_driver(tmp_path, dev, "gen:200", seconds=2.0, extra=("--queues", str(PAIRS)))
    check_exact_per_queue(run, dev.stop()["device_stats"])


def test_combined_fewer_pairs_disables_the_rest_through_the_control_queue(
    device_factory, tmp_path
):
    dev = device_factory("sink", extra=("--queues", "3"))
    run = run_driver(tmp_path, dev, "gen:64", seconds=1.0,
                     extra=("--queues", "3", "--combined", "2"))  # fmt: skip
    dev_stats = dev.stop()["device_stats"]
    for pair in (0, 1):
        assert per_queue(run.stats, pair, "tx") == per_queue(dev_stats, pair, "tx") > 0
    assert per_queue(run.stats, 2, "tx") == per_queue(dev_stats, 2, "tx") == 0
    assert "queue pair 2 stopped" in dev.stderr()  # VQ_PAIRS_SET 2 → SET_VRING_ENABLE 0
    assert run.stats["pages_outstanding"] == 0


def test_a_driver_asking_more_pairs_than_offered_is_told_so(device_factory, tmp_path):
    dev = device_factory("sink", extra=("--queues", "2"))
    argv = driver_argv(dev.socket_path, "gen:64", tmp_path / "d.json", extra=("--queues", "3"))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10 + DRIVER_SLACK)
    assert done.returncode == 1
    assert "--queues 3: the back-end has 2 queue pairs (GET_QUEUE_NUM)" in done.stderr
    one = device_factory("sink", name="one")
    argv = driver_argv(one.socket_path, "gen:64", tmp_path / "e.json", extra=("--queues", "2"))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10 + DRIVER_SLACK)
    assert done.returncode == 1
    assert "--queues 2: the back-end does not offer VIRTIO_NET_F_MQ" in done.stderr
    assert dev.alive() and one.alive()


@pytest.mark.parametrize("bad", ["0", "x", "65"])
def test_bad_queue_counts_are_refused_by_name(bad):
    from virtnet.cli import main

    for role in ("device", "driver"):
        with pytest.raises(SystemExit) as e:
            main([role, "--socket-path", "/nonexistent", "--queues", bad])
        assert e.value.code == 2


def test_a_killed_device_worker_is_named_and_the_next_session_served(device_factory, tmp_path):
    dev = device_factory("sink", extra=("--queues", str(PAIRS)))
    workers = worker_pids(dev.pid)
    assert len(workers) == PAIRS
    with running_driver(dev, tmp_path, "k", 8.0) as drv:
        time.sleep(0.3)
        os.kill(workers[1], signal.SIGKILL)
        err = dev.wait_for_log("failing the session")
        assert f"queue pair 1: its worker (pid {workers[1]}) was killed by SIGKILL" in err
        _, drv_err = drv.communicate(timeout=8.0 + DRIVER_SLACK)
    assert drv.returncode == 1 and "the back-end went away" in drv_err, drv_err
    # A fresh worker for pair 1; the next front-end runs on both pairs.
    assert len(worker_pids(dev.pid)) == PAIRS and workers[1] not in worker_pids(dev.pid)
    again = run_driver(tmp_path, dev, "gen:64", seconds=1.0, name="again",
                       extra=("--queues", str(PAIRS)))  # fmt: skip
    assert all(per_queue(again.stats, p, "tx") > 0 for p in range(PAIRS))
    result = dev.stop()
    assert result["worker_deaths"] == 1 and dev.returncode == 0


def test_a_killed_driver_worker_ends_the_driver_with_its_name(device_factory, tmp_path):
    dev = device_factory("sink", extra=("--queues", str(PAIRS)))
    json_path = tmp_path / "w.json"
    with running_driver(dev, tmp_path, "w", 8.0) as drv:
        victim = driver_workers(drv)[0]
        os.kill(victim, signal.SIGKILL)
        _, err = drv.communicate(timeout=8.0 + DRIVER_SLACK)
    assert drv.returncode == 1
    assert f"its worker (pid {victim}) was killed by SIGKILL" in err, err
    assert json.loads(json_path.read_text())["queues"] == PAIRS
    assert dev.alive()


def test_virtnet_stats_reads_per_queue_counters_across(tmp_path, capsys):
    from virtnet.cli import main

    doc = {"device_stats": {"rx_packets": 3, "rx_queue_0_packets": 1, "rx_queue_1_packets": 2,
                            "tx_queue_0_bytes": 0, "tx_queue_1_bytes": 0}}  # fmt: skip
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    assert main(["stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert "device_stats per queue" in out and "queue 1" in out
    row = next(line for line in out.splitlines() if "rx_packets" in line and "│" in line
               and line.count("│") >= 4)  # fmt: skip
    assert row.split("│")[2].strip() == "1" and row.split("│")[3].strip() == "2"
    assert "tx_bytes" not in out  # all-zero per-queue rows are left out


def test_a_hung_device_worker_is_killed_named_and_its_session_failed(device_factory, tmp_path):
    """SIGSTOP stands for a worker stuck in a loop: no death to notice, so the control
    process's watchdog must find it (an unanswered request), or the pair stalls silently."""
    dev = device_factory("sink", extra=("--queues", str(PAIRS)))
    workers = worker_pids(dev.pid)
    try:
        with running_driver(dev, tmp_path, "h", 20.0) as drv:
            os.kill(workers[0], signal.SIGSTOP)
            err = dev.wait_for_log("failing the session", timeout=15.0)
            assert "queue pair 0: its worker did not answer 'stats' within 5s and was killed" in err
            _, drv_err = drv.communicate(timeout=20.0 + DRIVER_SLACK)
    finally:
        resume(workers)
    assert drv.returncode == 1 and "the back-end went away" in drv_err
    again = run_driver(tmp_path, dev, "gen:64", seconds=1.0, name="again",
                       extra=("--queues", str(PAIRS)))  # fmt: skip
    assert all(per_queue(again.stats, p, "tx") > 0 for p in range(PAIRS))
    assert dev.stop()["worker_deaths"] == 1


def test_a_hung_driver_worker_ends_the_driver_with_its_name(device_factory, tmp_path):
    dev = device_factory("sink", extra=("--queues", str(PAIRS)))
    victims: list[int] = []
    try:
        with running_driver(dev, tmp_path, "g", 20.0) as drv:
            victims.append(driver_workers(drv)[1])
            os.kill(victims[0], signal.SIGSTOP)
            _, err = drv.communicate(timeout=20.0 + DRIVER_SLACK)
    finally:
        resume(victims)
    assert drv.returncode == 1
    assert "queue pair 1: its worker did not answer 'stats' within 5s and was killed" in err, err
    assert dev.alive()
