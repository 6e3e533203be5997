"""Interrupt moderation (ethtool -C semantics): held, counted, never lost."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtnet.net.coalesce import CoalesceError, IrqCoalescer, parse_coalesce


def test_parse_takes_ethtool_words():
    assert parse_coalesce("rx-usecs=50, rx-frames=32,tx-frames=8") == {
        "rx-usecs": 50, "rx-frames": 32, "tx-frames": 8}  # fmt: skip


@pytest.mark.parametrize(
    "bad", ["rx-usec=5", "rx-usecs", "rx-usecs=-1", "rx-usecs=x", "adaptive-rx=on"]
)
def test_parse_names_what_is_wrong(bad):
    with pytest.raises(CoalesceError, match="expected KEY=N"):
        parse_coalesce(bad)


def test_no_moderation_sends_every_interrupt():
    c = IrqCoalescer()
    assert all(c.want(1, t) for t in range(5))
    assert not c.expire(10.0, idle=True)


def test_frames_hold_until_enough_packets_are_behind_the_interrupt():
    c = IrqCoalescer(frames=32)
    assert not c.want(10, 0.0) and not c.want(10, 0.1)
    assert c.deadline() is None  # no timer asked for
    assert not c.expire(0.2, idle=False)
    assert c.want(12, 0.2)  # 32 reached
    assert not c.expire(0.3, idle=True)  # nothing held any more


def test_frames_alone_release_a_held_interrupt_when_the_device_idles():
    c = IrqCoalescer(frames=32)
    assert not c.want(3, 0.0)
    assert c.expire(0.0, idle=True)


def test_usecs_hold_until_the_deadline_even_when_idle():
    c = IrqCoalescer(usecs=100)
    assert not c.want(1, 1.0)
    assert c.deadline() == pytest.approx(1.0001)
    assert not c.expire(1.00005, idle=True)
    assert c.expire(1.0001, idle=True)
    assert c.deadline() is None


@given(
    usecs=st.integers(0, 500), frames=st.integers(0, 64),
    events=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 300), st.booleans()), max_size=60),
)  # fmt: skip
def test_a_wanted_interrupt_is_never_held_past_its_bound(usecs, frames, events):
    """Whatever the traffic: every held interrupt goes by its deadline, or when idle
    with frames-only moderation — none is forgotten."""
    c = IrqCoalescer(usecs=usecs, frames=frames)
    now = 0.0
    held_since = None  # when the interrupt now held was first wanted, kept here
    for packets, gap_us, idle in events:
        now += gap_us / 1e6
        if c.expire(now, idle):
            held_since = None
            continue
        if c.want(packets, now):
            held_since = None
        elif held_since is None:
            held_since = now
        if c.owed and usecs:
            # The bound runs from the first held packet, not the latest; and a step
            # that leaves the interrupt held is still inside it.
            assert c.deadline() == held_since + usecs / 1e6
            assert now - held_since < usecs / 1e6
        if c.owed and frames:
            assert c.owed < frames  # "frames" packets behind it would have sent it
    # The device goes idle and time passes: nothing may stay held.
    c.expire(now + 1.0, idle=True)
    assert c.owed == 0
