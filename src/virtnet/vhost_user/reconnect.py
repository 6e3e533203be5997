"""``virtnet driver --reconnect``: the way back to a back-end that went away, as QEMU's
``-chardev socket,reconnect=N`` (client) and ``server=on`` (listening again).

Only the socket: one connect() per due try (client), or a listener that epoll watches
once a try is due (server), with ``Backoff``'s waits between tries; nothing here
blocks longer than one poll interval, so the run's clock and SIGTERM still end a run
whose back-end never comes back. The session on the new socket is the front-end's
(``DriverClient._start_session``).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
from typing import final

from virtnet.vhost_user.backoff import Backoff, dial
from virtnet.vhost_user.polling import IDLE_POLL

log = logging.getLogger("virtnet.driver")


def bind_listener(path: str) -> socket.socket:
    """A unix socket listening on ``path`` for one back-end (an earlier run's socket
    file, left by a kill, is replaced)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
        listener.bind(path)
        listener.listen(1)
    except OSError:
        listener.close()
        raise
    return listener


def unlink_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@final
class Reconnector:
    """Tries to reach the back-end at ``path`` again: ``due()`` / ``try_now()`` in the
    run loop, ``owns(fd)`` / ``accept()`` for the listener epoll reports (server)."""

    def __init__(self, path: str, ep: select.epoll, *, server: bool) -> None:
        self.path = path
        self.ep = ep
        self.server = server
        self.backoff = Backoff()
        self.listener: socket.socket | None = None
        self._watched = False  # the listener is in epoll (server, a try due)
        self._why = ""  # why a connect() failed, logged once per outage

    def lost(self) -> None:
        """The back-end went away: the first try after the first wait; a server listens
        from now on, so that a restarted back-end finds the socket."""
        self.backoff.later()
        self._why = ""
        if self.server and self.listener is None:
            self.listener = bind_listener(self.path)
            self.listener.setblocking(False)
            log.info("listening on %s for the back-end", self.path)

    def failed(self) -> float:
        """A new connection failed its session: the next try after a doubled wait."""
        self._unwatch()
        return self.backoff.later()

    def succeeded(self) -> None:
        """Connected and set up again: stop listening (one session), waits afresh."""
        self.backoff.reset()
        self.close()

    def wait(self, most: float) -> float:
        """How long the run loop's epoll may sleep: until the next try is due, except
        while epoll itself watches the listener."""
        return most if self._watched else self.backoff.wait(most)

    def due(self) -> bool:
        return not self._watched and self.backoff.due()

    def try_now(self) -> socket.socket | None:
        """A due try: a connected socket (client), or None (refused, not there; or a
        server now watching its listener, whose connection ``accept()`` takes)."""
        if self.server:
            if self.listener is not None and not self._watched:
                self.ep.register(self.listener.fileno(), select.EPOLLIN)
                self._watched = True
            return None
        sock, self._why = dial(self.path, IDLE_POLL, self.backoff, "back-end", self._why, log)
        return sock

    def owns(self, fd: int) -> bool:
        return self._watched and self.listener is not None and fd == self.listener.fileno()

    def accept(self) -> socket.socket | None:
        """The listener is readable: the back-end that connected (None: it went already)."""
        assert self.listener is not None  # owns() said so
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        self._unwatch()
        sock.setblocking(True)
        return sock

    def _unwatch(self) -> None:
        if self._watched and self.listener is not None:
            self.ep.unregister(self.listener.fileno())
        self._watched = False

    def close(self) -> None:
        self._unwatch()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            unlink_socket(self.path)
