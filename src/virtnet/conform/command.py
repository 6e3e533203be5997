"""``virtnet conform``: from the parsed options to the cases run and their report."""

from __future__ import annotations

import argparse
import sys

from virtnet.bench.report import wide_console


def conform(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``virtnet conform SOCKET``: pick the cases and cells, run them, report."""
    from virtnet.conform.cases import CASES, cells, expand
    from virtnet.conform.report import list_table, table, write_json, write_junit
    from virtnet.conform.runner import FAILED, run_cases
    from virtnet.conform.session import listen
    from virtnet.vhost_user.reconnect import unlink_socket

    console = wide_console()
    if args.list:
        console.print(list_table(CASES))
        return 0
    if not args.socket:
        parser.error("SOCKET is required (or --list)")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    # --case names a case (every cell of a matrix case) or one cell ("case/packed/event-idx-on").
    matrix = expand(CASES, cells(args.ring, args.event_idx))
    every = expand(CASES)
    names = {c.name for c in every} | {c.family for c in every}
    unknown = [n for n in args.case or () if n not in names]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)} (--list shows them)")
    cases = [c for c in matrix if not args.case or c.name in args.case or c.family in args.case]
    if not cases:
        parser.error(f"no cell of {', '.join(args.case)} with --ring {','.join(args.ring)} "
                     f"--event-idx {','.join(args.event_idx)}")  # fmt: skip

    def progress(r) -> None:
        print(f"{r.status:>8}  {r.name}: {r.detail}", file=sys.stderr, flush=True)

    listener = None
    if args.server:
        try:
            listener = listen(args.socket)
        except OSError as e:
            parser.error(f"--server: cannot listen on {args.socket}: {e.strerror}")
        print(f"listening on {args.socket}: each case's sessions are the back-end's next "
              "connections", file=sys.stderr, flush=True)  # fmt: skip
    try:
        results = run_cases(cases, args.socket, timeout=args.timeout, progress=progress)
    finally:
        if listener is not None:
            listener.close()
            unlink_socket(args.socket)
    console.print(table(results, f"virtnet conform {args.socket}"))
    if args.json:
        write_json(results, args.json, args.socket)
    if args.junit_xml:
        write_junit(results, args.junit_xml)
    return 1 if any(r.status == FAILED for r in results) else 0
