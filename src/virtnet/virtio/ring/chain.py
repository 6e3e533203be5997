"""What both ring layouts share: a popped descriptor chain, indirect table memory.

``Chain`` is what a device's ``pop`` returns, split or packed, so ``net/`` never
knows which ring it runs on; ``IndirectArea`` is the driver's memory for indirect
tables, used the same way by both drivers. ``split`` re-exports all three names.
"""

from __future__ import annotations

from typing import Final, final

from virtnet.virtio.ring.layout import DESC_SIZE

Segment = tuple[int, int]  # (guest-physical address, length)


@final
class IndirectArea:
    """Guest memory for indirect tables: one slot of ``max_descs`` per head.

    Linux kmallocs a table per buffer; a fixed slot per head id is the same
    thing without an allocator, since a head owns at most one table.
    """

    def __init__(self, gpa: int, view: memoryview, num: int, max_descs: int) -> None:
        if view.nbytes < num * max_descs * DESC_SIZE:
            raise ValueError("indirect area is smaller than num * max_descs * 16")
        self.gpa = gpa
        self.max_descs = max_descs
        self.stride = max_descs * DESC_SIZE
        self.table: memoryview = view[: num * self.stride].cast("Q")

    @staticmethod
    def size(num: int, max_descs: int) -> int:
        return num * max_descs * DESC_SIZE


# The empty side of a one-descriptor chain, shared: a popped chain's lists are read,
# never appended to, so the fast paths make one list per chain instead of two.
NO_SEGMENTS: Final[list[memoryview]] = []


@final
class Chain:
    """One available descriptor chain, validated and translated.

    ``readable`` / ``writable`` are memoryviews into guest memory in chain
    order; ``segments`` the raw (address, length, writable) triples. ``head``
    is the split ring's head index or the packed ring's buffer id: what
    ``push_used`` takes back.
    """

    __slots__ = ("head", "readable", "writable", "_segments", "_addr", "in_len", "out_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview] | None = None,
        writable: list[memoryview] | None = None,
        segments: list[tuple[int, int, bool]] | None = None,
        in_len: int = 0,
        out_len: int = 0,
        direct_addr: int | None = None,
    ) -> None:
        self.head = head
        self.readable: list[memoryview] = [] if readable is None else readable
        self.writable: list[memoryview] = [] if writable is None else writable
        # ``direct_addr``: a chain of one direct descriptor at that address, whose
        # segments list is made only if someone asks (the data path never does: the
        # rings' fast paths would otherwise build a list and a tuple per chain).
        self._addr = 0 if direct_addr is None else direct_addr
        self._segments: list[tuple[int, int, bool]] | None = (
            segments if segments is not None else None if direct_addr is not None else []
        )
        self.in_len = in_len
        self.out_len = out_len

    @property
    def segments(self) -> list[tuple[int, int, bool]]:
        """The raw (address, length, writable) triples, in chain order."""
        segs = self._segments
        if segs is None:
            write = bool(self.writable)
            segs = [(self._addr, self.in_len if write else self.out_len, write)]
            self._segments = segs
        return segs

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, out={self.out_len}, in={self.in_len})"
