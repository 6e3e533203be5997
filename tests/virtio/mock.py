"""A split virtqueue laid out in test memory, written and read by hand.

Like rust-vmm's ``virtio-queue/src/mock.rs``: ``MockSplitQueue`` puts the three
ring parts, an indirect area and a data area in one bytearray-backed
``GuestMemory``, and lets a test store raw descriptors, avail entries and used
entries, or read back what the driver/device wrote. Every raw access goes
through ``struct`` at the spec's byte offsets (VIRTIO 1.2, 2.7), never through
the ring code's memoryview casts, so the helpers double as an independent
check of the wire layout.

    q = MockSplitQueue(16)
    q.desc(0, q.data(0), 64, VRING_DESC_F_NEXT, next=1)
    q.desc(1, q.data(1), 64, VRING_DESC_F_WRITE)
    q.make_available(0)
    chain = q.device().pop()
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtnet.virtio.memory import GuestMemory, MemoryRegion
from virtnet.virtio.ring.layout import (
    DESC_SIZE,
    USED_ELEM_SIZE,
    VringAddrs,
    VringViews,
)
from virtnet.virtio.ring.split import IndirectArea, SplitQueueDevice, SplitQueueDriver

# 2.7.5: struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
DESC = struct.Struct("<QIHH")
LE16 = struct.Struct("<H")
LE32 = struct.Struct("<I")
# 2.7.8: struct virtq_used_elem { le32 id; le32 len; }
USED_ELEM = struct.Struct("<II")

DEFAULT_GPA = 0x10_0000
DATA_SLOT = 4096
GUARD_BYTE = 0xA5


@dataclass(frozen=True)
class Desc:
    addr: int
    len: int
    flags: int
    next: int


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class MockSplitQueue:
    """One split queue of size ``num`` in a fresh guest memory at ``gpa``.

    Layout (all inside one region): ring | indirect area | ``data_slots`` data
    slots of ``DATA_SLOT`` bytes, optionally between two ``guard`` areas that
    are not guest memory. ``start_idx`` puts every ring index (avail
    idx, used idx, and the driver's and device's copies of them) at the same
    value, so tests can start right before the 16-bit wrap.
    """

    def __init__(
        self,
        num: int = 16,
        *,
        event_idx: bool = False,
        indirect_max: int = 0,
        data_slots: int | None = None,
        gpa: int = DEFAULT_GPA,
        start_idx: int = 0,
        guard: int = 0,
    ) -> None:
        self.num = num
        self.event_idx = event_idx
        self.gpa = gpa
        self.start_idx = start_idx & 0xFFFF
        self.addrs = VringAddrs.contiguous(gpa, num)
        self.indirect_max = indirect_max
        self.indirect_gpa = _align(self.addrs.end, DESC_SIZE)
        indirect_size = IndirectArea.size(num, indirect_max) if indirect_max else 0
        self.data_gpa = _align(self.indirect_gpa + indirect_size, DATA_SLOT)
        self.data_slots = num if data_slots is None else data_slots
        self.size = self.data_gpa + self.data_slots * DATA_SLOT - gpa
        # Guest memory is the middle of ``backing``; ``guard`` bytes of
        # GUARD_BYTE either side catch any access that leaves it.
        self.guard = guard
        self.backing = bytearray([GUARD_BYTE]) * (self.size + 2 * guard)
        self.backing[guard : guard + self.size] = bytes(self.size)
        self.buffer = memoryview(self.backing)[guard : guard + self.size]
        self.memory = GuestMemory([MemoryRegion(gpa, self.buffer)])
        if self.start_idx:
            self.set_avail_idx(self.start_idx)
            self.set_used_idx(self.start_idx)
            self._store16(self.addrs.avail + 4 + 2 * num, self.start_idx)  # used_event
            self._store16(self.addrs.used + 4 + USED_ELEM_SIZE * num, self.start_idx)

    # -- the two sides ---------------------------------------------------------

    def views(self) -> VringViews:
        return VringViews.from_memory(self.memory, self.addrs)

    def driver(self, **kwargs) -> SplitQueueDriver:
        """The driver side, its indices moved to ``start_idx`` if one was given."""
        kwargs.setdefault("event_idx", self.event_idx)
        if self.indirect_max and "indirect" not in kwargs:
            kwargs["indirect"] = IndirectArea(
                self.indirect_gpa,
                self.memory.view(self.indirect_gpa, IndirectArea.size(self.num, self.indirect_max)),
                self.num,
                self.indirect_max,
            )
        drv = SplitQueueDriver(self.views(), **kwargs)
        if self.start_idx:
            # SplitQueueDriver.__init__ zeroes avail idx/used_event: a fresh
            # driver starting at 0. Put it where the mock's rings are.
            drv.avail_idx_shadow = self.start_idx
            drv.last_used_idx = self.start_idx
            self.set_avail_idx(self.start_idx)
            self._store16(self.addrs.avail + 4 + 2 * self.num, self.start_idx)
        return drv

    def device(self, **kwargs) -> SplitQueueDevice:
        kwargs.setdefault("event_idx", self.event_idx)
        kwargs.setdefault("last_avail_idx", self.start_idx)
        dev = SplitQueueDevice(self.views(), self.memory, **kwargs)
        return dev

    # -- guest memory ----------------------------------------------------------

    def data(self, slot: int, offset: int = 0) -> int:
        """Guest-physical address of data slot ``slot`` (4 KiB each) plus ``offset``."""
        if not 0 <= slot < self.data_slots:
            raise IndexError(f"data slot {slot} of {self.data_slots}")
        return self.data_gpa + slot * DATA_SLOT + offset

    @property
    def end(self) -> int:
        """First guest-physical address past guest memory."""
        return self.gpa + self.size

    def guards_intact(self) -> bool:
        g = self.guard
        return (
            self.backing[:g] == bytes([GUARD_BYTE]) * g
            and self.backing[g + self.size :] == bytes([GUARD_BYTE]) * g
        )

    def read(self, addr: int, length: int) -> bytes:
        return self.memory.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.memory.write(addr, data)

    def _off(self, addr: int) -> int:
        return addr - self.gpa

    def _store16(self, addr: int, value: int) -> None:
        LE16.pack_into(self.buffer, self._off(addr), value & 0xFFFF)

    def _load16(self, addr: int) -> int:
        return LE16.unpack_from(self.buffer, self._off(addr))[0]

    # -- descriptor table ------------------------------------------------------

    def desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Store descriptor ``i`` of the queue's table, raw."""
        DESC.pack_into(self.buffer, self._off(self.addrs.desc + DESC_SIZE * i), addr,
                       length, flags, next)  # fmt: skip

    def read_desc(self, i: int) -> Desc:
        return Desc(*DESC.unpack_from(self.buffer, self._off(self.addrs.desc + DESC_SIZE * i)))

    def table(self, addr: int, descs: list[tuple[int, int, int, int]]) -> int:
        """Store an indirect table of (addr, len, flags, next) at ``addr``; its byte length."""
        for j, d in enumerate(descs):
            DESC.pack_into(self.buffer, self._off(addr + DESC_SIZE * j), *d)
        return DESC_SIZE * len(descs)

    def read_table(self, addr: int, n: int) -> list[Desc]:
        return [Desc(*DESC.unpack_from(self.buffer, self._off(addr + DESC_SIZE * j)))
                for j in range(n)]  # fmt: skip

    # -- available ring ----------------------------------------------------------

    @property
    def avail_flags(self) -> int:
        return self._load16(self.addrs.avail)

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        self._store16(self.addrs.avail, value)

    @property
    def avail_idx(self) -> int:
        return self._load16(self.addrs.avail + 2)

    def set_avail_idx(self, idx: int) -> None:
        self._store16(self.addrs.avail + 2, idx)

    def avail_ring(self, i: int) -> int:
        return self._load16(self.addrs.avail + 4 + 2 * (i % self.num))

    def make_available(self, head: int) -> None:
        """Put ``head`` in the next avail slot and publish it (avail idx + 1)."""
        idx = self.avail_idx
        self._store16(self.addrs.avail + 4 + 2 * (idx % self.num), head)
        self.set_avail_idx(idx + 1)

    @property
    def used_event(self) -> int:
        return self._load16(self.addrs.avail + 4 + 2 * self.num)

    @used_event.setter
    def used_event(self, value: int) -> None:
        self._store16(self.addrs.avail + 4 + 2 * self.num, value)

    # -- used ring -----------------------------------------------------------------

    @property
    def used_flags(self) -> int:
        return self._load16(self.addrs.used)

    @used_flags.setter
    def used_flags(self, value: int) -> None:
        self._store16(self.addrs.used, value)

    @property
    def used_idx(self) -> int:
        return self._load16(self.addrs.used + 2)

    def set_used_idx(self, idx: int) -> None:
        self._store16(self.addrs.used + 2, idx)

    def used_elem(self, i: int) -> tuple[int, int]:
        """(id, len) of used ring slot ``i % num``."""
        return USED_ELEM.unpack_from(
            self.buffer, self._off(self.addrs.used + 4 + USED_ELEM_SIZE * (i % self.num))
        )

    def used_entries(self, start: int, stop: int | None = None) -> list[tuple[int, int]]:
        """Used entries from ring index ``start`` up to ``stop`` (default: used idx)."""
        stop = self.used_idx if stop is None else stop
        return [self.used_elem(start + k) for k in range((stop - start) & 0xFFFF)]

    def put_used(self, head: int, length: int) -> None:
        """Publish a used entry by hand (a device that may lie to the driver)."""
        idx = self.used_idx
        USED_ELEM.pack_into(
            self.buffer, self._off(self.addrs.used + 4 + USED_ELEM_SIZE * (idx % self.num)),
            head, length,
        )  # fmt: skip
        self.set_used_idx(idx + 1)

    @property
    def avail_event(self) -> int:
        return self._load16(self.addrs.used + 4 + USED_ELEM_SIZE * self.num)

    @avail_event.setter
    def avail_event(self, value: int) -> None:
        self._store16(self.addrs.used + 4 + USED_ELEM_SIZE * self.num, value)
