"""BackendSession alone: real memfds and eventfds, no socket, no process.

A session is fed ``Message``s the way ``DeviceServer`` feeds it what the socket
delivered; the guest is a ``GuestMemfd`` (the front-end's own memory object) with a
virtnet driver built over it, so the device the session starts moves real bytes
through a shared mapping -- two views of one memfd, as in two processes.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from tests.vhost_user.local_session import local_session
from virtnet.net.features import SUPPORTED, VirtioNetF, sanitize
from virtnet.net.guest import RX, TX, GuestLayout, build_driver
from virtnet.ports.backends import skb_from_gen
from virtnet.ports.synthetic import FrameGen
from virtnet.vhost_user.backend import (
    BACKEND_FEATURES,
    NUM_QUEUES,
    PROTOCOL_FEATURES,
    BackendSession,
    offered_features,
)
from virtnet.vhost_user.errors import VhostUserProtocolError
from virtnet.vhost_user.frontend import GuestMemfd
from virtnet.vhost_user.messages import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_NOFD_MASK,
    ConfigSpace,
    LogDesc,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    ProtocolFeature,
    VringAddr,
    VringState,
)
from virtnet.vhost_user.messages import FrontendRequest as R
from virtnet.virtio.features import VirtioF, bit

QSIZE = 64
LAYOUT = GuestLayout(QSIZE, 256)
# Everything offered but RING_PACKED (these tests lay out split rings; packed sessions
# are in test_packed_session.py), PROTOCOL_FEATURES included.
WITH_PF = BACKEND_FEATURES & ~bit(VirtioF.RING_PACKED)
WITHOUT_PF = SUPPORTED


def open_fds() -> int:
    # An earlier test's guest mapping, freed by a cyclic GC in the middle of this
    # test, would close its fd and skew the count: collect first.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def msg(request: R, payload=b"", fds=(), *, need_reply: bool = False) -> Message:
    flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
    return Message(request, flags, payload, tuple(fds))


def status(reply: Message | None) -> int:
    """The REPLY_ACK value of a reply (0 = success)."""
    assert reply is not None and reply.flags & VHOST_USER_REPLY_MASK
    return reply.payload.value


@pytest.fixture
def guest() -> Iterator[GuestMemfd]:
    g = GuestMemfd(LAYOUT.size)
    yield g
    g.close()


@pytest.fixture
def session() -> Iterator[BackendSession]:
    s = local_session()
    yield s
    s.close()


class Setup:
    """The front-end's side of the setup, in QEMU's order, one step at a time."""

    def __init__(self, session: BackendSession, guest: GuestMemfd) -> None:
        self.s = session
        self.g = guest

    def negotiate(self, features: int = WITH_PF) -> None:
        s = self.s
        assert s.handle(msg(R.SET_OWNER)) is None
        assert s.handle(msg(R.GET_FEATURES)).payload.value == BACKEND_FEATURES
        if features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            assert s.handle(msg(R.GET_PROTOCOL_FEATURES)).payload.value == PROTOCOL_FEATURES
            s.handle(msg(R.SET_PROTOCOL_FEATURES, U64(bit(ProtocolFeature.REPLY_ACK))))
        assert status(s.handle(msg(R.SET_FEATURES, U64(features), need_reply=True))) == 0

    def mem_table(self) -> None:
        region = MemoryRegionDesc(0, self.g.size, self.g.uva, 0)
        table = msg(R.SET_MEM_TABLE, MemoryTable((region,)), [os.dup(self.g.fd)], need_reply=True)
        assert status(self.s.handle(table)) == 0

    def ring(self, q: int, base: int = 0, kick: bool = True) -> None:
        s, uva, addrs = self.s, self.g.uva, LAYOUT.rings[q]
        s.handle(msg(R.SET_VRING_NUM, VringState(q, QSIZE)))
        s.handle(msg(R.SET_VRING_BASE, VringState(q, base)))
        addr = VringAddr(q, 0, uva + addrs.desc, uva + addrs.used, uva + addrs.avail, 0)
        assert status(s.handle(msg(R.SET_VRING_ADDR, addr, need_reply=True))) == 0
        s.handle(msg(R.SET_VRING_CALL, U64(q), [os.eventfd(0, os.EFD_NONBLOCK)]))
        if kick:
            self.kick(q)

    def kick(self, q: int) -> None:
        s = self.s
        assert (
            status(s.handle(msg(R.SET_VRING_KICK, U64(q), [os.eventfd(0)], need_reply=True))) == 0
        )

    def enable(self, q: int, on: bool = True) -> None:
        assert (
            status(self.s.handle(msg(R.SET_VRING_ENABLE, VringState(q, int(on)), need_reply=True)))
            == 0
        )

    def all(self, features: int = WITH_PF) -> None:
        self.negotiate(features)
        self.mem_table()
        for q in range(NUM_QUEUES):
            self.ring(q)
        if features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            for q in range(NUM_QUEUES):
                self.enable(q)


@pytest.fixture
def setup(session, guest) -> Setup:
    return Setup(session, guest)


# -- starting ------------------------------------------------------------------------------


def test_device_starts_with_the_last_enabled_ring(setup, session):
    setup.negotiate()
    setup.mem_table()
    setup.ring(RX)
    setup.ring(TX)
    assert session.device is None  # PROTOCOL_FEATURES: rings start disabled
    setup.enable(RX)
    assert session.device is None
    setup.enable(TX)
    assert session.device is not None
    assert session.device.mergeable
    assert all(vr.kick >= 0 and vr.call >= 0 and vr.started for vr in session.vrings)


def test_without_protocol_features_rings_run_at_their_kick(setup, session):
    setup.negotiate(WITHOUT_PF)
    setup.mem_table()
    setup.ring(RX)
    assert session.device is None
    setup.ring(TX)
    assert session.device is not None


def test_nonmergeable_device_when_mrg_rxbuf_is_off(setup, session):
    setup.all(WITH_PF & ~bit(VirtioNetF.MRG_RXBUF))
    assert session.device is not None and not session.device.mergeable


def test_kick_without_fd_polls(setup, session):
    setup.negotiate(WITHOUT_PF)
    setup.mem_table()
    setup.ring(RX)
    setup.ring(TX, kick=False)
    nofd = U64(TX | VHOST_USER_VRING_NOFD_MASK)
    assert status(session.handle(msg(R.SET_VRING_KICK, nofd, need_reply=True))) == 0
    assert session.vrings[TX].kick == -1 and session.device is not None


# -- the data path over the shared memfd ----------------------------------------------------


def test_device_and_driver_share_the_memfd(setup, session, guest):
    """What the session's device writes, a driver over the front-end's mapping reads."""
    setup.all()
    received = []
    drv = build_driver(guest.memory, LAYOUT, session.features, "deferred",
                       netif_receive_skb=received.append)  # fmt: skip
    assert drv.try_fill_recv()
    dev = session.device
    frame = bytes(range(256)) * 6
    assert dev.receive_packet([frame])
    dev.flush_rx()
    assert drv.poll(64)[0] == 1
    assert b"".join(received[0].data_views()) == frame
    received[0].free()

    gen = FrameGen(1500)
    skb = skb_from_gen(drv, gen)
    expected = b"".join(bytes(v) for v in FrameGen(1500).peek())
    assert drv.start_xmit(skb)
    sent = []
    assert dev.process_tx(lambda views, n: sent.append(b"".join(views)) or True) == 1
    assert sent[0][12:] == expected

    # Stop: each ring reports where the device stopped; rx chains it popped but did
    # not use count as not taken (the driver's buffers stay the driver's).
    base = session.handle(msg(R.GET_VRING_BASE, VringState(RX, 0)))
    assert base.payload == VringState(RX, 1)
    assert session.device is None
    assert session.handle(msg(R.GET_VRING_BASE, VringState(TX, 0))).payload == VringState(TX, 1)
    assert all(vr.kick == vr.call == -1 and not vr.started for vr in session.vrings)
    dev.flush_tx()
    drv.free_old_xmit_skbs()
    drv.remove()
    assert drv.stats.pages_outstanding == 0


def test_restart_from_the_reported_bases(setup, session, guest):
    setup.all()
    drv = build_driver(guest.memory, LAYOUT, session.features, "deferred")
    drv.try_fill_recv()
    for _ in range(5):
        assert session.device.receive_packet([bytes(100)])
    session.device.flush_rx()
    bases = [session.handle(msg(R.GET_VRING_BASE, VringState(q, 0))).payload.num for q in (0, 1)]
    assert bases == [5, 0]
    for q in range(NUM_QUEUES):
        setup.ring(q, base=bases[q])
    assert session.device.rxq.last_avail_idx == 5
    drv.poll(64)
    session.handle(msg(R.GET_VRING_BASE, VringState(RX, 0)))
    drv.remove()
    assert drv.stats.pages_outstanding == 0


# -- refusals, each with the ack the front-end asked for -------------------------------------


def refused(session: BackendSession, message: Message, caplog, text: str) -> None:
    caplog.clear()
    assert status(session.handle(message)) != 0
    assert text in caplog.text, caplog.text


def test_features_never_offered(session, caplog):
    wanted = WITH_PF | bit(VirtioNetF.CTRL_VQ)
    refused(session, msg(R.SET_FEATURES, U64(wanted), need_reply=True), caplog,
            "features CTRL_VQ were never offered")  # fmt: skip
    assert session.features == 0


def test_features_missing_their_requirements_are_dropped_not_refused(session, caplog):
    # 5.1.3.1 forbids acking them, yet Linux does (QEMU's csum=off leaves guest_tso6 on)
    # and QEMU never reads this reply: the device runs on the sane subset and says so.
    caplog.clear()
    wanted = bit(VirtioF.VERSION_1) | bit(VirtioNetF.HOST_TSO4)
    assert status(session.handle(msg(R.SET_FEATURES, U64(wanted), need_reply=True))) == 0
    assert "features lack requirements, ignored: HOST_TSO4 needs CSUM" in caplog.text
    assert session.features == sanitize(wanted) == bit(VirtioF.VERSION_1)


def test_mq_without_ctrl_vq_is_kept_the_control_queue_being_the_front_ends(caplog):
    # DPDK virtio_user strips CTRL_VQ from SET_FEATURES (its shadow cvq serves it): the
    # device must still run on MQ, not drop it as an orphan of 5.1.3.1.
    s = local_session(2, offered=offered_features(2))
    try:
        caplog.clear()
        wanted = WITH_PF | bit(VirtioNetF.MQ)
        assert status(s.handle(msg(R.SET_FEATURES, U64(wanted), need_reply=True))) == 0
        assert s.features == wanted, caplog.text
        assert "lack requirements" not in caplog.text
    finally:
        s.close()


def test_protocol_features_never_offered(session, caplog):
    bad = U64(PROTOCOL_FEATURES | bit(ProtocolFeature.PAGEFAULT))
    refused(session, msg(R.SET_PROTOCOL_FEATURES, bad, need_reply=True), caplog, "not offered")


@pytest.mark.parametrize("num", [0, 3, 100, 1 << 16])
def test_vring_num_must_be_a_power_of_2(session, caplog, num):
    refused(session, msg(R.SET_VRING_NUM, VringState(0, num), need_reply=True), caplog,
            f"queue size {num} is not a power of 2")  # fmt: skip
    assert session.vrings[0].num == 0


def test_vring_index_out_of_range_closes_the_fd(session, caplog):
    before = open_fds()
    fd = os.eventfd(0)
    refused(session, msg(R.SET_VRING_CALL, U64(2), [fd], need_reply=True), caplog,
            "vring index 2 out of range")  # fmt: skip
    assert open_fds() == before


def test_get_vring_base_out_of_range_drops_the_connection(session):
    with pytest.raises(VhostUserProtocolError) as e:
        session.handle(msg(R.GET_VRING_BASE, VringState(7, 0)))
    assert not e.value.framing_intact
    assert "vring index 7 out of range" in str(e.value)


def test_enable_without_protocol_features(setup, session, caplog):
    setup.negotiate(WITHOUT_PF)
    refused(session, msg(R.SET_VRING_ENABLE, VringState(0, 1), need_reply=True), caplog,
            "without PROTOCOL_FEATURES")  # fmt: skip


def test_ring_address_outside_the_memory(setup, session, guest, caplog):
    setup.negotiate()
    setup.mem_table()
    session.handle(msg(R.SET_VRING_NUM, VringState(0, QSIZE)))
    end = guest.uva + guest.size
    addr = VringAddr(0, 0, guest.uva, end - 8, guest.uva + 0x1000, 0)  # used ring runs off
    refused(session, msg(R.SET_VRING_ADDR, addr, need_reply=True), caplog,
            f"vring 0 used ring: guest access [{end - 8:#x}")  # fmt: skip
    assert session.vrings[0].addr is None


def test_mem_table_that_cannot_be_mapped_closes_every_fd(session, caplog):
    before = open_fds()
    small = os.memfd_create("small")
    os.ftruncate(small, 4096)
    good = os.memfd_create("good")
    os.ftruncate(good, 1 << 16)
    regions = (
        MemoryRegionDesc(0, 1 << 16, 0x10000, 0),
        MemoryRegionDesc(1 << 20, 1 << 20, 1 << 30, 0),
    )
    refused(session, msg(R.SET_MEM_TABLE, MemoryTable(regions), [good, small], need_reply=True),
            caplog, "region at gpa 0x100000 size 0x100000")  # fmt: skip
    assert session.memory is None
    assert open_fds() == before


def test_new_mem_table_stops_and_restarts_the_device(setup, session, guest):
    """The old device stops where it is (its cached rx chains given back, its memory
    released) and a new one continues from exactly there over the new table."""
    setup.all()
    received = []
    drv = build_driver(guest.memory, LAYOUT, session.features, "deferred",
                       netif_receive_skb=received.append)  # fmt: skip
    assert drv.try_fill_recv()
    first = session.device
    assert first.receive_packet([b"\x01" * 100])
    first.flush_rx()  # as the server does in the same loop pass
    assert first.has_room(9000)  # pops several more rx chains into its cache
    assert first.rxq.last_avail_idx > 1
    assert drv.start_xmit(skb_from_gen(drv, FrameGen(200)))
    expected = b"".join(bytes(v) for v in FrameGen(200).peek())

    setup.mem_table()
    new = session.device
    assert new is not None and new is not first
    # The old device is stopped: nothing cached, and no memory left to walk a chain
    # in -- it cannot serve its rings any more, whoever still holds the object.
    assert not first._rx_cache and first.rxq.memory.regions == ()
    with pytest.raises(Exception):  # noqa: B017 -- any refusal: the point is "no access"
        first.rxq.memory.view(0, 1)
    # The new device starts where the old one stopped: rx after the one packet used
    # (the cached chains count as not taken), tx at the frame not yet sent.
    assert (new.rxq.last_avail_idx, new.txq.last_avail_idx) == (1, 0)
    sent = []
    assert new.process_tx(lambda views, n: sent.append(b"".join(views)) or True) == 1
    assert sent[0][12:] == expected
    assert new.receive_packet([b"\x02" * 100])
    new.flush_rx()
    assert drv.poll(64)[0] == 2
    assert [bytes(b"".join(r.data_views())) for r in received] == [b"\x01" * 100, b"\x02" * 100]
    for skb in received:
        skb.free()
    new.flush_tx()
    drv.free_old_xmit_skbs()
    session.handle(msg(R.GET_VRING_BASE, VringState(RX, 0)))
    drv.remove()
    assert drv.stats.pages_outstanding == 0


def test_unsupported_requests(session, caplog):
    before = open_fds()
    log_fd = os.memfd_create("log")
    refused(session, msg(R.SET_LOG_BASE, LogDesc(4096, 0), [log_fd]), caplog,
            "SET_LOG_BASE without PROTOCOL_F_LOG_SHMFD negotiated")  # fmt: skip
    refused(session, msg(R.SET_CONFIG, ConfigSpace(0, 0, b"\0" * 6), need_reply=True), caplog,
            "read-only")  # fmt: skip
    refused(session, msg(R.SET_VRING_ENDIAN, VringState(0, 1), need_reply=True), caplog,
            "VHOST_USER_SET_VRING_ENDIAN is not supported")  # fmt: skip
    assert open_fds() == before


def test_get_config_and_mtu(session, caplog):
    session.handle(msg(R.NET_SET_MTU, U64(9000)))
    got = session.handle(msg(R.GET_CONFIG, ConfigSpace(0, 0, bytes(12)))).payload
    assert got.data[:6] == session.config.mac
    assert int.from_bytes(got.data[10:12], "little") == 9000
    refused(session, msg(R.NET_SET_MTU, U64(20), need_reply=True), caplog, "MTU 20 outside")
    with pytest.raises(VhostUserProtocolError):  # a reply carrying data cannot be a nack
        session.handle(msg(R.GET_CONFIG, ConfigSpace(250, 0, bytes(12))))


def test_queue_num_is_in_pairs(session):
    assert session.handle(msg(R.GET_QUEUE_NUM)).payload.value == NUM_QUEUES // 2


# -- teardown: nothing kept ------------------------------------------------------------------


@pytest.mark.parametrize("request_", [R.RESET_OWNER, R.RESET_DEVICE])
def test_reset_closes_the_vring_fds(setup, session, request_):
    before = open_fds()
    setup.all()
    assert session.device is not None
    session.handle(msg(request_))
    assert session.device is None and session.features == 0
    assert all(vr.kick == vr.call == -1 and vr.num == 0 for vr in session.vrings)
    session.close()
    assert open_fds() == before


def test_close_in_the_middle_of_setup_keeps_nothing(setup, session):
    before = open_fds()
    setup.negotiate()
    setup.mem_table()
    setup.ring(RX)
    session.close()
    assert session.memory is None
    assert open_fds() == before


def test_close_with_a_running_device_keeps_nothing(setup, session, guest):
    before = open_fds()
    setup.all()
    drv = build_driver(guest.memory, LAYOUT, session.features, "prealloc")
    drv.try_fill_recv()
    assert session.device.receive_packet([bytes(3000)])
    session.close()
    assert session.device is None and session.memory is None
    assert open_fds() == before
    drv.poll(64)
    drv.remove()
    assert drv.stats.pages_outstanding == 0
