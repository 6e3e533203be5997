"""A front-end that lies, against one real ``virtnet device`` process.

Each case sends what QEMU or DPDK never would -- with the codec (``encode``) where
the message is well formed, as raw header bytes where it is not -- and checks the
three promises of DESIGN.md: the front-end gets an error (a REPLY_ACK failure, u64
!= 0, when it set NEED_REPLY and the stream is still in step; the connection closed
when the framing is lost); the device's stderr names what was wrong; and the device
goes on -- no fd kept, the next connection served. The last test runs a real driver
on the same device process after all of them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from tests.vhost_user.conftest import (
    DeviceProcess,
    RawFrontend,
    run_driver,
    start_device,
)
from virtnet.net.features import VirtioNetF
from virtnet.net.guest import RX, TX, GuestLayout, build_driver
from virtnet.net.header import MRG_HDR_LEN
from virtnet.ports.synthetic import FrameGen
from virtnet.vhost_user.frontend import GuestMemfd
from virtnet.vhost_user.messages import (
    HEADER,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    InflightDesc,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    ProtocolFeature,
    VringAddr,
    VringState,
    encode,
)
from virtnet.vhost_user.messages import FrontendRequest as R
from virtnet.virtio.features import VirtioF, bit

NEED_REPLY = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK
FEATURES = bit(VirtioF.VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VirtioNetF.MRG_RXBUF)
UVA = 0x7F12_3400_0000  # where the "front-end" says its memory is (any number will do)
MEM_SIZE = 1 << 20
QSIZE = 256


@pytest.fixture(scope="module")
def device(tmp_path_factory) -> Iterator[DeviceProcess]:
    dev = start_device(tmp_path_factory.mktemp("hostile"), "sink")
    dev.baseline = dev.fd_count()
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def case(device: DeviceProcess) -> Iterator[Case]:
    c = Case(device)
    try:
        yield c
    finally:
        c.close()
    # Whatever the lie, the device is alive, kept none of the fds, serves the next one.
    assert device.alive(), device.stderr()
    assert device.wait_for_fds(device.baseline) == device.baseline, "fds leaked"
    nxt = RawFrontend.connect(device.socket_path)
    try:
        assert nxt.handshake() & bit(VirtioF.VERSION_1)
    finally:
        nxt.close()


class Case:
    """One hostile connection, and the device log lines written since it began."""

    def __init__(self, dev: DeviceProcess) -> None:
        self.dev = dev
        self.mark = dev.mark()
        self.fe = RawFrontend.connect(dev.socket_path)
        self.fds: list[int] = []

    def log(self, text: str) -> str:
        return self.dev.wait_for_log(text, since=self.mark)

    def ack(self, request: int) -> int:
        return self.fe.recv_u64(request)

    def refused(self, request: int, text: str) -> None:
        """A REPLY_ACK failure for ``request``, and a log line naming ``text``."""
        assert self.ack(request) != 0
        self.log(text)

    def still_in_step(self) -> None:
        """The same connection still answers: the bad message was skipped whole."""
        self.fe.send(R.GET_QUEUE_NUM)
        assert self.fe.recv_u64(R.GET_QUEUE_NUM) == 1

    def hung_up(self, text: str) -> None:
        self.fe.expect_eof()
        self.log(text)
        self.log("front-end gone")

    def negotiate(self, features: int = FEATURES, protocol: int = 0) -> None:
        """``protocol``: protocol features beside REPLY_ACK."""
        fe = self.fe
        fe.send(R.SET_OWNER)
        fe.send(R.GET_FEATURES)
        assert fe.recv_u64(R.GET_FEATURES) & features == features
        fe.send(R.GET_PROTOCOL_FEATURES)
        assert fe.recv_u64(R.GET_PROTOCOL_FEATURES) & bit(ProtocolFeature.REPLY_ACK)
        fe.send(R.SET_PROTOCOL_FEATURES, U64(bit(ProtocolFeature.REPLY_ACK) | protocol))
        fe.send(R.SET_FEATURES, U64(features), need_reply=True)
        assert self.ack(R.SET_FEATURES) == 0

    def memfd(self, size: int = MEM_SIZE) -> int:
        fd = os.memfd_create("hostile-guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.fds.append(fd)
        return fd

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.fds.append(fd)
        return fd

    def set_mem_table(self, *regions: MemoryRegionDesc, fds: tuple[int, ...]) -> int:
        self.fe.send(R.SET_MEM_TABLE, MemoryTable(regions), fds, need_reply=True)
        return self.ack(R.SET_MEM_TABLE)

    def map_memory(self) -> None:
        assert self.set_mem_table(MemoryRegionDesc(0, MEM_SIZE, UVA, 0), fds=(self.memfd(),)) == 0

    def close(self) -> None:
        self.fe.close()
        for fd in self.fds:
            os.close(fd)


def ring_addr(q: int, base: int = UVA) -> VringAddr:
    """Ring q's three parts, inside the mapped memory (16 KiB apart per ring)."""
    at = base + q * 0x4000
    return VringAddr(q, 0, at, at + 0x2000, at + 0x1000, 0)


# -- framing the device cannot trust: it hangs up ----------------------------------------


def test_truncated_header(case):
    case.fe.send_raw(b"\x01\x00\x00\x00\x01\x00\x00")  # 7 of 12 header bytes, then EOF
    case.fe.sock.shutdown(socket.SHUT_WR)
    case.hung_up("truncated header: 7 of 12 bytes")


def test_truncated_payload(case):
    case.fe.send_raw(HEADER.pack(R.SET_FEATURES, VHOST_USER_VERSION, 8) + b"\0\0\0")
    case.fe.sock.shutdown(socket.SHUT_WR)
    case.hung_up("truncated payload: 3 of 8 bytes")


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x2 | VHOST_USER_NEED_REPLY_MASK])
def test_bad_version_bits(case, flags):
    case.fe.send_header(R.GET_FEATURES, flags, b"")
    case.hung_up(f"flags {flags:#x}: version {flags & 3} (bits 0-1), expected 1")


def test_size_over_the_cap(case):
    case.fe.send_raw(HEADER.pack(R.SET_MEM_TABLE, VHOST_USER_VERSION, 1 << 30))
    case.hung_up("payload size 1073741824 exceeds the maximum")


def test_more_fds_than_a_message_may_carry(case):
    fds = tuple(case.eventfd() for _ in range(12))
    case.fe.send(R.SET_OWNER)
    case.fe.send_raw(HEADER.pack(R.SET_VRING_CALL, VHOST_USER_VERSION, 8) + bytes(8), fds)
    case.hung_up("ancillary data truncated")


def test_refused_request_whose_reply_carries_data(case):
    """No status can stand in for GET_VRING_BASE's answer: the device hangs up."""
    case.negotiate()
    case.fe.send(R.GET_VRING_BASE, VringState(9, 0))
    case.hung_up("vring index 9 out of range")


def test_wrong_size_on_a_request_with_a_reply_body(case):
    case.fe.send_header(R.GET_FEATURES, VHOST_USER_VERSION, bytes(8))
    case.hung_up("VHOST_USER_GET_FEATURES")


# -- well-framed lies: REPLY_ACK failure, log line, the connection goes on -----------------


def test_wrong_payload_size(case):
    case.negotiate()
    case.fe.send_header(R.SET_VRING_NUM, NEED_REPLY, bytes(12))
    case.refused(R.SET_VRING_NUM, "VHOST_USER_SET_VRING_NUM: vring state description: "
                                  "payload size 12, expected 8")  # fmt: skip
    case.still_in_step()


def test_memory_region_without_fd(case):
    case.negotiate()
    table = MemoryTable((MemoryRegionDesc(0, MEM_SIZE, UVA, 0),))
    case.fe.send_header(R.SET_MEM_TABLE, NEED_REPLY, table.pack())  # encode() would refuse
    case.refused(R.SET_MEM_TABLE, "VHOST_USER_SET_MEM_TABLE: expected 1 fds")
    case.still_in_step()


def test_memory_region_larger_than_its_file(case):
    case.negotiate()
    fd = case.memfd(4096)
    assert case.set_mem_table(MemoryRegionDesc(0, 1 << 24, UVA, 0), fds=(fd,)) != 0
    case.log("region at gpa 0x0 size 0x1000000")
    case.still_in_step()


def test_memory_region_offset_past_2_63(case):
    # Found by virtnet conform (mem-region-overflow): mmap raised OverflowError, uncaught.
    case.negotiate()
    fd = case.memfd()
    assert case.set_mem_table(MemoryRegionDesc(0, MEM_SIZE, UVA, (1 << 64) - 4096), fds=(fd,)) != 0
    case.log("VHOST_USER_SET_MEM_TABLE: region at gpa 0x0")
    case.still_in_step()


def test_memory_region_fd_that_cannot_be_mapped(case):
    case.negotiate()
    r, w = os.pipe()
    case.fds += [r, w]
    assert case.set_mem_table(MemoryRegionDesc(0, MEM_SIZE, UVA, 0), fds=(r,)) != 0
    case.log("VHOST_USER_SET_MEM_TABLE: region at gpa 0x0")
    case.still_in_step()


def test_overlapping_memory_regions(case):
    case.negotiate()
    regions = (MemoryRegionDesc(0, MEM_SIZE, UVA, 0),
               MemoryRegionDesc(MEM_SIZE // 2, MEM_SIZE, UVA + MEM_SIZE, 0))  # fmt: skip
    assert case.set_mem_table(*regions, fds=(case.memfd(), case.memfd())) != 0
    case.log("overlaps")
    case.still_in_step()


@pytest.mark.parametrize(
    ("part", "addr"),
    [
        ("descriptor table", VringAddr(0, 0, 0x1000, UVA + 0x2000, UVA + 0x1000, 0)),
        ("available ring", VringAddr(0, 0, UVA, UVA + 0x2000, UVA + MEM_SIZE - 4, 0)),
        ("used ring", VringAddr(0, 0, UVA, UVA + MEM_SIZE - 8, UVA + 0x1000, 0)),
    ],
)
def test_ring_address_outside_every_region(case, part, addr):
    case.negotiate()
    case.map_memory()
    case.fe.send(R.SET_VRING_NUM, VringState(0, QSIZE))
    case.fe.send(R.SET_VRING_ADDR, addr, need_reply=True)
    case.refused(R.SET_VRING_ADDR, f"VHOST_USER_SET_VRING_ADDR: vring 0 {part}: guest access")
    case.still_in_step()


def test_ring_address_given_before_the_memory_is_checked_at_start(case):
    """Addresses that come before SET_MEM_TABLE are checked when the ring would start."""
    case.negotiate()
    for q in range(2):
        case.fe.send(R.SET_VRING_NUM, VringState(q, QSIZE))
        case.fe.send(R.SET_VRING_ADDR, ring_addr(q, base=0x1000 if q else UVA))
    case.map_memory()
    for q in range(2):
        case.fe.send(R.SET_VRING_CALL, U64(q), (case.eventfd(),))
        case.fe.send(R.SET_VRING_ENABLE, VringState(q, 1))
    case.fe.send(R.SET_VRING_KICK, U64(0), (case.eventfd(),))
    case.fe.send(R.SET_VRING_KICK, U64(1), (case.eventfd(),), need_reply=True)
    case.refused(R.SET_VRING_KICK, "vring 1 descriptor table: guest access [0x5000")
    case.still_in_step()


@pytest.mark.parametrize(
    ("request_", "payload", "with_fd"),
    [
        (R.SET_VRING_NUM, VringState(2, QSIZE), False),
        (R.SET_VRING_BASE, VringState(0xFFFF, 0), False),
        (R.SET_VRING_ADDR, VringAddr(7, 0, UVA, UVA, UVA, 0), False),
        (R.SET_VRING_ENABLE, VringState(3, 1), False),
        (R.SET_VRING_CALL, U64(5), True),
        (R.SET_VRING_KICK, U64(0xFF), True),
    ],
    ids=["num", "base", "addr", "enable", "call", "kick"],
)
def test_vring_index_out_of_range(case, request_, payload, with_fd):
    case.negotiate()
    fds = (case.eventfd(),) if with_fd else ()  # the device must close it, not keep it
    case.fe.send(request_, payload, fds, need_reply=True)
    index = payload.vring_index if isinstance(payload, U64) else payload.index
    case.refused(request_, f"vring index {index} out of range")
    case.still_in_step()


@pytest.mark.parametrize("number", [0, 44, 99, 0xFFFF_FFFF])
def test_unknown_request_number(case, number):
    case.fe.send_header(number, NEED_REPLY, bytes(8))
    request, flags, payload = case.fe.recv_reply()
    assert request == number and flags & VHOST_USER_REPLY_MASK
    assert U64.unpack(payload).value != 0
    case.log(f"request {number}: unknown front-end request number")
    case.still_in_step()


def test_features_never_offered(case):
    case.fe.send(R.SET_OWNER)
    wanted = FEATURES | bit(VirtioNetF.SPEED_DUPLEX) | bit(VirtioNetF.CTRL_VQ)
    case.fe.send(R.SET_FEATURES, U64(wanted), need_reply=True)
    case.refused(R.SET_FEATURES, "features CTRL_VQ SPEED_DUPLEX were never offered")
    case.still_in_step()


def test_features_without_their_requirements_are_dropped_and_logged(case):
    # Linux acks such sets (QEMU csum=off leaves guest_tso6 on): not a refusal, a warning.
    case.fe.send(R.SET_OWNER)
    case.fe.send(R.SET_FEATURES, U64(FEATURES | bit(VirtioNetF.GUEST_TSO4)), need_reply=True)
    assert case.ack(R.SET_FEATURES) == 0
    case.log("features lack requirements, ignored: GUEST_TSO4 needs GUEST_CSUM")
    case.still_in_step()


# -- the in-flight region (PROTOCOL_F_INFLIGHT_SHMFD) ------------------------------------

INFLIGHT = bit(ProtocolFeature.INFLIGHT_SHMFD)


def test_inflight_fd_without_the_protocol_feature(case):
    case.negotiate()
    case.fe.send(R.SET_INFLIGHT_FD, InflightDesc(4096, 0, 2, QSIZE), (case.memfd(4096),),
                 need_reply=True)
    case.refused(R.SET_INFLIGHT_FD, "without VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD negotiated")
    case.still_in_step()


def test_inflight_fd_smaller_than_it_claims(case):
    """A region of 4 KiB that says it holds 2 queues of 256 (2 * 4160 bytes)."""
    case.negotiate(protocol=INFLIGHT)
    case.fe.send(R.SET_INFLIGHT_FD, InflightDesc(2 * 4160, 0, 2, QSIZE), (case.memfd(4096),),
                 need_reply=True)
    case.refused(R.SET_INFLIGHT_FD, "is larger than its file (0x1000 bytes)")
    case.still_in_step()


def test_inflight_size_smaller_than_its_queues_need(case):
    case.negotiate(protocol=INFLIGHT)
    case.fe.send(R.SET_INFLIGHT_FD, InflightDesc(4096, 0, 2, QSIZE), (case.memfd(1 << 16),),
                 need_reply=True)
    case.refused(R.SET_INFLIGHT_FD, "smaller than 2 split queues of 256 need (0x2080)")
    case.still_in_step()


def test_a_split_sized_inflight_region_for_packed_rings(case):
    """Packed rings negotiated: QueueRegionPacked's 32 bytes a descriptor, not 16."""
    case.negotiate(FEATURES | bit(VirtioF.RING_PACKED), protocol=INFLIGHT)
    case.fe.send(R.SET_INFLIGHT_FD, InflightDesc(2 * 4160, 0, 2, QSIZE),
                 (case.memfd(1 << 16),), need_reply=True)  # fmt: skip
    case.refused(R.SET_INFLIGHT_FD, "smaller than 2 packed queues of 256 need (0x4080)")
    case.still_in_step()


def test_inflight_fd_for_no_queues(case):
    case.negotiate(protocol=INFLIGHT)
    case.fe.send(R.GET_INFLIGHT_FD, InflightDesc(0, 0, 0, QSIZE))
    case.hung_up("in-flight region for 0 queues")  # its reply carries data: no status fits


@pytest.mark.parametrize("num", [0, 3, 255, 65536, 1 << 31])
def test_vring_num_not_a_power_of_2(case, num):
    case.negotiate()
    case.fe.send(R.SET_VRING_NUM, VringState(0, num), need_reply=True)
    case.refused(R.SET_VRING_NUM, f"vring 0: queue size {num} is not a power of 2")
    case.still_in_step()


def test_wrong_fd_count_closes_the_extra_fds(case):
    case.negotiate()
    fds = (case.eventfd(), case.eventfd(), case.eventfd())
    case.fe.send_raw(encode(Message(R.SET_VRING_CALL, NEED_REPLY, U64(0), fds[:1])), fds)
    case.refused(R.SET_VRING_CALL, "expected 1 fds")
    case.still_in_step()


def test_refused_message_between_good_ones_in_one_write(case):
    """A refused message does not swallow the ones that came with it in the same read."""
    bad = HEADER.pack(R.SET_VRING_NUM, NEED_REPLY, 4) + bytes(4)
    good = encode(Message(R.GET_QUEUE_NUM, VHOST_USER_VERSION))
    case.fe.send_raw(good + bad + good)
    assert case.fe.recv_u64(R.GET_QUEUE_NUM) == 1
    assert case.ack(R.SET_VRING_NUM) != 0
    assert case.fe.recv_u64(R.GET_QUEUE_NUM) == 1
    case.log("payload size 4, expected 8")


# -- front-ends that leave at the wrong moment ---------------------------------------------


def test_disconnect_in_the_middle_of_setup(case):
    """Memory mapped, one ring half set up, no kick on the other: then the front-end goes."""
    case.negotiate()
    case.map_memory()
    for q in range(2):
        case.fe.send(R.SET_VRING_NUM, VringState(q, QSIZE))
        case.fe.send(R.SET_VRING_BASE, VringState(q, 0))
        case.fe.send(R.SET_VRING_ADDR, ring_addr(q), need_reply=True)
        assert case.ack(R.SET_VRING_ADDR) == 0
    case.fe.send(R.SET_VRING_CALL, U64(0), (case.eventfd(),))
    case.fe.send(R.SET_VRING_KICK, U64(0), (case.eventfd(),), need_reply=True)
    assert case.ack(R.SET_VRING_KICK) == 0
    case.fe.close()
    case.log("front-end gone")


def test_disconnect_right_after_the_memory_table(case):
    case.negotiate()
    case.map_memory()
    case.fe.close()
    case.log("front-end gone")


def test_disconnect_before_the_reply(case):
    """The device's reply finds the socket closed: a lost front-end, not a crash."""
    case.fe.send(R.GET_FEATURES)
    case.fe.sock.shutdown(socket.SHUT_RDWR)
    case.log("front-end gone")


def test_second_frontend_while_one_is_connected(case):
    """One front-end at a time: a second is turned away, the first is not disturbed."""
    case.negotiate()
    other = RawFrontend.connect(case.dev.socket_path)
    try:
        other.expect_eof()
    finally:
        other.close()
    case.log("refusing a second front-end")
    case.still_in_step()


# -- a front-end whose rings lie (the device is running) -------------------------------------


RING_FEATURES = FEATURES  # no EVENT_IDX, no INDIRECT: every kick is taken, one desc a chain
RING_LAYOUT = GuestLayout(QSIZE, 64)


class RunningRings:
    """A hand-made front-end with real rings in a memfd and the device running on them."""

    def __init__(self, case: Case, seal: bool = True, protocol: int = 0) -> None:
        self.case = case
        self.guest = GuestMemfd(RING_LAYOUT.size, seal=seal)
        g, fe = self.guest, case.fe
        self.drv = build_driver(g.memory, RING_LAYOUT, RING_FEATURES, "deferred")
        case.negotiate(RING_FEATURES, protocol)
        assert case.set_mem_table(MemoryRegionDesc(0, g.size, g.uva, 0), fds=(g.fd,)) == 0
        self.kick = [case.eventfd() for _ in range(2)]
        for q, a in enumerate(RING_LAYOUT.rings):
            fe.send(R.SET_VRING_NUM, VringState(q, QSIZE))
            fe.send(R.SET_VRING_BASE, VringState(q, 0))
            fe.send(R.SET_VRING_ADDR, VringAddr(q, 0, g.uva + a.desc, g.uva + a.used,
                                                g.uva + a.avail, 0))  # fmt: skip
            fe.send(R.SET_VRING_CALL, U64(q), (case.eventfd(),))
            fe.send(R.SET_VRING_KICK, U64(q), (self.kick[q],))
            fe.send(R.SET_VRING_ENABLE, VringState(q, 1), need_reply=True)
            assert case.ack(R.SET_VRING_ENABLE) == 0
        case.log("device running")

    def frame_chain(self, seq: int) -> list[tuple[int, int]]:
        """A readable chain holding virtio-net header + frame ``seq`` of a gen:1500 stream."""
        page = self.drv.pool.alloc_page()
        gen = FrameGen(1500)
        page.view[:MRG_HDR_LEN] = gen.hdr
        gen.write_into(page.view[MRG_HDR_LEN:], seq)
        return [(page.gpa, MRG_HDR_LEN + 1500)]

    def wait_used(self, q: int, n: int, timeout: float = 10.0) -> list[tuple[object, int]]:
        vq = (self.drv.rvq, self.drv.svq)[q]
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            item = vq.get_buf()
            if item is not None:
                got.append(item)
            elif time.monotonic() >= deadline:
                pytest.fail(f"the device used {len(got)} of {n} buffers:\n{self.case.dev.stderr()}")
            else:
                time.sleep(0.01)
        return got

    def vring_base(self, q: int) -> int:
        self.case.fe.send(R.GET_VRING_BASE, VringState(q, 0))
        request, _flags, payload = self.case.fe.recv_reply()
        assert request == R.GET_VRING_BASE
        return VringState.unpack(payload).num

    def close(self) -> None:
        self.guest.close()


@pytest.fixture
def ring_case(device_factory) -> Iterator[tuple[Case, RunningRings]]:
    dev = device_factory("sink")
    c = Case(dev)
    rings = RunningRings(c)
    try:
        yield c, rings
    finally:
        rings.close()
        c.close()


def test_descriptor_outside_guest_memory(ring_case):
    """A tx chain pointing outside every region is used with length 0 and counted; the
    good frame after it goes through, and the ring stays in step."""
    case, rings = ring_case
    svq = rings.drv.svq
    svq.add([(1 << 40, 1512)], (), "bad")
    svq.add(rings.frame_chain(0), (), "good")
    os.eventfd_write(rings.kick[TX], 1)
    assert rings.wait_used(TX, 2) == [("bad", 0), ("good", 0)]
    assert rings.vring_base(RX) == 0
    assert rings.vring_base(TX) == 2
    doc = case.dev.stop()
    ds, sink = doc["device_stats"], doc["backend"]
    assert ds["desc_errors"] == 1 and ds["tx_packets"] == 1
    assert sink["sink_packets"] == 1 and sink["sink_corrupt"] == 0 and sink["sink_lost"] == 0


def test_avail_index_far_ahead(ring_case):
    """The avail index moved more than a queue's worth ahead (vhost: "Guest moved avail
    index"): the device stops using that ring, but still answers, and hangs on nothing."""
    case, rings = ring_case
    rings.drv.svq.ring.avail[1] = QSIZE + 1000  # avail->idx, with nothing behind it
    os.eventfd_write(rings.kick[TX], 1)
    time.sleep(0.2)  # let the device loop meet it
    case.still_in_step()
    rings.vring_base(TX)
    case.fe.close()
    case.log("front-end gone")
    nxt = RawFrontend.connect(case.dev.socket_path)
    try:
        assert nxt.handshake() & bit(VirtioF.VERSION_1)
    finally:
        nxt.close()
    doc = case.dev.stop()
    assert doc["device_stats"]["desc_errors"] >= 1 and doc["device_stats"]["tx_packets"] == 0


# -- and after all that, a real driver -------------------------------------------------------


def test_real_driver_after_the_hostile_ones(device, tmp_path):
    before = device.stderr()
    assert "Traceback" not in before
    run = run_driver(tmp_path, device, "gen:1500", seconds=1.0)
    rs = run.stats
    assert rs["tx_packets"] > 0
    assert rs["pages_outstanding"] == 0 and rs["tx_dropped"] == 0
    assert device.wait_for_fds(device.baseline) == device.baseline
    doc = device.stop()
    ds, sink = doc["device_stats"], doc["backend"]
    # Only this driver ever got a ring running: the device's counts are its counts.
    assert ds["tx_packets"] == rs["tx_packets"] == sink["sink_packets"]
    assert ds["tx_bytes"] == rs["tx_bytes"] == sink["sink_bytes"]
    assert sink["sink_corrupt"] == 0 and sink["sink_lost"] == 0
    assert ds["desc_errors"] == 0 and ds["tx_errors"] == 0
    assert "Traceback" not in device.stderr()
