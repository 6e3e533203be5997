"""Guest reboots on ``virtnet device``: the Linux guest reboots itself (``reboot -f``) and is
reset over QMP (``system_reset``), and pings through the device after each boot.

    guest virtio_net ==vhost-user==> virtnet device --backend tapfd:N ==> tap in netns

Each reboot makes QEMU stop every ring (GET_VRING_BASE) and the new kernel's driver start
fresh ones from base 0: the device must take each start as it comes (no index kept from the
last boot), and keep no mapping of guest memory from before (the mappings of its processes
do not grow from boot to boot).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu_guest import QemuGuest
from test_qemu_virtnet import BOOT_TIMEOUT, GUEST_IP, GUEST_LIB, HOST_IP, MISSING, Lab, lab

lab_fixture = lab  # test_qemu_virtnet's fixture, by the name the test asks for
del lab

pytestmark = [pytest.mark.peer, pytest.mark.needs(MISSING), pytest.mark.timeout(900)]

BOOTS = 3  # the first boot, after `reboot -f`, after QMP system_reset
# Every boot runs the same script: ping, say so, then wait. The host takes the link down
# (QMP set_link) to ask for `reboot -f`; a system_reset needs nothing from the guest.
REBOOT_SCRIPT = """
vn_wait_peer $PEER 30 || exit 1
vn_ping $PEER 2 boot
vn_result phase booted
vn_wait_carrier 0 reboot_asked
if [ "$(vn_carrier)" = 0 ]; then
    vn_result phase rebooting
    reboot -f
fi
sleep 600
"""


class Qmp:
    """Just enough of QMP: connect, negotiate capabilities, execute a command."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            msg = json.loads(self.file.readline())
            if "event" not in msg:
                return msg

    def execute(self, command: str, **arguments: object) -> object:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise AssertionError(f"QMP {command}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class RebootingGuest(QemuGuest):
    """The lab's guest with reboots allowed (QEMU resets instead of exiting) and QMP."""

    def __init__(self, *args: object, qmp_path: Path, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.qmp_path = qmp_path

    def command(self, initrd: Path) -> list[str]:
        cmd = [a for a in super().command(initrd) if a != "-no-reboot"]
        return [*cmd, "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]

    def count(self, marker: str) -> int:
        return sum(marker in line for line in self.console().splitlines())

    def wait_count(self, marker: str, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count(marker) < n:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited before {marker!r} #{n}\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} #{n} within {timeout:.0f}s\n"
                                     f"{self.describe()}")  # fmt: skip
            time.sleep(0.1)


def memfd_mappings(pid: int) -> int:
    """Mappings of memfds (guest memory) in ``pid`` and its children (the workers)."""
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        try:
            total += sum("/memfd:" in ln for ln in Path(f"/proc/{p}/maps").read_text().splitlines())
        except OSError:
            pass
    return total


# "device running: ... bases (rx, tx)" and "queue pair N stopped: bases (rx, tx)", in order.
RING_EVENTS = re.compile(r"(running|stopped): (?:queue pair \d+, )?(?:queue sizes \d+/\d+, )?"
                         r"bases \((\d+), (\d+)\)")  # fmt: skip


def test_guest_reboots_and_resets_and_pings_after_each(lab_fixture: Callable[..., Lab],
                                                       tmp_path: Path) -> None:  # fmt: skip
    net = lab_fixture()
    dev = net.device("device")
    qmp_path = tmp_path / "qmp.sock"
    vm = RebootingGuest(net.sock, GUEST_LIB + REBOOT_SCRIPT, workdir=net.workdir / "guest",
                        ip=f"{GUEST_IP}/24", peer=HOST_IP, qmp_path=qmp_path,
                        script_timeout=600)  # fmt: skip
    with vm:
        qmp = Qmp(qmp_path)
        try:
            vm.wait_count("VIRTNET-RESULT phase=booted", 1, BOOT_TIMEOUT)
            after_first = memfd_mappings(dev.proc.pid)
            qmp.execute("set_link", name="n0", up=False)  # asks the guest for `reboot -f`
            vm.wait_count("VIRTNET-RESULT phase=rebooting", 1, 60)
            qmp.execute("set_link", name="n0", up=True)
            vm.wait_count("VIRTNET-RESULT phase=booted", 2, BOOT_TIMEOUT)
            qmp.execute("system_reset")
            vm.wait_count("VIRTNET-RESULT phase=booted", 3, BOOT_TIMEOUT)
            after_last = memfd_mappings(dev.proc.pid)
        finally:
            qmp.close()
        console = vm.console()
    assert dev.stop() == 0, dev.log()
    log = dev.log()
    pings = re.findall(r"VIRTNET-RESULT boot_received=(\d+)", console)
    assert pings == ["2"] * BOOTS, console[-3000:]
    assert console.count("VIRTNET-BOOT kernel=") == BOOTS, console[-3000:]
    # Each boot's driver started its rings afresh, from base 0. QEMU also stops the rings
    # while the link is down and restarts them from where they stopped: that start must
    # carry the stopped bases (a restart), never an index of an earlier boot.
    fresh, restarts, last_stop = 0, 0, None
    for kind, a, b in RING_EVENTS.findall(log):
        bases = (int(a), int(b))
        if kind == "stopped":
            last_stop = bases
        elif bases == (0, 0):
            fresh += 1
        else:
            assert bases == last_stop, f"a start from {bases}, last stopped at {last_stop}\n{log}"
            restarts += 1
    assert fresh == BOOTS, log
    assert log.count("stopped: bases") >= BOOTS - 1, log  # each reboot stopped the rings
    assert "Traceback" not in log, log
    # No mapping of an old memory table is left behind: as many after the third boot as after
    # the first (QEMU sends the table again on each start).
    assert after_first > 0 and after_last == after_first, (after_first, after_last, log)
    print(f"\n{BOOTS} boots: {fresh} fresh ring starts, {restarts} restarts; memfd "
          f"mappings after the first boot {after_first}, after the last {after_last}")
