"""The vhost-user socket: one sendmsg per message (fds attached), recvmsg with
room for the most fds a message may carry. The only place that touches the
unix socket; parsing and encoding are ``messages``' (sans-I/O).
"""

from __future__ import annotations

import array
import socket

from virtnet.vhost_user.errors import VhostUserProtocolError
from virtnet.vhost_user.messages import (
    VHOST_MEMORY_BASELINE_NREGIONS,
    FrontendRequest,
    Message,
    MessageParser,
    close_fds,
    encode,
    spec_name,
)

RECV_SIZE = 65536
_FD_SPACE = socket.CMSG_SPACE(VHOST_MEMORY_BASELINE_NREGIONS * array.array("i").itemsize)


class PeerClosed(ConnectionError):
    """The other side closed the socket (between messages)."""


class Channel:
    """A connected vhost-user socket with its parser.

    ``replies`` is True on the front-end (it reads the back-end's replies).
    """

    def __init__(self, sock: socket.socket, *, replies: bool) -> None:
        self.sock = sock
        self.parser = MessageParser(FrontendRequest, replies=replies)
        # A refused message found after good ones in the same read: raised by the
        # next drain(), so the good ones are served first and nothing is skipped.
        self._refused: VhostUserProtocolError | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Message) -> None:
        data = encode(message)
        ancillary = []
        if message.fds:
            fds = array.array("i", message.fds)
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
        sent = self.sock.sendmsg([data], ancillary)
        if sent != len(data):  # a unix stream socket sends a small message whole
            self.sock.sendall(data[sent:])

    def receive(self) -> list[Message]:
        """Read what is there (blocking for the first bytes) and return whole messages.

        Raises PeerClosed on EOF, VhostUserProtocolError for a message the
        parser refuses (``framing_intact`` says whether to go on).
        """
        pending = self.drain()
        if pending:
            return pending  # already read: never block on the socket for them
        data, fds = self._recvmsg()
        if not data:
            self.parser.feed_eof()
            raise PeerClosed("vhost-user peer closed the connection")
        self.parser.feed(data, fds)
        return self.drain()

    def drain(self) -> list[Message]:
        """The whole messages already read, in order.

        A refused message raises -- but only after the messages before it were
        returned: then the next call raises it, and the one after goes on past it
        (when its framing was intact).
        """
        if self._refused is not None:
            error, self._refused = self._refused, None
            raise error
        out: list[Message] = []
        while True:
            try:
                msg = self.parser.next_message()
            except VhostUserProtocolError as e:
                if not out:
                    raise
                self._refused = e
                return out
            if msg is None:
                return out
            out.append(msg)

    def _recvmsg(self) -> tuple[bytes, list[int]]:
        data, ancdata, flags, _ = self.sock.recvmsg(RECV_SIZE, _FD_SPACE)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds += arr.tolist()
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise VhostUserProtocolError(
                "ancillary data truncated: more fds than a vhost-user message may carry",
                framing_intact=False,
            )
        return data, fds

    def request(self, message: Message, timeout: float = 10.0) -> Message:
        """Send and wait for the reply to this request (front-end side)."""
        self.send(message)
        self.sock.settimeout(timeout)
        try:
            while True:
                msgs = self.drain() or self.receive()
                for msg in msgs:
                    if msg.request is not message.request:
                        close_fds(msg.fds)
                        raise VhostUserProtocolError(
                            f"reply to {spec_name(message.request)} came as "
                            f"{spec_name(msg.request)}",
                            framing_intact=False,
                        )
                    return msg
        except TimeoutError:
            raise VhostUserProtocolError(
                f"no reply to {spec_name(message.request)} within {timeout:g}s",
                framing_intact=False,
            ) from None
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        self.parser.close()
        self.sock.close()
