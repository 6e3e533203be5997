"""The seed's receive path: ``DeferredRx`` and ``virtnet_poll``.

Each scenario names the line of the RFC ("defer skb allocation in virtio_net --
mergable buff part") or the virtio_net.c behaviour it pins. An honest device
(``Pair.send``) and a lying one (``LyingDevice``) share the driver's rx ring.
"""

from __future__ import annotations

import pytest

from tests.net.conftest import (
    MERGEABLE_STRATEGIES,
    MRG,
    NO_EVENT_IDX,
    STRATEGY_FEATURES,
    LyingDevice,
    Pair,
    frame,
    frame_buf_limit,
    hdr,
    make_pair,
    pages_for_frame,
)
from virtnet.net.constants import ETH_HLEN, GOOD_COPY_LEN, MAX_SKB_FRAGS, PAGE_SIZE
from virtnet.net.header import (
    MRG_HDR_LEN,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VirtioNetHdr,
)

LARGEST = 65536 + ETH_HLEN


def freed_pages(pair: Pair):
    """The seed's freed_pages list: the entries not yet taken by get_a_free_page."""
    rx = pair.drv.rx
    return rx.freed_pages[rx._freed_head :]


def counters(pair: Pair, *names: str) -> tuple[int, ...]:
    return tuple(getattr(pair.drv.stats, n) for n in names)


def assert_no_skb_in_limbo(pair: Pair) -> None:
    """Every live skb is accounted for: prealloc's one per posted buffer, else none."""
    posted = pair.drv.num if pair.strategy == "prealloc" else 0
    assert pair.drv.skbs.live == posted


# -- one packet becomes one skb --------------------------------------------------------------


def test_a_frame_up_to_good_copy_len_is_copied_whole_and_its_page_stays_on_the_list(
    pair_factory,
):
    # seed: "if (len) { ... plist->page = NULL; }" — with nothing left after the
    # GOOD_COPY_LEN copy, the page stays on its page_list entry for the next refill.
    p = pair_factory("deferred", MRG, hold=True)
    data = frame(GOOD_COPY_LEN)
    p.send(data)
    p.napi()
    (skb,) = p.held
    assert (skb.head_len, skb.nr_frags, skb.to_bytes()) == (GOOD_COPY_LEN, 0, data)
    tail = freed_pages(p)
    assert len(tail) == 1 and tail[0].page is not None
    allocs = p.drv.stats.page_allocs
    p.drv.try_fill_recv()
    assert p.drv.stats.page_allocs == allocs
    assert p.drv.stats.page_reuses == 1


def test_a_frame_past_good_copy_len_leaves_in_the_skb_with_its_page(pair_factory):
    # seed: frags[0].page = plist->page, page_offset = sizeof(*mhdr) + copy
    p = pair_factory("deferred", MRG, hold=True)
    data = frame(1514)
    p.send(data)
    p.napi()
    (skb,) = p.held
    assert skb.head_len == GOOD_COPY_LEN
    assert [(off, size) for _, off, size in skb.frags] == [
        (MRG_HDR_LEN + GOOD_COPY_LEN, 1514 - GOOD_COPY_LEN)
    ]
    assert skb.to_bytes() == data
    assert freed_pages(p)[0].page is None  # the entry is kept, its page went up the stack
    allocs = p.drv.stats.page_allocs
    p.drv.try_fill_recv()
    assert p.drv.stats.page_allocs == allocs + 1


def test_the_largest_frame_spans_seventeen_buffers_as_page_frags(pair_factory):
    # seed: "while (--mhdr->num_buffers)" — each further buffer is one whole-page frag
    p = pair_factory("deferred", MRG, hold=True)
    data = frame(LARGEST)
    p.send(data)
    p.napi()
    (skb,) = p.held
    nbuf = pages_for_frame(LARGEST)
    assert nbuf == 17
    assert skb.nr_frags == nbuf
    first_frag = PAGE_SIZE - MRG_HDR_LEN - GOOD_COPY_LEN
    last = LARGEST - GOOD_COPY_LEN - first_frag - (nbuf - 2) * PAGE_SIZE
    assert [(o, s) for _, o, s in skb.frags] == (
        [(MRG_HDR_LEN + GOOD_COPY_LEN, first_frag)] + [(0, PAGE_SIZE)] * (nbuf - 2) + [(0, last)]
    )
    assert skb.to_bytes() == data
    assert p.drv.stats.rx_bufs == nbuf
    assert VirtioNetHdr.unpack(skb.vnet_hdr).num_buffers == nbuf


def test_the_vnet_header_reaches_the_stack_as_the_device_wrote_it(deferred):
    # seed: "memcpy(mhdr, p, sizeof(*mhdr))" — csum/GSO fields are the stack's to act on
    sent = hdr(
        flags=VIRTIO_NET_HDR_F_DATA_VALID, gso_type=VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len=66, gso_size=1448, csum_start=34, csum_offset=16,
    )  # fmt: skip
    deferred.send(frame(9000), sent)
    deferred.napi()
    (got_hdr, got_data) = deferred.delivered[0]
    got = VirtioNetHdr.unpack(got_hdr)
    assert got_data == frame(9000)
    assert (
        got.flags,
        got.gso_type,
        got.hdr_len,
        got.gso_size,
        got.csum_start,
        got.csum_offset,
    ) == (VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1448, 34, 16)
    assert got.num_buffers == pages_for_frame(9000)


# -- the seed's claims, as exact counts -------------------------------------------------------


@pytest.mark.parametrize("size", [ETH_HLEN, 60, GOOD_COPY_LEN + 1, 1514, 9000, LARGEST])
def test_deferred_allocates_exactly_one_skb_per_received_packet(deferred, size):
    # RFC: "it's not necessary to pre-allocate skb for each mergable buffer"
    n = 40 if size < PAGE_SIZE else 3
    for k in range(n):
        assert deferred.send(frame(size, k))
        deferred.napi()
    st = deferred.drv.stats
    assert st.skb_allocs == st.skb_frees == st.rx_packets == n
    assert st.rx_bufs == n * pages_for_frame(size)
    assert deferred.frames == [frame(size, k) for k in range(n)]


@pytest.mark.parametrize(
    ("size", "allocs_per_packet"), [(60, 0), (GOOD_COPY_LEN, 0), (GOOD_COPY_LEN + 1, 1), (1514, 1)]
)
def test_steady_state_page_allocs_per_packet(deferred, size, allocs_per_packet):
    # RFC: small packets improved — a packet that fits GOOD_COPY_LEN leaves its page on
    # freed_pages and get_a_free_page hands it out again: page_allocs per packet → 0.
    p = deferred
    for k in range(200):  # warm up: several trips round the 64-entry ring
        p.send(frame(size, k))
        p.napi()
    p.drv.try_fill_recv()  # top the ring up, so both counts are taken on a full ring
    allocs, reuses, out = counters(p, "page_allocs", "page_reuses", "pages_outstanding")
    n = 300
    for k in range(n):
        p.send(frame(size, k))
        p.napi()
    p.drv.try_fill_recv()
    st = p.drv.stats
    assert st.page_allocs - allocs == allocs_per_packet * n
    if allocs_per_packet == 0:
        assert st.page_reuses - reuses == n
        assert st.pages_outstanding == out
    assert len(p.drv.rx.used_pages) == p.drv.num


# -- a device that lies -----------------------------------------------------------------------


def honest_frame_after_lie_is_intact(p: Pair) -> None:
    """The ring is not wedged: the next honest packet arrives byte for byte."""
    before = len(p.delivered)
    data = frame(3000, 99)
    assert p.send(data)
    p.napi()
    assert p.frames[before:] == [data]


def test_short_packet_is_a_length_error_and_the_buffer_is_recycled(mergeable):
    # virtio_net.c receive_buf: "if (len < hdr_len + ETH_HLEN) { pr_debug("short packet") }"
    p = mergeable
    num = p.drv.num
    liar = LyingDevice(p)
    liar.buffer(hdr(1) + frame(ETH_HLEN - 1), MRG_HDR_LEN + ETH_HLEN - 1)
    liar.flush()
    assert p.napi() == 1
    st = p.drv.stats
    assert (st.rx_length_errors, st.rx_packets, st.rx_bufs) == (1, 0, 1)
    assert p.drv.num == num - 1
    if p.strategy == "deferred":
        assert st.skb_allocs == 0  # the skb is never allocated for a short packet
        assert freed_pages(p)[0].page is not None  # the page waits on freed_pages
    honest_frame_after_lie_is_intact(p)


def test_a_frame_of_exactly_header_plus_eth_hlen_is_not_short(mergeable):
    mergeable.send(frame(ETH_HLEN))
    mergeable.napi()
    assert mergeable.frames == [frame(ETH_HLEN)]
    assert mergeable.drv.stats.rx_length_errors == 0


@pytest.mark.parametrize(("promised", "returned"), [(2, 1), (3, 1), (5, 3)])
def test_num_buffers_beyond_what_the_device_returned_drops_the_partial_packet(
    mergeable, promised, returned
):
    # virtio_net.c: "rx error: %d buffers missing" → rx_length_errors, the packet dropped
    p = mergeable
    liar = LyingDevice(p)
    liar.packet(frame(liar.room(returned) - MRG_HDR_LEN), num_buffers=promised,
                nchains=returned)  # fmt: skip
    p.napi()
    st = p.drv.stats
    assert (st.rx_length_errors, st.rx_dropped, st.rx_packets) == (1, 1, 0)
    assert st.rx_bufs == returned
    assert_no_skb_in_limbo(p)
    honest_frame_after_lie_is_intact(p)


def test_num_buffers_beyond_every_buffer_posted_is_named_at_once(mergeable):
    # More buffers than the driver ever posted: no need to wait for them (Linux would
    # swallow every packet behind it looking for them). The first buffer is dropped;
    # the one after it is read as a packet of its own and refused on its own merits.
    p = mergeable
    liar = LyingDevice(p)
    liar.packet(frame(liar.room(2) - MRG_HDR_LEN), num_buffers=0xFFFF, nchains=2)
    p.napi()
    st = p.drv.stats
    assert st.fault_num_buffers_big >= 1 and st.rx_packets == 0
    assert st.rx_length_errors == st.rx_dropped >= 1
    assert_no_skb_in_limbo(p)
    honest_frame_after_lie_is_intact(p)


def test_num_buffers_zero_is_a_length_error(mergeable):
    # 5.1.6.4: num_buffers is at least 1; the seed's "while (--num_buffers)" would wrap.
    p = mergeable
    LyingDevice(p).packet(frame(1000), num_buffers=0)
    p.napi()
    st = p.drv.stats
    assert (st.rx_length_errors, st.rx_dropped, st.rx_packets) == (1, 1, 0)
    assert_no_skb_in_limbo(p)
    honest_frame_after_lie_is_intact(p)


def test_max_skb_frags_buffers_is_still_one_packet(mergeable):
    # MAX_SKB_FRAGS full pages: the first buffer's frag plus MAX_SKB_FRAGS - 1 more
    # (ewma: as many full buffers as the largest legal frame can need).
    p = mergeable
    n = frame_buf_limit(p)
    liar = LyingDevice(p)
    data = frame(liar.room(n) - MRG_HDR_LEN)
    liar.packet(data, nchains=n)
    p.napi()
    assert p.frames == [data]
    assert p.drv.stats.rx_length_errors == 0


def test_more_than_max_skb_frags_buffers_is_dropped_whole(mergeable):
    # seed: "if (i >= MAX_SKB_FRAGS) { pr_debug("packet too long") ... goto drop; }"
    p = mergeable
    n = frame_buf_limit(p) + 1
    liar = LyingDevice(p)
    liar.packet(frame(liar.room(n) - MRG_HDR_LEN), nchains=n)
    p.napi()
    st = p.drv.stats
    assert (st.rx_length_errors, st.rx_dropped, st.rx_packets) == (1, 1, 0)
    assert st.rx_bufs == n  # the packet's remaining buffers are consumed, not parsed as packets
    assert_no_skb_in_limbo(p)
    honest_frame_after_lie_is_intact(p)


@pytest.mark.parametrize("strategy", ["deferred", "prealloc"])  # ewma bounds buffers
def test_the_frag_limit_counts_frags_not_buffers(pair_factory, strategy):
    # The seed checks nr_frags: a first buffer that fits GOOD_COPY_LEN adds no frag,
    # so MAX_SKB_FRAGS + 1 buffers still make a packet.
    p = pair_factory(strategy, MRG)
    n = MAX_SKB_FRAGS + 1
    small = frame(100)
    rest = frame((n - 1) * PAGE_SIZE, 1)
    chains = [LyingDevice(p).pop() for _ in range(n)]
    LyingDevice.write(chains[0], hdr(n) + small)
    LyingDevice(p).used(chains[0].head, MRG_HDR_LEN + len(small))
    for k, chain in enumerate(chains[1:]):
        LyingDevice.write(chain, rest[k * PAGE_SIZE : (k + 1) * PAGE_SIZE])
        LyingDevice(p).used(chain.head, PAGE_SIZE)
    LyingDevice(p).flush()
    p.napi()
    assert p.frames == [small + rest]


def test_skb_allocation_failure_drops_and_recycles_every_buffer_of_the_packet(deferred):
    # seed: "if (unlikely(!skb)) { rx_dropped++; list_move_tail(&plist->list, &freed_pages) }"
    # — and the packet's other buffers are recycled too, not parsed as packets.
    p = deferred
    p.drv.skbs.fail = lambda n: n == 1
    nbuf = pages_for_frame(9000)
    p.send(frame(9000))
    p.napi()
    st = p.drv.stats
    assert (st.rx_dropped, st.rx_length_errors, st.rx_packets, st.skb_allocs) == (1, 0, 0, 0)
    assert st.rx_bufs == nbuf
    tail = freed_pages(p)
    assert len(tail) == nbuf and all(pl.page is not None for pl in tail)
    allocs = st.page_allocs
    p.drv.try_fill_recv()  # the recycled pages go straight back on the ring
    assert (st.page_allocs, st.page_reuses) == (allocs, nbuf)
    honest_frame_after_lie_is_intact(p)


@pytest.mark.parametrize("nth", [1, 2, 3, 5])
def test_an_skb_allocator_that_fails_on_the_nth_call(deferred, nth):
    p = deferred
    p.drv.skbs.fail = lambda n: n == nth
    sizes = [60, 1514, 9000, 200, 65550]
    for k, size in enumerate(sizes):
        p.send(frame(size, k))
    p.napi()
    assert p.frames == [frame(s, k) for k, s in enumerate(sizes) if k != nth - 1]
    st = p.drv.stats
    assert (st.rx_dropped, st.rx_packets, st.rx_length_errors) == (1, len(sizes) - 1, 0)
    assert st.rx_bufs == sum(pages_for_frame(s) for s in sizes)


@pytest.mark.parametrize("used_len", [PAGE_SIZE + 1, 1 << 31])
def test_a_used_length_beyond_the_buffer_is_counted_and_the_buffer_recycled(mergeable, used_len):
    # get_buf refuses it (UsedRingError carrying the token); poll counts and recycles it.
    p = mergeable
    num = p.drv.num
    LyingDevice(p).packet(frame(1000), lengths=[used_len])
    assert p.napi() == 0
    st = p.drv.stats
    assert (st.rx_length_errors, st.rx_packets, st.rx_dropped) == (1, 0, 0)
    assert p.drv.num == num - 1
    honest_frame_after_lie_is_intact(p)


def queue_stays_broken(p: Pair) -> None:
    """BAD_RING: nothing more is taken from the ring, whatever the device adds."""
    before = len(p.delivered)
    p.send(frame(3000, 99))
    assert p.napi() == 0 and p.frames[before:] == []
    assert p.drv.rvq.broken and p.drv.broken


@pytest.mark.parametrize(("head", "kind"), [(None, "bad_id"), ("done", "dup_id")])
def test_a_used_id_that_is_not_in_flight_breaks_the_queue(mergeable, head, kind):
    # virtio_ring.c detach_buf_split: BAD_RING(vq, "id %u out of range") / "is not a
    # head!" -> vq->broken: the device can no longer be trusted with this ring.
    p = mergeable
    liar = LyingDevice(p)
    if head == "done":  # a buffer used once, then its id again
        chain = liar.buffer(hdr(1) + frame(100))
        liar.flush()
        p.napi()
        liar.used(chain.head, 100)
    else:
        liar.used(p.layout.queue_size + 3, 100)  # no such descriptor
    liar.used(0x7FFF_FFFF, 0)
    liar.flush()
    p.napi()
    st = p.drv.stats
    assert st.rx_length_errors == 1 and getattr(st, f"fault_{kind}") == 1
    assert f"device fault {kind}" in p.drv.broken
    queue_stays_broken(p)
    p.teardown()
    assert p.drv.pool.outstanding == 0


def test_a_refused_buffer_used_with_length_zero_is_a_short_packet(mergeable):
    # A device that cannot write a chain gives it back with len 0 (vhost: vhost_add_used(0)).
    p = mergeable
    liar = LyingDevice(p)
    liar.used(liar.pop().head, 0)
    liar.flush()
    p.napi()
    assert p.drv.stats.rx_length_errors == 1
    honest_frame_after_lie_is_intact(p)


@pytest.mark.parametrize("strategy", MERGEABLE_STRATEGIES)
@pytest.mark.parametrize("lie", ["length", "id"])
def test_a_bad_used_entry_among_a_packets_further_buffers_drops_the_packet(strategy, lie):
    # Same contract as for the first buffer: counted, the buffer recycled, poll goes on,
    # and the partial packet is dropped (virtio_net.c receive_mergeable: err_buf).
    p = make_pair(strategy, MRG)
    liar = LyingDevice(p)
    if lie == "length":
        a, b = liar.sizes(2)
        liar.packet(frame(a + 500 - MRG_HDR_LEN), lengths=[a, b + 1])
    else:
        first = liar.pop()
        liar.write(first, hdr(2) + frame(first.in_len - MRG_HDR_LEN))
        liar.used(first.head, first.in_len)
        liar.used(p.layout.queue_size + 1, 100)
        liar.flush()
    p.napi()
    st = p.drv.stats
    assert st.rx_length_errors >= 1 and st.rx_dropped == 1 and st.rx_packets == 0
    if lie == "length":
        honest_frame_after_lie_is_intact(p)
    else:
        queue_stays_broken(p)
    p.teardown()
    assert p.drv.pool.outstanding == 0


@pytest.mark.parametrize("strategy", MERGEABLE_STRATEGIES)
def test_a_first_buffer_with_a_bad_length_takes_its_whole_packet_with_it(strategy):
    # virtio_net.c receive_mergeable: "rx error: len %u exceeds truesize" → err_skb, and
    # mergeable_buf_free drains the num_buf - 1 buffers that belong to the packet.
    p = make_pair(strategy, MRG)
    liar = LyingDevice(p)
    sizes = liar.sizes(3)
    body = bytearray(frame(sum(sizes) - MRG_HDR_LEN))
    for k in (1, 2):  # what a follower's first bytes would mean if read as a header
        at = sum(sizes[:k]) - MRG_HDR_LEN + 10
        body[at : at + 2] = b"\x01\x00"
    liar.packet(bytes(body), lengths=[sizes[0] + 1, *sizes[1:]])
    p.napi()
    assert p.frames == []  # no slice of the middle of a frame goes up as a packet
    assert p.drv.stats.rx_length_errors == 1
    honest_frame_after_lie_is_intact(p)
    p.teardown()
    assert p.drv.pool.outstanding == 0


# -- try_fill_recv and page exhaustion --------------------------------------------------------


def test_refill_stops_when_the_pool_is_exhausted_and_resumes_when_pages_come_back(
    pair_factory,
):
    # try_fill_recv: "if (!plist || !plist->page) break;" — out of memory is normal.
    probe = make_pair("deferred", MRG, fill=False)
    base = probe.drv.pool.outstanding  # the tx header slots
    probe.teardown()
    p = pair_factory("deferred", MRG, page_limit=base + 8, hold=True)
    drv = p.drv
    assert drv.num == 8 and drv.rvq.num_free == p.layout.queue_size - 8
    assert drv.pool.available == 0
    for k in range(8):
        assert p.send(frame(1514, k))  # every page leaves in an skb the stack keeps
    assert not p.send(frame(1514, 8))  # a NIC with an empty ring drops
    assert p.dev.stats.rx_dropped == 1
    assert p.napi() == 8
    assert drv.num == 0  # the refill found no page
    assert drv.rvq.num_free == p.layout.queue_size
    p.release_held()  # the stack is done: put_page
    assert drv.pool.available == 8
    p.napi()  # the next poll refills
    assert drv.num == 8
    assert p.send(frame(1514, 9))
    p.napi()
    assert p.frames == [frame(1514, k) for k in (*range(8), 9)]


def test_a_page_allocator_that_fails_mid_refill_posts_what_it_got(pair_factory):
    p = pair_factory("deferred", MRG, fill=False)
    calls = []
    p.drv.pool.fail = lambda n: calls.append(n) or len(calls) > 5
    kick = p.drv.try_fill_recv()
    assert kick and p.drv.num == 5 and p.drv.stats.rx_kicks == 1
    p.drv.pool.fail = None
    p.drv.try_fill_recv()
    assert p.drv.num == p.layout.queue_size


def test_a_refill_that_adds_nothing_does_not_kick(pair_factory):
    p = pair_factory("deferred", MRG)
    assert p.drv.try_fill_recv() is False  # ring full
    assert p.drv.stats.rx_kicks == 1


# -- virtnet_poll (NAPI) ----------------------------------------------------------------------


def test_poll_respects_its_budget_and_keeps_callbacks_off_until_under_budget(deferred):
    p = deferred
    for k in range(10):
        p.send(frame(100, k))
    drv = p.drv
    assert drv.poll(4)[0] == 4
    assert drv.rvq.cb_disabled  # budget used up: napi_complete not called, poll again
    assert drv.poll(4)[0] == 4
    assert drv.rvq.cb_disabled
    assert drv.poll(4)[0] == 2
    assert not drv.rvq.cb_disabled  # drained: callbacks re-armed
    assert p.frames == [frame(100, k) for k in range(10)]


def test_poll_refills_only_below_half_the_ring(pair_factory):
    # virtnet_poll: "if (vi->num < vi->max / 2) try_fill_recv(vi)"
    p = pair_factory("deferred", MRG, queue_size=16)
    drv = p.drv
    for k in range(8):
        p.send(frame(60, k))
    p.napi()
    assert drv.num == 8 and drv.rvq.num_free == 8  # exactly half: no refill yet
    p.send(frame(60, 8))
    p.napi()
    assert drv.num == 16 and drv.rvq.num_free == 0


@pytest.mark.parametrize("strategy", list(STRATEGY_FEATURES))
@pytest.mark.parametrize("event_idx", [True, False])
def test_a_packet_arriving_while_callbacks_are_re_armed_is_taken_in_the_same_poll(
    pair_factory, strategy, event_idx
):
    # virtnet_poll's "again:" — after enable_cb the ring is checked once more, so a
    # packet the device published in that window is not left waiting for an interrupt
    # that was suppressed.
    features = STRATEGY_FEATURES[strategy] & (~0 if event_idx else NO_EVENT_IDX)
    p = pair_factory(strategy, features)
    drv = p.drv
    rvq = drv.rvq
    # The window is the refill between the last empty get_bufs and enable_cb: a
    # poll that finds the ring empty with more than half of it used (the last
    # poll's refill found no memory) refills there, and the device publishes from
    # the refill's first allocation (the pool's and skb allocator's fault hooks are
    # the seams: a compiled ring has no method to patch).
    early = [frame(300 + k, k) for k in range(drv.max // 2 + 1)]
    late = frame(200, 99)
    assert drv.max - len(early) >= 1  # a buffer left for the late frame
    fired = []

    def out_of_memory(n: int) -> bool:
        return len(p.frames) == len(early)  # every frame sent delivered: refill fails

    def in_refill(n: int) -> bool:
        if not fired:
            fired.append(True)
            assert p.send(late)  # the device races the driver's re-arm
        return False  # the allocation itself succeeds

    drv.pool.fail = drv.skbs.fail = out_of_memory
    for data in early:
        assert p.send(data)
    p.napi()
    while drv.num >= drv.max // 2:  # ewma: a frag page's last buffers still went in
        assert len(early) < drv.max
        early.append(frame(100 + len(early), len(early)))
        assert p.send(early[-1])
        p.napi()
    assert not rvq.cb_disabled  # the refill is owed, and the ring is empty
    drv.pool.fail = drv.skbs.fail = in_refill
    received, _ = drv.poll(64)
    assert fired and received == 1
    assert p.frames == [*early, late]
    assert not rvq.cb_disabled


def test_poll_with_nothing_used_returns_zero_and_re_arms(deferred):
    assert deferred.drv.poll(64) == (0, False)
    assert not deferred.drv.rvq.cb_disabled
