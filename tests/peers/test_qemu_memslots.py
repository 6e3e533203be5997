"""A QEMU guest with more than 8 memory regions on ``virtnet device`` (memory slots).

Ten cold-plugged ``pc-dimm``s on ``memory-backend-memfd,share=on`` beside the main RAM:
more regions than SET_MEM_TABLE can carry, so QEMU 7.2 needs
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS and sends each by ADD_MEM_REG (without it, it
stops at the seventh DIMM: "a used vhost backend has no free memory slots left"). The
guest boots, pings and moves 4 MiB each way, sha256-checked. Then a DIMM hot-plugged over
QMP (object-add + device_add) while a ping runs reaches the device as one more
ADD_MEM_REG, and the guest onlines it (``memhp_default_state=online``).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu_guest import NetDeviceOptions
from test_qemu_virtnet import (  # noqa: F401 - lab is a fixture
    BOOT_TIMEOUT,
    MISSING,
    HostTransfer,
    Lab,
    describe,
    lab,
    transfer_script,
)

pytestmark = [pytest.mark.peer, pytest.mark.needs(MISSING), pytest.mark.timeout(900)]

DIMMS = 10
DIMM_MB = 32
HOTPLUG_MB = 128  # Linux onlines memory in 128 MiB blocks (x86-64 memory_block_size)
HOTPLUG_ADDR = 0x1_8000_0000  # 6 GiB: 128 MiB-aligned, inside pc's device-memory area
MEMORY = {"memory_slots": 16, "maxmem_mb": 1024}
REGION_ADDED = re.compile(r"memory region added: gpa (0x[0-9a-f]+)\+(0x[0-9a-f]+)")


def dimm_args(n: int, size_mb: int = DIMM_MB) -> list[str]:
    args: list[str] = []
    for i in range(n):
        args += ["-object", f"memory-backend-memfd,id=m{i},size={size_mb}M,share=on",
                 "-device", f"pc-dimm,id=dimm{i},memdev=m{i}"]  # fmt: skip
    return args


def regions_added(log: str) -> list[tuple[int, int]]:
    return [(int(a, 16), int(b, 16)) for a, b in REGION_ADDED.findall(log)]


def worker_rss_kib(device_pid: int, size_kib: int) -> int:
    """Resident KiB of the device workers' memfd mappings of ``size_kib``: guest pages
    the worker itself read or wrote (a shared mapping counts only pages it touched)."""
    with open(f"/proc/{device_pid}/task/{device_pid}/children") as f:
        workers = [int(p) for p in f.read().split()]
    rss = 0
    for pid in workers:
        with open(f"/proc/{pid}/smaps") as f:
            mapping = ""
            mine = False
            for line in f:
                if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                    mapping, mine = line, False
                elif line.startswith("Size:") and "memfd:" in mapping:
                    mine = int(line.split()[1]) == size_kib
                elif line.startswith("Rss:") and "memfd:" in mapping and mine:
                    rss += int(line.split()[1])
    return rss


class Qmp:
    """Just enough QMP: the greeting, qmp_capabilities, and one command at a time."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        assert "QMP" in self._read()
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        assert line, "QMP closed"
        return json.loads(line)

    def command(self, name: str, **arguments: object) -> object:
        self.file.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        while True:
            answer = self._read()
            if "event" in answer:
                continue
            if "error" in answer:
                raise AssertionError(f"QMP {name}: {answer['error']}")
            return answer["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.mark.parametrize("queues", [1, 2])
def test_ten_dimms_boot_ping_and_move_4_mib_each_way(
    lab: Callable[..., Lab], queues: int,  # noqa: F811
) -> None:
    """With two queue pairs, QEMU 7.2 sends each region twice (once per vhost device):
    the device counts the second as a reference, and the two removals at the end."""
    net = lab(queues=queues)
    dev = net.device(extra=("--queues", str(queues)))
    xfer = HostTransfer(net, 4096)
    script = "vn_wait_peer $PEER || exit 1\nvn_ping $PEER 3\n" + transfer_script(4096)
    mq = {"queues": queues, "smp": queues, "device": NetDeviceOptions(extra={"mq": "on"})}
    with net.guest(script, qemu_args=dimm_args(DIMMS), **MEMORY,
                   **(mq if queues > 1 else {})) as vm:  # fmt: skip
        xfer.push_download(vm)
        run = vm.wait_exit(BOOT_TIMEOUT)
    assert dev.stop() == 0, dev.log()
    log = dev.log()
    assert run.rc == 0 and not run.errors, describe(run, log)
    assert run.results["ping_received"] == "3", describe(run, log)
    xfer.check(run)
    added = regions_added(log)
    dimms = [r for r in added if r[1] == DIMM_MB << 20]
    assert len(dimms) == DIMMS and len(added) > 8, log
    assert "SET_MEM_TABLE" not in log, log  # every region by ADD_MEM_REG
    if queues > 1:
        assert len(re.findall(r"added again \(2 references\)", log)) == len(added), log
    st = dev.stats()["device_stats"]
    assert st["desc_errors"] == 0, st
    assert st["rx_bytes"] >= 4 << 20 and st["tx_bytes"] >= 4 << 20, st
    print(f"\n{len(added)} regions: " + ", ".join(f"{g:#x}+{s:#x}" for g, s in added))


HOTPLUG_SCRIPT = r"""
vn_wait_peer $PEER || exit 1
online() { cat /sys/devices/system/memory/memory*/online | grep -c 1; }
before=$(online)
vn_result blocks_before $before
ping -c 15 $PEER > /tmp/ping.out 2>&1 &
vn_result phase hotplug
i=0
while [ "$(online)" -le "$before" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
vn_result blocks_after $(online)
wait
vn_result hp_ping_received "$(grep 'packets transmitted' /tmp/ping.out | cut -d' ' -f4)"
""" + transfer_script(4096) + """
vn_result phase measure
sleep 3
"""


def test_dimm_hot_plugged_while_traffic_runs_reaches_the_device(
    lab: Callable[..., Lab], tmp_path: Path,  # noqa: F811
) -> None:
    net = lab()
    dev = net.device()
    xfer = HostTransfer(net, 4096)
    qmp_path = tmp_path / "qmp.sock"
    qemu_args = [*dimm_args(DIMMS), "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    with net.guest(HOTPLUG_SCRIPT, qemu_args=qemu_args, append="memhp_default_state=online",
                   **MEMORY) as vm:  # fmt: skip
        vm.wait_for("VIRTNET-RESULT phase=hotplug", BOOT_TIMEOUT)
        cold = len(regions_added(dev.log()))
        qmp = Qmp(qmp_path)
        try:
            qmp.command("object-add", **{"qom-type": "memory-backend-memfd", "id": "hp0",
                                         "size": HOTPLUG_MB << 20, "share": True})  # fmt: skip
            qmp.command("device_add", driver="pc-dimm", id="hpdimm0", memdev="hp0",
                        addr=HOTPLUG_ADDR)  # fmt: skip
        finally:
            qmp.close()
        xfer.push_download(vm)
        vm.wait_for("VIRTNET-RESULT phase=measure", BOOT_TIMEOUT)
        touched = worker_rss_kib(dev.proc.pid, HOTPLUG_MB << 10)
        run = vm.wait_exit(BOOT_TIMEOUT)
    assert dev.stop() == 0, dev.log()
    log = dev.log()
    assert run.rc == 0 and not run.errors, describe(run, log)
    # The guest put buffers in its new memory (Linux allocates from ZONE_NORMAL, where
    # the onlined block went, first), and the device's worker read and wrote them there:
    # pages of the hot-plugged region are resident in the worker's own mapping of it.
    assert touched > 0, (touched, log)
    added = regions_added(log)
    assert (HOTPLUG_ADDR, HOTPLUG_MB << 20) in added[cold:], log  # one more ADD_MEM_REG
    assert int(run.results["blocks_after"]) > int(run.results["blocks_before"]), describe(run)
    assert int(run.results["hp_ping_received"]) >= 10, describe(run, log)
    xfer.check(run)
    st = dev.stats()["device_stats"]
    assert st["desc_errors"] == 0, st
    print(f"\nhot-plugged {HOTPLUG_MB} MiB at {HOTPLUG_ADDR:#x}: blocks online "
          f"{run.results['blocks_before']} -> {run.results['blocks_after']}, "
          f"{touched} KiB of it touched by the device's worker")  # fmt: skip


UNPLUG_SCRIPT = r"""
vn_wait_peer $PEER || exit 1
online() { cat /sys/devices/system/memory/memory*/online | grep -c 1; }
before=$(online)
vn_result phase hotplug
i=0
while [ "$(online)" -le "$before" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
vn_result blocks_plugged $(online)
vn_result phase unplug
i=0
while [ -e /sys/devices/system/memory/memory48 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
vn_result blocks_unplugged $(ls -d /sys/devices/system/memory/memory* | wc -l)
vn_ping $PEER 3
""" + transfer_script(1024)


def _wait_log(dev, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in dev.log():
        assert time.monotonic() < deadline, f"no {text!r} in the device log:\n{dev.log()}"
        time.sleep(0.1)


def test_dimm_hot_unplugged_reaches_the_device_as_rem_mem_reg(
    lab: Callable[..., Lab], tmp_path: Path,  # noqa: F811
) -> None:
    """The removal QEMU supports: a DIMM the guest onlined movable (so it can offline it
    again) is device_del'ed; the guest ejects it, QEMU sends REM_MEM_REG, the device
    unmaps it in every process, and traffic goes on."""
    net = lab()
    dev = net.device()
    xfer = HostTransfer(net, 1024)
    qmp_path = tmp_path / "qmp.sock"
    qemu_args = [*dimm_args(DIMMS), "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    gone = f"memory region removed: gpa {HOTPLUG_ADDR:#x}+{HOTPLUG_MB << 20:#x}"
    with net.guest(UNPLUG_SCRIPT, qemu_args=qemu_args,
                   append="memhp_default_state=online_movable", **MEMORY) as vm:  # fmt: skip
        vm.wait_for("VIRTNET-RESULT phase=hotplug", BOOT_TIMEOUT)
        qmp = Qmp(qmp_path)
        try:
            qmp.command("object-add", **{"qom-type": "memory-backend-memfd", "id": "hp0",
                                         "size": HOTPLUG_MB << 20, "share": True})  # fmt: skip
            qmp.command("device_add", driver="pc-dimm", id="hpdimm0", memdev="hp0",
                        addr=HOTPLUG_ADDR)  # fmt: skip
            vm.wait_for("VIRTNET-RESULT phase=unplug", BOOT_TIMEOUT)
            mapped = worker_maps(dev.proc.pid, HOTPLUG_MB << 10)
            qmp.command("device_del", id="hpdimm0")
            _wait_log(dev, gone)
            unmapped = worker_maps(dev.proc.pid, HOTPLUG_MB << 10)
            qmp.command("object-del", id="hp0")
        finally:
            qmp.close()
        xfer.push_download(vm)
        run = vm.wait_exit(BOOT_TIMEOUT)
    assert dev.stop() == 0, dev.log()
    log = dev.log()
    assert run.rc == 0 and not run.errors, describe(run, log)
    assert mapped >= 1 and unmapped == 0, (mapped, unmapped, log)
    assert run.results["ping_received"] == "3", describe(run, log)
    xfer.check(run)
    assert dev.stats()["device_stats"]["desc_errors"] == 0
    print(f"\nhot-unplugged: {gone}; worker mappings of it {mapped} -> {unmapped}")


def worker_maps(device_pid: int, size_kib: int) -> int:
    """The device workers' memfd mappings of ``size_kib``."""
    with open(f"/proc/{device_pid}/task/{device_pid}/children") as f:
        workers = [int(p) for p in f.read().split()]
    n = 0
    for pid in workers:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                n += "memfd:" in line and hi - lo == size_kib << 10
    return n
