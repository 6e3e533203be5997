"""The non-mergeable receive paths (no VIRTIO_NET_F_MRG_RXBUF): one buffer per packet.

``small`` (receive_small) posts header + MAX_PACKET_LEN bytes of a page; ``big``
(receive_big, GUEST_TSO/UFO) a chain of pages enough for a 64 KiB frame. Both take
their pages from the seed's lists and allocate the skb only on receive — the
follow-up the seed announced: "the same approach can apply to non-mergable buffs".
"""

from __future__ import annotations

from typing import ClassVar, Final, cast, final

from virtnet.net.constants import GOOD_COPY_LEN, MAX_PACKET_LEN, MAX_SKB_FRAGS, PAGE_SIZE
from virtnet.net.rx.base import Segment
from virtnet.net.rx.deferred import PageRx
from virtnet.net.rx.queue import RxQueue
from virtnet.net.skb import PageList, SkBuff

__all__ = ["BIG_PAGES", "BigRx", "SmallRx"]


class _OneBufferRx(PageRx):
    """What receive_small and receive_big check before they build the skb."""

    def _skb_for(self, length: int) -> SkBuff | None:
        """The skb for a ``length``-byte buffer (header included), or None: a short
        packet (counted and named) or no skb (rx_dropped); the caller frees the pages."""
        if self._short(length):
            return None
        skb = self.skbs.alloc(GOOD_COPY_LEN)
        if skb is None:
            self.stats.rx_dropped += 1
        return skb


@final
class SmallRx(_OneBufferRx):
    """No MRG_RXBUF, no GSO: one buffer per packet, header + MAX_PACKET_LEN bytes.

    Same page lists as the seed; the descriptor is shorter than the page so
    the device can never write a frame larger than the MTU allows.
    """

    name: ClassVar[str] = "small"
    mergeable: ClassVar[bool] = False

    def __init__(self, rq: RxQueue) -> None:
        super().__init__(rq)
        self.buf_len = self.hdr_len + MAX_PACKET_LEN  # add_recvbuf_small

    def receive_buf(self, buf: object, length: int) -> None:
        plist = cast(PageList, buf)
        skb = self._skb_for(length)
        if skb is None:
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
        self.rq.deliver(skb)

    def xdp_segments(self, buf: object, length: int, first: bool) -> list[Segment]:
        page = cast(PageList, buf).page
        assert page is not None
        skip = self.hdr_len if first else 0
        return [(page, skip, length - skip)]


# add_recvbuf_big: pages per buffer, enough for a 64 KiB frame
BIG_PAGES: Final = MAX_SKB_FRAGS


@final
class BigRx(_OneBufferRx):
    """No MRG_RXBUF but GUEST_TSO/UFO: each buffer is a chain of pages big enough
    for a 64 KiB frame (add_recvbuf_big); the skb is allocated on receive and
    the pages the frame did not reach go straight back to the page lists.
    """

    name: ClassVar[str] = "big"
    mergeable: ClassVar[bool] = False

    def descs_per_buf(self) -> int:
        return 1 if self.rq.vq.indirect is not None else BIG_PAGES

    def add_recvbufs(self, n: int) -> int:
        # A chain of pages each: one add() per buffer, not one add_inbufs for all.
        added = 0
        while added < n and self.add_recvbuf():
            added += 1
        return added

    def add_recvbuf(self) -> bool:
        if self.rq.vq.num_free < self.descs_per_buf():
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
        self.rq.vq.add((), segments, plists)
        return True

    def receive_buf(self, buf: object, length: int) -> None:
        plists = cast(list[PageList], buf)
        skb = self._skb_for(length)
        if skb is None:
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
        self.rq.deliver(skb)

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
