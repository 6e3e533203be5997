"""conform's guest side: where ``Rings.for_pair`` puts each queue pair."""

from __future__ import annotations

import pytest

from virtnet.conform.guest import DATA_SIZE, INDIRECT_AREA, PAIR_SPAN, SLOT, Rings, one_region
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
