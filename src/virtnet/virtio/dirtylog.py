"""Dirty page logging for live migration (vhost-user.rst "Migration"), sans-I/O.

While VHOST_F_LOG_ALL is negotiated, a back-end sets bit ``gpa / 4096`` of the
front-end's log bitmap for every guest page it writes (rx data, used rings,
packed descriptors written back), so the front-end copies those pages again.
As DPDK's ``vhost_log_cache_write`` / ``vhost_log_cache_sync`` do, writes are
cached here as page numbers and flushed once per burst with one OR per bitmap
word, so the shared bitmap sees a handful of stores per burst, not one per
packet.

Atomicity: the front-end clears the bitmap while the device runs (QEMU's
``vhost_log_sync`` swaps each word for 0 with an atomic xchg). A plain
read-modify-write of a word would then re-set bits QEMU just took (a page
copied once more: harmless), and two writers ORing one word at once (two
queue pairs' workers) could lose a bit. ``set_word`` is therefore the caller's:
the back-end passes a real atomic fetch-or (``vhost_user/logmap.py``, libatomic's
``__atomic_fetch_or_8`` through ctypes); without one (tests on a bytearray, a
machine without libatomic) the plain OR below is used, and that loss is
possible between concurrent writers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, final

VHOST_LOG_PAGE: Final = 0x1000  # one bit per 4 KiB page of guest-physical memory
LOG_PAGE_SHIFT: Final = 12
LOG_WORD_BITS: Final = 64  # QEMU's vhost_log_chunk_t is an unsigned long (x86-64)
LOG_WORD_SHIFT: Final = 6

# set_word(word_index, mask): OR ``mask`` into 64-bit word ``word_index`` of the bitmap.
SetWord = Callable[[int, int], None]


@final
class DirtyLog:
    """The front-end's dirty bitmap (any writable buffer) and the pages cached for it."""

    def __init__(self, bitmap: memoryview, set_word: SetWord | None = None) -> None:
        self.bitmap: memoryview = bitmap.cast("B") if bitmap.format != "B" else bitmap
        self.size = self.bitmap.nbytes
        self.words = self.size // 8
        self._set_word: SetWord | None = set_word
        self._pages: set[int] = set()
        self.pages_logged = 0  # bits set, counted once per flush they were cached in
        self.flushes = 0  # flushes that set at least one bit (DPDK's log syncs)
        self.beyond = 0  # pages past the bitmap's end: a log too small for the memory

    def log_write(self, gpa: int, length: int) -> None:
        """Record a device write of ``length`` bytes at guest-physical ``gpa``."""
        if length <= 0:
            return
        first = gpa >> LOG_PAGE_SHIFT
        last = (gpa + length - 1) >> LOG_PAGE_SHIFT
        pages = self._pages
        if first == last:
            pages.add(first)
            return
        for page in range(first, last + 1):
            pages.add(page)

    def log_ring(self, gpa: int, start: int, n: int, num: int, elem_size: int) -> None:
        """Record a device write of ``n`` entries from slot ``start`` on, in a ring of
        ``num`` ``elem_size``-byte entries at ``gpa``, wrapping at the ring's end (a
        split ring's used entries, a packed ring's descriptors)."""
        if n >= num:
            self.log_write(gpa, num * elem_size)
        elif start + n <= num:
            self.log_write(gpa + start * elem_size, n * elem_size)
        else:
            self.log_write(gpa + start * elem_size, (num - start) * elem_size)
            self.log_write(gpa, (start + n - num) * elem_size)

    def pending(self) -> int:
        """Pages cached and not flushed yet."""
        return len(self._pages)

    def flush(self) -> int:
        """Set every cached page's bit, one OR per 64-bit word; the pages flushed."""
        pages = self._pages
        if not pages:
            return 0
        masks: dict[int, int] = {}
        for page in pages:
            word = page >> LOG_WORD_SHIFT
            masks[word] = masks.get(word, 0) | 1 << (page & (LOG_WORD_BITS - 1))
        n = len(pages)
        pages.clear()
        for word, mask in masks.items():
            self._or_word(word, mask)
        self.pages_logged += n
        self.flushes += 1
        return n

    def _or_word(self, word: int, mask: int) -> None:
        if word < 0:  # an address nothing translated (rings.log_addrs): no page
            self.beyond += bin(mask).count("1")
            return
        if word < self.words:
            set_word = self._set_word
            if set_word is not None:
                set_word(word, mask)
                return
        bitmap = self.bitmap
        base = word * 8
        for k in range(8):
            byte = mask >> (8 * k) & 0xFF
            if not byte:
                continue
            if base + k >= self.size:
                self.beyond += bin(byte).count("1")
                continue
            bitmap[base + k] |= byte

    def is_set(self, page: int) -> bool:
        """Whether ``page``'s bit is set in the bitmap (tests, the conform check)."""
        index = page >> 3
        return index < self.size and bool(self.bitmap[index] >> (page & 7) & 1)
