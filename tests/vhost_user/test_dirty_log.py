"""Dirty logging (vhost-user.rst "Migration") on ``virtnet device``.

In-process (a BackendSession fed messages, the guest a real memfd): the refusals,
logging turned on and off mid-stream, the used ring logged at its log_guest_addr.
Over the real socket against a ``virtnet device`` process: ``virtnet conform``'s
dirty-log cases (guest memory before and after, every page the device wrote must be
in the log) in every cell, on a two-pair device (each worker maps the log), and the
same cases failing when the device's logging is broken on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.vhost_user.local_session import local_session
from tests.vhost_user.test_backend_session import (
    LAYOUT,
    WITH_PF,
    Setup,
    msg,
    open_fds,
    status,
)
from virtnet.net.guest import RX, TX, build_driver
from virtnet.ports.backends import skb_from_gen
from virtnet.ports.synthetic import FrameGen
from virtnet.vhost_user.backend import BACKEND_FEATURES, PROTOCOL_FEATURES
from virtnet.vhost_user.device_loop import DEBUG_NO_DIRTY_LOG
from virtnet.vhost_user.frontend import GuestMemfd
from virtnet.vhost_user.messages import (
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    LogDesc,
    ProtocolFeature,
    VringAddr,
)
from virtnet.vhost_user.messages import FrontendRequest as R
from virtnet.virtio.features import bit

PAGE = 4096
LOG_PROTOCOL = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.LOG_SHMFD)
FEATURES = WITH_PF & ~bit(VHOST_F_LOG_ALL)


class LogSetup(Setup):
    def negotiate(self, features: int = FEATURES, protocol: int = LOG_PROTOCOL) -> None:
        s = self.s
        assert s.handle(msg(R.SET_OWNER)) is None
        assert s.handle(msg(R.GET_FEATURES)).payload.value == BACKEND_FEATURES
        assert s.handle(msg(R.GET_PROTOCOL_FEATURES)).payload.value == PROTOCOL_FEATURES
        s.handle(msg(R.SET_PROTOCOL_FEATURES, U64(protocol)))
        assert status(s.handle(msg(R.SET_FEATURES, U64(features), need_reply=True))) == 0

    def all(self, features: int = FEATURES) -> None:
        self.negotiate(features)
        self.mem_table()
        for q in (RX, TX):
            self.ring(q)
        for q in (RX, TX):
            self.enable(q)

    def logging(self, on: bool, log_addrs: tuple[int, int] | None = None) -> None:
        """QEMU's vhost_dev_set_log: features, then each ring's addresses again."""
        features = self.s.features | bit(VHOST_F_LOG_ALL) if on else FEATURES
        assert status(self.s.handle(msg(R.SET_FEATURES, U64(features), need_reply=True))) == 0
        for q in (RX, TX):
            a = LAYOUT.rings[q]
            gpa = (log_addrs or (LAYOUT.rings[RX].used, LAYOUT.rings[TX].used))[q]
            uva = self.g.uva
            addr = VringAddr(q, bit(VHOST_VRING_F_LOG) if on else 0, uva + a.desc,
                             uva + a.used, uva + a.avail, gpa if on else 0)  # fmt: skip
            assert status(self.s.handle(msg(R.SET_VRING_ADDR, addr, need_reply=True))) == 0


class LogFile:
    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)

    def bits(self) -> bytes:
        return os.pread(self.fd, self.size, 0)

    def pages(self) -> set[int]:
        data = self.bits()
        return {8 * i + k for i, b in enumerate(data) for k in range(8) if b >> k & 1}

    def clear(self) -> None:
        os.pwrite(self.fd, bytes(self.size), 0)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def guest():
    g = GuestMemfd(LAYOUT.size)
    yield g
    g.close()


@pytest.fixture
def session():
    s = local_session()
    yield s
    s.close()


@pytest.fixture
def logsetup(session, guest) -> LogSetup:
    return LogSetup(session, guest)


@pytest.fixture
def logfile():
    f = LogFile(PAGE)
    yield f
    f.close()


def set_log_base(session, logfile: LogFile, size: int | None = None, offset: int = 0) -> int:
    m = msg(R.SET_LOG_BASE, LogDesc(logfile.size if size is None else size, offset),
            [os.dup(logfile.fd)])  # fmt: skip
    return status(session.handle(m))  # a reply with or without NEED_REPLY: QEMU waits for it


def changed_pages(before: bytes, after: bytes) -> set[int]:
    return {p for p in range(len(after) // PAGE)
            if after[p * PAGE:(p + 1) * PAGE] != before[p * PAGE:(p + 1) * PAGE]}  # fmt: skip


# -- refusals ------------------------------------------------------------------------------


def test_set_log_base_without_log_shmfd_is_refused(logsetup, session, logfile, caplog):
    before = open_fds()
    logsetup.negotiate(protocol=bit(ProtocolFeature.REPLY_ACK))
    assert set_log_base(session, logfile) != 0
    assert "SET_LOG_BASE without PROTOCOL_F_LOG_SHMFD negotiated" in caplog.text
    assert open_fds() == before


@pytest.mark.parametrize(("size", "offset", "text"), [
    (16 * PAGE, 0, "is larger than its file"),
    (PAGE, 2 * PAGE, "is past the end of its 0x1000-byte file"),
    (PAGE // 2, PAGE, "is past the end"),
    (0, 0, "is not positive"),
])  # fmt: skip
def test_a_log_that_does_not_fit_its_file_is_refused_by_name(logsetup, session, logfile, caplog,
                                                             size, offset, text):  # fmt: skip
    logsetup.all()
    before = open_fds()
    assert set_log_base(session, logfile, size, offset) != 0
    assert text in caplog.text
    assert session.log is None and not session.log_set
    assert open_fds() == before
    assert set_log_base(session, logfile) == 0  # the session goes on, a good log is taken


def test_set_log_base_seals_the_log_against_shrinking(logsetup, session, logfile):
    import fcntl

    logsetup.all()
    assert set_log_base(session, logfile) == 0
    assert fcntl.fcntl(logfile.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK


def test_set_log_fd_is_taken_and_closed(logsetup, session):
    before = open_fds()
    logsetup.negotiate()
    fd = os.eventfd(0)
    assert status(session.handle(msg(R.SET_LOG_FD, b"", [fd], need_reply=True))) == 0
    assert open_fds() == before


def test_offered_features_and_protocol_features():
    assert BACKEND_FEATURES & bit(VHOST_F_LOG_ALL)
    assert PROTOCOL_FEATURES & bit(ProtocolFeature.LOG_SHMFD)
    assert PROTOCOL_FEATURES & bit(ProtocolFeature.RARP)
    assert BACKEND_FEATURES & bit(VHOST_USER_F_PROTOCOL_FEATURES)


# -- logging in-process --------------------------------------------------------------------


def test_every_page_the_device_writes_is_logged_and_the_used_ring_at_its_log_address(
    logsetup, session, guest, logfile
):
    logsetup.all()
    drv = build_driver(guest.memory, LAYOUT, session.features, "deferred",
                       netif_receive_skb=lambda skb: skb.free())  # fmt: skip
    assert drv.try_fill_recv()
    gen = FrameGen(1000)
    for _ in range(4):
        assert drv.start_xmit(skb_from_gen(drv, gen))
    assert set_log_base(session, logfile) == 0
    logsetup.logging(True)
    dev = session.device
    before = bytes(guest.map)
    # Only the device writes from here on: rx frames into the posted buffers (one of
    # several buffers too), rx and tx used entries and indexes.
    for size in (60, 1514, 9000, 300, 64 * 1024 - 100):
        assert dev.receive_packet([bytes([size & 0xFF]) * size])
    assert dev.process_tx(lambda views, n: True) == 4
    dev.flush_rx()
    dev.flush_tx()
    session.sync_log()
    changed = changed_pages(before, bytes(guest.map))
    logged = logfile.pages()
    assert changed and changed <= logged, f"not logged: {sorted(changed - logged)}"
    for q in (RX, TX):
        assert LAYOUT.rings[q].used // PAGE in logged
    assert dev.dirty is not None and dev.dirty.pages_logged >= len(changed)
    drv.poll(64)
    drv.free_old_xmit_skbs()


def test_the_used_ring_is_logged_at_log_guest_addr_not_where_it_is_mapped(
    logsetup, session, guest, logfile
):
    """log_guest_addr is the front-end's word for the used ring's guest-physical address
    (ring addresses are its virtual ones): the device logs there, as vhost does."""
    logsetup.all()
    drv = build_driver(guest.memory, LAYOUT, session.features, "deferred")
    for _ in range(2):
        assert drv.start_xmit(skb_from_gen(drv, FrameGen(100)))
    assert set_log_base(session, logfile) == 0
    elsewhere = (0x7000_0000, 0x7100_0000)  # gpa pages 0x70000 and 0x71000: beyond this log
    big = LogFile(0x7200_0000 // PAGE // 8)
    try:
        assert set_log_base(session, big) == 0
        logsetup.logging(True, log_addrs=elsewhere)
        assert session.device.process_tx(lambda views, n: True) == 2
        session.device.flush_tx()
        session.sync_log()
        logged = big.pages()
        assert elsewhere[TX] // PAGE in logged
        assert LAYOUT.rings[TX].used // PAGE not in logged
    finally:
        big.close()
    drv.free_old_xmit_skbs()


def test_logging_toggled_mid_burst_logs_what_is_flushed_while_on(
    logsetup, session, guest, logfile
):
    """On between a burst's pushes and its flush: the used entries it publishes are logged
    (the rx data written before logging began is the front-end's first full copy's). Off
    with pages cached: they are flushed into the log, not dropped."""
    logsetup.all()
    drv = build_driver(guest.memory, LAYOUT, session.features, "deferred")
    assert drv.try_fill_recv()
    assert set_log_base(session, logfile) == 0
    dev = session.device
    assert dev.receive_packet([bytes(100)])  # pushed, not flushed
    logsetup.logging(True)
    dev.flush_rx()
    session.sync_log()
    assert LAYOUT.rings[RX].used // PAGE in logfile.pages()
    logfile.clear()
    assert dev.receive_packet([bytes(5000)])
    dev.flush_rx()
    assert dev.dirty is not None and dev.dirty.pending()
    logsetup.logging(False)  # flushes what was cached
    assert dev.dirty is None
    logged = logfile.pages()
    assert LAYOUT.rings[RX].used // PAGE in logged and len(logged) >= 2
    logfile.clear()
    assert dev.receive_packet([bytes(100)])
    dev.flush_rx()
    session.sync_log()
    assert not logfile.pages()  # off: nothing logged
    drv.poll(64)


def test_send_rarp_needs_rarp_and_builds_the_frame(logsetup, session, caplog):
    logsetup.negotiate(protocol=bit(ProtocolFeature.REPLY_ACK))
    mac = bytes.fromhex("5254001a2b3c")
    payload = U64(int.from_bytes(mac + b"\0\0", "little"))
    assert status(session.handle(msg(R.SEND_RARP, payload, need_reply=True))) != 0
    assert "SEND_RARP without PROTOCOL_F_RARP negotiated" in caplog.text
    session.handle(msg(R.SET_PROTOCOL_FEATURES, U64(bit(ProtocolFeature.RARP)
                                                  | bit(ProtocolFeature.REPLY_ACK))))  # fmt: skip
    assert status(session.handle(msg(R.SEND_RARP, payload, need_reply=True))) == 0
    (frame,) = session.rarps
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x80\x35"
    assert frame[20:22] == b"\x00\x03" and frame[22:28] == mac and frame[32:38] == mac
    assert len(frame) == 60


# -- over the socket: virtnet conform's cases against a virtnet device process -----------------

CONFORM = [sys.executable, "-m", "virtnet", "conform"]
LOG_CASES = ("dirty-log", "dirty-log-refusals", "send-rarp")


def run_conform(tmp_path, socket_path: str, *cases: str) -> tuple[int, dict]:
    out = tmp_path / "conform.json"
    argv = [*CONFORM, socket_path, "--json", str(out), "--timeout", "60"]
    for name in cases:
        argv += ["--case", name]
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=400)  # fmt: skip
    return done.returncode, json.loads(out.read_text())


def results(doc: dict) -> dict[str, tuple[str, str]]:
    return {c["name"]: (c["status"], c.get("detail", "") or c.get("reason", ""))
            for c in doc["cases"]}  # fmt: skip


def test_conform_dirty_log_cases_pass_on_a_two_pair_device(device_factory, tmp_path):
    dev = device_factory("loopback", extra=("--queues", "2"))
    rc, doc = run_conform(tmp_path, dev.socket_path, *LOG_CASES)
    got = results(doc)
    assert rc == 0, got
    assert {name for name, (st, _) in got.items() if st == "passed"} == set(got)
    assert len(got) == 6  # dirty-log in 4 cells, the refusals, SEND_RARP
    stats = dev.stop()
    assert stats["dirty_log"]["log_pages"] > 0 and stats["dirty_log"]["log_flushes"] > 0
    assert stats["dirty_log"]["log_beyond"] == 0


@pytest.mark.parametrize(("planted", "missing"), [
    ("rx-data", "changed pages not logged"),
    ("used", "changed pages not logged (gpa 0x0, 0x4000)"),
    ("1", "changed pages not logged"),
])  # fmt: skip
def test_a_device_that_does_not_log_fails_the_dirty_log_case(
    device_factory, tmp_path, monkeypatch, planted, missing
):
    """The check can fail: the same case, the device's logging broken on purpose."""
    monkeypatch.setenv(DEBUG_NO_DIRTY_LOG, planted)
    dev = device_factory("loopback")
    rc, doc = run_conform(tmp_path, dev.socket_path, "dirty-log/split/event-idx-off",
                          "dirty-log/packed/event-idx-on")  # fmt: skip
    got = results(doc)
    assert rc == 1
    for st, detail in got.values():
        assert st == "failed" and missing in detail, got
