"""A tap fd's frames: the per-packet half of :class:`virtnet.ports.tap.Tap`.

One read returns one frame, one write sends one, the vnet header first in
both (see tap.py for what the kernel does with it). This is what a packet
passes through, so it is compiled with the data plane; opening and
configuring a tap (ioctls on /dev/net/tun) stays in tap.py, whose ``Tap``
builds on :class:`TapIO`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from virtnet._mypyc import mypyc_attr


@mypyc_attr(allow_interpreted_subclasses=True)  # tap.Tap, interpreted
class TapIO:
    """One fd of a tap (one queue of a multi-queue tap), non-blocking."""

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"tap {self.name}: I/O on a closed tap")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def readv_into(self, buffers: Sequence[memoryview | bytearray]) -> int:
        """Read one frame, vnet header first, into ``buffers``; return its length.

        Raises BlockingIOError when no frame is queued (the fd is non-blocking).
        """
        return os.readv(self.fileno(), buffers)

    def writev(self, buffers: Sequence[memoryview | bytes | bytearray]) -> int:
        """Write one frame (vnet header in the first bytes) with a single syscall."""
        return os.writev(self.fileno(), buffers)

    def close(self) -> None:
        # Closing the last fd of a non-persistent tap deletes the device, wherever it lives.
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
