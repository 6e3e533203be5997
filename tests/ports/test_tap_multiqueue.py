"""IFF_MULTI_QUEUE taps: one fd per queue, flows spread by hash, and one backend per queue pair."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time

import dpkt
import pytest
from pyroute2 import IPRoute
from tests.ports.test_tap import (
    HDR,
    NS_ADDR,
    PEER_ADDR,
    PEER_MAC,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    mac_bytes,
)

from virtnet.ports.backends import (
    BACKEND_HELP_TEXT,
    BACKENDS,
    BackendError,
    GenDevice,
    GenDriver,
    LoopbackDevice,
    LoopbackDriver,
    SinkDevice,
    SinkDriver,
    TapDevice,
    TapDriver,
    device_backend,
    device_backends,
    driver_backends,
    open_taps,
    parse_backend,
)
from virtnet.ports.netns import (
    Topology,
    add_neighbour,
    entered_netns,
    iproute,
    link_index,
    link_mac,
)
from virtnet.ports.netns import socket_in_netns as ns_socket
from virtnet.ports.tap import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    MAX_FRAME_LEN,
    MAX_TAP_QUEUES,
    Tap,
    TapError,
    open_tap,
    open_tap_queues,
)

MQ_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
FLOWS = 64  # UDP flows (distinct destination ports) sent per round; bounded
BASE_PORT = 20000
READ_TIMEOUT = 5.0  # seconds for every sent frame to be read back


# --- bad input: no root needed -------------------------------------------------------------


@pytest.mark.parametrize("queues", [0, -1, True, 1.5, "2"])
def test_open_tap_queues_refuses_a_non_count(queues) -> None:
    with pytest.raises(TapError, match=r"queues .*at least 1 queue") as e:
        open_tap_queues("vnqbad", queues)
    assert e.value.errno == errno.EINVAL


def test_open_tap_queues_refuses_more_than_the_kernel_allows() -> None:
    with pytest.raises(TapError, match=f"at most {MAX_TAP_QUEUES} queues.*MAX_TAP_QUEUES") as e:
        open_tap_queues("vnqbig", MAX_TAP_QUEUES + 1)
    assert e.value.errno == errno.E2BIG


def test_parse_backend_takes_a_list_of_tap_fds() -> None:
    assert parse_backend("tapfd:3,4,5") == ("tapfd", "3,4,5")
    for bad in ("tapfd:", "tapfd:3,", "tapfd:,3", "tapfd:3;4", "tapfd:a"):
        with pytest.raises(BackendError, match="expected one of"):
            parse_backend(bad)


def test_one_tapfd_is_one_queue() -> None:
    # Refused before any fd is touched: fd 3 need not be a tap for the message.
    with pytest.raises(BackendError, match=r"names 1 fd\(s\) for 4 queue pair\(s\): one "
                       r"inherited fd is one queue.*tapfd:FD1,FD2,FD3,\.\.\."):  # fmt: skip
        device_backends("tapfd:3", 4)
    with pytest.raises(BackendError, match=r"names 2 fd\(s\) for 1 queue.*--queues 2"):
        driver_backends("tapfd:3,4", 1)
    with pytest.raises(BackendError, match="named twice"):
        device_backends("tapfd:3,3", 2)


@pytest.mark.parametrize("make", [device_backends, driver_backends])
def test_zero_queue_pairs_is_refused(make) -> None:
    with pytest.raises(BackendError, match="0 queue pairs; at least 1"):
        make("sink", 0)


@pytest.mark.parametrize(
    ("make", "spec", "cls"),
    [
        (device_backends, "sink", SinkDevice),
        (device_backends, "gen:256", GenDevice),
        (device_backends, "loopback", LoopbackDevice),
        (driver_backends, "sink", SinkDriver),
        (driver_backends, "gen:256", GenDriver),
        (driver_backends, "loopback", LoopbackDriver),
    ],
)
def test_every_queue_pair_gets_its_own_backend(make, spec, cls) -> None:
    backends = make(spec, 3)
    assert [type(b) for b in backends] == [cls] * 3
    assert len({id(b) for b in backends}) == 3
    assert len({id(b.sink) for b in backends}) == 3  # counters are per pair, summed by the lead


class FakeTap:
    def __init__(self, i: int) -> None:
        self.i = i

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("make", "cls"), [(device_backends, TapDevice),
                                           (driver_backends, TapDriver)])  # fmt: skip
def test_a_tap_gives_one_queue_per_pair(make, cls) -> None:
    calls = []

    def factory(kind: str, arg: str, queues: int) -> list[FakeTap]:
        calls.append((kind, arg, queues))
        return [FakeTap(i) for i in range(queues)]

    backends = make("tap:vnq0", 4, factory)
    assert calls == [("tap", "vnq0", 4)]
    assert [type(b) for b in backends] == [cls] * 4
    assert [b.tap.i for b in backends] == [0, 1, 2, 3]


def test_the_one_queue_functions_keep_their_factory() -> None:
    b = device_backend("tap:vnq1", lambda kind, arg: FakeTap(7))
    assert isinstance(b, TapDevice) and b.tap.i == 7


def test_the_help_names_every_backend() -> None:
    for kind in BACKENDS:
        assert kind.split(":")[0] + ":" in BACKEND_HELP_TEXT or kind in BACKEND_HELP_TEXT
    assert BACKEND_HELP_TEXT.startswith("R|")


# --- a multi-queue tap as the kernel sees it -----------------------------------------------


def tun_info(netns: str | None, ifname: str) -> dict[str, int]:
    with iproute(netns) as ipr:
        link = ipr.get_links(link_index(ipr, ifname, netns))[0]
    return dict(link.get("IFLA_LINKINFO").get("IFLA_INFO_DATA")["attrs"])


@pytest.mark.parametrize("queues", [2, 4])
def test_every_fd_is_a_queue_of_one_multi_queue_tap(root_tun: None, queues: int) -> None:
    taps = open_tap_queues("vnqflags", queues)
    try:
        assert [t.name for t in taps] == ["vnqflags"] * queues
        assert len({t.fileno() for t in taps}) == queues
        for t in taps:
            assert t.multi_queue and t.flags() & MQ_FLAGS == MQ_FLAGS
            assert t.kernel_vnet_hdr_size() == HDR
            assert os.get_blocking(t.fileno()) is False
        info = tun_info(None, "vnqflags")
        assert (info["IFLA_TUN_MULTI_QUEUE"], info["IFLA_TUN_NUM_QUEUES"]) == (1, queues)
    finally:
        for t in taps:
            t.close()
    with IPRoute() as ipr:
        assert ipr.link_lookup(ifname="vnqflags") == []  # gone with its last queue


@pytest.mark.parametrize("make", [device_backends, driver_backends])
def test_tap_backends_open_one_queue_each(root_tun: None, make) -> None:
    backends = make("tap:vnqdev", 3)
    try:
        taps = [b.tap for b in backends]
        assert all(t.name == "vnqdev" and t.multi_queue for t in taps)
        assert len({b.fileno() for b in backends}) == 3
        assert tun_info(None, "vnqdev")["IFLA_TUN_NUM_QUEUES"] == 3
        for b in backends:
            b.on_features(0)  # every worker sets the (device-wide) offloads: harmless
        assert [t.offloads for t in taps] == [0, 0, 0]
    finally:
        for b in backends:
            b.close()
    with IPRoute() as ipr:
        assert ipr.link_lookup(ifname="vnqdev") == []
    (one,) = make("tap:vnqone", 1)  # one queue pair: a plain tap, as before
    try:
        assert not one.tap.multi_queue and not one.tap.flags() & IFF_MULTI_QUEUE
    finally:
        one.close()


def test_from_fd_adopts_one_queue(root_tun: None) -> None:
    taps = open_tap_queues("vnqadopt", 2)
    try:
        adopted = Tap.from_fd(taps[1].fileno())
        assert (adopted.name, adopted.multi_queue, adopted.vnet_hdr_size) == ("vnqadopt", True, 12)
        backends = open_taps("tapfd", f"{taps[0].fileno()},{taps[1].fileno()}", 2)
        assert [b.fileno() for b in backends] == [t.fileno() for t in taps]
    finally:
        for t in taps:
            t.close()


def test_single_and_multi_queue_do_not_mix(root_tun: None) -> None:
    with open_tap("vnqsingle") as single:
        with pytest.raises(TapError, match="vnqsingle exists as a single-queue tap") as e:
            open_tap_queues("vnqsingle", 2)
        assert e.value.errno == errno.EINVAL
        dup = os.dup(single.fileno())
        try:
            with pytest.raises(BackendError, match=r"single-queue tap; 2 queue pairs need 2"):
                open_taps("tapfd", f"{single.fileno()},{dup}", 2)
        finally:
            os.close(dup)
    taps = open_tap_queues("vnqmulti", 2)
    try:
        with pytest.raises(TapError, match="vnqmulti exists as a multi-queue tap"):
            open_tap("vnqmulti")
    finally:
        for t in taps:
            t.close()


def test_past_max_tap_queues_the_kernel_refuses_and_none_is_left(root_tun: None) -> None:
    # MAX_TAP_QUEUES - 1 queues, then 3 more: two attach, the third is E2BIG, and the
    # two are closed again.
    taps = open_tap_queues("vnqmax", MAX_TAP_QUEUES - 1)
    try:
        with pytest.raises(TapError, match=f"already has {MAX_TAP_QUEUES} queues") as e:
            open_tap_queues("vnqmax", 3)
        assert e.value.errno == errno.E2BIG
        assert tun_info(None, "vnqmax")["IFLA_TUN_NUM_QUEUES"] == MAX_TAP_QUEUES - 1
    finally:
        for t in taps:
            t.close()


def test_queues_of_two_taps_are_not_one_device(root_tun: None) -> None:
    a, b = open_tap_queues("vnqa", 1), open_tap_queues("vnqb", 1)
    try:
        with pytest.raises(BackendError, match=r"queues of different taps \(vnqa, vnqb\)"):
            open_taps("tapfd", f"{a[0].fileno()},{b[0].fileno()}", 2)
    finally:
        for t in a + b:
            t.close()


# --- frames through the queues of a tap in a namespace -------------------------------------


def udp_frame(dst_mac: str, payload: bytes, dport: int, sport: int = 40000) -> bytes:
    """PEER → NS, checksums filled in (the vnet header written with it is all zero)."""
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=socket.inet_aton(PEER_ADDR), dst=socket.inet_aton(NS_ADDR),
                    p=dpkt.ip.IP_PROTO_UDP, data=udp)  # fmt: skip
    return bytes(dpkt.ethernet.Ethernet(dst=mac_bytes(dst_mac), src=mac_bytes(PEER_MAC),
                                        type=dpkt.ethernet.ETH_TYPE_IP, data=ip))  # fmt: skip


def read_flows(taps: list[Tap], want: int) -> dict[int, list[tuple[int, bytes]]]:
    """Read every queue until ``want`` UDP frames to BASE_PORT.. arrived; per queue
    index, (dport, vnet header) of each. Other frames (IPv6 chatter) are skipped."""
    got: dict[int, list[tuple[int, bytes]]] = {i: [] for i in range(len(taps))}
    buf = bytearray(HDR + MAX_FRAME_LEN)
    deadline = time.monotonic() + READ_TIMEOUT
    n_got = 0
    while n_got < want:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{n_got} of {want} frames read within {READ_TIMEOUT:g}s: {got}"
        ready, _, _ = select.select([t for t in taps if not t.closed], [], [], remaining)
        for t in ready:
            try:
                n = t.readv_into([memoryview(buf)])
            except BlockingIOError:
                continue
            eth = dpkt.ethernet.Ethernet(bytes(buf[HDR:n]))
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP):
                if BASE_PORT <= ip.data.dport < BASE_PORT + FLOWS:
                    got[taps.index(t)].append((ip.data.dport, bytes(buf[:HDR])))
                    n_got += 1
    return got


def send_flows(netns: str, flows: int = FLOWS) -> None:
    with ns_socket(netns) as sock:
        for i in range(flows):
            sock.sendto(b"f" * 64, (PEER_ADDR, BASE_PORT + i))


@pytest.fixture(params=[2, 4], ids=lambda n: f"{n}q")
def mq_in_ns(request, topo: Topology) -> tuple[str, list[Tap]]:
    ns = topo.add_netns("tapmq")
    taps = topo.add_tap_queues(ns, f"{NS_ADDR}/24", request.param)
    add_neighbour(ns, taps[0].name, PEER_ADDR, PEER_MAC)
    return ns, taps


def test_flows_spread_over_the_queues_with_their_vnet_headers(mq_in_ns) -> None:
    ns, taps = mq_in_ns
    send_flows(ns)
    got = read_flows(taps, FLOWS)
    used = [i for i, frames in got.items() if frames]
    assert len(used) > 1, f"all {FLOWS} flows on one queue of {len(taps)}: {got}"
    ports = sorted(p for frames in got.values() for p, _ in frames)
    assert ports == list(range(BASE_PORT, BASE_PORT + FLOWS))  # each once, none lost
    for frames in got.values():
        for _, hdr in frames:
            flags, gso_type, _, _, csum_start, csum_offset = struct.unpack_from("<BBHHHH", hdr)
            # TUN_F_CSUM on every queue: the UDP checksum is left to "the device".
            assert flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and gso_type == 0
            assert (csum_start, csum_offset) == (14 + 20, 6)


def test_a_frame_written_on_any_queue_enters_the_stack(mq_in_ns) -> None:
    ns, taps = mq_in_ns
    mac = link_mac(ns, taps[0].name)
    with ns_socket(ns) as sock:
        sock.bind((NS_ADDR, 7777))
        sock.settimeout(READ_TIMEOUT)
        for i, t in enumerate(taps):
            frame = udp_frame(mac, f"queue {i}".encode(), 7777)
            assert t.writev([bytes(HDR), frame]) == HDR + len(frame)
        got = sorted(sock.recvfrom(100)[0] for _ in taps)
    assert got == sorted(f"queue {i}".encode() for i in range(len(taps)))


def test_a_reply_comes_back_on_the_queue_its_request_came_in(mq_in_ns) -> None:
    # tun_flow_update notes each written flow's symmetric hash → queue; tun_automq sends
    # the reply there: a per-pair worker sees both directions of its flows.
    ns, taps = mq_in_ns
    mac = link_mac(ns, taps[0].name)
    with ns_socket(ns) as sock:
        sock.bind((NS_ADDR, 7777))
        sock.settimeout(READ_TIMEOUT)
        for i, t in enumerate(taps):
            # The request's source port is the reply's destination: BASE_PORT + i.
            t.writev([bytes(HDR), udp_frame(mac, b"ping", 7777, sport=BASE_PORT + i)])
            _, src = sock.recvfrom(100)
            sock.sendto(b"pong", src)
    got = read_flows(taps, len(taps))
    assert {i: [p for p, _ in frames] for i, frames in got.items()} == {
        i: [BASE_PORT + i] for i in range(len(taps))
    }


def test_closing_one_queue_leaves_the_others_working(mq_in_ns) -> None:
    ns, taps = mq_in_ns
    taps[0].close()
    rest = taps[1:]
    assert tun_info(ns, rest[0].name)["IFLA_TUN_NUM_QUEUES"] == len(rest)
    send_flows(ns)
    got = read_flows(taps, FLOWS)  # the closed one is not polled
    assert not got[0]
    assert sum(len(f) for f in got.values()) == FLOWS
    with ns_socket(ns) as sock:
        sock.bind((NS_ADDR, 7777))
        sock.settimeout(READ_TIMEOUT)
        rest[-1].writev([bytes(HDR), udp_frame(link_mac(ns, rest[0].name), b"still", 7777)])
        assert sock.recvfrom(100)[0] == b"still"


def test_a_detached_queue_gets_nothing_until_attached_again(mq_in_ns) -> None:
    # A device whose driver enables fewer queue pairs than it has detaches the rest.
    ns, taps = mq_in_ns
    taps[0].set_queue_enabled(False)
    taps[0].set_queue_enabled(False)  # twice is once
    info = tun_info(ns, taps[0].name)
    assert (info["IFLA_TUN_NUM_QUEUES"], info["IFLA_TUN_NUM_DISABLED_QUEUES"]) == (
        len(taps) - 1, 1,
    )  # fmt: skip
    taps[0].set_offload(taps[0].offloads)  # ioctls still work: on_features may come late
    with ns_socket(ns) as sock:  # and so do writes: the pair's tx needs no attach
        sock.bind((NS_ADDR, 7777))
        sock.settimeout(READ_TIMEOUT)
        taps[0].writev([bytes(HDR), udp_frame(link_mac(ns, taps[0].name), b"tx", 7777)])
        assert sock.recvfrom(100)[0] == b"tx"
    send_flows(ns)
    got = read_flows(taps, FLOWS)
    assert not got[0] and sum(len(f) for f in got.values()) == FLOWS
    taps[0].set_queue_enabled(True)
    send_flows(ns)
    assert read_flows(taps, FLOWS)[0], f"no flow of {FLOWS} on the re-attached queue"


def test_a_single_queue_tap_has_no_queue_to_detach(root_tun: None) -> None:
    with open_tap("vnqnodet") as t:
        with pytest.raises(TapError, match="only a multi-queue tap"):
            t.set_queue_enabled(False)


# --- a persistent multi-queue tap made in a namespace, attached queue by queue ------------


def test_a_persistent_tap_in_a_namespace_is_attached_queue_by_queue(topo: Topology) -> None:
    ns = topo.add_netns("tappers")
    name = topo.add_persistent_tap(ns, f"{NS_ADDR}/24")
    assert tun_info(ns, name)["IFLA_TUN_NUM_QUEUES"] == 0
    first = topo.attach_tap_queues(ns, name, 1)
    more = topo.attach_tap_queues(ns, name, 3)
    taps = first + more
    assert tun_info(ns, name)["IFLA_TUN_NUM_QUEUES"] == 4
    with entered_netns(ns):  # tap:IFNAME with one queue pair attaches one queue more
        (one,) = open_taps("tap", name, 1)
    topo.taps.append(one)
    assert one.multi_queue and tun_info(ns, name)["IFLA_TUN_NUM_QUEUES"] == 5
    one.close()
    assert all(t.name == name and t.multi_queue for t in taps)
    add_neighbour(ns, name, PEER_ADDR, PEER_MAC)
    send_flows(ns)
    got = read_flows(taps, FLOWS)
    assert sum(len(f) for f in got.values()) == FLOWS
    assert len([i for i, f in got.items() if f]) > 1
    with IPRoute() as ipr:
        assert ipr.link_lookup(ifname=name) == []  # made in the namespace, never in the root


def test_a_persistent_single_queue_tap_refuses_queues(topo: Topology) -> None:
    ns = topo.add_netns("tapsq")
    name = topo.add_persistent_tap(ns, f"{NS_ADDR}/24", multi_queue=False)
    with pytest.raises(TapError, match=f"{name} exists and is not a multi-queue tap") as e:
        topo.attach_tap_queues(ns, name, 2)
    assert e.value.errno == errno.EINVAL
    info = tun_info(ns, name)
    assert info["IFLA_TUN_MULTI_QUEUE"] == 0 and "IFLA_TUN_NUM_QUEUES" not in info  # untouched


def test_the_namespace_name_is_checked(topo: Topology) -> None:
    from virtnet.ports.netns import NetnsError, open_tap_queues_in

    with pytest.raises(NetnsError, match="vn-nosuch-000000: cannot enter"):
        open_tap_queues_in("vn-nosuch-000000", "vnqx", 2)
    assert not os.path.exists("/var/run/netns/vn-nosuch-000000")  # and none was made
