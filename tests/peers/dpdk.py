"""Run DPDK testpmd as a real vhost-user peer (backend or frontend) for tests and benchmarks.

Plain functions and classes, no pytest and no virtnet import, so a benchmark script, a test or
a REPL can use them alike. The recipe behind every choice here is in docs/dpdk.md.

* ``ensure_hugepages()``: testpmd's vhost and virtio_user PMDs need hugepages (``--no-huge``
  cannot create the mbuf pool or share memory with the peer).
* ``Testpmd``: one testpmd process with one vdev port (``VhostPort`` = testpmd is the vhost-user
  backend; ``VirtioUserPort`` = testpmd is the frontend), its log, and its parsed statistics.
* ``VhostUserRecorder`` / ``query_backend_features()``: tiny vhost-user wire probes that show
  what a real frontend sends and what a real backend offers.

Every wait is bounded and every error carries the tail of the testpmd log.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# errors


class PeerUnavailable(RuntimeError):
    """The facility is truly absent (no testpmd binary, kernel without hugetlbfs): skip."""


class HugepagesError(RuntimeError):
    """Hugepages exist in this kernel but could not be set up (not root, not enough memory)."""


class TestpmdError(RuntimeError):
    """testpmd failed to start, to do what was waited for, or to stop cleanly."""

    __test__ = False  # not a pytest test class despite the name


# ---------------------------------------------------------------------------------------------
# hugepages

HUGEPAGE_SYSFS = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
DEFAULT_HUGE_MOUNT = Path("/dev/hugepages")


@dataclass(frozen=True)
class Hugepages:
    mount: Path  # a hugetlbfs mount with 2 MiB pages; pass it to testpmd as --huge-dir
    total: int  # 2 MiB pages in the kernel pool
    free: int


def ensure_hugepages(
    n_2mb: int = 512, free_2mb: int = 0, mount_point: Path = DEFAULT_HUGE_MOUNT
) -> Hugepages:
    """Make at least ``n_2mb`` 2 MiB pages exist, ``free_2mb`` of them free, and a mount.

    Idempotent: never lowers the pool, reuses any existing 2 MiB hugetlbfs mount. Other
    processes (another test's testpmd, QEMU) may hold pages, so ask for free ones.
    Raises PeerUnavailable when the kernel has no 2 MiB hugepages at all, HugepagesError when
    they exist but cannot be had (not root, memory too fragmented).
    """
    _require_hugetlb_kernel()
    total, free = _ensure_page_count(n_2mb, free_2mb)
    mount = _ensure_mount(mount_point)
    return Hugepages(mount=mount, total=total, free=free)


def _require_hugetlb_kernel() -> None:
    filesystems = Path("/proc/filesystems").read_text()
    if not re.search(r"\bhugetlbfs\b", filesystems):
        raise PeerUnavailable("kernel has no hugetlbfs (not in /proc/filesystems)")
    if not (HUGEPAGE_SYSFS / "nr_hugepages").exists():
        raise PeerUnavailable(f"kernel has no 2 MiB hugepages ({HUGEPAGE_SYSFS} missing)")


def _page_counts() -> tuple[int, int]:
    total = int((HUGEPAGE_SYSFS / "nr_hugepages").read_text())
    free = int((HUGEPAGE_SYSFS / "free_hugepages").read_text())
    return total, free


def _ensure_page_count(n_2mb: int, free_2mb: int) -> tuple[int, int]:
    total, free = _page_counts()
    target = max(n_2mb, total - free + free_2mb)
    if total >= target:
        return total, free
    if os.geteuid() != 0:
        raise HugepagesError(
            f"need {target} 2 MiB hugepages ({free_2mb} free), have {total} ({free} free); "
            f"as root: echo {target} > {HUGEPAGE_SYSFS}/nr_hugepages"
        )
    for attempt in range(2):
        (HUGEPAGE_SYSFS / "nr_hugepages").write_text(f"{target}\n")
        total, free = _page_counts()
        if total >= target:
            return total, free
        if attempt == 0:  # fragmented memory: compact once, then try again
            with contextlib.suppress(OSError):
                Path("/proc/sys/vm/compact_memory").write_text("1\n")
    raise HugepagesError(f"asked the kernel for {target} 2 MiB hugepages, it granted {total}")


def find_hugetlbfs_mount() -> Path | None:
    """First hugetlbfs mount whose page size is 2 MiB (explicitly or as the default size)."""
    default_2m = "Hugepagesize:       2048 kB" in Path("/proc/meminfo").read_text()
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, where, fstype, options, *_ = line.split()
        if fstype != "hugetlbfs":
            continue
        size = re.search(r"pagesize=(\w+)", options)
        if (size and size.group(1) in ("2M", "2048k")) or (not size and default_2m):
            return Path(where.replace("\\040", " "))
    return None


def _ensure_mount(mount_point: Path) -> Path:
    found = find_hugetlbfs_mount()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise HugepagesError(f"no 2 MiB hugetlbfs mount; as root: mount -t hugetlbfs "
                             f"-o pagesize=2M nodev {mount_point}")
    mount_point.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "nodev", str(mount_point)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    found = find_hugetlbfs_mount()
    if done.returncode != 0 or found is None:
        raise HugepagesError(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.returncode}")
    return found


# ---------------------------------------------------------------------------------------------
# testpmd binary, cpus


def find_testpmd() -> str:
    """Path of dpdk-testpmd (Debian package dpdk); PeerUnavailable if not installed."""
    for name in ("dpdk-testpmd", "testpmd"):
        path = shutil.which(name)
        if path:
            return path
    raise PeerUnavailable("dpdk-testpmd not found on PATH (Debian: apt-get install dpdk)")



def cpu_pair(side: int) -> tuple[int, int]:
    """(main cpu, forwarding cpu) for peer number ``side`` (0 or 1).

    Two busy-polling forwarding lcores on one cpu halve each other; the main lcores only
    sleep and print stats, so on 2 cpus the peers swap: side 0 = (c0, c1), side 1 = (c1, c0).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) == 1:
        return cpus[0], cpus[0]
    if len(cpus) == 2:
        return (cpus[0], cpus[1]) if side == 0 else (cpus[1], cpus[0])
    return cpus[0], cpus[1 + side % (len(cpus) - 1)]


# ---------------------------------------------------------------------------------------------
# ports (vdevs)


def _devarg(name: str, options: Iterable[tuple[str, object]]) -> str:
    return ",".join([name, *(f"{k}={v}" for k, v in options)])


@dataclass(frozen=True)
class VhostPort:
    """testpmd is the vhost-user BACKEND (net_vhost PMD); it listens unless ``client``."""

    iface: Path
    queues: int = 1
    client: bool = False  # True: testpmd connects (with reconnect) to a frontend's server socket
    extra: tuple[tuple[str, str], ...] = ()  # e.g. (("tso", "1"),) — see docs/dpdk.md

    single_file_segments = False  # only the frontend shares its memory with the peer

    @property
    def socket_path(self) -> Path:
        return Path(self.iface)

    @property
    def listens(self) -> bool:
        return not self.client

    def devarg(self) -> str:
        opts: list[tuple[str, object]] = [("iface", self.iface), ("queues", self.queues)]
        if self.client:
            opts.append(("client", 1))
        return _devarg("net_vhost0", [*opts, *self.extra])


@dataclass(frozen=True)
class VirtioUserPort:
    """testpmd is the vhost-user FRONTEND (net_virtio_user PMD); it connects unless ``server``."""

    path: Path
    queues: int = 1
    queue_size: int = 256
    mrg_rxbuf: bool = True
    server: bool = False  # True: testpmd listens and blocks in accept() until a backend connects
    in_order: bool = True  # DPDK's default; only negotiated if the backend offers IN_ORDER
    packed_vq: bool = False
    extra: tuple[tuple[str, str], ...] = ()

    # virtio_user passes its memory to the backend as one fd per memseg list; without this
    # flag every 2 MiB page is a separate file and the backend gets too many regions.
    single_file_segments = True

    @property
    def socket_path(self) -> Path:
        return Path(self.path)

    @property
    def listens(self) -> bool:
        return self.server

    def devarg(self) -> str:
        opts: list[tuple[str, object]] = [
            ("path", self.path),
            ("queues", self.queues),
            ("queue_size", self.queue_size),
            ("mrg_rxbuf", int(self.mrg_rxbuf)),
            ("in_order", int(self.in_order)),
            ("packed_vq", int(self.packed_vq)),
            ("server", int(self.server)),
        ]
        return _devarg("net_virtio_user0", [*opts, *self.extra])


Port = VhostPort | VirtioUserPort

# ---------------------------------------------------------------------------------------------
# statistics


@dataclass(frozen=True)
class NicStats:
    """One periodic "NIC statistics for port N" block (--stats-period). Bytes live only here."""

    port: int
    rx_packets: int = 0
    rx_missed: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_bytes: int = 0
    rx_pps: int = 0
    rx_bps: int = 0
    tx_pps: int = 0
    tx_bps: int = 0


@dataclass(frozen=True)
class ForwardStats:
    """A "Forward statistics for port N" block printed on exit (port None = accumulated).

    These are the forwarding engine's own counters, exact at the moment forwarding stopped:
    tx_packets were accepted by the PMD, tx_dropped were refused (ring full, link down).
    """

    port: int | None
    rx_packets: int = 0
    rx_dropped: int = 0
    rx_total: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0
    tx_total: int = 0


@dataclass(frozen=True)
class FinalStats:
    ports: dict[int, ForwardStats]
    accumulated: ForwardStats | None
    nic: dict[int, NicStats]  # the last periodic block of each port (up to one period stale)
    streams: dict[int, StreamStats]  # by rx queue; empty with one queue per port
    returncode: int | None
    killed: bool  # SIGTERM was not enough

    def port(self, port: int = 0) -> ForwardStats:
        return self.ports[port]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FIELD = re.compile(r"([A-Za-z][A-Za-z-]*):\s+(\d+)")
_NIC_BLOCK = re.compile(r"NIC statistics for port (\d+)\s*#+\n(.*?)\n\s*#{20,}", re.S)
_FWD_BLOCK = re.compile(r"-+ Forward statistics for port (\d+)\s*-+\n(.*?)\n\s*-{20,}", re.S)
# With several queues (--rxq/--txq > 1) testpmd prints one block per forwarding stream first.
_STREAM_BLOCK = re.compile(
    r"-+ Forward Stats for RX Port=\s*(\d+)/Queue=\s*(\d+) -> "
    r"TX Port=\s*(\d+)/Queue=\s*(\d+)\s*-+\n(.*?)\n\s*\n", re.S
)
_ACC_BLOCK = re.compile(
    r"\++ Accumulated forward statistics for all ports\s*\++\n(.*?)\n\s*\+{20,}", re.S
)


def _fields(cls: type, body: str, **fixed: object) -> object:
    """Build ``cls`` from "Key: 123" pairs; foreign lines (vhost logs) interleave harmlessly."""
    names = {f.name for f in fields(cls)}
    values = {k.lower().replace("-", "_"): int(v) for k, v in _FIELD.findall(body)}
    return cls(**fixed, **{k: v for k, v in values.items() if k in names and k not in fixed})


def parse_nic_stats(text: str) -> list[NicStats]:
    """Every periodic NIC statistics block in the log, oldest first."""
    text = _ANSI.sub("", text)
    return [_fields(NicStats, body, port=int(p)) for p, body in _NIC_BLOCK.findall(text)]


def parse_forward_stats(text: str) -> tuple[dict[int, ForwardStats], ForwardStats | None]:
    """The per-port and accumulated forward statistics testpmd prints when it stops."""
    text = _ANSI.sub("", text)
    blocks = _FWD_BLOCK.findall(text)
    ports = {int(p): _fields(ForwardStats, body, port=int(p)) for p, body in blocks}
    acc = _ACC_BLOCK.findall(text)
    return ports, (_fields(ForwardStats, acc[-1], port=None) if acc else None)


@dataclass(frozen=True)
class StreamStats:
    """One forwarding stream's counters (testpmd prints them when it stops, if a port has
    several queues): frames received on ``rx_queue``, sent (or refused) on ``tx_queue``."""

    rx_port: int
    rx_queue: int
    tx_port: int
    tx_queue: int
    rx_packets: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0


def parse_stream_stats(text: str) -> dict[int, StreamStats]:
    """Per-stream forward statistics by rx queue (one stream per queue with --nb-cores=1
    and the default rxq->txq pairing), from the last stop in the log."""
    text = _ANSI.sub("", text)
    out: dict[int, StreamStats] = {}
    for rp, rq, tp, tq, body in _STREAM_BLOCK.findall(text + "\n\n"):
        s = _fields(StreamStats, body, rx_port=int(rp), rx_queue=int(rq), tx_port=int(tp),
                    tx_queue=int(tq))  # fmt: skip
        out[s.rx_queue] = s  # type: ignore[attr-defined]
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# feature bits (test-local names; virtnet's own features module is the source of truth for it)

VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_IN_ORDER = 35


def has_bit(value: int, bit: int) -> bool:
    return bool(value >> bit & 1)


def vhost_negotiated_features(log: str) -> int | None:
    """Virtio features a net_vhost backend accepted in SET_FEATURES (lib.vhost INFO line)."""
    found = re.findall(r"negotiated Virtio features: (0x[0-9a-fA-F]+)", log)
    return int(found[-1], 16) if found else None


def vhost_negotiated_protocol_features(log: str) -> int | None:
    found = re.findall(r"negotiated Vhost-user protocol features: (0x[0-9a-fA-F]+)", log)
    return int(found[-1], 16) if found else None


def virtio_user_features(log: str) -> dict[str, int]:
    """guest/host/negotiated features a virtio_user frontend logged (needs
    ``--log-level=pmd.net.virtio.*:debug``): guest = what the PMD supports, host = what the
    backend offered (already masked by virtio_user), negotiated = what it will use."""
    keys = {"guest": "guest_features before negotiate", "host": "host_features before negotiate",
            "negotiated": "features after negotiate"}
    out = {}
    for key, text in keys.items():
        found = re.findall(re.escape(text) + r" = ([0-9a-fA-F]+)", log)
        if found:
            out[key] = int(found[-1], 16)
    return out


def vhost_messages_from_log(log: str) -> list[str]:
    """The vhost-user requests a net_vhost backend received, in order (lib.vhost INFO lines)."""
    return re.findall(r"read message (VHOST_USER_\w+)", log)


# ---------------------------------------------------------------------------------------------
# testpmd

_FORWARDING_STARTED = re.compile(r"packet forwarding - ports=(\d+)")
_instance = itertools.count()


class Testpmd:
    """One dpdk-testpmd with one vdev port; a context manager that always stops it.

    testpmd runs non-interactively: ``--stats-period`` keeps it alive and prints a NIC stats
    block every period; SIGTERM (SIGINT is ignored in the background) makes it stop forwarding
    and print the forward statistics parsed by ``stop()``.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        port: Port,
        *,
        log_path: Path,
        forward_mode: str = "io",
        txpkts: int | Sequence[int] = 64,
        cpus: tuple[int, int] | None = None,
        mem_mb: int = 256,
        mbufs: int = 8192,
        stats_period: int = 1,
        huge_dir: Path | None = None,
        in_memory: bool = True,
        log_levels: Sequence[str] = (),
        extra_eal: Sequence[str] = (),
        extra_app: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        self.port = port
        self.log_path = Path(log_path)
        self.forward_mode = forward_mode
        self.txpkts = [txpkts] if isinstance(txpkts, int) else list(txpkts)
        self.cpus = cpus if cpus is not None else cpu_pair(0)
        self.mem_mb = mem_mb
        self.mbufs = mbufs
        self.stats_period = stats_period
        self.huge_dir = huge_dir
        self.in_memory = in_memory
        self.log_levels = list(log_levels)
        self.extra_eal = list(extra_eal)
        self.extra_app = list(extra_app)
        self.binary = binary or find_testpmd()
        # unique per process and instance: EAL keeps its runtime dir and hugepage files by it
        self.file_prefix = f"vnpeer{os.getpid()}_{next(_instance)}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.final: FinalStats | None = None

    # -- command line --------------------------------------------------------------------

    def command(self) -> list[str]:
        main_cpu, fwd_cpu = self.cpus
        eal = [
            self.binary,
            # lcore 0 (main, sleeps, prints stats) and lcore 1 (forwarding) pinned to cpus
            f"--lcores=0@{main_cpu},1@{fwd_cpu}",
            "--main-lcore=0",
            "--no-pci",
            f"--file-prefix={self.file_prefix}",
            "-m", str(self.mem_mb),
            f"--vdev={self.port.devarg()}",
        ]
        if self.port.single_file_segments:
            eal.append("--single-file-segments")
        if self.in_memory:
            # hugepages from memfd, no hugepage files: nothing pins pages after a crash
            # or a SIGKILL (a plain exit leaves PREFIXmap_* files behind). virtio_user still
            # shares its memory: the memfd is what SET_MEM_TABLE passes.
            eal.append("--in-memory")
        if self.huge_dir is not None:
            eal.append(f"--huge-dir={self.huge_dir}")
        eal += [f"--log-level={lvl}" for lvl in self.log_levels] + self.extra_eal
        app = [
            f"--forward-mode={self.forward_mode}",
            f"--txpkts={','.join(map(str, self.txpkts))}",
            f"--stats-period={self.stats_period}",
            f"--total-num-mbufs={self.mbufs}",
            "--nb-cores=1",
            "-a",
        ]
        return [*eal, "--", *app, *self.extra_app]

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Testpmd:
        """Launch and wait until it forwards (or, for a listening virtio_user, listens)."""
        if self.proc is not None:
            raise TestpmdError("testpmd already started")
        if self.port.listens:
            _remove_stale_socket(self.port.socket_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(self.command()) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's ^C must not reach it; we stop it ourselves
            )
        try:
            self._wait_started(timeout)
        except BaseException:
            self.stop(check=False)  # never leave a half-started testpmd behind
            raise
        return self

    def _wait_started(self, timeout: float) -> None:
        if isinstance(self.port, VirtioUserPort) and self.port.server:
            # probe blocks in accept() until a backend connects: listening is "started"
            self.wait_until(lambda: _is_socket(self.port.socket_path), timeout,
                            f"listening socket {self.port.socket_path}")
        elif self.wait_for_log(_FORWARDING_STARTED, timeout).group(1) == "0":
            # a vdev that failed to probe (virtio_user found no listener) leaves testpmd
            # running and forwarding on zero ports: that is a failed start, not a peer
            raise TestpmdError(self._describe("testpmd started without its port (ports=0)"))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0, check: bool = True) -> FinalStats:
        """SIGTERM, bounded wait, SIGKILL; return (and keep) the parsed final statistics."""
        if self.final is not None:
            return self.final
        if self.proc is None:
            raise TestpmdError("testpmd was never started")
        killed = _terminate(self.proc, timeout)
        self._cleanup_runtime_files()
        log = self.log_text()
        ports, acc = parse_forward_stats(log)
        nic = {s.port: s for s in parse_nic_stats(log)}
        streams = parse_stream_stats(log)
        self.final = FinalStats(ports, acc, nic, streams, self.proc.returncode, killed)
        if check and (killed or not ports):
            why = "ignored SIGTERM" if killed else "printed no forward statistics"
            raise TestpmdError(self._describe(f"testpmd {why}"))
        return self.final

    def __enter__(self) -> Testpmd:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.final is None:
            # an exception is already on its way: do not mask it with a stop() complaint
            self.stop(check=exc[0] is None)

    def _cleanup_runtime_files(self) -> None:
        """Without --in-memory EAL leaves its hugepage files (which pin pages) and runtime dir
        behind, even on a clean exit."""
        huge = self.huge_dir or find_hugetlbfs_mount()
        if huge is not None:
            for leftover in Path(huge).glob(f"{self.file_prefix}map_*"):
                leftover.unlink(missing_ok=True)
        shutil.rmtree(Path("/var/run/dpdk") / self.file_prefix, ignore_errors=True)

    # -- log and stats ---------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def nic_stats(self, port: int = 0) -> list[NicStats]:
        """Periodic statistics of ``port`` so far, oldest first."""
        return [s for s in parse_nic_stats(self.log_text()) if s.port == port]

    def latest(self, port: int = 0) -> NicStats | None:
        stats = self.nic_stats(port)
        return stats[-1] if stats else None

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = regex.search(self.log_text())
            if match:
                found.append(match)
            return match is not None

        self.wait_until(seen, timeout, f"log line /{regex.pattern}/")
        return found[0]

    def wait_packets(self, *, rx: int | None = None, tx: int | None = None,
                     timeout: float = 20.0, port: int = 0) -> NicStats:
        """Wait until the periodic stats report more than ``rx`` received and/or ``tx`` sent."""
        def enough() -> bool:
            s = self.latest(port)
            return s is not None and (rx is None or s.rx_packets > rx) and (
                tx is None or s.tx_packets > tx)

        self.wait_until(enough, timeout, f"port {port} rx > {rx} and tx > {tx}")
        return self.latest(port)  # type: ignore[return-value]

    def wait_quiescent(self, timeout: float = 10.0, port: int = 0) -> NicStats:
        """Wait until two consecutive periodic blocks show the same counters (peer drained)."""
        def still() -> bool:
            s = self.nic_stats(port)[-2:]
            return len(s) == 2 and (s[0].rx_packets, s[0].tx_packets) == (
                s[1].rx_packets, s[1].tx_packets) and s[1].rx_pps == s[1].tx_pps == 0

        self.wait_until(still, timeout, f"port {port} counters to stop moving")
        return self.latest(port)  # type: ignore[return-value]

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if not self.running():
                raise TestpmdError(self._describe(f"testpmd exited while waiting for {what}"))
            if time.monotonic() > deadline:
                problem = f"timed out after {timeout:.0f}s waiting for {what}"
                raise TestpmdError(self._describe(problem))
            time.sleep(0.1)

    def _describe(self, problem: str, lines: int = 80) -> str:
        rc = self.proc.poll() if self.proc else None
        tail = _ANSI.sub("", self.log_text()).splitlines()[-lines:]
        return "\n".join([f"{problem} (exit code {rc}, log {self.log_path})",
                          "$ " + " ".join(self.command()), *tail])


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM then, if it outlives ``timeout``, SIGKILL; True if it had to be killed."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return True


def _is_socket(path: Path) -> bool:
    try:
        return path.is_socket()
    except OSError:
        return False


def _remove_stale_socket(path: Path) -> None:
    """A listener cannot bind over a leftover socket file; remove it only if nobody listens."""
    if not _is_socket(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
    raise TestpmdError(f"{path}: another process is already listening on it")


# ---------------------------------------------------------------------------------------------
# vhost-user wire probes
#
# Just enough of the protocol to observe real peers: a message is a 12-byte header
# (request u32, flags u32, size u32) + payload, file descriptors ride in SCM_RIGHTS.

VHOST_USER_REQUESTS = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER", 5: "SET_MEM_TABLE",
    6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM", 9: "SET_VRING_ADDR",
    10: "SET_VRING_BASE", 11: "GET_VRING_BASE", 12: "SET_VRING_KICK", 13: "SET_VRING_CALL",
    14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES",
    17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE", 19: "SEND_RARP", 20: "NET_SET_MTU",
    21: "SET_BACKEND_REQ_FD", 22: "IOTLB_MSG", 23: "SET_VRING_ENDIAN", 24: "GET_CONFIG",
    25: "SET_CONFIG", 31: "GET_INFLIGHT_FD", 32: "SET_INFLIGHT_FD", 34: "RESET_DEVICE",
    36: "GET_MAX_MEM_SLOTS", 37: "ADD_MEM_REG", 38: "REM_MEM_REG", 39: "SET_STATUS",
    40: "GET_STATUS",
}
_REQ = {name: num for num, name in VHOST_USER_REQUESTS.items()}
_HDR = struct.Struct("<III")
_VERSION, _REPLY, _NEED_REPLY = 0x1, 0x4, 0x8
_MAX_FDS = 8


@dataclass(frozen=True)
class VhostUserMessage:
    request: int
    flags: int
    payload: bytes
    nfds: int

    @property
    def name(self) -> str:
        return VHOST_USER_REQUESTS.get(self.request, f"REQUEST_{self.request}")

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & _NEED_REPLY)

    @property
    def u64(self) -> int | None:
        return struct.unpack_from("<Q", self.payload)[0] if len(self.payload) == 8 else None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed mid-message")
        data += chunk
    return data


def recv_message(sock: socket.socket) -> VhostUserMessage | None:
    """One message (None on orderly close); received fds are closed, only counted."""
    header, ancdata, _flags, _addr = sock.recvmsg(_HDR.size, socket.CMSG_SPACE(4 * _MAX_FDS))
    if not header:
        return None
    header += _recv_exact(sock, _HDR.size - len(header))
    request, flags, size = _HDR.unpack(header)
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"<{len(data) // 4}i", data[: len(data) // 4 * 4])
    for fd in fds:
        os.close(fd)
    return VhostUserMessage(request, flags, _recv_exact(sock, size) if size else b"", len(fds))


def send_message(sock: socket.socket, request: int, payload: bytes = b"", flags: int = _VERSION,
                 ) -> None:
    sock.sendall(_HDR.pack(request, flags, len(payload)) + payload)


def query_backend_features(path: Path, timeout: float = 5.0) -> tuple[int, int]:
    """(virtio features, protocol features) a listening vhost-user backend offers.

    Connects as a frontend, asks GET_FEATURES and GET_PROTOCOL_FEATURES, hangs up; a backend
    such as net_vhost simply drops that half-made device and keeps listening.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        return _ask_u64(sock, _REQ["GET_FEATURES"]), _ask_u64(sock, _REQ["GET_PROTOCOL_FEATURES"])


def _ask_u64(sock: socket.socket, request: int) -> int:
    send_message(sock, request)
    reply = recv_message(sock)
    if reply is None or reply.request != request or reply.u64 is None:
        raise ConnectionError(f"bad reply to {VHOST_USER_REQUESTS[request]}: {reply}")
    return reply.u64


@dataclass
class VhostUserRecorder:
    """A fake vhost-user backend that records every message a real frontend sends.

    It listens on ``path``, accepts one frontend and answers just enough (feature queries,
    GET_STATUS, GET_VRING_BASE, REPLY_ACK) for the frontend to go all the way to DRIVER_OK.
    It never touches the rings, so a frontend sending traffic simply fills them.
    """

    path: Path
    features: int  # offered in GET_FEATURES, e.g. what net_vhost offers
    protocol_features: int
    messages: list[VhostUserMessage] = field(default_factory=list)
    _status: int = 0
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _server: socket.socket | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        _remove_stale_socket(Path(self.path))
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(1)
        self._server.settimeout(0.2)  # so the thread notices close() promptly
        self._thread = threading.Thread(target=self._run, name="vhost-user-recorder", daemon=True)
        self._thread.start()

    def names(self) -> list[str]:
        return [m.name for m in list(self.messages)]

    def wait_for(self, name: str, timeout: float = 20.0, where: Callable[
            [VhostUserMessage], bool] = lambda m: True) -> VhostUserMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in list(self.messages):
                if msg.name == name and where(msg):
                    return msg
            if self.error is not None:
                break
            time.sleep(0.05)
        raise TimeoutError(f"no {name} within {timeout}s; got {self.names()} (error: {self.error})")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._server is not None:
            self._server.close()
        Path(self.path).unlink(missing_ok=True)

    def __enter__(self) -> VhostUserRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            conn = self._accept()
            if conn is not None:
                with conn:
                    self._serve(conn)
        except (OSError, ConnectionError) as err:
            self.error = err

    def _accept(self) -> socket.socket | None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()  # type: ignore[union-attr]
                conn.settimeout(0.2)
                return conn
            except TimeoutError:
                continue
        return None

    def _serve(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                msg = recv_message(conn)
            except TimeoutError:
                continue
            if msg is None:
                return
            self.messages.append(msg)
            reply = self._reply(msg)
            if reply is not None:
                send_message(conn, msg.request, reply, _VERSION | _REPLY)

    def _reply(self, msg: VhostUserMessage) -> bytes | None:
        u64 = struct.Struct("<Q").pack
        name = msg.name
        if name == "SET_STATUS" and msg.u64 is not None:
            self._status = msg.u64
        answers = {
            "GET_FEATURES": lambda: u64(self.features),
            "GET_PROTOCOL_FEATURES": lambda: u64(self.protocol_features),
            "GET_QUEUE_NUM": lambda: u64(1),
            "GET_STATUS": lambda: u64(self._status),
            "GET_MAX_MEM_SLOTS": lambda: u64(8),
            "GET_VRING_BASE": lambda: msg.payload[:4] + b"\0\0\0\0",  # (index, num = 0)
            "GET_CONFIG": lambda: msg.payload,
        }
        if name in answers:
            return answers[name]()
        return u64(0) if msg.need_reply else None  # REPLY_ACK: 0 = success
