"""Split and packed virtqueues laid out in test memory, written and read by hand.

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
    PackedAddrs,
    PackedViews,
    VringAddrs,
    VringViews,
)
from virtnet.virtio.ring.packed import PackedQueueDevice, PackedQueueDriver
from virtnet.virtio.ring.queue import vring_create_virtqueue
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
        drv = vring_create_virtqueue(self.views(), **kwargs)
        assert isinstance(drv, SplitQueueDriver)
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


# -- packed ---------------------------------------------------------------------------------

# 2.8.13: struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }
PDESC = struct.Struct("<QIHH")
# 2.8.10: struct pvirtq_event_suppress { le16 off_wrap; le16 flags; }
EVENT = struct.Struct("<HH")
P_AVAIL = 1 << 7
P_USED = 1 << 15


@dataclass(frozen=True)
class PDesc:
    addr: int
    len: int
    id: int
    flags: int


def avail_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor made available in a lap with this wrap counter."""
    return P_AVAIL if wrap else P_USED


def used_flags(wrap: int) -> int:
    return P_AVAIL | P_USED if wrap else 0


class MockPackedQueue:
    """One packed queue of size ``num`` (any 1..32768) in a fresh guest memory.

    Layout: descriptor ring | driver event area | device event area | indirect
    area | data slots, optionally between ``guard`` areas. ``start`` = (position,
    wrap counter) puts both sides there, with the ring's flags as a ring that
    got there would have them. The mock is also a hand-driven driver (``post``)
    and device (``mark_used``) that may break any rule, all through ``struct``
    at the spec's byte offsets.
    """

    def __init__(
        self,
        num: int = 16,
        *,
        event_idx: bool = False,
        indirect_max: int = 0,
        data_slots: int | None = None,
        gpa: int = DEFAULT_GPA,
        start: tuple[int, int] = (0, 1),
        guard: int = 0,
    ) -> None:
        self.num = num
        self.event_idx = event_idx
        self.gpa = gpa
        self.addrs = PackedAddrs.contiguous(gpa, num)
        self.indirect_max = indirect_max
        self.indirect_gpa = _align(self.addrs.end, DESC_SIZE)
        indirect_size = IndirectArea.size(num, indirect_max) if indirect_max else 0
        self.data_gpa = _align(self.indirect_gpa + indirect_size, DATA_SLOT)
        self.data_slots = num if data_slots is None else data_slots
        self.size = self.data_gpa + self.data_slots * DATA_SLOT - gpa
        self.guard = guard
        self.backing = bytearray([GUARD_BYTE]) * (self.size + 2 * guard)
        self.backing[guard : guard + self.size] = bytes(self.size)
        self.buffer = memoryview(self.backing)[guard : guard + self.size]
        self.memory = GuestMemory([MemoryRegion(gpa, self.buffer)])
        self.start = start
        self.avail_pos, self.avail_wrap = start  # the hand driver's next slot
        self.used_pos, self.used_wrap = start  # the hand device's next slot
        self.next_id = 0
        self._lay_flags()

    def _lay_flags(self) -> None:
        pos, wrap = self.start
        for i in range(self.num):
            self.set_flags(i, used_flags(wrap if i < pos else wrap ^ 1))

    # -- the two sides ---------------------------------------------------------

    def views(self) -> PackedViews:
        return PackedViews.from_memory(self.memory, self.addrs)

    def indirect_area(self) -> IndirectArea:
        size = IndirectArea.size(self.num, self.indirect_max)
        view = self.memory.view(self.indirect_gpa, size)
        return IndirectArea(self.indirect_gpa, view, self.num, self.indirect_max)

    def driver(self, **kwargs) -> PackedQueueDriver:
        kwargs.setdefault("event_idx", self.event_idx)
        if self.indirect_max and "indirect" not in kwargs:
            kwargs["indirect"] = self.indirect_area()
        drv = vring_create_virtqueue(self.views(), **kwargs)
        assert isinstance(drv, PackedQueueDriver)
        pos, wrap = self.start
        if (pos, wrap) != (0, 1):
            # A fresh driver starts at slot 0, wrap 1: move it where the mock's ring is.
            drv.next_avail = drv.last_used = pos
            drv.avail_wrap = drv.used_wrap = wrap
            drv._avail_bits = avail_flags(wrap) << 48
            drv._used_bits = used_flags(wrap) << 48
            self._lay_flags()
        return drv

    def device(self, **kwargs) -> PackedQueueDevice:
        kwargs.setdefault("event_idx", self.event_idx)
        pos, wrap = self.start
        kwargs.setdefault("last_avail_idx", pos | wrap << 15)
        return PackedQueueDevice(self.views(), self.memory, **kwargs)

    # -- guest memory ----------------------------------------------------------

    def data(self, slot: int, offset: int = 0) -> int:
        if not 0 <= slot < self.data_slots:
            raise IndexError(f"data slot {slot} of {self.data_slots}")
        return self.data_gpa + slot * DATA_SLOT + offset

    @property
    def end(self) -> int:
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

    # -- descriptor ring -------------------------------------------------------

    def desc(self, i: int, addr: int, length: int, bid: int = 0, flags: int = 0) -> None:
        PDESC.pack_into(self.buffer, self._off(self.addrs.desc + DESC_SIZE * i), addr,
                        length, bid, flags)  # fmt: skip

    def read_desc(self, i: int) -> PDesc:
        return PDesc(*PDESC.unpack_from(self.buffer, self._off(self.addrs.desc + DESC_SIZE * i)))

    def set_flags(self, i: int, flags: int) -> None:
        LE16.pack_into(self.buffer, self._off(self.addrs.desc + DESC_SIZE * i + 14), flags)

    def table(self, addr: int, descs: list[tuple[int, int, int, int]]) -> int:
        """Store an indirect table of (addr, len, id, flags) at ``addr``; its byte length."""
        for j, d in enumerate(descs):
            PDESC.pack_into(self.buffer, self._off(addr + DESC_SIZE * j), *d)
        return DESC_SIZE * len(descs)

    def read_table(self, addr: int, n: int) -> list[PDesc]:
        return [PDesc(*PDESC.unpack_from(self.buffer, self._off(addr + DESC_SIZE * j)))
                for j in range(n)]  # fmt: skip

    def is_avail(self, i: int, wrap: int) -> bool:
        f = self.read_desc(i).flags
        return bool(f & P_AVAIL) == bool(wrap) and bool(f & P_USED) != bool(wrap)

    def is_used(self, i: int, wrap: int) -> bool:
        f = self.read_desc(i).flags
        return bool(f & P_AVAIL) == bool(f & P_USED) == bool(wrap)

    # -- a hand driver: post chains, breaking whichever rule a test wants -------

    def post(
        self,
        descs: list[tuple[int, int, int]],
        bid: int | None = None,
        *,
        flip: bool = True,
        publish_head: bool = True,
    ) -> int:
        """Make (addr, len, flags) descriptors available as one chain (NEXT added
        between them), head flags last; the buffer id goes in every descriptor.
        ``flip=False`` keeps the old wrap counter's flags past the ring's end;
        ``publish_head=False`` leaves the head unwritten (a driver that is late)."""
        if bid is None:
            bid = self.next_id
            self.next_id = (self.next_id + 1) % self.num
        pos, wrap = self.avail_pos, self.avail_wrap
        head_pos, head = pos, None
        for k, (addr, length, flags) in enumerate(descs):
            if k + 1 < len(descs):
                flags |= 1  # VRING_DESC_F_NEXT
            entry = (addr, length, bid, flags | avail_flags(wrap))
            if k == 0:
                head = entry
            else:
                self.desc(pos, *entry)
            pos += 1
            if pos == self.num:
                pos = 0
                if flip:
                    wrap ^= 1
        if publish_head:
            self.desc(head_pos, *head)
        self.avail_pos, self.avail_wrap = pos, wrap
        return head_pos

    # -- a hand device: mark buffers used, breaking whichever rule a test wants --

    def mark_used(self, bid: int, length: int, slots: int = 1, *, flags: int | None = None) -> None:
        """Write one used descriptor at the hand device's position, skip ``slots``."""
        pos, wrap = self.used_pos, self.used_wrap
        f = used_flags(wrap) | (2 if length else 0) if flags is None else flags
        d = self.read_desc(pos)
        self.desc(pos, d.addr, length, bid, f)
        pos += slots
        if pos >= self.num:
            pos -= self.num
            wrap ^= 1
        self.used_pos, self.used_wrap = pos, wrap

    # -- event suppression areas ---------------------------------------------------

    @property
    def driver_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the driver wrote: when it wants used-buffer notifications."""
        return EVENT.unpack_from(self.buffer, self._off(self.addrs.avail))

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        EVENT.pack_into(self.buffer, self._off(self.addrs.avail), off_wrap, flags)

    @property
    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the device wrote: when it wants available-buffer notifications."""
        return EVENT.unpack_from(self.buffer, self._off(self.addrs.used))

    def set_device_event(self, off_wrap: int, flags: int) -> None:
        EVENT.pack_into(self.buffer, self._off(self.addrs.used), off_wrap, flags)
