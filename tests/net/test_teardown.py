"""Teardown: virtnet_remove after the device reset.

The seed's remove: "list_splice_init(&vi->used_pages, &vi->freed_pages);
list_for_each_entry_safe(...) __free_pages(plist->page, 0)" — and it dropped the
BUG_ON(vi->num != 0) for the mergeable case. virtnet keeps the check, on the pool:
for every strategy, after any traffic, including every error path, every page comes
back. The property at the end drives random traffic, random lies and random
allocation failures and checks exactly that, plus the bytes of every delivered packet.
"""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.net.conftest import (
    ALL_CONFIGS,
    FEATURE_SETS,
    MERGEABLE_STRATEGIES,
    MRG,
    STRATEGY_FEATURES,
    LyingDevice,
    Pair,
    frame,
    frame_buf_limit,
    hdr,
    make_pair,
)
from virtnet.net.constants import ETH_HLEN, GOOD_COPY_LEN, MAX_PACKET_LEN, PAGE_SIZE
from virtnet.net.header import MRG_HDR_LEN
from virtnet.net.skb import SkBuff

LARGEST = 65536 + ETH_HLEN
MARK = b"VNTEST"
LIE_MARK = b"LIELIE"


def assert_all_back(p: Pair) -> None:
    """What remove promises: nothing outstanding, every alloc matched by a free."""
    drv = p.drv
    st_ = drv.stats
    assert drv.pool.outstanding == 0
    assert st_.pages_outstanding == 0
    assert st_.page_allocs == st_.page_frees
    assert drv.skbs.live == 0 and st_.skb_allocs == st_.skb_frees
    assert drv.num == 0
    assert drv.rvq.num_free == drv.rvq.num and drv.svq.num_free == drv.svq.num
    rx = drv.rx
    if hasattr(rx, "used_pages"):
        assert not rx.used_pages and not rx.freed_pages


def tx_skb(p: Pair, data: bytes) -> SkBuff | None:
    """A tx skb (head + page frags), or None when memory ran out (like a full sndbuf)."""
    skb = p.drv.skbs.alloc(GOOD_COPY_LEN)
    if skb is None:
        return None
    skb.vnet_hdr = bytes(MRG_HDR_LEN)
    skb.put(data[:GOOD_COPY_LEN])
    for off in range(GOOD_COPY_LEN, len(data), PAGE_SIZE):
        page = p.drv.pool.alloc_page()
        if page is None:
            skb.free()
            return None
        chunk = data[off : off + PAGE_SIZE]
        page.view[: len(chunk)] = chunk
        skb.add_frag(page, 0, len(chunk))
    return skb


def traffic_sizes(strategy: str) -> list[int]:
    if strategy == "small":
        return [ETH_HLEN, 60, 1514, MAX_PACKET_LEN]
    return [ETH_HLEN, 60, 1514, 9000, LARGEST]


# -- after honest traffic ---------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "features"), ALL_CONFIGS)
def test_remove_after_traffic_returns_every_page(strategy, features):
    p = make_pair(strategy, FEATURE_SETS[features])
    for k, size in enumerate(traffic_sizes(strategy) * 2):
        assert p.send(frame(size, k))
        p.napi()
        skb = tx_skb(p, frame(size, k))
        assert p.drv.start_xmit(skb)
    p.dev.process_tx(lambda views, n: True, budget=3)  # some tx done, some still in flight
    p.dev.flush_tx()
    p.teardown()
    assert_all_back(p)
    assert p.frames == [frame(s, k) for k, s in enumerate(traffic_sizes(strategy) * 2)]


@pytest.mark.parametrize("strategy", list(STRATEGY_FEATURES))
def test_remove_with_used_buffers_the_driver_never_polled(strategy):
    # The device filled buffers and the driver was torn down before its poll ran.
    p = make_pair(strategy, STRATEGY_FEATURES[strategy])
    for k in range(5):
        p.send(frame(1000 * (k + 1), k))
    p.teardown()
    assert_all_back(p)
    assert p.frames == []


@pytest.mark.parametrize("strategy", list(STRATEGY_FEATURES))
def test_remove_with_chains_the_device_took_but_did_not_use(strategy):
    p = make_pair(strategy, STRATEGY_FEATURES[strategy])
    assert p.dev.has_room(1000)
    p.teardown()
    assert_all_back(p)


@pytest.mark.parametrize("strategy", list(STRATEGY_FEATURES))
def test_remove_with_tx_in_flight_and_tx_used_but_not_reclaimed(strategy):
    p = make_pair(strategy, STRATEGY_FEATURES[strategy])
    for k in range(6):
        assert p.drv.start_xmit(tx_skb(p, frame(5000, k)))
    p.dev.process_tx(lambda views, n: True, budget=3)
    p.dev.flush_tx()
    p.teardown()
    assert_all_back(p)


def test_pages_held_by_the_stack_come_back_when_it_frees_them():
    # remove cannot take back what the stack still holds (put_page comes later).
    p = make_pair("deferred", MRG, hold=True)
    p.send(frame(9000))
    p.napi()
    frags = sum(skb.nr_frags for skb in p.held)
    p.dev.reset()
    p.drv.remove()
    assert p.drv.pool.outstanding == frags == p.drv.stats.pages_outstanding
    p.release_held()
    assert p.drv.pool.outstanding == 0


@pytest.mark.parametrize("strategy", list(STRATEGY_FEATURES))
def test_remove_keeps_the_seeds_bug_on_for_every_strategy(strategy):
    # BUG_ON(vi->num != 0), which the seed dropped for mergeable buffers: a posted buffer
    # remove() cannot account for is raised, not left as a silent leak.
    p = make_pair(strategy, STRATEGY_FEATURES[strategy])
    p.drv.rq.num += 1  # one more buffer counted as posted than the ring gives back
    p.dev.reset()
    with pytest.raises(AssertionError, match="1 rx buffers unaccounted for"):
        p.drv.remove()


def test_remove_twice_is_harmless():
    p = make_pair("deferred", MRG)
    p.teardown()
    p.teardown()
    assert_all_back(p)


def test_remove_of_a_driver_that_never_posted_a_buffer():
    p = make_pair("prealloc", MRG, fill=False)
    p.teardown()
    assert_all_back(p)


# -- after every error path -------------------------------------------------------------------


def lie(p: Pair, kind: str) -> bool:
    """Script one lie on the rx ring; False when the ring has too few buffers for it."""
    liar = LyingDevice(p)
    q = p.layout.queue_size
    need = {"num_buffers_missing": 2, "too_many_frags": frame_buf_limit(p) + 1,
            "used_len_later": 2, "used_len_first_of_3": 3}.get(kind, 1)  # fmt: skip
    if kind != "unknown_id" and liar.pending() < need:
        return False
    data = LIE_MARK * 700  # 4200 bytes: more than a page, never a valid tagged frame
    if kind == "short":
        liar.buffer(hdr(1) + data[: ETH_HLEN - 1])
    elif kind == "zero_len":
        liar.used(liar.pop().head, 0)
    elif kind == "unknown_id":
        liar.used(q + 1, 100)
    elif kind == "used_len_first":
        chain = liar.pop()
        liar.write(chain, hdr(1) + data[:100])
        liar.used(chain.head, chain.in_len + 1)
    elif kind == "used_len_later":  # a bad length on a packet's second buffer
        a, b = liar.sizes(2)
        liar.packet(data[: a + b - MRG_HDR_LEN - 100], lengths=[a, b + 1])
    elif kind == "used_len_first_of_3":  # a bad length on the first of three buffers
        sizes = liar.sizes(3)
        body = (LIE_MARK * 2100)[: sum(sizes) - MRG_HDR_LEN]
        liar.packet(body, lengths=[sizes[0] + 1, *sizes[1:]])
    elif kind == "num_buffers_missing":
        liar.packet(data[: liar.room(1) - MRG_HDR_LEN], num_buffers=3, nchains=1)
    elif kind == "num_buffers_zero":
        liar.packet(data[:100], num_buffers=0)
    elif kind == "too_many_frags":
        body = (LIE_MARK * (liar.room(need) // len(LIE_MARK) + 1))[: liar.room(need) - MRG_HDR_LEN]
        liar.packet(body, nchains=need)
    else:  # pragma: no cover
        raise ValueError(kind)
    liar.flush()
    return True


MERGEABLE_LIES = ["short", "zero_len", "unknown_id", "used_len_first", "num_buffers_missing",
                  "num_buffers_zero", "too_many_frags", "used_len_later",
                  "used_len_first_of_3"]  # fmt: skip
# Without MRG_RXBUF num_buffers means nothing: only the ring-level lies apply.
NONMERGEABLE_LIES = ["short", "zero_len", "unknown_id", "used_len_first"]


def lies_for(strategy: str) -> list[str]:
    return MERGEABLE_LIES if strategy in MERGEABLE_STRATEGIES else NONMERGEABLE_LIES


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [(s, k) for s in STRATEGY_FEATURES for k in lies_for(s)],
)
def test_remove_after_each_error_path_returns_every_page(strategy, kind):
    p = make_pair(strategy, STRATEGY_FEATURES[strategy])
    p.send(frame(1000, 1))
    p.napi()
    assert lie(p, kind)
    p.napi()
    assert p.drv.stats.rx_length_errors + p.drv.stats.rx_dropped >= 1
    p.send(frame(1000, 2))
    p.napi()
    if kind == "unknown_id":  # BAD_RING: the queue is broken, nothing more is taken
        assert p.drv.broken and p.frames == [frame(1000, 1)]
    else:
        assert p.frames == [frame(1000, 1), frame(1000, 2)]
    p.teardown()
    assert_all_back(p)


@pytest.mark.parametrize("strategy", list(STRATEGY_FEATURES))
def test_remove_after_allocation_failures_returns_every_page(strategy):
    p = make_pair(strategy, STRATEGY_FEATURES[strategy])
    failed = []
    p.drv.skbs.fail = lambda n: n % 3 == 0 and not failed.append(("skb", n))
    p.drv.pool.fail = lambda n: n % 5 == 0 and not failed.append(("page", n))
    for k in range(150):  # enough to refill a few times
        p.send(frame(1514, k))
        p.napi()
    assert {kind for kind, _ in failed} == {"skb", "page"}
    assert set(p.frames) <= {frame(1514, k) for k in range(150)}
    p.teardown()
    assert_all_back(p)


# -- the property -----------------------------------------------------------------------------


def tagged(seq: int, n: int) -> bytes:
    """An honest frame of ``n`` >= 14 bytes carrying its sequence number up front."""
    head = MARK + seq.to_bytes(4, "little") + b"\x88\xb5\x00\x00"
    return (head + frame(max(0, n - len(head)), seq))[:n]


def nth_calls(fails: frozenset[int]):
    """A fault injector failing its own n-th calls (whatever the allocator's count is)."""
    calls = [0]

    def fail(_n: int) -> bool:
        calls[0] += 1
        return calls[0] in fails

    return fail


def ops_for(strategy: str):
    size = st.integers(ETH_HLEN, LARGEST)
    small = st.integers(ETH_HLEN, 300)
    return st.lists(
        st.one_of(
            st.tuples(st.just("rx"), st.one_of(size, small)),
            st.tuples(
                st.just("burst"), st.lists(st.one_of(small, size), min_size=1, max_size=6)
            ),  # fmt: skip
            st.tuples(st.just("lie"), st.sampled_from(lies_for(strategy))),
            st.tuples(st.just("tx"), st.integers(ETH_HLEN, 20000)),
            st.tuples(st.just("tx_done"), st.integers(1, 8)),
            st.tuples(st.just("poll"), st.sampled_from([1, 3, 64])),
            st.tuples(st.just("release"), st.just(0)),
        ),
        min_size=2,
        max_size=16,
    )


def run_scenario(
    strategy: str, features: int, ops, skb_fails, page_fails, hold, xdp=None
) -> None:
    p = make_pair(strategy, features, queue_size=32, npages=1024, hold=hold)
    p.drv.skbs.fail = nth_calls(skb_fails)
    p.drv.pool.fail = nth_calls(page_fails)
    redirected: list[bytes] = []
    if xdp is not None:  # a program in the path (test_xdp.py): whatever it answers
        from virtnet.net.xdp import XdpHook

        port = lambda views: redirected.append(b"".join(views)) or True  # noqa: E731
        p.drv.rx.attach_xdp(XdpHook(xdp, p.drv.stats, redirect=port))
    sent: dict[int, bytes] = {}
    tx_sent: list[bytes] = []
    host: list[bytes] = []
    seq = 0

    def xmit(views, n):
        host.append(b"".join(views)[MRG_HDR_LEN:])
        return True

    for op, arg in ops:
        if op in ("rx", "burst"):
            for size in [arg] if op == "rx" else arg:
                data = tagged(seq, size)
                if p.send(data):
                    sent[seq] = data
                seq += 1
        elif op == "lie":
            p.napi()  # a lie must not borrow an honest packet's buffers
            event(f"lie {arg}: {'told' if lie(p, arg) else 'no buffer to lie with'}")
            p.napi()
        elif op == "tx":
            data = tagged(10_000 + len(tx_sent), arg)
            skb = tx_skb(p, data)
            if skb is not None:
                if p.drv.start_xmit(skb):
                    tx_sent.append(data)
                else:
                    skb.free()  # NETDEV_TX_BUSY: the caller drops it here
        elif op == "tx_done":
            p.dev.process_tx(xmit, budget=arg)
            p.dev.flush_tx()
            p.drv.free_old_xmit_skbs()
        elif op == "poll":
            p.napi(arg)
        elif op == "release":
            p.release_held()
    p.napi()

    last = -1
    for data in p.frames:
        assert data[:6] == MARK, "a lie or a torn packet was delivered"
        s = int.from_bytes(data[6:10], "little")
        assert s > last, "a packet was delivered twice or out of order"
        assert data == sent[s]
        last = s
    assert p.drv.stats.rx_packets == len(p.frames)
    if xdp is not None:  # XDP_TX sends rx frames back: each intact, none torn
        for data in host + redirected:
            if data[:6] == MARK and int.from_bytes(data[6:10], "little") < 10_000:
                assert data == sent[int.from_bytes(data[6:10], "little")]
        host = [h for h in host if h[:6] == MARK and int.from_bytes(h[6:10], "little") >= 10_000]
    assert host == tx_sent[: len(host)]
    stats = p.drv.stats
    event(f"driver dropped: {stats.rx_dropped > 0}, device dropped: {p.dev.stats.rx_dropped > 0}")
    event(f"delivered {'some' if p.frames else 'none'}, stack holds pages: {bool(p.held)}")

    p.teardown()
    assert_all_back(p)


@pytest.mark.parametrize(("strategy", "features"), ALL_CONFIGS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_teardown_property_any_traffic_any_lies_any_allocation_failures(strategy, features, data):
    run_scenario(
        strategy,
        FEATURE_SETS[features],
        data.draw(ops_for(strategy), label="ops"),
        data.draw(st.frozensets(st.integers(1, 40), max_size=6), label="skb_fails"),
        data.draw(st.frozensets(st.integers(1, 1200), max_size=40), label="page_fails"),
        data.draw(st.booleans(), label="hold"),
    )
