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
"""

from __future__ import annotations

from operator import length_hint
from typing import TYPE_CHECKING, Any

from virtnet.net.constants import (
    ETH_HLEN,
    GOOD_COPY_LEN,
    MAX_PACKET_LEN,
    MAX_SKB_FRAGS,
    PAGE_SIZE,
)
from virtnet.net.header import NUM_BUFFERS, NUM_BUFFERS_OFFSET
from virtnet.net.skb import Page, PageList, SkBuff
from virtnet.virtio.errors import UsedIndexError, UsedRingError

if TYPE_CHECKING:
    from virtnet.net.driver import VirtnetDriver


class RxStrategy:
    """The per-strategy half of the receive path."""

    name = ""
    mergeable = True

    def __init__(self, vi: VirtnetDriver) -> None:
        self.vi = vi
        self.stats = vi.stats
        self.pool = vi.pool
        self.skbs = vi.skbs
        self.hdr_len = vi.hdr_len

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

    def receive_buf(self, buf: Any, length: int) -> None:
        """Turn the used buffer ``buf`` (and, mergeable, its followers) into a packet."""
        raise NotImplementedError

    def free_unused_buf(self, buf: Any) -> None:
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
        out = vi.num + length_hint(vi._burst) + 1  # posted + rest of the burst + this one
        if num_buf > out:
            self.stats.rx_length_errors += 1
            vi.faults.report("num_buffers_big", f"vq {vi.rvq.index}: num_buffers {num_buf} "
                             f"> {out} buffers posted")  # fmt: skip
            return True
        return False

    def _too_long(self, num_buf: int) -> None:
        # More buffers than a 64 KiB packet can fill: num_buffers was a lie.
        self.vi.faults.report("num_buffers_big", f"vq {self.vi.rvq.index}: packet too long: "
                              f"num_buffers {num_buf} > {MAX_SKB_FRAGS} frags")  # fmt: skip

    def _copy_head(self, skb: SkBuff, view: memoryview, offset: int, length: int) -> int:
        """Copy up to the skb's tailroom (GOOD_COPY_LEN) of the packet into its head."""
        copy = min(length, skb.tailroom)
        skb.put(view[offset : offset + copy])
        return copy

    def _more_bufs(self, num_buf: int):
        """Yield (buf, len) for the packet's remaining ``num_buf - 1`` buffers.

        Stops early (rx_length_errors) when the device returned fewer
        buffers than its header promised: "rx error: %d buffers missing".
        A used entry the ring refuses is consumed, counted, its buffer (if
        known) recycled, and not yielded — the caller sees fewer buffers
        than ``num_buf`` and drops the packet.
        """
        vi = self.vi
        next_used, stats = vi.next_used, self.stats
        for k in range(num_buf - 1):
            try:
                got = next_used()
            except UsedIndexError as e:
                vi.ring_broken(e)  # the packet so far is dropped by the caller
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

    def bad_used(self, e: UsedRingError) -> Any:
        """Count a used entry the ring refused; recycle its buffer if it names one."""
        self.stats.rx_length_errors += 1
        token = getattr(e, "token", None)
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
        token = getattr(e, "token", None)
        num_buf = self._num_buffers(token) if token is not None and self.mergeable else 1
        self.bad_used(e)
        for buf, _ in self._more_bufs(num_buf):
            self.free_unused_buf(buf)

    def _num_buffers(self, buf: Any) -> int:
        return 1


class DeferredRx(RxStrategy):
    """The seed: raw pages on the ring, the skb allocated when a packet arrives."""

    name = "deferred"

    def __init__(self, vi: VirtnetDriver) -> None:
        super().__init__(vi)
        # list_head freed_pages (taken at the front, added at the tail) and
        # used_pages (only needed to find every page at remove time: an
        # insertion-ordered dict gives list_del in O(1)).
        self.freed_pages: list[PageList] = []
        self._freed_head = 0
        self.used_pages: dict[PageList, None] = {}

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

    def _to_freed(self, plist: PageList) -> None:
        """list_move_tail(&plist->list, &vi->freed_pages)."""
        del self.used_pages[plist]
        freed = self.freed_pages
        if self._freed_head > 64 and self._freed_head * 2 > len(freed):
            del freed[: self._freed_head]  # compact the consumed front
            self._freed_head = 0
        freed.append(plist)

    # -- the ring -----------------------------------------------------------

    def add_recvbuf(self) -> bool:
        return self.add_recvbufs(1) == 1

    def add_recvbufs(self, n: int) -> int:
        bufs = []
        get_a_free_page = self.get_a_free_page
        for _ in range(n):
            plist = get_a_free_page()
            if plist is None:
                break
            bufs.append((plist.page.gpa, self.buf_len, plist))
        return self.vi.rvq.add_inbufs(bufs)

    buf_len = PAGE_SIZE  # add_recvbuf_mergeable: one page

    def receive_buf(self, plist: PageList, length: int) -> None:
        hdr_len = self.hdr_len
        stats = self.stats
        if length < hdr_len + ETH_HLEN:  # virtio_net.c receive_buf(): "short packet"
            stats.rx_length_errors += 1
            self._name_short(length)
            self._to_freed(plist)
            return
        skb = self.skbs.alloc(GOOD_COPY_LEN)
        page = plist.page
        view = page.view
        num_buf = view[NUM_BUFFERS_OFFSET] | view[NUM_BUFFERS_OFFSET + 1] << 8
        if skb is None:
            # The seed drops here and recycles the page; it forgot the
            # packet's other buffers, which would then be parsed as packets.
            stats.rx_dropped += 1
            self._to_freed(plist)
            self._drain(num_buf)
            return
        skb.vnet_hdr = view[:hdr_len].tobytes()
        length -= hdr_len
        copy = length if length < GOOD_COPY_LEN else GOOD_COPY_LEN  # a fresh skb's tailroom
        skb.put(view[hdr_len : hdr_len + copy])
        length -= copy
        if length:
            skb.add_frag(page, hdr_len + copy, length)
            plist.page = None
        # else: the page stays on its page_list entry — the small-packet win.
        self._to_freed(plist)
        if num_buf == 1:
            self.vi.deliver(skb)
            return
        if self._bad_num_buffers(num_buf):
            # 5.1.6.4: num_buffers is at least 1 (0 would make --num_buffers wrap)
            # and no packet spans more buffers than were posted.
            self._drop(skb)
            return
        got = 1
        for plist, length in self._more_bufs(num_buf):
            got += 1
            if len(skb.frags) >= MAX_SKB_FRAGS:
                stats.rx_length_errors += 1  # "packet too long"
                self._too_long(num_buf)
                self._to_freed(plist)
                self._drain(num_buf - got + 1)
                self._drop(skb)
                return
            skb.add_frag(plist.page, 0, length)
            plist.page = None
            self._to_freed(plist)
        if got < num_buf:
            self._drop(skb)
            return
        self.vi.deliver(skb)

    def _drain(self, num_buf: int) -> None:
        """Recycle the rest of a dropped packet's buffers (their pages stay attached)."""
        for plist, _ in self._more_bufs(num_buf):
            self._to_freed(plist)

    def _drop(self, skb: SkBuff) -> None:
        self.stats.rx_dropped += 1
        skb.free()

    def free_unused_buf(self, plist: PageList) -> None:
        self._to_freed(plist)

    def _num_buffers(self, plist: PageList) -> int:
        return NUM_BUFFERS.unpack_from(plist.page.view, 10)[0]

    def remove(self) -> None:
        """virtnet_remove: splice used_pages into freed_pages and free every page."""
        for plist in list(self.used_pages):
            self._to_freed(plist)
        for plist in self.freed_pages[self._freed_head :]:
            if plist.page is not None:
                self.pool.free_page(plist.page)
                plist.page = None
        self.freed_pages = []
        self._freed_head = 0


class PreallocRx(RxStrategy):
    """The pre-patch code: an skb and a page allocated per posted buffer."""

    name = "prealloc"

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
        bufs = []
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

    def receive_buf(self, skb: SkBuff, length: int) -> None:
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
        skb.vnet_hdr = view[:hdr_len].tobytes()
        num_buf = view[NUM_BUFFERS_OFFSET] | view[NUM_BUFFERS_OFFSET + 1] << 8
        length -= hdr_len
        copy = length if length < GOOD_COPY_LEN else GOOD_COPY_LEN  # the skb's tailroom
        skb.put(view[hdr_len : hdr_len + copy])
        length -= copy
        if length:
            skb.add_frag(page, hdr_len + copy, length)
        else:
            self.give_a_page(page)
        if num_buf == 1:
            self.vi.deliver(skb)
            return
        if self._bad_num_buffers(num_buf):
            self._drop(skb)
            return
        got = 1
        for nskb, length in self._more_bufs(num_buf):
            got += 1
            del self.recv[nskb]
            if len(skb.frags) >= MAX_SKB_FRAGS:
                self.stats.rx_length_errors += 1
                self._too_long(num_buf)
                self._recycle(nskb)
                for rest, _ in self._more_bufs(num_buf - got + 1):
                    del self.recv[rest]
                    self._recycle(rest)
                self._drop(skb)
                return
            # skb_shinfo(skb)->frags[i] = skb_shinfo(nskb)->frags[0]; kfree_skb(nskb)
            skb.add_frag(nskb.frags[0][0], 0, length)
            nskb.frags = []
            nskb.free()
        if got < num_buf:
            self._drop(skb)
            return
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

    def free_unused_buf(self, skb: SkBuff) -> None:
        del self.recv[skb]
        self._recycle(skb)

    def _num_buffers(self, skb: SkBuff) -> int:
        return NUM_BUFFERS.unpack_from(skb.frags[0][0].view, 10)[0]

    def remove(self) -> None:
        for page in self.pages:
            self.pool.free_page(page)
        self.pages = []


class SmallRx(DeferredRx):
    """No MRG_RXBUF, no GSO: one buffer per packet, header + MAX_PACKET_LEN bytes.

    Same page lists as the seed; the descriptor is shorter than the page so
    the device can never write a frame larger than the MTU allows.
    """

    name = "small"
    mergeable = False

    @property
    def buf_len(self) -> int:  # add_recvbuf_small: header + MAX_PACKET_LEN
        return self.hdr_len + MAX_PACKET_LEN

    def receive_buf(self, plist: PageList, length: int) -> None:
        if self._short(length):
            self._to_freed(plist)
            return
        skb = self.skbs.alloc(GOOD_COPY_LEN)
        if skb is None:
            self.stats.rx_dropped += 1
            self._to_freed(plist)
            return
        page = plist.page
        view = page.view
        skb.vnet_hdr = bytes(view[: self.hdr_len])
        length -= self.hdr_len
        copy = self._copy_head(skb, view, self.hdr_len, length)
        if length - copy:
            skb.add_frag(page, self.hdr_len + copy, length - copy)
            plist.page = None
        self._to_freed(plist)
        self.vi.deliver(skb)


class BigRx(DeferredRx):
    """No MRG_RXBUF but GUEST_TSO/UFO: each buffer is a chain of pages big enough
    for a 64 KiB frame (add_recvbuf_big); the skb is allocated on receive and
    the pages the frame did not reach go straight back to the page lists.
    """

    name = "big"
    mergeable = False
    PAGES = MAX_SKB_FRAGS

    def descs_per_buf(self) -> int:
        return 1 if self.vi.rvq.indirect is not None else self.PAGES

    add_recvbufs = RxStrategy.add_recvbufs  # a chain of pages each: one add() per buffer

    def add_recvbuf(self) -> bool:
        if self.vi.rvq.num_free < self.descs_per_buf():
            return False
        plists = []
        for _ in range(self.PAGES):
            plist = self.get_a_free_page()
            if plist is None:
                for p in plists:
                    self._to_freed(p)
                return False
            plists.append(plist)
        self.vi.rvq.add((), [(p.page.gpa, PAGE_SIZE) for p in plists], plists)
        return True

    def receive_buf(self, plists: list[PageList], length: int) -> None:
        if self._short(length):
            self._release(plists)
            return
        skb = self.skbs.alloc(GOOD_COPY_LEN)
        if skb is None:
            self.stats.rx_dropped += 1
            self._release(plists)
            return
        view = plists[0].page.view
        skb.vnet_hdr = bytes(view[: self.hdr_len])
        length -= self.hdr_len
        offset = self.hdr_len + self._copy_head(skb, view, self.hdr_len, length)
        length -= offset - self.hdr_len
        for plist in plists:
            if length <= 0:
                break
            size = min(length, PAGE_SIZE - offset)
            if size:
                skb.add_frag(plist.page, offset, size)
                plist.page = None
            length -= size
            offset = 0
        self._release(plists)
        self.vi.deliver(skb)

    def _release(self, plists: list[PageList]) -> None:
        for plist in plists:
            self._to_freed(plist)

    def free_unused_buf(self, plists: list[PageList]) -> None:
        self._release(plists)


STRATEGIES: dict[str, type[RxStrategy]] = {
    cls.name: cls for cls in (DeferredRx, PreallocRx, BigRx, SmallRx)
}
