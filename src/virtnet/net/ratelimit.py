"""Naming what a device got wrong, rate-limited (Linux's BAD_RING / dev_warn_ratelimited).

A lying device can produce a lie per packet; the log must name each kind (queue, id,
length) without becoming the bottleneck itself. ``RateLimit`` is ``___ratelimit()``:
at most ``burst`` messages per ``interval`` seconds, then one "N suppressed" line when
the next interval opens. ``DeviceFaults`` counts every lie in the driver's stats as
``fault_KIND`` (the same names ``virtnet device --faults`` counts what it injected
under, see net/faults.py) and logs it through one rate limit per kind, so a flood of
one kind never hides the first of another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final, final

from virtnet.net.faults import FAULT_KINDS
from virtnet.net.stats import Stats

# include/linux/ratelimit_types.h: DEFAULT_RATELIMIT_INTERVAL (5 * HZ), _BURST (10)
RATELIMIT_INTERVAL: Final = 5.0
RATELIMIT_BURST: Final = 10

log = logging.getLogger("virtnet.driver")


@final
class RateLimit:
    """``___ratelimit``: True for the first ``burst`` calls in each ``interval``."""

    def __init__(
        self,
        interval: float = RATELIMIT_INTERVAL,
        burst: int = RATELIMIT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self.begin: float | None = None
        self.printed = 0
        self.missed = 0

    def allow(self) -> tuple[bool, int]:
        """(may print now, calls suppressed in the interval that just ended)."""
        now = self.clock()
        suppressed = 0
        if self.begin is None or now - self.begin >= self.interval:
            suppressed, self.missed = self.missed, 0
            self.begin = now
            self.printed = 0
        if self.printed < self.burst:
            self.printed += 1
            return True, suppressed
        self.missed += 1
        return False, suppressed


@final
class DeviceFaults:
    """The driver's record of the device's lies: counted always, logged rate-limited."""

    def __init__(
        self,
        stats: Stats,
        logger: logging.Logger = log,
        limit: Callable[[], RateLimit] = RateLimit,
    ) -> None:
        """``limit`` makes each kind's RateLimit (a test's: another interval or clock)."""
        self.stats = stats
        self.log = logger
        self._limits = {kind: limit() for kind in FAULT_KINDS}
        self.broken = ""  # why a queue was marked broken (BAD_RING), "" while none is

    def report(self, kind: str, text: str) -> None:
        """Count one ``kind`` lie and name it: ``text`` says queue, id, length."""
        name = "fault_" + kind
        self.stats.bump(name)
        ok, suppressed = self._limits[kind].allow()
        if suppressed:
            self.log.warning("device fault %s: %d messages suppressed", kind, suppressed)
        if ok:
            self.log.warning("device fault %s: %s", kind, text)

    def bad_ring(self, kind: str, text: str) -> None:
        """A ring state no entry can be refused for: count, name, and mark it broken.

        The first reason is kept; Linux's BAD_RING prints once and sets vq->broken.
        """
        self.report(kind, text + " (queue broken)")
        if not self.broken:
            self.broken = f"device fault {kind}: {text}"
