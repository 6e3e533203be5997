"""Showing virtnet's counters: ``virtnet stats FILE`` and the live rate line.

The counters themselves are net/stats.py's (ethtool -S names, ``rx_queue_N_*`` per queue);
this is only how a person reads them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable


def print_stats_file(path: str) -> int:
    """``virtnet stats FILE``: every counter block of a --json file, ethtool -S style."""
    from rich.console import Console
    from rich.table import Table

    try:
        doc = json.loads(open(path).read())
    except (OSError, ValueError) as e:
        print(f"virtnet stats: cannot read {path}: {e}", file=sys.stderr)
        return 2
    blocks = []
    for key in ("driver_stats", "device_stats"):
        if key in doc:
            blocks.append((key, doc[key]))
    for i, r in enumerate(doc.get("results", [])):
        label = f"{r.get('strategy')} {r.get('direction')} {r.get('payload')}B"
        for key in ("driver_stats", "device_stats"):
            if key in r:
                blocks.append((f"[{i}] {label} {key}", r[key]))
    if not blocks:
        print(f"virtnet stats: {path} has no driver_stats/device_stats", file=sys.stderr)
        return 2
    console = Console()
    for title, stats in blocks:
        per_queue = split_per_queue(stats)
        table = Table(title=title)
        table.add_column("counter")
        table.add_column("value", justify="right")
        for k, v in stats.items():
            if not QUEUE_STAT.match(k):
                table.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
        console.print(table)
        if per_queue:
            console.print(per_queue_table(f"{title} per queue", per_queue))
    return 0


QUEUE_STAT = re.compile(r"(rx|tx)_queue_(\d+)_(.+)")


def split_per_queue(stats: dict) -> dict[str, dict[int, int]]:
    """``rx_queue_1_packets`` → {"rx_packets": {1: n}}: the per-queue counters by name."""
    out: dict[str, dict[int, int]] = {}
    for k, v in stats.items():
        m = QUEUE_STAT.match(k)
        if m:
            side, q, name = m.groups()
            out.setdefault(f"{side}_{name}", {})[int(q)] = v
    return out


def per_queue_table(title: str, per_queue: dict[str, dict[int, int]]):
    """One row per counter, one column per queue: ``ethtool -S`` read across."""
    from rich.table import Table

    queues = sorted({q for by_q in per_queue.values() for q in by_q})
    table = Table(title=title)
    table.add_column("counter")
    for q in queues:
        table.add_column(f"queue {q}", justify="right")
    for name, by_q in per_queue.items():
        if any(by_q.values()):
            table.add_row(name, *(f"{by_q.get(q, 0):,}" for q in queues))
    return table


def rate_printer(quiet: bool) -> Callable[[dict], None] | None:
    """The once-a-second line of ``virtnet device`` / ``driver`` (None with --quiet): rates
    since the last call and totals, and each queue's share with more than one pair."""
    if quiet:
        return None
    last: dict[str, int] = {}

    def show(stats: dict) -> None:
        s = stats.get("driver_stats") or stats.get("device_stats") or {}
        now = {k: s.get(k, 0) for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")}
        d = {k: now[k] - last.get(k, 0) for k in now}
        last.update(now)
        per_queue = split_per_queue(s)
        queues = ""
        if len(per_queue.get("rx_packets", {})) > 1:  # --queues N: each pair's share
            now_q = {f"{side}{q}": n for side in ("rx", "tx")
                     for q, n in per_queue.get(f"{side}_packets", {}).items()}  # fmt: skip
            queues = " | pps per queue " + " ".join(
                f"{k} {n - last.get(k, 0):,}" for k, n in sorted(now_q.items()))
            last.update(now_q)
        print(
            f"rx {d['rx_packets']:>9,} pps {d['rx_bytes'] * 8 / 1e6:>9,.1f} Mb/s | "
            f"tx {d['tx_packets']:>9,} pps {d['tx_bytes'] * 8 / 1e6:>9,.1f} Mb/s | "
            f"total rx {now['rx_packets']:,} tx {now['tx_packets']:,}{queues}",
            file=sys.stderr, flush=True,
        )  # fmt: skip

    return show
