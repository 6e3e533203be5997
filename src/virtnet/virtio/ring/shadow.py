"""The driver state both layouts keep (Linux: the common part of struct vring_virtqueue).

Per buffer (a split ring's head index, a packed ring's buffer id): the free list's
``next`` (desc_extra[].next / desc_state), the token given back by ``get_buf``, the
writable length a used length is checked against, and how many descriptors the buffer
took. ``SplitQueueDriver`` and ``PackedQueueDriver`` extend it with their ring's own
state; what they check before an add is the same and lives here once.
"""

from __future__ import annotations

from typing import NoReturn

from virtnet.virtio.errors import QueueFullError
from virtnet.virtio.ring.chain import IndirectArea


class VringShadow:
    """Shadow state and the checks of an add, shared by the split and packed drivers."""

    def __init__(
        self, num: int, *, event_idx: bool, indirect: IndirectArea | None, index: int
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
        # BAD_RING: the device broke a rule no single entry can be refused for; the
        # queue gives nothing more back until it is rebuilt (vq->broken).
        self.broken = False

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
