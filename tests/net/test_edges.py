"""The driver's limits on what a device says, on both sides of each limit.

* ``num_buffers``: a packet may span every buffer the driver has out (this one, the
  rest of the poll's burst, those still posted) -- the driver then looks for them and
  names the ones missing; one more than that is a lie named at once, nothing after it
  taken on trust. On split and packed rings, first in a burst and in its middle.
* The used index: exactly a queue's worth of used entries is a full ring, read whole;
  ``num + 1`` and ``2 * num`` ahead break the queue (BAD_RING), on rx and on tx.
"""

from __future__ import annotations

import logging

import pytest

from tests.net.conftest import (
    MERGEABLE_STRATEGIES,
    MRG,
    LyingDevice,
    Pair,
    frame,
    make_pair,
)
from virtnet.net.constants import GOOD_COPY_LEN
from virtnet.net.guest import GuestLayout, build_device, build_driver
from virtnet.net.header import MRG_HDR_LEN
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.memory import GuestMemory

PACKED = MRG | bit(VirtioF.RING_PACKED)
RINGS = ["split", "packed"]


def make_ring_pair(strategy: str, ring: str, queue_size: int = 64) -> Pair:
    """``make_pair``, on split or packed rings (the driver and device over one layout)."""
    if ring == "split":
        return make_pair(strategy, MRG, queue_size=queue_size)
    layout = GuestLayout(queue_size, GuestLayout.pages_for(queue_size), packed=True)
    memory = GuestMemory.from_buffer(bytearray(layout.size))
    box: list[Pair] = []
    drv = build_driver(memory, layout, PACKED, strategy,
                       netif_receive_skb=lambda skb: box[0].netif_receive_skb(skb))  # fmt: skip
    dev = build_device(memory, layout.ring_views(memory), PACKED)
    pair = Pair(memory, layout, PACKED, drv, dev)
    box.append(pair)
    drv.try_fill_recv()
    return pair


def zeros_over(liar: LyingDevice, chains: int) -> bytes:
    """A frame that fills ``chains`` buffers exactly, all zero: should a buffer after the
    first be read as a packet of its own, its "header" says num_buffers 0 (refused)."""
    return bytes(liar.room(chains) - MRG_HDR_LEN)


def still_delivers(p: Pair) -> None:
    p.send(frame(1000, 5))
    p.napi()
    assert p.frames[-1:] == [frame(1000, 5)]
    p.teardown()
    assert p.drv.pool.outstanding == 0


# -- num_buffers: every buffer out, and one more --------------------------------------------


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("over", [0, 1], ids=["limit", "limit+1"])
@pytest.mark.parametrize("strategy", MERGEABLE_STRATEGIES)
def test_num_buffers_up_to_every_buffer_out_is_looked_for_one_more_is_named_at_once(
    strategy, over, ring, caplog
):
    p = make_ring_pair(strategy, ring)
    out = p.drv.num  # all posted, none taken: the limit for a packet first in its burst
    liar = LyingDevice(p)
    liar.packet(zeros_over(liar, 2), num_buffers=out + over, nchains=2)
    with caplog.at_level(logging.WARNING, "virtnet.driver"):
        p.napi()
    st = p.drv.stats
    assert st.rx_packets == 0 and st.rx_dropped >= 1 and st.fault_num_buffers_big == 1
    if over:
        assert f"num_buffers {out + 1} > {out} buffers posted" in caplog.text
    else:  # the driver took the second buffer and found the rest missing
        assert "buffers posted" not in caplog.text
        assert f"{out - 2} buffers out of {out} missing" in caplog.text
        assert st.rx_bufs == 2 and st.fault_num_buffers_small == 0
    still_delivers(p)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("over", [0, 1], ids=["limit", "limit+1"])
@pytest.mark.parametrize("strategy", MERGEABLE_STRATEGIES)
def test_num_buffers_limit_in_the_middle_of_a_burst_counts_what_the_burst_took(
    strategy, over, ring, caplog
):
    # One honest frame first, in the same burst: when the lie is read the driver has
    # every buffer out but that one (the rest of the burst counts as still out).
    p = make_ring_pair(strategy, ring)
    out = p.drv.num - 1
    p.send(frame(100, 1))
    liar = LyingDevice(p)
    liar.packet(zeros_over(liar, 2), num_buffers=out + over, nchains=2)
    with caplog.at_level(logging.WARNING, "virtnet.driver"):
        p.napi()
    st = p.drv.stats
    assert p.frames == [frame(100, 1)] and st.fault_num_buffers_big == 1
    if over:
        assert f"num_buffers {out + 1} > {out} buffers posted" in caplog.text
    else:
        assert "buffers posted" not in caplog.text
        assert f"{out - 2} buffers out of {out} missing" in caplog.text
    still_delivers(p)


# -- the used index: a full ring, and past it --------------------------------------------------


@pytest.mark.parametrize("strategy", MERGEABLE_STRATEGIES)
def test_a_used_index_exactly_a_queue_ahead_is_a_full_ring_read_whole(strategy):
    p = make_pair(strategy, MRG, queue_size=64)
    assert p.drv.num == 64  # every ring slot posted
    sent = [frame(100, k) for k in range(64)]
    for f in sent:
        assert p.dev.receive_packet([f])
    p.dev.flush_rx()  # the used index moves by the queue size at once
    assert p.napi() == 64
    assert p.frames == sent and p.drv.stats.fault_idx_jump == 0 and not p.drv.broken
    still_delivers(p)


@pytest.mark.parametrize("extra", [1, 64], ids=["num+1", "2num"])
@pytest.mark.parametrize("strategy", MERGEABLE_STRATEGIES)
def test_a_used_index_past_a_queue_breaks_the_rx_queue(strategy, extra):
    p = make_pair(strategy, MRG, queue_size=64)
    for k in range(64):
        assert p.dev.receive_packet([frame(100, k)])
    p.dev.rxq.used_idx = (p.dev.rxq.used_idx + extra) & 0xFFFF
    p.dev.flush_rx()
    assert p.napi() == 0
    st = p.drv.stats
    assert st.fault_idx_jump == 1 and st.rx_packets == 0 and p.drv.rvq.broken
    assert f"{64 + extra} ahead" in p.drv.broken
    p.teardown()
    assert p.drv.pool.outstanding == 0


def fill_tx(p: Pair, n: int) -> None:
    """``n`` small frames transmitted and used by the device: tx's used index n ahead."""
    for k in range(n):
        skb = p.drv.skbs.alloc(GOOD_COPY_LEN)
        skb.vnet_hdr = bytes(MRG_HDR_LEN)
        skb.put(frame(60, k))
        assert p.drv.start_xmit(skb)
    p.dev.process_tx(lambda views, length: True)
    p.dev.flush_tx()


def test_a_tx_used_index_exactly_a_queue_ahead_frees_every_skb(pair_factory):
    p = pair_factory("deferred", MRG, queue_size=64)
    fill_tx(p, 64)
    assert p.drv.free_old_xmit_skbs() == 64
    assert not p.drv.svq.broken and p.drv.stats.fault_idx_jump == 0


@pytest.mark.parametrize("extra", [1, 64], ids=["num+1", "2num"])
def test_a_tx_used_index_past_a_queue_breaks_the_tx_queue(pair_factory, extra):
    p = pair_factory("deferred", MRG, queue_size=64)
    fill_tx(p, 64)
    txq = p.dev.txq
    txq.used_idx = (txq.used_idx + extra) & 0xFFFF
    txq.flush_used()
    assert p.drv.free_old_xmit_skbs() == 0
    assert p.drv.svq.broken and p.drv.stats.fault_idx_jump == 1
    assert f"{64 + extra} ahead" in p.drv.broken
