"""The device side: filling rx buffers (vhost-net handle_rx) and consuming tx chains.

Mergeable fill (VIRTIO 1.2, 5.1.6.4): a packet takes as many chains as it needs and
the first one's header says how many (``num_buffers``); each used entry's length is
what that chain got. A NIC with an empty ring drops; chains taken but not used are
given back on reset (vhost_discard_vq_desc), and the header may straddle
descriptors either way ("any layout", 5.1.6.6 / 2.6.4).
"""

from __future__ import annotations

import faulthandler
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.net.conftest import (
    BIG,
    MRG,
    RX,
    SMALL,
    TX,
    Pair,
    frame,
    hdr,
    make_pair,
    pages_for_frame,
)
from tests.virtio.mock import MockSplitQueue
from virtnet.net.constants import ETH_HLEN, MAX_PACKET_LEN, MAX_SKB_FRAGS, PAGE_SIZE
from virtnet.net.device import VirtnetDevice, scatter, scatter_direct
from virtnet.net.guest import build_device
from virtnet.net.header import MRG_HDR_LEN, NUM_BUFFERS_OFFSET, VirtioNetHdr
from virtnet.virtio.errors import VirtioError
from virtnet.virtio.ring.chain import Chain
from virtnet.virtio.ring.layout import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VringViews

LARGEST = 65536 + ETH_HLEN
DESC = struct.Struct("<QIHH")
LE16 = struct.Struct("<H")
NEXT, WRITE = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE


def desc(p: Pair, i: int, q: int = RX) -> tuple[int, int, int, int]:
    return DESC.unpack(p.memory.read(p.layout.rings[q].desc + 16 * i, 16))


def header_of(p: Pair, head: int) -> VirtioNetHdr:
    """The virtio-net header the device wrote into the (single-page) buffer ``head``."""
    return VirtioNetHdr.unpack(p.memory.read(desc(p, head)[0], MRG_HDR_LEN))


def still_available(p: Pair, last_avail_idx: int) -> list[int]:
    """Heads on the rx avail ring from ``last_avail_idx`` up to its idx, read raw."""
    avail = p.layout.rings[RX].avail
    idx = LE16.unpack(p.memory.read(avail + 2, 2))[0]
    num = p.layout.queue_size
    return [LE16.unpack(p.memory.read(avail + 4 + 2 * ((last_avail_idx + k) % num), 2))[0]
            for k in range((idx - last_avail_idx) & 0xFFFF)]  # fmt: skip


def fresh_device(p: Pair) -> VirtnetDevice:
    """A device restarted where the old one said it stopped (GET/SET_VRING_BASE)."""
    rings = tuple(VringViews.from_memory(p.memory, a) for a in p.layout.rings)
    return build_device(p.memory, rings, p.features, last_avail=p.dev.last_avail_idx)


# -- mergeable fill ---------------------------------------------------------------------------


def check_mergeable_fill(p: Pair, size: int) -> None:
    data = frame(size, size)
    start = p.dev.rxq.used_idx
    assert p.send(data)
    used = p.used_entries(RX, start)
    nbuf = pages_for_frame(size)
    total = MRG_HDR_LEN + size
    assert [n for _, n in used] == [PAGE_SIZE] * (nbuf - 1) + [total - (nbuf - 1) * PAGE_SIZE]
    assert header_of(p, used[0][0]).num_buffers == nbuf
    p.napi()
    if size < ETH_HLEN:
        assert p.frames == [] and p.drv.stats.rx_length_errors == 1
    else:
        assert p.frames == [data]


@pytest.mark.parametrize("size", [1, ETH_HLEN - 1, ETH_HLEN, PAGE_SIZE - MRG_HDR_LEN,
                                  PAGE_SIZE - MRG_HDR_LEN + 1, 2 * PAGE_SIZE - MRG_HDR_LEN,
                                  2 * PAGE_SIZE - MRG_HDR_LEN + 1, 9000, LARGEST])  # fmt: skip
def test_mergeable_fill_at_the_page_boundaries(pair_factory, size):
    check_mergeable_fill(pair_factory("deferred", MRG), size)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, LARGEST))
def test_mergeable_fill_for_any_frame_size(size):
    p = make_pair("deferred", MRG, queue_size=32, npages=64)
    check_mergeable_fill(p, size)
    p.teardown()
    assert p.drv.pool.outstanding == 0


def test_mergeable_fill_uses_chains_in_avail_order_and_counts(pair_factory):
    p = pair_factory("deferred", MRG)
    p.send(frame(60))
    p.send(frame(9000))
    p.send(frame(LARGEST))
    heads = [h for h, _ in p.used_entries()]
    assert heads == list(range(1 + 3 + 17))  # the driver posted heads 0, 1, 2, ... in order
    st_ = p.dev.stats
    assert (st_.rx_packets, st_.rx_bytes, st_.rx_bufs) == (3, 60 + 9000 + LARGEST, 21)
    assert st_.rx_num_buffers_max == 17


def test_the_header_fields_are_written_as_given_with_num_buffers_set(pair_factory):
    p = pair_factory("deferred", MRG)
    p.send(frame(5000), hdr(num_buffers=99, flags=2, gso_type=4, hdr_len=54, gso_size=1428,
                            csum_start=54, csum_offset=6))  # fmt: skip
    h = header_of(p, 0)
    assert (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset,
            h.num_buffers) == (2, 4, 54, 1428, 54, 6, 2)  # fmt: skip


# -- non-mergeable fill -----------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "features", "largest"),
                         [("small", SMALL, MAX_PACKET_LEN), ("big", BIG, LARGEST)])  # fmt: skip
def test_non_mergeable_fill_is_one_chain_per_packet(pair_factory, strategy, features, largest):
    p = pair_factory(strategy, features)
    for size in (ETH_HLEN, 1000, largest):
        start = p.dev.rxq.used_idx
        assert p.send(frame(size))
        ((head, n),) = p.used_entries(RX, start)
        assert n == MRG_HDR_LEN + size
    assert p.dev.stats.rx_num_buffers_max == 1
    p.napi()
    assert p.frames == [frame(s) for s in (ETH_HLEN, 1000, largest)]


def test_a_small_buffer_too_short_for_the_frame_drops_it_and_keeps_the_buffer(pair_factory):
    p = pair_factory("small", SMALL)
    # A buffer is posted, so there is "room": the frame is dropped, not waited for
    # (a generator that waited here would stall the ring for good).
    assert p.dev.has_room(MAX_PACKET_LEN + 1)
    assert not p.send(frame(MAX_PACKET_LEN + 1))
    assert p.dev.stats.rx_dropped == 1
    assert p.send(frame(MAX_PACKET_LEN))
    assert p.used_entries() == [(0, MRG_HDR_LEN + MAX_PACKET_LEN)]  # the same buffer, head 0


# -- no room ----------------------------------------------------------------------------------


def test_a_nic_with_an_empty_ring_drops(pair_factory):
    p = pair_factory("deferred", MRG, fill=False)
    assert not p.dev.has_room(60)
    assert not p.send(frame(60))
    assert p.dev.stats.rx_dropped == 1 and p.dev.stats.rx_packets == 0
    assert p.used_entries() == []
    assert not p.dev.flush_rx()


def test_a_packet_bigger_than_the_posted_room_is_dropped_and_the_room_kept(pair_factory):
    probe = make_pair("deferred", MRG, fill=False)
    tx = probe.drv.pool.outstanding
    probe.teardown()
    p = pair_factory("deferred", MRG, page_limit=tx + 2)
    assert p.drv.num == 2
    assert not p.send(frame(9000))  # needs 3 buffers
    assert p.dev.stats.rx_dropped == 1
    assert p.dev.last_avail_idx == (0, 0)  # taken, cached, not consumed
    assert p.send(frame(5000))  # the cached two fit this one
    p.napi()
    assert p.frames == [frame(5000)]


# -- reset: chains taken but not used go back -------------------------------------------------


def test_reset_gives_back_every_chain_taken_but_not_used(pair_factory):
    p = pair_factory("deferred", MRG)
    p.send(frame(60))
    assert p.dev.has_room(LARGEST)  # takes at least 17 chains into the cache, in bursts
    assert p.dev.rxq.last_avail_idx >= 1 + 17
    assert p.dev.rxq.last_avail_idx == 1 + len(p.dev._rx_cache)
    assert p.dev.last_avail_idx == (1, 0)
    p.dev.reset()
    assert p.dev.rxq.last_avail_idx == 1
    again = fresh_device(p)
    assert again.receive_packet([frame(LARGEST)])
    again.flush_rx()
    assert [h for h, _ in p.used_entries()] == list(range(18))
    p.napi()
    assert p.frames == [frame(60), frame(LARGEST)]


def test_reset_after_receive_from_left_chains_cached(pair_factory):
    p = pair_factory("deferred", MRG)
    n = p.dev.receive_from(lambda views: scatter([hdr(0) + frame(100)], views))
    assert n == MRG_HDR_LEN + 100
    assert p.dev.last_avail_idx == (1, 0)
    p.dev.reset()
    assert p.dev.rxq.last_avail_idx == 1


def test_reset_with_a_refused_chain_between_cached_ones_loses_nothing():
    # Invariant after reset: every posted chain is either in the used ring or still
    # available from last_avail_idx — never both, never neither.
    p = make_pair("deferred", MRG, queue_size=8)
    d = p.layout.rings[RX].desc + 16 * 1
    p.memory.write(d, struct.pack("<Q", 1 << 44))  # head 1 now points outside guest memory
    assert p.dev.has_room(100)  # the burst caches head 0 and stops before head 1
    assert len(p.dev._rx_cache) == 1
    assert p.dev.has_room(5000)  # head 1 refused (dead, len 0 later), heads 2.. cached
    assert p.dev.stats.desc_errors == 1
    p.dev.reset()
    p.dev.flush_rx()
    used = {h for h, _ in p.used_entries()}
    avail = set(still_available(p, p.dev.last_avail_idx[RX]))
    assert used.isdisjoint(avail)
    assert used | avail == set(range(8))


# -- a driver whose avail index runs more than a ring ahead ------------------------------------


@contextmanager
def must_return(seconds: float = 60.0) -> Iterator[None]:
    """A call that must not spin: past ``seconds`` the run ends with every thread's
    traceback (faulthandler) instead of hanging. A compiled ring has no ``pop`` to
    wrap and count, so the pops themselves are shown by ``desc_errors`` below."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("q", [RX, TX], ids=["rx", "tx"])
def test_an_avail_index_more_than_a_ring_ahead_stops_the_queue_instead_of_spinning(q):
    # 2.7.13.3: the device can't know which entries are real; vhost logs
    # "Guest moved avail index" and stops the queue — it must not spin.
    p = make_pair("deferred", MRG, queue_size=8)
    avail = p.layout.rings[q].avail
    p.memory.write(avail + 2, LE16.pack(8 + 8 + 1))

    def run() -> bool:
        try:
            if q == RX:
                return p.dev.receive_packet([frame(100)])
            return p.dev.process_tx(lambda views, n: True) > 0
        except VirtioError:
            return False  # a typed error to the caller is a fine way to stop

    with must_return():
        progressed = run()
    assert not progressed
    assert p.dev.stats.desc_errors >= 1
    # Stopped means stopped: asking again takes nothing off the ring, refuses nothing.
    errors = p.dev.stats.desc_errors
    with must_return():
        assert not run()
    assert p.dev.stats.desc_errors == errors


# -- receive_from (a TAP read straight into guest buffers) ------------------------------------


def test_receive_from_reads_into_the_posted_buffers_and_sets_num_buffers(pair_factory):
    p = pair_factory("deferred", MRG)
    data = frame(9000)
    seen = []

    def readv(views):
        seen.append(sum(len(v) for v in views))
        return scatter([hdr(0) + data], views)  # IFF_VNET_HDR: header first, num_buffers 0

    assert p.dev.receive_from(readv) == MRG_HDR_LEN + 9000
    assert seen[0] >= MRG_HDR_LEN + 65535 + ETH_HLEN  # room for the largest GSO frame
    p.dev.flush_rx()
    assert [n for _, n in p.used_entries()] == [PAGE_SIZE, PAGE_SIZE, 9012 - 2 * PAGE_SIZE]
    assert header_of(p, 0).num_buffers == 3
    p.napi()
    assert p.frames == [data]


def test_receive_from_with_nothing_to_read_uses_nothing(pair_factory):
    p = pair_factory("deferred", MRG)
    assert p.dev.receive_from(lambda views: 0) == 0
    assert p.dev.receive_from(lambda views: -1) == 0
    assert not p.dev.flush_rx() and p.used_entries() == []


def test_receive_from_on_a_ring_too_small_for_the_largest_frame_still_receives(pair_factory):
    # 16 pages < a 64 KiB frame: waiting for room that can never come would stall the
    # ring for good, so a small frame goes straight in and only an impossible one is
    # dropped, counted.
    p = pair_factory("deferred", MRG, queue_size=16)
    data = frame(1000)
    got = p.dev.receive_from(lambda views: _scatter_into(views, hdr(0) + data))
    assert got == MRG_HDR_LEN + len(data)
    p.dev.flush_rx()
    p.napi()
    assert p.frames == [data]
    # A 64 KiB frame can never fit 16 pages: read (the tap must move on) and dropped.
    assert p.dev.receive_from(lambda views: sum(len(v) for v in views)) > 16 * PAGE_SIZE
    assert p.dev.stats.rx_dropped == 1
    empty = pair_factory("small", SMALL, fill=False)
    called = []
    assert empty.dev.receive_from(lambda views: called.append(1) or 0) == -1
    assert called == []


def _scatter_into(views, data: bytes) -> int:
    off = 0
    for v in views:
        n = min(len(v), len(data) - off)
        v[:n] = data[off : off + n]
        off += n
    return off


@pytest.mark.parametrize(("strategy", "features", "room"),
                         [("small", SMALL, MRG_HDR_LEN + MAX_PACKET_LEN),
                          ("big", BIG, MAX_SKB_FRAGS * PAGE_SIZE)])  # fmt: skip
def test_receive_from_non_mergeable_offers_one_buffer(pair_factory, strategy, features, room):
    p = pair_factory(strategy, features)
    seen = []

    def readv(views):
        seen.append(sum(len(v) for v in views))
        return scatter([hdr(0) + frame(1000)], views)

    assert p.dev.receive_from(readv) == MRG_HDR_LEN + 1000
    assert seen == [room]
    p.dev.flush_rx()
    p.napi()
    assert p.frames == [frame(1000)]


# -- bad rx chains ----------------------------------------------------------------------------


def test_rx_chains_the_device_cannot_write_are_refused_and_skipped():
    rxq, txq = MockSplitQueue(16), MockSplitQueue(16)
    dev = VirtnetDevice(rxq.device(), txq.device())
    rxq.desc(0, rxq.data(0), PAGE_SIZE, 0)  # device-readable: nowhere to write
    rxq.desc(1, rxq.end + PAGE_SIZE, PAGE_SIZE, WRITE)  # outside guest memory
    rxq.desc(2, rxq.data(2), PAGE_SIZE, WRITE)
    for head in (0, 1, 2):
        rxq.make_available(head)
    assert dev.receive_packet([frame(100)])
    dev.flush_rx()
    assert rxq.used_entries(0) == [(0, 0), (1, 0), (2, MRG_HDR_LEN + 100)]
    assert dev.stats.desc_errors == 2
    assert rxq.read(rxq.data(2) + MRG_HDR_LEN, 100) == frame(100)


# -- "any layout": the header split across descriptors ----------------------------------------


def split_rx_chain(q: MockSplitQueue, lengths: list[int]) -> int:
    """One writable chain of descriptors 0..n-1 with these lengths, packed back to back."""
    addr = q.data(0)
    for i, n in enumerate(lengths):
        last = i == len(lengths) - 1
        q.desc(i, addr, n, WRITE if last else WRITE | NEXT, next=i + 1)
        addr += n
    q.make_available(0)
    return q.data(0)


LAYOUTS = [[5, 7, 2000], [10, 2002], [11, 2001], [1] * 12 + [2000], [MRG_HDR_LEN + 2000]]


@pytest.mark.parametrize("lengths", LAYOUTS, ids=str)
@pytest.mark.parametrize("path", ["receive_packet", "receive_from"])
@pytest.mark.parametrize("mergeable", [True, False], ids=["mrg", "nomrg"])
def test_rx_header_split_across_descriptors(lengths, path, mergeable):
    rxq, txq = MockSplitQueue(64), MockSplitQueue(16)
    dev = VirtnetDevice(rxq.device(), txq.device(), mergeable=mergeable)
    base = split_rx_chain(rxq, lengths)
    # receive_from posts room for a 64 KiB frame first: more one-page chains behind it
    for k in range(17):
        head = len(lengths) + k
        rxq.desc(head, rxq.data(k + 1), PAGE_SIZE, WRITE)
        rxq.make_available(head)
    data = frame(1500)
    sent = hdr(0, flags=1, csum_start=34, csum_offset=16)
    if path == "receive_packet":
        assert dev.receive_packet([data], sent)
    else:
        assert dev.receive_from(lambda views: scatter([sent + data], views)) > 0
    dev.flush_rx()
    assert rxq.used_entries(0) == [(0, MRG_HDR_LEN + 1500)]
    got = rxq.read(base, MRG_HDR_LEN + 1500)
    want = VirtioNetHdr.unpack(sent)
    want.num_buffers = 1
    assert got == want.pack() + data


@pytest.mark.parametrize("lengths", LAYOUTS, ids=str)
def test_tx_header_split_across_descriptors(lengths):
    rxq, txq = MockSplitQueue(16), MockSplitQueue(16)
    dev = VirtnetDevice(rxq.device(), txq.device())
    data = frame(2000)
    sent = hdr(0, flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34,
               csum_offset=16)  # fmt: skip
    txq.write(txq.data(0), sent + data)
    addr = txq.data(0)
    for i, n in enumerate(lengths):
        last = i == len(lengths) - 1
        txq.desc(i, addr, n, 0 if last else NEXT, next=i + 1)
        addr += n
    txq.make_available(0)
    got = []
    assert dev.process_tx(lambda views, n: got.append((b"".join(views), n)) or True) == 1
    assert got == [(sent + data, 2000)]
    dev.flush_tx()
    assert txq.used_entries(0) == [(0, 0)]


# -- tx chains the device refuses -------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, MRG_HDR_LEN - 1])
def test_a_tx_chain_shorter_than_a_header_is_a_tx_error(length):
    rxq, txq = MockSplitQueue(16), MockSplitQueue(16)
    dev = VirtnetDevice(rxq.device(), txq.device())
    txq.desc(0, txq.data(0), length, 0)
    txq.desc(1, txq.data(1), MRG_HDR_LEN + 60, 0)
    txq.make_available(0)
    txq.make_available(1)
    sent = []
    assert dev.process_tx(lambda views, n: sent.append(n) or True) == 1
    dev.flush_tx()
    assert sent == [60]
    assert dev.stats.tx_errors == 1 and dev.stats.tx_packets == 1
    assert txq.used_entries(0) == [(0, 0), (1, 0)]


def test_a_tx_chain_with_a_bad_descriptor_is_refused_and_tx_goes_on():
    rxq, txq = MockSplitQueue(16), MockSplitQueue(16)
    dev = VirtnetDevice(rxq.device(), txq.device())
    txq.desc(0, txq.end + 1, 100, 0)
    txq.desc(1, txq.data(1), MRG_HDR_LEN + 60, 0)
    txq.make_available(0)
    txq.make_available(1)
    assert dev.process_tx(lambda views, n: True) == 1
    dev.flush_tx()
    assert dev.stats.desc_errors == 1
    assert txq.used_entries(0) == [(0, 0), (1, 0)]


# -- notifications ----------------------------------------------------------------------------


def test_flush_rx_asks_for_an_interrupt_unless_the_driver_is_polling(pair_factory):
    from tests.net.conftest import NO_EVENT_IDX

    p = pair_factory("deferred", MRG & NO_EVENT_IDX)
    p.dev.receive_packet([frame(60)])
    assert p.dev.flush_rx() and p.dev.stats.rx_notifies == 1
    p.drv.rvq.disable_cb()  # NAPI is running: VRING_AVAIL_F_NO_INTERRUPT
    p.dev.receive_packet([frame(60)])
    assert not p.dev.flush_rx()
    assert not p.dev.flush_rx()  # nothing new to publish


# -- scatter ----------------------------------------------------------------------------------


def test_scatter_copies_across_destination_boundaries():
    a, b, c = bytearray(3), bytearray(4), bytearray(10)
    views = [memoryview(a), memoryview(b), memoryview(c)]
    assert scatter([b"ab", memoryview(b"cdefg"), b"hi"], views) == 9
    assert (bytes(a), bytes(b), bytes(c[:2])) == (b"abc", b"defg", b"hi")


def test_scatter_stops_when_the_destinations_are_full():
    a = bytearray(4)
    assert scatter([b"abcdef"], [memoryview(a)]) == 4
    assert bytes(a) == b"abcd"
    assert scatter([b"x"], []) == 0


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=5),
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    gaps=st.lists(st.integers(0, 5), min_size=8, max_size=8),
)
def test_scatter_direct_writes_what_scatter_writes(pieces, sizes, gaps):
    # Chains of one direct descriptor each, anywhere in one region (gaps between
    # them): the bytes that land in the region are the ones scatter puts in views.
    total = sum(len(p) for p in pieces)
    while sum(sizes) < total:
        sizes = [*sizes, 30]
    region = bytearray(sum(sizes) + sum(gaps) + 5 * len(sizes))
    view = memoryview(region)
    chains, at = [], 0
    for k, size in enumerate(sizes):
        at += gaps[k % len(gaps)]
        chains.append(Chain.direct(k, 0x1000 + at, size, True, view, at))
        at += size
    srcs = [p if k % 2 else memoryview(p) for k, p in enumerate(pieces)]
    scatter_direct(srcs, chains)
    expect = bytearray(len(region))
    assert scatter(srcs, [memoryview(expect)[c.offset : c.offset + c.in_len] for c in chains]) \
        == total
    assert region == expect


def test_num_buffers_sits_at_its_offset():
    assert NUM_BUFFERS_OFFSET == 10 and MRG_HDR_LEN == 12
    assert hdr(0x1234)[NUM_BUFFERS_OFFSET:] == b"\x34\x12"


# -- a partial checksum for a guest without GUEST_CSUM ---------------------------------------


def udp_frame_with_seed() -> tuple[bytes, int]:
    """An Ethernet/IPv4/UDP frame whose UDP checksum field holds the pseudo-header sum (as a
    driver with CSUM leaves it), and the checksum a full computation gives."""
    payload = bytes(range(41))  # odd: the sum pads a byte
    udp_len = 8 + len(payload)
    src, dst = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])

    def fold(data: bytes) -> int:
        data += b"\0" * (len(data) % 2)
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return total

    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", 40000, 40001, udp_len, 0) + payload
    full = ~fold(pseudo + udp) & 0xFFFF
    seeded = udp[:6] + struct.pack("!H", fold(pseudo)) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src, dst)
    return bytes(12) + b"\x08\x00" + ip + seeded, full


@pytest.mark.parametrize("start, offset", [(None, 6), (None, 41 + 8 - 1), (100, 0),
                                           (0xFFFF, 0xFFFF), (34, 0xFFF0)])  # fmt: skip
def test_without_guest_csum_a_partial_checksum_is_completed_or_the_frame_dropped(start, offset):
    """5.1.6.4.1: without GUEST_CSUM the rx header's flags MUST be 0 -- a loopback that
    echoes a tx header with NEEDS_CSUM must finish the checksum (a valid UDP checksum, flags
    0) or, when csum_start + csum_offset lies past the frame (CVE-2024-11614's class), drop
    it with nothing read or written outside the frame."""
    rxq, txq = MockSplitQueue(16), MockSplitQueue(16)
    dev = VirtnetDevice(rxq.device(), txq.device(), guest_csum=False)
    for head in range(4):
        rxq.desc(head, rxq.data(head), PAGE_SIZE, WRITE)
        rxq.make_available(head)
    f, full = udp_frame_with_seed()
    start = 34 if start is None else start
    inside = start + offset + 2 <= len(f)
    h = VirtioNetHdr(flags=1, csum_start=start, csum_offset=offset).pack()
    dev.receive_packet([f], h)
    dev.flush_rx()
    if not inside:
        assert rxq.used_entries(0) == [] and dev.stats.rx_dropped == 1
        return
    (used,) = rxq.used_entries(0)
    got = rxq.read(rxq.data(0), used[1])
    assert VirtioNetHdr.unpack(got[:MRG_HDR_LEN]).flags == 0
    body = got[MRG_HDR_LEN:]
    assert len(body) == len(f)
    at = start + offset
    if offset == 6:
        assert struct.unpack_from("!H", body, at)[0] == full
    assert body[:at] == f[:at] and body[at + 2:] == f[at + 2:]


def test_with_guest_csum_a_partial_checksum_reaches_the_guest_as_sent():
    rxq, txq = MockSplitQueue(16), MockSplitQueue(16)
    dev = VirtnetDevice(rxq.device(), txq.device())  # guest_csum: the default
    rxq.desc(0, rxq.data(0), PAGE_SIZE, WRITE)
    rxq.make_available(0)
    f, _ = udp_frame_with_seed()
    h = VirtioNetHdr(flags=1, csum_start=34, csum_offset=6).pack()
    dev.receive_packet([f], h)
    dev.flush_rx()
    (used,) = rxq.used_entries(0)
    got = rxq.read(rxq.data(0), used[1])
    assert VirtioNetHdr.unpack(got[:MRG_HDR_LEN]).flags == 1 and got[MRG_HDR_LEN:] == f
