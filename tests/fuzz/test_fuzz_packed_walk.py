"""Fuzz the packed device's chain walk, single and burst (``PackedQueueDevice``).

Each example lays out a packed queue of 1..256 slots (powers of two or not) in a
bytearray ``GuestMemory`` with guard bytes either side (sometimes a second region,
adjacent or behind a hole), starting at any slot and wrap counter, and writes what a
hostile driver might: chains of any length with AVAIL/USED flags of the right lap, the
wrong lap, "used in this lap" lies and any 16 bits; wrap counters that do not flip at
the ring's end; buffer ids fresh, reused, == num, past it, 0xFFFF; addresses and lengths
on every edge; indirect tables (nested, with NEXT, zero-length, misaligned, truncated,
longer than 2^16 entries). The ring is then drained twice from the same memory: by
``pop_burst`` with random budgets, and by ``pop``, with the same used buffers pushed and
flushed at the same points. What must hold, whatever the bytes:

* only a ``Chain``, ``None``, ``DescriptorError`` or ``AvailIndexError`` comes out; an
  ``AvailIndexError`` consumes nothing and ends the drain;
* every chain is well formed: its id < num and not in flight, every segment inside one
  region, the views exactly its bytes, readable before writable, at most 2^32 bytes and
  no longer than the ring or its indirect table;
* a chain is exactly what the ring slots it took say, read through the mock (NEXT on
  all but the last, the id in the last, direct descriptors one segment each or one
  INDIRECT descriptor alone and its table's entries);
* a refusal names an id < num that was not in flight, or none;
* a ring an honest driver wrote (a fifth of the examples) is taken whole, refusing
  nothing: chains across the ring's end, indirect tables, every size and start;
* single and burst give one transcript, the same device state and the same ring bytes.

Short profile in CI; the long run is in docs/conformance.md ("Fuzzing").
"""

from __future__ import annotations

import random
import re

from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz.conftest import fuzz_settings
from tests.virtio.mock import DATA_SLOT, PDESC, MockPackedQueue, avail_flags, used_flags
from virtnet.virtio.errors import AvailIndexError, DescriptorError
from virtnet.virtio.memory import MemoryRegion
from virtnet.virtio.ring.layout import (
    DESC_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)

U64_MAX = (1 << 64) - 1
MAX_CHAIN_BYTES = 1 << 32
EXTRA_SIZE = 2 * DATA_SLOT
DATA_SLOTS = 6
MAX_TABLE = 24  # entries of the fuzzer's indirect tables
AU = avail_flags(1) | avail_flags(0)  # both AVAIL/USED bits


def _addr(rng: random.Random, q: MockPackedQueue, extra: int | None) -> int:
    choice = rng.randrange(10)
    if choice < 5:
        return q.data(rng.randrange(3, DATA_SLOTS), rng.choice([0, 1, 8, DATA_SLOT - 16]))
    if choice == 5:
        return rng.choice([0, q.gpa - 1, q.gpa, q.end - 16, q.end - 1, q.end])
    if choice == 6 and extra is not None:
        return extra + rng.choice([0, -16, -1, EXTRA_SIZE - 16, EXTRA_SIZE])
    if choice == 7:
        return rng.choice([U64_MAX, U64_MAX - 15, 1 << 63, (1 << 64) - DATA_SLOT])
    if choice == 8:
        return rng.randrange(q.gpa, q.end)
    return rng.getrandbits(rng.choice([16, 32, 64]))


def _len(rng: random.Random) -> int:
    choice = rng.randrange(8)
    if choice < 5:
        return rng.choice([0, 1, 12, 16, 64, 1500, DATA_SLOT, DATA_SLOT + 1])
    if choice == 5:
        return rng.choice([0xFFFF_FFFF, 0x8000_0000, 0xFFFF_FFF0])
    return rng.getrandbits(rng.choice([8, 16, 32]))


def _id(rng: random.Random, num: int, fresh: int) -> int:
    choice = rng.randrange(10)
    if choice < 6:
        return fresh
    if choice == 6:
        return rng.randrange(num)  # maybe one in flight
    if choice == 7:
        return num  # the first id out of range
    if choice == 8:
        return rng.choice([num + 1, 0x7FFF, 0x8000, 0xFFFF])
    return rng.getrandbits(16)


def _chain_bits(rng: random.Random, chaos: float) -> int:
    """NEXT / WRITE / INDIRECT of one descriptor (NEXT is the caller's)."""
    if rng.random() < chaos * 0.2:
        return rng.getrandbits(16) & ~AU
    bits = VRING_DESC_F_WRITE if rng.random() < 0.5 else 0
    if rng.random() < chaos * 0.3:
        bits |= VRING_DESC_F_INDIRECT
    return bits


def _lap_bits(rng: random.Random, wrap: int, chaos: float) -> int:
    """AVAIL/USED of a descriptor the driver makes available in a lap of ``wrap``."""
    if rng.random() >= chaos * 0.15:
        return avail_flags(wrap)
    return rng.choice([used_flags(wrap), used_flags(wrap ^ 1), avail_flags(wrap ^ 1),
                       rng.getrandbits(16) & AU])  # fmt: skip


def _table_entry(rng: random.Random, q: MockPackedQueue, extra: int | None, chaos: float):
    if rng.random() >= chaos:
        flags = VRING_DESC_F_WRITE if rng.random() < 0.5 else 0
        return q.data(rng.randrange(3, DATA_SLOTS)), rng.randrange(0, 2048), 0, flags
    flags = rng.choice([0, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                        rng.getrandbits(16)])  # fmt: skip
    return _addr(rng, q, extra), _len(rng) & 0xFFFF_FFFF, rng.getrandbits(16), flags


@st.composite
def hostile_packed_rings(draw):
    num = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16, 17, 32, 64, 256]))
    rng = random.Random(draw(st.integers(0, 1 << 64)))
    # 0: an honest driver, whose every chain must be taken (the check that the
    # walk refuses nothing it should take, wrap and ring end included).
    chaos = draw(st.sampled_from([0.0, 0.02, 0.1, 0.3, 1.0]))
    start = (rng.randrange(num), rng.randrange(2))
    q = MockPackedQueue(num, data_slots=DATA_SLOTS, guard=64, start=start)
    second = draw(st.sampled_from(["none", "adjacent", "hole"]))
    extra = None
    if second != "none":
        extra = q.end if second == "adjacent" else q.end + 3 * DATA_SLOT
        q.memory.add_region(MemoryRegion(extra, memoryview(bytearray(EXTRA_SIZE))))
    # Indirect tables in data slots 0..2 (slot 2 misaligned by 8).
    tables = []
    for slot in range(3):
        n = rng.randrange(0, MAX_TABLE + 1) if rng.random() < 0.8 else 0
        gpa = q.data(slot, 8 if slot == 2 else 0)
        # Table 0 well formed (readable entries first), the others as chaotic as the ring.
        table_chaos = chaos if slot else 0.0
        entries = [_table_entry(rng, q, extra, table_chaos) for _ in range(n)]
        if not table_chaos:
            entries.sort(key=lambda e: e[3] & VRING_DESC_F_WRITE)
        q.table(gpa, entries)
        tables.append((gpa, n))
    # Chains from the start slot, up to a ring's worth of slots.
    pos, wrap = start
    budget = rng.randrange(1, num + 1) if rng.random() < 0.95 else 0
    fresh = chains = 0
    while budget > 0:
        length = min(budget, rng.choice([1, 1, 1, 2, 3, 4, num]))
        budget -= length
        bid = _id(rng, num, fresh) if rng.random() < chaos else fresh
        fresh = (fresh + 1) % num
        chains += 1
        writing = False
        for k in range(length):
            last = k + 1 == length
            bits = _chain_bits(rng, chaos)
            if rng.random() >= chaos:  # 2.8.6 kept: readable first, then writable
                bits = (bits & ~VRING_DESC_F_WRITE) | (VRING_DESC_F_WRITE if writing else 0)
            writing = writing or bool(bits & VRING_DESC_F_WRITE)
            if not last:
                bits |= VRING_DESC_F_NEXT
            elif rng.random() < chaos * 0.05:
                bits |= VRING_DESC_F_NEXT  # a chain that runs on into what follows
            if rng.random() < chaos:
                addr, ln = _addr(rng, q, extra), _len(rng)
                if bits & VRING_DESC_F_INDIRECT and rng.random() < 0.7:
                    gpa, n = rng.choice(tables)
                    addr = gpa
                    ln = DESC_SIZE * n + rng.choice([0, 0, 0, 0, 8, 16])
                    if rng.random() < 0.02:
                        ln = DESC_SIZE * ((1 << 16) + 1)  # more entries than anyone walks
            else:  # a well-formed descriptor: chains get long, ids get reused
                addr, ln = q.data(rng.randrange(3, DATA_SLOTS)), rng.randrange(0, 2048)
                bits &= ~VRING_DESC_F_INDIRECT
                if length == 1 and tables[0][1] and rng.random() < 0.2:
                    addr, ln = tables[0][0], DESC_SIZE * tables[0][1]  # the good table
                    bits = (bits & ~VRING_DESC_F_WRITE) | VRING_DESC_F_INDIRECT
            if chaos and rng.random() < chaos * 0.1 and tables[0][1]:
                # The good table where 2.8.19 forbids it: in a chain, or of length 0.
                addr, ln = tables[0][0], rng.choice([0, DESC_SIZE * tables[0][1]])
                bits = (bits & ~VRING_DESC_F_NEXT) | VRING_DESC_F_INDIRECT
                if not last:
                    bits |= VRING_DESC_F_NEXT
            # 2.8.6: the id is in the last descriptor; the others' ids are anything.
            d_id = bid if last or rng.random() < 0.5 else rng.getrandbits(16)
            q.desc(pos, addr, ln & 0xFFFF_FFFF, d_id, bits | _lap_bits(rng, wrap, chaos))
            pos += 1
            if pos == num:
                pos = 0
                if rng.random() >= chaos * 0.1:  # else: a driver that forgets to flip
                    wrap ^= 1
    return q, extra, chains if chaos == 0.0 else None


def _kind(text: str) -> str:
    """The broken rule, without the numbers (hypothesis counts events by text)."""
    return re.sub(r"0x[0-9a-f]+|\d+", "N", text.split(": ")[-1])[:60]


def _inside(q: MockPackedQueue, extra: int | None, addr: int, length: int) -> bool:
    if q.gpa <= addr and addr + length <= q.end:
        return True
    return extra is not None and extra <= addr and addr + length <= extra + EXTRA_SIZE


def check_chain(q: MockPackedQueue, extra: int | None, chain, in_flight: set[int]) -> None:
    assert 0 <= chain.head < q.num
    assert chain.head not in in_flight  # the device refuses an id used twice
    assert chain.out_len + chain.in_len <= MAX_CHAIN_BYTES
    assert 1 <= len(chain.segments) <= max(q.num, MAX_TABLE)
    views = chain.readable + chain.writable
    assert len(views) == len(chain.segments)
    readable = [s for s in chain.segments if not s[2]]
    writable = [s for s in chain.segments if s[2]]
    assert chain.segments == readable + writable  # 2.8.6: readable first
    assert chain.out_len == sum(s[1] for s in readable)
    assert chain.in_len == sum(s[1] for s in writable)
    for (addr, length, _w), view in zip(chain.segments, views, strict=True):
        assert _inside(q, extra, addr, length)
        assert view.nbytes == length
        assert bytes(view) == q.memory.read(addr, length)


class Drain:
    """One drain of a device, a transcript of what came out, and the pushes it made.

    ``push[k]``: whether the k-th id (of a chain or a refusal) is handed back when the
    call that produced it returns; ``flush[n]``: whether used buffers are flushed when
    the transcript is n long at a call's end. The burst drain records where its calls
    ended (``ends``); the single drain pushes and flushes at those same points.
    """

    def __init__(self, q, extra, push: list[bool], flush: list[bool]) -> None:
        self.q, self.extra = q, extra
        self.dev = q.device()
        self.push, self.flush = push, flush
        self.out: list[tuple] = []
        self.in_flight: set[int] = set()
        self.pending: list[tuple[int, int]] = []  # (id, used length) since the last end
        self.ids = 0
        self.ends: list[int] = []

    def chain(self, chain) -> None:
        check_chain(self.q, self.extra, chain, self.in_flight)
        self.out.append(("chain", chain.head, tuple(chain.segments), chain.out_len,
                         chain.in_len))  # fmt: skip
        self._took(chain.head, min(chain.in_len, 0xFFFF_FFFF))

    def refused(self, e: DescriptorError) -> None:
        assert "vq 0" in str(e)
        self.out.append(("refused", type(e).__name__, str(e), e.head))
        if e.head is not None:
            assert 0 <= e.head < self.q.num and e.head not in self.in_flight
            self._took(e.head, 0)

    def _took(self, bid: int, length: int) -> None:
        self.in_flight.add(bid)
        if self.push[self.ids % len(self.push)]:
            self.pending.append((bid, length))
        self.ids += 1

    def end(self) -> None:
        """A call ended: hand back what was chosen, maybe flush."""
        for bid, length in self.pending:
            self.dev.push_used(bid, length)
            self.in_flight.discard(bid)
        self.pending.clear()
        if self.flush[len(self.out) % len(self.flush)]:
            self.dev.flush_used()

    def state(self) -> tuple:
        d = self.dev
        return (d.last_avail_idx, d.used_pos, d.used_wrap, list(d._inflight))


def drain_burst(d: Drain, budgets: list[int]) -> None:
    for k in range(d.q.num + 2):
        try:
            chains = d.dev.pop_burst(budgets[k % len(budgets)])
        except AvailIndexError as e:
            assert e.head is None
            d.refused(e)
            break
        except DescriptorError as e:
            d.refused(e)
            d.end()
            d.ends.append(len(d.out))
            continue
        assert len(chains) <= budgets[k % len(budgets)]
        for chain in chains:
            d.chain(chain)
        d.end()
        d.ends.append(len(d.out))
        if not chains:
            break
    else:
        raise AssertionError(f"{d.q.num + 2} bursts and the ring is not drained")


def check_slots(q: MockPackedQueue, chain, start: int, end: int) -> None:
    """The chain is exactly what the ring slots it took say (2.8.6, 2.8.19), read
    through the mock: NEXT on all but the last, the id in the last, and either
    direct descriptors one segment each or one INDIRECT descriptor and its table."""
    slots = [(start + k) % q.num for k in range(((end - start) % q.num) or q.num)]
    descs = [q.read_desc(i) for i in slots]
    assert all(d.flags & VRING_DESC_F_NEXT for d in descs[:-1])
    assert not descs[-1].flags & VRING_DESC_F_NEXT
    assert chain.head == descs[-1].id
    if descs[0].flags & VRING_DESC_F_INDIRECT:
        assert len(descs) == 1, "INDIRECT in a chain of several descriptors"
        raw = q.memory.read(descs[0].addr, descs[0].len)  # maybe in the second region
        table = [PDESC.unpack_from(raw, j) for j in range(0, len(raw), DESC_SIZE)]
        want = [(a, n, bool(f & VRING_DESC_F_WRITE)) for a, n, _id, f in table]
    else:
        assert not any(d.flags & VRING_DESC_F_INDIRECT for d in descs)
        want = [(d.addr, d.len, bool(d.flags & VRING_DESC_F_WRITE)) for d in descs]
    assert chain.segments == want


def drain_single(d: Drain, ends: list[int]) -> None:
    ends_at = set(ends)
    for _ in range(d.q.num + 2):
        start = d.dev.last_avail
        try:
            chain = d.dev.pop()
        except AvailIndexError as e:
            d.refused(e)
            break
        except DescriptorError as e:
            d.refused(e)
        else:
            if chain is None:
                break
            d.chain(chain)
            check_slots(d.q, chain, start, d.dev.last_avail)
        if len(d.out) in ends_at:
            d.end()
    else:
        raise AssertionError(f"{d.q.num + 2} pops and the ring is not drained")
    d.end()


@fuzz_settings()
@given(hostile_packed_rings(), st.integers(0, 1 << 32))
def test_packed_walk_single_and_burst_over_hostile_rings(ring, seed):
    q, extra, honest = ring
    rng = random.Random(seed)
    budgets = [rng.choice([1, 2, 3, 4, 7, 16, 64, q.num, q.num + 1, 0xFFFF]) for _ in range(8)]
    push = [rng.random() < 0.7 for _ in range(16)]
    flush = [rng.random() < 0.5 for _ in range(16)]
    before = bytes(q.backing)
    burst = Drain(q, extra, push, flush)
    drain_burst(burst, budgets)
    burst.end()
    after = bytes(q.backing)
    assert q.guards_intact()
    q.backing[:] = before
    single = Drain(q, extra, push, flush)
    drain_single(single, burst.ends)
    assert single.out == burst.out
    assert single.state() == burst.state()
    assert bytes(q.backing) == after
    assert q.guards_intact()
    if honest is not None:
        assert [item[0] for item in single.out] == ["chain"] * honest, single.out
    chains = sum(item[0] == "chain" for item in single.out)
    event(f"chains: {min(chains, 4)}{'+' if chains > 4 else ''}")
    for item in single.out:
        if item[0] == "refused":
            event(f"refused: {_kind(item[2])}")
