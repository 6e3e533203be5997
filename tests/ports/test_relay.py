"""The bare TAP relay with real traffic, iperf3 parsing, and Topology cleanup.

(The netns and iperf helpers are tested here too: they exist to serve the relay and
the bench, and this is the only file that builds full topologies.)
"""

from __future__ import annotations

import json
import os

import pytest
from pyroute2 import IPRoute

from virtnet.ports import iperf as iperfmod
from virtnet.ports.iperf import IperfError, parse_iperf_json
from virtnet.ports.netns import NetnsError, Topology, add_address, list_netns, socket_in_netns
from virtnet.ports.relay import (
    RELAY_CIDR_B,
    Relay,
    iperf_through_relay,
    relay_topology,
)
from virtnet.ports.tap import TUN_F_CSUM, open_tap

ETH_FRAME_MAX = 1500 + 14  # MTU + Ethernet header: anything larger was a TSO frame
B_ADDR = RELAY_CIDR_B.split("/")[0]


# --- frames through the relay -------------------------------------------------------------


def test_relay_carries_arp_and_udp_with_vnet_headers_unchanged(topo: Topology) -> None:
    a, b, tap_a, tap_b = relay_topology(topo)
    count = 10
    with socket_in_netns(b) as rx, socket_in_netns(a) as tx:
        rx.bind((B_ADDR, 6000))
        rx.setblocking(False)
        # Sent before the relay runs: they wait in a's neighbour queue for the ARP reply
        # that only the relay can carry back.
        for i in range(count):
            tx.sendto(b"%d" % i, (B_ADDR, 6000))
        got: list[bytes] = []

        def all_received() -> bool:
            try:
                while True:
                    got.append(rx.recv(100))
            except BlockingIOError:
                return len(got) >= count

        stats = Relay(tap_a, tap_b).run(seconds=10, until=all_received)
    # The senders left UDP checksums partial (TUN_F_CSUM): had the relay lost the vnet
    # header's NEEDS_CSUM, b's stack would have dropped every datagram as corrupt.
    assert sorted(got) == sorted(b"%d" % i for i in range(count))
    assert stats.a_to_b["frames"] >= count + 1  # + the ARP request (+ IPv6 chatter)
    assert stats.b_to_a["frames"] >= 1  # the ARP reply
    for way in (stats.a_to_b, stats.b_to_a):
        assert way["truncated"] == way["write_errors"] == 0


def test_relay_refuses_taps_with_different_headers(root_tun: None) -> None:
    with open_tap("vntr10", vnet_hdr_size=10) as t10, open_tap("vntr12") as t12:
        with pytest.raises(ValueError, match="disagree on the vnet header"):
            Relay(t10, t12)


def test_iperf_tcp_through_relay_passes_tso_frames(topo: Topology) -> None:
    a, b, tap_a, tap_b = relay_topology(topo)
    run = iperf_through_relay(topo, a, b, tap_a, tap_b, seconds=2)
    assert run.iperf.protocol == "tcp"
    assert run.iperf.bytes > 0
    assert run.relay is not None
    assert run.relay.a_to_b["bytes"] >= run.iperf.bytes  # headers on top of the payload
    # Frames beyond the MTU crossed the relay: the kernel handed over TSO frames and took
    # them back, offloads intact.
    assert run.relay.a_to_b["largest_frame"] > ETH_FRAME_MAX
    assert run.relay.a_to_b["truncated"] == run.relay.a_to_b["write_errors"] == 0


def test_without_tso_frames_stay_within_the_mtu(topo: Topology) -> None:
    a, b, tap_a, tap_b = relay_topology(topo, offloads=TUN_F_CSUM)
    run = iperf_through_relay(topo, a, b, tap_a, tap_b, seconds=1)
    assert run.iperf.bytes > 0
    assert run.relay is not None
    assert 0 < run.relay.largest_frame <= ETH_FRAME_MAX


def test_iperf_udp_through_relay_reports_loss(topo: Topology) -> None:
    a, b, tap_a, tap_b = relay_topology(topo)
    run = iperf_through_relay(topo, a, b, tap_a, tap_b, seconds=1, udp=True, bitrate="20M")
    assert run.iperf.protocol == "udp"
    assert run.iperf.bytes > 0
    assert run.iperf.lost_percent is not None and 0 <= run.iperf.lost_percent <= 100
    assert run.iperf.retransmits is None


# --- Topology cleanup ---------------------------------------------------------------------


def root_links(prefix: str = "vn") -> set[str]:
    with IPRoute() as ipr:
        return {
            name
            for link in ipr.get_links()
            if (name := link.get("ifname")) and name.startswith(prefix)
        }


class Boom(Exception):
    pass


def build(topo: Topology) -> tuple[list[str], list, object]:
    a, b, tap_a, tap_b = relay_topology(topo)
    topo.add_veth(a, "10.77.1.1/24", b, "10.77.1.2/24")
    proc = topo.popen(a, ["sleep", "30"])
    return [a, b], [tap_a, tap_b], proc


@pytest.mark.parametrize("raised", [None, Boom, KeyboardInterrupt])
def test_topology_removes_everything_it_made(root_tun: None, raised: type | None) -> None:
    before = root_links()
    made: dict[str, object] = {}
    try:
        with Topology() as topo:
            made["ns"], made["taps"], made["proc"] = build(topo)
            assert set(made["ns"]) <= set(list_netns())
            if raised is not None:
                raise raised()
    except (Boom, KeyboardInterrupt) as e:
        assert raised is not None and isinstance(e, raised)
    assert not set(made["ns"]) & set(list_netns())
    assert all(t.closed for t in made["taps"])
    assert made["proc"].poll() is not None
    assert root_links() <= before  # no tap or veth came back to the root namespace


def test_no_address_is_ever_put_in_the_root_namespace() -> None:
    with pytest.raises(NetnsError, match="root namespace"):
        add_address("", "lo", "10.77.0.1/24")


def test_topology_refuses_a_namespace_it_did_not_make(topo: Topology) -> None:
    with pytest.raises(NetnsError, match="not created by this Topology"):
        topo.add_tap("vn-someone-else", "10.77.0.1/24")


# --- iperf3 JSON --------------------------------------------------------------------------


def test_parse_tcp_uses_the_receiver_and_the_senders_retransmits() -> None:
    doc = {
        "start": {"test_start": {"protocol": "TCP"}},
        "end": {
            "sum_sent": {
                "seconds": 2.0,
                "bytes": 2000,
                "bits_per_second": 8000.0,
                "retransmits": 3,
            },
            "sum_received": {"seconds": 2.0, "bytes": 1900, "bits_per_second": 7600.0},
        },
    }
    r = parse_iperf_json(json.dumps(doc))
    assert (r.protocol, r.bytes, r.bits_per_second, r.retransmits, r.lost_percent) == (
        "tcp", 1900, 7600.0, 3, None,
    )  # fmt: skip
    assert r.gbps == pytest.approx(7.6e-6)


def test_parse_udp_reads_loss_from_sum_when_that_is_all_there_is() -> None:
    doc = {
        "start": {"test_start": {"protocol": "UDP"}},
        "end": {
            "sum": {"seconds": 1.0, "bytes": 500, "bits_per_second": 4000.0, "lost_percent": 2.5}
        },
    }
    r = parse_iperf_json(json.dumps(doc))
    assert (r.protocol, r.bytes, r.lost_percent, r.retransmits) == ("udp", 500, 2.5, None)


def test_parse_reports_iperfs_own_error() -> None:
    doc = {"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"}
    with pytest.raises(IperfError, match="Connection refused"):
        parse_iperf_json(json.dumps(doc))


def test_parse_refuses_non_json() -> None:
    with pytest.raises(IperfError, match="not JSON"):
        parse_iperf_json("iperf3: error - oops")


def test_missing_iperf3_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iperfmod, "IPERF3", "iperf3-not-installed-" + os.urandom(4).hex())
    with pytest.raises(IperfError, match="iperf3 not found"):
        iperfmod.client_argv("10.77.0.2", 1)
