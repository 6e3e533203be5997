"""The measuring scripts in benchmarks/: their arithmetic and their child mode.

Running them whole takes valgrind (callgrind_per_packet.py) or root and minutes
(by_hand.py); here the parts that decide their figures are checked directly.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


cg = _load("callgrind_per_packet")


def test_two_counts_differenced_give_the_cost_of_one_packet():
    m = cg.Measure(cg.Config("deferred", "host-to-guest", 64, 256), (2000, 12000),
                   (500_000_000 + 2000 * 97_000, 500_000_000 + 12000 * 97_000))  # fmt: skip
    assert m.per_packet == 97_000 and m.fixed == 500_000_000
    assert m.as_dict()["instructions_per_packet"] == 97_000.0


def test_the_table_puts_queue_sizes_side_by_side():
    c = [cg.Config("deferred", "host-to-guest", 64, q) for q in (256, 4096)]
    ms = [cg.Measure(c[0], (1, 2), (100, 200)), cg.Measure(c[1], (1, 2), (100, 210))]
    table = cg.table(ms, "t")
    assert [col.header for col in table.columns][-3:] == [
        "queue 256 instr/pkt", "queue 4096 instr/pkt", "4096 / 256"]  # fmt: skip
    assert table.columns[-1]._cells == ["1.10x"]


@pytest.mark.parametrize(("text", "ok"), [("64=10:20", True), ("64=20:10", False),
                                          ("64:10", False)])  # fmt: skip
def test_counts_are_parsed_or_refused(text, ok):
    if ok:
        assert cg._counts_arg(text) == {64: (10, 20)}
    else:
        with pytest.raises(Exception, match="SIZE=SMALL:LARGE"):
            cg._counts_arg(text)


@pytest.mark.parametrize("ring", [[], ["packed"]], ids=["split", "packed"])
def test_the_child_runs_exactly_its_count_and_checks_every_frame(ring):
    # What runs under valgrind: one count-based case, the frame count printed last.
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "callgrind_per_packet.py"), "--one",
                           "deferred", "guest-to-host", "1500", "64", "123", *ring],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "123"


def test_by_hand_rows_show_integrity_and_latency():
    bh = _load("by_hand")
    rows = [
        {"run": "tap <-> tap, iperf3 TCP", "direction": "guest-to-host", "frame": "mtu 1500",
         "seconds": 4.0, "gbps": 2.5, "kpps": None, "retransmits": 3,
         "rtt_ms": {"min_ms": 0.1, "avg_ms": 0.2, "max_ms": 0.4}},
        {"run": "device gen:64 <-> driver sink", "direction": "host-to-guest", "frame": "64B",
         "seconds": 5.0, "gbps": 0.05, "kpps": 90.0, "driver_cpu_seconds": 4.0,
         "integrity": {"corrupt": 0, "lost": 2, "reordered": 0, "foreign": 0}},
    ]  # fmt: skip
    notes = bh.table(rows, "t").columns[-1]._cells
    assert notes[0] == "ping 0.100/0.200/0.400 ms, 3 retransmits"
    assert notes[1].startswith("INTEGRITY {'lost': 2}")


def test_the_build_table_gives_compiled_over_pure_per_queue_size():
    ms = [cg.Measure(cg.Config("deferred", "host-to-guest", 64, 256, b), (1, 2), (100, 100 + n),
                     label)
          for b, n, label in (("pure", 99_000, "pure Python"),
                              ("compiled", 33_000, "compiled (mypyc 2.4.1)"))]  # fmt: skip
    table = cg.build_table(ms, "t")
    assert [col.header for col in table.columns][-3:] == [
        "queue 256 pure", "queue 256 compiled", "compiled/pure"]  # fmt: skip
    assert [col._cells[0] for col in table.columns][-3:] == ["99,000", "33,000", "0.33x"]
    assert ms[1].as_dict()["build"] == "compiled (mypyc 2.4.1)"  # the child's own word


def test_the_child_says_which_build_it_ran():
    from virtnet._build import PURE, PURE_ENV

    proc = subprocess.run([sys.executable, str(BENCHMARKS / "callgrind_per_packet.py"), "--one",
                           "deferred", "host-to-guest", "64", "64", "50"],
                          capture_output=True, text=True, timeout=120,
                          env=os.environ | {PURE_ENV: "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == [PURE, "50"]


@pytest.mark.parametrize("build", ["compiled", "pure,compiled", "bogus"])
def test_a_build_this_install_cannot_run_is_a_usage_error(build):
    from virtnet._build import PURE_ENV, read_info

    proc = subprocess.run([sys.executable, str(BENCHMARKS / "callgrind_per_packet.py"),
                           "--build", build], capture_output=True, text=True, timeout=60,
                          env=os.environ | {PURE_ENV: "1"})  # fmt: skip
    assert proc.returncode == 2
    if build == "bogus":
        assert "--build bogus: choose from pure, compiled" in proc.stderr
    elif read_info() is None:
        assert "--build compiled: this install is pure Python: pip install ." in proc.stderr
    else:
        assert f"--build compiled: {PURE_ENV}=1 is set in the environment" in proc.stderr
