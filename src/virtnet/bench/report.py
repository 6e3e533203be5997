"""Bench output: the seed-shaped table, JSON, and a PNG plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from virtnet._build import PURE
from virtnet.bench.ping import rtt_text
from virtnet.ports.synthetic import SINK_COUNTS

# The seed's two columns: "w/o patch" is the pre-patch code, "w/i patch" the seed;
# "ewma" is what virtio_net grew after it (EWMA-sized buffers from page frags).
BASELINE, PATCHED, SUCCESSOR = "prealloc", "deferred", "ewma"
LINEAGE = (BASELINE, PATCHED, SUCCESSOR)
# What a sink counts against its stream; any of them non-zero fails the run.
# queue_mismatch (--mode vhost-user): queue pairs whose count differs between the ends.
INTEGRITY_COUNTS = (*SINK_COUNTS, "queue_mismatch")
SEED_LABEL = {"guest-to-host": "guest to host", "host-to-guest": "host to guest"}


def wide_console() -> Console:
    """A console for the tables; piped output (CI logs, README snippets) gets a width
    the tables fit in."""
    return Console(width=None if sys.stdout.isatty() else 120)


def _by_key(results: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in results:
        out.setdefault((r["direction"], r["payload"], r["strategy"]), []).append(r)
    return out


def _mbps(rs: list[dict]) -> str:
    return " ~ ".join(f"{r['gbps'] * 1000:.0f}" for r in rs)


def _per_pkt(rs: list[dict], stat: str) -> str:
    pk = sum(r["packets"] + r.get("acks", 0) for r in rs)
    n = sum(r["driver_stats"].get(stat, 0) for r in rs)
    return f"{n / pk:.2f}" if pk else "-"


def _strategies(results: list[dict]) -> list[str]:
    order = {s: i for i, s in enumerate(LINEAGE)}
    return sorted({r["strategy"] for r in results}, key=lambda s: (order.get(s, len(order)), s))


def _rx_frames(r: dict) -> int:
    """Frames the driver took off its rx ring: delivered, or consumed by XDP."""
    st = r["driver_stats"]
    return st.get("rx_packets", 0) + sum(
        st.get(k, 0) for k in ("rx_xdp_drops", "rx_xdp_tx", "rx_xdp_redirects", "rx_xdp_aborted")
    )


def _rx_per_frame(rs: list[dict], stat: str, per: str = "frames", fmt: str = ",.2f") -> str:
    """An rx counter per frame taken off the ring (or per packet delivered)."""
    n = sum(r["driver_stats"].get(stat, 0) for r in rs)
    if per == "frames":
        d = sum(_rx_frames(r) for r in rs)
    else:
        d = sum(r["driver_stats"].get("rx_packets", 0) for r in rs)
    return format(n / d, fmt) if d else "-"


def _avg(rs: list[dict], key: str) -> float:
    return sum(r[key] for r in rs) / len(rs) if rs else 0.0


def seed_table(results: list[dict], title: str) -> Table:
    """Rows: direction × frame size; columns: w/o patch vs w/i patch, as the seed prints."""
    by = _by_key(results)
    strategies = _strategies(results)
    table = Table(title=title)
    table.add_column("direction")
    table.add_column("frame", justify="right")
    for s in strategies:
        head = {BASELINE: "w/o patch", PATCHED: "w/i patch"}.get(s, s)
        table.add_column(f"{head} Mb/s", justify="right")
    both = BASELINE in strategies and PATCHED in strategies
    if both:
        table.add_column("w/i / w/o", justify="right")
    after = PATCHED in strategies and SUCCESSOR in strategies
    if after:
        table.add_column("ewma / w/i", justify="right")
    for direction, payload in sorted({(r["direction"], r["payload"]) for r in results}):
        row = [SEED_LABEL.get(direction, direction), f"{payload}B"]
        row += [_mbps(by.get((direction, payload, s), [])) or "-" for s in strategies]
        if both:
            a = _avg(by.get((direction, payload, BASELINE), []), "gbps")
            b = _avg(by.get((direction, payload, PATCHED), []), "gbps")
            row.append(f"{b / a:.2f}x" if a and b else "-")
        if after:
            a = _avg(by.get((direction, payload, PATCHED), []), "gbps")
            b = _avg(by.get((direction, payload, SUCCESSOR), []), "gbps")
            row.append(f"{b / a:.2f}x" if a and b else "-")
        table.add_row(*row)
    return table


def per_packet_table(results: list[dict]) -> Table:
    """pps and the seed's allocation counters per packet the guest handled."""
    by = _by_key(results)
    table = Table(title="per packet (guest rx + tx, ACKs included; bufs and buf mem: rx)")
    for name in ("direction", "frame", "strategy", "pps", "skb_allocs", "page_allocs",
                 "page_reuses", "bufs/pkt", "buf mem/pkt"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("direction", "strategy") else "right")
    for (direction, payload, s), rs in sorted(by.items(), key=_row_order):
        table.add_row(
            SEED_LABEL.get(direction, direction), f"{payload}B", s, f"{_avg(rs, 'pps'):,.0f}",
            _per_pkt(rs, "skb_allocs"), _per_pkt(rs, "page_allocs"), _per_pkt(rs, "page_reuses"),
            # rx only: buffers a received frame spanned, and the buffer memory
            # (rx_truesize) each delivered packet tied up.
            _rx_per_frame(rs, "rx_bufs"),
            _rx_per_frame(rs, "rx_truesize", per="packets", fmt=",.0f"),
        )  # fmt: skip
    return table


def _row_order(item) -> tuple:
    (direction, payload, s), _ = item
    order = {x: i for i, x in enumerate(LINEAGE)}
    return (direction, payload, order.get(s, len(order)), s)


def tap_table(results: list[dict], title: str) -> Table:
    """The seed's table with real TCP/UDP: baselines, w/o patch, w/i patch, ratios."""
    cols = ["veth", "relay", BASELINE, PATCHED]
    if any(r["strategy"] == SUCCESSOR for r in results):
        cols.append(SUCCESSOR)
    by: dict[tuple, list[dict]] = {}
    for r in results:
        by.setdefault((r["direction"], r.get("protocol", "tcp"), r["strategy"]), []).append(r)
    table = Table(title=title)
    table.add_column("direction")
    table.add_column("proto")
    heads = {"veth": "veth", "relay": "py relay", BASELINE: "w/o patch", PATCHED: "w/i patch",
             SUCCESSOR: "ewma"}  # fmt: skip
    for c in cols:
        table.add_column(f"{heads[c]} Mb/s", justify="right")
    table.add_column("w/i / w/o", justify="right")
    table.add_column("w/i / relay", justify="right")
    for direction, proto in sorted({(r["direction"], r.get("protocol", "tcp")) for r in results}):
        row = [SEED_LABEL.get(direction, direction), proto]
        for c in cols:
            rs = by.get((direction, proto, c), [])
            text = _mbps(rs) or "-"
            if proto == "udp" and rs:
                text += " (" + ", ".join(f"{r.get('loss_pct') or 0:.0f}%" for r in rs) + " lost)"
            row.append(text)
        avg = {c: _avg(by.get((direction, proto, c), []), "gbps") for c in cols}
        for base in (BASELINE, "relay"):
            ok = avg[base] and avg[PATCHED]
            row.append(f"{avg[PATCHED] / avg[base]:.2f}x" if ok else "-")
        table.add_row(*row)
    # The latency beside the rate: ping through each path at rest before its runs.
    rtts = {c: [r["rtt_ms"] for r in results if r["strategy"] == c and r.get("rtt_ms")]
            for c in cols}  # fmt: skip
    if any(rtts.values()):
        table.add_row("ping rtt ms", "min/avg/max", *(rtt_text(rtts[c]) for c in cols), "", "",
                      end_section=False)  # fmt: skip
    return table


def _cpu(rs: list[dict], key: str) -> str:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return f"{sum(vals) / len(vals):.2f}" if vals else "-"


def _cpu_per_packet(rs: list[dict]) -> str:
    """Both sides' CPU microseconds per packet measured: flat when pairs only share it."""
    cpu = [r["device_cpu_seconds"] + r["driver_cpu_seconds"] for r in rs
           if r.get("device_cpu_seconds") is not None and r.get("driver_cpu_seconds")]  # fmt: skip
    n = sum(r["packets"] for r in rs if r.get("device_cpu_seconds") is not None)
    return f"{sum(cpu) / n * 1e6:.1f}" if cpu and n else "-"


def _busy(rs: list[dict]) -> str:
    """The share of the machine's cores busy during the runs (anyone's use)."""
    vals = [r["machine_busy"] for r in rs if r.get("machine_busy") is not None]
    return f"{sum(vals) / len(vals):.0%}" if vals else "-"


QUEUES_LABEL = {"guest-to-host": "guest→host", "host-to-guest": "host→guest"}


def queues_table(results: list[dict], title: str) -> Table:
    """--queues: aggregate rate per number of queue pairs, the ratio to one pair, and
    each side's CPU (the whole process tree, and its per-pair workers alone)."""
    by: dict[tuple, list[dict]] = {}
    for r in results:
        what = (r["payload"], r.get("protocol") or "")
        by.setdefault((r["direction"], what, r["strategy"], r.get("queues")), []).append(r)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    # per pair: kpps each pair carried; dev/drv s: CPU seconds of that side's processes
    # (control + workers; each worker's alone: the JSON's *_worker_cpu_seconds); busy:
    # all cores' busy share during the runs, whoever used them (other load shows here).
    for name in ("direction", "frame", "strategy", "pairs", "Mb/s", "kpps", "vs 1",
                 "per pair", "dev cpu s", "drv cpu s", "cpu µs/pkt", "busy"):  # fmt: skip
        left = name in ("direction", "frame", "strategy")
        table.add_column(name, justify="left" if left else "right", no_wrap=True)

    def order(key: tuple) -> tuple:
        direction, what, s, q = key
        return (direction, what, q is not None, s != "veth", s, q or 0)  # veth, relay, ...

    for key in sorted(by, key=order):
        direction, (payload, proto), s, q = key
        rs = by[key]
        one = by.get((direction, (payload, proto), s, 1), [])
        ratio = "-"
        if q and q > 1 and one and _avg(one, "gbps"):
            ratio = f"{_avg(rs, 'gbps') / _avg(one, 'gbps'):.2f}x"
        pairs = [r["queue_packets"] for r in rs if r.get("queue_packets")]
        per_pair = "-"
        if pairs:
            secs = sum(r["seconds"] for r in rs if r.get("queue_packets")) or 1e-9
            per_pair = "/".join(f"{sum(v or 0 for v in x) / secs / 1e3:,.0f}"
                                for x in zip(*pairs, strict=False))  # fmt: skip
        table.add_row(
            QUEUES_LABEL.get(direction, direction), proto or f"{payload}B", s,
            str(q) if q else "-", f"{_avg(rs, 'gbps') * 1000:.0f}",
            f"{_avg(rs, 'pps') / 1e3:,.0f}" if _avg(rs, "pps") else "-", ratio, per_pair,
            _cpu(rs, "device_cpu_seconds"), _cpu(rs, "driver_cpu_seconds"),
            _cpu_per_packet(rs), _busy(rs),
        )  # fmt: skip
    return table


def round_trip_table(rtts: dict[str, dict]) -> Table:
    """``--mode vhost-user``: one frame in flight through device loopback, per strategy."""
    table = Table(title="round trip over vhost-user (one 64 B frame in flight, device loopback)")
    for name in ("strategy", "samples", "min ms", "avg ms", "max ms"):
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for s in sorted(rtts, key=lambda s: (s != BASELINE, s)):
        r = rtts[s]
        vals = [r.get(k) for k in ("min_ms", "avg_ms", "max_ms")]
        table.add_row(s, f"{r['received']:,}", *(f"{v:.3f}" if v is not None else "-"
                                                  for v in vals))  # fmt: skip
    return table


def by_build(results: list[dict], shared: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """The records per build label (in the order they ran); ``shared`` strategies
    (--tap's baselines, which run no virtnet build) go with every build."""
    labels = dict.fromkeys(r["build"] for r in results if r["strategy"] not in shared)
    return {b: [r for r in results if r["build"] == b or r["strategy"] in shared]
            for b in labels}  # fmt: skip


def build_table(results: list[dict], title: str) -> Table:
    """--build pure,compiled: each case's rates on both builds and compiled / pure, for
    the cases that ran on both (their label: "pure Python" or "compiled (mypyc ...)").
    The ratio is of Mb/s; the frames of a case are all one size, so pps give the same."""
    by: dict[tuple, dict[bool, list[dict]]] = {}
    for r in results:
        key = (r["direction"], r["payload"], r.get("protocol") or "", r["strategy"])
        by.setdefault(key, {}).setdefault(r["build"] != PURE, []).append(r)
    table = Table(title=title)
    for name in ("direction", "frame", "strategy", "pure kpps", "compiled kpps", "pure Mb/s",
                 "compiled Mb/s", "compiled/pure"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("direction", "strategy") else "right")
    order = {x: i for i, x in enumerate(LINEAGE)}
    for key in sorted(by, key=lambda k: (*k[:3], order.get(k[3], len(order)), k[3])):
        direction, payload, proto, s = key
        if len(by[key]) < 2:
            continue  # one build only (a baseline): nothing to compare
        pure, comp = by[key][False], by[key][True]
        a, b = _avg(pure, "gbps"), _avg(comp, "gbps")
        table.add_row(QUEUES_LABEL.get(direction, direction), proto or f"{payload}B", s,
                      f"{_avg(pure, 'pps') / 1e3:,.0f}", f"{_avg(comp, 'pps') / 1e3:,.0f}",
                      _mbps(pure), _mbps(comp), f"{b / a:.2f}x" if a and b else "-")  # fmt: skip
    return table


def integrity_problems(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        integ = r.get("integrity", {})
        if integ and any(integ.get(k) for k in INTEGRITY_COUNTS):
            counts = " ".join(f"{k}={integ.get(k, 0)}" for k in INTEGRITY_COUNTS)
            out.append(f"{r['strategy']} {r['direction']} {r['payload']}B: {counts} "
                       f"{integ.get('messages', [])}")  # fmt: skip
        echo = (r.get("rtt_ms") or {}).get("integrity", {})
        if any(echo.get(k) for k in INTEGRITY_COUNTS):  # the round trip's frames, checked too
            out.append(f"{r['strategy']} round trip echo: {echo}")
        if r.get("mode") == "tap" and not r["driver_stats"] and r["strategy"] not in (
            "veth", "relay",
        ):  # fmt: skip
            out.append(f"{r['strategy']} {r['direction']}: the driver wrote no stats")
        if r["driver_stats"].get("pages_outstanding"):
            out.append(f"{r['strategy']} {r['direction']}: pages leaked at teardown")
    return out


def print_report(results: list[dict], title: str, console: Console | None = None) -> None:
    console = console or Console()
    console.print(seed_table(results, title))
    console.print(per_packet_table(results))
    for problem in integrity_problems(results):
        console.print(f"[bold red]ERROR[/] {problem}")


def write_json(results: list[dict], path: str | Path, meta: dict | None = None) -> None:
    doc: dict[str, object] = {"results": results}
    if meta:
        doc["meta"] = meta
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def write_plot(results: list[dict], path: str | Path, title: str) -> None:
    """Grouped bars: Mb/s per (direction, frame size), one bar per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def key(r: dict) -> tuple:
        return (r["direction"], r.get("protocol") or f"{r['payload']}B")

    keys = sorted({key(r) for r in results})
    strategies = _strategies(results)
    by: dict[tuple, list[dict]] = {}
    for r in results:
        by.setdefault((*key(r), r["strategy"]), []).append(r)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4.5))
    width = 0.8 / max(1, len(strategies))
    for i, s in enumerate(strategies):
        ys = []
        for d, p in keys:
            rs = by.get((d, p, s), [])
            ys.append(sum(r["gbps"] * 1000 for r in rs) / len(rs) if rs else 0)
        xs = [k + i * width for k in range(len(keys))]
        ax.bar(xs, ys, width, label=s)
    ax.set_xticks([k + width * (len(strategies) - 1) / 2 for k in range(len(keys))])
    ax.set_xticklabels([f"{SEED_LABEL.get(d, d)}\n{p}" for d, p in keys], fontsize=8)
    ax.set_ylabel("Mb/s")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
