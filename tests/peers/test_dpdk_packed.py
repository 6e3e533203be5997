"""virtnet on packed rings (VIRTIO_F_RING_PACKED, bit 34) against DPDK testpmd, both roles.

* ``virtnet driver`` ↔ testpmd ``net_vhost``: DPDK's vhost offers RING_PACKED and the
  driver acks it (its default); every rx strategy receives testpmd's txonly frames, the
  driver's generator feeds rxonly, and io echoes the driver's stream back to it.
* testpmd ``net_virtio_user`` with ``packed_vq=1`` ↔ ``virtnet device``: the device's
  generator feeds rxonly, txonly feeds the device's sink, io/macswap bounce frames off
  the device's loopback, and io echoes the device's stream.

What was negotiated is shown from both ends' logs (net_vhost's "negotiated Virtio
features", virtio_user's "features after negotiate", virtnet's "features 0x...: NAMES").
Counts are exact where test_dpdk_virtnet.py's split cases are exact (the module
docstring there says which side stops first and why); where testpmd feeds a virtnet
device the bound is the ring, as there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import test_dpdk_virtnet
from dpdk import (
    VIRTIO_NET_F_MRG_RXBUF,
    VhostPort,
    VirtioUserPort,
    has_bit,
    vhost_negotiated_features,
    virtio_user_features,
)
from test_dpdk_virtnet import (
    BURST,
    NO_FLUSH,
    SIZES,
    STRATEGIES,
    VIRTIO_DEBUG,
    _assert_device_clean,
    _assert_driver_clean,
    _device_cpus,
    _driver_cpus,
    _frame_len,
    _testpmd_pps,
    _traffic,
)

# testpmd's start, traffic until counters settle, both ends' stop: minutes at worst.
pytestmark = [pytest.mark.peer, pytest.mark.timeout(900)]
virtnet = test_dpdk_virtnet.virtnet  # the fixture that runs ``virtnet driver|device``

RING_PACKED = 34
QUEUE_SIZE = 256


def _rate(what: str, size: int, pps: float) -> None:
    print(f"\n[rate] packed {what:<34} {size:>5} B {pps:>10,.0f} pps")


# ---------------------------------------------------------------------------------------------
# testpmd net_vhost (backend) ↔ virtnet driver (frontend)

CASES_TO_DRIVER = [("deferred", 1500), ("deferred", 6000), ("prealloc", 1500), ("big", 6000),
                   ("small", 64)]  # fmt: skip


@pytest.mark.parametrize(("strategy", "size"), CASES_TO_DRIVER,
                         ids=[f"{s}-{n}" for s, n in CASES_TO_DRIVER])  # fmt: skip
def test_testpmd_txonly_to_virtnet_driver_on_packed_rings(
    testpmd, virtnet, sock_dir: Path, strategy: str, size: int
) -> None:
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    frame = _frame_len(size)
    pmd = testpmd(VhostPort(sock), cpus=cpus, forward_mode="txonly", txpkts=SIZES[size])
    off = STRATEGIES[strategy]
    extra = ["--strategy", strategy, *(["--features-off", off] if off else [])]
    drv = virtnet("driver", sock, "sink", cpu=vn_cpu, extra=extra)
    _traffic(pmd, rx=False)
    result = drv.stop()
    final = pmd.stop()

    _assert_driver_clean(drv, result)
    features = result["features"]
    assert has_bit(features, RING_PACKED), f"{features:#x}"
    assert vhost_negotiated_features(pmd.log_text()) == features  # net_vhost runs packed too
    print(f"\nnet_vhost negotiated {features:#x} (bit 34 = {features >> RING_PACKED & 1})")
    assert result["strategy"] == strategy
    assert has_bit(features, VIRTIO_NET_F_MRG_RXBUF) == (off is None)
    st, sink = result["driver_stats"], result["backend"]
    assert st["rx_packets"] > 0 and st["rx_bytes"] == st["rx_packets"] * frame
    assert sink["sink_foreign"] == sink["sink_packets"] == st["rx_packets"]
    assert sink["sink_corrupt"] == 0
    assert final.port(0).tx_packets == st["rx_packets"], (final.port(0), st)  # exact
    if off is None and frame + 12 > 4096:
        assert st["rx_bufs"] == st["rx_packets"] * -(-(frame + 12) // 4096)  # merged
    _rate(f"txonly -> driver {strategy}", size, _testpmd_pps(pmd, "tx_pps"))


def test_virtnet_driver_gen_to_testpmd_rxonly_on_packed_rings(testpmd, virtnet,
                                                              sock_dir: Path) -> None:  # fmt: skip
    size = 1500
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    pmd = testpmd(VhostPort(sock), cpus=cpus, forward_mode="rxonly", extra_app=NO_FLUSH)
    drv = virtnet("driver", sock, f"gen:{size}", cpu=vn_cpu)
    _traffic(pmd, rx=True)
    result = drv.stop()  # the sender first: it waits until net_vhost used every tx buffer
    settled = pmd.wait_quiescent(timeout=10)
    final = pmd.stop()

    _assert_driver_clean(drv, result)
    assert has_bit(result["features"], RING_PACKED)
    assert vhost_negotiated_features(pmd.log_text()) == result["features"]
    st = result["driver_stats"]
    assert st["tx_packets"] > 0 and st["tx_dropped"] == 0
    assert st["tx_bytes"] == st["tx_packets"] * size
    assert final.port(0).rx_packets == st["tx_packets"], (final.port(0), st)  # exact
    assert settled.rx_packets == st["tx_packets"] and settled.rx_bytes == st["tx_bytes"]
    _rate("driver gen -> rxonly", size, _testpmd_pps(pmd, "rx_pps"))


def test_virtnet_driver_stream_echoed_by_testpmd_io_on_packed_rings(
    testpmd, virtnet, sock_dir: Path
) -> None:
    size = 1500
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    pmd = testpmd(VhostPort(sock), cpus=cpus, forward_mode="io", extra_app=NO_FLUSH)
    drv = virtnet("driver", sock, f"gen:{size}", cpu=vn_cpu)
    _traffic(pmd, rx=True)
    result = drv.stop()
    final = pmd.stop()

    _assert_driver_clean(drv, result)
    assert has_bit(result["features"], RING_PACKED)
    st, sink, fwd = result["driver_stats"], result["backend"], final.port(0)
    assert st["tx_packets"] == sink["gen_packets"] == fwd.rx_packets > 0
    assert fwd.tx_packets + fwd.tx_dropped == fwd.rx_packets
    assert sink["sink_packets"] == st["rx_packets"] == fwd.tx_packets > 0  # exact
    assert sink["sink_corrupt"] == 0 and sink["sink_foreign"] == 0
    assert sink["sink_lost"] <= fwd.tx_dropped
    _rate("driver gen <-> io", size, _testpmd_pps(pmd, "tx_pps"))


# ---------------------------------------------------------------------------------------------
# testpmd net_virtio_user packed_vq=1 (frontend) ↔ virtnet device (backend)


def _virtio_user_packed(sock: Path) -> VirtioUserPort:
    return VirtioUserPort(sock, queue_size=QUEUE_SIZE, mrg_rxbuf=True, server=False,
                          packed_vq=True)  # fmt: skip


def _assert_packed_negotiated(pmd, dev) -> None:
    negotiated = virtio_user_features(pmd.log_text()).get("negotiated")
    assert negotiated is not None, "virtio_user logged no negotiation"
    assert has_bit(negotiated, RING_PACKED), f"virtio_user negotiated {negotiated:#x}"
    line = re.search(r"features 0x[0-9a-f]+: .*\bRING_PACKED\b.*", dev.log_text())
    assert line, dev.log_text()
    print(f"\nvirtio_user negotiated {negotiated:#x}; device: {line.group(0)}")


@pytest.mark.parametrize("size", [64, 1500])
def test_virtnet_device_gen_to_testpmd_rxonly_on_packed_rings(testpmd, virtnet, sock_dir: Path,
                                                              size: int) -> None:  # fmt: skip
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    dev = virtnet("device", sock, f"gen:{size}", cpu=vn_cpu)
    pmd = testpmd(_virtio_user_packed(sock), cpus=cpus, forward_mode="rxonly",
                  extra_app=NO_FLUSH, log_levels=VIRTIO_DEBUG)  # fmt: skip
    _traffic(pmd, rx=True)
    result = dev.stop()  # the sender first
    settled = pmd.wait_quiescent(timeout=10)
    final = pmd.stop()

    _assert_device_clean(dev, result)
    _assert_packed_negotiated(pmd, dev)
    st = result["device_stats"]
    assert st["rx_packets"] > 0 and st["rx_dropped"] == 0
    assert st["rx_bytes"] == st["rx_packets"] * size
    assert result["backend"]["gen_packets"] == st["rx_packets"]
    assert final.port(0).rx_packets == st["rx_packets"], (final.port(0), st)  # exact
    assert settled.rx_packets == st["rx_packets"] and settled.rx_errors == 0
    _rate("device gen -> rxonly", size, _testpmd_pps(pmd, "rx_pps"))


@pytest.mark.parametrize("size", [64, 1500])
def test_testpmd_txonly_to_virtnet_device_sink_on_packed_rings(testpmd, virtnet, sock_dir: Path,
                                                               size: int) -> None:  # fmt: skip
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    dev = virtnet("device", sock, "sink", cpu=vn_cpu)
    pmd = testpmd(_virtio_user_packed(sock), cpus=cpus, forward_mode="txonly", txpkts=size,
                  log_levels=VIRTIO_DEBUG)  # fmt: skip
    _traffic(pmd, rx=False)
    final = pmd.stop()
    result = dev.stop()

    _assert_device_clean(dev, result)
    _assert_packed_negotiated(pmd, dev)
    st, sink = result["device_stats"], result["backend"]
    assert st["tx_packets"] > 0 and st["tx_bytes"] == st["tx_packets"] * size
    assert sink["sink_foreign"] == sink["sink_packets"] == st["tx_packets"]
    sent = final.port(0).tx_packets
    gap = sent - st["tx_packets"]  # made available, not taken when the ring stopped
    print(f"\n[gap] testpmd TX {sent} - device tx {st['tx_packets']} = {gap} left in the ring")
    assert 0 <= gap <= QUEUE_SIZE, (final.port(0), st)
    _rate("txonly -> device sink", size, _testpmd_pps(pmd, "tx_pps"))


@pytest.mark.parametrize(("mode", "size"), [("io", 64), ("macswap", 1500)])
def test_testpmd_bounces_frames_off_virtnet_device_loopback_on_packed_rings(
    testpmd, virtnet, sock_dir: Path, mode: str, size: int
) -> None:
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    dev = virtnet("device", sock, "loopback", cpu=vn_cpu)
    pmd = testpmd(_virtio_user_packed(sock), cpus=cpus, forward_mode=mode, txpkts=size,
                  extra_app=["--tx-first", f"--burst={BURST}"],
                  log_levels=VIRTIO_DEBUG)  # fmt: skip
    _traffic(pmd, rx=True)
    final = pmd.stop()
    result = dev.stop()

    _assert_device_clean(dev, result)
    _assert_packed_negotiated(pmd, dev)
    st, lb, fwd = result["device_stats"], result["backend"], final.port(0)
    assert fwd.rx_packets > 0 and fwd.tx_dropped == 0 and fwd.rx_dropped == 0, fwd
    assert lb["loopback_dropped"] == 0
    assert st["tx_packets"] == st["rx_packets"] + lb["loopback_queued"]
    assert fwd.rx_packets <= st["rx_packets"] <= st["tx_packets"] <= fwd.tx_packets
    assert fwd.tx_packets - fwd.rx_packets == BURST, (fwd, st, lb)  # exactly one burst in flight
    _rate(f"{mode} <-> device loopback", size, _testpmd_pps(pmd, "rx_pps"))


def test_virtnet_device_stream_echoed_by_testpmd_io_on_packed_rings(
    testpmd, virtnet, sock_dir: Path
) -> None:
    size = 64
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    dev = virtnet("device", sock, f"gen:{size}", cpu=vn_cpu)
    pmd = testpmd(_virtio_user_packed(sock), cpus=cpus, forward_mode="io", extra_app=NO_FLUSH,
                  log_levels=VIRTIO_DEBUG)  # fmt: skip
    _traffic(pmd, rx=True)
    final = pmd.stop()
    result = dev.stop()

    _assert_device_clean(dev, result)
    _assert_packed_negotiated(pmd, dev)
    st, sink, fwd = result["device_stats"], result["backend"], final.port(0)
    assert st["rx_packets"] == sink["gen_packets"] and st["rx_dropped"] == 0
    assert fwd.tx_packets + fwd.tx_dropped == fwd.rx_packets > 0
    assert 0 <= st["rx_packets"] - fwd.rx_packets <= QUEUE_SIZE, (fwd, st)
    assert 0 <= fwd.tx_packets - st["tx_packets"] <= QUEUE_SIZE, (fwd, st)
    assert sink["sink_packets"] == st["tx_packets"] > 0
    assert sink["sink_corrupt"] == 0 and sink["sink_foreign"] == 0
    assert sink["sink_lost"] <= fwd.tx_dropped
    _rate("device gen <-> io", size, _testpmd_pps(pmd, "tx_pps"))
