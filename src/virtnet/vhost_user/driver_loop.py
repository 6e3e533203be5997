"""One queue pair's driver loop: interrupts in, kicks out, the back-end's frames both ways.

What Linux's virtio_net does for a queue pair between its interrupt handlers
and NAPI (``skb_recv_done`` → ``virtnet_poll``; ``start_xmit`` and
``free_old_xmit_skbs``), as one epoll loop over the call eventfds, the
back-end's fd and whatever else the caller watches. ``virtnet driver`` runs
pair 0 in-process with one pair, and each pair in a worker process of its own
with more (``frontend.PairWorker``).
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from typing import final

from virtnet.net.driver import VirtnetDriver
from virtnet.net.guest import RX, TX
from virtnet.ports.backends import DriverBackend, LoopbackDriver
from virtnet.vhost_user.polling import busy_poll, drain_eventfd, look_at_epoll
from virtnet.virtio.ring.layout import VRING_PACKED_EVENT_F_WRAP_CTR
from virtnet.virtio.ring.packed import PackedQueueDriver
from virtnet.virtio.ring.queue import RingDriver

log = logging.getLogger("virtnet.driver")

NAPI_BUDGET = 64
TX_BUDGET = 64
IDLE_TIMEOUT = 0.2  # seconds the loop sleeps with nothing to do (an interrupt wakes it)


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
        self._ep: select.epoll | None = None  # while run() runs
        self._tap_watched = True

    def _kick(self, q: int) -> None:
        os.eventfd_write(self.kick[q], 1)

    def run(self, running: Callable[[], bool], watch: dict[int, Callable[[], object]]) -> None:
        """Serve the pair while ``running()``; ``watch``: more fds and their callbacks."""
        drv = self.drv
        ep = self._ep = select.epoll()
        self._tap_watched = True
        call_rx, call_tx = self.call[RX], self.call[TX]
        ep.register(call_rx, select.EPOLLIN)
        ep.register(call_tx, select.EPOLLIN)
        for fd in watch:
            ep.register(fd, select.EPOLLIN)
        bfd = self.backend.fileno()
        if bfd is not None:
            ep.register(bfd, select.EPOLLIN)
        rx_pending = True
        tx_ready = self.backend.has_tx()
        quiet_at = -1  # the rx used idx at the last idle timeout with buffers waiting
        drv.svq.disable_cb()
        passes = 0
        try:
            while running() and not self.stop:
                busy = rx_pending or tx_ready
                if not busy and self.busy_poll:
                    busy = rx_pending = self._spin(ep)
                passes += 1
                if look_at_epoll(busy, passes):
                    events = ep.poll(0.0 if busy else IDLE_TIMEOUT)
                    if not events and not busy:
                        rx_pending, quiet_at = self._check_lost_irq(quiet_at)
                    for fd, _ in events:
                        if fd == call_rx:
                            drain_eventfd(fd)
                            rx_pending = True
                        elif fd == call_tx:
                            drain_eventfd(fd)
                            tx_ready = True
                        elif fd == bfd:
                            tx_ready = True
                        elif fd in watch:
                            watch[fd]()
                else:
                    # Between looks, the used index says what an rx interrupt would:
                    # a tx-busy pair still drains rx every pass (as NAPI would).
                    rx_pending = rx_pending or drv.rvq.more_used()
                if self.stop:
                    break
                if rx_pending:
                    received, kick = drv.poll(NAPI_BUDGET)
                    if kick:
                        self._kick(RX)
                    if drv.svq.num_added and drv.tx_kick():
                        self._kick(TX)  # the stack sent from rx (loopback echoes)
                    rx_pending = received == NAPI_BUDGET
                if tx_ready:
                    tx_ready = self._run_tx()
                if drv.broken:
                    # Linux: the queue stays broken until a reset; the session ends
                    # here with the reason instead of spinning through garbage.
                    self.broken = drv.broken
                    break
        finally:
            ep.close()
            self._ep = None

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
        drv.poll(1 << 16)  # what the device finished before stopping
        self.backend.release(drv)
        self.backend.close()
        drv.remove()

    def stats(self) -> dict[str, object]:
        return {"driver_stats": self.drv.stats.as_dict(), "backend": self.backend.stats(),
                "cpu_seconds": time.process_time()}  # fmt: skip
