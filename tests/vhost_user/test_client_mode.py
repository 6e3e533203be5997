"""Client mode over the real socket: ``virtnet driver --server`` listens,
``virtnet device --client`` connects, waits with backoff while nobody listens, and
reconnects by itself when its front-end dies -- with nothing left of the old session
(fds, worker processes) and traffic flowing again.

Every wait has its own deadline; no rate or time is asserted, only counts (the
device's tries while a front-end flaps are bounded from above: a busy loop would
make hundreds).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.vhost_user.conftest import (
    DRIVER_SLACK,
    START_TIMEOUT,
    STOP_TIMEOUT,
    VIRTNET,
    DeviceProcess,
    _has_epoll,
    driver_argv,
)

GONE = "front-end gone"
RUNNING = "device running: queue pair 0"
WAITING = "no front-end listening on"


def children(pid: int) -> set[int]:
    """The device's worker processes (its only children)."""
    found: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            found |= {int(c) for c in f.read().split()}
    return found


def start_client_device(tmp_path: Path, sock: str, backend: str = "gen:1500",
                        extra: tuple[str, ...] = ()) -> DeviceProcess:  # fmt: skip
    json_path, stderr_path = tmp_path / "dev.json", tmp_path / "dev.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*VIRTNET, "device", "--client", "--socket-path", sock, "--backend", backend,
             "--json", str(json_path), "--quiet", "-v", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    dev = DeviceProcess(proc, sock, json_path, stderr_path)
    deadline = time.monotonic() + START_TIMEOUT
    while not _has_epoll(proc.pid):  # its loop is built: it is trying to connect
        if not dev.alive() or time.monotonic() >= deadline:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
            pytest.fail(f"virtnet device --client did not start:\n{dev.stderr()}")
        time.sleep(0.02)
    return dev


@pytest.fixture
def client_device(tmp_path):
    started: list[DeviceProcess] = []

    def make(sock: str, backend: str = "gen:1500", extra: tuple[str, ...] = ()):
        dev = start_client_device(tmp_path, sock, backend, extra)
        started.append(dev)
        return dev

    yield make
    for dev in started:
        if dev.alive():
            dev.proc.kill()
            dev.proc.wait(timeout=STOP_TIMEOUT)


class ServerDriver:
    """A ``virtnet driver --server`` process."""

    def __init__(self, tmp_path: Path, sock: str, name: str, seconds: float) -> None:
        self.json_path = tmp_path / f"{name}.json"
        self.seconds = seconds
        argv = driver_argv(sock, "sink", self.json_path, seconds=seconds, extra=("--server",))
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip

    def wait(self, dev: DeviceProcess) -> dict:
        try:
            _, err = self.proc.communicate(timeout=self.seconds + DRIVER_SLACK)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"virtnet driver --server did not finish\ndevice:\n{dev.stderr()}")
        assert self.proc.returncode == 0, f"driver: {err}\ndevice:\n{dev.stderr()}"
        return json.loads(self.json_path.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=STOP_TIMEOUT)


@pytest.fixture
def drivers():
    started: list[ServerDriver] = []
    yield started
    for d in started:
        d.kill()


def wait_count(dev: DeviceProcess, text: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while dev.stderr().count(text) < n:
        if time.monotonic() >= deadline or not dev.alive():
            pytest.fail(f"device stderr shows {text!r} fewer than {n} times:\n{dev.stderr()}")
        time.sleep(0.05)


def check_traffic(doc: dict) -> None:
    rs = doc["driver_stats"]
    assert rs["rx_packets"] > 0, doc
    assert rs["rx_length_errors"] == rs["rx_dropped"] == 0
    assert rs["pages_outstanding"] == 0
    assert doc["backend"]["sink_corrupt"] == doc["backend"]["sink_foreign"] == 0


def test_server_driver_and_client_device_move_traffic(tmp_path, client_device, drivers):
    sock = str(tmp_path / "fe.sock")
    drivers.append(drv := ServerDriver(tmp_path, sock, "drv", seconds=1.0))
    while not os.path.exists(sock):  # listening (bounded by the driver's own exit)
        assert drv.proc.poll() is None, drv.proc.communicate()[1]
        time.sleep(0.02)
    dev = client_device(sock)
    doc = drv.wait(dev)
    check_traffic(doc)
    assert not os.path.exists(sock)  # the driver's socket, gone with its one session
    wait_count(dev, GONE, 1)
    result = dev.stop()
    # The device counted what the driver received (a clean stop: GET_VRING_BASE first).
    assert result["device_stats"]["rx_packets"] == doc["driver_stats"]["rx_packets"]
    assert result["sessions"] == 1


def test_device_started_first_waits_then_connects(tmp_path, client_device, drivers):
    sock = str(tmp_path / "fe.sock")
    dev = client_device(sock)
    wait_count(dev, WAITING, 1)
    time.sleep(1.5)  # several tries (0.1, 0.2, 0.4, 0.8 s apart) ...
    assert dev.stderr().count(WAITING) == 1  # ... named once, not once per try
    drivers.append(drv := ServerDriver(tmp_path, sock, "drv", seconds=1.0))
    check_traffic(drv.wait(dev))
    assert dev.alive()
    assert dev.stop()["sessions"] == 1


def test_driver_killed_and_restarted_device_reconnects_without_leaks(
    tmp_path, client_device, drivers
):
    sock = str(tmp_path / "fe.sock")
    dev = client_device(sock)
    wait_count(dev, WAITING, 1)
    idle_fds, workers = dev.fd_count(), children(dev.pid)
    assert len(workers) == 1  # one queue pair, one worker
    connected_fds = []
    for cycle in range(1, 4):
        drivers.append(drv := ServerDriver(tmp_path, sock, f"drv{cycle}", seconds=60))
        wait_count(dev, RUNNING, cycle)
        connected_fds.append(dev.fd_count())
        drv.kill()  # SIGKILL: no GET_VRING_BASE, no goodbye
        wait_count(dev, GONE, cycle)
        assert dev.wait_for_fds(idle_fds) == idle_fds, dev.stderr()
        assert children(dev.pid) == workers  # the same worker, nothing spawned or lost
    assert len(set(connected_fds)) == 1, connected_fds
    drivers.append(drv := ServerDriver(tmp_path, sock, "last", seconds=1.0))
    check_traffic(drv.wait(dev))
    assert dev.wait_for_fds(idle_fds) == idle_fds
    result = dev.stop()
    assert result["sessions"] == 4 and result["worker_deaths"] == 0


def test_front_end_that_vanishes_before_mem_table_in_a_loop(tmp_path, client_device, drivers):
    """It accepts and hangs up, again and again: the device names it each time, waits
    longer each time (bounded tries), and serves the real front-end that follows."""
    sock = str(tmp_path / "fe.sock")
    dev = client_device(sock)
    wait_count(dev, WAITING, 1)
    idle_fds = dev.fd_count()  # nobody listening: no connection
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock)
    listener.listen(1)
    listener.settimeout(START_TIMEOUT)
    try:
        conn, _ = listener.accept()  # within a wait of the cap
        conn.close()
        accepted, window_end = 1, time.monotonic() + 3.0
        listener.settimeout(0.2)
        while time.monotonic() < window_end:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted += 1
            conn.close()
    finally:
        listener.close()
        os.unlink(sock)
    # The waits double to 2 s: a handful of tries in those 3 s, never hundreds.
    assert 2 <= accepted <= 8, accepted
    wait_count(dev, "front-end gone before any guest memory", accepted)
    assert dev.alive()
    assert dev.wait_for_fds(idle_fds) == idle_fds
    drivers.append(drv := ServerDriver(tmp_path, sock, "drv", seconds=1.0))
    check_traffic(drv.wait(dev))
    assert dev.stop()["sessions"] == accepted + 1


def test_device_with_its_front_end_away_runs_to_seconds(tmp_path):
    """Never a front-end: the device waits its --seconds out, names the wait once, exits 0."""
    sock, json_path = str(tmp_path / "nobody.sock"), tmp_path / "dev.json"
    done = subprocess.run([*VIRTNET, "device", "--client", "--socket-path", sock,
                           "--seconds", "2", "--json", str(json_path), "--quiet"],
                          capture_output=True, text=True, timeout=START_TIMEOUT + 10)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(WAITING) == 1, done.stderr
    assert "No such file or directory" in done.stderr
    assert json.loads(json_path.read_text())["sessions"] == 0


def test_client_socket_path_too_long_is_refused_at_once(tmp_path):
    sock = "/tmp/" + "x" * 120
    done = subprocess.run([*VIRTNET, "device", "--client", "--socket-path", sock],
                          capture_output=True, text=True, timeout=START_TIMEOUT)  # fmt: skip
    assert done.returncode == 2
    assert "cannot connect to" in done.stderr and "longer than a unix socket path" in done.stderr
