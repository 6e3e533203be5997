"""Every ``--faults`` kind on both ring kinds (issue 18.7): the device tells the lie on a
split ring and on a packed one, the driver names it with the same fault_KIND, and a lie
that leaves the ring impossible breaks that queue instead of spinning through it.

On a packed ring there is no used index to jump: ``idx_jump`` writes a batch of used
descriptors with the other lap's wrap counter (AVAIL = USED = its inverse), which is the
used position a ring's worth off; the driver finds such a descriptor where it expects
its own buffer in flight or the device's mark of this lap, and stops the queue.
"""

from __future__ import annotations

import pytest

from virtnet.net.faults import FAULT_KINDS, FaultPlan

from .conftest import MRG, frame, make_pair
from .test_tx import device_sends, tx_skb

RINGS = ["split", "packed"]
DATA_KINDS = ("bad_len", "num_buffers_big", "num_buffers_small", "short", "bad_csum", "bad_gso")
BREAKING = ("bad_id", "dup_id", "idx_jump")
AFTER = 3  # the lie goes in at the 4th opportunity: a few honest frames first
FRAMES = 10


def test_the_kinds_here_are_every_kind():
    # hold (a tx chain kept from the used ring) is shown across a device kill:
    # tests/vhost_user/test_inflight_restart.py
    assert {*DATA_KINDS, *BREAKING, "irq_drop", "irq_late", "hold"} == set(FAULT_KINDS)


def faults(stats) -> dict[str, int]:
    return {k: n for k in FAULT_KINDS if (n := getattr(stats, f"fault_{k}"))}


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("kind", DATA_KINDS)
def test_a_lie_about_a_packet_costs_that_packet_on_both_rings(kind, ring):
    p = make_pair("deferred", MRG, packed=ring == "packed")
    FaultPlan.parse(f"{kind}:rate=1:count=1:after={AFTER}").install(p.dev)
    for k in range(FRAMES):
        assert p.send(frame(1000, k))
        p.napi()
    assert faults(p.dev.stats) == faults(p.drv.stats) == {kind: 1}
    assert not p.drv.broken
    honest = [frame(1000, k) for k in range(FRAMES)]
    assert len(p.frames) == FRAMES - 1 and all(f in honest for f in p.frames)
    assert p.frames[-1] == honest[-1]  # the queue goes on after the lie
    p.teardown()
    assert p.drv.pool.outstanding == 0


def _rx(p, k: int) -> None:
    p.send(frame(1000, k))
    p.napi()


def _tx(p, k: int) -> None:
    assert p.drv.start_xmit(tx_skb(p, frame(1000, k), vnet_hdr=bytes(p.drv.hdr_len)))
    p.drv.tx_kick()
    device_sends(p)
    p.drv.free_old_xmit_skbs()


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("q", ["rx", "tx"])
@pytest.mark.parametrize("kind", BREAKING)
def test_an_impossible_ring_breaks_the_queue_with_the_lie_named_on_both_rings(kind, q, ring):
    p = make_pair("deferred", MRG, packed=ring == "packed")
    FaultPlan.parse(f"{kind}:rate=1:count=1:after={AFTER}:q={q}").install(p.dev)
    step = _rx if q == "rx" else _tx
    for k in range(FRAMES):
        step(p, k)
        if p.drv.broken:
            break
    assert faults(p.dev.stats) == faults(p.drv.stats) == {kind: 1}
    vq = p.drv.rvq if q == "rx" else p.drv.svq
    assert vq.broken and f"device fault {kind}: vq {vq.index}" in p.drv.broken
    assert k == AFTER  # named at the lie, not later
    assert p.drv.poll()[0] == 0 and vq.get_buf() is None  # broken: nothing more is taken
    p.teardown()
    assert p.drv.pool.outstanding == 0


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("kind", ["irq_drop", "irq_late"])
def test_an_interrupt_lie_holds_back_the_interrupt_on_both_rings(kind, ring):
    now = [0.0]
    p = make_pair("deferred", MRG, packed=ring == "packed")
    plan = FaultPlan.parse(f"{kind}:rate=1:count=1:q=rx")
    plan.clock = lambda: now[0]
    plan.install(p.dev)
    p.drv.rvq.enable_cb()  # the driver asks for an interrupt
    p.send(frame(1000))
    assert not p.dev.rxq.needs_notify()  # asked for, not sent
    assert faults(p.dev.stats) == {kind: 1}
    now[0] = 1.0  # irq_late: due now; irq_drop: lost for good
    assert p.dev.rxq.has_unflushed() == (kind == "irq_late")
    assert p.dev.rxq.needs_notify() == (kind == "irq_late")
    assert p.napi() == 1 and p.frames == [frame(1000)]
    p.teardown()
