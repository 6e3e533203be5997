"""In-flight tracking across a device that dies (vhost-user.rst "Inflight I/O tracking").

``virtnet driver --reconnect`` sends to ``virtnet device --faults hold``, which sends
three tx chains out of its port but keeps them from the used ring while it goes on
using the chains after them: out-of-order completion, as a real device with a slow
back-end does. The device is killed with SIGKILL with those three in flight, and a
new one (no faults) takes its socket; the driver reconnects by itself.

With the in-flight region (PROTOCOL_F_INFLIGHT_SHMFD, negotiated by default) the new
device resubmits the three first (then whatever burst the old one had taken and not
used), and every chain the driver posted is completed exactly once: ``tx_completed ==
tx_packets``, no used-ring error.

What the used index alone gives a restarted device is shown where it is deterministic,
on the ring (tests/virtio/test_inflight.py): here, without the region, the outcome
depends on timing (docs/design.md "In-flight tracking": a driver that re-posts freed
heads quickly can mask the double use until the end of the run).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.vhost_user.conftest import DRIVER_SLACK, DeviceProcess, driver_argv, start_device

HELD = 3
HOLD = ("--faults", f"hold:rate=1:count={HELD}:after=40")
SECONDS = 8.0
SPLIT = ("--features-off", "RING_PACKED")
RINGS = {"split": SPLIT, "packed": ()}  # virtnet negotiates packed rings where offered


def run(tmp_path: Path, queues: int, ring: str = "split"
        ) -> tuple[subprocess.CompletedProcess, dict, str, str, dict]:  # fmt: skip
    """Driver against a device killed with HELD chains in flight on each queue pair, then
    a second one; (driver exit, driver JSON, first and second device's stderr, second
    device's JSON)."""
    mq = ("--queues", str(queues))
    first = start_device(tmp_path, "sink", "dev", extra=(*HOLD, *mq))
    json_path = tmp_path / "drv.json"
    argv = driver_argv(first.socket_path, "gen:1000", json_path, seconds=SECONDS,
                       extra=("--reconnect", *RINGS[ring], *mq, "-v"))  # fmt: skip
    err_path = tmp_path / "drv.stderr"
    second: DeviceProcess | None = None
    with open(err_path, "w") as err:
        drv = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=err)  # fmt: skip
        try:
            deadline = time.monotonic() + 20.0
            while first.stderr().count(f"({HELD} held)") < queues:  # every pair's worker
                assert time.monotonic() < deadline and first.alive(), first.stderr()
                time.sleep(0.02)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(timeout=10)
            first_log = first.stderr()  # the second device's stderr takes its file
            (tmp_path / "first.stderr").write_text(first_log)
            second = start_device(tmp_path, "sink", "dev", extra=mq)
            drv.wait(timeout=SECONDS + DRIVER_SLACK)
        finally:
            if drv.poll() is None:
                drv.kill()
                drv.wait()
    driver_err = err_path.read_text()
    assert second is not None
    result = second.stop()
    assert json_path.exists(), driver_err
    done = subprocess.CompletedProcess(argv, drv.returncode, "", driver_err)
    return done, json.loads(json_path.read_text()), first_log, second.stderr(), result


@pytest.mark.parametrize(("ring", "queues"), [("split", 1), ("split", 2), ("packed", 1),
                                               ("packed", 2)])
def test_every_tx_chain_is_completed_exactly_once_across_a_device_kill(tmp_path, ring, queues):
    done, drv, first_log, second_log, second = run(tmp_path, queues, ring)
    assert done.returncode == 0, done.stderr
    assert f"in-flight region made: {2 * queues} {ring} queues" in first_log, first_log
    assert bool(drv["features"] & 1 << 34) == (ring == "packed")  # VIRTIO_F_RING_PACKED
    stats = drv["driver_stats"]
    assert drv["reconnects"] == 1, done.stderr
    # Each pair's held chains, and any burst its worker had taken and not yet used when
    # it died, are resubmitted: the held ones first, in the order they were taken.
    assert second["inflight"]["tx_resubmitted"] >= queues * HELD, second
    for pair in range(queues):
        held = re.findall(rf"queue pair {pair}: fault hold injected: vq 1: tx chain (\d+) "
                          r"sent and kept", first_log)  # fmt: skip
        assert len(held) == HELD, first_log
        resubmitted = re.search(rf"queue pair {pair}: tx ring: in-flight region recovered: "
                                r"\d+ chains? resubmitted \[([\d, ]*)", second_log)  # fmt: skip
        assert resubmitted, second_log
        assert resubmitted[1].split(", ")[:HELD] == held, (held, second_log)
    assert stats["tx_packets"] > queues * (40 + HELD)  # traffic went on past the held chains
    assert stats["tx_completed"] == stats["tx_packets"], stats  # none lost, none twice
    assert stats["tx_dropped"] == 0 and stats["pages_outstanding"] == 0, stats
    assert second["device_stats"]["tx_packets"] > queues * HELD  # the new device carried it


def test_a_clean_stop_releases_the_held_chains(tmp_path):
    """``hold`` without a kill: the ring's stop uses the kept chains, nothing is lost."""
    dev = start_device(tmp_path, "sink", "dev", extra=HOLD)
    json_path = tmp_path / "drv.json"
    argv = driver_argv(dev.socket_path, "gen:1000", json_path, seconds=2.0, extra=SPLIT)
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=2.0 + DRIVER_SLACK)  # fmt: skip
    assert done.returncode == 0, done.stderr
    stats = json.loads(json_path.read_text())["driver_stats"]
    result = dev.stop()
    assert result["device_stats"]["fault_hold"] == HELD
    assert "3 held chains used at the ring's stop" in dev.stderr()
    assert stats["tx_completed"] == stats["tx_packets"], stats
