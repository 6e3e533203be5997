"""Fixtures for tests against real peers (DPDK testpmd); the harness itself is dpdk.py."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# the harness lives next to this file; make "import dpdk" work under any --import-mode
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from dpdk import (  # noqa: E402
    Hugepages,
    PeerUnavailable,
    Port,
    Testpmd,
    cpu_pair,
    ensure_hugepages,
    find_testpmd,
)
from tests.conftest import skip_or_fail  # noqa: E402

# -m 256 with 2 MiB pages = 128 pages a testpmd; two of them plus room for whatever else
# (a QEMU test, another testpmd) is running on the machine.
FREE_PAGES_NEEDED = 300

@pytest.fixture(scope="session")
def hugepages() -> Hugepages:
    """2 MiB hugepages with room for two testpmds; skips only if the kernel has none at all."""
    try:
        return ensure_hugepages(n_2mb=512, free_2mb=FREE_PAGES_NEEDED)
    except PeerUnavailable as absent:
        skip_or_fail(str(absent))
        raise  # unreachable: skip/fail raised


@pytest.fixture(scope="session")
def testpmd_bin() -> str:
    try:
        return find_testpmd()
    except PeerUnavailable as absent:
        skip_or_fail(str(absent))
        raise


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for vhost-user sockets: sun_path holds only 108 bytes, and pytest's
    tmp_path for a long test name is already close to that."""
    path = Path(tempfile.mkdtemp(prefix="vn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


TestpmdFactory = Callable[..., Testpmd]


@pytest.fixture
def testpmd(hugepages: Hugepages, testpmd_bin: str, tmp_path: Path) -> Iterator[TestpmdFactory]:
    """``testpmd(port, side=0, **Testpmd_kwargs)`` starts a testpmd and returns it.

    ``side`` picks the cpus (cpu_pair) so two peers forward on different cores. Whatever is
    still running at teardown is stopped, last started first; logs stay in tmp_path.
    """
    started: list[Testpmd] = []

    def make(port: Port, *, side: int = 0, **kwargs: object) -> Testpmd:
        kwargs.setdefault("cpus", cpu_pair(side))
        kwargs.setdefault("huge_dir", hugepages.mount)
        log_path = tmp_path / f"testpmd{len(started)}-{type(port).__name__}.log"
        pmd = Testpmd(port, log_path=log_path, binary=testpmd_bin, **kwargs)  # type: ignore[arg-type]
        started.append(pmd)
        return pmd.start()

    yield make
    for pmd in reversed(started):
        if pmd.proc is not None and pmd.final is None:
            pmd.stop(check=False)
