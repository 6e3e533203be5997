"""PROTOCOL_F_STATUS and PROTOCOL_F_CONFIG on a BackendSession alone.

STATUS: what QEMU 7.2 sends (FEATURES_OK alone after SET_FEATURES, then ACKNOWLEDGE |
DRIVER | DRIVER_OK at start, SET_STATUS 0 before GET_VRING_BASE at stop) and what DPDK's
virtio_user sends (3.1.1 in order, read back with GET_STATUS). CONFIG: offered only to
a front-end that asks for it (`virtnet device --config-space`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.vhost_user.conftest import run_driver
from tests.vhost_user.local_session import local_session
from tests.vhost_user.test_backend_session import (
    LAYOUT,
    WITH_PF,
    Setup,
    msg,
    open_fds,
    refused,
    status,
)
from virtnet.net.guest import RX, TX, build_driver
from virtnet.vhost_user.backend import (
    CONFIG_PROTOCOL,
    PROTOCOL_FEATURES,
    BackendSession,
)
from virtnet.vhost_user.frontend import GuestMemfd
from virtnet.vhost_user.messages import U64, ConfigSpace, ProtocolFeature, VringState
from virtnet.vhost_user.messages import FrontendRequest as R
from virtnet.virtio.features import DeviceStatus as S
from virtnet.virtio.features import bit

QEMU_FEATURES_OK = S.FEATURES_OK
QEMU_STARTED = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK


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


@pytest.fixture
def setup(session, guest) -> Setup:
    return Setup(session, guest)


def get_status(session: BackendSession) -> int:
    return session.handle(msg(R.GET_STATUS)).payload.value


def test_status_is_offered_config_is_not_by_default(session, caplog):
    offered = session.handle(msg(R.GET_PROTOCOL_FEATURES)).payload.value
    assert offered == PROTOCOL_FEATURES
    assert offered & bit(ProtocolFeature.STATUS)
    assert not offered & bit(ProtocolFeature.CONFIG)
    wanted = U64(bit(ProtocolFeature.REPLY_ACK) | CONFIG_PROTOCOL)
    refused(session, msg(R.SET_PROTOCOL_FEATURES, wanted, need_reply=True), caplog,
            "virtnet device --config-space")  # fmt: skip


def test_config_offered_on_request_and_read():
    s = local_session(protocol_offered=PROTOCOL_FEATURES | CONFIG_PROTOCOL)
    try:
        assert s.handle(msg(R.GET_PROTOCOL_FEATURES)).payload.value & CONFIG_PROTOCOL
        wanted = U64(bit(ProtocolFeature.REPLY_ACK) | CONFIG_PROTOCOL)
        assert status(s.handle(msg(R.SET_PROTOCOL_FEATURES, wanted, need_reply=True))) == 0
        got = s.handle(msg(R.GET_CONFIG, ConfigSpace(0, 0, bytes(12)))).payload
        assert got.data[:6] == s.config.mac
        assert int.from_bytes(got.data[6:8], "little") == 1  # VIRTIO_NET_S_LINK_UP
    finally:
        s.close()


def test_status_round_trip_qemu_order(setup, session):
    setup.negotiate()
    assert get_status(session) == 0
    session.handle(msg(R.SET_STATUS, U64(QEMU_FEATURES_OK)))  # vhost_user_add_status
    assert get_status(session) == QEMU_FEATURES_OK
    setup.mem_table()
    for q in (RX, TX):
        setup.ring(q)
        setup.enable(q)
    assert status(session.handle(msg(R.SET_STATUS, U64(QEMU_STARTED), need_reply=True))) == 0
    assert get_status(session) == QEMU_STARTED
    assert session.device is not None


def test_features_ok_without_features_stays_clear(session, caplog):
    with caplog.at_level(logging.ERROR):
        session.handle(msg(R.SET_STATUS, U64(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)))
    assert get_status(session) == S.ACKNOWLEDGE | S.DRIVER
    assert "FEATURES_OK refused: no SET_FEATURES before it" in caplog.text


def test_features_ok_after_refused_features_stays_clear(session, caplog):
    refused(session, msg(R.SET_FEATURES, U64(WITH_PF | 1 << 63), need_reply=True), caplog,
            "never offered")  # fmt: skip
    session.handle(msg(R.SET_STATUS, U64(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)))
    assert not get_status(session) & S.FEATURES_OK
    assert "FEATURES_OK refused: SET_FEATURES was refused" in caplog.text
    # Acceptable features then: FEATURES_OK holds.
    assert status(session.handle(msg(R.SET_FEATURES, U64(WITH_PF), need_reply=True))) == 0
    session.handle(msg(R.SET_STATUS, U64(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)))
    assert get_status(session) & S.FEATURES_OK


def test_status_wider_than_a_byte_is_refused(session, caplog):
    refused(session, msg(R.SET_STATUS, U64(0x100), need_reply=True), caplog,
            "wider than the status byte")  # fmt: skip
    assert get_status(session) == 0


def test_status_0_resets_the_device_and_keeps_where_rings_stopped(setup, session, guest):
    """QEMU 7.2 stops with SET_STATUS 0, then GET_VRING_BASE: the reset stops every ring,
    closes its eventfds, and GET_VRING_BASE still says where each one stopped."""
    before = open_fds()
    setup.all()
    session.handle(msg(R.SET_STATUS, U64(QEMU_STARTED)))
    drv = build_driver(guest.memory, LAYOUT, session.features, "deferred")
    drv.try_fill_recv()
    for _ in range(3):
        assert session.device.receive_packet([bytes(100)])
    session.device.flush_rx()

    session.handle(msg(R.SET_STATUS, U64(0)))
    assert get_status(session) == 0
    assert session.device is None and not session.running
    assert all(vr.kick == vr.call == -1 and not vr.started for vr in session.vrings)
    assert session.handle(msg(R.GET_VRING_BASE, VringState(RX, 0))).payload.num == 3
    assert session.handle(msg(R.GET_VRING_BASE, VringState(TX, 0))).payload.num == 0
    # Nothing runs on until the front-end starts the rings again...
    setup.enable(RX)
    setup.enable(TX)
    assert session.device is None
    # ...with new kick fds and the bases it read: no stale index.
    for q, base in ((RX, 3), (TX, 0)):
        setup.ring(q, base=base)
    assert session.device is not None
    assert (session.device.rxq.last_avail_idx, session.device.txq.last_avail_idx) == (3, 0)
    drv.poll(64)
    session.handle(msg(R.GET_VRING_BASE, VringState(RX, 0)))
    drv.remove()
    assert drv.stats.pages_outstanding == 0
    session.close()
    assert open_fds() == before  # every ring eventfd and mapping gone


@pytest.mark.parametrize("request_", [R.RESET_DEVICE, R.RESET_OWNER])
def test_reset_clears_the_status(setup, session, request_):
    setup.negotiate()
    session.handle(msg(R.SET_STATUS, U64(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)))
    session.handle(msg(request_))
    assert get_status(session) == 0


# -- over the real socket: virtnet driver <-> virtnet device -----------------------------------


@pytest.mark.parametrize("config_space", [False, True], ids=["default", "config-space"])
def test_driver_reads_config_where_offered_and_walks_status(tmp_path, device_factory,
                                                           config_space):  # fmt: skip
    dev = device_factory("gen:64", extra=("--config-space",) if config_space else ())
    run = run_driver(tmp_path, dev, "sink", seconds=0.5, extra=("-v",))
    assert run.stats["rx_packets"] > 0
    if config_space:
        assert run.result["device_config"] == {
            "mac": "52:54:00:12:34:56", "link_up": True, "mtu": 1500, "max_virtqueue_pairs": 1}
        assert "device config: mac 52:54:00:12:34:56, link up, mtu 1500" in run.stderr
    else:
        assert run.result["device_config"] is None
    for line in ("device status 0xb: ACKNOWLEDGE DRIVER FEATURES_OK",
                 "device status 0xf: ACKNOWLEDGE DRIVER DRIVER_OK FEATURES_OK",
                 "device status 0: device reset"):  # fmt: skip
        dev.wait_for_log(line)
    err = dev.stderr()
    assert err.index("device status 0xf") < err.index("device status 0: device reset")
    dev.stop()
