"""vhost-user message codec, sans-I/O (QEMU docs/interop/vhost-user.rst).

A message is a 12-byte header and ``size`` bytes of payload::

    +---------+-------+------+---------+
    | request | flags | size | payload |       u32, u32, u32, size bytes
    +---------+-------+------+---------+

plus, out of band, the fds that came in the SCM_RIGHTS ancillary data of the
``recvmsg`` that read it. Nothing here touches a socket (like h11): the I/O
layer calls ``MessageParser.feed(data, fds)`` with what ``recvmsg`` returned
and ``next_message()`` until it returns ``None``; to send, ``encode(message)``
and one ``sendmsg`` of those bytes with ``message.fds`` attached.

Two channels, four readers. The vhost-user socket carries ``FrontendRequest``
requests (front-end → back-end) and their replies; the optional back-end
channel (``SET_BACKEND_REQ_FD``) carries ``BackendRequest`` requests
(back-end → front-end) and their replies. Hence::

    MessageParser(FrontendRequest)                 back-end, vhost-user socket
    MessageParser(FrontendRequest, replies=True)   front-end, vhost-user socket
    MessageParser(BackendRequest)                  front-end, back-end channel
    MessageParser(BackendRequest, replies=True)    back-end, back-end channel

``REQUESTS`` is the one table of what each request and each reply carries:
payload type(s) and fd rule. Decoding, encoding (which refuses to send what
the peer would refuse) and the reply helpers all read it.

Errors (``VhostUserProtocolError``, a ``ValueError``) leave the parser in a
documented state:

* framing lost -- wrong version bits, a size over ``max_payload_size``, the
  stream ending mid-message: the buffer and every pending fd are dropped and
  the parser refuses all further use. Drop the connection.
* framing intact -- everything else (unknown request, size mismatch, bad
  nregions, config size, REPLY bit, fd count): the message was consumed, its
  fds closed, and ``next_message()`` goes on with the next one.

fds are never leaked: the parser owns every fd handed to ``feed`` until it
hands it over inside a ``Message``; fds of a refused message, and those the
spec says to drop (an fd on REM_MEM_REG), go through ``close_fds``.

What the I/O layer owes the codec: send each message with one ``sendmsg``
(fds attached to it, at most 8); read with a control buffer for at least 8
fds (``socket.CMSG_SPACE(8 * 4)``) and treat ``MSG_CTRUNC`` as a lost
connection -- the kernel has then already dropped fds we cannot account for.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import Field, dataclass, fields
from enum import Enum, IntEnum
from typing import Any, ClassVar, Protocol, TypeAlias, TypeVar

from virtnet.vhost_user.errors import VhostUserProtocolError

__all__ = [
    "BACKEND_REQUESTS",
    "FRONTEND_REQUESTS",
    "HEADER",
    "HEADER_SIZE",
    "MAX_PAYLOAD_SIZE",
    "REQUESTS",
    "VHOST_LOG_PAGE",
    "VHOST_MEMORY_BASELINE_NREGIONS",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_MAX_CONFIG_SIZE",
    "VHOST_USER_NEED_REPLY_MASK",
    "VHOST_USER_REPLY_MASK",
    "VHOST_USER_VERSION",
    "VHOST_USER_VERSION_MASK",
    "VHOST_USER_VRING_IDX_MASK",
    "VHOST_USER_VRING_NOFD_MASK",
    "VHOST_VRING_F_LOG",
    "VHOST_F_LOG_ALL",
    "BackendRequest",
    "ConfigSpace",
    "DeviceStateTransfer",
    "FdRule",
    "FrontendRequest",
    "InflightDesc",
    "IotlbMsg",
    "LogDesc",
    "MemoryRegionDesc",
    "MemoryTable",
    "Message",
    "MessageParser",
    "NoPayload",
    "Payload",
    "ProtocolFeature",
    "Raw",
    "ReplyKind",
    "RequestSpec",
    "Shape",
    "SharedObject",
    "SingleMemoryRegion",
    "U64",
    "VhostUserProtocolError",
    "VringAddr",
    "VringArea",
    "VringState",
    "ack",
    "close_fds",
    "decode",
    "encode",
    "needs_reply",
    "rejection_ack",
    "reply",
    "spec_name",
]

# -- header ("Message Specification" / "Header") ---------------------------------

# "All numbers are in the machine native byte order." virtnet runs on
# little-endian hosts (x86-64, aarch64), and '<' also keeps struct from adding
# native alignment padding: the C struct is QEMU_PACKED.
HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size  # 12

VHOST_USER_VERSION = 0x1  # "Lower 2 bits are the version (currently 0x01)"
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 1 << 2  # "needs to be sent on each reply"
VHOST_USER_NEED_REPLY_MASK = 1 << 3  # REPLY_ACK

# Not a spec number: the largest legal payload is a crypto session (~1.1 KiB in
# QEMU's VhostUserPayload union); a cap keeps a hostile ``size`` from making us
# buffer gigabytes before we can refuse the message.
MAX_PAYLOAD_SIZE = 4096

VHOST_MEMORY_BASELINE_NREGIONS = 8  # regions (and fds) in one SET_MEM_TABLE
VHOST_USER_MAX_CONFIG_SIZE = 256  # "Virtio device config space"
VHOST_USER_F_PROTOCOL_FEATURES = 30  # the reused UNUSED virtio feature bit
VHOST_F_LOG_ALL = 26  # "Migration": log every guest page the back-end writes

# SET_VRING_KICK/CALL/ERR: "Bits (0-7) of the payload contain the vring index.
# Bit 8 is the invalid FD flag."
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8

VHOST_VRING_F_LOG = 0  # bit in VringAddr.flags: log_guest_addr is valid
VHOST_LOG_PAGE = 0x1000  # "Migration": one dirty-log bit per 4 KiB page


# -- request numbers ---------------------------------------------------------------


class FrontendRequest(IntEnum):
    """Spec "Front-end message types": requests sent on the vhost-user socket."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4  # deprecated
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # previous name SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Spec "Back-end message types": requests on the back-end channel (VHOST_USER_BACKEND_*)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(IntEnum):
    """Spec "Protocol features": bit numbers of GET/SET_PROTOCOL_FEATURES."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4  # spelled VHOST_USER_PROTOCOL_F_MTU in the table
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def spec_name(request: int) -> str:
    """The spec's name of a request, as a log line should print it."""
    if isinstance(request, BackendRequest):
        return f"VHOST_USER_BACKEND_{request.name}"
    if isinstance(request, FrontendRequest):
        return f"VHOST_USER_{request.name}"
    return f"request {int(request)}"


# -- payloads ("Payload") ------------------------------------------------------------


def _payload_error(description: str, text: str) -> VhostUserProtocolError:
    return VhostUserProtocolError(f"{description}: {text}")


def _expect_size(description: str, buf: bytes, size: int) -> None:
    if len(buf) != size:
        raise _payload_error(description, f"payload size {len(buf)}, expected {size}")


def _unpack_head(description: str, head: struct.Struct, named: str, buf: bytes) -> tuple[Any, ...]:
    """The fixed head of a payload that says its own size; ``named``: its fields, for the error."""
    if len(buf) < head.size:
        raise _payload_error(
            description, f"payload size {len(buf)}, shorter than {named} ({head.size})"
        )
    return head.unpack_from(buf)


def _expect_total(description: str, buf: bytes, size: int, because: str) -> None:
    """A payload of ``size`` bytes, as its head's count (``because``, for the error) says."""
    if len(buf) != size:
        raise _payload_error(description, f"{because} needs payload size {size}, got {len(buf)}")


class _Fixed:
    """A payload that is one fixed-size struct; subclasses set STRUCT and DESCRIPTION."""

    __slots__ = ()
    STRUCT: ClassVar[struct.Struct]
    DESCRIPTION: ClassVar[str]
    SIZE: ClassVar[int | None]
    # Every subclass is a dataclass: declared so that ``fields(self)`` type-checks.
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.SIZE = cls.STRUCT.size

    def pack(self) -> bytes:
        try:
            return self.STRUCT.pack(*(getattr(self, f.name) for f in fields(self)))
        except struct.error as e:
            raise ValueError(f"{self.DESCRIPTION}: {e}") from None

    @classmethod
    def unpack(cls, buf: bytes) -> Any:
        _expect_size(cls.DESCRIPTION, buf, cls.STRUCT.size)
        return cls(*cls.STRUCT.unpack(buf))


class _VringWord:
    """Mixin of the payloads with a u64 that names a vring: the index in bits 0-7, the
    NOFD flag in bit 8 (SET_VRING_KICK/CALL/ERR's u64, BACKEND_VRING_HOST_NOTIFIER_MSG's
    area)."""

    __slots__ = ()

    def _vring_word(self) -> int:
        raise NotImplementedError

    @property
    def vring_index(self) -> int:
        return self._vring_word() & VHOST_USER_VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self._vring_word() & VHOST_USER_VRING_NOFD_MASK)


@dataclass(frozen=True, slots=True)
class U64(_Fixed, _VringWord):
    """Spec "A single 64-bit integer": features, a vring index + NOFD bit, a status."""

    STRUCT = struct.Struct("<Q")
    DESCRIPTION = "u64"
    value: int = 0

    def _vring_word(self) -> int:
        return self.value


@dataclass(frozen=True, slots=True)
class VringState(_Fixed):
    """Spec "A vring state description" (struct vhost_vring_state)."""

    STRUCT = struct.Struct("<II")
    DESCRIPTION = "vring state description"
    index: int = 0
    num: int = 0


@dataclass(frozen=True, slots=True)
class VringAddr(_Fixed):
    """Spec "A vring address description" (struct vhost_vring_addr).

    Field order is the C struct's: descriptor, *used*, then *available*. (The
    spec's drawing also shows a "size" column; no such field exists in the
    field list or in struct vhost_vring_addr -- 40 bytes on the wire.)
    Addresses are front-end virtual addresses unless IOMMU_PLATFORM.
    """

    STRUCT = struct.Struct("<IIQQQQ")
    DESCRIPTION = "vring address description"
    index: int = 0
    flags: int = 0
    desc_user_addr: int = 0
    used_user_addr: int = 0
    avail_user_addr: int = 0
    log_guest_addr: int = 0


@dataclass(frozen=True, slots=True)
class MemoryRegionDesc(_Fixed):
    """Spec "Memory region description" (VhostUserMemoryRegion).

    Not the XEN_MMAP variant (two extra u32): virtnet never offers XEN_MMAP.
    """

    STRUCT = struct.Struct("<QQQQ")
    DESCRIPTION = "memory region description"
    guest_phys_addr: int = 0
    memory_size: int = 0
    userspace_addr: int = 0
    mmap_offset: int = 0


_NREGIONS = struct.Struct("<II")  # nregions, padding
_REGION_SIZE = MemoryRegionDesc.STRUCT.size  # 32


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """Spec "Multiple memory regions description" (VhostUserMemory), SET_MEM_TABLE.

    Only ``nregions`` regions travel (8 + 32 * nregions bytes, as QEMU and DPDK
    send them), with one fd each in the same order. Zero regions is legal on
    the wire: it is also how QEMU's postcopy acknowledgement (a u64 0 sent as
    SET_MEM_TABLE) reads.
    """

    DESCRIPTION: ClassVar[str] = "memory regions description"
    SIZE: ClassVar[int | None] = None
    regions: tuple[MemoryRegionDesc, ...] = ()

    def __post_init__(self) -> None:
        if len(self.regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise ValueError(
                f"{self.DESCRIPTION}: {len(self.regions)} regions, "
                f"at most {VHOST_MEMORY_BASELINE_NREGIONS}"
            )

    @property
    def nregions(self) -> int:
        return len(self.regions)

    def pack(self) -> bytes:
        return _NREGIONS.pack(self.nregions, 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, buf: bytes) -> MemoryTable:
        nregions, _padding = _unpack_head(cls.DESCRIPTION, _NREGIONS, "nregions + padding", buf)
        if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
            raise _payload_error(
                cls.DESCRIPTION,
                f"nregions {nregions} exceeds the maximum of {VHOST_MEMORY_BASELINE_NREGIONS}",
            )
        need = _NREGIONS.size + nregions * _REGION_SIZE
        _expect_total(cls.DESCRIPTION, buf, need, f"nregions {nregions}")
        return cls(tuple(_regions(buf, nregions)))


def _regions(buf: bytes, nregions: int) -> Iterable[MemoryRegionDesc]:
    for i in range(nregions):
        start = _NREGIONS.size + i * _REGION_SIZE
        yield MemoryRegionDesc.unpack(buf[start : start + _REGION_SIZE])


_PADDING64 = struct.Struct("<Q")
_SINGLE_REGION_SIZE = _PADDING64.size + _REGION_SIZE  # 40


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """Spec "Single memory region description" (VhostUserMemRegMsg): ADD/REM_MEM_REG."""

    DESCRIPTION: ClassVar[str] = "single memory region description"
    SIZE: ClassVar[int | None] = _SINGLE_REGION_SIZE
    region: MemoryRegionDesc = MemoryRegionDesc()

    def pack(self) -> bytes:
        return _PADDING64.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, buf: bytes) -> SingleMemoryRegion:
        _expect_size(cls.DESCRIPTION, buf, _SINGLE_REGION_SIZE)
        return cls(MemoryRegionDesc.unpack(buf[_PADDING64.size :]))


@dataclass(frozen=True, slots=True)
class LogDesc(_Fixed):
    """Spec "Log description" (VhostUserLog), SET_LOG_BASE.

    The spec's message table says "u64", but QEMU sends (and DPDK requires)
    this 16-byte struct, with the log memfd attached.
    """

    STRUCT = struct.Struct("<QQ")
    DESCRIPTION = "log description"
    mmap_size: int = 0
    mmap_offset: int = 0


@dataclass(frozen=True, slots=True)
class IotlbMsg(_Fixed):
    """Spec "An IOTLB message" (struct vhost_iotlb_msg): 26 bytes + 6 of C tail padding."""

    STRUCT = struct.Struct("<QQQBB6x")
    DESCRIPTION = "IOTLB message"
    iova: int = 0
    size: int = 0
    uaddr: int = 0
    perm: int = 0
    type: int = 0


_CONFIG_HDR = struct.Struct("<III")  # offset, size, flags


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """Spec "Virtio device config space" (VhostUserConfig), GET_CONFIG / SET_CONFIG.

    Only ``size`` bytes of the 256-byte region travel; the wire ``size`` field
    is ``len(data)`` by construction. ``flags``: 0 writable fields, 1 live
    migration.
    """

    DESCRIPTION: ClassVar[str] = "config space"
    SIZE: ClassVar[int | None] = None
    offset: int = 0
    flags: int = 0
    data: bytes = b""

    def __post_init__(self) -> None:
        if len(self.data) > VHOST_USER_MAX_CONFIG_SIZE:
            raise ValueError(
                f"{self.DESCRIPTION}: {len(self.data)} bytes, at most {VHOST_USER_MAX_CONFIG_SIZE}"
            )

    @property
    def size(self) -> int:
        return len(self.data)

    def pack(self) -> bytes:
        return _CONFIG_HDR.pack(self.offset, self.size, self.flags) + bytes(self.data)

    @classmethod
    def unpack(cls, buf: bytes) -> ConfigSpace:
        offset, size, flags = _unpack_head(
            cls.DESCRIPTION, _CONFIG_HDR, "offset + size + flags", buf
        )
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise _payload_error(
                cls.DESCRIPTION,
                f"size {size} exceeds VHOST_USER_MAX_CONFIG_SIZE ({VHOST_USER_MAX_CONFIG_SIZE})",
            )
        _expect_total(cls.DESCRIPTION, buf, _CONFIG_HDR.size + size, f"size field {size}")
        return cls(offset, flags, bytes(buf[_CONFIG_HDR.size :]))


@dataclass(frozen=True, slots=True)
class VringArea(_Fixed, _VringWord):
    """Spec "Vring area description" (VhostUserVringArea), BACKEND_VRING_HOST_NOTIFIER_MSG."""

    STRUCT = struct.Struct("<QQQ")
    DESCRIPTION = "vring area description"
    u64: int = 0
    size: int = 0
    offset: int = 0

    def _vring_word(self) -> int:
        return self.u64


@dataclass(frozen=True, slots=True)
class InflightDesc(_Fixed):
    """Spec "Inflight description" (VhostUserInflight), GET/SET_INFLIGHT_FD.

    The C struct is not packed: u64, u64, u16, u16 and 4 bytes of tail padding,
    so QEMU, DPDK and rust-vmm send ``sizeof`` = 24 bytes, not 20.
    """

    STRUCT = struct.Struct("<QQHH4x")
    DESCRIPTION = "inflight description"
    mmap_size: int = 0
    mmap_offset: int = 0
    num_queues: int = 0
    queue_size: int = 0


@dataclass(frozen=True, slots=True)
class SharedObject(_Fixed):
    """Spec "VhostUserShared": a 16-byte UUID (first fields big-endian; kept as bytes)."""

    STRUCT = struct.Struct("<16s")
    DESCRIPTION = "shared object UUID"
    uuid: bytes = bytes(16)

    def __post_init__(self) -> None:
        if len(self.uuid) != 16:
            raise ValueError(f"{self.DESCRIPTION}: {len(self.uuid)} bytes, expected 16")


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(_Fixed):
    """Spec "Device state transfer parameters", SET_DEVICE_STATE_FD.

    direction: 0 save (back-end → front-end), 1 load; phase: 0 stopped.
    """

    STRUCT = struct.Struct("<II")
    DESCRIPTION = "device state transfer parameters"
    direction: int = 0
    phase: int = 0


class NoPayload:
    """Table marker: the message carries no payload (size 0, ``payload == b""``)."""

    DESCRIPTION: ClassVar[str] = "no payload"
    SIZE: ClassVar[int | None] = 0

    @classmethod
    def unpack(cls, buf: bytes) -> bytes:
        _expect_size(cls.DESCRIPTION, buf, 0)
        return b""


class Raw:
    """Table marker: payload kept as bytes (crypto sessions: opaque to virtnet)."""

    DESCRIPTION: ClassVar[str] = "raw payload"
    SIZE: ClassVar[int | None] = None

    @classmethod
    def unpack(cls, buf: bytes) -> bytes:
        return bytes(buf)


Payload: TypeAlias = (
    U64
    | VringState
    | VringAddr
    | MemoryTable
    | SingleMemoryRegion
    | LogDesc
    | IotlbMsg
    | ConfigSpace
    | VringArea
    | InflightDesc
    | SharedObject
    | DeviceStateTransfer
    | bytes
)


class _Codec(Protocol):
    """What every payload type of the table has: a name, a size (None: it varies)
    and a decoder."""

    DESCRIPTION: ClassVar[str]
    SIZE: ClassVar[int | None]

    @classmethod
    def unpack(cls, buf: bytes) -> Payload: ...


# -- the table: what each request and reply carries ---------------------------------


class FdRule(Enum):
    """How many SCM_RIGHTS fds a message carries; the value is the log wording."""

    NONE = "no fd"
    ONE = "exactly one fd"
    PER_REGION = "one fd per memory region"
    UNLESS_NOFD = "one fd unless VHOST_USER_VRING_NOFD_MASK is set"
    OPTIONAL = "zero or one fd"
    # REM_MEM_REG: "No file descriptors SHOULD be passed ... the back-end MAY
    # accept messages with one file descriptor. If a file descriptor is passed,
    # the back-end MUST close it without using it otherwise."
    DROPPED = "no fd (one tolerated on receipt, and closed)"


class ReplyKind(Enum):
    """When the receiver of a request answers ("Communication", "REPLY_ACK")."""

    ACK = "only with NEED_REPLY: a REPLY_ACK u64, 0 = success"
    BODY = "always, with the reply payload"
    STATUS = "always, a u64 status (0 = success)"


@dataclass(frozen=True, slots=True)
class Shape:
    """Payload type(s) of one message, picked by size when several, and its fd rule."""

    payloads: tuple[type[_Codec], ...]
    fds: FdRule = FdRule.NONE


@dataclass(frozen=True, slots=True)
class RequestSpec:
    request: Shape
    reply: Shape
    kind: ReplyKind = ReplyKind.ACK


_NONE = Shape((NoPayload,))
_U64 = Shape((U64,))
_STATE = Shape((VringState,))
_SHARED = Shape((SharedObject,))


def _spec(request: Shape, reply: Shape = _U64, kind: ReplyKind = ReplyKind.ACK) -> RequestSpec:
    return RequestSpec(request, reply, kind)


_F, _B = FrontendRequest, BackendRequest
_ONE, _BODY, _STATUS = FdRule.ONE, ReplyKind.BODY, ReplyKind.STATUS

FRONTEND_REQUESTS: dict[FrontendRequest, RequestSpec] = {
    _F.GET_FEATURES: _spec(_NONE, _U64, _BODY),
    _F.SET_FEATURES: _spec(_U64),
    _F.SET_OWNER: _spec(_NONE),
    _F.RESET_OWNER: _spec(_NONE),
    # Postcopy: after POSTCOPY_LISTEN the back-end replies with its own
    # mapping bases (a memory table) even without NEED_REPLY.
    _F.SET_MEM_TABLE: _spec(Shape((MemoryTable,), FdRule.PER_REGION), Shape((U64, MemoryTable))),
    # Replies "if LOG_SHMFD", i.e. whenever the log fd is attached; QEMU ignores
    # the body: DPDK sends none, libvhost-user a u64.
    _F.SET_LOG_BASE: _spec(Shape((LogDesc,), _ONE), Shape((NoPayload, U64)), _STATUS),
    _F.SET_LOG_FD: _spec(Shape((NoPayload,), _ONE)),
    _F.SET_VRING_NUM: _spec(_STATE),
    _F.SET_VRING_ADDR: _spec(Shape((VringAddr,))),
    _F.SET_VRING_BASE: _spec(_STATE),
    _F.GET_VRING_BASE: _spec(_STATE, _STATE, _BODY),
    _F.SET_VRING_KICK: _spec(Shape((U64,), FdRule.UNLESS_NOFD)),
    _F.SET_VRING_CALL: _spec(Shape((U64,), FdRule.UNLESS_NOFD)),
    _F.SET_VRING_ERR: _spec(Shape((U64,), FdRule.UNLESS_NOFD)),
    _F.GET_PROTOCOL_FEATURES: _spec(_NONE, _U64, _BODY),
    _F.SET_PROTOCOL_FEATURES: _spec(_U64),
    _F.GET_QUEUE_NUM: _spec(_NONE, _U64, _BODY),
    _F.SET_VRING_ENABLE: _spec(_STATE),
    _F.SEND_RARP: _spec(_U64),  # the guest MAC in the first 6 bytes
    _F.NET_SET_MTU: _spec(_U64),
    _F.SET_BACKEND_REQ_FD: _spec(Shape((NoPayload,), _ONE)),
    _F.IOTLB_MSG: _spec(Shape((IotlbMsg,)), _U64, _STATUS),
    _F.SET_VRING_ENDIAN: _spec(_STATE),
    # "back-end uses zero length of payload to indicate an error"
    _F.GET_CONFIG: _spec(Shape((ConfigSpace,)), Shape((NoPayload, ConfigSpace)), _BODY),
    _F.SET_CONFIG: _spec(Shape((ConfigSpace,))),
    _F.CREATE_CRYPTO_SESSION: _spec(Shape((Raw,)), Shape((Raw,)), _BODY),
    _F.CLOSE_CRYPTO_SESSION: _spec(_U64),
    _F.POSTCOPY_ADVISE: _spec(_NONE, Shape((NoPayload,), _ONE), _BODY),  # the userfaultfd
    _F.POSTCOPY_LISTEN: _spec(_NONE),
    _F.POSTCOPY_END: _spec(_NONE, _U64, _STATUS),
    # QEMU accepts a reply with mmap_size 0 and no fd.
    _F.GET_INFLIGHT_FD: _spec(
        Shape((InflightDesc,)), Shape((InflightDesc,), FdRule.OPTIONAL), _BODY
    ),
    _F.SET_INFLIGHT_FD: _spec(Shape((InflightDesc,), _ONE)),
    _F.GPU_SET_SOCKET: _spec(Shape((NoPayload,), _ONE)),
    _F.RESET_DEVICE: _spec(_NONE),
    _F.VRING_KICK: _spec(_STATE),
    _F.GET_MAX_MEM_SLOTS: _spec(_NONE, _U64, _BODY),
    _F.ADD_MEM_REG: _spec(Shape((SingleMemoryRegion,), _ONE), Shape((U64, SingleMemoryRegion))),
    _F.REM_MEM_REG: _spec(Shape((SingleMemoryRegion,), FdRule.DROPPED)),
    _F.SET_STATUS: _spec(_U64),
    _F.GET_STATUS: _spec(_NONE, _U64, _BODY),
    # Reply: a u64 status and the dma-buf fd on success (QEMU's lookup reply).
    _F.GET_SHARED_OBJECT: _spec(_SHARED, Shape((U64,), FdRule.OPTIONAL), _STATUS),
    # Reply: "Bits 0-7 are 0 on success ... Bit 8 is the invalid FD flag".
    _F.SET_DEVICE_STATE_FD: _spec(
        Shape((DeviceStateTransfer,), _ONE), Shape((U64,), FdRule.UNLESS_NOFD), _STATUS
    ),
    _F.CHECK_DEVICE_STATE: _spec(_NONE, _U64, _STATUS),
}

BACKEND_REQUESTS: dict[BackendRequest, RequestSpec] = {
    _B.IOTLB_MSG: _spec(Shape((IotlbMsg,))),
    _B.CONFIG_CHANGE_MSG: _spec(_NONE),
    # "register the new notifier if the request is sent with a file descriptor"
    _B.VRING_HOST_NOTIFIER_MSG: _spec(Shape((VringArea,), FdRule.UNLESS_NOFD)),
    _B.VRING_CALL: _spec(_STATE),
    _B.VRING_ERR: _spec(_STATE),
    _B.SHARED_OBJECT_ADD: _spec(_SHARED),
    _B.SHARED_OBJECT_REMOVE: _spec(_SHARED),
    _B.SHARED_OBJECT_LOOKUP: _spec(_SHARED, Shape((U64,), FdRule.OPTIONAL), _STATUS),
}

REQUESTS: dict[type[IntEnum], dict[Any, RequestSpec]] = {
    FrontendRequest: FRONTEND_REQUESTS,
    BackendRequest: BACKEND_REQUESTS,
}


# -- messages ----------------------------------------------------------------------

_P = TypeVar("_P", bound="Payload")


@dataclass(frozen=True, slots=True)
class Message:
    """One vhost-user message: header fields, decoded payload, attached fds.

    ``payload`` is a payload object, or bytes for no payload (``b""``) and raw
    payloads. ``fds`` belong to whoever holds the message: a back-end keeps
    the ones it uses and passes the rest to ``close_fds``.

    ``request`` is a ``FrontendRequest`` or a ``BackendRequest``; both are
    IntEnums, so ``FrontendRequest.GET_FEATURES == BackendRequest.IOTLB_MSG``:
    compare requests with ``is``.
    """

    request: int
    flags: int = VHOST_USER_VERSION
    payload: Payload = b""
    fds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.fds, tuple):
            object.__setattr__(self, "fds", tuple(self.fds))

    @property
    def version(self) -> int:
        return self.flags & VHOST_USER_VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    def payload_as(self, cls: type[_P]) -> _P:
        """``payload``, as the type the table gives this message (``cls``).

        A decoded message always has it -- the codec picked the type from the
        table -- so a mismatch is a caller's bug, raised as a ``TypeError``.
        """
        payload = self.payload
        if not isinstance(payload, cls):
            raise TypeError(
                f"{spec_name(self.request)}: payload is {type(payload).__name__}, "
                f"not {cls.__name__}"
            )
        return payload


def close_fds(fds: Iterable[int]) -> None:
    """Close fds nobody will use (a refused message's, a dropped extra one).

    The one place that owns "fds never leak": errors are ignored because
    this runs on error paths, where the fd may already be gone.
    """
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _request_error(
    request: int, flags: int, text: str, framing_intact: bool = True
) -> VhostUserProtocolError:
    return VhostUserProtocolError(
        f"{spec_name(request)}: {text}",
        framing_intact=framing_intact,
        request=request,
        flags=flags,
    )


def _select(shape: Shape, size: int) -> type[_Codec]:
    """The payload type a message of ``size`` bytes carries: exact size first."""
    for cls in shape.payloads:
        if cls.SIZE == size:
            return cls
    for cls in shape.payloads:
        if cls.SIZE is None:
            return cls
    if len(shape.payloads) == 1:
        cls = shape.payloads[0]
        raise _payload_error(cls.DESCRIPTION, f"payload size {size}, expected {cls.SIZE}")
    sizes = " or ".join(str(cls.SIZE) for cls in shape.payloads)
    raise VhostUserProtocolError(f"payload size {size}, expected {sizes}")


def _fd_bounds(rule: FdRule, payload: Payload, receiving: bool) -> tuple[int, int]:
    if rule is FdRule.ONE:
        return 1, 1
    if rule is FdRule.PER_REGION:
        assert isinstance(payload, MemoryTable)  # the table's only PER_REGION payload
        return payload.nregions, payload.nregions
    if rule is FdRule.UNLESS_NOFD:
        assert isinstance(payload, _VringWord)  # the table's UNLESS_NOFD payloads
        return (0, 0) if payload.nofd else (1, 1)
    if rule is FdRule.OPTIONAL or (rule is FdRule.DROPPED and receiving):
        return 0, 1
    return 0, 0


def _check_fds(
    request: int, flags: int, shape: Shape, payload: Payload, fds: Sequence[int], receiving: bool
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(fds the message keeps, fds to close); raises on a wrong count."""
    low, high = _fd_bounds(shape.fds, payload, receiving)
    if not low <= len(fds) <= high:
        expected = str(low) if low == high else f"{low} to {high}"
        raise _request_error(
            request, flags, f"expected {expected} fds ({shape.fds.value}), got {len(fds)}"
        )
    if shape.fds is FdRule.DROPPED:
        return (), tuple(fds)
    return tuple(fds), ()


def _shape_of(spec: RequestSpec, flags: int) -> Shape:
    return spec.reply if flags & VHOST_USER_REPLY_MASK else spec.request


def _decode(
    requests: type[IntEnum],
    replies: bool,
    header: tuple[int, int, int],
    payload: bytes,
    fds: Sequence[int],
) -> tuple[Message, tuple[int, ...]]:
    """The message in ``header`` + ``payload``, and the fds to close; pure."""
    number, flags, _size = header
    spec = REQUESTS[requests].get(number)
    if spec is None:
        side = "front-end" if requests is FrontendRequest else "back-end"
        raise _request_error(number, flags, f"unknown {side} request number")
    request = requests(number)
    if bool(flags & VHOST_USER_REPLY_MASK) != replies:
        state, want = ("set", "request") if not replies else ("clear", "reply")
        raise _request_error(
            request, flags, f"flags {flags:#x}: REPLY bit (bit 2) {state}, expected a {want}"
        )
    shape = _shape_of(spec, flags)
    try:
        body = _select(shape, len(payload)).unpack(payload)
    except VhostUserProtocolError as e:
        raise _request_error(request, flags, str(e)) from None
    kept, dropped = _check_fds(request, flags, shape, body, fds, receiving=True)
    return Message(request, flags, body, kept), dropped


# -- sending -------------------------------------------------------------------------


def _payload_bytes(payload: Payload) -> bytes:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    return payload.pack()


def _check_outgoing(message: Message, size: int) -> None:
    """Refuse to send what the peer's parser would refuse (same table, same words)."""
    request, flags = message.request, message.flags
    if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise _request_error(request, flags, f"flags {flags:#x}: version bits are not 1")
    if size > MAX_PAYLOAD_SIZE:
        raise _request_error(request, flags, f"payload size {size} exceeds {MAX_PAYLOAD_SIZE}")
    spec = _spec_of(request)
    if spec is None:
        _check_rejection_ack(message)
        return
    shape = _shape_of(spec, flags)
    try:
        cls = _select(shape, size)
    except VhostUserProtocolError as e:
        raise _request_error(request, flags, str(e)) from None
    wanted = (bytes, bytearray, memoryview) if cls in (NoPayload, Raw) else (cls,)
    if not isinstance(message.payload, wanted):
        got = type(message.payload).__name__
        raise _request_error(
            request, flags, f"payload of {size} bytes must be {wanted[0].__name__}, got {got}"
        )
    _check_fds(request, flags, shape, message.payload, message.fds, receiving=False)


def _spec_of(request: int) -> RequestSpec | None:
    for enum, table in REQUESTS.items():
        if isinstance(request, enum):
            return table[request]
    return None


def _check_rejection_ack(message: Message) -> None:
    # A request number the table does not know can only be answered: with a
    # REPLY_ACK failure to a message that was refused as unknown.
    ok = message.is_reply and isinstance(message.payload, U64) and not message.fds
    if not ok:
        raise _request_error(
            message.request,
            message.flags,
            "not a FrontendRequest or BackendRequest: only a REPLY_ACK u64 reply without fds "
            "(to a refused unknown request) can be encoded",
        )


def encode(message: Message) -> bytes:
    """The wire bytes of ``message`` (its fds go in the ancillary data of the same sendmsg).

    Checked against the same table the parser uses, so a bug on our side
    raises here instead of making the peer drop the connection.
    """
    body = _payload_bytes(message.payload)
    _check_outgoing(message, len(body))
    return HEADER.pack(int(message.request), message.flags, len(body)) + body


# -- receiving -------------------------------------------------------------------------


class MessageParser:
    """Bytes and fds in, ``Message``s out; never touches a socket.

    fds attach by stream position: fds passed with a chunk belong to the
    message that holds the chunk's *last* byte. That is Linux AF_UNIX stream
    semantics: a recvmsg stops right after the skb that carries SCM_RIGHTS,
    so the fd-carrying sendmsg (one message, fds on its first byte) always
    ends the chunk -- even when earlier fd-less messages were glued in front
    of it, and whether the reader asks for 12 bytes or 64 KiB.
    """

    def __init__(
        self,
        requests: type[FrontendRequest] | type[BackendRequest] = FrontendRequest,
        *,
        replies: bool = False,
        max_payload_size: int = MAX_PAYLOAD_SIZE,
    ) -> None:
        if requests not in REQUESTS:
            raise ValueError(f"requests must be FrontendRequest or BackendRequest, not {requests}")
        self.requests = requests
        self.replies = replies
        self.max_payload_size = max_payload_size
        self._buf = bytearray()
        self._start = 0  # stream offset of _buf[0]
        self._fd_batches: list[tuple[int, list[int]]] = []  # (chunk end offset, fds)
        self._failed: VhostUserProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message waiting for more data."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Add what one recvmsg returned; the parser owns ``fds`` from now on."""
        fds = list(fds)
        if self._failed is not None:
            close_fds(fds)
            raise self._unusable()
        if fds and not data:
            close_fds(fds)
            raise VhostUserProtocolError(f"{len(fds)} fds arrived with no data bytes")
        self._buf += data
        if fds:
            self._fd_batches.append((self._start + len(self._buf), fds))

    def next_message(self) -> Message | None:
        """The next complete message, ``None`` if more bytes are needed.

        Raises ``VhostUserProtocolError``; see the module docstring for the
        state each error leaves.
        """
        if self._failed is not None:
            raise self._unusable()
        if len(self._buf) < HEADER_SIZE:
            return None
        header = HEADER.unpack_from(self._buf)
        self._check_framing(*header)
        end = HEADER_SIZE + header[2]
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_SIZE:end])
        fds = self._take_fds(self._start + end)
        del self._buf[:end]
        self._start += end
        try:
            message, dropped = _decode(self.requests, self.replies, header, payload, fds)
        except VhostUserProtocolError:
            close_fds(fds)
            raise
        close_fds(dropped)
        return message

    def feed_eof(self) -> None:
        """The peer closed the stream; raises if it did so mid-message."""
        if self._failed is not None or not self._buf:
            return
        if len(self._buf) < HEADER_SIZE:
            text = f"truncated header: {len(self._buf)} of {HEADER_SIZE} bytes"
            self._fail(VhostUserProtocolError(text, framing_intact=False))
        else:
            number, flags, size = HEADER.unpack_from(self._buf)
            text = f"truncated payload: {len(self._buf) - HEADER_SIZE} of {size} bytes"
            self._fail(self._framing_error(number, flags, text))

    def close(self) -> None:
        """Drop buffered bytes and close every fd not yet handed out in a Message."""
        if self._failed is None:
            self._failed = VhostUserProtocolError("parser closed", framing_intact=False)
        self._drop_all()

    def _take_fds(self, end: int) -> list[int]:
        fds: list[int] = []
        while self._fd_batches and self._fd_batches[0][0] <= end:
            fds += self._fd_batches.pop(0)[1]
        return fds

    def _check_framing(self, number: int, flags: int, size: int) -> None:
        if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
            version = flags & VHOST_USER_VERSION_MASK
            text = f"flags {flags:#x}: version {version} (bits 0-1), expected {VHOST_USER_VERSION}"
            self._fail(self._framing_error(number, flags, text))
        if size > self.max_payload_size:
            text = f"payload size {size} exceeds the maximum of {self.max_payload_size}"
            self._fail(self._framing_error(number, flags, text))

    def _framing_error(self, number: int, flags: int, text: str) -> VhostUserProtocolError:
        request = number if number not in REQUESTS[self.requests] else self.requests(number)
        return _request_error(request, flags, text, framing_intact=False)

    def _fail(self, error: VhostUserProtocolError) -> None:
        self._failed = error
        self._drop_all()
        raise error

    def _drop_all(self) -> None:
        for _end, fds in self._fd_batches:
            close_fds(fds)
        self._fd_batches.clear()
        self._buf.clear()

    def _unusable(self) -> VhostUserProtocolError:
        return VhostUserProtocolError(
            f"parser unusable after an earlier error: {self._failed}",
            framing_intact=False,
            request=self._failed.request if self._failed else None,
            flags=self._failed.flags if self._failed else None,
        )


def decode(
    data: bytes,
    fds: Sequence[int] = (),
    *,
    requests: type[FrontendRequest] | type[BackendRequest] = FrontendRequest,
    replies: bool = False,
) -> Message:
    """Exactly one message from ``data`` (its fds: ``fds``); short or long data is an error."""
    if len(data) >= HEADER_SIZE:
        number, flags, size = HEADER.unpack_from(data)
        if len(data) > HEADER_SIZE + size:
            close_fds(fds)
            text = f"{len(data) - HEADER_SIZE - size} trailing bytes after the message"
            raise _request_error(number, flags, text, framing_intact=False)
    parser = MessageParser(requests, replies=replies)
    parser.feed(data, fds)
    message = parser.next_message()
    if message is None:
        parser.feed_eof()  # raises when data ends mid-message; not for no data at all
        parser.close()  # the fds are not handed out in a message: close them
        raise VhostUserProtocolError(
            f"no message: 0 of {HEADER_SIZE} header bytes", framing_intact=False
        )
    return message


# -- what a back-end (or a front-end, on the back-end channel) answers ----------------


def needs_reply(message: Message) -> bool:
    """Whether the receiver of ``message`` must send exactly one reply.

    Requests with a reply body always get one ("Communication"); any other
    gets a REPLY_ACK when the sender set NEED_REPLY. NEED_REPLY on a request
    that already has a reply body "brings no behavioural change": still one
    reply, the body -- never an extra ack.
    """
    if message.is_reply:
        return False
    spec = _spec_of(message.request)
    always = spec is not None and spec.kind is not ReplyKind.ACK
    return always or message.need_reply


def reply(message: Message, payload: Payload = b"", fds: Sequence[int] = ()) -> Message:
    """The reply to ``message``: same request, version 1 + REPLY, NEED_REPLY cleared."""
    flags = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK
    return Message(message.request, flags, payload, tuple(fds))


def ack(message: Message, ok: bool = True) -> Message:
    """A REPLY_ACK reply: u64 0 on success, non-zero on failure.

    Also the reply of requests whose explicit reply body is a u64 status
    (IOTLB_MSG, POSTCOPY_END, CHECK_DEVICE_STATE, SET_DEVICE_STATE_FD, ...).
    Refused for requests whose reply carries data (GET_FEATURES ...): a
    status there would be read as data.
    """
    spec = _spec_of(message.request)
    if spec is not None and spec.kind is ReplyKind.BODY:
        raise ValueError(f"{spec_name(message.request)} replies with data, not an ack: use reply()")
    status = 0 if ok else 1
    if message.request is FrontendRequest.SET_DEVICE_STATE_FD:
        # "Bit 8 is the invalid FD flag": an ack carries no fd, and without
        # the flag QEMU would wait for a back-end-provided transfer fd.
        status |= VHOST_USER_VRING_NOFD_MASK
    return reply(message, U64(status))


def rejection_ack(error: VhostUserProtocolError) -> Message | None:
    """The REPLY_ACK failure owed for a refused request, or ``None``.

    Owed when the framing survived (the connection goes on) and the refused
    request wanted a status: NEED_REPLY set, or a request whose reply is a u64
    status anyway. A refused request whose reply carries data (GET_FEATURES,
    GET_VRING_BASE, ...) gets ``None``: no status can stand in for the data
    the sender is blocked on, so the caller should drop the connection.
    """
    if not error.framing_intact or error.request is None or error.flags is None:
        return None
    if error.flags & VHOST_USER_REPLY_MASK:
        return None  # a refused reply is never answered
    spec = _spec_of(error.request)
    kind = spec.kind if spec is not None else ReplyKind.ACK
    if kind is ReplyKind.BODY:
        return None
    if kind is ReplyKind.ACK and not error.flags & VHOST_USER_NEED_REPLY_MASK:
        return None
    return ack(Message(error.request, error.flags), ok=False)
