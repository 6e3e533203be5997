"""Packed virtqueue, driver side and device side (VIRTIO 1.2, 2.8).

One ring of 16-byte descriptors that both sides write: the driver makes a
descriptor available by writing its flags with AVAIL = its wrap counter and
USED = the inverse; the device marks a buffer used by writing one descriptor
(the buffer id, the length written) with AVAIL = USED = its wrap counter, at
its own used position, and skips as many ring slots as the buffer took. Each
wrap counter flips when its side's position passes the end of the ring, so a
queue size need not be a power of two.

``PackedQueueDriver`` mirrors Linux's virtqueue_add_packed / detach_buf_packed
(drivers/virtio/virtio_ring.c): buffer ids come from a private free list and
everything about a buffer in flight (descriptor count, token, writable length)
is kept in a private shadow, never read back from the ring — the device could
have written anything there. ``PackedQueueDevice`` follows DPDK's vhost
(fill_vec_buf_packed, vhost_flush_*_shadow_packed, vhost_vring_call_packed):
``pop`` validates a whole chain and every broken rule is a typed error naming
the queue; one bad buffer is consumed and handed back with length 0 when its id
is usable, a ring that cannot be walked stops the queue (``AvailIndexError``).

Both classes have exactly the interface of their split counterparts, so
``net/`` does not know which ring it runs on.

Memory order: a descriptor's second word (len | id << 32 | flags << 48) is one
aligned 8-byte store/load, so flags, id and length are seen together; the
driver stores a chain's other descriptors and the head's address before the
head's flags word, and the device loads a word before the address next to it.
x86 keeps stores with stores and loads with loads in order (TSO).
"""

from __future__ import annotations

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
from virtnet.virtio.ring.inflight import InflightPacked, pop_resubmitted_burst
from virtnet.virtio.ring.layout import (
    DESC_SIZE,
    EVENT_SUPPRESS_SIZE,
    MAX_CHAIN_BYTES,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    PackedViews,
    virtio_mb,
)
from virtnet.virtio.ring.shadow import VringShadow

# Flags as they sit in a descriptor's second 64-bit word.
_NEXT: Final = VRING_DESC_F_NEXT << 48
_WRITE: Final = VRING_DESC_F_WRITE << 48
_INDIRECT: Final = VRING_DESC_F_INDIRECT << 48
_AVAIL: Final = VRING_PACKED_DESC_F_AVAIL << 48
_USED: Final = VRING_PACKED_DESC_F_USED << 48
_AU: Final = _AVAIL | _USED
# The same flags in the 32-bit id | flags << 16 word (PackedViews.desc32).
_AU32: Final = (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) << 16
_NEXT32: Final = VRING_DESC_F_NEXT << 16
_WRITE32: Final = VRING_DESC_F_WRITE << 16
_INDIRECT32: Final = VRING_DESC_F_INDIRECT << 16
_U32: Final = 0xFFFFFFFF
_WRAP: Final = 1 << VRING_PACKED_EVENT_F_WRAP_CTR
_OFF: Final = _WRAP - 1
# An indirect table has no next field: its entries are walked in order, all of
# them. Past 2^16 entries it is refused rather than walked (vhost's cap for split).
_MAX_INDIRECT: Final = 1 << 16


def _avail_bits(wrap: int) -> int:
    """AVAIL/USED of a descriptor made available in a lap with this wrap counter."""
    return _AVAIL if wrap else _USED


def _used_bits(wrap: int) -> int:
    """AVAIL/USED of a descriptor marked used in a lap with this wrap counter."""
    return _AU if wrap else 0


def encode_base(pos: int, wrap: int) -> int:
    """vhost-user's packed vring base: bits 0-14 the index, bit 15 the wrap counter."""
    return pos | (wrap << VRING_PACKED_EVENT_F_WRAP_CTR)


def decode_base(base: int, num: int) -> tuple[int, int]:
    """(index, wrap counter) of a vhost-user packed vring base; bits 16-31 (used) ignored,
    as DPDK does: at SET_VRING_BASE every buffer was returned, used == avail."""
    pos = base & _OFF
    if pos >= num:
        raise ValueError(f"packed vring base {base:#x}: index {pos} >= queue size {num}")
    return pos, (base >> VRING_PACKED_EVENT_F_WRAP_CTR) & 1


@final
class PackedQueueDriver(VringShadow):
    """The driver's half of a packed virtqueue (Linux: struct vring_virtqueue, packed).

    A buffer is named by an id from the shadow free list, not by a slot: slots are
    written in ring order from ``next_avail`` and read back in ring order from
    ``last_used``, each position with its wrap counter (2.8.1), whatever order ids
    come back in. Made by ``vring_create_virtqueue``."""

    def __init__(
        self, ring: PackedViews, event_idx: bool, indirect: IndirectArea | None, index: int
    ) -> None:
        super().__init__(ring.num, _WRITE, event_idx=event_idx, indirect=indirect, index=index)
        self.ring = ring
        self._desc = ring.desc
        self._desc32 = ring.desc32
        self._driver = ring.driver  # ours: used-buffer notification suppression
        self._device = ring.device  # the device's: available-buffer notification suppression
        self.next_avail = 0
        self.avail_wrap = 1  # 2.8.1: both wrap counters start at 1
        self._avail_bits = _avail_bits(1)
        self.last_used = 0
        self.used_wrap = 1
        self._used_bits = _used_bits(1)
        self._event_flags = VRING_PACKED_EVENT_FLAG_ENABLE
        # broken (BAD_RING): a used descriptor naming no buffer in flight says nothing
        # of how many slots to skip.
        self._desc.cast("B")[:] = bytes(DESC_SIZE * ring.num)  # flags 0: nothing available
        self._driver[0] = 0
        self._driver[1] = VRING_PACKED_EVENT_FLAG_ENABLE

    # -- adding buffers -------------------------------------------------------

    def _advance(self, i: int) -> int:
        i += 1
        if i == self.num:
            i = 0
            self.avail_wrap ^= 1
            self._avail_bits ^= _AU
        return i

    def _add_one(self, addr: int, word: int, in_len: int, token: object) -> int:
        if not self.num_free or token is None:
            self._refuse_one(token)
        bid = self._get_free()
        i = self.next_avail
        self._desc[2 * i] = addr
        self._desc[2 * i + 1] = word | (bid << 32) | self._avail_bits
        self._token[bid] = token
        self._in_len[bid] = in_len
        self._ndescs[bid] = 1
        i += 1
        if i == self.num:
            i = 0
            self.avail_wrap ^= 1
            self._avail_bits ^= _AU
        self.next_avail = i
        self.num_added += 1
        return bid

    def add_inbufs(self, bufs: list[tuple[int, int, object]]) -> int:
        """Many one-descriptor writable buffers, (addr, length, token) each; how many fit."""
        n = min(len(bufs), self.num_free)
        if not n:
            return 0
        desc, desc32, nxt, tokens, in_len, ndescs = (
            self._desc, self._desc32, self._next, self._token, self._in_len, self._ndescs
        )  # fmt: skip
        num = self.num
        bid = self.free_head
        i = self.next_avail
        bits32 = (self._avail_bits >> 32) | _WRITE32
        bad = False
        for k in range(n):
            addr, length, token = bufs[k]
            if token is None:
                n, bad = k, True  # the ones before are in
                break
            desc[2 * i] = addr
            desc32[4 * i + 2] = length & _U32
            # id and flags last, as virtqueue_add_packed stores flags after the rest
            # (x86 keeps stores in order): 32-bit words stay machine ints compiled.
            desc32[4 * i + 3] = bid | bits32
            tokens[bid] = token
            in_len[bid] = length
            ndescs[bid] = 1
            bid = nxt[bid]
            i += 1
            if i == num:
                i = 0
                self.avail_wrap ^= 1
                self._avail_bits ^= _AU
                bits32 ^= _AU32
        self.free_head = bid
        self.num_free -= n
        self.next_avail = i
        self.num_added += n
        if bad:
            raise ValueError(f"token must not be None (buffer {n} of the burst; {n} added)")
        return n

    def _add_direct(
        self, out: Sequence[Segment], in_: Sequence[Segment], total: int, token: object
    ) -> int:
        desc, num = self._desc, self.num
        bid = self.free_head
        self.free_head = self._next[bid]
        idbits = bid << 32
        head = i = self.next_avail
        head_word = 0
        in_len = 0
        n = 0
        for segs, wflag in ((out, 0), (in_, _WRITE)):
            for addr, length in segs:
                n += 1
                word = (length & _U32) | idbits | wflag | self._avail_bits
                if n < total:
                    word |= _NEXT
                if wflag:
                    in_len += length
                desc[2 * i] = addr
                if i == head:
                    head_word = word  # stored last: it makes the whole chain available
                else:
                    desc[2 * i + 1] = word
                i += 1
                if i == num:
                    i = 0
                    self.avail_wrap ^= 1
                    self._avail_bits ^= _AU
        desc[2 * head + 1] = head_word
        self.next_avail = i
        self.num_free -= total
        self.num_added += total
        self._token[bid] = token
        self._in_len[bid] = in_len
        self._ndescs[bid] = total
        return bid

    def _fill_table(
        self, table: memoryview, base: int, out: Sequence[Segment], in_: Sequence[Segment]
    ) -> int:
        in_len = 0
        j = base
        # 2.8.19: only WRITE is a valid flag inside an indirect table; no ids, no NEXT.
        for segs, wflag in ((out, 0), (in_, _WRITE)):
            for addr, length in segs:
                table[j] = addr
                table[j + 1] = (length & _U32) | wflag
                if wflag:
                    in_len += length
                j += 2
        return in_len

    def _add_table(self, head: int, addr: int, size: int) -> None:
        i = self.next_avail
        self._desc[2 * i] = addr
        self._desc[2 * i + 1] = size | (head << 32) | _INDIRECT | self._avail_bits
        self.next_avail = self._advance(i)
        self.num_added += 1

    # -- notifying the device ------------------------------------------------

    def kick_prepare(self) -> bool:
        """Whether the device wants a notification for what was added since last time
        (virtqueue_kick_prepare_packed)."""
        added = self.num_added
        self.num_added = 0
        virtio_mb()
        flags = self._device[1]
        if flags != VRING_PACKED_EVENT_FLAG_DESC or not self.event_idx:
            # DESC without EVENT_IDX is not a valid setting: kick rather than stall.
            return flags != VRING_PACKED_EVENT_FLAG_DISABLE
        if not added:
            return False
        if added >= self.num:
            return True  # every slot was passed, the event's too
        off_wrap = self._device[0]
        back = self.next_avail - (off_wrap & _OFF)
        if (off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR) != self.avail_wrap:
            back += self.num  # the event slot is in the previous lap
        # vring_need_event: the event slot is in [old, new), new - old = added.
        return 1 <= back <= added

    # -- getting used buffers --------------------------------------------------

    def more_used(self) -> bool:
        if self.broken:
            return False
        return self._desc[2 * self.last_used + 1] & _AU == self._used_bits

    def _bad_id(self, bid: int) -> UsedRingError:
        self.broken = True
        return UsedRingError(
            f"vq {self.index}: used descriptor {self.last_used} names buffer id {bid}, "
            f"which is not a buffer in flight (queue stopped: the slots it took are unknown)",
            bid,
        )

    def _wrap_lie(self, word: int) -> UsedIndexError:
        # With buffers in flight the slot at last_used holds what the driver made
        # available in this lap (AVAIL = used_wrap, USED = its inverse) or what the device
        # marked used in it (both = used_wrap); the other two flag states name the other
        # lap: the device's used position a ring's worth off (split: used idx > num ahead).
        self.broken = True
        a = (word >> 48) & VRING_PACKED_DESC_F_AVAIL != 0
        u = (word >> 48) & VRING_PACKED_DESC_F_USED != 0
        return UsedIndexError(
            f"vq {self.index}: descriptor {self.last_used} has AVAIL={a:d} USED={u:d} with "
            f"{self.num - self.num_free} slots in flight and used wrap counter "
            f"{self.used_wrap}: written for the other lap"
        )

    def get_buf(self) -> tuple[object, int] | None:
        """The next used buffer as (token, used length), or None (virtqueue_get_buf).

        A length larger than the buffer's writable part is raised after the
        buffer is detached (the error carries ``token``); an id that is no
        buffer in flight is raised and breaks the queue (``broken``).
        """
        if self.broken:
            return None
        pos = self.last_used
        word = self._desc[2 * pos + 1]
        if word & _AU != self._used_bits:
            if word & _AU != self._used_bits ^ _USED and self.num_free < self.num:
                raise self._wrap_lie(word)
            return None
        bid = (word >> 32) & 0xFFFF
        # 2.8.4: the length is meaningful only with WRITE set in the used descriptor.
        length = word & _U32 if word & _WRITE else 0
        if bid >= self.num or self._token[bid] is None:
            raise self._bad_id(bid)
        pos += self._ndescs[bid]
        if pos >= self.num:
            pos -= self.num
            self.used_wrap ^= 1
            self._used_bits ^= _AU
        self.last_used = pos
        if self._event_flags == VRING_PACKED_EVENT_FLAG_DESC:
            self._driver[0] = pos | (self.used_wrap << VRING_PACKED_EVENT_F_WRAP_CTR)
        return self._detach_checked(bid, length), length

    def get_bufs(self, budget: int) -> list[tuple[object, int]]:
        """Up to ``budget`` used buffers as (token, length): ``get_buf``'s checks; a bad
        first entry raises as ``get_buf`` does, a bad one after good ones ends the burst."""
        if self.broken or budget <= 0:
            return []
        desc32, num = self._desc32, self.num
        tokens, in_len, ndescs, nxt = self._token, self._in_len, self._ndescs, self._next
        pos, bits32 = self.last_used, self._used_bits >> 32
        free_head, freed = self.free_head, 0
        out: list[tuple[object, int]] = []
        while len(out) < budget:
            idf = desc32[4 * pos + 3]  # id | flags << 16: the flags first
            if idf & _AU32 != bits32:
                break
            bid = idf & 0xFFFF
            length = desc32[4 * pos + 2] if idf & _WRITE32 else 0
            if bid >= num or tokens[bid] is None or length > in_len[bid]:
                break
            out.append((tokens[bid], length))
            tokens[bid] = None
            freed += ndescs[bid]
            nxt[bid] = free_head
            free_head = bid
            pos += ndescs[bid]
            if pos >= num:
                pos -= num
                bits32 ^= _AU32
                self.used_wrap ^= 1
        self.free_head = free_head
        self.num_free += freed
        self.last_used = pos
        self._used_bits = bits32 << 32
        if not out:
            got = self.get_buf()  # None, or raises for the bad entry as get_buf would
            return [] if got is None else [got]
        if self._event_flags == VRING_PACKED_EVENT_FLAG_DESC:
            self._driver[0] = pos | (self.used_wrap << VRING_PACKED_EVENT_F_WRAP_CTR)
        return out

    def _detach_buf(self, bid: int) -> object:
        token = self._token[bid]
        self._token[bid] = None
        self.num_free += self._ndescs[bid]
        self._next[bid] = self.free_head
        self.free_head = bid
        return token

    def detach_unused_buf(self) -> object | None:
        """One buffer the device never used, for teardown after reset, or None."""
        for bid in range(self.num):
            if self._token[bid] is not None:
                n = self._ndescs[bid]
                token = self._detach_buf(bid)
                # The device is reset: take the slots back, as split takes its avail entry.
                i = self.next_avail - n
                if i < 0:
                    i += self.num
                    self.avail_wrap ^= 1
                    self._avail_bits ^= _AU
                self.next_avail = i
                return token
        return None

    # -- callbacks (used-buffer notifications) ---------------------------------

    def _set_event_flags(self, flags: int) -> None:
        if self._event_flags != flags:
            self._event_flags = flags
            self._driver[1] = flags

    def disable_cb(self) -> None:
        self.cb_disabled = True
        self._set_event_flags(VRING_PACKED_EVENT_FLAG_DISABLE)

    def enable_cb_prepare(self) -> int:
        """Re-enable callbacks; returns the position to pass to ``poll`` (the race check)."""
        last = self.last_used | (self.used_wrap << VRING_PACKED_EVENT_F_WRAP_CTR)
        if self.event_idx:
            self._driver[0] = last  # offset and wrap before the flags (Linux: virtio_wmb)
        self.cb_disabled = False
        self._set_event_flags(
            VRING_PACKED_EVENT_FLAG_DESC if self.event_idx else VRING_PACKED_EVENT_FLAG_ENABLE
        )
        return last

    def poll(self, last_used_idx: int) -> bool:
        """True if buffers were used since ``enable_cb_prepare`` returned ``last_used_idx``."""
        virtio_mb()
        if self.broken:
            return False
        pos = last_used_idx & _OFF
        bits = _used_bits(last_used_idx >> VRING_PACKED_EVENT_F_WRAP_CTR)
        return self._desc[2 * pos + 1] & _AU == bits



@final
class _Consumed(Exception):
    """Internal: a refused chain whose extent is known, so it can be consumed.

    ``resume`` = (next position, its wrap counter, id or -1, slots taken).
    """

    def __init__(self, message: str, head: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.head = head
        self.resume: tuple[int, int, int, int] = (0, 0, -1, 0)

    def at(self, resume: tuple[int, int, int, int]) -> _Consumed:
        self.resume = resume
        return self


def _plain(e: _Consumed) -> DescriptorError:
    err = DescriptorError(e.message)
    err.head = e.head
    return err


@final
class PackedQueueDevice:
    """The device's half of a packed virtqueue (DPDK vhost: struct vhost_virtqueue, packed)."""

    def __init__(
        self,
        ring: PackedViews,
        memory: GuestMemory,
        *,
        event_idx: bool = False,
        last_avail_idx: int = _WRAP,
        index: int = 0,
    ) -> None:
        """``last_avail_idx`` is vhost-user's packed base: index | wrap counter << 15
        (a fresh ring: 0 | 1 << 15). Used continues from the same slot: when a ring
        stops, every buffer it took has been returned (DPDK's SET_VRING_BASE)."""
        self.ring = ring
        self.memory = memory
        self.num = ring.num
        self.index = index
        self.event_idx = event_idx
        self._desc = ring.desc
        self._desc32 = ring.desc32
        self._driver = ring.driver  # the driver's: used-buffer notification suppression
        self._device = ring.device  # ours: available-buffer notification suppression
        pos, wrap = decode_base(last_avail_idx, self.num)
        self._set_avail(pos, wrap)
        self.used_pos = pos
        self.used_wrap = wrap
        self._inflight = [0] * self.num  # slots each buffer id in flight took; 0: free
        self._popped: list[tuple[int, int]] = []  # (id or -1, slots), newest last: unpop
        self._shadow: list[tuple[int, int]] = []  # (len|id|WRITE word, slots) pushed, unflushed
        self._since_signal = 0  # slots marked used since the last needs_notify
        self.signalled_used_valid = False
        # Dirty logging (live migration): None while off, one attribute test per flush.
        self.dirty: DirtyLog | None = None
        self._log_desc_gpa = 0
        self._log_device_gpa = 0
        # In-flight tracking (vhost-user INFLIGHT_SHMFD): None while off. After a restart
        # the chains the old process had in flight are taken again before any new one,
        # rebuilt from the region's copies (``_resub``: (id, chain or its error), oldest
        # first); popped, they are ``_popped`` entries of 0 slots.
        self.inflight: InflightPacked | None = None
        self._resub: list[tuple[int, Chain | DescriptorError]] = []
        self._resub_popped: list[tuple[int, Chain | DescriptorError]] = []

    def set_dirty_log(self, log: DirtyLog | None, desc_gpa: int, used_gpa: int) -> None:
        """Log this ring's writes into ``log`` (None: stop): used descriptors written
        back in the descriptor ring at guest-physical ``desc_gpa``, and the device event
        area at ``used_gpa`` (QEMU's ``log_guest_addr`` for a packed ring: its used_phys)."""
        self.dirty = log
        self._log_desc_gpa = desc_gpa
        self._log_device_gpa = used_gpa

    def _log_descs(self, start: int, slots: int) -> None:
        """Log ``slots`` descriptors from slot ``start`` on, wrapping at the ring's end."""
        log = self.dirty
        assert log is not None  # the caller tests it
        log.log_ring(self._log_desc_gpa, start, slots, self.num, DESC_SIZE)

    def _set_avail(self, pos: int, wrap: int) -> None:
        self.last_avail = pos
        self.avail_wrap = wrap
        self._avail_bits = _avail_bits(wrap)

    @property
    def last_avail_idx(self) -> int:
        """Where the next chain is taken, as vhost-user's GET_VRING_BASE reports it."""
        return encode_base(self.last_avail, self.avail_wrap)

    def vring_base(self, unpopped: int = 0) -> int:
        """``last_avail_idx`` as if the newest ``unpopped`` chains were given back."""
        pos, wrap = self.last_avail, self.avail_wrap
        for _bid, slots in self._popped[len(self._popped) - unpopped :] if unpopped else ():
            pos -= slots
            if pos < 0:
                pos += self.num
                wrap ^= 1
        return encode_base(pos, wrap)

    def sync_last_avail_to_used(self) -> int | None:
        """Continue from the used position the descriptors show where SET_VRING_BASE is
        provably stale; the base it replaced, or None if it stands.

        QEMU 7.2 restores a split ring's position from the used index after a back-end
        died (GET_VRING_BASE failed), but a packed ring has no such index
        (virtio_queue_packed_restore_last_avail_idx does nothing) and it sends the last
        base it had: the ring's start. The descriptors say where the device was, for a
        ring of one-slot chains (what Linux posts once INDIRECT_DESC is negotiated):
        every slot before the device's used position has USED = its wrap counter (a used
        descriptor of this lap, or one the driver made available again for the next),
        every slot from it on the inverse (the last lap's used descriptor, or one made
        available in this lap). The USED bits flip once, at that position.

        Only a base that is stale for sure is replaced: one whose slot shows a descriptor
        used in the lap it claims the device has not reached, or the fresh base
        (0, wrap 1) on a ring where the device has marked something used. And only when
        the bits flip once: a multi-slot chain's other slots keep the driver's flags and
        make more flips, and then the base stands (and the ring stops with the error
        ``pop`` names, as before). The device resumes at the used position and takes
        again what the old one took and never used, as the split ring does."""
        desc32, num = self._desc32, self.num
        pos, wrap = self.last_avail, self.avail_wrap
        used_bits = [(desc32[4 * i + 3] >> 31) & 1 for i in range(num)]  # USED: flags bit 15
        stale = desc32[4 * pos + 3] & _AU32 == _used_bits(wrap) >> 32
        fresh_claim = (pos, wrap) == (0, 1) and any(used_bits)
        if not (stale or fresh_claim):
            return None
        flips = [i for i in range(1, num) if used_bits[i] != used_bits[i - 1]]
        if len(flips) > 1:
            return None
        at, lap = (flips[0], used_bits[0]) if flips else (0, used_bits[0] ^ 1)
        if (at, lap) == (pos, wrap):
            return None
        base = self.last_avail_idx
        self._set_avail(at, lap)
        self.used_pos, self.used_wrap = at, lap
        self.signalled_used_valid = False
        return base

    def set_inflight(self, region: InflightPacked | None) -> list[int]:
        """Track the chains in flight in ``region`` (None: stop); the buffer ids a
        restarted back-end takes again first, oldest first (vhost-user.rst "When
        reconnecting").

        A fresh region starts empty at the used position. One that was in use is
        recovered, and the ring's positions are the region's, whatever SET_VRING_BASE
        said: used where the old process wrote its last published used descriptor, avail
        as many slots on as its chains still in flight took (every slot it took is one
        it used or one of those). Called before the first pop."""
        self.inflight = region
        self._resub, self._resub_popped = [], []
        if region is None:
            return []
        if region.fresh:
            region.init(self.used_pos, self.used_wrap)
            return []
        heads = region.recover(self._desc)
        pos, wrap = region.used_pos
        self.used_pos, self.used_wrap = pos, wrap
        self.signalled_used_valid = False
        slots = 0
        for head in heads:
            descs = region.chain(head)
            bid = region.buffer_id(head)
            self._resub.append((bid, self._rebuild(bid, descs)))
            self._inflight[bid] = len(descs)
            slots += len(descs)
        pos += slots
        if pos >= self.num:
            pos -= self.num
            wrap ^= 1
        self._set_avail(pos, wrap)
        return [bid for bid, _c in self._resub]

    def _rebuild(self, bid: int, descs: list[tuple[int, int]]) -> Chain | DescriptorError:
        """Chain ``bid`` from the region's copies of its descriptors, validated as ``pop``
        validates a chain in the ring: walked in a scratch ring that holds only it."""
        scratch = memoryview(bytearray(DESC_SIZE * self.num + 2 * EVENT_SUPPRESS_SIZE))
        ring = PackedViews(self.num, scratch[: DESC_SIZE * self.num],
                           scratch[-2 * EVENT_SUPPRESS_SIZE : -EVENT_SUPPRESS_SIZE],
                           scratch[-EVENT_SUPPRESS_SIZE:])  # fmt: skip
        for k, (addr, word) in enumerate(descs):
            ring.desc[2 * k] = addr
            ring.desc[2 * k + 1] = (word & ~_AU) | _avail_bits(1)  # available, first lap
        walker = PackedQueueDevice(ring, self.memory, index=self.index)
        try:
            chain = walker.pop()
        except DescriptorError as e:
            return DescriptorError(f"resubmitted after a restart: {e}", bid)
        finally:
            ring.release()
        if chain is None or chain.head != bid:
            return DescriptorError(f"vq {self.index}: resubmitted after a restart: the "
                                   "region's copy of its descriptors is no chain of that id",
                                   bid)  # fmt: skip
        return chain

    def pop_resubmitted(self) -> Chain:
        """The oldest chain still owed from before a restart (DescriptorError: consumed)."""
        item = self._resub.pop(0)
        self._resub_popped.append(item)
        if len(self._resub_popped) > self.num:
            del self._resub_popped[0]  # past any unpop's reach (the _popped bound)
        self._popped.append((item[0], 0))
        got = item[1]
        if isinstance(got, DescriptorError):
            raise got
        return got

    # -- taking chains ---------------------------------------------------------

    def _head_state(self) -> bool:
        """Whether a chain is available at last_avail; a driver lie stops the queue."""
        word = self._desc[2 * self.last_avail + 1]
        au = word & _AU
        if au == self._avail_bits:
            return True
        if au == _used_bits(self.avail_wrap):
            # AVAIL = USED = our wrap counter: "used in this lap", which only this
            # device could write, and it never writes where it has not taken yet.
            raise AvailIndexError(
                f"vq {self.index}: descriptor {self.last_avail} has AVAIL=USED="
                f"{self.avail_wrap} (flags {word >> 48:#06x}): marked used in the lap "
                f"the device has not taken yet; a driver lie (queue stopped)"
            )
        return False

    def avail_pending(self) -> int:
        """1 if a chain is available, else 0 (a count would be a walk of the ring)."""
        if self._resub:
            return len(self._resub)
        return 1 if self._desc[2 * self.last_avail + 1] & _AU == self._avail_bits else 0

    def _commit(self, pos: int, wrap: int, bid: int, slots: int) -> None:
        self._set_avail(pos, wrap)
        if bid >= 0:
            self._inflight[bid] = slots
        popped = self._popped
        popped.append((bid, slots))
        if len(popped) > 2 * self.num:
            del popped[: -self.num]

    def pop(self) -> Chain | None:
        """The next available chain, or None; DescriptorError for a bad one.

        A bad chain whose extent is known is consumed; the error carries its
        buffer id in ``head`` for ``push_used(head, 0)`` when that id is usable
        (``None`` when the id is out of range or already in flight). A ring
        that cannot be walked raises ``AvailIndexError`` and consumes nothing.
        """
        if self._resub:
            return self.pop_resubmitted()
        desc = self._desc
        pos = self.last_avail
        word = desc[2 * pos + 1]
        if word & _AU != self._avail_bits:
            self._head_state()  # raises for flags that lie
            return None
        if not word & (_NEXT | _INDIRECT):
            # The common case, inline: one direct descriptor, a free id, in the first region.
            bid = (word >> 32) & 0xFFFF
            num = self.num
            if bid < num and not self._inflight[bid]:
                addr = desc[2 * pos]
                length = word & _U32
                mem = self.memory
                base, rsize, rbuf = mem.first_gpa, mem.first_size, mem.first_buf
                off = addr - base
                if 0 <= off and off + length <= rsize:
                    if self.inflight is not None:
                        self.inflight.take(desc, pos, 1, bid)
                    pos += 1
                    if pos == num:
                        pos = 0
                        self.avail_wrap ^= 1
                        self._avail_bits ^= _AU
                    self.last_avail = pos
                    self._inflight[bid] = 1
                    popped = self._popped
                    popped.append((bid, 1))
                    if len(popped) > 2 * num:
                        del popped[:-num]
                    # Its view is made only if asked for (Chain.direct).
                    return Chain.direct(bid, addr, length, bool(word & _WRITE), rbuf, off)
        start = pos
        try:
            chain, pos, wrap, slots = self._walk()
        except _Consumed as e:
            self._commit(*e.resume)
            _pos, _wrap, bid, slots = e.resume
            if bid >= 0 and self.inflight is not None:
                self.inflight.take(desc, start, slots, bid)  # its used (len 0) follows
            raise _plain(e) from None
        self._commit(pos, wrap, chain.head, slots)
        if self.inflight is not None:
            self.inflight.take(desc, start, slots, chain.head)
        return chain

    def pop_burst(self, budget: int) -> list[Chain]:
        """Up to ``budget`` chains, validated exactly as ``pop`` does: a bad first chain
        raises as ``pop`` would; a bad chain after good ones ends the burst unconsumed."""
        if self._resub:
            return pop_resubmitted_burst(self, self._resub, budget)
        chains: list[Chain] = []
        desc, desc32, num = self._desc, self._desc32, self.num
        inflight, popped, region = self._inflight, self._popped, self.inflight
        mem = self.memory
        base, rsize, rbuf = mem.first_gpa, mem.first_size, mem.first_buf
        pos, bits32 = self.last_avail, self._avail_bits >> 32
        # The common case inline, as in pop: one direct descriptor, a free id, first region.
        while len(chains) < budget:
            idf = desc32[4 * pos + 3]  # id | flags << 16: the flags first
            if idf & _AU32 != bits32 or idf & (_NEXT32 | _INDIRECT32):
                break
            bid = idf & 0xFFFF
            if bid >= num or inflight[bid]:
                break
            addr = desc[2 * pos]
            length = desc32[4 * pos + 2]
            off = addr - base
            if not (0 <= off and off + length <= rsize):
                break
            if region is not None:
                region.take(desc, pos, 1, bid)
            pos += 1
            if pos == num:
                pos = 0
                self.avail_wrap ^= 1
                bits32 ^= _AU32
            inflight[bid] = 1
            popped.append((bid, 1))
            chains.append(Chain.direct(bid, addr, length, bool(idf & _WRITE32), rbuf, off))
        self.last_avail, self._avail_bits = pos, bits32 << 32
        if len(popped) > 2 * num:
            del popped[:-num]
        # Anything else (nothing available, a chain, indirect, a bad one) goes through pop.
        while len(chains) < budget:
            try:
                chain = self.pop()
            except AvailIndexError:
                if chains:
                    break  # nothing was consumed: the next call raises it
                raise
            except DescriptorError:
                if chains:
                    self.unpop(1)  # exactly the slots the refused chain took
                    break
                raise
            if chain is None:
                break
            chains.append(chain)
        return chains

    def _walk(self) -> tuple[Chain, int, int, int]:
        """The chain at last_avail: (chain, next position, its wrap counter, slots)."""
        desc = self._desc
        num = self.num
        i = start = self.last_avail
        wrap = self.avail_wrap
        word = desc[2 * i + 1]
        if not word & (_NEXT | _INDIRECT):
            # One direct descriptor, the common case: same checks, no loop.
            bid = (word >> 32) & 0xFFFF
            i += 1
            if i == num:
                i = 0
                wrap ^= 1
            if bid >= num or self._inflight[bid]:
                raise self._bad_id(bid, start, (i, wrap, -1, 1))
            addr = desc[2 * start]
            length = word & _U32
            mem = self.memory
            base, rsize, rbuf = mem.first_gpa, mem.first_size, mem.first_buf
            off = addr - base
            write = bool(word & _WRITE)
            if 0 <= off and off + length <= rsize:
                return Chain.direct(bid, addr, length, write, rbuf, off), i, wrap, 1
            try:
                seg = self.memory.view(addr, length)
            except Exception as e:
                raise _Consumed(
                    f"vq {self.index}: chain at descriptor {start}: descriptor {start}: {e}",
                    bid,
                ).at((i, wrap, bid, 1)) from None
            if write:
                return Chain(bid, NO_SEGMENTS, [seg], None, length, 0, addr), i, wrap, 1
            return Chain(bid, [seg], NO_SEGMENTS, None, 0, length, addr), i, wrap, 1
        return self._walk_chain()

    def _bad_id(self, bid: int, start: int, resume: tuple[int, int, int, int]) -> _Consumed:
        if bid >= self.num:
            why = f"buffer id {bid} >= queue size {self.num}"
        else:
            why = f"buffer id {bid} is already in flight (reused before it was used)"
        return _Consumed(f"vq {self.index}: chain at descriptor {start}: {why}").at(resume)

    def _walk_chain(self) -> tuple[Chain, int, int, int]:
        desc = self._desc
        num = self.num
        i = start = self.last_avail
        wrap = self.avail_wrap
        want = self._avail_bits
        mem = self.memory
        base, rsize, rbuf = mem.first_gpa, mem.first_size, mem.first_buf
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        segments: list[tuple[int, int, bool]] = []
        in_len = out_len = total = 0
        err = ""  # the first broken rule; the walk goes on to find the chain's end and id
        slots = 0
        while True:
            word = desc[2 * i + 1]
            if slots:
                if word & _AU != want:
                    raise AvailIndexError(
                        f"vq {self.index}: chain at descriptor {start}: descriptor {i} "
                        f"(flags {word >> 48:#06x}) is not available with wrap counter {wrap}: "
                        f"the head was made available before the rest of its chain "
                        f"(queue stopped)"
                    )
                if slots == num:
                    raise AvailIndexError(
                        f"vq {self.index}: chain at descriptor {start} runs round the whole "
                        f"ring ({num} descriptors) without an end (queue stopped)"
                    )
            slots += 1
            if not err:
                addr = desc[2 * i]
                length = word & _U32
                if word & _INDIRECT:
                    # Only ever the first and only descriptor: the lists are the table's.
                    err = self._indirect(i, addr, length, word, slots, readable, writable,
                                         segments)  # fmt: skip
                    in_len = sum(n for _a, n, w in segments if w)
                    out_len = sum(n for _a, n, w in segments if not w)
                    total = in_len + out_len
                    if not err and total > MAX_CHAIN_BYTES:
                        err = "chain longer than 2^32 bytes (2.8.5)"
                else:
                    total += length
                    off = addr - base
                    if total > MAX_CHAIN_BYTES:
                        err = "chain longer than 2^32 bytes (2.8.5)"
                    elif 0 <= off and off + length <= rsize:
                        seg = rbuf[off : off + length]
                    else:
                        try:
                            seg = self.memory.view(addr, length)
                        except Exception as e:
                            err = f"descriptor {i}: {e}"
                    if not err:
                        if word & _WRITE:
                            writable.append(seg)
                            in_len += length
                        elif writable:
                            err = f"descriptor {i}: device-readable after device-writable (2.8.6)"
                        else:
                            readable.append(seg)
                            out_len += length
                        segments.append((addr, length, bool(word & _WRITE)))
            last = i
            i += 1
            if i == num:
                i = 0
                wrap ^= 1
                want ^= _AU
            if not word & _NEXT:
                break
        bid = (word >> 32) & 0xFFFF  # 2.8.6: the buffer id is in the chain's last descriptor
        if bid >= num or self._inflight[bid]:
            raise self._bad_id(bid, start, (i, wrap, -1, slots))
        if err:
            raise _Consumed(
                f"vq {self.index}: chain at descriptor {start} (ends at {last}): {err}", bid
            ).at((i, wrap, bid, slots))
        return Chain(bid, readable, writable, segments, in_len, out_len), i, wrap, slots

    def _indirect(
        self,
        i: int,
        addr: int,
        length: int,
        word: int,
        slots: int,
        readable: list[memoryview],
        writable: list[memoryview],
        segments: list[tuple[int, int, bool]],
    ) -> str:
        """Walk the indirect table of descriptor ``i`` into the lists; the broken rule or ''."""
        if word & _NEXT:
            return f"descriptor {i}: INDIRECT together with NEXT (2.8.19)"
        if slots > 1:
            return f"descriptor {i}: INDIRECT inside a NEXT chain (2.8.19)"
        if length == 0 or length % DESC_SIZE:
            return (f"descriptor {i}: indirect table length {length} is not a non-zero "
                    f"multiple of 16")  # fmt: skip
        n = length // DESC_SIZE
        if n > _MAX_INDIRECT:
            return f"descriptor {i}: indirect table of {n} entries (more than {_MAX_INDIRECT})"
        try:
            table = self.memory.view(addr, length).cast("Q")
        except Exception as e:
            return f"descriptor {i}: indirect table: {e}"
        for j in range(n):
            a = table[2 * j]
            w = table[2 * j + 1]
            if w & _INDIRECT:
                return f"indirect entry {j}: nested indirect table (2.8.19)"
            ln = w & _U32
            try:
                seg = self.memory.view(a, ln)
            except Exception as e:
                return f"indirect entry {j}: {e}"
            if w & _WRITE:
                writable.append(seg)
            elif writable:
                return f"indirect entry {j}: device-readable after device-writable (2.8.6)"
            else:
                readable.append(seg)
            segments.append((a, ln, bool(w & _WRITE)))
        return ""

    def unpop(self, n: int = 1) -> None:
        """Give back the last ``n`` popped chains, exactly the slots each took."""
        popped = self._popped
        if n > len(popped):
            raise ValueError(f"vq {self.index}: unpop({n}) but only {len(popped)} popped")
        pos, wrap = self.last_avail, self.avail_wrap
        for _ in range(n):
            bid, slots = popped.pop()
            if not slots:
                # Resubmitted: in no ring slot; back to the front, still in flight.
                self._resub.insert(0, self._resub_popped.pop())
                continue
            if bid >= 0:
                self._inflight[bid] = 0
                if self.inflight is not None:
                    self.inflight.untake(bid)
            pos -= slots
            if pos < 0:
                pos += self.num
                wrap ^= 1
        self._set_avail(pos, wrap)

    # -- returning chains ------------------------------------------------------

    def push_used(self, head: int, length: int) -> None:
        """Queue one used buffer (its id); ``flush_used`` writes the batch to the ring."""
        slots = self._inflight[head] if 0 <= head < self.num else 0
        if not slots:
            raise ValueError(f"vq {self.index}: push_used of buffer id {head}, not in flight")
        self._inflight[head] = 0
        # The used descriptor's word but its AVAIL/USED bits (flush_used adds them);
        # 2.8.4: the length counts only with WRITE set.
        self._shadow.append(((length & _U32) | (head << 32) | (_WRITE if length else 0), slots))

    def push_used_burst(self, used: Sequence[tuple[int, int]]) -> None:
        """Queue many (id, length) used buffers; ``flush_used`` writes them."""
        inflight, num, shadow = self._inflight, self.num, self._shadow
        for head, length in used:
            slots = inflight[head] if 0 <= head < num else 0
            if not slots:
                raise ValueError(f"vq {self.index}: push_used of buffer id {head}, not in flight")
            inflight[head] = 0
            shadow.append(((length & _U32) | (head << 32) | (_WRITE if length else 0), slots))

    def push_used_unchecked(self, head: int, length: int) -> None:
        """A used descriptor naming ``head`` whether it is in flight or not (an id out
        of range, one already used): a lie only ``virtnet device --faults`` tells, one
        slot long (net/faults.py)."""
        word = (length & _U32) | ((head & 0xFFFF) << 32) | (_WRITE if length else 0)
        self._shadow.append((word, 1))

    def has_unflushed(self) -> bool:
        """Whether ``push_used`` queued buffers that ``flush_used`` has not written."""
        return bool(self._shadow)

    def flush_used(self) -> None:
        """Write the queued used descriptors: length, then id | flags (32-bit stores).

        The batch's first descriptor is stored last (DPDK's
        flush_shadow_used_ring_packed does the same): the driver reads used
        descriptors in order, so it sees the whole batch or none of it — never
        the first buffers of a mergeable packet without the rest. Within a
        descriptor the flags go last too, after its length (x86 keeps stores in
        order); 32-bit words stay machine ints when compiled, the 64-bit one with
        USED (bit 63) set would not.
        """
        desc32, num, shadow = self._desc32, self.num, self._shadow
        if not shadow:
            return
        pos, wrap = self.used_pos, self.used_wrap
        bits32 = _used_bits(wrap) >> 32
        start = pos
        first = shadow[0][0]
        first_idf = (first >> 32) | bits32
        laps = 0
        for k, (word, slots) in enumerate(shadow):
            if k:
                desc32[4 * pos + 2] = word & _U32
                desc32[4 * pos + 3] = (word >> 32) | bits32
            pos += slots
            if pos >= num:
                pos -= num
                wrap ^= 1
                bits32 ^= _AU32
                laps += 1
        region = self.inflight
        if region is not None:  # the spec's order: entries freed, used_idx, then the flags
            for word, _slots in shadow:
                region.used((word >> 32) & 0xFFFF)
            region.set_used(pos, wrap)
        desc32[4 * start + 2] = first & _U32
        desc32[4 * start + 3] = first_idf  # stores stay in order on x86 (TSO): no barrier
        if region is not None:
            region.published()
        shadow.clear()
        self.used_pos, self.used_wrap = pos, wrap
        self._since_signal += pos - start + laps * num
        if self.dirty is not None:
            self._log_descs(start, pos - start + laps * num)

    def needs_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was flushed (vhost_vring_call_packed)."""
        virtio_mb()
        flags = self._driver[1]
        moved = self._since_signal
        self._since_signal = 0
        valid = self.signalled_used_valid
        self.signalled_used_valid = True
        if flags != VRING_PACKED_EVENT_FLAG_DESC or not self.event_idx:
            return flags != VRING_PACKED_EVENT_FLAG_DISABLE
        if not valid or moved >= self.num:
            return True
        off_wrap = self._driver[0]
        back = self.used_pos - (off_wrap & _OFF)
        if (off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR) != self.used_wrap:
            back += self.num
        return 1 <= back <= moved

    # -- driver notifications (kicks) ------------------------------------------

    def disable_notify(self) -> None:
        if self._device[1] != VRING_PACKED_EVENT_FLAG_DISABLE:
            self._device[1] = VRING_PACKED_EVENT_FLAG_DISABLE
            if self.dirty is not None:
                self.dirty.log_write(self._log_device_gpa, EVENT_SUPPRESS_SIZE)

    def enable_notify(self) -> bool:
        """Ask for kicks again; True if a chain arrived meanwhile (vhost_enable_notify)."""
        if self.event_idx:
            self._device[0] = self.last_avail_idx  # offset and wrap before the flags
            self._device[1] = VRING_PACKED_EVENT_FLAG_DESC
        else:
            self._device[1] = VRING_PACKED_EVENT_FLAG_ENABLE
        if self.dirty is not None:
            self.dirty.log_write(self._log_device_gpa, EVENT_SUPPRESS_SIZE)
        virtio_mb()
        return self._desc[2 * self.last_avail + 1] & _AU == self._avail_bits or bool(self._resub)
