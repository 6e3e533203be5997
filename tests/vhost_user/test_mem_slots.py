"""Memory slots (PROTOCOL_F_CONFIGURE_MEM_SLOTS) against real ``virtnet device`` processes.

More than the 8 regions SET_MEM_TABLE can carry, added one at a time with ADD_MEM_REG
(``virtnet driver --mem-regions N``), traffic both ways through rings and buffers in
the regions past the 8th; a region added while the rings run and a frame sent out of
it, then removed; and every refusal (overlap, bad fd, past the file, unaligned, zero
size, unknown, in use by a ring), each named, the session going on, nothing kept: the
device's and its workers' fds and mappings are counted before and after.
"""

from __future__ import annotations

import mmap
import os
import re
import time
from collections.abc import Iterator

import pytest

from tests.vhost_user.conftest import DeviceProcess, RawFrontend, run_driver, start_device
from tests.vhost_user.local_session import local_session
from tests.vhost_user.test_hostile_frontend import MEM_SIZE, UVA, Case, RunningRings
from virtnet.net.guest import RX, TX, GuestLayout
from virtnet.net.header import MRG_HDR_LEN
from virtnet.ports.synthetic import FrameGen
from virtnet.vhost_user.mapping import MAX_MEM_SLOTS
from virtnet.vhost_user.messages import (
    U64,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    MemoryRegionDesc,
    Message,
    ProtocolFeature,
    SingleMemoryRegion,
    close_fds,
)
from virtnet.vhost_user.messages import FrontendRequest as R
from virtnet.virtio.features import bit

SLOTS = bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
PAGE = mmap.PAGESIZE
HIGH = 1 << 32  # where a test's extra region goes: far from the guest's own memory
HIGH_UVA = 0x7E00_0000_0000


def maps(pid: int) -> int:
    """The process's mappings of memfds: guest memory (the interpreter's own come and go)."""
    with open(f"/proc/{pid}/maps") as f:
        return sum("/memfd:" in line for line in f)


def workers(dev: DeviceProcess) -> list[int]:
    with open(f"/proc/{dev.pid}/task/{dev.pid}/children") as f:
        return [int(p) for p in f.read().split()]


def footprint(dev: DeviceProcess) -> list[tuple[int, int]]:
    """(fds, mappings) of the device and each of its workers."""
    return [(len(os.listdir(f"/proc/{pid}/fd")), maps(pid)) for pid in [dev.pid, *workers(dev)]]


def settled(dev: DeviceProcess, expected: list[tuple[int, int]], timeout: float = 10.0) -> list:
    """The footprint once it is ``expected`` (a disconnect unmaps after its log line)."""
    deadline = time.monotonic() + timeout
    while (now := footprint(dev)) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return now


def region_msg(request: R, gpa: int, size: int, uva: int, offset: int = 0,
               fds: tuple[int, ...] = ()) -> tuple:  # fmt: skip
    return request, SingleMemoryRegion(MemoryRegionDesc(gpa, size, uva, offset)), fds


def add(case: Case, gpa: int, size: int, uva: int, fd: int, offset: int = 0) -> int:
    case.fe.send(*region_msg(R.ADD_MEM_REG, gpa, size, uva, offset, (fd,)), need_reply=True)
    return case.ack(R.ADD_MEM_REG)


def rem(case: Case, gpa: int, size: int, uva: int, fds: tuple[int, ...] = ()) -> int:
    """REM_MEM_REG; with ``fds`` as QEMU sends it (the codec, rightly, sends none)."""
    payload = SingleMemoryRegion(MemoryRegionDesc(gpa, size, uva, 0)).pack()
    case.fe.send_header(R.REM_MEM_REG, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
                        payload, fds)  # fmt: skip
    close_fds(fds)
    return case.ack(R.REM_MEM_REG)


# -- virtnet driver <-> virtnet device, 12 regions ------------------------------------------


REGIONS = 12
QUEUES = 4  # the last pair's rings and pages sit in the last quarter: regions 8..11
QSIZE = 64


@pytest.mark.parametrize(("strategy", "size", "ring"),
                         [("ewma", 65536, "packed"), ("deferred", 1500, "split")])  # fmt: skip
def test_twelve_regions_traffic_both_ways(tmp_path, device_factory, strategy, size, ring):
    dev = device_factory("loopback", extra=("--queues", str(QUEUES)))
    extra = ("--queues", str(QUEUES), "--queue-size", str(QSIZE), "--mem-regions", str(REGIONS))
    if ring == "split":
        extra += ("--features-off", "RING_PACKED")
    run = run_driver(tmp_path, dev, f"gen:{size}", strategy=strategy, seconds=2.0, extra=extra)
    log = dev.stderr()
    doc = dev.stop()
    added = [int(m, 16) for m in re.findall(r"memory region added: gpa (0x[0-9a-f]+)", log)]
    assert len(added) == REGIONS and added == sorted(added), log
    assert "SET_MEM_TABLE" not in log  # with memory slots, every region by ADD_MEM_REG
    # Where the last queue pair lives, by the driver's own layout: past the 8th region.
    layout = GuestLayout(QSIZE, GuestLayout.pages_for(QSIZE), packed=ring == "packed")
    layout = GuestLayout(QSIZE, layout.npages, base=(QUEUES - 1) * layout.size,
                         packed=ring == "packed")  # fmt: skip
    first = max(i for i, gpa in enumerate(added) if gpa <= layout.rings[RX].desc)
    assert first >= 8, (first, added)
    ds, rs = doc["device_stats"], run.stats
    assert ds["desc_errors"] == 0 and ds["tx_errors"] == 0
    for pair in range(QUEUES):  # every pair moved frames both ways, the last included
        assert ds[f"rx_queue_{pair}_packets"] > 0 and ds[f"tx_queue_{pair}_packets"] > 0
    assert ds["tx_packets"] == rs["tx_packets"] == doc["backend"]["sink_packets"]
    assert ds["rx_packets"] == rs["rx_packets"] == run.backend["sink_packets"]
    assert run.backend["sink_bytes"] == size * run.backend["sink_packets"]
    for side in (doc["backend"], run.backend):
        assert side["sink_corrupt"] == 0 and side["sink_foreign"] == 0
    assert rs["pages_outstanding"] == 0


def test_more_regions_than_the_device_has_slots(tmp_path, device_factory):
    dev = device_factory("sink")
    argv_extra = ("--mem-regions", str(MAX_MEM_SLOTS + 1))
    with pytest.raises(AssertionError, match="the back-end has 509 memory slots"):
        run_driver(tmp_path, dev, "sink", seconds=0.2, extra=argv_extra)
    assert dev.alive()


# -- ADD / REM while the rings run --------------------------------------------------------


@pytest.fixture
def slot_rings(device_factory) -> Iterator[tuple[Case, RunningRings]]:
    dev = device_factory("sink")
    c = Case(dev)
    rings = RunningRings(c, protocol=SLOTS)
    try:
        yield c, rings
    finally:
        rings.close()
        c.close()


def test_region_added_while_rings_run_carries_a_frame_then_goes(slot_rings):
    case, rings = slot_rings
    dev = case.dev
    before = footprint(dev)
    fd = case.memfd(MEM_SIZE)
    extra = mmap.mmap(fd, MEM_SIZE)
    gen = FrameGen(1500)
    extra[PAGE : PAGE + MRG_HDR_LEN] = gen.hdr
    gen.write_into(memoryview(extra)[PAGE + MRG_HDR_LEN : PAGE + MRG_HDR_LEN + 1500], 0)
    assert add(case, HIGH, MEM_SIZE, HIGH_UVA, fd) == 0
    # The reply came after every worker mapped it: one more mapping in each process.
    assert [m for _f, m in footprint(dev)] == [m + 1 for _f, m in before]
    svq = rings.drv.svq
    svq.add([(HIGH + PAGE, MRG_HDR_LEN + 1500)], (), "in the new region")
    svq.add(rings.frame_chain(1), (), "in the old one")
    os.eventfd_write(rings.kick[TX], 1)
    assert rings.wait_used(TX, 2) == [("in the new region", 0), ("in the old one", 0)]
    # A region the rings lie in stays, by name; then the new one goes.
    g = rings.guest
    assert rem(case, 0, g.size, g.uva) != 0
    case.log("is in use: vring 0's descriptor table")
    assert rem(case, HIGH, MEM_SIZE, HIGH_UVA, fds=(os.dup(fd),)) == 0  # an fd, as QEMU sends
    assert [m for _f, m in footprint(dev)] == [m for _f, m in before]
    svq.add([(HIGH + PAGE, MRG_HDR_LEN + 1500)], (), "into the removed region")
    os.eventfd_write(rings.kick[TX], 1)
    assert rings.wait_used(TX, 1) == [("into the removed region", 0)]
    extra.close()
    doc = dev.stop()
    ds, sink = doc["device_stats"], doc["backend"]
    assert ds["tx_packets"] == 2 and ds["desc_errors"] == 1
    assert sink["sink_packets"] == 2 and sink["sink_corrupt"] == 0 and sink["sink_lost"] == 0


# -- refusals ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device(tmp_path_factory) -> Iterator[DeviceProcess]:
    dev = start_device(tmp_path_factory.mktemp("slots"), "sink")
    # One session first: the workers have answered a request, so they have closed what
    # they inherited from the fork, and the footprint the cases compare is the idle one.
    fe = RawFrontend.connect(dev.socket_path)
    fe.handshake()
    fe.close()
    dev.wait_for_log("front-end gone")
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def case(device: DeviceProcess) -> Iterator[Case]:
    before = footprint(device)
    c = Case(device)
    c.negotiate(protocol=SLOTS)
    try:
        yield c
    finally:
        c.close()
    c.log("front-end gone")
    assert device.alive(), device.stderr()
    assert settled(device, before) == before, "fds or mappings leaked"
    assert "Traceback" not in device.stderr()


def test_get_max_mem_slots_is_the_documented_limit(case):
    case.fe.send(R.GET_MAX_MEM_SLOTS)
    assert case.fe.recv_u64(R.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS > 8
    case.fe.send(R.GET_PROTOCOL_FEATURES)
    assert case.fe.recv_u64(R.GET_PROTOCOL_FEATURES) & SLOTS


def test_twelve_regions_one_at_a_time_then_unmapped(case):
    before = footprint(case.dev)
    for i in range(REGIONS):
        assert add(case, i * MEM_SIZE, MEM_SIZE, UVA + i * MEM_SIZE, case.memfd()) == 0
    assert [m for _f, m in footprint(case.dev)] == [m + REGIONS for _f, m in before]
    for i in range(0, REGIONS, 2):
        assert rem(case, i * MEM_SIZE, MEM_SIZE, UVA + i * MEM_SIZE) == 0
    assert [m for _f, m in footprint(case.dev)] == [m + REGIONS // 2 for _f, m in before]


@pytest.mark.parametrize(("region", "why"), [
    ((MEM_SIZE // 2, MEM_SIZE, UVA + 4 * MEM_SIZE, 0), "overlaps MemoryRegion(gpa=0x0"),
    ((4 * MEM_SIZE, MEM_SIZE, UVA + MEM_SIZE // 2, 0), "in front-end addresses"),
    ((4 * MEM_SIZE, 2 * MEM_SIZE, UVA + 4 * MEM_SIZE, 0), "past the end of its file"),
    ((4 * MEM_SIZE, MEM_SIZE, UVA + 4 * MEM_SIZE, MEM_SIZE), "past the end of its file"),
    ((4 * MEM_SIZE + 512, MEM_SIZE // 2, UVA + 4 * MEM_SIZE, 0), "gpa 0x400200 is not aligned"),
    ((4 * MEM_SIZE, MEM_SIZE // 2, UVA + 4 * MEM_SIZE + 8, 0), "is not aligned"),
    ((4 * MEM_SIZE, MEM_SIZE // 2, UVA + 4 * MEM_SIZE, 100), "mmap_offset 0x64 is not aligned"),
    ((4 * MEM_SIZE, 0, UVA + 4 * MEM_SIZE, 0), "size 0 is not positive"),
    (((1 << 64) - PAGE, 2 * PAGE, UVA + 4 * MEM_SIZE, 0), "leaves the u64 address space"),
], ids=["gpa-overlap", "uva-overlap", "oversize", "offset-past-file", "unaligned-gpa",
        "unaligned-uva", "unaligned-offset", "zero-size", "gpa-wraps"])  # fmt: skip
def test_bad_region_is_refused_by_name(case, region, why):
    assert add(case, 0, MEM_SIZE, UVA, case.memfd()) == 0
    mid = footprint(case.dev)
    gpa, size, uva, offset = region
    assert add(case, gpa, size, uva, case.memfd(), offset) != 0
    case.log(why)
    assert footprint(case.dev) == mid  # nothing half-mapped, in no process
    case.still_in_step()


@pytest.mark.parametrize("kind", ["eventfd", "pipe"])
def test_region_fd_that_cannot_be_mapped(case, kind):
    if kind == "eventfd":
        fd = case.eventfd()
    else:
        fd, w = os.pipe()
        case.fds += [fd, w]
    assert add(case, 0, MEM_SIZE, UVA, fd) != 0
    case.log("region at gpa 0x0")
    case.still_in_step()


def test_add_without_its_fd_is_refused(case):
    payload = SingleMemoryRegion(MemoryRegionDesc(0, MEM_SIZE, UVA, 0)).pack()
    case.fe.send_header(R.ADD_MEM_REG, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK, payload)
    assert case.ack(R.ADD_MEM_REG) != 0
    case.log("expected 1 fds")
    case.still_in_step()


def test_remove_of_an_unknown_region(case):
    assert rem(case, 0, MEM_SIZE, UVA) != 0
    case.log("no region at gpa 0x0 size 0x100000")
    assert add(case, 0, MEM_SIZE, UVA, case.memfd()) == 0
    for wrong in ((0, MEM_SIZE // 2, UVA), (0, MEM_SIZE, UVA + PAGE), (PAGE, MEM_SIZE, UVA)):
        assert rem(case, *wrong) != 0  # REM names a region by all three
    case.log("mapped: MemoryRegion(gpa=0x0, size=0x100000")
    case.still_in_step()


def test_add_without_the_protocol_feature_is_refused(device):
    c = Case(device)
    try:
        c.negotiate()  # REPLY_ACK only
        fd = c.memfd()
        assert add(c, 0, MEM_SIZE, UVA, fd) != 0
        c.log("without VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS negotiated")
        c.still_in_step()
    finally:
        c.close()


# -- the limit, in-process -----------------------------------------------------------------


def _msg(request: R, payload, fds=()) -> Message:
    flags = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK
    return Message(request, flags, payload, tuple(fds))


def test_slots_past_the_limit_are_refused():
    s = local_session()
    fd = os.memfd_create("slots")
    os.ftruncate(fd, PAGE)
    try:
        s.handle(_msg(R.SET_PROTOCOL_FEATURES, U64(SLOTS)))
        for i in range(MAX_MEM_SLOTS + 1):
            region = SingleMemoryRegion(MemoryRegionDesc(i * PAGE, PAGE, UVA + i * PAGE, 0))
            answer = s.handle(_msg(R.ADD_MEM_REG, region, [os.dup(fd)]))
            assert answer is not None and answer.flags & VHOST_USER_REPLY_MASK
            assert (answer.payload.value == 0) == (i < MAX_MEM_SLOTS), i
        assert s.memory is not None and len(s.memory) == MAX_MEM_SLOTS
        mem = s.memory.memory
        for i in (0, 1, 255, MAX_MEM_SLOTS - 1):  # the lookup finds each of the 509
            mem.write(i * PAGE + 8, i.to_bytes(2, "little"))
            assert mem.read(i * PAGE + 8, 2) == i.to_bytes(2, "little")
    finally:
        s.close()
        os.close(fd)


def test_closing_the_connection_unmaps_every_region(device):
    before = footprint(device)
    c = Case(device)
    c.negotiate(protocol=SLOTS)
    for i in range(REGIONS):
        assert add(c, i * MEM_SIZE, MEM_SIZE, UVA + i * MEM_SIZE, c.memfd()) == 0
    assert settled(device, before, timeout=0) != before
    c.close()
    c.log("front-end gone")
    assert settled(device, before) == before


def test_the_same_region_added_twice_is_counted_not_mapped_twice(case):
    """QEMU 7.2 sends each ADD_MEM_REG once per queue pair (and as many REM_MEM_REG):
    the region is mapped once and unmapped with its last removal."""
    before = footprint(case.dev)
    fd = case.memfd()
    assert add(case, 0, MEM_SIZE, UVA, fd) == 0
    again = os.dup(fd)  # another fd of the same file, as each QEMU message carries
    case.fds.append(again)
    assert add(case, 0, MEM_SIZE, UVA, again) == 0
    case.log("added again (2 references)")
    assert [m for _f, m in footprint(case.dev)] == [m + 1 for _f, m in before]
    assert add(case, 0, MEM_SIZE, UVA, case.memfd()) != 0  # same addresses, another file
    case.log("overlaps MemoryRegion(gpa=0x0")
    assert rem(case, 0, MEM_SIZE, UVA) == 0
    assert [m for _f, m in footprint(case.dev)] == [m + 1 for _f, m in before]
    assert rem(case, 0, MEM_SIZE, UVA) == 0
    assert [m for _f, m in footprint(case.dev)] == [m for _f, m in before]
    assert rem(case, 0, MEM_SIZE, UVA) != 0
