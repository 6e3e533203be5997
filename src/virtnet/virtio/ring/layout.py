"""Virtqueue wire layouts: split (VIRTIO 1.2, 2.7) and packed (2.8).

    struct virtq_desc  { le64 addr; le32 len; le16 flags; le16 next; };  16 bytes
    struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; };
    struct virtq_used  { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[N];
                         le16 avail_event; };

Packed (2.8.13, 2.8.10):

    struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; };       16 bytes
    struct pvirtq_event_suppress { le16 off_wrap; le16 flags; };            4 bytes

The ring objects access these through memoryview casts ('Q', 'I', 'H'), which
are native-endian: correct only on a little-endian host, checked at import.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from struct import pack_into
from typing import Final, final

from virtnet.virtio.memory import GuestMemory

if sys.byteorder != "little":  # pragma: no cover - x86/arm64 are little-endian
    raise ImportError("virtnet's ring accessors need a little-endian host (virtio 1.x is LE)")

VRING_DESC_F_NEXT: Final = 1
VRING_DESC_F_WRITE: Final = 2
VRING_DESC_F_INDIRECT: Final = 4

VRING_AVAIL_F_NO_INTERRUPT: Final = 1
VRING_USED_F_NO_NOTIFY: Final = 1

DESC_SIZE: Final = 16
USED_ELEM_SIZE: Final = 8
# 2.7: "Queue Size ... the maximum Queue Size value is 32768".
VIRTQUEUE_MAX_SIZE: Final = 32768
# 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total".
MAX_CHAIN_BYTES: Final = 1 << 32

DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4

# 2.8.1/2.8.10: packed descriptor flags besides NEXT/WRITE/INDIRECT, and the
# event suppression structure each side writes for the other.
VRING_PACKED_DESC_F_AVAIL: Final = 1 << 7
VRING_PACKED_DESC_F_USED: Final = 1 << 15
VRING_PACKED_EVENT_FLAG_ENABLE: Final = 0
VRING_PACKED_EVENT_FLAG_DISABLE: Final = 1
VRING_PACKED_EVENT_FLAG_DESC: Final = 2  # only with VIRTIO_F_RING_EVENT_IDX
VRING_PACKED_EVENT_F_WRAP_CTR: Final = 15  # off_wrap bit 15: the wrap counter, bits 0-14: offset
EVENT_SUPPRESS_SIZE: Final = 4
EVENT_SUPPRESS_ALIGN: Final = 4


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    return 2 + 2 + 2 * num + 2


def used_ring_size(num: int) -> int:
    return 2 + 2 + USED_ELEM_SIZE * num + 2


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def check_queue_size(num: int) -> None:
    # 2.7: split queue sizes are powers of 2, at most 32768.
    if not (1 <= num <= VIRTQUEUE_MAX_SIZE) or num & (num - 1):
        raise ValueError(f"queue size {num} is not a power of 2 in 1..{VIRTQUEUE_MAX_SIZE}")


def check_packed_queue_size(num: int) -> None:
    # 2.8: "Packed virtqueues support up to 2^15 entries each"; any size, powers of 2 or not.
    if not 1 <= num <= VIRTQUEUE_MAX_SIZE:
        raise ValueError(f"packed queue size {num} is not in 1..{VIRTQUEUE_MAX_SIZE}")


@dataclass(frozen=True)
class VringAddrs:
    """Guest-physical addresses of the three parts of one split ring."""

    num: int
    desc: int
    avail: int
    used: int

    @classmethod
    def contiguous(cls, base: int, num: int) -> VringAddrs:
        """Lay the ring out in one area starting at ``base`` (16-byte aligned)."""
        check_queue_size(num)
        desc = _align(base, DESC_ALIGN)
        avail = _align(desc + desc_table_size(num), AVAIL_ALIGN)
        used = _align(avail + avail_ring_size(num), USED_ALIGN)
        return cls(num, desc, avail, used)

    @property
    def end(self) -> int:
        return self.used + used_ring_size(self.num)

    @staticmethod
    def area_size(num: int) -> int:
        return VringAddrs.contiguous(0, num).end + DESC_ALIGN


@dataclass(frozen=True)
class PackedAddrs:
    """Guest-physical addresses of one packed ring's three areas (2.8.10.1, 2.8.13).

    ``avail``/``used`` name the driver and device event suppression areas, so
    that code (and SET_VRING_ADDR) that passes (desc, avail, used) for a split
    ring passes the packed ring's (descriptor, driver, device) areas unchanged.
    """

    num: int
    desc: int
    avail: int  # driver event suppression: the driver writes, the device reads
    used: int  # device event suppression: the device writes, the driver reads

    @classmethod
    def contiguous(cls, base: int, num: int) -> PackedAddrs:
        check_packed_queue_size(num)
        desc = _align(base, DESC_ALIGN)
        avail = _align(desc + desc_table_size(num), EVENT_SUPPRESS_ALIGN)
        used = _align(avail + EVENT_SUPPRESS_SIZE, EVENT_SUPPRESS_ALIGN)
        return cls(num, desc, avail, used)

    @property
    def end(self) -> int:
        return self.used + EVENT_SUPPRESS_SIZE

    @staticmethod
    def area_size(num: int) -> int:
        return PackedAddrs.contiguous(0, num).end + DESC_ALIGN


@final
class PackedViews:
    """Typed views of one packed ring: descriptors and the two event areas."""

    __slots__ = ("num", "desc", "desc32", "driver", "device")

    def __init__(self, num: int, desc: memoryview, driver: memoryview, device: memoryview) -> None:
        check_packed_queue_size(num)
        if desc.nbytes < desc_table_size(num):
            raise ValueError(f"descriptor ring of {desc.nbytes} bytes is short for {num}")
        if driver.nbytes < EVENT_SUPPRESS_SIZE or device.nbytes < EVENT_SUPPRESS_SIZE:
            raise ValueError("an event suppression area is shorter than 4 bytes")
        self.num = num
        # desc[2*i] = addr, desc[2*i+1] = len | id << 32 | flags << 48
        self.desc = desc[: desc_table_size(num)].cast("Q")
        # desc32[4*i+2] = len, desc32[4*i+3] = id | flags << 16: the hot paths read
        # flags and length as 32-bit words, which stay machine ints when compiled
        # (the 64-bit word with USED, bit 63, set would not: every operation on it
        # would go through arbitrary-precision arithmetic).
        self.desc32 = desc[: desc_table_size(num)].cast("I")
        # driver[0] / device[0] = off_wrap, [1] = flags
        self.driver = driver[:EVENT_SUPPRESS_SIZE].cast("H")
        self.device = device[:EVENT_SUPPRESS_SIZE].cast("H")

    @classmethod
    def from_memory(cls, memory: GuestMemory, addrs: PackedAddrs | VringAddrs) -> PackedViews:
        num = addrs.num
        return cls(
            num,
            memory.view(addrs.desc, desc_table_size(num)),
            memory.view(addrs.avail, EVENT_SUPPRESS_SIZE),
            memory.view(addrs.used, EVENT_SUPPRESS_SIZE),
        )

    def release(self) -> None:
        for v in (self.desc, self.desc32, self.driver, self.device):
            v.release()


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """2.7.7.2/2.7.10: notify iff ``event_idx`` is in [old, new) (mod 2^16).

    Same expression as Linux's vring_need_event() in include/uapi/linux/virtio_ring.h.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


def read_ring(ring: memoryview, num: int, start: int, n: int) -> list[int]:
    """Entries ``start`` .. ``start + n - 1`` of a ring view of ``num`` entries, wrapping
    at its end (``n`` <= ``num``): one or two slice reads for a whole burst. Compiled, the
    list is indexed natively, while each element of a memoryview is a generic call with
    a boxed index (about 250 instructions an entry)."""
    end = start + n
    if end <= num:
        return ring[start:end].tolist()
    return ring[start:num].tolist() + ring[: end - num].tolist()


def write_ring16(ring: memoryview, num: int, start: int, values: list[int]) -> None:
    """Store ``values`` (each below 2^16) at entries ``start`` .. of a ring view of ``num``
    le16 entries (the avail ring), wrapping at its end (``len(values)`` <= ``num``): one or
    two ``struct.pack_into`` calls for a whole burst, instead of one generic store with two
    boxed ints an entry. (A memoryview's slice store takes only its own format, and both
    ``array("H", list)`` and ``bytes(list)`` convert an item dearer than that store.)"""
    end = start + len(values)
    if end <= num:
        pack_into(f"<{len(values)}H", ring, 2 * start, *values)
    else:
        cut = num - start
        pack_into(f"<{cut}H", ring, 2 * start, *values[:cut])
        pack_into(f"<{end - num}H", ring, 0, *values[cut:])


_barrier_lock = threading.Lock()


def virtio_mb() -> None:
    """A full memory barrier between a ring store and a following ring load.

    x86 keeps stores ordered with stores and loads with loads (TSO), so the
    used/avail publish order needs nothing; but a store followed by a load of
    another location may be reordered — exactly the "publish idx, then read
    the other side's flags/event" step where Linux uses virtio_mb(). CPython
    has no fence primitive; an uncontended lock acquire is a locked
    read-modify-write, which is one on x86 and arm64.
    """
    _barrier_lock.acquire()
    _barrier_lock.release()


@final
class VringViews:
    """Typed views of one ring's three parts, shared by driver and device code."""

    __slots__ = (
        "num", "desc", "avail", "avail_ring", "used", "used_elems", "used_q", "avail_event_view"
    )

    def __init__(self, num: int, desc: memoryview, avail: memoryview, used: memoryview) -> None:
        check_queue_size(num)
        if desc.nbytes < desc_table_size(num):
            raise ValueError(f"descriptor table of {desc.nbytes} bytes is short for {num}")
        if avail.nbytes < avail_ring_size(num) or used.nbytes < used_ring_size(num):
            raise ValueError(f"avail/used ring views are short for queue size {num}")
        self.num = num
        # desc[2*i] = addr, desc[2*i+1] = len | flags << 32 | next << 48
        self.desc = desc[: desc_table_size(num)].cast("Q")
        # avail[0] = flags, avail[1] = idx, avail[2+i] = ring[i], avail[2+num] = used_event
        self.avail = avail[: avail_ring_size(num)].cast("H")
        # avail_ring[i] = ring[i] alone, for reading a burst's heads with read_ring
        self.avail_ring = avail[4 : 4 + 2 * num].cast("H")
        # used[0] = flags, used[1] = idx
        self.used = used[:4].cast("H")
        # used_elems[2*i] = id, used_elems[2*i+1] = len
        self.used_elems = used[4 : 4 + USED_ELEM_SIZE * num].cast("I")
        # used_q[i] = id | len << 32: one load or store per entry on the hot paths
        # (x86 is little-endian and takes an 8-byte access at a 4-byte boundary).
        self.used_q = used[4 : 4 + USED_ELEM_SIZE * num].cast("Q")
        self.avail_event_view = used[4 + USED_ELEM_SIZE * num : used_ring_size(num)].cast("H")

    @classmethod
    def from_memory(cls, memory: GuestMemory, addrs: VringAddrs) -> VringViews:
        num = addrs.num
        return cls(
            num,
            memory.view(addrs.desc, desc_table_size(num)),
            memory.view(addrs.avail, avail_ring_size(num)),
            memory.view(addrs.used, used_ring_size(num)),
        )

    def release(self) -> None:
        for v in (self.desc, self.avail, self.avail_ring, self.used, self.used_elems,
                  self.used_q, self.avail_event_view):
            v.release()
