"""Transmit: start_xmit → the device's process_tx → free_old_xmit_skbs.

virtio_net.c's xmit_skb puts the virtio-net header (with the stack's csum/GSO
request) in front of the skb's data; the device must see header, linear head and
page frags in order, byte for byte. A full ring is NETDEV_TX_BUSY (the skb stays
with the caller); every completed or refused chain is reclaimed and its skb freed.
"""

from __future__ import annotations

import struct

import pytest

from tests.net.conftest import MRG, NO_INDIRECT, TX, Pair, frame
from virtnet.net.constants import ETH_HLEN, GOOD_COPY_LEN, PAGE_SIZE
from virtnet.net.driver import TX_SLOT_SIZE, coalesce
from virtnet.net.header import (
    MRG_HDR_LEN,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VirtioNetHdr,
)
from virtnet.net.skb import SkBuff

LARGEST = 65536 + ETH_HLEN
GSO_HDR = VirtioNetHdr(
    flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
    gso_type=VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
    hdr_len=66, gso_size=1448, csum_start=34, csum_offset=16,
).pack()  # fmt: skip
DESC = struct.Struct("<QIHH")
LE16 = struct.Struct("<H")


def tx_skb(p: Pair, data: bytes, *, vnet_hdr: bytes = GSO_HDR, head: int = GOOD_COPY_LEN,
           frag: int = PAGE_SIZE, offset: int = 0) -> SkBuff:  # fmt: skip
    """An skb as a guest stack builds it: ``head`` bytes linear, the rest in page frags
    of ``frag`` bytes starting ``offset`` into each page."""
    skb = p.drv.skbs.alloc(GOOD_COPY_LEN)
    skb.vnet_hdr = vnet_hdr
    skb.put(data[:head])
    for off in range(head, len(data), frag):
        page = p.drv.pool.alloc_page()
        chunk = data[off : off + frag]
        page.view[offset : offset + len(chunk)] = chunk
        skb.add_frag(page, offset, len(chunk))
    return skb


class Host:
    """The far end of the device's tx: records (header, frame) per chain."""

    def __init__(self, accept: bool = True) -> None:
        self.got: list[tuple[bytes, bytes]] = []
        self.nviews: list[int] = []
        self.accept = accept

    def __call__(self, views, frame_len: int) -> bool:
        if not self.accept:
            return False
        data = b"".join(bytes(v) for v in views)
        assert len(data) == MRG_HDR_LEN + frame_len
        self.got.append((data[:MRG_HDR_LEN], data[MRG_HDR_LEN:]))
        self.nviews.append(len(views))
        return True


def device_sends(p: Pair, host: Host | None = None) -> Host:
    host = host or Host()
    p.dev.process_tx(host)
    p.dev.flush_tx()
    return host


def last_tx_head(p: Pair) -> int:
    """The head the driver published last on the tx avail ring, read raw."""
    avail = p.layout.rings[TX].avail
    idx = LE16.unpack(p.memory.read(avail + 2, 2))[0]
    slot = (idx - 1) % p.layout.queue_size
    return LE16.unpack(p.memory.read(avail + 4 + 2 * slot, 2))[0]


def poke_desc(p: Pair, i: int, *, addr: int | None = None, length: int | None = None) -> None:
    at = p.layout.rings[TX].desc + 16 * i
    a, n, flags, nxt = DESC.unpack(p.memory.read(at, 16))
    p.memory.write(at, DESC.pack(a if addr is None else addr, n if length is None else length,
                                 flags, nxt))  # fmt: skip


# -- what reaches the device ------------------------------------------------------------------


@pytest.mark.parametrize("features", [MRG, MRG & NO_INDIRECT], ids=["indirect", "direct"])
@pytest.mark.parametrize("size", [ETH_HLEN, 60, GOOD_COPY_LEN, 1514, 9000, LARGEST])
def test_header_head_and_frags_reach_the_device_intact(pair_factory, features, size):
    p = pair_factory("deferred", features)
    data = frame(size, 3)
    skb = tx_skb(p, data)
    # Frags on physically consecutive pages go out as one segment (coalesce).
    runs = len(coalesce(skb.frags))
    assert runs <= len(range(GOOD_COPY_LEN, size, PAGE_SIZE))
    assert p.drv.start_xmit(skb)
    assert p.drv.tx_kick()
    host = device_sends(p)
    assert host.got == [(GSO_HDR, data)]  # csum and GSO requests passed through untouched
    assert host.nviews == [1 + runs]  # header + head share one slot (can_push)
    st, dst = p.drv.stats, p.dev.stats
    assert (st.tx_packets, st.tx_bytes) == (1, size)
    assert (dst.tx_packets, dst.tx_bytes, dst.tx_errors) == (1, size, 0)


def test_frags_at_page_offsets_and_an_empty_head(pair_factory):
    p = pair_factory("deferred", MRG)
    data = frame(5000, 1)
    p.drv.start_xmit(tx_skb(p, data, head=0, frag=1000, offset=300))
    p.drv.start_xmit(tx_skb(p, data, head=GOOD_COPY_LEN, frag=300, offset=PAGE_SIZE - 300))
    host = device_sends(p)
    assert host.got == [(GSO_HDR, data), (GSO_HDR, data)]


def test_many_packets_keep_their_order(pair_factory):
    p = pair_factory("deferred", MRG)
    sizes = [60, 1514, 66, 9000, 200] * 6
    host = Host()
    for k, size in enumerate(sizes):
        while not p.drv.start_xmit(skb := tx_skb(p, frame(size, k))):
            skb.free()
            device_sends(p, host)
    device_sends(p, host)
    assert [d for _, d in host.got] == [frame(s, k) for k, s in enumerate(sizes)]


# -- completion and reclaim -------------------------------------------------------------------


def test_completed_skbs_are_freed_with_their_pages(pair_factory):
    # free_old_xmit_skbs: "while ((skb = get_buf(svq, &len)) != NULL) dev_kfree_skb(skb)"
    p = pair_factory("deferred", MRG)
    st = p.drv.stats
    skbs = [tx_skb(p, frame(9000, k)) for k in range(3)]
    npages = sum(s.nr_frags for s in skbs)
    frees, page_frees, out = st.skb_frees, st.page_frees, p.drv.pool.outstanding
    slots = len(p.drv.tx_slots.free)
    for skb in skbs:
        assert p.drv.start_xmit(skb)
    assert len(p.drv.tx_slots.free) == slots - 3
    assert p.drv.free_old_xmit_skbs() == 0  # nothing used yet
    device_sends(p)
    assert p.drv.free_old_xmit_skbs() == 3
    assert (st.skb_frees - frees, st.page_frees - page_frees) == (3, npages)
    assert p.drv.pool.outstanding == out - npages
    assert len(p.drv.tx_slots.free) == slots
    assert p.drv.svq.num_free == p.layout.queue_size


def test_start_xmit_reclaims_completed_skbs_first(pair_factory):
    p = pair_factory("deferred", MRG)
    p.drv.start_xmit(tx_skb(p, frame(60)))
    device_sends(p)
    frees = p.drv.stats.skb_frees
    p.drv.start_xmit(tx_skb(p, frame(60, 1)))
    assert p.drv.stats.skb_frees == frees + 1


@pytest.mark.parametrize("features", [MRG & NO_INDIRECT, MRG], ids=["direct", "indirect"])
def test_a_full_ring_returns_busy_and_the_skb_stays_with_the_caller(pair_factory, features):
    # NETDEV_TX_BUSY: the qdisc requeues the skb; nothing is freed, nothing is counted.
    p = pair_factory("deferred", features, queue_size=8)
    data = frame(GOOD_COPY_LEN + 3 * PAGE_SIZE)  # header slot + 3 frags
    fits = 0
    while True:
        skb = tx_skb(p, data)
        descs = 1 if features == MRG else 1 + len(coalesce(skb.frags))
        if p.drv.svq.num_free < descs:
            break
        assert p.drv.start_xmit(skb)
        fits += 1
    assert fits >= 2
    st = p.drv.stats
    frees, packets = st.skb_frees, st.tx_packets
    assert not p.drv.start_xmit(skb)
    assert (st.skb_frees, st.tx_packets, skb.nr_frags) == (frees, packets, 3)
    assert skb.to_bytes() == data
    host = device_sends(p)
    assert p.drv.start_xmit(skb)  # room again once the device used the ring
    device_sends(p, host)
    assert [d for _, d in host.got] == [data] * (fits + 1)


def test_a_header_of_the_wrong_length_is_dropped_and_freed(pair_factory):
    p = pair_factory("deferred", MRG)
    skb = tx_skb(p, frame(1514), vnet_hdr=GSO_HDR[:10])
    frees = p.drv.stats.skb_frees
    assert p.drv.start_xmit(skb)  # consumed (NETDEV_TX_OK), not queued
    assert (p.drv.stats.tx_dropped, p.drv.stats.skb_frees) == (1, frees + 1)
    assert device_sends(p).got == []


def test_a_linear_head_larger_than_the_header_slot_is_dropped_not_lost(pair_factory):
    # virtnet copies header + head into one TX_SLOT_SIZE slot; a bigger head is refused
    # (counted), where Linux would map the head as its own sg entry.
    p = pair_factory("deferred", MRG)
    skb = p.drv.skbs.alloc(TX_SLOT_SIZE)
    skb.vnet_hdr = GSO_HDR
    skb.put(frame(TX_SLOT_SIZE - MRG_HDR_LEN + 1))
    assert p.drv.start_xmit(skb)
    assert p.drv.stats.tx_dropped == 1 and p.drv.skbs.live == 0
    fits = p.drv.skbs.alloc(TX_SLOT_SIZE)
    fits.vnet_hdr = GSO_HDR
    fits.put(frame(TX_SLOT_SIZE - MRG_HDR_LEN))
    assert p.drv.start_xmit(fits)
    assert device_sends(p).got == [(GSO_HDR, frame(TX_SLOT_SIZE - MRG_HDR_LEN))]


# -- a device that refuses or lies ------------------------------------------------------------


@pytest.mark.parametrize("features", [MRG, MRG & NO_INDIRECT], ids=["indirect", "direct"])
def test_a_chain_the_device_refuses_is_reclaimed(pair_factory, features):
    # The device pushes a refused chain back with len 0; the driver frees it like any other.
    p = pair_factory("deferred", features)
    out = p.drv.pool.outstanding
    p.drv.start_xmit(tx_skb(p, frame(9000)))
    poke_desc(p, last_tx_head(p), addr=1 << 44)  # the guest scribbled on its descriptor
    host = device_sends(p)
    assert host.got == [] and p.dev.stats.desc_errors == 1
    assert p.drv.free_old_xmit_skbs() == 1
    assert p.drv.pool.outstanding == out and p.drv.skbs.live == 0
    assert p.drv.svq.num_free == p.layout.queue_size


def test_a_chain_shorter_than_a_header_is_a_tx_error_and_reclaimed(pair_factory):
    p = pair_factory("deferred", MRG & NO_INDIRECT)
    p.drv.start_xmit(tx_skb(p, frame(40)))
    poke_desc(p, last_tx_head(p), length=MRG_HDR_LEN - 1)
    assert device_sends(p).got == []
    assert p.dev.stats.tx_errors == 1
    assert p.drv.free_old_xmit_skbs() == 1 and p.drv.skbs.live == 0


def test_a_tx_used_entry_with_a_bogus_length_or_id_is_counted_and_reclaimed(pair_factory):
    p = pair_factory("deferred", MRG)
    p.drv.start_xmit(tx_skb(p, frame(1514)))
    chain = p.dev.txq.pop()
    p.dev.txq.push_used(chain.head, 100)  # a tx buffer has no writable bytes
    p.dev.txq.push_used(p.layout.queue_size + 1, 0)  # no such buffer
    p.dev.txq.flush_used()
    assert p.drv.free_old_xmit_skbs() == 1
    assert p.drv.stats.tx_dropped == 2
    assert p.drv.skbs.live == 0 and p.drv.svq.num_free == p.layout.queue_size


def test_back_pressure_gives_the_chain_back_to_the_ring(pair_factory):
    # A TAP that answers EAGAIN: the chain is unpopped (vhost_discard_vq_desc), sent later.
    p = pair_factory("deferred", MRG)
    p.drv.start_xmit(tx_skb(p, frame(1514, 1)))
    p.drv.start_xmit(tx_skb(p, frame(1514, 2)))
    assert p.dev.process_tx(Host(accept=False)) == 0
    assert p.drv.free_old_xmit_skbs() == 0
    host = device_sends(p)
    assert [d for _, d in host.got] == [frame(1514, 1), frame(1514, 2)]
    assert p.drv.free_old_xmit_skbs() == 2


def test_process_tx_respects_its_budget(pair_factory):
    p = pair_factory("deferred", MRG)
    for k in range(5):
        p.drv.start_xmit(tx_skb(p, frame(100, k)))
    host = Host()
    assert p.dev.process_tx(host, budget=3) == 3
    assert p.dev.process_tx(host, budget=3) == 2
    assert [d for _, d in host.got] == [frame(100, k) for k in range(5)]


def test_adjacent_frags_become_one_segment_and_others_stay_apart(pair_factory):
    p = pair_factory("deferred", MRG)
    a, b, c = (p.drv.pool.pages[i] for i in (10, 11, 20))
    frags = [(a, 100, PAGE_SIZE - 100), (b, 0, PAGE_SIZE), (c, 0, 50), (c, 60, 10)]
    assert coalesce(frags) == [(a.gpa + 100, 2 * PAGE_SIZE - 100), (c.gpa, 50), (c.gpa + 60, 10)]


def test_a_freed_frame_comes_back_as_one_contiguous_run(pair_factory):
    # SkbAllocator.free gives pages back last frag first, so the stack hands them out
    # ascending: the next large frame is one run again (one descriptor, not 17).
    p = pair_factory("deferred", MRG)
    first = tx_skb(p, frame(LARGEST, 1))
    first.free()
    again = tx_skb(p, frame(LARGEST, 2))
    assert len(coalesce(again.frags)) == 1
    again.free()
