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

from virtnet.net.coalesce import IrqCoalescer
from virtnet.net.device import VirtnetDevice
from virtnet.net.faults import FaultPlan
from virtnet.net.features import (
    OFFERED,
    NetConfig,
    VirtioNetF,
    missing_requirements,
    names,
    sanitize,
)
from virtnet.net.guest import build_device
from virtnet.ports.backends import DeviceBackend
from virtnet.vhost_user.channel import Channel, PeerClosed
from virtnet.vhost_user.errors import VhostUserProtocolError
from virtnet.vhost_user.mapping import MappedMemory, MappingError
from virtnet.vhost_user.messages import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    Message,
    ProtocolFeature,
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
from virtnet.vhost_user.runclock import RunClock
from virtnet.virtio.errors import MemoryAccessError
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.ring.layout import (
    EVENT_SUPPRESS_SIZE,
    PackedViews,
    VringViews,
    avail_ring_size,
    check_packed_queue_size,
    check_queue_size,
    desc_table_size,
    used_ring_size,
)

log = logging.getLogger("virtnet.device")

NUM_QUEUES = 2  # one pair: 0 = receiveq1 (device → driver), 1 = transmitq1
RX_Q, TX_Q = 0, 1
BACKEND_FEATURES = OFFERED | bit(VHOST_USER_F_PROTOCOL_FEATURES)
PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.NET_MTU)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.RESET_DEVICE)
)
BUDGET = 64  # packets per ring per loop pass (vhost-net's VHOST_NET_WEIGHT spirit)
IDLE_POLL = 0.2  # seconds epoll waits with nothing due (the run clock's resolution)
# ethtool -C defaults for `virtnet device` (--coalesce overrides): no moderation.
DEFAULT_COALESCE = {"rx-usecs": 0, "rx-frames": 0, "tx-usecs": 0, "tx-frames": 0}


class BackendError(Exception):
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
    """One front-end connection: negotiation, memory, vrings → a VirtnetDevice."""

    config: NetConfig = field(default_factory=NetConfig)
    offered: int = BACKEND_FEATURES  # less what `virtnet device --features-off` names
    features: int = 0
    protocol_features: int = 0
    memory: MappedMemory | None = None
    vrings: list[Vring] = field(default_factory=lambda: [Vring() for _ in range(NUM_QUEUES)])
    device: VirtnetDevice | None = None
    owner: bool = False
    changed: bool = True  # the fds to poll changed
    faults: FaultPlan | None = None  # --faults: the device lies on purpose

    # -- dispatch -------------------------------------------------------------

    def handle(self, msg: Message) -> Message | None:
        """Apply one request; the reply to send, if one is owed."""
        handler = getattr(self, "_" + msg.request.name.lower(), None)
        try:
            if handler is None:
                close_fds(msg.fds)
                raise BackendError(f"{spec_name(msg.request)} is not supported")
            result = handler(msg)
        except (BackendError, MappingError, MemoryAccessError, ValueError) as e:
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
        wanted = msg.payload.value
        extra = wanted & ~self.offered
        if extra:
            raise BackendError(f"features {' '.join(names(extra))} were never offered")
        if not wanted & (bit(VirtioF.VERSION_1) | bit(VirtioNetF.MRG_RXBUF)):
            # 5.1.6: only a legacy driver without MRG_RXBUF uses the 10-byte header
            # (QEMU disable-modern=on,mrg_rxbuf=off); the data path is 12 bytes throughout.
            raise BackendError(
                "a legacy driver (no VERSION_1) without MRG_RXBUF needs the 10-byte "
                "virtio_net_hdr, which this device does not implement: use mrg_rxbuf=on "
                "or the modern interface (QEMU disable-modern=off)"
            )
        problems = missing_requirements(wanted)
        if problems:
            # VIRTIO 1.2, 5.1.3.1: a driver MUST NOT accept these, yet Linux does (QEMU's
            # csum=off leaves guest_tso6 on) and QEMU never reads this reply, so a refusal
            # would run the device on stale features. Act as if the orphans were off.
            log.warning("features lack requirements, ignored: %s", "; ".join(problems))
            wanted = sanitize(wanted)
        self.features = wanted
        if not wanted & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            for vr in self.vrings:  # "rings are enabled immediately"
                vr.enabled = True
        log.info("features %#x: %s", wanted, " ".join(names(wanted)))
        self._update_device()

    def _get_protocol_features(self, msg: Message) -> Message:
        return reply(msg, U64(PROTOCOL_FEATURES))

    def _set_protocol_features(self, msg: Message) -> None:
        value = msg.payload.value
        if value & ~PROTOCOL_FEATURES:
            raise BackendError(f"protocol features {value & ~PROTOCOL_FEATURES:#x} not offered")
        self.protocol_features = value

    def _get_queue_num(self, msg: Message) -> Message:
        return reply(msg, U64(NUM_QUEUES // 2))  # queue *pairs*, as QEMU's net reads it

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        self.reset()

    def _reset_device(self, msg: Message) -> None:
        self.reset()

    def _net_set_mtu(self, msg: Message) -> None:
        mtu = msg.payload.value
        if not 68 <= mtu <= 65535:
            raise BackendError(f"MTU {mtu} outside 68..65535")
        self.config.mtu = mtu

    def _get_config(self, msg: Message) -> Message:
        space = self.config.pack().ljust(256, b"\0")
        req = msg.payload
        if req.offset + req.size > len(space):
            raise BackendError(f"config offset {req.offset} + size {req.size} > {len(space)}")
        data = space[req.offset : req.offset + req.size]
        return reply(msg, ConfigSpace(req.offset, req.flags, data))

    def _set_config(self, msg: Message) -> None:
        raise BackendError("the virtio-net config space is read-only here")

    def _set_log_base(self, msg: Message) -> None:
        close_fds(msg.fds)
        raise BackendError("dirty logging (live migration) is not supported")

    def _set_backend_req_fd(self, msg: Message) -> None:
        close_fds(msg.fds)  # no back-end → front-end requests are ever sent

    # -- memory ---------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        table = msg.payload
        self._stop_device()
        if self.memory is not None:
            self.memory.close()
        memory = MappedMemory()
        try:
            for region, fd in zip(table.regions, msg.fds, strict=True):
                memory.add(fd, region.guest_phys_addr, region.memory_size,
                           region.userspace_addr, region.mmap_offset)  # fmt: skip
        except Exception:
            memory.close()
            self.memory = None
            raise
        finally:
            close_fds(msg.fds)  # the mappings keep the memory
        self.memory = memory
        for why in memory.unsealed:
            log.warning("%s: a front-end that shrinks it can crash this process", why)
        log.info("memory table: %s", ", ".join(
            f"gpa {r.guest_phys_addr:#x}+{r.memory_size:#x}" for r in table.regions))  # fmt: skip
        self._update_device()

    # -- vrings ---------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < NUM_QUEUES:
            raise BackendError(f"vring index {index} out of range (this device has {NUM_QUEUES})")
        return self.vrings[index]

    def _set_vring_num(self, msg: Message) -> None:
        st: VringState = msg.payload
        vr = self._vring(st.index)
        try:
            (check_packed_queue_size if self.packed else check_queue_size)(st.num)
        except ValueError as e:
            raise BackendError(f"vring {st.index}: {e}") from None
        vr.num = st.num

    @property
    def packed(self) -> bool:
        return bool(self.features & bit(VirtioF.RING_PACKED))

    def _set_vring_base(self, msg: Message) -> None:
        # Packed: bits 0-14 the next avail index, bit 15 its wrap counter; bits 16-31
        # (used) are not needed: at a ring's start every buffer was returned, used ==
        # avail (DPDK's vhost reads it the same way). Checked against the size at start.
        st: VringState = msg.payload
        self._vring(st.index).base = st.num & 0xFFFF

    def _set_vring_addr(self, msg: Message) -> None:
        addr: VringAddr = msg.payload
        vr = self._vring(addr.index)
        if self.memory is not None and vr.num:
            self._ring_views(addr.index, vr.num, addr)  # refuse the request that lies, now
        vr.addr = addr

    def _get_vring_base(self, msg: Message) -> Message:
        st: VringState = msg.payload
        vr = self._vring(st.index)
        self._stop_device()  # the device needs both rings; the other restarts with it
        base = vr.base
        if self.packed:
            base |= base << 16  # vhost-user.rst: bits 16-31 the used index and wrap counter
        vr.started = False
        vr.close_fds()
        self.changed = True
        return reply(msg, VringState(st.index, base))

    def _set_vring_fd(self, msg: Message, attr: str) -> int:
        u64: U64 = msg.payload
        try:
            vr = self._vring(u64.vring_index)
        except BackendError:
            close_fds(msg.fds)
            raise
        old = getattr(vr, attr)
        if old >= 0:
            os.close(old)
        fd = -1 if u64.nofd or not msg.fds else msg.fds[0]
        setattr(vr, attr, fd)
        self.changed = True
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
        st: VringState = msg.payload
        if not self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES) and self.features:
            raise BackendError("SET_VRING_ENABLE without PROTOCOL_FEATURES negotiated")
        self._vring(st.index).enabled = bool(st.num)
        if not st.num:
            # "a disabled ring ... must not supply any new RX packets, and TX packets
            # are discarded": the device needs both rings, so it stops until re-enabled.
            self._stop_device()
        self._update_device()

    # -- the device -----------------------------------------------------------

    def ready(self) -> bool:
        return self.memory is not None and all(
            vr.started and vr.enabled and vr.num and vr.addr is not None for vr in self.vrings
        )

    def _update_device(self) -> None:
        if self.device is not None or not self.ready():
            return
        mem = self.memory.memory
        rings = [self._ring_views(i, vr.num, vr.addr) for i, vr in enumerate(self.vrings)]
        bases = (self.vrings[RX_Q].base, self.vrings[TX_Q].base)
        self.device = build_device(mem, tuple(rings), self.features, bases, self.config.mtu)
        if self.faults is not None:
            self.faults.install(self.device)
        self.changed = True
        log.info("device running: queue sizes %d/%d, bases %s",
                 self.vrings[RX_Q].num, self.vrings[TX_Q].num, bases)  # fmt: skip

    def _ring_views(self, index: int, num: int, addr: VringAddr) -> VringViews | PackedViews:
        """The ring's three parts in the mapped memory; BackendError names the part.

        Packed: SET_VRING_ADDR's descriptor / avail / used addresses are the
        descriptor ring, the driver and the device event suppression areas.
        """
        mem = self.memory.memory
        if self.packed:
            parts = (
                ("descriptor ring", addr.desc_user_addr, desc_table_size(num)),
                ("driver event area", addr.avail_user_addr, EVENT_SUPPRESS_SIZE),
                ("device event area", addr.used_user_addr, EVENT_SUPPRESS_SIZE),
            )
        else:
            parts = (
                ("descriptor table", addr.desc_user_addr, desc_table_size(num)),
                ("available ring", addr.avail_user_addr, avail_ring_size(num)),
                ("used ring", addr.used_user_addr, used_ring_size(num)),
            )
        views = []
        for part, uva, size in parts:
            try:
                views.append(mem.view_uva(uva, size))
            except MemoryAccessError as e:
                raise BackendError(f"vring {index} {part}: {e}") from None
        try:
            return (PackedViews if self.packed else VringViews)(num, *views)
        except ValueError as e:
            raise BackendError(f"vring {index}: {e}") from None

    def _stop_device(self) -> None:
        if self.device is not None:
            self.device.reset()
            for index, base in enumerate(self.device.last_avail_idx):
                self.vrings[index].base = base
            self.device = None
            self.changed = True

    def reset(self) -> None:
        self._stop_device()
        for vr in self.vrings:
            vr.close_fds()
        self.vrings = [Vring() for _ in range(NUM_QUEUES)]
        self.features = 0
        self.changed = True

    def close(self) -> None:
        self.reset()
        if self.memory is not None:
            self.memory.close()
            self.memory = None


def signal_call(fd: int) -> None:
    if fd >= 0:
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:
            log.warning("call eventfd %d: %s", fd, e)


def drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class DeviceServer:
    """Listen on ``socket_path`` and run the device for one front-end at a time."""

    def __init__(
        self,
        socket_path: str,
        backend: DeviceBackend,
        *,
        printer=None,
        busy_poll_us: int = 0,
        coalesce: dict[str, int] | None = None,
        faults: FaultPlan | None = None,
        features_off: int = 0,
    ) -> None:
        self.faults = faults
        self.busy_poll = busy_poll_us / 1e6
        self.offered = BACKEND_FEATURES & ~features_off  # e.g. RING_PACKED off: split only
        if faults is not None:
            # The injected lies (bogus ids, used index jumps) are written for split rings.
            self.offered &= ~bit(VirtioF.RING_PACKED)
        c = DEFAULT_COALESCE | (coalesce or {})
        self.coalesce = {
            RX_Q: IrqCoalescer(c["rx-usecs"], c["rx-frames"]),
            TX_Q: IrqCoalescer(c["tx-usecs"], c["tx-frames"]),
        }
        self._coalescing = any(coal.enabled for coal in self.coalesce.values())
        self.socket_path = socket_path
        self.backend = backend
        self.printer = printer
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        self.listener.bind(socket_path)
        self.listener.listen(1)
        self.channel: Channel | None = None
        self.session: BackendSession | None = None
        self.sessions = 0
        self.totals: dict[str, int] = {}
        self._ep = select.epoll()
        self._ep.register(self.listener.fileno(), select.EPOLLIN)
        self._watched: dict[int, str] = {}
        self.capture = None  # --pcap: handed to every device this server runs
        self.run_seconds = self.cpu_seconds = 0.0

    # -- connections ------------------------------------------------------------

    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        if self.channel is not None:
            log.warning("refusing a second front-end while one is connected")
            sock.close()
            return
        self.channel = Channel(sock, replies=False)
        self.session = BackendSession(faults=self.faults, offered=self.offered)
        self.sessions += 1
        self.backend.on_connect()
        self._ep.register(sock.fileno(), select.EPOLLIN)
        log.info("front-end connected (session %d)", self.sessions)

    def _disconnect(self, why: str) -> None:
        log.info("front-end gone: %s", why)
        for coal in self.coalesce.values():
            coal.owed = 0  # an interrupt held for the old rings means nothing now
        self._accumulate()
        self._unwatch_all()
        if self.channel is not None:
            self._ep.unregister(self.channel.fileno())
            self.channel.close()
        if self.session is not None:
            self.session.close()
        self.channel = None
        self.session = None

    def _accumulate(self) -> None:
        dev = self.session.device if self.session else None
        if dev is not None:
            for k, v in dev.stats.as_dict().items():
                if k.endswith("_max"):
                    self.totals[k] = max(self.totals.get(k, 0), v)
                else:
                    self.totals[k] = self.totals.get(k, 0) + v
            dev.stats = type(dev.stats)(tuple(dev.stats.as_dict()))

    def _on_socket(self) -> None:
        messages: list[Message] = []
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
        try:
            self.channel.send(answer)
        except OSError as e:
            self._disconnect(f"cannot reply to {spec_name(answer.request)}: {e}")
            return False
        return True

    def _serve(self, msg: Message) -> bool:
        dev_before = self.session.device
        if msg.request in (Req.GET_VRING_BASE, Req.SET_MEM_TABLE, Req.RESET_OWNER,
                           Req.RESET_DEVICE, Req.SET_VRING_ENABLE):  # fmt: skip
            self._accumulate()
        # Handlers close kick fds (GET_VRING_BASE, a new SET_VRING_KICK): take them out of
        # epoll first. A closed fd whose file the front-end still holds stays registered,
        # and QEMU re-sends that same eventfd on restart: register() would hit EEXIST.
        refd = msg.request in (Req.GET_VRING_BASE, Req.SET_VRING_KICK, Req.RESET_OWNER,
                               Req.RESET_DEVICE)  # fmt: skip
        if refd:
            self._unwatch_all()
        try:
            answer = self.session.handle(msg)
        except VhostUserProtocolError as e:
            self._protocol_error(e)
            if refd and self.channel is not None:
                self._rewatch()
            return self.channel is not None
        if answer is not None and not self._reply(answer):
            return False
        if msg.request is Req.SET_FEATURES and self.session.features:
            self.backend.on_features(self.session.features)
        if self.session.device is not None and self.session.device is not dev_before:
            self.session.device.capture = self.capture
        if refd or self.session.device is not dev_before or self.session.changed:
            self._rewatch()
        return True

    def _protocol_error(self, e: VhostUserProtocolError) -> None:
        log.error("protocol error: %s", e)
        nack = rejection_ack(e)
        if nack is not None and self.channel is not None and not self._reply(nack):
            return
        if not e.framing_intact or nack is None and e.request is not None and needs_reply(
            Message(e.request, e.flags or 1)
        ):
            self._disconnect(f"protocol error: {e}")

    # -- fds to watch -----------------------------------------------------------

    def _unwatch_all(self) -> None:
        for fd in list(self._watched):
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass
        self._watched.clear()

    def _rewatch(self) -> None:
        self._unwatch_all()
        s = self.session
        s.changed = False
        if s.device is None:
            return
        for name, vr in (("rx_kick", s.vrings[RX_Q]), ("tx_kick", s.vrings[TX_Q])):
            if vr.kick >= 0:
                self._watch(vr.kick, name)
        fd = self.backend.fileno()
        if fd is not None:
            self._watch(fd, "backend")

    def _watch(self, fd: int, name: str) -> None:
        self._ep.register(fd, select.EPOLLIN)
        self._watched[fd] = name

    # -- the data path ----------------------------------------------------------

    def _run_tx(self, dev: VirtnetDevice) -> bool:
        """Consume tx chains; True if there may be more right away."""
        txq = dev.txq
        txq.disable_notify()
        n = dev.process_tx(self.backend.xmit, BUDGET)
        self._log_ring_error(dev)
        if dev.flush_tx():
            self._interrupt(dev, TX_Q, n)
        return n == BUDGET  # kicks are re-armed in _idle, once nothing is left

    def _interrupt(self, dev: VirtnetDevice, q: int, packets: int) -> None:
        """The driver asked for an interrupt: send it, or hold it (--coalesce)."""
        if self.coalesce[q].want(packets, time.monotonic()):
            self._signal(dev, q)

    def _signal(self, dev: VirtnetDevice, q: int) -> None:
        signal_call(self.session.vrings[q].call)
        if q == RX_Q:
            dev.stats.rx_irqs += 1
        else:
            dev.stats.tx_irqs += 1

    def _expire_interrupts(self, dev: VirtnetDevice, idle: bool) -> None:
        if not self._coalescing:
            return
        now = time.monotonic()
        for q, coal in self.coalesce.items():
            if coal.expire(now, idle):
                self._signal(dev, q)

    def _poll_timeout(self, busy: bool) -> float:
        """epoll's timeout: 0 when busy, else until the next held interrupt is due."""
        if busy:
            return 0
        if not self._coalescing:
            return IDLE_POLL
        due = [d for c in self.coalesce.values() if (d := c.deadline()) is not None]
        if not due:
            return IDLE_POLL
        return max(0.0, min(due) - time.monotonic())

    @staticmethod
    def _log_ring_error(dev: VirtnetDevice) -> None:
        """Name what the driver got wrong (the counters only say how often)."""
        if dev.last_error:
            log.error("%s (desc_errors %d)", dev.last_error, dev.stats.desc_errors)
            dev.last_error = ""

    def _run_rx(self, dev: VirtnetDevice, backend_ready: bool) -> bool:
        if not (backend_ready or self.backend.has_rx()):
            return False
        rxq = dev.rxq
        rxq.disable_notify()
        n = self.backend.fill_rx(dev, BUDGET)
        self._log_ring_error(dev)
        if dev.flush_rx():
            self._interrupt(dev, RX_Q, n)
        if n == BUDGET:
            return True
        return self.backend.has_rx() and not dev.rx_starved

    def _idle(self, dev: VirtnetDevice) -> bool:
        """Nothing to do: busy-poll a while if asked (no kicks needed meanwhile, like
        vhost-net's busyloop_timeout), then re-arm kicks and recheck the race."""
        if self.busy_poll and self._spin(dev):
            return True
        more = dev.txq.enable_notify()
        if dev.rx_starved:
            more |= dev.rxq.enable_notify()  # wake us when the driver posts buffers
        return more

    def _spin(self, dev: VirtnetDevice) -> bool:
        end = time.perf_counter() + self.busy_poll
        txq, rxq, poll = dev.txq, dev.rxq, self._ep.poll
        while time.perf_counter() < end:
            if txq.avail_pending() or dev.rx_starved and rxq.avail_pending() or poll(0):
                return True  # level-triggered: the main poll sees the event again
        return False

    def serve(self, seconds: float = 0) -> dict:
        """Run until ``seconds`` pass (0: until SIGTERM/SIGINT)."""
        started, cpu0 = time.monotonic(), time.process_time()
        try:
            with RunClock(seconds, self.printer, self.stats) as clock:
                self._loop(clock)
        finally:
            self.run_seconds = time.monotonic() - started
            self.cpu_seconds = time.process_time() - cpu0
            if self.channel is not None:
                self._disconnect("stopping")
            self.close()
        return self.stats()

    def _loop(self, clock: RunClock) -> None:
        busy = False
        backend_ready = False
        passes = 0
        while clock.running():
            passes += 1
            # While the rings keep us busy, ask epoll only every few passes: kicks
            # need no syscall to be seen (the avail index says it), and a level-
            # triggered fd is still reported on the next look.
            events = self._ep.poll(self._poll_timeout(busy)) if not busy or passes % 4 == 0 else ()
            for fd, _ev in events:
                if fd == self.listener.fileno():
                    self._accept()
                elif self.channel is not None and fd == self.channel.fileno():
                    self._on_socket()
                elif self._watched.get(fd) in ("rx_kick", "tx_kick"):
                    drain_eventfd(fd)
                    # New rx buffers: a frame held for room may go in now.
                    backend_ready |= self._watched[fd] == "rx_kick"
                elif self._watched.get(fd) == "backend":
                    backend_ready = True
            dev = self.session.device if self.session else None
            busy = False
            if dev is not None:
                busy |= self._run_tx(dev)
                busy |= self._run_rx(dev, backend_ready)
                backend_ready = busy and backend_ready
                if not busy:
                    busy = self._idle(dev)
                self._expire_interrupts(dev, idle=not busy)

    def stats(self) -> dict:
        totals = dict(self.totals)
        dev = self.session.device if self.session else None
        if dev is not None:
            for k, v in dev.stats.as_dict().items():
                totals[k] = max(totals.get(k, 0), v) if k.endswith("_max") else (
                    totals.get(k, 0) + v)  # fmt: skip
        return {"device_stats": totals, "backend": self.backend.stats(),
                "sessions": self.sessions, "seconds": round(self.run_seconds, 4),
                "cpu_seconds": round(self.cpu_seconds, 4)}  # fmt: skip

    def close(self) -> None:
        self._ep.close()
        self.listener.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self.backend.close()
