"""DirtyLog (virtio/dirtylog.py): any writes set exactly their pages' bits, once flushed;
and the log map's atomic OR (vhost_user/logmap.py) loses no bit between processes."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from virtnet.vhost_user.logmap import MappedLog
from virtnet.virtio.dirtylog import VHOST_LOG_PAGE, DirtyLog

LOG_BYTES = 64  # 512 pages: 2 MiB of guest memory
SPACE = LOG_BYTES * 8 * VHOST_LOG_PAGE

writes = st.lists(st.tuples(st.integers(0, SPACE - 1), st.integers(0, 3 * VHOST_LOG_PAGE)),
                  max_size=40)  # fmt: skip


def pages_of(ws: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for gpa, n in ws:
        if n > 0:
            out |= set(range(gpa // VHOST_LOG_PAGE, (gpa + n - 1) // VHOST_LOG_PAGE + 1))
    return out


def bits(buf: bytes | bytearray) -> set[int]:
    return {8 * i + k for i, b in enumerate(buf) for k in range(8) if b >> k & 1}


@given(writes, st.integers(1, 4))
def test_any_writes_set_exactly_their_pages_bits(ws, flushes):
    buf = bytearray(LOG_BYTES)
    log = DirtyLog(memoryview(buf))
    expected = pages_of(ws)
    inside = {p for p in expected if p < LOG_BYTES * 8}
    chunk = max(1, len(ws) // flushes)
    beyond = 0  # counted per flush, as pages_logged: a page past the end in two flushes is 2
    for k in range(0, len(ws), chunk):
        for gpa, n in ws[k : k + chunk]:
            log.log_write(gpa, n)
        log.flush()
        beyond += sum(1 for p in pages_of(ws[k : k + chunk]) if p >= LOG_BYTES * 8)
    assert bits(buf) == inside
    assert log.beyond == beyond
    assert all(log.is_set(p) for p in inside)


@given(st.data(), st.sampled_from([8, 16, VHOST_LOG_PAGE]), st.integers(1, 256))
def test_a_ring_span_logs_exactly_its_slots_wrapping_at_the_end(data, elem_size, num):
    # A split ring's used entries (8 bytes) or a packed ring's descriptors (16), n of
    # them from slot start: every slot's bytes, the ring's end wrapping to its start.
    # Page-sized entries: each slot its own bit, so a slot too many or too few shows.
    start = data.draw(st.integers(0, num - 1))
    n = data.draw(st.integers(0, 2 * num))
    gpa = data.draw(st.integers(0, SPACE // 2))
    buf = bytearray(LOG_BYTES)
    log = DirtyLog(memoryview(buf))
    log.log_ring(gpa, start, n, num, elem_size)
    log.flush()
    slots = {(start + k) % num for k in range(min(n, num))}
    assert bits(buf) == pages_of([(gpa + slot * elem_size, elem_size) for slot in slots])


@given(writes)
def test_the_word_setter_gets_one_or_per_word_and_the_same_bits(ws):
    buf = bytearray(LOG_BYTES)
    calls: list[tuple[int, int]] = []

    def set_word(word: int, mask: int) -> None:
        calls.append((word, mask))
        old = int.from_bytes(buf[8 * word : 8 * word + 8], "little")
        buf[8 * word : 8 * word + 8] = (old | mask).to_bytes(8, "little")

    log = DirtyLog(memoryview(buf), set_word)
    for gpa, n in ws:
        log.log_write(gpa, n)
    log.flush()
    assert bits(buf) == {p for p in pages_of(ws) if p < LOG_BYTES * 8}
    words = [w for w, _ in calls]
    assert len(words) == len(set(words))  # one OR per word per flush (DPDK's log cache)


def test_nothing_is_written_before_the_flush_and_an_empty_flush_is_free():
    buf = bytearray(LOG_BYTES)
    log = DirtyLog(memoryview(buf))
    assert log.flush() == 0 and log.flushes == 0
    log.log_write(0x5000, 1)
    log.log_write(0x5FFF, 2)  # pages 5 and 6
    assert not any(buf) and log.pending() == 2
    assert log.flush() == 2
    assert bits(buf) == {5, 6} and log.pages_logged == 2 and log.flushes == 1


def test_addresses_nothing_translated_log_nothing():
    buf = bytearray(LOG_BYTES)
    log = DirtyLog(memoryview(buf))
    log.log_write(-(1 << 63), 16)  # rings.log_addrs for an address in no region
    log.flush()
    assert not any(buf) and log.beyond == 1


def _hammer(path_fd: int, size: int, start: int, step: int) -> None:
    log = MappedLog(path_fd, size, 0)
    dl = log.dirty_log()
    for page in range(start, size * 8, step):
        dl.log_write(page * VHOST_LOG_PAGE, 1)
        dl.flush()  # one atomic OR per page: the most contention there can be
    log.close()


def test_two_writers_on_the_same_words_lose_no_bit():
    """Two workers (two queue pairs) OR into the same 64-bit words at once; with the
    libatomic fetch-or no bit is lost (a plain read-modify-write could lose some)."""
    size = 4096
    fd = os.memfd_create("log", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    try:
        probe = MappedLog(fd, size, 0)
        assert probe.atomic, "libatomic's __atomic_fetch_or_8 is not available here"
        probe.close()
        pids = []
        for start in (0, 1):  # interleaved: every word written by both
            pid = os.fork()
            if pid == 0:
                try:
                    _hammer(fd, size, start, 2)
                finally:
                    os._exit(0)
            pids.append(pid)
        for pid in pids:
            assert os.waitpid(pid, 0)[1] == 0
        assert os.pread(fd, size, 0) == b"\xff" * size
    finally:
        os.close(fd)
