"""``virtnet bench``: from the parsed options to the cases, the runs and the tables.

cli.py parses; this module checks what the options mean together, plans the case grid
(direction × payload groups of strategy × ring × queues × build cases), picks the runner
(in-process, a child per build, or two vhost-user processes) and renders the results.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from virtnet.bench.report import wide_console


def bench(args: argparse.Namespace) -> int:
    """``virtnet bench``: check the options, plan the cases, run them, print the tables."""
    from virtnet.bench.embedded import Case
    from virtnet.bench.report import integrity_problems, print_report, write_json, write_plot
    from virtnet.bench.runner import machine_description, run_groups

    problem = _packets_problem(args)
    if args.tap and args.xdp:
        problem = "--xdp runs on the synthetic streams, not with --tap"
    if args.queues and not args.tap and args.mode != "vhost-user":
        # The in-process pair is one driver and one device in one thread: nothing to spread.
        problem = "--queues is for --mode vhost-user or --tap (the in-process bench has one pair)"
    args.build = list(dict.fromkeys(args.build)) if args.build else None  # pure,pure: once
    problem = problem or _build_problem(args)
    if problem:
        print(f"virtnet bench: {problem}", file=sys.stderr)
        return 2
    if args.tap:
        return bench_tap(args)
    args.seconds = 3.0 if args.seconds is None else args.seconds
    args.runs = 1 if args.runs is None else args.runs
    if args.seconds <= 0 or args.runs < 1:
        print("virtnet bench: --seconds must be > 0 and --runs >= 1", file=sys.stderr)
        return 2
    if args.directions is None:
        args.directions = ["host-to-guest"] if args.xdp else ["host-to-guest", "guest-to-host"]
    if args.xdp and args.directions != ["host-to-guest"]:
        print("virtnet bench: --xdp measures the receive path: --directions host-to-guest",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.xdp == "drop" and args.packets:
        print("virtnet bench: --packets counts frames a sink received; --xdp drop has none",
              file=sys.stderr)  # fmt: skip
        return 2
    packets = args.packets or 0
    try:
        rings = args.ring or ["packed"]  # virtnet's two ends both offer RING_PACKED
        groups = [
            [
                Case(s, d, p, seconds=args.seconds, queue_size=args.queue_size, packets=packets,
                     xdp=args.xdp, ring=r, queues=q, build=b)  # fmt: skip
                for _ in range(args.runs)
                for r in rings
                for s in args.strategies
                for q in args.queues or [1]
                for b in args.build or [""]
            ]
            for d in args.directions
            for p in args.payloads
        ]
        from virtnet.ports.synthetic import FrameGen

        for p in args.payloads:
            FrameGen(p)  # validates the size
        from virtnet.virtio.ring.layout import check_packed_queue_size, check_queue_size

        for r in rings:
            (check_packed_queue_size if r == "packed" else check_queue_size)(args.queue_size)
    except ValueError as e:
        print(f"virtnet bench: {e}", file=sys.stderr)
        return 2
    machine = machine_description()
    runner: Callable[..., list[dict]] | None = None
    if args.mode == "vhost-user":
        from virtnet.bench.vhost_user import run_vhost_user_group as runner
    elif args.build:  # in-process, but in a child per build
        from virtnet.bench.builds import run_inproc_group as runner
    from virtnet.bench.builds import BuildError

    try:
        results = run_groups(groups, group_runner=runner)
    except BuildError as e:
        print(f"virtnet bench: {e}", file=sys.stderr)
        return 1
    per_case = f"{packets} packets/case" if packets else f"{args.seconds:g}s/case"
    title = (
        f"virtnet bench ({args.mode}, {'/'.join(rings)} rings, queue {args.queue_size}, "
        f"{per_case}) — "
        f"{machine['cpu']}, {machine['cores']} cores, Python {machine['python']}"
    )
    console = wide_console()
    shown = results
    if len(rings) > 1:  # side by side: one column per strategy and ring
        shown = [dict(r, strategy=f"{r['strategy']} {r['ring']}") for r in shown]
    if args.queues:  # and one per number of queue pairs
        shown = [dict(r, strategy=f"{r['strategy']} {r['queues']}q") for r in shown]
    from virtnet.bench.report import build_table, by_build, queues_table

    builds = by_build(shown)
    for label, recs in builds.items():  # the build in every title: one set of tables each
        print_report(recs, f"{title}, {label}", console)
        if args.queues:
            console.print(queues_table([r for r in results if r["build"] == label],
                                       "queue pairs: aggregate rate, CPU seconds of each side "
                                       f"(its processes) and per packet (both), {label}"))
    if len(builds) > 1:
        console.print(build_table(shown, BUILDS_TITLE))
    if args.mode == "vhost-user":
        _round_trips(results, args, console)
    if args.json:
        write_json(results, args.json, _json_meta(machine))
    if args.plot:
        plotted = shown
        if len(builds) > 1:
            plotted = [dict(r, strategy=f"{r['strategy']} {_tag(r)}") for r in shown]
        write_plot(plotted, args.plot, "virtnet bench: " + " vs ".join(args.strategies))
    return 1 if integrity_problems(results) else 0


BUILDS_TITLE = "compiled / pure: each case on both builds, in the same run"


def _build_problem(args) -> str | None:
    """Why a build ``--build`` names cannot run on this install, or None."""
    from virtnet.bench.builds import unavailable

    for tag in args.build or ():
        why = unavailable(tag)
        if why:
            return f"--build {tag}: {why}"
    return None


def _tag(rec: dict) -> str:
    from virtnet.bench.builds import tag_of

    return tag_of(rec["build"])


def _json_meta(machine: dict) -> dict:
    from virtnet._build import build_name

    # build: this process's; each record says the build that ran its case.
    return {"machine": machine, "argv": sys.argv[1:], "build": build_name()}


def _round_trips(results: list[dict], args, console) -> None:
    """The latency next to the rates: a ping-pong per strategy (and build), added to its
    records. With --build, the driver that times it runs in a child of each build."""
    from virtnet.bench import builds
    from virtnet.bench.report import round_trip_table
    from virtnet.bench.rtt import round_trip

    rtts = {}
    for tag in args.build or [""]:
        for s in args.strategies:
            rtts[s, tag] = (builds.round_trip(s, args.queue_size, tag) if tag
                            else round_trip(s, args.queue_size))  # fmt: skip
    for rec in results:
        tag = _tag(rec) if args.build else ""
        rec["rtt_ms"] = rtts[rec["strategy"], tag]  # integrity_problems checks its echoes too
    console.print(round_trip_table({f"{s} {tag}".rstrip(): r for (s, tag), r in rtts.items()}))


def _packets_problem(args) -> str | None:
    """Why ``--packets`` cannot be used as given, or None."""
    if args.packets is None:
        return None
    if args.packets < 1:
        return "--packets must be >= 1"
    if args.seconds is not None:
        return "--packets and --seconds exclude each other (a case runs for one or the other)"
    if args.tap:
        # iperf3 decides how many segments TCP sends; the path cannot count them out.
        return "--packets is for the in-process bench, not --tap (iperf3 runs for a time)"
    if args.mode != "inproc":
        # The two processes each run for --seconds; stopping them at a frame count
        # would need the count in virtnet device/driver themselves.
        return "--packets is for the in-process bench (--mode inproc), not --mode vhost-user"
    return None


def bench_tap(args: argparse.Namespace) -> int:
    """``virtnet bench --tap``: real TCP through TAP devices in network namespaces."""
    from virtnet.bench.report import integrity_problems, tap_table, write_json, write_plot
    from virtnet.bench.runner import machine_description, run_cases
    from virtnet.bench.tap import TapBenchError, run_tap_case, tap_cases, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"virtnet bench --tap: {reason}", file=sys.stderr)
        return 2
    seconds = 5.0 if args.seconds is None else args.seconds
    runs = 2 if args.runs is None else args.runs
    if seconds <= 0 or runs < 1:
        print("virtnet bench: --seconds must be > 0 and --runs >= 1", file=sys.stderr)
        return 2
    machine = machine_description()
    from virtnet.bench.builds import BuildError

    try:
        cases = tap_cases(args.strategies, seconds, runs, queues=args.queues, builds=args.build)
        results = run_cases(cases, runner=run_tap_case)
    except (TapBenchError, BuildError, OSError, RuntimeError) as e:
        print(f"virtnet bench --tap: {e}", file=sys.stderr)
        return 1
    title = (
        f"virtnet bench --tap (iperf3, mtu 1500, TSO on, {seconds:g}s/case) — "
        f"{machine['cpu']}, {machine['cores']} cores"
    )
    if args.queues:
        from virtnet.bench.tap import MQ_STREAMS

        title = title.replace("(iperf3,", f"(iperf3 -P {MQ_STREAMS},")
    from virtnet.bench.report import build_table, by_build, queues_table

    console = wide_console()
    shown = results
    if args.queues:  # the queues table has a column for the pairs
        shown = [dict(r, strategy=f"{r['strategy']} {r['queues']}q") if r["queues"] else r
                 for r in results]  # fmt: skip
    builds = by_build(results, shared=("veth", "relay"))  # the baselines: with each build
    for label, recs in builds.items():
        console.print((queues_table if args.queues else tap_table)(recs, f"{title}, {label}"))
    if len(builds) > 1:
        console.print(build_table(shown, BUILDS_TITLE))
    if args.json:
        write_json(results, args.json, _json_meta(machine))
    if args.plot:
        plotted = results
        if len(builds) > 1:
            plotted = [dict(r, strategy=f"{r['strategy']} {_tag(r)}")
                       if r["strategy"] not in ("veth", "relay") else r for r in results]
        write_plot(plotted, args.plot, "virtnet bench --tap: real TCP/UDP through virtnet")
    return 1 if integrity_problems(results) else 0
