"""virtnet against a real DPDK peer: testpmd on the other end of the vhost-user socket.

* testpmd as the vhost-user BACKEND (net_vhost, testpmd listens), ``virtnet driver`` connects:
  testpmd ``txonly`` -> driver ``sink`` for every rx strategy (mergeable ``deferred`` /
  ``prealloc`` / ``ewma``, ``big`` / ``small`` with MRG_RXBUF off), driver ``gen:SIZE`` -> testpmd
  ``rxonly``, and driver ``gen:SIZE`` echoed by testpmd ``io`` back into the driver's sink,
  which checks its own stream byte by byte.
* testpmd as the FRONTEND (net_virtio_user, ``server=0``), ``virtnet device`` listens:
  device ``gen:SIZE`` -> testpmd ``rxonly``, testpmd ``txonly`` -> device ``sink``, device
  ``gen:SIZE`` echoed by testpmd ``io`` into the device's verifying sink, and testpmd ``io`` /
  ``macswap`` (``--tx-first``) bouncing frames off device ``loopback``.

Counts are compared after a clean stop. Who stops first decides what is exact:

* the *sender* stops first and the receiver drains: the counts are equal, exactly. A virtnet
  driver drains its tx ring before GET_VRING_BASE, and a virtnet device that goes away leaves
  its last used entries for testpmd to read. testpmd receivers run with ``--no-flush-rx`` so
  their forward statistics count every frame (testpmd otherwise discards what is already in
  the rx ring when forwarding starts).
* where testpmd sends to a virtnet *device* (txonly, io, macswap), testpmd must stop first
  (nothing else stops its generator): frames it made available but the device had not taken
  when virtio_user stopped the ring (GET_VRING_BASE) are counted by testpmd only. The gap is at
  most a ring (queue_size); measured, it is exactly the device's ``avail idx - last_avail_idx``
  at GET_VRING_BASE (docs/dpdk-virtnet.md). Those tests assert the bound and exact
  conservation where it holds (every frame a device took is accounted for).

Packet rates are printed (run with ``-s``), never asserted; docs/dpdk-virtnet.md has them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dpdk import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    Testpmd,
    VhostPort,
    VirtioUserPort,
    cpu_pair,
    has_bit,
    vhost_negotiated_features,
    virtio_user_features,
)

# testpmd's start, traffic until counters settle, both ends' stop: minutes at worst.
pytestmark = [pytest.mark.peer, pytest.mark.timeout(900)]

TRAFFIC_SECONDS = 2.5  # traffic after the first packets are seen; nothing asserts on time
QUEUE_SIZE = 256  # both sides' virtqueue size (virtnet's default, virtio_user's queue_size)
BURST = 32  # testpmd --burst: what --tx-first puts in flight in io/macswap
VIRTNET_STOP_TIMEOUT = 20.0  # SIGTERM -> JSON written and exited
VIRTIO_DEBUG = ["pmd.net.virtio.*:debug"]  # virtio_user logs its feature negotiation
NO_FLUSH = ["--no-flush-rx"]  # count every received frame in the forward statistics
# net_vhost offers RING_PACKED and virtnet's driver acks it by default: these cases keep
# split rings (the packed ones are test_dpdk_packed.py).
SPLIT = ["--features-off", "RING_PACKED"]

# (label, --txpkts): segment lengths; the frame is their sum. 2000,2000,2000 = a 6000-byte
# frame in 3-segment mbufs: net_vhost spreads it over 2 mergeable 4 KiB buffers.
SIZES = {64: 64, 1500: 1500, 6000: (2000, 2000, 2000)}
STRATEGIES = {  # strategy -> --features-off (what makes virtnet_probe pick it)
    "deferred": None,
    "prealloc": None,
    "ewma": None,
    "big": "MRG_RXBUF",
    "small": "MRG_RXBUF,GUEST_TSO4,GUEST_TSO6",
}


# ---------------------------------------------------------------------------------------------
# virtnet as a subprocess


@dataclass
class Virtnet:
    """One ``virtnet driver|device`` process pinned to a cpu; SIGTERM makes it write its JSON."""

    role: str  # "driver" | "device"
    socket_path: Path
    backend: str
    workdir: Path
    cpu: int
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    result: dict | None = None
    returncode: int | None = None

    @property
    def json_path(self) -> Path:
        return self.workdir / f"virtnet-{self.role}.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"virtnet-{self.role}.log"

    def command(self) -> list[str]:
        return ["taskset", "-c", str(self.cpu), sys.executable, "-m", "virtnet", self.role,
                "--socket-path", str(self.socket_path), "--backend", self.backend,
                "--seconds", "120", "--json", str(self.json_path), "--quiet", "-v",
                *self.extra]  # fmt: skip

    def shown(self) -> str:
        """The command as a reader would type it."""
        cmd = self.command()
        i = cmd.index(sys.executable)
        return shlex.join([*cmd[:i], "virtnet", *cmd[i + 3 :]])

    def start(self) -> Virtnet:
        self.json_path.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.role == "device" and "--client" not in self.extra:
            # it listens: testpmd's virtio_user connects only once
            self._wait(lambda: self.socket_path.is_socket(), 15, "its listening socket")
        return self

    def _wait(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc.poll() is not None:
                raise AssertionError(
                    self.describe(f"virtnet {self.role} exited waiting for {what}")
                )
            if time.monotonic() > deadline:
                raise AssertionError(self.describe(f"virtnet {self.role}: no {what} in {timeout}s"))
            time.sleep(0.05)

    def wait_exit(self, timeout: float) -> None:
        """Bounded wait for the process to end by itself."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(self.describe(f"virtnet {self.role} still running")) from None

    def stop(self) -> dict:
        """SIGTERM, bounded wait (SIGKILL after), then the JSON it wrote on exit."""
        if self.result is not None:
            return self.result
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(VIRTNET_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(
                    self.describe(f"virtnet {self.role} ignored SIGTERM")
                ) from None
        self.returncode = self.proc.returncode
        try:
            self.result = json.loads(self.json_path.read_text())
        except (OSError, ValueError) as e:
            raise AssertionError(self.describe(f"virtnet {self.role} wrote no JSON: {e}")) from None
        return self.result

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self, problem: str) -> str:
        rc = self.proc.poll() if self.proc else None
        tail = self.log_text().splitlines()[-40:]
        return "\n".join([f"{problem} (exit code {rc})", "$ " + self.shown(), *tail])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def virtnet(tmp_path: Path) -> Iterator:
    """``virtnet(role, sock, backend, cpu=, extra=)`` starts one; leftovers are killed."""
    started: list[Virtnet] = []

    def make(role: str, sock: Path, backend: str, *, cpu: int, extra: list[str] = ()
             ) -> Virtnet:  # fmt: skip
        vn = Virtnet(role, sock, backend, tmp_path, cpu, list(extra))
        started.append(vn)
        return vn.start()

    yield make
    for vn in started:
        vn.kill()


# ---------------------------------------------------------------------------------------------
# rates (recorded, printed, never asserted)

RATES: list[tuple[str, str, str, int, float, str]] = []


def _frame_len(size: int) -> int:
    spec = SIZES[size]
    return spec if isinstance(spec, int) else sum(spec)


def _testpmd_pps(pmd: Testpmd, key: str) -> float:
    """Median rate of the periodic blocks that saw traffic all through: the first block with
    traffic and the last one (traffic started / stopped within them) are left out."""
    rates = [r for r in (getattr(s, key) for s in pmd.nic_stats()) if r > 0]
    full = rates[1:-1] or rates[-1:]  # a run too short for a full block: the last one
    return float(statistics.median(full)) if full else 0.0


def _record(role: str, direction: str, what: str, size: int, pps: float, cmds: list[str]) -> None:
    RATES.append((role, direction, what, size, pps, "\n".join(cmds)))
    print(f"\n[rate] {role:<28} {direction:<14} {what:<22} {size:>5} B  {pps:>10,.0f} pps  "
          f"{pps * _frame_len(size) * 8 / 1e6:>8,.1f} Mb/s")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _rates_table() -> Iterator[None]:
    yield
    if RATES:
        print("\n\nvirtnet against testpmd: packet rates (testpmd's periodic stats, median)")
        for role, direction, what, size, pps, _ in RATES:
            print(f"  {role:<28} {direction:<14} {what:<22} {size:>5} B  {pps:>10,.0f} pps")
        out = os.environ.get("VIRTNET_DPDK_RATES")  # a JSON copy for docs/dpdk-virtnet.md
        if out:
            keys = ("role", "direction", "what", "size", "pps", "commands")
            rows = [dict(zip(keys, r, strict=True)) for r in RATES]
            Path(out).write_text(json.dumps(rows, indent=1))


def _testpmd_shown(pmd: Testpmd) -> str:
    return shlex.join(pmd.command())


def _traffic(pmd: Testpmd, *, rx: bool) -> None:
    """Wait (bounded) for the first frames, then let them flow."""
    pmd.wait_packets(rx=0, timeout=20) if rx else pmd.wait_packets(tx=0, timeout=20)
    time.sleep(TRAFFIC_SECONDS)


# ---------------------------------------------------------------------------------------------
# testpmd = vhost-user backend (net_vhost), virtnet driver = frontend


def _driver_cpus() -> tuple[tuple[int, int], int]:
    """testpmd's (main, forwarding) cpus and virtnet's: off the busy-polling lcore."""
    main, fwd = cpu_pair(0)
    return (main, fwd), main


def _assert_driver_clean(drv: Virtnet, result: dict) -> None:
    assert drv.returncode == 0, drv.describe("virtnet driver failed")
    st = result["driver_stats"]
    assert st["pages_outstanding"] == 0 and st["page_allocs"] == st["page_frees"]
    assert st["skb_allocs"] == st["skb_frees"]
    assert st["rx_dropped"] == 0 and st["rx_length_errors"] == 0


CASES_TO_DRIVER = [
    ("deferred", 64), ("deferred", 1500), ("deferred", 6000),
    ("prealloc", 64), ("prealloc", 1500), ("prealloc", 6000),
    ("ewma", 64), ("ewma", 1500), ("ewma", 6000),
    ("big", 64), ("big", 1500), ("big", 6000),
    ("small", 64), ("small", 1500),
]  # fmt: skip


@pytest.mark.parametrize(("strategy", "size"), CASES_TO_DRIVER,
                         ids=[f"{s}-{n}" for s, n in CASES_TO_DRIVER])  # fmt: skip
def test_testpmd_txonly_to_virtnet_driver(testpmd, virtnet, sock_dir: Path, strategy: str,
                                          size: int) -> None:  # fmt: skip
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    frame = _frame_len(size)
    pmd = testpmd(VhostPort(sock), cpus=cpus, forward_mode="txonly", txpkts=SIZES[size])
    off = STRATEGIES[strategy]
    extra = ["--strategy", strategy, "--features-off", ",".join(filter(None, (off, "RING_PACKED")))]
    drv = virtnet("driver", sock, "sink", cpu=vn_cpu, extra=extra)
    _traffic(pmd, rx=False)
    result = drv.stop()  # the receiver first: net_vhost can enqueue nothing after GET_VRING_BASE
    final = pmd.stop()

    _assert_driver_clean(drv, result)
    assert result["strategy"] == strategy
    st, sink = result["driver_stats"], result["backend"]
    assert st["rx_packets"] > 0
    assert st["rx_bytes"] == st["rx_packets"] * frame
    assert sink["sink_foreign"] == sink["sink_packets"] == st["rx_packets"]
    assert sink["sink_bytes"] == st["rx_bytes"] and sink["sink_corrupt"] == 0
    # exact: testpmd's TX-packets are the frames net_vhost put in the driver's rx ring (it
    # counts those it could not enqueue, ring full or device gone, as TX-dropped), and the
    # driver reaped every used entry after GET_VRING_BASE stopped the ring
    assert final.port(0).tx_packets == st["rx_packets"], (final.port(0), st)

    features = result["features"]
    accepted = vhost_negotiated_features(pmd.log_text())
    assert accepted == features, f"net_vhost accepted {accepted:#x}, driver sent {features:#x}"
    assert has_bit(features, VIRTIO_F_VERSION_1)
    mergeable = STRATEGIES[strategy] is None
    assert has_bit(features, VIRTIO_NET_F_MRG_RXBUF) == mergeable
    if strategy == "ewma":
        # buffers sized by the average packet: from the floor (1536 bytes at this ring
        # size) up to a page as the 6000-byte stream pulls the average up
        least, most = (-(-(frame + 12) // n) for n in (4096, 1536))
        assert st["rx_packets"] * least <= st["rx_bufs"] <= st["rx_packets"] * most
        assert st["rx_truesize"] >= st["rx_bytes"] + 12 * st["rx_packets"]
        if frame <= 1500:
            assert st["rx_truesize"] < st["rx_packets"] * 2048  # not a page per frame
    elif mergeable and frame + 12 > 4096:
        # the seed's case: one frame spread over several page-sized buffers (num_buffers > 1)
        assert st["rx_bufs"] == st["rx_packets"] * -(-(frame + 12) // 4096)
    elif mergeable:
        assert st["rx_bufs"] == st["rx_packets"]

    _record(
        "testpmd net_vhost (backend)",
        "host-to-guest",
        f"txonly -> driver {strategy}",
        size,
        _testpmd_pps(pmd, "tx_pps"),
        [_testpmd_shown(pmd), drv.shown()],
    )


@pytest.mark.parametrize("size", [64, 1500])
def test_virtnet_driver_gen_to_testpmd_rxonly(testpmd, virtnet, sock_dir: Path,
                                              size: int) -> None:  # fmt: skip
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    pmd = testpmd(VhostPort(sock), cpus=cpus, forward_mode="rxonly", extra_app=NO_FLUSH)
    drv = virtnet("driver", sock, f"gen:{size}", cpu=vn_cpu, extra=SPLIT)
    _traffic(pmd, rx=True)
    result = drv.stop()  # the sender first: it waits until net_vhost used every tx buffer
    settled = pmd.wait_quiescent(timeout=10)
    final = pmd.stop()

    _assert_driver_clean(drv, result)
    st = result["driver_stats"]
    assert st["tx_packets"] > 0 and st["tx_dropped"] == 0
    assert st["tx_bytes"] == st["tx_packets"] * size
    assert result["backend"]["gen_packets"] == st["tx_packets"]
    assert final.port(0).rx_packets == st["tx_packets"], (final.port(0), st)  # exact
    assert settled.rx_packets == st["tx_packets"] and settled.rx_bytes == st["tx_bytes"]
    assert has_bit(result["features"], VIRTIO_NET_F_MRG_RXBUF)
    assert vhost_negotiated_features(pmd.log_text()) == result["features"]

    _record(
        "testpmd net_vhost (backend)",
        "guest-to-host",
        "driver gen -> rxonly",
        size,
        _testpmd_pps(pmd, "rx_pps"),
        [_testpmd_shown(pmd), drv.shown()],
    )


def test_virtnet_driver_stream_echoed_by_testpmd_io(testpmd, virtnet, sock_dir: Path) -> None:
    """testpmd io sends every frame back: virtnet's sink verifies its own stream byte by byte
    after a round trip through net_vhost."""
    size = 1500
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    pmd = testpmd(VhostPort(sock), cpus=cpus, forward_mode="io", extra_app=NO_FLUSH)
    drv = virtnet("driver", sock, f"gen:{size}", cpu=vn_cpu, extra=SPLIT)
    _traffic(pmd, rx=True)
    result = drv.stop()
    final = pmd.stop()

    _assert_driver_clean(drv, result)
    st, sink, fwd = result["driver_stats"], result["backend"], final.port(0)
    assert st["tx_packets"] == result["backend"]["gen_packets"] == fwd.rx_packets > 0
    # echoes net_vhost could not enqueue (the driver's rx ring full) are TX-dropped; each is
    # a gap in the stream the sink sees (a gap at the very end is not visible as one)
    assert fwd.tx_packets + fwd.tx_dropped == fwd.rx_packets
    assert sink["sink_packets"] == st["rx_packets"] == fwd.tx_packets > 0  # exact
    assert sink["sink_corrupt"] == 0 and sink["sink_foreign"] == 0
    assert sink["sink_lost"] <= fwd.tx_dropped
    assert st["rx_bytes"] == st["rx_packets"] * size

    _record(
        "testpmd net_vhost (backend)",
        "round trip",
        "driver gen <-> io",
        size,
        _testpmd_pps(pmd, "tx_pps"),
        [_testpmd_shown(pmd), drv.shown()],
    )


def test_virtnet_driver_in_eight_regions_echoed_by_testpmd_io(testpmd, virtnet,
                                                             sock_dir: Path) -> None:  # fmt: skip
    """``--mem-regions 8`` against a back-end without CONFIGURE_MEM_SLOTS (net_vhost): all
    eight memfds in one SET_MEM_TABLE, the spec's baseline; the stream comes back intact."""
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    pmd = testpmd(VhostPort(sock), cpus=cpus, forward_mode="io", extra_app=NO_FLUSH)
    drv = virtnet("driver", sock, "gen:1500", cpu=vn_cpu, extra=[*SPLIT, "--mem-regions", "8"])
    _traffic(pmd, rx=True)
    result = drv.stop()
    final = pmd.stop()
    _assert_driver_clean(drv, result)
    assert pmd.log_text().count("guest memory region size") == 8, pmd.log_text()[-3000:]
    st, sink, fwd = result["driver_stats"], result["backend"], final.port(0)
    assert st["tx_packets"] == fwd.rx_packets > 0
    assert sink["sink_packets"] == st["rx_packets"] == fwd.tx_packets > 0
    assert sink["sink_corrupt"] == 0 and sink["sink_foreign"] == 0


def test_virtnet_driver_in_nine_regions_needs_mem_slots(testpmd, virtnet, sock_dir: Path) -> None:
    """More than 8 regions against net_vhost (no CONFIGURE_MEM_SLOTS): a clear error."""
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    testpmd(VhostPort(sock), cpus=cpus, forward_mode="io")
    drv = virtnet("driver", sock, "sink", cpu=vn_cpu, extra=[*SPLIT, "--mem-regions", "9"])
    drv.wait_exit(60)
    assert drv.proc.returncode != 0
    log = drv.log_path.read_text()
    assert "--mem-regions 9: the back-end does not offer" in log, log
    assert "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS" in log, log


def test_virtnet_driver_when_testpmd_leaves_first(testpmd, virtnet, sock_dir: Path) -> None:
    """The back-end goes away mid-traffic: the driver says so (exit 1), still writes its
    JSON, returns every page, and its count still matches testpmd's exactly (testpmd stops
    forwarding before it closes the port)."""
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    pmd = testpmd(VhostPort(sock), cpus=cpus, forward_mode="txonly", txpkts=64)
    drv = virtnet("driver", sock, "sink", cpu=vn_cpu, extra=SPLIT)
    _traffic(pmd, rx=False)
    final = pmd.stop()
    drv.wait_exit(15)
    result = drv.stop()

    assert drv.returncode == 1, drv.describe("expected exit code 1")
    assert "the back-end went away" in drv.log_text()
    st = result["driver_stats"]
    assert st["pages_outstanding"] == 0 and st["skb_allocs"] == st["skb_frees"]
    assert result["backend"]["sink_foreign"] == st["rx_packets"] == final.port(0).tx_packets > 0


# ---------------------------------------------------------------------------------------------
# testpmd = vhost-user frontend (net_virtio_user, server=0), virtnet device = backend


def _device_cpus() -> tuple[tuple[int, int], int]:
    main, fwd = cpu_pair(0)
    return (main, fwd), main


def _virtio_user(sock: Path) -> VirtioUserPort:
    return VirtioUserPort(sock, queue_size=QUEUE_SIZE, mrg_rxbuf=True, server=False)


def _assert_device_clean(dev: Virtnet, result: dict) -> None:
    assert dev.returncode == 0, dev.describe("virtnet device failed")
    st = result["device_stats"]
    assert st["desc_errors"] == 0 and st["tx_errors"] == 0, st
    assert result["sessions"] == 1


def _assert_virtio_user_mergeable(pmd: Testpmd, dev: Virtnet) -> None:
    negotiated = virtio_user_features(pmd.log_text()).get("negotiated")
    assert negotiated is not None, "virtio_user logged no negotiation"
    assert has_bit(negotiated, VIRTIO_NET_F_MRG_RXBUF) and has_bit(negotiated, VIRTIO_F_VERSION_1)
    # the device's own "features 0x...: NAMES" line (-v)
    assert re.search(r"features 0x[0-9a-f]+: .*\bMRG_RXBUF\b", dev.log_text()), dev.log_text()


@pytest.mark.parametrize("size", [64, 1500])
def test_virtnet_device_gen_to_testpmd_rxonly(testpmd, virtnet, sock_dir: Path,
                                              size: int) -> None:  # fmt: skip
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    dev = virtnet("device", sock, f"gen:{size}", cpu=vn_cpu)
    pmd = testpmd(_virtio_user(sock), cpus=cpus, forward_mode="rxonly", extra_app=NO_FLUSH,
                  log_levels=VIRTIO_DEBUG)  # fmt: skip
    _traffic(pmd, rx=True)
    # the sender first: the device hangs up, testpmd still reads the used entries it left
    result = dev.stop()
    settled = pmd.wait_quiescent(timeout=10)
    # virtio_user then dies of SIGPIPE (exit 141) when its port close writes to the closed
    # socket, after printing its statistics: a testpmd quirk, not a failure
    final = pmd.stop()

    _assert_device_clean(dev, result)
    st = result["device_stats"]
    assert st["rx_packets"] > 0 and st["rx_dropped"] == 0
    assert st["rx_bytes"] == st["rx_packets"] * size
    assert st["rx_num_buffers_max"] == 1  # 2 KiB mbufs hold any non-GSO frame
    assert result["backend"]["gen_packets"] == st["rx_packets"]
    assert final.port(0).rx_packets == st["rx_packets"], (final.port(0), st)  # exact
    assert settled.rx_packets == st["rx_packets"] and settled.rx_bytes == st["rx_bytes"]
    assert settled.rx_errors == 0
    _assert_virtio_user_mergeable(pmd, dev)

    _record(
        "testpmd virtio_user (frontend)",
        "host-to-guest",
        "device gen -> rxonly",
        size,
        _testpmd_pps(pmd, "rx_pps"),
        [dev.shown(), _testpmd_shown(pmd)],
    )


@pytest.mark.parametrize("size", [64, 1500])
def test_testpmd_txonly_to_virtnet_device_sink(testpmd, virtnet, sock_dir: Path,
                                               size: int) -> None:  # fmt: skip
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    dev = virtnet("device", sock, "sink", cpu=vn_cpu)
    pmd = testpmd(_virtio_user(sock), cpus=cpus, forward_mode="txonly", txpkts=size,
                  log_levels=VIRTIO_DEBUG)  # fmt: skip
    _traffic(pmd, rx=False)
    final = pmd.stop()  # only stopping testpmd stops its generator (GET_VRING_BASE)
    result = dev.stop()

    _assert_device_clean(dev, result)
    st, sink = result["device_stats"], result["backend"]
    assert st["tx_packets"] > 0
    assert st["tx_bytes"] == st["tx_packets"] * size
    assert sink["sink_foreign"] == sink["sink_packets"] == st["tx_packets"]
    assert sink["sink_bytes"] == st["tx_bytes"]
    sent = final.port(0).tx_packets
    # not exact: frames testpmd made available that the device had not taken when
    # virtio_user stopped the ring; never more than the ring (see the module docstring)
    gap = sent - st["tx_packets"]
    print(f"\n[gap] testpmd TX {sent} - device tx {st['tx_packets']} = {gap} left in the ring")
    assert 0 <= gap <= QUEUE_SIZE, (final.port(0), st)
    _assert_virtio_user_mergeable(pmd, dev)

    _record(
        "testpmd virtio_user (frontend)",
        "guest-to-host",
        "txonly -> device sink",
        size,
        _testpmd_pps(pmd, "tx_pps"),
        [dev.shown(), _testpmd_shown(pmd)],
    )


@pytest.mark.parametrize(("mode", "size"), [("io", 64), ("macswap", 1500)])
def test_testpmd_bounces_frames_off_virtnet_device_loopback(
    testpmd, virtnet, sock_dir: Path, mode: str, size: int
) -> None:
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    dev = virtnet("device", sock, "loopback", cpu=vn_cpu)
    # --tx-first: one burst of BURST generated frames, then forward what comes back: the
    # same BURST frames circle testpmd -> device tx -> loopback -> device rx -> testpmd
    pmd = testpmd(
        _virtio_user(sock),
        cpus=cpus,
        forward_mode=mode,
        txpkts=size,
        extra_app=["--tx-first", f"--burst={BURST}"],
        log_levels=VIRTIO_DEBUG,
    )
    _traffic(pmd, rx=True)
    final = pmd.stop()
    result = dev.stop()

    _assert_device_clean(dev, result)
    st, lb = result["device_stats"], result["backend"]
    fwd = final.port(0)
    assert fwd.rx_packets > 0 and fwd.tx_dropped == 0 and fwd.rx_dropped == 0, fwd
    assert lb["loopback_dropped"] == 0
    assert st["rx_bytes"] == st["rx_packets"] * size and st["tx_bytes"] == st["tx_packets"] * size
    # every frame the device took is echoed or still queued in the loopback
    assert st["tx_packets"] == st["rx_packets"] + lb["loopback_queued"]
    # along the circle, each stage has at most what the previous one passed on ...
    assert fwd.rx_packets <= st["rx_packets"] <= st["tx_packets"] <= fwd.tx_packets
    # ... and nothing is lost or made up: exactly the first burst is still in flight
    assert fwd.tx_packets - fwd.rx_packets == BURST, (fwd, st, lb)
    _assert_virtio_user_mergeable(pmd, dev)

    _record(
        "testpmd virtio_user (frontend)",
        "round trip",
        f"{mode} <-> device loopback",
        size,
        _testpmd_pps(pmd, "rx_pps"),
        [dev.shown(), _testpmd_shown(pmd)],
    )


def test_virtnet_device_stream_echoed_by_testpmd_io(testpmd, virtnet, sock_dir: Path) -> None:
    """virtio_user io sends every frame back: the device's sink verifies its own stream."""
    size = 64
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    dev = virtnet("device", sock, f"gen:{size}", cpu=vn_cpu)
    pmd = testpmd(_virtio_user(sock), cpus=cpus, forward_mode="io", extra_app=NO_FLUSH,
                  log_levels=VIRTIO_DEBUG)  # fmt: skip
    _traffic(pmd, rx=True)
    final = pmd.stop()  # GET_VRING_BASE stops the device's generator too
    result = dev.stop()

    _assert_device_clean(dev, result)
    st, sink, fwd = result["device_stats"], result["backend"], final.port(0)
    assert st["rx_packets"] == sink["gen_packets"] and st["rx_dropped"] == 0
    assert fwd.tx_packets + fwd.tx_dropped == fwd.rx_packets > 0
    # at most a ring's worth in flight each way when virtio_user stopped the rings
    assert 0 <= st["rx_packets"] - fwd.rx_packets <= QUEUE_SIZE, (fwd, st)
    assert 0 <= fwd.tx_packets - st["tx_packets"] <= QUEUE_SIZE, (fwd, st)
    assert sink["sink_packets"] == st["tx_packets"] > 0
    assert sink["sink_corrupt"] == 0 and sink["sink_foreign"] == 0
    assert sink["sink_lost"] <= fwd.tx_dropped
    _assert_virtio_user_mergeable(pmd, dev)

    _record(
        "testpmd virtio_user (frontend)",
        "round trip",
        "device gen <-> io",
        size,
        _testpmd_pps(pmd, "tx_pps"),
        [dev.shown(), _testpmd_shown(pmd)],
    )


# ---------------------------------------------------------------------------------------------
# the roles reversed on the socket: testpmd's net_vhost connects (client=1) to a listening
# virtnet driver (--server); virtnet device --client connects to a listening virtio_user
# (server=1)


def test_testpmd_vhost_client_to_virtnet_driver_server(testpmd, virtnet, sock_dir: Path) -> None:
    sock = sock_dir / "vh.sock"
    cpus, vn_cpu = _driver_cpus()
    drv = virtnet("driver", sock, "sink", cpu=vn_cpu, extra=["--server", *SPLIT])
    drv._wait(sock.is_socket, 15, "its listening socket")
    pmd = testpmd(VhostPort(sock, client=True), cpus=cpus, forward_mode="txonly", txpkts=1500)
    _traffic(pmd, rx=False)
    result = drv.stop()
    final = pmd.stop()

    _assert_driver_clean(drv, result)
    st, sink = result["driver_stats"], result["backend"]
    assert st["rx_packets"] > 0 and st["rx_bytes"] == st["rx_packets"] * 1500
    assert sink["sink_foreign"] == sink["sink_packets"] == st["rx_packets"]
    assert final.port(0).tx_packets == st["rx_packets"], (final.port(0), st)  # exact
    assert vhost_negotiated_features(pmd.log_text()) == result["features"]
    assert "listening on" in drv.log_text() and not sock.exists()
    # net_vhost takes PROTOCOL_F_STATUS: the driver's SET_STATUS walk, as virtio_user's.
    for status in ("0x0000000b", "0x0000000f", "0x00000000"):
        assert f"new device status({status})" in pmd.log_text(), status


def test_virtnet_device_client_to_testpmd_virtio_user_server(testpmd, virtnet,
                                                             sock_dir: Path) -> None:  # fmt: skip
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    port = VirtioUserPort(sock, queue_size=QUEUE_SIZE, mrg_rxbuf=True, server=True)
    pmd = testpmd(port, cpus=cpus, forward_mode="rxonly", extra_app=NO_FLUSH,
                  log_levels=VIRTIO_DEBUG)  # fmt: skip
    dev = virtnet("device", sock, "gen:1500", cpu=vn_cpu, extra=["--client"])
    pmd.wait_for_log(r"packet forwarding - ports=1", 30)  # virtio_user probed: connected
    _traffic(pmd, rx=True)
    result = dev.stop()  # the sender first: testpmd reads the used entries it left
    settled = pmd.wait_quiescent(timeout=10)
    final = pmd.stop(check=False)

    _assert_device_clean(dev, result)
    st = result["device_stats"]
    assert st["rx_packets"] > 0 and st["rx_dropped"] == 0
    assert st["rx_bytes"] == st["rx_packets"] * 1500
    assert final.port(0).rx_packets == st["rx_packets"], (final.port(0), st)  # exact
    assert settled.rx_errors == 0
    _assert_virtio_user_mergeable(pmd, dev)
    # virtio_user sends STATUS where offered: the device walked it to DRIVER_OK.
    assert re.search(r"device status 0x[0-9a-f]+: .*DRIVER_OK", dev.log_text()), dev.log_text()



def test_virtio_user_server_restarts_rings_at_0_under_a_new_device(
    testpmd, virtnet, tmp_path: Path, sock_dir: Path
) -> None:
    """virtio_user (server=1) outlives its back-end: the device SIGKILLed under traffic, a
    new `virtnet device --client` connects and virtio_user negotiates again -- but DPDK
    22.11 restarts its split rings with SET_VRING_BASE 0 while its avail index is far past
    (observed: the new device logs bases (0, 0)). The new device names the stale base and
    continues from the ring's used index (conform stale-vring-base): it carries frames again,
    with no descriptor error."""
    sock = sock_dir / "vu.sock"
    cpus, vn_cpu = _device_cpus()
    port = VirtioUserPort(sock, queue_size=QUEUE_SIZE, mrg_rxbuf=True, server=True)
    pmd = testpmd(port, cpus=cpus, forward_mode="rxonly", extra_app=NO_FLUSH,
                  log_levels=VIRTIO_DEBUG)  # fmt: skip
    first = virtnet("device", sock, "gen:1500", cpu=vn_cpu, extra=["--client"])
    pmd.wait_for_log(r"packet forwarding - ports=1", 30)
    pmd.wait_packets(rx=QUEUE_SIZE, timeout=20)  # past one ring's worth: base 0 is stale
    first.kill()  # SIGKILL: no goodbye
    (tmp_path / "second").mkdir()
    second = Virtnet("device", sock, "gen:1500", tmp_path / "second", vn_cpu, ["--client"])
    second.start()
    try:
        second._wait(lambda: "SET_VRING_BASE 0 but the used ring's idx is" in second.log_text(),
                     30, "the stale SET_VRING_BASE named")  # fmt: skip
        assert "bases (0, 0)" in second.log_text()  # what virtio_user sent
        time.sleep(2)  # frames from the resumed ring
        result = second.stop()
    finally:
        second.kill()
    pmd.stop(check=False)
    assert second.returncode == 0, second.describe("the device did not stop cleanly")
    assert result["sessions"] == 1 and result["device_stats"]["desc_errors"] == 0, result
    assert result["device_stats"]["rx_packets"] > 0, result
