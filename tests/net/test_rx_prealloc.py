"""The baseline: ``PreallocRx``, the code the seed's ``-`` lines removed.

try_fill_recv allocated an skb *and* a page for every posted buffer; receive_skb
merged the further buffers' skbs into the first ("frags[i] = skb_shinfo(nskb)->frags[0];
kfree_skb(nskb)"). These tests pin that cost as exact counts, so the A/B against
the seed measures what the RFC says it measures.
"""

from __future__ import annotations

import pytest

from tests.net.conftest import MRG, Pair, frame, make_pair, pages_for_frame
from virtnet.net.constants import ETH_HLEN, GOOD_COPY_LEN, PAGE_SIZE
from virtnet.net.header import MRG_HDR_LEN

SIZES = [60, 1514, 200, 9000, 65536 + ETH_HLEN, 100, 3000]


def tx_pages(queue_size: int = 64) -> int:
    """Pages the driver holds for tx header slots from probe to remove."""
    p = make_pair("deferred", MRG, queue_size=queue_size, fill=False)
    n = p.drv.pool.outstanding
    p.teardown()
    return n


def test_every_posted_buffer_costs_an_skb_and_a_page(prealloc):
    # pre-patch try_fill_recv: netdev_alloc_skb(...) then get_a_page() per buffer
    p = prealloc
    q = p.layout.queue_size
    st = p.drv.stats
    assert (st.skb_allocs, p.drv.skbs.live, len(p.drv.rx.recv)) == (q, q, q)
    assert st.page_allocs == q + tx_pages()


def test_prealloc_allocates_one_skb_per_posted_buffer_not_per_packet(prealloc):
    p = prealloc
    for k, size in enumerate(SIZES * 4):
        assert p.send(frame(size, k))
        p.napi()
    st = p.drv.stats
    posted = st.rx_bufs + p.drv.num  # every buffer ever posted: used ones + those on the ring
    assert st.skb_allocs == posted
    assert st.rx_packets == len(SIZES) * 4 < posted
    assert st.skb_frees == st.skb_allocs - p.drv.num  # the posted ones are still live


def test_the_same_traffic_costs_one_skb_per_packet_with_the_seed(pair_factory):
    # The RFC's claim in one comparison: "it reduces skb pre-allocations and skb_frees".
    seen = {}
    for strategy in ("deferred", "prealloc"):
        p = pair_factory(strategy, MRG)
        for k, size in enumerate(SIZES * 3):
            p.send(frame(size, k))
            p.napi()
        seen[strategy] = (p.frames, p.drv.stats.skb_allocs, p.drv.stats.rx_bufs + p.drv.num)
    frames, deferred_allocs, _ = seen["deferred"]
    pframes, prealloc_allocs, posted = seen["prealloc"]
    assert frames == pframes == [frame(s, k) for k, s in enumerate(SIZES * 3)]
    assert deferred_allocs == len(SIZES) * 3
    assert prealloc_allocs == posted


def test_further_buffers_skbs_are_merged_and_freed_at_once(pair_factory):
    # pre-patch: "skb_shinfo(skb)->frags[i] = skb_shinfo(nskb)->frags[0]; kfree_skb(nskb)"
    p = pair_factory("prealloc", MRG, hold=True)
    nbuf = pages_for_frame(9000)
    frees = p.drv.stats.skb_frees
    p.send(frame(9000))
    p.napi()
    (skb,) = p.held
    assert p.drv.stats.skb_frees - frees == nbuf - 1
    assert skb.nr_frags == nbuf and skb.to_bytes() == frame(9000)
    assert skb.head_len == GOOD_COPY_LEN


def test_a_small_packets_page_goes_back_to_the_page_cache(pair_factory):
    # pre-patch: "if (!len) { give_a_page(vi, frags[0].page); nr_frags--; }"
    p = pair_factory("prealloc", MRG)
    p.send(frame(GOOD_COPY_LEN))
    p.napi()
    assert len(p.drv.rx.pages) == 1
    st = p.drv.stats
    page_allocs, skb_allocs = st.page_allocs, st.skb_allocs
    p.drv.try_fill_recv()
    # the page is reused, but the skb is allocated anyway: the cost the seed removes
    assert (st.page_allocs, st.page_reuses, st.skb_allocs) == (page_allocs, 1, skb_allocs + 1)


def test_a_large_packets_page_leaves_with_the_skb(pair_factory):
    p = pair_factory("prealloc", MRG, hold=True)
    p.send(frame(1514))
    p.napi()
    (skb,) = p.held
    assert [(o, s) for _, o, s in skb.frags] == [(MRG_HDR_LEN + GOOD_COPY_LEN,
                                                  1514 - GOOD_COPY_LEN)]  # fmt: skip
    assert p.drv.rx.pages == []


def test_refill_stops_when_an_skb_cannot_be_allocated(pair_factory):
    # pre-patch try_fill_recv: "skb = netdev_alloc_skb(...); if (unlikely(!skb)) break;"
    p = pair_factory("prealloc", MRG, fill=False)
    calls = []
    p.drv.skbs.fail = lambda n: calls.append(n) or len(calls) > 10
    pages = p.drv.stats.page_allocs
    assert p.drv.try_fill_recv()
    assert p.drv.num == 10
    assert p.drv.stats.page_allocs == pages + 10  # no page taken for the failed skb


def test_refill_frees_the_skb_when_its_page_cannot_be_allocated(pair_factory):
    # pre-patch: "f->page = get_a_page(vi, GFP_ATOMIC); if (!f->page) { kfree_skb(skb); break; }"
    p = pair_factory("prealloc", MRG, fill=False)
    calls = []
    p.drv.pool.fail = lambda n: calls.append(n) or len(calls) > 10
    p.drv.try_fill_recv()
    st = p.drv.stats
    assert p.drv.num == 10
    assert (st.skb_allocs, st.skb_frees, p.drv.skbs.live) == (11, 1, 10)


def test_page_exhaustion_stops_refill_and_cached_pages_feed_it_again(pair_factory):
    base = tx_pages()
    p: Pair = pair_factory("prealloc", MRG, page_limit=base + 4, hold=True)
    assert p.drv.num == 4
    for k in range(4):
        p.send(frame(1514, k))
    p.napi()
    assert p.drv.num == 0
    p.release_held()
    p.napi()
    assert p.drv.num == 4
    p.send(frame(60, 9))
    p.napi()
    assert p.frames == [frame(1514, k) for k in range(4)] + [frame(60, 9)]


def test_remove_frees_posted_skbs_their_pages_and_the_page_cache(pair_factory):
    p = pair_factory("prealloc", MRG)
    for k in range(5):
        p.send(frame(60, k))  # five pages into vi->pages
    p.send(frame(2 * PAGE_SIZE, 5))
    p.napi()
    assert len(p.drv.rx.pages) == 5
    p.teardown()
    assert p.drv.skbs.live == 0
    assert p.drv.rx.recv == {} and p.drv.rx.pages == []
    assert p.drv.pool.outstanding == 0 and p.drv.stats.pages_outstanding == 0
    st = p.drv.stats
    assert st.skb_allocs == st.skb_frees and st.page_allocs == st.page_frees


@pytest.mark.parametrize("size", [ETH_HLEN, 60, 1514, 65536 + ETH_HLEN])
def test_prealloc_and_deferred_deliver_the_same_bytes(pair_factory, size):
    out = []
    for strategy in ("prealloc", "deferred"):
        p = pair_factory(strategy, MRG)
        for k in range(3):
            p.send(frame(size, k))
        p.napi()
        out.append(p.delivered)
    assert out[0] == out[1]
    assert [d for _, d in out[0]] == [frame(size, k) for k in range(3)]
