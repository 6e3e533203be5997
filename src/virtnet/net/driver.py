"""The virtio-net driver (guest side), sans-I/O: virtnet_info and its paths.

It speaks only the ring API (add / kick_prepare / get_buf / detach), like
virtio_net.c; the transport that carries kicks and interrupts is the
caller's: ``try_fill_recv`` / ``start_xmit`` return whether to kick, and the
caller calls ``poll`` when the device signals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, cast, final

from virtnet.net.constants import NAPI_POLL_WEIGHT, PAGE_SIZE
from virtnet.net.header import MRG_HDR_LEN
from virtnet.net.ratelimit import DeviceFaults
from virtnet.net.rx import STRATEGIES
from virtnet.net.rx.base import RxStrategy
from virtnet.net.rx.queue import Capture, RxQueue, Segment, Used
from virtnet.net.rx.xdp import receive_buf_xdp
from virtnet.net.skb import Page, PagePool, SkbAllocator, SkBuff
from virtnet.net.stats import DriverStats
from virtnet.net.xdp import XdpFrame
from virtnet.virtio.errors import QueueFullError, UsedIndexError, UsedRingError
from virtnet.virtio.ring.queue import RingDriver

# A tx header slot: the virtio-net header followed by up to this much linear
# skb data, so a small packet is one descriptor (virtio_net.c's can_push).
TX_SLOT_SIZE: Final = 256

__all__ = ["TX_SLOT_SIZE", "Capture", "TxSlots", "VirtnetDriver", "coalesce"]

# What start_xmit sends: an skb, or a frame XDP_TX sends back from rx buffers.
TxFrame = SkBuff | XdpFrame
# A tx buffer's token on the ring: its header slot (address, view) and the frame.
TxToken = tuple[int, memoryview, TxFrame]


NO_BREAKS: Final[frozenset[int]] = frozenset()


def coalesce(frags: list[Segment], breaks: frozenset[int] = NO_BREAKS) -> list[tuple[int, int]]:
    """Frags as (address, length) segments, physically adjacent ones merged.

    A 64 KiB TSO frame is 17 page frags; when the pages are consecutive in guest
    memory (the pool hands out ascending runs, see SkbAllocator.free) it goes out as
    one descriptor instead of 17 — what Linux gets from compound pages. Never across
    one of ``breaks``, where a memory region starts: the device maps each region on
    its own, so one access cannot span two.
    """
    out: list[tuple[int, int]] = []
    end = -1
    for page, off, size in frags:
        addr = page.gpa + off
        if addr == end and addr not in breaks:
            out[-1] = (out[-1][0], out[-1][1] + size)
        else:
            out.append((addr, size))
        end = addr + size
    return out


@final
class TxSlots:
    """Guest memory for tx headers: one ``TX_SLOT_SIZE`` slot per ring entry."""

    def __init__(self, pool: PagePool, num: int) -> None:
        per_page = PAGE_SIZE // TX_SLOT_SIZE
        self.pages: list[Page] = []
        self.free: list[tuple[int, memoryview]] = []
        for _ in range((num + per_page - 1) // per_page):
            page = pool.alloc_page()
            if page is None:
                raise MemoryError("no guest pages left for tx header slots")
            self.pages.append(page)
            for k in range(per_page):
                off = k * TX_SLOT_SIZE
                self.free.append((page.gpa + off, page.view[off : off + TX_SLOT_SIZE]))

    def release(self, pool: PagePool) -> None:
        for page in self.pages:
            pool.free_page(page)
        self.pages = []
        self.free = []


@final
class VirtnetDriver:
    """One queue pair of a virtio-net device, driver side (struct virtnet_info)."""

    def __init__(
        self,
        rvq: RingDriver,
        svq: RingDriver,
        pool: PagePool,
        *,
        strategy: str = "deferred",
        hdr_len: int = MRG_HDR_LEN,
        stats: DriverStats | None = None,
        netif_receive_skb: Callable[[SkBuff], None] | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown rx strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
        if stats is None:
            # The pool counts into the driver's stats (guest.build_driver gives it them).
            if not isinstance(pool.stats, DriverStats):
                raise TypeError(f"a driver counts into DriverStats, the pool has {pool.stats!r}")
            stats = pool.stats
        self.svq = svq
        self.pool = pool
        self.stats: DriverStats = stats
        self.hdr_len = hdr_len
        # The receive queue: its ring, buffers out (vi->num), poll burst, faults.
        self.rq = RxQueue(rvq, pool, stats, hdr_len, netif_receive_skb=netif_receive_skb)
        self.removed = False
        # Optional tap on the data path (--pcap): a frame's views, header first.
        self._capture: Capture | None = None
        self.rx: RxStrategy = STRATEGIES[strategy](self.rq)
        self.tx_slots = TxSlots(pool, svq.num)
        self.rq.xdp_xmit = self.start_xmit  # XDP_TX goes out on this pair's tx queue
        # Guest addresses where a memory region starts (virtnet driver --mem-regions):
        # tx never merges adjacent frags across one.
        self.memory_breaks: frozenset[int] = NO_BREAKS

    @property
    def strategy(self) -> str:
        return self.rx.name

    # The receive queue's state, read where the driver's callers always found it.

    @property
    def rvq(self) -> RingDriver:
        return self.rq.vq

    @property
    def skbs(self) -> SkbAllocator:
        return self.rq.skbs

    @property
    def num(self) -> int:
        """rx buffers posted and not yet returned (vi->num; the RxQueue's to change)."""
        return self.rq.num

    @property
    def max(self) -> int:
        return self.rq.max

    @property
    def faults(self) -> DeviceFaults:
        return self.rq.faults

    @property
    def broken(self) -> str:
        """Why the device's rings can no longer be trusted, or ""."""
        return self.rq.broken

    @property
    def capture(self) -> Capture | None:
        return self._capture

    @capture.setter
    def capture(self, tap: Capture | None) -> None:
        self._capture = self.rq.capture = tap

    def used_error(self, vq: RingDriver, e: UsedRingError) -> None:
        """Name a used entry the ring refused (RxQueue.used_error, for either queue)."""
        self.rq.used_error(vq, e)

    # -- receive ------------------------------------------------------------

    def try_fill_recv(self) -> bool:
        """Post rx buffers until the ring or the memory runs out; True: kick.

        One refill is one burst: the strategy fills as many buffers as the ring
        has room for and the ring publishes them with one avail-index store.
        """
        rq, rx = self.rq, self.rx
        added = rx.add_recvbufs(rq.vq.num_free // rx.descs_per_buf())
        rq.posted(added)
        if added and rq.vq.kick_prepare():
            self.stats.rx_kicks += 1
            return True
        return False

    def poll(self, budget: int = NAPI_POLL_WEIGHT) -> tuple[int, bool]:
        """virtnet_poll: receive up to ``budget`` packets, refill, re-arm.

        Returns (packets received, kick needed); when it used the whole
        budget, or refilled half the ring on the way and must kick now,
        callbacks stay off and the caller polls again. Callbacks are left enabled
        only when the ring was drained and nothing arrived while re-arming —
        the race the seed's ``again:`` label closes. Used buffers are taken in
        bursts of at most what the budget still allows, so a burst is always
        used up before poll returns; a packet's further buffers come from the
        same burst (one iterator, the RxQueue's, shared with ``next_used``).
        """
        rq, rx = self.rq, self.rx
        if rq.broken:
            return 0, False
        rvq = rq.vq
        rvq.disable_cb()  # skb_recv_done → napi_schedule_prep: no interrupts while polling
        received = 0
        kick = False
        try:
            while True:
                while received < budget:
                    try:
                        burst = rq.get_bufs(budget - received)
                    except UsedRingError as e:
                        rx.bad_first_buf(e)
                        continue
                    if burst is None:
                        break
                    if rx.xdp is not None:  # a program sees each frame first
                        for token, length in burst:
                            receive_buf_xdp(rx, token, length)
                            received += 1
                    else:
                        for token, length in burst:
                            rx.receive_buf(token, length)
                            received += 1
                    if rq.needs_refill() and self.try_fill_recv():
                        # Half the ring came back within this poll (large frames:
                        # 17 buffers each, 15 fill a 256-entry ring): the device is
                        # waiting for buffers now, not when the budget is used.
                        # Return for the kick, callbacks still off: poll again.
                        return received, True
                if rq.needs_refill():
                    kick |= self.try_fill_recv()
                if received < budget and not rvq.enable_cb():
                    rvq.disable_cb()
                    continue
                return received, kick
        except UsedIndexError as jump:
            # Not "as e" like the handler above: compiled, one name is one typed
            # variable, and a UsedIndexError is no UsedRingError.
            rq.ring_broken(jump)
            return received, kick

    def ring_broken(self, e: Exception, kind: str = "idx_jump") -> None:
        """BAD_RING on either queue (RxQueue.ring_broken keeps the reason)."""
        self.rq.ring_broken(e, kind)

    # -- transmit -----------------------------------------------------------

    def start_xmit(self, skb: TxFrame) -> bool:
        """Queue ``skb`` (header in ``skb.vnet_hdr``, data in head + frags).

        Returns False when the tx ring is full (NETDEV_TX_BUSY: the caller
        keeps the skb and retries after ``free_old_xmit_skbs``). The header
        and the linear head go into a slot of guest memory; frags are sent
        in place. The skb is freed when the device has used it.
        """
        svq, slots = self.svq, self.tx_slots.free
        if svq.more_used():
            self.free_old_xmit_skbs()  # a burst of completions, reclaimed at once
        if not slots or not svq.num_free:
            return False  # add() below says the same for a chain that does not fit
        head_len = skb.head_len
        if len(skb.vnet_hdr) != self.hdr_len or self.hdr_len + head_len > TX_SLOT_SIZE:
            self.stats.tx_dropped += 1
            skb.free()
            return True
        gpa, view = slots.pop()
        linear = skb.linear() if head_len else b""
        if isinstance(linear, bytes):
            # Header and head in one store (both checked to fit the slot above): a
            # bytes concatenation is cheaper than a second slice store, compiled.
            piece = skb.vnet_hdr + linear
            view[: len(piece)] = piece
        else:
            view[: self.hdr_len] = skb.vnet_hdr
            view[self.hdr_len : self.hdr_len + head_len] = linear
        token: TxToken = (gpa, view, skb)
        try:
            if skb.frags:
                svq.add([(gpa, self.hdr_len + head_len), *coalesce(skb.frags, self.memory_breaks)],
                        (), token)  # fmt: skip
            else:  # all linear (can_push): one descriptor
                svq.add_outbuf(gpa, self.hdr_len + head_len, token)
        except QueueFullError:
            slots.append((gpa, view))
            return False
        self.stats.tx_packets += 1
        self.stats.tx_bytes += skb.len
        capture = self._capture
        if capture is not None:
            capture([skb.vnet_hdr, *skb.data_views()], None)
        return True

    def tx_kick(self) -> bool:
        if self.svq.kick_prepare():
            self.stats.tx_kicks += 1
            return True
        return False

    def free_old_xmit_skbs(self) -> int:
        """Reclaim what the device has sent: free the skbs, return the slots."""
        svq, slots = self.svq, self.tx_slots.free
        n = 0
        while True:
            try:
                done: list[Used] = svq.get_bufs(svq.num)
            except UsedRingError as e:
                self.stats.tx_dropped += 1
                self.used_error(svq, e)
                if e.token is None:
                    continue
                done = [(e.token, 0)]
            except UsedIndexError as jump:
                self.ring_broken(jump)
                return n
            if not done:
                return n
            for token, _ in done:
                gpa, view, skb = cast(TxToken, token)
                slots.append((gpa, view))
                skb.free()
            n += len(done)
            self.stats.tx_completed += len(done)

    # -- teardown -----------------------------------------------------------

    def remove(self) -> None:
        """virtnet_remove after the device reset: every buffer back, every page freed.

        The seed dropped the ``BUG_ON(vi->num != 0)`` for the mergeable case;
        we keep the check, on the pool: nothing may remain outstanding.
        """
        if self.removed:
            return
        self.removed = True
        rq, rx = self.rq, self.rx
        for buf, _ in rq.burst:  # taken off the ring, not received
            rx.free_unused_buf(buf)
        while (buf := rq.detach_unused_buf()) is not None:
            rx.free_unused_buf(buf)
        while (tok := self.svq.detach_unused_buf()) is not None:
            gpa, view, skb = cast(TxToken, tok)
            self.tx_slots.free.append((gpa, view))
            skb.free()
        rx.remove()
        self.tx_slots.release(self.pool)
        if rq.num != 0:
            raise AssertionError(f"virtnet_remove: {rq.num} rx buffers unaccounted for")
        self.stats.pages_outstanding = self.pool.outstanding
