"""``virtnet driver --reconnect`` over the real socket: the back-end is SIGKILLed mid-run
and another takes its place; the driver's run goes on, sets the new one up where the
old one stopped (used index from guest memory), traffic flows again, and the teardown
reclaims every buffer -- the ones the dead device took and never used among them.

Every wait has its own deadline; no rate or time is asserted, only counts (the tries
against a back-end that hangs up at once are bounded from above: a busy loop would
make dozens in the window).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
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
    fd_count,
    start_device,
)
from tests.vhost_user.test_client_mode import start_client_device

SPLIT = ("--features-off", "RING_PACKED")  # --reconnect: split rings only
LOST = "back-end connection lost"
RECONNECTED = "reconnected to the back-end after"
TOTAL = re.compile(r"total rx ([\d,]+) tx ([\d,]+)")
BASES = re.compile(r"device running: queue pair \d+, queue sizes \d+/\d+, bases \((\d+), (\d+)\)")
WAIT = 30.0  # any one wait below


class Driver:
    """A ``virtnet driver --reconnect`` process, live counters on (stderr in a file, read
    while it runs), stopped with SIGTERM."""

    def __init__(self, tmp_path: Path, sock: str, backend: str, *, seconds: float = 120,
                 extra: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.json_path = tmp_path / "drv.json"
        self.stderr_path = tmp_path / "drv.stderr"
        argv = [*VIRTNET, "driver", "--socket-path", sock, "--backend", backend,
                "--seconds", str(seconds), "--json", str(self.json_path), "-v",
                "--reconnect", *extra]  # fmt: skip
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        self.seconds = seconds

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, text: str, n: int = 1, since: int = 0) -> str:
        deadline = time.monotonic() + WAIT
        while self.stderr()[since:].count(text) < n:
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                pytest.fail(f"driver stderr never showed {text!r} x{n}:\n{self.stderr()}")
            time.sleep(0.02)
        return self.stderr()[since:]

    def rx_total(self, since: int = 0) -> int:
        """The last live line's received-packet total (after ``since``), 0 if none yet."""
        lines = TOTAL.findall(self.stderr()[since:])
        return int(lines[-1][0].replace(",", "")) if lines else 0

    def wait_running(self) -> None:
        """Past setup, in run(): its first live line is out."""
        deadline = time.monotonic() + WAIT
        while not TOTAL.search(self.stderr()):
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                pytest.fail(f"driver never ran:\n{self.stderr()}")
            time.sleep(0.05)

    def wait_for_rx(self, more_than: int, since: int = 0) -> int:
        deadline = time.monotonic() + WAIT
        while (n := self.rx_total(since)) <= more_than:
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                pytest.fail(f"driver received no more than {more_than}:\n{self.stderr()}")
            time.sleep(0.05)
        return n

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.finish()

    def finish(self, rc: int = 0) -> dict:
        try:
            self.proc.wait(timeout=min(self.seconds, 10) + DRIVER_SLACK)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"virtnet driver --reconnect did not finish:\n{self.stderr()}")
        assert self.proc.returncode == rc, self.stderr()
        return json.loads(self.json_path.read_text()) if rc == 0 else {}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def procs():
    """Everything a test starts, killed at its end whatever happened."""
    started: list[Driver | DeviceProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(timeout=STOP_TIMEOUT)


def kill_device(dev: DeviceProcess) -> None:
    dev.proc.send_signal(signal.SIGKILL)  # no GET_VRING_BASE, no goodbye
    dev.proc.wait(timeout=STOP_TIMEOUT)
    dev.returncode = dev.proc.returncode


def check_reclaimed(doc: dict) -> None:
    """The teardown after the reconnect gave every page and skb back (the seed's BUG_ON),
    and every frame received was one sent, intact."""
    rs = doc["driver_stats"]
    assert rs["pages_outstanding"] == 0, rs
    assert rs["page_allocs"] == rs["page_frees"]
    assert rs["skb_allocs"] == rs["skb_frees"]
    assert rs["rx_length_errors"] == 0
    assert doc["backend"]["sink_corrupt"] == doc["backend"]["sink_foreign"] == 0


def restart_and_check(drv: Driver, first: DeviceProcess, start_second) -> tuple[dict, dict]:
    """Traffic through ``first``, SIGKILL it, ``start_second()``: the driver reconnects and
    receives more; then a clean stop. Returns (driver's document, second device's)."""
    before = drv.wait_for_rx(0)  # traffic through the first device
    kill_device(first)
    drv.wait_for(LOST)
    lost_at = drv.stderr().index(LOST)
    second = start_second()
    after = drv.wait_for(RECONNECTED, since=lost_at)
    assert "reconnect 1)" in after
    mark = len(drv.stderr())
    grown = drv.wait_for_rx(drv.rx_total(), since=mark)  # more frames after the reconnect
    assert grown > before
    doc = drv.stop()
    assert doc["reconnects"] == 1 and doc["reconnect_gap_max_seconds"] > 0
    assert doc["driver_stats"]["rx_packets"] >= grown
    check_reclaimed(doc)
    # SET_VRING_BASE: where the dead device's used index stood in guest memory, not 0
    # (virtnet's device would mend a 0 from the used ring, and say so).
    bases = [int(n) for pair in BASES.findall(second.stderr()) for n in pair]
    assert bases and min(bases) > 0, second.stderr()
    assert "but the used ring's idx is" not in second.stderr()
    dev_doc = second.stop()
    ds = dev_doc["device_stats"]
    # The second device moved frames both ways, and took each of them from the rings
    # the driver set it up on: nothing refused.
    assert ds["rx_packets"] > 0 and ds["tx_packets"] > 0, ds
    assert ds["desc_errors"] == ds["tx_errors"] == 0, ds
    assert dev_doc["sessions"] == 1
    return doc, dev_doc


def test_device_killed_and_restarted_driver_reconnects(tmp_path, procs):
    first = start_device(tmp_path, "loopback", "dev1")
    procs.append(first)
    procs.append(drv := Driver(tmp_path, first.socket_path, "gen:1000", extra=SPLIT))

    def second() -> DeviceProcess:
        procs.append(dev := start_device(tmp_path, "loopback", "dev1"))  # the same path
        return dev

    doc, _ = restart_and_check(drv, first, second)
    assert "back-end went away" not in drv.stderr()


def test_server_driver_and_restarted_client_device(tmp_path, procs):
    sock = str(tmp_path / "fe.sock")
    procs.append(drv := Driver(tmp_path, sock, "gen:1000", extra=("--server", *SPLIT)))
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(sock):  # listening
        assert drv.proc.poll() is None and time.monotonic() < deadline, drv.stderr()
        time.sleep(0.02)
    procs.append(first := start_client_device(tmp_path, sock, "loopback"))

    def second() -> DeviceProcess:
        (tmp_path / "dev.stderr").rename(tmp_path / "dev1.stderr")
        procs.append(dev := start_client_device(tmp_path, sock, "loopback"))
        return dev

    restart_and_check(drv, first, second)
    assert not os.path.exists(sock)  # listened again for one session, then stopped


def test_multiqueue_workers_reconnect(tmp_path, procs):
    """Two pairs, each in a worker: the session is the control process's, so the same."""
    two = ("--queues", "2")
    first = start_device(tmp_path, "loopback", "dev1", extra=two)
    procs.append(first)
    procs.append(drv := Driver(tmp_path, first.socket_path, "gen:1000", extra=(*two, *SPLIT)))

    def second() -> DeviceProcess:
        procs.append(dev := start_device(tmp_path, "loopback", "dev1", extra=two))
        return dev

    doc, dev_doc = restart_and_check(drv, first, second)
    per_queue = dev_doc["device_stats"]
    assert per_queue["rx_queue_0_packets"] > 0 and per_queue["rx_queue_1_packets"] > 0


def test_backend_that_hangs_up_at_once_gets_backoff_and_no_fd_leaks(tmp_path, procs):
    first = start_device(tmp_path, "sink", "dev1")
    procs.append(first)
    sock = first.socket_path
    procs.append(drv := Driver(tmp_path, sock, "gen:1000", extra=SPLIT))
    drv.wait_running()
    kill_device(first)
    drv.wait_for("no back-end listening")  # away, trying: no connection held
    # The count the driver keeps while away: the most common of 20 looks (one look can
    # catch an fd in the middle of being closed or opened).
    away_fds = statistics.mode(fd_count(drv.pid) for _ in range(20))
    away_targets = fd_targets(drv.pid)
    os.unlink(sock)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock)
    listener.listen(8)
    listener.settimeout(0.2)
    accepted, window_end = 0, time.monotonic() + 5.0
    try:
        while accepted < 20 and time.monotonic() < window_end:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted += 1
            conn.close()  # before answering SET_OWNER / GET_FEATURES
    finally:
        listener.close()
        os.unlink(sock)
    # 0.1 s doubling to 2 s: a handful in 5 s; restarting the waits after each
    # connect, or none at all, would reach the 20.
    assert 2 <= accepted <= 8, (accepted, drv.stderr())
    assert drv.stderr().count("reconnect failed") >= accepted - 1
    deadline = time.monotonic() + WAIT
    while (n := fd_count(drv.pid)) != away_fds and time.monotonic() < deadline:
        time.sleep(0.02)
    assert n <= away_fds, (n, away_fds, "new:", fd_targets(drv.pid) - away_targets)
    procs.append(start_device(tmp_path, "sink", "dev1"))
    drv.wait_for(RECONNECTED)
    doc = drv.stop()
    assert doc["reconnects"] == 1  # failed tries are not reconnects
    check_reclaimed(doc)


def test_new_backend_without_a_negotiated_feature_ends_the_run(tmp_path, procs):
    first = start_device(tmp_path, "sink", "dev1")
    procs.append(first)
    procs.append(drv := Driver(tmp_path, first.socket_path, "gen:1000", extra=SPLIT))
    assert "RING_EVENT_IDX" in drv.wait_for("features ")
    drv.wait_running()
    kill_device(first)
    procs.append(start_device(tmp_path, "sink", "dev1", extra=("--features-off", "RING_EVENT_IDX")))
    drv.finish(rc=1)
    err = drv.stderr()
    assert "no longer offers RING_EVENT_IDX" in err, err
    assert RECONNECTED not in err


def test_reconnect_refuses_packed_rings_without_inflight_tracking(tmp_path, procs):
    dev = start_device(tmp_path, "sink", "dev1")
    procs.append(dev)
    procs.append(drv := Driver(tmp_path, dev.socket_path, "sink", seconds=1,
                               extra=("--no-inflight",)))  # fmt: skip
    drv.finish(rc=1)
    assert "--reconnect with packed rings needs in-flight tracking" in drv.stderr()


def test_reconnect_with_no_restart_is_harmless(tmp_path, procs):
    dev = start_device(tmp_path, "gen:1500", "dev1")
    procs.append(dev)
    procs.append(drv := Driver(tmp_path, dev.socket_path, "sink", seconds=1, extra=SPLIT))
    doc = drv.finish()
    assert doc["reconnects"] == 0 and doc["reconnect_gap_max_seconds"] == 0
    check_reclaimed(doc)
    ds = dev.stop()["device_stats"]
    assert ds["rx_packets"] == doc["driver_stats"]["rx_packets"] > 0


def fd_targets(pid: int) -> set[str]:
    """What each of ``pid``'s fds is (socket:[inode], anon_inode:[eventfd], ...)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except FileNotFoundError:
            pass  # closed meanwhile
    return out


def test_server_driver_against_a_backend_that_hangs_up_in_a_loop(tmp_path, procs):
    """--server: a back-end connects and hangs up every 50 ms; the driver takes one at a
    time, each after a doubled wait (bounded failures), holds no fd of them, and a stop
    while still away ends the run cleanly, every buffer reclaimed."""
    sock = str(tmp_path / "fe.sock")
    procs.append(drv := Driver(tmp_path, sock, "gen:1000", extra=("--server", *SPLIT)))
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(sock):
        assert drv.proc.poll() is None and time.monotonic() < deadline, drv.stderr()
        time.sleep(0.02)
    procs.append(first := start_client_device(tmp_path, sock, "sink"))
    drv.wait_running()
    kill_device(first)
    drv.wait_for("listening on")  # again, for the next back-end
    # The count the driver keeps while away: the most common of 20 looks (one look can
    # catch an fd in the middle of being closed or opened).
    away_fds = statistics.mode(fd_count(drv.pid) for _ in range(20))
    away_targets = fd_targets(drv.pid)
    window_end = time.monotonic() + 5.0
    while time.monotonic() < window_end:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(0.2)  # a full backlog: the driver is between tries
        try:
            s.connect(sock)
        except OSError:
            pass
        s.close()
        time.sleep(0.05)
    failed = drv.stderr().count("reconnect failed")
    assert 2 <= failed <= 8, (failed, drv.stderr())
    deadline = time.monotonic() + WAIT
    while (n := fd_count(drv.pid)) > away_fds and time.monotonic() < deadline:
        time.sleep(0.02)  # the last one taken may be in its failed session still
    assert n <= away_fds, (n, away_fds, "new:", fd_targets(drv.pid) - away_targets)
    doc = drv.stop()
    assert "the run ended with the back-end away" in drv.stderr()
    assert doc["reconnects"] == 0
    check_reclaimed(doc)
    assert not os.path.exists(sock)
