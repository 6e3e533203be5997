"""The control process ↔ worker protocol: replies matched to their request, events apart.

A driver worker whose pair broke tells the control process why on its own; a
request sent meanwhile (the watchdog's stats) must still get its own answer,
and the reason must still arrive.
"""

from __future__ import annotations

import os
import struct
from functools import partial

import pytest

from virtnet.net.features import SUPPORTED
from virtnet.net.guest import RX, GuestLayout, build_device, build_driver
from virtnet.ports.backends import SinkDriver
from virtnet.ports.synthetic import FrameGen
from virtnet.vhost_user.driver_loop import PairDriver
from virtnet.vhost_user.frontend import PairWorker
from virtnet.vhost_user.worker import spawn_worker
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


@pytest.mark.xfail(strict=True, reason="issue 17: an event is taken for the stats reply")
def test_a_stats_call_after_the_pair_broke_gets_stats_and_the_reason_apart() -> None:
    pair, fds = broken_pair()
    w = spawn_worker(0, partial(PairWorker, pair), lambda: None)
    try:
        # The worker sends its event before it reads any request: this call is
        # the watchdog's that runs before the control loop reads the event.
        stats = w.call_dict("stats")
        assert "driver_stats" in stats and stats["driver_stats"]["rx_packets"] == 0
    finally:
        w.kill()
        w.close()
        for fd in fds:
            os.close(fd)
