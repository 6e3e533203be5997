"""driver_loop.PairDriver's own decisions, over one memory with the device in-process."""

from __future__ import annotations

import os

import pytest

from virtnet.net.features import SUPPORTED
from virtnet.net.guest import GuestLayout, build_device, build_driver
from virtnet.ports.backends import SinkDriver
from virtnet.ports.synthetic import FrameGen
from virtnet.vhost_user.driver_loop import PairDriver
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.memory import GuestMemory


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_lost_rx_interrupt_is_named_on_either_ring_kind(packed: bool) -> None:
    # Used rx buffers still waiting at two idle timeouts in a row: the device owed an
    # interrupt. The check reads where the driver is in the used ring, split or packed.
    features = SUPPORTED | (bit(VirtioF.RING_PACKED) if packed else 0)
    layout = GuestLayout(64, GuestLayout.pages_for(64), packed=packed)
    memory = GuestMemory.from_buffer(bytearray(layout.size))
    backend = SinkDriver()
    drv = build_driver(memory, layout, features, netif_receive_skb=backend.netif_receive_skb)
    dev = build_device(memory, layout.ring_views(memory), features)
    assert drv.try_fill_recv()
    gen = FrameGen(100)
    assert dev.receive_packet(gen.peek(), gen.hdr)
    dev.flush_rx()
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
    pair = PairDriver(0, drv, backend, fds[:2], fds[2:])
    try:
        pending, quiet_at = pair._check_lost_irq(-1)  # the first timeout: only noted
        assert not pending and quiet_at >= 0
        assert pair._check_lost_irq(quiet_at) == (True, -1)  # the same at the next: named
        assert drv.stats.fault_irq_drop == 1
        assert drv.poll(64)[0] == 1 and backend.sink.stats.packets == 1
    finally:
        dev.reset()
        drv.remove()
        for fd in fds:
            os.close(fd)
    assert drv.stats.pages_outstanding == 0
