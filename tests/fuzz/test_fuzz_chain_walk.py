"""Fuzz the device's chain walk (``SplitQueueDevice.pop``) over garbage rings.

Each example lays out a split queue in a bytearray ``GuestMemory`` (``MockSplitQueue``,
with guard bytes either side), sometimes with a second region -- adjacent or behind a
hole -- fills the descriptor table, a few indirect tables and the avail ring with what
a hostile driver might write (chains, loops, nested / zero-length / misaligned indirect
tables, addresses and lengths near every boundary and near 2^64, avail index jumps),
then pops until the ring is drained. What must hold, whatever the bytes:

* ``pop`` returns a ``Chain``, ``None`` or raises ``DescriptorError`` (``AvailIndexError``
  for an index jump, after which the ring is not read further) -- nothing else;
* every segment lies inside one region, the views hold exactly its bytes, the chain is at
  most 2^32 bytes (2.7.5.2) and no longer than its tables allow (a loop ends);
* a bad chain is consumed (``last_avail_idx`` moves past it) and names a head < num;
* no byte outside guest memory is touched (the guards).

Short profile in CI; the long run is in docs/conformance.md ("Fuzzing").
"""

from __future__ import annotations

import random
import re

from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz.conftest import fuzz_settings
from tests.virtio.mock import DATA_SLOT, MockSplitQueue
from virtnet.virtio.errors import AvailIndexError, DescriptorError
from virtnet.virtio.memory import MemoryRegion
from virtnet.virtio.ring.layout import DESC_SIZE
from virtnet.virtio.ring.split import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)

U64_MAX = (1 << 64) - 1
MAX_CHAIN_BYTES = 1 << 32
EXTRA_SIZE = 2 * DATA_SLOT
DATA_SLOTS = 6


def _addr(rng: random.Random, q: MockSplitQueue, extra: int | None) -> int:
    """An address a hostile driver might write: mostly plausible, often on an edge."""
    choice = rng.randrange(10)
    if choice < 4:
        return q.data(rng.randrange(DATA_SLOTS), rng.choice([0, 1, 8, DATA_SLOT - 16]))
    if choice == 4:
        return rng.choice([0, q.gpa - 1, q.gpa, q.end - 16, q.end - 1, q.end])
    if choice == 5 and extra is not None:
        return extra + rng.choice([0, -16, -1, EXTRA_SIZE - 16, EXTRA_SIZE])
    if choice == 6:
        return rng.choice([U64_MAX, U64_MAX - 15, 1 << 63, (1 << 64) - DATA_SLOT])
    if choice == 7:
        return rng.randrange(q.gpa, q.end)
    return rng.getrandbits(rng.choice([16, 32, 64]))


def _len(rng: random.Random) -> int:
    choice = rng.randrange(8)
    if choice < 4:
        return rng.choice([0, 1, 12, 16, 64, 1500, DATA_SLOT, DATA_SLOT + 1])
    if choice == 4:
        return rng.choice([0xFFFF_FFFF, 0x8000_0000, 0xFFFF_FFF0])
    if choice == 5:
        return DESC_SIZE * rng.randrange(0, 40) + rng.choice([0, 0, 0, 1, 8])
    return rng.getrandbits(rng.choice([8, 16, 32]))


def _flags(rng: random.Random) -> int:
    choice = rng.randrange(6)
    if choice == 0:
        return rng.getrandbits(16)
    bits = (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT)
    return sum(b for b in bits if rng.random() < (0.5, 0.4, 0.15)[bits.index(b)])


def _next(rng: random.Random, num: int, i: int) -> int:
    choice = rng.randrange(6)
    if choice < 3:
        return (i + 1) % num  # a plausible chain
    if choice == 3:
        return rng.choice([i, 0, num - 1, num, 0xFFFF])  # loops and off-by-ones
    return rng.randrange(num + 2)


def _desc(rng: random.Random, q: MockSplitQueue, extra: int | None, num: int, i: int,
          chaos: float = 1.0):  # fmt: skip
    if rng.random() >= chaos:  # a well-formed descriptor: chains get long, loops happen
        flags = rng.choice([VRING_DESC_F_NEXT, VRING_DESC_F_NEXT, 0, VRING_DESC_F_WRITE])
        nxt = (i + 1) % num if rng.random() < 0.9 else rng.randrange(num)
        return q.data(rng.randrange(3, DATA_SLOTS)), rng.randrange(0, 2048), flags, nxt
    flags = _flags(rng)
    addr, length = _addr(rng, q, extra), _len(rng)
    return addr, length & 0xFFFF_FFFF, flags, _next(rng, num, i)


@st.composite
def hostile_rings(draw):
    num = draw(st.sampled_from([2, 4, 8, 16, 32, 256]))
    start = draw(st.sampled_from([0, 0xFFFF - 2, 0x8000])) if draw(st.booleans()) else 0
    rng = random.Random(draw(st.integers(0, 1 << 64)))
    chaos = draw(st.sampled_from([0.02, 0.1, 0.3, 1.0]))
    q = MockSplitQueue(num, data_slots=DATA_SLOTS, guard=64, start_idx=start)
    second = draw(st.sampled_from(["none", "adjacent", "hole"]))
    extra = None
    if second != "none":
        extra = q.end if second == "adjacent" else q.end + 3 * DATA_SLOT
        q.memory.add_region(MemoryRegion(extra, memoryview(bytearray(EXTRA_SIZE))))
    # Indirect tables in data slots 0..2 (slot 2 misaligned by 8): direct ones point there.
    tables = []
    for slot in range(3):
        n = rng.randrange(0, 24)
        gpa = q.data(slot, 8 if slot == 2 else 0)
        q.table(gpa, [_desc(rng, q, extra, max(n, 1), j, chaos) for j in range(n)])
        tables.append((gpa, n))
    for i in range(num):
        addr, length, flags, nxt = _desc(rng, q, extra, num, i, chaos)
        if flags & VRING_DESC_F_INDIRECT and rng.random() < 0.7:
            gpa, n = rng.choice(tables)
            length = DESC_SIZE * n + rng.choice([0, 0, 0, 0, 8, 16])
            addr = gpa
        q.desc(i, addr, length, flags, nxt)
    pops = rng.randrange(1, num + 1)
    for _ in range(pops):
        q.make_available(rng.randrange(num + 2) if rng.random() < 0.1 else rng.randrange(num))
    jump = draw(st.sampled_from([0] * 8 + [1, num, num + 1, 0x8000]))
    if jump:
        q.set_avail_idx(q.avail_idx + jump)
    return q, extra, pops + jump


def _inside(q: MockSplitQueue, extra: int | None, addr: int, length: int) -> bool:
    if q.gpa <= addr and addr + length <= q.end:
        return True
    return extra is not None and extra <= addr and addr + length <= extra + EXTRA_SIZE


def check_chain(q: MockSplitQueue, extra: int | None, chain) -> None:
    """A popped chain is well formed: in range, in guest memory, views = its bytes."""
    assert 0 <= chain.head < q.num
    assert chain.out_len + chain.in_len <= MAX_CHAIN_BYTES
    # No longer than the direct table plus one indirect table (a loop runs out).
    assert len(chain.segments) <= q.num + 24
    views = chain.readable + chain.writable
    assert len(views) == len(chain.segments)
    readable = [s for s in chain.segments if not s[2]]
    writable = [s for s in chain.segments if s[2]]
    assert chain.segments == readable + writable  # 2.7.4.2: readable first
    assert chain.out_len == sum(s[1] for s in readable)
    assert chain.in_len == sum(s[1] for s in writable)
    for (addr, length, _w), view in zip(readable + writable, views, strict=True):
        assert _inside(q, extra, addr, length)
        assert view.nbytes == length
        assert bytes(view) == q.memory.read(addr, length)


def _kind(text: str) -> str:
    """The kind of refusal, without the numbers (hypothesis counts events by text)."""
    return re.sub(r"0x[0-9a-f]+|\d+", "N", text.split(": ", 1)[-1])[:60]


@fuzz_settings()
@given(hostile_rings())
def test_chain_walk_over_hostile_rings(ring):
    q, extra, published = ring
    dev = q.device()
    start = dev.last_avail_idx
    consumed = 0
    for _ in range(published + 1):
        before = dev.last_avail_idx
        try:
            chain = dev.pop()
        except AvailIndexError:
            event("avail index jump")
            assert dev.last_avail_idx == before  # the ring is not read past a jump
            break
        except DescriptorError as e:
            assert e.head is None or 0 <= e.head < q.num
            assert dev.last_avail_idx == (before + 1) & 0xFFFF  # consumed, not wedged
            consumed += 1
            event(f"refused: {_kind(str(e))}")
            continue
        if chain is None:
            break
        consumed += 1
        event(f"chain of {min(len(chain.segments), 4)}{'+' if len(chain.segments) > 4 else ''}")
        check_chain(q, extra, chain)
    assert (dev.last_avail_idx - start) & 0xFFFF == consumed
    assert q.guards_intact()
