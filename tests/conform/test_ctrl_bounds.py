"""``ctrl-bounds``'s commands against a control queue device in this process.

No vhost-user back-end here serves the control queue (virtnet's device and DPDK's leave it
to the front-end, as QEMU does: the case is skipped against both), so its checks run on a
control virtqueue in conform's guest memory: virtnet's own ``ControlDevice`` must answer
every hostile command with VIRTIO_NET_ERR or not at all and write nothing it may not; a
device that acks everything, or writes a read-only ack byte, fails.
"""

from __future__ import annotations

import struct

import pytest

from virtnet.conform.cases_net import CVQ_NUM, CVQ_RING, ctrl_checks
from virtnet.conform.guest import RawRing, one_region
from virtnet.conform.session import CaseFailure
from virtnet.net.ctrl import ControlDevice
from virtnet.net.features import VirtioNetF
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.ring.layout import VringAddrs, VringViews
from virtnet.virtio.ring.split import SplitQueueDevice

FEATURES = (bit(VirtioF.VERSION_1) | bit(VirtioNetF.CTRL_VQ) | bit(VirtioNetF.MQ)
            | bit(VirtioNetF.CTRL_RX) | bit(VirtioNetF.CTRL_MAC_ADDR))  # fmt: skip
PAIRS = 2


@pytest.fixture
def cvq():
    guest = one_region()
    addrs = VringAddrs.contiguous(CVQ_RING, CVQ_NUM)
    views = VringViews.from_memory(guest.memory, addrs)
    yield guest, RawRing(guest, addrs), SplitQueueDevice(views, guest.memory)
    views.release()
    guest.close()


def test_virtnet_control_device_answers_every_hostile_command_as_the_spec_says(cvq):
    guest, raw, queue = cvq
    dev = ControlDevice(queue, FEATURES, PAIRS)

    def kick() -> None:
        dev.process()
        dev.flush()

    detail = ctrl_checks(raw, PAIRS, kick)
    assert detail == (
        "9 of 9 used; a 1-byte command (the header is 2): no ack; class 200: ERR; "
        "RX command 200: ERR; MQ VQ_PAIRS_SET 0: ERR; MQ VQ_PAIRS_SET 3 (max 2): ERR; "
        "MAC_TABLE_SET saying 1000 unicast entries, carrying 1: ERR; RX PROMISC without an "
        "ack buffer: nothing written; RX PROMISC with a read-only ack byte: nothing written")
    assert dev.curr_queue_pairs == 1  # neither bad VQ_PAIRS_SET took effect


class AcksEverything:
    """A control device with a planted bug: every chain it takes is acked OK, its first
    descriptor's last byte written whether writable or not."""

    def __init__(self, guest, raw: RawRing) -> None:
        self.guest, self.raw, self.seen = guest, raw, 0

    def kick(self) -> None:
        mem, addrs = self.guest.memory, self.raw.addrs
        avail = struct.unpack("<H", mem.read(addrs.avail + 2, 2))[0]
        while self.seen != avail:
            head = struct.unpack("<H", mem.read(addrs.avail + 4 + 2 * (self.seen % CVQ_NUM), 2))[0]
            addr, _length, flags, nxt = struct.unpack("<QIHH", mem.read(addrs.desc + 16 * head, 16))
            last = nxt if flags & 1 else head
            ack_addr = struct.unpack("<Q", mem.read(addrs.desc + 16 * last, 8))[0]
            mem.write(ack_addr, b"\0")
            slot = addrs.used + 4 + 8 * (self.seen % CVQ_NUM)
            mem.write(slot, struct.pack("<II", head, 1))
            self.seen += 1
            mem.write(addrs.used + 2, struct.pack("<H", self.seen))


def test_a_device_that_acks_everything_fails(cvq):
    guest, raw, _queue = cvq
    bad = AcksEverything(guest, raw)
    with pytest.raises(CaseFailure, match=r"a 1-byte command \(the header is 2\): acked "
                                          "VIRTIO_NET_OK"):  # fmt: skip
        ctrl_checks(raw, PAIRS, bad.kick)
