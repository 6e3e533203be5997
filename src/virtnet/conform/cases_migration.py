"""``virtnet conform`` cases for live migration: dirty logging and SEND_RARP.

vhost-user.rst "Migration": with PROTOCOL_F_LOG_SHMFD the front-end hands a log memfd
(SET_LOG_BASE, one bit per 4 KiB page of guest-physical memory), acks VHOST_F_LOG_ALL
and re-sends each ring's addresses with VHOST_VRING_F_LOG and ``log_guest_addr``; from
then on every page the back-end writes must have its bit set by the time the ring stops
(QEMU's last sync follows GET_VRING_BASE). The check is the one a migration makes:
guest memory before and after, every page that changed and that the front-end did not
write itself must be in the log.
"""

from __future__ import annotations

import mmap
import os

from virtnet.conform.cases import (
    MRG,
    Context,
    case,
    echo,
    frames,
)
from virtnet.conform.guest import (
    DATA,
    DATA_SIZE,
    QUEUE_SIZE,
    SLOT,
    Guest,
    Rings,
    one_region,
)
from virtnet.conform.session import (
    BASE_FEATURES,
    CaseFailure,
    CaseNotOffered,
    Session,
    ack_text,
)
from virtnet.net.announce import ETH_P_RARP
from virtnet.net.guest import RX, TX
from virtnet.vhost_user.messages import (
    U64,
    VHOST_F_LOG_ALL,
    VHOST_VRING_F_LOG,
    FrontendRequest,
    LogDesc,
    ProtocolFeature,
    VringAddr,
)
from virtnet.virtio.features import bit
from virtnet.virtio.ring.layout import PackedAddrs

R = FrontendRequest
PAGE = 4096
LOG_PROTOCOL = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.LOG_SHMFD)
GUEST_SIZE = 4 << 20
TX_FROM = DATA + DATA_SIZE // 2  # tx frame slots from here on, rx below: no page holds both


class LoggedRings(Rings):
    """Rings whose rx and tx frame slots sit in pages of their own (rx below TX_FROM),
    so a page the front-end wrote (a tx frame) is never one the back-end must log."""

    sending = False

    def _slot(self) -> int:
        for k in range(len(self.free) - 1, -1, -1):
            gpa = self.free[k]
            if (gpa >= TX_FROM) == self.sending:
                del self.free[k]
                return gpa
        raise CaseFailure("out of frame buffers: the back-end keeps them all")

    def send(self, frames, **kw) -> list[int]:  # type: ignore[no-untyped-def]
        self.sending = True
        try:
            return super().send(frames, **kw)
        finally:
            self.sending = False


class Log:
    """The front-end's dirty log: a sealed memfd of one bit per page of guest memory."""

    def __init__(self, guest_size: int) -> None:
        self.size = max(PAGE, guest_size // PAGE // 8)
        self.fd = os.memfd_create("virtnet-conform-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)

    def clear(self) -> None:
        self.map[:] = bytes(self.size)

    def is_set(self, page: int) -> bool:
        return bool(self.map[page >> 3] >> (page & 7) & 1)

    def pages(self) -> int:
        return sum(bin(b).count("1") for b in bytes(self.map))

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def set_log_base(s: Session, log: Log, size: int | None = None, offset: int = 0) -> int:
    """SET_LOG_BASE; its reply's u64 (0 = success). The reply comes with or without
    NEED_REPLY (the front-end waits for it, as QEMU's vhost_user_set_log_base does)."""
    s.send(R.SET_LOG_BASE, LogDesc(log.size if size is None else size, offset), [log.fd],
           need_reply=True)  # fmt: skip
    reply = s.reply(R.SET_LOG_BASE)
    return reply.payload.value if isinstance(reply.payload, U64) else 0


def used_area_gpa(rings: Rings, q: int) -> int:
    """What QEMU sends as log_guest_addr: the used ring's (a packed ring's device area's)
    guest-physical address (vhost_virtqueue_set_addr: ``vq->used_phys``)."""
    return rings.addrs[q].used


def set_logging(s: Session, rings: Rings, on: bool) -> None:
    """QEMU's vhost_dev_set_log: SET_FEATURES with or without LOG_ALL, then every ring's
    addresses again with VHOST_VRING_F_LOG and log_guest_addr (or without)."""
    features = s.features | bit(VHOST_F_LOG_ALL) if on else s.features & ~bit(VHOST_F_LOG_ALL)
    s.must_ack(R.SET_FEATURES, U64(features))
    s.features = features
    uva = rings.guest.uva
    for q, a in enumerate(rings.addrs):
        flags = bit(VHOST_VRING_F_LOG) if on else 0
        log_addr = used_area_gpa(rings, q) if on else 0
        s.must_ack(R.SET_VRING_ADDR, VringAddr(rings.index[q], flags, uva(a.desc), uva(a.used),
                                               uva(a.avail), log_addr))  # fmt: skip


def device_pages(rings: Rings) -> set[int]:
    """Pages the back-end writes: both rings' areas (used ring / descriptors written back,
    event areas) and the rx frame slots."""
    pages: set[int] = set()
    for a in rings.addrs:
        lo = min(a.desc, a.avail, a.used)
        hi = a.used + (8 if isinstance(a, PackedAddrs) else 6 + 8 * rings.num)
        hi = max(hi, a.desc + 16 * rings.num)
        pages |= set(range(lo // PAGE, (hi - 1) // PAGE + 1))
    pages |= set(range(DATA // PAGE, TX_FROM // PAGE))
    return pages


def check_log(guest: Guest, before: bytes, log: Log, rings: Rings, what: str) -> tuple[int, int]:
    """Every page the back-end may have written that changed since ``before`` has its
    bit; so has each ring's used area page (its log address). (changed, logged)."""
    after = bytes(guest.regions[0].view)
    mine = device_pages(rings)
    changed = [p for p in range(len(after) // PAGE)
               if after[p * PAGE:(p + 1) * PAGE] != before[p * PAGE:(p + 1) * PAGE]]  # fmt: skip
    missed = [p for p in changed if p in mine and not log.is_set(p)]
    if missed:
        listed = ", ".join(f"{p * PAGE:#x}" for p in missed[:8])
        raise CaseFailure(f"{what}: {len(missed)} of {len(changed)} changed pages not logged "
                          f"(gpa {listed}{' ...' if len(missed) > 8 else ''})")  # fmt: skip
    for q in (RX, TX):
        page = used_area_gpa(rings, q) // PAGE
        if not log.is_set(page):
            raise CaseFailure(f"{what}: vring {rings.index[q]}'s used area at log_guest_addr "
                              f"{page * PAGE:#x} not logged")  # fmt: skip
    if not changed:
        raise CaseFailure(f"{what}: no page changed: the traffic never reached guest memory")
    return len(changed), log.pages()


def logged_session(ctx: Context) -> tuple[Session, Guest, LoggedRings, Log]:
    s = ctx.session()
    ctx.negotiate(s, BASE_FEATURES | MRG, protocol=LOG_PROTOCOL)
    if not s.offered & bit(VHOST_F_LOG_ALL):
        raise CaseNotOffered("the back-end does not offer VHOST_F_LOG_ALL")
    if not s.has_protocol(ProtocolFeature.LOG_SHMFD):
        raise CaseNotOffered("the back-end does not offer PROTOCOL_F_LOG_SHMFD")
    g = ctx.guest(one_region(GUEST_SIZE))
    g.set_mem_table(s)
    rings = LoggedRings(g, (0x0, 0x4000), DATA, DATA_SIZE, packed=ctx.cell is not None
                        and ctx.cell.ring == "packed",
                        event_idx=bool(ctx.cell and ctx.cell.event_idx))  # fmt: skip
    rings.setup(s)
    rings.post_rx(QUEUE_SIZE)
    log = Log(GUEST_SIZE)
    ctx.on_close(log.close)
    return s, g, rings, log


def traffic(rings: Rings, first: int, mergeable: bool) -> int:
    """Frames both ways: tx chains used, the same frames written into rx buffers."""
    sizes = [60, 1514, 800, 64, 1200, 1514, 300, 1000]
    for k in range(0, 24, len(sizes)):
        echo(rings, frames(first + k, sizes), mergeable=mergeable)
        rings.post_rx(QUEUE_SIZE)
    return 24


def stop_and_restart(s: Session, rings: Rings) -> None:
    """GET_VRING_BASE on both rings (the log must be complete when it answers, as QEMU
    syncs right after), then start them again where they stopped."""
    bases = (rings.vring_base(s, RX), rings.vring_base(s, TX))
    rings.setup(s, bases=bases)
    rings.post_rx(QUEUE_SIZE)


@case("dirty-log", "conformance", matrix=True)
def dirty_log(ctx: Context) -> str:
    """LOG_SHMFD log + VHOST_F_LOG_ALL + VHOST_VRING_F_LOG turned on mid-stream, frames both ways,
    rings stopped: every changed page the back-end writes is logged, each used area at its
    log_guest_addr; logging off, traffic, on again: the same

    vhost-user.rst Migration, Dirty page logging
    """
    s, g, rings, log = logged_session(ctx)
    mrg = bool(s.features & MRG)
    traffic(rings, 0, mrg)  # before logging: nothing to check
    status = set_log_base(s, log)
    if status:
        raise CaseFailure(f"SET_LOG_BASE of a valid {log.size}-byte log: status {status}")
    results = []
    for rnd, first in enumerate((100, 300)):
        set_logging(s, rings, True)
        log.clear()
        before = bytes(g.regions[0].view)
        traffic(rings, first, mrg)
        stop_and_restart(s, rings)
        changed, logged = check_log(g, before, log, rings, f"round {rnd + 1}")
        results.append(f"round {rnd + 1}: {changed} pages changed, {logged} logged")
        set_logging(s, rings, False)
        traffic(rings, first + 100, mrg)  # logging off, mid-stream: traffic goes on
    return "; ".join(results)


@case("dirty-log-refusals", "robustness")
def dirty_log_refusals(ctx: Context) -> str:
    """SET_LOG_BASE with a memfd smaller than mmap_size, an mmap_offset past the file, and without
    PROTOCOL_F_LOG_SHMFD: each refused in its reply, the connection goes on

    vhost-user.rst SET_LOG_BASE
    """
    s = ctx.session()
    ctx.negotiate(s, BASE_FEATURES, protocol=LOG_PROTOCOL)
    if not s.has_protocol(ProtocolFeature.LOG_SHMFD):
        raise CaseNotOffered("the back-end does not offer PROTOCOL_F_LOG_SHMFD")
    log = Log(GUEST_SIZE)
    ctx.on_close(log.close)
    seen = []
    for what, size, offset in (("mmap_size past the file", 16 * log.size, 0),
                               ("mmap_offset past the file", log.size, 4 * log.size)):  # fmt: skip
        status = set_log_base(s, log, size, offset)
        if not status:
            raise CaseFailure(f"SET_LOG_BASE with {what} ({size:#x} at {offset:#x}, file "
                              f"{log.size:#x}): accepted")  # fmt: skip
        seen.append(f"{what}: status {status}")
    s.expect_silence(R.SET_LOG_BASE)  # still in step
    s.close()  # one front-end at a time
    plain = ctx.session()
    ctx.negotiate(plain, BASE_FEATURES, protocol=bit(ProtocolFeature.REPLY_ACK))
    plain.send(R.SET_LOG_BASE, LogDesc(log.size, 0), [log.fd], need_reply=True)
    kind, msg = plain.outcome(R.SET_LOG_BASE)
    if kind == "reply" and msg is not None:
        if isinstance(msg.payload, U64) and not msg.payload.value:
            raise CaseFailure("SET_LOG_BASE without PROTOCOL_F_LOG_SHMFD: accepted")
        seen.append(f"without LOG_SHMFD: {ack_text(msg)}")
    else:
        seen.append(f"without LOG_SHMFD: {kind}")
    return "; ".join(seen)


@case("send-rarp", "conformance")
def send_rarp(ctx: Context) -> str:
    """PROTOCOL_F_RARP: SEND_RARP with a MAC makes the back-end send a RARP frame (0x8035) naming
    that MAC out of its port (a loopback echoes it onto rx)

    vhost-user.rst SEND_RARP
    """
    s = ctx.session()
    ctx.negotiate(s, BASE_FEATURES | MRG,
                  protocol=bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.RARP))  # fmt: skip
    if not s.has_protocol(ProtocolFeature.RARP):
        raise CaseNotOffered("the back-end does not offer PROTOCOL_F_RARP")
    g = ctx.guest()
    g.set_mem_table(s)
    rings = Rings.for_pair(g, features=s.features)
    rings.setup(s)
    rings.post_rx(QUEUE_SIZE, SLOT)
    mac = bytes.fromhex("5254000a0b0c")
    s.must_ack(R.SEND_RARP, U64(int.from_bytes(mac.ljust(8, b"\0"), "little")))
    for packet in rings.drain_rx(1.0, mergeable=bool(s.features & MRG)):
        f = packet.frame
        if int.from_bytes(f[12:14], "big") == ETH_P_RARP:
            if f[6:12] != mac or f[22:28] != mac or f[32:38] != mac:
                raise CaseFailure(f"RARP frame names {f[6:12].hex(':')} / {f[22:28].hex(':')}, "
                                  f"not {mac.hex(':')}")  # fmt: skip
            return f"RARP for {mac.hex(':')} came back on rx ({len(f)} bytes)"
    raise CaseFailure("no RARP frame came back on rx within 1 s (against a loopback port)")
