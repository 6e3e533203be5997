"""``--in-process``: every queue pair's loop in the control process (``virtnet device
--in-process``, ``virtnet driver --in-process`` / ``--workers``).

The same loops, requests and supervisor as with worker processes (``LocalSet`` for
``WorkerSet``), so the same exact counts must hold, for one pair and for two; the
process has no children; a loop that raises is named and its session ended, and the
next front-end is served by a fresh loop.
"""

from __future__ import annotations

import logging
import select
from functools import partial

import pytest

from tests.vhost_user.conftest import run_driver
from tests.vhost_user.test_multiqueue import PAIRS, check_exact_per_queue, worker_pids
from tests.vhost_user.test_two_process import check_clean, drive
from virtnet.ports.backends import DeviceBackend
from virtnet.vhost_user.backend import DeviceServer
from virtnet.vhost_user.device_loop import PairLoops
from virtnet.vhost_user.local import LocalSet
from virtnet.vhost_user.worker import WorkerDied
from virtnet.vhost_user.workermsg import Connect, Dispatcher, Exit, StatsRequest

IN_PROCESS = ("--in-process",)


def test_one_pair_both_ways_exact_counts_and_no_worker(tmp_path, device_factory):
    dev = device_factory("gen:1500", extra=IN_PROCESS)
    run = drive(tmp_path, dev, "loopback", "deferred")
    assert worker_pids(dev.proc.pid) == []  # no process but the device itself
    doc = dev.stop()
    ds, rs = check_clean(doc, run, "deferred")
    assert rs["rx_packets"] > 0 and ds["tx_packets"] > 0
    assert doc["backend"]["gen_packets"] == rs["rx_packets"]
    assert doc["worker_deaths"] == 0
    assert doc["worker_cpu_seconds"] == []  # one process: its CPU is cpu_seconds alone
    assert 0 < doc["cpu_seconds"] <= doc["seconds"] * 1.5


def test_two_pairs_in_one_process_carry_exact_counts_per_queue(tmp_path, device_factory):
    dev = device_factory("loopback", extra=("--queues", str(PAIRS), *IN_PROCESS))
    run = run_driver(tmp_path, dev, "gen:200", seconds=2.0, extra=("--queues", str(PAIRS)))
    assert worker_pids(dev.proc.pid) == []
    check_exact_per_queue(run, dev.stop()["device_stats"])


def test_sessions_one_after_another_in_process(tmp_path, device_factory):
    dev = device_factory("sink", extra=IN_PROCESS)
    for n in range(2):
        run = drive(tmp_path, dev, "gen:64", "deferred", name=f"drv{n}")
        assert run.stats["tx_packets"] > 0
    doc = dev.stop()
    assert doc["sessions"] == 2
    assert doc["device_stats"]["tx_packets"] == doc["backend"]["sink_packets"]


# -- the supervisor's side, with loops that misbehave ------------------------------------


class FakeLoop:
    """A pair loop that answers requests and raises in its pass when told to."""

    def __init__(self, fail_in_pass: bool = False) -> None:
        self.running = True
        self.fail_in_pass = fail_in_pass
        self.closed = False
        self.passes = 0

    def dispatcher(self) -> Dispatcher:
        rpc = Dispatcher(None, None, (ValueError,))
        rpc.on(StatsRequest, lambda req, fds: {"passes": self.passes})
        rpc.on(Connect, self._connect)
        rpc.on(Exit, self._exit)
        return rpc

    def _connect(self, req: Connect, fds: list[int]) -> None:
        raise KeyError("a bug in the loop")

    def _exit(self, req: Exit, fds: list[int]) -> dict:
        self.running = False
        return {"passes": self.passes}

    def attach(self, ep: select.epoll) -> None:
        pass

    def watches(self, fd: int) -> bool:
        return False

    def on_fd(self, fd: int) -> None:
        pass

    def run_pass(self) -> bool:
        self.passes += 1
        if self.fail_in_pass:
            raise RuntimeError("ring walk went wrong")
        return False

    def poll_timeout(self, busy: bool) -> float:
        return 0.2

    def close(self) -> None:
        self.closed = True

    def serve(self, sock, events) -> None:  # the worker's entry: not used in process
        raise AssertionError


@pytest.fixture
def local_set():
    deaths: list[WorkerDied] = []
    ep = select.epoll()
    workers = LocalSet(ep, logging.getLogger("test"), deaths.append, lambda pair, why: None)
    yield workers, deaths
    ep.close()


def test_a_loop_raising_in_its_pass_is_named_and_closed(local_set, caplog):
    workers, deaths = local_set
    loop = FakeLoop(fail_in_pass=True)
    workers.start(0, lambda: loop, lambda: None)
    assert workers.run_passes() is False
    (death,) = deaths
    assert death.pair == 0 and "raised RuntimeError: ring walk went wrong" in str(death)
    assert "Traceback" in caplog.text and loop.closed
    assert workers.deaths == 1
    assert workers.run_passes() is False and len(deaths) == 1  # a dead pair runs no more


def test_a_request_the_loop_fails_on_is_its_death_not_a_refusal(local_set):
    workers, deaths = local_set
    workers.start(0, partial(FakeLoop), lambda: None)
    with pytest.raises(WorkerDied, match="raised KeyError"):
        workers[0].call(Connect())
    assert workers[0].status == 1


def test_finish_collects_the_last_counters_of_each_pair(local_set):
    workers, deaths = local_set
    loops = [FakeLoop(), FakeLoop()]
    for pair, loop in enumerate(loops):
        workers.start(pair, partial(lambda lp: lp, loop), lambda: None)
    workers.run_passes()
    workers.run_passes()
    assert workers.stats() == [{"passes": 2}, {"passes": 2}]
    assert workers.finish(Exit()) == [{"passes": 2}, {"passes": 2}]
    assert all(lp.closed for lp in loops) and not deaths and len(workers) == 0


# -- the driver: the same runner both ways round -----------------------------------------


def test_driver_two_pairs_in_process_carry_exact_counts_per_queue(tmp_path, device_factory):
    dev = device_factory("loopback", extra=("--queues", str(PAIRS)))
    run = run_driver(tmp_path, dev, "gen:200", seconds=2.0,
                     extra=("--queues", str(PAIRS), "--in-process"))  # fmt: skip
    check_exact_per_queue(run, dev.stop()["device_stats"])
    assert run.result["worker_cpu_seconds"] == []  # no worker: one process for both pairs


def test_driver_one_pair_in_a_worker_with_workers(tmp_path, device_factory):
    dev = device_factory("sink")
    run = run_driver(tmp_path, dev, "gen:1500", extra=("--workers",))
    doc = dev.stop()
    ds, rs = check_clean(doc, run, "deferred")
    assert rs["tx_packets"] > 0 and doc["backend"]["sink_packets"] == rs["tx_packets"]
    assert len(run.result["worker_cpu_seconds"]) == 1  # pair 0 ran in a worker of its own


class CountingPort(DeviceBackend):
    """A port that counts its closes."""

    def __init__(self) -> None:
        super().__init__()
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


def test_a_dead_in_process_loop_is_replaced_and_its_port_kept_open(tmp_path):
    port = CountingPort()
    server = DeviceServer(str(tmp_path / "vu.sock"), PairLoops([port]), in_process=True)
    try:
        first = server.workers[0]
        server.workers.died(WorkerDied(0, "raised RuntimeError: planted"))
        fresh = server.workers[0]
        assert fresh is not first and fresh.status is None and server.worker_deaths == 1
        assert fresh.loop.backend is port and port.closes == 0  # the next loop's port
    finally:
        server.workers.finish(Exit())
        server.close()
    assert port.closes >= 1
