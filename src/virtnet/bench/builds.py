"""``virtnet bench --build pure,compiled``: the same cases on both builds, taking turns.

One install holds both builds (``virtnet/_build.py``): its compiled data plane, and
the same modules as plain Python, which ``VIRTNET_PURE=1`` makes a process import.
A process runs one build only, from its first import to its exit, so the builds
meet in child processes, each started with or without ``VIRTNET_PURE=1``:

- ``--mode vhost-user`` and ``--tap`` already run ``virtnet device`` and ``virtnet
  driver`` as processes per turn or case: a case's build only sets their
  environment, and the builds take turns like the strategies.
- ``--mode inproc`` runs a group's cases (its strategies, interleaved in 50 ms
  slices) in one child per build, ``TURN`` seconds of each case at a time, the
  builds alternating: pure, compiled, pure, compiled ... until every case has had
  its ``--seconds``. Shorter turns would make each child's start (imports, rings
  filled, page pools grown) a larger share of what it measures; the strategies
  still share one process and so stay interleaved as finely as without --build.
  Count-based cases (``--packets``) run their count in one child per build.

Every record says the build that ran it (``build_name()`` of the process that
moved the packets); a child that did not load the build asked for fails the run
rather than measure the other one under its name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, replace

from virtnet._build import PURE, PURE_ENV, build_name, describe, read_info
from virtnet.bench.embedded import Case, run_interleaved

PURE_TAG, COMPILED_TAG = "pure", "compiled"
BUILDS = (PURE_TAG, COMPILED_TAG)
TURN = 1.0  # seconds of each in-process case per child (--mode vhost-user's turn, too)
NO_COMPILER = "pip install . on a machine with a C compiler and python3-dev"


class BuildError(RuntimeError):
    """A child that ran another build than the one asked for, or failed."""


def tag_of(label: str) -> str:
    """``pure`` or ``compiled`` for a ``build_name()`` label."""
    return PURE_TAG if label == PURE else COMPILED_TAG


def unavailable(tag: str) -> str | None:
    """Why this install cannot run build ``tag`` in a child, or None."""
    if tag != COMPILED_TAG:
        return None
    if read_info() is None:
        return f"this install is pure Python: {NO_COMPILER}"
    if os.environ.get(PURE_ENV) == "1":
        return f"{PURE_ENV}=1 is set in the environment: unset it to run the compiled build"
    if build_name() == PURE:  # compiled, but its modules stale or not importable
        return f"the compiled modules do not load ({describe()}): rebuild with pip install ."
    return None


def child_env(tag: str) -> dict[str, str] | None:
    """The environment of a process running build ``tag`` ("": this process's own)."""
    if not tag:
        return None
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    if tag == PURE_TAG:
        env[PURE_ENV] = "1"
    return env


def check(tag: str, label: str) -> None:
    """Refuse a measurement that ran another build than ``tag`` asked for."""
    if tag and tag_of(label) != tag:
        raise BuildError(f"asked for the {tag} build, the child ran {label!r}")


def processes_build(tag: str, driver: dict, device: dict) -> str | None:
    """The build that a ``virtnet driver`` and ``virtnet device`` ran (their --json's
    "build"), held to be one and the one asked for; None when neither wrote its JSON."""
    labels = {d["build"] for d in (driver, device) if "build" in d}
    if len(labels) > 1:
        raise BuildError(f"the driver ran {driver['build']!r}, the device {device['build']!r}")
    label = labels.pop() if labels else None
    if label is not None:
        check(tag, label)
    return label


def _child(request: dict, tag: str) -> dict:
    """Run ``request`` (see ``child_main``) in a child of build ``tag``; its JSON answer."""
    proc = subprocess.run([sys.executable, "-m", "virtnet.bench.builds"],
                          input=json.dumps(request), capture_output=True, text=True,
                          env=child_env(tag), check=False)  # fmt: skip
    if proc.returncode != 0:
        raise BuildError(f"the {tag} child failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    answer = json.loads(proc.stdout)
    check(tag, answer["build"])
    return answer


def run_inproc_group(cases: list[Case], tick: Callable[[float], None] | None = None) -> list[dict]:
    """Each case's ``seconds`` in TURN-second turns, one child per build and turn, the
    builds alternating; a case's records of all its turns summed into one."""
    builds = list(dict.fromkeys(c.build for c in cases))
    done = [0.0] * len(cases)
    total = sum(c.seconds for c in cases)
    acc: list[dict | None] = [None] * len(cases)
    while any(done[i] < c.seconds for i, c in enumerate(cases)):
        for tag in builds:
            mine = [i for i, c in enumerate(cases) if c.build == tag and done[i] < c.seconds]
            if not mine:
                continue
            # A count-based case runs its count in one turn (its seconds are not used).
            turn = {i: cases[i].seconds if cases[i].packets
                    else min(TURN, cases[i].seconds - done[i]) for i in mine}  # fmt: skip
            request = {"cases": [asdict(replace(cases[i], seconds=turn[i])) for i in mine]}
            for i, rec in zip(mine, _child(request, tag)["records"], strict=True):
                prev = acc[i]
                acc[i] = rec if prev is None else merge(prev, rec)
                done[i] += turn[i]
            if tick is not None:
                tick(min(1.0, sum(done) / total))
    return [a for a in acc if a is not None]


def merge(a: dict, b: dict) -> dict:
    """Two in-process records of one case (two turns) as one: counts summed, rates anew."""
    out = dict(a)
    for k in ("seconds", "packets", "bytes", "acks", "cpu_seconds"):
        out[k] = round(a[k] + b[k], 4) if isinstance(a[k], float) else a[k] + b[k]
    out["gbps"] = out["bytes"] * 8 / out["seconds"] / 1e9
    out["pps"] = out["packets"] / out["seconds"]
    ia, ib = a["integrity"], b["integrity"]
    out["integrity"] = {k: ia[k] + ib[k] for k in ia}  # the counts, and the messages joined
    for key in ("driver_stats", "device_stats"):
        sa, sb = a[key], b[key]
        out[key] = {k: max(v, sb.get(k, 0)) if k.endswith("_max") else v + sb.get(k, 0)
                    for k, v in sa.items()}  # fmt: skip
    return out


def round_trip(strategy: str, queue_size: int, tag: str) -> dict:
    """``rtt.round_trip`` in a child of build ``tag`` (its driver runs in that process)."""
    return _child({"round_trip": [strategy, queue_size]}, tag)["round_trip"]


def child_main() -> int:
    """The child: a JSON request on stdin, a JSON answer (with its build) on stdout."""
    request = json.load(sys.stdin)
    answer: dict = {"build": build_name()}
    if "cases" in request:
        answer["records"] = run_interleaved([Case(**c) for c in request["cases"]])
    else:
        from virtnet.bench.rtt import round_trip as rtt

        strategy, queue_size = request["round_trip"]
        answer["round_trip"] = rtt(strategy, queue_size)
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
