"""The guest side ``virtnet conform`` builds: memfd regions (several, with offsets),
queue pairs of split or packed rings in them (virtnet's ``SplitQueueDriver`` /
``PackedQueueDriver``, with or without EVENT_IDX), frames in and out, and raw views of
both ring kinds for the cases that write what no driver would.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from virtnet.conform.session import CaseFailure, Session
from virtnet.net.guest import RX, TX
from virtnet.net.header import MRG_HDR_LEN, VirtioNetHdr
from virtnet.vhost_user.messages import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendRequest,
    MemoryRegionDesc,
    MemoryTable,
    VringAddr,
    VringState,
)
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.memory import GuestMemory, MemoryRegion
from virtnet.virtio.ring.layout import (
    DESC_SIZE,
    USED_ELEM_SIZE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    PackedAddrs,
    PackedViews,
    VringAddrs,
    VringViews,
)
from virtnet.virtio.ring.packed import encode_base
from virtnet.virtio.ring.queue import RingDriver, vring_create_virtqueue
from virtnet.virtio.ring.split import IndirectArea

R = FrontendRequest
QUEUE_SIZE = 64
SLOT = 2048  # one frame buffer: a 1514-byte frame and its 12-byte header fit
ETHERTYPE = 0x88B5  # IEEE local experimental: nobody else's traffic
DST_MAC = bytes.fromhex("020000c0f001")
SRC_MAC = bytes.fromhex("020000c0f002")
WAIT = 5.0  # for the back-end to use what we posted

# The standard layout of one queue pair: rx ring, tx ring, an indirect area, frame slots,
# as offsets from the pair's base; pair p sits at p * PAIR_SPAN, so pairs share no byte.
RX_RING, TX_RING, INDIRECT_AREA, DATA, DATA_SIZE = 0x0, 0x4000, 0x8000, 0x10000, 1 << 20
PAIR_SPAN = DATA + DATA_SIZE



@dataclass
class RxSeen:
    """What this process's case waited for on rx and got (``Rings.receive``): a case
    that waited and got nothing is how a back-end that does not echo shows."""

    waits: int = 0
    frames: int = 0

    def echoed(self) -> bool | None:
        """None: the case never waited for a frame; else whether one came back."""
        return None if not self.waits else self.frames > 0


rx_seen = RxSeen()  # each case runs in a process of its own: one case's count

DESC = struct.Struct("<QIHH")
LE16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")


def frame(seq: int, size: int) -> bytes:
    """Ethernet frame ``seq`` of ``size`` bytes: our MACs, a local ethertype, a pattern."""
    head = DST_MAC + SRC_MAC + ETHERTYPE.to_bytes(2, "big") + seq.to_bytes(4, "big")
    body = bytes((seq + i) & 0xFF for i in range(size - len(head)))
    return head + body


@dataclass
class Region:
    """One memfd shared with the back-end: ``size`` bytes at ``gpa``, ``offset`` into the file."""

    gpa: int
    size: int
    offset: int = 0
    # QEMU's memory-backend-memfd (seal=on) allows seals, so a back-end may add
    # F_SEAL_SHRINK; a hostile front-end would not (memfd-shrunk-unsealable).
    sealing: bool = True

    def open(self) -> None:
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if self.sealing else 0)
        self.fd = os.memfd_create("virtnet-conform", flags)
        os.ftruncate(self.fd, self.offset + self.size)
        self.map = mmap.mmap(self.fd, self.offset + self.size, mmap.MAP_SHARED)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.uva = ctypes.addressof(anchor) + self.offset
        del anchor
        self.view = memoryview(self.map)[self.offset : self.offset + self.size]

    def desc(self) -> MemoryRegionDesc:
        return MemoryRegionDesc(self.gpa, self.size, self.uva, self.offset)


class Guest:
    """Guest memory as a set of memfds; ring addresses are our virtual addresses (uva)."""

    def __init__(self, regions: Sequence[Region]) -> None:
        self.regions = list(regions)
        for r in self.regions:
            r.open()
        self.memory = GuestMemory([MemoryRegion(r.gpa, r.view, uva=r.uva) for r in self.regions])

    def uva(self, gpa: int) -> int:
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.uva + gpa - r.gpa
        raise ValueError(f"gpa {gpa:#x} is in no region")

    def set_mem_table(self, session: Session) -> None:
        table = MemoryTable(tuple(r.desc() for r in self.regions))
        session.must_ack(R.SET_MEM_TABLE, table, [r.fd for r in self.regions])

    def close(self) -> None:
        self.memory.release()
        for r in self.regions:
            r.view.release()
            try:
                r.map.close()
            except BufferError:
                pass
            os.close(r.fd)


def one_region(size: int = 4 << 20) -> Guest:
    return Guest([Region(0, size)])


@dataclass
class Packet:
    """A frame the back-end delivered on rx: its header and how many buffers it spans."""

    hdr: VirtioNetHdr
    frame: bytes
    buffers: int




class Rings:
    """Queue pair ``pair``: its rx and tx rings (vrings 2p and 2p + 1, vhost-user.rst
    "Multiple queue support") at ``ring_gpas``, frame buffers from ``data_gpa`` on; split
    or ``packed`` (2.8), with or without ``event_idx`` (2.7.10, 2.8.10)."""

    def __init__(self, guest: Guest, ring_gpas: tuple[int, int], data_gpa: int,
                 data_size: int, *, indirect_gpa: int | None = None,
                 num: int = QUEUE_SIZE, pair: int = 0, packed: bool = False,
                 event_idx: bool = False) -> None:  # fmt: skip
        self.guest = guest
        self.num = num
        self.pair = pair
        self.packed = packed
        self.event_idx = event_idx
        self.index = (2 * pair + RX, 2 * pair + TX)  # the vring index of rx and of tx
        layout = PackedAddrs if packed else VringAddrs
        self.addrs: list[VringAddrs | PackedAddrs] = [layout.contiguous(g, num)
                                                      for g in ring_gpas]  # fmt: skip
        self.vqs: list[RingDriver] = []
        for q, addrs in enumerate(self.addrs):
            indirect = None
            if indirect_gpa is not None and q == TX:
                size = IndirectArea.size(num, 8)
                view = guest.memory.view(indirect_gpa, size)
                indirect = IndirectArea(indirect_gpa, view, num, 8)
            views: PackedViews | VringViews
            if isinstance(addrs, PackedAddrs):
                views = PackedViews.from_memory(guest.memory, addrs)
            else:
                views = VringViews.from_memory(guest.memory, addrs)
            self.vqs.append(vring_create_virtqueue(views, event_idx=event_idx,
                                                   indirect=indirect, index=self.index[q]))
        self.free = [data_gpa + i * SLOT for i in range(data_size // SLOT)]
        self.kick: list[int] = []
        self.call: list[int] = []

    @classmethod
    def for_pair(cls, guest: Guest, pair: int = 0, *, indirect: bool = False,
                 features: int = 0) -> Rings:  # fmt: skip
        """Pair ``pair`` in the standard layout (its own rings and buffers), the ring kind
        and EVENT_IDX as ``features`` (the negotiated ones) say."""
        base = pair * PAIR_SPAN
        return cls(guest, (base + RX_RING, base + TX_RING), base + DATA, DATA_SIZE,
                   indirect_gpa=base + INDIRECT_AREA if indirect else None, pair=pair,
                   packed=bool(features & bit(VirtioF.RING_PACKED)),
                   event_idx=bool(features & bit(VirtioF.RING_EVENT_IDX)))  # fmt: skip

    def split_addrs(self, q: int) -> VringAddrs:
        """Ring ``q``'s addresses, for a raw writer of split rings."""
        addrs = self.addrs[q]
        if not isinstance(addrs, VringAddrs):
            raise ValueError(f"ring {q} is packed")
        return addrs

    def packed_addrs(self, q: int) -> PackedAddrs:
        """Ring ``q``'s addresses, for a raw writer of packed rings."""
        addrs = self.addrs[q]
        if not isinstance(addrs, PackedAddrs):
            raise ValueError(f"ring {q} is split")
        return addrs

    # -- set-up ------------------------------------------------------------------

    def start_base(self) -> int:
        """The vring base of a fresh ring: index 0; packed, its wrap counter 1 (2.8.1)."""
        return encode_base(0, 1) if self.packed else 0

    def consumed(self, base: int) -> int:
        """How many descriptors a GET_VRING_BASE ``base`` says the device took from a fresh
        ring (fewer than two laps): split, the avail index; packed, bits 0-14 the index and
        bit 15 the wrap counter, which flips each lap (vhost-user.rst GET_VRING_BASE)."""
        if not self.packed:
            return base & 0xFFFF
        lap = 0 if base >> 15 & 1 else self.num
        return (base & 0x7FFF) + lap

    def setup(self, session: Session, bases: tuple[int, int] | None = None,
              enable: bool = True) -> None:  # fmt: skip
        """The ring messages in QEMU's order (vhost_virtqueue_start), for both rings."""
        if not self.kick:
            self.kick = [session.eventfd() for _ in range(2)]
            self.call = [session.eventfd() for _ in range(2)]
        if bases is None:
            bases = (self.start_base(), self.start_base())
        for q, a in enumerate(self.addrs):
            i = self.index[q]
            session.must_ack(R.SET_VRING_NUM, VringState(i, self.num))
            # Packed: bits 16-31 of a GET_VRING_BASE reply are the used side; a start
            # takes bits 0-15 (the avail index and its wrap counter).
            session.must_ack(R.SET_VRING_BASE, VringState(i, bases[q] & 0xFFFF))
            uva = self.guest.uva
            addr = VringAddr(i, 0, uva(a.desc), uva(a.used), uva(a.avail), 0)
            session.must_ack(R.SET_VRING_ADDR, addr)
            session.must_ack(R.SET_VRING_KICK, U64(i), [self.kick[q]])
            session.must_ack(R.SET_VRING_CALL, U64(i), [self.call[q]])
        if enable and session.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            self.enable(session, True)

    def enable(self, session: Session, on: bool) -> None:
        """SET_VRING_ENABLE ``on`` for both rings of the pair (as QEMU: rx first)."""
        for i in self.index:
            session.must_ack(R.SET_VRING_ENABLE, VringState(i, int(on)))

    def vring_base(self, session: Session, q: int) -> int:
        """GET_VRING_BASE of this pair's ring ``q`` (RX or TX)."""
        i = self.index[q]
        session.send(R.GET_VRING_BASE, VringState(i, 0))
        state = session.reply(R.GET_VRING_BASE).payload_as(VringState)
        if state.index != i:
            raise CaseFailure(f"GET_VRING_BASE {i}: reply names vring {state.index}")
        return state.num

    # -- notifications -------------------------------------------------------------

    def kick_tx(self) -> None:
        """Notify tx when the device asks for it (kick_prepare: VRING_USED_F_NO_NOTIFY, or
        avail_event with EVENT_IDX): as Linux does, so a device that suppresses kicks
        wrongly stalls."""
        if self.vqs[TX].kick_prepare():
            os.eventfd_write(self.kick[TX], 1)

    def arm_rx_call(self) -> None:
        """Ask for a used-buffer notification on rx for the next buffer used (used_event =
        the next used index with EVENT_IDX); forget the ones that came before."""
        self.vqs[RX].enable_cb_prepare()
        self.rx_calls()

    def rx_calls(self) -> int:
        """How often the device signalled rx's call eventfd since last asked."""
        try:
            return os.eventfd_read(self.call[RX])
        except BlockingIOError:
            return 0

    # -- traffic -----------------------------------------------------------------

    def _slot(self) -> int:
        if not self.free:
            raise CaseFailure("out of frame buffers: the back-end keeps them all")
        return self.free.pop()

    def send(self, frames: Sequence[bytes], *, pieces: int = 1, indirect: bool = False,
             hdrs: Sequence[bytes] | None = None) -> list[int]:  # fmt: skip
        """Frames on tx, each a header (``hdrs``, else a plain one) + frame, in ``pieces``
        descriptors; a kick if the device asks for one. The slot of each frame."""
        svq = self.vqs[TX]
        slots = []
        for k, f in enumerate(frames):
            gpa = self._slot()
            slots.append(gpa)
            data = (bytes(MRG_HDR_LEN) if hdrs is None else hdrs[k]) + f
            self.guest.memory.write(gpa, data)
            if pieces == 1:
                segs = [(gpa, len(data))]
            else:  # the header alone first (as Linux without ANY_LAYOUT), the frame cut up
                cuts = [0, MRG_HDR_LEN] + [MRG_HDR_LEN + len(f) * k // (pieces - 1)
                                           for k in range(1, pieces - 1)] + [len(data)]  # fmt: skip
                segs = [(gpa + a, b - a) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
            if indirect:  # even a 1-segment frame, which add() would put in the ring
                ind = svq.indirect
                if ind is None:
                    raise ValueError("send(indirect=True): the tx ring has no indirect area")
                svq._add_indirect(ind, segs, (), gpa)
            else:
                svq.add(segs, (), gpa)
        self.kick_tx()
        return slots

    def post_rx(self, count: int, size: int = SLOT) -> None:
        rvq = self.vqs[RX]
        for _ in range(min(count, rvq.num_free)):
            gpa = self._slot()
            rvq.add_inbuf(gpa, size, (gpa, size))
        if rvq.kick_prepare():
            os.eventfd_write(self.kick[RX], 1)

    def wait_tx(self, n: int, timeout: float = WAIT) -> list[int]:
        """The used lengths of the next ``n`` tx buffers; fails if they do not come."""
        got: list[int] = []
        svq = self.vqs[TX]
        deadline = time.monotonic() + timeout
        while len(got) < n:
            item = svq.get_buf()
            if item is not None:
                self.free.append(cast(int, item[0]))  # a tx token is its slot's gpa (send)
                got.append(item[1])
            elif time.monotonic() >= deadline:
                raise CaseFailure(f"the back-end used {len(got)} of {n} tx buffers in {timeout:g}s")
            else:
                time.sleep(0.002)
        return got

    def tx_used_within(self, seconds: float) -> int:
        """How many tx buffers the back-end uses within ``seconds`` (none are awaited)."""
        n = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            item = self.vqs[TX].get_buf()
            if item is None:
                time.sleep(0.005)
                continue
            self.free.append(cast(int, item[0]))  # a tx token is its slot's gpa (send)
            n += 1
        return n

    def _next_rx(self, deadline: float) -> tuple[int, int, int] | None:
        rvq = self.vqs[RX]
        while True:
            item = rvq.get_buf()
            if item is not None:
                token, length = item
                gpa, size = cast(tuple[int, int], token)  # an rx token: (gpa, size) (post_rx)
                return gpa, size, length
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.002)

    def receive(self, n: int, *, mergeable: bool, timeout: float = WAIT) -> list[Packet]:
        """The next ``n`` packets on rx, reassembled from num_buffers buffers (5.1.6.4)."""
        out: list[Packet] = []
        deadline = time.monotonic() + timeout
        rx_seen.waits += 1
        while len(out) < n:
            packet = self._packet(deadline, mergeable, len(out))
            if packet is None:
                raise CaseFailure(f"{len(out)} of {n} frames came back on rx within {timeout:g}s")
            out.append(packet)
        return out

    def drain_rx(self, seconds: float, *, mergeable: bool) -> list[Packet]:
        """Every packet that arrives on rx within ``seconds`` (none are owed)."""
        out: list[Packet] = []
        deadline = time.monotonic() + seconds
        while (packet := self._packet(deadline, mergeable, len(out))) is not None:
            out.append(packet)
        return out

    def _packet(self, deadline: float, mergeable: bool, k: int) -> Packet | None:
        first = self._next_rx(deadline)
        if first is None:
            return None
        gpa, size, length = first
        if length < MRG_HDR_LEN or length > size:
            raise CaseFailure(f"rx buffer used with length {length} (buffer {size}, "
                              f"header {MRG_HDR_LEN})")  # fmt: skip
        data = self.guest.memory.read(gpa, length)
        self.free.append(gpa)
        hdr = VirtioNetHdr.unpack(data[:MRG_HDR_LEN])
        body = data[MRG_HDR_LEN:]
        count = hdr.num_buffers if mergeable else 1
        if count < 1:
            raise CaseFailure(f"packet {k}: num_buffers {hdr.num_buffers}")
        for j in range(1, count):
            more = self._next_rx(deadline)
            if more is None:
                raise CaseFailure(f"packet {k}: num_buffers {count} but only {j} "
                                  "buffers were used")  # fmt: skip
            gpa, size, length = more
            body += self.guest.memory.read(gpa, length)
            self.free.append(gpa)
        rx_seen.frames += 1
        return Packet(hdr, body, count)

    def rx_used_within(self, seconds: float) -> int:
        n = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._next_rx(time.monotonic()) is None:
                time.sleep(0.005)
            else:
                n += 1
        return n


class RawRing:
    """A split ring written by hand, byte by byte (what no driver would write)."""

    def __init__(self, guest: Guest, addrs: VringAddrs) -> None:
        self.guest = guest
        self.addrs = addrs
        self.avail_idx = 0

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        at = self.addrs.desc + DESC_SIZE * i
        self.guest.memory.write(at, DESC.pack(addr, length & 0xFFFF_FFFF, flags, nxt))

    def table(self, gpa: int, descs: Sequence[tuple[int, int, int, int]]) -> int:
        for j, (addr, length, flags, nxt) in enumerate(descs):
            self.guest.memory.write(gpa + DESC_SIZE * j, DESC.pack(addr, length, flags, nxt))
        return DESC_SIZE * len(descs)

    def publish(self, *heads: int, jump: int = 0) -> None:
        num = self.addrs.num
        for head in heads:
            slot = self.addrs.avail + 4 + 2 * (self.avail_idx % num)
            self.guest.memory.write(slot, LE16.pack(head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.avail_idx = (self.avail_idx + jump) & 0xFFFF
        self.guest.memory.write(self.addrs.avail + 2, LE16.pack(self.avail_idx))

    def used_idx(self) -> int:
        return LE16.unpack(self.guest.memory.read(self.addrs.used + 2, 2))[0]

    def used(self, i: int) -> tuple[int, int]:
        at = self.addrs.used + 4 + USED_ELEM_SIZE * (i % self.addrs.num)
        return USED_ELEM.unpack(self.guest.memory.read(at, USED_ELEM_SIZE))

    def wait_used(self, n: int, timeout: float) -> int:
        """The used index once it reaches ``n`` (or whatever it is at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            idx = self.used_idx()
            if idx >= n or time.monotonic() >= deadline:
                return idx
            time.sleep(0.005)


# A packed descriptor's flags as the driver writes them to make it available in a lap
# with wrap counter ``w`` (2.8.1): AVAIL = w, USED = !w; used, the device writes both = w.
P_AVAIL, P_USED = VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED
PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags


def avail_flags(wrap: int = 1) -> int:
    return P_AVAIL if wrap else P_USED


class RawPackedRing:
    """A packed ring written by hand (what no driver would write). ``ndescs`` remembers
    how many slots each buffer id took, which is how far a used descriptor moves the
    device's used position."""

    def __init__(self, guest: Guest, addrs: PackedAddrs) -> None:
        self.guest = guest
        self.addrs = addrs
        self.ndescs: dict[int, int] = {}

    def desc(self, i: int, addr: int, length: int, bid: int, flags: int) -> None:
        """Slot ``i``; ``flags`` as written (AVAIL/USED included: the lie is the caller's)."""
        at = self.addrs.desc + DESC_SIZE * i
        self.guest.memory.write(at, PACKED_DESC.pack(addr, length & 0xFFFF_FFFF,
                                                     bid & 0xFFFF, flags & 0xFFFF))  # fmt: skip

    def table(self, gpa: int, descs: Sequence[tuple[int, int, int]]) -> int:
        """An indirect table of (addr, len, flags) entries (2.8.19: no id, no AVAIL/USED)."""
        for j, (addr, length, flags) in enumerate(descs):
            self.guest.memory.write(gpa + DESC_SIZE * j,
                                    PACKED_DESC.pack(addr, length, 0, flags))  # fmt: skip
        return DESC_SIZE * len(descs)

    def chain(self, at: int, bid: int, segs: Sequence[tuple[int, int, int]],
              wrap: int = 1) -> int:  # fmt: skip
        """A chain of (addr, len, extra flags) from slot ``at``, made available in the lap
        of ``wrap``, the head's flags written last; the slot after it (in the same lap: a
        chain does not cross the end here)."""
        for k in reversed(range(len(segs))):
            addr, length, extra = segs[k]
            nxt = 1 if k < len(segs) - 1 else 0  # VRING_DESC_F_NEXT
            self.desc(at + k, addr, length, bid, extra | nxt | avail_flags(wrap))
        self.ndescs[bid] = len(segs)
        return at + len(segs)

    def used(self, start: int = 0, wrap: int = 1) -> list[tuple[int, int]]:
        """(id, len) of the used descriptors from slot ``start`` in the lap with wrap
        counter ``wrap`` (a used descriptor: AVAIL = USED = wrap; 2.8.1), stepping by the
        slots each named buffer took and flipping the lap at the ring's end; it stops at an
        id never made available (where the next used descriptor is, is then unknown)."""
        out: list[tuple[int, int]] = []
        pos, num = start, self.addrs.num
        while len(out) < num:
            raw = self.guest.memory.read(self.addrs.desc + DESC_SIZE * pos, DESC_SIZE)
            _addr, length, bid, flags = PACKED_DESC.unpack(raw)
            if flags & (P_AVAIL | P_USED) != (P_AVAIL | P_USED if wrap else 0):
                break
            if bid not in self.ndescs:
                # Lap 1: a used descriptor naming an id never made available (reported).
                # Lap 2: AVAIL = USED = 0 is also a slot nobody wrote yet: not reported.
                if wrap:
                    out.append((bid, length))
                break
            out.append((bid, length))
            pos += self.ndescs[bid]
            if pos >= num:
                pos -= num
                wrap ^= 1
        return out

    def wait_used(self, n: int, timeout: float, start: int = 0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.used(start)
            if len(got) >= n or time.monotonic() >= deadline:
                return got
            time.sleep(0.005)


def good_packed(ring: RawPackedRing, at: int, bid: int, gpa: int, seq: int) -> int:
    """A one-descriptor tx buffer at slot ``at``: header + a 64-byte frame; the next slot."""
    data = bytes(MRG_HDR_LEN) + frame(seq, 64)
    ring.guest.memory.write(gpa, data)
    return ring.chain(at, bid, [(gpa, len(data), 0)])


def good_chain(ring: RawRing, i: int, gpa: int, seq: int) -> None:
    """Descriptor ``i``: one readable buffer at ``gpa`` holding header + a 64-byte frame."""
    data = bytes(MRG_HDR_LEN) + frame(seq, 64)
    ring.guest.memory.write(gpa, data)
    ring.desc(i, gpa, len(data))

