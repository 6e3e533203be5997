"""virtio-net header codec against the spec's byte offsets (VIRTIO 1.2, 5.1.6).

    offset 0 u8 flags, 1 u8 gso_type, 2 le16 hdr_len, 4 le16 gso_size,
           6 le16 csum_start, 8 le16 csum_offset, 10 le16 num_buffers (12-byte header only)
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet.net.features import VirtioNetF
from virtnet.net.header import (
    HDR_LEN,
    MRG_HDR_LEN,
    NUM_BUFFERS_OFFSET,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_F_RSC_INFO,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VirtioNetHdr,
    hdr_len_for,
)
from virtnet.virtio.features import VirtioF, bit

# Every field a different value with distinct bytes, so an offset or byte-order slip shows.
SAMPLE = VirtioNetHdr(
    flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
    gso_type=VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
    hdr_len=0x0102,
    gso_size=0x0304,
    csum_start=0x0506,
    csum_offset=0x0708,
    num_buffers=0x090A,
)


def field_at(raw: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from("<" + fmt, raw, offset)[0]


def test_constants_have_the_spec_values():
    assert (HDR_LEN, MRG_HDR_LEN, NUM_BUFFERS_OFFSET) == (10, 12, 10)
    assert (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_DATA_VALID) == (1, 2)
    assert VIRTIO_NET_HDR_F_RSC_INFO == 4
    assert (VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP) == (0, 1, 3)
    assert (VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4) == (4, 5)
    assert VIRTIO_NET_HDR_GSO_ECN == 0x80


def test_the_12_byte_header_puts_each_field_at_its_offset():
    raw = SAMPLE.pack()
    assert len(raw) == 12
    assert field_at(raw, 0, "B") == VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert field_at(raw, 1, "B") == 0x81
    assert field_at(raw, 2, "H") == 0x0102
    assert field_at(raw, 4, "H") == 0x0304
    assert field_at(raw, 6, "H") == 0x0506
    assert field_at(raw, 8, "H") == 0x0708
    assert field_at(raw, 10, "H") == 0x090A
    assert raw == bytes.fromhex("0181 0201 0403 0605 0807 0a09")


def test_the_10_byte_header_is_the_same_without_num_buffers():
    raw = SAMPLE.pack(mergeable=False)
    assert raw == bytes.fromhex("0181 0201 0403 0605 0807")
    assert raw == SAMPLE.pack()[:10]


def test_a_header_written_by_hand_unpacks_field_by_field():
    raw = bytearray(12)
    raw[0] = VIRTIO_NET_HDR_F_DATA_VALID
    raw[1] = VIRTIO_NET_HDR_GSO_TCPV6
    struct.pack_into("<H", raw, 2, 54)
    struct.pack_into("<H", raw, 4, 1448)
    struct.pack_into("<H", raw, 6, 34)
    struct.pack_into("<H", raw, 8, 16)
    struct.pack_into("<H", raw, 10, 3)
    hdr = VirtioNetHdr.unpack(raw)
    assert hdr == VirtioNetHdr(VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_TCPV6,
                               54, 1448, 34, 16, 3)  # fmt: skip
    short = VirtioNetHdr.unpack(raw, mergeable=False)
    assert short.num_buffers == 0 and short.csum_offset == 16


def test_pack_into_and_unpack_at_an_offset():
    buf = bytearray(b"\xff" * 32)
    SAMPLE.pack_into(buf, 5)
    assert buf[:5] == b"\xff" * 5 and buf[17:] == b"\xff" * 15
    assert VirtioNetHdr.unpack(buf, 5) == SAMPLE
    SAMPLE.pack_into(buf, 20, mergeable=False)
    assert buf[30:] == b"\xff\xff"
    assert VirtioNetHdr.unpack(memoryview(buf), 20, mergeable=False).csum_start == 0x0506


@pytest.mark.parametrize(
    ("length", "offset", "mergeable"),
    [(11, 0, True), (12, 1, True), (9, 0, False), (0, 0, False), (15, 6, True)],
)
def test_a_short_buffer_is_refused_naming_the_sizes(length, offset, mergeable):
    need = 12 if mergeable else 10
    with pytest.raises(ValueError, match=f"needs {need} bytes, got {length - offset}"):
        VirtioNetHdr.unpack(bytes(length), offset, mergeable=mergeable)


def test_gso_and_ecn_split_the_gso_type_byte():
    assert SAMPLE.gso == VIRTIO_NET_HDR_GSO_TCPV4 and SAMPLE.ecn
    plain = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_UDP_L4)
    assert plain.gso == VIRTIO_NET_HDR_GSO_UDP_L4 and not plain.ecn


@pytest.mark.parametrize(
    ("features", "length"),
    [
        (bit(VirtioF.VERSION_1), 12),
        (bit(VirtioNetF.MRG_RXBUF), 12),
        (bit(VirtioF.VERSION_1) | bit(VirtioNetF.MRG_RXBUF), 12),
        (0, 10),
        (bit(VirtioNetF.CSUM) | bit(VirtioF.RING_EVENT_IDX), 10),
    ],
)
def test_the_header_is_12_bytes_with_version_1_or_mrg_rxbuf(features, length):
    # 5.1.6.1: legacy without MRG_RXBUF is the only 10-byte case.
    assert hdr_len_for(features) == length


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)


@settings(max_examples=200, deadline=None)
@given(st.tuples(u8, u8, u16, u16, u16, u16, u16))
def test_every_header_round_trips_through_its_bytes(fields):
    hdr = VirtioNetHdr(*fields)
    raw = hdr.pack()
    assert VirtioNetHdr.unpack(raw) == hdr
    assert struct.unpack("<BBHHHHH", raw) == fields
    short = VirtioNetHdr.unpack(hdr.pack(mergeable=False), mergeable=False)
    assert short == VirtioNetHdr(*fields[:6])
