"""Synthetic traffic: a generator of verifiable frames and a sink that checks them.

Every frame is an Ethernet header (EtherType 0x88B5, IEEE "local
experimental"), the frame's own length and its 32-bit sequence number (network
order, 22 bytes in all), then a slice of a fixed pattern that starts at
``seq & 0xff``. The sink copies a frame out of guest memory once, reads those
three fields and compares the rest with the pattern (one memcmp): a frame cut
short or grown, duplicated, reordered, lost or
corrupted is counted under its own name. The generator never builds a large
frame — it hands out views of the pattern (the device's copy into guest memory
is the only copy, as a NIC's DMA would be); a small one (up to 128 bytes: 64 B,
an ACK) it hands out whole, as one bytes object, which costs less than two pieces.

A sink checks one stream, the frames of one generator: with N queue pairs every
pair has a generator and a sink of its own, so sequence numbers never mix.
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
_TAG: Final = struct.Struct("!I")  # the frame's length, after the Ethernet header
_PREFIX: Final = struct.Struct("!18sI")  # Ethernet header + length (made once), seq
PREFIX_LEN: Final = _PREFIX.size  # 22
SEQ_MASK: Final = 0xFFFFFFFF  # sequence numbers wrap at 2^32 (a multiple of the pattern's 256)
_SEQ_HALF: Final = 1 << 31  # a number this far ahead or more is behind (RFC 1982)
MIN_FRAME: Final = PREFIX_LEN
WHOLE_FRAME_MAX: Final = 128  # FrameGen hands out frames up to this size as one piece
_BYTE: Final = [bytes((i,)) for i in range(256)]
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


# What the sink counts against its stream, each a way a frame can be wrong; in the
# backends' stats as sink_KIND, in a bench record's "integrity": any of them fails a run.
SINK_COUNTS: Final = ("corrupt", "lost", "short", "long", "duplicated", "reordered", "foreign")


def frame_head(frame_len: int, src: bytes = SRC_MAC, dst: bytes = DST_MAC) -> bytes:
    """The first 18 bytes of every frame of this length: Ethernet header, length."""
    return _ETH.pack(dst, src, ETH_P_LOCAL_EXP) + _TAG.pack(frame_len)


def frame_prefix(
    seq: int, frame_len: int, src: bytes = SRC_MAC, dst: bytes = DST_MAC
) -> bytes:
    return _PREFIX.pack(frame_head(frame_len, src, dst), seq & SEQ_MASK)


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
        # Made once, not per frame: the Ethernet header and length, and the payload
        # view for each of the pattern's 256 starting offsets (seq & 0xff picks one).
        self._head = frame_head(size, src, dst)
        self._payloads = [pattern_view(off, size) for off in range(256)]
        # A small frame (64 B, an ACK) is handed out whole, one bytes object: one
        # copy of its few bytes costs less than a second piece to store.
        self._whole = (
            [bytes(v) for v in self._payloads] if size <= WHOLE_FRAME_MAX else None
        )
        # The prefix but its last byte, remade once every 256 frames.
        self._upper = b""
        self._upper_seq = -1

    def peek(self) -> list[bytes | memoryview]:
        """The next frame without consuming it: [prefix, pattern view], or for a
        small frame [the whole frame]."""
        whole = self.whole()
        if whole is not None:
            return [whole]
        return [self.prefix(), self.payload()]

    def whole(self) -> bytes | None:
        """The next frame as one bytes object if it is small (None if not)."""
        payloads = self._whole
        if payloads is None:
            return None
        return self.prefix() + payloads[self.seq & 0xFF]

    def prefix(self) -> bytes:
        """The next frame's Ethernet header, length and sequence number."""
        seq = self.seq & SEQ_MASK
        if seq >> 8 != self._upper_seq:
            self._upper_seq = seq >> 8
            self._upper = self._head + (seq >> 8).to_bytes(3, "big")  # _PREFIX's seq
        return self._upper + _BYTE[seq & 0xFF]

    def payload(self) -> memoryview:
        """The rest of the next frame: a view of the pattern."""
        return self._payloads[self.seq & 0xFF]

    def advance(self) -> None:
        self.seq += 1

    def write_into(self, dst: memoryview, seq: int) -> None:
        """Write frame ``seq`` into ``dst`` (a guest page run), for guest-side senders."""
        prefix = frame_prefix(seq, self.size, self.src, self.dst)
        dst[:PREFIX_LEN] = prefix
        dst[PREFIX_LEN : self.size] = pattern_view(seq, self.size)


@final
@dataclass
class SinkStats:
    packets: int = 0
    bytes: int = 0
    corrupt: int = 0  # the payload differs from the pattern
    lost: int = 0  # sequence numbers skipped and not seen since
    short: int = 0  # fewer bytes than the frame's header says (or not even a header)
    long: int = 0  # more bytes than the frame's header says
    duplicated: int = 0  # a sequence number seen before
    reordered: int = 0  # a sequence number skipped earlier that came late
    foreign: int = 0  # frames that are not ours (counted, not checked)
    errors: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """SINK_COUNTS by name."""
        return {"corrupt": self.corrupt, "lost": self.lost, "short": self.short,
                "long": self.long, "duplicated": self.duplicated,
                "reordered": self.reordered, "foreign": self.foreign}  # fmt: skip


@final
class FrameSink:
    """Checks every frame of one generator's stream: its length against its header,
    its sequence number against the stream's, every byte against the pattern."""

    MAX_ERRORS_KEPT: Final = 10
    # Gaps remembered, so that a frame that comes late is told from a duplicate; past
    # this many the oldest is forgotten (a frame of it is then counted duplicated).
    MAX_GAPS: Final = 64

    def __init__(self, verify: bool = True) -> None:
        self.stats = SinkStats()
        self.expected = 0  # the next sequence number, counted from the stream's start
        self.gaps: list[tuple[int, int]] = []  # [lo, hi) skipped, oldest first
        self.verify = verify

    def restart(self) -> None:
        """A new stream: a new front-end's generator starts again at frame 0."""
        self.expected = 0
        self.gaps.clear()

    def receive(self, frame: bytes | bytearray | Sequence[memoryview | bytes]) -> bool:
        """``frame`` is bytes or a list of views (header excluded); True if intact."""
        if isinstance(frame, bytes):
            return self.check(frame)
        if isinstance(frame, bytearray):
            return self.check(bytes(frame))
        # Views into guest memory: one copy out, then every check is on bytes, which
        # compiled code indexes, slices and compares in C (a memoryview it cannot).
        return self.check(b"".join(frame))

    def check(self, data: bytes) -> bool:
        """Check one whole frame; True if intact (or foreign: counted, not checked)."""
        st = self.stats
        n = len(data)
        st.packets += 1
        st.bytes += n
        if n < PREFIX_LEN:
            return self._runt(data, n)
        if data[12] != ETH_P_LOCAL_EXP >> 8 or data[13] != ETH_P_LOCAL_EXP & 0xFF:
            st.foreign += 1
            return True
        if not self.verify:
            return True
        # The two big-endian u32s after the EtherType, byte by byte: compiled, each is
        # one load from the bytes object (struct.unpack_from is a call by name).
        length = data[14] << 24 | data[15] << 16 | data[16] << 8 | data[17]
        seq = data[18] << 24 | data[19] << 16 | data[20] << 8 | data[21]
        ok = True
        if seq == self.expected & SEQ_MASK:
            self.expected += 1
        else:
            ok = self._out_of_order(seq, n)
        if n != length:
            if n < length:
                st.short += 1
            else:
                st.long += 1
            self._error(f"frame seq {seq}: {n} bytes, its header says {length}")
            return False
        # The payload is the pattern from seq & 0xff: one memcmp. A small frame's
        # against a slice of the pattern (bytes, C when compiled); a large one's in
        # place through a view, not against a copy of the pattern as long as it.
        off = seq & 0xFF
        if n <= WHOLE_FRAME_MAX:
            intact = data.endswith(PATTERN[off : off + n - PREFIX_LEN])
        else:
            intact = PATTERN.startswith(memoryview(data)[PREFIX_LEN:], off)
        if not intact:
            st.corrupt += 1
            self._error(f"frame seq {seq} ({n} bytes): payload differs")
            return False
        return ok

    def _error(self, message: str) -> None:
        if len(self.stats.errors) < self.MAX_ERRORS_KEPT:
            self.stats.errors.append(message)

    def _runt(self, data: bytes | bytearray | memoryview, n: int) -> bool:
        """A frame too short for our header: ours cut short when it says our EtherType
        or is not even an Ethernet header (nobody's frame is that short), else foreign."""
        if n >= ETH_HLEN and (data[12] << 8 | data[13]) != ETH_P_LOCAL_EXP:
            self.stats.foreign += 1
            return True
        self.stats.short += 1
        self._error(f"a {n}-byte frame: cut before its {PREFIX_LEN}-byte header ends")
        return False

    def _out_of_order(self, seq: int, n: int) -> bool:
        """``seq`` is not the next one: ahead (the frames between are lost, unless they
        come late), a skipped one coming late (reordered), or one seen (duplicated)."""
        st, expected = self.stats, self.expected
        ahead = (seq - expected) & SEQ_MASK
        if ahead < _SEQ_HALF:
            st.lost += ahead
            gaps = self.gaps
            gaps.append((expected, expected + ahead))
            if len(gaps) > self.MAX_GAPS:
                del gaps[0]
            self.expected = expected + ahead + 1
            return True
        behind = expected - (SEQ_MASK + 1 - ahead)  # the frame's place in the stream
        gaps = self.gaps
        for k in range(len(gaps) - 1, -1, -1):
            lo, hi = gaps[k]
            if lo <= behind < hi:
                gaps[k : k + 1] = [g for g in ((lo, behind), (behind + 1, hi)) if g[0] < g[1]]
                st.lost -= 1
                st.reordered += 1
                self._error(f"frame seq {seq} ({n} bytes): late, after seq {expected - 1}")
                return False
        st.duplicated += 1
        self._error(f"frame seq {seq} ({n} bytes): seen before (after seq {expected - 1})")
        return False
