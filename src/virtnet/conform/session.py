"""One front-end connection as ``virtnet conform`` drives it: well-formed messages
through the codec and ``Channel``, anything else as raw bytes, and every wait bounded.

A case speaks through a ``Session``; what the back-end did is either what the case
allows, or a ``CaseFailure`` whose text says what was sent and what came back.
"""

from __future__ import annotations

import array
import os
import select
import socket
import time

from virtnet.net.features import VirtioNetF
from virtnet.vhost_user.channel import Channel, PeerClosed
from virtnet.vhost_user.errors import VhostUserProtocolError
from virtnet.vhost_user.messages import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    FrontendRequest,
    Message,
    ProtocolFeature,
    close_fds,
    spec_name,
)
from virtnet.vhost_user.reconnect import bind_listener
from virtnet.virtio.features import VirtioF, bit

R = FrontendRequest
REPLY_TIMEOUT = 5.0  # a back-end answers a request in microseconds; 5 s is "never"
CONNECT_TIMEOUT = 5.0
SILENCE = 0.5  # how long "no reply" is watched for where none is owed

# What conform acks: the virtio-net minimum, plus what a case asks for, plus RING_PACKED and
# RING_EVENT_IDX in the matrix cells that name them; no offloads but where a case asks
# (headers must come back plain).
BASE_FEATURES = bit(VirtioF.VERSION_1)


class CaseFailure(AssertionError):
    """The back-end did what the case does not allow; the text says what and where."""


class CaseSkipped(Exception):
    """The case does not apply to this back-end (a feature it does not offer)."""


class CaseNotOffered(CaseSkipped):
    """The back-end does not offer a feature the case (or its matrix cell) needs."""


class BackendGone(ConnectionError):
    """Nothing listens on the socket any more: the back-end process is gone."""


def ack_text(msg: Message) -> str:
    """A reply read as a REPLY_ACK: its status, or "?" when it does not carry a u64."""
    return f"REPLY_ACK {msg.payload.value if isinstance(msg.payload, U64) else '?'}"


class Session:
    """A vhost-user connection to the back-end under test."""

    def __init__(self, path: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.path = path
        self.sock = _connect(path, connect_timeout)
        self.channel = Channel(self.sock, replies=True)
        self.fds: list[int] = []
        self.offered = 0
        self.protocol = 0
        self.features = 0

    # -- sending -------------------------------------------------------------------

    def send(self, request: R, payload=b"", fds=(), *, need_reply: bool = False) -> None:
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        try:
            self.channel.send(Message(request, flags, payload, tuple(fds)))
        except OSError as e:
            raise CaseFailure(f"{spec_name(request)}: send failed: {e}") from None

    def send_raw(self, data: bytes, fds=()) -> None:
        """Bytes the codec would refuse to encode, with ``fds`` attached."""
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.sendmsg([data], anc)

    # -- receiving -----------------------------------------------------------------

    def outcome(self, request: R, timeout: float = REPLY_TIMEOUT) -> tuple[str, Message | None]:
        """What the back-end did next: ("reply", msg), ("closed", None) or ("silent", None)."""
        self.sock.settimeout(timeout)
        try:
            msgs = self.channel.drain() or self.channel.receive()
        except PeerClosed:
            return "closed", None
        except (TimeoutError, BlockingIOError):
            return "silent", None
        except ConnectionError:
            return "closed", None
        except VhostUserProtocolError as e:
            raise CaseFailure(f"reply to {spec_name(request)} is malformed: {e}") from None
        finally:
            self.sock.settimeout(None)
        msg = msgs[0]
        for extra in msgs[1:]:
            close_fds(extra.fds)
        if msg.request is not request:
            raise CaseFailure(
                f"reply to {spec_name(request)} came as {spec_name(msg.request)}"
            )
        return "reply", msg

    def reply(self, request: R, timeout: float = REPLY_TIMEOUT) -> Message:
        kind, msg = self.outcome(request, timeout)
        if msg is None:  # "closed" or "silent"
            what = "closed the connection" if kind == "closed" else f"no reply in {timeout:g}s"
            raise CaseFailure(f"{spec_name(request)}: {what}")
        close_fds(msg.fds)
        return msg

    def get_u64(self, request: R) -> int:
        self.send(request)
        return self.reply(request).payload_as(U64).value

    def request_ack(self, request: R, payload=b"", fds=()) -> int:
        """Send with NEED_REPLY; the REPLY_ACK status (0 = success)."""
        self.send(request, payload, fds, need_reply=True)
        msg = self.reply(request)
        if not isinstance(msg.payload, U64):
            raise CaseFailure(f"{spec_name(request)}: REPLY_ACK is not a u64")
        return msg.payload.value

    def must_ack(self, request: R, payload=b"", fds=()) -> None:
        """A request the back-end must accept; with REPLY_ACK negotiated, checked."""
        if not self.has_protocol(ProtocolFeature.REPLY_ACK):
            self.send(request, payload, fds)
            return
        status = self.request_ack(request, payload, fds)
        if status != 0:
            raise CaseFailure(f"{spec_name(request)}: refused a valid request (REPLY_ACK {status})")

    def expect_silence(self, after: R) -> None:
        """No reply is owed (NEED_REPLY clear): the next one must answer the next request."""
        self.send(R.GET_FEATURES)
        kind, msg = self.outcome(R.GET_FEATURES)
        if msg is None:
            raise CaseFailure(f"after {spec_name(after)}: GET_FEATURES got no reply ({kind})")
        close_fds(msg.fds)

    # -- negotiation ---------------------------------------------------------------

    def has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol & bit(feature))

    def negotiate(self, want: int = BASE_FEATURES, *, require: int = BASE_FEATURES,
                  protocol: int = bit(ProtocolFeature.REPLY_ACK)) -> int:  # fmt: skip
        """QEMU's opening: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_FEATURES."""
        self.send(R.SET_OWNER)
        self.offered = self.get_u64(R.GET_FEATURES)
        missing = require & ~self.offered
        if missing:
            raise CaseNotOffered(f"the back-end does not offer {feature_names(missing)}")
        pf_bit = bit(VHOST_USER_F_PROTOCOL_FEATURES)
        if self.offered & pf_bit:
            offered_pf = self.get_u64(R.GET_PROTOCOL_FEATURES)
            self.protocol = offered_pf & protocol
            self.send(R.SET_PROTOCOL_FEATURES, U64(self.protocol))
        self.features = (self.offered & want) | (self.offered & pf_bit)
        self.must_ack(R.SET_FEATURES, U64(self.features))
        return self.features

    def has(self, feature: int) -> bool:
        return bool(self.features & bit(feature))

    # -- fds -------------------------------------------------------------------------

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        try:
            self.channel.close()
        except OSError:
            pass
        close_fds(self.fds)
        self.fds.clear()


def feature_names(bits: int) -> str:
    known = {**{int(f): f.name for f in VirtioNetF}, **{int(f): f.name for f in VirtioF},
             VHOST_USER_F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES"}  # fmt: skip
    return " ".join(known.get(b, f"bit{b}") for b in range(64) if bits >> b & 1)


# ``virtnet conform --server``: the socket conform listens on, set before the cases run
# (their processes are forked, so each inherits it); every session is then the next
# connection a back-end makes (DPDK net_vhost0,...,client=1 and `virtnet device --client`
# connect again each time a session ends).
_listener: socket.socket | None = None


def listen(path: str) -> socket.socket:
    """Listen on ``path`` for the back-end under test (``--server``); the socket."""
    global _listener
    _listener = bind_listener(path)  # driver --server's: replaces only a stale socket
    return _listener


def _accept(path: str, timeout: float) -> socket.socket:
    assert _listener is not None  # the caller tests it
    ready, _, _ = select.select([_listener], [], [], timeout)
    if not ready:
        raise BackendGone(f"no back-end connected to {path} within {timeout:g}s")
    sock, _addr = _listener.accept()
    sock.setblocking(True)
    return sock


def _connect(path: str, timeout: float) -> socket.socket:
    if _listener is not None:
        return _accept(path, timeout)
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise BackendGone(f"nothing listens on {path}: {e.strerror}") from None
            time.sleep(0.05)
