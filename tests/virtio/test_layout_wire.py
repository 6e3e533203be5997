"""The split ring's bytes, read at the spec's offsets (VIRTIO 1.2, 2.7.5-2.7.8).

Every check here unpacks the raw guest memory with ``struct`` at the offsets
the spec gives, independent of the ring code's memoryview casts and of the
device-side parser: a peer written in C (Linux, DPDK, QEMU) sees these bytes.

    desc  at 16*i:   addr le64 @0, len le32 @8, flags le16 @12, next le16 @14
    avail:           flags @0, idx @2, ring[i] @4+2i, used_event @4+2N
    used:            flags @0, idx @2, ring[i].id @4+8i, .len @8+8i, avail_event @4+8N
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.virtio.mock import MockSplitQueue
from virtnet.virtio.ring.layout import (
    VIRTQUEUE_MAX_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    VringAddrs,
    VringViews,
    avail_ring_size,
    check_queue_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)

POWERS = [1 << k for k in range(16)]

# Deliberately odd values: every byte differs, so a wrong offset or byte order shows.
ADDR = 0x0123_4567_89AB_CDEF
LEN = 0x0A0B_0C0D


def raw_desc(q: MockSplitQueue, i: int) -> tuple[int, int, int, int]:
    base = q.addrs.desc - q.gpa + 16 * i
    addr = struct.unpack_from("<Q", q.buffer, base + 0)[0]
    length = struct.unpack_from("<I", q.buffer, base + 8)[0]
    flags = struct.unpack_from("<H", q.buffer, base + 12)[0]
    nxt = struct.unpack_from("<H", q.buffer, base + 14)[0]
    return addr, length, flags, nxt


def raw_avail(q: MockSplitQueue, offset: int) -> int:
    return struct.unpack_from("<H", q.buffer, q.addrs.avail - q.gpa + offset)[0]


def raw_used16(q: MockSplitQueue, offset: int) -> int:
    return struct.unpack_from("<H", q.buffer, q.addrs.used - q.gpa + offset)[0]


def raw_used32(q: MockSplitQueue, offset: int) -> int:
    return struct.unpack_from("<I", q.buffer, q.addrs.used - q.gpa + offset)[0]


# -- sizes and placement (2.7: alignment 16 / 2 / 4) ------------------------------------


@pytest.mark.parametrize("num", POWERS)
def test_ring_parts_have_the_spec_sizes_and_alignment(num):
    assert desc_table_size(num) == 16 * num
    assert avail_ring_size(num) == 6 + 2 * num
    assert used_ring_size(num) == 6 + 8 * num
    a = VringAddrs.contiguous(0x1003, num)
    assert a.desc % 16 == 0 and a.desc >= 0x1003
    assert a.avail % 2 == 0 and a.avail >= a.desc + 16 * num
    assert a.used % 4 == 0 and a.used >= a.avail + 6 + 2 * num
    assert a.end == a.used + 6 + 8 * num
    assert VringAddrs.area_size(num) >= a.end - a.desc


@pytest.mark.parametrize("num", [0, 3, 6, 100, 2 * VIRTQUEUE_MAX_SIZE, -4])
def test_a_queue_size_must_be_a_power_of_two_up_to_32768(num):
    with pytest.raises(ValueError, match="power of 2"):
        check_queue_size(num)


def test_views_refuse_short_ring_parts():
    buf = memoryview(bytearray(4096))
    with pytest.raises(ValueError, match="short"):
        VringViews(16, buf[:100], buf, buf)
    with pytest.raises(ValueError, match="short"):
        VringViews(16, buf, buf[: avail_ring_size(16) - 1], buf)
    with pytest.raises(ValueError, match="short"):
        VringViews(16, buf, buf, buf[: used_ring_size(16) - 1])


# -- vring_need_event (2.7.7.2, 2.7.10): notify iff event in [old, new) mod 2^16 -------


@pytest.mark.parametrize(
    ("event", "new", "old", "notify"),
    [
        (0, 1, 0, True),  # the first entry after event was published
        (0, 0, 0, False),  # nothing published
        (5, 10, 3, True),
        (3, 10, 3, True),  # event == old: inclusive
        (10, 10, 3, False),  # event == new: exclusive
        (2, 10, 3, False),  # event already behind old: notified before
        (0xFFFF, 2, 0xFFFE, True),  # across the wrap
        (0, 2, 0xFFFE, True),
        (2, 2, 0xFFFE, False),
        (0xFFFD, 2, 0xFFFE, False),
    ],
)
def test_need_event_is_a_window_of_16_bit_indices(event, new, old, notify):
    assert vring_need_event(event, new, old) is notify


@settings(max_examples=500, deadline=None)
@given(
    event=st.integers(0, 0xFFFF),
    old=st.integers(0, 0xFFFF),
    count=st.integers(0, 0xFFFF),
)
def test_need_event_matches_the_window_definition(event, old, count):
    new = (old + count) & 0xFFFF
    in_window = (event - old) & 0xFFFF < count
    assert vring_need_event(event, new, old) is in_window


# -- what the driver writes ----------------------------------------------------------------


def test_driver_writes_a_chain_at_the_spec_offsets():
    q = MockSplitQueue(8)
    drv = q.driver()
    head = drv.add([(ADDR, LEN), (ADDR + 1, 0x11)], [(ADDR + 2, 0x22)], "tok")
    d0 = raw_desc(q, head)
    assert d0 == (ADDR, LEN, VRING_DESC_F_NEXT, d0[3])
    d1 = raw_desc(q, d0[3])
    assert d1[:3] == (ADDR + 1, 0x11, VRING_DESC_F_NEXT)
    d2 = raw_desc(q, d1[3])
    assert d2[:3] == (ADDR + 2, 0x22, VRING_DESC_F_WRITE)
    assert len({head, d0[3], d1[3]}) == 3
    # avail: flags @0, idx @2, ring[0] @4
    assert raw_avail(q, 0) == 0
    assert raw_avail(q, 2) == 1
    assert raw_avail(q, 4 + 2 * 0) == head


def test_driver_descriptor_bytes_are_little_endian():
    q = MockSplitQueue(4)
    drv = q.driver()
    head = drv.add_inbuf(ADDR, LEN, "tok")
    off = q.addrs.desc - q.gpa + 16 * head
    assert bytes(q.buffer[off : off + 14]) == bytes.fromhex("efcdab89674523010d0c0b0a0200")


def test_driver_fills_avail_ring_slots_in_order_and_wraps_them():
    q = MockSplitQueue(4)
    drv, dev = q.driver(), q.device()
    heads = []
    for k in range(7):
        heads.append(drv.add_inbuf(q.data(0), 8, k))
        assert raw_avail(q, 4 + 2 * (k % 4)) == heads[-1]
        assert raw_avail(q, 2) == k + 1
        chain = dev.pop()
        dev.push_used(chain.head, 0)
        dev.flush_used()
        assert drv.get_buf() == (k, 0)


def test_driver_writes_an_indirect_table_and_its_descriptor():
    q = MockSplitQueue(8, indirect_max=4)
    drv = q.driver()
    ind = drv.indirect
    head = drv.add([(ADDR, 0x10)], [(ADDR + 0x100, 0x20), (ADDR + 0x200, 0x30)], "tok")
    addr, length, flags, _ = raw_desc(q, head)
    assert (length, flags) == (3 * 16, VRING_DESC_F_INDIRECT)
    assert addr == ind.gpa + head * ind.stride
    entries = []
    for j in range(3):
        entries.append(struct.unpack_from("<QIHH", q.buffer, addr - q.gpa + 16 * j))
    assert entries == [
        (ADDR, 0x10, VRING_DESC_F_NEXT, 1),
        (ADDR + 0x100, 0x20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
        (ADDR + 0x200, 0x30, VRING_DESC_F_WRITE, 0),
    ]


def test_driver_callback_suppression_is_avail_flags_at_offset_0():
    q = MockSplitQueue(8)
    drv = q.driver()
    drv.disable_cb()
    assert raw_avail(q, 0) == VRING_AVAIL_F_NO_INTERRUPT
    drv.enable_cb()
    assert raw_avail(q, 0) == 0


@pytest.mark.parametrize("num", [4, 8, 256])
def test_driver_used_event_is_the_le16_after_the_avail_ring(num):
    q = MockSplitQueue(num, event_idx=True, data_slots=1)
    drv, dev = q.driver(), q.device()
    for k in range(3):
        drv.add_inbuf(q.data(0), 8, k)
        dev.push_used(dev.pop().head, 1)
    dev.flush_used()
    drv.get_buf()
    assert raw_avail(q, 4 + 2 * num) == 1
    drv.get_buf()
    assert raw_avail(q, 4 + 2 * num) == 2
    drv.disable_cb()
    drv.get_buf()
    assert raw_avail(q, 4 + 2 * num) == 2  # disabled: not moved
    assert drv.enable_cb_prepare() == 3
    assert raw_avail(q, 4 + 2 * num) == 3


# -- what the device writes ----------------------------------------------------------------


@pytest.mark.parametrize("num", [2, 8, 256])
def test_device_used_entries_are_id_and_len_at_the_spec_offsets(num):
    q = MockSplitQueue(num, data_slots=1)
    drv, dev = q.driver(), q.device()
    heads = [drv.add_inbuf(q.data(0), 0x100, k) for k in range(2)]
    for head in heads:
        assert dev.pop().head == head
    dev.push_used(heads[1], 0x0A0B)
    dev.push_used(heads[0], 0x0C0D)
    assert raw_used16(q, 2) == 0  # push_used only queues
    dev.flush_used()
    assert raw_used16(q, 2) == 2
    assert raw_used32(q, 4 + 8 * 0) == heads[1]
    assert raw_used32(q, 8 + 8 * 0) == 0x0A0B
    assert raw_used32(q, 4 + 8 * 1) == heads[0]
    assert raw_used32(q, 8 + 8 * 1) == 0x0C0D
    assert raw_used16(q, 0) == 0


def test_device_kick_suppression_is_used_flags_at_offset_0():
    q = MockSplitQueue(8)
    dev = q.device()
    dev.disable_notify()
    assert raw_used16(q, 0) == VRING_USED_F_NO_NOTIFY
    dev.enable_notify()
    assert raw_used16(q, 0) == 0


@pytest.mark.parametrize("num", [2, 8, 256])
def test_device_avail_event_is_the_le16_after_the_used_ring(num):
    q = MockSplitQueue(num, event_idx=True, data_slots=1)
    drv, dev = q.driver(), q.device()
    for k in range(2):
        drv.add_inbuf(q.data(0), 8, k)
    dev.pop()
    assert dev.enable_notify() is True  # one more is pending
    assert raw_used16(q, 4 + 8 * num) == 1
    dev.pop()
    assert dev.enable_notify() is False
    assert raw_used16(q, 4 + 8 * num) == 2


# -- what each side reads, written by hand at the spec's offsets -----------------------------


def test_device_parses_a_chain_written_byte_by_byte():
    q = MockSplitQueue(8)
    desc = q.addrs.desc - q.gpa
    struct.pack_into("<QIHH", q.buffer, desc + 16 * 3, q.data(0), 5, VRING_DESC_F_NEXT, 6)
    struct.pack_into("<QIHH", q.buffer, desc + 16 * 6, q.data(1), 7, VRING_DESC_F_WRITE, 0)
    avail = q.addrs.avail - q.gpa
    struct.pack_into("<H", q.buffer, avail + 4 + 2 * 0, 3)
    struct.pack_into("<H", q.buffer, avail + 2, 1)
    chain = q.device().pop()
    assert chain.head == 3
    assert chain.segments == [(q.data(0), 5, False), (q.data(1), 7, True)]


def test_driver_reads_used_entries_written_byte_by_byte():
    q = MockSplitQueue(8)
    drv = q.driver()
    head = drv.add_inbuf(q.data(0), 100, "tok")
    used = q.addrs.used - q.gpa
    struct.pack_into("<II", q.buffer, used + 4, head, 42)
    assert drv.get_buf() is None  # not published until idx moves
    struct.pack_into("<H", q.buffer, used + 2, 1)
    assert drv.get_buf() == ("tok", 42)


def test_bursts_read_avail_and_used_entries_across_the_ring_end():
    # pop_burst and get_bufs read a burst's entries at once: slots 3, 0, 1, 2 here.
    q = MockSplitQueue(4)
    drv, dev = q.driver(), q.device()
    for k in range(3):
        drv.add_inbuf(q.data(k), 8, k)
    dev.push_used_burst([(c.head, 0) for c in dev.pop_burst(4)])
    dev.flush_used()
    assert drv.get_bufs(4) == [(0, 0), (1, 0), (2, 0)]
    heads = [drv.add_inbuf(q.data(k), 8 + k, f"t{k}") for k in range(4)]
    assert [raw_avail(q, 4 + 2 * ((3 + k) % 4)) for k in range(4)] == heads
    chains = dev.pop_burst(4)
    assert [c.head for c in chains] == heads
    assert [c.in_len for c in chains] == [8, 9, 10, 11]
    dev.push_used_burst([(c.head, k) for k, c in enumerate(chains)])
    dev.flush_used()
    assert [raw_used32(q, 4 + 8 * ((3 + k) % 4)) for k in range(4)] == heads
    assert drv.get_bufs(4) == [(f"t{k}", k) for k in range(4)]


def test_add_inbufs_stores_a_burst_across_the_ring_end_then_the_index():
    q = MockSplitQueue(4)
    drv, dev = q.driver(), q.device()
    assert drv.add_inbufs([(q.data(k), 8, k) for k in range(3)]) == 3
    dev.push_used_burst([(c.head, 0) for c in dev.pop_burst(4)])
    dev.flush_used()
    assert len(drv.get_bufs(4)) == 3
    assert drv.add_inbufs([(q.data(k), 8 + k, f"t{k}") for k in range(4)]) == 4
    assert raw_avail(q, 2) == 7
    heads = [raw_avail(q, 4 + 2 * ((3 + k) % 4)) for k in range(4)]
    assert sorted(heads) == [0, 1, 2, 3]
    chains = dev.pop_burst(4)
    assert [c.head for c in chains] == heads
    assert [c.in_len for c in chains] == [8, 9, 10, 11]
