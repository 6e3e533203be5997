"""The fault plan in one process: parsing, the seed, and each lie as the driver sees it."""

from __future__ import annotations

import logging

import pytest

from virtnet.net.faults import FAULT_KINDS, FaultPlan, FaultSpecError

from .conftest import MRG, frame, make_pair


def run(spec: str, seed: int, frames: int = 300, caplog=None) -> tuple[list[str], dict]:
    p = make_pair("deferred", MRG)
    plan = FaultPlan.parse(spec, seed)
    plan.install(p.dev)
    if caplog is not None:
        caplog.clear()
    for k in range(frames):
        p.send(frame(1000 + k % 7, k))
        p.napi()
    injected = [r.getMessage() for r in caplog.records if "injected" in r.getMessage()] \
        if caplog is not None else []  # fmt: skip
    counts = {k: getattr(p.dev.stats, f"fault_{k}") for k in FAULT_KINDS}
    met = {k: getattr(p.drv.stats, f"fault_{k}") for k in FAULT_KINDS}
    assert counts == met, (counts, met)
    return injected, counts


DATA = "bad_len:rate=0.05,short:rate=0.05,num_buffers_big:rate=0.05,bad_csum:rate=0.05"


def test_the_same_seed_repeats_a_run_exactly_and_another_seed_does_not(caplog):
    with caplog.at_level(logging.WARNING, "virtnet.device"):
        first, counts = run(DATA, 5, caplog=caplog)
        again, _ = run(DATA, 5, caplog=caplog)
        other, _ = run(DATA, 6, caplog=caplog)
    assert first and first == again and first != other
    assert sum(counts.values()) == len(first)


def test_count_and_after_bound_the_faults():
    _, counts = run("short:rate=1:count=3:after=10", 0, frames=50)
    assert counts["short"] == 3


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("nosuch", "unknown fault kind 'nosuch'"),
        ("short:rate=0", "must be in (0, 1]"),
        ("short:count=-1", "must be >= 0"),
        ("short:q=tx", "rx only"),
        ("bad_id:q=sideways", "'q=sideways'"),
        ("short:speed=3", "unknown option"),
        (",", "no fault kind given"),
    ],
)
def test_a_bad_spec_is_refused_with_the_part_named(spec, text):
    with pytest.raises(FaultSpecError, match=None) as e:
        FaultPlan.parse(spec)
    assert text in str(e.value)


def test_num_buffers_small_on_a_multi_buffer_packet_is_one_less():
    p = make_pair("deferred", MRG)
    FaultPlan.parse("num_buffers_small:rate=1:count=1").install(p.dev)
    p.send(frame(9000, 1))  # three 4 KiB buffers: the header says 2
    p.napi()
    assert p.dev.stats.fault_num_buffers_small == 1
    assert frame(9000, 1) not in p.frames  # never delivered whole and intact
    assert p.drv.stats.rx_dropped + p.drv.stats.rx_length_errors >= 1
