"""Every bench record and title says which build ran it; --build runs both side by side.

Correct on either install: on a pure one, ``--build compiled`` must be refused (exit 2)
and every label says "pure Python"; on a compiled one, the compiled label is asserted
where it runs and the refusal is checked with ``VIRTNET_PURE=1`` in the environment.
Benchmarks measure, tests assert behaviour: no rate is asserted, runs are short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from virtnet._build import PURE, PURE_ENV, build_name, read_info
from virtnet.bench.builds import BuildError, check, merge, processes_build, unavailable
from virtnet.bench.embedded import HOST_TO_GUEST, Case, run_case
from virtnet.bench.report import build_table, by_build
from virtnet.bench.tap import GUEST_TO_HOST, _record, tap_cases
from virtnet.bench.vhost_user import run_vhost_user_group
from virtnet.cli import main
from virtnet.ports.iperf import IperfResult

SHORT = ["--payloads", "64", "--strategies", "deferred", "--directions", "host-to-guest"]
COMPILED = unavailable("compiled") is None  # this install can run the compiled build


def _flat(text: str) -> str:
    """Output with its line breaks and padding gone: a wrapped title reads as one line."""
    return " ".join(text.split())


def _bench(tmp_path, capsys, *args: str) -> tuple[list[dict], str]:
    out = tmp_path / "r.json"
    assert main(["bench", *SHORT, "--json", str(out), *args]) == 0
    return json.loads(out.read_text())["results"], _flat(capsys.readouterr().out)


def test_every_record_and_title_says_the_running_build(tmp_path, capsys):
    results, text = _bench(tmp_path, capsys, "--seconds", "0.3")
    assert results and all(r["build"] == build_name() for r in results)
    assert f"Python 3.{sys.version_info.minor}" in text and f"{_flat(build_name())} " in text
    assert run_case(Case("deferred", HOST_TO_GUEST, 64, seconds=0.1))["build"] == build_name()


def test_build_pure_runs_in_a_pure_child_and_says_so(tmp_path, capsys):
    results, text = _bench(tmp_path, capsys, "--build", "pure", "--seconds", "0.3")
    assert [r["build"] for r in results] == [PURE]
    assert results[0]["packets"] > 0 and results[0]["integrity"]["lost"] == 0
    assert results[0]["driver_stats"]["pages_outstanding"] == 0
    assert f"Python 3.{sys.version_info.minor}.{sys.version_info.micro}, pure Python" in text


def test_a_count_based_case_runs_its_count_once_per_build(tmp_path, capsys):
    results, _ = _bench(tmp_path, capsys, "--build", "pure", "--packets", "300", "--runs", "2")
    assert [(r["build"], r["packets"]) for r in results] == [(PURE, 300), (PURE, 300)]


def test_build_compiled_runs_or_is_refused_with_the_reason(tmp_path, capsys):
    if COMPILED:
        results, text = _bench(tmp_path, capsys, "--build", "pure,compiled", "--seconds", "0.3")
        assert [r["build"] for r in results] == [PURE, build_name()]
        assert build_name().startswith("compiled (mypyc ")
        assert "compiled / pure: each case on both builds" in text
        return
    assert main(["bench", *SHORT, "--build", "pure,compiled"]) == 2
    err = capsys.readouterr().err
    if read_info() is None:
        assert "--build compiled: this install is pure Python: pip install . on a machine " \
               "with a C compiler and python3-dev" in err  # fmt: skip
    else:  # a compiled install whose compiled modules cannot be used here
        assert "--build compiled: " in err


def test_build_compiled_is_refused_under_virtnet_pure():
    env = os.environ | {PURE_ENV: "1"}
    proc = subprocess.run([sys.executable, "-m", "virtnet", "bench", *SHORT, "--build",
                           "compiled"], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 2
    why = "this install is pure Python" if read_info() is None else f"{PURE_ENV}=1 is set"
    assert f"virtnet bench: --build compiled: {why}" in proc.stderr


def test_the_vhost_user_processes_write_their_build_and_the_record_keeps_it():
    [rec] = run_vhost_user_group([Case("deferred", HOST_TO_GUEST, 64, seconds=0.3)])
    assert rec["build"] == build_name()
    [rec] = run_vhost_user_group([Case("deferred", GUEST_TO_HOST, 64, seconds=0.3,
                                       build="pure")])  # fmt: skip
    assert rec["build"] == PURE and rec["packets"] > 0


def test_vhost_user_mode_with_build_pure_labels_rates_and_round_trips(tmp_path, capsys):
    results, text = _bench(tmp_path, capsys, "--mode", "vhost-user", "--build", "pure",
                           "--seconds", "0.3")  # fmt: skip
    assert [r["build"] for r in results] == [PURE]
    assert results[0]["rtt_ms"]["received"] > 0
    assert "deferred pure" in text  # the round trip's row, per strategy and build


def test_a_child_of_another_build_than_asked_fails_the_measurement():
    check("pure", PURE)
    check("", "compiled (mypyc 2.4.1)")  # "": this process's build, whatever it is
    with pytest.raises(BuildError, match="asked for the compiled build"):
        check("compiled", PURE)
    with pytest.raises(BuildError, match="asked for the pure build"):
        processes_build("pure", {"build": "compiled (mypyc 2.4.1)"},
                        {"build": "compiled (mypyc 2.4.1)"})  # fmt: skip
    with pytest.raises(BuildError, match="the driver ran 'pure Python', the device"):
        processes_build("", {"build": PURE}, {"build": "compiled (mypyc 2.4.1)"})
    assert processes_build("pure", {"build": PURE}, {"build": PURE}) == PURE
    assert processes_build("pure", {}, {}) is None  # neither wrote its JSON


def _rec(build: str, gbps: float, strategy: str = "deferred") -> dict:
    return {"build": build, "strategy": strategy, "direction": HOST_TO_GUEST, "payload": 64,
            "gbps": gbps, "pps": gbps * 1e9 / 8 / 64}  # fmt: skip


def test_the_build_table_puts_pure_and_compiled_side_by_side_with_their_ratio():
    comp = "compiled (mypyc 2.4.1)"
    recs = [_rec(PURE, 0.1), _rec(comp, 0.25), _rec(PURE, 0.2, "veth")]
    table = build_table(recs, "t")
    cells = [c._cells for c in table.columns]
    assert [c.header for c in table.columns][-5:] == [
        "pure kpps", "compiled kpps", "pure Mb/s", "compiled Mb/s", "compiled/pure"]
    # One row: veth ran on one build only, nothing to compare.
    assert [c for col in cells for c in col] == ["host→guest", "64B", "deferred", "195", "488",
                                                 "100", "250", "2.50x"]  # fmt: skip
    groups = by_build(recs, shared=("veth",))
    assert list(groups) == [PURE, comp] and [r["strategy"] for r in groups[comp]] == [
        "deferred", "veth"]  # fmt: skip


def test_two_turns_of_a_case_merge_into_one_record():
    a = run_case(Case("deferred", HOST_TO_GUEST, 64, seconds=0.1))
    b = run_case(Case("deferred", HOST_TO_GUEST, 64, seconds=0.1))
    m = merge(a, b)
    assert m["packets"] == a["packets"] + b["packets"] and m["bytes"] == m["packets"] * 64
    assert m["pps"] == m["packets"] / m["seconds"] and m["build"] == a["build"]
    drv = m["driver_stats"]
    assert drv["rx_packets"] == a["driver_stats"]["rx_packets"] + b["driver_stats"]["rx_packets"]
    assert m["integrity"]["lost"] == 0 and m["integrity"]["messages"] == []


def test_real_traffic_cases_run_each_virtnet_case_once_per_build_the_baselines_once():
    cases = tap_cases(["deferred"], 1.0, 1, builds=["pure", "compiled"])
    virtnet = [(c.direction, c.protocol, c.build) for c in cases if c.strategy == "deferred"]
    assert virtnet == [(d, p, b) for d, p in (("guest-to-host", "tcp"), ("host-to-guest", "tcp"),
                                              ("host-to-guest", "udp"))
                       for b in ("pure", "compiled")]  # fmt: skip
    assert {c.build for c in cases if c.strategy in ("veth", "relay")} == {""}
    plain = tap_cases(["deferred"], 1.0, 2)  # without --build: as before, this process's
    assert len(plain) == 10 and {c.build for c in plain} == {""}
    rec = _record(cases[0], IperfResult("tcp", 1.0, 1e9, 125_000_000), {}, {}, {})
    assert rec["build"] == build_name()  # a baseline: the bench process's
