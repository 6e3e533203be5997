"""Real traffic through virtnet: TCP intact both ways for each rx strategy, UDP drops counted.

Two namespaces, a tap in each, ``virtnet device`` on the host tap and ``virtnet driver`` on
the guest tap, over vhost-user (``virtnet.bench.tap.virtnet_path``). Every frame between
the namespaces crosses the driver, the shared-memory rings and the device.

- TCP: a few MiB of random bytes, sent by a small Python program in one namespace and
  hashed by another in the other; the sha256 must match. The pcaps of both processes
  show the TSO frames (> MTU) where the features allow them: guest → host always
  (HOST_TSO), host → guest only when the guest took GUEST_TSO (not ``small``).
- UDP: iperf3 floods host → guest far faster than Python can carry; the guest's ring
  runs out and the drops are counted, and every counter along the path adds up.

Root only (CI is root). Benchmarks measure, tests assert behaviour: no rate, no time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import dpkt
import pytest

from virtnet.bench.tap import (
    GUEST_IP,
    GUEST_TO_HOST,
    HOST_IP,
    HOST_TO_GUEST,
    MTU,
    VirtnetPath,
    unavailable_reason,
    virtnet_path,
)
from virtnet.net.features import VirtioNetF
from virtnet.ports.iperf import start_client, start_server
from virtnet.ports.netns import list_netns, run_in_netns
from virtnet.virtio.features import bit

_REASON = unavailable_reason()
# root, /dev/net/tun, iperf3, ping: skip, or fail under VIRTNET_REQUIRE_PEERS=1 (tests/conftest.py)
pytestmark = [pytest.mark.root, pytest.mark.needs(_REASON)]

ETH_FRAME_MAX = MTU + 14  # the longest frame without TSO: MTU + Ethernet header
PAYLOAD = 4 << 20  # bytes per TCP transfer
TCP_PORT = 5301
TRANSFER_TIMEOUT = 60.0  # seconds for one transfer; a hung path fails, never hangs the run
UDP_SECONDS = 2.0
# iperf3 -b 0 is no limit: the sender runs as fast as its core, and short datagrams make that
# a packet rate no Python path carries (a compiled one did carry a 1 Gbit/s of 1448 B ones).
UDP_RATE = "0"
UDP_LENGTH = "256"

MRG_RXBUF, GUEST_TSO4 = bit(VirtioNetF.MRG_RXBUF), bit(VirtioNetF.GUEST_TSO4)
# features_off: bench.tap.FEATURES_OFF
STRATEGIES = ("deferred", "prealloc", "ewma", "big", "small")
GUEST_TSO = {"deferred": True, "prealloc": True, "ewma": True, "big": True, "small": False}

# Receiver: accept one connection, hash everything until EOF, print "<bytes> <sha256>".
RECEIVER = """
import hashlib, socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(float(sys.argv[3]))
conn, _ = srv.accept()
conn.settimeout(float(sys.argv[3]))
h, n = hashlib.sha256(), 0
while chunk := conn.recv(1 << 16):
    h.update(chunk)
    n += len(chunk)
conn.close()
print(n, h.hexdigest())
"""

# Sender: connect (retrying, bounded, until the receiver listens), send the file, half-close,
# and wait for the receiver's close: it has every byte then.
SENDER = """
import socket, sys, time
host, port, path, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((host, port), timeout=timeout)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
with open(path, "rb") as f:
    s.sendfile(f)
s.shutdown(socket.SHUT_WR)
s.recv(1)
"""


@contextlib.contextmanager
def checked_path(strategy: str, **kw) -> Iterator[VirtnetPath]:
    """``virtnet_path``, then: both processes exited cleanly, our namespaces are gone."""
    with virtnet_path(strategy, **kw) as path:
        yield path
    assert path.driver.returncode == 0, path.logs()
    assert path.device.returncode == 0, path.logs()
    left = {path.guest, path.host} & set(list_netns())
    assert not left, f"namespaces left behind: {left}"


def send_file(path: VirtnetPath, src_ns: str, dst_ns: str, dst_ip: str, data: str) -> str:
    """Send file ``data`` over TCP from ``src_ns`` to ``dst_ip`` in ``dst_ns``; its sha256 there."""
    t = str(TRANSFER_TIMEOUT)
    receiver = path.topo.popen(
        dst_ns, [sys.executable, "-c", RECEIVER, dst_ip, str(TCP_PORT), t],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sender = run_in_netns(
        src_ns, [sys.executable, "-c", SENDER, dst_ip, str(TCP_PORT), data, t],
        timeout=TRANSFER_TIMEOUT + 15, capture_output=True, text=True,
    )  # fmt: skip
    out, err = receiver.communicate(timeout=TRANSFER_TIMEOUT)
    assert sender.returncode == 0, f"sender: {sender.stderr}\n{path.logs()}"
    assert receiver.returncode == 0, f"receiver: {err}\n{path.logs()}"
    nbytes, digest = out.split()
    assert int(nbytes) == PAYLOAD
    return digest


def tcp_frame_lengths(pcap: str, src: str, dst: str) -> list[int]:
    """Lengths of the IPv4 TCP frames ``src`` → ``dst`` in ``pcap``."""
    src_b, dst_b = socket.inet_aton(src), socket.inet_aton(dst)
    out = []
    with open(pcap, "rb") as f:
        for _ts, buf in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(buf).data
            if isinstance(ip, dpkt.ip.IP) and ip.p == dpkt.ip.IP_PROTO_TCP:
                if ip.src == src_b and ip.dst == dst_b:
                    out.append(len(buf))
    return out


def pcap_frames(pcap: str) -> int:
    with open(pcap, "rb") as f:
        return sum(1 for _ in dpkt.pcap.Reader(f))


def assert_counters_add_up(drv_doc: dict, dev_doc: dict, taps: dict) -> None:
    """After a clean stop, every frame is accounted for at each hop, both ways."""
    drv, dev = drv_doc["driver_stats"], dev_doc["device_stats"]
    drv_tap, dev_tap = drv_doc["backend"], dev_doc["backend"]
    # host → guest: host tap → device → rx ring → driver → guest tap.
    assert taps["host"]["tx_packets"] == dev["rx_packets"] + dev["rx_dropped"]
    assert drv["rx_packets"] <= dev["rx_packets"]
    assert drv["rx_packets"] + drv["rx_dropped"] + drv["rx_length_errors"] == dev["rx_packets"]
    assert drv["rx_bytes"] == dev["rx_bytes"]
    assert drv_tap["sink_packets"] == drv["rx_packets"]
    assert taps["guest"]["rx_packets"] + taps["guest"]["rx_dropped"] == drv_tap["sink_packets"]
    # guest → host: guest tap → driver → tx ring → device → host tap.
    assert taps["guest"]["tx_packets"] == drv["tx_packets"] + drv["tx_dropped"]
    assert drv["tx_packets"] == dev["tx_packets"]
    assert drv["tx_bytes"] == dev["tx_bytes"]
    assert dev_tap["sink_packets"] == dev["tx_packets"]
    assert taps["host"]["rx_packets"] + taps["host"]["rx_dropped"] == dev_tap["sink_packets"]
    # Nothing refused, nothing lost in guest memory.
    assert dev["desc_errors"] == dev["tx_errors"] == 0
    assert drv["pages_outstanding"] == 0
    assert drv["page_allocs"] == drv["page_frees"]
    assert drv["skb_allocs"] == drv["skb_frees"]


@pytest.mark.parametrize("direction", [GUEST_TO_HOST, HOST_TO_GUEST])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tcp_arrives_intact_with_tso_frames(strategy: str, direction: str, tmp_path) -> None:
    data = tmp_path / "payload.bin"
    data.write_bytes(os.urandom(PAYLOAD))
    want = hashlib.sha256(data.read_bytes()).hexdigest()
    with checked_path(strategy, pcap=True, workdir=str(tmp_path)) as path:
        if direction == GUEST_TO_HOST:
            src, dst, src_ip, dst_ip = path.guest, path.host, GUEST_IP, HOST_IP
        else:
            src, dst, src_ip, dst_ip = path.host, path.guest, HOST_IP, GUEST_IP
        got = send_file(path, src, dst, dst_ip, str(data))
        drv_doc, dev_doc = path.stop()
        taps = path.tap_stats()

    assert got == want, "the bytes that arrived are not the bytes sent"
    assert drv_doc["strategy"] == strategy
    assert bool(drv_doc["features"] & MRG_RXBUF) == (strategy in ("deferred", "prealloc", "ewma"))
    assert bool(drv_doc["features"] & GUEST_TSO4) == GUEST_TSO[strategy]
    assert_counters_add_up(drv_doc, dev_doc, taps)
    drv, dev = drv_doc["driver_stats"], dev_doc["device_stats"]
    assert pcap_frames(path.device_pcap) == dev["rx_packets"] + dev["tx_packets"]
    assert pcap_frames(path.driver_pcap) == drv["rx_packets"] + drv["tx_packets"]

    # The data frames, as each end of the rings saw them.
    seen = {
        "device": tcp_frame_lengths(path.device_pcap, src_ip, dst_ip),
        "driver": tcp_frame_lengths(path.driver_pcap, src_ip, dst_ip),
    }
    assert seen["device"] == seen["driver"], "a frame changed size between driver and device"
    tso = direction == GUEST_TO_HOST or GUEST_TSO[strategy]  # HOST_TSO is always on
    if tso:
        assert max(seen["device"]) > ETH_FRAME_MAX, "no TSO frame crossed the rings"
    else:
        # 5.1.6.2: no GSO frame the guest did not negotiate; none dropped for it either.
        assert max(seen["device"]) <= ETH_FRAME_MAX
        assert dev["rx_dropped"] == 0
    if direction == HOST_TO_GUEST and strategy in ("deferred", "prealloc", "ewma"):
        assert dev["rx_num_buffers_max"] > 1, "a TSO frame should span mergeable buffers"


# (strategy, driver --queue-size): a mergeable ring and a non-mergeable one, both small.
# 64, not 16, for mergeable rings: see test_small_mergeable_ring_keeps_carrying.
UDP_CASES = [("deferred", 64), ("small", 16)]


def udp_drops(netns: str) -> int:
    """Datagrams the kernel of ``netns`` dropped at its UDP sockets (RcvbufErrors)."""
    snmp = run_in_netns(netns, ["cat", "/proc/net/snmp"], capture_output=True, text=True,
                        timeout=10).stdout.splitlines()  # fmt: skip
    names, values = (line.split()[1:] for line in snmp if line.startswith("Udp:"))
    return int(dict(zip(names, values, strict=True))["RcvbufErrors"])


@pytest.mark.parametrize(("strategy", "queue_size"), UDP_CASES)
def test_udp_flood_drops_are_counted(strategy: str, queue_size: int) -> None:
    with checked_path(strategy, queue_size=queue_size) as path:
        start_server(path.topo, path.host, HOST_IP)
        client = start_client(path.topo, path.guest, HOST_IP, UDP_SECONDS, udp=True,
                              bitrate=UDP_RATE, extra=("-R", "-l", UDP_LENGTH))  # fmt: skip
        result = client.result()
        guest_udp = udp_drops(path.guest)
        drv_doc, dev_doc = path.stop()
        taps = path.tap_stats()

    assert result.lost_percent is not None and result.lost_percent > 0, result
    drv, dev = drv_doc["driver_stats"], dev_doc["device_stats"]
    assert drv["rx_packets"] > 0
    # Every lost datagram was dropped where it is counted: the guest's ring was empty while
    # frames kept coming and the device left them in the host tap (vhost-net's way), whose
    # full queue drops them; or the driver kept up and the guest's UDP socket buffer
    # overflowed (which of the two depends on how fast this build and machine are).
    assert taps["host"]["tx_dropped"] + dev["rx_dropped"] + guest_udp > 0
    assert_counters_add_up(drv_doc, dev_doc, taps)


def test_small_mergeable_ring_keeps_carrying() -> None:
    with checked_path("deferred", queue_size=32) as path:
        # Each echo reply is one host → guest frame: 24 of them need a refill of the ring.
        ping = run_in_netns(path.guest, ["ping", "-c", "24", "-i", "0.05", "-W", "1", HOST_IP],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    # ping exits 0 when any reply came back: count them.
    assert " 24 received," in ping.stdout, ping.stdout
