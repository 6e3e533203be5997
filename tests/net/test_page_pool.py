"""PagePool: order-0 and compound pages share one pool without overlap or loss; the
skb's linear head built on them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet.net.constants import GOOD_COPY_LEN, PAGE_SIZE
from virtnet.net.skb import SKB_CACHE_SIZE, PageFrag, PagePool, PoolError, SkbAllocator
from virtnet.net.stats import driver_stats
from virtnet.virtio.memory import GuestMemory


def make_pool(npages: int = 64, limit: int | None = None) -> PagePool:
    memory = GuestMemory.from_buffer(bytearray(npages * PAGE_SIZE + PAGE_SIZE))
    return PagePool(memory, PAGE_SIZE, npages, driver_stats(), limit=limit)


def test_a_compound_page_is_one_aligned_contiguous_run():
    pool = make_pool()
    page = pool.alloc_pages(3)
    assert page is not None and page.order == 3
    assert page.index % 8 == 0
    assert page.view.nbytes == 8 * PAGE_SIZE
    assert page.gpa == pool.base + page.index * PAGE_SIZE
    assert pool.outstanding == 8
    assert pool.stats.page_allocs == 1 and pool.stats.pages_outstanding == 8
    # Writing through the compound view is writing the order-0 pages it covers.
    page.view[PAGE_SIZE : PAGE_SIZE + 3] = b"abc"
    assert bytes(pool.pages[page.index + 1].view[:3]) == b"abc"


def test_freed_compound_pages_are_reused_whole_and_count_as_free():
    pool = make_pool()
    page = pool.alloc_pages(3)
    pool.free_page(page)
    assert pool.outstanding == 0 and pool.stats.pages_outstanding == 0
    again = pool.alloc_pages(3)
    assert again is page


def test_double_free_of_a_compound_page_is_refused():
    pool = make_pool()
    page = pool.alloc_pages(2)
    pool.free_page(page)
    with pytest.raises(PoolError, match="freed twice"):
        pool.free_page(page)


def test_order0_allocations_break_cached_compound_pages_when_needed():
    pool = make_pool(npages=16)
    big = [pool.alloc_pages(3), pool.alloc_pages(3)]
    assert pool.alloc_pages(3) is None and pool.alloc_page() is None
    for p in big:
        pool.free_page(p)
    pages = [pool.alloc_page() for _ in range(16)]
    assert all(p is not None for p in pages)
    assert len({p.index for p in pages}) == 16
    for p in pages:
        pool.free_page(p)
    assert pool.outstanding == 0


def test_the_limit_counts_pages_not_allocations():
    pool = make_pool(npages=64, limit=10)
    assert pool.alloc_pages(3) is not None
    assert pool.alloc_pages(2) is None  # 8 + 4 > 10
    assert pool.alloc_page() is not None and pool.alloc_page() is not None
    assert pool.alloc_page() is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 1000)), max_size=80))
def test_random_alloc_free_never_overlaps_or_loses_a_page(ops):
    pool = make_pool(npages=32)
    live: list = []
    for alloc, order, pick in ops:
        if alloc or not live:
            page = pool.alloc_pages(order)
            if page is None:
                continue
            live.append(page)
        else:
            pool.free_page(live.pop(pick % len(live)))
        owned = [i for p in live for i in range(p.index, p.index + (1 << p.order))]
        assert len(owned) == len(set(owned)), "two live allocations share a page"
        assert pool.outstanding == len(owned) == pool.stats.pages_outstanding
    for page in live:
        pool.free_page(page)
    assert pool.outstanding == 0


def test_page_frags_are_carved_back_to_back_and_freed_by_their_last_user():
    pool = make_pool(npages=64)
    frag = PageFrag(pool)
    assert frag.refill(70000)  # three 32 KiB pages
    assert pool.stats.page_allocs == 3 and pool.outstanding == 24
    first = frag.commit(66)  # an ACK
    assert [(p.index, off, n) for p, off, n in first] == [(frag.pages[0].index, 0, 66)]
    big = frag.commit(65000)  # a TSO frame: the rest of page 0 and most of page 1
    assert [off for _, off, _ in big] == [128, 0]  # the next frag starts on a cache line
    assert sum(n for _, _, n in big) == 65000
    page0 = first[0][0]
    assert page0.refs == 2  # the ACK's frag and the TSO frame's first frag
    frag.release()
    for p, _, _ in first + big:
        pool.put_page(p)
    assert pool.outstanding == 0 and pool.stats.pages_outstanding == 0


def test_an_exhausted_pool_makes_refill_fail_without_losing_pages():
    pool = make_pool(npages=16)
    frag = PageFrag(pool)
    assert not frag.refill(70000)  # only two 32 KiB runs exist
    frag.release()
    assert pool.outstanding == 0


def test_an_skb_head_put_whole_as_bytes_reads_back_through_every_accessor():
    pool = make_pool()
    skbs = SkbAllocator(pool, pool.stats)
    skb = skbs.alloc()
    assert skb is not None
    frame = bytes(range(60))
    skb.put(frame)  # kept as it is: no copy into the head
    assert (skb.head_len, skb.len, skb.tailroom) == (60, 60, GOOD_COPY_LEN - 60)
    assert skb.to_bytes() == bytes(skb.linear()) == b"".join(skb.data_views()) == frame
    # A second put copies the first one's bytes into the head, then appends.
    skb.put(memoryview(b"xyz"))
    skb.put(b"!")
    assert skb.to_bytes() == bytes(skb.linear()) == frame + b"xyz!"
    page = pool.alloc_page()
    assert page is not None
    page.view[:4] = b"frag"
    skb.add_frag(page, 0, 4)
    assert skb.to_bytes() == frame + b"xyz!frag"
    # The same bound as a copied head: the head never grows.
    with pytest.raises(ValueError, match="past the head"):
        skb.put(bytes(GOOD_COPY_LEN))
    skb.free()
    # Cached and handed out again: nothing of the last packet's head is left.
    again = skbs.alloc()
    assert again is skb and again.to_bytes() == b"" and again.data_views() == []
    again.put(bytearray(b"ab"))  # not bytes: copied into the head, as before
    again.put(b"cd")
    assert again.to_bytes() == b"abcd"
    with pytest.raises(ValueError, match="past the head"):
        skbs.alloc().put(bytes(GOOD_COPY_LEN + 1))  # a fresh skb: the bytes too long


def test_the_skb_cache_keeps_at_most_its_size_and_hands_each_skb_out_once():
    pool = make_pool()
    skbs = SkbAllocator(pool, pool.stats)
    out = [skbs.alloc() for _ in range(SKB_CACHE_SIZE + 2)]
    assert all(skb is not None for skb in out) and len({id(skb) for skb in out}) == len(out)
    for skb in out:
        assert skb is not None
        skb.free()
    skbs.free(out[0])  # freed twice: counted, not cached a second time
    again = [skbs.alloc() for _ in range(SKB_CACHE_SIZE + 1)]
    reused = [skb for skb in again if any(skb is old for old in out)]
    assert len(reused) == SKB_CACHE_SIZE == len({id(skb) for skb in reused})
    assert again[-1] is not None and not any(again[-1] is old for old in out)  # a new one
    assert skbs.live == SKB_CACHE_SIZE + 1 - 1  # the double free counted too
