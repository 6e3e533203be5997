"""What came after the seed: mergeable buffers sized by an EWMA of packet lengths.

virtio_net.c, 2013-14 ("auto-tune mergeable rx buffer size", "use
skb_page_frag_refill"): ``get_mergeable_buf_len`` from ``rq->mrg_avg_pkt_len``
(fed by deferred.receive_mergeable), buffers carved back to back from 32 KiB
compound pages (``alloc_frag``), still on the seed's two page lists.
"""

from __future__ import annotations

from typing import ClassVar, cast, final

from virtnet.net.constants import (
    ETH_HLEN,
    GOOD_COPY_LEN,
    GOOD_PACKET_LEN,
    IP_MAX_MTU,
    L1_CACHE_BYTES,
    MAX_GSO_FRAME,
    PAGE_SIZE,
    SKB_FRAG_PAGE_ORDER,
    VLAN_HLEN,
)
from virtnet.net.header import NUM_BUFFERS, NUM_BUFFERS_OFFSET
from virtnet.net.rx.base import HeadBuf, Segment
from virtnet.net.rx.deferred import PageListRx, receive_mergeable
from virtnet.net.rx.queue import EWMA_SHIFT, EwmaPktLen, RxQueue
from virtnet.net.skb import Page

__all__ = ["EWMA_SHIFT", "AllocFrag", "EwmaPktLen", "EwmaRx", "MrgBuf", "mergeable_min_buf_len"]


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

    def __init__(self, rq: RxQueue) -> None:
        super().__init__(rq)
        self.avg_pkt_len = rq.mrg_avg_pkt_len  # fed by receive_mergeable
        self.min_buf_len = mergeable_min_buf_len(self.hdr_len, rq.vq.num)
        self.alloc_frag = AllocFrag()
        # Linux chains a frag_list skb past MAX_SKB_FRAGS; an SkBuff has no frag
        # list, so the bound is on buffers: the most the largest legal frame can
        # span in the smallest buffer this ring ever posts. More is a lie.
        self.max_bufs = -(-(self.hdr_len + MAX_GSO_FRAME) // self._buf_len(0))
        self.max_frags = self.max_bufs  # coalesced or not, a buffer is at most one frag

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
        return self._buf_len(self.rq.mrg_avg_pkt_len.internal)

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
        return self.rq.vq.add_inbufs(bufs)

    # -- receive_mergeable's hooks ------------------------------------------------------------

    def receive_buf(self, buf: object, length: int) -> None:
        receive_mergeable(self, buf, length)

    def buf_frag(self, token: object) -> Segment:
        buf = cast(MrgBuf, token)
        page = buf.page
        assert page is not None
        return page, buf.offset, buf.len  # truesize: the buffer's length (its ctx)

    def head_skb(self, token: object) -> HeadBuf:
        buf = cast(MrgBuf, token)
        page = buf.page
        assert page is not None
        return self.skbs.alloc(GOOD_COPY_LEN), page, buf.offset, buf.len

    def put_head(self, token: object, page: Page, in_skb: bool) -> None:
        buf = cast(MrgBuf, token)
        if in_skb:
            buf.page = None  # its reference goes with the frag
        self._to_freed(buf)

    def consume(self, token: object) -> None:
        buf = cast(MrgBuf, token)
        buf.page = None
        self._to_freed(buf)

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
