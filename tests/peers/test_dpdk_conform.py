"""``virtnet conform`` against DPDK testpmd's ``net_vhost`` (testpmd as the back-end).

testpmd forwards in ``io`` mode on its one port: what our tx ring carries comes back on our
rx ring unchanged -- the loopback the conformance cases need. The run must reach its end
with a result for every case; whether DPDK passes is what docs/conformance.md reports, not
what this asserts. When a case kills testpmd, a fresh testpmd takes the cases not yet run,
so every case gets a result of its own (the table is printed with ``-s``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dpdk import VhostPort

from virtnet.conform.cases import CASES

pytestmark = pytest.mark.peer

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


def test_conform_runs_to_the_end_against_testpmd_net_vhost(testpmd, sock_dir: Path,
                                                           tmp_path: Path) -> None:  # fmt: skip
    sock = sock_dir / "vhost.sock"
    remaining = [c.name for c in CASES]
    results: dict[str, dict] = {}
    restarts = 0
    while remaining:
        pmd = testpmd(VhostPort(sock), forward_mode="io")
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
        assert restarts <= len(CASES)
    assert list(results) == [c.name for c in CASES]
    assert all(r["status"] in ("passed", "failed", "skipped") for r in results.values())
    print(f"\nvirtnet conform against testpmd net_vhost ({restarts} restarts):")
    for name, r in results.items():
        print(f"  {r['status']:>7}  {name}: {r['detail']}")
    (tmp_path / "dpdk-conform.json").write_text(json.dumps(list(results.values()), indent=2))
