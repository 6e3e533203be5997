"""The ``ewma`` strategy: what virtio_net.c grew after the seed.

Mergeable buffers sized by an EWMA of received packet lengths (``get_mergeable_buf_len``,
``ewma_pkt_len``), carved back to back from 32 KiB compound pages (``skb_page_frag_refill``)
that stay allocated while any buffer or frag still uses them (page refcounts). Everything
the seed's strategy must do (error paths, teardown, exact bytes) is pinned by the
parametrized tests in test_rx_deferred.py and test_teardown.py; this file pins what is
new: the sizing, the carving, the references and the accounting.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.net.conftest import MRG, LyingDevice, Pair, frame, make_pair
from virtnet.net.constants import (
    ETH_HLEN,
    GOOD_PACKET_LEN,
    L1_CACHE_BYTES,
    MAX_GSO_FRAME,
    PAGE_SIZE,
    SKB_FRAG_PAGE_ORDER,
)
from virtnet.net.header import MRG_HDR_LEN
from virtnet.net.rx import EwmaPktLen, mergeable_min_buf_len

FRAG_SIZE = PAGE_SIZE << SKB_FRAG_PAGE_ORDER


def align(n: int) -> int:
    return -(-n // L1_CACHE_BYTES) * L1_CACHE_BYTES


def stream(p: Pair, size: int, n: int, seed: int = 0) -> None:
    for k in range(n):
        assert p.send(frame(size, seed + k))
        p.napi()


def posted_sizes(p: Pair) -> Counter:
    """How long the buffers on the ring are, as the device sees them."""
    liar = LyingDevice(p)
    return Counter(liar.sizes(liar.pending()))


# -- ewma_pkt_len -------------------------------------------------------------------------------


def test_ewma_pkt_len_is_linux_average_h_with_precision_0_and_weight_64():
    avg = EwmaPktLen()
    assert avg.read() == 0
    avg.add(1000)  # the first sample is taken whole
    assert avg.read() == 1000
    ref = 1000
    for val in (64, 9000, 1514, 1514, 0, 65550):
        avg.add(val)
        ref = (ref * 63 + val) >> 6  # ((internal << 6) - internal + val) >> 6
        assert avg.read() == ref


@pytest.mark.parametrize(
    ("queue_size", "expected"),
    [(256, GOOD_PACKET_LEN), (64, GOOD_PACKET_LEN), (32, 2037), (16, 4086)],
)
def test_the_floor_lets_a_full_ring_hold_the_largest_packet(queue_size, expected):
    # mergeable_min_buf_len: DIV_ROUND_UP(hdr + ETH_HLEN + VLAN_HLEN + IP_MAX_MTU, ring) - hdr,
    # never below GOOD_PACKET_LEN.
    assert mergeable_min_buf_len(MRG_HDR_LEN, queue_size) == expected
    p = make_pair("ewma", MRG, queue_size=queue_size)
    want = p.drv.rx.get_mergeable_buf_len()
    assert want == align(MRG_HDR_LEN + min(expected, PAGE_SIZE - MRG_HDR_LEN))
    assert want * queue_size >= MRG_HDR_LEN + MAX_GSO_FRAME or want == PAGE_SIZE
    p.teardown()


# -- the buffer length follows the traffic ------------------------------------------------------


@pytest.mark.parametrize("size", [2000, 2900, 3500])
def test_buffer_length_converges_to_a_steady_streams_packet_size(pair_factory, size):
    p = pair_factory("ewma", MRG)
    rx = p.drv.rx
    stream(p, size, 600)
    avg = rx.avg_pkt_len.read()
    # Precision 0 rounds down: from below the average settles within 64 bytes of the size.
    assert size - 64 < avg <= size
    assert rx.get_mergeable_buf_len() == align(MRG_HDR_LEN + avg)
    # Every packet's buffers have gone up the stack, so the ring was refilled with
    # fresh buffers of that length (the last one of a compound page takes its hole).
    sizes = posted_sizes(p)
    assert sizes.most_common(1)[0][0] == rx.get_mergeable_buf_len()
    assert all(s >= rx.get_mergeable_buf_len() for s in sizes)


def test_buffer_length_moves_when_the_stream_changes(pair_factory):
    p = pair_factory("ewma", MRG)
    rx = p.drv.rx
    floor = align(MRG_HDR_LEN + GOOD_PACKET_LEN)
    assert rx.get_mergeable_buf_len() == floor  # an empty average: the floor
    stream(p, 1514, 300)
    assert rx.get_mergeable_buf_len() == floor  # MTU frames fit the floor
    stream(p, 3000, 600, seed=1000)
    up = rx.get_mergeable_buf_len()
    assert up == align(MRG_HDR_LEN + rx.avg_pkt_len.read()) and up >= 3000 - 64 + MRG_HDR_LEN
    stream(p, 65550, 100, seed=2000)
    assert rx.get_mergeable_buf_len() == PAGE_SIZE  # clamped at PAGE_SIZE - hdr_len
    stream(p, 2000, 600, seed=3000)
    down = rx.get_mergeable_buf_len()
    assert down == align(MRG_HDR_LEN + 2000)  # from above the average lands exactly
    assert rx.avg_pkt_len.read() == 2000
    stream(p, 64, 600, seed=4000)
    assert rx.get_mergeable_buf_len() == floor
    expected = (
        [frame(1514, k) for k in range(300)]
        + [frame(3000, 1000 + k) for k in range(600)]
        + [frame(65550, 2000 + k) for k in range(100)]
        + [frame(2000, 3000 + k) for k in range(600)]
        + [frame(64, 4000 + k) for k in range(600)]
    )
    assert p.frames == expected


def test_a_large_frame_spans_ewma_sized_buffers_and_arrives_whole(pair_factory):
    p = pair_factory("ewma", MRG, hold=True)
    stream(p, 1514, 10)
    data = frame(65550, 7)
    p.send(data)
    p.napi()
    skb = p.held[-1]
    assert skb.to_bytes() == data
    nbuf = p.drv.stats.rx_bufs - 10
    assert nbuf == -(-(MRG_HDR_LEN + len(data)) // align(MRG_HDR_LEN + GOOD_PACKET_LEN))
    # Consecutive buffers of one compound page coalesce into one frag (skb_can_coalesce).
    pages = {id(page) for page, _, _ in skb.frags}
    assert skb.nr_frags == len(pages) < nbuf


# -- carving and references ---------------------------------------------------------------------


def test_buffers_are_carved_back_to_back_from_32k_compound_pages(pair_factory):
    p = pair_factory("ewma", MRG)
    bufs = list(p.drv.rx.used_pages)
    assert len(bufs) == p.layout.queue_size
    want = p.drv.rx.get_mergeable_buf_len()
    per_page = FRAG_SIZE // want
    first = bufs[0].page
    assert first.order == SKB_FRAG_PAGE_ORDER
    for k, buf in enumerate(bufs[:per_page]):
        assert buf.page is first and buf.offset == k * want
    # The last buffer takes the hole a further buffer would not fit in.
    last = bufs[per_page - 1]
    assert last.offset + last.len == FRAG_SIZE and last.len == want + FRAG_SIZE % want
    # One reference per buffer carved, plus alloc_frag's own on the current page.
    assert first.refs == per_page
    st = p.drv.stats
    assert st.page_allocs == -(-p.layout.queue_size // per_page) + p.drv.tx_slots.pages.__len__()


def test_a_compound_page_is_freed_only_by_its_last_user(pair_factory):
    p = pair_factory("ewma", MRG, hold=True)
    for k in range(5):
        p.send(frame(1000, k))  # five buffers of the first compound page go up the stack
    p.napi()
    assert len(p.held) == 5
    page = p.held[0].frags[0][0]
    assert all(skb.frags[0][0] is page for skb in p.held)
    p.dev.reset()
    p.drv.remove()
    # The driver gave back every buffer it still had; the stack's five frags keep the page.
    assert page.refs == 5
    assert p.drv.pool.outstanding == 1 << SKB_FRAG_PAGE_ORDER
    for skb in p.held[:4]:
        skb.free()
    assert page.refs == 1 and p.drv.pool.outstanding == 1 << SKB_FRAG_PAGE_ORDER
    p.held[4].free()
    p.held.clear()
    assert p.drv.pool.outstanding == 0 and p.drv.stats.pages_outstanding == 0


def test_a_frag_page_whose_buffers_all_came_back_is_carved_again(pair_factory):
    # skb_page_frag_refill: "if (page_ref_count(pfrag->page) == 1) { offset = 0; }" —
    # once the device used the whole ring and the stack freed every skb, the refill
    # starts over at the front of the page it was carving instead of allocating.
    p = pair_factory("ewma", MRG)
    rx = p.drv.rx
    current = rx.alloc_frag.page
    for k in range(p.layout.queue_size):
        assert p.send(frame(1000, k))
    allocs = p.drv.stats.page_allocs
    assert p.napi() == p.layout.queue_size
    st = p.drv.stats
    assert st.page_reuses == 1
    assert [b.offset for b in rx.used_pages if b.page is current][0] == 0
    per_page = FRAG_SIZE // rx.get_mergeable_buf_len()
    # The reused page takes the first per_page buffers; the rest need new pages.
    assert st.page_allocs - allocs == -(-(p.layout.queue_size - per_page) // per_page)
    assert p.frames == [frame(1000, k) for k in range(p.layout.queue_size)]


def test_small_packets_reuse_their_buffers_and_allocate_nothing(pair_factory):
    p = pair_factory("ewma", MRG)
    stream(p, 60, 200)
    p.drv.try_fill_recv()
    allocs, skbs = p.drv.stats.page_allocs, p.drv.stats.skb_allocs
    stream(p, 60, 300, seed=500)
    p.drv.try_fill_recv()
    st = p.drv.stats
    assert st.page_allocs == allocs  # copied whole: the buffer stays on its entry
    assert st.skb_allocs - skbs == 300


def test_when_no_compound_page_is_left_buffers_come_from_order_0_pages(pair_factory):
    probe = make_pair("ewma", MRG, fill=False)
    base = probe.drv.pool.outstanding  # the tx header slots
    probe.teardown()
    p = pair_factory("ewma", MRG, page_limit=base + 4)  # 4 pages: never 8 in a row
    assert p.drv.num == 4 * (PAGE_SIZE // p.drv.rx.get_mergeable_buf_len())
    assert all(buf.page.order == 0 for buf in p.drv.rx.used_pages)
    for k in range(20):
        assert p.send(frame(1514, k))
        p.napi()
    assert p.frames == [frame(1514, k) for k in range(20)]


# -- accounting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1514, 9000, 65550])
def test_rx_truesize_is_the_buffer_memory_delivered_packets_came_in(size):
    out = {}
    for strategy in ("deferred", "ewma"):
        p = make_pair(strategy, MRG)
        stream(p, size, 20)
        st = p.drv.stats
        out[strategy] = st.rx_truesize / st.rx_packets
        if strategy == "deferred":
            assert st.rx_truesize == st.rx_bufs * PAGE_SIZE
        p.teardown()
    assert out["ewma"] < out["deferred"]
    assert out["ewma"] >= size + MRG_HDR_LEN  # never less than the bytes it held
    if size == 1514:
        assert out["deferred"] == PAGE_SIZE and out["ewma"] < PAGE_SIZE / 2


def test_a_short_packet_is_counted_and_its_buffer_reused(pair_factory):
    p = pair_factory("ewma", MRG)
    liar = LyingDevice(p)
    chain = liar.pop()
    liar.write(chain, bytes(MRG_HDR_LEN + ETH_HLEN - 1))
    liar.used(chain.head, MRG_HDR_LEN + ETH_HLEN - 1)
    liar.flush()
    p.napi()
    st = p.drv.stats
    assert (st.rx_length_errors, st.skb_allocs, st.rx_truesize) == (1, 0, 0)
    rx = p.drv.rx
    assert rx.freed_pages[rx._freed_head].page is not None
