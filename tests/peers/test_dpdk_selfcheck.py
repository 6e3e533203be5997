"""Self-check of the DPDK harness: two real testpmds (net_vhost <-> net_virtio_user) talk over
a vhost-user socket before virtnet takes either side. Also pins down, for the people writing
virtnet's backend and frontend, what DPDK really sends and offers (see docs/dpdk.md)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dpdk import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    Hugepages,
    Testpmd,
    TestpmdError,
    VhostPort,
    VhostUserRecorder,
    VirtioUserPort,
    ensure_hugepages,
    has_bit,
    parse_forward_stats,
    parse_nic_stats,
    query_backend_features,
    vhost_messages_from_log,
    vhost_negotiated_features,
    virtio_user_features,
)

FRAME = 64  # --txpkts: frame length without CRC, what both PMDs count in bytes
QUEUE_SIZE = 256
TRAFFIC_SECONDS = 3.0  # how long traffic flows; nothing asserts on time
VIRTIO_DEBUG = ["pmd.net.virtio.*:debug"]  # makes virtio_user log its feature negotiation
DRIVER_OK = 0x4

# ------------------------------------------------------------------------------ parsers (no peer)

PERIODIC = """\
\x1b[2J\x1b[1;1H
Port statistics ====================================
  ######################## NIC statistics for port 0  ########################
  RX-packets: 98304      RX-missed: 0          RX-bytes:  6291456
  RX-errors: 0
VHOST_CONFIG: (/tmp/vh.sock) vring base idx:1 file:62976
  RX-nombuf:  0
  TX-packets: 7          TX-errors: 0          TX-bytes:  448

  Throughput (since last show)
  Rx-pps:        32123          Rx-bps:     16447312
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
"""

FINAL = """\
Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 128512         RX-dropped: 0             RX-total: 128512
  TX-packets: 5              TX-dropped: 3             TX-total: 8
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 128512         RX-dropped: 0             RX-total: 128512
  TX-packets: 5              TX-dropped: 3             TX-total: 8
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.
"""


def test_parse_periodic_stats_ignores_ansi_and_interleaved_log_lines() -> None:
    (stats,) = parse_nic_stats(PERIODIC + "garbage: 12\n")
    assert (stats.port, stats.rx_packets, stats.rx_bytes) == (0, 98304, 6291456)
    assert (stats.tx_packets, stats.tx_bytes, stats.rx_pps, stats.rx_bps) == (7, 448, 32123,
                                                                              16447312)


def test_parse_forward_stats_per_port_and_accumulated() -> None:
    ports, acc = parse_forward_stats(PERIODIC + FINAL)
    assert ports[0].rx_packets == 128512 and ports[0].tx_dropped == 3
    assert acc is not None and acc.port is None and acc.tx_total == 8


def test_parse_forward_stats_absent_before_exit() -> None:
    assert parse_forward_stats(PERIODIC) == ({}, None)


def test_command_line_carries_the_recipe(tmp_path: Path) -> None:
    port = VirtioUserPort(tmp_path / "s.sock", server=True)
    cmd = Testpmd(port, log_path=tmp_path / "l", forward_mode="txonly", txpkts=1500,
                  cpus=(1, 0), binary="dpdk-testpmd").command()
    assert "--single-file-segments" in cmd and "--no-pci" in cmd
    assert "--lcores=0@1,1@0" in cmd and "--stats-period=1" in cmd and "--txpkts=1500" in cmd
    assert any(a.startswith("--vdev=net_virtio_user0,") and "server=1" in a for a in cmd)
    vhost = Testpmd(VhostPort(tmp_path / "s.sock", client=True), log_path=tmp_path / "l",
                    binary="dpdk-testpmd").command()
    assert "--single-file-segments" not in vhost
    assert f"--vdev=net_vhost0,iface={tmp_path / 's.sock'},queues=1,client=1" in vhost


# ------------------------------------------------------------------------------ real testpmd


@pytest.mark.peer
def test_ensure_hugepages_is_idempotent(hugepages: Hugepages) -> None:
    again = ensure_hugepages(n_2mb=hugepages.total // 2)
    assert again.mount == hugepages.mount
    assert again.total >= hugepages.total  # never lowered


def _run_traffic(sender: Testpmd, receiver: Testpmd) -> None:
    """Let traffic flow, stop the sender first so the receiver can drain, then the receiver."""
    receiver.wait_packets(rx=0)
    time.sleep(TRAFFIC_SECONDS)
    sender.stop()
    receiver.wait_quiescent()
    receiver.stop()


def _assert_consistent(sender: Testpmd, receiver: Testpmd) -> None:
    sent = sender.stop().port(0).tx_packets  # txonly counts only what the PMD accepted
    # the receiver's last periodic block, taken after its counters settled: unlike its forward
    # stats it also counts the packets testpmd flushed from the rx queue before forwarding
    got = receiver.stop().nic[0]
    assert got.rx_packets > 0
    assert got.rx_packets <= sent, "receiver counted packets nobody sent"
    # what the sender counted but the receiver never took was in the ring when the peers
    # disconnected: at most one ring's worth
    assert sent - got.rx_packets <= QUEUE_SIZE
    assert got.rx_bytes == got.rx_packets * FRAME
    assert got.rx_errors == 0


def _assert_mergeable_negotiated(vhost: Testpmd, virtio: Testpmd) -> None:
    accepted = vhost_negotiated_features(vhost.log_text())
    assert accepted is not None, "net_vhost logged no 'negotiated Virtio features'"
    assert has_bit(accepted, VIRTIO_NET_F_MRG_RXBUF) and has_bit(accepted, VIRTIO_F_VERSION_1)
    negotiated = virtio_user_features(virtio.log_text())["negotiated"]
    assert has_bit(negotiated, VIRTIO_NET_F_MRG_RXBUF)


@pytest.mark.peer
@pytest.mark.parametrize("sender", ["vhost", "virtio_user"])
def test_vhost_and_virtio_user_move_packets(testpmd, sock_dir: Path, sender: str) -> None:
    sock = sock_dir / "vh.sock"
    vhost_mode, virtio_mode = ("txonly", "rxonly") if sender == "vhost" else ("rxonly", "txonly")
    vhost = testpmd(VhostPort(sock), side=0, forward_mode=vhost_mode, txpkts=FRAME)
    virtio = testpmd(VirtioUserPort(sock, queue_size=QUEUE_SIZE, mrg_rxbuf=True), side=1,
                     forward_mode=virtio_mode, txpkts=FRAME, log_levels=VIRTIO_DEBUG)
    tx, rx = (vhost, virtio) if sender == "vhost" else (virtio, vhost)
    _run_traffic(tx, rx)
    _assert_consistent(tx, rx)
    _assert_mergeable_negotiated(vhost, virtio)


@pytest.mark.peer
def test_roles_reversed_virtio_user_listens_vhost_connects(testpmd, sock_dir: Path) -> None:
    sock = sock_dir / "vu.sock"
    # virtio_user server=1 blocks in accept(): start() returns once the socket listens
    virtio = testpmd(VirtioUserPort(sock, server=True, queue_size=QUEUE_SIZE), side=1,
                     forward_mode="txonly", txpkts=FRAME, log_levels=VIRTIO_DEBUG)
    vhost = testpmd(VhostPort(sock, client=True), side=0, forward_mode="rxonly")
    _run_traffic(virtio, vhost)
    _assert_consistent(virtio, vhost)
    _assert_mergeable_negotiated(vhost, virtio)


@pytest.mark.peer
def test_start_fails_clearly_when_nobody_listens(testpmd, sock_dir: Path) -> None:
    with pytest.raises(TestpmdError, match=r"ports=0(?s:.*)Failed to setup backend"):
        testpmd(VirtioUserPort(sock_dir / "nobody.sock"), forward_mode="rxonly")


@pytest.mark.peer
def test_net_vhost_offers_what_a_mergeable_frontend_needs(testpmd, sock_dir: Path) -> None:
    sock = sock_dir / "vh.sock"
    testpmd(VhostPort(sock), forward_mode="rxonly")
    features, protocol = query_backend_features(sock)
    for bit in (VIRTIO_NET_F_MRG_RXBUF, VIRTIO_F_VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES):
        assert has_bit(features, bit), f"net_vhost features {features:#x} lack bit {bit}"
    assert protocol != 0
    # a probe connection is a complete session to net_vhost: asking twice gives the same answer
    assert query_backend_features(sock) == (features, protocol)


def _startup(names: list[str]) -> list[str]:
    """Messages up to and including the SET_STATUS that sets DRIVER_OK (the last one)."""
    last = max(i for i, n in enumerate(names) if n == "SET_STATUS")
    return names[: last + 1]


@pytest.mark.peer
def test_recorder_sees_what_net_vhost_sees(testpmd, sock_dir: Path) -> None:
    """The fake backend gets exactly the startup sequence virtio_user sends to net_vhost, so
    its recording (docs/dpdk.md) is the sequence our backend must handle."""
    real_sock, fake_sock = sock_dir / "real.sock", sock_dir / "fake.sock"
    vhost = testpmd(VhostPort(real_sock), side=0, forward_mode="rxonly")
    features, protocol = query_backend_features(real_sock)
    probe_messages = len(vhost_messages_from_log(vhost.log_text()))
    virtio = testpmd(VirtioUserPort(real_sock), side=1, forward_mode="rxonly")
    vhost.wait_for_log(r"virtio is now ready for processing", timeout=20)
    virtio.stop()
    vhost.stop()
    seen_by_net_vhost = [n.removeprefix("VHOST_USER_")
                         for n in vhost_messages_from_log(vhost.log_text())[probe_messages:]]

    with VhostUserRecorder(fake_sock, features, protocol) as recorder:
        fake = testpmd(VirtioUserPort(fake_sock), side=1, forward_mode="rxonly")
        driver_ok = recorder.wait_for("SET_STATUS", where=lambda m: bool((m.u64 or 0) & DRIVER_OK))
        fake.stop()  # its shutdown messages are recorded too
        recorded = _startup(recorder.names())
    assert recorder.error is None

    assert recorded == _startup(seen_by_net_vhost)
    assert recorded[:4] == ["SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES",
                            "SET_PROTOCOL_FEATURES"]
    assert recorded.index("SET_FEATURES") < recorded.index("SET_MEM_TABLE") < recorded.index(
        "SET_VRING_ADDR")
    assert driver_ok.u64 == 0xF  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    set_features = next(m for m in recorder.messages if m.name == "SET_FEATURES").u64
    assert set_features is not None and has_bit(set_features, VIRTIO_NET_F_MRG_RXBUF)
    mem_table = next(m for m in recorder.messages if m.name == "SET_MEM_TABLE")
    assert mem_table.nfds >= 1 and mem_table.need_reply  # REPLY_ACK was negotiated
