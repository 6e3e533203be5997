"""The tap: flags and offloads as set, frames with vnet headers both ways, the kernel's quirks."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

import dpkt
import pytest
from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool

from virtnet.ports import tap as tapmod
from virtnet.ports.netns import Topology, add_neighbour, link_mac, socket_in_netns
from virtnet.ports.tap import (
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    MAX_FRAME_LEN,
    TUN_F_CSUM,
    TUN_F_DEFAULT,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    TapError,
    offloads_for_guest_features,
    open_tap,
)

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
NS_ADDR, PEER_ADDR = "10.77.0.1", "10.77.0.2"
PEER_MAC = "02:00:00:77:00:02"  # locally administered: the make-believe host behind the tap
HDR = 12

GUEST_BITS = {"CSUM": 1, "TSO4": 7, "TSO6": 8, "ECN": 9, "UFO": 10}
HOST_BITS = (0, 11, 12, 13, 14, 15)  # CSUM, HOST_TSO4/6/ECN/UFO, MRG_RXBUF: not the tap's business


def bits(*names: str) -> int:
    return sum(1 << GUEST_BITS[n] for n in names)


# --- offload mapping: no root needed ------------------------------------------------------


def test_all_guest_offloads_map_to_all_tun_flags() -> None:
    got = offloads_for_guest_features(bits("CSUM", "TSO4", "TSO6", "ECN", "UFO"))
    assert got == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO


def test_no_guest_csum_means_no_offload_at_all() -> None:
    # A GSO frame is always partially checksummed: TSO without CSUM is impossible.
    assert offloads_for_guest_features(bits("TSO4", "TSO6", "ECN", "UFO")) == 0


def test_ecn_needs_a_tso_flag() -> None:
    assert offloads_for_guest_features(bits("CSUM", "ECN")) == TUN_F_CSUM
    assert offloads_for_guest_features(bits("CSUM", "TSO6", "ECN")) == (
        TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN
    )


def test_host_offloads_do_not_touch_the_tap() -> None:
    host = sum(1 << b for b in HOST_BITS)
    assert offloads_for_guest_features(host) == 0
    assert offloads_for_guest_features(host | bits("CSUM")) == TUN_F_CSUM


# --- errors that name what was wrong ------------------------------------------------------


def test_name_too_long_is_refused_before_any_syscall() -> None:
    with pytest.raises(TapError, match="too long.*IFNAMSIZ") as e:
        open_tap("x" * 16)
    assert e.value.errno == errno.EINVAL


def test_bad_vnet_hdr_size_is_refused() -> None:
    with pytest.raises(TapError, match="vnet_hdr_size 11"):
        open_tap("vntbad", vnet_hdr_size=11)


def test_missing_dev_net_tun_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tapmod, "TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(TapError, match="/nonexistent/net/tun is missing") as e:
        open_tap("vntmiss")
    assert e.value.errno == errno.ENOENT


def test_without_cap_net_admin_the_error_says_root(root_tun: None) -> None:
    # A forked child drops to nobody: /dev/net/tun opens (mode 0666), TUNSETIFF is EPERM.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            open_tap("vntperm")
            msg = b"opened"
        except TapError as e:
            msg = f"{e.errno} {e}".encode()
        except BaseException as e:
            msg = repr(e).encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    assert msg.startswith(f"{errno.EPERM} ") and "need root" in msg, msg


# --- a tap as the kernel sees it ----------------------------------------------------------


def ethtool_features(ifname: str) -> dict[str, bool]:
    names = (
        "tx-checksum-ip-generic",
        "tx-tcp-segmentation",
        "tx-tcp6-segmentation",
        "tx-tcp-ecn-segmentation",
    )
    e = Ethtool()
    try:
        features = e.get_features(ifname).features
        return {n: features[n].enable for n in names}
    finally:
        e.close()


def tun_linkinfo(ifname: str) -> dict[str, int]:
    with IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
    info = link.get("IFLA_LINKINFO")
    assert info.get("IFLA_INFO_KIND") == "tun"
    return dict(info.get("IFLA_INFO_DATA")["attrs"])


def test_open_tap_sets_vnet_hdr_and_offloads(root_tun: None) -> None:
    with open_tap("vntflags", offloads=TUN_F_DEFAULT) as tap:
        assert tap.flags() & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) == (
            IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        )
        assert tap.kernel_vnet_hdr_size() == 12
        info = tun_linkinfo(tap.name)
        assert (info["IFLA_TUN_TYPE"], info["IFLA_TUN_PI"], info["IFLA_TUN_VNET_HDR"]) == (
            IFF_TAP,
            0,
            1,
        )
        assert all(ethtool_features(tap.name).values())
        assert os.get_blocking(tap.fileno()) is False
    assert tap.closed


def test_tap_without_offloads_has_no_tso(root_tun: None) -> None:
    with open_tap("vntnooff", offloads=0) as tap:
        assert not any(ethtool_features(tap.name).values())


def test_closing_the_tap_deletes_the_device(root_tun: None) -> None:
    with open_tap("vntgone"):
        pass
    with IPRoute() as ipr:
        assert ipr.link_lookup(ifname="vntgone") == []


# --- frames both ways through a tap moved into a namespace --------------------------------


def udp_frame(dst_mac: str, payload: bytes, dport: int) -> bytes:
    udp = dpkt.udp.UDP(sport=40000, dport=dport, data=payload)
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(
        src=socket.inet_aton(PEER_ADDR), dst=socket.inet_aton(NS_ADDR), p=dpkt.ip.IP_PROTO_UDP,
        data=udp,
    )  # fmt: skip
    eth = dpkt.ethernet.Ethernet(
        dst=mac_bytes(dst_mac), src=mac_bytes(PEER_MAC), type=dpkt.ethernet.ETH_TYPE_IP, data=ip
    )
    return bytes(eth)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def read_udp_frame(tap: tapmod.Tap, buf: bytearray, dport: int) -> tuple[int, dpkt.udp.UDP]:
    """Read frames until the UDP datagram to ``dport`` (skipping IPv6 chatter); bounded."""
    view = memoryview(buf)
    deadline = time.monotonic() + 5
    for _ in range(100):
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no UDP frame read from the tap within 5 s"
        select.select([tap], [], [], remaining)
        try:
            n = tap.readv_into([view])
        except BlockingIOError:
            continue
        eth = dpkt.ethernet.Ethernet(bytes(buf[HDR:n]))
        if isinstance(eth.data, dpkt.ip.IP) and isinstance(eth.data.data, dpkt.udp.UDP):
            if eth.data.data.dport == dport:
                return n, eth.data.data
    raise AssertionError("100 frames and none was the UDP datagram")


@pytest.fixture
def tap_in_ns(topo: Topology) -> tuple[str, tapmod.Tap]:
    ns = topo.add_netns("tap")
    tap = topo.add_tap(ns, f"{NS_ADDR}/24")
    # The peer behind the tap is only us: a static entry spares the ARP round trip.
    add_neighbour(ns, tap.name, PEER_ADDR, PEER_MAC)
    return ns, tap


def test_frame_written_to_moved_tap_reaches_a_socket_in_the_namespace(tap_in_ns) -> None:
    ns, tap = tap_in_ns
    with socket_in_netns(ns) as sock:
        sock.bind((NS_ADDR, 7777))
        sock.settimeout(5)
        frame = udp_frame(link_mac(ns, tap.name), b"hello virtnet", 7777)
        # An all-zero vnet header: no offload, the checksums are in the frame.
        assert tap.writev([bytes(HDR), frame]) == HDR + len(frame)
        data, (src, _) = sock.recvfrom(100)
    assert (data, src) == (b"hello virtnet", PEER_ADDR)


def test_frame_sent_in_the_namespace_is_read_with_its_vnet_header(tap_in_ns) -> None:
    ns, tap = tap_in_ns
    buf = bytearray(b"\xaa" * (HDR + MAX_FRAME_LEN))
    with socket_in_netns(ns) as sock:
        sock.sendto(b"x" * 100, (PEER_ADDR, 9999))
        n, udp = read_udp_frame(tap, buf, 9999)
    flags, gso_type, _hdr_len, _gso_size, csum_start, csum_offset = tapmod.struct.unpack_from(
        "<BBHHHH", buf
    )
    # TUN_F_CSUM is on: the stack left the UDP checksum to "the device" (us).
    assert flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert gso_type == 0
    assert (csum_start, csum_offset) == (14 + 20, 6)  # after Ethernet + IPv4, UDP's check
    # With vnet_hdr_sz 12 the kernel never writes a num_buffers of its own: older kernels
    # leave our 0xaa filler, newer ones pad with zeros (see virtnet.ports.tap).
    assert buf[10:12] in (b"\xaa\xaa", b"\x00\x00")
    assert n == HDR + 14 + 20 + 8 + 100 and udp.data == b"x" * 100


def test_a_short_read_truncates_the_frame(tap_in_ns) -> None:
    ns, tap = tap_in_ns
    with socket_in_netns(ns) as sock:
        sock.sendto(b"y" * 1000, (PEER_ADDR, 9998))
    # Read into a 12 + 64 byte buffer: the tap cuts the frame, it does not split it.
    small = bytearray(HDR + 64)
    deadline = time.monotonic() + 5
    while True:
        assert time.monotonic() < deadline, "no frame read within 5 s"
        select.select([tap], [], [], 1)
        try:
            n = tap.readv_into([memoryview(small)])
        except BlockingIOError:
            continue
        eth = dpkt.ethernet.Ethernet(bytes(small[HDR:n]))
        if eth.type == dpkt.ethernet.ETH_TYPE_IP:
            break
    assert n == len(small)
    with pytest.raises(BlockingIOError):  # and the rest of it is gone, not queued
        while True:
            n = tap.readv_into([memoryview(small)])
            assert dpkt.ethernet.Ethernet(bytes(small[HDR:n])).type != dpkt.ethernet.ETH_TYPE_IP
