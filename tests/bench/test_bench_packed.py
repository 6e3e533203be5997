"""``virtnet bench`` on packed rings: every strategy both ways intact and leak-free in
process, 65536-byte frames over a queue size that is not a power of two, split and
packed side by side in one run, and --ring on the command line."""

from __future__ import annotations

import json

import pytest

from tests.bench.test_embedded import SECONDS, STRATEGIES
from virtnet.bench.embedded import DIRECTIONS, GUEST_TO_HOST, HOST_TO_GUEST, Case, run_case
from virtnet.bench.vhost_user import run_vhost_user_group
from virtnet.cli import main
from virtnet.net.features import SUPPORTED


def packed(strategy: str, features: int, direction: str, payload: int = 1514,
           queue_size: int = 64) -> Case:  # fmt: skip
    return Case(strategy, direction, payload, seconds=SECONDS, queue_size=queue_size,
                features=features, ring="packed")  # fmt: skip


def _intact(result: dict) -> None:
    integrity = result["integrity"]
    assert (integrity["corrupt"], integrity["lost"], integrity["reordered"]) == (0, 0, 0)
    assert result["packets"] > 0
    drv = result["driver_stats"]
    assert drv["pages_outstanding"] == 0 and drv["page_allocs"] == drv["page_frees"]
    assert drv["skb_allocs"] == drv["skb_frees"]
    assert drv["rx_length_errors"] == drv["rx_dropped"] == 0
    assert result["device_stats"]["desc_errors"] == 0


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(("strategy", "features"), STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_every_case_runs_intact_on_packed_rings(strategy, features, direction):
    result = run_case(packed(strategy, features, direction))
    assert result["ring"] == "packed"
    _intact(result)
    if direction == GUEST_TO_HOST:
        assert result["device_stats"]["tx_packets"] == result["packets"]
    else:
        assert result["driver_stats"]["rx_packets"] == result["packets"]


def test_tso_frames_over_a_packed_ring_of_100_slots():
    result = run_case(packed("deferred", SUPPORTED, HOST_TO_GUEST, 65536 + 14, queue_size=100))
    _intact(result)
    assert result["device_stats"]["rx_num_buffers_max"] > 1


def test_vhost_user_group_on_packed_rings():
    cases = [Case(s, HOST_TO_GUEST, 1514, seconds=0.5, queue_size=128, ring=r)
             for r in ("split", "packed") for s in ("prealloc", "deferred")]  # fmt: skip
    results = run_vhost_user_group(cases)
    assert [r["ring"] for r in results] == ["split", "split", "packed", "packed"]
    for r in results:
        assert r["packets"] > 0 and r["integrity"]["corrupt"] == r["integrity"]["lost"] == 0


def test_the_cli_runs_split_and_packed_side_by_side(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--ring", "split,packed", "--strategies", "deferred", "--directions",
               "host-to-guest", "--payloads", "1500", "--seconds", "0.2", "--queue-size", "64",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert sorted((r["strategy"], r["ring"]) for r in results) == [
        ("deferred", "packed"), ("deferred", "split")]  # fmt: skip
    text = capsys.readouterr().out
    assert "split/packed rings" in text and "deferred packed" in text


def test_the_cli_default_ring_is_the_negotiated_one_and_sizes_are_checked(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--strategies", "deferred", "--directions", "host-to-guest",
                 "--payloads", "64", "--seconds", "0.1", "--queue-size", "48",
                 "--json", str(out)]) == 0  # fmt: skip
    assert [r["ring"] for r in json.loads(out.read_text())["results"]] == ["packed"]
    assert main(["bench", "--ring", "split", "--queue-size", "48", "--seconds", "0.1"]) == 2
    assert "not a power of 2" in capsys.readouterr().err
