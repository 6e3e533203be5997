"""A vring as vhost-user describes it (SET_VRING_NUM / ADDR / BASE), turned into the
typed views of the mapped memory; shared by the session, which checks a ring's
addresses when they arrive, and the queue-pair worker that runs it."""

from __future__ import annotations

from dataclasses import dataclass

from virtnet.vhost_user.messages import VringAddr
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


def ring_views(
    mem: GuestMemory, packed: bool, index: int, num: int, addr: VringAddr
) -> VringViews | PackedViews:
    """The ring's three parts in the mapped memory.

    Packed: SET_VRING_ADDR's descriptor / avail / used addresses are the
    descriptor ring, the driver and the device event suppression areas.
    """
    if packed:
        parts = (
            ("descriptor ring", addr.desc_user_addr, desc_table_size(num)),
            ("driver event area", addr.avail_user_addr, EVENT_SUPPRESS_SIZE),
            ("device event area", addr.used_user_addr, EVENT_SUPPRESS_SIZE),
        )
    else:
        parts = (
            ("descriptor table", addr.desc_user_addr, desc_table_size(num)),
            ("available ring", addr.avail_user_addr, avail_ring_size(num)),
            ("used ring", addr.used_user_addr, used_ring_size(num)),
        )
    views = []
    for part, uva, size in parts:
        try:
            views.append(mem.view_uva(uva, size))
        except MemoryAccessError as e:
            raise RingError(f"vring {index} {part}: {e}") from None
    try:
        return (PackedViews if packed else VringViews)(num, *views)
    except ValueError as e:
        raise RingError(f"vring {index}: {e}") from None


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
