"""``RxQueue``: Linux's ``struct receive_queue``, the per-queue receive state.

The ring, the page pool and skb allocator, the count of buffers posted (``num``:
the seed's ``vi->num``, written here only), the used buffers of the current poll
burst, the end of every receive path (``deliver``) and the record of what the
device got wrong (faults, broken). The driver owns one; every rx strategy takes
it, and nothing under ``net/rx/`` knows the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Final, final

from virtnet.net.constants import EWMA_PKT_LEN_WEIGHT_RCP
from virtnet.net.header import hdr_error
from virtnet.net.ratelimit import DeviceFaults
from virtnet.net.skb import Page, PagePool, SkbAllocator, SkBuff
from virtnet.net.stats import DriverStats
from virtnet.net.xdp import XdpFrame
from virtnet.virtio.errors import UsedRingError
from virtnet.virtio.ring.queue import RingDriver

# A used buffer as the ring returns it: (token, length written).
Used = tuple[object, int]
# A frame's bytes in guest memory: (page, offset, size), as skb frags are.
Segment = tuple[Page, int, int]
# --pcap's tap: a frame's pieces, virtio-net header first, and its length (None: all).
Capture = Callable[[Sequence[bytes | memoryview], int | None], None]


# ilog2(weight_rcp): the EWMA's shift
EWMA_SHIFT: Final = EWMA_PKT_LEN_WEIGHT_RCP.bit_length() - 1


@final
class EwmaPktLen:
    """include/linux/average.h ``DECLARE_EWMA(pkt_len, 0, 64)``: precision 0,
    weight 1/64; the first sample is taken as is (an internal value of 0 means empty)."""

    __slots__ = ("internal",)

    def __init__(self) -> None:
        self.internal = 0

    def add(self, val: int) -> None:
        i = self.internal
        self.internal = (((i << EWMA_SHIFT) - i) + val) >> EWMA_SHIFT if i else val

    def read(self) -> int:
        return self.internal


def _free_skb(skb: SkBuff) -> None:
    skb.free()


def _no_xmit(frame: XdpFrame) -> bool:
    return False


@final
class RxQueue:
    """struct receive_queue: one rx virtqueue and what receiving from it needs."""

    def __init__(
        self,
        vq: RingDriver,
        pool: PagePool,
        stats: DriverStats,
        hdr_len: int,
        *,
        netif_receive_skb: Callable[[SkBuff], None] | None = None,
    ) -> None:
        self.vq = vq
        self.pool = pool
        self.stats = stats
        self.hdr_len = hdr_len
        self.skbs = SkbAllocator(pool, stats)
        self.netif_receive_skb: Callable[[SkBuff], None] = netif_receive_skb or _free_skb
        self.num = 0  # rx buffers posted and not yet returned (vi->num)
        self.max = 0
        # The used buffers of the current poll burst not yet received: a packet's
        # further buffers come from here first (next_used).
        self.burst: Iterator[Used] = iter(())
        self.mrg_avg_pkt_len = EwmaPktLen()  # what ewma sizes buffers by
        self.broken = ""  # why the device's rings can no longer be trusted, or ""
        self.faults = DeviceFaults(stats)  # what the device got wrong, named
        self.capture: Capture | None = None  # --pcap's tap on delivered frames
        # XDP_TX's way out (virtnet_xdp_xmit): the owner's transmit, set by the driver.
        self.xdp_xmit: Callable[[XdpFrame], bool] = _no_xmit

    # -- num: buffers out --------------------------------------------------------------------

    def posted(self, added: int) -> None:
        """try_fill_recv's ``vi->num++`` (for a burst) and ``vi->max``."""
        self.num += added
        if self.num > self.max:
            self.max = self.num

    def needs_refill(self) -> bool:
        """virtnet_poll: refill once half the posted buffers came back."""
        return self.num < self.max // 2 or self.num == 0

    def get_bufs(self, n: int) -> Iterator[Used] | None:
        """Up to ``n`` used buffers off the ring as the new poll burst, or None.
        UsedRingError / UsedIndexError as the ring raises them."""
        burst: list[Used] = self.vq.get_bufs(n)
        if not burst:
            return None
        self.num -= len(burst)
        self.stats.rx_bufs += len(burst)
        self.burst = it = iter(burst)
        return it

    def next_used(self) -> Used | None:
        """The next used rx buffer as (token, len) — from the current poll burst,
        else the ring — or None (a packet's further buffers: receive_mergeable's
        virtqueue_get_buf). UsedRingError for an entry the ring refuses."""
        got: Used | None = next(self.burst, None)
        if got is None:
            got = self.vq.get_buf()
            if got is not None:
                self.num -= 1
                self.stats.rx_bufs += 1
        return got

    def refused(self, e: UsedRingError) -> object:
        """A used entry the ring refused: named; the buffer it names (if any) is
        no longer posted, and returned for the caller to recycle."""
        self.used_error(self.vq, e)
        token = e.token
        if token is not None:
            self.num -= 1
        return token

    def detach_unused_buf(self) -> object:
        """virtqueue_detach_unused_buf after the reset: a posted buffer back, or None."""
        buf = self.vq.detach_unused_buf()
        if buf is not None:
            self.num -= 1
        return buf

    # -- the end of every receive path -------------------------------------------------------

    def deliver(self, skb: SkBuff) -> None:
        """The end of receive_buf: check the header, count, hand the skb up the stack."""
        hdr = skb.vnet_hdr
        if hdr[0] or hdr[1]:  # flags or gso: only then is there anything to check
            bad = hdr_error(hdr, skb.len)
            if bad:
                # virtio_net.c: virtio_net_hdr_to_skb() failed -> "bad gso", frame_err
                self.faults.report(bad[0], f"vq {self.vq.index}: {bad[1]}")
                self.stats.rx_length_errors += 1
                self.stats.rx_dropped += 1
                skb.free()
                return
        self.stats.rx_packets += 1
        self.stats.rx_bytes += skb.len
        if self.capture is not None:
            self.capture([skb.vnet_hdr, *skb.data_views()], None)
        self.netif_receive_skb(skb)

    # -- faults ----------------------------------------------------------------------------

    def used_error(self, vq: RingDriver, e: UsedRingError) -> None:
        """Name a used entry the ring refused; an id that is no buffer breaks the queue
        (virtio_ring.c detach_buf_split: BAD_RING "id %u out of range" / "is not a head!")."""
        if e.token is not None:
            self.faults.report("bad_len", str(e))
            return
        head = e.head
        vq.broken = True
        self.ring_broken(e, "bad_id" if head is None or head >= vq.num else "dup_id")

    def ring_broken(self, e: Exception, kind: str = "idx_jump") -> None:
        """BAD_RING: the device broke a ring itself; nothing more is taken from it.
        Named (fault ``kind``) and kept as the reason the session ends."""
        self.faults.bad_ring(kind, str(e))
        if not self.broken:
            self.broken = self.faults.broken
