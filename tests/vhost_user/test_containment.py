"""Containment in ``virtnet device``: what one front-end does cannot take down the
process, nor disturb the front-end being served. Real processes throughout."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.vhost_user.conftest import DRIVER_SLACK, driver_argv, run_driver
from tests.vhost_user.test_hostile_frontend import MEM_SIZE, UVA, Case, RunningRings
from virtnet.net.guest import TX
from virtnet.vhost_user.messages import MemoryRegionDesc


def test_a_frontend_cannot_shrink_its_memory_under_the_device(device_factory, tmp_path):
    """The device seals the memfd (F_SEAL_SHRINK) when it maps it: the truncate that
    would turn the device's next access into SIGBUS fails in the front-end instead."""
    dev = device_factory("sink")
    case = Case(dev)
    rings = RunningRings(case, seal=False)  # a memfd that allows seals and has none
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(rings.guest.fd, 4096)
        assert os.fstat(rings.guest.fd).st_size == rings.guest.size
        # the device still reads the whole memory: a frame at its far end goes through
        rings.drv.svq.add(rings.frame_chain(0), (), "frame")
        os.eventfd_write(rings.kick[TX], 1)
        assert rings.wait_used(TX, 1) == [("frame", 0)]
    finally:
        rings.close()
        case.close()
    assert dev.alive(), dev.stderr()
    assert "a front-end that shrinks it can crash" not in dev.stderr()
    again = run_driver(tmp_path, dev, "gen:1500", seconds=0.5)  # the next session is served
    assert again.stats["tx_packets"] > 0
    doc = dev.stop()
    assert doc["sessions"] == 2 and doc["backend"]["sink_corrupt"] == 0


def test_a_memfd_that_cannot_be_sealed_is_named_in_the_log(device_factory):
    case = Case(device_factory("sink"))
    try:
        case.negotiate()
        assert case.set_mem_table(MemoryRegionDesc(0, MEM_SIZE, UVA, 0), fds=(case.memfd(),)) == 0
        case.log("F_SEAL_SHRINK refused")
        case.log("a front-end that shrinks it can crash this process")
    finally:
        case.close()


def test_a_second_frontend_is_refused_and_the_first_goes_on(device_factory, tmp_path):
    """Two real ``virtnet driver`` processes: the second is turned away with a clear
    error while the first runs on; the first's counts come out whole."""
    dev = device_factory("loopback")
    first_json = tmp_path / "first.json"
    argv = driver_argv(dev.socket_path, "gen:1000", first_json, seconds=3.0)
    first = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        dev.wait_for_log("device running", timeout=20)
        second_json = tmp_path / "second.json"
        second = subprocess.run(driver_argv(dev.socket_path, "sink", second_json, seconds=1.0),
                                capture_output=True, text=True, timeout=DRIVER_SLACK)  # fmt: skip
        out, err = first.communicate(timeout=3.0 + DRIVER_SLACK)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode != 0 and not second_json.exists()
    assert "closed the connection before answering" in second.stderr, second.stderr
    assert "is another front-end connected to it?" in second.stderr
    assert "refusing a second front-end" in dev.stderr()
    assert first.returncode == 0, err
    run = json.loads(first_json.read_text())
    drv, sink = run["driver_stats"], run["backend"]
    doc = dev.stop()
    ds, loop = doc["device_stats"], doc["backend"]
    assert doc["sessions"] == 1 and ds["desc_errors"] == 0
    # the first session's counts are whole: every frame it sent reached the device, and
    # every echo was delivered intact or counted as dropped by the full echo queue
    assert drv["tx_packets"] > 0 and loop["sink_packets"] == ds["tx_packets"] == drv["tx_packets"]
    assert sink["sink_packets"] == drv["rx_packets"] == ds["rx_packets"]
    assert sink["sink_corrupt"] == 0 and sink["sink_lost"] <= loop["loopback_dropped"]
