"""The frame a back-end sends for a guest that just moved (vhost-user SEND_RARP).

QEMU's ``qemu_announce_self`` (net/announce.c ``announce_self_create``) and DPDK's
``make_rarp_packet`` send the same one: a broadcast RARP "request reverse" naming the
guest's MAC as sender and target, so the switches on the way learn the port the guest
now sits behind. With VIRTIO_NET_F_GUEST_ANNOUNCE the guest announces itself instead
(gratuitous ARP, after VIRTIO_NET_S_ANNOUNCE; QEMU sends no SEND_RARP then).
"""

from __future__ import annotations

import struct
from typing import Final

from virtnet.net.constants import ETH_HLEN

ETH_P_RARP: Final = 0x8035
ARPHRD_ETHER: Final = 1
ETH_P_IP: Final = 0x0800
ARPOP_RREQUEST: Final = 3  # RFC 903 "request reverse"
ETH_ZLEN: Final = 60  # the shortest Ethernet frame without its FCS
BROADCAST: Final = b"\xff" * 6
_RARP: Final = struct.Struct("!HHBBH6s4s6s4s")


def rarp_frame(mac: bytes) -> bytes:
    """The RARP announcement of ``mac`` (6 bytes), padded to ETH_ZLEN."""
    if len(mac) != 6:
        raise ValueError(f"a MAC is 6 bytes, not {len(mac)}")
    eth = BROADCAST + mac + ETH_P_RARP.to_bytes(2, "big")
    body = _RARP.pack(ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_RREQUEST, mac, bytes(4), mac, bytes(4))
    frame = eth + body
    assert len(eth) == ETH_HLEN
    return frame.ljust(ETH_ZLEN, b"\0")


def mac_of_rarp(payload: int) -> bytes:
    """SEND_RARP's u64: "the first 6 bytes" are the MAC, in the order they are sent."""
    return payload.to_bytes(8, "little")[:6]
