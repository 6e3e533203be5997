"""How virtnet builds a queue pair's driver and device over a guest's memory, at the
layout ``net.layout`` gives (its names are re-exported here).

Both the in-process pair (tests, the embedded bench) and the vhost-user
front-end (a memfd) use this one layout, so a queue pair is built the same
way whatever carries the notifications.
"""

from __future__ import annotations

from collections.abc import Callable

from virtnet.net.constants import ETH_DATA_LEN
from virtnet.net.device import VirtnetDevice
from virtnet.net.driver import VirtnetDriver
from virtnet.net.features import VirtioNetF
from virtnet.net.header import MRG_HDR_LEN
from virtnet.net.layout import (  # noqa: F401 - the layout's names, re-exported
    CTRL_BUF_SIZE,
    CVQ_SIZE,
    FRESH_PACKED_BASE,
    INDIRECT_MAX_DESCS,
    RX,
    TX,
    ControlArea,
    GuestLayout,
    RingAddrs,
    RingViews,
)
from virtnet.net.skb import PagePool, SkBuff
from virtnet.net.stats import device_stats, driver_stats
from virtnet.virtio.features import VirtioF, has
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.layout import PackedAddrs, PackedViews, VringViews
from virtnet.virtio.ring.packed import PackedQueueDevice
from virtnet.virtio.ring.queue import RingDevice, RingDriver, vring_create_virtqueue
from virtnet.virtio.ring.split import SplitQueueDevice


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
        ring: PackedViews | VringViews
        if isinstance(addrs, PackedAddrs):
            ring = PackedViews.from_memory(memory, addrs)
        else:
            ring = VringViews.from_memory(memory, addrs)
        queues.append(vring_create_virtqueue(ring, event_idx=event_idx, indirect=area, index=q))
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
