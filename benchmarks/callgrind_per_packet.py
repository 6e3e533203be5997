"""Instructions per packet of the in-process bench, counted by valgrind's callgrind.

These VMs have no hardware counters (``perf stat -e instructions``: not supported), and
under valgrind a timed run is mostly set-up. So every case runs count-based (the code of
``virtnet bench --packets N``) twice under ``valgrind --tool=callgrind``, with a small and
a large count; the difference of the two instruction totals over the difference of the
counts is the steady-state cost of one packet, both sides (driver + device) together —
start-up, imports and ring set-up cancel out (the child exits without tearing down).
Callgrind counts do not depend on the machine's load, so the figures are comparable
between runs on a busy machine.

    python benchmarks/callgrind_per_packet.py                      # the full table
    python benchmarks/callgrind_per_packet.py --payloads 64 --json ipp.json
    python benchmarks/callgrind_per_packet.py --counts 64=2000:12000,65536=200:1200
    python benchmarks/callgrind_per_packet.py --build pure,compiled --payloads 64

``--build pure,compiled`` counts every case on both builds of one install (its children
started with VIRTNET_PURE=1, or without), one table per build and one of compiled / pure;
each child says which build it ran, and a child that ran another than asked fails the run.

Each case runs in a process of its own with PYTHONHASHSEED=0, without the bench's
progress bar (its refresh thread runs per wall-clock tick, which under valgrind would add
a count that depends on how slow the run was). Needs valgrind (apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich only in the parent: the child under valgrind imports the least
    from rich.console import Console
    from rich.table import Table

DIRECTIONS = ("host-to-guest", "guest-to-host")
# Small and large packet count per frame size: the small one is past the warm-up (rings
# and page pools at their steady state, several ring wraps), the difference large enough
# that the few thousand instructions a run varies by are < 1 per packet.
DEFAULT_COUNTS = {64: (2000, 12000), 1500: (2000, 12000), 65536: (300, 1300)}
LARGE_FRAME_COUNTS = (300, 1300)  # any size not in DEFAULT_COUNTS above 1500 bytes
WARM_RINGS = 2  # the small count is at least this many ring sizes: past the first fill
_TOTALS = re.compile(r"^totals:\s+(\d+)", re.M)


@dataclass(frozen=True)
class Config:
    strategy: str
    direction: str
    payload: int
    queue_size: int
    build: str = ""  # "pure" or "compiled": the child's (virtnet.bench.builds); "": as ours
    ring: str = "split"  # the ring layout both sides use (bench --ring)

    def label(self) -> str:
        build = f" {self.build}" if self.build else ""
        return (f"{self.strategy} {self.direction} {self.payload}B q{self.queue_size} "
                f"{self.ring}{build}")  # fmt: skip


@dataclass
class Measure:
    config: Config
    counts: tuple[int, int]
    totals: tuple[int, int]
    build: str = ""  # the build the children ran, as they said (build_name())

    @property
    def per_packet(self) -> float:
        (n1, n2), (i1, i2) = self.counts, self.totals
        return (i2 - i1) / (n2 - n1)

    @property
    def fixed(self) -> float:
        """Instructions not proportional to the count: start-up, set-up, teardown."""
        return self.totals[0] - self.per_packet * self.counts[0]

    def as_dict(self) -> dict:
        return asdict(self.config) | {
            "build": self.build,
            "counts": list(self.counts),
            "instructions": list(self.totals),
            "instructions_per_packet": round(self.per_packet, 1),
            "fixed_instructions": round(self.fixed),
        }


def counts_for(
    payload: int, queue_size: int, overrides: dict[int, tuple[int, int]]
) -> tuple[int, int]:
    """(small, large): the small count past the ring's first fill (a 4096-entry ring's
    first 4096 frames need no refill), the span between them kept."""
    if payload in overrides:
        return overrides[payload]
    n1, n2 = DEFAULT_COUNTS.get(payload) or (
        DEFAULT_COUNTS[1500] if payload <= 1500 else LARGE_FRAME_COUNTS)
    buffers = payload // 4096 + 1  # ring entries a frame takes (mergeable, 4 KiB pages)
    shift = max(0, -(-WARM_RINGS * queue_size // buffers) - n1)
    return n1 + shift, n2 + shift


def run_one(config: Config, packets: int, workdir: str) -> tuple[int, str]:
    """One count-based case under callgrind; returns its instruction total and the
    build the child ran."""
    from virtnet.bench.builds import check, child_env

    tag = (f"{config.strategy}-{config.direction}-{config.payload}-{config.queue_size}-"
           f"{packets}-{config.build}-{config.ring}")  # fmt: skip
    out = os.path.join(workdir, f"callgrind.{tag}")
    argv = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--one", config.strategy, config.direction,
        str(config.payload), str(config.queue_size), str(packets), config.ring,
    ]  # fmt: skip
    env = (child_env(config.build) or dict(os.environ)) | {"PYTHONHASHSEED": "0"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{config.label()} x{packets}: exit {proc.returncode}\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")  # fmt: skip
    lines = proc.stdout.splitlines()
    if lines[-1:] != [str(packets)] or len(lines) < 2:
        raise RuntimeError(f"{config.label()}: asked for {packets} frames, got {proc.stdout!r}")
    build = lines[-2]
    check(config.build, build)
    text = Path(out).read_text(errors="replace")
    os.unlink(out)
    match = _TOTALS.search(text)
    if match is None:
        raise RuntimeError(f"{config.label()}: no totals line in {out}")
    return int(match.group(1)), build


def one(strategy: str, direction: str, payload: int, queue_size: int, packets: int,
        ring: str = "split") -> int:
    """The child: one count-based case, every frame checked; prints its build (a line of
    its own), then the frames received.

    The steps are the bench's (``EmbeddedRun.step`` until ``done``), without the timing
    slices and without the teardown: the process exits with its rings. Tearing down a
    4096-entry ring costs up to ~10⁹ instructions depending on how many buffers are
    posted at the moment the count is reached, which would swamp the difference;
    teardown is checked by the tests (every page back), not counted here.
    """
    from virtnet.bench.embedded import Case, EmbeddedRun

    run = EmbeddedRun(Case(strategy, direction, payload, queue_size=queue_size,
                           packets=packets, ring=ring))  # fmt: skip
    sink = run.sink.stats
    while not run.done(0.0):
        before = sink.packets
        for _ in range(16):
            run.step()
        if sink.packets == before:
            print(f"stalled at {before} of {packets} frames", file=sys.stderr)
            return 1
    bad = {k: n for k, n in sink.counts().items() if n}
    if bad:
        print(f"integrity: {bad} {sink.errors}", file=sys.stderr)
        return 1
    from virtnet._build import build_name

    print(build_name(), sink.packets, sep="\n", flush=True)
    os._exit(0)  # no teardown, no interpreter shutdown: neither is per-packet work


def measure(configs: list[Config], overrides: dict, jobs: int, console: Console) -> list[Measure]:
    runs = [(c, n) for c in configs for n in counts_for(c.payload, c.queue_size, overrides)]
    totals: dict[tuple[Config, int], tuple[int, str]] = {}
    with tempfile.TemporaryDirectory(prefix="vn-callgrind-") as tmp, \
            ThreadPoolExecutor(max_workers=jobs) as pool:  # fmt: skip
        futures = {pool.submit(run_one, c, n, tmp): (c, n) for c, n in runs}
        with console.status(f"callgrind: {len(runs)} runs") as status:
            for i, (fut, key) in enumerate(futures.items(), 1):
                totals[key] = fut.result()
                status.update(f"callgrind: {i}/{len(runs)} runs ({key[0].label()})")
    out = []
    for c in configs:
        n1, n2 = counts_for(c.payload, c.queue_size, overrides)
        (i1, b1), (i2, b2) = totals[c, n1], totals[c, n2]
        out.append(Measure(c, (n1, n2), (i1, i2), b1 if b1 == b2 else f"{b1} / {b2}"))
    return out


def table(measures: list[Measure], title: str) -> Table:
    from rich.table import Table

    queues = sorted({m.config.queue_size for m in measures})
    t = Table(title=title)
    for name in ("direction", "frame", "strategy"):
        t.add_column(name, justify="right" if name == "frame" else "left")
    for q in queues:
        t.add_column(f"queue {q} instr/pkt", justify="right")
    if len(queues) > 1:
        t.add_column(f"{queues[-1]} / {queues[0]}", justify="right")
    by = {(m.config.direction, m.config.payload, m.config.strategy, m.config.queue_size): m
          for m in measures}  # fmt: skip
    for d, p, s in sorted({k[:3] for k in by}, key=lambda k: (DIRECTIONS.index(k[0]), *k[1:])):
        row = [d, f"{p}B", s]
        vals = [by[d, p, s, q].per_packet if (d, p, s, q) in by else None for q in queues]
        row += [f"{v:,.0f}" if v is not None else "-" for v in vals]
        if len(queues) > 1:
            ok = vals[0] and vals[-1] is not None
            row.append(f"{vals[-1] / vals[0]:.2f}x" if ok else "-")
        t.add_row(*row)
    return t


def build_table(measures: list[Measure], title: str) -> Table:
    """Each case's instructions per packet on both builds, and compiled / pure."""
    from rich.table import Table

    queues = sorted({m.config.queue_size for m in measures})
    t = Table(title=title)
    for name in ("direction", "frame", "strategy"):
        t.add_column(name, justify="right" if name == "frame" else "left")
    for q in queues:
        for head in (f"queue {q} pure", f"queue {q} compiled", "compiled/pure"):
            t.add_column(head, justify="right")
    by = {(m.config.direction, m.config.payload, m.config.strategy, m.config.queue_size,
           m.config.build): m.per_packet for m in measures}  # fmt: skip
    for d, p, s in sorted({k[:3] for k in by}, key=lambda k: (DIRECTIONS.index(k[0]), *k[1:])):
        row = [d, f"{p}B", s]
        for q in queues:
            pure, comp = by.get((d, p, s, q, "pure")), by.get((d, p, s, q, "compiled"))
            row += [f"{v:,.0f}" if v is not None else "-" for v in (pure, comp)]
            row.append(f"{comp / pure:.2f}x" if pure and comp is not None else "-")
        t.add_row(*row)
    return t


def _counts_arg(text: str) -> dict[int, tuple[int, int]]:
    out = {}
    try:
        for item in filter(None, text.split(",")):
            size, pair = item.split("=")
            n1, n2 = (int(x) for x in pair.split(":"))
            if not 0 < n1 < n2:
                raise ValueError
            out[int(size)] = (n1, n2)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want SIZE=SMALL:LARGE[,...] with 0 < SMALL < LARGE") from None
    return out


def _list(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        s, d, p, q, n = argv[1:6]
        return one(s, d, int(p), int(q), int(n), *argv[6:7])
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", type=_list(str), default=["prealloc", "deferred"])
    ap.add_argument("--directions", type=_list(str), default=list(DIRECTIONS))
    ap.add_argument("--payloads", type=_list(int), default=[64, 1500, 65536])
    ap.add_argument("--queue-sizes", type=_list(int), default=[256, 4096],
                    help="virtqueue sizes; the cost per packet should not depend on it")
    ap.add_argument("--counts", type=_counts_arg, default={}, metavar="SIZE=N1:N2,...",
                    help="packet counts per frame size (default 64/1500: 2000:12000, "
                         "65536: 300:1300)")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=1,
                    help="valgrind processes at once (counts do not depend on it)")
    ap.add_argument("--ring", choices=("split", "packed"), default="split",
                    help="ring layout of every case (default split, the counts' history; "
                         "the bench and both ends negotiate packed)")
    ap.add_argument("--json", metavar="FILE", help="write every total and figure as JSON")
    ap.add_argument("--build", type=_list(str), default=None, metavar="pure,compiled",
                    help="count every case on these builds of this install, in children "
                         "started with VIRTNET_PURE=1 (pure) or without (compiled); a table "
                         "per build and one of compiled / pure (default: the running build)")
    args = ap.parse_args(argv)
    from virtnet.bench.builds import BUILDS, unavailable

    builds = list(dict.fromkeys(args.build or []))
    for tag in builds:
        why = f"choose from {', '.join(BUILDS)}" if tag not in BUILDS else unavailable(tag)
        if why:
            print(f"--build {tag}: {why}", file=sys.stderr)
            return 2
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install valgrind", file=sys.stderr)
        return 2
    bad = [d for d in args.directions if d not in DIRECTIONS]
    if bad or args.jobs < 1:
        print(f"bad --directions {bad} or --jobs {args.jobs}", file=sys.stderr)
        return 2
    from rich.console import Console

    configs = [Config(s, d, p, q, b, args.ring) for d in args.directions for p in args.payloads
               for s in args.strategies for q in args.queue_sizes
               for b in builds or [""]]  # fmt: skip
    console = Console(width=None if sys.stdout.isatty() else 120)
    measures = measure(configs, args.counts, args.jobs, Console(stderr=True))
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True).stdout.strip()  # fmt: skip
    title = (f"instructions per packet (callgrind, in-process, driver + device, {args.ring} "
             f"rings) — commit {commit or '?'}, Python {platform.python_version()}")  # fmt: skip
    for tag in builds or [""]:  # a table per build, its name (as the children said) in the title
        mine = [m for m in measures if m.config.build == tag]
        names = ", ".join(dict.fromkeys(m.build for m in mine))
        console.print(table(mine, f"{title}, {names}"))
    if len(builds) > 1:
        console.print(build_table(measures, "instructions per packet, compiled / pure"))
    if args.json:
        doc = {"meta": {"commit": commit, "python": platform.python_version(),
                        "argv": argv}, "results": [m.as_dict() for m in measures]}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
