"""Fuzz the drivers' used-ring walks, single and burst, against a hostile device.

A split or packed driver (any start index / slot and wrap counter, EVENT_IDX on or off,
indirect tables or not) posts real buffers -- one-descriptor in and out buffers, refill
bursts, chains of up to four segments -- then a device that lies writes the used side:
for split, used entries naming ids in flight, already used, never posted, == num, past
it, up to 2^32 - 1, lengths past the buffer, and used index jumps of -1, num, num + 1,
2 num, 0x8000, any; for packed, used descriptors with such ids and lengths, AVAIL/USED
bits of the wrong lap or any 16 bits, WRITE missing, written at the wrong slot or
skipping the wrong number of slots. Rounds of post / lie / drain repeat up to three
times. Each scenario runs twice from the same seed: once drained by ``get_buf``, once
by ``get_bufs`` with random budgets. What must hold, whatever the device wrote:

* only ``(token, length)``, ``None``, ``UsedRingError`` or ``UsedIndexError`` comes out;
* a token returned is one in flight, returned once, its length within its buffer's
  writable part; an error's token is the buffer its id named, detached;
* after ``UsedIndexError`` or a packed bad id the queue is broken and returns nothing;
  a drained queue re-armed (``enable_cb_prepare`` / ``poll``) sees nothing pending;
* the free count is what is not in flight, and refilling the ring to full hands out
  ids that are all free (the free list was not corrupted);
* single and burst give one transcript.

Short profile in CI; the long run is in docs/conformance.md ("Fuzzing").
"""

from __future__ import annotations

import random

from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz.conftest import fuzz_settings
from tests.virtio.mock import DATA_SLOT, P_AVAIL, MockPackedQueue, MockSplitQueue, used_flags
from virtnet.virtio.errors import QueueFullError, UsedIndexError, UsedRingError

U32_MAX = 0xFFFF_FFFF


class Model:
    """What the driver has in flight: token -> (id, writable length, descriptors)."""

    def __init__(self, q, drv) -> None:
        self.q, self.drv = q, drv
        self.bufs: dict[int, tuple[int, int, int]] = {}
        self.by_id: dict[int, int] = {}
        self.used: set[int] = set()  # ids the honest device has already marked used
        self.next_token = 1

    def post(self, rng: random.Random) -> None:
        """Post a random mix of buffers until the ring is full or the mix ends."""
        q, drv = self.q, self.drv
        for _ in range(rng.randrange(0, q.num + 2)):
            kind = rng.randrange(4)
            token = self.next_token
            self.next_token += 1
            slot = q.data(token % q.data_slots)
            try:
                if kind == 0:
                    n = rng.randrange(1, DATA_SLOT)
                    self._took(token, drv.add_inbuf(slot, n, token), n, 1)
                elif kind == 1:
                    self._took(token, drv.add_outbuf(slot, 64, token), 0, 1)
                elif kind == 2:
                    k = rng.randrange(1, 5)
                    bufs = [(q.data((token + j) % q.data_slots), 1 + rng.randrange(2048),
                             token + j) for j in range(k)]  # fmt: skip
                    self.next_token += k
                    got = drv.add_inbufs(bufs)
                    assert got == min(k, drv.num_free + got)
                    ids = {t: bid for bid, t in enumerate(drv._token) if t is not None}
                    for _addr, n, t in bufs[:got]:
                        self._took(t, ids[t], n, 1)
                else:
                    outs = [(slot, 16)] * rng.randrange(0, 3)
                    ins = [(slot + 64, rng.randrange(1, 64))] * rng.randrange(0 if outs else 1, 3)
                    total = len(outs) + len(ins)
                    free = drv.num_free
                    bid = drv.add(outs, ins, token)
                    self._took(token, bid, sum(n for _a, n in ins), free - drv.num_free)
                    assert free - drv.num_free in (1, total)
            except QueueFullError:
                return

    def _took(self, token: int, bid: int, in_len: int, ndescs: int) -> None:
        assert 0 <= bid < self.q.num and bid not in self.by_id, "an id handed out twice"
        self.bufs[token] = (bid, in_len, ndescs)
        self.by_id[bid] = token

    def returned(self, token: object, length: int | None) -> None:
        assert token in self.bufs, f"token {token!r} is not in flight"
        bid, in_len, _n = self.bufs.pop(token)  # type: ignore[call-overload]
        del self.by_id[bid]
        self.used.discard(bid)
        if length is not None:
            assert 0 <= length <= in_len

    def check_free(self) -> None:
        if self.drv.broken:
            return
        assert self.drv.num_free == self.q.num - sum(n for _b, _l, n in self.bufs.values())


def drain(drv, model: Model, burst: bool, budgets: list[int]) -> list[tuple]:
    """Take used buffers until the driver says none; the transcript of what came out."""
    out: list[tuple] = []
    q = model.q
    for k in range(q.num + 3):
        # Linux's BAD_RING: a split used index more than num ahead is impossible.
        jumped = (
            isinstance(q, MockSplitQueue)
            and not drv.broken
            and ((q.used_idx - drv.last_used_idx) & 0xFFFF) > q.num
        )
        # Its packed form: with buffers in flight, the slot at last_used marked AVAIL for
        # the other lap (neither this lap's used mark nor the driver's own avail mark).
        if isinstance(q, MockPackedQueue) and not drv.broken and drv.num_free < q.num:
            flags = q.read_desc(drv.last_used).flags
            jumped = bool(flags & P_AVAIL) != bool(drv.used_wrap)
        try:
            if burst:
                budget = budgets[k % len(budgets)]
                got = drv.get_bufs(budget)
                assert len(got) <= budget
            else:
                one = drv.get_buf()
                got = [] if one is None else [one]
        except UsedIndexError as e:
            assert drv.broken and jumped
            out.append(("index", str(e)))
            break
        except UsedRingError as e:
            assert not jumped, "a used index jump read as entries"
            assert "vq 0" in str(e)
            if e.token is not None:
                assert model.by_id.get(e.head) == e.token  # the buffer its id named
                model.returned(e.token, None)
            out.append(("refused", str(e), e.head, e.token))
            continue
        assert not jumped, "a used index jump read as entries"
        for token, length in got:
            model.returned(token, length)
            out.append(("buf", token, length))
        if not got:
            if not drv.broken:
                assert not drv.more_used()
                # The race check of virtnet_poll's re-arm agrees: nothing pending here
                # (a wrap counter out of step with the ring would see an old lap's entry).
                assert not drv.poll(drv.enable_cb_prepare())
            break
    else:
        raise AssertionError(f"{q.num + 3} calls and the used ring is not drained")
    if drv.broken:
        assert drv.get_buf() is None and drv.get_bufs(8) == [] and not drv.more_used()
    model.check_free()
    return out


def refill_check(drv, model: Model) -> None:
    """Fill the ring to full: every id handed out is one not in flight, none twice."""
    if drv.broken:
        return
    free = drv.num_free
    for k in range(free):
        token = ("refill", k)
        model._took(token, drv.add_outbuf(model.q.data(0), 8, token), 0, 1)  # type: ignore
    try:
        drv.add_outbuf(model.q.data(0), 8, "one too many")
    except QueueFullError:
        pass
    else:
        raise AssertionError(f"the ring took more than its {free} free descriptors")


# -- split ------------------------------------------------------------------------------


def _split_lie(rng: random.Random, q: MockSplitQueue, model: Model, chaos: float) -> None:
    """Used entries as a hostile device writes them, then maybe an index jump."""
    honest = [t for t, (b, _l, _n) in model.bufs.items() if b not in model.used]
    rng.shuffle(honest)
    for _ in range(rng.choice([len(model.bufs), rng.randrange(0, q.num + 2)])):
        if honest and rng.random() >= chaos:
            token = honest.pop()
            bid, in_len, _n = model.bufs[token]
            model.used.add(bid)
            q.put_used(bid, rng.randrange(in_len + 1))
            continue
        bid = rng.choice([rng.randrange(q.num), q.num, q.num + 1, 0xFFFF, 0x10000, U32_MAX,
                          rng.getrandbits(32)])  # fmt: skip
        in_len = model.bufs[model.by_id[bid]][1] if bid in model.by_id else 0
        length = rng.choice([0, in_len, in_len + 1, U32_MAX, rng.getrandbits(32)])
        q.put_used(bid, length)
    if rng.random() < chaos * 0.3:
        pending = (q.used_idx - model.drv.last_used_idx) & 0xFFFF
        jump = rng.choice([-1, q.num - pending, q.num + 1 - pending, 2 * q.num, 0x8000,
                           0xFFFF, rng.getrandbits(16)])  # fmt: skip
        q.set_used_idx((q.used_idx + jump) & 0xFFFF)


def split_scenario(seed: int, burst: bool) -> list[tuple]:
    rng = random.Random(seed)
    num = rng.choice([1, 2, 4, 8, 16, 256])
    start = rng.choice([0, 0, 0xFFFF - 1, 0x8000, rng.getrandbits(16)])
    q = MockSplitQueue(num, event_idx=rng.random() < 0.5, data_slots=4, start_idx=start,
                       indirect_max=rng.choice([0, 4]), guard=64)  # fmt: skip
    chaos = rng.choice([0.0, 0.05, 0.2, 1.0])
    return scenario(rng, q, _split_lie, chaos, burst)


def scenario(rng: random.Random, q, lie, chaos: float, burst: bool) -> list[tuple]:
    """Post, let the device ``lie``, drain, a few times; the transcript of what came out."""
    num = q.num
    drv = q.driver()
    model = Model(q, drv)
    budgets = [rng.choice([1, 2, 3, 8, 64, num, num + 1]) for _ in range(8)]
    out: list[tuple] = []
    for _ in range(rng.randrange(1, 4)):
        model.post(rng)
        lie(rng, q, model, chaos)
        if rng.random() < 0.3:
            drv.disable_cb()
        elif rng.random() < 0.3:
            drv.enable_cb_prepare()
        out += drain(drv, model, burst, budgets)
        if drv.broken:
            break
    refill_check(drv, model)
    assert q.guards_intact()
    return out


@fuzz_settings()
@given(st.integers(0, 1 << 64))
def test_split_used_walk_single_and_burst_under_a_hostile_device(seed):
    single = split_scenario(seed, burst=False)
    assert split_scenario(seed, burst=True) == single
    _events(single)


# -- packed -----------------------------------------------------------------------------


def _packed_lie(rng: random.Random, q: MockPackedQueue, model: Model, chaos: float) -> None:
    """Used descriptors as a hostile device writes them, at its position or anywhere."""
    honest = [t for t, (b, _l, _n) in model.bufs.items() if b not in model.used]
    rng.shuffle(honest)
    for _ in range(rng.choice([len(model.bufs), rng.randrange(0, q.num + 2)])):
        if honest and rng.random() >= chaos:
            token = honest.pop()
            bid, in_len, ndescs = model.bufs[token]
            model.used.add(bid)
            q.mark_used(bid, rng.randrange(in_len + 1), ndescs)
            continue
        bid = rng.choice([rng.randrange(q.num), q.num, q.num + 1, 0x8000, 0xFFFF,
                          rng.getrandbits(16)])  # fmt: skip
        in_len = model.bufs[model.by_id[bid]][1] if bid in model.by_id else 0
        length = rng.choice([0, in_len, in_len + 1, U32_MAX, rng.getrandbits(32)])
        write = 2 if rng.random() < 0.7 else 0  # VRING_DESC_F_WRITE: the length counts
        flags = rng.choice([used_flags(q.used_wrap) | write, used_flags(q.used_wrap ^ 1) | write,
                            rng.getrandbits(16)])  # fmt: skip
        slots = rng.choice([1, 1, 2, q.num, rng.randrange(1, q.num + 2)])
        if rng.random() < 0.2:  # at a slot of its own choosing
            q.used_pos = rng.randrange(q.num)
        q.mark_used(bid, length, slots, flags=flags)


def packed_scenario(seed: int, burst: bool) -> list[tuple]:
    rng = random.Random(seed)
    num = rng.choice([1, 2, 3, 4, 5, 8, 16, 17, 64])
    start = (rng.randrange(num), rng.randrange(2))
    q = MockPackedQueue(num, event_idx=rng.random() < 0.5, data_slots=4, start=start,
                        indirect_max=rng.choice([0, 4]), guard=64)  # fmt: skip
    chaos = rng.choice([0.0, 0.02, 0.1, 1.0])  # one bad id stops the queue: lie rarely
    return scenario(rng, q, _packed_lie, chaos, burst)


@fuzz_settings()
@given(st.integers(0, 1 << 64))
def test_packed_used_walk_single_and_burst_under_a_hostile_device(seed):
    single = packed_scenario(seed, burst=False)
    assert packed_scenario(seed, burst=True) == single
    _events(single)


def _events(transcript: list[tuple]) -> None:
    bufs = sum(item[0] == "buf" for item in transcript)
    event(f"buffers: {min(bufs, 8)}{'+' if bufs > 8 else ''}")
    for item in transcript:
        if item[0] != "buf":
            text = item[1].split(": ", 1)[-1]
            event(f"{item[0]}: {' '.join(w for w in text.split()[:4] if not w[0].isdigit())}")
