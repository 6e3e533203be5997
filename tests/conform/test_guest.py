"""conform's guest side: where ``Rings.for_pair`` puts each queue pair, and what ``send``
writes in the tx ring."""

from __future__ import annotations

import os

import pytest

from virtnet.conform.guest import (
    DATA_SIZE,
    DESC,
    INDIRECT_AREA,
    P_AVAIL,
    P_USED,
    PAIR_SPAN,
    SLOT,
    RawPackedRing,
    Rings,
    frame,
    one_region,
)
from virtnet.net.guest import TX
from virtnet.net.header import MRG_HDR_LEN
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.ring.layout import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT
from virtnet.virtio.ring.split import IndirectArea


def spans(rings: Rings) -> list[tuple[int, int]]:
    """[start, end) of each ring (descriptor table .. used ring), the indirect area and the
    frame slots of one pair."""
    out = [(a.desc, a.end) for a in rings.addrs]
    indirect = rings.pair * PAIR_SPAN + INDIRECT_AREA
    out.append((indirect, indirect + IndirectArea.size(rings.num, 8)))
    out.append((min(rings.free), max(rings.free) + SLOT))
    return out


@pytest.fixture
def guest():
    g = one_region()
    yield g
    g.close()


def test_pair_p_is_vrings_2p_and_2p_plus_1(guest):
    assert [Rings.for_pair(guest, p).index for p in range(3)] == [(0, 1), (2, 3), (4, 5)]
    assert [vq.index for vq in Rings.for_pair(guest, 1).vqs] == [2, 3]


def test_pairs_share_no_byte_and_fit_in_the_default_region(guest):
    taken = [s for p in range(3) for s in spans(Rings.for_pair(guest, p, indirect=True))]
    taken.sort()
    for (_, end), (start, _) in zip(taken, taken[1:], strict=False):
        assert end <= start
    assert taken[-1][1] <= guest.regions[0].size
    assert len(Rings.for_pair(guest, 1).free) == DATA_SIZE // SLOT
    assert min(Rings.for_pair(guest, 1).free) >= PAIR_SPAN


def kickable(rings: Rings) -> Rings:
    """``send`` kicks an eventfd; no back-end reads it here."""
    rings.kick = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    return rings


def chain(guest, addr: int, count: int) -> list[tuple[int, int, int, int]]:
    return [DESC.unpack_from(guest.memory.read(addr + 16 * k, 16)) for k in range(count)]


@pytest.mark.parametrize("pieces", [1, 3])
def test_send_indirect_puts_each_frame_in_an_indirect_table(guest, pieces):
    rings = kickable(Rings.for_pair(guest, 0, indirect=True))
    try:
        f = frame(7, 100)
        rings.send([f], pieces=pieces, indirect=True)
        tx = rings.addrs[TX]
        ((table, length, flags, _),) = chain(guest, tx.desc, 1)
        assert flags == VRING_DESC_F_INDIRECT
        assert length == 16 * pieces
        assert INDIRECT_AREA <= table < INDIRECT_AREA + IndirectArea.size(rings.num, 8)
        entries = chain(guest, table, pieces)
        nexts = [e[2] & VRING_DESC_F_NEXT for e in entries]
        assert nexts == [VRING_DESC_F_NEXT] * (pieces - 1) + [0]
        data = b"".join(guest.memory.read(a, n) for a, n, _, _ in entries)
        assert data == bytes(MRG_HDR_LEN) + f
    finally:
        for fd in rings.kick:
            os.close(fd)


def test_send_indirect_without_an_indirect_area_says_so(guest):
    rings = kickable(Rings.for_pair(guest, 0))
    try:
        with pytest.raises(ValueError, match="no indirect area"):
            rings.send([frame(0, 60)], indirect=True)
    finally:
        for fd in rings.kick:
            os.close(fd)


# -- packed rings ------------------------------------------------------------------------------


def test_packed_rings_start_at_wrap_1_and_read_bases_as_index_and_wrap(guest):
    rings = Rings.for_pair(guest, features=bit(VirtioF.RING_PACKED))
    assert rings.packed and rings.start_base() == 0x8000  # index 0, wrap counter 1 (2.8.1)
    assert rings.consumed(0x8003) == 3  # 3 descriptors taken in the first lap
    assert rings.consumed(0x0002) == rings.num + 2  # the wrap counter flipped: lap 2
    split = Rings.for_pair(guest, 1)
    assert not split.packed and split.start_base() == 0 and split.consumed(3) == 3


def test_the_raw_packed_reader_follows_used_descriptors_across_the_end(guest):
    rings = Rings.for_pair(guest, features=bit(VirtioF.RING_PACKED))
    raw = RawPackedRing(guest, rings.packed_addrs(TX))
    num = rings.num
    raw.ndescs.update({7: 3, 8: 1})
    # As a device writes them: id 7 (3 slots) used at num - 2 in lap 1, id 8 at slot 1 in lap 2.
    raw.desc(num - 2, 0, 0, 7, P_AVAIL | P_USED)
    raw.desc(1, 0, 0, 8, 0)
    assert raw.used(num - 2) == [(7, 0), (8, 0)]  # slot 2 (never written) is not "used"
    raw.desc(num - 2, 0, 0, 99, P_AVAIL | P_USED)  # an id never made available: reported
    assert raw.used(num - 2) == [(99, 0)]
