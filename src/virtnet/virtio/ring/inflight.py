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

from collections.abc import Sized
from typing import Final, Protocol, final

from virtnet.virtio.errors import DescriptorError
from virtnet.virtio.ring.chain import Chain
from virtnet.virtio.ring.layout import VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED

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


class Resubmitting(Protocol):
    """A device ring owing chains from before a restart (``set_inflight`` filled it)."""

    def pop_resubmitted(self) -> Chain: ...
    def unpop(self, n: int = 1) -> None: ...


def pop_resubmitted_burst(vq: Resubmitting, owed: Sized, budget: int) -> list[Chain]:
    """Up to ``budget`` owed chains, as ``pop_burst`` takes new ones: a bad first chain
    raises (consumed, its id carried), a bad one after good ones ends the burst and is
    given back, so the next call raises for it. ``owed`` is the ring's list of chains
    still owed, which ``pop_resubmitted`` shortens and ``unpop`` lengthens in place."""
    chains: list[Chain] = []
    while owed and len(chains) < budget:
        try:
            chains.append(vq.pop_resubmitted())
        except DescriptorError:
            if not chains:
                raise
            vq.unpop(1)
            break
    return chains


class _Region:
    """What both layouts' regions have: the views, the header's version, the spec's
    global take counter and the batch pushed since the last published one."""

    def __init__(self, region: memoryview, num: int, index: int, size: int, what: str) -> None:
        if len(region) < size:
            raise InflightError(f"vq {index}: in-flight region of {len(region)} bytes, "
                                f"{what} of {num} needs {size}")  # fmt: skip
        self.num = num
        self.index = index
        self._b = region.cast("B")
        self._h = region.cast("H")
        self._q = region.cast("Q")
        self.counter = 1  # the order chains were taken in
        self._batch: list[int] = []  # heads (split) or head entries (packed), unpublished

    @property
    def fresh(self) -> bool:
        """Never initialized (version 0): nothing was ever in flight in it."""
        return self._h[_H_VERSION] == 0


@final
class InflightSplit(_Region):
    """One split virtqueue's ``QueueRegionSplit``, read and written in place."""

    def __init__(self, region: memoryview, num: int, index: int = 0) -> None:
        super().__init__(region, num, index, split_region_size(num), "a queue")

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


# -- packed virtqueues ---------------------------------------------------------------

PACKED_HEADER: Final = 32  # features .. old_used_wrap_counter, padding[7]: desc[] 8-aligned
PACKED_DESC_STATE: Final = 32  # sizeof(DescStatePacked)
# QueueRegionPacked's header, in units of the view each is read through.
_P_DESC_NUM: Final = 5
_P_FREE_HEAD: Final = 6
_P_OLD_FREE_HEAD: Final = 7
_P_USED_IDX: Final = 8
_P_OLD_USED_IDX: Final = 9
_P_USED_WRAP: Final = 20
_P_OLD_USED_WRAP: Final = 21
# DescStatePacked entry e starts at byte 32 + 32 e: in H units at 16 + 16 e, in I units
# at 8 + 8 e, in Q units at 4 + 4 e. Its fields' offsets from there:
_E_NEXT: Final = 1  # H
_E_LAST: Final = 2  # H
_E_NUM: Final = 3  # H
_E_ID: Final = 8  # H
_E_FLAGS: Final = 9  # H
_E_LEN: Final = 5  # I
_E_COUNTER: Final = 1  # Q
_E_ADDR: Final = 3  # Q


def packed_region_size(num: int) -> int:
    """Bytes of one packed queue's region for a queue of ``num`` descriptors."""
    size = PACKED_HEADER + PACKED_DESC_STATE * num
    return (size + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


def region_size(num: int, packed: bool) -> int:
    """One queue's region for either ring layout (DPDK's get_pervq_shm_size_*)."""
    return packed_region_size(num) if packed else split_region_size(num)


@final
class InflightPacked(_Region):
    """One packed virtqueue's ``QueueRegionPacked``, read and written in place.

    A packed ring has no descriptor table that outlives the ring slots: a used
    descriptor is written at the device's used position, which can be a slot of a chain
    still in flight, and the driver then reuses it. So the region keeps a copy of every
    descriptor taken (``DescStatePacked`` entries from a free list: a chain's entries
    linked by ``next``, its head holding ``num``, ``last`` and the take ``counter``), and
    the ``old_*`` fields are the last state known to be consistent: the updates since
    are rolled back or committed at a restart, by whether the batch's first used
    descriptor reached the ring."""

    def __init__(self, region: memoryview, num: int, index: int = 0) -> None:
        super().__init__(region, num, index, packed_region_size(num), "a packed queue")
        self._i = region.cast("I")
        self._entry = [-1] * num  # buffer id -> its chain's head entry; -1: not in flight
        # This process's copy of the free list and of each head's last entry.
        self._next = list(range(1, num + 1))
        self._free_head = 0
        self._last = [0] * num

    @property
    def used_pos(self) -> tuple[int, int]:
        """The device's used position and wrap counter, as the region has them."""
        return self._h[_P_USED_IDX], self._b[_P_USED_WRAP]

    def init(self, used_idx: int, used_wrap: int) -> None:
        """A fresh region for a ring whose device writes its next used descriptor at
        ``used_idx`` in the lap ``used_wrap``: every entry free, in order."""
        n, h, b = self.num, self._h, self._b
        b[: packed_region_size(n)] = bytes(packed_region_size(n))
        for e in range(n):
            h[16 + 16 * e + _E_NEXT] = e + 1  # the last one's next, n, ends the list
        h[_P_DESC_NUM] = n
        h[_P_USED_IDX] = h[_P_OLD_USED_IDX] = used_idx
        b[_P_USED_WRAP] = b[_P_OLD_USED_WRAP] = used_wrap
        h[_H_VERSION] = INFLIGHT_VERSION  # last: a crash before it leaves it fresh
        self.counter = 1
        self._entry = [-1] * n
        self._batch = []
        self._next = list(range(1, n + 1))
        self._free_head = 0

    def is_inflight(self, bid: int) -> bool:
        return self._entry[bid] >= 0

    # -- the data path: the spec's "When receiving / supplying buffers" ----------------

    def take(self, desc: memoryview, start: int, slots: int, bid: int) -> None:
        """The chain ``bid`` in the ring's ``slots`` descriptors from ``start`` on was
        taken: copy each into an entry from the free list, the first its head.

        The free list is followed in this process's copy of it (``_next``): the region
        is written here, and read back only by ``recover``, so a front-end that
        scribbles on it can confuse a restart (which checks it) but not this ring."""
        h, q, i32, n, nxt = self._h, self._q, self._i, self.num, self._next
        head = e = self._free_head
        if e >= n:
            raise InflightError(f"vq {self.index}: no free in-flight entry for buffer id "
                                f"{bid}: more descriptors in flight than the ring has")
        hh = 16 + 16 * head
        h[hh + _E_NUM] = 0
        q[4 + 4 * head + _E_COUNTER] = self.counter
        self.counter += 1
        self._b[32 + 32 * head] = 1
        p = start
        last = e
        for k in range(slots):
            if e >= n:
                raise InflightError(f"vq {self.index}: no free in-flight entry for buffer "
                                    f"id {bid}'s descriptor {k + 1} of {slots}")  # fmt: skip
            word = desc[2 * p + 1]
            eh = 16 + 16 * e
            q[4 + 4 * e + _E_ADDR] = desc[2 * p]
            i32[8 + 8 * e + _E_LEN] = word & 0xFFFFFFFF
            h[eh + _E_ID] = (word >> 32) & 0xFFFF
            h[eh + _E_FLAGS] = word >> 48
            if k == slots - 1:
                h[hh + _E_LAST] = e
                last = e
            h[hh + _E_NUM] = k + 1
            e = nxt[e]
            h[_P_FREE_HEAD] = e
            p += 1
            if p == n:
                p = 0
        h[_P_OLD_FREE_HEAD] = self._free_head = e
        self._entry[bid] = head
        self._last[head] = last

    def _free(self, bid: int) -> int:
        """Put chain ``bid``'s entries at the front of the free list; its head, or -1."""
        if not 0 <= bid < self.num:
            return -1
        e = self._entry[bid]
        if e < 0:
            return -1  # not in flight: a lie --faults tells, or already freed
        self._entry[bid] = -1
        last = self._last[e]
        self._next[last] = self._free_head
        self._h[16 + 16 * last + _E_NEXT] = self._free_head
        self._h[_P_FREE_HEAD] = self._free_head = e
        return e

    def untake(self, bid: int) -> None:
        """Chain ``bid`` was given back unused: its entries are free, and that is final."""
        e = self._free(bid)
        if e >= 0:
            self._b[32 + 32 * e] = 0
            self._h[_P_OLD_FREE_HEAD] = self._free_head

    def used(self, bid: int) -> None:
        """Chain ``bid``'s used descriptor is about to be written: free its entries."""
        e = self._free(bid)
        if e >= 0:
            self._batch.append(e)

    def set_used(self, used_idx: int, used_wrap: int) -> None:
        """Where the device's used position will be once this batch is in the ring."""
        self._h[_P_USED_IDX] = used_idx
        self._b[_P_USED_WRAP] = used_wrap

    def published(self) -> None:
        """The batch's first used descriptor is stored: the batch is the driver's."""
        b, h = self._b, self._h
        for e in self._batch:
            b[32 + 32 * e] = 0
        self._batch.clear()
        h[_P_OLD_FREE_HEAD] = self._free_head
        h[_P_OLD_USED_IDX] = h[_P_USED_IDX]
        b[_P_OLD_USED_WRAP] = b[_P_USED_WRAP]

    # -- a restart: the spec's "When reconnecting" --------------------------------------

    def recover(self, desc: memoryview) -> list[int]:
        """The head entries still in flight, oldest first, after a back-end that may have
        died anywhere above; ``desc`` is the ring's descriptors (64-bit words) now.
        ``used_pos`` is then where the device writes its next used descriptor."""
        h, b, q, n = self._h, self._b, self._q, self.num
        if h[_P_DESC_NUM] != n:
            raise InflightError(f"vq {self.index}: the in-flight region is for a queue of "
                                f"{h[_P_DESC_NUM]} descriptors, the ring has {n}")
        if h[_P_USED_IDX] != h[_P_OLD_USED_IDX] or b[_P_USED_WRAP] != b[_P_OLD_USED_WRAP]:
            at, wrap = h[_P_OLD_USED_IDX], b[_P_OLD_USED_WRAP]
            if at >= n:
                raise InflightError(f"vq {self.index}: in-flight old_used_idx {at} >= {n}")
            avail, used = VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED
            flags = (desc[2 * at + 1] >> 48) & (avail | used)
            if flags != (avail if wrap else used):
                # No longer the driver's available descriptor: the batch reached the
                # ring before the old back-end died, so commit it.
                h[_P_OLD_FREE_HEAD] = h[_P_FREE_HEAD]
                h[_P_OLD_USED_IDX] = h[_P_USED_IDX]
                b[_P_OLD_USED_WRAP] = b[_P_USED_WRAP]
        # Roll back whatever was in progress (a take, an unpublished batch).
        h[_P_FREE_HEAD] = h[_P_OLD_FREE_HEAD]
        h[_P_USED_IDX] = h[_P_OLD_USED_IDX]
        b[_P_USED_WRAP] = b[_P_OLD_USED_WRAP]
        if h[_P_USED_IDX] >= n or b[_P_USED_WRAP] > 1:
            raise InflightError(f"vq {self.index}: in-flight used_idx {h[_P_USED_IDX]} / "
                                f"wrap {b[_P_USED_WRAP]} is no position in a ring of {n}")
        owner = bytearray(n)  # 1: free, 2: a chain's
        e = h[_P_FREE_HEAD]
        while e < n:
            if owner[e]:
                raise InflightError(f"vq {self.index}: in-flight free list loops at entry {e}")
            owner[e] = 1
            b[32 + 32 * e] = 0
            e = h[16 + 16 * e + _E_NEXT]
        heads = [e for e in range(n) if b[32 + 32 * e]]
        self._entry = [-1] * n
        for e in heads:
            self._check_chain(e, owner)
        heads.sort(key=lambda e: q[4 + 4 * e + _E_COUNTER])
        self.counter = max((q[4 + 4 * e + _E_COUNTER] for e in heads), default=0) + 1
        self._batch = []
        self._next = [h[16 + 16 * e + _E_NEXT] for e in range(n)]
        self._free_head = h[_P_FREE_HEAD]
        self._last = [h[16 + 16 * e + _E_LAST] for e in range(n)]
        for e in range(n):
            if not owner[e]:  # in no list (a region written by others): free it
                self._next[e] = self._free_head
                h[16 + 16 * e + _E_NEXT] = self._free_head
                self._free_head = e
        h[_P_FREE_HEAD] = h[_P_OLD_FREE_HEAD] = self._free_head
        return heads

    def _check_chain(self, head: int, owner: bytearray) -> None:
        """Head entry ``head``'s chain is ``num`` entries through ``next`` ending at
        ``last``, none free or another chain's, its buffer id unique."""
        h, n = self._h, self.num
        count, last = h[16 + 16 * head + _E_NUM], h[16 + 16 * head + _E_LAST]
        if not 1 <= count <= n:
            raise InflightError(f"vq {self.index}: in-flight entry {head}: a chain of {count}")
        e = head
        for k in range(count):
            if e >= n or owner[e]:
                raise InflightError(f"vq {self.index}: in-flight entry {head}'s chain reaches "
                                    f"entry {e}, {'free or another chain' if e < n else 'none'}")
            owner[e] = 2
            if k < count - 1:
                e = h[16 + 16 * e + _E_NEXT]
        if e != last:
            raise InflightError(f"vq {self.index}: in-flight entry {head}: its {count} entries "
                                f"end at {e}, its last says {last}")  # fmt: skip
        bid = h[16 + 16 * last + _E_ID]  # 2.8.6: the buffer id is in the last descriptor
        if bid >= n or self._entry[bid] >= 0:
            raise InflightError(f"vq {self.index}: in-flight entry {head}: buffer id {bid} "
                                f"{'>= ' + str(n) if bid >= n else 'is in flight twice'}")
        self._entry[bid] = head

    def chain(self, head: int) -> list[tuple[int, int]]:
        """Head entry ``head``'s descriptors as (addr, len | id << 32 | flags << 48)."""
        h, q, i32 = self._h, self._q, self._i
        out: list[tuple[int, int]] = []
        e = head
        for _ in range(h[16 + 16 * head + _E_NUM]):
            eh = 16 + 16 * e
            word = i32[8 + 8 * e + _E_LEN] | h[eh + _E_ID] << 32 | h[eh + _E_FLAGS] << 48
            out.append((q[4 + 4 * e + _E_ADDR], word))
            e = h[eh + _E_NEXT]
        return out

    def buffer_id(self, head: int) -> int:
        return self._h[16 + 16 * self._h[16 + 16 * head + _E_LAST] + _E_ID]

    def clear(self) -> None:
        """A device reset: nothing it took is owed any more (version 0: fresh)."""
        self._b[: packed_region_size(self.num)] = bytes(packed_region_size(self.num))
        self._entry = [-1] * self.num
        self._batch = []
        self._next = list(range(1, self.num + 1))
        self._free_head = 0
