"""Guest memory: guest-physical (and front-end virtual) address → memoryview.

A region is any writable buffer: a bytearray in tests, an mmap of a memfd in
production (the vhost-user back-end maps the front-end's memfds here). Every
translation is bounds-checked — a descriptor is guest-controlled input, and an
address or a length may be anything a u64/u32 can hold.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING, Final, final

from virtnet.virtio.errors import MemoryAccessError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

U64_MAX: Final = (1 << 64) - 1
# What first_region gives for a memory with no region: its size of -1 keeps every
# bounds check of an inlined fast path failing, so the view is never sliced.
_NO_BUFFER: Final = memoryview(bytearray())


@final
class MemoryRegion:
    """``size`` bytes of guest memory at guest-physical ``gpa``.

    ``uva`` is the address the front-end process sees the region at: vhost-user
    ring addresses are front-end virtual addresses (vhost-user.rst, "Memory
    access"), descriptors carry guest-physical ones. ``buffer`` may be any
    writable buffer; the region keeps a byte view of it.
    """

    def __init__(self, gpa: int, buffer: memoryview | WriteableBuffer, uva: int = 0) -> None:
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        if view.readonly:
            raise ValueError(f"region at {gpa:#x}: buffer is read-only")
        self.gpa = gpa
        self.buffer: memoryview = view.cast("B")
        self.uva = uva
        self.size = self.buffer.nbytes
        if gpa < 0 or gpa + self.size - 1 > U64_MAX:
            raise ValueError(f"region at {gpa:#x} size {self.size:#x} leaves the u64 space")

    def __repr__(self) -> str:
        return f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x}, uva={self.uva:#x})"


@final
class GuestMemory:
    """A set of non-overlapping regions, looked up by address.

    ``view(addr, length)`` is the hot path of every descriptor: one region is
    the common case (a memfd), so it is tried first, then two (RAM below and
    above 4 GiB) with one compare; with more (DIMMs, NUMA nodes, ADD_MEM_REG: up
    to hundreds), a bisect over the sorted start addresses (callgrind, per view:
    a loop written out costs 20-40 % more than bisect's C in the pure build).

    Regions come and go at run time (ADD_MEM_REG / REM_MEM_REG): the rings hold
    this object, not a copy of its table, so a change is seen by the next access.
    """

    def __init__(self, regions: list[MemoryRegion] | None = None) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        # The lowest region, for the rings' inlined fast paths (typed fields: the
        # compiled build reads them as C fields, with no tuple made per chain). A
        # miss there must fall back to ``view``, which also covers the other regions.
        # Without a region the size is -1: no access is inside it.
        self.first_gpa = 0
        self.first_size = -1
        self.first_buf = _NO_BUFFER
        for region in regions or ():
            self.add_region(region)

    @classmethod
    def from_buffer(cls, buffer: WriteableBuffer, gpa: int = 0) -> GuestMemory:
        return cls([MemoryRegion(gpa, memoryview(buffer))])

    @property
    def first_region(self) -> tuple[int, int, memoryview]:
        """(gpa, size, buffer) of the lowest region, for inlined fast paths; a miss
        there must fall back to ``view`` (which also covers the other regions).
        Without a region the size is -1: no access is inside it."""
        return (self.first_gpa, self.first_size, self.first_buf)

    def _regions_changed(self) -> None:
        self._starts = [r.gpa for r in self._regions]
        if self._regions:
            r = self._regions[0]
            # A view of its own, not the region's: a chain popped from it keeps the
            # mmap mapped, as a view into it would, after the region is removed and
            # its buffer released (mapping.py closes the mmap when the last one goes).
            self.first_gpa, self.first_size, self.first_buf = r.gpa, r.size, r.buffer[:]
        else:
            self.first_gpa, self.first_size, self.first_buf = 0, -1, _NO_BUFFER

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    def add_region(self, region: MemoryRegion) -> None:
        for other in self._regions:
            if region.gpa < other.gpa + other.size and other.gpa < region.gpa + region.size:
                raise ValueError(
                    f"region [{region.gpa:#x}, +{region.size:#x}) overlaps "
                    f"[{other.gpa:#x}, +{other.size:#x})"
                )
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.gpa)
        self._regions_changed()

    def find_region(self, gpa: int, size: int, uva: int) -> MemoryRegion | None:
        """The region with exactly this guest address, size and front-end address
        (how REM_MEM_REG names one), or None."""
        for region in self._regions:
            if region.gpa == gpa and region.size == size and region.uva == uva:
                return region
        return None

    def remove_region(self, gpa: int) -> MemoryRegion:
        for i, region in enumerate(self._regions):
            if region.gpa == gpa:
                del self._regions[i]
                self._regions_changed()
                return region
        raise MemoryAccessError(gpa, 0, "names no region")

    def view(self, addr: int, length: int) -> memoryview:
        """The bytes [addr, addr+length) of one region, or MemoryAccessError.

        An access may not straddle two regions even if they are adjacent:
        they are separate mappings (separate memfds) in the back-end.
        """
        if length < 0 or addr < 0:
            raise MemoryAccessError(addr, length, "is negative")
        regions = self._regions
        n = len(regions)
        if n == 1:
            region = regions[0]
        elif n == 2:  # RAM below and above 4 GiB, or a DIMM: one compare
            region = regions[1] if addr >= self._starts[1] else regions[0]
        else:
            i = bisect_right(self._starts, addr) - 1
            if i < 0:
                raise MemoryAccessError(addr, length)
            region = regions[i]
        offset = addr - region.gpa
        if offset < 0 or offset + length > region.size:
            raise MemoryAccessError(addr, length)
        return region.buffer[offset : offset + length]

    def view_uva(self, uva: int, length: int) -> memoryview:
        """Translate a front-end virtual address (vhost-user ring addresses)."""
        for region in self._regions:
            offset = uva - region.uva
            if 0 <= offset and offset + length <= region.size and length >= 0:
                return region.buffer[offset : offset + length]
        raise MemoryAccessError(uva, length, "is in no region's front-end address range")

    def uva_to_gpa(self, uva: int) -> int:
        for region in self._regions:
            if 0 <= uva - region.uva < region.size:
                return region.gpa + uva - region.uva
        raise MemoryAccessError(uva, 0, "is in no region's front-end address range")

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes) -> None:
        self.view(addr, len(data))[:] = data

    def release(self) -> None:
        """Drop the regions' views so the mmaps behind them can close."""
        for region in self._regions:
            region.buffer.release()
        self._regions.clear()
        self._regions_changed()
