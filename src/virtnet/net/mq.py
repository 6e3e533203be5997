"""Multiqueue helpers: tx queue selection and per-queue counters.

virtio_net has no ``ndo_select_queue``: the stack's ``netdev_pick_tx`` falls back
to ``skb_tx_hash`` — the flow dissector's keys hashed (``skb_get_hash``), then
``reciprocal_scale(hash, real_num_tx_queues)``. ``select_queue`` is that, per
packet, so it parses with precompiled Structs and builds one small key.
Like ``__flow_hash_consistentify`` the key puts the lower address (then port)
first, so both directions of a flow hash alike.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from typing import Final

ETH_HLEN: Final = 14
ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
# 802.1Q and 802.1ad tags: the flow dissector skips up to two (QinQ).
VLAN_TPIDS: Final = (0x8100, 0x88A8)
VLAN_HLEN: Final = 4
IPV6_HLEN: Final = 40
# L4 protocols whose first four bytes are (source port, destination port).
PORT_PROTOS: Final = frozenset((6, 17, 33, 132, 136))  # TCP, UDP, DCCP, SCTP, UDP-Lite
IP_MF: Final = 0x2000
IP_OFFSET: Final = 0x1FFF

_BE16: Final = struct.Struct(">H")
_MAC_PAIR: Final = struct.Struct("6s6s")
_V4: Final = struct.Struct(">BxxxxxHxBxxII")  # ver/ihl, frag_off, protocol, saddr, daddr
_V6: Final = struct.Struct(">6xBx16s16s")  # next header, saddr, daddr
_PORTS: Final = struct.Struct(">HH")
_KEY4: Final = struct.Struct(">IIHHBx")
_KEY6: Final = struct.Struct(">16s16sHHBx")
_KEY_MAC: Final = struct.Struct("6s6s")


def reciprocal_scale(val: int, ep_ro: int) -> int:
    """include/linux/kernel.h: ``val`` (u32) scaled into [0, ep_ro) without a division."""
    return (val * ep_ro) >> 32


def flow_hash(frame: bytes | bytearray | memoryview) -> int:
    """A u32 hash of the frame's flow keys (skb_get_hash); 0 for frames too short to
    carry two MAC addresses."""
    n = len(frame)
    if n < ETH_HLEN:
        return 0
    off = 12
    (proto,) = _BE16.unpack_from(frame, off)
    tags = 0
    while proto in VLAN_TPIDS and tags < 2 and n >= off + 2 + VLAN_HLEN:
        off += VLAN_HLEN
        (proto,) = _BE16.unpack_from(frame, off)
        tags += 1
    l3 = off + 2
    if proto == ETH_P_IP and n >= l3 + 20:
        vihl, frag, ipproto, saddr, daddr = _V4.unpack_from(frame, l3)
        if vihl >> 4 == 4 and (vihl & 0xF) >= 5:
            sport = dport = 0
            l4 = l3 + (vihl & 0xF) * 4
            # A fragment has no ports the dissector can trust (only the first has any).
            if ipproto in PORT_PROTOS and not frag & (IP_MF | IP_OFFSET) and n >= l4 + 4:
                sport, dport = _PORTS.unpack_from(frame, l4)
            if (daddr, dport) < (saddr, sport):
                saddr, daddr, sport, dport = daddr, saddr, dport, sport
            return zlib.crc32(_KEY4.pack(saddr, daddr, sport, dport, ipproto))
    elif proto == ETH_P_IPV6 and n >= l3 + IPV6_HLEN:
        if frame[l3] >> 4 == 6:
            nexthdr, saddr6, daddr6 = _V6.unpack_from(frame, l3)
            sport = dport = 0
            l4 = l3 + IPV6_HLEN
            if nexthdr in PORT_PROTOS and n >= l4 + 4:
                sport, dport = _PORTS.unpack_from(frame, l4)
            if (daddr6, dport) < (saddr6, sport):
                saddr6, daddr6, sport, dport = daddr6, saddr6, dport, sport
            return zlib.crc32(_KEY6.pack(saddr6, daddr6, sport, dport, nexthdr))
    # Not IP (or IP too mangled to parse): the MAC pair, in either order.
    dst, src = _MAC_PAIR.unpack_from(frame, 0)
    if dst < src:
        dst, src = src, dst
    return zlib.crc32(_KEY_MAC.pack(src, dst))


def select_queue(frame: bytes | bytearray | memoryview, nqueues: int) -> int:
    """The tx queue for ``frame`` among ``nqueues`` (skb_tx_hash's fallback)."""
    if nqueues <= 1:
        if nqueues == 1:
            return 0
        raise ValueError(f"nqueues must be at least 1, got {nqueues}")
    return (flow_hash(frame) * nqueues) >> 32  # reciprocal_scale, inlined


# -- per-queue counters (ethtool -S virtio_net naming) -------------------------------------


def per_queue_stats(pair: int, stats: dict[str, int]) -> dict[str, int]:
    """``rx_X`` → ``rx_queue_{pair}_X``, ``tx_X`` → ``tx_queue_{pair}_X`` (ethtool -S of
    virtio_net); other names (not per direction) count for the device as a whole only."""
    rx, tx = f"rx_queue_{pair}_", f"tx_queue_{pair}_"
    out = {}
    for name, value in stats.items():
        if name.startswith("rx_"):
            out[rx + name[3:]] = value
        elif name.startswith("tx_"):
            out[tx + name[3:]] = value
    return out


def sum_stats(many: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counters of several queues as one device's: summed, but ``*_max`` is the max."""
    total: dict[str, int] = {}
    for stats in many:
        for name, value in stats.items():
            if name not in total:
                total[name] = value
            elif name.endswith("_max"):
                if value > total[name]:
                    total[name] = value
            else:
                total[name] += value
    return total
