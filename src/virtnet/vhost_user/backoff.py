"""The waits between tries to reach a vhost-user peer that is not there: the device's
``--client`` (its front-end away) and the driver's ``--reconnect`` (its back-end away).

One copy for both: the first wait, doubling to the cap, never a busy loop; a try
that succeeded starts the waits afresh. The loops ask ``due()`` and bound their
epoll wait by ``wait()``, so a run's clock and SIGTERM still end them.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import final

RECONNECT_FIRST = 0.1  # seconds
RECONNECT_MAX = 2.0


@final
class Backoff:
    def __init__(self, first: float = RECONNECT_FIRST, cap: float = RECONNECT_MAX) -> None:
        self.first = first
        self.cap = cap
        self.next_wait = first  # the wait after the next failure
        self.at = 0.0  # monotonic time of the next try

    def later(self) -> float:
        """A try failed (or the peer went away): the next one after a doubled wait."""
        wait = self.next_wait
        self.at = time.monotonic() + wait
        self.next_wait = min(2 * wait, self.cap)
        return wait

    def reset(self) -> None:
        """A try succeeded: the next outage starts at the first wait."""
        self.next_wait = self.first

    def due(self) -> bool:
        return time.monotonic() >= self.at

    def wait(self, most: float) -> float:
        """How long an epoll may sleep (at most ``most``) before the next try is due."""
        return max(0.0, min(most, self.at - time.monotonic()))


def dial(path: str, timeout: float, backoff: Backoff, peer: str, last_why: str,
         log: logging.Logger) -> tuple[socket.socket | None, str]:  # fmt: skip
    """One connect() to the ``peer`` ("front-end", "back-end") listening on ``path``:
    (the socket, "") or (None, why), with the failure logged once per outage (when
    ``why`` differs from ``last_why``) and the next try put after a doubled wait."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)  # a listener whose backlog is full holds connect()
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        why = e.strerror or str(e)
        if why != last_why:
            log.warning("no %s listening on %s (%s): retrying every %g s at most",
                        peer, path, why, backoff.cap)  # fmt: skip
        backoff.later()
        return None, why
    sock.settimeout(None)
    return sock, ""
