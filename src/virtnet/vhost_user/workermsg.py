"""The messages between the control process and a queue pair's worker.

Both ends are this program, so a message is a small dataclass, pickled into
one SOCK_SEQPACKET datagram, fds by SCM_RIGHTS:

- the control process sends a ``Call``: a sequence number and one
  ``Request`` (its class is the request's code);
- the worker answers each with a ``Reply`` naming that sequence number: a
  value, or the reason it refused (an unknown request is refused by name);
- an ``Event`` (the pair broke: why) is the worker's own, and travels on a
  socket of its own, so no reply can be taken for one and none is lost.

``Dispatcher`` is the worker's end, shared by the device's ``PairLoop`` and the
driver's ``PairWorker``: a table from request class to handler, filled at start.
Its own module so that the per-pair loops (``device_loop``, ``driver_loop``)
and the supervision of their processes (``worker``) share it without
importing each other.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from virtnet.vhost_user.messages import VringAddr, close_fds
from virtnet.vhost_user.rings import RingSpec

MAX_MSG = 1 << 16
MAX_FDS = 16  # a memory table's regions (VHOST_MEMORY_BASELINE_NREGIONS is 8)

T = TypeVar("T")
R = TypeVar("R", bound="Request[Any]")

Stats = dict[str, object]  # a pair's counters: {"device_stats" | "driver_stats", "backend", ...}


# -- the requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class Request(Generic[T]):
    """One request; ``T`` is what its reply carries (checked against ``answers``)."""

    name: ClassVar[str]  # in the log: "did not answer 'stats' within 5s"
    answers: ClassVar[tuple[type, ...]] = (type(None),)
    takes_fds: ClassVar[bool] = False  # fds sent with any other request are closed


# Both ends' workers.


@dataclass(frozen=True)
class StatsRequest(Request[Stats]):
    """The pair's counters (the watchdog's question: a worker that answers is alive)."""

    name = "stats"
    answers = (dict,)


@dataclass(frozen=True)
class Stop(Request["tuple[int, int] | None"]):
    """Stop serving the rings. A device answers where each ring stopped
    (GET_VRING_BASE), or None if it ran none; a driver None (it drains next)."""

    name = "stop"
    answers = (tuple, type(None))


# A device's worker (device_loop.PairLoop).


@dataclass(frozen=True)
class Connect(Request[None]):
    """A front-end connected: what was held for the last one means nothing now."""

    name = "connect"


@dataclass(frozen=True)
class Features(Request[None]):
    name = "features"
    features: int


@dataclass(frozen=True)
class Memory(Request[None]):
    """SET_MEM_TABLE: map (gpa, size, uva, mmap_offset) of each fd sent with it."""

    name = "memory"
    takes_fds = True
    regions: tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True)
class Unmap(Request[None]):
    name = "unmap"


@dataclass(frozen=True)
class Start(Request[None]):
    """Run the pair's rings; the fds sent are the kick/call eventfds ``spec.fd_mask`` names."""

    name = "start"
    takes_fds = True
    spec: RingSpec


@dataclass(frozen=True)
class Fds(Request[None]):
    """New kick/call eventfds for a running pair (QEMU re-sends calls at run time)."""

    name = "fds"
    takes_fds = True
    mask: tuple[bool, bool, bool, bool]


@dataclass(frozen=True)
class AddRegion(Request[None]):
    """ADD_MEM_REG: map one more region (gpa, size, uva, mmap_offset) of the fd sent."""

    name = "add_region"
    takes_fds = True
    region: tuple[int, int, int, int]


@dataclass(frozen=True)
class RemRegion(Request[None]):
    """REM_MEM_REG: unmap the region (gpa, size, uva)."""

    name = "rem_region"
    region: tuple[int, int, int]


@dataclass(frozen=True)
class Log(Request[None]):
    """SET_LOG_BASE: map the dirty log (``size`` bytes at ``offset`` of the fd sent)."""

    name = "log"
    takes_fds = True
    size: int
    offset: int


@dataclass(frozen=True)
class Inflight(Request[None]):
    """SET_INFLIGHT_FD: map the in-flight region (``size`` bytes at ``offset`` of the fd
    sent, ``num_queues`` regions for queues of ``queue_size``, each the packed or the
    split layout); no fd: unmap it."""

    name = "inflight"
    takes_fds = True
    size: int
    offset: int
    num_queues: int
    queue_size: int
    packed: bool


@dataclass(frozen=True)
class VringAddrUpdate(Request[None]):
    """SET_VRING_ADDR of a running ring ``q`` (0 rx, 1 tx): its log flag and address."""

    name = "vring_addr"
    q: int
    addr: VringAddr


@dataclass(frozen=True)
class Rarp(Request[bool]):
    """SEND_RARP: send ``frame`` out of the pair's port; False if the port pushed back."""

    name = "rarp"
    answers = (bool,)
    frame: bytes


@dataclass(frozen=True)
class Exit(Request[Stats]):
    """Unmap, end the worker; its last counters."""

    name = "exit"
    answers = (dict,)


# A driver's worker (driver_loop.PairWorker).


@dataclass(frozen=True)
class Drain(Request[None]):
    """Wait (bounded) until the device used every tx buffer sent."""

    name = "drain"


@dataclass(frozen=True)
class Finish(Request[Stats]):
    """The rings are stopped: take what the device finished, free every page, end."""

    name = "finish"
    answers = (dict,)


# -- the envelopes --------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    seq: int
    request: Request[Any]


@dataclass(frozen=True)
class Reply:
    seq: int  # the Call's; -1: a message that was no Call
    value: object = None
    error: str | None = None  # the worker refused: why


@dataclass(frozen=True)
class Event:
    """The worker's own news (a driver's pair broke): on the event socket only."""

    why: str


def send_msg(sock: socket.socket, obj: object, fds: list[int] | tuple[int, ...] = ()) -> None:
    socket.send_fds(sock, [pickle.dumps(obj)], list(fds))


def recv_msg(sock: socket.socket) -> tuple[object, list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MSG, MAX_FDS)
    if not data:
        close_fds(fds)
        raise EOFError("the other end closed")
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        raise EOFError("a truncated message")
    return pickle.loads(data), fds


# -- the worker's end -----------------------------------------------------------------

Handler = Callable[[Any, list[int]], object]


class Dispatcher:
    """Serve the control process's calls with the handlers registered by ``on``.

    A handler takes its request and the fds that came with it, and owns those
    fds: it keeps or closes each, whether it succeeds or raises. One of the
    ``refusals`` exceptions becomes an error reply (the control process names
    it); anything else is a bug and ends the worker, which the control process
    then sees die.
    """

    def __init__(self, sock: socket.socket | None, events: socket.socket | None,
                 refusals: tuple[type[Exception], ...] = ()) -> None:  # fmt: skip
        self.sock = sock  # None: in-process, called through answer() (local.LocalSet)
        self.events = events
        self.refusals = refusals
        self.pending: list[str] = []  # in-process: the events not yet taken
        self._handlers: dict[type[Request[Any]], Handler] = {}

    def on(self, kind: type[R], handler: Callable[[R, list[int]], object]) -> None:
        self._handlers[kind] = handler

    def serve_one(self) -> bool:
        """Answer one call; False once the control process is gone."""
        assert self.sock is not None  # a worker's: it has its socket
        try:
            call, fds = recv_msg(self.sock)
        except (EOFError, OSError):
            return False
        send_msg(self.sock, self.answer(call, fds))
        return True

    def answer(self, call: object, fds: list[int]) -> Reply:
        """The reply to one call, whose ``fds`` the handler then owns."""
        if not isinstance(call, Call) or not isinstance(call.request, Request):
            close_fds(fds)
            return Reply(-1, error=f"a malformed call {call!r}")
        request = call.request
        handler = self._handlers.get(type(request))
        if handler is None:
            close_fds(fds)
            return Reply(call.seq, error=f"unknown request {type(request).__name__} "
                         f"({request.name!r}) for this worker")  # fmt: skip
        if not request.takes_fds:
            close_fds(fds)
            fds = []
        try:
            return Reply(call.seq, handler(request, fds))
        except self.refusals as e:
            return Reply(call.seq, error=str(e))

    def event(self, why: str) -> None:
        """Tell the control process, unasked (the pair broke)."""
        if self.events is None:
            self.pending.append(why)
            return
        try:
            send_msg(self.events, Event(why))
        except OSError:
            pass  # the control process is gone: nobody left to tell
