"""``virtnet`` command line: bench | device | driver | stats."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from virtnet import __version__
from virtnet._build import describe as describe_build

DESCRIPTION = """\
virtnet: a virtio-net driver and device in Python over real virtqueues.
Its receive path implements the 2009 RFC "defer skb allocation in virtio_net
(mergeable buffers)"; the pre-patch code is kept as the `prealloc` strategy.

  virtnet bench          the seed's A/B (prealloc vs deferred vs ewma), embedded, no root
  virtnet device ...     a vhost-user back-end (QEMU, DPDK virtio_user connect to it)
  virtnet driver ...     a vhost-user front-end (connects to DPDK net_vhost, virtnet device)
  virtnet conform SOCK   test a vhost-user net back-end: conformance and robustness cases
  virtnet stats FILE     print the counters of a --json file, ethtool -S style
"""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None


def _str_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [x for x in text.split(",") if x]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{', '.join(bad) or 'nothing'}: choose from {', '.join(choices)}"
            )
        return items

    return parse


def _add_bench(sub) -> None:
    from virtnet.bench.embedded import DIRECTIONS
    from virtnet.net.rx import STRATEGIES

    p = sub.add_parser(
        "bench",
        help="run the seed's A/B benchmark",
        description="Run the seed's A/B: rx strategies x directions x frame sizes, a few "
        "seconds each, and print the seed-shaped table (w/o patch vs w/i patch, Mb/s), "
        "packet rates and allocation counters per packet. Every received byte is checked; "
        "a run that drops or corrupts data reports an error, not a speed.",
    )
    p.add_argument("--strategies", type=_str_list(tuple(STRATEGIES)),
                   default=["prealloc", "deferred", "ewma"],
                   help="rx strategies to compare (default: prealloc,deferred,ewma — "
                        "before the seed, the seed, what came after it)")  # fmt: skip
    p.add_argument("--directions", type=_str_list(DIRECTIONS), default=None,
                   help="host-to-guest (device fills rx), guest-to-host (driver tx) "
                        "(default: both; host-to-guest with --xdp)")  # fmt: skip
    p.add_argument("--xdp", choices=("drop", "pass", "tx"), default=None,
                   help="run an XDP program on the driver's rx before any skb: drop "
                        "(counted, not delivered), pass (delivered as usual), tx (sent "
                        "back to the host, which checks every byte); host-to-guest")  # fmt: skip
    p.add_argument("--payloads", type=_int_list, default=[64, 1500, 65536],
                   help="frame sizes in bytes after the virtio-net header "
                        "(default: 64,1500,65536; 65536 = a TSO frame)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=None,
                   help="seconds per case (default 3; 5 with --tap)")  # fmt: skip
    p.add_argument("--packets", type=int, default=None, metavar="N",
                   help="run each case until N frames arrived instead of for a time "
                        "(in-process mode; for instruction counts under valgrind, see "
                        "benchmarks/callgrind_per_packet.py)")  # fmt: skip
    p.add_argument("--runs", type=int, default=None,
                   help="runs per case (default 1; 2 with --tap, like the seed)")  # fmt: skip
    p.add_argument("--queue-size", type=int, default=256, help="virtqueue size (default 256)")
    p.add_argument("--ring", type=_str_list(("split", "packed")), default=None,
                   metavar="split|packed",
                   help="virtqueue layout(s); split,packed runs both side by side (default: "
                        "what both ends negotiate, packed)")  # fmt: skip
    p.add_argument("--mode", choices=("inproc", "vhost-user"), default="inproc",
                   help="inproc: driver and device in this process, the strategies "
                        "interleaved in 50 ms slices (the steadiest A/B); vhost-user: "
                        "virtnet driver and virtnet device as two processes over "
                        "vhost-user, taking 1 s turns")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG bar chart")
    p.add_argument("--tap", action="store_true",
                   help="real traffic (root): two namespaces, a TAP in each, virtnet driver "
                        "and device over vhost-user between them, iperf3 TCP both ways and "
                        "UDP host->guest; baselines veth and a bare Python TAP relay. "
                        "Uses --strategies, --runs (default 2 here, like the seed), "
                        "--seconds (default 5 here), --json, --plot")  # fmt: skip
    p.add_argument("--queues", type=_queue_pair_list, default=None, metavar="N,...",
                   help="queue pairs to compare, e.g. 1,2 (VIRTIO_NET_F_MQ; one worker "
                        "process per pair on each side), with --mode vhost-user or --tap: "
                        "the counts take turns like the strategies, and a table shows the "
                        "aggregate rate, the ratio to 1 pair and each side's CPU seconds. "
                        "With --tap: iperf3 -P 4 over multi-queue taps, TCP both ways, "
                        "the baselines with -P 4 too (default: one pair, no such "
                        "table)")  # fmt: skip
    p.add_argument("--build", type=_str_list(("pure", "compiled")), default=None,
                   metavar="pure,compiled",
                   help="builds to compare in one run (any mode): each case runs once per "
                        "build, in processes started with VIRTNET_PURE=1 (pure) or without "
                        "(compiled), the builds taking turns so that both meet the same "
                        "machine; the usual tables per build, then each case's pps and Mb/s "
                        "on both builds and compiled/pure. A process runs one build only, so "
                        "with --mode inproc each build's child runs a group's strategies "
                        "(still interleaved in 50 ms slices) for 1 s of each case, then the "
                        "other build's child: pure, compiled, pure ... (a shorter turn would "
                        "make each child's start-up a larger share of what it measures; "
                        "--packets: one child per build). --mode vhost-user: the builds take "
                        "the 1 s turns like the strategies; --tap: each case on one build, "
                        "then the other. compiled needs a compiled install (pip install . "
                        "with a C compiler and python3-dev). Default: the running build "
                        "(virtnet --version), in this process")  # fmt: skip


DEVICE_EPILOG = """\
The device listens on --socket-path and serves one front-end at a time, then the next:
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=256M,share=on \\
      -M pc,memory-backend=mem -chardev socket,id=c0,path=PATH \\
      -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0,mrg_rxbuf=on
  dpdk-testpmd ... --vdev net_virtio_user0,path=PATH,mrg_rxbuf=1 (see docs/dpdk.md)
With --queues N: QEMU -netdev vhost-user,...,queues=N -device virtio-net-pci,...,mq=on;
testpmd net_virtio_user0,...,queues=N --rxq=N --txq=N (docs/multiqueue.md).
With --client the front-end listens and the device connects to it, then reconnects
(backoff 0.1 s doubling to 2 s) whenever it is not there or its session ends, so either
side may restart; the device exits only on a signal or --seconds:
  qemu-system-x86_64 ... -chardev socket,id=c0,path=PATH,server=on,wait=off ...
  dpdk-testpmd ... --vdev net_virtio_user0,path=PATH,server=1,mrg_rxbuf=1
  virtnet driver --server --socket-path PATH
"""

DRIVER_EPILOG = """\
The driver connects to a listening back-end at --socket-path, e.g. `virtnet device` or
DPDK testpmd with --vdev net_vhost0,iface=PATH (see docs/dpdk.md). With --server it
listens there and waits for the back-end to connect: `virtnet device --client` or
testpmd --vdev net_vhost0,iface=PATH,client=1.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Wraps option help as usual, except a text starting with "R|" (kept as written)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        if text.startswith("R|"):
            return text[2:].splitlines()
        return super()._split_lines(text, width)


def _add_vhost_user(sub, name: str, role: str) -> None:
    from virtnet.net.rx import STRATEGIES

    p = sub.add_parser(
        name, help=f"vhost-user {role}", description=f"vhost-user {role}.",
        epilog=DEVICE_EPILOG if name == "device" else DRIVER_EPILOG,
        formatter_class=_Formatter,
    )  # fmt: skip
    p.add_argument("--socket-path", required=True, help="unix socket of the vhost-user channel")
    p.add_argument("--backend", default="sink", metavar="B", help=_backend_help())
    p.add_argument("--seconds", type=float, default=0, help="stop after N seconds (0: until ^C)")
    p.add_argument("--json", metavar="FILE", help="write final stats as JSON")
    p.add_argument("--quiet", action="store_true", help="no live counters")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    p.add_argument("--busy-poll", type=int, default=0, metavar="USEC",
                   help="when idle, poll the rings this long before sleeping: fewer "
                        "kicks/interrupts, more CPU (vhost-net's busyloop_timeout; "
                        "default 0)")  # fmt: skip
    p.add_argument("--pcap", metavar="FILE",
                   help="write every frame received and sent to FILE (tshark -r FILE); "
                        "with --queues N, queue pair P > 0 writes FILE with .qP before "
                        "its extension")  # fmt: skip
    p.add_argument("--queues", type=_queue_pairs, default=1, metavar="N",
                   help="queue pairs (VIRTIO_NET_F_MQ), each served by its own process "
                        "with its own back-end: one queue of a multi-queue tap, or its "
                        "own sink/gen/loopback (default 1)")  # fmt: skip
    if name == "device":
        p.add_argument("--client", action="store_true",
                       help="connect to a front-end listening on --socket-path (QEMU "
                            "-chardev socket,...,server=on,wait=off) instead of listening; "
                            "retry with backoff while it is not there, and reconnect, "
                            "negotiating afresh, whenever its session ends (default: "
                            "listen)")  # fmt: skip
        p.add_argument("--config-space", action="store_true",
                       help="offer VHOST_USER_PROTOCOL_F_CONFIG (GET_CONFIG: MAC, link "
                            "status, MTU) to front-ends that read it, as `virtnet driver` "
                            "does. Off by default: QEMU's virtio-net does not use it and "
                            "warns at start when it is offered")  # fmt: skip
        p.add_argument("--coalesce", type=_coalesce, default={}, metavar="K=N,...",
                       help="interrupt moderation, ethtool -C words: rx-usecs, rx-frames, "
                            "tx-usecs, tx-frames (VIRTIO_NET_F_NOTF_COAL's max_usecs / "
                            "max_packets). An interrupt the driver asked for is held until "
                            "that many frames are behind it or that many microseconds "
                            "passed; frames alone also send it when the device runs out of "
                            "work. Default: none (every interrupt asked for is sent)")  # fmt: skip
        p.add_argument("--faults", type=_fault_plan, metavar="SPEC", help=_faults_help())
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the --faults draws: the same seed and traffic "
                            "repeat a run (default 0)")  # fmt: skip
    if name == "driver":
        p.add_argument("--server", action="store_true",
                       help="listen on --socket-path and wait for the back-end to connect "
                            "(`virtnet device --client`, DPDK net_vhost0,...,client=1) "
                            "instead of connecting to it")  # fmt: skip
        p.add_argument("--strategy", default="deferred", choices=tuple(STRATEGIES),
                       help="rx strategy (without MRG_RXBUF: big or small, as Linux)")  # fmt: skip
        p.add_argument("--queue-size", type=int, default=256,
                       help="virtqueue size (default 256; packed rings: any 1..32768)")  # fmt: skip
        p.add_argument("--combined", type=_queue_pairs, default=None, metavar="M",
                       help="queue pairs in use of --queues N (ethtool -L combined M): "
                            "sent as VQ_PAIRS_SET on the control queue, which this "
                            "front-end answers itself as DPDK's virtio_user does, "
                            "disabling the other pairs with SET_VRING_ENABLE "
                            "(default: all N)")  # fmt: skip
        p.add_argument("--features-off", type=_feature_bits, default=0, metavar="NAMES",
                       help="feature bits not to ack, e.g. MRG_RXBUF (big buffers) or "
                            "MRG_RXBUF,GUEST_TSO4,GUEST_TSO6 (small ones), RING_PACKED "
                            "(split rings)")  # fmt: skip
        p.add_argument("--xdp", metavar="MODULE:FUNCTION",
                       help="run FUNCTION(data, frags) -> XDP action on every received "
                            "frame before any skb (PASS 2, DROP 1, TX 3, REDIRECT 4 to the "
                            "backend, ABORTED 0); MODULE is imported with the current "
                            "directory on sys.path, or given as path/to/file.py; "
                            "built-ins: drop, pass, tx")  # fmt: skip
    else:
        p.add_argument("--features-off", type=_feature_bits, default=0, metavar="NAMES",
                       help="feature bits not to offer, e.g. RING_PACKED (split rings "
                            "only)")  # fmt: skip


def _backend_help() -> str:
    from virtnet.ports.backends import BACKEND_HELP_TEXT

    return BACKEND_HELP_TEXT


def _queue_pairs(text: str) -> int:
    from virtnet.vhost_user.backend import MAX_QUEUE_PAIRS

    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_QUEUE_PAIRS:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of queue pairs, 1..{MAX_QUEUE_PAIRS}")
    return n


def _queue_pair_list(text: str) -> list[int]:
    """``--queues 1,2``: each a number of queue pairs in 1..MAX_QUEUE_PAIRS, repeats dropped."""
    out = []
    for item in text.split(","):
        try:
            out.append(_queue_pairs(item.strip()))
        except argparse.ArgumentTypeError as e:
            if "," not in text:
                raise
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return list(dict.fromkeys(out))


def _coalesce(text: str) -> dict[str, int]:
    from virtnet.net.coalesce import CoalesceError, parse_coalesce

    try:
        return parse_coalesce(text)
    except CoalesceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _faults_help() -> str:
    from virtnet.net.faults import DEFAULT_RATE, FAULT_KINDS

    kinds = "\n".join(f"  {k:<18} {v}" for k, v in FAULT_KINDS.items())
    return (
        "R|lie to the driver on purpose (docs/faults.md): a comma list of\n"
        "KIND[:rate=R][:count=N][:after=N][:q=rx|tx|both] -- each opportunity is a\n"
        f"fault with probability R (default {DEFAULT_RATE}), at most N times (0: no\n"
        "limit), skipping the first `after` opportunities; q picks the queue (ring\n"
        "and interrupt kinds; data lies are rx only). Every fault is logged and\n"
        "counted as device_stats fault_KIND. Kinds:\n" + kinds
    )


def _fault_plan(text: str):
    from virtnet.net.faults import FaultPlan, FaultSpecError

    try:
        return FaultPlan.parse(text)  # the seed is set once --seed is known
    except FaultSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _feature_bits(text: str) -> int:
    from virtnet.net.features import VirtioNetF
    from virtnet.virtio.features import VirtioF, bit

    known = {m.name: m for e in (VirtioNetF, VirtioF) for m in e}
    items = [x.strip().upper() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown feature {', '.join(bad) or '(none given)'}: choose from {', '.join(known)}"
        )
    return sum(bit(known[x]) for x in set(items))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtnet",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"virtnet {__version__}, {describe_build()}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench(sub)
    _add_vhost_user(sub, "device", "back-end: the virtio-net device")
    _add_vhost_user(sub, "driver", "front-end: the virtio-net driver")
    p = sub.add_parser("stats", help="print the counters of a --json file")
    p.add_argument("file", help="a JSON file written by virtnet bench/device/driver --json")
    _add_conform(sub)
    return parser


CONFORM_DESCRIPTION = """\
virtnet as a vhost-user front-end, case by case, against the back-end listening on
SOCKET: conformance (QEMU's message order, features, REPLY_ACK, several memory
regions, ring stop/restart, GET_VRING_BASE, SET_VRING_ENABLE, frames echoed intact
with correct headers, mergeable and not) and robustness (malformed messages, wrong
fd counts, hostile split and packed descriptor chains, checksum requests past the
frame, control-queue bounds, a shrunk memfd, a front-end that stops reading).

The data cases run once per ring kind (split, packed) and EVENT_IDX setting (on, off):
"data-mergeable/packed/event-idx-on"; --ring and --event-idx choose the cells.

Each case runs on a fresh connection with a timeout; afterwards a normal session must
still work. The conformance cases need a back-end that echoes tx to rx unchanged:
  virtnet device --socket-path SOCKET --backend loopback
  dpdk-testpmd ... --vdev net_vhost0,iface=SOCKET -- --forward-mode=io (docs/conformance.md)

Exit status: 0 every case passed, survived (a case the spec defines no answer for: it
checks only that the back-end lives on), was skipped or "not offered" (a feature the
back-end does not offer); 1 a case failed (the back-end dying fails that case, the rest
are "not run"); 2 usage error.
"""


def _add_conform(sub) -> None:
    p = sub.add_parser("conform", help="test a vhost-user net back-end, case by case",
                       description=CONFORM_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("socket", metavar="SOCKET", nargs="?",
                   help="unix socket the back-end listens on")  # fmt: skip
    p.add_argument("--case", action="append", metavar="NAME",
                   help="run only this case (repeatable); --list shows the names")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the cases, one line each")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--junit-xml", metavar="FILE", help="write the results as JUnit XML")
    p.add_argument("--timeout", type=float, default=20.0, metavar="S",
                   help="seconds per case before it counts as a hang (default 20)")  # fmt: skip
    p.add_argument("--ring", type=_str_list(("split", "packed")), default=["split", "packed"],
                   metavar="KINDS",
                   help="ring kinds the data cases run on (default: split,packed; a kind "
                        "the back-end does not offer is reported 'not offered')")  # fmt: skip
    p.add_argument("--event-idx", type=_str_list(("on", "off")), default=["on", "off"],
                   metavar="SETTINGS",
                   help="EVENT_IDX settings the data cases run with (default: on,off)")
    p.set_defaults(conform_parser=p)


def _console():
    from rich.console import Console

    # Piped output (CI logs, README snippets) gets a width the tables fit in.
    return Console(width=None if sys.stdout.isatty() else 120)


def cmd_bench(args) -> int:

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
        return cmd_bench_tap(args)
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
    console = _console()
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


def cmd_bench_tap(args) -> int:

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

    console = _console()
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


def cmd_stats(args) -> int:
    from rich.console import Console
    from rich.table import Table

    try:
        doc = json.loads(open(args.file).read())
    except (OSError, ValueError) as e:
        print(f"virtnet stats: cannot read {args.file}: {e}", file=sys.stderr)
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
        print(f"virtnet stats: {args.file} has no driver_stats/device_stats", file=sys.stderr)
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
            console.print(_per_queue_table(f"{title} per queue", per_queue))
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


def _per_queue_table(title: str, per_queue: dict[str, dict[int, int]]):
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "stats":
        return cmd_stats(args)
    if args.command == "conform":
        return cmd_conform(args.conform_parser, args)
    return cmd_vhost_user(args)


def cmd_conform(parser: argparse.ArgumentParser, args) -> int:
    from virtnet.conform.cases import CASES, cells, expand
    from virtnet.conform.report import list_table, table, write_json, write_junit
    from virtnet.conform.runner import FAILED, run_cases

    console = _console()
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

    results = run_cases(cases, args.socket, timeout=args.timeout, progress=progress)
    console.print(table(results, f"virtnet conform {args.socket}"))
    if args.json:
        write_json(results, args.json, args.socket)
    if args.junit_xml:
        write_junit(results, args.junit_xml)
    return 1 if any(r.status == FAILED for r in results) else 0


def _printer(args):
    if args.quiet:
        return None
    last = {}

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


def cmd_vhost_user(args) -> int:
    import logging

    from virtnet.ports.backends import BackendError, device_backends, driver_backends

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"virtnet {args.command}: %(message)s",
    )
    try:
        make = device_backends if args.command == "device" else driver_backends
        backends: list[Any] = make(args.backend, args.queues)  # the device's or the driver's
    except (BackendError, OSError) as e:
        print(f"virtnet {args.command}: {e}", file=sys.stderr)
        return 2
    pcap = None
    rc = 0
    if args.command == "device":
        from virtnet.vhost_user.backend import DeviceServer

        try:
            if args.faults is not None:
                args.faults.reseed(args.seed)
            server = DeviceServer(args.socket_path, backends, printer=_printer(args),
                                  busy_poll_us=args.busy_poll,
                                  coalesce=args.coalesce, faults=args.faults,
                                  features_off=args.features_off,
                                  pcap_path=args.pcap, client=args.client,
                                  config_space=args.config_space)  # fmt: skip
        except OSError as e:
            verb = "connect to" if args.client else "listen on"
            print(f"virtnet device: cannot {verb} {args.socket_path}: {e}", file=sys.stderr)
            return 2
        result = server.serve(args.seconds)
    else:
        from virtnet.net.xdp import XdpHook, XdpLoadError, load_program
        from virtnet.vhost_user.errors import VhostUserProtocolError
        from virtnet.vhost_user.frontend import DriverClient, FrontendError

        if args.pcap and args.queues > 1:
            print("virtnet driver: --pcap with --queues > 1 is not supported (one capture "
                  "file per process is `virtnet device`'s; capture there)", file=sys.stderr)
            return 2
        try:
            xdp_prog = load_program(args.xdp) if args.xdp else None
        except XdpLoadError as e:
            print(f"virtnet driver: {e}", file=sys.stderr)
            return 2

        try:
            from virtnet.net.features import OFFERED

            client = DriverClient(args.socket_path, backends, strategy=args.strategy,
                                  queue_size=args.queue_size,
                                  wanted=OFFERED & ~args.features_off,
                                  busy_poll_us=args.busy_poll, combined=args.combined,
                                  printer=_printer(args), server=args.server)  # fmt: skip
        except (FrontendError, OSError, ValueError) as e:
            print(f"virtnet driver: {e}", file=sys.stderr)
            return 2
        try:
            client.setup()
            if xdp_prog is not None:
                for pair in client.pairs:
                    pair.drv.rx.attach_xdp(XdpHook(xdp_prog, pair.drv.stats, name=args.xdp,
                                                   redirect=pair.backend.xdp_redirect))  # fmt: skip
            if args.pcap:
                from virtnet.ports.pcap import PcapWriter

                drv = client.drv
                assert drv is not None  # setup() built queue pair 0
                pcap = PcapWriter(args.pcap, drv.hdr_len)
                drv.capture = pcap.write_views
            client.run(args.seconds)
        except (FrontendError, VhostUserProtocolError, OSError) as e:
            print(f"virtnet driver: {e}", file=sys.stderr)
            client.close()
            return 1
        result = client.close()
        if client.broken:
            print(f"virtnet driver: {client.broken}: the session ended", file=sys.stderr)
            rc = 1
        elif client.peer_gone:
            print("virtnet driver: the back-end went away", file=sys.stderr)
            rc = 1
    if pcap is not None:
        pcap.close()
    if args.json:
        from virtnet._build import build_name

        result["build"] = build_name()  # which build moved this process's packets
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return rc
