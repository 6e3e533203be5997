"""The control process ↔ worker protocol: replies matched to their request, events apart.

A driver worker whose pair broke tells the control process why on its own; a
request sent meanwhile (the watchdog's stats) must still get its own answer,
and the reason must still arrive. A request a worker does not serve is refused
by name, and the worker goes on. Real workers (forked, as the CLI's), real
sockets; only the front-end is absent.
"""

from __future__ import annotations

import logging
import os
import select
import struct
from dataclasses import dataclass
from functools import partial

import pytest

from virtnet.net.features import SUPPORTED
from virtnet.net.guest import RX, GuestLayout, build_device, build_driver
from virtnet.ports.backends import SinkDevice, SinkDriver
from virtnet.ports.synthetic import FrameGen
from virtnet.vhost_user.device_loop import DEFAULT_COALESCE, PairLoop
from virtnet.vhost_user.driver_loop import PairDriver, PairWorker
from virtnet.vhost_user.worker import WorkerError, WorkerHandle, WorkerSet, spawn_worker
from virtnet.vhost_user.workermsg import (
    Call,
    Exit,
    Finish,
    Request,
    StatsRequest,
    Stop,
    Unmap,
    recv_msg,
    send_msg,
)
from virtnet.virtio.memory import GuestMemory

QUEUE = 64


def broken_pair() -> tuple[PairDriver, list[int]]:
    """A one-pair driver whose device lied: the rx used entry names descriptor 0xffff,
    past the ring (VIRTIO 1.2, 2.7.8.2), so the driver's first poll breaks the queue."""
    layout = GuestLayout(QUEUE, GuestLayout.pages_for(QUEUE))
    buf = bytearray(layout.size)
    memory = GuestMemory.from_buffer(buf)
    backend = SinkDriver()
    drv = build_driver(memory, layout, SUPPORTED, netif_receive_skb=backend.netif_receive_skb)
    dev = build_device(memory, layout.ring_views(memory), SUPPORTED)
    assert drv.try_fill_recv()
    gen = FrameGen(100)
    assert dev.receive_packet(gen.peek(), gen.hdr)
    dev.flush_rx()
    used = layout.rings[RX].used
    struct.pack_into("<I", buf, used + 4, 0xFFFF)  # used.ring[0].id
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
    return PairDriver(0, drv, backend, fds[:2], fds[2:]), fds


def wait_readable(sock, timeout: float = 10.0) -> None:
    ready, _, _ = select.select([sock], [], [], timeout)
    assert ready, "nothing arrived"


def test_a_stats_call_after_the_pair_broke_gets_stats_and_the_reason_apart() -> None:
    pair, fds = broken_pair()
    w = spawn_worker(0, partial(PairWorker, pair), lambda: None)
    try:
        # The worker sends its event before it reads any request: this call is
        # the watchdog's that runs before the control loop reads the event.
        stats = w.call(StatsRequest())
        assert "driver_stats" in stats and stats["driver_stats"]["rx_packets"] == 0
        wait_readable(w.events)
        (why,) = w.read_events()
        assert "0xffff" in why or "65535" in why, why
        # Nothing stale is left to be taken for the next answer either.
        assert w.call(StatsRequest())["driver_stats"] == stats["driver_stats"]
        assert "driver_stats" in w.call(Finish())
        w.reap(block=True)
        assert w.status == 0
    finally:
        w.kill()
        w.close()
        for fd in fds:
            os.close(fd)


def test_the_event_reaches_the_worker_set_by_its_own_path() -> None:
    """What both ends' loops do: hand WorkerSet the fds epoll reports."""
    pair, fds = broken_pair()
    ep = select.epoll()
    events: list[tuple[int, str]] = []
    deaths: list[str] = []
    workers = WorkerSet(ep, logging.getLogger("test"), lambda e: deaths.append(str(e)),
                        lambda p, why: events.append((p, why)))  # fmt: skip
    try:
        workers.start(0, partial(PairWorker, pair), lambda: None)
        workers.next_check = 0.0
        workers.watchdog()  # answered with stats, whatever the event's timing
        assert "driver_stats" in workers[0].last_stats
        while not events:
            ready = ep.poll(10)
            assert ready, "no event"
            for fd, _ in ready:
                assert workers.owns(fd)
                workers.on_ready(fd)
        assert events[0][0] == 0 and deaths == []
        (final,) = workers.finish(Finish())
        assert final["driver_stats"]["pages_outstanding"] == 0
    finally:
        for w in workers:
            w.kill()
            w.close()
        ep.close()
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True)
class Bogus(Request[None]):
    name = "bogus"


def device_worker() -> WorkerHandle:
    return spawn_worker(0, lambda: PairLoop(0, SinkDevice(), coalesce=DEFAULT_COALESCE),
                        lambda: None)  # fmt: skip


def test_an_unknown_request_is_refused_by_name_and_the_worker_goes_on() -> None:
    pair, fds = broken_pair()
    for w in (device_worker(), spawn_worker(0, partial(PairWorker, pair), lambda: None)):
        try:
            with pytest.raises(WorkerError, match="unknown request Bogus"):
                w.call(Bogus())
            assert "backend" in w.call(StatsRequest())
            # Not a call at all: refused too, the worker still serves.
            send_msg(w.sock, ("stats",))
            wait_readable(w.sock)
            reply, _ = recv_msg(w.sock)
            assert "a malformed call" in str(reply)
            assert "backend" in w.call(StatsRequest())
        finally:
            w.kill()
            w.close()
    for fd in fds:
        os.close(fd)


def test_a_reply_to_another_call_is_not_taken_for_this_one() -> None:
    w = device_worker()
    try:
        send_msg(w.sock, Call(0, Stop()))  # as if an earlier call had given up: dropped
        assert w.call(Stop()) is None  # the device ran no rings: no bases
        send_msg(w.sock, Call(99, Stop()))  # a number never sent: refused, not taken
        with pytest.raises(WorkerError, match=r"'unmap' \(call 2\) answered by Reply\(seq=99"):
            w.call(Unmap())
        assert "device_stats" in w.call(Exit())  # call 2's reply, late, is dropped
        w.reap(block=True)
        assert w.status == 0
    finally:
        w.kill()
        w.close()
