"""Transport feature bits and the device status state machine (VIRTIO 1.2, 2.1, 3.1, 6).

The virtio-net bits live in ``virtnet.net.features``; the two enums together
are the one definition of every bit virtnet negotiates.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import final

from virtnet.virtio.errors import FeatureError


class VirtioF(IntEnum):
    """Reserved (transport) feature bits, chapter 6."""

    NOTIFY_ON_EMPTY = 24  # legacy
    ANY_LAYOUT = 27  # legacy
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40


def bit(n: int) -> int:
    return 1 << int(n)


def has(features: int, n: int) -> bool:
    return bool(features >> int(n) & 1)


def feature_names(features: int, *enums: type[IntEnum]) -> list[str]:
    """Names of the set bits, ``bitNN`` for bits no enum knows."""
    known = {int(m): m.name for e in enums for m in e}
    return [known.get(i, f"bit{i}") for i in range(64) if features >> i & 1]


class DeviceStatus(IntFlag):
    """2.1: device status field."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 64
    FAILED = 128


# 3.1.1: the order a driver sets the bits in; each step keeps the earlier ones.
_INIT_ORDER = (
    DeviceStatus.ACKNOWLEDGE,
    DeviceStatus.DRIVER,
    DeviceStatus.FEATURES_OK,
    DeviceStatus.DRIVER_OK,
)


_KNOWN = sum(int(flag) for flag in DeviceStatus)  # an int: ~ of an IntFlag keeps only its bits


@final
class StatusMachine:
    """The device status a driver walks through (3.1.1 "Driver Requirements").

    ``set`` enforces the order ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK;
    FAILED may be set any time, NEEDS_RESET only by the device; 0 resets.
    """

    def __init__(self) -> None:
        self.status: DeviceStatus = DeviceStatus(0)

    def reset(self) -> None:
        self.status = DeviceStatus(0)

    def set(self, new: int) -> None:
        unknown = int(new) & ~_KNOWN
        if unknown:
            raise FeatureError(f"device status: unknown bits {unknown:#x} in {int(new):#x}")
        # A new name, not ``new`` rebound: compiled, an ``int`` local keeps only the
        # int of a DeviceStatus, and ``self.status`` takes only a DeviceStatus.
        status = DeviceStatus(new)
        if status == 0:
            self.reset()
            return
        if status & DeviceStatus.NEEDS_RESET and not self.status & DeviceStatus.NEEDS_RESET:
            raise FeatureError("device status: NEEDS_RESET is the device's to set (2.1)")
        if self.status & DeviceStatus.FAILED and status & ~DeviceStatus.FAILED != self.status & ~(
            DeviceStatus.FAILED
        ):
            raise FeatureError("device status: FAILED is set, only a reset may follow")
        if status & self.status != self.status:
            raise FeatureError(f"device status: {status!r} clears bits of {self.status!r} (reset)")
        added = status & ~self.status & ~DeviceStatus.FAILED & ~DeviceStatus.NEEDS_RESET
        for step, flag in enumerate(_INIT_ORDER):
            if added & flag:
                missing = [f.name for f in _INIT_ORDER[:step] if not status & f]
                if missing:
                    raise FeatureError(f"device status: {flag.name} set before {missing}")
        self.status = status

    def device_needs_reset(self) -> None:
        """2.1.2: the device sets NEEDS_RESET after an error it can't recover from."""
        self.status |= DeviceStatus.NEEDS_RESET

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & DeviceStatus.DRIVER_OK) and not (
            self.status & (DeviceStatus.FAILED | DeviceStatus.NEEDS_RESET)
        )
