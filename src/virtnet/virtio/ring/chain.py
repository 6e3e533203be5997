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

    A chain of one direct descriptor inside the lowest memory region (nearly every
    buffer on the data path) is made by ``direct``: it keeps that region's view and its
    offset in it (``region``, ``offset``) and makes its own view, the list holding it and
    its segments only when asked. Compiled, that view is about 800 instructions of a
    popped chain's 2 500; the device writes a frame that fits straight into ``region``.
    """

    __slots__ = (
        "head", "_readable", "_writable", "_segments", "_addr", "region", "offset",
        "in_len", "out_len",
    )

    def __init__(
        self,
        head: int,
        readable: list[memoryview] | None = None,
        writable: list[memoryview] | None = None,
        segments: list[tuple[int, int, bool]] | None = None,
        in_len: int = 0,
        out_len: int = 0,
        direct_addr: int = -1,
    ) -> None:
        self.head = head
        # None here (``direct`` only): the one view is made when first asked for.
        self._readable: list[memoryview] | None = [] if readable is None else readable
        self._writable: list[memoryview] | None = [] if writable is None else writable
        # ``direct_addr`` (not -1): a chain of one direct descriptor at that address,
        # whose segments list is made only if someone asks (the data path never does:
        # the rings' fast paths would otherwise build a list and a tuple per chain).
        self._addr = direct_addr
        self._segments: list[tuple[int, int, bool]] | None = (
            segments if segments is not None else None if direct_addr >= 0 else []
        )
        # The lowest region's view and this chain's offset in it (``direct`` only).
        self.region: memoryview | None = None
        self.offset = 0
        self.in_len = in_len
        self.out_len = out_len

    @staticmethod
    def direct(
        head: int, addr: int, length: int, write: bool, region: memoryview, offset: int
    ) -> Chain:
        """One direct descriptor: ``length`` bytes at guest-physical ``addr``, which the
        caller checked are ``region[offset : offset + length]``."""
        if write:
            chain = Chain(head, NO_SEGMENTS, NO_SEGMENTS, None, length, 0, addr)
            chain._writable = None
        else:
            chain = Chain(head, NO_SEGMENTS, NO_SEGMENTS, None, 0, length, addr)
            chain._readable = None
        chain.region = region
        chain.offset = offset
        return chain

    def _one_view(self, length: int) -> list[memoryview]:
        region = self.region
        assert region is not None  # only a ``direct`` chain leaves a side unmade
        return [region[self.offset : self.offset + length]]

    @property
    def readable(self) -> list[memoryview]:
        views = self._readable
        if views is None:
            views = self._readable = self._one_view(self.out_len)
        return views

    @property
    def writable(self) -> list[memoryview]:
        views = self._writable
        if views is None:
            views = self._writable = self._one_view(self.in_len)
        return views

    @property
    def segments(self) -> list[tuple[int, int, bool]]:
        """The raw (address, length, writable) triples, in chain order."""
        segs = self._segments
        if segs is None:
            # One direct descriptor: the other side is the shared empty list.
            write = self._readable is NO_SEGMENTS
            segs = [(self._addr, self.in_len if write else self.out_len, write)]
            self._segments = segs
        return segs

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, out={self.out_len}, in={self.in_len})"
