"""What an XDP program that returns no action is told: which verdicts there are."""

from __future__ import annotations

import logging

import pytest

from tests.net.conftest import MRG, make_pair
from virtnet.net.xdp import XDP_ABORTED, XdpHook


@pytest.mark.parametrize("verdict", ["PASS", 5, None])
def test_a_verdict_that_is_no_action_names_the_ones_that_are(verdict, caplog):
    p = make_pair("deferred", MRG)
    hook = XdpHook(lambda data, frags: verdict, p.drv.stats, name="prog")
    view = memoryview(bytearray(64))
    with caplog.at_level(logging.ERROR, logger="virtnet.xdp"):
        assert hook.run([view]) is XDP_ABORTED
    text = caplog.text
    assert f"returned {verdict!r}, not an XDP action" in text
    assert "XdpAction.PASS" in text and "0-4" in text and "4 REDIRECT" in text
