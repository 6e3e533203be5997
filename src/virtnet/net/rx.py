"""Receive strategies: how rx buffers are posted and how a packet becomes an skb.

``deferred`` is the seed (RFC "defer skb allocation in virtio_net"):
mergeable buffers are raw pages tracked by ``freed_pages`` / ``used_pages``
page lists, and the skb is allocated only in ``receive_mergeable``.
``prealloc`` is the code the seed replaced (its ``-`` lines): an skb and a
page per posted buffer, further buffers' skbs merged into the first and
freed. ``big`` and ``small`` are the non-mergeable paths, with the deferred
allocation the seed promised as its follow-up.

Every strategy posts buffers through ``add_recvbuf`` and handles one used
buffer in ``receive_buf``; every error path converges on one place that
gives the pages back (``_recycle`` / ``_drop``), like virtio_net.c's err_buf.

A ring hands its tokens back as ``object``: each strategy knows what it posted
(deferred and small a ``PageList``, big a list of them, ewma an ``MrgBuf``,
prealloc an ``SkBuff``) and names it once per buffer, with a ``cast``, in a
typed local. An entry on the ring always has its page (``assert page is not
None``): the page leaves the entry only with the packet that filled it.
"""

from __future__ import annotations

from collections.abc import Iterator
from operator import length_hint
from typing import TYPE_CHECKING, ClassVar, Final, Generic, Protocol, TypeVar, cast, final

from virtnet.net.constants import (
    ETH_HLEN,
    EWMA_PKT_LEN_WEIGHT_RCP,
    GOOD_COPY_LEN,
    GOOD_PACKET_LEN,
    IP_MAX_MTU,
    L1_CACHE_BYTES,
    MAX_GSO_FRAME,
    MAX_PACKET_LEN,
    MAX_SKB_FRAGS,
    PAGE_SIZE,
    SKB_FRAG_PAGE_ORDER,
    VLAN_HLEN,
)
from virtnet.net.header import NUM_BUFFERS, NUM_BUFFERS_OFFSET
from virtnet.net.skb import Page, PageList, PagePool, SkbAllocator, SkBuff
from virtnet.net.stats import DriverStats
from virtnet.net.xdp import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, XdpFrame, XdpHook, views_of
from virtnet.virtio.errors import UsedIndexError, UsedRingError

if TYPE_CHECKING:
    from virtnet.net.driver import VirtnetDriver

# A used buffer as the ring returns it: (token, length written).
Used = tuple[object, int]
# A frame's bytes in guest memory: (page, offset, size), as skb frags are.
Segment = tuple[Page, int, int]


class RxStrategy:
    """The per-strategy half of the receive path."""

    name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True

    def __init__(self, vi: VirtnetDriver) -> None:
        self.vi = vi
        self.stats: DriverStats = vi.stats
        self.pool: PagePool = vi.pool
        self.skbs: SkbAllocator = vi.skbs
        self.hdr_len: int = vi.hdr_len
        self.xdp: XdpHook | None = None
        # A frame's further buffers already taken off the ring (the XDP path
        # collects them before the program runs); _more_bufs yields these first.
        self._pending: Iterator[Used] | None = None

    def descs_per_buf(self) -> int:
        return 1

    def add_recvbuf(self) -> bool:
        """Post one receive buffer; False when memory ran out (try_fill_recv stops)."""
        raise NotImplementedError

    def add_recvbufs(self, n: int) -> int:
        """Post up to ``n`` receive buffers; how many (a refill burst)."""
        added = 0
        while added < n and self.add_recvbuf():
            added += 1
        return added

    def receive_buf(self, buf: object, length: int) -> None:
        """Turn the used buffer ``buf`` (and, mergeable, its followers) into a packet."""
        raise NotImplementedError

    def free_unused_buf(self, buf: object) -> None:
        """Give back a buffer the device never used (teardown)."""
        raise NotImplementedError

    def remove(self) -> None:
        """Free whatever the strategy caches (after every buffer came back)."""

    def _short(self, length: int) -> bool:
        if length < self.hdr_len + ETH_HLEN:
            # virtio_net.c receive_buf(): "short packet"
            self.stats.rx_length_errors += 1
            self._name_short(length)
            return True
        return False

    def _name_short(self, length: int) -> None:
        self.vi.faults.report("short", f"vq {self.vi.rvq.index}: short packet {length}")

    def _bad_num_buffers(self, num_buf: int) -> bool:
        """5.1.6.4: 1 <= num_buffers, and never more buffers than the driver has out
        (this one, the rest of the burst taken, and those still posted): either lie
        is named and the packet dropped."""
        vi = self.vi
        if num_buf == 0:
            self.stats.rx_length_errors += 1
            vi.faults.report("num_buffers_small", f"vq {vi.rvq.index}: num_buffers 0")
            return True
        out = self._bufs_out()
        if num_buf > out:
            self.stats.rx_length_errors += 1
            vi.faults.report("num_buffers_big", f"vq {vi.rvq.index}: num_buffers {num_buf} "
                             f"> {out} buffers posted")  # fmt: skip
            return True
        return False

    def _bufs_out(self) -> int:
        """The most buffers a packet may name: this one, the rest of the burst taken,
        those still posted (and, on the XDP path, its buffers collected already)."""
        vi = self.vi
        out = vi.num + length_hint(vi._burst) + 1
        if self._pending is not None:
            out += length_hint(self._pending)
        return out

    def _too_long(self, num_buf: int, limit: int = MAX_SKB_FRAGS) -> None:
        # More buffers than a 64 KiB packet can fill: num_buffers was a lie.
        self.vi.faults.report("num_buffers_big", f"vq {self.vi.rvq.index}: packet too long: "
                              f"num_buffers {num_buf} > {limit} frags")  # fmt: skip

    def _copy_head(self, skb: SkBuff, view: memoryview, offset: int, length: int) -> int:
        """Copy up to the skb's tailroom (GOOD_COPY_LEN) of the packet into its head."""
        copy = min(length, skb.tailroom)
        skb.put(view[offset : offset + copy])
        return copy

    def _more_bufs(self, num_buf: int) -> Iterator[Used]:
        """Yield (buf, len) for the packet's remaining ``num_buf - 1`` buffers.

        Stops early (rx_length_errors) when the device returned fewer
        buffers than its header promised: "rx error: %d buffers missing".
        A used entry the ring refuses is consumed, counted, its buffer (if
        known) recycled, and not yielded — the caller sees fewer buffers
        than ``num_buf`` and drops the packet.
        """
        vi = self.vi
        stats = self.stats
        pending = self._pending
        if pending is not None:  # XDP_PASS: the buffers were collected already
            for _ in range(num_buf - 1):
                got = next(pending, None)
                if got is None:
                    return
                yield got
            return
        for k in range(num_buf - 1):
            try:
                got = vi.next_used()
            except UsedIndexError as jump:  # (each handler its own name: see driver.poll)
                vi.ring_broken(jump)  # the packet so far is dropped by the caller
                return
            except UsedRingError as e:
                self.bad_used(e)
                if vi.rvq.broken:
                    return
                continue
            if got is None:
                stats.rx_length_errors += 1
                # virtio_net.c: "rx error: %d buffers out of %d missing"
                vi.faults.report("num_buffers_big", f"vq {vi.rvq.index}: rx error: "
                                 f"{num_buf - 1 - k} buffers out of {num_buf} missing")  # fmt: skip
                return
            yield got

    def bad_used(self, e: UsedRingError) -> object:
        """Count a used entry the ring refused; recycle its buffer if it names one."""
        self.stats.rx_length_errors += 1
        token = e.token
        self.vi.used_error(self.vi.rvq, e)
        if token is not None:
            self.vi.num -= 1
            self.free_unused_buf(token)
        return token

    def bad_first_buf(self, e: UsedRingError) -> None:
        """A packet's first buffer came back with a bad length: drop the whole packet.

        Mergeable strategies also drain the ``num_buffers - 1`` buffers that
        belong to it, or they would be read as packets (virtio_net.c:
        receive_mergeable → err_skb → mergeable_buf_free).
        """
        token = e.token
        num_buf = self._num_buffers(token) if token is not None and self.mergeable else 1
        self.bad_used(e)
        for buf, _ in self._more_bufs(num_buf):
            self.free_unused_buf(buf)

    def _num_buffers(self, buf: object) -> int:
        return 1

    # -- the XDP hook (net/xdp.py): before any skb exists ------------------------------------

    def attach_xdp(self, hook: XdpHook | None) -> None:
        """Load (or, with None, unload) a program: every frame then goes through it
        (virtnet_poll calls receive_buf_xdp instead of receive_buf while one is)."""
        self.xdp = hook

    def xdp_segments(self, buf: object, length: int, first: bool) -> list[Segment]:
        """(page, offset, size) of the frame bytes ``buf`` holds (after the header)."""
        raise NotImplementedError

    def receive_buf_xdp(self, buf: object, length: int) -> None:
        """virtnet_xdp_handler's place in receive_small / receive_mergeable: the whole
        frame's buffers are taken off the ring, the program runs on them, and only
        PASS goes on to build an skb (the strategy's own receive_buf, fed the
        collected buffers). Malformed frames take the strategy's own error paths."""
        hook = self.xdp
        if hook is None:  # unloaded since the poll began
            self.receive_buf(buf, length)
            return
        num_buf = self._num_buffers(buf) if self.mergeable and length >= self.hdr_len else 1
        if length < self.hdr_len + ETH_HLEN or num_buf == 0 or num_buf > self._bufs_out():
            # Short, or num_buffers a lie (_bad_num_buffers): checked before any further
            # buffer is taken off the ring, and dropped, counted and named by the
            # strategy's own path, exactly as without a program.
            self.receive_buf(buf, length)
            return
        bufs: list[Used] = [(buf, length)]
        bufs.extend(self._more_bufs(num_buf))
        if len(bufs) < num_buf:  # "buffers missing": counted by _more_bufs
            self.stats.rx_dropped += 1
            self._xdp_release(bufs)
            return
        segments = self.xdp_segments(buf, length, True)
        for b, n in bufs[1:]:
            segments += self.xdp_segments(b, n, False)
        act = hook.run(views_of(segments))
        if act == XDP_PASS:
            self._pending = iter(bufs[1:])
            try:
                self.receive_buf(buf, length)
            finally:
                self._pending = None
        elif act == XDP_TX:
            self._xdp_tx(hook, bufs, segments)
        elif act == XDP_REDIRECT:
            self._xdp_redirect(hook, bufs, segments)
        else:
            if act == XDP_DROP:
                self.stats.rx_xdp_drops += 1
            else:
                self.stats.rx_xdp_aborted += 1
            self._xdp_release(bufs)

    def _xdp_release(self, bufs: list[Used]) -> None:
        """The frame consumed without an skb: its buffers straight back to the lists."""
        for b, _ in bufs:
            self.free_unused_buf(b)

    def _xdp_tx(self, hook: XdpHook, bufs: list[Used], segments: list[Segment]) -> None:
        frame = XdpFrame(self.hdr_len, segments, lambda: self._xdp_release(bufs))
        if hook.tx_enabled and self.vi.start_xmit(frame):
            self.stats.rx_xdp_tx += 1
        else:  # tx ring full (or stopped): virtnet_xdp_xmit fails, the frame is dropped
            self.stats.rx_xdp_drops += 1
            frame.free()

    def _xdp_redirect(self, hook: XdpHook, bufs: list[Used], segments: list[Segment]) -> None:
        views = views_of(segments)
        try:
            if hook.redirect is None:
                hook.error("XDP_REDIRECT without a redirect target, frame dropped")
                ok = False
            else:
                ok = bool(hook.redirect(views))
        except Exception as e:  # noqa: BLE001 — a failing port drops its frame only
            hook.error(f"XDP_REDIRECT target raised {type(e).__name__}: {e}; frame dropped")
            ok = False
        for v in views:
            try:
                v.release()
            except BufferError:
                hook.error("XDP_REDIRECT target kept an export of the frame's buffer")
        if ok:
            self.stats.rx_xdp_redirects += 1
        else:
            self.stats.rx_xdp_drops += 1
        self._xdp_release(bufs)


class _PageSlot(Protocol):
    """An entry of the seed's page lists: a page slot that outlives its page."""

    page: Page | None


E = TypeVar("E", bound=_PageSlot)


class PageListRx(RxStrategy, Generic[E]):
    """The seed's two page lists, kept by deferred (and small, big: ``PageList``
    entries) and by ewma (``MrgBuf`` entries, sized buffers in shared pages)."""

    def __init__(self, vi: VirtnetDriver) -> None:
        super().__init__(vi)
        # list_head freed_pages (taken at the front, added at the tail) and
        # used_pages (only needed to find every page at remove time: an
        # insertion-ordered dict gives list_del in O(1)).
        self.freed_pages: list[E] = []
        self._freed_head = 0
        self.used_pages: dict[E, None] = {}

    def _to_freed(self, plist: E) -> None:
        """list_move_tail(&plist->list, &vi->freed_pages)."""
        del self.used_pages[plist]
        freed = self.freed_pages
        if self._freed_head > 64 and self._freed_head * 2 > len(freed):
            del freed[: self._freed_head]  # compact the consumed front
            self._freed_head = 0
        freed.append(plist)

    def add_recvbuf(self) -> bool:
        return self.add_recvbufs(1) == 1

    def _drain(self, num_buf: int) -> None:
        """Recycle the rest of a dropped packet's buffers (their pages stay attached)."""
        for buf, _ in self._more_bufs(num_buf):
            self._to_freed(cast(E, buf))

    def _drop(self, skb: SkBuff) -> None:
        self.stats.rx_dropped += 1
        skb.free()

    def free_unused_buf(self, buf: object) -> None:
        self._to_freed(cast(E, buf))

    def remove(self) -> None:
        """virtnet_remove: splice used_pages into freed_pages and free every page."""
        for plist in list(self.used_pages):
            self._to_freed(plist)
        for plist in self.freed_pages[self._freed_head :]:
            if plist.page is not None:
                self.pool.put_page(plist.page)  # a page, or ewma's reference to a frag page
                plist.page = None
        self.freed_pages = []
        self._freed_head = 0


class DeferredRx(PageListRx[PageList]):
    """The seed: raw pages on the ring, the skb allocated when a packet arrives."""

    name: ClassVar[str] = "deferred"

    def __init__(self, vi: VirtnetDriver) -> None:
        super().__init__(vi)
        self.buf_len = PAGE_SIZE  # add_recvbuf_mergeable: one page

    # -- get_a_free_page ----------------------------------------------------

    def get_a_free_page(self) -> PageList | None:
        """A page_list entry with a page, moved to used_pages; None if out of pages."""
        if self._freed_head == len(self.freed_pages):
            plist = PageList()
            self.freed_pages.append(plist)
            plist.page = self.pool.alloc_page()
        else:
            plist = self.freed_pages[self._freed_head]
            if plist.page is None:
                plist.page = self.pool.alloc_page()
            else:
                self.stats.page_reuses += 1
        if plist.page is None:
            return None
        self._freed_head += 1
        self.used_pages[plist] = None
        return plist

    # -- the ring -----------------------------------------------------------

    def add_recvbufs(self, n: int) -> int:
        bufs: list[tuple[int, int, object]] = []
        buf_len = self.buf_len
        for _ in range(n):
            plist = self.get_a_free_page()
            if plist is None:
                break
            page = plist.page
            assert page is not None
            bufs.append((page.gpa, buf_len, plist))
        return self.vi.rvq.add_inbufs(bufs)

    def receive_buf(self, buf: object, length: int) -> None:
        plist = cast(PageList, buf)
        hdr_len = self.hdr_len
        stats = self.stats
        if length < hdr_len + ETH_HLEN:  # virtio_net.c receive_buf(): "short packet"
            stats.rx_length_errors += 1
            self._name_short(length)
            self._to_freed(plist)
            return
        skb = self.skbs.alloc(GOOD_COPY_LEN)
        page = plist.page
        assert page is not None
        view = page.view
        length -= hdr_len
        copy = length if length < GOOD_COPY_LEN else GOOD_COPY_LEN  # a fresh skb's tailroom
        # One copy out of the page: the header and what goes into the skb's head
        # (page_to_skb's memcpy), then num_buffers and the head taken from it.
        raw = view[: hdr_len + copy].tobytes()
        vnet_hdr = raw[:hdr_len]
        num_buf = vnet_hdr[NUM_BUFFERS_OFFSET] | vnet_hdr[NUM_BUFFERS_OFFSET + 1] << 8
        if skb is None:
            # The seed drops here and recycles the page; it forgot the
            # packet's other buffers, which would then be parsed as packets.
            stats.rx_dropped += 1
            self._to_freed(plist)
            self._drain(num_buf)
            return
        skb.vnet_hdr = vnet_hdr
        skb.put(raw[hdr_len:])
        length -= copy
        if length:
            skb.add_frag(page, hdr_len + copy, length)
            plist.page = None
        # else: the page stays on its page_list entry — the small-packet win.
        self._to_freed(plist)
        if num_buf == 1:
            stats.rx_truesize += PAGE_SIZE
            self.vi.deliver(skb)
            return
        if self._bad_num_buffers(num_buf):
            # 5.1.6.4: num_buffers is at least 1 (0 would make --num_buffers wrap)
            # and no packet spans more buffers than were posted.
            self._drop(skb)
            return
        got = 1
        for buf, length in self._more_bufs(num_buf):
            plist = cast(PageList, buf)
            got += 1
            if len(skb.frags) >= MAX_SKB_FRAGS:
                stats.rx_length_errors += 1  # "packet too long"
                self._too_long(num_buf)
                self._to_freed(plist)
                self._drain(num_buf - got + 1)
                self._drop(skb)
                return
            page = plist.page
            assert page is not None
            skb.add_frag(page, 0, length)
            plist.page = None
            self._to_freed(plist)
        if got < num_buf:
            self._drop(skb)
            return
        stats.rx_truesize += num_buf * PAGE_SIZE
        self.vi.deliver(skb)

    def _num_buffers(self, buf: object) -> int:
        page = cast(PageList, buf).page
        assert page is not None
        num_buf: int = NUM_BUFFERS.unpack_from(page.view, NUM_BUFFERS_OFFSET)[0]
        return num_buf

    def xdp_segments(self, buf: object, length: int, first: bool) -> list[Segment]:
        page = cast(PageList, buf).page
        assert page is not None
        skip = self.hdr_len if first else 0
        return [(page, skip, length - skip)]


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


@final
class MrgBuf:
    """One posted mergeable buffer: ``len`` bytes at ``offset`` in a (compound)
    page it holds a reference on — Linux's buf pointer plus its ctx (truesize).
    Like the seed's ``page_list`` entry, it outlives its memory: ``page`` is None
    once the bytes left in an skb, and the entry is reused for the next buffer."""

    __slots__ = ("page", "offset", "len")

    def __init__(self) -> None:
        self.page: Page | None = None
        self.offset = 0
        self.len = 0


@final
class AllocFrag:
    """struct page_frag as rq->alloc_frag: the page buffers are carved from, Linux's
    skb_page_frag_refill semantics (skb.PageFrag is the tap reader's page_frag_alloc).

    It holds one reference on ``page`` of its own; each buffer carved takes another.
    """

    __slots__ = ("page", "offset", "size")

    def __init__(self) -> None:
        self.page: Page | None = None
        self.offset = 0
        self.size = 0


def mergeable_min_buf_len(hdr_len: int, rq_size: int) -> int:
    """virtio_net.c mergeable_min_buf_len: small enough that a full ring still holds
    the largest packet (IP_MAX_MTU with big_packets), never below GOOD_PACKET_LEN."""
    buf_len = hdr_len + ETH_HLEN + VLAN_HLEN + IP_MAX_MTU
    min_buf_len = -(-buf_len // rq_size)
    return max(max(min_buf_len, hdr_len) - hdr_len, GOOD_PACKET_LEN)


@final
class EwmaRx(PageListRx[MrgBuf]):
    """What came after the seed (virtio_net.c, 2013-14, "auto-tune mergeable rx
    buffer size" and "use skb_page_frag_refill"): mergeable buffers sized by an
    EWMA of received packet lengths and carved back to back from 32 KiB compound
    pages, so a 1500-byte packet ties up ~1.5 KiB instead of a 4 KiB page.

    The seed's two lists stay (same names, entries are ``MrgBuf``): ``used_pages``
    holds every posted buffer so ``remove`` finds it, ``freed_pages`` the entries
    whose buffer came back without going up the stack (copied whole, errors, XDP
    drops) — reused as they are while their size still fits the average.
    """

    name: ClassVar[str] = "ewma"

    def __init__(self, vi: VirtnetDriver) -> None:
        super().__init__(vi)
        self.avg_pkt_len = EwmaPktLen()  # rq->mrg_avg_pkt_len
        self.min_buf_len = mergeable_min_buf_len(self.hdr_len, vi.rvq.num)
        self.alloc_frag = AllocFrag()
        # Linux chains a frag_list skb past MAX_SKB_FRAGS; an SkBuff has no frag
        # list, so the bound is on buffers: the most the largest legal frame can
        # span in the smallest buffer this ring ever posts. More is a lie.
        self.max_bufs = -(-(self.hdr_len + MAX_GSO_FRAME) // self._buf_len(0))

    # -- get_mergeable_buf_len / add_recvbuf_mergeable ----------------------------------

    def _buf_len(self, avg: int) -> int:
        hdr_len = self.hdr_len
        n = hdr_len + min(max(avg, self.min_buf_len), PAGE_SIZE - hdr_len)  # clamp_t
        return (n + L1_CACHE_BYTES - 1) & -L1_CACHE_BYTES  # ALIGN(len, L1_CACHE_BYTES)

    def get_mergeable_buf_len(self) -> int:
        if self.xdp is not None:
            # "if (room) return PAGE_SIZE - room": with a program attached Linux posts
            # whole pages, so a frame is in as few buffers as possible (the average is
            # only fed by packets that reach the stack).
            return PAGE_SIZE
        return self._buf_len(self.avg_pkt_len.internal)

    def page_frag_refill(self, sz: int) -> bool:
        """skb_page_frag_refill: room for ``sz`` bytes in ``alloc_frag``, or a new page
        (a 32 KiB compound one, an order-0 page when none is left)."""
        frag, pool = self.alloc_frag, self.pool
        page = frag.page
        if page is not None:
            if page.refs == 1:  # every buffer carved from it came back: start over
                if frag.offset:
                    self.stats.page_reuses += 1
                frag.offset = 0
                return True
            if frag.offset + sz <= frag.size:
                return True
            pool.put_page(page)
        frag.offset = 0
        page = pool.alloc_pages(SKB_FRAG_PAGE_ORDER) or pool.alloc_page()
        frag.page = page
        if page is None:
            return False
        frag.size = PAGE_SIZE << page.order
        return True

    def carve(self, buf: MrgBuf, length: int) -> bool:
        """add_recvbuf_mergeable's allocation: ``length`` bytes of alloc_frag, plus
        the hole at the end when another buffer would not fit there."""
        if not self.page_frag_refill(length):
            return False
        frag = self.alloc_frag
        page = frag.page
        assert page is not None  # page_frag_refill found room
        self.pool.get_page(page)
        buf.page, buf.offset = page, frag.offset
        frag.offset += length
        hole = frag.size - frag.offset
        if hole < length:  # "add the remaining space to the current buffer"
            length += hole
            frag.offset += hole
        buf.len = length
        return True

    def get_a_free_buf(self, want: int | None = None) -> MrgBuf | None:
        """get_a_free_page for sized buffers: a freed entry's buffer is reused while
        its length is in the size class the average asks for (``want``), else released."""
        if want is None:
            want = self.get_mergeable_buf_len()
        freed = self.freed_pages
        head = self._freed_head
        if head == len(freed):
            buf = MrgBuf()
            freed.append(buf)
        else:
            buf = freed[head]
        page = buf.page
        if page is not None:
            if want <= buf.len < 2 * want:
                self.stats.page_reuses += 1
            else:
                self.pool.put_page(page)
                buf.page = None
        if buf.page is None and not self.carve(buf, want):
            return None
        self._freed_head = head + 1
        self.used_pages[buf] = None
        return buf

    def add_recvbufs(self, n: int) -> int:
        """One refill burst; the average cannot move during it, so one length for all."""
        bufs: list[tuple[int, int, object]] = []
        want = self.get_mergeable_buf_len()
        for _ in range(n):
            buf = self.get_a_free_buf(want)
            if buf is None:
                break
            page = buf.page
            assert page is not None
            bufs.append((page.gpa + buf.offset, buf.len, buf))
        return self.vi.rvq.add_inbufs(bufs)

    # -- receive_mergeable --------------------------------------------------------------

    def receive_buf(self, token: object, length: int) -> None:
        buf = cast(MrgBuf, token)
        stats, hdr_len = self.stats, self.hdr_len
        if length < hdr_len + ETH_HLEN:  # virtio_net.c receive_buf(): "short packet"
            stats.rx_length_errors += 1
            self._name_short(length)
            self._to_freed(buf)
            return
        page, off = buf.page, buf.offset
        assert page is not None
        view = page.view
        data = off + hdr_len
        vnet_hdr = view[off:data].tobytes()  # one copy, then num_buffers from it
        num_buf = vnet_hdr[NUM_BUFFERS_OFFSET] | vnet_hdr[NUM_BUFFERS_OFFSET + 1] << 8
        skb = self.skbs.alloc(GOOD_COPY_LEN)
        if skb is None:
            stats.rx_dropped += 1
            self._to_freed(buf)
            self._drain(num_buf)
            return
        skb.vnet_hdr = vnet_hdr
        truesize = buf.len
        length -= hdr_len
        copy = length if length < GOOD_COPY_LEN else GOOD_COPY_LEN  # a fresh skb's tailroom
        skb.put(view[data : data + copy])
        length -= copy
        if length:
            skb.add_frag(page, data + copy, length)
            buf.page = None  # its reference goes with the frag
        self._to_freed(buf)
        if num_buf == 1:  # the common case: one buffer, nothing to merge
            stats.rx_truesize += truesize
            self.avg_pkt_len.add(skb.len)
            self.vi.deliver(skb)
            return
        if self._bad_num_buffers(num_buf):
            self._drop(skb)
            return
        got = 1
        frags = skb.frags
        for token, length in self._more_bufs(num_buf):
            buf = cast(MrgBuf, token)
            got += 1
            if got > self.max_bufs:
                stats.rx_length_errors += 1  # "packet too long"
                self._too_long(num_buf, self.max_bufs)
                self._to_freed(buf)
                self._drain(num_buf - got + 1)
                self._drop(skb)
                return
            truesize += buf.len
            page, off = buf.page, buf.offset
            assert page is not None
            last = frags[-1] if frags else None
            if last is not None and last[0] is page and last[1] + last[2] == off:
                # skb_can_coalesce: the buffer continues the last frag in the same page
                frags[-1] = (page, last[1], last[2] + length)
                skb.data_len += length
                skb.len += length
                self.pool.put_page(page)  # the frag already holds one reference
            else:
                skb.add_frag(page, off, length)
            buf.page = None
            self._to_freed(buf)
        if got < num_buf:
            self._drop(skb)
            return
        stats.rx_truesize += truesize
        self.avg_pkt_len.add(skb.len)  # ewma_pkt_len_add(&rq->mrg_avg_pkt_len, head_skb->len)
        self.vi.deliver(skb)

    def _num_buffers(self, token: object) -> int:
        buf = cast(MrgBuf, token)
        assert buf.page is not None
        num_buf: int = NUM_BUFFERS.unpack_from(buf.page.view, buf.offset + NUM_BUFFERS_OFFSET)[0]
        return num_buf

    def xdp_segments(self, token: object, length: int, first: bool) -> list[Segment]:
        buf = cast(MrgBuf, token)
        assert buf.page is not None
        skip = self.hdr_len if first else 0
        return [(buf.page, buf.offset + skip, length - skip)]

    def remove(self) -> None:
        """virtnet_remove: every buffer's reference, then alloc_frag's own, put back."""
        super().remove()
        frag = self.alloc_frag
        if frag.page is not None:
            self.pool.put_page(frag.page)
            frag.page = None


@final
class PreallocRx(RxStrategy):
    """The pre-patch code: an skb and a page allocated per posted buffer."""

    name: ClassVar[str] = "prealloc"

    def __init__(self, vi: VirtnetDriver) -> None:
        super().__init__(vi)
        self.pages: list[Page] = []  # vi->pages, chained by page->private
        self.recv: dict[SkBuff, None] = {}  # vi->recv, the skb queue

    def get_a_page(self) -> Page | None:
        if self.pages:
            self.stats.page_reuses += 1
            return self.pages.pop()
        return self.pool.alloc_page()

    def give_a_page(self, page: Page) -> None:
        self.pages.append(page)

    def add_recvbuf(self) -> bool:
        return self.add_recvbufs(1) == 1

    def add_recvbufs(self, n: int) -> int:
        bufs: list[tuple[int, int, object]] = []
        for _ in range(n):
            skb = self.skbs.alloc(GOOD_COPY_LEN)
            if skb is None:
                break
            page = self.get_a_page()
            if page is None:
                skb.free()
                break
            skb.add_frag(page, 0, PAGE_SIZE)
            skb.len = skb.data_len = 0  # the frag is a buffer, not data, until filled
            self.recv[skb] = None  # skb_queue_head(&vi->recv, skb)
            bufs.append((page.gpa, PAGE_SIZE, skb))
        return self.vi.rvq.add_inbufs(bufs)

    def receive_buf(self, buf: object, length: int) -> None:
        skb = cast(SkBuff, buf)
        del self.recv[skb]  # __skb_unlink(skb, &vi->recv)
        page = skb.frags[0][0]
        hdr_len = self.hdr_len
        if length < hdr_len + ETH_HLEN:  # "short packet"
            self.stats.rx_length_errors += 1
            self._name_short(length)
            self._recycle(skb)
            return
        view = page.view
        skb.frags = []
        skb.vnet_hdr = vnet_hdr = view[:hdr_len].tobytes()
        num_buf = vnet_hdr[NUM_BUFFERS_OFFSET] | vnet_hdr[NUM_BUFFERS_OFFSET + 1] << 8
        length -= hdr_len
        copy = length if length < GOOD_COPY_LEN else GOOD_COPY_LEN  # the skb's tailroom
        skb.put(view[hdr_len : hdr_len + copy])
        length -= copy
        if length:
            skb.add_frag(page, hdr_len + copy, length)
        else:
            self.give_a_page(page)
        if num_buf == 1:
            self.stats.rx_truesize += PAGE_SIZE
            self.vi.deliver(skb)
            return
        if self._bad_num_buffers(num_buf):
            self._drop(skb)
            return
        got = 1
        for buf, length in self._more_bufs(num_buf):
            nskb = cast(SkBuff, buf)
            got += 1
            del self.recv[nskb]
            if len(skb.frags) >= MAX_SKB_FRAGS:
                self.stats.rx_length_errors += 1
                self._too_long(num_buf)
                self._recycle(nskb)
                for rest, _ in self._more_bufs(num_buf - got + 1):
                    self.free_unused_buf(rest)
                self._drop(skb)
                return
            # skb_shinfo(skb)->frags[i] = skb_shinfo(nskb)->frags[0]; kfree_skb(nskb)
            skb.add_frag(nskb.frags[0][0], 0, length)
            nskb.frags = []
            nskb.free()
        if got < num_buf:
            self._drop(skb)
            return
        self.stats.rx_truesize += num_buf * PAGE_SIZE
        self.vi.deliver(skb)

    def _recycle(self, skb: SkBuff) -> None:
        """A buffer that carried no packet: its page back to the cache, its skb freed."""
        for page, _, _ in skb.frags:
            self.give_a_page(page)
        skb.frags = []
        skb.free()

    def _drop(self, skb: SkBuff) -> None:
        self.stats.rx_dropped += 1
        skb.free()

    def free_unused_buf(self, buf: object) -> None:
        skb = cast(SkBuff, buf)
        del self.recv[skb]
        self._recycle(skb)

    def _num_buffers(self, buf: object) -> int:
        view = cast(SkBuff, buf).frags[0][0].view
        num_buf: int = NUM_BUFFERS.unpack_from(view, NUM_BUFFERS_OFFSET)[0]
        return num_buf

    def xdp_segments(self, buf: object, length: int, first: bool) -> list[Segment]:
        skip = self.hdr_len if first else 0
        return [(cast(SkBuff, buf).frags[0][0], skip, length - skip)]

    def remove(self) -> None:
        for page in self.pages:
            self.pool.free_page(page)
        self.pages = []


@final
class SmallRx(DeferredRx):
    """No MRG_RXBUF, no GSO: one buffer per packet, header + MAX_PACKET_LEN bytes.

    Same page lists as the seed; the descriptor is shorter than the page so
    the device can never write a frame larger than the MTU allows.
    """

    name: ClassVar[str] = "small"
    mergeable: ClassVar[bool] = False

    def __init__(self, vi: VirtnetDriver) -> None:
        super().__init__(vi)
        self.buf_len = self.hdr_len + MAX_PACKET_LEN  # add_recvbuf_small

    def receive_buf(self, buf: object, length: int) -> None:
        plist = cast(PageList, buf)
        if self._short(length):
            self._to_freed(plist)
            return
        skb = self.skbs.alloc(GOOD_COPY_LEN)
        if skb is None:
            self.stats.rx_dropped += 1
            self._to_freed(plist)
            return
        page = plist.page
        assert page is not None
        view = page.view
        skb.vnet_hdr = bytes(view[: self.hdr_len])
        length -= self.hdr_len
        copy = self._copy_head(skb, view, self.hdr_len, length)
        if length - copy:
            skb.add_frag(page, self.hdr_len + copy, length - copy)
            plist.page = None
        self._to_freed(plist)
        self.stats.rx_truesize += PAGE_SIZE
        self.vi.deliver(skb)


# add_recvbuf_big: pages per buffer, enough for a 64 KiB frame
BIG_PAGES: Final = MAX_SKB_FRAGS


@final
class BigRx(DeferredRx):
    """No MRG_RXBUF but GUEST_TSO/UFO: each buffer is a chain of pages big enough
    for a 64 KiB frame (add_recvbuf_big); the skb is allocated on receive and
    the pages the frame did not reach go straight back to the page lists.
    """

    name: ClassVar[str] = "big"
    mergeable: ClassVar[bool] = False

    def descs_per_buf(self) -> int:
        return 1 if self.vi.rvq.indirect is not None else BIG_PAGES

    def add_recvbufs(self, n: int) -> int:
        # A chain of pages each: one add() per buffer, not one add_inbufs for all.
        return RxStrategy.add_recvbufs(self, n)

    def add_recvbuf(self) -> bool:
        if self.vi.rvq.num_free < self.descs_per_buf():
            return False
        plists: list[PageList] = []
        segments: list[tuple[int, int]] = []
        for _ in range(BIG_PAGES):
            plist = self.get_a_free_page()
            if plist is None:
                for p in plists:
                    self._to_freed(p)
                return False
            page = plist.page
            assert page is not None
            plists.append(plist)
            segments.append((page.gpa, PAGE_SIZE))
        self.vi.rvq.add((), segments, plists)
        return True

    def receive_buf(self, buf: object, length: int) -> None:
        plists = cast(list[PageList], buf)
        if self._short(length):
            self._release(plists)
            return
        skb = self.skbs.alloc(GOOD_COPY_LEN)
        if skb is None:
            self.stats.rx_dropped += 1
            self._release(plists)
            return
        first = plists[0].page
        assert first is not None
        view = first.view
        skb.vnet_hdr = bytes(view[: self.hdr_len])
        length -= self.hdr_len
        offset = self.hdr_len + self._copy_head(skb, view, self.hdr_len, length)
        length -= offset - self.hdr_len
        for plist in plists:
            if length <= 0:
                break
            size = min(length, PAGE_SIZE - offset)
            if size:
                page = plist.page
                assert page is not None
                skb.add_frag(page, offset, size)
                plist.page = None
            length -= size
            offset = 0
        self._release(plists)
        self.stats.rx_truesize += len(plists) * PAGE_SIZE
        self.vi.deliver(skb)

    def xdp_segments(self, buf: object, length: int, first: bool) -> list[Segment]:
        out: list[Segment] = []
        offset = self.hdr_len
        for plist in cast(list[PageList], buf):
            if length <= offset:
                break
            size = min(length, PAGE_SIZE) - offset
            page = plist.page
            assert page is not None
            out.append((page, offset, size))
            length -= offset + size
            offset = 0
        return out

    def _release(self, plists: list[PageList]) -> None:
        for plist in plists:
            self._to_freed(plist)

    def free_unused_buf(self, buf: object) -> None:
        self._release(cast(list[PageList], buf))


# By name, as --strategy spells them (each class's ``name``; spelled out, not read
# from the classes, so the table is a plain literal the compiler needs no class for).
STRATEGIES: dict[str, type[RxStrategy]] = {
    "deferred": DeferredRx,
    "prealloc": PreallocRx,
    "ewma": EwmaRx,
    "big": BigRx,
    "small": SmallRx,
}
