"""A vring as vhost-user describes it (SET_VRING_NUM / ADDR / BASE), turned into the
typed views of the mapped memory; shared by the session, which checks a ring's
addresses when they arrive, and the queue-pair worker that runs it."""

from __future__ import annotations

from dataclasses import dataclass

from virtnet.vhost_user.messages import VHOST_VRING_F_LOG, VringAddr
from virtnet.virtio.errors import MemoryAccessError
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.layout import (
    EVENT_SUPPRESS_SIZE,
    PackedViews,
    VringViews,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)


class RingError(ValueError):
    """A ring whose addresses or size do not fit the memory; the text names the part."""


def _part_views(
    mem: GuestMemory, index: int, parts: tuple[tuple[str, int, int], ...]
) -> list[memoryview]:
    views = []
    for part, uva, size in parts:
        try:
            views.append(mem.view_uva(uva, size))
        except MemoryAccessError as e:
            raise RingError(f"vring {index} {part}: {e}") from None
    return views


def split_ring_views(mem: GuestMemory, index: int, num: int, addr: VringAddr) -> VringViews:
    """A split ring's descriptor table, available and used rings in the mapped memory."""
    desc, avail, used = _part_views(mem, index, (
        ("descriptor table", addr.desc_user_addr, desc_table_size(num)),
        ("available ring", addr.avail_user_addr, avail_ring_size(num)),
        ("used ring", addr.used_user_addr, used_ring_size(num)),
    ))  # fmt: skip
    try:
        return VringViews(num, desc, avail, used)
    except ValueError as e:
        raise RingError(f"vring {index}: {e}") from None


def packed_ring_views(mem: GuestMemory, index: int, num: int, addr: VringAddr) -> PackedViews:
    """A packed ring's parts: SET_VRING_ADDR's descriptor / avail / used addresses are
    the descriptor ring, the driver and the device event suppression areas."""
    desc, driver, device = _part_views(mem, index, (
        ("descriptor ring", addr.desc_user_addr, desc_table_size(num)),
        ("driver event area", addr.avail_user_addr, EVENT_SUPPRESS_SIZE),
        ("device event area", addr.used_user_addr, EVENT_SUPPRESS_SIZE),
    ))  # fmt: skip
    try:
        return PackedViews(num, desc, driver, device)
    except ValueError as e:
        raise RingError(f"vring {index}: {e}") from None


def ring_views(
    mem: GuestMemory, packed: bool, index: int, num: int, addr: VringAddr
) -> VringViews | PackedViews:
    """The ring's three parts in the mapped memory, of the kind negotiated."""
    if packed:
        return packed_ring_views(mem, index, num, addr)
    return split_ring_views(mem, index, num, addr)


def pair_views(
    mem: GuestMemory,
    packed: bool,
    pair: int,
    rings: tuple[tuple[int, VringAddr], tuple[int, VringAddr]],
) -> tuple[VringViews, VringViews] | tuple[PackedViews, PackedViews]:
    """Queue pair ``pair``'s rx and tx rings (vrings 2 * pair and + 1), both of one
    kind, as ``build_device`` takes them; ``rings`` is (num, addr) of each."""
    (rx_num, rx_addr), (tx_num, tx_addr) = rings
    if packed:
        return (packed_ring_views(mem, 2 * pair, rx_num, rx_addr),
                packed_ring_views(mem, 2 * pair + 1, tx_num, tx_addr))  # fmt: skip
    return (split_ring_views(mem, 2 * pair, rx_num, rx_addr),
            split_ring_views(mem, 2 * pair + 1, tx_num, tx_addr))  # fmt: skip


def log_addrs(mem: GuestMemory, addr: VringAddr) -> tuple[int, int]:
    """Guest-physical (descriptor area, used area) of a ring, for its dirty log.

    The used area is ``log_guest_addr`` when VHOST_VRING_F_LOG is set (vhost-user.rst
    "Migration": ring addresses are front-end virtual, the log is guest-physical); else,
    as for the descriptor area (a packed ring's used descriptors), the memory table
    translates. An address in no region logs nothing that matters: -1 pages are past
    any log, counted as ``beyond``.
    """
    try:
        desc = mem.uva_to_gpa(addr.desc_user_addr)
    except MemoryAccessError:
        desc = -(1 << 63)
    if addr.flags & bit(VHOST_VRING_F_LOG):
        return desc, addr.log_guest_addr
    try:
        return desc, mem.uva_to_gpa(addr.used_user_addr)
    except MemoryAccessError:
        return desc, -(1 << 63)


@dataclass(frozen=True)
class RingSpec:
    """What a queue-pair worker needs to run its pair: rings 2 * pair (rx) and + 1 (tx)."""

    pair: int
    features: int
    mtu: int
    rings: tuple[tuple[int, VringAddr], tuple[int, VringAddr]]  # (num, addr), rx then tx
    bases: tuple[int, int]
    fd_mask: tuple[bool, bool, bool, bool]  # which of rx kick, rx call, tx kick, tx call follow

    @property
    def packed(self) -> bool:
        return bool(self.features & bit(VirtioF.RING_PACKED))

    def index(self, q: int) -> int:
        return 2 * self.pair + q
