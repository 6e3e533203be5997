"""The driver names each lie of the device, rate-limited, and breaks a queue whose state
is impossible (Linux: BAD_RING -> vq->broken) instead of spinning through garbage."""

from __future__ import annotations

import logging

import pytest

from virtnet.net.header import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    hdr_error,
)
from virtnet.net.ratelimit import RATELIMIT_BURST, RateLimit
from virtnet.net.xdp import XDP_PASS, XdpHook

from .conftest import MRG, STRATEGY_FEATURES, LyingDevice, frame, hdr, make_pair


def test_ratelimit_allows_a_burst_per_interval_and_says_how_many_it_suppressed():
    now = [0.0]
    rl = RateLimit(interval=5.0, burst=3, clock=lambda: now[0])
    assert [rl.allow() for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    now[0] = 5.0
    assert rl.allow() == (True, 2)  # the next interval opens with the count missed
    assert rl.allow() == (True, 0)


@pytest.mark.parametrize("strategy", ["deferred", "prealloc"])
def test_a_used_index_30000_ahead_breaks_the_queue_with_one_error(strategy, caplog):
    p = make_pair(strategy, MRG)  # a 256-entry ring
    p.send(frame(100, 1))
    p.dev.rxq.used_idx = (p.dev.rxq.used_idx + 30_000) & 0xFFFF
    p.dev.rxq.flush_used()
    with caplog.at_level(logging.WARNING, "virtnet.driver"):
        assert p.napi() == 0
        assert p.napi() == 0  # broken: nothing more, no error more
    st = p.drv.stats
    assert st.fault_idx_jump == 1 and st.rx_packets == 0
    assert p.drv.rvq.broken and "device fault idx_jump" in p.drv.broken
    assert "30001 ahead" in p.drv.broken and "queue broken" in caplog.text
    assert len(caplog.records) == 1
    p.teardown()
    assert p.drv.pool.outstanding == 0


def test_a_tx_used_index_jump_breaks_the_tx_queue(pair_factory):
    p = pair_factory("deferred", MRG)
    p.dev.txq.used_idx = 40_000
    p.dev.txq.flush_used()
    assert p.drv.free_old_xmit_skbs() == 0
    assert p.drv.svq.broken and p.drv.stats.fault_idx_jump == 1
    assert "vq 1" in p.drv.broken


@pytest.mark.parametrize(
    ("fields", "length", "kind"),
    [
        ({"flags": VIRTIO_NET_HDR_F_NEEDS_CSUM, "csum_start": 90, "csum_offset": 16}, 100,
         "bad_csum"),
        ({"gso_type": VIRTIO_NET_HDR_GSO_TCPV4, "gso_size": 0}, 1000, "bad_gso"),
        ({"gso_type": 9, "gso_size": 1448}, 1000, "bad_gso"),
    ],
)  # fmt: skip
def test_a_header_linux_would_refuse_is_named_and_the_frame_dropped(fields, length, kind):
    assert hdr_error(hdr(1, **fields), length)[0] == kind
    p = make_pair("deferred", MRG)
    LyingDevice(p).packet(frame(length), vnet_hdr=hdr(1, **fields))
    p.napi()
    st = p.drv.stats
    assert getattr(st, f"fault_{kind}") == 1 and st.rx_packets == 0 and st.rx_dropped == 1
    p.send(frame(1000, 5))  # the queue is fine: only that frame was bad
    p.napi()
    assert p.frames == [frame(1000, 5)]
    p.teardown()
    assert p.drv.pool.outstanding == 0


def test_a_correct_checksum_request_passes():
    fields = {"flags": VIRTIO_NET_HDR_F_NEEDS_CSUM, "csum_start": 34, "csum_offset": 16}
    assert hdr_error(hdr(1, **fields), 100) is None
    gso = {"gso_type": VIRTIO_NET_HDR_GSO_TCPV4, "gso_size": 1448, **fields}
    assert hdr_error(hdr(1, **gso), 9000) is None


def test_a_flood_of_one_lie_is_counted_in_full_and_logged_a_burst_at_a_time(caplog):
    p = make_pair("deferred", MRG)
    liar = LyingDevice(p)
    n = RATELIMIT_BURST + 15
    with caplog.at_level(logging.WARNING, "virtnet.driver"):
        for _ in range(n):
            liar.buffer(hdr(1) + b"\0" * 5)  # short packets
        liar.flush()
        p.napi(budget=n)
    assert p.drv.stats.fault_short == n
    assert sum("device fault short: vq 0: short packet 17" in r.message
               for r in caplog.records) == RATELIMIT_BURST  # fmt: skip
    p.teardown()


@pytest.mark.parametrize("xdp", [False, True], ids=["plain", "xdp"])
@pytest.mark.parametrize("strategy", list(STRATEGY_FEATURES))
def test_every_strategy_names_a_short_packet(strategy, xdp):
    # issue 18.3: the driver's fault counters equal the device's (docs/faults.md), so a
    # short packet is fault_short on every strategy, with or without a program attached.
    p = make_pair(strategy, STRATEGY_FEATURES[strategy])
    if xdp:
        p.drv.rx.attach_xdp(XdpHook(lambda data, frags: XDP_PASS, p.drv.stats))
    liar = LyingDevice(p)
    liar.buffer(hdr(1) + frame(5))  # 17 bytes: shorter than a header and an Ethernet header
    liar.flush()
    p.napi()
    st = p.drv.stats
    assert (st.fault_short, st.rx_length_errors, st.rx_packets) == (1, 1, 0)
    p.send(frame(100))
    p.napi()
    assert p.frames == [frame(100)]
    p.teardown()
    assert p.drv.pool.outstanding == 0
