"""In-flight I/O tracking of a split virtqueue (vhost-user.rst "Inflight I/O tracking").

A back-end that negotiated ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`` keeps, in a
memfd the front-end holds across back-end restarts, which chains it took from the
available ring and has not returned in the used ring. A restarted back-end reads it
back and resubmits those chains (in the order it took them), so a chain completed
out of order by the old process is neither lost nor returned twice: the used index
alone cannot tell that (it says how many, not which).

One ``QueueRegionSplit`` per virtqueue, laid out as the spec's C structs (all
little-endian, naturally aligned)::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    struct DescStateSplit { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];

Sans-I/O: a view of the region in, heads and indices out. The ring calls ``take``
for each head it pops, ``used`` for each head it pushes and ``published`` once its
used index is stored, in the spec's order, so a crash between any two stores is
recovered by ``recover``.
"""

from __future__ import annotations

from typing import Final, final

INFLIGHT_VERSION: Final = 1  # the spec's "version": 0 is a region never initialized
INFLIGHT_ALIGN: Final = 64  # each queue's region starts on a cache line (DPDK, libvhost-user)
REGION_HEADER: Final = 16  # features, version, desc_num, last_batch_head, used_idx
DESC_STATE: Final = 16  # sizeof(DescStateSplit)
# Field positions, in units of the view each is read through.
_H_VERSION: Final = 4
_H_DESC_NUM: Final = 5
_H_LAST_BATCH_HEAD: Final = 6
_H_USED_IDX: Final = 7


def split_region_size(num: int) -> int:
    """Bytes of one split queue's region for a queue of ``num`` descriptors."""
    size = REGION_HEADER + DESC_STATE * num
    return (size + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


class InflightError(ValueError):
    """An in-flight region that does not fit its ring; the text names the field."""


@final
class InflightSplit:
    """One split virtqueue's ``QueueRegionSplit``, read and written in place."""

    def __init__(self, region: memoryview, num: int, index: int = 0) -> None:
        if len(region) < split_region_size(num):
            raise InflightError(f"vq {index}: in-flight region of {len(region)} bytes, a queue "
                                f"of {num} needs {split_region_size(num)}")  # fmt: skip
        self.num = num
        self.index = index
        self._b = region.cast("B")
        self._h = region.cast("H")
        self._q = region.cast("Q")
        self.counter = 1  # the spec's global counter: the order chains were taken in
        self._batch: list[int] = []  # heads pushed since the last published used index

    @property
    def fresh(self) -> bool:
        """Never initialized (version 0): nothing was ever in flight in it."""
        return self._h[_H_VERSION] == 0

    @property
    def used_idx(self) -> int:
        return self._h[_H_USED_IDX]

    def init(self, used_idx: int) -> None:
        """Make a fresh region this queue's: version 1, its size, nothing in flight."""
        self._b[: split_region_size(self.num)] = bytes(split_region_size(self.num))
        self._h[_H_DESC_NUM] = self.num
        self._h[_H_USED_IDX] = used_idx & 0xFFFF
        self._h[_H_VERSION] = INFLIGHT_VERSION  # last: a crash before it leaves it fresh
        self.counter = 1
        self._batch = []

    def is_inflight(self, head: int) -> bool:
        return self._b[REGION_HEADER + DESC_STATE * head] != 0

    # -- the data path: the spec's "When receiving / supplying buffers" ----------------

    def take(self, head: int) -> None:
        """Chain ``head`` was taken from the available ring: in flight, in this order."""
        if head < self.num:
            self._q[2 * head + 3] = self.counter
            self.counter += 1
            self._b[REGION_HEADER + DESC_STATE * head] = 1

    def untake(self, head: int) -> None:
        """Chain ``head`` was given back unused (vhost_discard_vq_desc): not in flight."""
        if head < self.num:
            self._b[REGION_HEADER + DESC_STATE * head] = 0

    def used(self, head: int) -> None:
        """Chain ``head`` was written to the used ring: it joins the batch list."""
        if head < self.num:
            h = self._h
            h[8 * head + 11] = h[_H_LAST_BATCH_HEAD]  # desc[head].next = last_batch_head
            h[_H_LAST_BATCH_HEAD] = head
            self._batch.append(head)

    def published(self, used_idx: int) -> None:
        """The used index ``used_idx`` is stored: the batch is the driver's now."""
        b = self._b
        for head in self._batch:
            b[REGION_HEADER + DESC_STATE * head] = 0
        self._batch.clear()
        self._h[_H_USED_IDX] = used_idx

    # -- a restart: the spec's "When reconnecting" --------------------------------------

    def recover(self, ring_used_idx: int) -> list[int]:
        """The heads still in flight, oldest first, after a back-end that may have died
        anywhere in the steps above; ``ring_used_idx`` is the used ring's idx now.

        A used index published past the region's means the last batch's entries reached
        the driver but their in-flight flags were not yet cleared: the batch list (from
        ``last_batch_head`` through ``next``) says which, and they are cleared here."""
        h, b, q = self._h, self._b, self._q
        if h[_H_DESC_NUM] != self.num:
            raise InflightError(f"vq {self.index}: the in-flight region is for a queue of "
                                f"{h[_H_DESC_NUM]} descriptors, the ring has {self.num}")
        batch = (ring_used_idx - h[_H_USED_IDX]) & 0xFFFF
        if batch > self.num:
            raise InflightError(
                f"vq {self.index}: the used ring's idx {ring_used_idx} is {batch} past the "
                f"in-flight region's used_idx {h[_H_USED_IDX]}, more than the queue size "
                f"{self.num}: the ring was restarted with indices that do not match it")
        head = h[_H_LAST_BATCH_HEAD]
        for _ in range(batch):
            if head >= self.num:
                raise InflightError(f"vq {self.index}: the last batch's list names head "
                                    f"{head} >= {self.num}")  # fmt: skip
            b[REGION_HEADER + DESC_STATE * head] = 0
            head = h[8 * head + 11]
        h[_H_USED_IDX] = ring_used_idx & 0xFFFF
        inflight = [i for i in range(self.num) if b[REGION_HEADER + DESC_STATE * i]]
        inflight.sort(key=lambda i: q[2 * i + 3])
        self.counter = max((q[2 * i + 3] for i in inflight), default=0) + 1
        self._batch = []
        return inflight

    def clear(self) -> None:
        """A device reset (VIRTIO 1.2, 2.4): nothing it took is owed any more."""
        self._b[: split_region_size(self.num)] = bytes(split_region_size(self.num))
        self._batch = []
