"""The virtio-net driver (guest side), sans-I/O: virtnet_info and its paths.

It speaks only the ring API (add / kick_prepare / get_buf / detach), like
virtio_net.c; the transport that carries kicks and interrupts is the
caller's: ``try_fill_recv`` / ``start_xmit`` return whether to kick, and the
caller calls ``poll`` when the device signals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Final, cast, final

from virtnet.net.constants import NAPI_POLL_WEIGHT, PAGE_SIZE
from virtnet.net.header import MRG_HDR_LEN, hdr_error
from virtnet.net.ratelimit import DeviceFaults
from virtnet.net.rx import STRATEGIES, RxStrategy, Segment, Used
from virtnet.net.skb import Page, PagePool, SkbAllocator, SkBuff
from virtnet.net.stats import DriverStats
from virtnet.net.xdp import XdpFrame
from virtnet.virtio.errors import QueueFullError, UsedIndexError, UsedRingError
from virtnet.virtio.ring.queue import RingDriver

# A tx header slot: the virtio-net header followed by up to this much linear
# skb data, so a small packet is one descriptor (virtio_net.c's can_push).
TX_SLOT_SIZE: Final = 256

# What start_xmit sends: an skb, or a frame XDP_TX sends back from rx buffers.
TxFrame = SkBuff | XdpFrame
# A tx buffer's token on the ring: its header slot (address, view) and the frame.
TxToken = tuple[int, memoryview, TxFrame]
# --pcap's tap: a frame's pieces, virtio-net header first, and its length (None: all).
Capture = Callable[[Sequence[bytes | memoryview], int | None], None]


def coalesce(frags: list[Segment]) -> list[tuple[int, int]]:
    """Frags as (address, length) segments, physically adjacent ones merged.

    A 64 KiB TSO frame is 17 page frags; when the pages are consecutive in guest
    memory (the pool hands out ascending runs, see SkbAllocator.free) it goes out as
    one descriptor instead of 17 — what Linux gets from compound pages.
    """
    out: list[tuple[int, int]] = []
    end = -1
    for page, off, size in frags:
        addr = page.gpa + off
        if addr == end:
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


def _free_skb(skb: SkBuff) -> None:
    skb.free()


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
        self.rvq = rvq
        self.svq = svq
        self.pool = pool
        self.stats: DriverStats = stats
        self.hdr_len = hdr_len
        self.skbs = SkbAllocator(pool, self.stats)
        self.netif_receive_skb: Callable[[SkBuff], None] = netif_receive_skb or _free_skb
        self.num = 0  # rx buffers posted and not yet returned (vi->num)
        self.max = 0
        # The used rx buffers of the current poll burst not yet received (set
        # before the strategy, which reads it).
        self._burst: Iterator[Used] = iter(())
        self.broken = ""  # why the device's rings can no longer be trusted, or ""
        self.removed = False
        self.faults = DeviceFaults(self.stats)  # what the device got wrong, named
        # Optional tap on the data path (--pcap): a frame's views, header first.
        self.capture: Capture | None = None
        self.rx: RxStrategy = STRATEGIES[strategy](self)
        self.tx_slots = TxSlots(pool, svq.num)

    @property
    def strategy(self) -> str:
        return self.rx.name

    def used_error(self, vq: RingDriver, e: UsedRingError) -> None:
        """Name a used entry the ring refused; an id that is no buffer breaks the queue
        (virtio_ring.c detach_buf_split: BAD_RING "id %u out of range" / "is not a head!")."""
        if e.token is not None:
            self.faults.report("bad_len", str(e))
            return
        head = e.head
        vq.broken = True
        self.ring_broken(e, "bad_id" if head is None or head >= vq.num else "dup_id")

    # -- receive ------------------------------------------------------------

    def try_fill_recv(self) -> bool:
        """Post rx buffers until the ring or the memory runs out; True: kick.

        One refill is one burst: the strategy fills as many buffers as the ring
        has room for and the ring publishes them with one avail-index store.
        """
        rvq = self.rvq
        added = self.rx.add_recvbufs(rvq.num_free // self.rx.descs_per_buf())
        self.num += added
        if self.num > self.max:
            self.max = self.num
        if added and rvq.kick_prepare():
            self.stats.rx_kicks += 1
            return True
        return False

    def deliver(self, skb: SkBuff) -> None:
        """The end of receive_buf: check the header, count, hand the skb up the stack."""
        hdr = skb.vnet_hdr
        if hdr[0] or hdr[1]:  # flags or gso: only then is there anything to check
            bad = hdr_error(hdr, skb.len)
            if bad:
                # virtio_net.c: virtio_net_hdr_to_skb() failed -> "bad gso", frame_err
                self.faults.report(bad[0], f"vq {self.rvq.index}: {bad[1]}")
                self.stats.rx_length_errors += 1
                self.stats.rx_dropped += 1
                skb.free()
                return
        self.stats.rx_packets += 1
        self.stats.rx_bytes += skb.len
        if self.capture is not None:
            self.capture([skb.vnet_hdr, *skb.data_views()], None)
        self.netif_receive_skb(skb)

    def next_used(self) -> Used | None:
        """The next used rx buffer as (token, len) — from the current poll burst,
        else the ring — or None (a packet's further buffers: receive_mergeable's
        virtqueue_get_buf). UsedRingError for an entry the ring refuses."""
        got: Used | None = next(self._burst, None)
        if got is None:
            got = self.rvq.get_buf()
            if got is not None:
                self.num -= 1
                self.stats.rx_bufs += 1
        return got

    def poll(self, budget: int = NAPI_POLL_WEIGHT) -> tuple[int, bool]:
        """virtnet_poll: receive up to ``budget`` packets, refill, re-arm.

        Returns (packets received, kick needed); when it used the whole
        budget, callbacks stay off and the caller polls again. Callbacks are left enabled
        only when the ring was drained and nothing arrived while re-arming —
        the race the seed's ``again:`` label closes. Used buffers are taken in
        bursts of at most what the budget still allows, so a burst is always
        used up before poll returns; a packet's further buffers come from the
        same burst (one iterator, shared with ``next_used``).
        """
        rvq, rx, stats = self.rvq, self.rx, self.stats
        if self.broken:
            return 0, False
        rvq.disable_cb()  # skb_recv_done → napi_schedule_prep: no interrupts while polling
        received = 0
        kick = False
        try:
            while True:
                while received < budget:
                    try:
                        burst: list[Used] = rvq.get_bufs(budget - received)
                    except UsedRingError as e:
                        rx.bad_first_buf(e)
                        continue
                    if not burst:
                        break
                    self.num -= len(burst)
                    stats.rx_bufs += len(burst)
                    self._burst = it = iter(burst)
                    xdp = rx.xdp is not None  # a program sees each frame first
                    for token, length in it:
                        if xdp:
                            rx.receive_buf_xdp(token, length)
                        else:
                            rx.receive_buf(token, length)
                        received += 1
                if self.num < self.max // 2 or self.num == 0:
                    kick |= self.try_fill_recv()
                if received < budget and not rvq.enable_cb():
                    rvq.disable_cb()
                    continue
                return received, kick
        except UsedIndexError as jump:
            # Not "as e" like the handler above: compiled, one name is one typed
            # variable, and a UsedIndexError is no UsedRingError.
            self.ring_broken(jump)
            return received, kick

    def ring_broken(self, e: Exception, kind: str = "idx_jump") -> None:
        """BAD_RING: the device broke the ring itself; nothing more is taken from it.
        Named (fault ``kind``) and kept as the reason the session ends."""
        self.faults.bad_ring(kind, str(e))
        if not self.broken:
            self.broken = self.faults.broken

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
        view[: self.hdr_len] = skb.vnet_hdr
        if head_len:
            view[self.hdr_len : self.hdr_len + head_len] = skb.linear()
        token: TxToken = (gpa, view, skb)
        try:
            if skb.frags:
                svq.add([(gpa, self.hdr_len + head_len), *coalesce(skb.frags)], (), token)
            else:  # all linear (can_push): one descriptor
                svq.add_outbuf(gpa, self.hdr_len + head_len, token)
        except QueueFullError:
            slots.append((gpa, view))
            return False
        self.stats.tx_packets += 1
        self.stats.tx_bytes += skb.len
        if self.capture is not None:
            self.capture([skb.vnet_hdr, *skb.data_views()], None)
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

    # -- teardown -----------------------------------------------------------

    def remove(self) -> None:
        """virtnet_remove after the device reset: every buffer back, every page freed.

        The seed dropped the ``BUG_ON(vi->num != 0)`` for the mergeable case;
        we keep the check, on the pool: nothing may remain outstanding.
        """
        if self.removed:
            return
        self.removed = True
        for buf, _ in self._burst:  # taken off the ring, not received
            self.rx.free_unused_buf(buf)
        while (buf := self.rvq.detach_unused_buf()) is not None:
            self.rx.free_unused_buf(buf)
            self.num -= 1
        while (tok := self.svq.detach_unused_buf()) is not None:
            gpa, view, skb = cast(TxToken, tok)
            self.tx_slots.free.append((gpa, view))
            skb.free()
        self.rx.remove()
        self.tx_slots.release(self.pool)
        if self.num != 0:
            raise AssertionError(f"virtnet_remove: {self.num} rx buffers unaccounted for")
        self.stats.pages_outstanding = self.pool.outstanding
