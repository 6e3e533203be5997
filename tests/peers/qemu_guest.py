"""Boot a tiny Debian-kernel QEMU guest whose only NIC is a vhost-user virtio-net device.

The guest is the real Linux ``virtio_net`` driver (from the installed
``linux-image-cloud-amd64``) in a busybox initramfs built here; the backend is whatever listens
on (or connects to) the vhost-user socket: DPDK testpmd today, ``virtnet device`` later.

No pytest in here: tests, benchmarks and a REPL can all use it.

Guest protocol (all on the serial console, one line each, easy to grep):

    VIRTNET-BOOT kernel=<uname -r>
    VIRTNET-FEATURES <64 chars of 0/1, bit 0 first>   (sysfs virtio ``features``)
    VIRTNET-RESULT key=value                           (from the test script)
    VIRTNET-ERROR <text>
    VIRTNET-EXIT rc=<script exit status>

Kernel command line knobs read by /init: ``virtnet.ip=A/N``, ``virtnet.peer=A``,
``virtnet.mtu=N``, ``virtnet.script=PATH`` (default /virtnet/script.sh),
``virtnet.timeout=SECONDS`` (the script is killed after that).
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MARK = "VIRTNET-"
BOOT = MARK + "BOOT"
FEATURES = MARK + "FEATURES"
RESULT = MARK + "RESULT"
ERROR = MARK + "ERROR"
EXIT = MARK + "EXIT"

QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
# virtio_pci is the transport, not a modules.dep dependency of virtio_net: load both chains.
ROOT_MODULES = ("virtio_pci", "virtio_net")
DEFAULT_SCRIPT = "/virtnet/script.sh"


# QEMU's messages when it gives up on the vhost-user backend (see QemuGuest.vhost_failures).
VHOST_FAILURE = re.compile(
    r"unable to start vhost net|vhost_set_mem_table failed|Failed initializing vhost-user"
)


class GuestError(RuntimeError):
    """The guest did not do what was expected; the message carries the console tail."""


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    moddir: Path


def find_kernel(version: str | None = None) -> Kernel:
    """The installed Debian cloud kernel (newest if several), or GuestError."""
    if version is None:
        found = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
        if not found:
            raise GuestError(
                "no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)"
            )
        version = found[-1].name.removeprefix("vmlinuz-")
    kernel = Kernel(version, Path(f"/boot/vmlinuz-{version}"), Path(f"/lib/modules/{version}"))
    for p in (kernel.vmlinuz, kernel.moddir / "modules.dep"):
        if not p.exists():
            raise GuestError(f"kernel {version}: {p} missing")
    if not os.access(kernel.vmlinuz, os.R_OK):
        raise GuestError(f"{kernel.vmlinuz} is not readable (run as root)")
    return kernel


def unavailable_reason() -> str | None:
    """Why a guest cannot be booted here, or None if it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (apt-get install qemu-system-x86)"
    if not Path(BUSYBOX).exists() or not _is_static(Path(BUSYBOX)):
        return "static busybox not installed (apt-get install busybox-static)"
    try:
        find_kernel()
    except GuestError as e:
        return str(e)
    return None


def _is_static(path: Path) -> bool:
    # A dynamic busybox would need its libc in the initramfs; busybox-static needs nothing.
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    return "not a dynamic executable" in (out.stdout + out.stderr)


# --------------------------------------------------------------------------- modules


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep lines ``path: dep dep`` -> {path: [deps]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" in line:
            mod, _, rest = line.partition(":")
            deps[mod.strip()] = rest.split()
    return deps


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")


def module_load_order(deps: Mapping[str, list[str]], roots: Iterable[str]) -> list[str]:
    """Paths of ``roots`` and everything they need, each after its dependencies."""
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order or path in visiting:
            return
        visiting.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for root in roots:
        if root not in by_name:
            raise GuestError(f"module {root} not in modules.dep (built in? not installed?)")
        visit(by_name[root])
    return order


def read_module(path: Path) -> bytes:
    """The .ko bytes; busybox insmod cannot be relied on to decompress, so we do it here."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise GuestError(f"{path} is zstd-compressed and zstd is not installed")
        return subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
    return data


# --------------------------------------------------------------------------- cpio (newc)


class Cpio:
    """A deterministic newc archive built in memory (no cpio binary, no root for device nodes)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1000
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        name_b = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts += [hdr, name_b, _pad4(len(hdr) + len(name_b)), data, _pad4(len(data))]

    def mkdir(self, name: str) -> None:
        name = name.strip("/")
        parent = name.rpartition("/")[0]
        if parent:
            self.mkdir(parent)
        if name and name not in self._dirs:
            self._dirs.add(name)
            self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


# --------------------------------------------------------------------------- guest files

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
export PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
. /virtnet/lib.sh
echo "VIRTNET-BOOT kernel=$(uname -r)"
vn_main
echo "VIRTNET-EXIT rc=$VN_RC"
sync
poweroff -f
"""

LIB = r"""# Helpers for guest scripts: sourced by /init before the script runs.
vn_result() { echo "VIRTNET-RESULT $1=$2"; }
vn_error() { echo "VIRTNET-ERROR $*"; }

vn_arg() {  # vn_arg NAME DEFAULT: value of virtnet.NAME= on the kernel command line
    for a in $(cat /proc/cmdline); do
        case "$a" in "virtnet.$1="*) echo "${a#virtnet.$1=}"; return;; esac
    done
    echo "$2"
}

vn_load_modules() {
    for m in $(cat /virtnet/modules.order); do
        insmod "/lib/modules/$m" || vn_error "insmod $m failed"
    done
}

vn_wait_eth0() {  # bounded: the device can take a moment to probe under TCG
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    [ -e /sys/class/net/eth0 ] || { vn_error "no eth0"; return 1; }
}

vn_configure() {
    ip link set lo up
    mtu=$(vn_arg mtu "")
    [ -n "$mtu" ] && ip link set eth0 mtu "$mtu"
    ip addr add "$(vn_arg ip 10.78.0.2/24)" dev eth0
    ip link set eth0 up
    vn_result mac "$(cat /sys/class/net/eth0/address)"
    vn_result mtu "$(cat /sys/class/net/eth0/mtu)"
}

vn_main() {
    VN_RC=1
    vn_load_modules
    vn_wait_eth0 || return
    echo "VIRTNET-FEATURES $(cat /sys/class/net/eth0/device/features)"
    vn_configure
    PEER=$(vn_arg peer 10.78.0.1)
    script=$(vn_arg script /virtnet/script.sh)
    [ -f "$script" ] || { vn_error "no script $script"; VN_RC=0; return; }
    export PEER
    timeout -s KILL "$(vn_arg timeout 120)" sh -c ". /virtnet/lib.sh; . $script"
    VN_RC=$?
    vn_stats
}

vn_stats() {  # interface counters: cheap evidence of what crossed the rings
    for s in rx_packets tx_packets rx_bytes tx_bytes rx_dropped rx_errors tx_dropped; do
        vn_result "eth0_$s" "$(cat /sys/class/net/eth0/statistics/$s)"
    done
}

vn_ping() {  # vn_ping HOST COUNT [KEY]: results KEY_sent, KEY_received
    out=$(ping -c "$2" -W 2 "$1" 2>&1)
    echo "$out"
    line=$(echo "$out" | grep 'packets transmitted')
    vn_result "${3:-ping}_sent" "$(echo "$line" | cut -d' ' -f1)"
    vn_result "${3:-ping}_received" "$(echo "$line" | cut -d' ' -f4)"
}

vn_wait_peer() {  # vn_wait_peer HOST [TRIES]: ping until one reply, so ARP/links are warm
    i=0
    while [ $i -lt "${2:-20}" ]; do
        ping -c 1 -W 1 "$1" >/dev/null 2>&1 && return 0
        i=$((i+1))
    done
    vn_error "peer $1 unreachable"
    return 1
}

vn_sha256() { sha256sum "$1" | cut -d' ' -f1; }

vn_make_file() {  # vn_make_file PATH KIB: random data, its sha256 as result KEY=basename
    dd if=/dev/urandom of="$1" bs=1024 count="$2" 2>/dev/null
    vn_result "$(basename "$1")_sha256" "$(vn_sha256 "$1")"
}

vn_nc_send() {  # vn_nc_send HOST PORT PATH [TRIES]: connect (retrying) and send a file
    i=0
    while [ $i -lt "${4:-20}" ]; do
        nc -w 5 "$1" "$2" < "$3" && { vn_result nc_send_rc 0; return 0; }
        i=$((i+1)); sleep 0.5
    done
    vn_result nc_send_rc 1
    return 1
}

vn_nc_recv() {  # vn_nc_recv PORT PATH: accept one connection, store it, result KEY_sha256
    nc -l -p "$1" > "$2"
    vn_result "$(basename "$2")_sha256" "$(vn_sha256 "$2")"
    vn_result "$(basename "$2")_bytes" "$(wc -c < "$2")"
}

vn_iperf3() {  # vn_iperf3 HOST SECONDS [extra args]: result iperf3_rc and the summary lines
    host=$1; secs=$2; shift 2
    out=$(iperf3 -c "$host" -t "$secs" -f m "$@" 2>&1)
    rc=$?
    echo "$out"
    vn_result iperf3_rc "$rc"
    vn_result iperf3_sender_mbps "$(echo "$out" | grep ' sender' | tail -1 | \
        sed -n 's/.* \([0-9.]*\) Mbits\/sec.*/\1/p')"
    vn_result iperf3_receiver_mbps "$(echo "$out" | grep ' receiver' | tail -1 | \
        sed -n 's/.* \([0-9.]*\) Mbits\/sec.*/\1/p')"
}
"""


def shared_libraries(binary: Path) -> list[Path]:
    """The shared objects ``binary`` loads (ldd), including the dynamic loader."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _resolve_binary(name: str | Path) -> Path:
    found = shutil.which(str(name))
    if found is None:
        raise GuestError(f"{name}: not found on PATH")
    return Path(found)


def _add_binary(cpio: Cpio, name: str | Path, added: set[str]) -> None:
    """Copy a binary and every library ldd names, at the same paths (the loader finds them
    through LD_LIBRARY_PATH set by /init, there is no ld.so.cache in the guest)."""
    binary = _resolve_binary(name)
    for path in [binary, *shared_libraries(binary)]:
        if str(path) in added:
            continue
        added.add(str(path))
        # Store the resolved content under the name the loader asks for: no symlink chains.
        cpio.file(str(path), path.resolve().read_bytes(), mode=0o755)


def initramfs_cpio(
    kernel: Kernel,
    extra_files: Mapping[str, bytes | str | Path] | None = None,
    binaries: Sequence[str | Path] = (),
) -> bytes:
    """The uncompressed archive. Deterministic, so its hash is the cache key."""
    cpio = Cpio()
    for d in ("dev", "proc", "sys", "tmp", "run", "bin", "sbin", "usr/bin", "usr/sbin", "etc"):
        cpio.mkdir(d)
    # The kernel opens /dev/console before /init runs: without it the guest is silent.
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", INIT.encode(), mode=0o755)
    cpio.file("virtnet/lib.sh", LIB.encode())
    deps = parse_modules_dep((kernel.moddir / "modules.dep").read_text())
    order = module_load_order(deps, ROOT_MODULES)
    names = []
    for rel in order:
        name = module_name(rel) + ".ko"
        cpio.file(f"lib/modules/{name}", read_module(kernel.moddir / rel))
        names.append(name)
    cpio.file("virtnet/modules.order", ("\n".join(names) + "\n").encode())
    added: set[str] = set()
    for b in binaries:
        _add_binary(cpio, b, added)
    for dest, src in sorted((extra_files or {}).items()):
        cpio.file(dest, _file_bytes(src), mode=0o755)
    return cpio.finish()


def _file_bytes(src: bytes | str | Path) -> bytes:
    if isinstance(src, bytes):
        return src
    if isinstance(src, Path):
        return src.read_bytes()
    return src.encode()


def default_cache_dir() -> Path:
    return Path(os.environ.get("VIRTNET_CACHE", "/tmp/virtnet-cache")) / "qemu"


def build_initramfs(
    dest: Path | None = None,
    kernel_version: str | None = None,
    extra_files: Mapping[str, bytes | str | Path] | None = None,
    binaries: Sequence[str | Path] = (),
) -> Path:
    """A gzip'd newc initramfs in the cache dir ``dest``, named by the hash of its content.

    ``extra_files`` maps guest paths to content (bytes/str) or host files; ``binaries`` are
    host executables (e.g. "iperf3") copied with their shared libraries.
    """
    dest = dest or default_cache_dir()
    kernel = find_kernel(kernel_version)
    raw = initramfs_cpio(kernel, extra_files, binaries)
    # The key is the archive itself: any change to /init, modules or binaries is a new file.
    key = hashlib.sha256(raw).hexdigest()[:16]
    out = dest / f"initramfs-{kernel.version}-{key}.cpio.gz"
    if out.exists():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    # Write then rename: parallel test processes never see a half-written archive.
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
    tmp.replace(out)
    return out


def overlay_cpio(files: Mapping[str, bytes | str | Path]) -> bytes:
    """A small uncompressed archive the kernel unpacks on top of the base initramfs
    (concatenated cpio archives are part of the initramfs format): per-run scripts go here,
    so the cached base is never rebuilt for a new script."""
    cpio = Cpio()
    for dest, src in sorted(files.items()):
        cpio.file(dest, _file_bytes(src), mode=0o755)
    return cpio.finish()


# --------------------------------------------------------------------------- QEMU


def _onoff(v: bool) -> str:
    return "on" if v else "off"


# Offload properties of QEMU's virtio-net device; all off gives plain <= MTU frames with full
# checksums, what a backend without offload support (testpmd io to af_packet/tap) can forward.
OFFLOAD_PROPS = (
    "csum", "guest_csum", "gso", "guest_tso4", "guest_tso6", "guest_ecn", "guest_ufo",
    "host_tso4", "host_tso6", "host_ecn", "host_ufo",
)  # fmt: skip


@dataclass
class NetDeviceOptions:
    """``-device virtio-net-pci`` properties; None leaves QEMU's default."""

    mrg_rxbuf: bool = True
    rx_queue_size: int | None = None
    tx_queue_size: int | None = None
    mtu: int | None = None  # host_mtu: offers VIRTIO_NET_F_MTU
    event_idx: bool | None = None
    indirect_desc: bool | None = None
    packed: bool | None = None
    mac: str = "52:54:00:78:00:02"
    offloads: dict[str, bool] = field(default_factory=dict)  # e.g. {"csum": False}
    extra: dict[str, str] = field(default_factory=dict)  # anything else, verbatim

    @classmethod
    def no_offloads(cls, **kw: object) -> NetDeviceOptions:
        opts = cls(**kw)  # type: ignore[arg-type]
        opts.offloads = {p: False for p in OFFLOAD_PROPS}
        return opts

    def device_arg(self, netdev: str) -> str:
        # vectors=0: QEMU 7.2 + TCG + vhost-user segfaults in msix_set_vector_notifiers
        # with MSI-X; without vectors the guest uses INTx, which works.
        props: dict[str, str] = {"netdev": netdev, "vectors": "0", "mac": self.mac}
        props["mrg_rxbuf"] = _onoff(self.mrg_rxbuf)
        optional: dict[str, int | bool | None] = {
            "rx_queue_size": self.rx_queue_size,
            "tx_queue_size": self.tx_queue_size,
            "host_mtu": self.mtu,
            "event_idx": self.event_idx,
            "indirect_desc": self.indirect_desc,
            "packed": self.packed,
            **self.offloads,
        }
        for k, v in optional.items():
            if v is not None:
                props[k] = _onoff(v) if isinstance(v, bool) else str(v)
        props.update(self.extra)
        return "virtio-net-pci," + ",".join(f"{k}={v}" for k, v in props.items())


@dataclass
class GuestRun:
    """What a finished guest reported."""

    rc: int | None
    features: int | None
    results: dict[str, str]
    errors: list[str]
    console: str
    seconds: float


def parse_features(bits: str) -> int:
    """sysfs virtio ``features``: one 0/1 char per bit, bit 0 first."""
    bits = bits.strip()
    if not bits or set(bits) - {"0", "1"}:
        raise ValueError(f"not a virtio feature bit string: {bits!r}")
    return int(bits[::-1], 2)


def parse_console(text: str) -> tuple[int | None, int | None, dict[str, str], list[str]]:
    """(script rc, features, results, errors) from the guest's marker lines."""
    rc = features = None
    results: dict[str, str] = {}
    errors: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(RESULT + " "):
            k, _, v = line[len(RESULT) + 1 :].partition("=")
            results[k] = v
        elif line.startswith(FEATURES + " "):
            features = parse_features(line[len(FEATURES) + 1 :])
        elif line.startswith(ERROR + " "):
            errors.append(line[len(ERROR) + 1 :])
        elif m := re.match(EXIT + r" rc=(\d+)", line):
            rc = int(m.group(1))
    return rc, features, results, errors


class QemuGuest:
    """One QEMU process. Use as a context manager: QEMU is always killed on exit.

    ``server=False`` (default): QEMU is the vhost-user client and connects to a backend
    already listening on ``socket_path`` (retrying every ``reconnect`` seconds if set).
    ``server=True``: QEMU listens on ``socket_path``; the backend connects (client mode).
    """

    def __init__(
        self,
        socket_path: str | Path,
        script: str = "",
        *,
        workdir: str | Path,
        device: NetDeviceOptions | None = None,
        initramfs: Path | None = None,
        binaries: Sequence[str | Path] = (),
        kernel_version: str | None = None,
        server: bool = False,
        reconnect: int | None = 1,
        ip: str = "10.78.0.2/24",
        peer: str = "10.78.0.1",
        mtu: int | None = None,
        script_timeout: int = 120,
        memory_mb: int = 256,
        memory_slots: int = 0,
        maxmem_mb: int = 0,
        append: str = "",
        qemu_args: Sequence[str] = (),
        smp: int = 1,
        queues: int = 1,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.script = script
        self.workdir = Path(workdir)
        self.device = device or NetDeviceOptions()
        self.initramfs = initramfs
        self.binaries = binaries
        self.kernel = find_kernel(kernel_version)
        self.server = server
        self.reconnect = reconnect
        self.cmdline = (
            f"console=ttyS0 panic=-1 quiet loglevel=4 virtnet.ip={ip} virtnet.peer={peer} "
            f"virtnet.timeout={script_timeout} virtnet.script={DEFAULT_SCRIPT}"
            + (f" virtnet.mtu={mtu}" if mtu else "")
            + (f" {append}" if append else "")
        )
        self.memory_mb = memory_mb
        # DIMM slots and the ceiling they may grow the guest to (-m SIZE,slots=N,maxmem=M):
        # pc-dimm devices (cold-plugged in qemu_args, or hot-plugged over QMP) need both.
        self.memory_slots = memory_slots
        self.maxmem_mb = maxmem_mb
        self.qemu_args = list(qemu_args)
        self.smp = smp
        self.queues = queues  # vhost-user queue pairs (the device needs mq=on to use them)
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    # ---- command line

    def _initrd(self) -> Path:
        base = self.initramfs or build_initramfs(
            kernel_version=self.kernel.version, binaries=self.binaries
        )
        initrd = self.workdir / "initrd.img"
        overlay = overlay_cpio({DEFAULT_SCRIPT: self.script})
        data = base.read_bytes()
        # The kernel only looks for an uncompressed archive at a 4-byte aligned offset
        # (zero bytes in between are skipped); unaligned, it reports "invalid magic".
        initrd.write_bytes(data + _pad4(len(data)) + overlay)
        return initrd

    def chardev_arg(self) -> str:
        arg = f"socket,id=c0,path={self.socket_path}"
        if self.server:
            # wait=off: the vhost-user netdev itself blocks startup until the backend connects.
            return arg + ",server=on,wait=off"
        return arg + (f",reconnect={self.reconnect}" if self.reconnect else "")

    def command(self, initrd: Path) -> list[str]:
        mem = f"{self.memory_mb}M"
        return [
            QEMU,
            "-accel", "tcg",  # KVM here never gets past the BIOS (no nested virtualization)
            "-M", "pc,memory-backend=mem",
            # share=on is what lets the backend mmap guest RAM from the fds vhost-user sends.
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-m", mem + (f",slots={self.memory_slots},maxmem={self.maxmem_mb}M"
                         if self.memory_slots else ""),
            "-smp", str(self.smp),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.console_log}",
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(initrd),
            "-append", self.cmdline,
            "-chardev", self.chardev_arg(),
            "-netdev", "vhost-user,id=n0,chardev=c0"
            + (f",queues={self.queues}" if self.queues > 1 else ""),
            "-device", self.device.device_arg("n0"),
            *self.qemu_args,
        ]  # fmt: skip

    # ---- lifecycle

    def start(self) -> QemuGuest:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log.write_bytes(b"")
        cmd = self.command(self._initrd())
        (self.workdir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
        with open(self.qemu_log, "wb") as log:
            # Own session: stop() can signal exactly this QEMU and nothing else.
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self.started_at = time.monotonic()
        return self

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(grace)

    def __enter__(self) -> QemuGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- observing

    def console(self) -> str:
        try:
            return self.console_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self, lines: int = 40) -> str:
        """Console and QEMU log tails, for error messages."""
        tail = "\n".join(self.console().splitlines()[-lines:])
        qlog = self.qemu_log.read_text(errors="replace")[-2000:] if self.qemu_log.exists() else ""
        return f"--- console tail ({self.console_log}):\n{tail}\n--- qemu log:\n{qlog}"

    def wait_for(self, marker: str, timeout: float = 60.0) -> str:
        """The first console line containing ``marker``; GuestError on timeout or QEMU exit."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.console().splitlines():
                if marker in line:
                    return line.strip()
            if self.proc is not None and self.proc.poll() is not None:
                raise GuestError(
                    f"QEMU exited (rc={self.proc.returncode}) before {marker!r}\n{self.describe()}"
                )
            if time.monotonic() > deadline:
                raise GuestError(f"no {marker!r} within {timeout:.0f}s\n{self.describe()}")
            time.sleep(0.1)

    def wait_exit(self, timeout: float = 180.0) -> GuestRun:
        """Wait for the guest to power off (after its script) and parse what it reported."""
        assert self.proc is not None, "start() first"
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise GuestError(
                f"guest still running after {timeout:.0f}s\n{self.describe()}"
            ) from None
        return self.result()

    def result(self) -> GuestRun:
        text = self.console()
        rc, features, results, errors = parse_console(text)
        errors += self.vhost_failures()
        return GuestRun(rc, features, results, errors, text, time.monotonic() - self.started_at)

    def vhost_failures(self) -> list[str]:
        """QEMU lines saying vhost-user was abandoned. QEMU then carries on with its userspace
        virtio-net, which has no backend: the guest boots, negotiates, and loses every
        packet. Seen e.g. without share=on guest memory."""
        if not self.qemu_log.exists():
            return []
        lines = self.qemu_log.read_text(errors="replace").splitlines()
        return [f"qemu: {ln}" for ln in lines if VHOST_FAILURE.search(ln)]


def run_guest(
    socket_path: str | Path, script: str, timeout: float = 180.0, **kw: object
) -> GuestRun:
    """Boot, run ``script`` in the guest, power off; everything bounded by ``timeout``."""
    with QemuGuest(socket_path, script, **kw) as guest:  # type: ignore[arg-type]
        return guest.wait_exit(timeout)
