"""One queue pair's driver loop: interrupts in, kicks out, the back-end's frames both ways.

What Linux's virtio_net does for a queue pair between its interrupt handlers
and NAPI (``skb_recv_done`` → ``virtnet_poll``; ``start_xmit`` and
``free_old_xmit_skbs``), as one epoll loop over the call eventfds, the
back-end's fd and whatever else the caller watches. ``virtnet driver`` runs
its pairs (``PairWorker``, made by ``PairDrivers``) in the control process with
one pair, and each in a worker process of its own with more: in a worker the
loop is ``run``'s; in process, the control loop's epoll and ``run_pass``.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, final

from virtnet.net.driver import VirtnetDriver
from virtnet.net.guest import build_driver
from virtnet.net.layout import RX, TX, GuestLayout
from virtnet.net.xdp import XdpHook, XdpProgram
from virtnet.ports.backends import DriverBackend, LoopbackDriver
from virtnet.vhost_user.polling import busy_poll, drain_eventfd, look_at_epoll
from virtnet.vhost_user.workermsg import Dispatcher, Drain, Finish, Stats, StatsRequest, Stop
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.layout import VRING_PACKED_EVENT_F_WRAP_CTR
from virtnet.virtio.ring.packed import PackedQueueDriver
from virtnet.virtio.ring.queue import RingDriver

if TYPE_CHECKING:
    from virtnet.ports.pcap import PcapWriter  # imported at the first --pcap (dpkt is slow)

log = logging.getLogger("virtnet.driver")

NAPI_BUDGET = 64
TX_BUDGET = 64
IDLE_TIMEOUT = 0.2  # seconds the loop sleeps with nothing to do (an interrupt wakes it)
TX_DRAIN_TIMEOUT = 2.0  # close(): how long the back-end gets to use what was sent


def used_position(vq: RingDriver) -> int:
    """How far the driver has taken used buffers: a split ring's last_used_idx, a
    packed ring's slot and wrap counter (as its enable_cb_prepare puts them)."""
    if isinstance(vq, PackedQueueDriver):
        return vq.last_used | vq.used_wrap << VRING_PACKED_EVENT_F_WRAP_CTR
    return vq.last_used_idx


@final
class PairDriver:
    """One queue pair's driver and its event loop: interrupts in, kicks out, the
    back-end's frames both ways. ``virtnet driver`` runs pair 0 in-process with one
    pair, and each pair in a worker process of its own with more (``--queues``)."""

    def __init__(self, pair: int, drv: VirtnetDriver, backend: DriverBackend,
                 kick: list[int], call: list[int], busy_poll: float = 0.0) -> None:  # fmt: skip
        self.pair = pair
        self.drv = drv
        self.backend = backend
        self.kick = kick  # [rx, tx] eventfds
        self.call = call
        self.busy_poll = busy_poll
        self.stop = False  # set by a watched fd's callback: the loop returns
        self.broken = ""  # a queue the device broke (BAD_RING): why the session ended
        self._ep: select.epoll | None = None  # while attached
        self._tap_watched = True
        self._rx_pending = True  # an rx interrupt came, or the last poll used its budget
        self._tx_ready = False  # a tx interrupt came, or the back-end has frames
        self._quiet_at = -1  # the rx used idx at the last idle check with buffers waiting
        self._quiet_since = -1.0  # when the pair last went idle (-1: it is not)

    def _kick(self, q: int) -> None:
        os.eventfd_write(self.kick[q], 1)

    def run(self, running: Callable[[], bool], watch: dict[int, Callable[[], object]]) -> None:
        """Serve the pair while ``running()``; ``watch``: more fds and their callbacks."""
        ep = select.epoll()
        self.attach(ep)
        for fd in watch:
            ep.register(fd, select.EPOLLIN)
        busy = True
        passes = 0
        try:
            while running() and not self.stop:
                passes += 1
                if look_at_epoll(busy, passes):
                    for fd, _ in ep.poll(self.poll_timeout(busy)):
                        if fd in watch:
                            watch[fd]()
                        else:
                            self.on_fd(fd)
                if self.stop:
                    break
                busy = self.run_pass()
                if self.broken:
                    break
        finally:
            self.detach()
            ep.close()

    def attach(self, ep: select.epoll) -> None:
        """Watch this pair's interrupts and its back-end's fd in ``ep`` (its own loop's,
        or in process the control loop's)."""
        self._ep = ep
        self._tap_watched = True
        ep.register(self.call[RX], select.EPOLLIN)
        ep.register(self.call[TX], select.EPOLLIN)
        bfd = self.backend.fileno()
        if bfd is not None:
            ep.register(bfd, select.EPOLLIN)
        self._rx_pending = True
        self._tx_ready = self.backend.has_tx()
        self._quiet_at = -1
        self._quiet_since = -1.0
        self.drv.svq.disable_cb()

    def detach(self) -> None:
        ep, self._ep = self._ep, None
        if ep is None:
            return
        for fd in (self.call[RX], self.call[TX], self.backend.fileno()):
            if fd is not None:
                try:
                    ep.unregister(fd)
                except (OSError, ValueError):
                    pass  # closed already

    def watches(self, fd: int) -> bool:
        return fd == self.call[RX] or fd == self.call[TX] or fd == self.backend.fileno()

    def on_fd(self, fd: int) -> None:
        """A watched fd is readable: an interrupt, or the back-end has frames to send."""
        if fd == self.call[RX]:
            drain_eventfd(fd)
            self._rx_pending = True
        elif fd == self.call[TX]:
            drain_eventfd(fd)
            self._tx_ready = True
        else:
            self._tx_ready = True
        self._quiet_since = -1.0

    def poll_timeout(self, busy: bool) -> float:
        return 0.0 if busy else IDLE_TIMEOUT

    def run_pass(self) -> bool:
        """One NAPI poll and one tx round; True if there may be more right away. Idle,
        it busy-polls a while if asked (before the caller sleeps in epoll), and after a
        whole quiet IDLE_TIMEOUT looks for a lost interrupt."""
        drv = self.drv
        if self._tx_ready:
            # The used index says what an rx interrupt would, whether or not epoll was
            # looked at: a tx-busy pair still drains rx every pass (as NAPI would).
            self._rx_pending = self._rx_pending or drv.rvq.more_used()
        if self._rx_pending:
            received, kick = drv.poll(NAPI_BUDGET)
            if kick:
                self._kick(RX)
            if drv.svq.num_added and drv.tx_kick():
                self._kick(TX)  # the stack sent from rx (loopback echoes)
            self._rx_pending = kick or received == NAPI_BUDGET
        if self._tx_ready:
            self._tx_ready = self._run_tx()
        if drv.broken:
            # Linux: the queue stays broken until a reset; the session ends
            # here with the reason instead of spinning through garbage.
            self.broken = drv.broken
        busy = self._rx_pending or self._tx_ready
        if not busy and self.busy_poll and self._ep is not None:
            busy = self._rx_pending = self._spin(self._ep)
        if busy:
            self._quiet_since = -1.0
        else:
            self._idle()
        return busy

    def _idle(self) -> None:
        """Nothing to do: once the pair stayed quiet through an epoll wait (no event,
        no work), check for a lost interrupt (``_check_lost_irq``: named at the second)."""
        now = time.monotonic()
        if self._quiet_since < 0:
            self._quiet_since = now  # it goes quiet now: the caller's epoll wait follows
        elif now - self._quiet_since >= IDLE_TIMEOUT / 2:
            self._rx_pending, self._quiet_at = self._check_lost_irq(self._quiet_at)
            self._quiet_since = now

    def _check_lost_irq(self, quiet_at: int) -> tuple[bool, int]:
        """An idle timeout with used rx buffers waiting, and still the same ones at the
        next: the device owed an interrupt (callbacks are on) and did not send it.
        Named once per stall (fault irq_drop), then polled as if it had come."""
        rvq = self.drv.rvq
        if not rvq.more_used():
            return False, -1
        idx = used_position(rvq)
        if quiet_at != idx:
            return False, idx
        self.drv.faults.report("irq_drop", f"vq {rvq.index}: used buffers waited "
                               f"{2 * IDLE_TIMEOUT:g} s with no interrupt")  # fmt: skip
        return True, -1

    def _spin(self, ep: select.epoll) -> bool:
        """Busy-poll the rx used ring (callbacks off: the device need not signal)
        and our fds for a while; re-arm callbacks before giving up."""
        rvq = self.drv.rvq
        rvq.disable_cb()
        if busy_poll(ep, self.busy_poll, rvq.more_used):
            return True  # poll() re-arms callbacks when it drains the ring
        return not rvq.enable_cb()

    def _watch_tap(self, on: bool) -> None:
        """Stop reading the tap while a frame waits for ring room (its fd stays readable)."""
        bfd = self.backend.fileno()
        if bfd is not None and self._ep is not None and on != self._tap_watched:
            self._ep.modify(bfd, select.EPOLLIN if on else 0)
            self._tap_watched = on

    def _run_tx(self) -> bool:
        drv = self.drv
        drv.free_old_xmit_skbs()
        n = self.backend.produce(drv, TX_BUDGET)
        if n and drv.tx_kick():
            self._kick(TX)
        if n == TX_BUDGET:
            return True
        self._watch_tap(not self.backend.has_tx())
        if not self.backend.has_tx():
            return False  # the tap's fd (or nothing) says when there is more
        # Ring or pool full: ask for a tx interrupt, recheck the race.
        if drv.svq.enable_cb():
            return False
        drv.svq.disable_cb()
        return True

    def drain_tx(self, timeout: float, watch: dict[int, Callable[[], object]]) -> None:
        """Wait (bounded) until the back-end has used every tx buffer sent.

        A clean stop then loses nothing in flight, and both ends count the same
        tx packets; buffers still unused at the deadline are dropped by remove().
        """
        drv = self.drv
        if drv.svq.broken:
            return
        if drv.svq.num_added and drv.tx_kick():
            self._kick(TX)
        deadline = time.monotonic() + timeout
        while True:
            drv.free_old_xmit_skbs()
            if not drv.svq.in_flight or self.stop:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("the back-end did not use %d tx buffers within %gs: dropping them",
                            drv.svq.in_flight, timeout)  # fmt: skip
                return
            if not drv.svq.enable_cb():  # used buffers arrived while arming: reap them
                continue
            ready, _, _ = select.select([self.call[TX], *watch], [], [], min(left, 0.05))
            if self.call[TX] in ready:
                drain_eventfd(self.call[TX])
            for fd in ready:
                if fd in watch:
                    watch[fd]()

    def finish(self) -> None:
        """The rings are stopped: take what the device finished, free every page."""
        drv = self.drv
        drv.free_old_xmit_skbs()
        if isinstance(self.backend, LoopbackDriver):
            self.backend.drv = None  # the rings are stopped: echoes now are drops
        if drv.rx.xdp is not None:
            drv.rx.xdp.tx_enabled = False  # likewise XDP_TX
        while drv.poll(1 << 16)[1]:  # what the device finished before stopping
            pass  # (a poll that refilled half the ring returns early, for its kick)
        self.backend.release(drv)
        self.backend.close()
        drv.remove()

    def stats(self) -> dict[str, object]:
        return {"driver_stats": self.drv.stats.as_dict(), "backend": self.backend.stats(),
                "cpu_seconds": time.process_time()}  # fmt: skip


@final
class PairWorker:
    """A queue pair's driver behind the worker protocol: in a worker process of its own
    (``serve``), or in the control process (``local.LocalSet``: ``run_pass``...). It runs
    until told to stop, then drains tx, and after the control process stopped the
    rings, finishes."""

    def __init__(self, pair: PairDriver) -> None:
        self.pair = pair
        self.running = True  # False once Finish was served
        self._rpc: Dispatcher | None = None
        self._told = False  # the pair's break was sent as an event

    def dispatcher(self, sock: socket.socket | None = None,
                   events: socket.socket | None = None) -> Dispatcher:  # fmt: skip
        rpc = self._rpc = Dispatcher(sock, events)
        rpc.on(Stop, self._stop)
        rpc.on(Drain, self._drain)
        rpc.on(Finish, self._finish)
        rpc.on(StatsRequest, self._stats)
        return rpc

    def serve(self, sock: socket.socket, events: socket.socket) -> None:
        rpc = self.dispatcher(sock, events)
        self.pair.run(lambda: True, {sock.fileno(): self._on_request})
        self._tell_broken()
        # Stopped (or broken): the rest is the control process's sequence.
        while self.running and rpc.serve_one():
            pass

    def _on_request(self) -> None:
        assert self._rpc is not None  # serve() made it before it runs the loop
        if not self._rpc.serve_one():
            self.pair.stop = True  # the control process is gone

    def _tell_broken(self) -> None:
        if self.pair.broken and not self._told and self._rpc is not None:
            self._told = True
            self._rpc.event(self.pair.broken)

    # In process: the control loop's epoll and passes.

    def attach(self, ep: select.epoll) -> None:
        self.pair.attach(ep)

    def watches(self, fd: int) -> bool:
        return self.pair.watches(fd)

    def on_fd(self, fd: int) -> None:
        self.pair.on_fd(fd)

    def run_pass(self) -> bool:
        pair = self.pair
        if pair.stop or pair.broken:
            return False
        busy = pair.run_pass()
        if pair.broken:
            pair.detach()  # its loop is over, as a worker's run() returns
            self._tell_broken()
            return False
        return busy

    def poll_timeout(self, busy: bool) -> float:
        return self.pair.poll_timeout(busy)

    def close(self) -> None:
        self.pair.detach()

    # The requests.

    def _stop(self, req: Stop, fds: list[int]) -> None:
        self.pair.stop = True
        self.pair.detach()

    def _drain(self, req: Drain, fds: list[int]) -> None:
        self.pair.stop = False
        self.pair.drain_tx(TX_DRAIN_TIMEOUT, {})

    def _finish(self, req: Finish, fds: list[int]) -> Stats:
        self.pair.finish()
        self.running = False
        return self.pair.stats()

    def _stats(self, req: StatsRequest, fds: list[int]) -> Stats:
        return self.pair.stats()


@final
class PairDrivers:
    """What ``virtnet driver`` runs on each queue pair: its back-end, the rx strategy, the
    options every pair shares. ``build`` makes each pair's driver over the guest memory
    once the features are known; ``loop(pair)`` is what runs it (``PairWorker``)."""

    def __init__(
        self,
        backends: list[DriverBackend],
        *,
        strategy: str = "deferred",
        busy_poll_us: int = 0,
        xdp: XdpProgram | None = None,
        xdp_name: str = "",
        pcap_path: str | None = None,
    ) -> None:
        self.backends = backends
        self.strategy = strategy  # what was asked; build() says what the features allow
        self.busy_poll = busy_poll_us / 1e6
        self.xdp = xdp
        self.xdp_name = xdp_name
        self.pcap_path = pcap_path
        self.pcap: PcapWriter | None = None
        self.pairs: list[PairDriver] = []

    def __len__(self) -> int:
        return len(self.backends)

    def on_features(self, features: int) -> None:
        for backend in self.backends:
            backend.on_features(features)

    def build(self, memory: GuestMemory, layouts: list[GuestLayout], features: int,
              kick: list[int], call: list[int], memory_breaks: frozenset[int]) -> str:  # fmt: skip
        """Each pair's driver over ``layouts[pair]``; the rx strategy that runs."""
        for p, backend in enumerate(self.backends):
            drv = build_driver(memory, layouts[p], features, self.strategy,
                               netif_receive_skb=backend.netif_receive_skb)  # fmt: skip
            drv.memory_breaks = memory_breaks
            if isinstance(backend, LoopbackDriver):
                backend.drv = drv
            if self.xdp is not None:
                drv.rx.attach_xdp(XdpHook(self.xdp, drv.stats, name=self.xdp_name or None,
                                          redirect=backend.xdp_redirect))  # fmt: skip
            if self.pcap_path is not None and p == 0:
                from virtnet.ports.pcap import PcapWriter

                self.pcap = PcapWriter(self.pcap_path, drv.hdr_len)
                drv.capture = self.pcap.write_views
            self.pairs.append(PairDriver(p, drv, backend, kick[2 * p : 2 * p + 2],
                                         call[2 * p : 2 * p + 2], self.busy_poll))  # fmt: skip
        return self.pairs[0].drv.strategy

    def fill(self, pair: int) -> None:
        """try_fill_recv before DRIVER_OK, and the kick that tells the device."""
        p = self.pairs[pair]
        if p.drv.try_fill_recv():
            p._kick(RX)

    def loop(self, pair: int) -> PairWorker:
        return PairWorker(self.pairs[pair])

    def finish(self, pair: int) -> Stats:
        """A pair that never ran (past --combined): its buffers are here."""
        p = self.pairs[pair]
        p.finish()
        return p.stats()

    def stats(self, pair: int) -> Stats:
        return self.pairs[pair].stats()

    def close(self) -> None:
        self.pairs = []
        if self.pcap is not None:
            self.pcap.close()
            self.pcap = None
