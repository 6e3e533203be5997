"""What ``virtnet conform`` prints and writes: a rich table, JSON, JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence

from virtnet.conform.cases import Case
from virtnet.conform.runner import (
    FAILED,
    NOT_OFFERED,
    NOT_RUN,
    PASSED,
    SKIPPED,
    STATUSES,
    SURVIVED,
    Result,
)

STYLE = {PASSED: "green", SURVIVED: "cyan", FAILED: "bold red", SKIPPED: "yellow",
         NOT_OFFERED: "yellow", NOT_RUN: "dim"}  # fmt: skip
SURVIVED_NOTE = (
    "survived: the spec says nothing the back-end must answer to that case; it only "
    "checks that the back-end lives on (no crash, no hang, a normal session afterwards)."
)
NO_ECHO = (
    "No data case got a single frame back on rx: the data cases need a back-end that "
    "sends every frame it receives back (a loopback), not a sink. Start one with "
    "`virtnet device --socket-path P --backend loopback` and run `virtnet conform P`."
)


def hints(results: Sequence[Result]) -> list[str]:
    """What the run says about the set-up rather than the back-end: a back-end that
    echoes nothing (every case that waited for a frame got none)."""
    echoed = [r.echoed for r in results if r.echoed is not None]
    if echoed and not any(echoed):
        return [NO_ECHO]
    return []


def summary(results: Sequence[Result]) -> dict[str, int]:
    counts = Counter(r.status for r in results)
    return {s: counts.get(s, 0) for s in STATUSES}


def by_cell(results: Sequence[Result]) -> dict[str, dict[str, int]]:
    """The matrix cases' statuses per cell ("split/event-idx-on": {"passed": 9, ...})."""
    out: dict[str, Counter[str]] = {}
    for r in results:
        if r.ring is not None:
            cell = f"{r.ring}/event-idx-{'on' if r.event_idx else 'off'}"
            out.setdefault(cell, Counter())[r.status] += 1
    return {cell: {s: n for s, n in c.items()} for cell, c in out.items()}


def table(results: Sequence[Result], title: str):
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    t.add_column("case")
    t.add_column("group")
    t.add_column("result")
    t.add_column("s", justify="right")
    t.add_column("what the back-end did", overflow="fold")
    for r in results:
        t.add_row(r.name, r.group, f"[{STYLE[r.status]}]{r.status}[/]", f"{r.seconds:.1f}",
                  r.detail)  # fmt: skip
    counts = summary(results)
    t.caption = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    cellnote = "; ".join(f"{cell}: " + ", ".join(f"{n} {s}" for s, n in c.items())
                         for cell, c in by_cell(results).items())  # fmt: skip
    if cellnote:
        t.caption += f"\nmatrix cells: {cellnote}"
    notes = [f"hint: {h}" for h in hints(results)]
    if counts[SURVIVED]:
        notes.append(f"note: {SURVIVED_NOTE}")
    if not notes:
        return t
    from rich.console import Group
    from rich.text import Text

    return Group(t, *(Text(note, style="bold yellow") for note in notes))


def list_table(cases: Sequence[Case]):
    from rich.table import Table

    t = Table(title="virtnet conform cases")
    t.add_column("case")
    t.add_column("group")
    t.add_column("checks")
    t.add_column("what", overflow="fold")
    for c in cases:
        checks = "survival" if c.survive else "answer"
        if c.matrix:
            checks += ", ring x event-idx"
        t.add_row(c.name, c.group, checks, c.summary)
    return t


def write_json(results: Sequence[Result], path: str, socket_path: str) -> None:
    doc = {"socket": socket_path, "summary": summary(results), "cells": by_cell(results),
           "hints": hints(results), "cases": [r.as_dict() for r in results]}  # fmt: skip
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def write_junit(results: Sequence[Result], path: str) -> None:
    """One ``testcase`` per case; ``failure`` with the reason, ``skipped`` for the rest."""
    counts = summary(results)
    suite = ET.Element("testsuite", name="virtnet conform", tests=str(len(results)),
                       failures=str(counts[FAILED]), errors="0",
                       skipped=str(counts[SKIPPED] + counts[NOT_OFFERED] + counts[NOT_RUN]),
                       time=f"{sum(r.seconds for r in results):.3f}")  # fmt: skip
    for r in results:
        tc = ET.SubElement(suite, "testcase", classname=f"conform.{r.group}", name=r.name,
                           time=f"{r.seconds:.3f}")  # fmt: skip
        if r.status == FAILED:
            ET.SubElement(tc, "failure", message=r.detail).text = f"{r.detail}\nrule: {r.rule}"
        elif r.status in (SKIPPED, NOT_OFFERED, NOT_RUN):
            ET.SubElement(tc, "skipped", message=f"{r.status}: {r.detail}")
        else:
            ET.SubElement(tc, "system-out").text = r.detail
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
