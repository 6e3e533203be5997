"""How virtnet lays out a guest's memory: rings, indirect tables, page pool, and the
control queue's area after the pairs'.

Addresses only: what the vhost-user front-end's session tells the back-end
(SET_VRING_ADDR, the memory table) and what the builders (``net.guest``) put the
rings and the page pool at. Both the in-process pair (tests, the embedded bench)
and the vhost-user front-end (a memfd) use this one layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

from virtnet.net.constants import MAX_SKB_FRAGS, PAGE_SIZE
from virtnet.virtio.features import VirtioF, has
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.chain import IndirectArea
from virtnet.virtio.ring.layout import PackedAddrs, PackedViews, VringAddrs, VringViews

# Linux caps indirect tables at the queue size; virtnet's tx needs 1 + MAX_SKB_FRAGS
# and big rx MAX_SKB_FRAGS, so 20 entries per table is enough and keeps the area small.
INDIRECT_MAX_DESCS: Final = 20
RX: Final = 0
TX: Final = 1
# A packed ring's vring base before anything moved: index 0, wrap counter 1 (2.8.1),
# what QEMU and DPDK's virtio_user send in SET_VRING_BASE.
FRESH_PACKED_BASE: Final = 1 << 15

# Both rings of a queue pair, of one kind.
RingAddrs = tuple[VringAddrs, VringAddrs] | tuple[PackedAddrs, PackedAddrs]
RingViews = tuple[VringViews, VringViews] | tuple[PackedViews, PackedViews]


def _page_align(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


@dataclass(frozen=True)
class GuestLayout:
    """[rx ring][tx ring][rx indirect][tx indirect][pages ...], page aligned.

    ``packed``: the rings are packed (2.8): descriptors then the driver and
    device event areas, in less room than a split ring of the same size, and
    any size 1..32768.
    """

    queue_size: int
    npages: int
    base: int = 0
    packed: bool = False

    @property
    def rings(self) -> RingAddrs:
        if self.packed:
            prx = PackedAddrs.contiguous(self.base, self.queue_size)
            return prx, PackedAddrs.contiguous(_page_align(prx.end), self.queue_size)
        rx = VringAddrs.contiguous(self.base, self.queue_size)
        return rx, VringAddrs.contiguous(_page_align(rx.end), self.queue_size)

    def ring_views(self, memory: GuestMemory) -> RingViews:
        """The (rx, tx) rings' typed views in ``memory`` (in-process device side)."""
        rings = self.rings
        if isinstance(rings[0], PackedAddrs) and isinstance(rings[1], PackedAddrs):
            return (PackedViews.from_memory(memory, rings[0]),
                    PackedViews.from_memory(memory, rings[1]))  # fmt: skip
        assert isinstance(rings[0], VringAddrs) and isinstance(rings[1], VringAddrs)
        return VringViews.from_memory(memory, rings[0]), VringViews.from_memory(memory, rings[1])

    def for_features(self, features: int) -> GuestLayout:
        """This layout with the ring kind the negotiated features say."""
        return replace(self, packed=has(features, VirtioF.RING_PACKED))

    @property
    def indirect(self) -> tuple[int, int]:
        size = _page_align(IndirectArea.size(self.queue_size, INDIRECT_MAX_DESCS))
        rx = _page_align(self.rings[TX].end)
        return rx, rx + size

    @property
    def pool_base(self) -> int:
        ind_size = IndirectArea.size(self.queue_size, INDIRECT_MAX_DESCS)
        return _page_align(self.indirect[TX] + ind_size)

    @property
    def size(self) -> int:
        return self.pool_base - self.base + self.npages * PAGE_SIZE

    def indirect_area(self, memory: GuestMemory, q: int) -> IndirectArea:
        gpa = self.indirect[q]
        size = IndirectArea.size(self.queue_size, INDIRECT_MAX_DESCS)
        return IndirectArea(gpa, memory.view(gpa, size), self.queue_size, INDIRECT_MAX_DESCS)

    @staticmethod
    def pages_for(queue_size: int) -> int:
        """Enough pages for a full rx ring, a full tx ring of 64 KiB frames, and the stack."""
        return queue_size * (MAX_SKB_FRAGS + 2) + 512


CVQ_SIZE: Final = 64  # control queue entries (Linux sizes it as the device says; 64 is QEMU's)
CTRL_BUF_SIZE: Final = 4096  # virtnet_send_command's struct control_buf, a page


@dataclass(frozen=True)
class ControlArea:
    """[control ring][control buffer] at ``base``: the control virtqueue (5.1.6.5)
    and the driver's command buffer, after the queue pairs' areas."""

    base: int
    packed: bool = False

    @property
    def ring(self) -> VringAddrs | PackedAddrs:
        return (PackedAddrs if self.packed else VringAddrs).contiguous(self.base, CVQ_SIZE)

    @property
    def buf(self) -> int:
        return _page_align(self.ring.end)

    @property
    def size(self) -> int:
        return self.buf + CTRL_BUF_SIZE - self.base
