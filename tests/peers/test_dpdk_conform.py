"""``virtnet conform`` against DPDK testpmd's ``net_vhost`` (testpmd as the back-end).

testpmd forwards in ``io`` mode on its one port: what our tx ring carries comes back on our
rx ring unchanged -- the loopback the conformance cases need; with ``queues=2`` (and
``--rxq=2 --txq=2``) each queue pair forwards to itself. The run must reach its end with a
result for every case; whether DPDK passes is what docs/conformance.md reports, not what
this asserts -- except for the multiqueue cases, whose results on DPDK 22.11 are pinned in
``MQ_EXPECTED``. When a case kills testpmd, a fresh testpmd takes the cases not yet run, so
every case gets a result of its own (the table is printed with ``-s``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dpdk import VhostPort

from virtnet.conform.cases import CASES, expand

# Every case against testpmd, restarted after each death, each run bounded by RUN_TIMEOUT.
pytestmark = [pytest.mark.peer, pytest.mark.timeout(1800)]

RUN_TIMEOUT = 600
CASE_TIMEOUT = "15"


def _conform(sock: Path, out: Path, cases: list[str]) -> tuple[int, dict, str]:
    argv = [sys.executable, "-m", "virtnet", "conform", str(sock), "--json", str(out),
            "--timeout", CASE_TIMEOUT]  # fmt: skip
    for name in cases:
        argv += ["--case", name]
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=RUN_TIMEOUT)  # fmt: skip
    return done.returncode, json.loads(out.read_text()), done.stdout + done.stderr


# What DPDK 22.11's net_vhost does with the multiqueue cases, by its queues= devarg. Its
# vhost library answers GET_QUEUE_NUM with 128 (VHOST_MAX_QUEUE_PAIRS) whatever queues= says,
# so with queues=1 pair 1 is set up, acked and never served: mq-pairs fails there.
MQ_EXPECTED = {
    1: {"mq-pairs": "failed", "mq-enable-unset-ring": "passed"},
    2: {"mq-pairs": "passed", "mq-enable-unset-ring": "passed"},
}


@pytest.mark.parametrize("queues", [1, 2])
def test_conform_runs_to_the_end_against_testpmd_net_vhost(testpmd, sock_dir: Path,
                                                           tmp_path: Path,
                                                           queues: int) -> None:  # fmt: skip
    sock = sock_dir / "vhost.sock"
    every = [c.name for c in expand(CASES)]  # each data case on both rings, EVENT_IDX on/off
    remaining = list(every)
    results: dict[str, dict] = {}
    restarts = 0
    rxq_txq = [f"--rxq={queues}", f"--txq={queues}"]
    while remaining:
        pmd = testpmd(VhostPort(sock, queues=queues), forward_mode="io", extra_app=rxq_txq)
        rc, doc, out = _conform(sock, tmp_path / f"conform{restarts}.json", remaining)
        assert rc in (0, 1), out
        assert [c["name"] for c in doc["cases"]] == remaining, out
        for c in doc["cases"]:
            if c["status"] != "not run":
                results[c["name"]] = c
        remaining = [c["name"] for c in doc["cases"] if c["status"] == "not run"]
        died = any("the back-end died" in c["detail"] for c in doc["cases"])
        assert bool(remaining) == died, out  # "not run" only ever follows a death
        pmd.stop(check=False)
        assert not pmd.running()
        restarts += died
        assert restarts <= len(every)
    assert list(results) == every
    assert all(r["status"] in ("passed", "survived", "failed", "skipped", "not offered")
               for r in results.values())  # fmt: skip
    print(f"\nvirtnet conform against testpmd net_vhost queues={queues} ({restarts} restarts):")
    for name, r in results.items():
        print(f"  {r['status']:>7}  {name}: {r['detail']}")
    (tmp_path / "dpdk-conform.json").write_text(json.dumps(list(results.values()), indent=2))
    # A matrix case's expectation holds in each of its cells.
    got = {n: r["status"] for n, r in results.items() if r["case"] in MQ_EXPECTED[queues]}
    want = {n: MQ_EXPECTED[queues][results[n]["case"]] for n in got}
    assert got == want, {n: results[n]["detail"] for n in got}
    if queues == 1:
        for n in got:
            if results[n]["case"] == "mq-pairs":
                assert results[n]["detail"].startswith("pair 1: the back-end used 0 of 3 tx")


# The lifecycle cases with the roles on the socket reversed: conform listens (--server) and
# testpmd's net_vhost connects to it (client=1), connecting again after every session ends,
# as it would to a QEMU with server=on. DPDK's reconnect thread waits a second between tries,
# hence the longer case timeout (vanishing-frontends alone opens eleven sessions).
LIFECYCLE = ["guest-reboot", "reset-device", "reconnect", "vanishing-frontends",
             "stale-vring-base", "inflight-region"]  # fmt: skip


def test_lifecycle_cases_against_testpmd_connecting_as_a_client(testpmd, sock_dir: Path,
                                                               tmp_path: Path) -> None:  # fmt: skip
    sock = sock_dir / "conform.sock"
    out = tmp_path / "conform.json"
    argv = [sys.executable, "-m", "virtnet", "conform", str(sock), "--server", "--json",
            str(out), "--timeout", "40"]  # fmt: skip
    for name in LIFECYCLE:
        argv += ["--case", name]
    # testpmd first: with client=1 it connects at start-up, before it forwards, and retries
    # each second while nothing listens; conform's first session must find it forwarding.
    pmd = testpmd(VhostPort(sock, client=True), forward_mode="io")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        text, _ = proc.communicate(timeout=RUN_TIMEOUT)
        pmd.stop(check=False)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 1), text
    results = json.loads(out.read_text())["cases"]
    assert {r["case"] for r in results} == set(LIFECYCLE), text
    assert all(r["status"] != "not run" for r in results), text  # testpmd came back each time
    print("\nvirtnet conform --server against testpmd net_vhost client=1:")
    for r in results:
        print(f"  {r['status']:>7}  {r['name']}: {r['detail']}")
