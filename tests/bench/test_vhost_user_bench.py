"""virtnet bench --mode vhost-user: two real processes per turn, every byte checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from virtnet.bench.embedded import DIRECTIONS, Case
from virtnet.bench.vhost_user import run_vhost_user_group


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_a_group_runs_both_strategies_over_vhost_user_intact(direction):
    cases = [Case(s, direction, 1500, seconds=0.5) for s in ("prealloc", "deferred")]
    recs = run_vhost_user_group(cases)
    for case, rec in zip(cases, recs, strict=True):
        assert rec["mode"] == "vhost-user" and rec["strategy"] == case.strategy
        assert rec["packets"] > 0 and rec["bytes"] == rec["packets"] * 1500
        assert rec["integrity"]["corrupt"] == 0 and rec["integrity"]["lost"] == 0
        drv = rec["driver_stats"]
        assert drv["pages_outstanding"] == 0 and drv["skb_allocs"] == drv["skb_frees"]
        key = "rx_packets" if direction == "host-to-guest" else "tx_packets"
        assert drv[key] == rec["device_stats"][key] == rec["packets"]


def test_the_cli_writes_the_designed_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "virtnet", "bench", "--mode", "vhost-user", "--seconds", "0.5",
         "--payloads", "64", "--directions", "host-to-guest", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert {r["strategy"] for r in results} == {"prealloc", "deferred"}
    for r in results:
        assert set(r) >= {"mode", "strategy", "direction", "payload", "seconds", "packets",
                          "bytes", "gbps", "pps", "driver_stats", "device_stats"}  # fmt: skip
