"""``virtnet`` command line: bench | device | driver | stats."""

from __future__ import annotations

import argparse
import json
import sys
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
With --reconnect the driver outlives its back-end, as QEMU with -chardev socket,
reconnect=N (or server=on): when the connection ends, the rings keep their buffers
and the driver connects again (backoff 0.1 s doubling to 2 s; with --server it
listens again) and sets the new back-end up where the old one stopped: the same
features (one it no longer offers ends the run), memory and eventfds, each split ring
from the used index the old device published. Packed rings need a back-end that tracks
in-flight chains (PROTOCOL_F_INFLIGHT_SHMFD, as `virtnet device` does): the new device
resumes where the region says; without it, --reconnect refuses them.
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
                   help="queue pairs (VIRTIO_NET_F_MQ), each served by a worker process "
                        "of its own (unless --in-process; a driver runs a single pair "
                        "in its own process) with its own back-end: one queue of a "
                        "multi-queue tap, or its own sink/gen/loopback (default 1)")  # fmt: skip
    if name == "device":
        p.add_argument("--client", action="store_true",
                       help="connect to a front-end listening on --socket-path (QEMU "
                            "-chardev socket,...,server=on,wait=off) instead of listening; "
                            "retry with backoff while it is not there, and reconnect, "
                            "negotiating afresh, whenever its session ends (default: "
                            "listen)")  # fmt: skip
        p.add_argument("--in-process", action="store_true",
                       help="run every queue pair's data path in this one process instead "
                            "of a worker process each: one core for all pairs; one process "
                            "to profile (py-spy, callgrind) or debug. It gives up the "
                            "workers' containment: a SIGBUS from a front-end that shrinks "
                            "an unsealable memfd ends the device (default: a worker per "
                            "pair)")  # fmt: skip
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
        where = p.add_mutually_exclusive_group()
        where.add_argument("--in-process", action="store_true", default=None,
                           help="run every queue pair's driver in this one process "
                                "(default with one pair)")  # fmt: skip
        where.add_argument("--workers", dest="in_process", action="store_false",
                           help="run each queue pair's driver in a worker process of its "
                                "own, one pair too (default with more than one: a core "
                                "each)")  # fmt: skip
        p.add_argument("--server", action="store_true",
                       help="listen on --socket-path and wait for the back-end to connect "
                            "(`virtnet device --client`, DPDK net_vhost0,...,client=1) "
                            "instead of connecting to it")  # fmt: skip
        p.add_argument("--reconnect", action="store_true",
                       help="survive a back-end restart: when its connection ends, keep "
                            "running, connect again (with --server: listen again) with "
                            "backoff, and resume the rings where the old device stopped "
                            "(packed rings only with a back-end that takes INFLIGHT_SHMFD: "
                            "a packed ring's used position is not one index in guest "
                            "memory, the in-flight region has it)")  # fmt: skip
        p.add_argument("--no-inflight", dest="inflight", action="store_false",
                       help="do not negotiate VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD even where "
                            "the back-end offers it. By default the driver keeps the back-"
                            "end's in-flight region (GET_INFLIGHT_FD once, SET_INFLIGHT_FD at "
                            "every start), so that a back-end restarted under --reconnect "
                            "resubmits the chains its predecessor took and never used "
                            "(split and packed rings)")  # fmt: skip
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
        p.add_argument("--mem-regions", type=int, default=1, metavar="N",
                       help="split the guest memory into N memfds, each its own memory "
                            "region (as a QEMU guest with DIMMs): added one by one with "
                            "ADD_MEM_REG where the back-end offers "
                            "PROTOCOL_F_CONFIGURE_MEM_SLOTS (up to its GET_MAX_MEM_SLOTS), "
                            "else at most 8 in SET_MEM_TABLE (default 1)")  # fmt: skip
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
                   help="unix socket the back-end listens on (with --server: conform's)")
    p.add_argument("--server", action="store_true",
                   help="listen on SOCKET and take every session from a back-end that "
                        "connects, as QEMU with server=on: DPDK net_vhost0,iface=SOCKET,"
                        "client=1 or `virtnet device --client`, which connect again each "
                        "time a session ends (a case that finds nobody connecting within 5 "
                        "s counts the back-end as gone)")  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bench":
        from virtnet.bench.command import bench

        return bench(args)
    if args.command == "stats":
        from virtnet.statsview import print_stats_file

        return print_stats_file(args.file)
    if args.command == "conform":
        from virtnet.conform.command import conform

        return conform(args.conform_parser, args)
    return cmd_vhost_user(args)


def cmd_vhost_user(args) -> int:
    import logging

    from virtnet.ports.backends import BackendError, device_backends, driver_backends
    from virtnet.statsview import rate_printer

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
    rc = 0
    if args.command == "device":
        from virtnet.vhost_user.backend import DeviceServer
        from virtnet.vhost_user.device_loop import PairLoops

        try:
            if args.faults is not None:
                args.faults.reseed(args.seed)
            loops = PairLoops(backends, coalesce=args.coalesce, busy_poll_us=args.busy_poll,
                              faults=args.faults, pcap_path=args.pcap)  # fmt: skip
            server = DeviceServer(args.socket_path, loops, printer=rate_printer(args.quiet),
                                  features_off=args.features_off, client=args.client,
                                  config_space=args.config_space,
                                  in_process=args.in_process)  # fmt: skip
        except OSError as e:
            verb = "connect to" if args.client else "listen on"
            print(f"virtnet device: cannot {verb} {args.socket_path}: {e}", file=sys.stderr)
            return 2
        result = server.serve(args.seconds)
    else:
        from virtnet.net.xdp import XdpLoadError, load_program
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
            from virtnet.vhost_user.driver_loop import PairDrivers

            drivers = PairDrivers(backends, strategy=args.strategy, busy_poll_us=args.busy_poll,
                                  xdp=xdp_prog, xdp_name=args.xdp or "",
                                  pcap_path=args.pcap)  # fmt: skip
            client = DriverClient(args.socket_path, drivers, queue_size=args.queue_size,
                                  wanted=OFFERED & ~args.features_off,
                                  combined=args.combined, mem_regions=args.mem_regions,
                                  printer=rate_printer(args.quiet), server=args.server,
                                  in_process=args.in_process,
                                  reconnect=args.reconnect,
                                  inflight=args.inflight)  # fmt: skip
        except (FrontendError, OSError, ValueError) as e:
            print(f"virtnet driver: {e}", file=sys.stderr)
            return 2
        try:
            client.setup()
            client.run(args.seconds)
        except (FrontendError, VhostUserProtocolError, OSError) as e:
            print(f"virtnet driver: {e}", file=sys.stderr)
            client.close()
            return 1
        if client.away:  # --reconnect: counted, the buffers reclaimed all the same
            print("virtnet driver: the run ended with the back-end away (reconnecting)",
                  file=sys.stderr)  # fmt: skip
        result = client.close()
        if client.broken:
            print(f"virtnet driver: {client.broken}: the session ended", file=sys.stderr)
            rc = 1
        elif client.peer_gone:
            print("virtnet driver: the back-end went away", file=sys.stderr)
            rc = 1
    if args.json:
        from virtnet._build import build_name

        result["build"] = build_name()  # which build moved this process's packets
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return rc
