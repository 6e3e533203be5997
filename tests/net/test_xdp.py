"""The XDP-style hook: a program on the raw rx buffers, before any skb exists.

Every strategy runs it (deferred, prealloc, ewma, big, small). What the issue asks to
see: PASS changes nothing but the counters; DROP at 64 B costs no skb and no page;
TX and REDIRECT frames arrive intact where they were sent; a program that raises,
returns nonsense or keeps a reference to the buffer gets its frame ABORTED, a clear
(rate-limited) error, and nothing leaks.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.net.conftest import (
    FEATURE_SETS,
    MERGEABLE_STRATEGIES,
    STRATEGY_FEATURES,
    LyingDevice,
    Pair,
    frame,
    make_pair,
)
from tests.net.test_teardown import ALL_CONFIGS, assert_all_back, ops_for, run_scenario
from virtnet.net.header import MRG_HDR_LEN
from virtnet.net.xdp import (
    XDP_ABORTED,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    XDP_TX,
    XdpHook,
    XdpLoadError,
    load_program,
)

STRATEGIES = list(STRATEGY_FEATURES)


def sizes_for(strategy: str) -> list[int]:
    return [60, 1514] if strategy == "small" else [60, 1514, 9000, 65550]


def attach(p: Pair, prog, redirect=None) -> XdpHook:
    hook = XdpHook(prog, p.drv.stats, redirect=redirect)
    p.drv.rx.attach_xdp(hook)
    return hook


def xdp_counts(p: Pair) -> tuple[int, ...]:
    s = p.drv.stats
    return (s.rx_xdp_packets, s.rx_xdp_drops, s.rx_xdp_tx, s.rx_xdp_redirects, s.rx_xdp_aborted)


def host_tx(p: Pair) -> list[tuple[bytes, bytes]]:
    """What the device takes off the tx ring: (virtio-net header, frame)."""
    got = []

    def xmit(views, n):
        data = b"".join(bytes(v) for v in views)
        got.append((data[:MRG_HDR_LEN], data[MRG_HDR_LEN:]))
        return True

    p.dev.process_tx(xmit, budget=1 << 16)
    p.dev.flush_tx()
    p.drv.free_old_xmit_skbs()
    return got


@pytest.fixture(params=STRATEGIES)
def any_strategy(request, pair_factory) -> Pair:
    return pair_factory(request.param, STRATEGY_FEATURES[request.param])


# -- PASS ---------------------------------------------------------------------------------------


def test_pass_sees_the_whole_frame_and_delivers_it_unchanged(any_strategy):
    p = any_strategy
    seen = []

    def prog(data, frags):
        seen.append((len(frags), bytes(data) + b"".join(bytes(f) for f in frags)))
        return XDP_PASS

    attach(p, prog)
    sizes = sizes_for(p.strategy)
    for k, size in enumerate(sizes):
        assert p.send(frame(size, k))
        p.napi()
    expected = [frame(size, k) for k, size in enumerate(sizes)]
    assert p.frames == expected
    assert [data for _, data in seen] == expected
    assert seen[0][0] == 0  # a 60-byte frame is one buffer: no frags
    if p.strategy != "small":
        assert seen[-1][0] > 0  # a 64 KiB frame is a multi-buffer frame
    assert xdp_counts(p) == (len(sizes), 0, 0, 0, 0)


def test_detaching_the_program_restores_the_plain_path(pair_factory):
    p = pair_factory("deferred", STRATEGY_FEATURES["deferred"])
    attach(p, lambda data, frags: XDP_DROP)
    p.send(frame(100))
    p.napi()
    p.drv.rx.attach_xdp(None)
    p.send(frame(100, 1))
    p.napi()
    assert p.frames == [frame(100, 1)]
    assert xdp_counts(p) == (1, 1, 0, 0, 0)


# -- DROP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["deferred", "ewma", "small", "big"])
def test_drop_at_64_bytes_costs_no_skb_and_no_page(pair_factory, strategy):
    p = pair_factory(strategy, STRATEGY_FEATURES[strategy])
    attach(p, lambda data, frags: XDP_DROP)
    for k in range(100):  # warm up: a few trips round the ring
        assert p.send(frame(64, k))
        p.napi()
    p.drv.try_fill_recv()
    st_ = p.drv.stats
    skbs, pages, out = st_.skb_allocs, st_.page_allocs, st_.pages_outstanding
    n = 300
    for k in range(n):
        assert p.send(frame(64, 1000 + k))
        p.napi()
    p.drv.try_fill_recv()
    assert (st_.skb_allocs - skbs, st_.page_allocs - pages) == (0, 0)
    assert st_.pages_outstanding == out
    assert st_.rx_xdp_drops == 100 + n and st_.rx_packets == 0 and p.frames == []


def test_drop_on_prealloc_still_pays_an_skb_per_posted_buffer(pair_factory):
    # The contrast the seed is about: the pre-patch code allocates its skbs on refill,
    # before anything arrives, so even a dropped frame costs one.
    p = pair_factory("prealloc", STRATEGY_FEATURES["prealloc"])
    attach(p, lambda data, frags: XDP_DROP)
    skbs = p.drv.stats.skb_allocs
    for k in range(200):
        p.send(frame(64, k))
        p.napi()
    p.drv.try_fill_recv()
    assert p.drv.stats.skb_allocs - skbs == 200
    assert p.frames == []


def test_the_program_decides_per_frame(pair_factory):
    p = pair_factory("ewma", STRATEGY_FEATURES["ewma"])
    attach(p, lambda data, frags: XDP_DROP if data[0] & 1 else XDP_PASS)
    sent = [frame(200 + k, k) for k in range(40)]
    for data in sent:
        p.send(data)
    p.napi()
    assert p.frames == [d for d in sent if not d[0] & 1]


def lie_then_three_honest_frames(p: Pair) -> tuple[int, ...]:
    """num_buffers 0xFFFF once, then three honest frames; the driver's verdict counters."""
    LyingDevice(p).packet(frame(100), num_buffers=0xFFFF, nchains=1)
    honest = [frame(300 + k, k) for k in range(3)]
    for data in honest:
        assert p.send(data)
    p.napi()
    assert p.frames == honest
    st = p.drv.stats
    return (st.rx_length_errors, st.rx_dropped, st.fault_num_buffers_big, st.rx_packets)


@pytest.mark.parametrize("strategy", MERGEABLE_STRATEGIES)
def test_xdp_does_not_take_num_buffers_on_trust(pair_factory, strategy):
    # issue 18.1: the num_buffers check comes before any further buffer is taken off
    # the ring, with a program attached as without one: the lying frame is dropped
    # at once (the same counters, the same name) and the honest frames behind it live.
    plain = pair_factory(strategy, STRATEGY_FEATURES[strategy])
    expected = lie_then_three_honest_frames(plain)
    assert expected == (1, 1, 1, 3)
    p = pair_factory(strategy, STRATEGY_FEATURES[strategy])
    attach(p, lambda data, frags: XDP_PASS)
    assert lie_then_three_honest_frames(p) == expected
    assert xdp_counts(p) == (3, 0, 0, 0, 0)  # the lie never reached the program


# -- TX -----------------------------------------------------------------------------------------


def swap_macs(data, frags):
    """xdp2's program: swap destination and source MAC, send it back."""
    dst = bytes(data[0:6])
    data[0:6] = data[6:12]
    data[6:12] = dst
    return XDP_TX


def test_tx_sends_the_frame_back_intact_and_rewritten_in_place(any_strategy):
    p = any_strategy
    attach(p, swap_macs)
    sizes = sizes_for(p.strategy)
    sent = [frame(size, k) for k, size in enumerate(sizes)]
    for data in sent:
        assert p.send(data)
        p.napi()
    got = host_tx(p)
    assert [h for h, _ in got] == [bytes(MRG_HDR_LEN)] * len(sent)
    assert [d for _, d in got] == [d[6:12] + d[0:6] + d[12:] for d in sent]
    assert p.frames == []
    if p.strategy != "prealloc":  # (prealloc allocated its skbs when it posted)
        assert p.drv.stats.skb_allocs == 0
    assert xdp_counts(p) == (len(sent), 0, len(sent), 0, 0)


def test_tx_buffers_come_back_to_the_rx_lists_when_the_device_is_done(pair_factory):
    p = pair_factory("deferred", STRATEGY_FEATURES["deferred"])
    attach(p, lambda data, frags: XDP_TX)
    p.send(frame(3000))
    p.napi()
    rx = p.drv.rx
    tail = len(rx.freed_pages) - rx._freed_head
    host_tx(p)  # the device used it; free_old_xmit_skbs gives the page back
    assert len(rx.freed_pages) - rx._freed_head == tail + 1
    assert rx.freed_pages[-1].page is not None  # no page allocation to post it again


def test_tx_with_a_full_tx_ring_drops_the_frame_and_loses_nothing(pair_factory):
    p = pair_factory("ewma", STRATEGY_FEATURES["ewma"], queue_size=16)
    attach(p, lambda data, frags: XDP_TX)
    for k in range(40):  # the device never takes tx: the ring fills up
        p.send(frame(100, k))
        p.napi()
    st_ = p.drv.stats
    assert st_.rx_xdp_tx == 16 and st_.rx_xdp_drops == 40 - 16


def test_tx_frames_still_in_flight_at_teardown_are_given_back():
    p = make_pair("ewma", STRATEGY_FEATURES["ewma"])
    attach(p, lambda data, frags: XDP_TX)
    for k in range(5):
        p.send(frame(9000, k))
    p.napi()
    assert p.drv.svq.in_flight == 5
    p.teardown()
    assert_all_back(p)


# -- REDIRECT -----------------------------------------------------------------------------------


def test_redirect_hands_the_frame_to_the_owners_port(any_strategy):
    p = any_strategy
    port = []
    attach(p, lambda data, frags: XDP_REDIRECT,
           redirect=lambda views: port.append(b"".join(views)) or True)  # fmt: skip
    sent = [frame(size, k) for k, size in enumerate(sizes_for(p.strategy))]
    for data in sent:
        p.send(data)
        p.napi()
    assert port == sent and p.frames == []
    assert xdp_counts(p) == (len(sent), 0, 0, len(sent), 0)


def test_redirect_into_another_virtnet_port_arrives_at_its_device(pair_factory):
    """Driver A's rx → XDP_REDIRECT → driver B's tx → device B: byte for byte."""
    a = pair_factory("ewma", STRATEGY_FEATURES["ewma"])
    b = pair_factory("deferred", STRATEGY_FEATURES["deferred"])

    def to_b(views) -> bool:
        data = b"".join(bytes(v) for v in views)
        skb = b.drv.skbs.alloc()
        skb.vnet_hdr = bytes(MRG_HDR_LEN)
        for off in range(0, len(data), 4096):
            page = b.drv.pool.alloc_page()
            chunk = data[off : off + 4096]
            page.view[: len(chunk)] = chunk
            skb.add_frag(page, 0, len(chunk))
        if b.drv.start_xmit(skb):
            return True
        skb.free()
        return False

    attach(a, lambda data, frags: XDP_REDIRECT, redirect=to_b)
    sent = [frame(size, k) for k, size in enumerate([60, 1514, 9000, 65550])]
    for data in sent:
        a.send(data)
        a.napi()
    assert [d for _, d in host_tx(b)] == sent


@pytest.mark.parametrize("target", ["none", "raises", "refuses"])
def test_a_redirect_that_fails_drops_the_frame(pair_factory, target, caplog):
    p = pair_factory("deferred", STRATEGY_FEATURES["deferred"])

    def raises(views):
        raise OSError("port is down")

    redirect = {"none": None, "raises": raises, "refuses": lambda views: False}[target]
    attach(p, lambda data, frags: XDP_REDIRECT, redirect=redirect)
    with caplog.at_level(logging.ERROR, logger="virtnet.xdp"):
        p.send(frame(500))
        p.napi()
    assert xdp_counts(p) == (1, 1, 0, 0, 0)
    if target != "refuses":
        assert "XDP_REDIRECT" in caplog.text


# -- hostile programs ---------------------------------------------------------------------------

kept: list = []


def raises(data, frags):
    raise RuntimeError("bug in the program")


def unknown_verdict(data, frags):
    return 7


def returns_none(data, frags):
    return None


def returns_a_string(data, frags):
    return "PASS"


def keeps_the_view(data, frags):
    kept.append(data)
    return XDP_PASS


def keeps_a_slice(data, frags):
    kept.append(data[14:20])
    return XDP_DROP


def keeps_a_frag(data, frags):
    if frags:
        kept.append(frags[-1])
    return XDP_PASS


def keeps_a_cast(data, frags):
    kept.append(data.cast("B"))
    return XDP_TX


def keeps_a_ctypes_array(data, frags):
    kept.append((ctypes.c_char * 4).from_buffer(data))
    return XDP_PASS


def keeps_an_export(data, frags):
    kept.append(struct.iter_unpack("B", data))  # holds a buffer export on the view
    return XDP_PASS


HOSTILE = {
    "raises": (raises, "raised RuntimeError: bug in the program"),
    "unknown_verdict": (unknown_verdict, "returned 7, not an XDP action"),
    "returns_none": (returns_none, "returned None"),
    "returns_a_string": (returns_a_string, "returned 'PASS'"),
    "keeps_the_view": (keeps_the_view, "kept a reference"),
    "keeps_a_slice": (keeps_a_slice, "kept a reference"),
    "keeps_a_frag": (keeps_a_frag, "kept a reference"),
    "keeps_a_cast": (keeps_a_cast, "kept a reference"),
    "keeps_a_ctypes_array": (keeps_a_ctypes_array, "kept a reference"),
    "keeps_an_export": (keeps_an_export, "kept an export"),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_program_aborts_its_frame_only_and_nothing_leaks(strategy, name, caplog):
    prog, message = HOSTILE[name]
    p = make_pair(strategy, STRATEGY_FEATURES[strategy])
    def wrapper(data, frags):  # hostile on the frame marked 0xEE, honest otherwise
        return prog(data, frags) if data[0] == 0xEE else XDP_PASS

    hook = attach(p, wrapper)
    hook.name = name
    bad = b"\xee" + frame(9000 if strategy != "small" else 1400, 1)[1:]
    good = b"\x00" + frame(3000 if strategy != "small" else 1400, 2)[1:]
    kept.clear()
    with caplog.at_level(logging.ERROR, logger="virtnet.xdp"):
        p.send(bad)
        p.send(good)
        p.napi()
    if name == "keeps_a_frag" and strategy == "small":
        assert p.frames == [bad, good]  # a one-buffer frame has no frag to keep
        message = None
    else:
        assert p.frames == [good]
        assert p.drv.stats.rx_xdp_aborted == 1 and p.drv.stats.rx_xdp_packets == 2
        assert f"xdp program {name}: " in caplog.text and message in caplog.text
        assert "frame aborted" in caplog.text
    if name in ("keeps_the_view", "keeps_a_frag") and kept:
        with pytest.raises(ValueError):  # the view it kept was released: no window left
            bytes(kept[0])
    kept.clear()
    p.teardown()
    assert_all_back(p)
    assert host_tx(p) == []


def test_errors_are_rate_limited(pair_factory, caplog):
    p = pair_factory("deferred", STRATEGY_FEATURES["deferred"])
    attach(p, raises)
    with caplog.at_level(logging.ERROR, logger="virtnet.xdp"):
        for k in range(50):
            p.send(frame(100, k))
            p.napi()
    assert p.drv.stats.rx_xdp_aborted == 50
    assert 1 <= len([r for r in caplog.records if r.levelno == logging.ERROR]) <= 10


def test_a_non_callable_program_is_refused():
    p = make_pair("deferred", STRATEGY_FEATURES["deferred"])
    with pytest.raises(TypeError, match="must be callable"):
        XdpHook(42, p.drv.stats)
    p.teardown()


# -- loading: --xdp MODULE:FUNCTION ---------------------------------------------------------------


def test_load_a_module_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "myxdp_mod.py").write_text(textwrap.dedent("""
        from virtnet.net.xdp import XDP_DROP
        def prog(data, frags):
            return XDP_DROP
    """))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    prog = load_program("myxdp_mod:prog")
    assert prog(memoryview(b"x"), ()) == XDP_DROP


def test_load_a_file_path(tmp_path):
    path = tmp_path / "filter.py"
    path.write_text(
        "def only_ipv4(data, frags):\n    return 2 if data[12:14] == b'\\x08\\x00' else 1\n"
    )
    prog = load_program(f"{path}:only_ipv4")
    assert prog(memoryview(bytes(12) + b"\x08\x00"), ()) == XDP_PASS


@pytest.mark.parametrize("name", ["drop", "pass", "tx"])
def test_builtin_programs(name):
    assert load_program(name)(memoryview(b""), ()) == {"drop": 1, "pass": 2, "tx": 3}[name]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "expected MODULE:FUNCTION"),
        ("mod:", "expected MODULE:FUNCTION"),
        ("no_such_module_xyz:prog", "cannot import no_such_module_xyz"),
        ("/no/such/file.py:prog", "no such file"),
        ("virtnet.net.xdp:no_such_function", "has no attribute 'no_such_function'"),
        ("virtnet.net.xdp:log", "not callable"),
    ],
)
def test_bad_specs_get_a_clear_error(spec, message):
    with pytest.raises(XdpLoadError, match=message):
        load_program(spec)


def test_a_module_that_raises_on_import_is_a_load_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise SystemError('half-written')\n")
    with pytest.raises(XdpLoadError, match="raised SystemError"):
        load_program(f"{path}:prog")


# -- the teardown property, with a program in the path --------------------------------------------

VERDICTS = [XDP_PASS, XDP_DROP, XDP_TX, XDP_REDIRECT, XDP_ABORTED, "raise", "keep", 99]


@pytest.mark.parametrize(("strategy", "features"), ALL_CONFIGS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_teardown_property_with_any_xdp_verdicts(strategy, features, data):
    plan = data.draw(st.lists(st.sampled_from(VERDICTS), min_size=1, max_size=8), label="plan")
    calls = [0]
    keep = []

    def prog(view, frags):
        verdict = plan[calls[0] % len(plan)]
        calls[0] += 1
        if verdict == "raise":
            raise ValueError("hostile")
        if verdict == "keep":
            keep.append(view[:4])
            return XDP_PASS
        return verdict

    run_scenario(
        strategy,
        FEATURE_SETS[features],
        data.draw(ops_for(strategy), label="ops"),
        data.draw(st.frozensets(st.integers(1, 40), max_size=6), label="skb_fails"),
        data.draw(st.frozensets(st.integers(1, 1200), max_size=40), label="page_fails"),
        data.draw(st.booleans(), label="hold"),
        xdp=prog,
    )


def test_ewma_posts_whole_pages_while_a_program_is_attached(pair_factory):
    # get_mergeable_buf_len: "if (room) return PAGE_SIZE - room" — with XDP the average
    # does not size buffers (it would stay at the floor: dropped frames never feed it).
    p = pair_factory("ewma", STRATEGY_FEATURES["ewma"])
    rx = p.drv.rx
    assert rx.get_mergeable_buf_len() < 4096
    attach(p, lambda data, frags: XDP_DROP)
    assert rx.get_mergeable_buf_len() == 4096
    n = p.layout.queue_size
    for k in range(3 * n):  # every buffer posted before has come round
        p.send(frame(65550, k))
        p.napi()
        if k == 2 * n:
            bufs = p.drv.stats.rx_bufs
    assert p.drv.stats.rx_xdp_drops == 3 * n
    # (the last buffer of a page may take the hole behind it)
    assert min(buf.len for buf in rx.used_pages) == 4096
    assert p.drv.stats.rx_bufs - bufs <= (n - 1) * 17  # 64 KiB in at most 17 buffers, not 43
    rx.attach_xdp(None)
    assert rx.get_mergeable_buf_len() < 4096
