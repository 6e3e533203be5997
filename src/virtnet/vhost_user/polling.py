"""How both pair loops (the device's and the driver's) wait: eventfds, epoll's cadence,
busy polling. One copy, compiled with them (``_build.DATA_PLANE``)."""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable

EPOLL_EVERY = 4  # passes between looks at epoll while the rings keep a loop busy
IDLE_POLL = 0.2  # seconds epoll waits with nothing due

log = logging.getLogger("virtnet.device")


def look_at_epoll(busy: bool, passes: int) -> bool:
    """While busy, ask epoll only every few passes: a kick or an interrupt needs no
    syscall to be seen (the avail / used index says it), and a level-triggered fd
    is still reported on the next look."""
    return not busy or passes % EPOLL_EVERY == 0


def signal_call(fd: int) -> None:
    """An interrupt: write the call eventfd (-1: the front-end gave none)."""
    if fd >= 0:
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:
            log.warning("call eventfd %d: %s", fd, e)


def drain_eventfd(fd: int) -> None:
    """Reset a notification eventfd that epoll reported (nonblocking: maybe read already)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def busy_poll(ep: select.epoll, seconds: float, ready: Callable[[], bool]) -> bool:
    """Spin up to ``seconds`` until ``ready()`` (the rings have work) or a watched fd is
    (vhost-net's busyloop_timeout, Linux's napi busy poll): True if either came."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if ready() or ep.poll(0):
            return True  # level-triggered: the main poll sees the event again
    return False
