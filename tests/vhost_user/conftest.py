"""Two real processes over vhost-user: a ``virtnet device`` subprocess and its clients.

``device`` starts ``python -m virtnet device`` on a socket in the test's tmp dir, waits
for the socket to appear, and always stops it with SIGTERM and a bounded wait (SIGKILL
after that, and the test fails). ``run_driver`` runs one ``virtnet driver`` to the end.
``RawFrontend`` is a front-end made by hand from the codec, to say what a real one
would not. Every wait has its own deadline: no test can hang (no pytest-timeout here).
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtnet.vhost_user.messages import (
    HEADER,
    HEADER_SIZE,
    U64,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    FrontendRequest,
    Message,
    encode,
)

START_TIMEOUT = 20.0  # python start-up on a busy 2-core box, with margin
STOP_TIMEOUT = 15.0
DRIVER_SLACK = 30.0  # beyond --seconds: start-up, setup, teardown
REPLY_TIMEOUT = 10.0

VIRTNET = [sys.executable, "-m", "virtnet"]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _has_epoll(pid: int) -> bool:
    fds = f"/proc/{pid}/fd"
    try:
        return any("eventpoll" in os.readlink(f"{fds}/{n}") for n in os.listdir(fds))
    except OSError:
        return False


@dataclass
class DeviceProcess:
    """A running ``virtnet device``; ``stop()`` returns its --json document."""

    proc: subprocess.Popen
    socket_path: str
    json_path: Path
    stderr_path: Path
    result: dict | None = None
    returncode: int | None = None
    baseline: int = 0  # fd count when idle, for leak checks

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fd_count(self) -> int:
        return fd_count(self.pid)

    def mark(self) -> int:
        """Where stderr ends now: ``wait_for_log(..., since=mark)`` reads only what follows."""
        return len(self.stderr())

    def wait_for_log(self, text: str, timeout: float = 10.0, since: int = 0) -> str:
        """Wait until stderr (after ``since``) contains ``text``; returns that part."""
        deadline = time.monotonic() + timeout
        while True:
            err = self.stderr()[since:]
            if text in err:
                return err
            if time.monotonic() >= deadline or not self.alive():
                pytest.fail(f"device stderr never showed {text!r}:\n{err}")
            time.sleep(0.02)

    def wait_for_fds(self, expected: int, timeout: float = 10.0) -> int:
        """The device's fd count, once it settles to ``expected`` (or the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.fd_count()
            if n == expected or time.monotonic() >= deadline:
                return n
            time.sleep(0.02)

    def stop(self) -> dict:
        if self.returncode is None:
            if self.alive():
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.returncode = self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
                pytest.fail(f"virtnet device ignored SIGTERM for {STOP_TIMEOUT}s:\n{self.stderr()}")
        if self.result is None:
            assert self.returncode == 0, f"device exited {self.returncode}:\n{self.stderr()}"
            self.result = json.loads(self.json_path.read_text())
        return self.result


def start_device(
    tmp_path: Path, backend: str, name: str = "dev", extra: tuple[str, ...] = ()
) -> DeviceProcess:
    sock = str(tmp_path / f"{name}.sock")
    json_path = tmp_path / f"{name}.json"
    stderr_path = tmp_path / f"{name}.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*VIRTNET, "device", "--socket-path", sock, "--backend", backend,
             "--json", str(json_path), "--quiet", "-v", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    dev = DeviceProcess(proc, sock, json_path, stderr_path)
    deadline = time.monotonic() + START_TIMEOUT
    while not (os.path.exists(sock) and _has_epoll(proc.pid)):  # listening, loop built
        if not dev.alive() or time.monotonic() >= deadline:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
            pytest.fail(f"virtnet device did not listen on {sock}:\n{dev.stderr()}")
        time.sleep(0.02)
    return dev


@pytest.fixture
def device_factory(tmp_path: Path) -> Iterator:
    """``device_factory(backend)`` → a running DeviceProcess, stopped after the test."""
    started: list[DeviceProcess] = []

    def make(
        backend: str = "sink", name: str | None = None, extra: tuple[str, ...] = ()
    ) -> DeviceProcess:
        dev = start_device(tmp_path, backend, name or f"dev{len(started)}", extra)
        started.append(dev)
        return dev

    yield make
    for dev in started:
        if dev.returncode is None:
            if dev.alive():
                dev.proc.send_signal(signal.SIGTERM)
            try:
                dev.returncode = dev.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                dev.proc.kill()
                dev.proc.wait(timeout=STOP_TIMEOUT)


@dataclass
class DriverRun:
    returncode: int
    result: dict
    stderr: str

    @property
    def stats(self) -> dict:
        return self.result["driver_stats"]

    @property
    def backend(self) -> dict:
        return self.result["backend"]


def driver_argv(
    socket_path: str, backend: str, json_path: Path, *, strategy: str = "deferred",
    seconds: float = 1.0, extra: tuple[str, ...] = (),
) -> list[str]:  # fmt: skip
    return [*VIRTNET, "driver", "--socket-path", socket_path, "--backend", backend,
            "--strategy", strategy, "--seconds", str(seconds), "--json", str(json_path),
            "--quiet", *extra]  # fmt: skip


def run_driver(
    tmp_path: Path, dev: DeviceProcess, backend: str, *, strategy: str = "deferred",
    seconds: float = 1.0, extra: tuple[str, ...] = (), name: str = "drv", cwd=None,
) -> DriverRun:  # fmt: skip
    """Run ``virtnet driver`` against ``dev`` to its end; it must exit 0 and write JSON."""
    json_path = tmp_path / f"{name}.json"
    argv = driver_argv(dev.socket_path, backend, json_path, strategy=strategy,
                       seconds=seconds, extra=extra)  # fmt: skip
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=seconds + DRIVER_SLACK, cwd=cwd)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"virtnet driver did not finish: {e}\ndevice:\n{dev.stderr()}")
    assert done.returncode == 0, (
        f"driver exited {done.returncode}:\n{done.stderr}\ndevice:\n{dev.stderr()}"
    )
    return DriverRun(done.returncode, json.loads(json_path.read_text()), done.stderr)


# -- a front-end by hand ---------------------------------------------------------------


@dataclass
class RawFrontend:
    """A vhost-user connection that sends whatever bytes and fds a test wants."""

    sock: socket.socket

    @classmethod
    def connect(cls, path: str) -> RawFrontend:
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # the socket file appears at bind(), a moment before listen()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(REPLY_TIMEOUT)
            try:
                s.connect(path)
                return cls(s)
            except ConnectionRefusedError:
                s.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.sendmsg([data], anc)

    def send(self, request: int, payload=b"", fds: tuple[int, ...] = (), *,
             need_reply: bool = False) -> None:  # fmt: skip
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        self.send_raw(encode(Message(FrontendRequest(request), flags, payload, fds)), fds)

    def send_header(self, request: int, flags: int, payload: bytes,
                    fds: tuple[int, ...] = ()) -> None:  # fmt: skip
        """A message with exactly these header fields (size = len(payload)), unchecked."""
        self.send_raw(HEADER.pack(request, flags, len(payload)) + payload, fds)

    def recv_reply(self) -> tuple[int, int, bytes]:
        """(request, flags, payload) of the next reply; fails the test on EOF."""
        head = self._recv_exact(HEADER_SIZE)
        request, flags, size = HEADER.unpack(head)
        payload = self._recv_exact(size)
        assert flags & VHOST_USER_REPLY_MASK, f"not a reply: flags {flags:#x}"
        return request, flags, payload

    def recv_u64(self, request: int) -> int:
        got, _flags, payload = self.recv_reply()
        assert got == request, f"reply to {got}, expected {request}"
        return U64.unpack(payload).value

    def expect_eof(self) -> None:
        """The back-end dropped this connection (and sent nothing more)."""
        data = self.sock.recv(4096)
        assert data == b"", f"expected the back-end to hang up, got {data!r}"

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, f"back-end hung up after {len(buf)} of {n} bytes"
            buf += chunk
        return buf

    def handshake(self) -> int:
        """SET_OWNER + GET_FEATURES: proves the back-end serves this connection."""
        self.send(FrontendRequest.SET_OWNER)
        self.send(FrontendRequest.GET_FEATURES)
        return self.recv_u64(FrontendRequest.GET_FEATURES)

    def close(self) -> None:
        self.sock.close()
