"""Mapping the front-end's memory regions into the back-end (vhost-user.rst,
"Memory regions description"): each region arrives as an fd with a
guest-physical address, a size, the front-end's virtual address and an
offset into the fd's file.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from virtnet.virtio.memory import GuestMemory, MemoryRegion


class MappingError(OSError):
    """A region that cannot be mapped (bad fd, size, offset)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the text names the region, not "[Errno 0]"


def _map_length(fd: int, offset: int, size: int) -> int:
    """mmap length covering [0, offset + size), rounded to the fd's block size.

    hugetlbfs files can only be mapped in whole huge pages; st_blksize is the
    huge page size there (DPDK's vhost does the same: get_blk_size()).
    """
    try:
        block = os.fstat(fd).st_blksize or mmap.PAGESIZE
    except OSError as e:
        raise MappingError(e.errno, f"region fd {fd}: {e.strerror}") from None
    block = max(block, mmap.PAGESIZE)
    return (offset + size + block - 1) // block * block


def seal_shrink(fd: int) -> str | None:
    """Make the region's file unable to shrink; None if it now cannot, else why not.

    A front-end that truncates its memfd under our mapping turns the next access into
    SIGBUS, which kills a Python process outright. F_SEAL_SHRINK forbids that for the
    file's lifetime (memfd_create(2)): QEMU's memory-backend-memfd seals it itself
    (seal=on), a memfd made with MFD_ALLOW_SEALING we seal here; a file that disallows
    seals (no MFD_ALLOW_SEALING, hugetlbfs and tmpfs files) cannot be protected.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        return f"its file takes no seals ({e.strerror})"
    if seals & fcntl.F_SEAL_SHRINK:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as e:
        return f"F_SEAL_SHRINK refused ({e.strerror}: made without MFD_ALLOW_SEALING?)"
    return None


class MappedMemory:
    """A GuestMemory whose regions are mmaps of the front-end's fds."""

    def __init__(self) -> None:
        self.memory = GuestMemory()
        self._maps: list[mmap.mmap] = []
        self.unsealed: list[str] = []  # regions a front-end could still shrink, and why

    def add(self, fd: int, gpa: int, size: int, uva: int, mmap_offset: int) -> MemoryRegion:
        """Map one region; the fd is not kept (the mapping holds the memory)."""
        if size <= 0:
            raise MappingError(0, f"region at gpa {gpa:#x}: size {size} is not positive")
        length = _map_length(fd, mmap_offset, size)
        why = seal_shrink(fd)  # before the size check: nothing can shrink it after
        if why is not None:
            self.unsealed.append(f"region at gpa {gpa:#x}: {why}")
        try:
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:  # Overflow: offset + size > 2^63
            raise MappingError(
                getattr(e, "errno", 0) or 0,
                f"region at gpa {gpa:#x} size {size:#x} offset {mmap_offset:#x}: mmap: {e}",
            ) from None
        self._maps.append(mm)
        region = MemoryRegion(gpa, memoryview(mm)[mmap_offset : mmap_offset + size], uva=uva)
        try:
            self.memory.add_region(region)
        except ValueError as e:
            raise MappingError(0, str(e)) from None
        return region

    def close(self) -> None:
        """Unmap everything; callers must have dropped views into the regions."""
        self.memory.release()
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive; the map goes when it does
        self._maps.clear()
