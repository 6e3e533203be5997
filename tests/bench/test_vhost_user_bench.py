"""virtnet bench --mode vhost-user: two real processes per turn, every byte checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from virtnet.bench.embedded import DIRECTIONS, GUEST_TO_HOST, Case
from virtnet.bench.report import integrity_problems
from virtnet.bench.vhost_user import _accumulate, _record, run_vhost_user_group
from virtnet.net.header import MRG_HDR_LEN
from virtnet.ports.backends import SinkDevice
from virtnet.ports.synthetic import SINK_COUNTS, FrameGen


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_a_group_runs_both_strategies_over_vhost_user_intact(direction):
    cases = [Case(s, direction, 1500, seconds=0.5) for s in ("prealloc", "deferred")]
    recs = run_vhost_user_group(cases)
    for case, rec in zip(cases, recs, strict=True):
        assert rec["mode"] == "vhost-user" and rec["strategy"] == case.strategy
        assert rec["packets"] > 0 and rec["bytes"] == rec["packets"] * 1500
        # Every count the receiving sink kept, none a constant: corrupt, lost, a frame
        # going backwards (duplicated or reordered), a frame that is not the stream's.
        # And each queue pair's count the same at both ends (queue_mismatch).
        assert rec["integrity"] == {**dict.fromkeys(SINK_COUNTS, 0), "queue_mismatch": 0,
                                    "messages": []}  # fmt: skip
        drv = rec["driver_stats"]
        assert drv["pages_outstanding"] == 0 and drv["skb_allocs"] == drv["skb_frees"]
        key = "rx_packets" if direction == "host-to-guest" else "tx_packets"
        assert drv[key] == rec["device_stats"][key] == rec["packets"]
    assert integrity_problems(recs) == []


def test_the_cli_writes_the_designed_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "virtnet", "bench", "--mode", "vhost-user", "--seconds", "0.5",
         "--payloads", "64", "--directions", "host-to-guest", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert {r["strategy"] for r in results} == {"prealloc", "deferred", "ewma"}  # the default
    for r in results:
        assert set(r) >= {"mode", "strategy", "direction", "payload", "seconds", "packets",
                          "bytes", "gbps", "pps", "driver_stats", "device_stats",
                          "rtt_ms"}  # fmt: skip
        assert r["rtt_ms"]["received"] > 0 and r["rtt_ms"]["avg_ms"] > 0
    assert "round trip over vhost-user" in proc.stdout


def _device_xmit(sink: SinkDevice, frame: bytes) -> None:
    """A guest→host frame as the device hands it to its backend: header first."""
    sink.xmit([memoryview(bytes(MRG_HDR_LEN)), memoryview(frame)], MRG_HDR_LEN + len(frame))


def test_a_duplicated_and_a_foreign_frame_fail_the_run():
    # The same accounting as a real run (device backend stats → the process's JSON →
    # _accumulate → _record → integrity_problems), fed a stream with frame 1 twice
    # and one IPv4 frame: the check the test above relies on can fail.
    sink, gen, frames = SinkDevice(), FrameGen(1500), []
    for _ in range(3):
        frames.append(b"".join(bytes(v) for v in gen.peek()))
        gen.advance()
    ipv4 = bytes(12) + b"\x08\x00" + bytes(50)
    for frame in (frames[0], frames[1], frames[1], frames[2], ipv4):
        _device_xmit(sink, frame)
    driver = {"seconds": 1.0, "cpu_seconds": 1.0, "driver_stats": {}, "backend": {}}
    device = {"device_stats": {}, "backend": sink.stats()}
    acc: dict = {}
    _accumulate(acc, driver, device)
    rec = _record(Case("deferred", GUEST_TO_HOST, 1500), acc)
    assert rec["integrity"]["duplicated"] == 1 and rec["integrity"]["foreign"] == 1
    assert rec["integrity"]["corrupt"] == rec["integrity"]["lost"] == 0
    problems = integrity_problems([rec])
    assert len(problems) == 1 and "duplicated=1" in problems[0] and "foreign=1" in problems[0]


def _cut(frames: list[bytes]) -> list[bytes]:
    return [frames[0], frames[1][:1000], frames[2]]


def _runt(frames: list[bytes]) -> list[bytes]:
    return [frames[0], frames[1][:20], frames[2]]


def _grown(frames: list[bytes]) -> list[bytes]:
    return [frames[0], frames[1] + bytes(8), frames[2]]


def _late(frames: list[bytes]) -> list[bytes]:
    return [frames[0], frames[2], frames[1]]


def _corrupted(frames: list[bytes]) -> list[bytes]:
    return [frames[0], frames[1][:-1] + b"!", frames[2]]


def _skipped(frames: list[bytes]) -> list[bytes]:
    return [frames[0], frames[2]]


@pytest.mark.parametrize(
    ("damage", "counts"),
    [
        (_cut, {"short": 1}),
        (_runt, {"short": 1, "lost": 1}),  # cut before its sequence number
        (_grown, {"long": 1}),
        (_late, {"reordered": 1}),
        (_corrupted, {"corrupt": 1}),
        (_skipped, {"lost": 1}),
    ],
)  # fmt: skip
def test_each_count_of_the_receiving_sink_fails_the_run(damage, counts):
    # issue 18.4: through the processes' accounting (backend stats -> JSON ->
    # _accumulate -> _record -> integrity_problems) each sink count reaches the verdict.
    sink, gen, frames = SinkDevice(), FrameGen(1500), []
    for _ in range(3):
        frames.append(b"".join(bytes(v) for v in gen.peek()))
        gen.advance()
    for frame in damage(frames):
        _device_xmit(sink, frame)
    acc: dict = {}
    _accumulate(acc, {"seconds": 1.0, "cpu_seconds": 1.0, "driver_stats": {}, "backend": {}},
                {"device_stats": {}, "backend": sink.stats()})  # fmt: skip
    rec = _record(Case("deferred", GUEST_TO_HOST, 1500), acc)
    assert {k: n for k in SINK_COUNTS if (n := rec["integrity"][k])} == counts
    (problem,) = integrity_problems([rec])
    assert all(f"{k}={n}" in problem for k, n in counts.items())


def test_an_intact_stream_through_the_same_accounting_passes():
    sink, gen = SinkDevice(), FrameGen(64)
    for _ in range(5):
        _device_xmit(sink, b"".join(bytes(v) for v in gen.peek()))
        gen.advance()
    acc: dict = {}
    _accumulate(acc, {"seconds": 1.0, "cpu_seconds": 1.0, "driver_stats": {}, "backend": {}},
                {"device_stats": {}, "backend": sink.stats()})  # fmt: skip
    rec = _record(Case("deferred", GUEST_TO_HOST, 64), acc)
    assert rec["packets"] == 5 and integrity_problems([rec]) == []


def test_the_round_trip_is_timed_through_the_device_loopback_and_every_echo_checked():
    from virtnet.bench.rtt import round_trip

    rtt = round_trip("deferred", seconds=0.3)
    assert rtt["received"] > 0 and rtt["sent"] - rtt["received"] in (0, 1)  # one in flight
    assert 0 < rtt["min_ms"] <= rtt["avg_ms"] <= rtt["max_ms"]
    assert rtt["integrity"] == dict.fromkeys(SINK_COUNTS, 0)


def test_a_bad_echo_fails_the_run():
    rec = {"strategy": "deferred", "direction": GUEST_TO_HOST, "payload": 64,
           "integrity": {}, "driver_stats": {},
           "rtt_ms": {"integrity": {"corrupt": 0, "lost": 0, "reordered": 1, "foreign": 0}}}
    assert integrity_problems([rec]) == ["deferred round trip echo: {'corrupt': 0, 'lost': 0, "
                                         "'reordered': 1, 'foreign': 0}"]  # fmt: skip


@pytest.mark.parametrize("xdp", ["drop", "tx"])
def test_xdp_runs_over_vhost_user(xdp):
    """--xdp reaches the driver process: drop counts frames no skb was made for, tx sends
    the stream back to the device, whose sink checks it."""
    cases = [Case(s, "host-to-guest", 1500, seconds=0.5, xdp=xdp) for s in ("deferred", "ewma")]
    for rec in run_vhost_user_group(cases):
        drv = rec["driver_stats"]
        assert rec["xdp"] == xdp and rec["packets"] > 0
        assert drv["rx_packets"] == 0 and drv["rx_xdp_aborted"] == 0
        assert drv["pages_outstanding"] == 0
        if xdp == "drop":
            assert rec["packets"] == drv["rx_xdp_drops"] == rec["device_stats"]["rx_packets"]
            assert drv["skb_allocs"] == 0
        else:
            assert rec["packets"] == drv["rx_xdp_tx"] == rec["device_stats"]["tx_packets"]
            integrity = rec["integrity"]
            assert integrity["corrupt"] == 0 and integrity["lost"] <= drv["rx_xdp_drops"]
