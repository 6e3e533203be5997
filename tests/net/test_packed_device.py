"""VirtnetDevice on packed rings with a driver that breaks the packed rules: each bad
buffer is refused by name and handed back with length 0, the good ones around it are
delivered, and a ring that cannot be walked stops its queue without spinning."""

from __future__ import annotations

from tests.net.conftest import frame
from tests.virtio.mock import MockPackedQueue, used_flags
from virtnet.net.constants import PAGE_SIZE
from virtnet.net.device import VirtnetDevice
from virtnet.net.header import MRG_HDR_LEN
from virtnet.virtio.ring.layout import VRING_DESC_F_WRITE

WRITE = VRING_DESC_F_WRITE


def pair(num: int = 16) -> tuple[MockPackedQueue, MockPackedQueue, VirtnetDevice]:
    rxq, txq = MockPackedQueue(num), MockPackedQueue(num)
    return rxq, txq, VirtnetDevice(rxq.device(), txq.device())


def used(q: MockPackedQueue, *slots: int) -> list[tuple[int, int]]:
    return [(q.read_desc(i).id, q.read_desc(i).len) for i in slots]


def test_rx_buffers_the_device_cannot_use_are_refused_and_the_next_one_gets_the_frame():
    rxq, _txq, dev = pair()
    rxq.post([(rxq.data(0), PAGE_SIZE, 0)], bid=0)  # device-readable: nowhere to write
    rxq.post([(rxq.end + PAGE_SIZE, PAGE_SIZE, WRITE)], bid=1)  # outside guest memory
    rxq.post([(rxq.data(2), PAGE_SIZE, WRITE)], bid=16)  # an id past the queue size
    rxq.post([(rxq.data(3), PAGE_SIZE, WRITE)], bid=3)
    assert dev.receive_packet([frame(100)])
    dev.flush_rx()
    # ids 0 and 1 go back with length 0; id 16 cannot go back (it names no buffer)
    assert used(rxq, 0, 1, 2) == [(0, 0), (1, 0), (3, MRG_HDR_LEN + 100)]
    assert rxq.is_used(2, 1) and not rxq.is_used(3, 1)
    assert dev.stats.desc_errors == 3
    assert "buffer id 16 >= queue size 16" in dev.last_error
    assert rxq.read(rxq.data(3) + MRG_HDR_LEN, 100) == frame(100)


def test_tx_with_a_bad_descriptor_goes_on():
    _rxq, txq, dev = pair()
    txq.post([(txq.end + 1, 100, 0)], bid=0)
    txq.post([(txq.data(1), MRG_HDR_LEN + 60, 0)], bid=1)
    txq.post([(txq.data(3), MRG_HDR_LEN + 70, 0)], bid=2)
    sent = []
    assert dev.process_tx(lambda views, n: sent.append(n) or True) == 2
    dev.flush_tx()
    assert sent == [60, 70]
    assert dev.stats.desc_errors == 1 and dev.stats.tx_packets == 2
    assert used(txq, 0, 1, 2) == [(0, 0), (1, 0), (2, 0)]


def test_an_rx_id_reused_while_the_device_holds_it_is_refused_and_nothing_is_lost():
    # The device can only see a reuse while it holds the first buffer: cached rx chains.
    rxq, _txq, dev = pair(8)
    rxq.post([(rxq.data(0), PAGE_SIZE, WRITE)], bid=5)
    rxq.post([(rxq.data(1), PAGE_SIZE, WRITE)], bid=5)  # id 5 again: refused
    rxq.post([(rxq.data(2), PAGE_SIZE, WRITE)], bid=6)
    assert dev.has_room(6000)  # ids 5 and 6 cached, the reused one refused between them
    assert dev.stats.desc_errors == 1 and "buffer id 5 is already in flight" in dev.last_error
    assert dev.receive_packet([frame(6000)])  # spread over ids 5 and 6
    dev.flush_rx()
    assert used(rxq, 0, 1) == [(5, PAGE_SIZE), (6, 6000 + MRG_HDR_LEN - PAGE_SIZE)]
    assert not rxq.is_used(2, 1)  # the refused chain's slot has no used descriptor


def test_reset_gives_back_the_exact_slots_of_the_cached_chains():
    # Chains of 1 and 2 slots cached, a refused one between them: GET_VRING_BASE's value
    # (index | wrap << 15) counts them back exactly, and a new device takes them again.
    rxq, _txq, dev = pair(8)
    rxq.post([(rxq.data(0), 100, WRITE)], bid=0)
    rxq.post([(rxq.data(1), 8, WRITE), (rxq.data(1, 8), 92, WRITE)], bid=1)
    rxq.post([(rxq.end, 100, WRITE)], bid=2)  # refused: dead in the cache
    rxq.post([(rxq.data(3), 100, WRITE)], bid=3)
    assert dev.receive_packet([frame(80)])  # uses id 0; the rest were cached in the burst
    dev.flush_rx()
    assert used(rxq, 0) == [(0, MRG_HDR_LEN + 80)]
    rx_base, _ = dev.last_avail_idx
    assert rx_base == 1 | 1 << 15
    dev.reset()
    assert dev.rxq.last_avail_idx == rx_base
    again = VirtnetDevice(rxq.device(last_avail_idx=rx_base), _txq.device())
    again.rxq.used_pos = 1  # where the first device's used descriptors got to
    assert again.receive_packet([frame(88)])  # fits id 1's two descriptors (8 + 92 bytes)
    again.flush_rx()
    assert used(rxq, 1) == [(1, MRG_HDR_LEN + 88)]
    assert rxq.read(rxq.data(1, MRG_HDR_LEN), 88) == frame(88)  # header across both


def test_flags_that_lie_stop_the_rx_queue_without_spinning():
    rxq, _txq, dev = pair(8)
    rxq.desc(0, rxq.data(0), 100, 0, used_flags(1) | WRITE)  # "used in this lap": a lie
    for _ in range(3):
        assert not dev.receive_packet([frame(100)])
    assert dev.rx_broken and "AVAIL=USED=1" in dev.last_error
