"""Fixtures for the real-traffic tests: root, /dev/net/tun, and a Topology cleaned up after."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from tests.conftest import skip_or_fail

from virtnet.ports.netns import Topology, list_netns
from virtnet.ports.tap import TUN_PATH


def root_skip_reason() -> str | None:
    """Why the real-traffic tests cannot run here, or None when they can (CI is root)."""
    if os.geteuid() != 0:
        return "needs root: network namespaces and TUNSETIFF need CAP_NET_ADMIN"
    if not os.path.exists(TUN_PATH):
        return f"{TUN_PATH} is missing (no tun module)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tag every test that needs root with the "root" marker, so `-m "not root"` selects
    # the unit tests; the fixture itself decides skip-or-run.
    for item in items:
        if "root_tun" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.root)


@pytest.fixture
def root_tun() -> None:
    reason = root_skip_reason()
    if reason:
        skip_or_fail(reason)


@pytest.fixture
def topo(root_tun: None) -> Iterator[Topology]:
    """A Topology whose namespaces are checked to be gone after the test."""
    with Topology() as t:
        yield t
        made = list(t.namespaces)
    # Other sessions may own vn- namespaces of their own: check only ours.
    assert not set(made) & set(list_netns()), f"namespaces left behind: {made}"
