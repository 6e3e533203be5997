"""How virtnet lays out a guest's memory: rings, indirect tables, page pool.

Both the in-process pair (tests, the embedded bench) and the vhost-user
front-end (a memfd) use this one layout, so a queue pair is built the same
way whatever carries the notifications.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from virtnet.net.constants import ETH_DATA_LEN, MAX_SKB_FRAGS, PAGE_SIZE
from virtnet.net.device import VirtnetDevice
from virtnet.net.driver import VirtnetDriver
from virtnet.net.features import VirtioNetF
from virtnet.net.header import MRG_HDR_LEN
from virtnet.net.skb import PagePool, SkBuff
from virtnet.net.stats import device_stats, driver_stats
from virtnet.virtio.features import VirtioF, has
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.layout import PackedAddrs, PackedViews, VringAddrs, VringViews
from virtnet.virtio.ring.packed import PackedQueueDevice, PackedQueueDriver
from virtnet.virtio.ring.queue import RingDevice, RingDriver
from virtnet.virtio.ring.split import IndirectArea, SplitQueueDevice, SplitQueueDriver

if TYPE_CHECKING:
    from virtnet.net.ctrl import ControlDevice, ControlQueue

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


def rx_strategy_for(features: int, wanted: str) -> str:
    """The strategy the negotiated features allow (virtnet_probe's choice).

    ``deferred``, ``prealloc`` and ``ewma`` need MRG_RXBUF; without it Linux picks big
    buffers when the guest takes GSO, small ones otherwise.
    """
    if has(features, VirtioNetF.MRG_RXBUF):
        return wanted if wanted in ("deferred", "prealloc", "ewma") else "deferred"
    if any(has(features, f) for f in (VirtioNetF.GUEST_TSO4, VirtioNetF.GUEST_TSO6)):
        return "big"
    return "small"


def build_driver(
    memory: GuestMemory,
    layout: GuestLayout,
    features: int,
    strategy: str = "deferred",
    *,
    page_limit: int | None = None,
    netif_receive_skb: Callable[[SkBuff], None] | None = None,
) -> VirtnetDriver:
    """A driver over the rings at ``layout`` in ``memory``, for ``features``
    (packed rings when RING_PACKED was negotiated: ``layout.for_features``)."""
    event_idx = has(features, VirtioF.RING_EVENT_IDX)
    indirect = has(features, VirtioF.RING_INDIRECT_DESC)
    _check_kind(layout.packed, features)
    queues: list[RingDriver] = []
    rx_addrs, tx_addrs = layout.rings
    for q, addrs in enumerate((rx_addrs, tx_addrs)):
        area = layout.indirect_area(memory, q) if indirect else None
        if isinstance(addrs, PackedAddrs):
            ring = PackedViews.from_memory(memory, addrs)
            queues.append(PackedQueueDriver(ring, event_idx=event_idx, indirect=area, index=q))
        else:
            split = VringViews.from_memory(memory, addrs)
            queues.append(SplitQueueDriver(split, event_idx=event_idx, indirect=area, index=q))
    stats = driver_stats()
    pool = PagePool(memory, layout.pool_base, layout.npages, stats, limit=page_limit)
    return VirtnetDriver(
        queues[RX],
        queues[TX],
        pool,
        strategy=rx_strategy_for(features, strategy),
        hdr_len=MRG_HDR_LEN,
        netif_receive_skb=netif_receive_skb,
    )


def _check_kind(packed: bool, features: int) -> None:
    if packed != has(features, VirtioF.RING_PACKED):
        raise ValueError(
            f"{'packed' if packed else 'split'} rings, but RING_PACKED was "
            f"{'not ' if packed else ''}negotiated"
        )


def build_device(
    memory: GuestMemory,
    rings: RingViews,
    features: int,
    last_avail: tuple[int, int] | None = None,
    mtu: int = ETH_DATA_LEN,
) -> VirtnetDevice:
    """A device over already-translated ring views (vhost-user gives front-end addresses).

    ``last_avail``: where each ring starts, as SET_VRING_BASE says (packed: index |
    wrap counter << 15); by default a fresh ring's start.
    """
    event_idx = has(features, VirtioF.RING_EVENT_IDX)
    packed = isinstance(rings[0], PackedViews)
    _check_kind(packed, features)
    if last_avail is None:
        last_avail = (FRESH_PACKED_BASE, FRESH_PACKED_BASE) if packed else (0, 0)
    rx_ring, tx_ring = rings
    rxq, txq = (
        _device_queue(ring, memory, event_idx, base, q)
        for q, (ring, base) in enumerate(zip((rx_ring, tx_ring), last_avail, strict=True))
    )
    return VirtnetDevice(
        rxq,
        txq,
        mergeable=has(features, VirtioNetF.MRG_RXBUF),
        hdr_len=MRG_HDR_LEN,
        stats=device_stats(),
        guest_gso=any(has(features, f) for f in (VirtioNetF.GUEST_TSO4, VirtioNetF.GUEST_TSO6)),
        mtu=mtu,
        guest_csum=has(features, VirtioNetF.GUEST_CSUM),
    )


def _device_queue(
    ring: VringViews | PackedViews, memory: GuestMemory, event_idx: bool, base: int, index: int
) -> RingDevice:
    if isinstance(ring, PackedViews):
        return PackedQueueDevice(ring, memory, event_idx=event_idx, last_avail_idx=base,
                                 index=index)  # fmt: skip
    return SplitQueueDevice(ring, memory, event_idx=event_idx, last_avail_idx=base, index=index)


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


def build_control(memory: GuestMemory, area: ControlArea, features: int, index: int,
                  max_pairs: int) -> tuple[ControlQueue, ControlDevice]:  # fmt: skip
    """Both ends of a control queue in one process: the driver's ControlQueue and the
    ControlDevice answering it, as DPDK's virtio_user shadows the control queue in
    the front-end (no vhost-user back-end serves one)."""
    from virtnet.net.ctrl import ControlDevice, ControlQueue

    event_idx = has(features, VirtioF.RING_EVENT_IDX)
    ring = area.ring
    vq: RingDriver
    if isinstance(ring, PackedAddrs):
        pviews = PackedViews.from_memory(memory, ring)
        vq = PackedQueueDriver(pviews, event_idx=event_idx, index=index)
        cvq = _device_queue(pviews, memory, event_idx, FRESH_PACKED_BASE, index)
    else:
        views = VringViews.from_memory(memory, ring)
        vq = SplitQueueDriver(views, event_idx=event_idx, index=index)
        cvq = _device_queue(views, memory, event_idx, 0, index)
    ctrl = ControlQueue(vq, memory.view(area.buf, CTRL_BUF_SIZE), area.buf)
    return ctrl, ControlDevice(cvq, features, max_pairs)
