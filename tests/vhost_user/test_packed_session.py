"""A vhost-user session on packed rings: negotiation, the packed encodings of
SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ADDR, and restarts
that keep the wrap counters (vhost-user.rst, "Vring descriptor indices for packed
virtqueues"; DPDK lib/vhost vhost_user_set_vring_base/get_vring_base)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.vhost_user.local_session import local_session
from tests.vhost_user.test_backend_session import msg, status
from virtnet.net.guest import GuestLayout, build_driver
from virtnet.vhost_user.backend import BACKEND_FEATURES, NUM_QUEUES
from virtnet.vhost_user.frontend import GuestMemfd
from virtnet.vhost_user.messages import (
    U64,
    MemoryRegionDesc,
    MemoryTable,
    ProtocolFeature,
    VringAddr,
    VringState,
)
from virtnet.vhost_user.messages import FrontendRequest as R
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.ring.packed import PackedQueueDevice

PACKED = bit(VirtioF.RING_PACKED)
RX, TX = 0, 1
FRESH = 1 << 15 | 1 << 31  # avail 0 wrap 1, used 0 wrap 1: what QEMU sends first


class PackedSetup:
    def __init__(self, qsize: int, offered: int = BACKEND_FEATURES) -> None:
        self.qsize = qsize
        self.layout = GuestLayout(qsize, 64 + qsize * 4, packed=True)
        self.g = GuestMemfd(self.layout.size)
        self.s = local_session(offered=offered)

    def close(self) -> None:
        self.s.close()
        self.g.close()

    def negotiate(self, features: int = BACKEND_FEATURES) -> int:
        s = self.s
        s.handle(msg(R.SET_OWNER))
        offered = s.handle(msg(R.GET_FEATURES)).payload.value
        s.handle(msg(R.GET_PROTOCOL_FEATURES))
        s.handle(msg(R.SET_PROTOCOL_FEATURES, U64(bit(ProtocolFeature.REPLY_ACK))))
        return status(s.handle(msg(R.SET_FEATURES, U64(features), need_reply=True))) or offered

    def mem_table(self) -> None:
        region = MemoryRegionDesc(0, self.g.size, self.g.uva, 0)
        table = msg(R.SET_MEM_TABLE, MemoryTable((region,)), [os.dup(self.g.fd)], need_reply=True)
        assert status(self.s.handle(table)) == 0

    def ring(self, q: int, base: int = FRESH) -> int:
        s, uva, addrs = self.s, self.g.uva, self.layout.rings[q]
        assert status(s.handle(msg(R.SET_VRING_NUM, VringState(q, self.qsize),
                                   need_reply=True))) == 0  # fmt: skip
        s.handle(msg(R.SET_VRING_BASE, VringState(q, base)))
        # The vring address payload's (desc, used, avail) carry (descriptor ring,
        # device area, driver area) for a packed ring.
        addr = VringAddr(q, 0, uva + addrs.desc, uva + addrs.used, uva + addrs.avail, 0)
        assert status(s.handle(msg(R.SET_VRING_ADDR, addr, need_reply=True))) == 0
        s.handle(msg(R.SET_VRING_CALL, U64(q), [os.eventfd(0, os.EFD_NONBLOCK)]))
        return status(s.handle(msg(R.SET_VRING_KICK, U64(q), [os.eventfd(0)], need_reply=True)))

    def enable(self, q: int) -> None:
        assert status(self.s.handle(msg(R.SET_VRING_ENABLE, VringState(q, 1),
                                        need_reply=True))) == 0  # fmt: skip

    def all(self, features: int = BACKEND_FEATURES) -> None:
        assert self.negotiate(features) == BACKEND_FEATURES
        self.mem_table()
        for q in range(NUM_QUEUES):
            assert self.ring(q) == 0
            self.enable(q)

    def get_base(self, q: int) -> int:
        return self.s.handle(msg(R.GET_VRING_BASE, VringState(q, 0))).payload.num


@pytest.fixture
def packed_setup() -> Iterator:
    made: list[PackedSetup] = []

    def make(qsize: int, **kw) -> PackedSetup:
        made.append(PackedSetup(qsize, **kw))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_the_device_offers_ring_packed_and_runs_packed_rings(packed_setup):
    p = packed_setup(100)  # not a power of 2: only packed rings may be this size
    p.all()
    dev = p.s.device
    assert dev is not None
    assert isinstance(dev.rxq, PackedQueueDevice) and isinstance(dev.txq, PackedQueueDevice)
    assert dev.rxq.num == 100 and (dev.rxq.last_avail, dev.rxq.avail_wrap) == (0, 1)
    received = []
    drv = build_driver(p.g.memory, p.layout, p.s.features, "deferred",
                       netif_receive_skb=received.append)  # fmt: skip
    assert drv.try_fill_recv()
    frame = bytes(range(256)) * 6
    assert dev.receive_packet([frame])
    dev.flush_rx()
    assert drv.poll(64)[0] == 1
    assert b"".join(received[0].data_views()) == frame
    received[0].free()
    # Stop: GET_VRING_BASE gives index | wrap << 15 for avail, the same for used above.
    rx = p.get_base(RX)
    assert rx & 0xFFFF == 1 | 1 << 15 and rx >> 16 == rx & 0xFFFF
    assert p.get_base(TX) == FRESH
    drv.remove()
    assert drv.stats.pages_outstanding == 0


def test_restarts_keep_the_wrap_counters_lap_after_lap(packed_setup):
    # A 7-slot ring, stopped and restarted from the reported base every 5 frames:
    # positions and wrap counters go round several times; nothing is lost or doubled.
    p = packed_setup(7)
    p.all(BACKEND_FEATURES & ~bit(VirtioF.RING_INDIRECT_DESC))
    received = []
    drv = build_driver(p.g.memory, p.layout, p.s.features, "deferred",
                       netif_receive_skb=received.append)  # fmt: skip
    drv.try_fill_recv()
    wraps = set()
    sent = 0
    for _round in range(8):
        for _ in range(5):
            assert p.s.device.receive_packet([sent.to_bytes(4, "big") * 25])
            sent += 1
        p.s.device.flush_rx()
        assert drv.poll(64)[0] == 5
        bases = [p.get_base(q) for q in (RX, TX)]
        wraps.add(bases[RX] >> 15 & 1)
        assert p.s.device is None
        for q in (RX, TX):
            assert p.ring(q, base=bases[q]) == 0
        dev = p.s.device
        assert dev.rxq.last_avail_idx == bases[RX] & 0xFFFF
        assert (dev.rxq.used_pos, dev.rxq.used_wrap) == (dev.rxq.last_avail, dev.rxq.avail_wrap)
    assert wraps == {0, 1}
    got = [int.from_bytes(bytes(skb.data_views()[0][:4]), "big") for skb in received]
    assert got == list(range(sent))
    for skb in received:
        skb.free()
    p.get_base(RX)
    drv.remove()
    assert drv.stats.pages_outstanding == 0


def test_packed_queue_sizes_and_bases_are_checked(packed_setup):
    p = packed_setup(100)
    p.negotiate()
    p.mem_table()
    assert status(p.s.handle(msg(R.SET_VRING_NUM, VringState(RX, 32769), need_reply=True))) != 0
    # A base whose index is past the ring: the device refuses to start on it.
    assert p.ring(RX, base=100 | 1 << 15) == 0
    p.enable(RX)
    assert p.ring(TX) == 0
    assert status(p.s.handle(msg(R.SET_VRING_ENABLE, VringState(TX, 1), need_reply=True))) != 0
    assert p.s.device is None


def test_split_sizes_stay_powers_of_two(packed_setup):
    p = packed_setup(64)
    p.negotiate(BACKEND_FEATURES & ~PACKED)
    assert status(p.s.handle(msg(R.SET_VRING_NUM, VringState(RX, 100), need_reply=True))) != 0


def test_features_off_ring_packed_on_the_device(packed_setup):
    p = packed_setup(64, offered=BACKEND_FEATURES & ~PACKED)
    offered = p.negotiate(BACKEND_FEATURES & ~PACKED)
    assert not offered & PACKED
    q = packed_setup(64, offered=BACKEND_FEATURES & ~PACKED)
    assert q.negotiate(BACKEND_FEATURES) != 0  # refused: never offered


def test_features_off_parses_ring_packed_for_both_commands():
    from virtnet.cli import build_parser

    parser = build_parser()
    for cmd in ("device", "driver"):
        args = parser.parse_args([cmd, "--socket-path", "x", "--features-off", "RING_PACKED"])
        assert args.features_off == PACKED
