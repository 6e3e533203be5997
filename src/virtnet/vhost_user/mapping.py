"""Mapping the front-end's memory regions into the back-end (vhost-user.rst,
"Memory regions description"): each region arrives as an fd with a
guest-physical address, a size, the front-end's virtual address and an
offset into the fd's file.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from typing import Protocol

from virtnet.virtio.memory import U64_MAX, GuestMemory, MemoryRegion

# GET_MAX_MEM_SLOTS: the regions one back-end maps (PROTOCOL_F_CONFIGURE_MEM_SLOTS).
# KVM's usable memory slots on x86 (KVM_USER_MEM_SLOTS 509), under QEMU's own cap
# VHOST_USER_MAX_RAM_SLOTS 512: a guest never has more regions than KVM gives it.
# Each is one mmap here and in every worker, far below vm.max_map_count (65530).
MAX_MEM_SLOTS = 509


class _Mapped(Protocol):
    def close(self) -> None: ...


def close_maps(*maps: _Mapped | None) -> None:
    """Unmap each of ``maps`` that is there (a session's memory, dirty log, in-flight
    region); the caller then forgets them."""
    for mapped in maps:
        if mapped is not None:
            mapped.close()


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
    """A GuestMemory whose regions are mmaps of the front-end's fds.

    Regions are added and removed one at a time (SET_MEM_TABLE adds each of its
    own; ADD_MEM_REG / REM_MEM_REG one at run time). Every refusal names the
    region and happens before anything is mapped, so a refused region leaves the
    table as it was.
    """

    def __init__(self) -> None:
        self.memory = GuestMemory()
        self._maps: dict[int, mmap.mmap] = {}  # by guest address
        # By guest address: how often the region was added, and what it was added as
        # (size, uva, mmap_offset, the file's st_dev and st_ino).
        self._refs: dict[int, int] = {}
        self._ident: dict[int, tuple[int, int, int, int, int]] = {}
        self._busy: list[mmap.mmap] = []  # unmapped regions a view still pins: closed later
        self.unsealed: list[str] = []  # regions a front-end could still shrink, and why

    def __len__(self) -> int:
        return len(self._maps)

    def refs(self, gpa: int) -> int:
        """How often the region at ``gpa`` was added and not yet removed (0: not mapped)."""
        return self._refs.get(gpa, 0)

    def add(self, fd: int, gpa: int, size: int, uva: int, mmap_offset: int) -> MemoryRegion:
        """Map one region; the fd is not kept (the mapping holds the memory).

        The same region again (same addresses, offset and file) only counts one more
        reference: QEMU before 8.0 sends each ADD_MEM_REG once per queue pair's vhost
        device over the one connection (its fix: "vhost-user: Skip unnecessary
        duplicated VHOST_USER_ADD/REM_MEM_REG requests"), and as many REM_MEM_REG.
        """
        ident = (size, uva, mmap_offset, *_file_id(fd, gpa))
        known = self.memory.find_region(gpa, size, uva)
        if known is not None and self._ident.get(gpa) == ident:
            self._refs[gpa] += 1
            return known
        self._check_new(gpa, size, uva, mmap_offset)
        length = _map_length(fd, mmap_offset, size)
        why = seal_shrink(fd)  # before the size check: nothing can shrink it after
        if why is not None:
            self.unsealed.append(f"region at gpa {gpa:#x}: {why}")
        _check_file_size(fd, gpa, size, mmap_offset)
        try:
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:  # Overflow: offset + size > 2^63
            raise MappingError(
                getattr(e, "errno", 0) or 0,
                f"region at gpa {gpa:#x} size {size:#x} offset {mmap_offset:#x}: mmap: {e}",
            ) from None
        region = MemoryRegion(gpa, memoryview(mm)[mmap_offset : mmap_offset + size], uva=uva)
        try:
            self.memory.add_region(region)
        except ValueError as e:
            region.buffer.release()
            mm.close()
            raise MappingError(0, str(e)) from None
        self._maps[gpa] = mm
        self._refs[gpa], self._ident[gpa] = 1, ident
        return region

    def _check_new(self, gpa: int, size: int, uva: int, mmap_offset: int) -> None:
        """Refuse, by name, a region that could never be mapped or would overlap one."""
        where = f"region at gpa {gpa:#x} size {size:#x} uva {uva:#x}"
        if size <= 0:
            raise MappingError(0, f"region at gpa {gpa:#x}: size {size} is not positive")
        for name, value in (("gpa", gpa), ("size", size), ("uva", uva),
                            ("mmap_offset", mmap_offset)):  # fmt: skip
            if value % mmap.PAGESIZE:
                raise MappingError(0, f"{where}: {name} {value:#x} is not aligned to the "
                                   f"{mmap.PAGESIZE}-byte page")  # fmt: skip
        if gpa + size - 1 > U64_MAX or uva + size - 1 > U64_MAX:
            raise MappingError(0, f"{where}: leaves the u64 address space")
        if len(self._maps) >= MAX_MEM_SLOTS:
            raise MappingError(0, f"{where}: all {MAX_MEM_SLOTS} memory slots are in use "
                               "(GET_MAX_MEM_SLOTS)")  # fmt: skip
        for other in self.memory.regions:
            if gpa < other.gpa + other.size and other.gpa < gpa + size:
                raise MappingError(0, f"{where} overlaps {other} in guest addresses")
            if uva < other.uva + other.size and other.uva < uva + size:
                # Ring addresses are front-end virtual: one address in two regions
                # would make a ring's translation depend on the table's order.
                raise MappingError(0, f"{where} overlaps {other} in front-end addresses")

    def remove(self, gpa: int, size: int, uva: int) -> None:
        """Unmap the region REM_MEM_REG names (guest address, size, user address)."""
        region = self.memory.find_region(gpa, size, uva)
        if region is None:
            known = ", ".join(map(repr, self.memory.regions)) or "none"
            raise MappingError(0, f"no region at gpa {gpa:#x} size {size:#x} uva {uva:#x} "
                               f"(mapped: {known})")  # fmt: skip
        self._refs[gpa] -= 1
        if self._refs[gpa]:
            return  # added more than once: still in use by the other adders
        del self._refs[gpa], self._ident[gpa]
        self.memory.remove_region(gpa)
        try:
            region.buffer.release()
        except BufferError:
            pass  # exported (a ctypes or numpy view of it): its mmap waits in _busy
        self._busy.append(self._maps.pop(gpa))
        self._close_unpinned()

    def _close_unpinned(self) -> None:
        """Close the unmapped regions' mmaps that no view pins any more.

        A view the device took before the region went (a frame in flight to the
        back-end) pins its mmap: the mapping then goes at the next change or at close,
        never while a view could still read through it.
        """
        pinned = []
        for mm in self._busy:
            try:
                mm.close()
            except BufferError:
                pinned.append(mm)
        self._busy = pinned

    def close(self) -> None:
        """Unmap everything; callers must have dropped views into the regions."""
        self.memory.release()
        self._busy.extend(self._maps.values())
        self._maps.clear()
        self._refs.clear()
        self._ident.clear()
        self._close_unpinned()
        self._busy.clear()  # still pinned: the map goes when its last view does


def _file_id(fd: int, gpa: int) -> tuple[int, int]:
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise MappingError(e.errno, f"region at gpa {gpa:#x}: fd {fd}: {e.strerror}") from None
    return st.st_dev, st.st_ino


def _check_file_size(fd: int, gpa: int, size: int, mmap_offset: int) -> None:
    """A region past the end of its file would SIGBUS on its first access there."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise MappingError(e.errno, f"region at gpa {gpa:#x}: fd {fd}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode) and mmap_offset + size > st.st_size:
        raise MappingError(0, f"region at gpa {gpa:#x} size {size:#x}: mmap_offset "
                           f"{mmap_offset:#x} + size is past the end of its file "
                           f"({st.st_size:#x} bytes)")  # fmt: skip
