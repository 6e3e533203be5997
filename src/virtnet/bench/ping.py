"""Ping RTT through a path: ``ping -c N -i 0.01`` inside a namespace, parsed.

Reported next to a throughput so that a change which buys rate with latency
(interrupt moderation, batching, busy polling) shows its cost. Bounded: N
echo requests 10 ms apart, each waited for at most a second.
"""

from __future__ import annotations

import re
import subprocess

from virtnet.ports.netns import netns_argv

PING_COUNT = 100
PING_INTERVAL = 0.01  # seconds; below 0.2 s ping needs root, which --tap has anyway
PING_WAIT = 1  # seconds ping waits for the last reply
_SENT = re.compile(r"(\d+) packets transmitted, (\d+) received")
_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


class PingError(RuntimeError):
    """ping's output had no statistics (it did not run, or was killed)."""


def ping_argv(dst: str, count: int = PING_COUNT) -> list[str]:
    """The ping command (to run inside a namespace: ``Topology.popen`` / ``ping_in``)."""
    return ["ping", "-n", "-q", "-c", str(count), "-i", f"{PING_INTERVAL:g}",
            "-W", str(PING_WAIT), dst]  # fmt: skip


def ping_in(netns: str, dst: str, count: int = PING_COUNT) -> dict:
    """Ping ``dst`` from ``netns`` over a path that needs no driving loop here."""
    proc = subprocess.run(netns_argv(netns, ping_argv(dst, count)), capture_output=True,
                          text=True, timeout=ping_timeout(count))  # fmt: skip
    return parse_ping(proc.stdout + proc.stderr)


def ping_timeout(count: int = PING_COUNT) -> float:
    """Seconds after which a ping run counts as hung."""
    return count * (PING_INTERVAL + 0.05) + PING_WAIT + 10


def parse_ping(text: str) -> dict:
    """``ping -q`` output → sent, received, min/avg/max/mdev in ms (None: no reply)."""
    sent = _SENT.search(text)
    if sent is None:
        raise PingError(f"no ping statistics in {text[-300:]!r}")
    rtt = _RTT.search(text)
    keys = ("min_ms", "avg_ms", "max_ms", "mdev_ms")
    values = [float(x) for x in rtt.groups()] if rtt else [None] * 4
    return {"sent": int(sent.group(1)), "received": int(sent.group(2))} | dict(
        zip(keys, values, strict=True))  # fmt: skip


def rtt_text(rtts: list[dict]) -> str:
    """min/avg/max over several ping runs (min of mins, mean of avgs, max of maxes)."""
    got = [r for r in rtts if r and r.get("avg_ms") is not None]
    if not got:
        return "-"
    lo = min(r["min_ms"] for r in got)
    avg = sum(r["avg_ms"] for r in got) / len(got)
    hi = max(r["max_ms"] for r in got)
    return f"{lo:.3f}/{avg:.3f}/{hi:.3f}"
