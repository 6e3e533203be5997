"""``virtnet driver``: a vhost-user front-end running the virtnet driver.

Like DPDK's virtio_user: the guest memory is a memfd we create and share
with the back-end (SET_MEM_TABLE, or one ADD_MEM_REG per region where the
back-end offers CONFIGURE_MEM_SLOTS; ``--mem-regions N`` makes it N memfds, as
a QEMU guest with DIMMs has), the rings live in it (GuestLayout), and
kicks / interrupts are eventfds. Works against any back-end: a virtnet
device, DPDK's net_vhost, ...
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import select
import socket
import time
from dataclasses import replace
from functools import partial
from typing import Protocol

from virtnet.net.constants import PAGE_SIZE, SKB_FRAG_PAGE_ORDER
from virtnet.net.ctrl import (
    CTRL_MQ,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    ControlDevice,
    ControlQueue,
    build_control,
)
from virtnet.net.features import (
    OFFERED,
    SUPPORTED,
    VIRTIO_NET_S_LINK_UP,
    NetConfig,
    VirtioNetF,
    missing_requirements,
    names,
    negotiate,
)
from virtnet.net.layout import FRESH_PACKED_BASE, ControlArea, GuestLayout
from virtnet.vhost_user.channel import Channel, PeerClosed
from virtnet.vhost_user.errors import VhostUserProtocolError
from virtnet.vhost_user.local import LocalSet
from virtnet.vhost_user.messages import (
    U64,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    ConfigSpace,
    InflightDesc,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    close_fds,
)
from virtnet.vhost_user.messages import (
    FrontendRequest as Req,
)
from virtnet.vhost_user.polling import IDLE_POLL, look_at_epoll
from virtnet.vhost_user.reconnect import Reconnector, bind_listener, unlink_socket
from virtnet.vhost_user.runclock import RunClock
from virtnet.vhost_user.worker import RPC_TIMEOUT, PairServer, WorkerDied, WorkerSet, pair_totals
from virtnet.vhost_user.workermsg import Drain, Finish, Stats, Stop
from virtnet.virtio.features import DeviceStatus, VirtioF, bit
from virtnet.virtio.memory import GuestMemory, MemoryRegion
from virtnet.virtio.ring.layout import PackedAddrs, VringAddrs

log = logging.getLogger("virtnet.driver")

WANTED_PROTOCOL = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.CONFIG)  # GET_CONFIG: the device's MAC, link status, MTU
    | bit(ProtocolFeature.STATUS)  # SET_STATUS / GET_STATUS, as DPDK's virtio_user
)
MAP_FIXED = 0x10  # <sys/mman.h>; the mmap module does not export it
TX_DRAIN_TIMEOUT = 2.0  # close(): how long each pair's back-end gets to use what was sent


class FrontendError(Exception):
    """The back-end refused or broke the setup; the text says at which step."""


class GuestMemfd:
    """The guest's memory: memfds mapped here, shared with the back-end by fd.

    ``cuts`` split it into ``len(cuts) + 1`` memfds at those guest addresses, each a
    memory region of its own (as QEMU's DIMMs on memory-backend-memfd), mapped back to
    back so that this side sees one contiguous guest-physical space, as a guest does.
    ``regions`` is the table the back-end gets: (region, fd) in address order.
    """

    def __init__(self, size: int, seal: bool = True, cuts: tuple[int, ...] = ()) -> None:
        self.size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        bounds = (0, *cuts, self.size)
        spans = [(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]  # (gpa, size)
        if any(size <= 0 or gpa % mmap.PAGESIZE for gpa, size in spans):
            raise ValueError(f"region cuts {cuts} are not page-aligned addresses in "
                             f"(0, {self.size:#x}) in increasing order")  # fmt: skip
        self.fds = [self._memfd(size, seal) for _gpa, size in spans]
        self.fd = self.fds[0]
        # With cuts, one address range (an anonymous mapping owns it, and unmaps it at
        # close once no view pins it), each memfd then mapped over its part.
        fd = self.fd if not cuts else -1
        self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.uva = ctypes.addressof(anchor)  # what a C front-end would put in the table
        del anchor
        try:
            for (gpa, size), fd in zip(spans, self.fds, strict=True) if cuts else ():
                _mmap_fixed(self.uva + gpa, size, fd)
        except OSError:
            self.map.close()
            close_fds(self.fds)
            raise
        self.regions = [(MemoryRegionDesc(gpa, size, self.uva + gpa, 0), fd)
                        for (gpa, size), fd in zip(spans, self.fds, strict=True)]  # fmt: skip
        self.memory = GuestMemory([MemoryRegion(0, memoryview(self.map), uva=self.uva)])

    @staticmethod
    def _memfd(size: int, seal: bool) -> int:
        fd = os.memfd_create("virtnet-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        if seal:
            # As QEMU's memory-backend-memfd (seal=on): the size is fixed for good, so
            # no back-end mapping it can be made to fault by a truncate.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd

    def close(self) -> None:
        self.memory.release()
        try:
            self.map.close()
        except BufferError:
            pass  # views still alive; the mapping goes with them
        close_fds(self.fds)


def _mmap_fixed(addr: int, length: int, fd: int) -> None:
    """mmap(2) ``fd`` at exactly ``addr`` (over our own reservation there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)  # fmt: skip
    got = libc.mmap(addr, length, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_SHARED | MAP_FIXED, fd, 0)  # fmt: skip
    if got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of a guest memory region at {addr:#x}: {os.strerror(err)}")


class PairDriverFactory(Protocol):
    """What runs on the queue pairs (``driver_loop.PairDrivers``): the session hands it
    the guest memory, each pair's layout, the features and the eventfds, and runs what
    ``loop(pair)`` makes wherever its runner puts it."""

    strategy: str

    def __len__(self) -> int: ...
    def on_features(self, features: int) -> None: ...
    def build(self, memory: GuestMemory, layouts: list[GuestLayout], features: int,
              kick: list[int], call: list[int],
              memory_breaks: frozenset[int]) -> str: ...  # fmt: skip
    def fill(self, pair: int) -> None: ...
    def loop(self, pair: int) -> PairServer: ...
    def finish(self, pair: int) -> Stats: ...
    def stats(self, pair: int) -> Stats: ...
    def close(self) -> None: ...


class DriverClient:
    """Connect to a back-end, negotiate, set up memory and rings, run the driver."""

    def __init__(
        self,
        socket_path: str,
        drivers: PairDriverFactory,
        *,
        queue_size: int = 256,
        wanted: int = OFFERED,
        connect_timeout: float = 10.0,
        printer=None,
        combined: int | None = None,
        mem_regions: int = 1,
        server: bool = False,
        in_process: bool | None = None,
        reconnect: bool = False,
        inflight: bool = True,
    ) -> None:
        if mem_regions < 1:
            raise FrontendError(f"--mem-regions {mem_regions}: at least 1")
        self.mem_regions = mem_regions
        self.server = server
        # --reconnect: a back-end that goes away during run() is waited for and set up
        # again (_resume); the run goes on meanwhile. Split rings only (_choose_features).
        self.reconnect = reconnect
        # In-flight tracking where the back-end offers it (--no-inflight: never): the
        # region GET_INFLIGHT_FD gave, kept for every start of the session.
        self.wanted_protocol = WANTED_PROTOCOL | (
            bit(ProtocolFeature.INFLIGHT_SHMFD) if inflight else 0)
        self.inflight: tuple[InflightDesc, int] | None = None
        self.reconnects = 0
        self.reconnect_gap_max = 0.0  # seconds, the longest outage that ended
        self._redial: Reconnector | None = None  # from the loss to the reconnect
        self._lost_at = 0.0
        self.socket_path = socket_path
        self.drivers = drivers
        self.queues = len(drivers)
        # Where the pairs run: one pair in this process, more in a worker each (cores).
        self.in_process = self.queues == 1 if in_process is None else in_process
        self.combined = self.queues if combined is None else combined
        if not 1 <= self.combined <= self.queues:
            raise FrontendError(f"--combined {combined}: 1..{self.queues} (--queues) pairs")
        self.active = self.queues  # pairs enabled (VQ_PAIRS_SET)
        self.ctrl: ControlQueue | None = None  # the control queue, shadowed here: see setup()
        self.ctrl_dev: ControlDevice | None = None
        self.strategy = drivers.strategy  # what runs, once setup() knows the features
        self.queue_size = queue_size
        self.wanted = wanted
        if self.queues > 1:
            self.wanted |= bit(VirtioNetF.MQ) | bit(VirtioNetF.CTRL_VQ)
        self.printer = printer
        # A split layout when the size allows one (packed rings fit in its room, so the
        # memfd is big enough either way); setup() switches to what was negotiated.
        # Each pair has its own rings, indirect tables and pages, one after the other.
        pow2 = queue_size > 0 and not queue_size & (queue_size - 1)
        self.layout = GuestLayout(queue_size, GuestLayout.pages_for(queue_size), packed=not pow2)
        sock = self._wait_for_backend() if server else self._connect(connect_timeout)
        self.channel = Channel(sock, replies=True)
        size = self.layout.size * self.queues
        if self.queues > 1:
            size += ControlArea(size).size + PAGE_SIZE  # its ring may be packed: same room
        self.guest = GuestMemfd(size)  # split into --mem-regions once the layout is final
        nrings = 2 * self.queues
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nrings)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nrings)]
        self.features = 0
        self.protocol_features = 0
        self.status = 0  # the device status, as sent (PROTOCOL_F_STATUS)
        self.config: NetConfig | None = None  # GET_CONFIG's answer (PROTOCOL_F_CONFIG)
        self.built = False  # setup() made each pair's driver
        self.workers: WorkerSet | None = None  # from run() to close()
        self.peer_gone = False
        self.broken = ""  # a queue the device broke (BAD_RING), or a worker died: why
        self.run_seconds = 0.0
        self.cpu_seconds = 0.0
        self._final: list[dict] = []
        self._clock: RunClock | None = None  # from run() to close()

    @property
    def away(self) -> bool:
        """--reconnect: the back-end went away and no new one is set up yet."""
        return self._redial is not None

    def pair_layout(self, pair: int) -> GuestLayout:
        return replace(self.layout, base=pair * self.layout.size)

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise FrontendError(
                        f"cannot connect to {self.socket_path} within {timeout:g}s: {e}"
                    ) from None
                time.sleep(0.05)

    def _wait_for_backend(self) -> socket.socket:
        """--server: listen on socket_path until one back-end connects (virtnet device
        --client, DPDK net_vhost,client=1), then stop listening: one session."""
        listener = bind_listener(self.socket_path)
        try:
            log.info("listening on %s for a back-end", self.socket_path)
            sock, _ = listener.accept()
            return sock
        finally:
            listener.close()
            unlink_socket(self.socket_path)

    # -- setup --------------------------------------------------------------------

    def _send(self, request: Req, payload=b"", fds=(), ack: bool = False) -> None:
        flags = VHOST_USER_VERSION
        want_ack = ack and self.protocol_features & bit(ProtocolFeature.REPLY_ACK)
        if want_ack:
            flags |= VHOST_USER_NEED_REPLY_MASK
        msg = Message(request, flags, payload, tuple(fds))
        if not want_ack:
            self.channel.send(msg)
            return
        answer = self.channel.request(msg)
        value = answer.payload_as(U64).value
        if value != 0:
            raise FrontendError(f"back-end refused {request.name} (REPLY_ACK {value})")

    def _get(self, request: Req, payload=b"") -> Message:
        return self.channel.request(Message(request, VHOST_USER_VERSION, payload))

    def setup(self) -> None:
        """The first connection's session: features chosen, the drivers built, filled."""
        self._start_session(reconnect=False)

    def _start_session(self, reconnect: bool) -> None:
        """The sequence QEMU and DPDK's virtio_user send, in their order. On a reconnect
        (``--reconnect``, the back-end restarted) the same one, with what the first chose:
        the features, the memfds, the rings where the old device left them; nothing in
        guest memory is rebuilt or refilled."""
        self.protocol_features = 0  # a new back-end: nothing agreed yet
        offered = self._hello(reconnect)
        pairs = 1
        if offered & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            pf = self._get(Req.GET_PROTOCOL_FEATURES).payload_as(U64).value
            self.protocol_features = pf & self.wanted_protocol
            self._send(Req.SET_PROTOCOL_FEATURES, U64(self.protocol_features))
            if self.protocol_features & bit(ProtocolFeature.MQ):
                pairs = self._get(Req.GET_QUEUE_NUM).payload_as(U64).value
                if pairs < 1:
                    raise FrontendError(f"back-end supports {pairs} queue pairs")
        self._check_queues(offered, pairs)
        if reconnect:
            self._check_still_offered(offered)
        else:
            self._choose_features(offered)
        packed = bool(self.features & bit(VirtioF.RING_PACKED))
        self.status = 0  # a new back-end starts from reset
        self._send(Req.SET_FEATURES, U64(self.features))
        self._features_ok()
        self._get_config()
        if not reconnect:
            self.drivers.on_features(self.features)
        self._set_mem_table()
        self._set_inflight(reconnect)
        if not reconnect:
            self._build_drivers()
        for p in range(self.queues):
            self._set_vrings(p, packed, reconnect)
        if self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            self._enable_pairs(self.active)
        if not reconnect:
            for p in range(self.queues):
                self.drivers.fill(p)
            if self.features & bit(VirtioNetF.CTRL_VQ):
                self._setup_control()
        self._add_status(DeviceStatus.DRIVER_OK)
        if reconnect:
            # Buffers posted while the device was away: the new one looks at every avail
            # ring now rather than at the driver's next kick (which EVENT_IDX may hold).
            for fd in self.kick:
                os.eventfd_write(fd, 1)

    def _hello(self, reconnect: bool) -> int:
        """SET_OWNER and GET_FEATURES: the back-end's offer."""
        try:
            self._send(Req.SET_OWNER)
            return self._get(Req.GET_FEATURES).payload_as(U64).value
        except (PeerClosed, OSError) as e:
            if reconnect:
                raise  # a back-end gone again: the reconnect loop's to retry
            # A vhost-user back-end serves one front-end at a time and turns others
            # away by closing at once: say so rather than "Broken pipe".
            raise FrontendError(
                f"the back-end at {self.socket_path} closed the connection before "
                f"answering ({e}): is another front-end connected to it?"
            ) from None

    def _choose_features(self, offered: int) -> None:
        """The first session: what to ack, and the ring layout and memory regions it says."""
        for problem in missing_requirements(offered & SUPPORTED):
            log.warning("device offers %s; not acking it", problem)
        self.features = negotiate(offered, self.wanted) | (
            offered & bit(VHOST_USER_F_PROTOCOL_FEATURES)
        )
        log.info("features %#x: %s", self.features, " ".join(names(self.features)))
        packed = bool(self.features & bit(VirtioF.RING_PACKED))
        if self.layout.packed and not packed:
            raise FrontendError(
                f"queue size {self.queue_size} is not a power of 2: it needs packed rings, "
                "and RING_PACKED was not negotiated"
            )
        if packed and self.reconnect and not self._tracks_inflight():
            raise FrontendError(
                "--reconnect with packed rings needs in-flight tracking, and this back-end "
                "does not take VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (or --no-inflight was "
                "given): a packed ring keeps the device's used position in each "
                "descriptor's flags, not as one index in guest memory, so only the "
                "region tells a restarted back-end where to resume (add --features-off "
                "RING_PACKED for split rings, which resume at the used index)"
            )
        self.layout = self.layout.for_features(self.features)
        if self.mem_regions > 1:  # nothing views it yet: the split needs the final layout
            self.guest.close()
            self.guest = GuestMemfd(self.guest.size, cuts=self._region_cuts())

    def _tracks_inflight(self) -> bool:
        return bool(self.protocol_features & bit(ProtocolFeature.INFLIGHT_SHMFD))

    def _check_still_offered(self, offered: int) -> None:
        """A reconnect: the drivers run with the features of the first session, so the
        new back-end must offer each of them again (a guest cannot renegotiate live)."""
        missing = self.features & ~offered
        if missing:
            raise FrontendError(
                f"the back-end at {self.socket_path} no longer offers "
                f"{' '.join(names(missing))}, negotiated before it restarted: cannot "
                "resume this session"
            )
        if self.features & bit(VirtioF.RING_PACKED) and not self._tracks_inflight():
            raise FrontendError(
                f"the back-end at {self.socket_path} no longer takes "
                "VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: packed rings cannot resume "
                "without it (where each ring's device left off is only in the region)"
            )

    def _set_inflight(self, reconnect: bool) -> None:
        """PROTOCOL_F_INFLIGHT_SHMFD: the back-end's in-flight region, kept here so that a
        restarted back-end finds what its predecessor had taken and not used. Asked for
        once (GET_INFLIGHT_FD), given back at every start, the first included
        (SET_INFLIGHT_FD), as QEMU's vhost-user-blk does (vhost_dev_get/set_inflight)."""
        if not self._tracks_inflight():
            return
        if self.inflight is None:
            answer = self._get(Req.GET_INFLIGHT_FD,
                               InflightDesc(0, 0, 2 * self.queues, self.queue_size))  # fmt: skip
            desc = answer.payload_as(InflightDesc)
            if not answer.fds or desc.mmap_size == 0:
                close_fds(answer.fds)
                log.warning("the back-end offers INFLIGHT_SHMFD but GET_INFLIGHT_FD gave no "
                            "region: running without in-flight tracking")  # fmt: skip
                return
            close_fds(answer.fds[1:])
            self.inflight = (desc, answer.fds[0])
            log.info("in-flight region: %d bytes for %d queues of %d", desc.mmap_size,
                     desc.num_queues, desc.queue_size)  # fmt: skip
        desc, fd = self.inflight
        self._send(Req.SET_INFLIGHT_FD, desc, [fd], ack=True)

    def _build_drivers(self) -> None:
        breaks = frozenset(r.guest_phys_addr for r, _fd in self.guest.regions[1:])
        layouts = [self.pair_layout(p) for p in range(self.queues)]
        strategy = self.drivers.build(self.guest.memory, layouts, self.features, self.kick,
                                      self.call, breaks)  # fmt: skip
        self.built = True
        if strategy != self.strategy:  # virtnet_probe's choice, from the features
            mrg = "on" if self.features & bit(VirtioNetF.MRG_RXBUF) else "off"
            log.warning("rx strategy %s is not possible with MRG_RXBUF %s: using %s",
                        self.strategy, mrg, strategy)  # fmt: skip
            self.strategy = strategy

    def _add_status(self, status: int) -> None:
        """SET_STATUS where the back-end took PROTOCOL_F_STATUS (DPDK virtio_user's
        virtio_user_dev_set_status; NEED_REPLY with REPLY_ACK, as it sends it)."""
        if not self.protocol_features & bit(ProtocolFeature.STATUS):
            return
        self.status |= int(status)
        self._send(Req.SET_STATUS, U64(self.status), ack=True)

    def _features_ok(self) -> None:
        """3.1.1 steps 1-6: FEATURES_OK, then read it back: a device that clears it
        refused the features."""
        if not self.protocol_features & bit(ProtocolFeature.STATUS):
            return
        self._add_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)
        got = self._get(Req.GET_STATUS).payload_as(U64).value
        if not got & DeviceStatus.FEATURES_OK:
            raise FrontendError(
                f"the back-end cleared FEATURES_OK (status {got:#x}): it refused features "
                f"{self.features:#x}"
            )

    def _get_config(self) -> None:
        """The device's virtio_net_config (5.1.4) where it offers PROTOCOL_F_CONFIG: MAC,
        link status (with VIRTIO_NET_F_STATUS), MTU (with VIRTIO_NET_F_MTU)."""
        if not self.protocol_features & bit(ProtocolFeature.CONFIG):
            return
        answer = self._get(Req.GET_CONFIG, ConfigSpace(0, 0, bytes(NetConfig.SIZE)))
        try:
            data = answer.payload_as(ConfigSpace).data
            self.config = NetConfig.unpack(data)
        except (VhostUserProtocolError, ValueError) as e:
            raise FrontendError(f"GET_CONFIG: {e}") from None
        cfg = self.config
        log.info("device config: mac %s, link %s, mtu %d, %d queue pairs", cfg.mac.hex(":"),
                 "up" if cfg.status & VIRTIO_NET_S_LINK_UP else "down", cfg.mtu,
                 cfg.max_virtqueue_pairs)  # fmt: skip

    def _setup_control(self) -> None:
        """The control queue, answered here as DPDK's virtio_user does (a vhost-user
        back-end serves data queues only): VQ_PAIRS_SET becomes SET_VRING_ENABLE of
        the pairs past the count. Linux's probe sends it (virtnet_set_queues)."""
        area = ControlArea(self.layout.size * self.queues,
                           packed=bool(self.features & bit(VirtioF.RING_PACKED)))  # fmt: skip
        ctrl, ctrl_dev = build_control(self.guest.memory, area, self.features,
                                       2 * self.queues, self.queues)  # fmt: skip
        self.ctrl, self.ctrl_dev = ctrl, ctrl_dev
        ctrl_dev.on_queue_pairs = self._vq_pairs_set
        if self.features & bit(VirtioNetF.MQ) and not self.set_queues(self.combined):
            why = ctrl.last_error or "refused"
            raise FrontendError(f"VQ_PAIRS_SET {self.combined}: {why}")

    def set_queues(self, pairs: int) -> bool:
        """virtnet_set_queues: the pairs in use, through the control queue."""
        if self.ctrl is None:
            raise FrontendError("no control queue: CTRL_VQ was not negotiated")
        return self.ctrl.send_command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                                      CTRL_MQ.pack(pairs), run=self._ctrl_turn)  # fmt: skip

    def _ctrl_turn(self, kick: bool) -> None:
        dev = self.ctrl_dev
        assert dev is not None  # set with self.ctrl, whose send_command calls this
        dev.process()
        dev.flush()

    def _vq_pairs_set(self, pairs: int) -> None:
        self._enable_pairs(pairs)
        self.active = pairs
        log.info("queue pairs in use: %d of %d", pairs, self.queues)

    def _enable_pairs(self, pairs: int) -> None:
        """SET_VRING_ENABLE: the first ``pairs`` pairs' rings on, the others off."""
        for q in range(2 * self.queues):
            self._send(Req.SET_VRING_ENABLE, VringState(q, int(q // 2 < pairs)), ack=True)

    def _check_queues(self, offered: int, pairs: int) -> None:
        if self.queues == 1:
            return
        if not offered & bit(VirtioNetF.MQ):
            raise FrontendError(f"--queues {self.queues}: the back-end does not offer "
                                "VIRTIO_NET_F_MQ")  # fmt: skip
        if not self.protocol_features & bit(ProtocolFeature.MQ):
            raise FrontendError(f"--queues {self.queues}: the back-end does not offer "
                                "VHOST_USER_PROTOCOL_F_MQ (GET_QUEUE_NUM)")  # fmt: skip
        if pairs < self.queues:
            raise FrontendError(f"--queues {self.queues}: the back-end has {pairs} queue "
                                f"pair{'s' if pairs > 1 else ''} (GET_QUEUE_NUM)")  # fmt: skip

    def _set_vrings(self, pair: int, packed: bool, reconnect: bool) -> None:
        uva = self.guest.uva
        rings: tuple[VringAddrs | PackedAddrs, ...] = self.pair_layout(pair).rings
        for q, addrs in enumerate(rings):
            index = 2 * pair + q
            self._send(Req.SET_VRING_NUM, VringState(index, self.queue_size))
            # Packed: index 0, wrap counter 1, for avail (bits 0-15) and used (16-31), as
            # QEMU. A reconnect sends it too: the driver has no one index saying where the
            # old device stopped, and the new one resumes where the in-flight region says
            # (vhost-user.rst "When reconnecting"; _choose_features made sure it tracks).
            base = FRESH_PACKED_BASE | FRESH_PACKED_BASE << 16 if packed else 0
            if reconnect and isinstance(addrs, VringAddrs):
                base = self._published_used(addrs)
            self._send(Req.SET_VRING_BASE, VringState(index, base))
            self._send(Req.SET_VRING_ADDR, VringAddr(
                index, 0, uva + addrs.desc, uva + addrs.used, uva + addrs.avail, 0))  # fmt: skip
            self._send(Req.SET_VRING_KICK, U64(index), [self.kick[index]])
            self._send(Req.SET_VRING_CALL, U64(index), [self.call[index]])

    def _published_used(self, addrs: VringAddrs) -> int:
        """The used index the device last published (2.7.8: le16 ``idx`` after ``flags``):
        where a new device resumes, as QEMU's virtio_queue_restore_last_avail_idx. It
        re-takes every chain the old one took and never used; those it used but had
        not published yet it writes again."""
        return int.from_bytes(self.guest.memory.read(addrs.used + 2, 2), "little")

    def _region_cuts(self) -> tuple[int, ...]:
        """Where --mem-regions N splits the guest memory: N - 1 addresses spread evenly,
        none inside a ring, an indirect table, the control area or a compound page
        (32 KiB, SKB_FRAG_PAGE_ORDER: ewma's buffers), since the back-end maps each
        region on its own and no access may straddle two."""
        step = PAGE_SIZE << SKB_FRAG_PAGE_ORDER
        points: list[int] = []
        for p in range(self.queues):
            lay = self.pair_layout(p)
            if p:
                points.append(lay.base)
            points.extend(range(lay.pool_base + step, lay.base + lay.size, step))
        if self.queues > 1:
            points.append(self.layout.size * self.queues)  # the control area
        n, size = self.mem_regions, self.guest.size
        cuts: list[int] = []
        for i in range(1, n):
            at = next((c for c in points if c >= i * size // n and (not cuts or c > cuts[-1])),
                      None)  # fmt: skip
            if at is None:
                raise FrontendError(f"--mem-regions {n}: this guest memory ({size} bytes) "
                                    f"has room for at most {len(points) + 1} regions")  # fmt: skip
            cuts.append(at)
        return tuple(cuts)

    def _set_mem_table(self) -> None:
        regions = self.guest.regions
        if self.protocol_features & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            # As QEMU: with memory slots, every table change is one region a message.
            slots = self._get(Req.GET_MAX_MEM_SLOTS).payload_as(U64).value
            if len(regions) > slots:
                raise FrontendError(f"--mem-regions {len(regions)}: the back-end has "
                                    f"{slots} memory slots (GET_MAX_MEM_SLOTS)")  # fmt: skip
            for region, fd in regions:
                self._send(Req.ADD_MEM_REG, SingleMemoryRegion(region), [fd], ack=True)
            return
        if len(regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise FrontendError(
                f"--mem-regions {len(regions)}: the back-end does not offer "
                "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS, and SET_MEM_TABLE carries at "
                f"most {VHOST_MEMORY_BASELINE_NREGIONS} regions"
            )
        table = MemoryTable(tuple(region for region, _fd in regions))
        self._send(Req.SET_MEM_TABLE, table, [fd for _region, fd in regions], ack=True)

    # -- running ------------------------------------------------------------------

    def run(self, seconds: float = 0) -> dict:
        """Run until ``seconds`` pass (0: until SIGTERM/SIGINT). The stop signals stay
        caught until close(): a second one while the pairs stop must not cut it short."""
        started, cpu0 = time.monotonic(), time.process_time()
        clock = self._clock = RunClock(seconds, self.printer, self.stats).install()
        try:
            self._run_pairs(clock)
        finally:
            self.run_seconds = time.monotonic() - started
            self.cpu_seconds = time.process_time() - cpu0
        return self.stats()

    def _run_pairs(self, clock: RunClock) -> None:
        """The pairs in use, in this process or a worker each (``in_process``); here, the
        session and the pairs' health, and with in-process pairs their ring passes."""
        ep = select.epoll()
        supervisor = LocalSet if self.in_process else WorkerSet
        workers = self.workers = supervisor(ep, log, self._worker_died, self._worker_event)
        for p in range(self.active):
            workers.start(p, partial(self.drivers.loop, p), self._close_in_worker)
        ep.register(self.channel.fileno(), select.EPOLLIN)
        busy = True
        passes = 0
        while clock.running() and not self.peer_gone and not self.broken:
            redial = self._redial
            if redial is not None and redial.due():
                self._resume(redial.try_now())
            passes += 1
            if look_at_epoll(busy, passes):  # in-process pairs busy: as a worker's loop
                redial = self._redial
                most = IDLE_POLL if redial is None else redial.wait(IDLE_POLL)
                for fd, _ in ep.poll(0.0 if busy else workers.poll_timeout(most)):
                    if self._redial is None and fd == self.channel.fileno():
                        self._on_socket()
                    elif self._redial is not None and self._redial.owns(fd):
                        self._resume(self._redial.accept())
                    else:
                        workers.on_ready(fd)
            busy = workers.run_passes()  # the pairs that run in this process
            if not self.broken:
                workers.watchdog()  # a hung worker would stall its pair silently

    def _worker_died(self, e: WorkerDied) -> None:
        self.broken = self.broken or str(e)

    def _worker_event(self, pair: int, why: str) -> None:
        """PairWorker's event: the pair broke (BAD_RING), and why."""
        self.broken = self.broken or f"queue pair {pair}: {why}"

    def _close_in_worker(self) -> None:
        """In a fresh worker: the session is the control process's alone."""
        self.channel.close()
        if self._redial is not None and self._redial.listener is not None:
            self._redial.listener.close()
        if self.workers is not None:
            self.workers.close_all()

    def _on_socket(self) -> None:
        try:
            msgs = self.channel.receive()
        except (PeerClosed, OSError, VhostUserProtocolError) as e:
            if self.reconnect:
                self._lose_backend(str(e))
                return
            log.error("back-end connection lost: %s", e)
            self.peer_gone = True
            return
        for msg in msgs:
            log.warning("unexpected message from the back-end: %s", msg.request)

    def _lose_backend(self, why: str) -> None:
        """--reconnect: the pairs run on (no used buffers while the device is away);
        this process waits for a back-end, to set it up where the old one stopped."""
        log.warning("back-end connection lost: %s; reconnecting", why)
        assert self.workers is not None  # lost during run()
        self.workers.ep.unregister(self.channel.fileno())
        self.channel.close()
        self._lost_at = time.monotonic()
        redial = self._redial = Reconnector(self.socket_path, self.workers.ep,
                                            server=self.server)  # fmt: skip
        try:
            redial.lost()
        except OSError as e:
            raise FrontendError(f"--reconnect: cannot listen on {self.socket_path} "
                                f"again: {e}") from None  # fmt: skip

    def _resume(self, sock: socket.socket | None) -> None:
        """A new connection (or None: no back-end yet): the session again, on it.

        A back-end that goes away during it is one more failed try (the waits keep
        doubling); one that cannot take this guest (a feature it no longer offers)
        ends the run with that FrontendError."""
        redial = self._redial
        if sock is None or redial is None:
            return
        self.channel = Channel(sock, replies=True)
        try:
            self._start_session(reconnect=True)
        except (OSError, VhostUserProtocolError) as e:  # PeerClosed among them
            self.channel.close()
            wait = redial.failed()
            log.warning("reconnect failed: %s; next try in %.2f s", e, wait)
            return
        except FrontendError:
            self.channel.close()
            self.peer_gone = True  # close(): no session to stop the rings on
            raise
        redial.succeeded()
        self._redial = None
        assert self.workers is not None  # _redial is set during run() only
        self.workers.ep.register(self.channel.fileno(), select.EPOLLIN)
        gap = time.monotonic() - self._lost_at
        self.reconnects += 1
        self.reconnect_gap_max = max(self.reconnect_gap_max, gap)
        log.info("reconnected to the back-end after %.2f s (reconnect %d)", gap,
                 self.reconnects)  # fmt: skip

    def _pair_stats(self) -> list[Stats]:
        if self._final:
            return self._final
        out = [self.drivers.stats(p) for p in range(self.queues)]  # not in use: as set up
        if self.workers is not None:
            out[: len(self.workers)] = self.workers.stats()
        return out

    def stats(self) -> dict:
        out = pair_totals(self._pair_stats() if self.built else [], "driver_stats",
                          per_queue=self.queues > 1,
                          workers=not self.in_process)  # fmt: skip
        cfg = self.config
        return {"driver_stats": out["driver_stats"], "backend": out["backend"],
                # What GET_CONFIG said (with PROTOCOL_F_CONFIG), else null.
                "device_config": None if cfg is None else {
                    "mac": cfg.mac.hex(":"), "link_up": bool(cfg.status & VIRTIO_NET_S_LINK_UP),
                    "mtu": cfg.mtu, "max_virtqueue_pairs": cfg.max_virtqueue_pairs},
                "features": self.features, "queues": self.queues,
                "strategy": self.strategy,
                "reconnects": self.reconnects,
                "inflight_tracking": self.inflight is not None,
                "reconnect_gap_max_seconds": round(self.reconnect_gap_max, 4),
                "seconds": round(self.run_seconds, 4),
                "cpu_seconds": round(self.cpu_seconds + out["cpu_seconds"], 4),
                "worker_cpu_seconds": out["worker_cpu_seconds"]}  # fmt: skip

    # -- teardown -----------------------------------------------------------------

    def close(self) -> dict:
        """Stop the rings (GET_VRING_BASE), reclaim every buffer, free every page."""
        stats = {}
        if self.built:
            self._close_pairs()
            stats = self.stats()
        if self._redial is not None:  # the run ended with the back-end away
            self._redial.close()
            self._redial = None
        self.channel.close()
        for fd in self.kick + self.call:
            os.close(fd)
        self.built = False
        self.drivers.close()
        self.guest.close()
        if self.inflight is not None:
            os.close(self.inflight[1])
            self.inflight = None
        if self._clock is not None:
            self._clock.restore()
            self._clock = None
        return stats

    def _close_pairs(self) -> None:
        """Stop the loops, drain tx, stop the rings (GET_VRING_BASE), then each pair
        takes what the device finished and frees every page: wherever they ran."""
        workers, self.workers = self.workers, None
        ran = len(workers) if workers is not None else 0
        if workers is not None:
            workers.each(Stop())
        if not self.peer_gone and not self.away:  # a back-end there to stop the rings
            if workers is not None:
                workers.each(Drain(), TX_DRAIN_TIMEOUT + RPC_TIMEOUT)
            self._stop_rings()
        final = workers.finish(Finish()) if workers is not None else []
        # Pairs that never ran (past --combined, or no run()): their buffers are here.
        self._final = final + [self.drivers.finish(p) for p in range(ran, self.queues)]
        if workers is not None:
            workers.ep.close()

    def _stop_rings(self) -> None:
        for q in range(2 * self.queues):
            try:
                self._get(Req.GET_VRING_BASE, VringState(q, 0))
            except (VhostUserProtocolError, OSError) as e:
                log.warning("GET_VRING_BASE %d: %s", q, e)
                return
        if self.status:  # then the reset, after the rings stopped (as QEMU 8.1 on)
            self.status = 0
            try:
                self._send(Req.SET_STATUS, U64(0), ack=True)
            except (VhostUserProtocolError, FrontendError, OSError) as e:
                log.warning("SET_STATUS 0: %s", e)
