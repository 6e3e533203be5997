"""Typed errors of the vhost-user layer.

A protocol error names the request, the field and what was expected against
what arrived, so that one log line is enough to find the culprit. It also says
what state the stream is in afterwards (``framing_intact``): the caller decides
from that alone whether to skip the message or drop the connection.
"""

from __future__ import annotations


class VhostUserProtocolError(ValueError):
    """A vhost-user message this side must refuse.

    ``framing_intact``:
      * ``True`` -- the bad message was consumed whole and its fds were closed;
        the next byte is the start of the next message, so the connection can
        go on. A back-end may answer with a REPLY_ACK failure when the sender
        set NEED_REPLY (``messages.rejection_ack``).
      * ``False`` -- the header itself cannot be trusted (wrong version bits,
        a size over the cap, the stream ended mid-message): where the next
        message starts is unknown, so the connection must be dropped
        ("If *front-end* ... receives a wrong reply it will close the
        connection", vhost-user.rst, "Communication").

    ``request`` and ``flags`` are the header fields of the refused message
    (``None`` when the header never arrived whole).
    """

    def __init__(
        self,
        message: str,
        *,
        framing_intact: bool = True,
        request: int | None = None,
        flags: int | None = None,
    ) -> None:
        super().__init__(message)
        self.framing_intact = framing_intact
        self.request = request
        self.flags = flags
