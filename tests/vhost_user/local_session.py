"""A ``BackendSession`` whose queue pairs run in this process, for tests that drive the
device by hand.

The session gets what production gives it (``DevicePairs`` over a supervisor), with
the in-process one (``LocalSet``): each pair's ``PairLoop`` is real and takes the
session's requests as a worker would, copies of the fds included; only its passes are
not run, so a test calls the device itself (``device``) and sees each step.
"""

from __future__ import annotations

import logging
import select
from functools import partial

from virtnet.net.device import VirtnetDevice
from virtnet.net.header import MRG_HDR_LEN
from virtnet.ports.backends import DeviceBackend
from virtnet.vhost_user.backend import BackendSession, DevicePairs
from virtnet.vhost_user.device_loop import PairLoop, PairLoops
from virtnet.vhost_user.local import LocalHandle, LocalSet
from virtnet.vhost_user.logmap import MappedLog
from virtnet.vhost_user.worker import WorkerDied
from virtnet.vhost_user.workermsg import Exit

log = logging.getLogger("virtnet.device")


class RecordingDevice(DeviceBackend):
    """A port that keeps every frame sent out of it (SEND_RARP's among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[bytes] = []

    def xmit(self, views: list[memoryview], frame_len: int) -> bool:
        self.frames.append(b"".join(bytes(v) for v in views)[MRG_HDR_LEN:])
        return True


class LocalSession(BackendSession):
    """What the tests look at: pair 0's device, the frames its port sent."""

    workers: LocalSet
    ports: list[RecordingDevice]
    deaths: list[WorkerDied]

    def loop(self, pair: int = 0) -> PairLoop:
        w = self.workers[pair]
        assert isinstance(w, LocalHandle)
        loop = w.loop
        assert isinstance(loop, PairLoop)
        return loop

    @property
    def device(self) -> VirtnetDevice | None:
        """Queue pair 0's device while its rings run (None after close, too)."""
        return self.loop(0).dev if len(self.workers) else None

    @property
    def log(self) -> MappedLog | None:
        """The dirty log pair 0 mapped (SET_LOG_BASE), if any."""
        return self.loop(0).log

    @property
    def rarps(self) -> list[bytes]:
        return self.ports[0].frames

    def sync_log(self) -> None:
        """What each device cached of the dirty log, written (a worker's every pass)."""
        for pair in range(len(self.workers)):
            self.loop(pair).flush_log()

    def close(self) -> None:
        """The session's close, then each pair's last request, as a server's stop.
        (The epoll goes with the object: a test counting fds made it before.)"""
        super().close()
        self.workers.finish(Exit())


def local_session(queues: int = 1, **kw: object) -> LocalSession:
    """A session of ``queues`` pairs, each pair's loop in this process."""
    ports = [RecordingDevice() for _ in range(queues)]
    loops = PairLoops(list(ports))
    deaths: list[WorkerDied] = []
    workers = LocalSet(select.epoll(), log, deaths.append, lambda pair, why: None)
    for pair in range(queues):
        workers.start(pair, partial(loops, pair), lambda: None)
    s = LocalSession(DevicePairs(workers), queues=queues, **kw)  # type: ignore[arg-type]
    s.workers, s.ports, s.deaths = workers, ports, deaths
    return s
