"""Interrupt moderation for one queue, with ``ethtool -C`` semantics.

``rx-usecs`` / ``tx-usecs`` and ``rx-frames`` / ``tx-frames`` are
VIRTIO_NET_F_NOTF_COAL's ``max_usecs`` / ``max_packets`` (5.1.6.5.6.1): an
interrupt the driver asked for (the ring's EVENT_IDX / flags said so) is held
until ``frames`` packets are behind it or ``usecs`` passed since the first of
them. With only ``frames`` set, a held interrupt is also sent as soon as the
device runs out of work (``idle``), so a burst that ends short never waits
for a timer that was not asked for. Sans-I/O: the caller passes the time and
sends the notification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

COALESCE_KEYS: Final = ("rx-usecs", "rx-frames", "tx-usecs", "tx-frames")


class CoalesceError(ValueError):
    """A --coalesce value that names no parameter or is not a count."""


def parse_coalesce(text: str) -> dict[str, int]:
    """``rx-usecs=50,rx-frames=32`` → {"rx-usecs": 50, "rx-frames": 32} (ethtool -C words)."""
    out: dict[str, int] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        key, sep, value = item.partition("=")
        if key not in COALESCE_KEYS or not sep or not value.isdigit():
            raise CoalesceError(
                f"--coalesce {item!r}: expected KEY=N with KEY one of {', '.join(COALESCE_KEYS)}"
            )
        out[key] = int(value)
    return out


@dataclass
class IrqCoalescer:
    """The moderation state of one queue's used-buffer notifications."""

    usecs: int = 0
    frames: int = 0
    owed: int = 0  # packets behind the interrupt being held
    owed_since: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.usecs > 0 or self.frames > 1

    def want(self, packets: int, now: float) -> bool:
        """The driver asked for an interrupt covering ``packets`` more: True to send it now."""
        if not self.enabled:
            return True
        if not self.owed:
            self.owed_since = now
        self.owed += max(packets, 1)
        if self.frames and self.owed >= self.frames or (
            self.usecs and now - self.owed_since >= self.usecs / 1e6
        ):
            self.owed = 0
            return True
        return False

    def deadline(self) -> float | None:
        """When a held interrupt must go at the latest (None: none held, or no timer)."""
        if not self.owed or not self.usecs:
            return None
        return self.owed_since + self.usecs / 1e6

    def expire(self, now: float, idle: bool) -> bool:
        """True when the held interrupt is due now (its time passed, or the device is
        idle and only ``frames`` was asked for)."""
        if not self.owed:
            return False
        due = self.deadline()
        if (due is None and idle) or (due is not None and now >= due):
            self.owed = 0
            return True
        return False
