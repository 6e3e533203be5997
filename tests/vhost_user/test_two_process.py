"""``virtnet driver`` ↔ ``virtnet device``: two processes, memfd + eventfds, vhost-user.

Every run stops cleanly (the driver's --seconds, then its close(): wait for tx to be
used, GET_VRING_BASE, reclaim), so what one side counts the other side counts too:
the tests assert those equalities exactly — packets and bytes, per direction — plus
every byte verified by the sinks and every page back in the driver's pool. Never a
rate or a time.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.vhost_user.conftest import (
    DRIVER_SLACK,
    DeviceProcess,
    DriverRun,
    driver_argv,
    run_driver,
)
from virtnet.net.features import VirtioNetF
from virtnet.virtio.features import has

SECONDS = 1.0
SIZES = (64, 1500, 65536)
MERGEABLE = ("deferred", "prealloc", "ewma")
# The features that make virtnet_probe pick each strategy (--features-off on the CLI).
FEATURES_OFF = {
    "deferred": (),
    "prealloc": (),
    "ewma": (),
    "big": ("--features-off", "MRG_RXBUF"),
    "small": ("--features-off", "MRG_RXBUF,GUEST_TSO4,GUEST_TSO6"),
}


def drive(tmp_path, dev: DeviceProcess, backend: str, strategy: str, xdp: str | None = None,
          **kw) -> DriverRun:  # fmt: skip
    extra = FEATURES_OFF[strategy] + (("--xdp", xdp) if xdp else ())
    return run_driver(tmp_path, dev, backend, strategy=strategy, seconds=SECONDS,
                      extra=extra, **kw)  # fmt: skip


def check_clean(dev_doc: dict, run: DriverRun, strategy: str) -> tuple[dict, dict]:
    """What must hold after any clean stop; returns (device stats, driver stats)."""
    ds, rs = dev_doc["device_stats"], run.stats
    # The strategy asked for is the one that ran, with the features it needs.
    assert run.result["strategy"] == strategy
    mergeable = has(run.result["features"], VirtioNetF.MRG_RXBUF)
    assert mergeable == (strategy in MERGEABLE)
    # Nothing refused, nothing dropped, on either side.
    for k in ("rx_dropped", "tx_errors", "desc_errors"):
        assert ds[k] == 0, (k, ds)
    for k in ("rx_dropped", "rx_length_errors", "tx_dropped"):
        assert rs[k] == 0, (k, rs)
    # Both ends agree on what crossed the rings, each way.
    assert ds["rx_packets"] == rs["rx_packets"]
    assert ds["rx_bytes"] == rs["rx_bytes"]
    assert ds["rx_bufs"] == rs["rx_bufs"]
    assert ds["tx_packets"] == rs["tx_packets"]
    assert ds["tx_bytes"] == rs["tx_bytes"]
    # Teardown gave every page and skb back (the seed's BUG_ON, kept).
    assert rs["pages_outstanding"] == 0
    assert rs["page_allocs"] == rs["page_frees"]
    assert rs["skb_allocs"] == rs["skb_frees"]
    for side in (dev_doc["backend"], run.backend):
        assert side["sink_corrupt"] == 0
        assert side["sink_foreign"] == 0
    assert dev_doc["sessions"] == 1
    return ds, rs


# -- host → guest: the device generates, the driver's rx strategy receives ----------------


RX_CASES = [(s, n) for s in ("deferred", "prealloc", "ewma", "big") for n in SIZES] + [
    ("small", 64),  # small buffers hold one MTU frame: no 64 KiB frames without GUEST_TSO
    ("small", 1500),
]


@pytest.mark.parametrize(("strategy", "size"), RX_CASES, ids=[f"{s}-{n}" for s, n in RX_CASES])
def test_device_gen_to_driver_sink(tmp_path, device_factory, strategy, size):
    dev = device_factory(f"gen:{size}")
    run = drive(tmp_path, dev, "sink", strategy)
    doc = dev.stop()
    ds, rs = check_clean(doc, run, strategy)
    sink, gen = run.backend, doc["backend"]
    assert rs["rx_packets"] > 0
    assert sink["sink_packets"] == rs["rx_packets"] == gen["gen_packets"]
    assert sink["sink_bytes"] == rs["rx_bytes"] == size * rs["rx_packets"]
    assert sink["sink_lost"] == 0
    assert rs["tx_packets"] == ds["tx_packets"] == 0
    if strategy in MERGEABLE and size == 65536:
        assert ds["rx_num_buffers_max"] > 1  # mergeable buffers really merged
    if strategy == "ewma" and size == 1500:  # one ~1.5 KiB buffer a frame, not a page
        assert rs["rx_truesize"] < rs["rx_packets"] * 2048
    if strategy in ("big", "small"):
        assert ds["rx_num_buffers_max"] == 1


# -- guest → host: the driver generates, the device sinks ----------------------------------


TX_CASES = [("deferred", 64), ("prealloc", 1500), ("ewma", 1500), ("big", 65536),
            ("small", 1500)]  # fmt: skip


@pytest.mark.parametrize(("strategy", "size"), TX_CASES, ids=[f"{s}-{n}" for s, n in TX_CASES])
def test_driver_gen_to_device_sink(tmp_path, device_factory, strategy, size):
    dev = device_factory("sink")
    run = drive(tmp_path, dev, f"gen:{size}", strategy)
    doc = dev.stop()
    ds, rs = check_clean(doc, run, strategy)
    sink = doc["backend"]
    assert rs["tx_packets"] > 0
    # Every frame the driver put on the ring was used by the device and verified.
    assert sink["sink_packets"] == ds["tx_packets"] == rs["tx_packets"]
    assert sink["sink_bytes"] == ds["tx_bytes"] == size * rs["tx_packets"]
    assert sink["sink_lost"] == 0
    # The generator may hold one frame a full ring refused; it is never sent.
    assert rs["tx_packets"] <= run.backend["gen_packets"] <= rs["tx_packets"] + 1
    assert rs["rx_packets"] == ds["rx_packets"] == 0


# -- both ways at once: loopback on one side, the generator on the other ---------------------


LOOP_CASES = [("deferred", 1500), ("prealloc", 65536), ("ewma", 65536), ("big", 64),
              ("small", 1500)]  # fmt: skip


@pytest.mark.parametrize(("strategy", "size"), LOOP_CASES, ids=[f"{s}-{n}" for s, n in LOOP_CASES])
def test_driver_gen_device_loopback(tmp_path, device_factory, strategy, size):
    """guest tx → device echo → guest rx: frames come back to the driver's own sink."""
    dev = device_factory("loopback")
    run = drive(tmp_path, dev, f"gen:{size}", strategy)
    doc = dev.stop()
    ds, rs = check_clean(doc, run, strategy)
    loop, sink = doc["backend"], run.backend
    assert rs["tx_packets"] > 0 and rs["rx_packets"] > 0
    assert loop["sink_packets"] == ds["tx_packets"] == rs["tx_packets"]
    assert sink["sink_packets"] == rs["rx_packets"] == ds["rx_packets"]
    assert sink["sink_bytes"] == size * sink["sink_packets"]
    # Every echo was delivered, dropped by a full echo queue, or is still queued; a
    # gap in the stream is always a drop (the drops after the last delivery are no gap).
    delivered = sink["sink_packets"]
    assert delivered + loop["loopback_dropped"] + loop["loopback_queued"] == loop["sink_packets"]
    assert sink["sink_lost"] <= loop["loopback_dropped"]


LOOP_DRIVER_CASES = [("deferred", 65536), ("prealloc", 64), ("ewma", 65536), ("big", 1500),
                     ("small", 64)]  # fmt: skip


@pytest.mark.parametrize(
    ("strategy", "size"), LOOP_DRIVER_CASES, ids=[f"{s}-{n}" for s, n in LOOP_DRIVER_CASES]
)
def test_device_gen_driver_loopback(tmp_path, device_factory, strategy, size):
    """device gen → guest rx → guest echoes on tx (frags not copied) → device sink."""
    dev = device_factory(f"gen:{size}")
    run = drive(tmp_path, dev, "loopback", strategy)
    doc = dev.stop()
    ds, rs = check_clean(doc, run, strategy)
    sink, loop = doc["backend"], run.backend
    assert rs["rx_packets"] > 0 and rs["tx_packets"] > 0
    assert loop["sink_packets"] == rs["rx_packets"] == ds["rx_packets"] == sink["gen_packets"]
    # Every received frame was echoed or dropped (full tx ring, or after the stop).
    assert rs["rx_packets"] == rs["tx_packets"] + loop["loopback_dropped"]
    assert sink["sink_packets"] == ds["tx_packets"] == rs["tx_packets"]
    assert sink["sink_bytes"] == size * sink["sink_packets"]
    assert sink["sink_lost"] <= loop["loopback_dropped"]


# -- one device, many front-ends -------------------------------------------------------------


def test_serves_next_driver_and_leaks_no_fd(tmp_path, device_factory):
    """Two drivers one after the other: each gets a fresh session (rings reset, its own
    stream from frame 0), and the device ends with the fds it started with."""
    dev = device_factory("gen:1500")
    baseline = dev.fd_count()
    runs = []
    for i, strategy in enumerate(("deferred", "prealloc")):
        mark = dev.mark()
        runs.append(drive(tmp_path, dev, "loopback", strategy, name=f"drv{i}"))
        dev.wait_for_log("front-end gone", since=mark)
        assert dev.wait_for_fds(baseline) == baseline, f"fds leaked after session {i + 1}"
    doc = dev.stop()
    ds = doc["device_stats"]
    assert doc["sessions"] == 2
    for run in runs:
        rs = run.stats
        assert rs["rx_packets"] > 0
        assert rs["rx_packets"] == run.backend["sink_packets"]
        assert run.backend["sink_lost"] == 0 and run.backend["sink_corrupt"] == 0
        assert rs["rx_packets"] == rs["tx_packets"] + run.backend["loopback_dropped"]
        assert rs["pages_outstanding"] == 0
    assert ds["rx_packets"] == sum(r.stats["rx_packets"] for r in runs)
    assert ds["rx_bytes"] == sum(r.stats["rx_bytes"] for r in runs)
    assert ds["tx_packets"] == sum(r.stats["tx_packets"] for r in runs)
    assert ds["tx_bytes"] == sum(r.stats["tx_bytes"] for r in runs)
    assert doc["backend"]["sink_packets"] == ds["tx_packets"]
    assert doc["backend"]["sink_corrupt"] == 0
    assert doc["backend"]["gen_packets"] == ds["rx_packets"]


def test_driver_killed_mid_stream(tmp_path, device_factory):
    """SIGKILL a driver while frames flow both ways: the device logs the loss, keeps
    running, frees the session's fds and mappings, and serves the next driver."""
    dev = device_factory("loopback")
    baseline = dev.fd_count()
    mark = dev.mark()
    victim = subprocess.Popen(
        driver_argv(dev.socket_path, "gen:1500", tmp_path / "victim.json", seconds=60),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        dev.wait_for_log("device running", since=mark, timeout=DRIVER_SLACK)
        time.sleep(0.3)  # mid-stream: frames in flight both ways
        assert victim.poll() is None, "the driver ended before it could be killed"
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    dev.wait_for_log("front-end gone", since=mark)
    assert dev.alive()
    assert dev.wait_for_fds(baseline) == baseline, "the killed session's fds leaked"

    run = drive(tmp_path, dev, "gen:1500", "deferred")
    assert dev.wait_for_fds(baseline) == baseline
    doc = dev.stop()
    assert doc["sessions"] == 2
    rs, sink = run.stats, run.backend
    assert rs["tx_packets"] > 0 and rs["rx_packets"] > 0
    assert sink["sink_packets"] == rs["rx_packets"]
    # Nothing of the killed driver's stream reaches the new one (the echo queue was reset).
    assert sink["sink_lost"] <= doc["backend"]["loopback_dropped"]
    assert sink["sink_corrupt"] == 0 and sink["sink_foreign"] == 0
    assert rs["pages_outstanding"] == 0
    assert doc["backend"]["sink_corrupt"] == 0


# -- the option that picks big / small buffers ----------------------------------------------


def test_features_off_option(capsys):
    from virtnet.cli import build_parser
    from virtnet.virtio.features import bit

    parser = build_parser()
    base = ["driver", "--socket-path", "x"]
    args = parser.parse_args([*base, *FEATURES_OFF["small"]])
    off = bit(VirtioNetF.MRG_RXBUF) | bit(VirtioNetF.GUEST_TSO4) | bit(VirtioNetF.GUEST_TSO6)
    assert args.features_off == off
    assert parser.parse_args(base).features_off == 0
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--features-off", "MRG_RXBUF,NO_SUCH_BIT"])
    assert "unknown feature NO_SUCH_BIT" in capsys.readouterr().err


# -- interrupt moderation (--coalesce): fewer interrupts, nothing lost ----------------------


@pytest.mark.parametrize(
    "coalesce", ["", "rx-frames=32,tx-frames=32", "rx-usecs=300,tx-usecs=300,rx-frames=64"]
)
def test_coalesced_interrupts_lose_nothing(tmp_path, device_factory, coalesce):
    extra = ("--coalesce", coalesce) if coalesce else ()
    dev = device_factory("loopback", extra=extra)
    run = drive(tmp_path, dev, "gen:1500", "deferred")
    doc = dev.stop()
    ds, rs = check_clean(doc, run, "deferred")
    assert rs["tx_packets"] > 0
    assert doc["backend"]["sink_packets"] == ds["tx_packets"] == rs["tx_packets"]
    assert run.backend["sink_packets"] == rs["rx_packets"] == ds["rx_packets"]
    # Every echo came back, or the loopback queue (a NIC's) dropped it, or it still waits.
    loop = doc["backend"]
    assert rs["rx_packets"] + loop["loopback_dropped"] + loop["loopback_queued"] == rs["tx_packets"]
    assert run.backend["sink_lost"] <= loop["loopback_dropped"]  # drops are the only gaps
    for q in ("rx", "tx"):
        if coalesce:
            assert ds[f"{q}_irqs"] <= ds[f"{q}_notifies"]
        else:  # every interrupt the driver asked for was sent
            assert ds[f"{q}_irqs"] == ds[f"{q}_notifies"]


# -- --xdp MODULE:FUNCTION: a program before the skb, in the real driver process -------------

XDP_STRATEGIES = ("deferred", "prealloc", "ewma", "big", "small")


def check_xdp_clean(doc: dict, run: DriverRun) -> tuple[dict, dict]:
    """Every frame the device put on the rx ring went through the program, exactly once."""
    ds, rs = doc["device_stats"], run.stats
    assert ds["rx_dropped"] == ds["desc_errors"] == ds["tx_errors"] == 0
    assert rs["rx_length_errors"] == rs["rx_dropped"] == rs["rx_xdp_aborted"] == 0
    assert rs["rx_bufs"] == ds["rx_bufs"]
    assert rs["rx_xdp_packets"] == ds["rx_packets"] > 0
    assert rs["rx_xdp_packets"] == (rs["rx_packets"] + rs["rx_xdp_drops"] + rs["rx_xdp_tx"]
                                    + rs["rx_xdp_redirects"])  # fmt: skip
    assert rs["pages_outstanding"] == 0 and rs["skb_allocs"] == rs["skb_frees"]
    return ds, rs


@pytest.mark.parametrize("strategy", XDP_STRATEGIES)
def test_xdp_drop_in_the_driver_process(tmp_path, device_factory, strategy):
    dev = device_factory("gen:64")
    run = drive(tmp_path, dev, "sink", strategy, xdp="drop")
    doc = dev.stop()
    ds, rs = check_xdp_clean(doc, run)
    assert rs["rx_xdp_drops"] == ds["rx_packets"] and rs["rx_packets"] == 0
    assert run.backend["sink_packets"] == 0
    if strategy != "prealloc":  # the pre-patch code allocates its skbs before any frame
        assert rs["skb_allocs"] == 0


@pytest.mark.parametrize("strategy", ["deferred", "ewma", "big"])
def test_xdp_tx_sends_the_stream_back_to_the_device_intact(tmp_path, device_factory, strategy):
    dev = device_factory("gen:1500")
    run = drive(tmp_path, dev, "sink", strategy, xdp="tx")
    doc = dev.stop()
    ds, rs = check_xdp_clean(doc, run)
    back = doc["backend"]  # gen's sink checks what comes back, byte for byte and in order
    assert rs["rx_xdp_tx"] == ds["tx_packets"] == rs["tx_packets"] == back["sink_packets"] > 0
    assert back["sink_corrupt"] == back["sink_foreign"] == 0
    assert back["sink_lost"] <= rs["rx_xdp_drops"]  # a full tx ring drops, never tears
    assert rs["rx_xdp_tx"] + rs["rx_xdp_drops"] == rs["rx_xdp_packets"]


XDP_MODULE = """
from virtnet.net.xdp import XDP_PASS, XDP_REDIRECT

SEQ_LSB = 21  # the generator's frame: Ethernet header, length, seq (network order) at 18

def pass_even_redirect_odd(data, frags):
    return XDP_REDIRECT if data[SEQ_LSB] & 1 else XDP_PASS
"""


@pytest.mark.parametrize("form", ["module", "file"])
def test_xdp_module_function_from_the_current_directory(tmp_path, device_factory, form):
    """uvicorn-style MODULE:FUNCTION (cwd on sys.path) or path/to/file.py:FUNCTION; the
    redirected half goes to the driver's backend port, the passed half through the stack:
    the sink sees the whole stream, in order, intact."""
    (tmp_path / "myxdp.py").write_text(XDP_MODULE)
    spec = "myxdp:pass_even_redirect_odd"
    if form == "file":
        spec = f"{tmp_path / 'myxdp.py'}:pass_even_redirect_odd"
    dev = device_factory("gen:1500")
    run = drive(tmp_path, dev, "sink", "ewma", xdp=spec,
                cwd=tmp_path if form == "module" else None)  # fmt: skip
    doc = dev.stop()
    ds, rs = check_xdp_clean(doc, run)
    assert rs["rx_xdp_redirects"] > 0 and rs["rx_packets"] > 0
    sink = run.backend
    assert sink["sink_packets"] == rs["rx_packets"] + rs["rx_xdp_redirects"] == ds["rx_packets"]
    assert sink["sink_lost"] == sink["sink_corrupt"] == sink["sink_foreign"] == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [("no_such_module_q:f", "cannot import no_such_module_q"), ("nocolon", "MODULE:FUNCTION"),
     ("/nonexistent/x.py:f", "no such file")],
)  # fmt: skip
def test_a_bad_xdp_spec_is_a_usage_error(tmp_path, spec, message):
    from tests.vhost_user.conftest import VIRTNET

    done = subprocess.run([*VIRTNET, "driver", "--socket-path", str(tmp_path / "none.sock"),
                           "--xdp", spec], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr and "virtnet driver: --xdp" in done.stderr
