"""One queue pair's data path in a process of its own (``virtnet device --queues N``).

The GIL lets one Python process use one core, so each queue pair runs in a
worker process, as vhost-net runs a kernel thread per virtqueue pair: N pairs
can use N cores. The control process keeps the vhost-user session and tells
each worker what it needs over a SOCK_SEQPACKET pair, fds by SCM_RIGHTS: the
memory table's fds (each worker maps the guest memory itself), and at a
pair's start its ring addresses, bases and kick/call eventfds. A worker owns
its traffic back-end (a sink, a generator, one queue of a multi-queue tap)
for the server's life, so a generated stream and its counters go on across
ring restarts and sessions.

A worker is the only process that touches guest memory: a front-end that
shrinks a memory file it could not seal can kill that worker with SIGBUS,
which the control process notices (pidfd), names in the log, and answers
by failing the session and starting a fresh worker.

This module is the control process's side: starting a worker, asking it
(``workermsg``: ``(command, args...)`` answered by ``("ok", value)`` or
``("error", text)``), watching it. What a device's worker runs is
``device_loop.PairLoop``; a driver's, ``frontend.PairWorker`` around
``driver_loop.PairDriver``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Protocol

from virtnet.vhost_user.device_loop import (  # noqa: F401 - their old home: re-exported
    BUDGET,
    IDLE_POLL,
    PairLoop,
    drain_eventfd,
    signal_call,
)
from virtnet.vhost_user.messages import close_fds
from virtnet.vhost_user.workermsg import MAX_FDS, MAX_MSG, recv_msg, send_msg  # noqa: F401

RPC_TIMEOUT = 10.0  # seconds a worker gets to answer (a stop drains nothing: it is quick)
WATCHDOG_EVERY = 1.0  # seconds between the control process's looks at its workers
WATCHDOG_TIMEOUT = 5.0  # seconds a worker gets to answer one before it counts as hung
PR_SET_PDEATHSIG = 1


class WorkerDied(Exception):
    """The worker of a queue pair exited or stopped answering; the text says how."""

    def __init__(self, pair: int, why: str) -> None:
        super().__init__(f"queue pair {pair}: its worker {why}")
        self.pair = pair


class WorkerError(Exception):
    """The worker refused a request; the text is its reason."""


class PairServer(Protocol):
    """What runs in a worker: a device's PairLoop, a driver's PairWorker."""

    def serve(self, sock: socket.socket) -> None: ...


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"was killed by {signal.Signals(sig).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


# -- the control process's end -------------------------------------------------------


class WorkerHandle:
    """A worker as the control process sees it: its pid, pidfd and request socket."""

    def __init__(self, pair: int, sock: socket.socket, pid: int) -> None:
        self.pair = pair
        self.sock = sock
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.last_stats: dict = {}  # what it said last: kept if it dies
        self.status: int | None = None

    def call(self, *request: object, fds: list[int] | tuple[int, ...] = (),
             timeout: float = RPC_TIMEOUT) -> object:  # fmt: skip
        """Send one request and wait for its answer; WorkerDied if none can come."""
        if self.status is not None:
            raise WorkerDied(self.pair, self.describe())
        try:
            send_msg(self.sock, request, fds)
        except OSError as e:
            raise WorkerDied(self.pair, f"cannot be reached ({e})") from None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                # A worker that stops answering is as good as dead: make it so, so that
                # no stale process holds the rings while a fresh one is started.
                self.kill()
                raise WorkerDied(self.pair, f"did not answer {request[0]!r} within "
                                 f"{timeout:g}s and was killed")  # fmt: skip
            waitables: list[socket.socket | int] = [self.sock, self.pidfd]
            ready, _, _ = select.select(waitables, [], [], left)
            if self.sock in ready:
                try:
                    answer, extra = recv_msg(self.sock)
                except (EOFError, OSError):
                    self.reap(block=True)
                    raise WorkerDied(self.pair, self.describe()) from None
                close_fds(extra)
                if not (isinstance(answer, tuple) and len(answer) == 2):
                    raise WorkerError(f"a malformed reply to {request[0]!r}: {answer!r}")
                kind, value = answer
                if kind == "error":
                    raise WorkerError(value)
                return value
            if self.pidfd in ready:
                self.reap(block=True)
                raise WorkerDied(self.pair, self.describe())

    def call_dict(self, *request: object, timeout: float = RPC_TIMEOUT) -> dict:
        """``call`` for a request answered by a dict (its stats); WorkerError if not."""
        value = self.call(*request, timeout=timeout)
        if not isinstance(value, dict):
            raise WorkerError(f"{request[0]!r}: a {type(value).__name__} answer, not a dict")
        return value

    def kill(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.reap(block=True)

    def reap(self, block: bool = False) -> bool:
        """Collect the exit status if it exited; True if it has."""
        if self.status is None:
            try:
                pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid == 0:
                return False
            self.status = status
        return True

    def describe(self) -> str:
        if self.status is None:
            return f"(pid {self.pid}) is running"
        return f"(pid {self.pid}) {describe_exit(self.status)}"

    def close(self) -> None:
        self.sock.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def spawn_worker(pair: int, make_loop: Callable[[], PairServer],
                 close_in_child: Callable[[], None]) -> WorkerHandle:  # fmt: skip
    """Fork the worker of queue pair ``pair``; ``close_in_child`` drops what only the
    control process may hold (the listening socket, the front-end's channel)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the worker
        code = 70
        try:
            parent.close()
            close_in_child()
            _become_worker(pair)
            make_loop().serve(child)
            code = 0
        except BaseException:  # noqa: BLE001 - a worker never returns into the caller
            traceback.print_exc()
        finally:
            os._exit(code)
    child.close()
    return WorkerHandle(pair, parent, pid)


def _become_worker(pair: int) -> None:
    """Die with the control process; ^C at a terminal is the control process's to handle."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for handler in logging.getLogger().handlers:
        fmt = (handler.formatter._fmt if handler.formatter else None) or "%(message)s"
        handler.setFormatter(logging.Formatter(fmt.replace(
            "%(message)s", f"queue pair {pair}: %(message)s")))  # fmt: skip
