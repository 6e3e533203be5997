"""virtnet bench --queues: runs per number of queue pairs, per-pair counts checked.

--mode vhost-user runs both processes with N pairs (a worker process per pair on
each side); every pair's count of the measured direction must be the same at both
ends. --tap runs iperf3 with parallel streams over multi-queue taps (root).
Benchmarks measure, tests assert behaviour: no rate, no ratio is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from virtnet.bench.embedded import GUEST_TO_HOST, HOST_TO_GUEST, Case
from virtnet.bench.report import integrity_problems, queues_table
from virtnet.bench.tap import TapCase, run_tap_case, tap_cases, unavailable_reason
from virtnet.bench.vhost_user import _record, queue_mismatches, run_vhost_user_group
from virtnet.cli import build_parser, main
from virtnet.vhost_user.backend import MAX_QUEUE_PAIRS


def test_queues_parse_as_a_list_of_pair_counts():
    args = build_parser().parse_args(["bench", "--mode", "vhost-user", "--queues", "1,2"])
    assert args.queues == [1, 2]
    assert build_parser().parse_args(["bench", "--queues", "2,1,2"]).queues == [2, 1]
    assert build_parser().parse_args(["bench"]).queues is None  # no --queues table


@pytest.mark.parametrize("text", ["0", "x", "1,0", str(MAX_QUEUE_PAIRS + 1), "-1", ""])
def test_bad_queue_counts_are_refused_naming_the_value(text, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", "--mode", "vhost-user", "--queues", text])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--queues" in err and f"1..{MAX_QUEUE_PAIRS}" in err and repr(text) in err


def test_queues_are_refused_in_process(capsys):
    assert main(["bench", "--queues", "1,2", "--seconds", "0.1"]) == 2
    assert "--queues is for --mode vhost-user or --tap" in capsys.readouterr().err


def test_one_and_two_pairs_run_in_one_bench_and_both_ends_agree_per_pair(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "virtnet", "bench", "--mode", "vhost-user", "--queues", "1,2",
         "--strategies", "deferred", "--payloads", "64", "--directions", "guest-to-host",
         "--seconds", "0.5", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "queue pairs" in proc.stdout and "deferred 2q" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert sorted(r["queues"] for r in results) == [1, 2]
    for r in results:
        q = r["queues"]
        drv, dev = r["driver_stats"], r["device_stats"]
        assert r["integrity"]["queue_mismatch"] == 0 and r["integrity"]["messages"] == []
        assert len(r["queue_packets"]) == q and sum(r["queue_packets"]) == r["packets"]
        assert len(r["device_worker_cpu_seconds"]) == q  # the device: a worker per pair
        assert len(r["driver_worker_cpu_seconds"]) == (q if q > 1 else 0)  # 1: in-process
        assert r["device_cpu_seconds"] > 0 and r["driver_cpu_seconds"] > 0
        if q == 2:
            for p in range(q):
                n = drv[f"tx_queue_{p}_packets"]
                assert n > 0 and n == dev[f"tx_queue_{p}_packets"] == r["queue_packets"][p]
        else:
            assert drv["tx_packets"] == dev["tx_packets"] == r["packets"] > 0


def test_two_pairs_host_to_guest_check_every_frame():
    recs = run_vhost_user_group([Case("deferred", HOST_TO_GUEST, 1500, seconds=0.5, queues=2)])
    (rec,) = recs
    drv, dev = rec["driver_stats"], rec["device_stats"]
    for p in range(2):
        assert drv[f"rx_queue_{p}_packets"] == dev[f"rx_queue_{p}_packets"] > 0
    assert rec["bytes"] == rec["packets"] * 1500 and integrity_problems(recs) == []


def test_a_pair_whose_counts_differ_fails_the_run():
    case = Case("deferred", GUEST_TO_HOST, 64, queues=2)
    drv = {"tx_queue_0_packets": 10, "tx_queue_1_packets": 7}
    dev = {"tx_queue_0_packets": 10, "tx_queue_1_packets": 6}
    assert queue_mismatches(case, drv, dev) == [
        "pair 1: driver tx_queue_1_packets 7, device 6"]  # fmt: skip
    # A counter one end does not report is a mismatch too, not a pass.
    assert len(queue_mismatches(case, drv, {"tx_queue_0_packets": 10})) == 1
    acc = {"seconds": 1.0, "cpu_seconds": 1.0, "driver_stats": drv | {"tx_packets": 17},
           "device_stats": dev, "driver_backend": {}, "device_backend": {
               "sink_packets": 16, "sink_bytes": 16 * 64},
           "queue_messages": queue_mismatches(case, drv, dev)}  # fmt: skip
    rec = _record(case, acc)
    assert rec["integrity"]["queue_mismatch"] == 1
    problems = integrity_problems([rec])
    assert len(problems) == 1 and "queue_mismatch=1" in problems[0]
    assert "pair 1: driver tx_queue_1_packets 7, device 6" in problems[0]


def test_the_table_gives_the_ratio_to_one_pair():
    def rec(q: int, gbps: float) -> dict:
        return {"direction": GUEST_TO_HOST, "payload": 64, "strategy": "deferred",
                "queues": q, "gbps": gbps, "pps": gbps * 1e9 / 512, "seconds": 1.0,
                "packets": 1, "queue_packets": [100] * q, "device_cpu_seconds": 1.0,
                "driver_cpu_seconds": 1.0, "device_worker_cpu_seconds": [0.5] * q,
                "driver_worker_cpu_seconds": [0.4] * q if q > 1 else []}  # fmt: skip

    table = queues_table([rec(1, 0.1), rec(2, 0.15)], "t")
    cells = {c.header: c._cells for c in table.columns}
    assert cells["vs 1"] == ["-", "1.50x"]
    assert cells["per pair"] == ["0", "0/0"] and cells["drv cpu s"] == ["1.00", "1.00"]
    assert cells["cpu µs/pkt"] == ["2000000.0", "2000000.0"]  # 2 cpu s over one packet


def test_tap_queue_cases_pair_every_strategy_with_every_count():
    cases = tap_cases(["deferred"], 1.0, 1, queues=[1, 2])
    virtnet = [c for c in cases if c.strategy == "deferred"]
    assert sorted((c.direction, c.queues) for c in virtnet) == [
        (GUEST_TO_HOST, 1), (GUEST_TO_HOST, 2), (HOST_TO_GUEST, 1), (HOST_TO_GUEST, 2)]
    assert all(c.streams > 1 and c.protocol == "tcp" for c in cases)
    assert {c.strategy for c in cases} == {"veth", "relay", "deferred"}


# The kernel hashes each flow to one tap queue: with 4 flows all land on the same
# queue one time in 8 (seen), with 16 one time in 2**15.
SMOKE_STREAMS = 16


@pytest.mark.root
@pytest.mark.needs(unavailable_reason())
@pytest.mark.parametrize("direction", [GUEST_TO_HOST, HOST_TO_GUEST])
def test_two_tap_queues_both_carry_iperf3_streams(direction):
    case = TapCase("deferred", direction, "tcp", seconds=1, queues=2, streams=SMOKE_STREAMS)
    rec = run_tap_case(case)
    assert rec["queues"] == 2 and rec["bytes"] > 0
    q = "tx" if direction == GUEST_TO_HOST else "rx"
    for p in range(2):
        assert rec["driver_stats"][f"{q}_queue_{p}_packets"] > 0, (p, rec["queue_packets"])
        assert rec["device_stats"][f"{q}_queue_{p}_packets"] > 0, (p, rec["queue_packets"])
    assert len(rec["driver_worker_cpu_seconds"]) == len(rec["device_worker_cpu_seconds"]) == 2
