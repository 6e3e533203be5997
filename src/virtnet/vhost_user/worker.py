"""One queue pair's data path in a process of its own, and the control process's watch on it.

The GIL lets one Python process use one core, so each queue pair runs in a
worker process, as vhost-net runs a kernel thread per virtqueue pair: N pairs
can use N cores. The control process keeps the vhost-user session and tells
each worker what it needs over a SOCK_SEQPACKET pair, fds by SCM_RIGHTS
(``workermsg``: typed requests, replies naming their request, events on a
socket of their own): the memory table's fds (each worker maps the guest
memory itself), and at a pair's start its ring addresses, bases and kick/call
eventfds. A device's worker owns its traffic back-end (a sink, a generator,
one queue of a multi-queue tap) for the server's life, so a generated stream
and its counters go on across ring restarts and sessions.

A worker is the only process that touches guest memory: a front-end that
shrinks a memory file it could not seal can kill that worker with SIGBUS,
which the control process notices (pidfd), names in the log, and answers
(the device fails the session and starts a fresh worker; the driver ends).

This module is the control process's side, the same for both ends: starting
a worker (``spawn_worker``), asking it (``WorkerHandle.call``), watching the
set (``WorkerSet``: deaths, events, the watchdog, the last counters of each)
and adding up their counters (``pair_totals``). What a device's worker runs
is ``device_loop.PairLoop``; a driver's, ``driver_loop.PairWorker`` around
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
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar, cast

from virtnet.net.mq import per_queue_stats, sum_stats
from virtnet.vhost_user.messages import close_fds
from virtnet.vhost_user.workermsg import (  # noqa: F401 - MAX_*: re-exported
    MAX_FDS,
    MAX_MSG,
    Call,
    Event,
    Reply,
    Request,
    Stats,
    StatsRequest,
    recv_msg,
    send_msg,
)

RPC_TIMEOUT = 10.0  # seconds a worker gets to answer (a stop drains nothing: it is quick)
WATCHDOG_EVERY = 1.0  # seconds between the control process's looks at its workers
WATCHDOG_TIMEOUT = 5.0  # seconds a worker gets to answer one before it counts as hung
PR_SET_PDEATHSIG = 1

log = logging.getLogger("virtnet.worker")

T = TypeVar("T")


class WorkerDied(Exception):
    """The worker of a queue pair exited or stopped answering; the text says how."""

    def __init__(self, pair: int, why: str) -> None:
        super().__init__(f"queue pair {pair}: its worker {why}")
        self.pair = pair


class WorkerError(Exception):
    """The worker refused a request; the text is its reason."""


class PairServer(Protocol):
    """What runs in a worker: a device's PairLoop, a driver's PairWorker. ``sock``
    carries calls and their replies, ``events`` the worker's own news."""

    def serve(self, sock: socket.socket, events: socket.socket) -> None: ...


class PairHandle(Protocol):
    """A queue pair as its supervisor sees it: in a worker (``WorkerHandle``) or in
    this process (``local.LocalHandle``)."""

    pair: int
    last_stats: Stats
    status: int | None  # None while it runs
    events_closed: bool

    @property
    def closed(self) -> bool: ...
    def call(self, request: Request[T], fds: list[int] | tuple[int, ...] = (),
             timeout: float = ...) -> T: ...  # fmt: skip
    def watch_fds(self) -> tuple[int, ...]: ...
    def read_events(self) -> list[str]: ...
    def kill(self) -> None: ...
    def reap(self, block: bool = False) -> bool: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


def check_reply(request: Request[T], seq: int, reply: object) -> T:
    """The value of ``reply`` to call ``seq``; WorkerError if it is the refusal, or
    the answer to another call, or of another type than the request's."""
    if not isinstance(reply, Reply) or reply.seq != seq:
        raise WorkerError(f"{request.name!r} (call {seq}) answered by {reply!r}")
    if reply.error is not None:
        raise WorkerError(reply.error)
    if not isinstance(reply.value, request.answers):
        raise WorkerError(f"{request.name!r}: a {type(reply.value).__name__} answer")
    return cast(T, reply.value)


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"was killed by {signal.Signals(sig).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


# -- the control process's end -------------------------------------------------------


class WorkerHandle:
    """A worker as the control process sees it: its pid, pidfd, call and event sockets."""

    def __init__(self, pair: int, sock: socket.socket, events: socket.socket,
                 pid: int) -> None:  # fmt: skip
        self.pair = pair
        self.sock = sock
        self.events = events
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.last_stats: Stats = {}  # what it said last: kept if it dies
        self.status: int | None = None
        self.events_closed = False
        self._seq = 0

    def call(self, request: Request[T], fds: list[int] | tuple[int, ...] = (),
             timeout: float = RPC_TIMEOUT) -> T:  # fmt: skip
        """Send one request and wait for its reply; WorkerDied if none can come,
        WorkerError if the worker refused it or answered out of turn."""
        if self.status is not None:
            raise WorkerDied(self.pair, self.describe())
        self._seq += 1
        seq = self._seq
        try:
            send_msg(self.sock, Call(seq, request), fds)
        except OSError as e:
            raise WorkerDied(self.pair, f"cannot be reached ({e})") from None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                # A worker that stops answering is as good as dead: make it so, so that
                # no stale process holds the rings while a fresh one is started.
                self.kill()
                raise WorkerDied(self.pair, f"did not answer {request.name!r} within "
                                 f"{timeout:g}s and was killed")  # fmt: skip
            waitables: list[socket.socket | int] = [self.sock, self.pidfd]
            ready, _, _ = select.select(waitables, [], [], left)
            if self.sock in ready:
                try:
                    reply, extra = recv_msg(self.sock)
                except (EOFError, OSError):
                    self.reap(block=True)
                    raise WorkerDied(self.pair, self.describe()) from None
                close_fds(extra)
                if isinstance(reply, Reply) and 0 <= reply.seq < seq:
                    # The answer to a call that gave up: not this one's.
                    log.warning("queue pair %d: a late reply to call %d dropped",
                                self.pair, reply.seq)  # fmt: skip
                    continue
                return check_reply(request, seq, reply)
            if self.pidfd in ready:
                self.reap(block=True)
                raise WorkerDied(self.pair, self.describe())

    @property
    def closed(self) -> bool:
        return self.pidfd < 0

    def watch_fds(self) -> tuple[int, ...]:
        """What the supervisor's epoll watches: its exit, its events."""
        return (self.pidfd, self.events.fileno())

    def read_events(self) -> list[str]:
        """What the worker said on its own (its pair broke: why); ``events_closed``
        once it closed its end (it is exiting: its pidfd says how)."""
        out: list[str] = []
        while True:
            try:
                event, fds = recv_msg(self.events)
            except BlockingIOError:
                return out
            except (EOFError, OSError):
                self.events_closed = True
                return out
            close_fds(fds)
            out.append(event.why if isinstance(event, Event) else f"a malformed event {event!r}")

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
        self.events.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def spawn_worker(pair: int, make_loop: Callable[[], PairServer],
                 close_in_child: Callable[[], None]) -> WorkerHandle:  # fmt: skip
    """Fork the worker of queue pair ``pair``; ``close_in_child`` drops what only the
    control process may hold (the listening socket, the front-end's channel)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    events_in, events_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the worker
        code = 70
        try:
            parent.close()
            events_in.close()
            close_in_child()
            _become_worker(pair)
            make_loop().serve(child, events_out)
            code = 0
        except BaseException:  # noqa: BLE001 - a worker never returns into the caller
            traceback.print_exc()
        finally:
            os._exit(code)
    child.close()
    events_out.close()
    events_in.setblocking(False)  # read when epoll says so, until nothing is left
    return WorkerHandle(pair, parent, events_in, pid)


def _become_worker(pair: int) -> None:
    """Die with the control process; a stop is the control process's to make.

    ^C at a terminal and SIGTERM to the process group (systemd's KillMode=
    control-group, ``timeout``, ``kill -- -PGID``) reach every worker too: a
    worker that died of them would look like a crash, and take its counters
    along. So workers ignore both; the control process stops them in order and
    collects what they counted (and PR_SET_PDEATHSIG ends them if it dies).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for handler in logging.getLogger().handlers:
        fmt = (handler.formatter._fmt if handler.formatter else None) or "%(message)s"
        handler.setFormatter(logging.Formatter(fmt.replace(
            "%(message)s", f"queue pair {pair}: %(message)s")))  # fmt: skip


# -- supervision: the same for the device's workers and the driver's ----------------


class WorkerSet:
    """The control process's workers, one per queue pair, watched as vhost-net's owner
    watches its worker threads: both ends' loops hand it their ready fds (``owns``,
    ``on_ready``) and call ``watchdog`` every pass.

    - a worker's exit (its pidfd) and a worker that stops answering (the watchdog's
      stats call, every WATCHDOG_EVERY) go to ``on_death`` as WorkerDied, once, after
      the worker was killed if need be, reaped and counted in ``deaths``;
    - a worker's event (its event socket) goes to ``on_event(pair, why)``;
    - every answer keeps the worker's ``last_stats`` fresh, so that what a worker
      counted survives it: a replaced worker's go to ``lost``.
    """

    in_process = False  # local.LocalSet: the pairs run in this process

    def __init__(self, ep: select.epoll, log: logging.Logger,
                 on_death: Callable[[WorkerDied], None],
                 on_event: Callable[[int, str], None]) -> None:  # fmt: skip
        self.ep = ep
        self.log = log
        self.on_death = on_death
        self.on_event = on_event
        self.workers: list[PairHandle] = []  # by pair
        self.lost: list[Stats] = []  # the last counters of workers replaced
        self.deaths = 0
        self._fds: dict[int, PairHandle] = {}  # pidfd, event socket → its worker
        self.next_check = time.monotonic() + WATCHDOG_EVERY

    def __iter__(self) -> Iterator[PairHandle]:
        return iter(list(self.workers))

    def __len__(self) -> int:
        return len(self.workers)

    def __getitem__(self, pair: int) -> PairHandle:
        return self.workers[pair]

    def _spawn(self, pair: int, make_loop: Callable[[], PairServer],
               close_in_child: Callable[[], None]) -> PairHandle:  # fmt: skip
        return spawn_worker(pair, make_loop, close_in_child)

    def run_passes(self) -> bool:
        """The pairs' ring work in this process: none here, the workers do their own."""
        return False

    def poll_timeout(self, most: float) -> float:
        """How long the supervisor's epoll may wait: ``most``, as far as workers go."""
        return most

    def start(self, pair: int, make_loop: Callable[[], PairServer],
              close_in_child: Callable[[], None]) -> PairHandle:  # fmt: skip
        """Fork pair ``pair``'s worker; one that died in its place is replaced."""
        w = self._spawn(pair, make_loop, close_in_child)
        for fd in w.watch_fds():
            self.ep.register(fd, select.EPOLLIN)
            self._fds[fd] = w
        if pair < len(self.workers):
            old = self.workers[pair]
            self.lost.append(old.last_stats)
            self._forget(old)
            self.workers[pair] = w
        else:
            self.workers.append(w)
        return w

    def close_all(self) -> None:
        """In a freshly forked worker: the other workers' ends are not its own."""
        for w in self.workers:
            w.close()

    def owns(self, fd: int) -> bool:
        return fd in self._fds

    def on_ready(self, fd: int) -> None:
        w = self._fds.get(fd)
        if w is None:
            return
        if fd == w.watch_fds()[0]:  # its pidfd: it exited
            if w.reap():
                self.died(WorkerDied(w.pair, w.describe()))
            return
        for why in w.read_events():
            self.on_event(w.pair, why)
        if w.events_closed:  # readable for good now: stop watching it
            self._unwatch(fd)

    def died(self, e: WorkerDied) -> None:
        """A worker is dead or as good as dead: kill it if need be, reap it, name it."""
        w = self.workers[e.pair]
        if w.closed:
            return  # told already
        w.kill()
        self.deaths += 1
        self.log.error("%s", e)
        self._forget(w)
        self.on_death(e)

    def _forget(self, w: PairHandle) -> None:
        for fd in w.watch_fds():
            self._unwatch(fd)
        w.close()

    def _unwatch(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass  # closed already (a driver's run is over)

    def watchdog(self) -> None:
        """Every worker must answer, every WATCHDOG_EVERY: one that hangs (stopped,
        stuck in a loop) would stall its pair silently, so it counts as dead."""
        if time.monotonic() < self.next_check:
            return
        for w in self:
            if not w.closed:
                self.ask(w, StatsRequest(), WATCHDOG_TIMEOUT, on_death=self.died)
        self.next_check = time.monotonic() + WATCHDOG_EVERY

    def ask(self, w: PairHandle, request: Request[Any], timeout: float = RPC_TIMEOUT,
            on_death: Callable[[WorkerDied], None] | None = None) -> bool:  # fmt: skip
        """``request`` to ``w``, its counters kept if it answers with some; False if it
        is dead (``on_death`` told; by default only the log)."""
        try:
            value = w.call(request, timeout=timeout)
        except WorkerDied as e:
            (on_death or self._log_death)(e)
            return False
        if isinstance(value, dict):
            w.last_stats = value
        return True

    def _log_death(self, e: WorkerDied) -> None:
        self.log.error("%s", e)

    def stats(self) -> list[Stats]:
        """Each pair's counters, fresh where its worker answers, else the last it gave
        (a death is the loop's to name)."""
        for w in self:
            if w.status is None:
                self.ask(w, StatsRequest(), on_death=lambda e: None)
        return [w.last_stats for w in self.workers]

    def each(self, request: Request[Any], timeout: float = RPC_TIMEOUT) -> None:
        """``request`` to every worker still alive, in pair order; deaths are logged."""
        for w in self:
            if not w.reap():
                self.ask(w, request, timeout)

    def finish(self, request: Request[Stats], timeout: float = RPC_TIMEOUT) -> list[Stats]:
        """The last ``request`` (it ends the worker and answers its counters), to every
        worker: each reaped and closed; every pair's last counters."""
        final = []
        for w in self:
            if not w.reap() and self.ask(w, request, timeout):
                w.reap(block=True)
            final.append(w.last_stats)
            self._forget(w)
        self.workers = []
        return final


def pair_totals(per_pair: list[Stats], key: str, *, lost: list[Stats] | None = None,
                per_queue: bool = True, workers: bool = True) -> dict[str, Any]:  # fmt: skip
    """Every queue pair's counters (``key``: "device_stats" / "driver_stats"), summed
    with those of dead workers (``lost``), and per queue under ethtool -S names
    (``rx_queue_0_packets``...); the back-ends' summed; with ``workers`` (the pairs ran
    in processes of their own) their CPU seconds, summed and each."""
    gone = lost or []
    mine = [cast(dict, p.get(key, {})) for p in per_pair]
    totals = sum_stats(mine + [cast(dict, p.get(key, {})) for p in gone])
    if per_queue:
        for pair, d in enumerate(mine):
            totals |= per_queue_stats(pair, d)
    cpu = [cast(float, p.get("cpu_seconds", 0.0)) for p in per_pair]
    return {key: totals,
            "backend": sum_stats([cast(dict, p.get("backend", {})) for p in per_pair + gone]),
            # the workers' CPU (the caller adds its own), and each pair's worker alone
            "cpu_seconds": sum(cpu) + sum(cast(float, p.get("cpu_seconds", 0.0)) for p in gone)
            if workers else 0.0,
            "worker_cpu_seconds": [round(c, 4) for c in cpu] if workers else []}  # fmt: skip
