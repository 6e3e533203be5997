"""The virtio-net device (host side), sans-I/O: fills rx buffers, consumes tx chains.

Mirrors vhost-net's handle_rx / handle_tx: rx gathers as many chains as a
packet needs (mergeable: ``num_buffers`` of them, 5.1.6.4), tx hands each
chain's readable views (header first) to a consumer. Chains popped for rx
but not used yet stay in a FIFO cache, so a 64 KiB read can be posted into
enough buffers up front; ``reset`` gives them back (vhost_discard_vq_desc).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Final, final

from virtnet.net.constants import ETH_DATA_LEN, ETH_HLEN, MAX_GSO_FRAME, VLAN_HLEN
from virtnet.net.faults import FaultyQueue
from virtnet.net.features import VirtioNetF
from virtnet.net.header import (
    MRG_HDR_LEN,
    NUM_BUFFERS,
    NUM_BUFFERS_OFFSET,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    complete_csum,
    gather,
    strip_hdr,
)
from virtnet.net.stats import DeviceStats, device_stats
from virtnet.virtio.dirtylog import DirtyLog
from virtnet.virtio.errors import AvailIndexError, DescriptorError
from virtnet.virtio.ring.chain import Chain
from virtnet.virtio.ring.queue import RingDevice, publish_used

ZERO_HDR: Final = bytes(MRG_HDR_LEN)
FILTER_PEEK: Final = 18  # what a receive filter reads: the MACs, a VLAN tag's TCI
ONE_BUFFER: Final = NUM_BUFFERS.pack(1)
# Chains taken off the rx ring per pop: enough for a 64 KiB frame in 4 KiB
# buffers, or a NAPI budget of small frames, for one avail-index read.
RX_POP_BURST: Final = 64
# Used rx heads published (and, if the driver asks, signalled) at a time within a
# pass: vhost-net's VHOST_NET_BATCH. A pass of large frames (17 buffers a 64 KiB
# frame) would otherwise fill the whole ring before the driver hears of the first.
RX_USED_BATCH: Final = 64

# A frame's pieces as a source hands them over (bytes, or views into its buffers).
Piece = bytes | memoryview
# A first frame piece up to this long is joined to the virtio-net header before the
# copy into guest memory (receive_packet), not stored after it on its own.
HEADER_MERGE_MAX: Final = 128
# The device side of a ring; --faults puts a FaultyQueue in front of it (faults.install).
DeviceQueue = RingDevice | FaultyQueue


def scatter(srcs: Sequence[Piece], dsts: Sequence[memoryview]) -> int:
    """Copy the concatenation of ``srcs`` into consecutive ``dsts``; bytes copied."""
    if len(dsts) == 1:
        return _copy_into(srcs, dsts[0])
    di = 0
    doff = 0
    total = 0
    ndst = len(dsts)
    for piece in srcs:
        src = piece if isinstance(piece, memoryview) else memoryview(piece).cast("B")
        soff = 0
        slen = len(src)
        while soff < slen:
            if di == ndst:
                return total
            dst = dsts[di]
            n = min(slen - soff, len(dst) - doff)
            dst[doff : doff + n] = src[soff : soff + n]
            soff += n
            doff += n
            total += n
            if doff == len(dst):
                di += 1
                doff = 0
    return total


def _all_direct(chains: list[Chain]) -> bool:
    for chain in chains:
        if chain.region is None:
            return False
    return True


def scatter_direct(srcs: list[Piece], chains: list[Chain]) -> None:
    """``scatter`` into chains that are each one direct descriptor (``Chain.direct``),
    stored through their region's view at their offset: the chains' own views are
    never made (compiled, about 1 100 instructions a buffer). ``chains`` hold at least
    the sources' total (``_take``)."""
    ci = 0
    chain = chains[0]
    dst = chain.region
    assert dst is not None  # _all_direct
    doff = chain.offset
    dend = doff + chain.in_len
    for piece in srcs:
        src = piece if isinstance(piece, memoryview) else memoryview(piece)
        soff = 0
        slen = len(src)
        while soff < slen:
            if doff == dend:
                ci += 1
                chain = chains[ci]
                dst = chain.region
                assert dst is not None
                doff = chain.offset
                dend = doff + chain.in_len
            n = min(slen - soff, dend - doff)
            dst[doff : doff + n] = src[soff : soff + n]
            soff += n
            doff += n


def _copy_into(srcs: Sequence[Piece], dst: memoryview) -> int:
    """The one-destination case (every frame that fits a page): plain appends."""
    off = 0
    cap = len(dst)
    for src in srcs:
        end = off + len(src)
        if end > cap:
            dst[off:cap] = memoryview(src)[: cap - off]
            return cap
        dst[off:end] = src
        off = end
    return off


@final
class ChainFifo:
    """The rx cache: chains popped and not used yet, oldest first.

    A list and a head index, not a deque: compiled, list indexing and stores are C, while a
    deque's ``popleft`` and ``[0]`` are calls by name. A taken slot is cleared at once, so
    no chain (and no view of guest memory) outlives its use here.
    """

    def __init__(self) -> None:
        self._items: list[Chain | None] = []
        self._head = 0

    def __len__(self) -> int:
        return len(self._items) - self._head

    def __bool__(self) -> bool:
        return self._head < len(self._items)

    def __iter__(self) -> Iterator[Chain]:
        for k in range(self._head, len(self._items)):
            chain = self._items[k]
            assert chain is not None
            yield chain

    def front(self) -> Chain:
        """The oldest chain (IndexError if none)."""
        chain = self._items[self._head]
        assert chain is not None
        return chain

    def popleft(self) -> Chain:
        """Take the oldest chain (IndexError if none), as ``deque.popleft``."""
        items, head = self._items, self._head
        chain = items[head]
        assert chain is not None
        items[head] = None
        head += 1
        if head == len(items):
            items.clear()
            head = 0
        elif head > 64 and head * 2 > len(items):
            del items[:head]  # compact the taken front
            head = 0
        self._head = head
        return chain

    def extend(self, chains: list[Chain]) -> None:
        self._items.extend(chains)

    def clear(self) -> None:
        self._items.clear()
        self._head = 0


@final
class VirtnetDevice:
    """One queue pair of a virtio-net device, device side."""

    def __init__(
        self,
        rxq: DeviceQueue,
        txq: DeviceQueue,
        *,
        mergeable: bool = True,
        hdr_len: int = MRG_HDR_LEN,
        stats: DeviceStats | None = None,
        guest_gso: bool = True,
        mtu: int = ETH_DATA_LEN,
        guest_csum: bool = True,
    ) -> None:
        self.rxq: DeviceQueue = rxq
        self.guest_gso = guest_gso
        self.guest_csum = guest_csum  # GUEST_CSUM: a partial checksum may reach the guest
        # The largest frame a source may hand us for the guest (receive_from's room).
        self.mtu = mtu
        self.max_frame = MAX_GSO_FRAME if guest_gso else ETH_HLEN + VLAN_HLEN + mtu
        self.txq: DeviceQueue = txq
        self.mergeable = mergeable
        self.hdr_len = hdr_len
        self.stats: DeviceStats = stats if stats is not None else device_stats()
        self._rx_cache = ChainFifo()
        self._rx_cached = 0  # bytes of writable space in the cache
        self._rx_bufs_flushed = 0  # stats.rx_bufs at the last flush_rx
        # The last header given to receive_packet and that header with num_buffers 1:
        # a source sends one header for frame after frame, so it is made once, not
        # per frame, and the in-place path writes the header with one store.
        self._hdr_seen = b""
        self._hdr_one = b""
        # Set when the last rx attempt found too little room: the back-end should
        # stop reading its source and wait for the driver's next rx kick.
        # Optional tap on the data path (--pcap): called with a frame's views,
        # virtio-net header first, and its length including the header.
        self.capture: Callable[[Sequence[memoryview], int], None] | None = None
        self.rx_starved = False
        # The control queue's receive filter (CTRL_RX / CTRL_MAC: QEMU receive_filter):
        # called with a frame's first bytes; None while promiscuous, the cheap default.
        self.rx_filter: Callable[[bytes], bool] | None = None
        self._bounce: memoryview | None = None
        self._pending: bytes | None = None  # a frame read but not yet delivered
        self.rx_broken = False
        self.tx_broken = False
        self.last_error = ""
        # Dirty logging (live migration, VHOST_F_LOG_ALL): None while off, so the rx
        # path pays one attribute test per frame; the owner flushes it per burst.
        self.dirty: DirtyLog | None = None

    def set_dirty_log(
        self, log: DirtyLog | None, rx: tuple[int, int], tx: tuple[int, int]
    ) -> None:
        """Log every guest page this queue pair writes into ``log`` (None: stop);
        ``rx`` / ``tx`` are each ring's (descriptor area, used area) guest-physical
        addresses for its own writes (``set_dirty_log`` of the ring)."""
        self.dirty = log
        self.rxq.set_dirty_log(log, rx[0], rx[1])
        self.txq.set_dirty_log(log, tx[0], tx[1])

    def _log_chain(self, chain: Chain, nbytes: int) -> None:
        """Log the first ``nbytes`` the device wrote into ``chain``'s writable buffers
        (vhost's vhost_log_write over the chain's log entries)."""
        log = self.dirty
        assert log is not None  # the callers test it
        for addr, length, writable in chain.segments:
            if nbytes <= 0:
                return
            if writable:
                n = length if length < nbytes else nbytes
                log.log_write(addr, n)
                nbytes -= n

    def _log_offered(self, nbytes: int) -> None:
        """Log a read of ``nbytes`` into the cached chains (receive_from's views) that
        did not end as a used packet: its buffers were written all the same."""
        for chain in self._rx_cache if self.mergeable else (self._rx_cache.front(),):
            if nbytes <= 0:
                return
            self._log_chain(chain, nbytes)
            nbytes -= chain.in_len

    # -- rx: host → guest ---------------------------------------------------

    def _pop_rx(self, budget: int = RX_POP_BURST) -> list[Chain]:
        """Up to ``budget`` rx chains in one burst; [] when the driver posted nothing more.

        A chain the ring refuses (or one with nothing writable) comes back
        "dead" (in_len 0): it keeps its place in the cache, so ``reset`` can
        still give back exactly the chains not used, and it is returned with
        length 0 when its turn comes.
        """
        if self.rx_broken:
            return []
        try:
            chains = self.rxq.pop_burst(budget)
        except AvailIndexError as jump:
            # Not "as e" like the handler below: compiled, one name is one typed
            # variable, and a DescriptorError is no AvailIndexError.
            self._broken("rx", jump)
            return []
        except DescriptorError as e:
            self.stats.desc_errors += 1
            self.last_error = str(e)
            return [Chain(e.head if e.head is not None else -1)]
        for chain in chains:
            if not chain.in_len:
                self.stats.desc_errors += 1  # an rx buffer the device cannot write
                self.last_error = f"rx chain at head {chain.head} has no device-writable descriptor"
        return chains

    def _broken(self, which: str, e: Exception) -> None:
        """vhost's vq_err: stop the queue; only a reset brings it back."""
        self.stats.desc_errors += 1
        self.last_error = f"{which} queue stopped: {e}"
        if which == "rx":
            self.rx_broken = True
        else:
            self.tx_broken = True

    def _refuse(self, q: DeviceQueue, e: DescriptorError) -> None:
        self.stats.desc_errors += 1
        self.last_error = str(e)
        if e.head is not None:
            q.push_used(e.head, 0)

    def _return_dead(self, chain: Chain) -> None:
        if chain.head >= 0:
            self.rxq.push_used(chain.head, 0)

    def _fill_cache(self, need: int) -> bool:
        """Have at least ``need`` writable bytes cached (mergeable) or one chain."""
        ok = self._fill_cache_from_ring(need)
        self.rx_starved = not ok
        return ok

    def _fill_cache_from_ring(self, need: int) -> bool:
        cache = self._rx_cache
        if not self.mergeable:
            while True:
                while cache and not cache.front().in_len:
                    self._return_dead(cache.popleft())
                if cache:
                    return cache.front().in_len >= need
                chains = self._pop_rx()
                if not chains:
                    return False
                cache.extend(chains)
                self._rx_cached += sum(c.in_len for c in chains)
        while self._rx_cached < need:
            chains = self._pop_rx()
            if not chains:
                return False
            cache.extend(chains)
            for chain in chains:
                self._rx_cached += chain.in_len
        return True

    def _take(self, nbytes: int) -> list[Chain]:
        """The fewest live chains from the cache front that hold ``nbytes``.

        Dead chains met on the way are returned (length 0) first, so the
        packet's own buffers stay consecutive in the used ring.
        """
        cache = self._rx_cache
        chains: list[Chain] = []
        have = 0
        while have < nbytes or not chains:
            chain = cache.popleft()
            if not chain.in_len:
                self._return_dead(chain)
                continue
            chains.append(chain)
            have += chain.in_len
        self._rx_cached -= have
        return chains

    def _complete_rx(self, chains: list[Chain], nbytes: int) -> None:
        """Push the chains used for a ``nbytes`` packet (header included)."""
        if self.capture is not None:
            self.capture([v for chain in chains for v in chain.writable], nbytes)
        left = nbytes
        for chain in chains:
            n = min(left, chain.in_len)
            self.rxq.push_used(chain.head, n)
            if self.dirty is not None:
                self._log_chain(chain, n)
            left -= n
        stats = self.stats
        stats.rx_packets += 1
        stats.rx_bytes += nbytes - self.hdr_len
        stats.rx_bufs += len(chains)
        if len(chains) > stats.rx_num_buffers_max:
            stats.rx_num_buffers_max = len(chains)

    def has_room(self, frame_len: int) -> bool:
        """Whether ``receive_packet`` would find a buffer now (it may still drop
        the frame: non-mergeable buffers too small for it, GSO the guest refused).

        A NIC drops a frame its rx buffers cannot take instead of waiting for
        bigger ones, so a too-small posted buffer counts as room here.
        """
        need = self.hdr_len + frame_len
        if self.mergeable:
            return self._rx_cached >= need or self._fill_cache(need)
        self._fill_cache(need)
        return bool(self._rx_cache)

    def receive_packet(self, frame: list[Piece], hdr: bytes = ZERO_HDR) -> bool:
        """Deliver one frame (views/bytes) with virtio-net header ``hdr`` to the guest.

        False (and rx_dropped) when the guest has not posted room for it —
        a NIC with an empty ring drops, it does not wait.
        """
        frame_len = 0
        for v in frame:
            frame_len += len(v)
        need = self.hdr_len + frame_len
        if self.rx_filter is not None and not self.rx_filter(gather(frame, 0, FILTER_PEEK)):
            self.stats.rx_filtered += 1
            return True  # taken, as a NIC takes a frame its filter drops
        if hdr[1] and not self.guest_gso:
            # A GSO frame the guest did not negotiate (5.1.6.2: the device MUST NOT
            # send a gso_type the guest has no GUEST_* bit for).
            self.stats.rx_dropped += 1
            return False
        if hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM and not self.guest_csum:
            # 5.1.6.4.1: without GUEST_CSUM the flags MUST be 0 (a loopback echoes the
            # tx header): finish the checksum here, or drop a request past the frame.
            done = complete_csum(gather(frame, 0, frame_len), hdr)
            if done is None:
                self.stats.rx_dropped += 1
                return False
            frame, hdr = [done[0]], done[1]
        cache = self._rx_cache
        if self.mergeable and cache and self.capture is None:
            chain = cache.front()
            region = chain.region
            if chain.in_len >= need and (region is not None or len(chain.writable) == 1):
                # The frame fits the next buffer (every frame up to a page): one
                # buffer, num_buffers 1, written in place; a buffer of one direct
                # descriptor straight into its memory region, with no view made.
                cache.popleft()
                self._rx_cached -= chain.in_len
                if region is not None:
                    dst, at = region, chain.offset
                else:
                    dst, at = chain.writable[0], 0
                if hdr is not self._hdr_seen:
                    self._hdr_seen = hdr
                    self._hdr_one = hdr[:NUM_BUFFERS_OFFSET] + ONE_BUFFER
                first = frame[0]
                if isinstance(first, bytes) and len(first) <= HEADER_MERGE_MAX:
                    # Header and a short first piece (a stack's headers) in one
                    # store: a bytes concatenation is cheaper than a slice store.
                    piece = self._hdr_one + first
                    off = at + len(piece)
                    dst[at:off] = piece
                    rest = 1
                else:
                    off = at + self.hdr_len
                    dst[at:off] = self._hdr_one
                    rest = 0
                for k in range(rest, len(frame)):
                    v = frame[k]
                    end = off + len(v)
                    dst[off:end] = v
                    off = end
                self.rxq.push_used(chain.head, need)
                if self.dirty is not None:
                    self._log_chain(chain, need)
                stats = self.stats
                stats.rx_packets += 1
                stats.rx_bytes += frame_len
                stats.rx_bufs += 1
                if not stats.rx_num_buffers_max:
                    stats.rx_num_buffers_max = 1
                return True
        if not self._fill_cache(need):
            self.stats.rx_dropped += 1  # no room: a NIC drops, it does not wait
            return False
        chains = self._take(need)
        hdr = hdr[:NUM_BUFFERS_OFFSET] + NUM_BUFFERS.pack(len(chains))
        srcs = [hdr[: self.hdr_len], *frame]
        if self.capture is None and _all_direct(chains):
            scatter_direct(srcs, chains)  # a large frame into page buffers: no view each
        else:
            scatter(srcs, [v for chain in chains for v in chain.writable])
        self._complete_rx(chains, need)
        return True

    def receive_from(self, readv: Callable[[list[memoryview]], int]) -> int:
        """Let ``readv`` (a TAP read) write header + frame straight into guest buffers.

        A tap cannot say how long its next frame is, so the read is offered
        room for the largest frame the guest accepts (64 KiB GSO with
        GUEST_TSO, MTU-sized without). When the guest has posted less than
        that, a bounce buffer makes up the rest: a frame that fits the posted
        buffers goes in with no copy; one that spills over is kept and
        delivered (copied) once the guest posts room. Nothing is truncated,
        and a small ring never stalls waiting for room a small frame does not
        need. Returns the bytes read (0: nothing to read, -1: wait for buffers).
        """
        if self._pending is not None and not self._deliver_pending():
            return -1
        full = self.hdr_len + self.max_frame
        self._fill_cache(full if self.mergeable else 1)
        cache = self._rx_cache
        if not self._rx_cached:
            self.rx_starved = True
            return -1
        views: list[memoryview] = []
        room = 0
        for chain in cache if self.mergeable else (cache.front(),):
            views += chain.writable
            room += chain.in_len
            if room >= full:
                break
        if room < full:
            views.append(self._bounce_view(full - room))
        n = readv(views)
        if n <= 0:
            return 0
        if n > room:
            if self.dirty is not None:
                self._log_offered(room)
            self._spilled(views, n)
            return n
        if self.rx_filter is not None and not self.rx_filter(
            gather(views, self.hdr_len, FILTER_PEEK)
        ):
            self.stats.rx_filtered += 1
            if self.dirty is not None:
                self._log_offered(n)
            return n  # the buffers stay posted: the next read overwrites them
        chains = self._take(n)
        self._set_num_buffers(chains, len(chains))
        self._complete_rx(chains, n)
        return n

    def _bounce_view(self, size: int) -> memoryview:
        if self._bounce is None:
            self._bounce = memoryview(bytearray(self.hdr_len + MAX_GSO_FRAME))
        return self._bounce[:size]

    def _spilled(self, views: list[memoryview], n: int) -> None:
        """A frame larger than the posted buffers: keep it (header + frame) for later."""
        data = b"".join(views)[:n]
        biggest = max((c.in_len for c in self._rx_cache), default=0)
        if not self.mergeable or n > biggest * self.rxq.num:
            self.stats.rx_dropped += 1  # the guest's buffers could never hold it
            return
        self._pending = data
        self._deliver_pending()

    def _deliver_pending(self) -> bool:
        data = self._pending
        assert data is not None  # receive_from calls it with a frame kept
        frame = memoryview(data)[self.hdr_len :]
        if not self.has_room(len(frame)):
            return False
        self._pending = None
        self.receive_packet([frame], data[: self.hdr_len])
        return True

    def _set_num_buffers(self, chains: list[Chain], num: int) -> None:
        # The header may straddle descriptors ("any layout"), so write it as a scatter.
        first = chains[0].writable
        if len(first[0]) >= NUM_BUFFERS_OFFSET + 2:
            NUM_BUFFERS.pack_into(first[0], NUM_BUFFERS_OFFSET, num)
            return
        scatter([NUM_BUFFERS.pack(num)], strip_hdr(first, NUM_BUFFERS_OFFSET))

    def rx_batch_full(self) -> bool:
        """Whether RX_USED_BATCH buffers were used since the last ``flush_rx``: a
        back-end's fill loop stops there, so its pass publishes the batch."""
        return self.stats.rx_bufs - self._rx_bufs_flushed >= RX_USED_BATCH

    def flush_rx(self) -> bool:
        """Publish used rx entries; True if the driver wants an interrupt."""
        self._rx_bufs_flushed = self.stats.rx_bufs
        if publish_used(self.rxq):
            self.stats.rx_notifies += 1
            return True
        return False

    def set_guest_offloads(self, offloads: int) -> None:
        """CTRL_GUEST_OFFLOADS_SET: the GUEST_* offloads the guest takes now (feature
        bits); without GUEST_TSO4/6 the device sends it no GSO frame (5.1.6.2)."""
        self.guest_gso = any(offloads >> f & 1 for f in (VirtioNetF.GUEST_TSO4,
                                                          VirtioNetF.GUEST_TSO6))  # fmt: skip
        self.guest_csum = bool(offloads >> VirtioNetF.GUEST_CSUM & 1)
        self.max_frame = MAX_GSO_FRAME if self.guest_gso else ETH_HLEN + VLAN_HLEN + self.mtu

    # -- tx: guest → host ---------------------------------------------------

    def process_tx(self, xmit: Callable[[list[memoryview], int], bool], budget: int = 256) -> int:
        """Hand up to ``budget`` tx chains to ``xmit(views, frame_len)``.

        ``views`` are the chain's readable views, virtio-net header first
        (exactly what a TAP with IFF_VNET_HDR takes in one writev). ``xmit``
        returns False for back-pressure: the chain is given back and tx stops.
        """
        txq, stats, hdr_len = self.txq, self.stats, self.hdr_len
        n = 0
        while n < budget and not self.tx_broken:
            try:
                chains = txq.pop_burst(budget - n)
            except AvailIndexError as jump:
                self._broken("tx", jump)
                break
            except DescriptorError as e:
                self._refuse(txq, e)
                continue
            if not chains:
                break
            for k, chain in enumerate(chains):
                frame_len = chain.out_len - hdr_len
                if frame_len < 0:
                    stats.tx_errors += 1  # shorter than a virtio-net header
                    txq.push_used(chain.head, 0)
                    continue
                if not xmit(chain.readable, frame_len):
                    txq.unpop(len(chains) - k)  # this chain and the rest of the burst
                    return n
                txq.push_used(chain.head, 0)
                if self.capture is not None:
                    self.capture(chain.readable, chain.out_len)
                stats.tx_packets += 1
                stats.tx_bytes += frame_len
                n += 1
        return n

    def flush_tx(self) -> bool:
        """Publish used tx entries; True if the driver wants an interrupt."""
        if publish_used(self.txq):
            self.stats.tx_notifies += 1
            return True
        return False

    # -- teardown -----------------------------------------------------------

    def reset(self) -> None:
        """Give back the rx chains popped but not used (they are the newest popped:
        every chain popped after the oldest cached one is in the cache, dead ones too)."""
        if self._rx_cache:
            self.rxq.unpop(len(self._rx_cache))
            self._rx_cache.clear()
            self._rx_cached = 0

    @property
    def last_avail_idx(self) -> tuple[int, int]:
        """(rx, tx) as GET_VRING_BASE reports them: cached chains count as not taken."""
        return (self.rxq.vring_base(len(self._rx_cache)), self.txq.vring_base())
