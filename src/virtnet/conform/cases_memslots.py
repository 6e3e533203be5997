"""``virtnet conform`` cases for memory slots: guest memory one region at a time.

vhost-user.rst "Memory slots" (PROTOCOL_F_CONFIGURE_MEM_SLOTS): GET_MAX_MEM_SLOTS says
how many regions the back-end maps; ADD_MEM_REG and REM_MEM_REG add and remove one, "at
any time", with the region's fd, and QEMU sends every table change so (a hot-plugged
DIMM while the rings run, the first table too). A back-end must map an added region
before its reply, since the front-end may point a descriptor into it right after, and
a removed one is gone for good. The guest here is three memfds; the back-end learns of
each only when the case adds it.
"""

from __future__ import annotations

from virtnet.conform.cases import MRG, Context, case, echo, frames
from virtnet.conform.guest import DATA, DATA_SIZE, RX_RING, SLOT, TX_RING, Guest, Region, Rings
from virtnet.conform.session import BASE_FEATURES, CaseFailure, CaseNotOffered, Session, ack_text
from virtnet.vhost_user.messages import (
    U64,
    FrontendRequest,
    MemoryRegionDesc,
    ProtocolFeature,
    SingleMemoryRegion,
)
from virtnet.virtio.features import bit

R = FrontendRequest
SLOTS_PROTOCOL = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
MIB = 1 << 20
# The rings and the first buffers in region 0; the others after a hole, as DIMMs are.
FIRST = Region(0, 2 * MIB)
HOTPLUG = (Region(0x4000000, MIB), Region(0x8000000, MIB))  # added while running; unused
SLOTS_NEEDED = 1 + len(HOTPLUG)
PER_ROUND = 4  # frames echoed per step


def slots_session(ctx: Context) -> tuple[Session, Guest, int]:
    """A session with CONFIGURE_MEM_SLOTS, its GET_MAX_MEM_SLOTS, and a guest of three
    memfds of which the back-end knows none yet."""
    s = ctx.session()
    ctx.negotiate(s, BASE_FEATURES | MRG, protocol=SLOTS_PROTOCOL)
    if not s.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
        raise CaseNotOffered("the back-end does not offer PROTOCOL_F_CONFIGURE_MEM_SLOTS")
    slots = s.get_u64(R.GET_MAX_MEM_SLOTS)
    if slots < SLOTS_NEEDED:
        raise CaseNotOffered(f"GET_MAX_MEM_SLOTS is {slots}: this case needs {SLOTS_NEEDED}")
    regions = [Region(FIRST.gpa, FIRST.size)] + [Region(r.gpa, r.size) for r in HOTPLUG]
    return s, ctx.guest(Guest(regions)), slots


def add_region(s: Session, region: Region) -> int:
    """ADD_MEM_REG with its fd; the REPLY_ACK status (0: mapped)."""
    return s.request_ack(R.ADD_MEM_REG, SingleMemoryRegion(region.desc()), [region.fd])


def rem_region(s: Session, desc: MemoryRegionDesc) -> int:
    """REM_MEM_REG (no fd: the spec's message carries none, though QEMU's sends one);
    the REPLY_ACK status."""
    return s.request_ack(R.REM_MEM_REG, SingleMemoryRegion(desc))


def slots_in(region: Region, count: int) -> list[int]:
    """``count`` frame buffers in ``region``: at its start, or past the rings and the
    indirect area in the first (the standard layout's DATA)."""
    start = region.gpa + (DATA if region.gpa == FIRST.gpa else 0)
    return [start + k * SLOT for k in range(count)]


def through(rings: Rings, region: Region, first: int, mergeable: bool) -> str:
    """Echo frames whose tx and rx buffers are all in ``region``; every buffer the
    back-end gave back is one of them."""
    mine = slots_in(region, 2 * PER_ROUND)
    rings.free = list(mine)
    rings.post_rx(PER_ROUND)
    echo(rings, frames(first, [64, 1514, 300, 1000]), mergeable=mergeable)
    stray = [gpa for gpa in rings.free if gpa not in mine]
    if stray or len(rings.free) != len(mine):
        raise CaseFailure(f"buffers in region gpa {region.gpa:#x} came back as "
                          f"{sorted(rings.free)[:4]}...")  # fmt: skip
    return f"{PER_ROUND} frames echoed through region gpa {region.gpa:#x}"


@case("mem-slots", "conformance")
def mem_slots(ctx: Context) -> str:
    """PROTOCOL_F_CONFIGURE_MEM_SLOTS: the first region by ADD_MEM_REG, rings started, frames
    echoed; a second region added while the rings run, frames whose tx and rx buffers are all in it
    echoed; a third added and removed (REM_MEM_REG) while running: traffic goes on through the
    second

    vhost-user.rst Memory slots, ADD_MEM_REG, REM_MEM_REG
    """
    s, g, slots = slots_session(ctx)
    first, second, third = g.regions
    status = add_region(s, first)
    if status:
        raise CaseFailure(f"ADD_MEM_REG of the first region (gpa 0, {first.size:#x} bytes): "
                          f"status {status}")  # fmt: skip
    mrg = bool(s.features & MRG)
    rings = Rings(g, (RX_RING, TX_RING), DATA, DATA_SIZE, packed=False)
    rings.setup(s)
    done = [through(rings, first, 0, mrg)]
    status = add_region(s, second)
    if status:
        raise CaseFailure(f"ADD_MEM_REG while the rings run (gpa {second.gpa:#x}): "
                          f"status {status}")  # fmt: skip
    done.append(through(rings, second, 100, mrg))
    if add_region(s, third) or rem_region(s, third.desc()):
        raise CaseFailure(f"ADD_MEM_REG then REM_MEM_REG of an unused region (gpa "
                          f"{third.gpa:#x}) while running: refused")  # fmt: skip
    done.append(through(rings, second, 200, mrg) + " after the third was removed")
    return f"GET_MAX_MEM_SLOTS {slots}; " + "; ".join(done)


@case("mem-slots-refusals", "robustness", survive=True)
def mem_slots_refusals(ctx: Context) -> str:
    """ADD_MEM_REG of a region overlapping a mapped one and REM_MEM_REG of a region never added:
    each refused in its reply (or the connection closed), the rings still echo; then REM_MEM_REG of
    the region the running rings lie in (the front-end's error): what the back-end does is recorded

    vhost-user.rst Memory slots
    """
    s, g, _slots = slots_session(ctx)
    first, second, _third = g.regions
    if add_region(s, first):
        raise CaseFailure("ADD_MEM_REG of the first region: refused")
    rings = Rings(g, (RX_RING, TX_RING), DATA, DATA_SIZE, packed=False)
    rings.setup(s)
    mrg = bool(s.features & MRG)
    through(rings, first, 0, mrg)
    seen = []
    for what, request, desc in (
        ("an overlapping ADD_MEM_REG", R.ADD_MEM_REG,
         MemoryRegionDesc(first.gpa + MIB, MIB, second.uva, 0)),  # gpa inside the first
        ("REM_MEM_REG of a region never added", R.REM_MEM_REG,
         MemoryRegionDesc(0xC000000, MIB, second.uva, 0)),
    ):  # fmt: skip
        answer = refusal(s, request, desc, second.fd if request is R.ADD_MEM_REG else None)
        if answer is None:
            raise CaseFailure(f"{what} (gpa {desc.guest_phys_addr:#x}): accepted")
        seen.append(f"{what}: {answer}")
        if answer.startswith("the back-end"):  # it hung up: nothing more to ask
            return "; ".join(seen)
    seen.append(through(rings, first, 300, mrg))
    answer = refusal(s, R.REM_MEM_REG, first.desc())
    seen.append(f"REM_MEM_REG of the running rings' region: {answer or 'accepted'}")
    return "; ".join(seen)


def refusal(s: Session, request: R, desc: MemoryRegionDesc, fd: int | None = None) -> str | None:
    """How the back-end turned ``request`` down (None: it accepted)."""
    s.send(request, SingleMemoryRegion(desc), [] if fd is None else [fd], need_reply=True)
    kind, msg = s.outcome(request)
    if kind != "reply" or msg is None:
        return f"the back-end {kind} (a refusal without a reply)"
    if isinstance(msg.payload, U64) and not msg.payload.value:
        return None
    return f"refused ({ack_text(msg)})"
