"""Pages of guest memory, the seed's page lists, and socket buffers.

``PagePool`` is the guest's page allocator (alloc_page / __free_pages) over a
range of guest memory; ``PageList`` is the seed's ``struct page_list``;
``SkBuff`` a linear head of copied bytes plus page frags. Every allocation and
free is counted in the driver's ``DriverStats`` because that is what the seed's
argument is about.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, final

from virtnet.net.constants import GOOD_COPY_LEN, NET_IP_ALIGN, PAGE_SIZE, SKB_FRAG_PAGE_ORDER
from virtnet.net.stats import DriverStats
from virtnet.virtio.memory import GuestMemory


@final
class PoolError(Exception):
    """A page given back twice, or a page that is not the pool's."""


@final
class Page:
    """A 4 KiB page of guest memory (struct page), or a compound page of
    ``1 << order`` physically contiguous ones (``index`` is the first's).

    ``refs`` is the page's reference count (page_ref_count) for owners that
    share one page among several buffers (frag allocators); the pool itself
    only cares that a page is freed once.
    """

    __slots__ = ("index", "gpa", "view", "order", "refs")

    def __init__(self, index: int, gpa: int, view: memoryview, order: int = 0) -> None:
        self.index = index
        self.gpa = gpa
        self.view = view
        self.order = order
        self.refs = 1

    def __repr__(self) -> str:
        order = f", order={self.order}" if self.order else ""
        return f"Page({self.index}, gpa={self.gpa:#x}{order})"


@final
class PagePool:
    """A free-list allocator of pages in [base, base + npages * PAGE_SIZE).

    ``limit`` caps how many pages may be out at once (below ``npages``) so
    that exhaustion — a normal condition the refill must survive — is easy
    to reach in tests. ``fail`` is an optional fault injector: called with
    the allocation's sequence number, True makes that allocation fail.
    """

    def __init__(
        self,
        memory: GuestMemory,
        base: int,
        npages: int,
        stats: DriverStats,
        *,
        limit: int | None = None,
    ) -> None:
        if npages <= 0:
            raise ValueError("a page pool needs at least one page")
        region = memory.view(base, npages * PAGE_SIZE)
        self._region = region
        self.pages = [
            Page(i, base + i * PAGE_SIZE, region[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            for i in range(npages)
        ]
        self.base = base
        self.npages = npages
        self.limit = npages if limit is None else min(limit, npages)
        self.stats = stats
        self.fail: Callable[[int], bool] | None = None
        self._free = self.pages[::-1]  # a stack: recently freed pages are cache-warm
        self._is_free = [True] * npages
        self._nalloc = 0
        # Compound pages: the live ones by first index, and freed ones kept whole
        # per order (a page frag refill finds one without searching the bitmap).
        self._compound: dict[int, Page] = {}
        self._compound_free: dict[int, list[Page]] = {}
        self._compound_cached = 0  # pages held by _compound_free

    @property
    def available(self) -> int:
        return min(len(self._free) + self._compound_cached, self.limit - self.outstanding)

    @property
    def outstanding(self) -> int:
        return self.npages - len(self._free) - self._compound_cached

    def alloc_page(self) -> Page | None:
        """A free page, or None when the pool (or its limit) is exhausted."""
        self._nalloc += 1
        if self.outstanding >= self.limit:
            return None
        if not self._free and not self._split_cached():
            return None
        if self.fail is not None and self.fail(self._nalloc):
            return None
        page = self._free.pop()
        self._is_free[page.index] = False
        page.refs = 1
        self.stats.page_allocs += 1
        self.stats.pages_outstanding += 1
        return page

    def alloc_pages(self, order: int) -> Page | None:
        """``1 << order`` contiguous pages as one compound page (alloc_pages(gfp, order)).

        One allocation in ``page_allocs``, ``1 << order`` pages in
        ``pages_outstanding``. None when no aligned free run is left.
        """
        if order == 0:
            return self.alloc_page()
        self._nalloc += 1
        n = 1 << order
        if self.outstanding + n > self.limit:
            return None
        if self.fail is not None and self.fail(self._nalloc):
            return None
        cached = self._compound_free.get(order)
        if cached:
            page = cached.pop()
            self._compound_cached -= n
        else:
            carved = self._carve(order)
            if carved is None:
                return None
            page = carved
        self._compound[page.index] = page
        page.refs = 1
        self.stats.page_allocs += 1
        self.stats.pages_outstanding += n
        return page

    def _carve(self, order: int) -> Page | None:
        """Take an aligned run of free order-0 pages off the free stack (slow path:
        only until enough compound pages have been freed into their cache)."""
        n = 1 << order
        is_free = self._is_free
        # From the top of the pool down: order-0 allocations pop from the bottom.
        for start in range((self.npages - n) & ~(n - 1), -1, -n):
            if all(is_free[start : start + n]):
                break
        else:
            return None
        end = start + n
        self._free = [p for p in self._free if not start <= p.index < end]
        for i in range(start, end):
            is_free[i] = False
        view = self._region[start * PAGE_SIZE : end * PAGE_SIZE]
        return Page(start, self.base + start * PAGE_SIZE, view, order)

    def _split_cached(self) -> bool:
        """Order-0 pages ran out: break one cached compound page back into pages."""
        for order, cached in self._compound_free.items():
            if cached:
                page = cached.pop()
                n = 1 << order
                self._compound_cached -= n
                for i in range(page.index + n - 1, page.index - 1, -1):
                    self._is_free[i] = True
                    self._free.append(self.pages[i])
                return True
        return False

    def free_page(self, page: Page) -> None:
        """__free_pages(page, order); refuses a double free loudly."""
        index = page.index
        if page.order:
            self._free_compound(page)
            return
        if not 0 <= index < self.npages or self.pages[index] is not page:
            raise PoolError(f"{page!r} is not a page of this pool")
        if self._is_free[index]:
            raise PoolError(f"{page!r} freed twice")
        self._is_free[index] = True
        self._free.append(page)
        self.stats.page_frees += 1
        self.stats.pages_outstanding -= 1

    def get_page(self, page: Page) -> None:
        """get_page: one more owner (a buffer or frag carved from a shared page)."""
        page.refs += 1

    def put_page(self, page: Page) -> None:
        """Drop one reference; the last one frees the page (put_page)."""
        page.refs -= 1
        if page.refs <= 0:
            self.free_page(page)

    def _free_compound(self, page: Page) -> None:
        if self._compound.get(page.index) is not page:
            raise PoolError(f"{page!r} freed twice, or not a compound page of this pool")
        del self._compound[page.index]
        n = 1 << page.order
        self._compound_free.setdefault(page.order, []).append(page)
        self._compound_cached += n
        self.stats.page_frees += 1
        self.stats.pages_outstanding -= n


@final
class PageFrag:
    """Buffers carved back to back from compound pages (Linux page_frag_alloc /
    skb_page_frag_refill): a 64 KiB frame lands in two or three physically
    contiguous runs instead of 17 separate pages, and a 66-byte ACK takes 128
    bytes instead of a page. Every frag handed out holds a reference on its
    page; the frag allocator holds one on the page it is carving.
    """

    ORDER: Final = SKB_FRAG_PAGE_ORDER  # 32 KiB
    ALIGN: Final = 64  # SMP_CACHE_BYTES: the next frag starts on a cache line

    # The default is SKB_FRAG_PAGE_ORDER, not ORDER: a class attribute is no default
    # argument value in a compiled class (the class does not exist yet there).
    def __init__(self, pool: PagePool, order: int = SKB_FRAG_PAGE_ORDER) -> None:
        self.pool = pool
        self.order = order
        self.size = PAGE_SIZE << order
        self.pages: list[Page] = []  # the page being carved first, then spares
        self.offset = 0  # into pages[0]

    def room(self) -> int:
        if not self.pages:
            return 0
        return len(self.pages) * self.size - self.offset

    def refill(self, need: int) -> bool:
        """Have at least ``need`` bytes of room; False when the pool is out of pages."""
        while self.room() < need:
            page = self.pool.alloc_pages(self.order)
            if page is None:
                return False
            self.pages.append(page)
        return True

    def views(self) -> list[memoryview]:
        """The room as views, in order: what a readv may fill."""
        if not self.pages:
            return []
        first = self.pages[0].view[self.offset :]
        return [first, *(p.view for p in self.pages[1:])]

    def commit(self, nbytes: int) -> list[tuple[Page, int, int]]:
        """Hand out the first ``nbytes`` of the room as frags (page, offset, size)."""
        frags: list[tuple[Page, int, int]] = []
        while nbytes > 0:
            page = self.pages[0]
            n = min(nbytes, self.size - self.offset)
            page.refs += 1
            frags.append((page, self.offset, n))
            nbytes -= n
            self.offset += n
            if self.offset >= self.size:
                self.pages.pop(0)
                self.pool.put_page(page)
                self.offset = 0
        self.offset = (self.offset + self.ALIGN - 1) & ~(self.ALIGN - 1)
        if self.pages and self.offset >= self.size:
            self.pool.put_page(self.pages.pop(0))
            self.offset = 0
        return frags

    def release(self) -> None:
        for page in self.pages:
            self.pool.put_page(page)
        self.pages = []
        self.offset = 0


@final
class PageList:
    """The seed's ``struct page_list``: a page slot that outlives its page."""

    __slots__ = ("page",)

    def __init__(self) -> None:
        self.page: Page | None = None


@final
class SkBuff:
    """A received or transmitted packet: linear head + page frags.

    ``head`` is the skb's own memory (netdev_alloc_skb's data, with
    NET_IP_ALIGN reserved in front); ``frags`` are (page, offset, size)
    triples in guest memory, owned by the skb until ``free`` gives the
    pages back (put_page). ``vnet_hdr`` is the virtio-net header bytes
    (skb_vnet_hdr: the seed keeps it in skb->cb).

    A ``bytes`` object put into an empty head is kept as the linear part, not copied
    into ``head`` (``_head_bytes``; build_skb: a head the caller already filled): it is
    already a private copy — out of guest memory (``receive_mergeable``) or a stack's
    frame — and immutable, so nothing shared can change it after the checks. A second
    ``put`` copies it into ``head`` first. Compiled, the copy in and the slice and
    ``tobytes`` out (``to_bytes``) were ~2 000 instructions of a 64 B packet.
    """

    __slots__ = (
        "head", "_head_view", "_head_bytes", "head_len", "frags", "len", "data_len",
        "vnet_hdr", "_alloc", "cached",
    )  # fmt: skip

    def __init__(self, alloc: SkbAllocator, size: int) -> None:
        self._alloc = alloc
        self.head = bytearray(size + NET_IP_ALIGN)  # skb_reserve(skb, NET_IP_ALIGN)
        self._head_view = memoryview(self.head)  # made once: a cached skb keeps its head
        self._head_bytes = b""  # the linear part while it is one bytes object put whole
        self.head_len = 0
        self.frags: list[tuple[Page, int, int]] = []
        self.len = 0
        self.data_len = 0
        self.vnet_hdr = b""
        self.cached = False  # freed, waiting in its allocator's cache for reuse

    @property
    def tailroom(self) -> int:
        return len(self.head) - NET_IP_ALIGN - self.head_len

    def put(self, data: bytes | bytearray | memoryview) -> None:
        """skb_put + memcpy: append ``data`` to the linear head."""
        n = len(data)
        start = NET_IP_ALIGN + self.head_len
        if start + n > len(self.head):  # skb_over_panic: the head never grows
            raise ValueError(f"skb_put of {n} bytes past the head ({self.tailroom} left)")
        if not self.head_len and isinstance(data, bytes):
            self._head_bytes = data  # kept, not copied (see the class)
        else:
            if self._head_bytes:  # a second put: the first one's bytes into the head
                self._head_view[NET_IP_ALIGN:start] = self._head_bytes
                self._head_bytes = b""
            # Through the view: a memoryview slice store is a third of a bytearray's.
            self._head_view[start : start + n] = data
        self.head_len += n
        self.len += n

    def add_frag(self, page: Page, offset: int, size: int) -> None:
        self.frags.append((page, offset, size))
        self.data_len += size
        self.len += size

    @property
    def nr_frags(self) -> int:
        return len(self.frags)

    def linear(self) -> bytes | memoryview:
        """The linear part: the bytes put whole, or a view of the head."""
        if self._head_bytes:
            return self._head_bytes
        return self._head_view[NET_IP_ALIGN : NET_IP_ALIGN + self.head_len]

    def data_views(self) -> list[memoryview]:
        """The packet as views, head first: what one writev sends, no copy."""
        views: list[memoryview] = []
        if self._head_bytes:
            views.append(memoryview(self._head_bytes))
        elif self.head_len:
            views.append(self._head_view[NET_IP_ALIGN : NET_IP_ALIGN + self.head_len])
        views += [page.view[off : off + size] for page, off, size in self.frags]
        return views

    def to_bytes(self) -> bytes:
        if not self.frags:  # a small packet: all of it is linear
            if self._head_bytes:
                return self._head_bytes
            # .tobytes(): compiled, bytes() of a view or a bytearray is a generic call.
            return self._head_view[NET_IP_ALIGN : NET_IP_ALIGN + self.head_len].tobytes()
        return b"".join(self.data_views())

    def free(self) -> None:
        """kfree_skb: frag pages back to the pool, the skb counted as freed."""
        self._alloc.free(self)


# Freed skbs of the usual size kept for reuse, like napi_skb_cache (NAPI_SKB_CACHE_SIZE
# is 64 there, backed by the slab). Here nothing backs it, and a tx ring of 256 frees its
# skbs in bursts of up to 256 completions: a smaller cache would drop most of them.
SKB_CACHE_SIZE: Final = 256


@final
class SkbAllocator:
    """netdev_alloc_skb / kfree_skb, counted; ``fail`` injects failures.

    Like Linux's per-CPU napi skb cache, a freed skb of the usual head size
    (GOOD_COPY_LEN) is kept and handed out again: a packet then costs no new
    object and no new head buffer, only its counters (skb_allocs and skb_frees
    count every alloc and free, cached or not).

    The cache is a list of SKB_CACHE_SIZE slots made once and a count, not a list that
    grows and shrinks: one skb in flight at a time (every rx packet, freed before the
    next arrives) took the list from one item to none and back, and CPython frees a
    list's array when it empties, so each packet paid a realloc in ``pop`` and another
    in ``append`` (~480 instructions, compiled).
    """

    def __init__(self, pool: PagePool, stats: DriverStats) -> None:
        self.pool = pool
        self.stats = stats
        self.fail: Callable[[int], bool] | None = None
        self._nalloc = 0
        self.live = 0
        self._cache: list[SkBuff | None] = [None] * SKB_CACHE_SIZE
        self._ncached = 0  # the cached skbs are _cache[:_ncached]; the other slots None

    def alloc(self, size: int = GOOD_COPY_LEN) -> SkBuff | None:
        self._nalloc += 1
        if self.fail is not None and self.fail(self._nalloc):
            return None
        self.stats.skb_allocs += 1
        self.live += 1
        if size == GOOD_COPY_LEN and self._ncached:
            n = self._ncached - 1
            skb = self._cache[n]
            assert skb is not None  # every slot below _ncached holds one
            self._cache[n] = None
            self._ncached = n
            skb.cached = False
            return skb
        return SkBuff(self, size)

    def free(self, skb: SkBuff) -> None:
        if skb.frags:
            # Last frag first: the free list is a stack, so the next allocations pop the
            # pages back in ascending order and a frame's pages stay one contiguous run.
            for page, _, _ in reversed(skb.frags):
                page.refs -= 1  # put_page, inline: this runs once per page of every frame
                if page.refs <= 0:
                    self.pool.free_page(page)
            skb.frags = []
        self.stats.skb_frees += 1
        self.live -= 1
        if (
            not skb.cached  # freed twice: never hand one skb out to two owners
            and len(skb.head) == GOOD_COPY_LEN + NET_IP_ALIGN
            and self._ncached < SKB_CACHE_SIZE
        ):
            skb.head_len = skb.len = skb.data_len = 0
            skb.vnet_hdr = skb._head_bytes = b""
            skb.cached = True
            self._cache[self._ncached] = skb
            self._ncached += 1
