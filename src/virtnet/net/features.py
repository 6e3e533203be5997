"""virtio-net feature bits (VIRTIO 1.2, 5.1.3), negotiation, config space (5.1.4)."""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import ClassVar, final

from virtnet.virtio.errors import FeatureError
from virtnet.virtio.features import VirtioF, bit, feature_names


class VirtioNetF(IntEnum):
    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GSO = 6  # legacy
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    HOST_USO = 56
    HASH_REPORT = 57
    GUEST_HDRLEN = 59
    RSS = 60
    RSC_EXT = 61
    STANDBY = 62
    SPEED_DUPLEX = 63


# 5.1.3.1 "Feature bit requirements": a feature is only valid with all of these.
REQUIRES: dict[int, tuple[int, ...]] = {
    VirtioNetF.GUEST_TSO4: (VirtioNetF.GUEST_CSUM,),
    VirtioNetF.GUEST_TSO6: (VirtioNetF.GUEST_CSUM,),
    VirtioNetF.GUEST_ECN: (VirtioNetF.GUEST_TSO4,),  # or GUEST_TSO6, see _requires_ok
    VirtioNetF.GUEST_UFO: (VirtioNetF.GUEST_CSUM,),
    VirtioNetF.HOST_TSO4: (VirtioNetF.CSUM,),
    VirtioNetF.HOST_TSO6: (VirtioNetF.CSUM,),
    VirtioNetF.HOST_ECN: (VirtioNetF.HOST_TSO4,),  # or HOST_TSO6
    VirtioNetF.HOST_UFO: (VirtioNetF.CSUM,),
    VirtioNetF.HOST_USO: (VirtioNetF.CSUM,),
    VirtioNetF.CTRL_RX: (VirtioNetF.CTRL_VQ,),
    VirtioNetF.CTRL_VLAN: (VirtioNetF.CTRL_VQ,),
    VirtioNetF.GUEST_ANNOUNCE: (VirtioNetF.CTRL_VQ,),
    VirtioNetF.MQ: (VirtioNetF.CTRL_VQ,),
    VirtioNetF.CTRL_MAC_ADDR: (VirtioNetF.CTRL_VQ,),
    VirtioNetF.RSS: (VirtioNetF.CTRL_VQ,),
    VirtioNetF.HASH_REPORT: (VirtioNetF.CTRL_VQ,),
}
# ECN needs TSO4 *or* TSO6.
_EITHER: dict[int, tuple[int, ...]] = {
    VirtioNetF.GUEST_ECN: (VirtioNetF.GUEST_TSO4, VirtioNetF.GUEST_TSO6),
    VirtioNetF.HOST_ECN: (VirtioNetF.HOST_TSO4, VirtioNetF.HOST_TSO6),
}

# What virtnet's driver and device implement.
GUEST_OFFLOADS = (
    bit(VirtioNetF.GUEST_CSUM)
    | bit(VirtioNetF.GUEST_TSO4)
    | bit(VirtioNetF.GUEST_TSO6)
    | bit(VirtioNetF.GUEST_ECN)
)
HOST_OFFLOADS = (
    bit(VirtioNetF.CSUM)
    | bit(VirtioNetF.HOST_TSO4)
    | bit(VirtioNetF.HOST_TSO6)
    | bit(VirtioNetF.HOST_ECN)
)
SUPPORTED = (
    GUEST_OFFLOADS
    | HOST_OFFLOADS
    | bit(VirtioNetF.MRG_RXBUF)
    | bit(VirtioNetF.MAC)
    | bit(VirtioNetF.MTU)
    | bit(VirtioNetF.STATUS)
    | bit(VirtioF.RING_EVENT_IDX)
    | bit(VirtioF.RING_INDIRECT_DESC)
    | bit(VirtioF.VERSION_1)
)
# What virtnet's device offers and its vhost-user driver acks by default: SUPPORTED
# on either ring layout. In-process pairs (tests, the embedded bench) use SUPPORTED,
# split rings, unless they ask for RING_PACKED (GuestLayout.for_features).
OFFERED = SUPPORTED | bit(VirtioF.RING_PACKED)


def names(features: int) -> list[str]:
    return feature_names(features, VirtioNetF, VirtioF)


def missing_requirements(features: int) -> list[str]:
    """Each set feature whose 5.1.3.1 requirement is not set, as 'A needs B'."""
    problems = []
    for feat, reqs in REQUIRES.items():
        if not features & bit(feat):
            continue
        if feat in _EITHER:
            if not any(features & bit(r) for r in _EITHER[feat]):
                alts = " or ".join(VirtioNetF(r).name for r in _EITHER[feat])
                problems.append(f"{VirtioNetF(feat).name} needs {alts}")
        else:
            problems += [
                f"{VirtioNetF(feat).name} needs {VirtioNetF(r).name}"
                for r in reqs
                if not features & bit(r)
            ]
    return problems


def sanitize(features: int) -> int:
    """Drop every feature whose requirements are missing, until stable."""
    while True:
        bad = 0
        for feat, reqs in REQUIRES.items():
            if not features & bit(feat):
                continue
            alts = _EITHER.get(feat, reqs)
            ok = any if feat in _EITHER else all
            if not ok(features & bit(r) for r in alts):
                bad |= bit(feat)
        if not bad:
            return features
        features &= ~bad


def negotiate(offered: int, wanted: int) -> int:
    """Driver's wanted ∩ device's offered, with the 5.1.3.1 dependency rules applied.

    A feature whose requirement did not survive the intersection is dropped
    (GUEST_TSO4 without GUEST_CSUM, ...). A device that *offers* an
    inconsistent set is not refused — DPDK's vhost offers HOST_ECN with its
    TSO off, and Linux accepts that — the offending bits are simply not
    acked; ``missing_requirements(offered)`` names them for a log line.
    Raises FeatureError without VERSION_1: virtnet speaks virtio 1.x only.
    """
    if not offered & bit(VirtioF.VERSION_1):
        raise FeatureError("device does not offer VERSION_1: legacy devices are not supported")
    return sanitize(offered & wanted)


# 5.1.4: struct virtio_net_config (the part virtnet uses).
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2
_CONFIG = struct.Struct("<6sHHH")


@final
class NetConfig:
    """struct virtio_net_config's fields. A plain class, not a dataclass: compiled,
    a dataclass makes ``SIZE`` a (read-only) field even as a ClassVar (mypyc 2.4)."""

    SIZE: ClassVar[int] = _CONFIG.size

    def __init__(
        self,
        mac: bytes = b"\x52\x54\x00\x12\x34\x56",
        status: int = VIRTIO_NET_S_LINK_UP,
        max_virtqueue_pairs: int = 1,
        mtu: int = 1500,
    ) -> None:
        self.mac = mac
        self.status = status
        self.max_virtqueue_pairs = max_virtqueue_pairs
        self.mtu = mtu

    def _fields(self) -> tuple[bytes, int, int, int]:
        return (self.mac, self.status, self.max_virtqueue_pairs, self.mtu)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NetConfig):
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        return (
            f"NetConfig(mac={self.mac!r}, status={self.status!r}, "
            f"max_virtqueue_pairs={self.max_virtqueue_pairs!r}, mtu={self.mtu!r})"
        )

    def pack(self) -> bytes:
        return _CONFIG.pack(self.mac, self.status, self.max_virtqueue_pairs, self.mtu)

    @classmethod
    def unpack(cls, data: bytes) -> NetConfig:
        if len(data) < _CONFIG.size:
            raise ValueError(f"virtio_net_config needs {_CONFIG.size} bytes, got {len(data)}")
        return cls(*_CONFIG.unpack_from(data))
