"""Suite-wide: one rule for a missing facility (skip here, fail in CI).

A test that needs something the machine may lack (root, /dev/net/tun, QEMU, testpmd,
iperf3, hugepages) says so with ``@pytest.mark.needs(reason)`` — ``reason`` is ``None`` when
the facility is there — or, inside a fixture, calls :func:`skip_or_fail`. Without
``VIRTNET_REQUIRE_PEERS=1`` the test skips with that reason; with it (tools/test-all.sh, CI)
the test fails, so a machine without the facility cannot pass the suite silently.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ENV = "VIRTNET_REQUIRE_PEERS"


def peers_required() -> bool:
    """True when a missing facility must fail the test instead of skipping it."""
    return os.environ.get(REQUIRE_ENV) == "1"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip with ``reason``, or fail with it under ``VIRTNET_REQUIRE_PEERS=1``."""
    if peers_required():
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1: a missing facility fails)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs(reason): the facility is missing when reason is not None: skip, or fail "
        f"under {REQUIRE_ENV}=1",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        reason = mark.args[0] if mark.args else mark.kwargs.get("reason")
        if reason is not None:
            skip_or_fail(str(reason))
