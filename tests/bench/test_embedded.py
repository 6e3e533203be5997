"""The embedded A/B: each (strategy, direction) runs end to end, intact and leak-free.

Benchmarks measure, tests assert behaviour: nothing here looks at a rate or a time.
A case runs for 0.2 s (at least one round of steps whatever the machine's load) and
must finish with every frame intact, nothing lost or reordered, and every page back.
"""

from __future__ import annotations

import json

import pytest

from virtnet.bench.embedded import (
    DIRECTIONS,
    GUEST_TO_HOST,
    HOST_TO_GUEST,
    Case,
    EmbeddedRun,
    make_pair,
    result_record,
    run_case,
    run_interleaved,
    strip_hdr,
)
from virtnet.bench.report import integrity_problems
from virtnet.cli import main
from virtnet.net.features import GUEST_OFFLOADS, SUPPORTED, VirtioNetF
from virtnet.net.stats import DEVICE_STATS, DRIVER_STATS
from virtnet.ports.synthetic import SINK_COUNTS, FrameGen
from virtnet.virtio.features import bit

# virtnet_probe: no MRG_RXBUF but GUEST_TSO → big buffers; neither → small ones.
BIG = SUPPORTED & ~bit(VirtioNetF.MRG_RXBUF)
SMALL = BIG & ~GUEST_OFFLOADS

SECONDS = 0.2
# (strategy, features): the seed's A/B plus the two non-mergeable paths.
STRATEGIES = [("deferred", SUPPORTED), ("prealloc", SUPPORTED), ("ewma", SUPPORTED), ("big", BIG),
              ("small", SMALL)]  # fmt: skip
RESULT_KEYS = {"mode", "strategy", "direction", "payload", "seconds", "packets", "bytes",
               "gbps", "pps", "driver_stats", "device_stats"}  # fmt: skip


def tiny(strategy: str, features: int, direction: str, payload: int = 1514) -> Case:
    return Case(strategy, direction, payload, seconds=SECONDS, queue_size=64, features=features)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(("strategy", "features"), STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_every_case_runs_intact_and_gives_every_page_back(strategy, features, direction):
    ticks = []
    result = run_case(tiny(strategy, features, direction), tick=ticks.append)
    assert RESULT_KEYS <= result.keys()  # DESIGN.md's JSON contract
    assert (result["mode"], result["strategy"], result["direction"]) == (
        "embedded", strategy, direction)  # fmt: skip
    integrity = result["integrity"]
    assert (integrity["corrupt"], integrity["lost"], integrity["reordered"]) == (0, 0, 0)
    assert integrity["messages"] == []
    assert result["packets"] > 0  # at least one round of steps ran
    assert result["bytes"] == result["packets"] * 1514
    drv = result["driver_stats"]
    assert set(drv) == set(DRIVER_STATS) and set(result["device_stats"]) == set(DEVICE_STATS)
    assert drv["pages_outstanding"] == 0
    assert drv["page_allocs"] == drv["page_frees"] and drv["skb_allocs"] == drv["skb_frees"]
    assert drv["rx_length_errors"] == drv["rx_dropped"] == 0
    assert ticks and all(0.0 <= t <= 1.0 for t in ticks) and ticks[-1] == 1.0
    if direction == GUEST_TO_HOST:
        assert result["acks"] > 0 and drv["tx_packets"] >= result["packets"]
        assert result["device_stats"]["tx_packets"] == result["packets"]
    else:
        assert drv["rx_packets"] == result["packets"]


@pytest.mark.parametrize("payload", [22, 65536 + 14])
def test_host_to_guest_extreme_payloads_stay_intact(payload):
    result = run_case(tiny("deferred", SUPPORTED, HOST_TO_GUEST, payload))
    assert result["integrity"]["corrupt"] == result["integrity"]["lost"] == 0
    assert result["driver_stats"]["pages_outstanding"] == 0


def test_the_seed_costs_one_skb_per_packet_and_the_baseline_one_per_buffer():
    # The A/B's point, as counts: host-to-guest, no tx, no errors.
    seed = run_case(tiny("deferred", SUPPORTED, HOST_TO_GUEST, 9000))["driver_stats"]
    base = run_case(tiny("prealloc", SUPPORTED, HOST_TO_GUEST, 9000))["driver_stats"]
    assert seed["skb_allocs"] == seed["rx_packets"]
    assert base["skb_allocs"] >= base["rx_bufs"] > base["rx_packets"]


def test_a_run_can_be_stepped_and_finished_by_hand():
    run = EmbeddedRun(tiny("deferred", SUPPORTED, HOST_TO_GUEST, 60))
    for _ in range(3):
        run.step()
    assert run.rx_sink.stats.packets > 0
    assert run.drv.stats.page_reuses > 0  # 60-byte frames: the seed's page reuse
    run.finish()
    assert run.drv.pool.outstanding == 0


def test_make_pair_builds_the_strategy_the_features_allow():
    for strategy, features in STRATEGIES:
        drv, dev = make_pair(tiny(strategy, features, HOST_TO_GUEST), lambda skb: skb.free())
        assert drv.strategy == strategy
        assert dev.mergeable == (strategy in ("deferred", "prealloc", "ewma"))
        drv.remove()


def test_strip_hdr_removes_a_header_spanning_segments():
    views = [memoryview(b"01234"), memoryview(b"5678901ab"), memoryview(b"cd")]
    assert b"".join(strip_hdr(views, 12)) == b"abcd"
    assert b"".join(strip_hdr([memoryview(b"x" * 12)], 12)) == b""


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(("payload", "queue_size"), [(64, 64), (1500, 256), (65536, 64)])
@pytest.mark.parametrize("packets", [1, 97])
def test_a_count_based_case_delivers_exactly_its_count(direction, payload, queue_size, packets):
    # --packets: the generator stops at the count (no batch of overshoot), every frame
    # arrives intact, and the teardown still gives every page back.
    case = Case("deferred", direction, payload, queue_size=queue_size, packets=packets)
    result = run_case(case)
    assert result["packets"] == packets and result["bytes"] == packets * payload
    integrity = result["integrity"]
    assert (integrity["corrupt"], integrity["lost"], integrity["reordered"]) == (0, 0, 0)
    assert result["driver_stats"]["pages_outstanding"] == 0
    key = "rx_packets" if direction == HOST_TO_GUEST else "tx_packets"
    assert result["device_stats"][key] == packets


def test_count_based_cases_interleave_and_each_stops_at_its_count():
    cases = [Case(s, HOST_TO_GUEST, 1500, packets=300) for s in ("prealloc", "deferred")]
    assert [r["packets"] for r in run_interleaved(cases)] == [300, 300]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--packets", "0"], "--packets must be >= 1"),
        (["--packets", "5", "--seconds", "1"], "exclude each other"),
        (["--packets", "5", "--mode", "vhost-user"], "not --mode vhost-user"),
        (["--packets", "5", "--tap"], "not --tap"),
    ],
)
def test_the_cli_refuses_packets_where_it_cannot_count(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_cli_runs_a_count_based_bench_and_writes_exact_counts(tmp_path):
    out = tmp_path / "r.json"
    rc = main(["bench", "--packets", "40", "--payloads", "64", "--json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    # 3 strategies (prealloc, deferred, ewma: the default) x 2 directions
    assert len(results) == 6 and all(r["packets"] == 40 for r in results)


def test_ewma_ties_up_less_buffer_memory_per_packet_than_the_seed():
    seed = run_case(tiny("deferred", SUPPORTED, HOST_TO_GUEST, 1500))["driver_stats"]
    ewma = run_case(tiny("ewma", SUPPORTED, HOST_TO_GUEST, 1500))["driver_stats"]
    assert seed["rx_truesize"] == seed["rx_bufs"] * 4096
    assert ewma["rx_truesize"] / ewma["rx_packets"] < seed["rx_truesize"] / seed["rx_packets"] / 2


# -- --xdp drop|pass|tx -------------------------------------------------------------------------


@pytest.mark.parametrize("xdp", ["drop", "pass", "tx"])
@pytest.mark.parametrize(("strategy", "features"), STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_xdp_cases_run_intact_and_give_every_page_back(strategy, features, xdp):
    case = Case(strategy, HOST_TO_GUEST, 1514, seconds=SECONDS, queue_size=64,
                features=features, xdp=xdp)  # fmt: skip
    result = run_case(case)
    drv = result["driver_stats"]
    assert result["xdp"] == xdp and result["packets"] > 0
    integrity = result["integrity"]
    assert (integrity["corrupt"], integrity["lost"], integrity["reordered"]) == (0, 0, 0)
    assert drv["pages_outstanding"] == 0 and drv["rx_xdp_aborted"] == 0
    assert drv["rx_xdp_packets"] == _frames(drv)
    if xdp == "drop":
        assert drv["rx_xdp_drops"] == result["packets"] and drv["rx_packets"] == 0
        if strategy != "prealloc":  # no skb for a dropped frame
            assert drv["skb_allocs"] == 0
    elif xdp == "tx":  # every frame went back to the host, which checked it
        assert drv["rx_xdp_tx"] == result["packets"] == result["device_stats"]["tx_packets"]
    else:
        assert drv["rx_packets"] == result["packets"]


def _frames(drv: dict) -> int:
    return drv["rx_packets"] + drv["rx_xdp_drops"] + drv["rx_xdp_tx"] + drv["rx_xdp_aborted"]


def test_xdp_drop_at_64_bytes_allocates_nothing_per_packet():
    for strategy in ("deferred", "ewma"):
        run = EmbeddedRun(Case(strategy, HOST_TO_GUEST, 64, queue_size=64, xdp="drop"))
        st = run.drv.stats
        posted = (st.skb_allocs, st.page_allocs)  # what probe allocated for the ring
        for _ in range(20):
            run.step()
        assert st.rx_xdp_drops >= 20 * 32  # many trips round the ring
        assert (st.skb_allocs, st.page_allocs) == posted
        run.finish()
        assert run.drv.pool.outstanding == 0


def _bad_frame(fault: str, gen: FrameGen) -> bytes:
    """One frame of ``gen``'s stream (or not) with ``fault`` done to it, as a device that
    cuts, grows, repeats or reorders frames would hand it to the guest."""
    if fault == "reordered":  # the next frame skipped here, sent after the following one
        late = _whole(gen)
        gen.advance()
        return late
    if fault == "duplicated":
        gen.seq -= 1
        again = _whole(gen)
        gen.advance()
        return again
    frame = _whole(gen)
    if fault == "foreign":  # an IPv4 frame: no place in the stream
        return frame[:12] + b"\x08\x00" + frame[14:]
    gen.advance()
    if fault == "short":
        return frame[:1000] if len(frame) > 1000 else frame[:30]
    assert fault == "long"
    return frame + bytes(16)


def _whole(gen: FrameGen) -> bytes:
    return b"".join(bytes(v) for v in gen.peek())


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("fault", ["short", "long", "duplicated", "reordered", "foreign"])
def test_a_frame_the_sink_flags_fails_the_run(fault, direction, ring):
    """issue 18.4: one bad frame among good ones reaches the guest's sink — the measured
    stream host-to-guest, the ACK stream guest-to-host — and the record names it."""
    case = Case("deferred", direction, 1500, queue_size=64, ring=ring)
    run = EmbeddedRun(case)
    gen = run.gen if direction == HOST_TO_GUEST else run.acks
    for _ in range(3):
        run.step()
    bad = _bad_frame(fault, gen)
    if fault == "reordered":  # the frame after the skipped one goes first
        assert run.dev.receive_packet(gen.peek(), gen.hdr)
        gen.advance()
    assert run.dev.receive_packet([memoryview(bad)], gen.hdr)
    run.dev.flush_rx()
    run.napi()
    for _ in range(3):
        run.step()
    run.finish()
    rec = result_record(case, "embedded", 1.0, run.result_sink(), run)
    integrity = rec["integrity"]
    assert {k: integrity[k] for k in SINK_COUNTS if integrity[k]} == {fault: 1}, integrity
    (problem,) = integrity_problems([rec])
    assert f"{fault}=1" in problem
    assert rec["driver_stats"]["pages_outstanding"] == 0
