"""The control virtqueue: Linux's virtnet_send_command ↔ QEMU's virtio_net_handle_ctrl,
over real split and packed rings in one bytearray guest memory.

Every command once with its state and callback, every refusal with the counters it
moves, chains no device can answer, and a property: any bytes as a command never
crash the device, every chain comes back once, and the ack is OK exactly for the
commands an independent model of 5.1.6.5 calls well-formed.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.virtio.mock import MockPackedQueue, MockSplitQueue
from virtnet.net.ctrl import (
    CTRL_MAX_DATA,
    MAC_TABLE_ENTRIES,
    STATUS_UNSET,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_NOMULTI,
    VIRTIO_NET_CTRL_RX_NOUNI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_CTRL_VLAN_ADD,
    VIRTIO_NET_CTRL_VLAN_DEL,
    VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
    ControlDevice,
    ControlQueue,
    ControlQueueBroken,
    pack_mac_table,
)
from virtnet.net.features import VirtioNetF
from virtnet.virtio.errors import QueueFullError
from virtnet.virtio.features import VirtioF, bit

F = VirtioNetF
CTRL_ALL = (
    bit(VirtioF.VERSION_1)
    | bit(F.CTRL_VQ)
    | bit(F.CTRL_RX)
    | bit(F.CTRL_RX_EXTRA)
    | bit(F.CTRL_VLAN)
    | bit(F.GUEST_ANNOUNCE)
    | bit(F.MQ)
    | bit(F.CTRL_MAC_ADDR)
    | bit(F.CTRL_GUEST_OFFLOADS)
    | bit(F.GUEST_CSUM)
    | bit(F.GUEST_TSO4)
    | bit(F.GUEST_TSO6)
)
MAX_PAIRS = 4
MAC = bytes.fromhex("525400abcdef")
OTHER = bytes.fromhex("525400000001")
MCAST = bytes.fromhex("01005e000001")
BCAST = b"\xff" * 6
KINDS = ["split", "split-indirect", "packed", "packed-indirect"]
BUF_SLOT, RAW_SLOT = 0, 1  # data slots: the ControlQueue's buffer, raw chains' bytes


class Link:
    """A driver ControlQueue and a ControlDevice on the two ends of one ring."""

    def __init__(self, kind: str, features: int = CTRL_ALL, max_pairs: int = MAX_PAIRS,
                 num: int = 16, data_slots: int = 4) -> None:  # fmt: skip
        mock = MockPackedQueue if kind.startswith("packed") else MockSplitQueue
        self.q = mock(num, indirect_max=8 if kind.endswith("indirect") else 0,
                      data_slots=data_slots)  # fmt: skip
        self.vq = self.q.driver()
        self.devq = self.q.device()
        self.dev = ControlDevice(self.devq, features, max_pairs, mac=MAC)
        self.cq = ControlQueue(self.vq, self.q.memory.view(self.q.data(BUF_SLOT), 4096),
                               self.q.data(BUF_SLOT))  # fmt: skip

    def run(self):
        """The kick reaches the device, the interrupt reaches the driver."""
        self.dev.process()
        self.dev.flush()
        return self.cq.complete()

    def send(self, cls: int, cmd: int, data: bytes | list[bytes] = b""):
        self.cq.post(cls, cmd, data)
        return self.run()

    # -- chains built by hand through the ring API (a driver that breaks the rules) --

    def raw(self, out: list[tuple[int, bytes | int]], in_: list[tuple[int, int]]):
        """A chain of readable (offset, bytes or length) and writable (offset, length)
        segments of the raw data slot; returns (used length, the slot's bytes after)."""
        base = self.q.data(RAW_SLOT)
        self.q.write(base, b"\xee" * 4096)
        segs = []
        for off, data in out:
            if isinstance(data, int):
                segs.append((base + off, data))
            else:
                self.q.write(base + off, data)
                segs.append((base + off, len(data)))
        self.vq.add(segs, [(base + off, n) for off, n in in_], "raw")
        self.dev.process()
        self.dev.flush()
        token, length = self.vq.get_buf()
        assert token == "raw"
        assert self.vq.get_buf() is None
        return length, self.q.read(base, 4096)

    def counters(self) -> tuple[int, int, int]:
        s = self.dev.stats
        return s.ctrl_commands, s.ctrl_errors, s.ctrl_desc_errors

    def state(self) -> tuple:
        d = self.dev
        return (repr(d.rx), d.mac, d.curr_queue_pairs, d.guest_offloads, d.announce_pending)


@pytest.fixture(params=KINDS)
def link(request) -> Link:
    return Link(request.param)


# -- every command, answered OK -------------------------------------------------------------


def test_set_queues(link: Link) -> None:
    seen = []
    link.dev.on_queue_pairs = seen.append
    assert link.cq.set_queues(3) is True  # no suppression asked: kick
    assert link.cq.complete() is None  # the device has not run
    result = link.run()
    assert result == VIRTIO_NET_OK and link.cq.results == [(MQ, 0, VIRTIO_NET_OK)]
    assert link.dev.curr_queue_pairs == 3 and seen == [3]
    assert link.counters() == (1, 0, 0)
    assert link.cq.set_queues(MAX_PAIRS) and link.run() == VIRTIO_NET_OK
    assert link.dev.curr_queue_pairs == MAX_PAIRS
    assert link.cq.stats.ctrl_commands == 2 and link.cq.stats.ctrl_errors == 0


def test_set_rx_mode_is_two_commands(link: Link) -> None:
    modes = []
    link.dev.on_rx_mode = lambda mode: modes.append((mode.promisc, mode.allmulti))
    assert link.dev.rx.promisc  # QEMU's reset state
    link.cq.set_rx_mode(promisc=False, allmulti=True)
    assert link.run() == VIRTIO_NET_OK
    assert link.cq.results == [
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_OK),
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_OK),
    ]
    assert modes == [(False, False), (False, True)]
    assert (link.dev.rx.promisc, link.dev.rx.allmulti) == (False, True)
    assert link.counters() == (2, 0, 0)


@pytest.mark.parametrize(
    "cmd,name",
    [
        (VIRTIO_NET_CTRL_RX_ALLUNI, "alluni"),
        (VIRTIO_NET_CTRL_RX_NOMULTI, "nomulti"),
        (VIRTIO_NET_CTRL_RX_NOUNI, "nouni"),
        (VIRTIO_NET_CTRL_RX_NOBCAST, "nobcast"),
    ],
)
def test_rx_extra_flags(link: Link, cmd: int, name: str) -> None:
    link.cq.set_rx_flag(cmd, True)
    assert link.run() == VIRTIO_NET_OK and getattr(link.dev.rx, name) is True
    link.cq.set_rx_flag(cmd, False)
    assert link.run() == VIRTIO_NET_OK and getattr(link.dev.rx, name) is False
    assert link.counters() == (2, 0, 0)


def test_mac_table_spans_segments(link: Link) -> None:
    uni = [OTHER, bytes.fromhex("020000000002")]
    multi = [MCAST]
    link.cq.set_mac_table(uni, multi)  # hdr, unicast table, multicast table: three sgs
    assert link.run() == VIRTIO_NET_OK
    rx = link.dev.rx
    assert rx.uni == frozenset(uni) and rx.multi == frozenset(multi)
    assert not rx.uni_overflow and not rx.multi_overflow
    link.cq.set_mac_table([], [])
    assert link.run() == VIRTIO_NET_OK and link.dev.rx.uni == frozenset() == link.dev.rx.multi


def test_mac_table_overflow_is_not_refused(link: Link) -> None:
    """QEMU: more than MAC_TABLE_ENTRIES addresses receive everything of that kind."""
    many = [struct.pack(">HI", 0x0200, i) for i in range(MAC_TABLE_ENTRIES + 1)]
    link.cq.set_mac_table(many, [MCAST])
    assert link.run() == VIRTIO_NET_OK
    assert link.dev.rx.uni_overflow and not link.dev.rx.multi_overflow
    link.cq.set_mac_table([OTHER] * 60, [MCAST] * 5)  # the multicast part does not fit
    assert link.run() == VIRTIO_NET_OK
    assert not link.dev.rx.uni_overflow and link.dev.rx.multi_overflow


def test_set_mac_address(link: Link) -> None:
    macs = []
    link.dev.on_mac = macs.append
    link.cq.set_mac_address(OTHER)
    assert link.run() == VIRTIO_NET_OK and link.dev.mac == OTHER and macs == [OTHER]


def test_vlan_add_del(link: Link) -> None:
    link.cq.set_vlan(100)
    assert link.run() == VIRTIO_NET_OK and link.dev.rx.vlans == {100}
    link.cq.set_vlan(100, add=False)
    assert link.run() == VIRTIO_NET_OK and link.dev.rx.vlans == frozenset()
    assert link.counters() == (2, 0, 0)


def test_set_guest_offloads(link: Link) -> None:
    seen = []
    link.dev.on_guest_offloads = seen.append
    assert link.dev.guest_offloads == bit(F.GUEST_CSUM) | bit(F.GUEST_TSO4) | bit(F.GUEST_TSO6)
    link.cq.set_guest_offloads(bit(F.GUEST_CSUM))
    assert link.run() == VIRTIO_NET_OK and link.dev.guest_offloads == bit(F.GUEST_CSUM)
    link.cq.set_guest_offloads(0)
    assert (
        link.run() == VIRTIO_NET_OK
        and link.dev.guest_offloads == 0
        and seen == [bit(F.GUEST_CSUM), 0]
    )


def test_announce_ack(link: Link) -> None:
    acks = []
    link.dev.on_announce_ack = lambda: acks.append(1)
    link.cq.ack_announce()
    assert link.run() == VIRTIO_NET_ERR  # QEMU: nothing to acknowledge
    link.dev.announce()
    link.cq.ack_announce()
    assert link.run() == VIRTIO_NET_OK and not link.dev.announce_pending and acks == [1]
    assert link.counters() == (2, 1, 0)


def test_device_interrupt_and_driver_kick_follow_suppression() -> None:
    link = Link("split")
    link.devq.disable_notify()  # the device polls: no kick wanted
    assert link.cq.set_queues(2) is False
    link.dev.process()
    link.vq.disable_cb()  # the driver spins: no interrupt wanted
    assert link.dev.flush() is False
    assert link.dev.flush() is False  # nothing more to publish
    assert link.cq.complete() == VIRTIO_NET_OK
    link.vq.enable_cb()
    link.cq.set_queues(1)
    link.dev.process()
    assert link.dev.flush() is True and link.dev.stats.ctrl_notifies == 1


# -- every refusal: VIRTIO_NET_ERR, counted, state unchanged --------------------------------

MQ, RX, MACC, VLAN, OFF, ANN = (
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_CTRL_ANNOUNCE,
)
u16, u64 = struct.Struct("<H").pack, struct.Struct("<Q").pack
uni_t, multi_t = pack_mac_table([OTHER], [MCAST])

REFUSED = {
    # wrong sizes
    "mq-1-byte": (MQ, 0, b"\x02", "takes 2"),
    "mq-3-bytes": (MQ, 0, u16(2) + b"\x00", "takes 2"),
    "rx-no-byte": (RX, VIRTIO_NET_CTRL_RX_PROMISC, b"", "takes 1"),
    "rx-2-bytes": (RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01\x01", "takes 1"),
    "mac-5-bytes": (MACC, VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER[:5], "takes 6"),
    "mac-7-bytes": (MACC, VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER + b"\x00", "takes 6"),
    "vlan-1-byte": (VLAN, VIRTIO_NET_CTRL_VLAN_ADD, b"\x01", "takes 2"),
    "offloads-7-bytes": (OFF, 0, u64(0)[:7], "takes 8"),
    "announce-with-data": (ANN, 0, b"\x00", "takes 0"),
    "table-short-count": (MACC, 0, struct.pack("<I", 2) + OTHER + multi_t, "MAC tables"),
    "table-trailing-byte": (MACC, 0, uni_t + multi_t + b"\x00", "MAC tables"),
    "table-no-multicast": (MACC, 0, uni_t, "MAC tables"),
    "table-huge-count": (MACC, 0, struct.pack("<I", 0xFFFFFFFF) + multi_t, "MAC tables"),
    "table-empty": (MACC, 0, b"", "MAC tables"),
    # unknown class / command
    "class-6": (6, 0, b"", "unknown"),
    "class-255": (255, 0, b"\x00" * 8, "unknown"),
    "rx-cmd-6": (RX, 6, b"\x01", "unknown"),
    "mac-cmd-2": (MACC, 2, OTHER, "unknown"),
    "mq-rss-config": (MQ, 1, b"\x00" * 16, "unknown"),
    "vlan-cmd-2": (VLAN, 2, u16(1), "unknown"),
    "announce-cmd-1": (ANN, 1, b"", "unknown"),
    "offloads-cmd-1": (OFF, 1, u64(0), "unknown"),
    # values out of range
    "pairs-0": (MQ, 0, u16(0), "outside 1..4"),
    "pairs-max+1": (MQ, 0, u16(MAX_PAIRS + 1), "outside 1..4"),
    "pairs-0x8001": (MQ, 0, u16(0x8001), "outside"),
    "pairs-0xffff": (MQ, 0, u16(0xFFFF), "outside"),
    "vid-4096": (VLAN, VIRTIO_NET_CTRL_VLAN_ADD, u16(4096), ">= 4096"),
    "offload-host-bit": (OFF, 0, u64(bit(F.HOST_TSO4)), "not within"),
    "offload-ufo-not-negotiated": (OFF, 0, u64(bit(F.GUEST_UFO)), "not within"),
    "offload-bit-63": (OFF, 0, u64(1 << 63), "not within"),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_refused(link: Link, case: str) -> None:
    cls, cmd, data, why = REFUSED[case]
    before = link.state()
    result = link.send(cls, cmd, data)
    assert result == VIRTIO_NET_ERR and link.cq.results == [(cls, cmd, VIRTIO_NET_ERR)]
    assert link.counters() == (1, 1, 0)
    assert why in link.dev.last_error and why in link.dev.log[-1].reason
    assert link.state() == before
    assert link.cq.stats.ctrl_errors == 1


# (class, cmd, data, the feature it needs)
NEEDS = {
    "promisc": (RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00", F.CTRL_RX),
    "allmulti": (RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01", F.CTRL_RX),
    "alluni": (RX, VIRTIO_NET_CTRL_RX_ALLUNI, b"\x01", F.CTRL_RX_EXTRA),
    "nobcast": (RX, VIRTIO_NET_CTRL_RX_NOBCAST, b"\x01", F.CTRL_RX_EXTRA),
    "mac-table": (MACC, VIRTIO_NET_CTRL_MAC_TABLE_SET, uni_t + multi_t, F.CTRL_RX),
    "mac-addr": (MACC, VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER, F.CTRL_MAC_ADDR),
    "vlan": (VLAN, VIRTIO_NET_CTRL_VLAN_ADD, u16(5), F.CTRL_VLAN),
    "announce": (ANN, VIRTIO_NET_CTRL_ANNOUNCE_ACK, b"", F.GUEST_ANNOUNCE),
    "mq": (MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, u16(2), F.MQ),
    "offloads": (OFF, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, u64(0), F.CTRL_GUEST_OFFLOADS),
}


@pytest.mark.parametrize("kind", ["split", "packed"])
@pytest.mark.parametrize("case", list(NEEDS), ids=list(NEEDS))
def test_feature_not_negotiated(kind: str, case: str) -> None:
    cls, cmd, data, feature = NEEDS[case]
    with_it = Link(kind)
    with_it.dev.announce()
    assert with_it.send(cls, cmd, data) == VIRTIO_NET_OK  # the command itself is well-formed
    link = Link(kind, CTRL_ALL & ~bit(feature))
    link.dev.announce()
    before = link.state()
    assert link.send(cls, cmd, data) == VIRTIO_NET_ERR
    assert "not negotiated" in link.dev.last_error
    assert link.counters() == (1, 1, 0) and link.state() == before


@pytest.mark.parametrize("how", ["false", "raise"])
def test_callback_refusal_keeps_state(link: Link, how: str) -> None:
    def refuse(n: int):
        if how == "raise":
            raise OSError("no such queue")
        return False

    link.dev.on_queue_pairs = refuse
    assert link.send(MQ, 0, u16(2)) == VIRTIO_NET_ERR
    assert link.dev.curr_queue_pairs == 1 and link.counters() == (1, 1, 0)
    assert ("OSError" if how == "raise" else "refused") in link.dev.last_error


def test_data_over_the_limit_is_refused_without_reading_it() -> None:
    link = Link("split", data_slots=2 + CTRL_MAX_DATA // 4096 + 1)
    length, _ = link.raw([(0, struct.pack("<BB", MQ, 0)), (2, CTRL_MAX_DATA + 1)], [(0, 1)])
    assert length == 1 and link.counters() == (1, 1, 0)
    assert "at most" in link.dev.last_error


# -- chains no device can answer: returned with length 0, counted, never a crash ---------------

HDR_MQ2 = struct.pack("<BBH", MQ, 0, 2)


@pytest.mark.parametrize(
    "out,in_",
    [
        pytest.param([(0, HDR_MQ2)], [], id="no-writable"),
        pytest.param([(0, HDR_MQ2)], [(100, 0)], id="zero-length-writable"),
        pytest.param([], [(100, 1)], id="no-readable"),
        pytest.param([(0, HDR_MQ2[:1])], [(100, 1)], id="one-header-byte"),
        pytest.param([(0, 0)], [(100, 0)], id="zero-length"),
        pytest.param([(0, 0), (0, 1)], [(100, 8)], id="header-short-over-segments"),
    ],
)
def test_unanswerable_chain(link: Link, out, in_) -> None:
    before = link.state()
    length, after = link.raw(out, in_)
    assert length == 0
    assert after[100] == 0xEE  # nothing written
    assert link.counters() == (0, 0, 1)
    assert link.state() == before
    # The queue keeps working.
    assert link.send(MQ, 0, u16(2)) == VIRTIO_NET_OK and link.dev.curr_queue_pairs == 2


def test_descriptor_error_is_returned(link: Link) -> None:
    """A descriptor outside guest memory: the ring refuses it, the device gives it back."""
    bad = link.q.end + 0x1000
    link.vq.add([(bad, 2)], [(link.q.data(RAW_SLOT), 1)], "raw")
    assert link.dev.process() == 1
    link.dev.flush()
    assert link.vq.get_buf() == ("raw", 0)
    assert link.counters() == (0, 0, 1) and "outside guest memory" in link.dev.last_error


@pytest.mark.parametrize(
    "out,in_",
    [
        pytest.param(
            [(0, HDR_MQ2[:1]), (1, HDR_MQ2[1:2]), (2, HDR_MQ2[2:])], [(100, 1)], id="header-split"
        ),  # fmt: skip
        pytest.param(
            [(0, HDR_MQ2[:1]), (1, 0), (1, HDR_MQ2[1:3]), (3, HDR_MQ2[3:])],
            [(100, 1)],
            id="zero-length-middle",
        ),  # fmt: skip
        pytest.param([(0, HDR_MQ2)], [(100, 0), (101, 1)], id="ack-after-empty-writable"),
        pytest.param([(0, HDR_MQ2)], [(101, 16)], id="big-writable"),
    ],
)
def test_any_layout_is_answered(link: Link, out, in_) -> None:
    """5.1.6.5: any descriptor layout of the same bytes is the same command."""
    length, after = link.raw(out, in_)
    assert length == 1 and after[101 if in_[-1][0] == 101 else 100] == VIRTIO_NET_OK
    assert link.dev.curr_queue_pairs == 2 and link.counters() == (1, 0, 0)


# -- the driver's side of a device that misbehaves --------------------------------------------


def test_unwritten_ack_reads_as_failure() -> None:
    """Linux presets ctrl->status to ~0: a device that uses the chain without
    writing the ack fails the command."""
    link = Link("split")
    link.cq.set_queues(2)
    chain = link.devq.pop()
    link.devq.push_used(chain.head, 0)
    link.devq.flush_used()
    result = link.cq.complete()
    assert result == STATUS_UNSET
    assert link.cq.stats.ctrl_errors == 1


def test_bad_used_id_fails_the_batch() -> None:
    link = Link("split")
    link.cq.set_queues(2)
    link.q.put_used(9, 1)  # a device naming a buffer that was never posted
    result = link.cq.complete()
    assert result == STATUS_UNSET and link.cq.stats.ctrl_desc_errors == 1
    assert link.cq.complete() is None  # the batch is over
    with pytest.raises(ControlQueueBroken, match="not a buffer in flight"):
        link.cq.set_queues(2)


def test_post_refuses_what_does_not_fit() -> None:
    link = Link("split")
    with pytest.raises(ValueError, match="control buffer too small"):
        link.cq.post(MACC, 0, b"\x00" * 5000)
    assert not link.cq.busy and link.vq.num_free == link.vq.num
    for _ in range(link.vq.num // 3):  # hdr, data, status: three descriptors each
        link.cq.set_queues(1)
    with pytest.raises(QueueFullError):
        link.cq.set_queues(1)
    result = link.run()
    assert result == VIRTIO_NET_OK and len(link.cq.results) == link.vq.num // 3
    with pytest.raises(ValueError, match="6 bytes"):
        link.cq.set_mac_address(b"\x00")
    with pytest.raises(ValueError):
        ControlDevice(None, CTRL_ALL, 0)


# -- the receive filter (QEMU receive_filter) -------------------------------------------------


def eth(dst: bytes, vid: int | None = None) -> bytes:
    tag = b"" if vid is None else struct.pack(">HH", 0x8100, vid)
    return dst + OTHER + tag + b"\x08\x00" + bytes(46)


def filt(features: int = CTRL_ALL) -> ControlDevice:
    dev = ControlDevice(None, features, mac=MAC)
    assert dev.handle(RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00")[0] == VIRTIO_NET_OK
    return dev


def test_rx_filter_promisc_takes_everything() -> None:
    dev = ControlDevice(None, CTRL_ALL, mac=MAC)
    assert all(dev.rx_filter(f) for f in (eth(OTHER), eth(MCAST), b"", eth(MAC, vid=7)))


def test_rx_filter_unicast() -> None:
    dev = filt()
    assert dev.rx_filter(eth(MAC)) and not dev.rx_filter(eth(OTHER))
    dev.handle(MACC, VIRTIO_NET_CTRL_MAC_TABLE_SET, b"".join(pack_mac_table([OTHER], [])))
    assert dev.rx_filter(eth(OTHER))
    assert not dev.rx_filter(eth(bytes.fromhex("020000000009")))
    dev.handle(RX, VIRTIO_NET_CTRL_RX_ALLUNI, b"\x01")
    assert dev.rx_filter(eth(bytes.fromhex("020000000009")))
    dev.handle(RX, VIRTIO_NET_CTRL_RX_NOUNI, b"\x01")  # wins over alluni and our own MAC
    assert not dev.rx_filter(eth(MAC)) and dev.rx_filter(eth(BCAST))


def test_rx_filter_unicast_overflow() -> None:
    dev = filt()
    many = [struct.pack(">HI", 0x0200, i) for i in range(MAC_TABLE_ENTRIES + 1)]
    dev.handle(MACC, VIRTIO_NET_CTRL_MAC_TABLE_SET, b"".join(pack_mac_table(many, [])))
    assert dev.rx_filter(eth(bytes.fromhex("0a0000000000")))
    assert not dev.rx_filter(eth(MCAST))


def test_rx_filter_multicast_and_broadcast() -> None:
    dev = filt()
    assert dev.rx_filter(eth(BCAST)) and not dev.rx_filter(eth(MCAST))
    dev.handle(MACC, VIRTIO_NET_CTRL_MAC_TABLE_SET, b"".join(pack_mac_table([], [MCAST])))
    assert dev.rx_filter(eth(MCAST)) and not dev.rx_filter(eth(bytes.fromhex("01005e000002")))
    dev.handle(RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01")
    assert dev.rx_filter(eth(bytes.fromhex("01005e000002")))
    dev.handle(RX, VIRTIO_NET_CTRL_RX_NOMULTI, b"\x01")
    assert not dev.rx_filter(eth(MCAST)) and dev.rx_filter(eth(BCAST))
    dev.handle(RX, VIRTIO_NET_CTRL_RX_NOBCAST, b"\x01")
    assert not dev.rx_filter(eth(BCAST)) and dev.rx_filter(eth(MAC))


def test_rx_filter_multicast_overflow() -> None:
    dev = filt()
    many = [struct.pack(">HI", 0x0100, i) for i in range(MAC_TABLE_ENTRIES + 1)]
    dev.handle(MACC, VIRTIO_NET_CTRL_MAC_TABLE_SET, b"".join(pack_mac_table([], many)))
    assert dev.rx_filter(eth(bytes.fromhex("0100aaaaaaaa")))


def test_rx_filter_vlan() -> None:
    dev = filt()
    assert dev.rx_filter(eth(MAC)) and not dev.rx_filter(eth(MAC, vid=7))
    dev.handle(VLAN, VIRTIO_NET_CTRL_VLAN_ADD, u16(7))
    assert dev.rx_filter(eth(MAC, vid=7)) and not dev.rx_filter(eth(MAC, vid=8))
    assert dev.rx_filter(eth(MAC, vid=0x3007))  # PCP/DEI bits are not the vid
    dev.handle(VLAN, VIRTIO_NET_CTRL_VLAN_DEL, u16(7))
    assert not dev.rx_filter(eth(MAC, vid=7))
    no_vlan = filt(CTRL_ALL & ~bit(F.CTRL_VLAN))  # QEMU: every vid allowed
    assert no_vlan.rx_filter(eth(MAC, vid=7))


def test_rx_filter_runts() -> None:
    dev = filt()
    assert not dev.rx_filter(b"") and not dev.rx_filter(MAC[:5])
    assert dev.rx_filter(MAC) and dev.rx_filter(memoryview(eth(MAC)))


# -- property: any bytes, any layout -----------------------------------------------------------

GUEST_OFFLOAD_MODEL = bit(F.GUEST_CSUM) | bit(F.GUEST_TSO4) | bit(F.GUEST_TSO6)
FIXED_LEN = {RX: 1, VLAN: 2, ANN: 0, MQ: 2, OFF: 8}
NEED_MODEL = {
    (RX, 0): F.CTRL_RX, (RX, 1): F.CTRL_RX, (RX, 2): F.CTRL_RX_EXTRA, (RX, 3): F.CTRL_RX_EXTRA,
    (RX, 4): F.CTRL_RX_EXTRA, (RX, 5): F.CTRL_RX_EXTRA, (MACC, 0): F.CTRL_RX,
    (MACC, 1): F.CTRL_MAC_ADDR, (VLAN, 0): F.CTRL_VLAN, (VLAN, 1): F.CTRL_VLAN,
    (ANN, 0): F.GUEST_ANNOUNCE, (MQ, 0): F.MQ, (OFF, 0): F.CTRL_GUEST_OFFLOADS,
}  # fmt: skip


def well_formed(cls: int, cmd: int, data: bytes, features: int, announce: bool) -> bool:
    """5.1.6.5 read independently of net/ctrl.py: would a device answer OK?"""
    need = NEED_MODEL.get((cls, cmd))
    if need is None or not features & bit(need):
        return False
    if cls == MACC and cmd == 1:
        return len(data) == 6
    if cls == MACC:
        off = 0
        for _ in range(2):
            if len(data) < off + 4:
                return False
            off += 4 + 6 * int.from_bytes(data[off : off + 4], "little")
        return off == len(data)
    if len(data) != FIXED_LEN[cls]:
        return False
    value = int.from_bytes(data, "little")
    if cls == VLAN:
        return value < 4096
    if cls == MQ:
        return 1 <= value <= MAX_PAIRS
    if cls == OFF:
        return value & ~(features & GUEST_OFFLOAD_MODEL) == 0
    if cls == ANN:
        return announce
    return True


def commands():
    """Mostly-valid commands and plain garbage, as (class, cmd, data)."""
    byte = st.integers(0, 255)
    valid = st.one_of(
        st.tuples(st.just(MQ), st.just(0), st.integers(0, 6).map(u16)),
        st.tuples(st.just(RX), st.integers(0, 6), st.binary(max_size=2)),
        st.tuples(st.just(VLAN), st.integers(0, 2), st.integers(4090, 4100).map(u16)),
        st.tuples(st.just(OFF), st.just(0), st.sampled_from([0, 2, 0x182, 1 << 10]).map(u64)),
        st.tuples(st.just(ANN), st.integers(0, 1), st.binary(max_size=1)),
        st.tuples(
            st.just(MACC), st.just(0),
            st.tuples(st.lists(st.binary(min_size=6, max_size=6), max_size=3),
                      st.lists(st.binary(min_size=6, max_size=6), max_size=3))
            .map(lambda t: b"".join(pack_mac_table(*t))),
        ),
        st.tuples(st.just(MACC), st.just(1), st.binary(min_size=5, max_size=7)),
    )  # fmt: skip
    garbage = st.tuples(byte, byte, st.binary(max_size=40))
    return st.one_of(valid, garbage)


@st.composite
def chains(draw):
    """A command's bytes cut at random points into readable segments, and a writable part."""
    cls, cmd, data = draw(commands())
    raw = bytes([cls, cmd]) + data
    if draw(st.integers(0, 9)) == 0:
        raw = raw[: draw(st.integers(0, 1))]  # no whole header
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=3)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    writable = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    return cls, cmd, data, raw, pieces, writable


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    features=st.sampled_from([CTRL_ALL, CTRL_ALL & ~bit(F.CTRL_RX_EXTRA) & ~bit(F.MQ)]),
    batch=st.lists(chains(), min_size=1, max_size=6),
    announce=st.booleans(),
)
def test_any_bytes_as_commands(kind, features, batch, announce) -> None:
    link = Link(kind, features, num=64)
    if announce:
        link.dev.announce()
    base = link.q.data(RAW_SLOT)
    posted = {}
    off = 0
    for k, (cls, cmd, data, raw, pieces, writable) in enumerate(batch):
        out = []
        for piece in pieces:
            link.q.write(base + off, piece)
            out.append((base + off, len(piece)))
            off += len(piece)
        ins = []
        for n in writable:
            link.q.write(base + off, b"\xee" * n)
            ins.append((base + off, n))
            off += n
        if not out and not ins:
            ins = [(base + off, 0)]  # a chain has at least one descriptor
        link.vq.add(out, ins, k)
        posted[k] = (cls, cmd, data, raw, ins)
    assert link.dev.process(budget=len(batch) + 1) == len(batch)
    link.dev.flush()
    seen = []
    expect_commands = expect_errors = expect_desc = 0
    pending = announce
    while (got := link.vq.get_buf()) is not None:
        k, length = got
        seen.append(k)
        cls, cmd, data, raw, ins = posted[k]
        ack_at = next((a for a, n in ins if n), None)
        if len(raw) < 2 or ack_at is None:
            assert length == 0
            expect_desc += 1
            continue
        assert length == 1
        ack = link.q.read(ack_at, 1)[0]
        ok = well_formed(cls, cmd, data, features, pending)
        assert ack == (VIRTIO_NET_OK if ok else VIRTIO_NET_ERR), (cls, cmd, data.hex())
        if ok and cls == ANN:
            pending = False
        expect_commands += 1
        expect_errors += not ok
    assert sorted(seen) == list(range(len(batch)))  # every chain back, exactly once
    assert link.counters() == (expect_commands, expect_errors, expect_desc)
    assert link.dev.announce_pending == pending


def test_send_command_in_one_call(link: Link) -> None:
    kicks = []

    def run(kick: bool) -> None:
        kicks.append(kick)
        link.dev.process()
        link.dev.flush()

    assert link.cq.send_command(MQ, 0, u16(2), run=run) is True and kicks == [True]
    assert link.cq.send_command(MQ, 0, u16(9), run=run) is False  # refused
    assert link.cq.send_command(MQ, 0, u16(3), run=lambda kick: None, spins=3) is False
    assert "no answer after 3 turns" in link.cq.last_error and link.cq.busy
    link.run()
    assert link.dev.curr_queue_pairs == 3


def test_reset_restores_the_reset_state(link: Link) -> None:
    link.dev.announce()
    for post in (
        lambda: link.cq.set_rx_mode(False, True),
        lambda: link.cq.set_mac_address(OTHER),
        lambda: link.cq.set_mac_table([OTHER], [MCAST]),
        lambda: link.cq.set_vlan(3),
        lambda: link.cq.set_queues(2),
        lambda: link.cq.set_guest_offloads(0),
        lambda: link.cq.ack_announce(),
    ):
        post()
        assert link.run() == VIRTIO_NET_OK
    fresh = Link("split")
    assert link.state() != fresh.state()
    link.dev.reset()
    assert link.state() == fresh.state()
    assert link.counters() == (8, 0, 0)  # counters survive a reset


# -- property: garbage rings (a hostile driver's descriptors, not just its bytes) ----------------


# Mostly plausible lengths (a header, a command, an ack byte), some absurd.
LENGTHS = [0, 1, 2, 2, 3, 4, 4, 8, 16, 1 << 31]
SPLIT_FLAGS = [0, 1, 2, 3, 0, 1, 2, 3, 4, 7]  # NEXT / WRITE mostly, INDIRECT now and then


def _hostile_addr(rng, q) -> int:
    choice = rng.randrange(7)
    if choice < 4:
        return q.data(RAW_SLOT, rng.choice([0, 1, 100, 4095]))
    if choice == 3:
        return rng.choice([0, q.end - 1, q.end, (1 << 64) - 1])
    return rng.randrange(q.gpa, q.end)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), packed=st.booleans())
def test_garbage_rings_never_crash(seed: int, packed: bool) -> None:
    import random

    rng = random.Random(seed)
    link = Link("packed" if packed else "split", num=8)
    q = link.q
    q.write(q.data(RAW_SLOT), rng.randbytes(4096))
    if packed:
        for _ in range(rng.randrange(1, 8)):
            descs = [(_hostile_addr(rng, q), rng.choice(LENGTHS), rng.choice([0, 2, 0, 2, 4, 6]))
                     for _ in range(rng.randrange(1, 4))]  # fmt: skip
            q.post(descs, bid=rng.choice([None, rng.randrange(10)]))
    else:
        for i in range(q.num):
            q.desc(i, _hostile_addr(rng, q), rng.choice(LENGTHS),
                   rng.choice(SPLIT_FLAGS), rng.randrange(q.num + 2))  # fmt: skip
        for _ in range(rng.choice([rng.randrange(1, q.num + 1), q.num + 3])):
            q.make_available(rng.randrange(q.num + 2))
    taken = link.dev.process(budget=3 * q.num)
    link.dev.flush()
    s = link.dev.stats
    assert s.ctrl_commands + s.ctrl_desc_errors == taken + link.dev.broken
    assert s.ctrl_errors <= s.ctrl_commands
