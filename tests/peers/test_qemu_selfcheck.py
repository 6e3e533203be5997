"""Self-check of the QEMU guest harness, with DPDK testpmd as the vhost-user backend.

virtnet's own device replaces testpmd later; these tests prove that the harness (initramfs,
QEMU command line, console markers, guest helpers) is right on its own, so a failure then
points at virtnet, not at the harness.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu_guest import (
    GuestRun,
    NetDeviceOptions,
    build_initramfs,
    module_load_order,
    parse_console,
    parse_features,
    parse_modules_dep,
    run_guest,
    unavailable_reason,
)

from virtnet.net.features import VirtioNetF
from virtnet.virtio.features import VirtioF, feature_names, has

QEMU_MISSING = unavailable_reason()
TESTPMD = shutil.which("dpdk-testpmd")
# A missing facility skips, or fails under VIRTNET_REQUIRE_PEERS=1 (tests/conftest.py).
needs_qemu = pytest.mark.needs(QEMU_MISSING)
needs_testpmd = pytest.mark.needs(
    None if TESTPMD else "dpdk-testpmd not installed (apt-get install dpdk-dev)"
)
needs_root = pytest.mark.needs(
    None if os.geteuid() == 0 else "needs root (network namespaces, chroot, hugepages)"
)
needs_iperf3 = pytest.mark.needs(
    None if shutil.which("iperf3") else "iperf3 not installed (apt-get install iperf3)"
)


def with_peers(test: Callable[..., None]) -> Callable[..., None]:
    """peer-marked, needs root + QEMU + kernel + testpmd, and hugepages for testpmd; a
    guest boot and its transfers get 900 s (pytest-timeout) instead of the default."""
    marks = (pytest.mark.peer, needs_root, needs_qemu, needs_testpmd,
             pytest.mark.usefixtures("hugepages"), pytest.mark.timeout(900))  # fmt: skip
    for mark in marks:
        test = mark(test)
    return test


HOST_IP, GUEST_IP = "10.78.0.1", "10.78.0.2"
TRANSFER_KIB = 4096


# --------------------------------------------------------------------------- testpmd


class DpdkTestpmd:
    """dpdk-testpmd, non-interactive (``--stats-period`` keeps it from reading stdin)."""

    def __init__(self, workdir: Path, vdevs: list[str], mode: str, netns: str | None = None):
        self.log = workdir / "testpmd.log"
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.cmd = [
            *prefix, str(TESTPMD), "-l", "0-1", "--no-pci", "-m", "256",
            # Own file prefix: runs never share DPDK runtime state or hugepage files.
            "--file-prefix", f"vnqemu{uuid.uuid4().hex[:8]}",
            *[a for v in vdevs for a in ("--vdev", v)],
            "--", f"--forward-mode={mode}", "--stats-period", "1", "--nb-cores=1",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DpdkTestpmd:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self.wait_for("packet forwarding - ports=", 60)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"testpmd: no {needle!r}\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> dict[int, dict[str, int]]:
        """SIGTERM (testpmd then prints its forward statistics); per-port counters."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return parse_testpmd_stats(self.text())

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_testpmd_stats(text: str) -> dict[int, dict[str, int]]:
    stats: dict[int, dict[str, int]] = {}
    for m in re.finditer(r"Forward statistics for port (\d+)\s*-+\n(.*?)\n\s*-{20}", text, re.S):
        counters = {k: int(v) for k, v in re.findall(r"([A-Z]+-[a-z]+): (\d+)", m.group(2))}
        stats[int(m.group(1))] = counters
    return stats


@pytest.fixture
def hugepages() -> None:
    """testpmd needs hugepages: raise the pool (never lower it) and mount hugetlbfs."""
    nr = Path("/proc/sys/vm/nr_hugepages")
    if int(nr.read_text()) < 512:
        nr.write_text("512\n")
    mounted = any(
        line.split()[1] == "/dev/hugepages"
        for line in Path("/proc/mounts").read_text().splitlines()
    )
    if not mounted:
        Path("/dev/hugepages").mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "hugetlbfs", "nodev", "/dev/hugepages"], check=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace: the only place guest traffic may reach."""
    name = f"vn-qemu-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ns(name: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", name, *cmd], check=True, text=True,
                          capture_output=True, timeout=30)  # fmt: skip


def wait_link(netns: str, ifname: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "show", ifname],
                         capture_output=True, check=False).returncode:  # fmt: skip
        assert time.monotonic() < deadline, f"{ifname} never appeared in {netns}"
        time.sleep(0.2)


def sock_path() -> Path:
    # sun_path is 108 bytes; pytest's tmp_path can be longer than that.
    return Path("/tmp") / f"vnqemu-{uuid.uuid4().hex[:8]}.sock"


def describe(run: GuestRun) -> str:
    names = feature_names(run.features or 0, VirtioNetF, VirtioF)
    return f"features={run.features or 0:#x} {names}\n{run.console[-4000:]}\nerrors: {run.errors}"


# --------------------------------------------------------------------------- pure parts


def test_module_load_order_puts_dependencies_first() -> None:
    deps = parse_modules_dep(
        "kernel/a/virtio_net.ko.xz: kernel/b/net_failover.ko kernel/c/failover.ko "
        "kernel/d/virtio.ko\n"
        "kernel/b/net_failover.ko: kernel/c/failover.ko\n"
        "kernel/c/failover.ko:\n"
        "kernel/d/virtio.ko:\n"
        "kernel/d/virtio_pci.ko: kernel/d/virtio.ko\n"
    )
    order = module_load_order(deps, ["virtio_pci", "virtio_net"])
    assert order == [
        "kernel/d/virtio.ko", "kernel/d/virtio_pci.ko", "kernel/c/failover.ko",
        "kernel/b/net_failover.ko", "kernel/a/virtio_net.ko.xz",
    ]  # fmt: skip


def test_console_markers_parse() -> None:
    bits = "0" * 15 + "1" + "0" * 16 + "1" + "0" * 31
    text = (
        f"noise\nVIRTNET-FEATURES {bits}\nVIRTNET-RESULT a=1\r\n"
        "VIRTNET-RESULT b=x=y\nVIRTNET-ERROR oops\nVIRTNET-EXIT rc=3\n"
    )
    rc, features, results, errors = parse_console(text)
    assert (rc, features, results, errors) == (3, (1 << 15) | (1 << 32), {"a": "1", "b": "x=y"},
                                               ["oops"])  # fmt: skip
    with pytest.raises(ValueError):
        parse_features("01x")


@needs_qemu
@needs_root
@needs_iperf3
def test_initramfs_is_cached_and_runs_iperf3(tmp_path: Path) -> None:
    first = build_initramfs(tmp_path, binaries=["iperf3"])
    assert build_initramfs(tmp_path, binaries=["iperf3"]) == first  # same content, same file
    root = tmp_path / "root"
    root.mkdir()
    unpacked = subprocess.run(f"zcat {first} | busybox cpio -idm", shell=True, cwd=root,
                              check=False, capture_output=True, text=True)  # fmt: skip
    assert unpacked.returncode == 0, unpacked.stderr
    for name in ("init", "bin/busybox", "lib/modules/virtio_net.ko", "lib/modules/virtio_pci.ko"):
        assert (root / name).is_file(), name
    # The copied libraries are enough on their own: run iperf3 in the unpacked tree.
    env = {**os.environ, "LD_LIBRARY_PATH": "/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu"}
    out = subprocess.run(["chroot", str(root), "/usr/bin/iperf3", "--version"], env=env,
                         capture_output=True, text=True, check=False, timeout=30)  # fmt: skip
    assert out.returncode == 0 and "iperf" in out.stdout, out.stderr


# --------------------------------------------------------------------------- with testpmd


@with_peers
def test_guest_pings_testpmd(tmp_path: Path) -> None:
    """testpmd's icmpecho mode answers ARP and ICMP echo itself: a full round trip through
    both rings with nothing but testpmd on the other end."""
    sock = sock_path()
    try:
        with DpdkTestpmd(tmp_path, [f"net_vhost0,iface={sock},client=0"], "icmpecho") as pmd:
            run = run_guest(sock, "vn_ping $PEER 3\n", workdir=tmp_path / "guest", timeout=120)
            stats = pmd.stop()
    finally:
        sock.unlink(missing_ok=True)
    assert run.rc == 0 and not run.errors, describe(run)
    assert run.features is not None and has(run.features, VirtioNetF.MRG_RXBUF), describe(run)
    assert has(run.features, VirtioF.VERSION_1), describe(run)
    assert run.results["ping_received"] == "3", describe(run)
    # Everything the guest sent was seen by testpmd, and the replies came back.
    assert stats[0]["RX-packets"] >= int(run.results["eth0_tx_packets"]) >= 4  # ARP + 3 echo
    assert int(run.results["eth0_rx_packets"]) >= 4


@with_peers
def test_qemu_as_server_with_device_options(tmp_path: Path) -> None:
    """QEMU listens (server=on), testpmd connects (client=1); device options reach the guest."""
    sock = sock_path()
    opts = NetDeviceOptions.no_offloads(
        mrg_rxbuf=False, rx_queue_size=1024, tx_queue_size=1024, mtu=9000,
        event_idx=False, indirect_desc=False,
    )  # fmt: skip
    try:
        with DpdkTestpmd(tmp_path, [f"net_vhost0,iface={sock},client=1"], "icmpecho"):
            run = run_guest(sock, "vn_ping $PEER 2\n", workdir=tmp_path / "guest", server=True,
                            device=opts, timeout=120)  # fmt: skip
    finally:
        sock.unlink(missing_ok=True)
    assert run.rc == 0 and not run.errors, describe(run)
    assert run.features is not None, describe(run)
    turned_off = (VirtioNetF.MRG_RXBUF, VirtioNetF.CSUM, VirtioNetF.GUEST_CSUM,
                  VirtioF.RING_EVENT_IDX, VirtioF.RING_INDIRECT_DESC)  # fmt: skip
    for off in turned_off:
        assert not has(run.features, off), f"{off.name} negotiated: {describe(run)}"
    assert has(run.features, VirtioNetF.MTU) and run.results["mtu"] == "9000", describe(run)
    assert run.results["ping_received"] == "2", describe(run)


# Runs inside the namespace: receives the guest's upload, then pushes a download to it.
PEER_PY = r"""
import hashlib, json, os, socket, sys, time
host, guest, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
srv = socket.create_server((host, 5001)); srv.settimeout(90)
c, _ = srv.accept(); c.settimeout(30)
h = hashlib.sha256(); n = 0
while n < size:  # stop at size too, in case the guest's nc never half-closes
    b = c.recv(65536)
    if not b:
        break
    h.update(b); n += len(b)
c.close()
out["up_sha256"], out["up_bytes"] = h.hexdigest(), n
data = os.urandom(size)
out["down_sha256"] = hashlib.sha256(data).hexdigest()
deadline = time.monotonic() + 30
while True:  # the guest starts listening only after its upload is done
    try:
        s = socket.create_connection((guest, 5002), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.3)
s.settimeout(30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)  # wait for the guest to close: everything was read
s.close()
print(json.dumps(out), flush=True)
"""

TRANSFER_SCRIPT = f"""
vn_wait_peer $PEER || exit 1
vn_ping $PEER 3
vn_make_file /tmp/up {TRANSFER_KIB}
vn_nc_send $PEER 5001 /tmp/up
vn_nc_recv 5002 /tmp/down
vn_iperf3 $PEER 2
vn_iperf3 $PEER 2 -R
"""


@with_peers
@needs_iperf3
def test_guest_moves_data_to_netns_through_testpmd(tmp_path: Path, netns: str) -> None:
    """guest virtio_net <-> vhost-user <-> testpmd io <-> TAP in a namespace (10.78.0.1):
    ping, nc both ways with sha256 checks, iperf3 both ways: what virtnet's test will do."""
    sock = sock_path()
    tap = "vnq" + netns[-8:]
    vdevs = [f"net_vhost0,iface={sock},client=0", f"net_tap0,iface={tap}"]
    try:
        with DpdkTestpmd(tmp_path, vdevs, "io", netns=netns) as pmd:
            wait_link(netns, tap)
            ns(netns, "ip", "addr", "add", f"{HOST_IP}/24", "dev", tap)
            ns(netns, "ip", "link", "set", tap, "up")
            peer, iperf = start_peers(netns, tmp_path)
            try:
                run = run_guest(sock, TRANSFER_SCRIPT, workdir=tmp_path / "guest",
                                binaries=["iperf3"], timeout=180)  # fmt: skip
                peer_out, _ = peer.communicate(timeout=60)
            finally:
                for p in (peer, iperf):
                    p.kill()
                    p.wait(10)
            stats = pmd.stop()
    finally:
        sock.unlink(missing_ok=True)
    assert run.rc == 0 and not run.errors, describe(run)
    assert run.results["ping_received"] == "3", describe(run)
    host = json.loads(peer_out)
    assert host["up_bytes"] == TRANSFER_KIB * 1024
    assert host["up_sha256"] == run.results["up_sha256"]
    assert run.results["down_bytes"] == str(TRANSFER_KIB * 1024)
    assert host["down_sha256"] == run.results["down_sha256"]
    assert run.results["iperf3_rc"] == "0", describe(run)
    assert stats[0]["RX-packets"] > 0 and stats[1]["RX-packets"] > 0


def start_peers(netns: str, tmp_path: Path) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """The nc-style peer and an iperf3 server, in the namespace; the caller kills both."""
    exec_ns = ["ip", "netns", "exec", netns]
    size = str(TRANSFER_KIB * 1024)
    peer = subprocess.Popen([*exec_ns, sys.executable, "-c", PEER_PY, HOST_IP, GUEST_IP, size],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    with open(tmp_path / "iperf3-server.log", "w") as log:
        iperf = subprocess.Popen([*exec_ns, "iperf3", "-s", "-B", HOST_IP], stdout=log,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return peer, iperf
