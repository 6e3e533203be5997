"""``virtnet device --faults`` against Linux's virtio_net in a QEMU guest.

The guest pings the host through a device that lies; each case checks that the guest
stays up, that ping works again once the faults stop (after a driver reset where Linux
marks the queue broken), and records what the kernel said (dmesg, with virtio_net's
pr_debug lines switched on through dynamic debug) for docs/faults.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_qemu_virtnet import (  # noqa: F401 -- lab is a fixture
    BOOT_TIMEOUT,
    MISSING,
    Lab,
    describe,
    lab,
)

# A guest boot, its transfers and power-off (BOOT_TIMEOUT each wait, several waits).
pytestmark = [pytest.mark.peer, pytest.mark.needs(MISSING), pytest.mark.timeout(900)]

FAULTY_PINGS = 40  # 0.2 s apart: the opportunities the faults are drawn from
AFTER = 8  # rx used entries left alone first: boot chatter and the first ping pass


@dataclass
class FaultCase:
    id: str
    kinds: tuple[str, ...]
    rate: float
    count: int
    reset: bool  # Linux cannot go on without a driver reset (broken queue, lost irq)
    opts: str = ""  # more options for every kind (":q=rx")

    @property
    def spec(self) -> str:
        return ",".join(f"{k}:rate={self.rate}:count={self.count}:after={AFTER}{self.opts}"
                        for k in self.kinds)  # fmt: skip


CASES = [
    FaultCase("data", ("bad_len", "num_buffers_big", "num_buffers_small", "short", "bad_csum",
                       "bad_gso", "irq_late"), 0.3, 2, reset=False),  # fmt: skip
    FaultCase("bad_id", ("bad_id",), 0.5, 1, reset=True),
    FaultCase("dup_id", ("dup_id",), 0.5, 1, reset=True),
    FaultCase("idx_jump", ("idx_jump",), 0.5, 1, reset=True),
    FaultCase("irq_drop", ("irq_drop",), 0.5, 1, reset=True, opts=":q=rx"),
]

RESET = """
ip link set eth0 down
rmmod virtio_net && insmod /lib/modules/virtio_net.ko && vn_result reprobe ok
vn_wait_eth0 || exit 1
vn_configure
"""


def script(case: FaultCase) -> str:
    return f"""
mount -t debugfs none /sys/kernel/debug 2>/dev/null
echo 'module virtio_net +p' > /sys/kernel/debug/dynamic_debug/control && vn_result dyndbg on
vn_wait_peer $PEER 30 || exit 1
vn_result phase faults
ping -c {FAULTY_PINGS} -i 0.2 -W 1 $PEER > /tmp/faulty.log 2>&1
vn_result faulty_received "$(grep 'packets transmitted' /tmp/faulty.log | cut -d' ' -f4)"
for s in rx_length_errors rx_frame_errors rx_dropped rx_errors; do
    vn_result "faulty_$s" "$(cat /sys/class/net/eth0/statistics/$s)"
done
{RESET if case.reset else ""}
vn_wait_peer $PEER 30 || exit 1
vn_ping $PEER 5 after
dmesg | grep -iE 'virtio|eth0|input\\.|output\\.|bad gso|short packet|rx error' \\
    | grep -vE 'virtio_pci|Loaded|ACPI' | sed 's/^/VIRTNET-DMESG /'
"""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_linux_guest_survives_the_faults(lab: Callable[..., Lab], case: FaultCase) -> None:  # noqa: F811
    net = lab()
    dev = net.device(extra=("--faults", case.spec, "--seed", "1"))
    with net.guest(script(case)) as vm:
        run = vm.wait_exit(BOOT_TIMEOUT + 30)
    assert dev.stop() == 0, dev.log()
    injected = {k: dev.stats()["device_stats"][f"fault_{k}"] for k in case.kinds}
    dmesg = [ln.split("VIRTNET-DMESG ", 1)[1] for ln in run.console.splitlines()
             if "VIRTNET-DMESG " in ln]  # fmt: skip
    record = {"case": case.id, "spec": case.spec, "injected": injected, "dmesg": dmesg,
              "results": run.results}  # fmt: skip
    out = Path(net.workdir) / f"faults-{case.id}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"\n{case.id}: {json.dumps(record, indent=2)}")
    # the guest kernel stayed up and ran its script to the end
    assert run.rc == 0 and not run.errors, describe(run, dev.log())
    assert all(v >= 1 for v in injected.values()), (injected, dev.log()[-3000:])
    # once the faults are spent (after a reset where Linux needs one), ping works again
    assert run.results.get("after_received") == "5", describe(run, dev.log())
    if case.reset:
        assert run.results.get("reprobe") == "ok", describe(run)
    assert "Traceback" not in dev.log()
