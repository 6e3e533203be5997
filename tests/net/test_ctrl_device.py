"""The control queue acting on virtnet's own device, in one process: the driver's
ControlQueue and the device's ControlDevice over a real control virtqueue in the
same guest memory as the data rings (net/ctrl.py build_control), wired by
``serve_control``: the receive filter on the device's rx, the guest offloads
re-applied to the device and its back-end (a tap: TUNSETOFFLOAD)."""

from __future__ import annotations

import pytest

from virtnet.net.constants import PAGE_SIZE
from virtnet.net.ctrl import (
    OFFLOAD_BITS,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    build_control,
    serve_control,
)
from virtnet.net.features import VirtioNetF
from virtnet.net.guest import ControlArea, GuestLayout, build_device, build_driver
from virtnet.net.header import MRG_HDR
from virtnet.ports.backends import TapDevice
from virtnet.ports.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.layout import VringViews

OWN = b"\x52\x54\x00\x12\x34\x56"
OTHER = b"\x52\x54\x00\xaa\xbb\xcc"
MULTI = b"\x01\x00\x5e\x00\x00\x01"
BCAST = b"\xff" * 6
FEATURES = (
    bit(VirtioF.VERSION_1) | bit(VirtioNetF.MRG_RXBUF) | bit(VirtioNetF.CTRL_VQ)
    | bit(VirtioNetF.CTRL_RX) | bit(VirtioNetF.CTRL_RX_EXTRA)
    | bit(VirtioNetF.CTRL_GUEST_OFFLOADS) | bit(VirtioNetF.GUEST_CSUM)
    | bit(VirtioNetF.GUEST_TSO4) | bit(VirtioNetF.GUEST_TSO6) | bit(VirtioNetF.GUEST_ECN)
)  # fmt: skip


class FakeTap:
    """What TapDevice asks of a tap here: the offloads it sets (TUNSETOFFLOAD)."""

    multi_queue = False

    def __init__(self) -> None:
        self.offloads: list[int] = []

    def set_offload(self, offloads: int) -> None:
        self.offloads.append(offloads)


class OneProcess:
    def __init__(self) -> None:
        layout = GuestLayout(64, GuestLayout.pages_for(64))
        area = ControlArea(layout.size)
        self.memory = GuestMemory.from_buffer(bytearray(layout.size + area.size + PAGE_SIZE))
        self.delivered: list[bytes] = []
        self.drv = build_driver(self.memory, layout, FEATURES, "deferred",
                                netif_receive_skb=self._up)  # fmt: skip
        rings = tuple(VringViews.from_memory(self.memory, a) for a in layout.rings)
        self.dev = build_device(self.memory, rings, FEATURES)
        self.tap = FakeTap()
        self.backend = TapDevice(self.tap)
        self.ctrl, self.ctrl_dev = build_control(self.memory, area, FEATURES, 2, 1)
        serve_control(self.ctrl_dev, [self.dev], [self.backend])
        self.drv.try_fill_recv()

    def _up(self, skb) -> None:
        self.delivered.append(skb.to_bytes())
        skb.free()

    def command(self, post) -> bool:
        """Post (``post(ctrl)``), let the device answer, read the status."""
        post(self.ctrl)
        self.ctrl_dev.process()
        self.ctrl_dev.flush()
        return self.ctrl.complete() == 0

    def send(self, dst: bytes, gso: bool = False) -> bool:
        frame = dst + OWN + b"\x08\x00" + bytes(100)
        # NEEDS_CSUM, csum at the TCP header; GSO: TCPv4 with a 1448-byte MSS
        hdr = MRG_HDR.pack(1, 1 if gso else 0, 54, 1448 if gso else 0, 34, 16, 0)
        ok = self.dev.receive_packet([frame], hdr)
        self.dev.flush_rx()
        self.drv.poll(64)
        return ok


@pytest.fixture
def one() -> OneProcess:
    return OneProcess()


def test_promiscuous_by_default_then_the_mac_table_filters(one):
    for dst in (OWN, OTHER, MULTI, BCAST):
        one.send(dst)
    assert len(one.delivered) == 4 and one.dev.rx_filter is None
    assert one.command(lambda c: c.set_rx_mode(promisc=False, allmulti=False))
    assert one.command(lambda c: c.set_mac_table([OWN], [MULTI]))
    one.delivered.clear()
    for dst in (OWN, OTHER, MULTI, BCAST):
        one.send(dst)
    assert [f[:6] for f in one.delivered] == [OWN, MULTI, BCAST]
    assert one.dev.stats.rx_filtered == 1
    assert one.command(lambda c: c.set_rx_flag(VIRTIO_NET_CTRL_RX_NOBCAST, True))
    one.send(BCAST)
    assert one.dev.stats.rx_filtered == 2
    assert one.command(lambda c: c.set_rx_mode(promisc=True, allmulti=False))
    one.send(OTHER)
    assert one.delivered[-1][:6] == OTHER and one.dev.rx_filter is None
    assert one.ctrl_dev.stats.ctrl_errors == 0 and VIRTIO_NET_CTRL_RX == 0


def test_guest_offloads_reach_the_device_and_its_tap(one):
    assert one.send(OWN, gso=True)  # GUEST_TSO negotiated: GSO frames go in
    csum_only = bit(VirtioNetF.GUEST_CSUM)
    assert one.command(lambda c: c.set_guest_offloads(csum_only))
    assert one.tap.offloads[-1] == TUN_F_CSUM  # the tap produces no TSO frame now
    assert not one.dev.guest_gso
    dropped = one.dev.stats.rx_dropped
    assert not one.send(OWN, gso=True)  # and the device sends the guest none
    assert one.dev.stats.rx_dropped == dropped + 1
    assert one.command(lambda c: c.set_guest_offloads(FEATURES & OFFLOAD_BITS))
    assert one.tap.offloads[-1] == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    assert one.dev.guest_gso and one.send(OWN, gso=True)


def test_offloads_never_negotiated_are_refused_and_change_nothing(one):
    before = list(one.tap.offloads)
    assert not one.command(lambda c: c.set_guest_offloads(bit(VirtioNetF.GUEST_UFO)))
    assert one.tap.offloads == before and one.dev.guest_gso
    assert one.ctrl_dev.stats.ctrl_errors == 1


def test_the_filter_applies_to_frames_read_in_place(one):
    """A tap read lands in the guest's buffers first; a filtered frame leaves them posted."""
    assert one.command(lambda c: c.set_rx_mode(promisc=False, allmulti=False))
    assert one.command(lambda c: c.set_mac_table([OWN], []))

    def read(dst: bytes):
        data = bytes(MRG_HDR.size) + dst + OWN + b"\x08\x00" + bytes(200)

        def readv(views):
            off = 0
            for v in views:  # the header and frame may straddle buffers
                n = min(len(v), len(data) - off)
                v[:n] = data[off : off + n]
                off += n
            return len(data)

        return readv

    used = one.dev.stats.rx_bufs
    assert one.dev.receive_from(read(OTHER)) > 0
    assert one.dev.stats.rx_filtered == 1 and one.dev.stats.rx_bufs == used
    assert one.dev.receive_from(read(OWN)) > 0
    one.dev.flush_rx()
    one.drv.poll(64)
    assert one.dev.stats.rx_bufs == used + 1 and one.delivered[-1][:6] == OWN
