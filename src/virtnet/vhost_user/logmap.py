"""The front-end's dirty log (SET_LOG_BASE with PROTOCOL_F_LOG_SHMFD), mapped.

vhost-user.rst "Migration": the log is a memfd of ``mmap_size`` bytes at
``mmap_offset`` into its file, one bit per 4 KiB page of guest-physical memory,
which the back-end sets for each page it writes while VHOST_F_LOG_ALL is on.
QEMU seals its log memfd (``qemu_memfd_alloc(..., F_SEAL_GROW | F_SEAL_SHRINK |
F_SEAL_SEAL)``); one that is not sealed is sealed here if it can be, or else
only the workers touch it, as with guest memory: a shrink kills a worker, which
the control process names and replaces.

The bits are set with a real atomic OR (libatomic's ``__atomic_fetch_or_8``
through ctypes, as DPDK's ``vhost_log_cache_sync`` uses ``__atomic_fetch_or``):
two queue pairs' workers may OR the same word while QEMU swaps words for 0.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os

from virtnet.vhost_user.mapping import MappingError, seal_shrink
from virtnet.virtio.dirtylog import DirtyLog, SetWord

log = logging.getLogger("virtnet.device")

ATOMIC_SEQ_CST = 5


def _libatomic_fetch_or_8() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        lib = ctypes.CDLL("libatomic.so.1")
        fetch_or = lib.__atomic_fetch_or_8
    except (OSError, AttributeError):
        return None
    fetch_or.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int)
    fetch_or.restype = ctypes.c_uint64
    return fetch_or


_FETCH_OR_8 = _libatomic_fetch_or_8()


def check_log(fd: int, size: int, offset: int) -> int:
    """The log file's size, if ``size`` bytes at ``offset`` fit in it; else MappingError."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise MappingError(e.errno, f"log fd: {e.strerror}") from None
    if size <= 0:
        raise MappingError(0, f"log mmap_size {size} is not positive")
    if offset >= st.st_size:
        raise MappingError(0, f"log mmap_offset {offset:#x} is past the end of its "
                              f"{st.st_size:#x}-byte file")  # fmt: skip
    if offset + size > st.st_size:
        raise MappingError(0, f"log mmap_size {size:#x} at mmap_offset {offset:#x} is larger "
                              f"than its file ({st.st_size:#x} bytes)")  # fmt: skip
    return st.st_size


class MappedLog:
    """The log bitmap, mapped read-write shared; ``dirty_log()`` is what a device logs to."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        self.unsealed = seal_shrink(fd)  # before the size check: nothing can shrink it after
        check_log(fd, size, offset)
        self.size = size
        try:
            self._map = mmap.mmap(fd, offset + size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        except (OSError, ValueError, OverflowError) as e:
            raise MappingError(getattr(e, "errno", 0) or 0,
                               f"log of {size:#x} bytes at offset {offset:#x}: mmap: {e}"
                               ) from None  # fmt: skip
        self.view = memoryview(self._map)[offset : offset + size]
        anchor = ctypes.c_char.from_buffer(self._map)
        self._addr = ctypes.addressof(anchor) + offset
        del anchor  # the address stays valid while the map is open; the export must go
        self.atomic = _FETCH_OR_8 is not None and self._addr % 8 == 0
        self._log: DirtyLog | None = None

    def _set_word(self) -> SetWord | None:
        fetch_or, base = _FETCH_OR_8, self._addr
        if fetch_or is None or not self.atomic:
            return None

        def set_word(word: int, mask: int) -> None:
            fetch_or(base + 8 * word, mask, ATOMIC_SEQ_CST)

        return set_word

    def dirty_log(self) -> DirtyLog:
        """The DirtyLog over this map (one per map: its counters are the map's)."""
        if self._log is None:
            self._log = DirtyLog(self.view, self._set_word())
        return self._log

    def close(self) -> None:
        """Unmap; every device must have dropped ``dirty_log()`` first."""
        if self._log is not None:
            self._log.flush()
            self._log = None
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a view is still alive; the map goes when it does
