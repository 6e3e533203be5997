"""The driver state both layouts keep (Linux: the common part of struct vring_virtqueue).

Per buffer (a split ring's head index, a packed ring's buffer id): the free list's
``next`` (desc_extra[].next / desc_state), the token given back by ``get_buf``, the
writable length a used length is checked against, and how many descriptors the buffer
took. ``SplitQueueDriver`` and ``PackedQueueDriver`` extend it with their ring's own
state; what they check before an add is the same and lives here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NoReturn

from virtnet.virtio.errors import QueueFullError, UsedRingError
from virtnet.virtio.ring.chain import IndirectArea, Segment
from virtnet.virtio.ring.layout import DESC_SIZE

_U32: Final = 0xFFFFFFFF


class VringShadow:
    """Shadow state and the checks of an add, shared by the split and packed drivers."""

    def __init__(
        self, num: int, write: int, *, event_idx: bool, indirect: IndirectArea | None, index: int
    ) -> None:
        self.num = num
        self.index = index
        self.event_idx = event_idx
        self.indirect = indirect
        self._next = list(range(1, num)) + [0]
        self._token: list[object] = [None] * num  # None: the head / id is free
        self._in_len = [0] * num
        self._ndescs = [0] * num
        self.free_head = 0
        self.num_free = num
        self.num_added = 0  # descriptors made available since the last kick_prepare
        self.cb_disabled = False
        self._write = write  # VRING_DESC_F_WRITE where this layout's descriptor word has it
        # BAD_RING: the device broke a rule no single entry can be refused for; the
        # queue gives nothing more back until it is rebuilt (vq->broken).
        self.broken = False

    # -- adding buffers: the checks both layouts make, then the layout's own stores --

    def add_inbuf(self, addr: int, length: int, token: object) -> int:
        """One device-writable descriptor (virtqueue_add_inbuf with one sg); its head
        (split) or buffer id (packed)."""
        return self._add_one(addr, (length & _U32) | self._write, length, token)

    def add_outbuf(self, addr: int, length: int, token: object) -> int:
        """One device-readable descriptor (virtqueue_add_outbuf with one sg)."""
        return self._add_one(addr, length & _U32, 0, token)

    def add(self, out: Sequence[Segment], in_: Sequence[Segment], token: object) -> int:
        """A chain of readable ``out`` then writable ``in_`` segments (virtqueue_add):
        one indirect descriptor when the queue has a table and the chain fits in it,
        else one descriptor per segment."""
        total = len(out) + len(in_)
        if total == 0 or token is None:
            self._refuse_chain(total)
        ind = self.indirect
        if ind is not None and 1 < total <= ind.max_descs and self.num_free:
            return self._add_indirect(ind, out, in_, token)
        if self.num_free < total:
            self._refuse_room(total)
        return self._add_direct(out, in_, total, token)

    def _add_one(self, addr: int, word: int, in_len: int, token: object) -> int:
        """Store one descriptor of ``word`` (len | flags << 32) and make it available."""
        raise NotImplementedError

    def _add_direct(
        self, out: Sequence[Segment], in_: Sequence[Segment], total: int, token: object
    ) -> int:
        """Store a checked chain of ``total`` descriptors, that many free."""
        raise NotImplementedError

    def _add_indirect(
        self, ind: IndirectArea, out: Sequence[Segment], in_: Sequence[Segment], token: object
    ) -> int:
        """A checked chain as one descriptor pointing at its own part of ``ind``'s table
        (2.7.5.3 / 2.8.19), so it takes one free entry whatever its length."""
        head = self._get_free()
        in_len = self._fill_table(ind.table, head * ind.max_descs * 2, out, in_)
        self._token[head] = token
        self._in_len[head] = in_len
        self._ndescs[head] = 1
        self._add_table(head, ind.gpa + head * ind.stride, (len(out) + len(in_)) * DESC_SIZE)
        return head

    def _fill_table(
        self, table: memoryview, base: int, out: Sequence[Segment], in_: Sequence[Segment]
    ) -> int:
        """Write the segments as the layout's table entries from ``table[base]`` on; the
        writable bytes."""
        raise NotImplementedError

    def _add_table(self, head: int, addr: int, size: int) -> None:
        """Make ``head`` available as the INDIRECT descriptor of the table at ``addr``."""
        raise NotImplementedError

    def _get_free(self) -> int:
        """Take the free list's first entry for a one-descriptor buffer."""
        head = self.free_head
        self.free_head = self._next[head]
        self.num_free -= 1
        return head

    # The adds test the cheap conditions inline and call these only to raise.

    def _refuse_one(self, token: object) -> NoReturn:
        """A one-descriptor add (virtqueue_add_inbuf / _outbuf) that cannot be made."""
        if token is None:
            raise ValueError("token must not be None")
        raise QueueFullError(f"vq {self.index}: no free descriptor")

    def _refuse_chain(self, total: int) -> NoReturn:
        """A chain (virtqueue_add) with no segments or no token."""
        if total == 0:
            raise ValueError("a buffer needs at least one segment")
        raise ValueError("token must not be None")

    def _refuse_room(self, total: int) -> NoReturn:
        """A direct chain of ``total`` descriptors with fewer free (checked after the
        indirect choice: an indirect chain takes one)."""
        raise QueueFullError(f"vq {self.index}: {total} descriptors wanted, {self.num_free} free")

    # -- getting used buffers ------------------------------------------------

    def _detach_buf(self, head: int) -> object:
        """Put ``head``'s descriptors back on the free list; its token (detach_buf)."""
        raise NotImplementedError

    def _detach_checked(self, head: int, length: int) -> object:
        """``_detach_buf`` of a used buffer, then its used length checked: a length past
        the buffer's writable part is raised with the token, so the caller can still
        recycle what it names."""
        token = self._detach_buf(head)
        if length > self._in_len[head]:
            raise UsedRingError(
                f"vq {self.index}: used len {length} > buffer {head}'s writable "
                f"{self._in_len[head]}",
                head,
                token,
            )
        return token

    def poll(self, last_used_idx: int) -> bool:
        raise NotImplementedError

    def enable_cb_prepare(self) -> int:
        raise NotImplementedError

    def enable_cb(self) -> bool:
        """Re-enable callbacks; False if buffers are already pending (poll again)."""
        return not self.poll(self.enable_cb_prepare())

    @property
    def in_flight(self) -> int:
        return self.num - self.num_free
