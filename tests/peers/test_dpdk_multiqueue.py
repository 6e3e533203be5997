"""virtnet with two queue pairs (VIRTIO_NET_F_MQ) against DPDK testpmd, per queue.

* testpmd ``net_virtio_user0,queues=2`` (``--rxq=2 --txq=2``) in front of
  ``virtnet device --queues 2``: each queue pair is its own worker with its own back-end
  (sink, gen:SIZE, loopback), so each of testpmd's forwarding streams (rx queue p -> tx queue
  p) meets pair p alone. testpmd's per-stream forward statistics are compared with the
  device's ``rx_queue_P_*`` / ``tx_queue_P_*`` counters.
* testpmd ``net_vhost0,queues=2`` (``--rxq=2 --txq=2``) behind ``virtnet driver --queues
  2``: exact per queue both ways, as with one queue (the receiver or the sender stops first).

What is exact and why (docs/dpdk.md, "multiqueue"):

* loopback, testpmd ``io --tx-first``: exact per queue. Each stream's first burst is the only
  thing in flight; nothing is lost or made up on either pair.
* device gen -> testpmd rxonly: exact per queue except for frames the device wrote before
  the virtio PMD's start flushed its rx rings. ``virtio_dev_start`` sends the control queue's
  VQ_PAIRS_SET (virtio_user turns it into SET_VRING_ENABLE for pair 1), *then* discards what
  is already in each rx ring ("Flush the old packets"): the device, started by that enable,
  may have filled pair 1's ring meanwhile. So the device's count is testpmd's plus at most a
  ring (measured: 0 or exactly 256, queue 1 mostly).
* testpmd txonly -> device sink: testpmd stops first; what it made available that the device
  had not taken is counted by testpmd only: at most a ring per queue.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from dpdk import (
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MQ,
    FinalStats,
    Testpmd,
    VhostPort,
    VirtioUserPort,
    has_bit,
    vhost_negotiated_features,
    virtio_user_features,
)
from test_dpdk_virtnet import (
    NO_FLUSH,
    QUEUE_SIZE,
    SPLIT,
    VIRTIO_DEBUG,
    Virtnet,
    _device_cpus,
    _driver_cpus,
)
from test_dpdk_virtnet import virtnet as virtnet_fixture

virtnet = virtnet_fixture  # test_dpdk_virtnet's fixture, by the name the tests ask for

# testpmd's start, traffic until counters settle, both ends' stop: minutes at worst.
pytestmark = [pytest.mark.peer, pytest.mark.timeout(900)]

QUEUES = 2
TRAFFIC_SECONDS = 2.0
BURST = 32
MQ_APP = [f"--rxq={QUEUES}", f"--txq={QUEUES}"]


def _virtio_user(sock: Path) -> VirtioUserPort:
    return VirtioUserPort(sock, queues=QUEUES, queue_size=QUEUE_SIZE, server=False)


def _per_queue(st: dict, side: str, what: str = "packets") -> list[int]:
    return [st[f"{side}_queue_{p}_{what}"] for p in range(QUEUES)]


def _streams(final: FinalStats) -> list:
    assert sorted(final.streams) == list(range(QUEUES)), final.streams
    return [final.streams[p] for p in range(QUEUES)]


def _assert_device_mq(dev: Virtnet, pmd: Testpmd, result: dict) -> None:
    """Both pairs ran, MQ was negotiated and kept, and nothing went wrong."""
    assert dev.returncode == 0, dev.describe("virtnet device failed")
    assert result["queues"] == QUEUES and result["worker_deaths"] == 0, result
    st = result["device_stats"]
    assert st["desc_errors"] == 0 and st["tx_errors"] == 0, st
    log = dev.log_text()
    for p in range(QUEUES):
        assert f"device running: queue pair {p}," in log, log
    # virtio_user read max_virtqueue_pairs from the device's config space and acked MQ,
    # leaving CTRL_VQ out of SET_FEATURES (its shadow control queue serves it)
    assert f"config->max_virtqueue_pairs={QUEUES}" in pmd.log_text()
    negotiated = virtio_user_features(pmd.log_text()).get("negotiated", 0)
    assert has_bit(negotiated, VIRTIO_NET_F_MQ) and has_bit(negotiated, VIRTIO_NET_F_CTRL_VQ)
    features = re.search(r"features 0x[0-9a-f]+: (.*)", log)
    assert features and "MQ" in features.group(1).split(), log
    assert "lack requirements" not in log, log


# ---------------------------------------------------------------------------------------------
# testpmd virtio_user (front-end) -> virtnet device --queues 2


def test_testpmd_io_bounces_off_device_loopback_per_queue(testpmd, virtnet, sock_dir: Path):
    """Exact per queue: each stream's first burst circles testpmd -> pair p -> testpmd."""
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    dev = virtnet("device", sock, "loopback", cpu=vn_cpu, extra=["--queues", str(QUEUES)])
    pmd = testpmd(_virtio_user(sock), cpus=cpus, forward_mode="io", txpkts=64,
                  extra_app=[*MQ_APP, "--tx-first", f"--burst={BURST}"],
                  log_levels=VIRTIO_DEBUG)  # fmt: skip
    pmd.wait_packets(rx=0, timeout=20)
    time.sleep(TRAFFIC_SECONDS)
    final = pmd.stop()
    result = dev.stop()

    _assert_device_mq(dev, pmd, result)
    st, lb = result["device_stats"], result["backend"]
    streams = _streams(final)
    dev_rx, dev_tx = _per_queue(st, "rx"), _per_queue(st, "tx")
    print(f"\n[per queue] testpmd rx {[s.rx_packets for s in streams]} tx "
          f"{[s.tx_packets for s in streams]}; device rx {dev_rx} tx {dev_tx}")  # fmt: skip
    assert lb["loopback_dropped"] == 0
    assert sum(dev_tx) == sum(dev_rx) + lb["loopback_queued"], (st, lb)
    for p, s in enumerate(streams):
        assert s.rx_packets > 0 and s.tx_dropped == 0, s
        # along the circle each stage has at most what the one before passed on ...
        assert s.rx_packets <= dev_rx[p] <= dev_tx[p] <= s.tx_packets, (p, s, st)
        # ... and exactly the first burst is still in flight on this queue
        assert s.tx_packets - s.rx_packets == BURST, (p, s, st)
        assert st[f"rx_queue_{p}_bytes"] == 64 * dev_rx[p]
        assert st[f"tx_queue_{p}_bytes"] == 64 * dev_tx[p]


@pytest.mark.parametrize("size", [64, 1500])
def test_device_gen_to_testpmd_rxonly_per_queue(testpmd, virtnet, sock_dir: Path, size: int):
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    dev = virtnet("device", sock, f"gen:{size}", cpu=vn_cpu, extra=["--queues", str(QUEUES)])
    pmd = testpmd(_virtio_user(sock), cpus=cpus, forward_mode="rxonly",
                  extra_app=[*MQ_APP, *NO_FLUSH], log_levels=VIRTIO_DEBUG)  # fmt: skip
    pmd.wait_packets(rx=0, timeout=20)
    time.sleep(TRAFFIC_SECONDS)
    result = dev.stop()  # the sender first: testpmd still reads the used entries it left
    settled = pmd.wait_quiescent(timeout=10)
    final = pmd.stop()

    _assert_device_mq(dev, pmd, result)
    st = result["device_stats"]
    streams = _streams(final)
    dev_rx = _per_queue(st, "rx")
    print(f"\n[per queue] device rx {dev_rx}, testpmd rx {[s.rx_packets for s in streams]}")
    assert st["rx_packets"] == sum(dev_rx) == result["backend"]["gen_packets"]
    assert settled.rx_packets == final.port(0).rx_packets == sum(s.rx_packets for s in streams)
    for p, s in enumerate(streams):
        assert s.rx_packets > 0 and st[f"rx_queue_{p}_dropped"] == 0, (p, s, st)
        assert st[f"rx_queue_{p}_bytes"] == size * dev_rx[p]
        # what the PMD's start discarded (see the module docstring): at most one ring
        assert 0 <= dev_rx[p] - s.rx_packets <= QUEUE_SIZE, (p, s, st)


def test_testpmd_txonly_to_device_sink_per_queue(testpmd, virtnet, sock_dir: Path):
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    size = 64
    dev = virtnet("device", sock, "sink", cpu=vn_cpu, extra=["--queues", str(QUEUES)])
    pmd = testpmd(_virtio_user(sock), cpus=cpus, forward_mode="txonly", txpkts=size,
                  extra_app=MQ_APP, log_levels=VIRTIO_DEBUG)  # fmt: skip
    pmd.wait_packets(tx=0, timeout=20)
    time.sleep(TRAFFIC_SECONDS)
    final = pmd.stop()  # only stopping testpmd stops its generator (GET_VRING_BASE)
    result = dev.stop()

    _assert_device_mq(dev, pmd, result)
    st, sink = result["device_stats"], result["backend"]
    streams = _streams(final)
    dev_tx = _per_queue(st, "tx")
    print(f"\n[per queue] testpmd tx {[s.tx_packets for s in streams]}, device tx {dev_tx}")
    assert sink["sink_packets"] == sink["sink_foreign"] == st["tx_packets"] == sum(dev_tx)
    for p, s in enumerate(streams):
        assert dev_tx[p] > 0 and st[f"tx_queue_{p}_bytes"] == size * dev_tx[p], (p, st)
        # frames testpmd made available that the device had not taken: at most a ring
        assert 0 <= s.tx_packets - dev_tx[p] <= QUEUE_SIZE, (p, s, st)


# ---------------------------------------------------------------------------------------------
# testpmd net_vhost (back-end) <- virtnet driver --queues 2

def test_testpmd_txonly_to_driver_sink_per_queue(testpmd, virtnet, sock_dir: Path):
    """Exact per queue: the receiver (the driver) stops first, net_vhost enqueues nothing
    after GET_VRING_BASE, and the driver reaps every used entry."""
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    pmd = testpmd(VhostPort(sock, queues=QUEUES), cpus=cpus, forward_mode="txonly", txpkts=64,
                  extra_app=MQ_APP)  # fmt: skip
    drv = virtnet("driver", sock, "sink", cpu=vn_cpu, extra=[*SPLIT, "--queues", str(QUEUES)])
    pmd.wait_packets(tx=0, timeout=20)
    time.sleep(TRAFFIC_SECONDS)
    result = drv.stop()
    final = pmd.stop()

    assert drv.returncode == 0, drv.describe("virtnet driver failed")
    st = result["driver_stats"]
    streams = _streams(final)
    drv_rx = _per_queue(st, "rx")
    print(f"\n[per queue] testpmd tx {[s.tx_packets for s in streams]}, driver rx {drv_rx}")
    assert has_bit(vhost_negotiated_features(pmd.log_text()) or 0, VIRTIO_NET_F_MQ)
    for p, s in enumerate(streams):
        assert drv_rx[p] > 0 and s.tx_packets == drv_rx[p], (p, s, st)
        assert st[f"rx_queue_{p}_bytes"] == 64 * drv_rx[p]


def test_driver_gen_to_testpmd_rxonly_per_queue(testpmd, virtnet, sock_dir: Path):
    """Exact per queue: the sender (the driver) stops first, after net_vhost used every
    tx buffer, and testpmd (``--no-flush-rx``) counts every frame."""
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    pmd = testpmd(VhostPort(sock, queues=QUEUES), cpus=cpus, forward_mode="rxonly",
                  extra_app=[*MQ_APP, *NO_FLUSH])  # fmt: skip
    drv = virtnet("driver", sock, "gen:64", cpu=vn_cpu, extra=[*SPLIT, "--queues", str(QUEUES)])
    pmd.wait_packets(rx=0, timeout=20)
    time.sleep(TRAFFIC_SECONDS)
    result = drv.stop()
    pmd.wait_quiescent(timeout=10)
    final = pmd.stop()

    assert drv.returncode == 0, drv.describe("virtnet driver failed")
    st = result["driver_stats"]
    streams = _streams(final)
    drv_tx = _per_queue(st, "tx")
    print(f"\n[per queue] driver tx {drv_tx}, testpmd rx {[s.rx_packets for s in streams]}")
    for p, s in enumerate(streams):
        assert drv_tx[p] > 0 and s.rx_packets == drv_tx[p], (p, s, st)
        assert st[f"tx_queue_{p}_bytes"] == 64 * drv_tx[p]
