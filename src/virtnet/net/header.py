"""virtio-net header codec (VIRTIO 1.2, 5.1.6 "Device Operation").

    struct virtio_net_hdr {            struct virtio_net_hdr_mrg_rxbuf {
        u8 flags; u8 gso_type;             struct virtio_net_hdr hdr;
        le16 hdr_len; le16 gso_size;       le16 num_buffers;
        le16 csum_start; le16 csum_offset; };            /* 12 bytes */
    };                                  /* 10 bytes */

With VERSION_1 or MRG_RXBUF the header is always the 12-byte one.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from virtnet.net.features import VirtioNetF
from virtnet.virtio.features import VirtioF, has

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_F_DATA_VALID: Final = 2
VIRTIO_NET_HDR_F_RSC_INFO: Final = 4

VIRTIO_NET_HDR_GSO_NONE: Final = 0
VIRTIO_NET_HDR_GSO_TCPV4: Final = 1
VIRTIO_NET_HDR_GSO_UDP: Final = 3
VIRTIO_NET_HDR_GSO_TCPV6: Final = 4
VIRTIO_NET_HDR_GSO_UDP_L4: Final = 5
VIRTIO_NET_HDR_GSO_ECN: Final = 0x80

HDR: Final = struct.Struct("<BBHHHH")
MRG_HDR: Final = struct.Struct("<BBHHHHH")
HDR_LEN: Final = HDR.size  # 10
MRG_HDR_LEN: Final = MRG_HDR.size  # 12
NUM_BUFFERS: Final = struct.Struct("<H")
NUM_BUFFERS_OFFSET: Final = HDR_LEN


@dataclass(slots=True)
class VirtioNetHdr:
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self, mergeable: bool = True) -> bytes:
        if mergeable:
            return MRG_HDR.pack(
                self.flags, self.gso_type, self.hdr_len, self.gso_size,
                self.csum_start, self.csum_offset, self.num_buffers,
            )  # fmt: skip
        return HDR.pack(
            self.flags, self.gso_type, self.hdr_len, self.gso_size,
            self.csum_start, self.csum_offset,
        )  # fmt: skip

    def pack_into(self, buf: WriteableBuffer, offset: int = 0, mergeable: bool = True) -> None:
        if mergeable:
            MRG_HDR.pack_into(
                buf, offset, self.flags, self.gso_type, self.hdr_len, self.gso_size,
                self.csum_start, self.csum_offset, self.num_buffers,
            )  # fmt: skip
        else:
            HDR.pack_into(
                buf, offset, self.flags, self.gso_type, self.hdr_len, self.gso_size,
                self.csum_start, self.csum_offset,
            )  # fmt: skip

    @classmethod
    def unpack(
        cls, buf: bytes | bytearray | memoryview, offset: int = 0, mergeable: bool = True
    ) -> VirtioNetHdr:
        need = MRG_HDR_LEN if mergeable else HDR_LEN
        if len(buf) - offset < need:
            raise ValueError(f"virtio-net header needs {need} bytes, got {len(buf) - offset}")
        if mergeable:
            return cls(*MRG_HDR.unpack_from(buf, offset))
        return cls(*HDR.unpack_from(buf, offset))

    @property
    def gso(self) -> int:
        return self.gso_type & ~VIRTIO_NET_HDR_GSO_ECN

    @property
    def ecn(self) -> bool:
        return bool(self.gso_type & VIRTIO_NET_HDR_GSO_ECN)


def hdr_len_for(features: int) -> int:
    """5.1.6.1: the header is 12 bytes with VERSION_1 or MRG_RXBUF, else 10."""
    if has(features, VirtioF.VERSION_1) or has(features, VirtioNetF.MRG_RXBUF):
        return MRG_HDR_LEN
    return HDR_LEN


_GSO_TYPES: Final = (
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
)


CSUM_MANGLED_0: Final = 0xFFFF  # a computed checksum of 0 is sent as 0xFFFF (UDP: 0 = none)
_BE16: Final = struct.Struct("!H")


def complete_csum(frame: bytes, hdr: bytes) -> tuple[bytes, bytes] | None:
    """(frame, header) with a partial checksum finished, for a driver without GUEST_CSUM
    (VIRTIO 1.2, 5.1.6.4.1: flags MUST be 0, the packet SHOULD be fully checksummed): the
    one's complement sum from csum_start to the end, stored at csum_start + csum_offset
    (Linux skb_checksum_help). None when that field is not inside the frame -- a driver's
    csum_start / csum_offset past it (DPDK CVE-2024-11614's class): nothing outside the
    frame is read or written, the frame is dropped."""
    _f, _g, _h, _s, start, offset = HDR.unpack_from(hdr)
    at = start + offset
    if at + 2 > len(frame):
        return None
    data = bytearray(frame)
    # The field holds the driver's seed (the pseudo-header sum): it is summed in place.
    part = frame[start:] + (b"\0" if (len(frame) - start) % 2 else b"")
    total = 0
    for (word,) in _BE16.iter_unpack(part):
        total += word
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    _BE16.pack_into(data, at, (~total & 0xFFFF) or CSUM_MANGLED_0)
    return bytes(data), bytes([hdr[0] & ~VIRTIO_NET_HDR_F_NEEDS_CSUM]) + hdr[1:]


def hdr_error(hdr: bytes, frame_len: int) -> tuple[str, str] | None:
    """What is wrong with a received header for a ``frame_len``-byte frame, or None.

    The checks of Linux's virtio_net_hdr_to_skb(): a checksum request must lie inside
    the frame (skb_partial_csum_set), a GSO type must be known and carry a gso_size.
    Returns (fault kind, description) with the kinds of net/faults.py.
    """
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = HDR.unpack_from(hdr)
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and csum_start + csum_offset + 2 > frame_len:
        return ("bad_csum", f"csum_start {csum_start} + csum_offset {csum_offset} past "
                f"the {frame_len}-byte frame")  # fmt: skip
    gso = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso != VIRTIO_NET_HDR_GSO_NONE:
        if gso not in _GSO_TYPES:
            return ("bad_gso", f"bad gso: unknown type {gso_type}, size {gso_size}")
        if gso_size == 0:
            return ("bad_gso", f"bad gso: type {gso_type}, size 0")
    return None


def gather(views: Sequence[bytes | memoryview], offset: int, length: int) -> bytes:
    """``length`` bytes from ``offset`` of the concatenation of ``views`` (any layout):
    a header, a filter's peek or a control command read out of a frame's pieces."""
    out = bytearray()
    for view in views:
        n = len(view)
        if offset >= n:
            offset -= n
            continue
        out += view[offset : offset + length - len(out)]
        offset = 0
        if len(out) == length:
            break
    return bytes(out)


def strip_hdr(views: Sequence[memoryview], hdr_len: int) -> list[memoryview]:
    """The views past the first ``hdr_len`` bytes of their concatenation: the frame
    without its virtio-net header, which may span segments (any layout)."""
    out: list[memoryview] = []
    skip = hdr_len
    for v in views:
        if skip >= len(v):
            skip -= len(v)
            continue
        out.append(v[skip:] if skip else v)
        skip = 0
    return out
