"""Runs a list of bench cases with a progress bar and collects their records."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from virtnet.bench.embedded import Case, run_case


class Labelled(Protocol):
    """A case ``run_cases`` can run: an in-process ``Case`` or a ``TapCase``."""

    def label(self) -> str: ...


def machine_description() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def cpu_ticks() -> tuple[int, int] | None:
    """The machine's (busy, total) CPU ticks, all cores (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of all cores busy between two ``cpu_ticks()`` (1.0: every core, all
    the time), whoever used them: iperf3 and the kernel's TCP too, not virtnet alone."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 3)


def _progress(console: Console | None, rate_width: int) -> Progress:
    """One bar a task: its label, the bar, its rate (a field ``rate_width`` wide), time left."""
    columns = (
        TextColumn("{task.description:<40}"),
        BarColumn(),
        TextColumn(f"{{task.fields[rate]:>{rate_width}}}"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console or Console(stderr=True), transient=False)


def run_groups(
    groups: list[list[Case]],
    console: Console | None = None,
    group_runner: Callable[..., list[dict]] | None = None,
) -> list[dict]:
    """Run each group of cases side by side (``run_interleaved`` or another), with progress."""
    from virtnet.bench.embedded import run_interleaved

    run: Callable[..., list[dict]] = group_runner or run_interleaved
    results = []
    with _progress(console, rate_width=24) as progress:
        for group in groups:
            c = group[0]
            label = f"{c.direction} {c.payload}B: " + " vs ".join(
                dict.fromkeys(x.strategy for x in group))
            task = progress.add_task(label, total=1.0, rate="")
            recs = run(group, tick=lambda f, t=task: progress.update(t, completed=f))
            rate = " / ".join(f"{r['gbps'] * 1000:,.0f}" for r in recs) + " Mb/s"
            progress.update(task, completed=1.0, rate=rate)
            results += recs
    return results


def run_cases(
    cases: Iterable[Labelled],
    runner: Callable[..., dict] = run_case,
    console: Console | None = None,
) -> list[dict]:
    cases = list(cases)
    results = []
    with _progress(console, rate_width=14) as progress:
        overall = progress.add_task("all cases", total=len(cases), rate="")
        for case in cases:
            task = progress.add_task(case.label(), total=1.0, rate="")
            result = runner(case, tick=lambda f, t=task: progress.update(t, completed=f))
            rate = f"{result['gbps'] * 1000:,.0f} Mb/s"
            progress.update(task, completed=1.0, rate=rate)
            progress.advance(overall)
            results.append(result)
    return results
