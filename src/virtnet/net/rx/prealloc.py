"""The code the seed replaced (its ``-`` lines): an skb and a page per posted buffer.

``try_fill_recv`` allocated an skb and a page for every buffer and queued the skb
on ``vi->recv``; ``receive_skb`` (deferred.receive_mergeable, with the hooks
below) builds the packet in the first buffer's skb, merges further buffers' pages
into it and frees their skbs. Kept to measure the seed against.
"""

from __future__ import annotations

from typing import ClassVar, cast, final

from virtnet.net.constants import GOOD_COPY_LEN, PAGE_SIZE
from virtnet.net.header import NUM_BUFFERS, NUM_BUFFERS_OFFSET
from virtnet.net.rx.base import HeadBuf, RxStrategy, Segment
from virtnet.net.rx.deferred import receive_mergeable
from virtnet.net.rx.queue import RxQueue
from virtnet.net.skb import Page, SkBuff


@final
class PreallocRx(RxStrategy):
    """The pre-patch code: an skb and a page allocated per posted buffer."""

    name: ClassVar[str] = "prealloc"

    def __init__(self, rq: RxQueue) -> None:
        super().__init__(rq)
        self.pages: list[Page] = []  # vi->pages, chained by page->private
        self.recv: dict[SkBuff, None] = {}  # vi->recv, the skb queue

    def get_a_page(self) -> Page | None:
        if self.pages:
            self.stats.page_reuses += 1
            return self.pages.pop()
        return self.pool.alloc_page()

    def give_a_page(self, page: Page) -> None:
        self.pages.append(page)

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
        return self.rq.vq.add_inbufs(bufs)

    def receive_buf(self, buf: object, length: int) -> None:
        receive_mergeable(self, buf, length)

    # -- receive_mergeable's hooks ------------------------------------------------------------

    def buf_frag(self, buf: object) -> Segment:
        return cast(SkBuff, buf).frags[0][0], 0, PAGE_SIZE

    def head_skb(self, buf: object) -> HeadBuf:
        """The buffer's own skb: unlinked from vi->recv, its page no frag of it yet."""
        skb = cast(SkBuff, buf)
        page = skb.frags[0][0]
        del self.recv[skb]  # __skb_unlink(skb, &vi->recv)
        skb.frags = []
        return skb, page, 0, PAGE_SIZE

    def put_head(self, buf: object, page: Page, in_skb: bool) -> None:
        if not in_skb:  # give_a_page(vi, skb_shinfo(skb)->frags[0].page)
            self.give_a_page(page)

    def consume(self, buf: object) -> None:
        # skb_shinfo(skb)->frags[i] = skb_shinfo(nskb)->frags[0]; kfree_skb(nskb)
        nskb = cast(SkBuff, buf)
        del self.recv[nskb]
        nskb.frags = []
        nskb.free()

    def free_unused_buf(self, buf: object) -> None:
        """A buffer that carried no packet: its page back to the cache, its skb freed."""
        skb = cast(SkBuff, buf)
        del self.recv[skb]
        for page, _, _ in skb.frags:
            self.give_a_page(page)
        skb.frags = []
        skb.free()

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
