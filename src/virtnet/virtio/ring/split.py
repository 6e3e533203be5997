"""Split virtqueue, driver side and device side (VIRTIO 1.2, 2.7).

``SplitQueueDriver`` mirrors Linux's drivers/virtio/virtio_ring.c (split part):
a free list of descriptors kept in a private shadow (never read back from
shared memory, which the device could scribble on), ``add_*`` / ``kick_prepare``
/ ``get_buf`` / ``detach_unused_buf``, and callback suppression.

``SplitQueueDevice`` mirrors drivers/vhost/vhost.c: ``pop`` validates a whole
chain before returning it (every rule is a ``DescriptorError``), ``push_used``
batches used entries that ``flush_used`` publishes at once, ``needs_notify``
applies EVENT_IDX or the NO_INTERRUPT flag, ``unpop`` gives chains back
(vhost_discard_vq_desc).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Final, final

from virtnet.virtio.dirtylog import DirtyLog
from virtnet.virtio.errors import (
    AvailIndexError,
    DescriptorError,
    UsedIndexError,
    UsedRingError,
)
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.chain import NO_SEGMENTS, Chain, IndirectArea, Segment
from virtnet.virtio.ring.inflight import InflightSplit, pop_resubmitted_burst
from virtnet.virtio.ring.layout import (
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    USED_ELEM_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    VringViews,
    read_ring,
    virtio_mb,
    vring_need_event,
    write_ring16,
)
from virtnet.virtio.ring.shadow import VringShadow

# Chain, IndirectArea and Segment live in chain.py (the packed ring uses them too);
# they are re-exported here, where they were first defined.
__all__ = ["Chain", "IndirectArea", "Segment", "SplitQueueDevice", "SplitQueueDriver"]

USED_RING_OFFSET: Final = 4  # struct vring_used: le16 flags, le16 idx, then the ring

_WRITE: Final = VRING_DESC_F_WRITE << 32
_NEXT: Final = VRING_DESC_F_NEXT << 32
_INDIRECT: Final = VRING_DESC_F_INDIRECT << 32
_U32: Final = 0xFFFFFFFF
# pop_burst reads the descriptors of a burst this long or longer with one slice (below
# it, the slice costs more than the loads it saves).
_SPAN_MIN_BURST: Final = 4


@final
class SplitQueueDriver(VringShadow):
    """The driver's half of a split virtqueue (Linux: struct vring_virtqueue).

    A buffer is named by its head descriptor, from the shadow free list; the heads go
    out through the avail ring and come back, with their lengths, through the used
    ring, in whatever order the device completes them. Made by
    ``vring_create_virtqueue``."""

    def __init__(
        self, ring: VringViews, event_idx: bool, indirect: IndirectArea | None, index: int
    ) -> None:
        super().__init__(ring.num, _WRITE, event_idx=event_idx, indirect=indirect, index=index)
        num = self.num
        self.ring = ring
        self._mask = num - 1
        self._desc = ring.desc
        self._avail = ring.avail
        self._avail_ring = ring.avail_ring
        self._used = ring.used
        self._used_elems = ring.used_elems
        self._used_q = ring.used_q
        # The len/flags/next word last written to each descriptor: a refill of the
        # same kind of buffer (every rx page) rewrites only the address. Trusted
        # over the table, which the device can write too (like desc_extra).
        self._words = [-1] * num
        self.avail_idx_shadow = 0
        self.last_used_idx = 0
        self._detach_cursor = 0  # detach_unused_buf's scan position
        self._avail[0] = 0
        self._avail[1] = 0
        self._avail[2 + num] = 0

    # -- adding buffers -------------------------------------------------------

    def _add_one(self, addr: int, word: int, in_len: int, token: object) -> int:
        if not self.num_free or token is None:
            self._refuse_one(token)
        head = self._get_free()
        self._desc[2 * head] = addr
        if self._words[head] != word:  # tx slots of one frame size: the same word
            self._desc[2 * head + 1] = word
            self._words[head] = word
        self._token[head] = token
        self._in_len[head] = in_len
        self._ndescs[head] = 1
        self._publish(head)
        return head

    def add_inbufs(self, bufs: list[tuple[int, int, object]]) -> int:
        """Many one-descriptor writable buffers, (addr, length, token) each, published
        with one avail-index store; returns how many fit (a refill burst)."""
        n = min(len(bufs), self.num_free)
        if not n:
            return 0
        desc, nxt, tokens, in_len, ndescs, words = (
            self._desc, self._next, self._token, self._in_len, self._ndescs, self._words
        )
        head = self.free_head
        shadow = self.avail_idx_shadow
        heads: list[int] = []  # the avail ring's new entries, stored at once below
        for k in range(n):
            addr, length, token = bufs[k]
            if token is None:
                n = k  # what was written so far is published below
                break
            desc[2 * head] = addr
            word = (length & _U32) | _WRITE
            if words[head] != word:
                desc[2 * head + 1] = word
                words[head] = word
            tokens[head] = token
            in_len[head] = length
            ndescs[head] = 1
            heads.append(head)
            head = nxt[head]
        self.free_head = head
        self.num_free -= n
        self.num_added += n
        # 2.7.13: every ring entry first, then idx once (x86 keeps stores in order).
        write_ring16(self._avail_ring, self.num, shadow & self._mask, heads)
        self.avail_idx_shadow = (shadow + n) & 0xFFFF
        self._avail[1] = self.avail_idx_shadow
        if n < len(bufs) and bufs[n][2] is None:
            raise ValueError("token must not be None")
        return n

    def _add_direct(
        self, out: Sequence[Segment], in_: Sequence[Segment], total: int, token: object
    ) -> int:
        desc, nxt, words = self._desc, self._next, self._words
        head = i = self.free_head
        in_len = 0
        n = 0
        for segs, wflag in ((out, 0), (in_, _WRITE)):
            for addr, length in segs:
                n += 1
                flags = wflag if n == total else wflag | _NEXT
                desc[2 * i] = addr
                desc[2 * i + 1] = words[i] = (length & _U32) | flags | (nxt[i] << 48)
                if wflag:
                    in_len += length
                last = i
                i = nxt[i]
        self.free_head = nxt[last]
        self.num_free -= total
        self._token[head] = token
        self._in_len[head] = in_len
        self._ndescs[head] = total
        self._publish(head)
        return head

    def _fill_table(
        self, table: memoryview, base: int, out: Sequence[Segment], in_: Sequence[Segment]
    ) -> int:
        total = len(out) + len(in_)
        in_len = 0
        j = 0
        for segs, wflag in ((out, 0), (in_, _WRITE)):
            for addr, length in segs:
                flags = wflag if j + 1 == total else wflag | _NEXT | ((j + 1) << 48)
                table[base + 2 * j] = addr
                table[base + 2 * j + 1] = (length & _U32) | flags
                if wflag:
                    in_len += length
                j += 1
        return in_len

    def _add_table(self, head: int, addr: int, size: int) -> None:
        self._desc[2 * head] = addr
        self._desc[2 * head + 1] = self._words[head] = size | _INDIRECT
        self._publish(head)

    def _publish(self, head: int) -> None:
        # 2.7.13: ring entry first, then idx; x86 keeps the two stores in order.
        shadow = self.avail_idx_shadow
        self._avail[2 + (shadow & self._mask)] = head
        shadow = (shadow + 1) & 0xFFFF
        self.avail_idx_shadow = shadow
        self._avail[1] = shadow
        self.num_added += 1

    # -- notifying the device ------------------------------------------------

    def kick_prepare(self) -> bool:
        """Whether the device wants a notification for what was added since last time."""
        new = self.avail_idx_shadow
        added = self.num_added
        old = (new - added) & 0xFFFF
        self.num_added = 0
        virtio_mb()
        if self.event_idx:
            # 2^16 or more adds since the last kick passed every index, avail_event
            # too, but [old, new) no longer says so (Linux kicks at 0xffff adds).
            if added > 0xFFFF:
                return True
            return vring_need_event(self.ring.avail_event_view[0], new, old)
        return not (self._used[0] & VRING_USED_F_NO_NOTIFY)

    # -- getting used buffers --------------------------------------------------

    def more_used(self) -> bool:
        return not self.broken and self.last_used_idx != self._used[1]

    def _pending_used(self) -> int:
        """Used entries not yet taken; a count over the queue size breaks the queue."""
        if self.broken:
            return 0
        n = (self._used[1] - self.last_used_idx) & 0xFFFF
        if n > self.num:
            self.broken = True
            raise UsedIndexError(
                f"vq {self.index}: used idx {self._used[1]} is {n} ahead of "
                f"last_used_idx {self.last_used_idx}, more than the queue size {self.num}"
            )
        return n

    def get_buf(self) -> tuple[object, int] | None:
        """The next used buffer as (token, used length), or None (virtqueue_get_buf).

        A used entry naming an unknown id is skipped and raised; one whose
        length exceeds the buffer is detached first, so the error carries the
        token and the caller can recycle the buffer. A used index that moved
        more than a queue's worth raises ``UsedIndexError`` and breaks the queue.
        """
        if not self._pending_used():
            return None
        last = self.last_used_idx
        slot = last & self._mask
        elems = self._used_elems
        head = elems[2 * slot]
        length = elems[2 * slot + 1]
        self.last_used_idx = last = (last + 1) & 0xFFFF
        if self.event_idx and not self.cb_disabled:
            self._avail[2 + self.num] = last
        if head >= self.num or self._token[head] is None:
            raise UsedRingError(
                f"vq {self.index}: used id {head} is not a buffer in flight", head
            )
        return self._detach_checked(head, length), length

    def get_bufs(self, budget: int) -> list[tuple[object, int]]:
        """Up to ``budget`` used buffers as (token, length), one pass over the ring.

        The same checks as ``get_buf``: a bad first entry raises exactly as
        ``get_buf`` does (consumed); a bad entry after good ones ends the burst
        before it, so the next call raises for it. Nothing is skipped silently.
        """
        n = min(self._pending_used(), budget)
        if not n:
            return []
        last = self.last_used_idx
        num = self.num
        elems = read_ring(self._used_q, num, last & self._mask, n)  # id | len << 32 each
        tokens, in_len, ndescs, nxt = self._token, self._in_len, self._ndescs, self._next
        free_head = self.free_head
        out: list[tuple[object, int]] = []
        for k in range(n):
            elem = elems[k]
            head = elem & _U32
            length = elem >> 32
            if head >= num or tokens[head] is None or length > in_len[head]:
                break
            out.append((tokens[head], length))
            tokens[head] = None
            nd = ndescs[head]
            tail = head
            for _ in range(nd - 1):
                tail = nxt[tail]
            nxt[tail] = free_head
            free_head = head
            self.num_free += nd
        self.free_head = free_head
        if not out:
            got = self.get_buf()  # raises for the bad entry, as get_buf would
            return [] if got is None else [got]
        last = self.last_used_idx = (last + len(out)) & 0xFFFF
        if self.event_idx and not self.cb_disabled:
            self._avail[2 + num] = last
        return out

    def _detach_buf(self, head: int) -> object:
        token = self._token[head]
        self._token[head] = None
        n = self._ndescs[head]
        last = head
        for _ in range(n - 1):
            last = self._next[last]
        self._next[last] = self.free_head
        self.free_head = head
        self.num_free += n
        return token

    def detach_unused_buf(self) -> object | None:
        """One buffer the device never used, for teardown after reset, or None."""
        # Teardown calls this until None: resume where the last call found one, so
        # detaching a whole ring is one pass, not one pass per buffer.
        tokens, start = self._token, self._detach_cursor
        for head in itertools.chain(range(start, self.num), range(start)):
            if tokens[head] is not None:
                self._detach_cursor = head + 1
                token = self._detach_buf(head)
                # The device is reset: take the entry back out of the avail ring.
                self.avail_idx_shadow = (self.avail_idx_shadow - 1) & 0xFFFF
                self._avail[1] = self.avail_idx_shadow
                return token
        self._detach_cursor = 0
        return None

    # -- callbacks (used-buffer notifications) ---------------------------------

    def disable_cb(self) -> None:
        if not self.cb_disabled:
            self.cb_disabled = True
            if not self.event_idx:
                self._avail[0] = VRING_AVAIL_F_NO_INTERRUPT

    def enable_cb_prepare(self) -> int:
        """Re-enable callbacks; returns the index to pass to ``poll`` (the race check)."""
        if self.cb_disabled:
            self.cb_disabled = False
            if not self.event_idx:
                self._avail[0] = 0
        if self.event_idx:
            self._avail[2 + self.num] = self.last_used_idx
        return self.last_used_idx

    def poll(self, last_used_idx: int) -> bool:
        """True if buffers were used since ``enable_cb_prepare`` returned ``last_used_idx``."""
        virtio_mb()
        return not self.broken and last_used_idx != self._used[1]



@final
class SplitQueueDevice:
    """The device's half of a split virtqueue (Linux vhost: struct vhost_virtqueue)."""

    def __init__(
        self,
        ring: VringViews,
        memory: GuestMemory,
        *,
        event_idx: bool = False,
        last_avail_idx: int = 0,
        index: int = 0,
    ) -> None:
        self.ring = ring
        self.memory = memory
        self.num = ring.num
        self.index = index
        self.event_idx = event_idx
        self._mask = ring.num - 1
        self._desc = ring.desc
        self._avail = ring.avail
        self._avail_ring = ring.avail_ring
        self._used = ring.used
        self._used_q = ring.used_q
        self.last_avail_idx = last_avail_idx & 0xFFFF
        # vhost_vq_init_access: continue from what the ring already says.
        self.used_idx = self._used[1]
        self.signalled_used = self.used_idx
        self.signalled_used_valid = False
        # Dirty logging (live migration): None while off, so the data path pays one
        # attribute test per flush; the used ring's guest-physical address for the log.
        self.dirty: DirtyLog | None = None
        self._log_used_gpa = 0
        # In-flight tracking (PROTOCOL_F_INFLIGHT_SHMFD): None while off, one attribute
        # test per pop, push and flush. After a restart, the chains the region says were
        # in flight are taken again before any new one (``_resub``, oldest first).
        self.inflight: InflightSplit | None = None
        self._resub: list[int] = []
        self._resub_popped: list[int] = []  # resubmitted and popped: unpop gives them back
        self._resub_base = 0  # last_avail_idx when the resubmission began

    def set_dirty_log(self, log: DirtyLog | None, desc_gpa: int, used_gpa: int) -> None:
        """Log this ring's writes into ``log`` (None: stop). The device writes only the
        used ring, at guest-physical ``used_gpa`` (vhost-user's ``log_guest_addr``)."""
        self.dirty = log
        self._log_used_gpa = used_gpa

    def _log_used(self, old: int, new: int) -> None:
        """Log the used entries [old, new) and the flags/idx word (vhost_log_used)."""
        log = self.dirty
        assert log is not None  # the callers test it
        gpa = self._log_used_gpa
        n = (new - old) & 0xFFFF
        log.log_ring(gpa + USED_RING_OFFSET, old & self._mask, n, self.num, USED_ELEM_SIZE)
        log.log_write(gpa, USED_RING_OFFSET)

    def set_inflight(self, region: InflightSplit | None) -> list[int]:
        """Track the chains in flight in ``region`` (None: stop); the heads a restarted
        back-end takes again first, oldest first (vhost-user.rst "When reconnecting").

        A fresh region starts empty at the used index. One that was in use is recovered:
        its chains still in flight are resubmitted, and the available ring is read on
        from the used index plus their number (libvhost-user's vu_check_queue_inflights):
        every chain the old process took was either used or is in flight. Called before
        the first pop, while ``used_idx`` is still what the ring says."""
        self.inflight = region
        self._resub, self._resub_popped = [], []
        if region is None:
            return []
        if region.fresh:
            region.init(self.used_idx)
            return []
        resub = region.recover(self.used_idx)
        self.last_avail_idx = self._resub_base = (self.used_idx + len(resub)) & 0xFFFF
        self._resub = list(resub)
        return resub

    # -- taking chains ---------------------------------------------------------

    def avail_pending(self) -> int:
        """How many chains the driver has made available and we have not popped."""
        n = (self._avail[1] - self.last_avail_idx) & 0xFFFF
        if n > self.num:
            raise AvailIndexError(
                f"vq {self.index}: avail idx {self._avail[1]} is {n} ahead of "
                f"last_avail_idx {self.last_avail_idx}, more than the queue size {self.num}"
            )
        if self._resub:
            n += len(self._resub)
        return n

    def pop_resubmitted(self) -> Chain:
        """The oldest chain still owed from before a restart (DescriptorError: consumed)."""
        head = self._resub.pop(0)
        self._resub_popped.append(head)
        inflight = self.inflight
        assert inflight is not None  # only set_inflight fills _resub
        inflight.take(head)
        return self._walk(head)

    def pop(self) -> Chain | None:
        """The next available chain, or None; DescriptorError for a bad one.

        A bad chain is consumed (last_avail_idx moves past it) so one bad
        buffer does not wedge the queue; the error carries its head for
        ``push_used(head, 0)``.
        """
        if self._resub:
            return self.pop_resubmitted()
        last = self.last_avail_idx
        if last == self._avail[1]:
            return None
        self.avail_pending()
        head = self._avail[2 + (last & self._mask)]
        self.last_avail_idx = (last + 1) & 0xFFFF
        if head >= self.num:
            raise DescriptorError(f"vq {self.index}: avail ring names head {head} >= {self.num}")
        if self.inflight is not None:
            self.inflight.take(head)
        return self._walk(head)

    def pop_burst(self, budget: int) -> list[Chain]:
        """Up to ``budget`` available chains, validated exactly as ``pop`` does.

        One read of the avail index for the burst. A bad first chain raises
        as ``pop`` would (consumed, head carried); a bad chain after good ones
        ends the burst before it, unconsumed, so the next call raises for it.
        """
        if self._resub:
            return pop_resubmitted_burst(self, self._resub, budget)
        last = self.last_avail_idx
        n = (self._avail[1] - last) & 0xFFFF
        if not n:
            return []
        if n > self.num:
            self.avail_pending()  # raises AvailIndexError, nothing consumed
        if n > budget:
            n = budget
        num = self.num
        heads = read_ring(self._avail_ring, num, last & self._mask, n)
        # The heads of a burst are mostly one run of descriptors (a driver reuses them in
        # the order the device gave them back). When they span at most twice as many as
        # the burst has chains, one slice read of that part of the table replaces two
        # generic loads a chain. Read after the avail index, as those loads are: the
        # driver stored every chain of the burst before that index (2.7.13).
        lo = hi = heads[0]
        for head in heads:
            if head < lo:
                lo = head
            elif head > hi:
                hi = head
        descs: list[int] = []
        if n >= _SPAN_MIN_BURST and hi < num and hi - lo < 2 * n:
            descs = self._desc[2 * lo : 2 * hi + 2].tolist()
        chains = []
        try:
            for k in range(n):
                head = heads[k]
                if head >= num:
                    raise DescriptorError(f"vq {self.index}: avail ring names head {head} >= {num}")
                if not descs:
                    chains.append(self._walk(head))
                    continue
                j = 2 * (head - lo)
                word = descs[j + 1]
                if word & (_NEXT | _INDIRECT):
                    chains.append(self._walk_chain(head))
                else:
                    chains.append(self._walk_one(head, descs[j], word))
        except DescriptorError:
            if not chains:
                self.last_avail_idx = (last + 1) & 0xFFFF
                if self.inflight is not None:
                    self.inflight.take(heads[0])  # consumed: its used entry (len 0) follows
                raise
        self.last_avail_idx = (last + len(chains)) & 0xFFFF
        if self.inflight is not None:
            for chain in chains:
                self.inflight.take(chain.head)
        return chains

    def _walk(self, head: int) -> Chain:
        table = self._desc
        word = table[2 * head + 1]
        if word & (_NEXT | _INDIRECT):
            return self._walk_chain(head)
        return self._walk_one(head, table[2 * head], word)

    def _walk_one(self, head: int, addr: int, word: int) -> Chain:
        """One direct descriptor (its two table words), the common case: the same
        checks as ``_walk_chain``, no loop."""
        length = word & _U32
        mem = self.memory
        base, rsize, rbuf = mem.first_gpa, mem.first_size, mem.first_buf
        off = addr - base
        if 0 <= off and off + length <= rsize:
            # Inside the lowest region: its view is made only if asked for.
            return Chain.direct(head, addr, length, bool(word & _WRITE), rbuf, off)
        try:
            seg = self.memory.view(addr, length)
        except Exception as e:
            raise DescriptorError(f"descriptor {head}: {e}", head) from None
        if word & _WRITE:
            return Chain(head, NO_SEGMENTS, [seg], None, length, 0, addr)
        return Chain(head, [seg], NO_SEGMENTS, None, 0, length, addr)

    def _walk_chain(self, head: int) -> Chain:
        chain = Chain(head)
        mem = self.memory
        base, rsize, rbuf = mem.first_gpa, mem.first_size, mem.first_buf
        table = self._desc
        size = self.num
        ttl = size  # a chain can't be longer than its table: a loop simply runs out
        i = head
        indirect = False
        total = 0
        while True:
            if ttl == 0:
                raise DescriptorError(
                    f"loop or chain longer than its {'indirect ' if indirect else ''}table "
                    f"({size} descriptors)",
                    head,
                )
            ttl -= 1
            addr = table[2 * i]
            word = table[2 * i + 1]
            length = word & _U32
            flags = (word >> 32) & 0xFFFF
            if flags & VRING_DESC_F_INDIRECT:
                if indirect:
                    raise DescriptorError(
                        f"descriptor {i}: nested indirect table (2.7.5.3.1)", head
                    )
                if flags & VRING_DESC_F_NEXT:
                    raise DescriptorError(f"descriptor {i}: INDIRECT together with NEXT", head)
                if length == 0 or length % DESC_SIZE:
                    raise DescriptorError(
                        f"descriptor {i}: indirect table length {length} is not a non-zero "
                        f"multiple of 16",
                        head,
                    )
                try:
                    table = self.memory.view(addr, length).cast("Q")
                except Exception as e:
                    raise DescriptorError(f"descriptor {i}: indirect table: {e}", head) from None
                # next is a le16: entries past 65535 are unreachable, and a loop in
                # a huge table must not cost a walk of all of it (vhost: 2^16 cap).
                size = ttl = min(length // DESC_SIZE, 1 << 16)
                i = 0
                indirect = True
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise DescriptorError("chain longer than 2^32 bytes (2.7.5.2)", head)
            off = addr - base
            if 0 <= off and off + length <= rsize:
                seg = rbuf[off : off + length]  # the one-region fast path of memory.view
            else:
                try:
                    seg = self.memory.view(addr, length)
                except Exception as e:
                    raise DescriptorError(f"descriptor {i}: {e}", head) from None
            if flags & VRING_DESC_F_WRITE:
                chain.writable.append(seg)
                chain.in_len += length
            else:
                if chain.writable:
                    raise DescriptorError(
                        f"descriptor {i}: device-readable after device-writable (2.7.4.2)", head
                    )
                chain.readable.append(seg)
                chain.out_len += length
            chain.segments.append((addr, length, bool(flags & VRING_DESC_F_WRITE)))
            if not flags & VRING_DESC_F_NEXT:
                return chain
            i = word >> 48
            if i >= size:
                raise DescriptorError(f"next index {i} >= table size {size}", head)

    def vring_base(self, unpopped: int = 0) -> int:
        """GET_VRING_BASE's answer as if the newest ``unpopped`` chains were given back."""
        return (self.last_avail_idx - unpopped) & 0xFFFF

    def unpop(self, n: int = 1) -> None:
        """Give back the last ``n`` popped chains (vhost_discard_vq_desc).

        With in-flight tracking they are no longer in flight: the newest popped, they
        are the available ring's again from ``last_avail_idx`` on (GET_VRING_BASE's base
        leaves them out, and so does a restart's count). Resubmitted chains, popped
        before any new one, have no place in the available ring: they go back to the
        front of the resubmission, still in flight."""
        fresh = n
        if self._resub_popped:
            fresh = min(n, (self.last_avail_idx - self._resub_base) & 0xFFFF)
            back = n - fresh
            if back:
                self._resub[:0] = self._resub_popped[-back:]
                del self._resub_popped[-back:]
        inflight = self.inflight
        if inflight is not None:
            for k in range(1, fresh + 1):
                inflight.untake(self._avail[2 + ((self.last_avail_idx - k) & self._mask)])
        self.last_avail_idx = (self.last_avail_idx - fresh) & 0xFFFF

    def sync_last_avail_to_used(self) -> int | None:
        """Continue from the used ring where SET_VRING_BASE disagrees with it; the base it
        replaced, or None if they agreed.

        This device uses chains in the order it pops them, and a stop gives back what it
        popped and did not use (``unpop``), so a base from a clean stop equals the used
        index. A different one is stale: a front-end that lost its back-end (QEMU after a
        crash restores last_avail_idx from used->idx, and a dying back-end's worker can
        still have published used entries after that read). Starting from the stale base
        would pop chains the driver already has back and return them twice ("id N is not
        a head"); the used ring is the truth (DPDK's translate_ring_addresses check).
        Called before the first pop, while ``used_idx`` is still what the ring says."""
        used = self.used_idx
        if used == self.last_avail_idx:
            return None
        stale, self.last_avail_idx = self.last_avail_idx, used
        return stale

    # -- returning chains ------------------------------------------------------

    def push_used(self, head: int, length: int) -> None:
        """Queue one used entry; ``flush_used`` makes the batch visible."""
        # One store of the whole element: id | len << 32 (both le32, range-checked
        # by the typed view: a length past 2^32 is an OverflowError, not a wrap).
        self._used_q[self.used_idx & self._mask] = head | length << 32
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if self.inflight is not None:
            self.inflight.used(head)
        if self.used_idx == self.signalled_used:
            # A whole 16-bit turn since needs_notify: [old, new) would be empty
            # (vhost_add_used_n: "used index might wrap around").
            self.signalled_used_valid = False

    def push_used_burst(self, used: Sequence[tuple[int, int]]) -> None:
        """Queue many (head, length) used entries; ``flush_used`` publishes them."""
        elems, mask = self._used_q, self._mask
        idx = self.used_idx
        for head, length in used:
            elems[idx & mask] = head | length << 32
            idx += 1
        if self.inflight is not None:
            for head, _length in used:
                self.inflight.used(head)
        n = len(used)
        # used_idx passed signalled_used somewhere in the burst: see push_used.
        if n >= 0x10000 or 0 < (self.signalled_used - self.used_idx) & 0xFFFF <= n:
            self.signalled_used_valid = False
        self.used_idx = idx & 0xFFFF

    def has_unflushed(self) -> bool:
        """Whether ``push_used`` queued entries that ``flush_used`` has not published."""
        return self.used_idx != self._used[1]

    def flush_used(self) -> None:
        # Entries before idx: stores stay ordered on x86 (vhost: smp_wmb()).
        if self.dirty is not None:
            self._log_used(self._used[1], self.used_idx)
        self._used[1] = self.used_idx
        if self.inflight is not None:
            self._inflight_published()

    def _inflight_published(self) -> None:
        inflight = self.inflight
        assert inflight is not None  # the caller tests it
        inflight.published(self.used_idx)
        if (self._resub_popped and not self._resub
                and (self.last_avail_idx - self._resub_base) & 0xFFFF > self.num):  # fmt: skip
            self._resub_popped = []  # past any unpop's reach

    def needs_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was flushed (vhost_notify)."""
        virtio_mb()
        if not self.event_idx:
            return not (self._avail[0] & VRING_AVAIL_F_NO_INTERRUPT)
        old = self.signalled_used
        new = self.signalled_used = self.used_idx
        valid = self.signalled_used_valid
        self.signalled_used_valid = True
        if not valid:
            return True
        return vring_need_event(self._avail[2 + self.num], new, old)

    # -- driver notifications (kicks) ------------------------------------------

    def disable_notify(self) -> None:
        if not self.event_idx:
            self._used[0] = VRING_USED_F_NO_NOTIFY
            if self.dirty is not None:
                self.dirty.log_write(self._log_used_gpa, 2)  # used->flags

    def enable_notify(self) -> bool:
        """Ask for kicks again; True if chains arrived meanwhile (vhost_enable_notify)."""
        if self.event_idx:
            self.ring.avail_event_view[0] = self.last_avail_idx
        else:
            self._used[0] = 0
        if self.dirty is not None:  # used->avail_event after the ring, or used->flags
            at = USED_RING_OFFSET + self.num * USED_ELEM_SIZE if self.event_idx else 0
            self.dirty.log_write(self._log_used_gpa + at, 2)
        virtio_mb()
        return self._avail[1] != self.last_avail_idx or bool(self._resub)
