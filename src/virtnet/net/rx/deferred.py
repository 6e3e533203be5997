"""The seed: RFC "defer skb allocation in virtio_net -- mergable buff part".

Read next to /work/shared/seed/defer-skb-allocation-rfc.txt, top to bottom as the
patch is: the two page lists (``freed_pages`` / ``used_pages``), ``get_a_free_page``,
``try_fill_recv``'s loop posting bare pages, and ``receive_mergeable`` — the seed's
``receive_skb`` for mergeable buffers, where the skb is at last allocated.

``receive_mergeable`` is written once, with hooks (net/rx/base.py): ``DeferredRx``
fills them in with the seed's ``+`` lines, ``PreallocRx`` (prealloc.py) with the
``-`` lines it replaced, ``EwmaRx`` (ewma.py) with what came after. The page lists
are the seed's, shared by ewma and by the non-mergeable paths (nonmergeable.py):
"the same approach can apply to non-mergable buffs too".
"""

from __future__ import annotations

from typing import ClassVar, Generic, Protocol, TypeVar, cast, final

from virtnet.net.constants import ETH_HLEN, GOOD_COPY_LEN, PAGE_SIZE
from virtnet.net.header import NUM_BUFFERS, NUM_BUFFERS_OFFSET
from virtnet.net.rx.base import HeadBuf, RxStrategy, Segment
from virtnet.net.rx.queue import RxQueue
from virtnet.net.skb import Page, PageList


class _PageSlot(Protocol):
    """An entry of the seed's page lists: a page slot that outlives its page."""

    page: Page | None


E = TypeVar("E", bound=_PageSlot)


class PageListRx(RxStrategy, Generic[E]):
    """The seed's two page lists (``struct list_head used_pages, freed_pages``),
    of ``PageList`` entries (deferred, small, big) or ``MrgBuf`` ones (ewma)."""

    def __init__(self, rq: RxQueue) -> None:
        super().__init__(rq)
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


class PageRx(PageListRx[PageList]):
    """Buffers that are whole pages off the seed's lists, ``buf_len`` bytes of each."""

    def __init__(self, rq: RxQueue) -> None:
        super().__init__(rq)
        self.buf_len = PAGE_SIZE  # add_recvbuf_mergeable: one page

    def get_a_free_page(self) -> PageList | None:
        """A page_list entry with a page, moved to used_pages; None if out of pages."""
        if self._freed_head == len(self.freed_pages):  # list_empty(&vi->freed_pages)
            plist = PageList()
            self.freed_pages.append(plist)
            plist.page = self.pool.alloc_page()
        else:
            plist = self.freed_pages[self._freed_head]  # list_first_entry
            if plist.page is None:
                plist.page = self.pool.alloc_page()
            else:
                self.stats.page_reuses += 1
        if plist.page is None:
            return None
        self._freed_head += 1
        self.used_pages[plist] = None  # list_move_tail(&plist->list, &vi->used_pages)
        return plist

    def add_recvbufs(self, n: int) -> int:
        """try_fill_recv's ``for (;;)``: get_a_free_page, add_buf, until either fails
        (the ring publishes the burst at once; the caller counts ``vi->num``)."""
        bufs: list[tuple[int, int, object]] = []
        buf_len = self.buf_len
        for _ in range(n):
            plist = self.get_a_free_page()
            if plist is None:  # if (!plist || !plist->page) break;
                break
            page = plist.page
            assert page is not None
            bufs.append((page.gpa, buf_len, plist))
        return self.rq.vq.add_inbufs(bufs)


def receive_mergeable(rx: RxStrategy, buf: object, length: int) -> None:
    """The seed's ``receive_skb`` for mergeable buffers (``if (vi->mergeable_rx_bufs)``).

    The first buffer's header says how many buffers the packet spans
    (``num_buffers``); up to GOOD_COPY_LEN bytes are copied into the skb's head,
    the rest of each buffer's page becomes an skb frag, and a buffer whose bytes
    were all copied keeps its page — the seed's small-packet win. The hooks say
    which skb the packet goes into (``head_skb``: the seed's ``netdev_alloc_skb``),
    where a buffer's bytes are (``buf_frag``) and what becomes of each buffer
    (``put_head``, ``consume``, ``free_unused_buf`` on every error path).
    """
    stats, hdr_len = rx.stats, rx.hdr_len
    if length < hdr_len + ETH_HLEN:  # virtio_net.c receive_buf(): "short packet"
        stats.rx_length_errors += 1
        rx._name_short(length)
        rx.free_unused_buf(buf)
        return
    skb, page, off, truesize = rx.head_skb(buf)
    data = off + hdr_len
    length -= hdr_len
    copy = length if length < GOOD_COPY_LEN else GOOD_COPY_LEN  # a fresh skb's tailroom
    # One copy out of the page: the header and what goes into the skb's head
    # (page_to_skb's memcpy), then num_buffers and the head taken from it. (No
    # start for a buffer at the page's start: compiled, a start is a boxed int.)
    view = page.view
    raw = (view[off : data + copy] if off else view[: data + copy]).tobytes()
    vnet_hdr = raw[:hdr_len]
    num_buf = vnet_hdr[NUM_BUFFERS_OFFSET] | vnet_hdr[NUM_BUFFERS_OFFSET + 1] << 8
    if skb is None:
        # The seed drops here and recycles the page; it forgot the
        # packet's other buffers, which would then be parsed as packets.
        stats.rx_dropped += 1
        rx.free_unused_buf(buf)
        rx._drain(num_buf)
        return
    skb.vnet_hdr = vnet_hdr
    skb.put(raw[hdr_len:])
    length -= copy
    if length:
        skb.add_frag(page, data + copy, length)
    rx.put_head(buf, page, length != 0)
    rq, avg = rx.rq, rx.avg_pkt_len
    if num_buf == 1:  # the common case: one buffer, nothing to merge
        stats.rx_truesize += truesize
        if avg is not None:  # ewma_pkt_len_add(&rq->mrg_avg_pkt_len, head_skb->len)
            avg.add(skb.len)
        rq.deliver(skb)
        return
    if rx._bad_num_buffers(num_buf):
        # 5.1.6.4: num_buffers is at least 1 (0 would make --num_buffers wrap)
        # and no packet spans more buffers than were posted.
        rx._drop(skb)
        return
    got = 1
    frags = skb.frags
    max_frags, max_bufs = rx.max_frags, rx.max_bufs
    for buf, length in rx._more_bufs(num_buf):  # while (--mhdr->num_buffers)
        got += 1
        if got > max_bufs or len(frags) >= max_frags:
            stats.rx_length_errors += 1  # "packet too long"
            rx._too_long(num_buf, min(max_bufs, max_frags))
            rx.free_unused_buf(buf)
            rx._drain(num_buf - got + 1)
            rx._drop(skb)
            return
        page, off, size = rx.buf_frag(buf)
        truesize += size
        last = frags[-1] if frags else None
        if last is not None and last[0] is page and last[1] + last[2] == off:
            # skb_can_coalesce: the buffer continues the last frag in the same page
            frags[-1] = (page, last[1], last[2] + length)
            skb.data_len += length
            skb.len += length
            rx.pool.put_page(page)  # the frag already holds one reference
        else:
            skb.add_frag(page, off, length)
        rx.consume(buf)
    if got < num_buf:
        rx._drop(skb)
        return
    stats.rx_truesize += truesize
    if avg is not None:
        avg.add(skb.len)
    rq.deliver(skb)


@final
class DeferredRx(PageRx):
    """The seed: raw pages on the ring, the skb allocated when a packet arrives."""

    name: ClassVar[str] = "deferred"

    def receive_buf(self, buf: object, length: int) -> None:
        receive_mergeable(self, buf, length)

    def buf_frag(self, buf: object) -> Segment:
        page = cast(PageList, buf).page  # char *p = page_address(plist->page)
        assert page is not None
        return page, 0, PAGE_SIZE

    def head_skb(self, buf: object) -> HeadBuf:
        page = cast(PageList, buf).page
        assert page is not None
        # skb = netdev_alloc_skb(vi->dev, GOOD_COPY_LEN + NET_IP_ALIGN)
        return self.skbs.alloc(GOOD_COPY_LEN), page, 0, PAGE_SIZE

    def put_head(self, buf: object, page: Page, in_skb: bool) -> None:
        plist = cast(PageList, buf)
        if in_skb:  # if (len) { f->page = plist->page; ... plist->page = NULL; }
            plist.page = None
        self._to_freed(plist)  # list_move_tail(&plist->list, &vi->freed_pages)

    def consume(self, buf: object) -> None:
        plist = cast(PageList, buf)
        plist.page = None
        self._to_freed(plist)

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
