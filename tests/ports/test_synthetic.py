"""The frame sink names each way a frame of its stream can be wrong, apart.

Each test feeds a stream from the generator with one thing done to it — a frame cut
short, grown, sent twice, sent late, another EtherType, a runt — and checks that only
that counter moved, so a bench run can fail for it (issue 18.4).
"""

from __future__ import annotations

import pytest

from virtnet.ports.synthetic import (
    MIN_FRAME,
    PREFIX_LEN,
    SEQ_MASK,
    SINK_COUNTS,
    FrameGen,
    FrameSink,
)


def stream(size: int, n: int) -> list[bytes]:
    gen, out = FrameGen(size), []
    for _ in range(n):
        out.append(b"".join(bytes(v) for v in gen.peek()))
        gen.advance()
    return out


def fed(frames: list[bytes]) -> tuple[FrameSink, list[bool]]:
    sink = FrameSink()
    return sink, [sink.receive(f) for f in frames]


def moved(sink: FrameSink) -> dict[str, int]:
    return {k: n for k, n in sink.stats.counts().items() if n}


def test_an_intact_stream_moves_no_counter():
    sink, ok = fed(stream(1500, 300))  # past 256: every payload offset
    assert all(ok) and moved(sink) == {} and sink.stats.packets == 300


@pytest.mark.parametrize("cut", [1000, 30, PREFIX_LEN])
def test_a_frame_cut_short_is_short(cut):
    frames = stream(1500, 3)
    frames[1] = frames[1][:cut]  # a prefix of the frame: every byte it has is right
    sink, ok = fed(frames)
    assert ok == [True, False, True]
    assert moved(sink) == {"short": 1}  # its sequence number was read: nothing lost
    assert "1500" in sink.stats.errors[0] and str(cut) in sink.stats.errors[0]


@pytest.mark.parametrize("cut", [21, 14, 5, 0])
def test_a_frame_cut_before_its_header_ends_is_short(cut):
    frames = stream(64, 3)
    frames[1] = frames[1][:cut]
    sink, ok = fed(frames)
    assert ok == [True, False, True]
    # cut before its sequence number: it is missing from the stream as well
    assert moved(sink) == {"short": 1, "lost": 1}


def test_a_frame_grown_is_long():
    frames = stream(1500, 3)
    frames[1] += frames[1][PREFIX_LEN:100]  # more of the pattern: only its header can tell
    sink, ok = fed(frames)
    assert ok == [True, False, True] and moved(sink) == {"long": 1}


def test_a_frame_sent_twice_is_duplicated():
    f = stream(64, 4)
    sink, ok = fed([f[0], f[1], f[1], f[2], f[3]])
    assert ok == [True, True, False, True, True] and moved(sink) == {"duplicated": 1}


def test_an_old_frame_again_is_duplicated_not_reordered():
    f = stream(64, 4)
    sink, _ = fed([f[0], f[1], f[2], f[0], f[3]])
    assert moved(sink) == {"duplicated": 1}


def test_a_frame_that_comes_late_is_reordered_not_lost():
    f = stream(64, 5)
    sink, ok = fed([f[0], f[2], f[1], f[3], f[4]])
    assert ok == [True, True, False, True, True]
    assert moved(sink) == {"reordered": 1}  # the gap it left is filled: nothing lost


def test_a_late_frame_inside_a_gap_leaves_the_rest_of_the_gap_lost():
    f = stream(64, 8)
    sink, _ = fed([f[0], f[5], f[3], f[3], f[6], f[7]])  # 1..4 skipped, 3 late, then again
    assert moved(sink) == {"lost": 3, "reordered": 1, "duplicated": 1}


def test_frames_the_device_dropped_are_lost_never_reordered():
    f = stream(64, 10)
    sink, ok = fed([f[0], f[3], f[4], f[9]])  # drops: only gaps forward
    assert all(ok) and moved(sink) == {"lost": 6}


def test_another_ethertype_is_foreign_and_unchecked():
    ipv4 = bytearray(stream(64, 1)[0])
    ipv4[12:14] = b"\x08\x00"
    short_arp = bytes(12) + b"\x08\x06" + bytes(4)  # 18 bytes: too short for our header
    sink, ok = fed([bytes(ipv4), short_arp, *stream(64, 2)])
    assert all(ok) and moved(sink) == {"foreign": 2}


def test_a_corrupted_byte_is_corrupt():
    frames = stream(1500, 3)
    bad = bytearray(frames[1])
    bad[700] ^= 1
    frames[1] = bytes(bad)
    sink, ok = fed(frames)
    assert ok == [True, False, True] and moved(sink) == {"corrupt": 1}


def test_the_header_carries_the_length_and_the_sequence_number():
    gen = FrameGen(MIN_FRAME)  # the smallest frame is all header
    gen.seq = 0x1_0000_0005  # past 2^32: the number on the wire wraps
    frame = bytes(gen.prefix())
    assert len(frame) == PREFIX_LEN == MIN_FRAME == 22
    assert frame[12:14] == b"\x88\xb5" and frame[14:18] == (22).to_bytes(4, "big")
    assert frame[18:22] == (5).to_bytes(4, "big")
    assert FrameGen(64).prefix()[14:18] == (64).to_bytes(4, "big")


def test_the_sequence_wraps_at_two_to_the_32_without_a_count():
    gen, sink = FrameGen(64), FrameSink()
    gen.seq = sink.expected = SEQ_MASK - 2  # a stream 2^32 frames in
    for _ in range(6):
        assert sink.receive(b"".join(bytes(v) for v in gen.peek()))
        gen.advance()
    assert moved(sink) == {}


def test_restart_begins_a_new_stream():
    f = stream(64, 3)
    sink, _ = fed(f)
    sink.restart()  # a new front-end: its generator starts at frame 0 again
    for frame in f:
        assert sink.receive(frame)
    assert moved(sink) == {}


def test_sink_counts_names_every_counter():
    assert set(FrameSink().stats.counts()) == set(SINK_COUNTS)
