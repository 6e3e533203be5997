"""One queue pair's device loop: its kicks, its back-end, its interrupts.

What vhost-net's worker thread does for a virtqueue pair (drivers/vhost/net.c
``handle_tx`` / ``handle_rx``), run in a worker process of its own
(``worker.spawn_worker``): epoll over the kick eventfds, the back-end's fd and
the request socket from the control process, a budget of packets per ring per
pass, and the call eventfds written when the driver asked for an interrupt
(or held a while, ``--coalesce``).

The requests (``workermsg``, served by its ``Dispatcher``: ``do_*`` here) hand
the loop its memory table, rings and eventfds; the control process keeps the
vhost-user session and never touches guest memory itself.

The same loop runs in the control process too (``virtnet device --in-process``,
``local.LocalSet``): there its requests are dispatched by direct call, its fds
are watched by the control process's epoll (``attach``) and the control loop
runs its passes (``on_fd``, ``run_pass``) between its own polls.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, final

from virtnet.net.coalesce import IrqCoalescer
from virtnet.net.device import VirtnetDevice
from virtnet.net.faults import FaultPlan
from virtnet.net.guest import build_device
from virtnet.net.layout import RX as RX_Q
from virtnet.net.layout import TX as TX_Q
from virtnet.net.mq import sum_stats
from virtnet.ports.backends import DeviceBackend
from virtnet.vhost_user.inflightmap import MappedInflight
from virtnet.vhost_user.logmap import MappedLog
from virtnet.vhost_user.mapping import MappedMemory, MappingError, close_maps
from virtnet.vhost_user.messages import VHOST_F_LOG_ALL, VringAddr, close_fds
from virtnet.vhost_user.polling import (
    IDLE_POLL,
    busy_poll,
    drain_eventfd,
    look_at_epoll,
    signal_call,
)
from virtnet.vhost_user.rings import RingSpec, log_addrs, ring_views
from virtnet.vhost_user.workermsg import (
    AddRegion,
    Connect,
    Dispatcher,
    Exit,
    Fds,
    Features,
    Inflight,
    Log,
    Memory,
    Rarp,
    RemRegion,
    Start,
    Stats,
    StatsRequest,
    Stop,
    Unmap,
    VringAddrUpdate,
)
from virtnet.virtio.dirtylog import DirtyLog
from virtnet.virtio.errors import MemoryAccessError
from virtnet.virtio.features import bit
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.inflight import InflightPacked, InflightSplit
from virtnet.virtio.ring.layout import PackedViews, VringViews
from virtnet.virtio.ring.packed import PackedQueueDevice
from virtnet.virtio.ring.split import SplitQueueDevice

if TYPE_CHECKING:
    from virtnet.ports.pcap import PcapWriter  # imported at the first --pcap (dpkt is slow)

log = logging.getLogger("virtnet.device")

BUDGET = 64  # packets per ring per loop pass (vhost-net's VHOST_NET_WEIGHT spirit)
# ethtool -C defaults for `virtnet device` (--coalesce overrides): no moderation.
DEFAULT_COALESCE = {"rx-usecs": 0, "rx-frames": 0, "tx-usecs": 0, "tx-frames": 0}
# A planted bug for the tests that show the dirty-log check can fail: "1" logs nothing,
# "rx-data" no rx frame data, "used" no ring writes (used entries, index, descriptors).
DEBUG_NO_DIRTY_LOG = "VIRTNET_DEBUG_NO_DIRTY_LOG"
# For the tests that show a conform case catches a back-end that keeps a wrong base: "1"
# starts every ring at SET_VRING_BASE even where the ring shows it is stale.
DEBUG_TRUST_VRING_BASE = "VIRTNET_DEBUG_TRUST_VRING_BASE"


def ring_pair(
    mem: GuestMemory, spec: RingSpec
) -> tuple[VringViews, VringViews] | tuple[PackedViews, PackedViews]:
    """The pair's rx and tx rings in the mapped memory, both of the spec's kind."""
    rx, tx = (ring_views(mem, spec.packed, spec.index(q), num, addr)
              for q, (num, addr) in enumerate(spec.rings))  # fmt: skip
    if isinstance(rx, PackedViews) and isinstance(tx, PackedViews):
        return rx, tx
    if isinstance(rx, VringViews) and isinstance(tx, VringViews):
        return rx, tx
    raise ValueError("the rx and tx rings are of different kinds")  # one spec.packed: never


def sync_bases_to_used(dev: VirtnetDevice) -> None:
    """A ring whose SET_VRING_BASE is stale continues from where the ring says the device
    was, with a warning: a split ring from its used index, a packed one from the used
    position its descriptors show (``sync_last_avail_to_used`` of each)."""
    for name, q in (("rx", dev.rxq), ("tx", dev.txq)):
        if isinstance(q, SplitQueueDevice):
            stale = q.sync_last_avail_to_used()
            if stale is not None:
                log.warning("%s ring: SET_VRING_BASE %d but the used ring's idx is %d: "
                            "continuing from %d (a restart after a crash: rx frames may be "
                            "lost, tx frames sent again)", name, stale, q.last_avail_idx,
                            q.last_avail_idx)  # fmt: skip
        elif isinstance(q, PackedQueueDevice):
            stale = q.sync_last_avail_to_used()
            if stale is not None:
                log.warning("%s ring: SET_VRING_BASE %#x is stale: its descriptors put "
                            "the device's used position at %d, wrap %d (QEMU 7.2 sends the "
                            "ring's start after a back-end crash); continuing from there (rx "
                            "frames may be lost, tx frames sent again)", name, stale,
                            q.used_pos, q.used_wrap)  # fmt: skip


@final
class PairLoop:
    """Serve one queue pair: its requests from the control process, its kicks, its back-end."""

    def __init__(
        self,
        pair: int,
        backend: DeviceBackend,
        *,
        coalesce: dict[str, int],
        busy_poll: float = 0.0,
        faults: FaultPlan | None = None,
        capture_path: str | None = None,
    ) -> None:
        self.pair = pair
        self.backend = backend
        self.busy_poll = busy_poll
        self.faults = faults
        self.capture_path = capture_path
        self.pcap: PcapWriter | None = None
        self.coalesce: dict[int, IrqCoalescer] = {
            RX_Q: IrqCoalescer(coalesce["rx-usecs"], coalesce["rx-frames"]),
            TX_Q: IrqCoalescer(coalesce["tx-usecs"], coalesce["tx-frames"]),
        }
        self._coalescing = any(c.enabled for c in self.coalesce.values())
        self.memory: MappedMemory | None = None
        self.dev: VirtnetDevice | None = None
        self.kick: list[int] = [-1, -1]  # [rx, tx] eventfds, -1: none
        self.call: list[int] = [-1, -1]
        self.totals: dict[str, int] = {}  # devices of earlier ring starts
        self.running = True
        self._ep = select.epoll()
        self._rpc: Dispatcher | None = None  # serve() makes it
        self._watched: set[int] = set()
        self._backend_ready = False  # the back-end's fd was readable: it has frames
        # Dirty logging: the log SET_LOG_BASE mapped, whether VHOST_F_LOG_ALL is on, the
        # rings' addresses for it (SET_VRING_ADDR may change their log flag at run time).
        self.log: MappedLog | None = None
        self.logging = False
        self.dirty: DirtyLog | None = None
        self._ring_addrs: list[VringAddr | None] = [None, None]
        self.log_totals = {"log_pages": 0, "log_flushes": 0, "log_beyond": 0}
        self._no_log = os.environ.get(DEBUG_NO_DIRTY_LOG, "")
        self._trust_base = os.environ.get(DEBUG_TRUST_VRING_BASE, "") == "1"
        # In-flight tracking: the region SET_INFLIGHT_FD mapped (both ring kinds).
        self.inflight: MappedInflight | None = None
        self.resubmitted = [0, 0]  # [rx, tx] chains taken again after a restart

    # -- requests ---------------------------------------------------------------------

    def dispatcher(self, sock: socket.socket | None = None,
                   events: socket.socket | None = None) -> Dispatcher:  # fmt: skip
        """Its requests' handlers; no sockets: called in-process (``local.LocalSet``)."""
        rpc = Dispatcher(sock, events, (MappingError, MemoryAccessError, ValueError, OSError))
        rpc.on(Connect, self.do_connect)
        rpc.on(Features, self.do_features)
        rpc.on(Memory, self.do_memory)
        rpc.on(Unmap, self.do_unmap)
        rpc.on(Start, self.do_start)
        rpc.on(Fds, self.do_fds)
        rpc.on(Stop, self.do_stop)
        rpc.on(StatsRequest, self.do_stats)
        rpc.on(Exit, self.do_exit)
        rpc.on(AddRegion, self.do_add_region)
        rpc.on(RemRegion, self.do_rem_region)
        rpc.on(Log, self.do_log)
        rpc.on(Inflight, self.do_inflight)
        rpc.on(VringAddrUpdate, self.do_vring_addr)
        rpc.on(Rarp, self.do_rarp)
        return rpc

    def _on_request(self) -> None:
        rpc = self._rpc
        assert rpc is not None  # serve() made it before it polls
        if not rpc.serve_one():
            self.running = False  # the control process is gone

    def do_connect(self, req: Connect, fds: list[int]) -> None:
        for coal in self.coalesce.values():
            coal.owed = 0  # an interrupt held for the old rings means nothing now
        self.backend.on_connect()

    def do_features(self, req: Features, fds: list[int]) -> None:
        self.backend.on_features(req.features)
        self.logging = bool(req.features & bit(VHOST_F_LOG_ALL))  # at any time, mid-stream too
        self._apply_log()

    # -- dirty logging ----------------------------------------------------------------

    def do_log(self, req: Log, fds: list[int]) -> None:
        """SET_LOG_BASE: map the new log (QEMU sends a bigger one as memory grows); the
        old one is flushed and dropped once the device logs to the new one."""
        if len(fds) != 1:
            close_fds(fds)
            raise ValueError(f"SET_LOG_BASE: {len(fds)} fds, expected the log's one")
        try:
            new = MappedLog(fds[0], req.size, req.offset)
        finally:
            close_fds(fds)
        if new.unsealed is not None:
            log.warning("dirty log: %s: a front-end that shrinks it kills this worker",
                        new.unsealed)  # fmt: skip
        old, self.log = self.log, new
        self._apply_log()
        close_maps(old)

    def do_inflight(self, req: Inflight, fds: list[int]) -> None:
        """SET_INFLIGHT_FD: map the region the next ring start tracks its chains in
        (a running pair keeps the one it started with)."""
        try:
            new = MappedInflight(fds[0], req.size, req.offset, req.num_queues,
                                 req.queue_size, req.packed) if fds else None  # fmt: skip
        finally:
            close_fds(fds)
        old, self.inflight = self.inflight, new
        close_maps(old)  # a running ring's views keep its mapping until the ring stops

    def _track_inflight(self, dev: VirtnetDevice, spec: RingSpec) -> bool:
        """Attach the in-flight region to the rings; False if there is none to use."""
        mapped = self.inflight
        if mapped is None:
            return False
        if mapped.packed != spec.packed:
            log.warning("queue pair %d: the in-flight region has the %s layout and the rings "
                        "are %s (features changed after GET_INFLIGHT_FD): not tracked",
                        spec.pair, "packed" if mapped.packed else "split",
                        "packed" if spec.packed else "split")  # fmt: skip
            return False
        for q, (ring, name) in enumerate(((dev.rxq, "rx"), (dev.txq, "tx"))):
            region = mapped.queue(spec.index(q), ring.num)
            fresh = region.fresh
            if isinstance(ring, SplitQueueDevice) and isinstance(region, InflightSplit):
                resub = ring.set_inflight(region)
                at = f"avail read on from {ring.last_avail_idx} (used idx {ring.used_idx}"
            elif isinstance(ring, PackedQueueDevice) and isinstance(region, InflightPacked):
                resub = ring.set_inflight(region)
                at = (f"avail read on from {ring.last_avail} wrap {ring.avail_wrap} (used "
                      f"{ring.used_pos} wrap {ring.used_wrap}")  # fmt: skip
            else:
                raise AssertionError("mapped.packed == spec.packed: one layout for both")
            self.resubmitted[q] += len(resub)
            if not fresh:
                base = spec.bases[q]
                log.info("%s ring: in-flight region recovered: %d chain%s resubmitted %s, "
                         "%s%s)", name, len(resub), "" if len(resub) == 1 else "s",
                         resub[:16], at, "" if base == ring.last_avail_idx
                         else f"; SET_VRING_BASE said {base:#x}" if spec.packed
                         else f"; SET_VRING_BASE said {base}")  # fmt: skip
        return True

    def do_vring_addr(self, req: VringAddrUpdate, fds: list[int]) -> None:
        """SET_VRING_ADDR of a running ring: QEMU re-sends it to set VHOST_VRING_F_LOG
        and log_guest_addr when logging starts and to clear them when it ends."""
        self._ring_addrs[req.q] = req.addr
        self._apply_log()

    def flush_log(self) -> None:
        """Write what the device cached of the dirty log out (every pass does)."""
        dirty = self.dirty
        if dirty is not None:
            dirty.flush()

    def _apply_log(self) -> None:
        """Attach the log to the device while logging is on and a log is mapped; detach
        it otherwise. Whatever the device cached for the old state is flushed first."""
        self.flush_log()
        old, dev, mapped = self.dirty, self.dev, self.log
        want = self.logging and mapped is not None and dev is not None
        dirty = mapped.dirty_log() if want and mapped is not None else None
        if old is not None and old is not dirty:
            self._count_log(old)
        self.dirty = dirty
        if dev is None:
            return
        rx_addr, tx_addr = self._ring_addrs
        if dirty is None or rx_addr is None or tx_addr is None or self.memory is None:
            dev.set_dirty_log(None, (0, 0), (0, 0))
            return
        mem = self.memory.memory
        dev.set_dirty_log(dirty, log_addrs(mem, rx_addr), log_addrs(mem, tx_addr))
        if self._no_log in ("1", "all"):
            dev.set_dirty_log(None, (0, 0), (0, 0))  # the planted bug: log nothing
        elif self._no_log == "rx-data":
            dev.dirty = None
        elif self._no_log == "used":
            dev.rxq.set_dirty_log(None, 0, 0)
            dev.txq.set_dirty_log(None, 0, 0)

    def _count_log(self, dirty: DirtyLog) -> None:
        """Move a log's counters into the totals (it is being replaced or detached)."""
        t = self.log_totals
        t["log_pages"] += dirty.pages_logged
        t["log_flushes"] += dirty.flushes
        t["log_beyond"] += dirty.beyond
        dirty.pages_logged = dirty.flushes = dirty.beyond = 0

    def log_stats(self) -> dict[str, int]:
        t = dict(self.log_totals)
        if self.dirty is not None:
            t["log_pages"] += self.dirty.pages_logged
            t["log_flushes"] += self.dirty.flushes
            t["log_beyond"] += self.dirty.beyond
        return t

    def do_rarp(self, req: Rarp, fds: list[int]) -> bool:
        """SEND_RARP: ``frame`` out of this pair's port, as a frame the guest sent
        (virtio-net header first, zeroed); False if the port pushed back."""
        from virtnet.net.header import MRG_HDR_LEN

        return self.backend.xmit([memoryview(bytes(MRG_HDR_LEN)), memoryview(req.frame)],
                                 len(req.frame))  # fmt: skip

    def do_memory(self, req: Memory, fds: list[int]) -> None:
        """Map the front-end's memory table: (gpa, size, uva, mmap_offset) per fd."""
        try:
            self._unmap()
        except BaseException:
            close_fds(fds)
            raise
        memory = MappedMemory()
        try:
            for (gpa, size, uva, offset), fd in zip(req.regions, fds, strict=True):
                memory.add(fd, gpa, size, uva, offset)
        except Exception:
            memory.close()
            raise
        finally:
            close_fds(fds)
        self.memory = memory

    def do_add_region(self, req: AddRegion, fds: list[int]) -> None:
        """ADD_MEM_REG: map one more region (gpa, size, uva, mmap_offset) of ``fds[0]``.

        Requests are served between bursts, so a running device sees it from its next
        descriptor on: before the control process replies, hence before the front-end
        can point a descriptor into it.
        """
        gpa, size, uva, offset = req.region
        if self.memory is None:
            self.memory = MappedMemory()
        try:
            (fd,) = fds
            self.memory.add(fd, gpa, size, uva, offset)
        finally:
            close_fds(fds)  # the mapping keeps the memory

    def do_rem_region(self, req: RemRegion, fds: list[int]) -> None:
        """REM_MEM_REG: unmap the region (gpa, size, uva); the control process has
        checked that no ring of a running pair lies in it."""
        if self.memory is None:
            raise ValueError(f"no region at gpa {req.region[0]:#x}: no memory is mapped")
        self.memory.remove(*req.region)

    def do_unmap(self, req: Unmap, fds: list[int]) -> None:
        self._unmap()
        self._drop_inflight()

    def _drop_inflight(self) -> None:
        """The session is over: its in-flight region with it (a new SET_MEM_TABLE keeps it)."""
        close_maps(self.inflight)
        self.inflight = None

    def _unmap(self) -> None:
        self._stop()
        close_maps(self.log, self.memory)
        self.log = self.memory = None

    def do_start(self, req: Start, fds: list[int]) -> None:
        """Run the pair's device: ``fds`` are the kick/call eventfds ``spec.fd_mask`` names."""
        spec = req.spec
        try:
            self._stop()
        finally:
            self._take_fds(spec.fd_mask, fds)
        if self.memory is None:
            raise ValueError("a ring start before any memory table")
        mem = self.memory.memory
        dev = build_device(mem, ring_pair(mem, spec), spec.features, spec.bases, spec.mtu)
        if not self._track_inflight(dev, spec) and not self._trust_base:
            sync_bases_to_used(dev)
        if self.faults is not None:
            self.faults.install(dev)
        dev.capture = self._capture()
        self.dev = dev
        self.logging = bool(spec.features & bit(VHOST_F_LOG_ALL))
        self._ring_addrs = [spec.rings[0][1], spec.rings[1][1]]
        self._apply_log()
        self.backend.on_queue_enabled(True)
        self._rewatch()
        # One interrupt per ring at every start: a device that died (or was stopped) after
        # publishing used entries but before their interrupt leaves the driver's used_event
        # behind the used index, so with EVENT_IDX no later entry would ever interrupt it
        # and the guest's rx stalls for good. Spurious interrupts are harmless (2.7.7.2).
        signal_call(self.call[RX_Q])
        signal_call(self.call[TX_Q])

    def do_fds(self, req: Fds, fds: list[int]) -> None:
        """New kick/call eventfds for a running pair (QEMU re-sends calls at run time)."""
        self._take_fds(req.mask, fds)
        self._rewatch()

    def do_stop(self, req: Stop, fds: list[int]) -> tuple[int, int] | None:
        return self._stop()

    def _stop(self, release: bool = True) -> tuple[int, int] | None:
        """Stop the device; where each ring stopped (GET_VRING_BASE), or None if idle.
        ``release``: use the chains ``--faults hold`` kept (a stop the session asked
        for); not when the control process is gone, which is a crash like its own."""
        dev = self.dev
        bases = None
        if dev is not None:
            if self.faults is not None and release:
                self.faults.release(dev)  # before the log's flush: it logs their used entries
            self.flush_log()  # before GET_VRING_BASE's reply: QEMU's last sync follows it
            dev.set_dirty_log(None, (0, 0), (0, 0))
            if self.dirty is not None:
                self._count_log(self.dirty)
                self.dirty = None
            dev.reset()
            bases = dev.last_avail_idx
            self.totals = sum_stats([self.totals, dev.stats.as_dict()])
            self.dev = None
            try:
                self.backend.on_queue_enabled(False)
            except OSError as e:  # the rings did stop: GET_VRING_BASE still gets its bases
                log.warning("stopping the port's queue: %s", e)
        self._take_fds((False,) * 4, [])
        self._rewatch()
        return bases

    def do_stats(self, req: StatsRequest, fds: list[int]) -> Stats:
        return self.stats()

    def stats(self) -> Stats:
        dev = [self.dev.stats.as_dict()] if self.dev is not None else []
        return {"device_stats": sum_stats([self.totals, *dev]),
                "backend": self.backend.stats(),
                "dirty_log": self.log_stats(),
                "inflight": {"rx_resubmitted": self.resubmitted[0],
                             "tx_resubmitted": self.resubmitted[1]},
                "cpu_seconds": time.process_time()}  # fmt: skip

    def do_exit(self, req: Exit, fds: list[int]) -> Stats:
        self._unmap()
        self._drop_inflight()
        self.running = False
        return self.stats()

    def _take_fds(self, mask: tuple[bool, ...], fds: list[int]) -> None:
        old = [fd for fd in (*self.kick, *self.call) if fd >= 0]
        self._unwatch_all()
        close_fds(old)
        it = iter(fds)
        new = [next(it) if present else -1 for present in mask]
        self.kick, self.call = [new[0], new[2]], [new[1], new[3]]

    def _capture(self) -> Callable[[Sequence[memoryview], int], None] | None:
        if self.capture_path is None:
            return None
        if self.pcap is None:
            from virtnet.net.header import MRG_HDR_LEN
            from virtnet.ports.pcap import PcapWriter

            self.pcap = PcapWriter(self.capture_path, MRG_HDR_LEN)
        return self.pcap.write_views

    # -- fds to watch -----------------------------------------------------------------

    def _unwatch_all(self) -> None:
        for fd in self._watched:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass
        self._watched.clear()

    def _rewatch(self) -> None:
        self._unwatch_all()
        if self.dev is None:
            return
        for fd in (*self.kick, self.backend.fileno()):
            if fd is not None and fd >= 0:
                self._ep.register(fd, select.EPOLLIN)
                self._watched.add(fd)

    # -- the data path ----------------------------------------------------------------

    def serve(self, sock: socket.socket, events: socket.socket) -> None:
        """A worker's whole life: requests on ``sock``, passes until Exit."""
        self._rpc = self.dispatcher(sock, events)
        self._ep.register(sock.fileno(), select.EPOLLIN)
        try:
            self._loop(sock.fileno())
        finally:
            self.close()
            self.backend.close()  # the worker's copy; in process PairLoops owns it

    def attach(self, ep: select.epoll) -> None:
        """In-process: watch this pair's fds in the control process's ``ep``."""
        self._unwatch_all()
        self._ep.close()
        self._ep = ep
        self._rewatch()

    def close(self) -> None:
        """Stop the device and close the capture: the loop is over. Its back-end lives
        on (a fresh loop for the pair takes it over; PairLoops closes it at the end)."""
        if self.dev is not None:
            self._stop(release=False)  # no session asked: the control process is gone
        if self.pcap is not None:
            self.pcap.close()
            self.pcap = None

    def watches(self, fd: int) -> bool:
        return fd in self._watched

    def on_fd(self, fd: int) -> None:
        """One of this pair's watched fds is readable: a kick, or the back-end's fd."""
        kicks = self.kick
        if fd == kicks[RX_Q] or fd == kicks[TX_Q]:
            drain_eventfd(fd)
            # New rx buffers: a frame held for room may go in now.
            self._backend_ready |= fd == kicks[RX_Q]
        elif fd in self._watched:
            self._backend_ready = True

    def _loop(self, sock_fd: int) -> None:
        busy = False
        passes = 0
        ep = self._ep
        while self.running:
            passes += 1
            if look_at_epoll(busy, passes):
                for fd, _ev in ep.poll(self.poll_timeout(busy)):
                    if fd == sock_fd:
                        self._on_request()
                    else:
                        self.on_fd(fd)
            busy = self.run_pass()

    def run_pass(self) -> bool:
        """Both rings' work for one pass; True if there may be more right away."""
        dev = self.dev
        if dev is None:
            return False
        backend_ready = self._backend_ready
        busy = self._run_tx(dev)
        busy |= self._run_rx(dev, backend_ready)
        self._backend_ready = busy and backend_ready
        if not busy:
            busy = self._idle(dev)
        self._expire_interrupts(dev, idle=not busy)
        if self.dirty is not None:
            self.dirty.flush()  # the pass's pages, one OR per bitmap word
        return busy

    def _run_tx(self, dev: VirtnetDevice) -> bool:
        """Consume tx chains; True if there may be more right away."""
        dev.txq.disable_notify()
        n = dev.process_tx(self.backend.xmit, BUDGET)
        self._log_ring_error(dev)
        if dev.flush_tx():
            self._interrupt(dev, TX_Q, n)
        return n == BUDGET  # kicks are re-armed in _idle, once nothing is left

    def _run_rx(self, dev: VirtnetDevice, backend_ready: bool) -> bool:
        if not (backend_ready or self.backend.has_rx()):
            return False
        dev.rxq.disable_notify()
        n = 0
        while True:
            k = self.backend.fill_rx(dev, BUDGET - n)
            n += k
            # Stopped at RX_USED_BATCH buffers: publish them, so the driver drains
            # (and refills) that batch while this pass fills the next.
            batch = n < BUDGET and dev.rx_batch_full()
            self._log_ring_error(dev)
            if dev.flush_rx():
                self._interrupt(dev, RX_Q, k)
            if not batch:
                break
        if n == BUDGET:
            return True
        return self.backend.has_rx() and not dev.rx_starved

    def _interrupt(self, dev: VirtnetDevice, q: int, packets: int) -> None:
        """The driver asked for an interrupt: send it, or hold it (--coalesce)."""
        if self.coalesce[q].want(packets, time.monotonic()):
            self._signal(dev, q)

    def _signal(self, dev: VirtnetDevice, q: int) -> None:
        signal_call(self.call[q])
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

    def poll_timeout(self, busy: bool) -> float:
        """epoll's timeout: 0 when busy, else until the next held interrupt is due."""
        if busy:
            return 0.0
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
        txq, rxq = dev.txq, dev.rxq

        def ready() -> bool:  # the driver sent, or posted rx buffers we wait for
            return bool(txq.avail_pending() or dev.rx_starved and rxq.avail_pending())

        return busy_poll(self._ep, self.busy_poll, ready)


@final
class PairLoops:
    """What makes each queue pair's ``PairLoop``: the pairs' traffic back-ends (one
    each, kept for the server's life) and the options every pair runs with. The
    control process hands it to its runner, which calls it in the worker (or, in
    process, here) as the pair starts; ``close`` closes this process's back-ends."""

    def __init__(
        self,
        backends: list[DeviceBackend],
        *,
        coalesce: dict[str, int] | None = None,
        busy_poll_us: int = 0,
        faults: FaultPlan | None = None,
        pcap_path: str | None = None,
    ) -> None:
        self.backends = backends
        self.coalesce = DEFAULT_COALESCE | (coalesce or {})
        self.busy_poll = busy_poll_us / 1e6
        self.faults = faults
        self.pcap_path = pcap_path

    def __len__(self) -> int:
        return len(self.backends)

    def __call__(self, pair: int) -> PairLoop:
        return PairLoop(pair, self.backends[pair], coalesce=self.coalesce,
                        busy_poll=self.busy_poll, faults=self.faults,
                        capture_path=self._capture_path(pair))  # fmt: skip

    def _capture_path(self, pair: int) -> str | None:
        """--pcap F: pair 0 writes F, pair N ``F.qN`` (before its extension)."""
        capture = self.pcap_path
        if capture is not None and pair:
            root, dot, ext = capture.rpartition(".")
            capture = f"{root}.q{pair}.{ext}" if dot else f"{capture}.q{pair}"
        return capture

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
