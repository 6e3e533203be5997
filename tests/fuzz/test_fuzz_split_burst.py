"""Fuzz the split device's burst call against its single one (``pop_burst`` vs ``pop``).

The rings are ``test_fuzz_chain_walk``'s hostile ones (garbage tables, loops, indirect
abuse, heads == num and past it, avail index jumps of 1, num, num + 1, 0x8000). Each ring
is drained twice from the same memory: once by ``pop`` until it says nothing more, once by
``pop_burst`` with random budgets. What must hold, whatever the bytes:

* both drains are one transcript: the same chains (head, segments, lengths) and the same
  refusals (type, message, head) in the same order, and the same ``last_avail_idx``;
* a burst holds at most its budget, every chain well formed (``check_chain``), and only
  ``DescriptorError`` / ``AvailIndexError`` come out -- never an IndexError & co.;
* a refused chain is consumed exactly once, by whichever call raised it.

Short profile in CI; the long run is in docs/conformance.md ("Fuzzing").
"""

from __future__ import annotations

import random

from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz.conftest import fuzz_settings
from tests.fuzz.test_fuzz_chain_walk import _kind, check_chain, hostile_rings
from virtnet.virtio.errors import AvailIndexError, DescriptorError


def _key(chain) -> tuple:
    return ("chain", chain.head, tuple(chain.segments), chain.out_len, chain.in_len)


def _refusal(e: DescriptorError) -> tuple:
    return ("refused", type(e).__name__, str(e), e.head)


def _jumped(dev, q) -> bool:
    """vhost's "Guest moved avail index": more than num ahead cannot be chains."""
    return (q.avail_idx - dev.last_avail_idx) & 0xFFFF > q.num


def drain_single(dev, q, extra, limit: int) -> list[tuple]:
    out: list[tuple] = []
    for _ in range(limit):
        jumped = _jumped(dev, q)
        try:
            chain = dev.pop()
        except AvailIndexError as e:
            assert jumped
            out.append(_refusal(e))
            break
        except DescriptorError as e:
            assert not jumped, "an avail index jump walked as chains"
            out.append(_refusal(e))
            continue
        assert not jumped, "an avail index jump walked as chains"
        if chain is None:
            break
        check_chain(q, extra, chain)
        out.append(_key(chain))
    return out


def drain_burst(dev, q, extra, limit: int, budgets: list[int]) -> list[tuple]:
    out: list[tuple] = []
    for k in range(limit):
        budget = budgets[k % len(budgets)]
        before = dev.last_avail_idx
        jumped = _jumped(dev, q)
        try:
            chains = dev.pop_burst(budget)
        except AvailIndexError as e:
            assert jumped
            assert dev.last_avail_idx == before  # nothing consumed
            out.append(_refusal(e))
            break
        except DescriptorError as e:
            assert not jumped, "an avail index jump walked as chains"
            assert dev.last_avail_idx == (before + 1) & 0xFFFF  # the bad one, consumed
            out.append(_refusal(e))
            continue
        assert not jumped, "an avail index jump walked as chains"
        if not chains:
            break
        assert len(chains) <= budget
        assert dev.last_avail_idx == (before + len(chains)) & 0xFFFF
        for chain in chains:
            check_chain(q, extra, chain)
            out.append(_key(chain))
    return out


@fuzz_settings()
@given(hostile_rings(), st.integers(0, 1 << 32))
def test_pop_burst_is_pop_in_bursts(ring, seed):
    q, extra, published = ring
    rng = random.Random(seed)
    budgets = [rng.choice([1, 2, 3, 4, 7, 16, 64, q.num, q.num + 1, 0xFFFF]) for _ in range(8)]
    limit = published + 2  # every call consumes or ends the drain
    single, burst = q.device(), q.device()
    a = drain_single(single, q, extra, limit)
    b = drain_burst(burst, q, extra, limit, budgets)
    assert a == b
    assert single.last_avail_idx == burst.last_avail_idx
    # A burst of 0 takes nothing, whatever the ring says (a jump may still be named).
    before = burst.last_avail_idx
    try:
        assert burst.pop_burst(0) == []
    except AvailIndexError:
        pass
    assert burst.last_avail_idx == before
    for item in a:
        event(f"refused: {_kind(item[2])}" if item[0] == "refused" else "chain")
    assert q.guards_intact()
