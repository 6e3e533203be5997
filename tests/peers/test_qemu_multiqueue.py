"""A 2-vCPU Linux guest with two queue pairs on ``virtnet device --queues 2``.

    guest virtio_net (mq=on, 2 pairs) ==vhost-user queues=2==> virtnet device --queues 2
        --backend tapfd:FD0,FD1 ==> one multi-queue tap in a private namespace

Linux enables as many pairs as it has CPUs (up to max_virtqueue_pairs): with ``-smp 2`` both.
Asserted: MQ negotiated and both pairs carry traffic (an iperf3 client pinned to each vCPU,
each way: virtio_net's XPS maps vCPU p to tx queue p, and the tap sends a flow's replies to
the queue its frames came from, so pair p carries the flows of vCPU p both ways);
``ethtool -L eth0 combined 1`` stops pair 1 (QEMU's SET_VRING_ENABLE 0 on rings 2 and 3) and
``combined 2`` starts it again where it stopped; the guest's ``ethtool -S`` per-queue counters
agree with the device's ``rx_queue_P_*`` / ``tx_queue_P_*``; 4 MiB each way intact (sha256)
with both pairs up.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable

import pytest
from qemu_guest import NetDeviceOptions
from test_qemu_virtnet import (
    BOOT_TIMEOUT,
    MISSING,
    HostTransfer,
    Lab,
    describe,
    lab,
    transfer_script,
)

from virtnet.net.features import VirtioNetF
from virtnet.virtio.features import VirtioF, has

lab_fixture = lab  # test_qemu_virtnet's fixture, by the name the tests ask for
del lab

# A guest boot, iperf3 on two queue pairs both ways (3 * BOOT_TIMEOUT to power off).
pytestmark = [
    pytest.mark.peer,
    pytest.mark.timeout(900),
    pytest.mark.needs(MISSING),
    pytest.mark.needs(None if shutil.which("iperf3") else "iperf3 not installed"),
    pytest.mark.needs(None if shutil.which("ethtool") else "ethtool not installed "
                      "(apt-get install ethtool)"),
]  # fmt: skip

QUEUES = 2
KIB = 4096
PAIR_RUNNING = re.compile(r"device running: queue pair (\d+), queue sizes \d+/\d+, "
                          r"bases \((\d+), (\d+)\)")  # fmt: skip
PAIR_STOPPED = re.compile(r"queue pair (\d+) stopped: bases \((\d+), (\d+)\)")

# Per-queue counters as ethtool -S names them (virtio_net's virtnet_rq/sq_stats_desc).
GUEST_LIB = r"""
vn_queues_stats() {  # vn_queues_stats KEY: results KEY_rx_queue_0_packets ...
    ethtool -S eth0 | tr -d ' \t' | grep -E '^[rt]x_queue_[0-9]+_(packets|bytes):' |
        while IFS=: read k v; do vn_result "$1_$k" "$v"; done
}
vn_iperf3_per_cpu() {  # vn_iperf3_per_cpu KEY SECONDS [args]: a client pinned to each CPU
    key=$1; secs=$2; shift 2
    taskset -c 0 iperf3 -c $PEER -p 5201 -t $secs "$@" > /tmp/$key.cpu0 2>&1 &
    pid=$!
    taskset -c 1 iperf3 -c $PEER -p 5202 -t $secs "$@" > /tmp/$key.cpu1 2>&1
    vn_result ${key}_cpu1_rc $?
    wait $pid
    vn_result ${key}_cpu0_rc $?
    cat /tmp/$key.cpu0 /tmp/$key.cpu1 | grep -E 'sender|receiver'
}
vn_combined() {  # vn_combined KEY: the current "Combined:" of ethtool -l
    vn_result "$1" "$(ethtool -l eth0 | sed -n 's/^Combined:[[:space:]]*//p' | tail -1)"
}
"""

SCRIPT = f"""
vn_wait_peer $PEER || exit 1
vn_result online_cpus "$(cat /sys/devices/system/cpu/online)"
vn_combined combined_start
vn_iperf3_per_cpu up 2 -P 2
vn_iperf3_per_cpu down 2 -P 2 -R
vn_queues_stats both
ethtool -L eth0 combined 1 && vn_result set1 ok
vn_combined combined_one
vn_result phase one_pair
vn_ping $PEER 20 onepair
vn_iperf3_per_cpu oneup 1 -P 2
vn_queues_stats one
ethtool -L eth0 combined 2 && vn_result set2 ok
vn_combined combined_two
vn_wait_peer $PEER || exit 1
vn_iperf3_per_cpu againup 2 -P 2
vn_iperf3_per_cpu againdown 2 -P 2 -R
{transfer_script(KIB)}
vn_queues_stats end
"""


def _queue_stats(results: dict[str, str], key: str) -> dict[str, int]:
    pre = f"{key}_"
    return {k[len(pre) :]: int(v) for k, v in results.items() if k.startswith(pre)}


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_two_queue_pairs_with_a_linux_guest(lab_fixture: Callable[..., Lab], packed: bool) -> None:
    net = lab_fixture(queues=QUEUES)
    dev = net.device(extra=("--queues", str(QUEUES)))
    xfer = HostTransfer(net, KIB)
    net.iperf3_server(5201)
    net.iperf3_server(5202)
    opts = NetDeviceOptions(packed=packed, extra={"mq": "on"})
    with net.guest(GUEST_LIB + SCRIPT, binaries=["iperf3", "ethtool"], smp=2,
                   script_timeout=240, queues=QUEUES, device=opts) as vm:  # fmt: skip
        xfer.push_download(vm, timeout=BOOT_TIMEOUT)
        run = vm.wait_exit(3 * BOOT_TIMEOUT)
    assert dev.stop() == 0, dev.log()
    log = dev.log()
    assert run.rc == 0 and not run.errors, describe(run, log)
    r = run.results
    assert run.features is not None and has(run.features, VirtioNetF.MQ), describe(run)
    assert has(run.features, VirtioNetF.CTRL_VQ), describe(run)
    assert has(run.features, VirtioF.RING_PACKED) == packed, describe(run)
    # the guest dropped nothing it received (packed rings once published a mergeable
    # packet's head before its other buffers: "rx error: 6 buffers out of 16 missing")
    assert r["eth0_rx_dropped"] == "0" and r["eth0_rx_errors"] == "0", describe(run, log)
    assert r["online_cpus"] == "0-1", describe(run)
    assert (r["combined_start"], r["combined_one"], r["combined_two"]) == ("2", "1", "2"), r
    assert r["set1"] == "ok" and r["set2"] == "ok", describe(run, log)
    for key in ("up", "down", "oneup", "againup", "againdown"):
        for cpu in (0, 1):
            assert r.get(f"{key}_cpu{cpu}_rc") == "0", describe(run, log)
    assert r["onepair_received"] == "20", describe(run, log)
    xfer.check(run)

    # both pairs ran, pair 1 was started again after combined 1 -> 2, where it had stopped
    starts = [(int(p), int(rx), int(tx)) for p, rx, tx in PAIR_RUNNING.findall(log)]
    pair1 = [(rx, tx) for p, rx, tx in starts if p == 1]
    assert any(p == 0 for p, _, _ in starts), log
    assert len(pair1) >= 2, log
    # A restart continues the rings: pair 1 starts again from the bases it stopped at (a
    # packed base of 0 is index 0 in wrap 0, a ring that went round, not a fresh one).
    last_start = log.rindex("device running: queue pair 1,")
    stops = re.findall(r"queue pair 1 stopped: bases \((\d+), (\d+)\)", log[:last_start])
    assert stops and pair1[-1] == (int(stops[-1][0]), int(stops[-1][1])), log
    # ethtool -L 1: QEMU disables rings 2 and 3 (SET_VRING_ENABLE 0), the device stops
    # the pair and keeps where it stopped, which is where the restart continues
    stopped = PAIR_STOPPED.findall(log)
    assert (str(pair1[-1][0]), str(pair1[-1][1])) in [(rx, tx) for p, rx, tx in stopped
                                                      if p == "1"], log  # fmt: skip

    st = dev.stats()["device_stats"]
    assert st["desc_errors"] == 0, st
    both, one, end = (_queue_stats(r, k) for k in ("both", "one", "end"))
    for p in range(QUEUES):
        for side in ("rx", "tx"):
            # the guest saw traffic on both queues each way
            assert both[f"{side}_queue_{p}_packets"] > 0, both
            # the device counts what the guest counts, plus what crossed after ethtool -S
            # read (the guest's last ACKs, IPv6 neighbour discovery)
            name = f"{side}_queue_{p}_packets"
            assert st[name] >= end[name], (name, st, end)
            assert st[name] - end[name] <= 64, (name, st, end)
    for side in ("rx", "tx"):
        # with one pair, ethtool -S shows queue 0 only, and it carried the traffic ...
        assert f"{side}_queue_1_packets" not in one, one
        assert one[f"{side}_queue_0_packets"] > both[f"{side}_queue_0_packets"], (one, both)
        # ... and pair 1 carried traffic again once re-enabled
        assert end[f"{side}_queue_1_packets"] > both[f"{side}_queue_1_packets"], (end, both)
    print(f"\nguest ethtool -S (end): {end}\ndevice: "
          f"{ {k: v for k, v in st.items() if '_queue_' in k and k.endswith('packets')} }")
