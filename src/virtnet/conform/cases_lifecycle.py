"""Lifecycle cases: how a back-end lives through its front-end restarting things.

What QEMU does when a guest reboots (vhost_dev_stop: GET_VRING_BASE of every ring; then,
when the new kernel's driver starts, SET_FEATURES and fresh zeroed rings from base 0),
when the guest driver is reloaded (the same, without a reboot), when QEMU itself goes
away mid-stream and a new one connects, and when a front-end connects and vanishes
before it has said anything useful. A back-end that keeps an index, a mapping or a
worker from before fails one of these.
"""

from __future__ import annotations

import mmap
import struct

from virtnet.conform.cases import (
    BASE_FEATURES,
    MRG,
    QUEUE_SIZE,
    QUIET,
    Context,
    case,
    echo,
    echo_seqs,
    frames,
)
from virtnet.conform.guest import DATA, Guest, Rings
from virtnet.conform.session import CaseFailure, CaseNotOffered, Session
from virtnet.net.features import VirtioNetF
from virtnet.net.guest import RX, TX
from virtnet.net.layout import FRESH_PACKED_BASE
from virtnet.vhost_user.messages import (
    U64,
    FrontendRequest,
    InflightDesc,
    ProtocolFeature,
    close_fds,
)
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.ring.split import SplitQueueDriver

R = FrontendRequest
REBOOTS = 20  # issue 20's "ring stop/start repeated (a reboot, 20 times)"
VANISHING = 10  # front-ends that connect and go away before SET_MEM_TABLE


def fresh_rings(s: Session, g: Guest) -> Rings:
    """A new driver's rings for pair 0: its ring memory zeroed first, as a freshly
    allocated (booted) guest's is, so nothing of the last ring is left to read."""
    g.memory.view(0, DATA)[:] = bytes(DATA)
    rings = Rings.for_pair(g, 0, features=s.features)
    rings.setup(s)
    rings.post_rx(QUEUE_SIZE)
    return rings


def stop(s: Session, rings: Rings, sent: int) -> None:
    """vhost_dev_stop: GET_VRING_BASE both rings; tx's base must be what was used."""
    tx = rings.consumed(rings.vring_base(s, TX))
    rings.vring_base(s, RX)
    if tx != sent:
        raise CaseFailure(f"GET_VRING_BASE tx: {tx} descriptors taken, {sent} frames were "
                          "sent on this ring")  # fmt: skip


@case("guest-reboot", "conformance",
      f"{REBOOTS} reboots: stop both rings (GET_VRING_BASE), SET_FEATURES again, fresh "
      "zeroed rings from base 0, echo; each boot's bases count only that boot's frames",
      "vhost-user.rst Starting and stopping rings, GET_VRING_BASE; QEMU vhost_dev_stop / "
      "vhost_dev_start", matrix=True)  # fmt: skip
def guest_reboot(ctx: Context) -> str:
    s = ctx.session()
    ctx.negotiate(s, BASE_FEATURES | MRG)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    g = ctx.guest()
    g.set_mem_table(s)
    total = 0
    for boot in range(REBOOTS):
        rings = fresh_rings(s, g)
        sizes = [64, 1514] if boot % 2 else [100]
        try:
            echo(rings, frames(100 * boot, sizes), mergeable=mrg)
        except CaseFailure as e:
            raise CaseFailure(f"boot {boot + 1} of {REBOOTS}: {e}") from None
        stop(s, rings, len(sizes))
        total += len(sizes)
        s.must_ack(R.SET_FEATURES, U64(s.features))  # the new kernel's driver negotiates
    return f"{REBOOTS} boots, {total} frames echoed; every boot started from base 0"


@case("reset-device", "conformance", matrix=True)
def reset_device(ctx: Context) -> str:
    """RESET_DEVICE (or RESET_OWNER without PROTOCOL_F_RESET_DEVICE) mid-stream, then negotiate, map
    memory and start fresh rings: echo, and GET_VRING_BASE counts only the new rings' frames

    vhost-user.rst RESET_DEVICE, RESET_OWNER, GET_VRING_BASE
    """
    s = ctx.session()
    wanted = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.RESET_DEVICE)
    ctx.negotiate(s, BASE_FEATURES | MRG, protocol=wanted)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    g = ctx.guest()
    g.set_mem_table(s)
    rings = fresh_rings(s, g)
    echo(rings, frames(0, [64, 200, 1514]), mergeable=mrg)
    how = R.RESET_DEVICE if s.has_protocol(ProtocolFeature.RESET_DEVICE) else R.RESET_OWNER
    s.send(how)
    ctx.negotiate(s, BASE_FEATURES | MRG, protocol=s.protocol)
    g.set_mem_table(s)
    rings = fresh_rings(s, g)
    echo(rings, frames(10, [64, 800]), mergeable=mrg)
    stop(s, rings, 2)
    return f"{how.name} after 3 frames; the new rings echoed 2 and count 2"


@case("reconnect", "conformance", matrix=True)
def reconnect(ctx: Context) -> str:
    """a front-end that goes away mid-stream (its socket closed, rings running) and a new one that
    connects, negotiates and starts fresh rings in new memory: echo

    vhost-user.rst Communication (reconnect); QEMU reconnect=, OVS dpdkvhostuserclient
    """
    s, rings = ctx.running(BASE_FEATURES | MRG)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    echo(rings, frames(0, [64, 1514]), mergeable=mrg)
    rings.send(frames(5, [64] * 8))  # in flight when the front-end dies
    s.close()
    s2 = ctx.session()
    ctx.negotiate(s2, BASE_FEATURES | MRG)
    g = ctx.guest()
    g.set_mem_table(s2)
    rings2 = fresh_rings(s2, g)
    echo(rings2, frames(20, [64, 1514, 300]), mergeable=s2.has(VirtioNetF.MRG_RXBUF))
    stop(s2, rings2, 3)
    return "the second front-end's rings echoed 3 frames, from base 0"


def nothing_twice(rings: Rings, mrg: bool, why: str) -> None:
    """After a restarted ring echoed 2 frames: no more tx used, no frame echoed again."""
    again = rings.tx_used_within(QUIET)
    if again:
        raise CaseFailure(f"{again} more tx buffers used after the 2 sent: {why}")
    extra = echo_seqs(rings, mrg)
    if extra:
        raise CaseFailure(f"frames {extra} came back again, sent twice: {why}")


STALE_BY = 2  # how far behind its used index a stale-vring-base ring is set up again


@case("stale-vring-base", "robustness",
      f"a ring stopped and set up again with a stale SET_VRING_BASE, as QEMU hands a "
      f"back-end it restarts after a crash: split {STALE_BY} behind its used index (QEMU "
      "reads used->idx, and the dead back-end's last writes can come after), packed the "
      "ring's start (QEMU cannot restore a packed ring's position); the device continues "
      "from the used position the ring shows, sends no tx frame twice and returns no rx "
      "buffer the driver already has back",
      "vhost-user.rst SET_VRING_BASE; QEMU virtio_queue_restore_last_avail_idx (packed: "
      "does nothing); DPDK translate_ring_addresses (last_used_idx and used->idx mismatch)",
      matrix=True)  # fmt: skip
def stale_vring_base(ctx: Context) -> str:
    s, rings = ctx.running(BASE_FEATURES | MRG)
    vqs = [vq for vq in rings.vqs if isinstance(vq, SplitQueueDriver)]
    packed = not vqs
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    echo(rings, frames(0, [100, 200, 300]), mergeable=mrg)
    bases = (rings.vring_base(s, RX), rings.vring_base(s, TX))
    if packed:
        # One-slot chains (a frame a descriptor): the descriptors' flags say where the
        # device was. QEMU 7.2 sends the ring's start, index 0 wrap 1, after a crash.
        used = [rings.consumed(b) for b in bases]
        stale = (FRESH_PACKED_BASE, FRESH_PACKED_BASE)
    else:
        # The driver took every used entry: its last_used_idx is the ring's used->idx.
        used = [vqs[q].last_used_idx for q in (RX, TX)]
        stale = ((used[RX] - STALE_BY) & 0xFFFF, (used[TX] - STALE_BY) & 0xFFFF)
    rings.setup(s, bases=stale)
    rings.post_rx(4)
    # A device that took the stale bases pops the tx chains of frames 1 and 2 again and
    # rx buffers the driver has back (its get_buf raises "not a buffer in flight").
    echo(rings, frames(3, [64, 800]), mergeable=mrg)
    nothing_twice(rings, mrg, f"the device went on from the stale base {stale[TX]:#x}, not "
                  f"the used position {used[TX]}")  # fmt: skip
    tx = rings.consumed(rings.vring_base(s, TX))
    if tx != used[TX] + 2:
        raise CaseFailure(f"GET_VRING_BASE tx: {tx}, expected {used[TX] + 2} (the used index "
                          "the ring restarted from, and 2 frames)")  # fmt: skip
    how = "at the ring's start" if packed else f"{STALE_BY} behind the used index"
    return (f"set up again {how} (used rx {used[RX]}, tx {used[TX]}): continued from the "
            f"used position; tx base {tx}")


@case("vanishing-frontends", "robustness",
      f"{VANISHING} front-ends connect and go away before SET_MEM_TABLE (after nothing, "
      "after SET_OWNER, after SET_FEATURES); then a normal session echoes",
      "vhost-user.rst Communication; issue: a back-end must outlive its front-ends",
      survive=True)  # fmt: skip
def vanishing_frontends(ctx: Context) -> str:
    for k in range(VANISHING):
        s = Session(ctx.path)
        if k % 3 >= 1:
            s.send(R.SET_OWNER)
        if k % 3 == 2:
            s.get_u64(R.GET_FEATURES)
            s.send(R.SET_FEATURES, U64(s.get_u64(R.GET_FEATURES) & BASE_FEATURES))
        s.close()
    s, rings = ctx.running(BASE_FEATURES | MRG)
    echo(rings, frames(0, [64, 1514]), mergeable=s.has(VirtioNetF.MRG_RXBUF))
    return f"survived: {VANISHING} vanishing front-ends, then a session echoed"


# The spec's suggested layouts (the back-end may choose its own): each queue's header,
# then per descriptor an entry whose first byte is "inflight".
SPLIT_HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
# ..., free_head, old_free_head, used_idx, old_used_idx, the two wrap counters, padding[7]
# and the 3 bytes that align desc[] (u64 fields) to 8: 32 bytes.
PACKED_HEADER = struct.Struct("<QHHHHHHBB10x")


def _regions(fd: int, desc: InflightDesc, packed: bool
             ) -> list[tuple[int, int, int, int]] | None:  # fmt: skip
    """(version, desc_num, used_idx, descriptors in flight) of each queue's region, if the
    region is laid out as vhost-user.rst suggests for the ring kind (QueueRegionSplit or
    QueueRegionPacked; the layout is the back-end's to choose: None when it is not
    that one)."""
    header, entry = (PACKED_HEADER, 32) if packed else (SPLIT_HEADER, 16)
    per = desc.mmap_size // desc.num_queues
    if per < header.size + entry * desc.queue_size:
        return None
    with mmap.mmap(fd, desc.mmap_offset + desc.mmap_size, mmap.MAP_SHARED,
                   mmap.PROT_READ) as m:  # fmt: skip
        raw = m[desc.mmap_offset : desc.mmap_offset + desc.mmap_size]
    out = []
    for q in range(desc.num_queues):
        fields = header.unpack_from(raw, q * per)
        version, num = fields[1], fields[2]
        used = fields[6] if packed else fields[4]
        if num != desc.queue_size:
            return None
        base = q * per + header.size
        out.append((version, num, used, sum(raw[base + entry * i] for i in range(num))))
    return out


@case("inflight-region", "conformance", matrix=True)
def inflight_region(ctx: Context) -> str:
    """PROTOCOL_F_INFLIGHT_SHMFD where offered: GET_INFLIGHT_FD for 2 queues gives a region of a
    size that fits them, SET_INFLIGHT_FD takes it back, frames echo; after GET_VRING_BASE nothing is
    left in flight in it (where it has the spec's layout for the ring kind), and rings restarted on
    the same region take nothing twice. (A restart of the back-end itself, the region's purpose,
    needs the back-end's own tooling: tests/vhost_user for virtnet's.)

    vhost-user.rst Inflight I/O tracking, GET_INFLIGHT_FD, SET_INFLIGHT_FD
    """
    s = ctx.session()
    wanted = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.INFLIGHT_SHMFD)
    ctx.negotiate(s, BASE_FEATURES | MRG, protocol=wanted)
    if not s.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
        raise CaseNotOffered("the back-end does not offer PROTOCOL_F_INFLIGHT_SHMFD")
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    g = ctx.guest()
    g.set_mem_table(s)
    s.send(R.GET_INFLIGHT_FD, InflightDesc(0, 0, 2, QUEUE_SIZE))
    kind, msg = s.outcome(R.GET_INFLIGHT_FD)
    if msg is None:
        raise CaseFailure(f"GET_INFLIGHT_FD: {kind}")
    desc = msg.payload_as(InflightDesc)
    if len(msg.fds) != 1 or desc.mmap_size == 0:
        close_fds(msg.fds)
        raise CaseFailure(f"GET_INFLIGHT_FD: {len(msg.fds)} fds, mmap_size {desc.mmap_size}")
    fd = msg.fds[0]
    try:
        s.must_ack(R.SET_INFLIGHT_FD, desc, (fd,))
        rings = fresh_rings(s, g)
        echo(rings, frames(0, [64, 1514, 300]), mergeable=mrg)
        stop(s, rings, 3)
        packed = s.has(VirtioF.RING_PACKED)
        regions = _regions(fd, desc, packed)
        if regions is not None:
            left = [n for _v, _num, _used, n in regions]
            if any(left) or any(v == 0 for v, *_ in regions):
                raise CaseFailure(f"after GET_VRING_BASE the region says (version, desc_num, "
                                  f"used_idx, in flight) per queue: {regions}")  # fmt: skip
        bases = (rings.vring_base(s, RX), rings.vring_base(s, TX))
        rings.setup(s, bases=bases)
        rings.post_rx(4)
        echo(rings, frames(10, [64, 800]), mergeable=mrg)
        nothing_twice(rings, mrg, "chains taken again from the region after a clean stop")
    finally:
        close_fds([fd])
    layout = (f"the spec's {'packed' if packed else 'split'} layout: " + ", ".join(
        f"q{q} version {v} used_idx {u} in flight {n}" for q, (v, _num, u, n) in
        enumerate(regions)) if regions is not None else "a layout of its own")  # fmt: skip
    return (f"region of {desc.mmap_size} bytes for {desc.num_queues} queues of "
            f"{desc.queue_size}; {layout}; restarted rings echoed 2")
