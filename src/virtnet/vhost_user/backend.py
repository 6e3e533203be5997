"""``virtnet device``: a vhost-user back-end running the virtnet device.

``BackendSession`` is one front-end connection's state (features, memory
table, vrings); it turns requests into replies and tells when the device
may run. ``DeviceServer`` owns the listening socket and the event loop: the
front-end's socket, the rings' kick eventfds and the traffic back-end's fd,
and it signals the call eventfds when the device's rings want it.

Ring life cycle (vhost-user.rst "Starting and stopping rings"): a ring
starts when its kick fd arrives, runs while enabled (rings start disabled
when PROTOCOL_FEATURES is negotiated, until SET_VRING_ENABLE), and stops on
GET_VRING_BASE, which reports where the device stopped.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol, TypeVar, cast

from virtnet.net.announce import mac_of_rarp, rarp_frame
from virtnet.net.features import (
    OFFERED,
    NetConfig,
    VirtioNetF,
    missing_requirements,
    names,
    sanitize,
)
from virtnet.net.mq import sum_stats
from virtnet.vhost_user import workermsg
from virtnet.vhost_user.backoff import Backoff, dial
from virtnet.vhost_user.channel import Channel, PeerClosed
from virtnet.vhost_user.errors import VhostUserProtocolError
from virtnet.vhost_user.inflightmap import MappedInflight, make_inflight_fd
from virtnet.vhost_user.local import LocalSet
from virtnet.vhost_user.logmap import check_log
from virtnet.vhost_user.mapping import (
    MAX_MEM_SLOTS,
    MappedMemory,
    MappingError,
    close_maps,
    seal_shrink,
)
from virtnet.vhost_user.messages import (
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    InflightDesc,
    LogDesc,
    MemoryTable,
    Message,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    ack,
    close_fds,
    needs_reply,
    rejection_ack,
    reply,
    spec_name,
)
from virtnet.vhost_user.messages import (
    FrontendRequest as Req,
)
from virtnet.vhost_user.polling import IDLE_POLL, look_at_epoll
from virtnet.vhost_user.rings import RingError, RingSpec, pair_views, ring_views
from virtnet.vhost_user.runclock import RunClock
from virtnet.vhost_user.worker import (
    PairHandle,
    PairServer,
    WorkerDied,
    WorkerError,
    WorkerSet,
    pair_totals,
)
from virtnet.virtio.errors import MemoryAccessError
from virtnet.virtio.features import DeviceStatus, VirtioF, bit
from virtnet.virtio.ring.layout import (
    PackedViews,
    VringViews,
    check_packed_queue_size,
    check_queue_size,
)

log = logging.getLogger("virtnet.device")

T = TypeVar("T")

NUM_QUEUES = 2  # vrings of one pair: 0 = receiveq1 (device → driver), 1 = transmitq1
MAX_QUEUE_PAIRS = 64  # --queues: far past the cores that could serve them
# VHOST_F_LOG_ALL: dirty logging for live migration (vhost-user.rst "Migration").
BACKEND_FEATURES = OFFERED | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL)
PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.LOG_SHMFD)
    | bit(ProtocolFeature.RARP)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.NET_MTU)
    | bit(ProtocolFeature.RESET_DEVICE)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.STATUS)
    | bit(ProtocolFeature.INFLIGHT_SHMFD)
)
# Offered on request only (`virtnet device --config-space`): QEMU's vhost_user_backend_init
# warns "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not" for
# every back-end offering it to a device without config ops, virtio-net among them, and
# GET_PROTOCOL_FEATURES comes before anything that would tell QEMU from another front-end.
CONFIG_PROTOCOL = bit(ProtocolFeature.CONFIG)
STATUS_BITS = 0xFF  # VIRTIO 1.2, 2.1: the device status field is one byte
CONNECT_TIMEOUT = 5.0  # one connect(): a listener whose backlog is full holds it
SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path)


def status_names(status: int) -> str:
    """``ACKNOWLEDGE DRIVER FEATURES_OK DRIVER_OK``: the bits of a device status."""
    return " ".join(str(f.name) for f in DeviceStatus if status & f) or "0"


def offered_features(queues: int) -> int:
    """What ``virtnet device --queues N`` offers: with more than one pair, MQ and the
    CTRL_VQ it needs. The control queue is the front-end's to serve (QEMU's virtio-net,
    DPDK's virtio_user shadow queue): it tells us the pairs in use by SET_VRING_ENABLE.
    GUEST_ANNOUNCE rides on it: after a migration QEMU asks the guest to announce
    itself (VIRTIO_NET_S_ANNOUNCE, acked by CTRL_ANNOUNCE_ACK) instead of SEND_RARP."""
    if queues > 1:
        return (BACKEND_FEATURES | bit(VirtioNetF.MQ) | bit(VirtioNetF.CTRL_VQ)
                | bit(VirtioNetF.GUEST_ANNOUNCE))  # fmt: skip
    return BACKEND_FEATURES


ACCEPT_DRAIN = 64  # messages of the connected front-end read before a new one is judged


def _readable(fd: int) -> bool:
    """Whether ``fd`` has data or a hang-up to read now (poll, no wait)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


class RequestRefused(Exception):
    """A request this back-end refuses; the text names the request and the field."""


@dataclass
class Vring:
    """What the front-end told us about one ring."""

    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick: int = -1
    call: int = -1
    err: int = -1
    enabled: bool = False
    started: bool = False

    def close_fds(self) -> None:
        close_fds(fd for fd in (self.kick, self.call, self.err) if fd >= 0)
        self.kick = self.call = self.err = -1


@dataclass
class BackendSession:
    """One front-end connection: negotiation, memory, vrings; the queue pairs it
    describes run where ``runner`` runs them (it never touches a packet itself)."""

    runner: PairRunner  # where the pairs run: DevicePairs over workers or in process
    config: NetConfig = field(default_factory=NetConfig)
    offered: int = BACKEND_FEATURES  # less what `virtnet device --features-off` names
    features: int = 0
    protocol_features: int = 0
    memory: MappedMemory | None = None
    queues: int = 1  # queue pairs: vrings 2p (receiveq p + 1) and 2p + 1 (transmitq p + 1)
    vrings: list[Vring] = field(default_factory=list)
    running: set[int] = field(default_factory=set)  # the queue pairs started
    owner: bool = False
    log_set: bool = False  # a log was given (SET_LOG_BASE): logging can start
    protocol_offered: int = PROTOCOL_FEATURES  # | CONFIG_PROTOCOL with --config-space
    status: int = 0  # the device status the front-end set (PROTOCOL_F_STATUS)
    features_refused: str = ""  # why the last SET_FEATURES was refused: FEATURES_OK stays off
    mem_tables: int = 0  # SET_MEM_TABLEs / ADD_MEM_REGs taken: with none, cut short
    inflight: MappedInflight | None = None  # SET_INFLIGHT_FD's region, to clear at a reset

    def __post_init__(self) -> None:
        self.vrings = [Vring() for _ in range(2 * self.queues)]
        self.config.max_virtqueue_pairs = self.queues

    # -- dispatch -------------------------------------------------------------

    def handle(self, msg: Message) -> Message | None:
        """Apply one request; the reply to send, if one is owed."""
        request = msg.request
        # A FrontendRequest (an IntEnum) names its handler; a bare number has none.
        name = request.name.lower() if isinstance(request, IntEnum) else ""
        handler = getattr(self, "_" + name, None) if name else None
        try:
            if handler is None:
                close_fds(msg.fds)
                raise RequestRefused(f"{spec_name(msg.request)} is not supported")
            result = handler(msg)
        except (RequestRefused, MappingError, MemoryAccessError, ValueError, WorkerError) as e:
            if msg.request is Req.SET_FEATURES and not needs_reply(msg):
                # QEMU sends it without NEED_REPLY: it cannot learn of the refusal, and a
                # device on other features than the driver's is a silently broken link.
                # Hang up (DPDK's vhost does the same for a failed request without reply).
                raise VhostUserProtocolError(
                    f"{spec_name(msg.request)}: {e} (refused without a reply asked for: "
                    "closing the connection)",
                    framing_intact=False,
                ) from None
            log.error("%s: %s", spec_name(msg.request), e)
            if needs_reply(msg):
                try:
                    return ack(msg, ok=False)
                except ValueError:
                    raise VhostUserProtocolError(
                        f"{spec_name(msg.request)} failed and its reply carries data: {e}",
                        framing_intact=False,
                    ) from None
            return None
        if isinstance(result, Message):
            return result
        return ack(msg) if msg.need_reply else None

    # -- features -------------------------------------------------------------

    def _get_features(self, msg: Message) -> Message:
        return reply(msg, U64(self.offered))

    def _set_features(self, msg: Message) -> None:
        try:
            self._take_features(msg.payload_as(U64).value)
        except RequestRefused as e:
            self.features_refused = str(e)
            raise
        self.features_refused = ""

    def _take_features(self, wanted: int) -> None:
        extra = wanted & ~self.offered
        if extra:
            raise RequestRefused(f"features {' '.join(names(extra))} were never offered")
        if not wanted & (bit(VirtioF.VERSION_1) | bit(VirtioNetF.MRG_RXBUF)):
            # 5.1.6: only a legacy driver without MRG_RXBUF uses the 10-byte header
            # (QEMU disable-modern=on,mrg_rxbuf=off); the data path is 12 bytes throughout.
            raise RequestRefused(
                "a legacy driver (no VERSION_1) without MRG_RXBUF needs the 10-byte "
                "virtio_net_hdr, which this device does not implement: use mrg_rxbuf=on "
                "or the modern interface (QEMU disable-modern=off)"
            )
        # The control queue is the front-end's (QEMU's virtio-net, DPDK virtio_user's shadow
        # cvq), and both leave CTRL_VQ out of SET_FEATURES ("devices do not really need to
        # know"): MQ acked without it is no orphan here.
        cvq = self.offered & bit(VirtioNetF.CTRL_VQ) & ~wanted
        problems = missing_requirements(wanted | cvq)
        if problems:
            # VIRTIO 1.2, 5.1.3.1: a driver MUST NOT accept these, yet Linux does (QEMU's
            # csum=off leaves guest_tso6 on) and QEMU never reads this reply, so a refusal
            # would run the device on stale features. Act as if the orphans were off.
            log.warning("features lack requirements, ignored: %s", "; ".join(problems))
            wanted = sanitize(wanted | cvq) & ~cvq
        if wanted & bit(VHOST_F_LOG_ALL) and not self.log_set:
            # QEMU sends SET_LOG_BASE first (vhost_dev_set_log); without a log there is
            # nowhere to log to, and a guest migrated so would arrive corrupted.
            log.warning("VHOST_F_LOG_ALL acked before SET_LOG_BASE: nothing is logged "
                        "until a log arrives")  # fmt: skip
        self.features = wanted
        if not wanted & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            for vr in self.vrings:  # "rings are enabled immediately"
                vr.enabled = True
        log.info("features %#x: %s%s", wanted, " ".join(names(wanted)),
                 " (dirty logging on)" if self.logging else "")  # fmt: skip
        if wanted:
            # Before the reply: QEMU acks VHOST_F_LOG_ALL with NEED_REPLY and copies guest
            # memory once the ack is in, so every pair must be logging by then.
            self.runner.features(wanted)
        self._update_device()

    @property
    def logging(self) -> bool:
        """VHOST_F_LOG_ALL negotiated: every guest page the device writes is logged."""
        return bool(self.features & bit(VHOST_F_LOG_ALL))

    def _get_protocol_features(self, msg: Message) -> Message:
        return reply(msg, U64(self.protocol_offered))

    def _set_protocol_features(self, msg: Message) -> None:
        value = msg.payload_as(U64).value
        extra = value & ~self.protocol_offered
        if extra:
            hint = ""
            if extra & CONFIG_PROTOCOL:
                hint = " (CONFIG: virtnet device --config-space offers it)"
            raise RequestRefused(f"protocol features {extra:#x} not offered{hint}")
        self.protocol_features = value
        log.info("protocol features: %#x (%s)", value,
                 " ".join(str(f.name) for f in ProtocolFeature if value >> f & 1))  # fmt: skip

    # -- device status (PROTOCOL_F_STATUS) ------------------------------------

    def _set_status(self, msg: Message) -> None:
        # QEMU (vhost_user_add_status) sets FEATURES_OK alone after SET_FEATURES, then
        # ACKNOWLEDGE | DRIVER | DRIVER_OK at start; DPDK's virtio_user walks 3.1.1 in
        # order. The device records what it is told and checks only what is its to
        # check: FEATURES_OK on features it refused stays clear (3.1.1 step 6: the driver
        # re-reads the status to learn that), as DPDK's vhost_user_set_status does.
        value = msg.payload_as(U64).value
        if value & ~STATUS_BITS:
            raise RequestRefused(f"device status {value:#x} is wider than the status byte")
        if value == 0:
            self._reset_status()
            return
        status = DeviceStatus(value)
        if status & DeviceStatus.FEATURES_OK and not self.status & DeviceStatus.FEATURES_OK:
            why = self._features_problem()
            if why:
                log.error("FEATURES_OK refused: %s", why)
                status &= ~DeviceStatus.FEATURES_OK
        if status & DeviceStatus.FAILED and not self.status & DeviceStatus.FAILED:
            log.warning("the driver set FAILED: it gave up on this device")
        self.status = int(status)
        log.info("device status %#x: %s", self.status, status_names(self.status))

    def _features_problem(self) -> str:
        if self.features_refused:
            return f"SET_FEATURES was refused ({self.features_refused})"
        if not self.features:
            return "no SET_FEATURES before it"
        return ""

    def _get_status(self, msg: Message) -> Message:
        return reply(msg, U64(self.status))

    def _reset_status(self) -> None:
        """Status 0, a device reset (VIRTIO 1.2, 2.4): every ring stops, and nothing runs
        on until the front-end starts it again with new kick fds and SET_VRING_BASE.
        Where each ring stopped is kept for GET_VRING_BASE: QEMU 7.2 sends SET_STATUS 0
        before it (vhost_user_dev_start; seen with 7.2.22), and resumes a VM that was only
        paused at the index it reads there."""
        self._stop_device()
        for vr in self.vrings:
            vr.started = False
            vr.close_fds()
        self.status = 0
        self._clear_inflight()
        log.info("device status 0: device reset, rings stopped")

    def _get_queue_num(self, msg: Message) -> Message:
        return reply(msg, U64(self.queues))  # queue *pairs*, as QEMU's net reads it

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        self.reset()

    def _reset_device(self, msg: Message) -> None:
        self.reset()

    def _net_set_mtu(self, msg: Message) -> None:
        mtu = msg.payload_as(U64).value
        if not 68 <= mtu <= 65535:
            raise RequestRefused(f"MTU {mtu} outside 68..65535")
        self.config.mtu = mtu

    def _get_config(self, msg: Message) -> Message:
        space = self.config.pack().ljust(256, b"\0")
        req = msg.payload_as(ConfigSpace)
        if req.offset + req.size > len(space):
            raise RequestRefused(f"config offset {req.offset} + size {req.size} > {len(space)}")
        data = space[req.offset : req.offset + req.size]
        return reply(msg, ConfigSpace(req.offset, req.flags, data))

    def _set_config(self, msg: Message) -> None:
        raise RequestRefused("the virtio-net config space is read-only here")

    def _set_log_base(self, msg: Message) -> Message:
        """vhost-user.rst "Migration": the log memfd, checked against its file, mapped
        by every worker; the reply is the u64 status QEMU waits for."""
        fds = list(msg.fds)
        try:
            if not self.protocol_features & bit(ProtocolFeature.LOG_SHMFD):
                raise RequestRefused("SET_LOG_BASE without PROTOCOL_F_LOG_SHMFD negotiated "
                                     "(the log must come as a memfd)")  # fmt: skip
            if len(fds) != 1:
                raise RequestRefused(f"SET_LOG_BASE with {len(fds)} fds: the log memfd "
                                     "is needed")  # fmt: skip
            desc = msg.payload_as(LogDesc)
            why = seal_shrink(fds[0])
            check_log(fds[0], desc.mmap_size, desc.mmap_offset)
            self.runner.set_log(desc.mmap_size, desc.mmap_offset, fds)
        finally:
            close_fds(fds)
        self.log_set = True
        if why is not None:
            log.warning("dirty log: %s: a front-end that shrinks it kills a worker", why)
        log.info("dirty log: %d bytes at offset %#x (%d MiB of guest memory)",
                 desc.mmap_size, desc.mmap_offset, desc.mmap_size * 8 * 4096 >> 20)  # fmt: skip
        return ack(msg)

    def _set_log_fd(self, msg: Message) -> None:
        # An eventfd to signal after logging (kernel vhost's log_ctx); QEMU never sends it
        # and nothing here waits for it: taken and closed, as DPDK does.
        close_fds(msg.fds)

    def _send_rarp(self, msg: Message) -> None:
        if not self.protocol_features & bit(ProtocolFeature.RARP):
            raise RequestRefused("SEND_RARP without PROTOCOL_F_RARP negotiated")
        mac = mac_of_rarp(msg.payload_as(U64).value)
        sent = self.runner.send_rarp(rarp_frame(mac))
        log.info("SEND_RARP: RARP for %s %s", mac.hex(":"),
                 "sent out of the port" if sent else "refused by the port (full)")  # fmt: skip

    def _set_backend_req_fd(self, msg: Message) -> None:
        close_fds(msg.fds)  # no back-end → front-end requests are ever sent

    # -- in-flight tracking (PROTOCOL_F_INFLIGHT_SHMFD) -----------------------

    def _need_inflight(self, msg: Message) -> None:
        if not self.protocol_features & bit(ProtocolFeature.INFLIGHT_SHMFD):
            close_fds(msg.fds)
            raise RequestRefused(f"{spec_name(msg.request)} without "
                                 "VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD negotiated")  # fmt: skip

    def _get_inflight_fd(self, msg: Message) -> Message:
        """A zeroed region for the front-end to keep; this session uses it at once, as
        libvhost-user and DPDK do (QEMU sends it back with SET_INFLIGHT_FD anyway)."""
        self._need_inflight(msg)
        req = msg.payload_as(InflightDesc)
        if req.num_queues != len(self.vrings):
            log.warning("GET_INFLIGHT_FD for %d queues; this device has %d vrings",
                        req.num_queues, len(self.vrings))  # fmt: skip
        try:
            fd, size = make_inflight_fd(req.num_queues, req.queue_size, self.packed)
        except (OSError, ValueError) as e:
            raise RequestRefused(f"GET_INFLIGHT_FD: {e}") from None
        try:
            self._map_inflight(InflightDesc(size, 0, req.num_queues, req.queue_size), fd)
        except BaseException:
            os.close(fd)
            raise
        log.info("in-flight region made: %d %s queues of %d descriptors, %d bytes",
                 req.num_queues, "packed" if self.packed else "split", req.queue_size,
                 size)  # fmt: skip
        return reply(msg, InflightDesc(size, 0, req.num_queues, req.queue_size), [fd])

    def _set_inflight_fd(self, msg: Message) -> None:
        self._need_inflight(msg)
        desc = msg.payload_as(InflightDesc)
        try:
            self._map_inflight(desc, msg.fds[0])
        finally:
            close_fds(msg.fds)
        log.info("in-flight region: %d queues of %d descriptors, %d bytes at offset %#x",
                 desc.num_queues, desc.queue_size, desc.mmap_size, desc.mmap_offset)  # fmt: skip

    def _map_inflight(self, desc: InflightDesc, fd: int) -> None:
        """Check the region here, then hand it to every pair; rings started after this
        track their chains in it (running ones keep the region they started with)."""
        mapped = MappedInflight(fd, desc.mmap_size, desc.mmap_offset, desc.num_queues,
                                desc.queue_size, self.packed)  # fmt: skip
        if mapped.unsealed is not None:
            log.warning("in-flight region: %s: a front-end that shrinks it kills a worker",
                        mapped.unsealed)  # fmt: skip
        self.runner.set_inflight(desc, fd, self.packed)
        close_maps(self.inflight)
        self.inflight = mapped

    def _clear_inflight(self) -> None:
        """A device reset: the chains it took are owed to nobody now (VIRTIO 1.2, 2.4),
        and a restart must not resubmit them into the rings the driver sets up afresh."""
        if self.inflight is not None:
            self.inflight.clear()

    # -- memory ---------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        table = msg.payload_as(MemoryTable)
        self._stop_device()
        close_maps(self.memory)
        memory = MappedMemory()
        try:
            for region, fd in zip(table.regions, msg.fds, strict=True):
                memory.add(fd, region.guest_phys_addr, region.memory_size,
                           region.userspace_addr, region.mmap_offset)  # fmt: skip
            # each pair maps it too: it is their loops that touch it
            self.runner.set_memory([(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                     r.mmap_offset) for r in table.regions],
                                   list(msg.fds))  # fmt: skip
        except Exception:
            memory.close()
            self.memory = None
            raise
        finally:
            close_fds(msg.fds)  # the mappings keep the memory
        self.memory = memory
        self.mem_tables += 1
        for why in memory.unsealed:
            log.warning("%s: a front-end that shrinks it can crash this process", why)
        log.info("memory table: %s", ", ".join(
            f"gpa {r.guest_phys_addr:#x}+{r.memory_size:#x}" for r in table.regions))  # fmt: skip
        self._update_device()

    # Memory slots (PROTOCOL_F_CONFIGURE_MEM_SLOTS): one region at a time, at any time.
    # QEMU then sends every table change so, the first one included, and waits for
    # each REPLY_ACK; a worker maps (or unmaps) before the control process replies.

    def _need_mem_slots(self, msg: Message) -> None:
        if not self.protocol_features & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            close_fds(msg.fds)
            raise RequestRefused(
                f"{spec_name(msg.request)} without "
                "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS negotiated"
            )

    def _get_max_mem_slots(self, msg: Message) -> Message:
        return reply(msg, U64(MAX_MEM_SLOTS))

    def _add_mem_reg(self, msg: Message) -> None:
        self._need_mem_slots(msg)
        r = msg.payload_as(SingleMemoryRegion).region
        region = (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        memory = self.memory if self.memory is not None else MappedMemory()
        unsealed = len(memory.unsealed)
        try:
            memory.add(msg.fds[0], *region)
            try:
                self.runner.add_region(region, msg.fds[0])
            except Exception:
                memory.remove(*region[:3])
                raise
        finally:
            close_fds(msg.fds)  # the mappings keep the memory
        self.memory = memory
        self.mem_tables += 1  # memory by memory slots counts as a table for _disconnect
        for why in memory.unsealed[unsealed:]:
            log.warning("%s: a front-end that shrinks it can crash this process", why)
        refs = memory.refs(r.guest_phys_addr)
        if refs > 1:  # QEMU < 8.0: once per queue pair (MappedMemory.add)
            log.info("memory region gpa %#x+%#x added again (%d references)",
                     r.guest_phys_addr, r.memory_size, refs)  # fmt: skip
        else:
            log.info("memory region added: gpa %#x+%#x (%d mapped)", r.guest_phys_addr,
                     r.memory_size, len(memory))  # fmt: skip
        self._update_device()

    def _rem_mem_reg(self, msg: Message) -> None:
        close_fds(msg.fds)  # QEMU sends the region's fd along: "MUST close it"
        self._need_mem_slots(msg)
        r = msg.payload_as(SingleMemoryRegion).region
        gpa, size, uva = r.guest_phys_addr, r.memory_size, r.userspace_addr
        if self.memory is None or self.memory.memory.find_region(gpa, size, uva) is None:
            mapped = ", ".join(map(repr, self.memory.memory.regions)) if self.memory else ""
            raise RequestRefused(f"no region at gpa {gpa:#x} size {size:#x} uva {uva:#x} "
                                 f"(mapped: {mapped or 'none'})")  # fmt: skip
        if self.memory.refs(gpa) == 1:  # this removal unmaps it
            self._check_unused(gpa, size, uva)
        self.runner.rem_region((gpa, size, uva))
        self.memory.remove(gpa, size, uva)
        refs = self.memory.refs(gpa)
        if refs:
            log.info("memory region gpa %#x+%#x released (%d references left)", gpa, size, refs)
        else:
            log.info("memory region removed: gpa %#x+%#x (%d mapped)", gpa, size,
                     len(self.memory))  # fmt: skip

    def _check_unused(self, gpa: int, size: int, uva: int) -> None:
        """Refuse to unmap a region a running ring lies in: the device would lose its
        ring mid-burst (vhost-user.rst leaves it to the front-end never to do so;
        QEMU only removes memory the guest has offlined)."""
        for pair in sorted(self.running):
            for index in (2 * pair, 2 * pair + 1):
                addr = self.vrings[index].addr
                if addr is None:
                    continue
                for name, at in (("descriptor table", addr.desc_user_addr),
                                 ("available ring", addr.avail_user_addr),
                                 ("used ring", addr.used_user_addr)):  # fmt: skip
                    if uva <= at < uva + size:
                        raise RequestRefused(
                            f"region at gpa {gpa:#x} size {size:#x} is in use: vring {index}'s "
                            f"{name} (uva {at:#x}) lies in it while queue pair {pair} runs")

    # -- vrings ---------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestRefused(
                f"vring index {index} out of range (this device has {len(self.vrings)}: "
                f"{self.queues} queue pair{'s' if self.queues > 1 else ''})"
            )
        return self.vrings[index]

    def _set_vring_num(self, msg: Message) -> None:
        st = msg.payload_as(VringState)
        vr = self._vring(st.index)
        try:
            (check_packed_queue_size if self.packed else check_queue_size)(st.num)
        except ValueError as e:
            raise RequestRefused(f"vring {st.index}: {e}") from None
        vr.num = st.num

    @property
    def packed(self) -> bool:
        return bool(self.features & bit(VirtioF.RING_PACKED))

    def _set_vring_base(self, msg: Message) -> None:
        # Packed: bits 0-14 the next avail index, bit 15 its wrap counter; bits 16-31
        # (used) are not needed: at a ring's start every buffer was returned, used ==
        # avail (DPDK's vhost reads it the same way). Checked against the size at start.
        st = msg.payload_as(VringState)
        self._vring(st.index).base = st.num & 0xFFFF

    def _set_vring_addr(self, msg: Message) -> None:
        addr = msg.payload_as(VringAddr)
        vr = self._vring(addr.index)
        if self.memory is not None and vr.num:
            self._ring_views(addr.index, vr.num, addr)  # refuse the request that lies, now
        vr.addr = addr
        pair = addr.index // 2
        if pair in self.running:
            # QEMU re-sends a running ring's addresses to set (or clear) VHOST_VRING_F_LOG
            # and log_guest_addr when logging starts (ends): the pair logs by them.
            self.runner.vring_addr(pair, addr.index % 2, addr)

    def _get_vring_base(self, msg: Message) -> Message:
        st = msg.payload_as(VringState)
        vr = self._vring(st.index)
        self._stop_pair(st.index // 2)  # a pair needs both rings; the other restarts with it
        base = vr.base
        if self.packed:
            base |= base << 16  # vhost-user.rst: bits 16-31 the used index and wrap counter
        vr.started = False
        vr.close_fds()
        return reply(msg, VringState(st.index, base))

    def _set_vring_fd(self, msg: Message, attr: str) -> int:
        u64 = msg.payload_as(U64)
        try:
            vr = self._vring(u64.vring_index)
        except RequestRefused:
            close_fds(msg.fds)
            raise
        old = getattr(vr, attr)
        if old >= 0:
            os.close(old)
        fd = -1 if u64.nofd or not msg.fds else msg.fds[0]
        setattr(vr, attr, fd)
        pair = u64.vring_index // 2
        if attr != "err" and pair in self.running:
            self.runner.update_fds(pair, self._pair_fds(pair))  # QEMU re-sends calls live
        return u64.vring_index

    def _set_vring_kick(self, msg: Message) -> None:
        index = self._set_vring_fd(msg, "kick")
        self.vrings[index].started = True  # "a ring starts when it gets its kick fd"
        self._update_device()

    def _set_vring_call(self, msg: Message) -> None:
        self._set_vring_fd(msg, "call")

    def _set_vring_err(self, msg: Message) -> None:
        self._set_vring_fd(msg, "err")

    def _set_vring_enable(self, msg: Message) -> None:
        st = msg.payload_as(VringState)
        if not self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES) and self.features:
            raise RequestRefused("SET_VRING_ENABLE without PROTOCOL_FEATURES negotiated")
        vr = self._vring(st.index)
        if st.num and (vr.num == 0 or vr.addr is None) and self.memory is not None:
            # QEMU enables only rings it set up; a front-end that enables one it never
            # described would wait forever on a pair that cannot start: say so.
            log.warning("vring %d enabled before its size and addresses were set: it "
                        "starts once they are", st.index)  # fmt: skip
        vr.enabled = bool(st.num)
        if not st.num:
            # "a disabled ring ... must not supply any new RX packets, and TX packets
            # are discarded": a pair needs both rings, so it stops until re-enabled
            # (QEMU disables the pairs past the guest's queue count: VQ_PAIRS_SET).
            self._stop_pair(st.index // 2)
        self._update_device()

    # -- the device -----------------------------------------------------------

    def ready(self, pair: int = 0) -> bool:
        return self.memory is not None and all(
            vr.started and vr.enabled and vr.num and vr.addr is not None
            for vr in self.vrings[2 * pair : 2 * pair + 2]
        )

    def _update_device(self) -> None:
        for pair in range(self.queues):
            if pair not in self.running and self.ready(pair):
                self._start_pair(pair)

    def _start_pair(self, pair: int) -> None:
        rx, tx = self.vrings[2 * pair], self.vrings[2 * pair + 1]
        memory = self.memory
        # ready(pair): the memory table and both rings' addresses are in
        assert memory is not None and rx.addr is not None and tx.addr is not None
        described = ((rx.num, rx.addr), (tx.num, tx.addr))
        try:  # a front-end's lie about its rings is refused here, by name
            pair_views(memory.memory, self.packed, pair, described)
        except RingError as e:
            raise RequestRefused(str(e)) from None
        bases = (rx.base, tx.base)
        kick_rx, call_rx, kick_tx, call_tx = self._pair_fds(pair)
        fd_mask = (kick_rx >= 0, call_rx >= 0, kick_tx >= 0, call_tx >= 0)
        spec = RingSpec(pair, self.features, self.config.mtu, described, bases, fd_mask)
        self.runner.start(pair, spec, [fd for fd in self._pair_fds(pair) if fd >= 0])
        self.running.add(pair)
        log.info("device running: queue pair %d, queue sizes %d/%d, bases %s",
                 pair, rx.num, tx.num, bases)  # fmt: skip

    def _pair_fds(self, pair: int) -> tuple[int, int, int, int]:
        rx, tx = self.vrings[2 * pair], self.vrings[2 * pair + 1]
        return rx.kick, rx.call, tx.kick, tx.call

    def _ring_views(self, index: int, num: int, addr: VringAddr) -> VringViews | PackedViews:
        assert self.memory is not None  # the caller checks: views need the memory table
        try:
            return ring_views(self.memory.memory, self.packed, index, num, addr)
        except RingError as e:
            raise RequestRefused(str(e)) from None

    def _stop_pair(self, pair: int) -> None:
        if pair not in self.running:
            return
        self.running.discard(pair)
        bases = self.runner.stop(pair)
        if bases is not None:
            self.vrings[2 * pair].base, self.vrings[2 * pair + 1].base = bases
        log.info("queue pair %d stopped: bases %s", pair, bases)

    def pair_lost(self, pair: int) -> None:
        """The pair's worker died: its rings are not running, and nothing can say where
        they stopped."""
        self.running.discard(pair)

    def _stop_device(self) -> None:
        for pair in sorted(self.running):
            self._stop_pair(pair)

    def reset(self) -> None:
        self._forget_rings()
        self._clear_inflight()

    def _forget_rings(self) -> None:
        self._stop_device()
        for vr in self.vrings:
            vr.close_fds()
        self.vrings = [Vring() for _ in range(2 * self.queues)]
        self.features = 0
        self.status = 0

    def close(self) -> None:
        """The connection ended: the in-flight region stays as it is, the front-end's to
        give the next back-end (a crash leaves it so too)."""
        self._forget_rings()
        mapped = self.memory is not None or self.inflight is not None
        close_maps(self.inflight, self.memory)
        self.inflight = self.memory = None
        if mapped:
            self.runner.unmap()


class PairRunner(Protocol):
    """What a session asks of the queue pairs it describes (``DevicePairs``)."""

    def set_memory(self, regions: list[tuple[int, int, int, int]], fds: list[int]) -> None: ...
    def unmap(self) -> None: ...
    def add_region(self, region: tuple[int, int, int, int], fd: int) -> None: ...
    def rem_region(self, region: tuple[int, int, int]) -> None: ...
    def start(self, pair: int, spec: RingSpec, fds: list[int]) -> None: ...
    def update_fds(self, pair: int, fds: tuple[int, int, int, int]) -> None: ...
    def stop(self, pair: int) -> tuple[int, int] | None: ...
    def set_log(self, size: int, offset: int, fds: list[int]) -> None: ...
    def set_inflight(self, desc: InflightDesc, fd: int, packed: bool) -> None: ...
    def vring_addr(self, pair: int, q: int, addr: VringAddr) -> None: ...
    def send_rarp(self, frame: bytes) -> bool: ...
    def features(self, features: int) -> None: ...


class PairLoopFactory(Protocol):
    """What makes queue pair N's loop (``device_loop.PairLoops``), one per pair, and
    closes this process's share of what they use (the back-ends)."""

    def __len__(self) -> int: ...
    def __call__(self, pair: int) -> PairServer: ...
    def close(self) -> None: ...


class DevicePairs:
    """The session's ``PairRunner``: each request to the loop of the pair it names,
    or to every pair, wherever ``workers`` runs them (processes or this one). A pair
    that refuses makes the session's request refused, naming the pair."""

    def __init__(self, workers: WorkerSet) -> None:
        self.workers = workers

    def set_memory(self, regions: list[tuple[int, int, int, int]], fds: list[int]) -> None:
        self._call_every(workermsg.Memory(tuple(regions)), fds)

    def add_region(self, region: tuple[int, int, int, int], fd: int) -> None:
        """Every pair maps it, or none keeps it."""
        done: list[PairHandle] = []
        try:
            for w in self.workers:
                self._call(w, workermsg.AddRegion(region), fds=[fd])
                done.append(w)
        except RequestRefused:
            for w in done:
                self._call(w, workermsg.RemRegion(region[:3]))
            raise

    def rem_region(self, region: tuple[int, int, int]) -> None:
        self._call_every(workermsg.RemRegion(region))

    def unmap(self) -> None:
        for w in self.workers:
            if w.status is None:
                self._call(w, workermsg.Unmap())

    def start(self, pair: int, spec: RingSpec, fds: list[int]) -> None:
        self._call(self.workers[pair], workermsg.Start(spec), fds=fds)

    def update_fds(self, pair: int, fds: tuple[int, int, int, int]) -> None:
        mask = (fds[0] >= 0, fds[1] >= 0, fds[2] >= 0, fds[3] >= 0)
        self._call(self.workers[pair], workermsg.Fds(mask), fds=[fd for fd in fds if fd >= 0])

    def stop(self, pair: int) -> tuple[int, int] | None:
        return self._call(self.workers[pair], workermsg.Stop())

    def set_log(self, size: int, offset: int, fds: list[int]) -> None:
        self._call_every(workermsg.Log(size, offset), fds)  # each pair maps the log itself

    def set_inflight(self, desc: InflightDesc, fd: int, packed: bool) -> None:
        # every pair tracks its rings: each maps the region itself
        self._call_every(workermsg.Inflight(desc.mmap_size, desc.mmap_offset, desc.num_queues,
                                            desc.queue_size, packed), [fd])  # fmt: skip

    def vring_addr(self, pair: int, q: int, addr: VringAddr) -> None:
        self._call(self.workers[pair], workermsg.VringAddrUpdate(q, addr))

    def send_rarp(self, frame: bytes) -> bool:
        return self._call(self.workers[0], workermsg.Rarp(frame))  # queue pair 0's port

    def features(self, features: int) -> None:
        self._call_every(workermsg.Features(features))

    def connect(self) -> None:
        """A new front-end: interrupts held for the old one's rings mean nothing now."""
        self._call_every(workermsg.Connect())

    def _call_every(
        self, request: workermsg.Request[None], fds: list[int] | tuple[int, ...] = ()
    ) -> None:
        """``request`` to each pair in turn (each gets its own copies of ``fds``)."""
        for w in self.workers:
            self._call(w, request, fds=fds)

    @staticmethod
    def _call(
        w: PairHandle, request: workermsg.Request[T], fds: list[int] | tuple[int, ...] = ()
    ) -> T:
        try:
            return w.call(request, fds=fds)
        except WorkerError as e:
            raise RequestRefused(f"queue pair {w.pair}: {e}") from None


class DeviceServer:
    """Listen on ``socket_path`` and run the device for one front-end at a time;
    with ``client``, connect to the front-end listening there instead, and again
    (with backoff) whenever it is not there or its session ends.

    This process keeps the vhost-user session; each queue pair's data path runs
    in a worker process of its own (vhost_user/worker.py), or with ``in_process``
    here (vhost_user/local.py), as ``loops`` makes it (``device_loop.PairLoops``:
    each pair with its own traffic back-end).
    """

    def __init__(
        self,
        socket_path: str,
        loops: PairLoopFactory,
        *,
        printer=None,
        features_off: int = 0,
        client: bool = False,
        config_space: bool = False,
        in_process: bool = False,
    ) -> None:
        self.loops = loops
        self.queues = len(loops)
        if not 1 <= self.queues <= MAX_QUEUE_PAIRS:
            raise ValueError(f"--queues {self.queues}: 1..{MAX_QUEUE_PAIRS} queue pairs")
        self.offered = offered_features(self.queues) & ~features_off
        self.socket_path = socket_path
        self.printer = printer
        self.protocol_offered = PROTOCOL_FEATURES | (CONFIG_PROTOCOL if config_space else 0)
        self.client = client
        self.listener: socket.socket | None = None
        if client and len(os.fsencode(socket_path)) > SUN_PATH_MAX:
            # connect() would refuse it at every try: say so once, now
            raise OSError(f"longer than a unix socket path may be ({SUN_PATH_MAX} bytes)")
        if not client:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._retry = Backoff()  # client mode: when to try the front-end next
        self._waiting_for = ""  # client mode: why the front-end is out of reach, logged once
        self.channel: Channel | None = None
        self.session: BackendSession | None = None
        self.sessions = 0
        self._ep = select.epoll()
        supervisor = LocalSet if in_process else WorkerSet
        self.workers = supervisor(self._ep, log, self._worker_died, self._worker_event)
        self.pairs = DevicePairs(self.workers)
        for pair in range(self.queues):
            self._spawn(pair)
        # The socket appears once every worker runs and this process holds only its
        # own fds: whoever waits for it finds the server as it will serve.
        if self.listener is not None:  # client mode: the socket is the front-end's
            try:
                if os.path.exists(socket_path):
                    os.unlink(socket_path)
                self.listener.bind(socket_path)
                self.listener.listen(1)
            except OSError:
                self.workers.finish(workermsg.Exit())
                self._ep.close()
                self.listener.close()
                raise
            self._ep.register(self.listener.fileno(), select.EPOLLIN)
        self.run_seconds = self.cpu_seconds = 0.0

    # -- workers ----------------------------------------------------------------

    def _spawn(self, pair: int) -> PairHandle:
        return self.workers.start(pair, lambda: self.loops(pair), self._close_in_worker)

    @property
    def worker_deaths(self) -> int:
        return self.workers.deaths

    def _close_in_worker(self) -> None:
        """In a fresh worker: what belongs to the control process alone."""
        self._ep.close()
        if self.listener is not None:
            self.listener.close()
        if self.channel is not None:
            self.channel.close()
        self.workers.close_all()

    def _worker_died(self, e: WorkerDied) -> None:
        """WorkerSet named and reaped it: fail the session (its rings' state died with
        it), start a fresh one."""
        if self.session is not None:
            self.session.pair_lost(e.pair)
        self._spawn(e.pair)
        if self.channel is not None:
            self._disconnect(f"{e}: failing the session (its rings' state is lost)")

    @staticmethod
    def _worker_event(pair: int, why: str) -> None:
        log.warning("queue pair %d: %s", pair, why)  # a device's worker sends none today

    # -- connections ------------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None  # polled only in server mode
        sock, _ = self.listener.accept()
        # A front-end that reconnects at once (QEMU reconnect=, a restart) closed its
        # old socket in the same epoll pass: read that first, so its close is seen
        # before the new one is taken for a second front-end.
        for _ in range(ACCEPT_DRAIN):
            if self.channel is None or not _readable(self.channel.fileno()):
                break
            self._on_socket()
        if self.channel is not None:
            log.warning("refusing a second front-end while one is connected")
            sock.close()
            return
        self._attach(sock)

    def _connect_frontend(self) -> None:
        """Client mode: one try to reach the front-end listening on socket_path (QEMU
        -chardev socket,server=on; DPDK net_virtio_user,server=1; virtnet driver
        --server); when it is not there, the next try after a doubled wait."""
        sock, self._waiting_for = dial(self.socket_path, CONNECT_TIMEOUT, self._retry,
                                       "front-end", self._waiting_for, log)  # fmt: skip
        if sock is None:
            return
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        self.channel = Channel(sock, replies=False)
        self.session = BackendSession(self.pairs, offered=self.offered, queues=self.queues,
                                      protocol_offered=self.protocol_offered)  # fmt: skip
        self.sessions += 1
        self._ep.register(sock.fileno(), select.EPOLLIN)
        log.info("front-end connected (session %d)", self.sessions)
        try:
            self.pairs.connect()
        except WorkerDied as e:
            self.workers.died(e)

    def _disconnect(self, why: str) -> None:
        channel, session = self.channel, self.session
        if session is not None and not session.mem_tables:
            # Connected and gone before any memory: a front-end dying in its start-up,
            # or one that connects in a loop. Named; in client mode the waits between
            # reconnects keep doubling (a session that got memory starts them afresh).
            log.warning("front-end gone before any guest memory (SET_MEM_TABLE or "
                        "ADD_MEM_REG): %s", why)  # fmt: skip
        else:
            log.info("front-end gone: %s", why)
            self._retry.reset()
        if self.client:
            self._retry.later()
        self.channel = self.session = None
        if channel is not None:
            self._ep.unregister(channel.fileno())
            channel.close()
        if session is not None:
            try:
                session.close()
            except WorkerDied as e:
                self.workers.died(e)
            except RequestRefused as e:  # a worker that failed its stop: the session is over
                log.error("closing the session: %s", e)

    def _on_socket(self) -> None:
        messages: list[Message] = []
        assert self.channel is not None  # the loop polls its socket only while connected
        try:
            messages = self.channel.receive()
        except PeerClosed as e:
            self._disconnect(str(e))
            return
        except VhostUserProtocolError as e:
            self._protocol_error(e)
        except OSError as e:
            self._disconnect(f"socket error: {e}")
            return
        # One read may hold several messages, a refused one among them: serve
        # every one the parser still has, in order (the channel raises a refused
        # message only after returning those before it), not just the first batch.
        while self.channel is not None:
            for msg in messages:
                if not self._serve(msg):
                    return
            try:
                messages = self.channel.drain()
            except VhostUserProtocolError as e:
                self._protocol_error(e)
                messages = []
                continue
            if not messages:
                return

    def _reply(self, answer: Message) -> bool:
        """Send a reply; a front-end that hung up meanwhile is a disconnect, not a crash."""
        assert self.channel is not None  # replies go out only while connected
        try:
            self.channel.send(answer)
        except OSError as e:
            self._disconnect(f"cannot reply to {spec_name(answer.request)}: {e}")
            return False
        finally:
            close_fds(answer.fds)  # sent, the front-end's copy is its own (GET_INFLIGHT_FD)
        return True

    def _serve(self, msg: Message) -> bool:
        session = self.session
        assert session is not None  # a connected channel always has its session
        try:
            answer = session.handle(msg)
        except VhostUserProtocolError as e:
            self._protocol_error(e)
            return self.channel is not None
        except WorkerDied as e:
            close_fds(msg.fds)
            self.workers.died(e)
            return False
        return answer is None or self._reply(answer)

    def _protocol_error(self, e: VhostUserProtocolError) -> None:
        log.error("protocol error: %s", e)
        nack = rejection_ack(e)
        if nack is not None and self.channel is not None and not self._reply(nack):
            return
        if not e.framing_intact or nack is None and e.request is not None and needs_reply(
            Message(e.request, e.flags or 1)
        ):
            self._disconnect(f"protocol error: {e}")

    # -- running ----------------------------------------------------------------

    def serve(self, seconds: float = 0) -> dict:
        """Run until ``seconds`` pass (0: until SIGTERM/SIGINT)."""
        started, cpu0 = time.monotonic(), time.process_time()
        final: list[workermsg.Stats] = []
        # The clock's stop signals stay caught through the teardown: a second SIGTERM
        # or ^C while the workers are stopped must not cut it short.
        with RunClock(seconds, self.printer, self.stats) as clock:
            try:
                self._loop(clock)
            finally:
                self.run_seconds = time.monotonic() - started
                self.cpu_seconds = time.process_time() - cpu0
                if self.channel is not None:
                    self._disconnect("stopping")
                final = self.workers.finish(workermsg.Exit())
                self.close()
        return self.stats(final)

    def _loop(self, clock: RunClock) -> None:
        listener = self.listener.fileno() if self.listener is not None else -1
        busy = False
        passes = 0
        while clock.running():
            if self.client and self.channel is None and self._retry.due():
                self._connect_frontend()
            passes += 1
            if look_at_epoll(busy, passes):  # in-process pairs busy: as a worker's loop
                for fd, _ev in self._ep.poll(0.0 if busy else self._poll_timeout()):
                    if fd == listener:
                        self._accept()
                    elif self.channel is not None and fd == self.channel.fileno():
                        self._on_socket()
                    elif self.workers.owns(fd):
                        self.workers.on_ready(fd)
            busy = self.workers.run_passes()  # the pairs that run in this process
            # Every worker must answer: one that hangs is killed, named, its session
            # failed; the answers keep each worker's last counters fresh.
            self.workers.watchdog()

    def _poll_timeout(self) -> float:
        most = IDLE_POLL
        if self.client and self.channel is None:
            most = self._retry.wait(IDLE_POLL)
        return self.workers.poll_timeout(most)

    def stats(self, final: list[workermsg.Stats] | None = None) -> dict:
        """Every queue pair's counters, summed and per queue (``rx_queue_0_packets``...)."""
        per_pair = self.workers.stats() if final is None else final
        out = pair_totals(per_pair, "device_stats", lost=self.workers.lost,
                          workers=not self.workers.in_process)  # fmt: skip
        dirty_log, inflight = (sum_stats([cast(dict, p.get(name, {}))
                                          for p in per_pair + self.workers.lost])
                               for name in ("dirty_log", "inflight"))  # fmt: skip
        return {"device_stats": out["device_stats"], "backend": out["backend"],
                "dirty_log": dirty_log, "inflight": inflight,
                "queues": self.queues, "sessions": self.sessions,
                "worker_deaths": self.worker_deaths,
                "seconds": round(self.run_seconds, 4),
                "cpu_seconds": round(self.cpu_seconds + out["cpu_seconds"], 4),
                "worker_cpu_seconds": out["worker_cpu_seconds"]}  # fmt: skip

    def close(self) -> None:
        self._ep.close()
        if self.listener is not None:  # client mode: the socket is the front-end's
            self.listener.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        self.loops.close()
