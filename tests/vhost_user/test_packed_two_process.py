"""``virtnet driver`` ↔ ``virtnet device`` on packed rings, two processes over vhost-user.

Both ends offer RING_PACKED, so they negotiate it unless ``--features-off
RING_PACKED`` is given on either end. Each case asserts what was negotiated (the
driver's JSON, the device's log) and the exact counts of test_two_process.py's
``check_clean``, both directions at once, for every rx strategy.
"""

from __future__ import annotations

import pytest

from tests.vhost_user.conftest import run_driver
from tests.vhost_user.test_two_process import FEATURES_OFF, SECONDS, check_clean
from virtnet.virtio.features import VirtioF, has

OFF = ("--features-off", "RING_PACKED")


def _extra(strategy: str, queue_size: int | None) -> tuple[str, ...]:
    extra = FEATURES_OFF[strategy]
    if queue_size is not None:
        extra = (*extra, "--queue-size", str(queue_size))
    return extra


def _device_says_packed(dev) -> bool:
    line = next(ln for ln in dev.stderr().splitlines() if "features 0x" in ln)
    return "RING_PACKED" in line.split()


CASES = [("deferred", 1500, None), ("prealloc", 65536, 100), ("big", 1500, 255), ("small", 64, 7)]


@pytest.mark.parametrize(("strategy", "size", "qsize"), CASES,
                         ids=[f"{s}-{n}-q{q}" for s, n, q in CASES])  # fmt: skip
def test_both_ways_on_packed_rings_device_gen_driver_loopback(
    tmp_path, device_factory, strategy, size, qsize
):
    """device gen → guest rx → guest echo on tx → device sink, on packed rings (queue
    sizes that are not powers of two included)."""
    dev = device_factory(f"gen:{size}")
    run = run_driver(tmp_path, dev, "loopback", strategy=strategy, seconds=SECONDS,
                     extra=_extra(strategy, qsize))  # fmt: skip
    doc = dev.stop()
    assert has(run.result["features"], VirtioF.RING_PACKED)
    assert _device_says_packed(dev)
    ds, rs = check_clean(doc, run, strategy)
    sink, loop = doc["backend"], run.backend
    assert rs["rx_packets"] > 0 and rs["tx_packets"] > 0
    assert loop["sink_packets"] == rs["rx_packets"] == ds["rx_packets"] == sink["gen_packets"]
    assert rs["rx_packets"] == rs["tx_packets"] + loop["loopback_dropped"]
    assert sink["sink_packets"] == ds["tx_packets"] == rs["tx_packets"]
    assert sink["sink_bytes"] == size * sink["sink_packets"]
    assert sink["sink_lost"] <= loop["loopback_dropped"]


@pytest.mark.parametrize("strategy", ["deferred", "prealloc", "big", "small"])
def test_both_ways_on_packed_rings_driver_gen_device_loopback(tmp_path, device_factory, strategy):
    """guest tx → device echo → guest rx on packed rings: exact counts each way."""
    dev = device_factory("loopback")
    run = run_driver(tmp_path, dev, "gen:1500", strategy=strategy, seconds=SECONDS,
                     extra=FEATURES_OFF[strategy])  # fmt: skip
    doc = dev.stop()
    assert has(run.result["features"], VirtioF.RING_PACKED)
    ds, rs = check_clean(doc, run, strategy)
    loop, sink = doc["backend"], run.backend
    assert rs["tx_packets"] > 0 and rs["rx_packets"] > 0
    assert loop["sink_packets"] == ds["tx_packets"] == rs["tx_packets"]
    assert sink["sink_packets"] == rs["rx_packets"] == ds["rx_packets"]
    assert sink["sink_bytes"] == 1500 * sink["sink_packets"]
    delivered = sink["sink_packets"]
    assert delivered + loop["loopback_dropped"] + loop["loopback_queued"] == loop["sink_packets"]


@pytest.mark.parametrize("side", ["device", "driver"])
def test_features_off_ring_packed_on_either_end_gives_split_rings(tmp_path, device_factory, side):
    dev = device_factory("gen:1500", extra=OFF if side == "device" else ())
    run = run_driver(tmp_path, dev, "sink", strategy="deferred", seconds=SECONDS,
                     extra=OFF if side == "driver" else ())  # fmt: skip
    doc = dev.stop()
    assert not has(run.result["features"], VirtioF.RING_PACKED)
    assert not _device_says_packed(dev)
    ds, rs = check_clean(doc, run, "deferred")
    assert rs["rx_packets"] > 0
    assert run.backend["sink_packets"] == rs["rx_packets"] == doc["backend"]["gen_packets"]


def test_a_size_that_is_not_a_power_of_two_needs_packed_rings(tmp_path, device_factory):
    dev = device_factory("sink", extra=OFF)
    import subprocess

    from tests.vhost_user.conftest import driver_argv

    argv = driver_argv(dev.socket_path, "sink", tmp_path / "d.json", seconds=0.2,
                       extra=("--queue-size", "100"))  # fmt: skip
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode != 0
    assert "queue size 100 is not a power of 2: it needs packed rings" in done.stderr
