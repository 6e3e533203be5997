"""Receive without MRG_RXBUF: ``BigRx`` (GUEST_TSO: 64 KiB buffers) and ``SmallRx``.

The RFC: "The same approach can apply to non-mergable buffs too" — both keep the
seed's page lists and allocate the skb only when a packet arrives. virtnet_probe's
choice of path, one buffer per packet (num_buffers means nothing here), and the
same error paths as the mergeable receive.
"""

from __future__ import annotations

import struct

import pytest

from tests.net.conftest import (
    BIG,
    FEATURE_SETS,
    MRG,
    NO_INDIRECT,
    SMALL,
    LyingDevice,
    Pair,
    frame,
    hdr,
    make_pair,
)
from virtnet.net.constants import (
    ETH_HLEN,
    GOOD_COPY_LEN,
    MAX_PACKET_LEN,
    MAX_SKB_FRAGS,
    PAGE_SIZE,
)
from virtnet.net.guest import rx_strategy_for
from virtnet.net.header import MRG_HDR_LEN, VirtioNetHdr
from virtnet.virtio.ring.layout import VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE

LARGEST = 65536 + ETH_HLEN
BIG_BUF = MAX_SKB_FRAGS * PAGE_SIZE
SMALL_BUF = MRG_HDR_LEN + MAX_PACKET_LEN
DESC = struct.Struct("<QIHH")


def posted_desc(p: Pair, i: int) -> tuple[int, int, int, int]:
    """Descriptor ``i`` of the rx table, read raw (addr, len, flags, next)."""
    return DESC.unpack(p.memory.read(p.layout.rings[0].desc + 16 * i, 16))


def freed_pages(p: Pair):
    rx = p.drv.rx
    return rx.freed_pages[rx._freed_head :]


# -- virtnet_probe's choice -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("features", "wanted", "chosen"),
    [
        (MRG, "deferred", "deferred"),
        (MRG, "prealloc", "prealloc"),
        (MRG, "ewma", "ewma"),
        (MRG, "big", "deferred"),
        (BIG, "deferred", "big"),
        (BIG, "ewma", "big"),
        (BIG, "prealloc", "big"),
        (SMALL, "deferred", "small"),
        (SMALL, "prealloc", "small"),
        (SMALL, "ewma", "small"),
    ],
)
def test_the_strategy_follows_the_negotiated_features(features, wanted, chosen):
    # virtnet_probe: mergeable_rx_bufs if MRG_RXBUF, else big_packets if GUEST_TSO*, else small
    assert rx_strategy_for(features, wanted) == chosen


# -- small buffers ----------------------------------------------------------------------------


def test_small_buffers_are_one_descriptor_of_header_plus_max_packet_len(pair_factory):
    p = pair_factory("small", SMALL)
    assert p.strategy == "small"
    addr, length, flags, _ = posted_desc(p, 0)
    assert (length, flags) == (SMALL_BUF, VRING_DESC_F_WRITE)
    assert p.drv.num == p.layout.queue_size


def test_small_receives_up_to_max_packet_len_and_the_device_drops_beyond(pair_factory):
    p = pair_factory("small", SMALL)
    assert p.send(frame(MAX_PACKET_LEN))
    assert not p.send(frame(MAX_PACKET_LEN + 1))  # no buffer of the ring can hold it
    assert p.dev.stats.rx_dropped == 1
    assert p.send(frame(60))
    p.napi()
    assert p.frames == [frame(MAX_PACKET_LEN), frame(60)]
    assert p.drv.stats.rx_length_errors == 0


def test_small_allocates_one_skb_per_packet_and_reuses_pages_of_small_packets(pair_factory):
    p = pair_factory("small", SMALL)
    for k in range(100):
        p.send(frame(GOOD_COPY_LEN, k))
        p.napi()
    p.drv.try_fill_recv()
    st = p.drv.stats
    assert st.skb_allocs == st.rx_packets == 100
    assert st.page_reuses == 100
    allocs = st.page_allocs
    for k in range(10):
        p.send(frame(1514, k))
        p.napi()
    p.drv.try_fill_recv()
    assert st.page_allocs - allocs == 10  # each page left with its skb
    assert p.frames[-1] == frame(1514, 9)


def test_small_ignores_num_buffers(pair_factory):
    # Without MRG_RXBUF a buffer is a packet, whatever the header's last field says.
    p = pair_factory("small", SMALL)
    LyingDevice(p).packet(frame(500), num_buffers=7)
    p.napi()
    assert p.frames == [frame(500)]
    assert p.drv.stats.rx_length_errors == 0


@pytest.mark.parametrize("strategy", ["small", "big"])
def test_non_mergeable_short_packet(pair_factory, strategy):
    p = pair_factory(strategy, FEATURE_SETS[strategy])
    liar = LyingDevice(p)
    liar.buffer(hdr(1) + frame(ETH_HLEN - 1))
    liar.flush()
    p.napi()
    st = p.drv.stats
    assert (st.rx_length_errors, st.skb_allocs, st.rx_packets) == (1, 0, 0)
    p.send(frame(100))
    p.napi()
    assert p.frames == [frame(100)]


@pytest.mark.parametrize("strategy", ["small", "big"])
def test_non_mergeable_skb_allocation_failure_drops_and_recycles(pair_factory, strategy):
    p = pair_factory(strategy, FEATURE_SETS[strategy])
    p.drv.skbs.fail = lambda n: n == 1
    p.send(frame(1000, 1))
    p.send(frame(1000, 2))
    p.napi()
    st = p.drv.stats
    assert (st.rx_dropped, st.rx_packets, st.rx_bufs) == (1, 1, 2)
    assert p.frames == [frame(1000, 2)]
    per_buf = MAX_SKB_FRAGS if strategy == "big" else 1
    # every page of the dropped buffer is back on freed_pages, still attached
    assert sum(pl.page is not None for pl in freed_pages(p)) >= per_buf


@pytest.mark.parametrize(("strategy", "buf"), [("small", SMALL_BUF), ("big", BIG_BUF)])
def test_non_mergeable_used_length_beyond_the_buffer(pair_factory, strategy, buf):
    p = pair_factory(strategy, FEATURE_SETS[strategy])
    num = p.drv.num
    liar = LyingDevice(p)
    liar.buffer(hdr(1) + frame(100), buf + 1)
    liar.flush()
    p.napi()
    assert p.drv.stats.rx_length_errors == 1
    assert p.drv.stats.rx_packets == 0
    assert p.drv.num == num - 1  # given back to the page lists, not lost
    assert len(p.drv.rx.used_pages) == (num - 1) * (MAX_SKB_FRAGS if strategy == "big" else 1)
    p.send(frame(100))
    p.napi()
    assert p.frames == [frame(100)]


# -- big buffers ------------------------------------------------------------------------------


def test_big_buffers_are_max_skb_frags_pages_in_one_indirect_descriptor(pair_factory):
    # add_recvbuf_big: one chain of pages big enough for a 64 KiB GSO frame
    p = pair_factory("big", BIG)
    assert p.drv.rx.descs_per_buf() == 1
    _, length, flags, _ = posted_desc(p, 0)
    assert (length, flags) == (16 * MAX_SKB_FRAGS, VRING_DESC_F_INDIRECT)
    assert p.drv.num == p.layout.queue_size
    chain = p.dev.rxq.pop()
    assert chain.in_len == BIG_BUF and len(chain.writable) == MAX_SKB_FRAGS
    p.dev.rxq.unpop(1)


def test_big_buffers_without_indirect_take_max_skb_frags_descriptors(pair_factory):
    p = pair_factory("big", BIG & NO_INDIRECT)
    assert p.drv.rx.descs_per_buf() == MAX_SKB_FRAGS
    assert p.drv.num == p.layout.queue_size // MAX_SKB_FRAGS
    assert p.drv.rvq.num_free == p.layout.queue_size % MAX_SKB_FRAGS
    p.send(frame(LARGEST))
    p.napi()
    assert p.frames == [frame(LARGEST)]


@pytest.mark.parametrize("features", [BIG, BIG & NO_INDIRECT], ids=["indirect", "direct"])
@pytest.mark.parametrize(
    "size", [ETH_HLEN, GOOD_COPY_LEN, 1514, PAGE_SIZE - MRG_HDR_LEN, PAGE_SIZE, 9000, LARGEST]
)
def test_big_delivers_each_frame_as_one_skb(pair_factory, features, size):
    p = pair_factory("big", features, hold=True)
    for k in range(2):
        p.send(frame(size, k))
    p.napi()
    assert p.frames == [frame(size, 0), frame(size, 1)]
    st = p.drv.stats
    assert st.skb_allocs == st.rx_packets == st.rx_bufs == 2
    skb = p.held[0]
    assert skb.head_len == min(size, GOOD_COPY_LEN)
    offsets = [o for _, o, _ in skb.frags]
    if size > GOOD_COPY_LEN:
        assert offsets[0] == MRG_HDR_LEN + GOOD_COPY_LEN and set(offsets[1:]) <= {0}
    assert VirtioNetHdr.unpack(skb.vnet_hdr).num_buffers == 1


def test_big_pages_the_frame_did_not_reach_stay_on_the_page_lists(pair_factory):
    p = pair_factory("big", BIG)
    p.send(frame(1514))
    p.napi()
    tail = freed_pages(p)
    assert len(tail) == MAX_SKB_FRAGS
    assert sum(pl.page is None for pl in tail) == 1  # only the first page went up
    allocs = p.drv.stats.page_allocs
    p.drv.try_fill_recv()
    assert p.drv.stats.page_allocs == allocs + 1
    assert p.drv.stats.page_reuses == MAX_SKB_FRAGS - 1


def test_big_refill_that_runs_out_midway_keeps_the_pages_it_got(pair_factory):
    probe = make_pair("big", BIG, fill=False)
    tx = probe.drv.pool.outstanding
    probe.teardown()
    p = pair_factory("big", BIG, page_limit=tx + 2 * MAX_SKB_FRAGS + 5)
    assert p.drv.num == 2
    assert p.drv.pool.available == 0
    # five pages wait on freed_pages for the next buffer; none is lost
    assert sum(pl.page is not None for pl in freed_pages(p)) == 5
    p.send(frame(LARGEST))
    p.napi()
    assert p.frames == [frame(LARGEST)]
