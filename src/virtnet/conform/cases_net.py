"""virtio-net specific hostile cases: a tx checksum request past the frame (DPDK's
CVE-2024-11614 class) and the control queue's bounds (VIRTIO 1.2, 5.1.6.5).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from virtnet.conform.cases import (
    BASE_FEATURES,
    MQ_PROTOCOL,
    MRG,
    Context,
    case,
    queue_pairs,
    seq_of,
)
from virtnet.conform.guest import (
    DST_MAC,
    SLOT,
    SRC_MAC,
    RawRing,
    Rings,
)
from virtnet.conform.session import CaseFailure, CaseSkipped, ack_text
from virtnet.net.ctrl import (
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
)
from virtnet.net.features import VirtioNetF
from virtnet.net.header import MRG_HDR_LEN, VIRTIO_NET_HDR_F_NEEDS_CSUM, VirtioNetHdr
from virtnet.vhost_user.messages import (
    U64,
    FrontendRequest,
    ProtocolFeature,
    VringAddr,
    VringState,
)
from virtnet.virtio.features import bit
from virtnet.virtio.ring.layout import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VringAddrs

R = FrontendRequest
CSUM = bit(VirtioNetF.CSUM)
GUARD = 0x5A  # what fills a tx slot past its frame: a device that writes there is seen

# -- csum_start / csum_offset past the frame ---------------------------------------------


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``, complemented."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(seq: int, payload: int = 56) -> bytes:
    """An Ethernet/IPv4/UDP frame (TEST-NET-1 addresses, UDP checksum 0) whose UDP payload
    starts with ``seq`` (``udp_seq`` reads it)."""
    body = seq.to_bytes(4, "big") + bytes((seq + i) & 0xFF for i in range(payload - 4))
    udp = struct.pack("!HHHH", 40000, 40001, 8 + len(body), 0) + body
    src, dst = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), seq & 0xFFFF, 0, 64, 17, 0,
                     src, dst)  # fmt: skip
    ip = ip[:10] + checksum(ip).to_bytes(2, "big") + ip[12:]
    return DST_MAC + SRC_MAC + b"\x08\x00" + ip + udp


def udp_seq(f: bytes) -> int:
    return int.from_bytes(f[42:46], "big") if len(f) >= 46 else seq_of(f)


ETH_IP = 14 + 20  # where the UDP header starts: a true csum_start
UDP_CSUM = 6  # the checksum's offset in the UDP header: a true csum_offset


def partial_csum_frame(seq: int) -> bytes:
    """``udp_frame`` with the pseudo-header sum in the UDP checksum field, as a driver
    leaves it for the device to complete (Linux: udp_v4_check(..., 0) seeded)."""
    f = bytearray(udp_frame(seq))
    udp_len = len(f) - ETH_IP
    pseudo = f[26:34] + struct.pack("!BBH", 0, 17, udp_len)
    seed = ~checksum(bytes(pseudo)) & 0xFFFF
    f[ETH_IP + UDP_CSUM : ETH_IP + UDP_CSUM + 2] = seed.to_bytes(2, "big")
    return bytes(f)


def csum_hdr(start: int, offset: int) -> bytes:
    return VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=start,
                        csum_offset=offset).pack()  # fmt: skip


@case("csum-past-frame", "robustness", matrix=True)
def csum_past_frame(ctx: Context) -> str:
    """CSUM acked, GUEST_CSUM not: tx frames with NEEDS_CSUM and csum_start + csum_offset past the
    frame (by 1 byte, offset = frame length, start past the end, both 65535, offset 65520), one
    valid partial checksum and a plain frame: each bad frame is dropped or comes back unchanged,
    nothing is written into a tx buffer, every rx header has flags 0; the valid one is reported
    (completed or not)

    VIRTIO 1.2 5.1.6.2 (csum_start, csum_offset), 5.1.6.4.1 (no GUEST_CSUM: flags 0), 2.7.5.1 / 2.8
    (a device MUST NOT write a device-readable buffer); DPDK CVE-2024-11614
    """
    s, rings = ctx.running(BASE_FEATURES | MRG | CSUM, require=BASE_FEATURES | CSUM)
    mrg = s.has(VirtioNetF.MRG_RXBUF)
    n = len(udp_frame(0))
    bad = [(n - 1, 0), (ETH_IP, n), (n + 100, UDP_CSUM), (0xFFFF, 0xFFFF), (ETH_IP, 0xFFF0)]
    sent = [udp_frame(k) for k in range(len(bad))] + [partial_csum_frame(10), udp_frame(11)]
    hdrs = [csum_hdr(a, b) for a, b in bad] + [csum_hdr(ETH_IP, UDP_CSUM), bytes(MRG_HDR_LEN)]
    for gpa in rings.free[-len(sent):]:  # the slots send() takes next: guarded
        rings.guest.memory.write(gpa, bytes([GUARD]) * SLOT)
    slots = rings.send(sent, hdrs=hdrs)
    wrote = [(k, gpa) for k, gpa in enumerate(slots)
             if rings.guest.memory.read(gpa, SLOT) !=
             hdrs[k] + sent[k] + bytes([GUARD]) * (SLOT - MRG_HDR_LEN - len(sent[k]))]  # fmt: skip
    used = rings.tx_used_within(1.0)
    wrote += [(k, gpa) for k, gpa in enumerate(slots)
              if (k, gpa) not in wrote and rings.guest.memory.read(gpa, SLOT) !=
              hdrs[k] + sent[k] + bytes([GUARD]) * (SLOT - MRG_HDR_LEN - len(sent[k]))]  # fmt: skip
    if wrote:
        raise CaseFailure(f"the back-end wrote into the device-readable tx buffers of frames "
                          f"{sorted(k for k, _ in wrote)} (csum_start/offset {bad})")  # fmt: skip
    back = {}
    for p in rings.drain_rx(0.5, mergeable=mrg):
        k = udp_seq(p.frame)
        if p.hdr.flags or p.hdr.gso_type:
            raise CaseFailure(f"frame {k} came back with header flags {p.hdr.flags:#x} "
                              f"gso_type {p.hdr.gso_type}, GUEST_CSUM not negotiated "
                              "(5.1.6.4.1: flags MUST be 0)")  # fmt: skip
        back[k] = p.frame
    changed = []
    for k in range(len(bad)):
        if k in back and back[k] != sent[k]:
            got = back[k]
            at = [i for i in range(min(len(got), n)) if got[i] != sent[k][i]]
            changed.append(f"frame {k} (csum_start {bad[k][0]}, csum_offset {bad[k][1]}, "
                           f"{n} bytes) came back changed: {len(got)} bytes, bytes {at} "
                           f"differ ({bytes(got[i] for i in at).hex()} for "
                           f"{bytes(sent[k][i] for i in at).hex()})")  # fmt: skip
    if changed:
        fine = [k for k in range(len(bad)) if k not in back or back[k] == sent[k]]
        raise CaseFailure("; ".join(changed) + f" (frames {fine}: dropped or unchanged)")
    dropped = [k for k in range(len(bad)) if k not in back]
    valid = back.get(10)
    if valid is None:
        partial = "not echoed"
    elif checksum(valid[ETH_IP - 8 : ETH_IP]
                  + struct.pack("!BBH", 0, 17, len(valid) - ETH_IP)
                  + valid[ETH_IP:]) == 0:  # fmt: skip
        partial = "completed (a valid UDP checksum)"
    elif valid == sent[len(bad)]:
        partial = "passed on uncompleted (5.1.6.4.1: SHOULD be completed)"
    else:
        partial = "came back with a wrong checksum"
    plain = "echoed" if 11 in back else "not echoed (the back-end stopped the ring)"
    return (f"{used} of {len(sent)} tx used; bad frames dropped {dropped}, echoed unchanged "
            f"{sorted(k for k in back if k < len(bad))}; valid partial checksum: {partial}; "
            f"plain frame after: {plain}")


# -- the control queue ---------------------------------------------------------------------

CTRL = bit(VirtioNetF.CTRL_VQ)
CTRL_WANT = (BASE_FEATURES | CTRL | bit(VirtioNetF.MQ) | bit(VirtioNetF.CTRL_RX)
             | bit(VirtioNetF.CTRL_MAC_ADDR))  # fmt: skip
CVQ_NUM = 32  # 9 commands of 2 descriptors each
CVQ_RING = 0x20_0000  # past pair 0's layout
CVQ_DATA = CVQ_RING + 0x1000
SENTINEL = 0xEE  # the ack byte before the device writes it
HDR = struct.Struct("<BB")


def ctrl_commands(max_pairs: int) -> list[tuple[str, bytes, str]]:
    """(what, readable bytes, ack layout) of each hostile command: layout "w" a writable
    ack byte, "none" no writable descriptor, "ro" the ack byte device-readable."""
    mq, rx, mac = VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_MAC
    return [
        ("a 1-byte command (the header is 2)", b"\x04", "w"),
        ("class 200", HDR.pack(200, 0) + b"\0", "w"),
        ("RX command 200", HDR.pack(rx, 200) + b"\1", "w"),
        ("MQ VQ_PAIRS_SET 0", HDR.pack(mq, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) + b"\0\0", "w"),
        (f"MQ VQ_PAIRS_SET {max_pairs + 1} (max {max_pairs})",
         HDR.pack(mq, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) + struct.pack("<H", max_pairs + 1),
         "w"),
        ("MAC_TABLE_SET saying 1000 unicast entries, carrying 1",
         HDR.pack(mac, VIRTIO_NET_CTRL_MAC_TABLE_SET) + struct.pack("<I", 1000) + SRC_MAC
         + struct.pack("<I", 0), "w"),
        ("RX PROMISC without an ack buffer", HDR.pack(rx, VIRTIO_NET_CTRL_RX_PROMISC) + b"\1",
         "none"),
        ("RX PROMISC with a read-only ack byte",
         HDR.pack(rx, VIRTIO_NET_CTRL_RX_PROMISC) + b"\1", "ro"),
    ]  # fmt: skip


def post_command(raw: RawRing, k: int, data: bytes, layout: str) -> tuple[int, int]:
    """Command ``k`` as descriptors 2k, 2k + 1 (data then ack) at its own 256 bytes;
    (data gpa, ack gpa)."""
    gpa = CVQ_DATA + 256 * k
    ack = gpa + 128
    raw.guest.memory.write(gpa, data)
    raw.guest.memory.write(ack, bytes([SENTINEL]))
    if layout == "none":
        raw.desc(2 * k, gpa, len(data))
    else:
        raw.desc(2 * k, gpa, len(data), VRING_DESC_F_NEXT, 2 * k + 1)
        raw.desc(2 * k + 1, ack, 1, VRING_DESC_F_WRITE if layout == "w" else 0)
    raw.publish(2 * k)
    return gpa, ack


@case("ctrl-bounds", "robustness")
def ctrl_bounds(ctx: Context) -> str:
    """where CTRL_VQ is offered and the back-end serves the control queue (vring 2 x queue pairs): a
    short command, class / command out of range, MQ pairs 0 and max + 1, a MAC table whose entry
    count lies (each must get VIRTIO_NET_ERR or no ack), a command without an ack buffer and one
    whose ack byte is read-only (nothing written); a back-end that keeps the control queue to the
    front-end (QEMU's model) is skipped

    VIRTIO 1.2 5.1.6.5 (ack VIRTIO_NET_ERR), 5.1.6.5.5 (1 <= pairs <= max), 5.1.6.5.2 (MAC tables);
    2.7.5.1 (device-readable buffers are not written)
    """
    s = ctx.session()
    s.negotiate(CTRL_WANT, require=BASE_FEATURES | CTRL, protocol=MQ_PROTOCOL)
    pairs = queue_pairs(s) if s.has(VirtioNetF.MQ) else 1
    cvq = 2 * pairs
    g = ctx.guest()
    g.set_mem_table(s)
    Rings.for_pair(g, features=s.features).setup(s)
    ack = s.has_protocol(ProtocolFeature.REPLY_ACK)
    s.send(R.SET_VRING_NUM, VringState(cvq, CVQ_NUM), need_reply=ack)
    if ack:
        kind, msg = s.outcome(R.SET_VRING_NUM)
        if msg is None or not isinstance(msg.payload, U64) or msg.payload.value:
            said = ack_text(msg) if msg is not None else kind
            raise CaseSkipped(f"CTRL_VQ offered, but vring {cvq} (the control queue) is "
                              f"refused ({said}): the control queue is the front-end's")
    addrs = VringAddrs.contiguous(CVQ_RING, CVQ_NUM)
    s.must_ack(R.SET_VRING_BASE, VringState(cvq, 0))
    s.must_ack(R.SET_VRING_ADDR, VringAddr(cvq, 0, g.uva(addrs.desc), g.uva(addrs.used),
                                           g.uva(addrs.avail), 0))  # fmt: skip
    kick = s.eventfd()
    s.must_ack(R.SET_VRING_KICK, U64(cvq), [kick])
    s.must_ack(R.SET_VRING_CALL, U64(cvq), [s.eventfd()])
    if s.features & bit(VirtioNetF.MQ) or ack:
        s.must_ack(R.SET_VRING_ENABLE, VringState(cvq, 1))
    raw = RawRing(g, addrs)
    return f"control queue vring {cvq}, " + ctrl_checks(raw, pairs,
                                                        lambda: os.eventfd_write(kick, 1))


def ctrl_checks(raw: RawRing, pairs: int, kick: Callable[[], None]) -> str:
    """The commands of ``ctrl_commands`` on a control queue ``raw`` that ``kick`` notifies,
    checked; a valid command first (a queue that never uses it is not served: skipped)."""
    post_command(raw, 0, HDR.pack(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC) + b"\0", "w")
    kick()
    if raw.wait_used(1, 1.0) < 1:
        raise CaseSkipped("CTRL_VQ offered, but the control queue took no command in 1 s: "
                          "the control queue is the front-end's")  # fmt: skip
    commands = ctrl_commands(pairs)
    posted = [post_command(raw, k + 1, data, layout)
              for k, (_w, data, layout) in enumerate(commands)]  # fmt: skip
    kick()
    used = raw.wait_used(1 + len(commands), 1.0)
    memory = raw.guest.memory
    out = []
    for (what, data, layout), (gpa, ack_gpa) in zip(commands, posted, strict=True):
        got = memory.read(ack_gpa, 1)[0]
        if memory.read(gpa, len(data)) != data:
            raise CaseFailure(f"{what}: the back-end wrote into the device-readable command")
        if layout != "w":
            if got != SENTINEL:
                raise CaseFailure(f"{what}: the back-end wrote {got} into a device-readable "
                                  "byte")  # fmt: skip
            out.append(f"{what}: nothing written")
        elif got == VIRTIO_NET_OK:
            raise CaseFailure(f"{what}: acked VIRTIO_NET_OK")
        elif got == VIRTIO_NET_ERR:
            out.append(f"{what}: ERR")
        elif got == SENTINEL:
            out.append(f"{what}: no ack")
        else:
            raise CaseFailure(f"{what}: ack byte {got} (VIRTIO_NET_OK 0 or ERR 1)")
    return f"{used} of {1 + len(commands)} used; " + "; ".join(out)
