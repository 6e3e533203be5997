"""Robustness cases on packed rings (VIRTIO 1.2, 2.8): a hostile driver writes the tx
ring by hand -- buffer ids out of range or reused while in flight, AVAIL/USED flags that
do not make a descriptor available, a wrap counter that lies, indirect tables abused.

Each needs RING_PACKED ("not offered" without it) and a loopback, as the data cases: a
frame the back-end took shows on rx. Where the spec says what is available and what is
not (2.8.1), the case checks it; the rest can only check that the back-end survives.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from virtnet.conform.cases import (
    BASE_FEATURES,
    INDIRECT,
    MRG,
    QUIET,
    Context,
    case,
    echo_seqs,
    send_acked,
)
from virtnet.conform.guest import (
    DATA,
    P_AVAIL,
    P_USED,
    QUEUE_SIZE,
    SLOT,
    RawPackedRing,
    Rings,
    frame,
    good_packed,
)
from virtnet.conform.session import CaseFailure, Session
from virtnet.net.features import VirtioNetF
from virtnet.net.guest import TX
from virtnet.net.header import MRG_HDR_LEN
from virtnet.vhost_user.messages import FrontendRequest, VringState
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.ring.layout import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT
from virtnet.virtio.ring.packed import encode_base

R = FrontendRequest
PACKED = bit(VirtioF.RING_PACKED)
DATA_GPA = DATA + 0x1000  # below the slots Rings hands out (they are taken from the top)
TABLE = DATA + 0x8000
WATCH = 1.0  # how long the used ring is watched for what the back-end takes


def packed_pair(ctx: Context, want: int = BASE_FEATURES | MRG, bases: tuple[int, int] | None = None
                ) -> tuple[Session, Rings, RawPackedRing]:  # fmt: skip
    """Pair 0 on packed rings, rx posted; the tx ring left to a raw writer."""
    s = ctx.session()
    s.negotiate(want | PACKED, require=BASE_FEATURES | PACKED)
    g = ctx.guest()
    g.set_mem_table(s)
    rings = Rings.for_pair(g, features=s.features)
    rings.setup(s, bases=bases)
    rings.post_rx(QUEUE_SIZE)
    return s, rings, RawPackedRing(g, rings.packed_addrs(TX))


def hostile_packed(ctx: Context, write: Callable[[RawPackedRing], int],
                   want: int = BASE_FEATURES | MRG) -> str:  # fmt: skip
    """``write`` lays buffers on the packed tx ring by hand and returns how many it made
    available (the last one a good frame); one kick. What was used, what came back."""
    s, rings, raw = packed_pair(ctx, want)
    n = write(raw)
    os.eventfd_write(rings.kick[TX], 1)
    used = raw.wait_used(n, WATCH)
    seqs = echo_seqs(rings, s.has(VirtioNetF.MRG_RXBUF))
    return f"used {len(used)} of {n} buffers {used[:8]}; echoed frames {seqs}"


def frame_at(raw: RawPackedRing, k: int) -> tuple[int, int]:
    """Header + a 64-byte frame with sequence ``k`` in its own buffer: (gpa, length)."""
    gpa = DATA_GPA + k * SLOT
    data = bytes(MRG_HDR_LEN) + frame(k, 64)
    raw.guest.memory.write(gpa, data)
    return gpa, len(data)


@case("packed-id-out-of-range", "robustness", survive=True)
def packed_id_out_of_range(ctx: Context) -> str:
    """packed tx buffers whose id is 65535 and 64 (queue size 64), then a good frame

    VIRTIO 1.2 2.8.6 (a buffer id names a buffer; the driver keeps ids < queue size)
    """
    def write(raw: RawPackedRing) -> int:
        at = raw.chain(0, 0xFFFF, [(*frame_at(raw, 0), 0)])
        at = raw.chain(at, QUEUE_SIZE, [(*frame_at(raw, 1), 0)])
        good_packed(raw, at, 2, DATA_GPA + 2 * SLOT, 2)
        return 3
    return hostile_packed(ctx, write)


@case("packed-id-in-flight", "robustness", survive=True)
def packed_id_in_flight(ctx: Context) -> str:
    """two packed tx buffers available at once with the same id 5, then a good frame (id 6)

    VIRTIO 1.2 2.8.6 (an id is in flight until the device uses it)
    """
    def write(raw: RawPackedRing) -> int:
        at = raw.chain(0, 5, [(*frame_at(raw, 0), 0)])
        at = raw.chain(at, 5, [(*frame_at(raw, 1), 0)])
        good_packed(raw, at, 6, DATA_GPA + 2 * SLOT, 2)
        return 3
    return hostile_packed(ctx, write)


# (name, AVAIL/USED bits) of a descriptor that is *not* available in the driver's first
# lap (wrap counter 1: available means AVAIL = 1, USED = 0).
NOT_AVAILABLE = (
    ("AVAIL 0 USED 0", 0),
    ("AVAIL 0 USED 1 (the other lap's: a wrap counter lie)", P_USED),
)
LOOKS_USED = ("AVAIL 1 USED 1 (looks used)", P_AVAIL | P_USED)


def not_taken(raw: RawPackedRing, rings: Rings, slot: int, what: str, bits: int,
              mrg: bool) -> None:  # fmt: skip
    """Slot ``slot`` holds a good frame with flags ``bits`` that do not make it available;
    after a kick it must be neither sent (echoed) nor overwritten with a used descriptor."""
    gpa, length = frame_at(raw, slot)
    raw.desc(slot, gpa, length, slot, bits)
    at = raw.addrs.desc + 16 * slot
    before = raw.guest.memory.read(at, 16)
    os.eventfd_write(rings.kick[TX], 1)
    time.sleep(QUIET / 2)
    if seqs := echo_seqs(rings, mrg, 0.05):
        raise CaseFailure(f"slot {slot} with {what} was taken: frames {seqs} echoed")
    if raw.guest.memory.read(at, 16) != before:
        raise CaseFailure(f"slot {slot} with {what}: the back-end wrote a used descriptor "
                          "over a descriptor that was never available")  # fmt: skip


@case("packed-not-available", "robustness")
def packed_not_available(ctx: Context) -> str:
    """slot 0 of the packed tx ring holds a good frame whose flags say AVAIL 0 USED 0, then AVAIL 0
    USED 1 (each kicked): neither is available in lap 1, so neither may be taken; then the true
    flags: it must be taken and echo. Then slot 1 with AVAIL 1 USED 1 (looks used): not taken (the
    back-end may stop the ring over it)

    VIRTIO 1.2 2.8.1, 2.8.4: available iff AVAIL == the driver's wrap counter and USED != it
    """
    s, rings, raw = packed_pair(ctx)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    for what, bits in NOT_AVAILABLE:
        not_taken(raw, rings, 0, what, bits, mrg)
    gpa, length = frame_at(raw, 0)
    raw.chain(0, 0, [(gpa, length, 0)])
    os.eventfd_write(rings.kick[TX], 1)
    used = raw.wait_used(1, WATCH)
    seqs = echo_seqs(rings, mrg)
    if seqs != [0]:
        raise CaseFailure(f"slot 0 made available (AVAIL 1 USED 0) after two kicks of "
                          f"descriptors that were not: used {used}, echoed {seqs}")  # fmt: skip
    not_taken(raw, rings, 1, *LOOKS_USED, mrg)
    gpa, length = frame_at(raw, 1)
    raw.chain(1, 1, [(gpa, length, 0)])
    os.eventfd_write(rings.kick[TX], 1)
    after = "echoed" if echo_seqs(rings, mrg, WATCH) == [1] else "not taken (ring stopped)"
    return (f"neither lie taken; the true flags: used {used}, echoed {seqs}; AVAIL 1 USED 1 "
            f"not taken; slot 1 made available after it: {after}")


@case("packed-wrap-lie", "robustness", survive=True)
def packed_wrap_lie(ctx: Context) -> str:
    """the tx ring starts at slot 62 (SET_VRING_BASE 62, wrap 1); a 3-descriptor chain 62, 63, 0
    whose slot-0 part keeps lap 1's flags (lap 2's are AVAIL 0 USED 1), then a good frame at slot 1
    with lap 2's flags; and, on a fresh session, SET_VRING_BASE index 100 on a 64-entry ring
    (NEED_REPLY)

    VIRTIO 1.2 2.8.1 (the wrap counter flips at the ring's end); vhost-user.rst SET_VRING_BASE
    (packed: bits 0-14 index, bit 15 wrap)
    """
    start = QUEUE_SIZE - 2
    s, rings, raw = packed_pair(ctx, bases=(encode_base(0, 1), encode_base(start, 1)))
    gpa, length = frame_at(raw, 0)
    third = length // 3
    # Slots 63 and 0 first, the head (62) last; all three with lap 1's flags: slot 0's lie.
    raw.desc(start + 1, gpa + third, third, 10, VRING_DESC_F_NEXT | P_AVAIL)
    raw.desc(0, gpa + 2 * third, length - 2 * third, 10, P_AVAIL)
    good, good_len = frame_at(raw, 1)
    raw.desc(1, good, good_len, 11, P_USED)  # lap 2's flags: AVAIL 0 USED 1
    raw.ndescs.update({10: 3, 11: 1})
    raw.desc(start, gpa, third, 10, VRING_DESC_F_NEXT | P_AVAIL)
    os.eventfd_write(rings.kick[TX], 1)
    used = raw.wait_used(2, WATCH, start=start)
    seqs = echo_seqs(rings, s.has(VirtioNetF.MRG_RXBUF))
    first = f"chain across the end with a lying slot 0: used {used}, echoed {seqs}"
    s.close()  # a back-end serves one front-end at a time
    s2 = ctx.session()
    s2.negotiate(BASE_FEATURES | PACKED, require=BASE_FEATURES | PACKED)
    s2.send(R.SET_VRING_NUM, VringState(TX, QUEUE_SIZE))
    said = send_acked(s2, R.SET_VRING_BASE, VringState(TX, encode_base(100, 1)))[1]
    return f"{first}; base index 100 of 64: {said}"


@case("packed-indirect-abuse", "robustness", survive=True)
def packed_indirect_abuse(ctx: Context) -> str:
    """packed tx: an indirect table with a nested INDIRECT entry, indirect lengths 0 and 24, a table
    outside guest memory, INDIRECT|NEXT on a ring descriptor, a table whose entries set NEXT, then a
    good frame

    VIRTIO 1.2 2.8.19 (indirect: no nesting, length a multiple of 16, no NEXT with INDIRECT)
    """
    ind = VRING_DESC_F_INDIRECT

    def write(raw: RawPackedRing) -> int:
        gpa, length = frame_at(raw, 0)
        nested = raw.table(TABLE, [(TABLE, 32, ind), (gpa, length, 0)])
        at = raw.chain(0, 0, [(TABLE, nested, ind)])
        at = raw.chain(at, 1, [(TABLE, 0, ind)])
        at = raw.chain(at, 2, [(TABLE, 24, ind)])
        at = raw.chain(at, 3, [(1 << 40, 32, ind)])
        at = raw.chain(at, 4, [(TABLE, nested, ind), (gpa, length, 0)])  # INDIRECT|NEXT
        gpa1, length1 = frame_at(raw, 1)
        half = length1 // 2
        parts = [(gpa1, half, VRING_DESC_F_NEXT), (gpa1 + half, length1 - half, VRING_DESC_F_NEXT)]
        nexts = raw.table(TABLE + 0x100, parts)
        at = raw.chain(at, 5, [(TABLE + 0x100, nexts, ind)])
        good_packed(raw, at, 6, DATA_GPA + 2 * SLOT, 2)
        return 7
    return hostile_packed(ctx, write, BASE_FEATURES | MRG | INDIRECT)
