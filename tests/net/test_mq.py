"""Tx queue selection (skb_tx_hash's fallback) and per-queue counter names."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet.net.mq import (
    flow_hash,
    per_queue_stats,
    reciprocal_scale,
    select_queue,
    sum_stats,
)

MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")
TCP, UDP = 6, 17


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    tag = b"" if vlan is None else struct.pack(">HH", 0x8100, vlan)
    return dst + src + tag + struct.pack(">H", ethertype) + payload


def ipv4(src: int, dst: int, proto: int, l4: bytes, *, ident: int = 0, frag: int = 0,
         ttl: int = 64) -> bytes:  # fmt: skip
    hdr = struct.pack(">BBHHHBBHII", 0x45, 0, 20 + len(l4), ident, frag, ttl, proto, 0, src, dst)
    return hdr + l4


def ipv6(src: bytes, dst: bytes, nexthdr: int, l4: bytes) -> bytes:
    return struct.pack(">IHBB", 6 << 28, len(l4), nexthdr, 64) + src + dst + l4


def ports(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HH", sport, dport) + bytes(16) + payload


def tcp4(src, dst, sport, dport, payload=b"", **kw) -> bytes:
    return ether(MAC_B, MAC_A, 0x0800, ipv4(src, dst, TCP, ports(sport, dport, payload)), **kw)


def reply4(src, dst, sport, dport, payload=b"") -> bytes:
    return ether(MAC_A, MAC_B, 0x0800, ipv4(dst, src, TCP, ports(dport, sport, payload)))


A4, B4 = 0x0A000001, 0x0A000002
A6, B6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_a_flow_stays_on_one_queue(n: int) -> None:
    q = select_queue(tcp4(A4, B4, 40000, 5201), n)
    same_flow = [
        tcp4(A4, B4, 40000, 5201, b"x" * 1400),
        tcp4(A4, B4, 40000, 5201, vlan=7),  # a tag is not part of the flow
        ether(MAC_B, MAC_A, 0x0800, ipv4(A4, B4, TCP, ports(40000, 5201), ident=99, ttl=3)),
        reply4(A4, B4, 40000, 5201),  # the other direction, as Linux's consistentify
    ]
    assert [select_queue(f, n) for f in same_flow] == [q] * len(same_flow)


def test_ipv6_and_udp_flows() -> None:
    for nexthdr in (TCP, UDP):
        out = ether(MAC_B, MAC_A, 0x86DD, ipv6(A6, B6, nexthdr, ports(1234, 53, b"q")))
        back = ether(MAC_A, MAC_B, 0x86DD, ipv6(B6, A6, nexthdr, ports(53, 1234, b"answer")))
        assert flow_hash(out) == flow_hash(back)
        other = ether(MAC_B, MAC_A, 0x86DD, ipv6(A6, B6, nexthdr, ports(1235, 53)))
        assert flow_hash(other) != flow_hash(out)
    udp = ether(MAC_B, MAC_A, 0x0800, ipv4(A4, B4, UDP, ports(1234, 53)))
    tcp = ether(MAC_B, MAC_A, 0x0800, ipv4(A4, B4, TCP, ports(1234, 53)))
    assert flow_hash(udp) != flow_hash(tcp)  # the protocol is part of the key


def test_fragments_of_a_datagram_hash_alike() -> None:
    """Later fragments carry no ports, so no fragment's ports are used (flow dissector)."""
    first = ether(MAC_B, MAC_A, 0x0800, ipv4(A4, B4, UDP, ports(1, 2), frag=0x2000))
    later = ether(MAC_B, MAC_A, 0x0800, ipv4(A4, B4, UDP, b"\x99" * 24, frag=185))
    assert flow_hash(first) == flow_hash(later)


def random_flow(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    sport, dport = rng.randrange(1, 65536), rng.randrange(1, 65536)
    if kind == 0:
        return tcp4(rng.getrandbits(32), rng.getrandbits(32), sport, dport)
    if kind == 1:
        l4 = ipv6(rng.randbytes(16), rng.randbytes(16), UDP, ports(sport, dport))
        return ether(MAC_B, MAC_A, 0x86DD, l4)
    if kind == 2:
        return tcp4(A4, B4, sport, dport)  # one host pair, many connections
    mac = bytes([2]) + rng.randbytes(5)
    return ether(MAC_B, mac, 0x0806, bytes(28))  # ARP: the MAC pair


@pytest.mark.parametrize("n", range(2, 9))
def test_flows_spread_over_queues(n: int) -> None:
    rng = random.Random(n)
    counts = [0] * n
    for _ in range(1000):
        counts[select_queue(random_flow(rng), n)] += 1
    share = 1000 / n
    assert all(0.5 * share <= c <= 1.5 * share for c in counts), counts


def keyed_flow(rng: random.Random) -> tuple[bytes, bytes]:
    """A random frame and, built from the fields it was made of (not parsed back), the
    flow key mq.py documents: the lower (address, port) first, then the protocol --
    or, not IP, the lower MAC first."""
    kind = rng.randrange(3)
    sport, dport = rng.randrange(1, 65536), rng.randrange(1, 65536)
    if kind == 0:
        src, dst = rng.getrandbits(32), rng.getrandbits(32)
        (a, ap), (b, bp) = sorted([(src, sport), (dst, dport)])
        return tcp4(src, dst, sport, dport), struct.pack(">IIHHBx", a, b, ap, bp, TCP)
    if kind == 1:
        src6, dst6 = rng.randbytes(16), rng.randbytes(16)
        (a6, ap), (b6, bp) = sorted([(src6, sport), (dst6, dport)])
        frame = ether(MAC_B, MAC_A, 0x86DD, ipv6(src6, dst6, UDP, ports(sport, dport)))
        return frame, struct.pack(">16s16sHHBx", a6, b6, ap, bp, UDP)
    mac = bytes([2]) + rng.randbytes(5)
    lo, hi = sorted([MAC_B, mac])
    return ether(MAC_B, mac, 0x0806, bytes(28)), lo + hi  # ARP: the MAC pair


def test_select_queue_is_the_flow_keys_crc32_scaled_to_the_queues() -> None:
    # skb_tx_hash: reciprocal_scale(hash, n) = floor(hash * n / 2^32), computed here
    # from the frame's own fields, not by the functions under test.
    rng = random.Random(1)
    for _ in range(300):
        (f, key), n = keyed_flow(rng), rng.randrange(1, 64)
        h = zlib.crc32(key)
        assert flow_hash(f) == h
        assert select_queue(f, n) == h * n // 2**32
        assert reciprocal_scale(h, n) == h * n // 2**32
    assert reciprocal_scale(0xFFFFFFFF, 8) == 7 and reciprocal_scale(0, 8) == 0


def test_one_queue_and_no_queue() -> None:
    assert select_queue(tcp4(A4, B4, 1, 2), 1) == 0
    with pytest.raises(ValueError, match="at least 1"):
        select_queue(tcp4(A4, B4, 1, 2), 0)


def test_every_truncation_of_real_frames() -> None:
    frames = [
        tcp4(A4, B4, 1, 2, vlan=5),
        ether(MAC_B, MAC_A, 0x86DD, ipv6(A6, B6, TCP, ports(3, 4))),
        ether(MAC_B, MAC_A, 0x88A8, struct.pack(">HH", 0x8100, 9) + b"\x08\x00"),  # QinQ, cut
        ether(MAC_B, MAC_A, 0x0800, b"\x4f" + bytes(70)),  # ihl 15, nothing behind it
        ether(MAC_B, MAC_A, 0x0800, b"\x41" + bytes(30)),  # ihl 1: not IP
        ether(MAC_B, MAC_A, 0x86DD, b"\x40" + bytes(50)),  # version 4 in an IPv6 frame
    ]
    for f in frames:
        for cut in range(len(f) + 1):
            for view in (f[:cut], memoryview(f)[:cut], bytearray(f[:cut])):
                assert 0 <= select_queue(view, 4) < 4


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=96), st.integers(1, 64))
def test_garbage_never_raises(frame: bytes, n: int) -> None:
    assert 0 <= select_queue(frame, n) < n
    assert 0 <= flow_hash(frame) <= 0xFFFFFFFF


# -- per-queue counters ------------------------------------------------------------------------


def test_per_queue_stats_uses_ethtool_names() -> None:
    stats = {"rx_packets": 1, "rx_bytes": 2, "tx_packets": 3, "tx_kicks": 4, "desc_errors": 5}
    assert per_queue_stats(1, stats) == {
        "rx_queue_1_packets": 1,
        "rx_queue_1_bytes": 2,
        "tx_queue_1_packets": 3,
        "tx_queue_1_kicks": 4,
    }
    assert list(per_queue_stats(0, stats))[0] == "rx_queue_0_packets"


def test_sum_stats_sums_but_keeps_the_max() -> None:
    total = sum_stats(
        [
            {"rx_packets": 1, "rx_num_buffers_max": 3, "tx_bytes": 10},
            {"rx_packets": 2, "rx_num_buffers_max": 17, "desc_errors": 1},
            {"rx_packets": 4, "rx_num_buffers_max": 5, "tx_bytes": 1},
        ]
    )
    assert total == {"rx_packets": 7, "rx_num_buffers_max": 17, "tx_bytes": 11, "desc_errors": 1}
    assert sum_stats([]) == {}
