"""Synthetic traffic: a generator of verifiable frames and a sink that checks them.

Every frame is an Ethernet header (EtherType 0x88B5, IEEE "local
experimental"), a 64-bit sequence number, then a slice of a fixed pattern
that starts at ``seq & 0xff``: any lost, duplicated, reordered or corrupted
byte is caught by one comparison, and the generator never builds a frame —
it hands out views of the pattern (the device's copy into guest memory is the
only copy, as a NIC's DMA would be).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, final

from virtnet.net.constants import ETH_HLEN
from virtnet.net.header import (
    MRG_HDR,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
)

ETH_P_LOCAL_EXP: Final = 0x88B5
SRC_MAC: Final = bytes.fromhex("525400000002")
DST_MAC: Final = bytes.fromhex("525400000001")
_ETH: Final = struct.Struct("!6s6sH")
_SEQ: Final = struct.Struct("<Q")
PREFIX_LEN: Final = ETH_HLEN + _SEQ.size  # 22
MIN_FRAME: Final = PREFIX_LEN
MAX_FRAME: Final = 65536 + ETH_HLEN
PATTERN: Final = bytes(range(256)) * ((MAX_FRAME + 512) // 256)
_PATTERN_VIEW: Final = memoryview(PATTERN)
# netperf TCP_STREAM over mtu 1500: MSS 1448, so GSO frames are cut in 1448-byte segments.
TCP_MSS = 1448
ACK_FRAME = 66  # Ethernet + IPv4 + TCP with timestamps, no payload


def vnet_hdr_for(frame_len: int) -> bytes:
    """The header a TSO-capable sender puts on a frame of this size."""
    if frame_len <= 1514:
        return MRG_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 0)
    return MRG_HDR.pack(0, VIRTIO_NET_HDR_GSO_TCPV4, 66, TCP_MSS, 0, 0, 0)


def frame_prefix(seq: int, src: bytes = SRC_MAC, dst: bytes = DST_MAC) -> bytes:
    return _ETH.pack(dst, src, ETH_P_LOCAL_EXP) + _SEQ.pack(seq)


def pattern_view(seq: int, frame_len: int) -> memoryview:
    off = seq & 0xFF
    return _PATTERN_VIEW[off : off + frame_len - PREFIX_LEN]


@final
class FrameGen:
    """Frames of ``size`` bytes (>= 22), numbered from 0."""

    def __init__(self, size: int, src: bytes = SRC_MAC, dst: bytes = DST_MAC) -> None:
        if not MIN_FRAME <= size <= MAX_FRAME:
            raise ValueError(f"frame size {size} outside {MIN_FRAME}..{MAX_FRAME}")
        self.size = size
        self.seq = 0
        self.src = src
        self.dst = dst
        self.hdr = vnet_hdr_for(size)
        # Made once, not per frame: the Ethernet header, and the payload view for
        # each of the pattern's 256 starting offsets (seq & 0xff picks one).
        self._eth = _ETH.pack(dst, src, ETH_P_LOCAL_EXP)
        self._payloads = [pattern_view(off, size) for off in range(256)]

    def peek(self) -> list[bytes | memoryview]:
        """The next frame as [prefix, pattern view] without consuming it."""
        return [self.prefix(), self.payload()]

    def prefix(self) -> bytes:
        """The next frame's Ethernet header and sequence number."""
        return self._eth + _SEQ.pack(self.seq)

    def payload(self) -> memoryview:
        """The rest of the next frame: a view of the pattern."""
        return self._payloads[self.seq & 0xFF]

    def advance(self) -> None:
        self.seq += 1

    def write_into(self, dst: memoryview, seq: int) -> None:
        """Write frame ``seq`` into ``dst`` (a guest page run), for guest-side senders."""
        prefix = frame_prefix(seq, self.src, self.dst)
        dst[:PREFIX_LEN] = prefix
        dst[PREFIX_LEN : self.size] = pattern_view(seq, self.size)


@final
@dataclass
class SinkStats:
    packets: int = 0
    bytes: int = 0
    corrupt: int = 0
    lost: int = 0  # sequence numbers skipped
    reordered: int = 0
    foreign: int = 0  # frames that are not ours (counted, not checked)
    errors: list[str] = field(default_factory=list)


@final
class FrameSink:
    """Checks every byte of every frame against the generator's pattern."""

    MAX_ERRORS_KEPT: Final = 10

    def __init__(self, verify: bool = True) -> None:
        self.stats = SinkStats()
        self.expected = 0
        self.verify = verify

    def receive(self, frame: bytes | bytearray | Sequence[memoryview | bytes]) -> bool:
        """``frame`` is bytes or a list of views (header excluded); True if intact."""
        data: bytes | bytearray | memoryview
        if isinstance(frame, (bytes, bytearray)):
            data = frame
        elif len(frame) == 1:  # one piece (every frame that fits a buffer): no join
            data = frame[0]
        else:
            data = b"".join(frame)
        st = self.stats
        st.packets += 1
        st.bytes += len(data)
        if len(data) < PREFIX_LEN or data[12] != 0x88 or data[13] != 0xB5:  # EtherType
            st.foreign += 1
            return True
        if not self.verify:
            return True
        seq: int = _SEQ.unpack_from(data, ETH_HLEN)[0]
        if seq != self.expected:
            if seq > self.expected:
                st.lost += seq - self.expected
            else:
                st.reordered += 1
        self.expected = seq + 1
        off = seq & 0xFF
        # One memcmp against the pattern in place, no slice of either copied
        # (a memoryview == memoryview comparison would go item by item).
        if not PATTERN.startswith(memoryview(data)[PREFIX_LEN:], off):
            st.corrupt += 1
            if len(st.errors) < self.MAX_ERRORS_KEPT:
                st.errors.append(f"frame seq {seq} ({len(data)} bytes): payload differs")
            return False
        return True
