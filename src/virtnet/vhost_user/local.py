"""Queue pairs run in the control process itself: the in-process ``PairRunner``.

``WorkerSet`` forks a worker per queue pair; ``LocalSet`` keeps each pair's loop
(the device's ``PairLoop``, the driver's ``PairWorker``) here instead, behind the
same supervisor, so a session and its server do not know where their pairs run:

- a request goes to the loop's ``Dispatcher`` by direct call, with copies of its
  fds (SCM_RIGHTS would have made them), and its reply is checked as a worker's;
- the loop watches its kicks (interrupts) and its back-end's fd in the control
  process's epoll (``attach``), and the control loop runs every pair's ring work
  between its own polls (``run_passes``), as one worker's loop does;
- an exception a loop raises, which would end a worker, ends its pair here: named
  (with the traceback in the log), reported as the worker's death would be.

One process serves every pair: one core for all of them. It is what a profiler
or a debugger wants (one process, the whole data path), and what a one-pair
front-end needs no more than. A hang cannot be told from a busy loop here: the
watchdog that kills a hung worker has no one to kill.
"""

from __future__ import annotations

import logging
import os
import select
import traceback
from collections.abc import Callable
from functools import partial
from typing import Protocol, TypeVar, cast

from virtnet.vhost_user.worker import (
    RPC_TIMEOUT,
    PairHandle,
    PairServer,
    WorkerDied,
    WorkerSet,
    check_reply,
)
from virtnet.vhost_user.workermsg import Call, Dispatcher, Request, Stats

T = TypeVar("T")


class LocalLoop(PairServer, Protocol):
    """What a pair's loop offers to run in process (``PairLoop``, ``PairWorker``)."""

    running: bool  # False once its last request (Exit, Finish) was served

    def dispatcher(self) -> Dispatcher: ...
    def attach(self, ep: select.epoll) -> None: ...
    def watches(self, fd: int) -> bool: ...
    def on_fd(self, fd: int) -> None: ...
    def run_pass(self) -> bool: ...
    def poll_timeout(self, busy: bool) -> float: ...
    def close(self) -> None: ...


class LocalHandle:
    """A queue pair whose loop runs in this process, as its supervisor sees it."""

    def __init__(self, pair: int, loop: LocalLoop, log: logging.Logger) -> None:
        self.pair = pair
        self.loop = loop
        self.rpc = loop.dispatcher()
        self.log = log
        self.last_stats: Stats = {}
        self.status: int | None = None  # None while it runs; 0: ended, 1: raised
        self.events_closed = False
        self._closed = False
        self._why = ""  # what it raised
        self._seq = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def call(self, request: Request[T], fds: list[int] | tuple[int, ...] = (),
             timeout: float = RPC_TIMEOUT) -> T:  # fmt: skip
        """Dispatch one request to the loop; as ``WorkerHandle.call``, WorkerDied if it
        has ended (or ends now, raising), WorkerError if it refused."""
        if self.status is not None:
            raise WorkerDied(self.pair, self.describe())
        self._seq += 1
        mine = [os.dup(fd) for fd in fds]  # the handler owns its fds, as a worker's does
        try:
            reply = self.rpc.answer(Call(self._seq, request), mine)
        except Exception as e:  # noqa: BLE001 - what would end a worker ends the pair
            self.fail(e)
            raise WorkerDied(self.pair, self.describe()) from None
        if not self.loop.running:
            self.status = 0  # it served its last request
        return check_reply(request, self._seq, reply)

    def guarded(self, step: Callable[[], bool]) -> bool:
        """Run one step of the loop's own (a pass, a ready fd); WorkerDied if it raised."""
        try:
            return step()
        except Exception as e:  # noqa: BLE001 - as call()
            self.fail(e)
            raise WorkerDied(self.pair, self.describe()) from None

    def fail(self, e: BaseException) -> None:
        self.log.error("queue pair %d: %s", self.pair,
                       "".join(traceback.format_exception(e)).rstrip())  # fmt: skip
        self._why = f"raised {type(e).__name__}: {e}"
        self.status = 1

    def watch_fds(self) -> tuple[int, ...]:
        return ()  # the loop's own fds are in the control epoll already (attach)

    def read_events(self) -> list[str]:
        out, self.rpc.pending = self.rpc.pending, []
        return out

    def kill(self) -> None:
        if self.status is None:
            self.status = 1
            self._why = "was stopped"

    def reap(self, block: bool = False) -> bool:
        return self.status is not None

    def describe(self) -> str:
        if self.status is None:
            return "(in-process) is running"
        return f"(in-process) {self._why or 'has ended'}"

    def close(self) -> None:
        """The loop's end: its device stopped, its capture and back-end closed."""
        if self._closed:
            return
        self._closed = True
        try:
            self.loop.close()
        except Exception as e:  # noqa: BLE001 - a loop that failed may fail again here
            self.log.error("queue pair %d: closing its loop: %s", self.pair, e)


def _on_fd(loop: LocalLoop, fd: int) -> bool:
    loop.on_fd(fd)
    return False


class LocalSet(WorkerSet):
    """``WorkerSet``'s supervision for pairs that run in this process."""

    in_process = True

    def _spawn(self, pair: int, make_loop: Callable[[], PairServer],
               close_in_child: Callable[[], None]) -> PairHandle:  # fmt: skip
        loop = cast(LocalLoop, make_loop())  # both ends' loops are (tests/vhost_user)
        loop.attach(self.ep)
        return LocalHandle(pair, loop, self.log)

    def _local(self) -> list[LocalHandle]:
        return [w for w in self.workers if isinstance(w, LocalHandle) and w.status is None]

    def owns(self, fd: int) -> bool:
        return any(w.loop.watches(fd) for w in self._local())

    def on_ready(self, fd: int) -> None:
        for w in self._local():
            if w.loop.watches(fd):
                self._guard(w, partial(_on_fd, w.loop, fd))
                return

    def run_passes(self) -> bool:
        """One pass of every running pair's loop; True if any may have more at once."""
        busy = False
        for w in self._local():
            busy |= self._guard(w, w.loop.run_pass)
            for why in w.read_events():
                self.on_event(w.pair, why)
        return busy

    def poll_timeout(self, most: float) -> float:
        return min([most, *(w.loop.poll_timeout(False) for w in self._local())])

    def _guard(self, w: LocalHandle, step: Callable[[], bool]) -> bool:
        try:
            return w.guarded(step)
        except WorkerDied as e:
            self.died(e)
            return False
