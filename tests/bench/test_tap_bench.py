"""virtnet bench --tap reports ping RTT through each path next to its rate.

The parser is checked on ping's real output shapes (no root); the cases (root) run each
path — virtnet, veth, the Python relay — for a short iperf3 and must carry every ping.
Benchmarks measure, tests assert behaviour: no rate, no time is asserted.
"""

from __future__ import annotations

import pytest

from virtnet.bench.ping import PING_COUNT, PingError, parse_ping, rtt_text
from virtnet.bench.report import tap_table
from virtnet.bench.tap import GUEST_TO_HOST, TapCase, run_tap_case, unavailable_reason

OK = """PING 10.77.2.1 (10.77.2.1) 56(84) bytes of data.

--- 10.77.2.1 ping statistics ---
100 packets transmitted, 100 received, 0% packet loss, time 1190ms
rtt min/avg/max/mdev = 0.311/0.702/2.180/0.220 ms
"""
LOST = """--- 10.77.2.1 ping statistics ---
3 packets transmitted, 0 received, 100% packet loss, time 2030ms
"""


def test_ping_statistics_are_parsed():
    assert parse_ping(OK) == {"sent": 100, "received": 100, "min_ms": 0.311, "avg_ms": 0.702,
                              "max_ms": 2.18, "mdev_ms": 0.22}  # fmt: skip
    lost = parse_ping(LOST)
    assert (lost["sent"], lost["received"], lost["avg_ms"]) == (3, 0, None)
    with pytest.raises(PingError, match="no ping statistics"):
        parse_ping("ping: connect: Network is unreachable\n")


def test_rtt_text_spans_several_runs():
    a, b = parse_ping(OK), parse_ping(OK.replace("0.311/0.702/2.180", "0.200/0.900/1.000"))
    assert rtt_text([a, b]) == "0.200/0.801/2.180"
    assert rtt_text([parse_ping(LOST)]) == rtt_text([]) == "-"


@pytest.mark.root
@pytest.mark.needs(unavailable_reason())
def test_every_path_reports_its_ping_next_to_its_rate():
    cases = [TapCase(s, GUEST_TO_HOST, "tcp", seconds=1) for s in ("veth", "relay", "deferred")]
    recs = [run_tap_case(c) for c in cases]
    for rec in recs:
        rtt = rec["rtt_ms"]
        assert rtt["sent"] == rtt["received"] == PING_COUNT, rec["strategy"]
        assert 0 < rtt["min_ms"] <= rtt["avg_ms"] <= rtt["max_ms"]
        assert rec["bytes"] > 0
    rows = tap_table(recs, "t").columns[0]._cells
    assert "ping rtt ms" in rows
