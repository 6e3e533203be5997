"""What both event loops (device and driver) share: when a ``--seconds`` run
ends, when the live counters print, and SIGTERM / SIGINT as a clean stop."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

PRINT_EVERY = 1.0  # seconds between live-counter lines


class RunClock:
    def __init__(
        self,
        seconds: float,
        printer: Callable[[dict], None] | None,
        stats: Callable[[], dict],
    ) -> None:
        self.deadline = time.monotonic() + seconds if seconds > 0 else None
        self.printer = printer
        self.stats = stats
        self.stopping = False
        self._next_print = time.monotonic() + PRINT_EVERY
        self._old: dict = {}

    def install(self) -> RunClock:
        """SIGTERM / SIGINT now stop the run cleanly (the JSON still gets written)."""
        self._old = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def __enter__(self) -> RunClock:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def running(self) -> bool:
        """False once stopped or past the deadline; prints the counters when due."""
        if self.stopping:
            return False
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            return False
        if self.printer is not None and now >= self._next_print:
            self.printer(self.stats())
            self._next_print = now + PRINT_EVERY
        return True
