"""``virtnet conform`` as a user runs it: a subprocess against a real ``virtnet device``.

* every case passes (or, where the spec defines no answer, survives) against ``virtnet
  device --backend loopback --queues 2``, every data case on split and packed rings with
  EVENT_IDX on and off (the multiqueue cases need two pairs); with ``--queues 1`` they are
  skipped, saying why; a device that offers neither RING_PACKED nor EVENT_IDX gets those
  cells "not offered";
* a device with a planted bug fails: one that loses the packed wrap counter, one that
  signals the wrong call eventfd (no rx notification with EVENT_IDX), one that echoes a
  NEEDS_CSUM header to a guest without GUEST_CSUM (main before the fix);
* a memfd that allows no seals, shrunk under the device, kills only a queue pair's worker
  (its own test says so);
* exit status 1 when the back-end answers one message wrong, and when it dies mid-run
  (that case failed, the rest "not run"); 2 for usage errors; ``--junit-xml`` parses.

The broken back-ends are ``virtnet device`` behind ``FaultyProxy``: a relay that passes
bytes and fds through unchanged, except that it rewrites the first reply of one chosen
connection, rewrites the front-end's requests, or goes away (stops listening) when a chosen
connection arrives.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vhost_user.conftest import DeviceProcess
from virtnet.conform.cases import CASES, RING_KINDS, cells, docstring_paragraphs, expand
from virtnet.vhost_user.device_loop import DEBUG_TRUST_VRING_BASE
from virtnet.vhost_user.messages import HEADER, FrontendRequest, SingleMemoryRegion, VringState

CONFORM = [sys.executable, "-m", "virtnet", "conform"]
RUN_TIMEOUT = 300  # the whole run; every case has its own --timeout inside
ALL = [c.name for c in expand(CASES)]  # the matrix cases once per ring kind x EVENT_IDX
FAMILIES = [c.name for c in CASES]
UNSEALABLE = "memfd-shrunk-unsealable"
MQ_CASES = ["mq-pairs", "mq-enable-unset-ring"]
DM_ONE = "data-mergeable/split/event-idx-off"  # one cell, where a test needs one case
# virtnet device keeps the control queue to the front-end (as QEMU): vring 2N is refused.
EXPECTED_SKIPS = {"ctrl-bounds"}


def expected_status(c) -> str:
    if c.family in EXPECTED_SKIPS:
        return "skipped"
    return "survived" if c.survive else "passed"


def conform(*args: str) -> tuple[int, str, str]:
    done = subprocess.run([*CONFORM, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def run_json(tmp_path: Path, socket_path: str, *cases: str,
             timeout: float = 20) -> tuple[int, dict, str]:  # fmt: skip
    out = tmp_path / "conform.json"
    argv = [socket_path, "--json", str(out), "--timeout", str(timeout)]
    for name in cases:
        argv += ["--case", name]
    rc, stdout, stderr = conform(*argv)
    return rc, json.loads(out.read_text()), stdout + stderr


@pytest.fixture
def loopback(device_factory) -> DeviceProcess:
    return device_factory("loopback", extra=("--queues", "2"))


def test_every_case_passes_against_virtnet_device(loopback, tmp_path):
    """The default run: every case, each data case in each of the 4 cells."""
    rc, doc, out = run_json(tmp_path, loopback.socket_path)
    statuses = {c["name"]: c["status"] for c in doc["cases"]}
    want = {c.name: expected_status(c) for c in expand(CASES)}
    assert statuses == want, f"{out}\ndevice:\n{loopback.stderr()}"
    assert rc == 0
    details = {c["name"]: c["detail"] for c in doc["cases"]}
    for ring in RING_KINDS:
        for ei in ("on", "off"):
            cell = f"{ring}/event-idx-{ei}"
            assert details[f"mq-pairs/{cell}"].startswith("2 queue pairs; pairs 0 and 1 echo")
            assert "bad frames dropped [0, 1, 2, 3, 4]" in details[f"csum-past-frame/{cell}"]
            assert "completed (a valid UDP checksum)" in details[f"csum-past-frame/{cell}"]
    assert details["vring-index-out-of-range"].startswith("vring 4 (2 queue pairs)")
    assert "vring 4 (the control queue) is refused" in details["ctrl-bounds"]
    matrix = [c for c in expand(CASES) if c.cell is not None]
    per_cell: dict[str, dict[str, int]] = {}
    for c in matrix:
        counts = per_cell.setdefault(c.cell.name, {})
        counts[expected_status(c)] = counts.get(expected_status(c), 0) + 1
    assert doc["cells"] == per_cell
    row = next(c for c in doc["cases"] if c["name"] == "data-mergeable/packed/event-idx-on")
    assert (row["case"], row["ring"], row["event_idx"]) == ("data-mergeable", "packed", True)
    assert "note: survived: the spec says nothing" in " ".join(out.split())
    assert "device running: queue pair 1" in loopback.stderr()
    assert loopback.alive()
    assert "Traceback" not in loopback.stderr()


def test_every_case_but_the_sigbus_one_passes_against_an_in_process_device(device_factory,
                                                                           tmp_path):  # fmt: skip
    """``virtnet device --in-process``: the same answers from loops in one process. The
    unsealable-memfd case is left out: its SIGBUS ends a process, and here that is the
    device itself (the option's --help says so)."""
    dev = device_factory("loopback", extra=("--queues", "2", "--in-process"))
    rc, doc, out = run_json(tmp_path, dev.socket_path, *(f for f in FAMILIES if f != UNSEALABLE))
    statuses = {c["name"]: c["status"] for c in doc["cases"]}
    want = {c.name: expected_status(c) for c in expand(CASES) if c.family != UNSEALABLE}
    assert statuses == want, f"{out}\ndevice:\n{dev.stderr()}"
    assert rc == 0
    assert dev.alive() and "Traceback" not in dev.stderr()


def test_with_one_queue_pair_the_mq_cases_are_skipped_saying_why(device_factory, tmp_path):
    one = device_factory("loopback", name="one")
    rc, doc, out = run_json(tmp_path, one.socket_path, *MQ_CASES, "vring-index-out-of-range")
    cases = {c["name"]: c for c in doc["cases"]}
    assert rc == 0, out
    mq = [n for n in cases if n.split("/")[0] in MQ_CASES]
    assert len(mq) == 5  # mq-pairs in each of its 4 cells, mq-enable-unset-ring
    for name in mq:
        assert cases[name]["status"] == "skipped", out
        assert cases[name]["detail"] == "GET_QUEUE_NUM 1: fewer than 2 queue pairs"
    oor = cases["vring-index-out-of-range"]
    assert oor["status"] == "passed" and oor["detail"].startswith("vring 2 (1 queue pair)")


def test_an_unsealable_memfd_shrunk_under_it_kills_only_a_worker(loopback, tmp_path):
    """F_SEAL_SHRINK is refused by a memfd made without MFD_ALLOW_SEALING (the log says
    so); the SIGBUS then kills the queue pair's worker, which alone touches guest
    memory: the device names it, fails that session and serves the next front-end."""
    rc, doc, out = run_json(tmp_path, loopback.socket_path, UNSEALABLE)
    (result,) = doc["cases"]
    assert rc == 0 and result["status"] == "survived", out
    err = loopback.stderr()
    assert "F_SEAL_SHRINK refused" in err
    assert "queue pair 0: its worker" in err and "was killed by SIGBUS" in err, err
    assert loopback.alive()


def test_list_names_every_case_and_help_explains(tmp_path):
    rc, stdout, _ = conform("--list")
    assert rc == 0
    for name in FAMILIES:
        assert name in stdout
    rc, stdout, _ = conform("--help")
    assert rc == 0 and "--junit-xml" in stdout and "loopback" in stdout


def test_every_case_says_what_it_sends_and_where_the_spec_says_so():
    # The summary and the rule come from the docstring's first two paragraphs: a case
    # written without the second one would list "-" as its rule.
    for c in CASES:
        assert c.summary and "\n" not in c.summary, c.name
        assert c.rule not in ("", "-") and "\n" not in c.rule, c.name


def test_a_docstring_gives_the_summary_and_the_rule_on_one_line_each():
    def probe(ctx):
        """Send one thing,
        get one answer

        VIRTIO 1.2 9.9
        """

    assert docstring_paragraphs(probe) == ("Send one thing, get one answer", "VIRTIO 1.2 9.9")
    probe.__doc__ = None  # as python -OO leaves it
    assert docstring_paragraphs(probe) == ("probe (docstrings stripped)", "-")


@pytest.mark.parametrize("argv", [[], ["/tmp/x.sock", "--case", "no-such-case"],
                                  ["/tmp/x.sock", "--timeout", "0"],
                                  ["/tmp/x.sock", "--timeout", "soon"]])  # fmt: skip
def test_usage_errors_exit_2(argv):
    rc, _, stderr = conform(*argv)
    assert rc == 2, stderr
    assert "virtnet conform" in stderr


def test_ring_and_event_idx_choose_the_cells(loopback, tmp_path):
    """--case names a whole matrix case or one cell; --ring / --event-idx cut the matrix."""
    rc, doc, out = run_json(tmp_path, loopback.socket_path, "data-mergeable", "desc-loop",
                            "tx-chains/split/event-idx-on")  # fmt: skip
    assert rc == 0, out
    assert [c["name"] for c in doc["cases"]] == [
        *(f"data-mergeable/{r}/event-idx-{e}" for r in RING_KINDS for e in ("on", "off")),
        "tx-chains/split/event-idx-on", "desc-loop"]
    out_json = tmp_path / "cut.json"
    rc, _, err = conform(loopback.socket_path, "--ring", "packed", "--event-idx", "off",
                         "--case", "data-nonmergeable", "--json", str(out_json))  # fmt: skip
    assert rc == 0, err
    assert [c["name"] for c in json.loads(out_json.read_text())["cases"]] == [
        "data-nonmergeable/packed/event-idx-off"]
    rc, _, err = conform(loopback.socket_path, "--ring", "ring", "--case", "desc-loop")
    assert rc == 2 and "choose from split, packed" in err


def test_cells_a_device_does_not_offer_are_not_offered_not_failed(device_factory, tmp_path):
    plain = device_factory("loopback", name="plain",
                           extra=("--features-off", "RING_PACKED,RING_EVENT_IDX"))  # fmt: skip
    rc, doc, out = run_json(tmp_path, plain.socket_path, "data-mergeable", "packed-id-in-flight")
    assert rc == 0, out
    statuses = {c["name"]: c["status"] for c in doc["cases"]}
    assert statuses == {"data-mergeable/split/event-idx-on": "not offered",
                        "data-mergeable/split/event-idx-off": "passed",
                        "data-mergeable/packed/event-idx-on": "not offered",
                        "data-mergeable/packed/event-idx-off": "not offered",
                        "packed-id-in-flight": "not offered"}, out  # fmt: skip
    detail = {c["name"]: c["detail"] for c in doc["cases"]}
    assert detail["data-mergeable/packed/event-idx-off"] == \
        "the back-end does not offer RING_PACKED (packed/event-idx-off)"
    assert doc["summary"]["not offered"] == 4


# -- broken back-ends ----------------------------------------------------------------


class FaultyProxy:
    """Listens at ``path`` and relays every connection to the real back-end at ``upstream``.

    ``corrupt``: on that connection (1-based), the request field of the first reply is
    changed (a reply to another request). ``die_at``: when that connection arrives it is
    closed, the proxy stops listening and its socket file goes: the back-end is gone.
    """

    def __init__(self, path: str, upstream: str, *, corrupt: int = 0, die_at: int = 0,
                 rewrite: Callable[[bytes], bytes] | None = None,
                 swap_fds: Callable[[bytes, list[int]], list[int]] | None = None,
                 ) -> None:  # fmt: skip
        self.path, self.upstream = path, upstream
        self.corrupt, self.die_at, self.rewrite = corrupt, die_at, rewrite
        self.swap_fds = swap_fds
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.connections = 0
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.connections == self.die_at:
                conn.close()
                self.close()
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(self.upstream)
            flip = self.connections == self.corrupt
            for a, b, f, rw, sw in ((conn, up, False, self.rewrite, self.swap_fds),
                                    (up, conn, flip, None, None)):  # fmt: skip
                t = threading.Thread(target=_pump, args=(a, b, f, rw, sw), daemon=True)
                t.start()
                self.threads.append(t)

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.listener.close()


def _pump(src: socket.socket, dst: socket.socket, flip: bool,
          rewrite: Callable[[bytes], bytes] | None = None,
          swap_fds: Callable[[bytes, list[int]], list[int]] | None = None) -> None:  # fmt: skip
    fd_space = socket.CMSG_SPACE(16 * 4)
    try:
        while True:
            data, anc, _flags, _ = src.recvmsg(65536, fd_space)
            if not data:
                break
            fds = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds += arr.tolist()
            if flip and len(data) >= HEADER.size:
                request, flags, size = HEADER.unpack_from(data)
                data = HEADER.pack(request + 1, flags, size) + data[HEADER.size:]
                flip = False
            if rewrite is not None:
                data = rewrite(data)
            sent = swap_fds(data, fds) if swap_fds is not None and fds else fds
            anc_out = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", sent).tobytes())]
            dst.sendmsg([data], anc_out if sent else [])
            for fd in fds:  # what we received; what swap_fds sent instead is its own
                os.close(fd)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def proxy_factory(loopback, tmp_path):
    made: list[FaultyProxy] = []

    def make(**faults) -> FaultyProxy:
        p = FaultyProxy(str(tmp_path / f"proxy{len(made)}.sock"), loopback.socket_path, **faults)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_a_wrong_reply_fails_that_case_and_exits_1(proxy_factory, tmp_path):
    proxy = proxy_factory(corrupt=1)  # connection 1 is the handshake case itself
    rc, doc, out = run_json(tmp_path, proxy.path, "handshake", "reply-ack")
    cases = {c["name"]: c for c in doc["cases"]}
    assert rc == 1, out
    assert cases["handshake"]["status"] == "failed"
    assert "came as" in cases["handshake"]["detail"]
    assert cases["reply-ack"]["status"] == "passed"  # the next connection is relayed intact


def test_the_backend_dying_fails_that_case_and_the_rest_are_not_run(proxy_factory, tmp_path):
    # Connections: 1 handshake, 2 its liveness check, 3 reply-ack -> the back-end goes.
    proxy = proxy_factory(die_at=3)
    xml = tmp_path / "conform.xml"
    rc, doc, out = run_json(tmp_path, proxy.path, "handshake", "reply-ack", DM_ONE, "desc-loop")
    statuses = [c["status"] for c in doc["cases"]]
    assert rc == 1, out
    assert statuses == ["passed", "failed", "not run", "not run"]
    assert "the back-end died" in doc["cases"][1]["detail"]
    assert doc["summary"] == {"passed": 1, "survived": 0, "failed": 1, "skipped": 0,
                              "not offered": 0, "not run": 2}  # fmt: skip
    # The same run as JUnit XML: one testcase per case, the failure with its reason.
    proxy2 = proxy_factory(die_at=3)
    rc, _, _ = conform(proxy2.path, "--junit-xml", str(xml), "--case", "handshake",
                       "--case", "reply-ack", "--case", DM_ONE)  # fmt: skip
    assert rc == 1
    suite = ET.parse(xml).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "3"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["handshake", "reply-ack", DM_ONE]
    assert cases[0].find("failure") is None and cases[0].find("skipped") is None
    assert "the back-end died" in cases[1].find("failure").get("message")
    assert "not run" in cases[2].find("skipped").get("message")
    assert suite.get("failures") == "1" and suite.get("skipped") == "1"


def keep_pair_1_enabled(data: bytes) -> bytes:
    """The front-end's SET_VRING_ENABLE 0 on vring 2 or 3 arrives as 1: a back-end that
    ignores the disable (messages are walked header by header; conform sends whole ones)."""
    out, at = bytearray(data), 0
    while at + HEADER.size <= len(out):
        request, _flags, size = HEADER.unpack_from(out, at)
        body = at + HEADER.size
        if request == FrontendRequest.SET_VRING_ENABLE and size == VringState.STRUCT.size:
            index, num = VringState.STRUCT.unpack_from(out, body)
            if index in (2, 3) and num == 0:
                VringState.STRUCT.pack_into(out, body, index, 1)
        at = body + size
    return bytes(out)


def test_mq_pairs_fails_a_backend_that_ignores_disabling_a_pair(proxy_factory, tmp_path):
    proxy = proxy_factory(rewrite=keep_pair_1_enabled)
    rc, doc, out = run_json(tmp_path, proxy.path, "mq-pairs/split/event-idx-off")
    (result,) = doc["cases"]
    assert rc == 1, out
    assert result["status"] == "failed"
    assert "pair 1: 2 rx buffers used after SET_VRING_ENABLE 0 on vrings 2 and 3" in \
        result["detail"], out


def hang_up_on_enabling_vring_3(data: bytes) -> bytes:
    """SET_VRING_ENABLE 1 on vring 3 arrives with version 0 in its flags: the device hangs
    up, as a back-end would that cannot take a ring it was never told about."""
    if len(data) == HEADER.size + VringState.STRUCT.size:
        request, _flags, size = HEADER.unpack_from(data)
        if request == FrontendRequest.SET_VRING_ENABLE and \
                VringState.STRUCT.unpack_from(data, HEADER.size) == (3, 1):
            return HEADER.pack(request, 0, size) + data[HEADER.size:]
    return data


def test_mq_enable_unset_ring_fails_a_backend_that_hangs_up(proxy_factory, tmp_path):
    proxy = proxy_factory(rewrite=hang_up_on_enabling_vring_3)
    rc, doc, out = run_json(tmp_path, proxy.path, "mq-enable-unset-ring")
    (result,) = doc["cases"]
    assert rc == 1, out
    assert result["status"] == "failed"
    assert "the back-end closed the connection, pair 0 with it" in result["detail"], out


def each_request(data: bytes, request: FrontendRequest, size: int):
    """The offsets of the payloads of ``request`` messages of ``size`` bytes in ``data``
    (messages are walked header by header; conform sends whole ones)."""
    at = 0
    while at + HEADER.size <= len(data):
        req, _flags, n = HEADER.unpack_from(data, at)
        if req == request and n == size:
            yield at + HEADER.size
        at += HEADER.size + n


def lose_packed_wrap_counter(data: bytes) -> bytes:
    """SET_VRING_BASE arrives with bit 15 clear: a packed ring starts in the wrong lap
    (wrap counter 0), as a back-end that drops the wrap counter would."""
    out = bytearray(data)
    for body in each_request(out, FrontendRequest.SET_VRING_BASE, VringState.STRUCT.size):
        index, num = VringState.STRUCT.unpack_from(out, body)
        VringState.STRUCT.pack_into(out, body, index, num & 0x7FFF)
    return bytes(out)


def test_a_device_that_loses_the_wrap_counter_fails_on_packed_rings(
    device_factory, monkeypatch, tmp_path
):
    """virtnet device repairs a packed base the ring shows is stale (docs/design.md "Ring
    starts": a fresh ring's slot 0 cannot be "used in lap 0"), so the device behind the
    proxy is told to trust SET_VRING_BASE, as a back-end with this bug would."""
    monkeypatch.setenv(DEBUG_TRUST_VRING_BASE, "1")
    dev = device_factory("loopback", extra=("--queues", "2"))
    proxy = FaultyProxy(str(tmp_path / "proxy.sock"), dev.socket_path,
                        rewrite=lose_packed_wrap_counter)  # fmt: skip
    try:
        rc, doc, out = run_json(tmp_path, proxy.path, "data-mergeable", "packed-not-available")
    finally:
        proxy.close()
    statuses = {c["name"]: c["status"] for c in doc["cases"]}
    assert rc == 1, out
    assert statuses == {"data-mergeable/split/event-idx-on": "passed",  # a split base is < 2^15
                        "data-mergeable/split/event-idx-off": "passed",
                        "data-mergeable/packed/event-idx-on": "failed",
                        "data-mergeable/packed/event-idx-off": "failed",
                        "packed-not-available": "failed"}, out  # fmt: skip


def test_a_lost_wrap_counter_the_ring_shows_is_repaired(loopback, proxy_factory, tmp_path):
    """The same proxy in front of virtnet device as it is: each packed ring's base is
    stale for sure, the device continues from where its descriptors say, and says so."""
    proxy = proxy_factory(rewrite=lose_packed_wrap_counter)
    rc, doc, out = run_json(tmp_path, proxy.path, "data-mergeable")
    assert rc == 0 and {c["status"] for c in doc["cases"]} == {"passed"}, out
    assert "SET_VRING_BASE 0x0 is stale" in loopback.stderr(), loopback.stderr()


def test_a_device_that_signals_the_wrong_eventfd_fails_with_event_idx(proxy_factory, tmp_path):
    """rx's SET_VRING_CALL reaches the device with another eventfd: the frames still echo
    (conform polls), but with EVENT_IDX the device passed used_event without a word."""
    spare: list[int] = []

    def other_call_fd(data: bytes, fds: list[int]) -> list[int]:
        if any(True for _ in each_request(data, FrontendRequest.SET_VRING_CALL, 8)) and \
                int.from_bytes(data[HEADER.size:HEADER.size + 8], "little") & 0xFF == 0:
            spare.append(os.eventfd(0, os.EFD_NONBLOCK))
            return [spare[-1]]
        return fds

    proxy = proxy_factory(swap_fds=other_call_fd)
    try:
        rc, doc, out = run_json(tmp_path, proxy.path, "data-mergeable")
    finally:
        for fd in spare:
            os.close(fd)
    statuses = {c["name"]: c["status"] for c in doc["cases"]}
    assert rc == 1, out
    assert statuses == {"data-mergeable/split/event-idx-on": "failed",
                        "data-mergeable/split/event-idx-off": "passed",
                        "data-mergeable/packed/event-idx-on": "failed",
                        "data-mergeable/packed/event-idx-off": "passed"}, out  # fmt: skip
    failed = [c["detail"] for c in doc["cases"] if c["status"] == "failed"]
    assert "used past the driver's used_event, no notification" in failed[0]
    assert "used past the driver's event descriptor (off_wrap), no notification" in failed[1]


def test_junit_xml_of_a_full_run_has_one_testcase_per_case(loopback, tmp_path):
    xml = tmp_path / "all.xml"
    # One cell (the matrix runs in full above): every case family, split, EVENT_IDX off.
    one_cell = expand(CASES, cells(["split"], ["off"]))
    cases = [c.name for c in one_cell if c.family != UNSEALABLE]
    argv = [loopback.socket_path, "--junit-xml", str(xml), "--ring", "split",
            "--event-idx", "off"]  # fmt: skip
    for n in cases:
        argv += ["--case", n]
    rc, out, err = conform(*argv)
    suite = ET.parse(xml).getroot()
    names = [c.get("name") for c in suite.findall("testcase")]
    assert names == cases
    failures = [c for c in suite.findall("testcase") if c.find("failure") is not None]
    assert int(suite.get("failures")) == len(failures) == (1 if rc else 0), out + err


def test_a_backend_that_never_answers_fails_at_the_case_timeout(tmp_path):
    """Connections are queued (listen backlog) but never served: the case is killed at
    --timeout, the liveness check gives up within another, and the run still ends."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "hang.sock")
    listener.bind(path)
    listener.listen(64)
    try:
        rc, doc, out = run_json(tmp_path, path, "handshake", timeout=2)
    finally:
        listener.close()
    (result,) = doc["cases"]
    assert rc == 1, out
    assert result["status"] == "failed"
    assert "no end within 2s" in result["detail"]
    assert result["seconds"] < 15


# -- a back-end that is not set up for the data cases ----------------------------------


def test_against_a_sink_the_report_says_the_data_cases_need_a_loopback(device_factory, tmp_path):
    """``virtnet device --backend sink`` echoes nothing: the data cases fail with "0 of N
    frames came back", and the report says why and what to start instead."""
    sink = device_factory("sink", name="sink")
    rc, doc, out = run_json(tmp_path, sink.socket_path, "handshake", DM_ONE,
                            "data-nonmergeable/split/event-idx-off")  # fmt: skip
    cases = {c["name"]: c for c in doc["cases"]}
    assert rc == 1, out
    assert cases["handshake"]["status"] == "passed" and cases["handshake"]["echoed"] is None
    for name in (DM_ONE, "data-nonmergeable/split/event-idx-off"):
        assert cases[name]["status"] == "failed" and cases[name]["echoed"] is False, out
        assert cases[name]["detail"].startswith("0 of "), out
        assert "frames came back on rx" in cases[name]["detail"]
    (hint,) = doc["hints"]
    assert "need a back-end that sends every frame it receives back" in hint
    assert "virtnet device --socket-path P --backend loopback" in hint
    assert "hint: No data case got a single frame back" in " ".join(out.split())


def test_against_a_loopback_there_is_no_hint(loopback, tmp_path):
    rc, doc, out = run_json(tmp_path, loopback.socket_path, "handshake", "data-mergeable")
    assert rc == 0, out
    assert doc["hints"] == [] and doc["cases"][1]["echoed"] is True
    assert "hint:" not in out


def stale_base_after_first_start():
    """From a ring's second start on, SET_VRING_BASE arrives as 3 instead of what the
    front-end sent: the back-end keeps an index from before the stop, as one does whose
    reset forgets the queue state (rust-vmm "get_vring_base should not reset the queue")."""
    starts: dict[int, int] = {}

    def rewrite(data: bytes) -> bytes:
        out = bytearray(data)
        for body in each_request(out, FrontendRequest.SET_VRING_BASE, VringState.STRUCT.size):
            index, num = VringState.STRUCT.unpack_from(out, body)
            starts[index] = starts.get(index, 0) + 1
            if starts[index] > 1:
                VringState.STRUCT.pack_into(out, body, index, (num & ~0x7FFF) | 3)
        return bytes(out)

    return rewrite


def test_the_lifecycle_cases_pass_and_a_stale_index_fails_them(loopback, proxy_factory,
                                                               tmp_path):  # fmt: skip
    names = ("guest-reboot", "reset-device", "reconnect", "vanishing-frontends")
    rc, doc, out = run_json(tmp_path, loopback.socket_path, *names)
    assert rc == 0, out
    proxy = proxy_factory(rewrite=stale_base_after_first_start())
    rc, doc, out = run_json(tmp_path, proxy.path, "guest-reboot")
    cases = {c["name"]: c for c in doc["cases"]}
    assert rc == 1, out
    # A split ring has its used index in memory: the device continues from it rather than
    # from a base that disagrees (stale-vring-base). A packed ring has none to go by.
    status = {name: c["status"] for name, c in cases.items()}
    assert status == {f"guest-reboot/{ring}/event-idx-{on}": "passed" if ring == "split"
                      else "failed" for ring in ("split", "packed") for on in ("on", "off")}, out
    assert "the back-end used 0 of 1 tx buffers" in \
        cases["guest-reboot/packed/event-idx-on"]["detail"], out  # fmt: skip
    assert loopback.alive()


def misplace_hotplugged_regions():
    """Every ADD_MEM_REG after the first arrives 1 MiB higher in guest-physical space: the
    back-end maps a hot-plugged region where the guest's descriptors do not point."""
    added = [0]

    def rewrite(data: bytes) -> bytes:
        out = bytearray(data)
        for body in each_request(out, FrontendRequest.ADD_MEM_REG, SingleMemoryRegion.SIZE):
            added[0] += 1
            if added[0] > 1:
                at = body + 8  # past the u64 padding: the region's guest_phys_addr
                gpa = int.from_bytes(out[at : at + 8], "little")
                out[at : at + 8] = (gpa + (1 << 20)).to_bytes(8, "little")
        return bytes(out)

    return rewrite


def test_mem_slots_pass_and_a_misplaced_region_fails_them(loopback, proxy_factory, tmp_path):
    rc, doc, out = run_json(tmp_path, loopback.socket_path, "mem-slots", "mem-slots-refusals")
    status = {c["name"]: c["status"] for c in doc["cases"]}
    assert status == {"mem-slots": "passed", "mem-slots-refusals": "survived"}, out
    details = {c["name"]: c["detail"] for c in doc["cases"]}
    assert "echoed through region gpa 0x4000000 after the third was removed" in \
        details["mem-slots"]  # fmt: skip
    assert details["mem-slots-refusals"].count("refused (REPLY_ACK") == 3, out
    proxy = proxy_factory(rewrite=misplace_hotplugged_regions())
    rc, doc, out = run_json(tmp_path, proxy.path, "mem-slots")
    (case,) = doc["cases"]
    assert rc == 1 and case["status"] == "failed", out
    assert "frames came back on rx" in case["detail"] or "tx buffers" in case["detail"], out
    assert loopback.alive()


def test_server_mode_against_a_device_that_connects(tmp_path):
    """``--server``: conform listens, `virtnet device --client` connects for each session
    (again after every one ends), and the lifecycle cases run as against a listener."""
    from tests.vhost_user.test_client_mode import start_client_device

    sock = str(tmp_path / "conform.sock")
    out = tmp_path / "conform.json"
    names = ("handshake", "reconnect", "guest-reboot", "inflight-region")
    argv = [*CONFORM, sock, "--server", "--json", str(out), "--ring", "packed"]
    for name in names:
        argv += ["--case", name]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    dev = start_client_device(tmp_path, sock, "loopback")
    try:
        text, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        dev.proc.kill()
        dev.proc.wait(timeout=10)
    assert proc.returncode == 0, text
    statuses = {c["name"]: c["status"] for c in json.loads(out.read_text())["cases"]}
    assert set(statuses.values()) == {"passed"}, text
    assert len(statuses) == 7, statuses  # handshake, then 3 matrix cases in 2 cells each
    assert "listening on" in text and not os.path.exists(sock)  # the socket is removed after


def test_server_mode_with_nobody_connecting_counts_the_backend_as_gone(tmp_path):
    sock = str(tmp_path / "conform.sock")
    rc, out, err = conform(sock, "--server", "--case", "handshake", "--case", "reconnect")
    assert rc == 1, out + err
    assert "no back-end connected to" in out + err and "within 5s" in out + err
    assert "not run" in out + err  # the rest, after the back-end is counted gone
