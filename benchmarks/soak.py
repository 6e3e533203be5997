"""The soak run of issue 20: a QEMU guest moves TCP both ways through ``virtnet device``
while the device is killed and restarted every 30-60 s, on split and packed rings.

    sudo python benchmarks/soak.py --minutes 10

It runs tests/peers/test_soak.py (the 2-minute version is part of the suite) for the
given time and prints, per ring kind, the restarts survived, the bytes moved each way, the
longest stretch with no byte on the tap and the guest's kernel errors. Needs root, QEMU,
the Debian kernel, busybox-static and iperf3, as the suite's peer tests do.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="per ring kind (default 10)")
    ap.add_argument("--ring", choices=("split", "packed"), action="append",
                    help="only this ring kind (repeatable; default both)")
    args = ap.parse_args(argv)
    if args.minutes <= 0:
        ap.error("--minutes must be > 0")
    env = dict(os.environ, VIRTNET_SOAK_SECONDS=str(int(args.minutes * 60)))
    argv_pytest = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                   str(ROOT / "tests" / "peers" / "test_soak.py")]
    if args.ring:
        argv_pytest += ["-k", " or ".join(args.ring)]
    done = subprocess.run(argv_pytest, env=env, cwd=ROOT, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("soak ") or "passed" in line or "failed" in line:
            print(line)
    if done.returncode:
        print(done.stdout[-6000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
