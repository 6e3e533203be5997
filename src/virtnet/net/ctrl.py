"""The virtio-net control virtqueue (VIRTIO 1.2, 5.1.6.5), both sides, sans-I/O.

A command is one chain: device-readable ``virtio_net_ctrl_hdr`` {u8 class, u8
cmd} then the command's data (any number of descriptors), device-writable
``u8 ack`` (VIRTIO_NET_OK / VIRTIO_NET_ERR) first in the writable part.

``ControlDevice`` mirrors QEMU hw/net/virtio-net.c ``virtio_net_handle_ctrl``
and its per-class handlers; ``ControlQueue`` mirrors Linux virtio_net.c
``virtnet_send_command`` split in two steps (``post`` / ``complete``) because
the spin on ``virtqueue_get_buf`` belongs to whoever carries the kick.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, Protocol, final

from virtnet.net.features import VirtioNetF
from virtnet.net.header import gather
from virtnet.net.layout import CTRL_BUF_SIZE, FRESH_PACKED_BASE, ControlArea
from virtnet.net.stats import CtrlStats, ctrl_stats
from virtnet.virtio.errors import (
    AvailIndexError,
    DescriptorError,
    UsedIndexError,
    UsedRingError,
    VirtioError,
)
from virtnet.virtio.features import VirtioF, bit, has
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.chain import Chain
from virtnet.virtio.ring.layout import PackedAddrs, PackedViews, VringViews
from virtnet.virtio.ring.packed import PackedQueueDevice
from virtnet.virtio.ring.queue import RingDevice, RingDriver, publish_used, vring_create_virtqueue
from virtnet.virtio.ring.split import SplitQueueDevice

if TYPE_CHECKING:
    from virtnet.net.device import VirtnetDevice  # serve_control's devices, in process

# -- the wire (include/uapi/linux/virtio_net.h) --------------------------------------------

VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_RX_ALLUNI = 2
VIRTIO_NET_CTRL_RX_NOMULTI = 3
VIRTIO_NET_CTRL_RX_NOUNI = 4
VIRTIO_NET_CTRL_RX_NOBCAST = 5

VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1

VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_VLAN_ADD = 0
VIRTIO_NET_CTRL_VLAN_DEL = 1

VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0

VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000

VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5
VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET = 0

ETH_ALEN = 6
# QEMU's MAX_VLAN: vids are 12 bits.
MAX_VLAN = 1 << 12
# QEMU's MAC_TABLE_ENTRIES: more addresses than this set the table's overflow flag
# (receive every unicast / multicast frame), they are not refused.
MAC_TABLE_ENTRIES = 64
# The most command data the device reads: a chain claiming more is refused before
# anything is copied (a MAC table of ~10900 addresses fits).
CTRL_MAX_DATA = 1 << 16

# struct virtio_net_ctrl_hdr { u8 class; u8 cmd; }
CTRL_HDR = struct.Struct("<BB")
# virtio_net_ctrl_ack
CTRL_ACK = struct.Struct("<B")
# struct virtio_net_ctrl_mac { le32 entries; u8 macs[entries][ETH_ALEN]; }
MAC_ENTRIES = struct.Struct("<I")
# VIRTIO_NET_CTRL_RX_*: u8 on/off.
RX_ON = struct.Struct("<B")
# VIRTIO_NET_CTRL_VLAN_*: le16 vid.
VLAN_VID = struct.Struct("<H")
# struct virtio_net_ctrl_mq { le16 virtqueue_pairs; }
CTRL_MQ = struct.Struct("<H")
# VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET: le64 offloads.
GUEST_OFFLOADS = struct.Struct("<Q")
ETH_TYPE = struct.Struct(">H")
ETH_P_8021Q = 0x8100

BROADCAST = b"\xff" * ETH_ALEN

# The guest offloads 5.1.6.5.6.1 lets a driver switch: the GUEST_* receive bits.
OFFLOAD_BITS = (
    bit(VirtioNetF.GUEST_CSUM)
    | bit(VirtioNetF.GUEST_TSO4)
    | bit(VirtioNetF.GUEST_TSO6)
    | bit(VirtioNetF.GUEST_ECN)
    | bit(VirtioNetF.GUEST_UFO)
)

# Which feature each (class, cmd) needs; a command not here is unknown. 5.1.6.5.1:
# the extra rx modes need CTRL_RX_EXTRA, the MAC filter table needs CTRL_RX (Linux's
# virtnet_set_rx_mode returns early without it).
_RX_EXTRA = bit(VirtioNetF.CTRL_RX) | bit(VirtioNetF.CTRL_RX_EXTRA)
COMMAND_FEATURES: dict[tuple[int, int], int] = {
    (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC): bit(VirtioNetF.CTRL_RX),
    (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI): bit(VirtioNetF.CTRL_RX),
    (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLUNI): _RX_EXTRA,
    (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOMULTI): _RX_EXTRA,
    (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOUNI): _RX_EXTRA,
    (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST): _RX_EXTRA,
    (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET): bit(VirtioNetF.CTRL_RX),
    (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET): bit(VirtioNetF.CTRL_MAC_ADDR),
    (VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD): bit(VirtioNetF.CTRL_VLAN),
    (VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_DEL): bit(VirtioNetF.CTRL_VLAN),
    (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK): bit(VirtioNetF.GUEST_ANNOUNCE),
    (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET): bit(VirtioNetF.MQ),
    (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET): bit(
        VirtioNetF.CTRL_GUEST_OFFLOADS
    ),
}

# The exact data length of every fixed-size command (the MAC table is checked apart).
_RX_FLAGS = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")
DATA_LEN: dict[tuple[int, int], int] = {
    **{(VIRTIO_NET_CTRL_RX, cmd): RX_ON.size for cmd in range(len(_RX_FLAGS))},
    (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET): ETH_ALEN,
    (VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD): VLAN_VID.size,
    (VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_DEL): VLAN_VID.size,
    (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK): 0,
    (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET): CTRL_MQ.size,
    (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET): GUEST_OFFLOADS.size,
}


def pack_mac_table(uni: Sequence[bytes], multi: Sequence[bytes]) -> tuple[bytes, bytes]:
    """The two ``virtio_net_ctrl_mac`` tables of MAC_TABLE_SET (unicast, multicast)."""
    tables = []
    for macs in (uni, multi):
        for mac in macs:
            if len(mac) != ETH_ALEN:
                raise ValueError(f"MAC address {bytes(mac).hex(':')} is not {ETH_ALEN} bytes")
        tables.append(MAC_ENTRIES.pack(len(macs)) + b"".join(bytes(m) for m in macs))
    return tables[0], tables[1]


def parse_mac_table(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """(unicast, multicast) addresses of MAC_TABLE_SET data, or None unless the two
    tables fill ``data`` exactly (QEMU virtio_net_handle_mac)."""
    tables = []
    off = 0
    for _ in range(2):
        if len(data) - off < MAC_ENTRIES.size:
            return None
        (entries,) = MAC_ENTRIES.unpack_from(data, off)
        off += MAC_ENTRIES.size
        end = off + entries * ETH_ALEN
        if end > len(data):
            return None
        tables.append([bytes(data[i : i + ETH_ALEN]) for i in range(off, end, ETH_ALEN)])
        off = end
    if off != len(data):
        return None
    return tables[0], tables[1]


# -- device side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RxMode:
    """The receive filter state the control queue sets (QEMU VirtIONet's fields)."""

    # QEMU virtio_net_reset: promisc on "for compatibility" — a driver without
    # CTRL_RX can never turn it off, so it must start on.
    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    uni: frozenset[bytes] = frozenset()
    multi: frozenset[bytes] = frozenset()
    uni_overflow: bool = False
    multi_overflow: bool = False
    # None: no VLAN filtering (CTRL_VLAN not negotiated, QEMU sets every bit).
    vlans: frozenset[int] | None = None


@final
@dataclass
class ControlEvent:
    """One command the device answered, for logs and tests."""

    cls: int
    cmd: int
    ack: int
    reason: str = ""


@final
class ControlDevice:
    """The device's control queue: answers commands, keeps the state they set.

    ``process(budget)`` takes chains off the ring and queues their used
    entries; ``flush()`` publishes them and says whether to interrupt the
    driver — the same split as ``VirtnetDevice.process_tx`` / ``flush_tx``.
    Callbacks run before a command's state is committed: one that returns
    False or raises refuses the command (VIRTIO_NET_ERR), the state unchanged.

    Where it is stricter than QEMU, on purpose: a chain without a header or an
    ack byte is returned unanswered (length 0) instead of breaking the device;
    fixed-size data must be exactly its size (QEMU reads the first bytes and
    ignores the rest); the rx classes need the feature that introduced them
    (virtio_net.h: "Commands 0 and 1 are supported with VIRTIO_NET_F_CTRL_RX,
    2-5 are added with VIRTIO_NET_F_CTRL_RX_EXTRA"), which QEMU does not check.
    """

    def __init__(
        self,
        cvq: RingDevice | None,
        features: int,
        max_pairs: int = 1,
        *,
        mac: bytes = b"\x52\x54\x00\x12\x34\x56",
        stats: CtrlStats | None = None,
    ) -> None:
        """``cvq`` None: a device that only filters (rx_filter, handle) until ``reset``
        gives it a queue."""
        if not 1 <= max_pairs <= VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX:
            raise ValueError(
                f"max_pairs {max_pairs} outside {VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN}.."
                f"{VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX}"
            )
        if len(mac) != ETH_ALEN:
            raise ValueError(f"mac must be {ETH_ALEN} bytes, got {len(mac)}")
        self.cvq = cvq
        self.features = features
        self.max_pairs = max_pairs
        self.stats = stats if stats is not None else ctrl_stats()
        self.config_mac = bytes(mac)
        self.reset()
        self.last_error = ""
        self.log: list[ControlEvent] = []  # the last LOG_LEN answers, newest last
        self.on_queue_pairs: Callable[[int], bool | None] | None = None
        self.on_guest_offloads: Callable[[int], bool | None] | None = None
        self.on_rx_mode: Callable[[RxMode], bool | None] | None = None
        self.on_mac: Callable[[bytes], bool | None] | None = None
        self.on_announce_ack: Callable[[], bool | None] | None = None
        # virtio_net_handle_ctrl's switch on the class (bound methods, made once).
        self._handlers: dict[int, Callable[[int, bytes], tuple[int, str]]] = {
            VIRTIO_NET_CTRL_RX: self._handle_rx_mode,
            VIRTIO_NET_CTRL_MAC: self._handle_mac,
            VIRTIO_NET_CTRL_VLAN: self._handle_vlan,
            VIRTIO_NET_CTRL_ANNOUNCE: self._handle_announce,
            VIRTIO_NET_CTRL_MQ: self._handle_mq,
            VIRTIO_NET_CTRL_GUEST_OFFLOADS: self._handle_offloads,
        }

    LOG_LEN: Final = 64

    def reset(self, cvq: RingDevice | None = None) -> None:
        """Back to the state after a device reset (QEMU virtio_net_reset), optionally
        over a new queue; the counters keep counting."""
        if cvq is not None:
            self.cvq = cvq
        self.mac = self.config_mac
        vlan = self.features & bit(VirtioNetF.CTRL_VLAN)
        self.rx = RxMode(vlans=frozenset() if vlan else None)
        self.curr_queue_pairs = 1
        # virtio_net_set_features: every negotiated guest offload starts on.
        self.guest_offloads = self.features & OFFLOAD_BITS
        self.announce_pending = False
        self.broken = False

    def announce(self) -> None:
        """The host asks the guest to announce itself (config status VIRTIO_NET_S_ANNOUNCE)."""
        self.announce_pending = True

    # -- the ring ----------------------------------------------------------------------------

    def process(self, budget: int = 64) -> int:
        """Answer up to ``budget`` chains; how many were taken (refused ones count)."""
        n = 0
        cvq, stats = self.cvq, self.stats
        if cvq is None:
            raise ValueError("control device without a queue (reset(cvq) gives it one)")
        while n < budget and not self.broken:
            try:
                chain = cvq.pop()
            # One name per except clause: compiled, a name keeps the type of its first.
            except AvailIndexError as stop:
                # vhost's vq_err: the ring is impossible; stop until a reset.
                stats.ctrl_desc_errors += 1
                self.broken = True
                self.last_error = f"control queue stopped: {stop}"
                break
            except DescriptorError as e:
                stats.ctrl_desc_errors += 1
                self.last_error = str(e)
                if e.head is not None:
                    cvq.push_used(e.head, 0)
                n += 1
                continue
            if chain is None:
                break
            n += 1
            cvq.push_used(chain.head, self._handle_chain(chain))
        return n

    def flush(self) -> bool:
        """Publish the answers; True if the driver wants an interrupt."""
        if self.cvq is not None and publish_used(self.cvq):
            self.stats.ctrl_notifies += 1
            return True
        return False

    def _handle_chain(self, chain: Chain) -> int:
        """The used length for one chain: 1 (the ack) or 0 (refused unanswered)."""
        if chain.out_len < CTRL_HDR.size or not chain.in_len:
            # QEMU: "virtio-net ctrl missing headers" (it breaks the device; we
            # only refuse the chain, nothing of it is written).
            self.stats.ctrl_desc_errors += 1
            self.last_error = (
                f"control chain at head {chain.head}: {chain.out_len} readable bytes "
                f"(header needs {CTRL_HDR.size}), {chain.in_len} writable (ack needs 1)"
            )
            return 0
        readable = chain.readable
        first = readable[0]
        if len(first) >= CTRL_HDR.size:
            cls, cmd = CTRL_HDR.unpack_from(first)
        else:
            cls, cmd = CTRL_HDR.unpack(gather(readable, 0, CTRL_HDR.size))
        data_len = chain.out_len - CTRL_HDR.size
        if data_len > CTRL_MAX_DATA:
            ack, reason = (
                VIRTIO_NET_ERR,
                f"{data_len} bytes of command data (at most {CTRL_MAX_DATA})",
            )
        else:
            data = gather(readable, CTRL_HDR.size, data_len)
            ack, reason = self.handle(cls, cmd, data)
        self._ack(chain.writable, ack)
        stats = self.stats
        stats.ctrl_commands += 1
        if ack != VIRTIO_NET_OK:
            stats.ctrl_errors += 1
            self.last_error = f"ctrl class {cls} cmd {cmd}: {reason}"
        log = self.log
        log.append(ControlEvent(cls, cmd, ack, reason))
        if len(log) > self.LOG_LEN:
            del log[0]
        return CTRL_ACK.size

    @staticmethod
    def _ack(writable: list[memoryview], ack: int) -> None:
        for view in writable:
            if len(view):  # a zero-length writable descriptor before the ack byte
                view[0] = ack
                return

    # -- commands (virtio_net_handle_ctrl_iov) ------------------------------------------------

    def handle(self, cls: int, cmd: int, data: bytes) -> tuple[int, str]:
        """(ack, why refused) for one command's header fields and data."""
        need = COMMAND_FEATURES.get((cls, cmd))
        if need is None:
            return VIRTIO_NET_ERR, "unknown class or command"
        if self.features & need != need:
            return VIRTIO_NET_ERR, "its feature was not negotiated"
        want = DATA_LEN.get((cls, cmd))
        if want is not None and len(data) != want:
            return VIRTIO_NET_ERR, f"{len(data)} bytes of data, the command takes {want}"
        return self._handlers[cls](cmd, data)

    def _call(self, callback: Callable[..., bool | None] | None, *args: object) -> str:
        """Run a back-end callback: "" if it accepted, else why not (False or raised)."""
        if callback is None:
            return ""
        try:
            accepted = callback(*args) is not False
        except Exception as e:  # the back-end failed: refuse the command, keep serving
            return f"refused by the back-end: {e!r}"
        return "" if accepted else "refused by the back-end"

    def _handle_rx_mode(self, cmd: int, data: bytes) -> tuple[int, str]:
        on = bool(data[0])
        change: dict[str, bool] = {_RX_FLAGS[cmd]: on}
        mode = replace(self.rx, **change)  # type: ignore[arg-type]  # a bool field, by name
        return self._set_rx(mode)

    def _set_rx(self, mode: RxMode) -> tuple[int, str]:
        if why := self._call(self.on_rx_mode, mode):
            return VIRTIO_NET_ERR, f"rx mode {why}"
        self.rx = mode
        return VIRTIO_NET_OK, ""

    def _handle_mac(self, cmd: int, data: bytes) -> tuple[int, str]:
        if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET:
            mac = bytes(data)
            if why := self._call(self.on_mac, mac):
                return VIRTIO_NET_ERR, f"MAC address {why}"
            self.mac = mac
            return VIRTIO_NET_OK, ""
        tables = parse_mac_table(data)
        if tables is None:
            return VIRTIO_NET_ERR, f"{len(data)} bytes are not two whole MAC tables"
        uni, multi = tables
        # QEMU: the unicast table takes its place first, the multicast table the rest.
        uni_overflow = len(uni) > MAC_TABLE_ENTRIES
        in_use = 0 if uni_overflow else len(uni)
        multi_overflow = len(multi) > MAC_TABLE_ENTRIES - in_use
        mode = replace(
            self.rx,
            uni=frozenset(() if uni_overflow else uni),
            multi=frozenset(() if multi_overflow else multi),
            uni_overflow=uni_overflow,
            multi_overflow=multi_overflow,
        )
        return self._set_rx(mode)

    def _handle_vlan(self, cmd: int, data: bytes) -> tuple[int, str]:
        (vid,) = VLAN_VID.unpack(data)
        if vid >= MAX_VLAN:
            return VIRTIO_NET_ERR, f"vid {vid} >= {MAX_VLAN}"
        vlans = self.rx.vlans or frozenset()
        vlans = vlans | {vid} if cmd == VIRTIO_NET_CTRL_VLAN_ADD else vlans - {vid}
        return self._set_rx(replace(self.rx, vlans=vlans))

    def _handle_announce(self, cmd: int, data: bytes) -> tuple[int, str]:
        if not self.announce_pending:
            return VIRTIO_NET_ERR, "no announce pending"  # QEMU: only with S_ANNOUNCE set
        if why := self._call(self.on_announce_ack):
            return VIRTIO_NET_ERR, f"announce ack {why}"
        self.announce_pending = False
        return VIRTIO_NET_OK, ""

    def _handle_mq(self, cmd: int, data: bytes) -> tuple[int, str]:
        (pairs,) = CTRL_MQ.unpack(data)
        if not (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= self.max_pairs):
            return VIRTIO_NET_ERR, f"{pairs} queue pairs outside 1..{self.max_pairs}"
        if why := self._call(self.on_queue_pairs, pairs):
            return VIRTIO_NET_ERR, f"{pairs} queue pairs {why}"
        self.curr_queue_pairs = pairs
        return VIRTIO_NET_OK, ""

    def _handle_offloads(self, cmd: int, data: bytes) -> tuple[int, str]:
        (offloads,) = GUEST_OFFLOADS.unpack(data)
        # 5.1.6.5.6.1: only offloads whose GUEST_* feature was negotiated.
        supported = self.features & OFFLOAD_BITS
        if offloads & ~supported:
            return VIRTIO_NET_ERR, f"offloads {offloads:#x} not within negotiated {supported:#x}"
        if why := self._call(self.on_guest_offloads, offloads):
            return VIRTIO_NET_ERR, f"guest offloads {offloads:#x} {why}"
        self.guest_offloads = offloads
        return VIRTIO_NET_OK, ""

    # -- the receive filter (QEMU receive_filter) ---------------------------------------------

    def rx_filter(self, frame: bytes | bytearray | memoryview) -> bool:
        """Whether a frame (Ethernet header first, no virtio-net header) may go to the guest."""
        rx = self.rx
        if rx.promisc:
            return True
        if len(frame) < ETH_ALEN:
            return False  # no destination address: a runt
        vlans = rx.vlans
        if (
            vlans is not None
            and len(frame) >= 16
            and ETH_TYPE.unpack_from(frame, 12)[0] == ETH_P_8021Q
        ):
            if ETH_TYPE.unpack_from(frame, 14)[0] & 0xFFF not in vlans:
                return False
        dst = bytes(frame[:ETH_ALEN])
        if dst[0] & 1:
            if dst == BROADCAST:
                return not rx.nobcast
            if rx.nomulti:
                return False
            return rx.allmulti or rx.multi_overflow or dst in rx.multi
        if rx.nouni:
            return False
        return rx.alluni or rx.uni_overflow or dst == self.mac or dst in rx.uni


# -- driver side ----------------------------------------------------------------------------


@final
@dataclass
class _Posted:
    cls: int
    cmd: int
    status_off: int
    status: int | None = None


@final
class ControlQueueBroken(VirtioError):
    """The device broke the control ring (a used id naming no command, an impossible
    used index): like Linux's BAD_RING, no command is sent until a reset."""


# Linux: vi->ctrl->status = ~0 before each command, so a device that never writes
# the ack (used length 0) reads as a failure.
STATUS_UNSET = 0xFF


@final
class ControlQueue:
    """The driver's control queue (virtnet_send_command), one batch in flight.

    ``buf`` / ``gpa`` is guest memory the driver owns for command headers, data
    and status bytes (Linux: ``struct control_buf``); a batch of commands is
    laid out in it one after the other. ``post`` queues a command and returns
    whether to kick; ``complete`` returns the batch's status once the device
    used every command, None before. The spin Linux does between the two is
    the caller's (it owns the kick and the interrupt).
    """

    def __init__(
        self,
        vq: RingDriver,
        buf: memoryview,
        gpa: int,
        *,
        stats: CtrlStats | None = None,
    ) -> None:
        if len(buf) < CTRL_HDR.size + CTRL_ACK.size:
            raise ValueError(f"control buffer of {len(buf)} bytes cannot hold a command")
        self.vq = vq
        self.buf = buf
        self.gpa = gpa
        self.stats = stats if stats is not None else ctrl_stats()
        self._used_bytes = 0
        self._posted: list[_Posted] = []
        self.last_error = ""
        self.broken = ""  # why the ring can no longer be trusted, or ""
        # The last completed batch, per command in post order: (class, cmd, status).
        self.results: list[tuple[int, int, int]] = []

    @property
    def busy(self) -> bool:
        """Whether a posted command has not come back yet."""
        return any(p.status is None for p in self._posted)

    def post(self, cls: int, cmd: int, data: bytes | Sequence[bytes] = b"") -> bool:
        """Add one command chain [hdr, data...] readable + [status] writable; True: kick.

        ``data`` may be several byte strings, each its own descriptor (Linux's
        MAC_TABLE_SET sends the unicast and multicast tables as two sgs).
        """
        if self.broken:
            raise ControlQueueBroken(f"control queue broken: {self.broken}")
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        parts = [bytes(p) for p in parts if len(p)]
        size = CTRL_HDR.size + sum(len(p) for p in parts) + CTRL_ACK.size
        off = self._used_bytes
        if off + size > len(self.buf):
            raise ValueError(
                f"control buffer too small: command ({cls}, {cmd}) needs {size} bytes, "
                f"{len(self.buf) - off} of {len(self.buf)} left"
            )
        buf, gpa = self.buf, self.gpa
        out = [(gpa + off, CTRL_HDR.size)]
        CTRL_HDR.pack_into(buf, off, cls, cmd)
        pos = off + CTRL_HDR.size
        for part in parts:
            buf[pos : pos + len(part)] = part
            out.append((gpa + pos, len(part)))
            pos += len(part)
        buf[pos] = STATUS_UNSET
        posted = _Posted(cls, cmd, pos)
        self.vq.add(out, [(gpa + pos, CTRL_ACK.size)], posted)  # QueueFullError: nothing kept
        self._used_bytes = pos + CTRL_ACK.size
        self._posted.append(posted)
        self.stats.ctrl_commands += 1
        return self.vq.kick_prepare()

    def complete(self) -> int | None:
        """Once every posted command is used: VIRTIO_NET_OK if each was, else the first
        other status (per command in ``results``); None before."""
        if not self._posted:
            return None
        while self.busy:
            try:
                got = self.vq.get_buf()
            except UsedRingError as e:
                self.stats.ctrl_desc_errors += 1
                self.last_error = str(e)
                if isinstance(e.token, _Posted):
                    e.token.status = self.buf[e.token.status_off]
                    continue
                return self._fail_rest(str(e))  # an id naming no command
            except UsedIndexError as lost:  # (not ``e``: see process)
                self.stats.ctrl_desc_errors += 1
                self.last_error = str(lost)
                return self._fail_rest(str(lost))
            if got is None:
                if self.vq.broken:
                    return self._fail_rest("the ring is broken")
                return None
            posted, _length = got
            if not isinstance(posted, _Posted) or not any(p is posted for p in self._posted):
                continue  # not this batch's (cannot happen unless the ring lies)
            # Linux reads ctrl->status whatever the used length: unset (0xFF) if unwritten.
            posted.status = self.buf[posted.status_off]
        return self._finish()

    def _fail_rest(self, why: str) -> int:
        """Every command not back fails; the ring is not used again (BAD_RING)."""
        self.broken = why
        self.vq.broken = True
        for p in self._posted:
            if p.status is None:
                p.status = STATUS_UNSET
        return self._finish()

    def _finish(self) -> int:
        # Every status is set by now (complete waited for each, _fail_rest set the rest).
        self.results = [
            (p.cls, p.cmd, STATUS_UNSET if p.status is None else p.status) for p in self._posted
        ]
        self._posted = []
        self._used_bytes = 0
        status = VIRTIO_NET_OK
        for _, _, st in self.results:
            if st != VIRTIO_NET_OK:
                self.stats.ctrl_errors += 1
                if status == VIRTIO_NET_OK:
                    status = st
        return status

    def send_command(
        self,
        cls: int,
        cmd: int,
        data: bytes | Sequence[bytes] = b"",
        *,
        run: Callable[[bool], object],
        spins: int = 16,
    ) -> bool:
        """virtnet_send_command in one call: ``post``, then ``run(kick)`` (the transport's
        kick and the device's turn; in-process: ControlDevice.process + flush) until the
        batch is back. Linux spins forever; this gives up after ``spins`` turns (False,
        last_error says so) and the command stays in flight."""
        kick = self.post(cls, cmd, data)
        for _ in range(spins):
            run(kick)
            status = self.complete()
            if status is not None:
                return status == VIRTIO_NET_OK
            kick = False
        self.last_error = f"ctrl class {cls} cmd {cmd}: no answer after {spins} turns"
        return False

    # -- virtio_net.c's commands --------------------------------------------------------------

    def set_queues(self, queue_pairs: int) -> bool:
        """virtnet_set_queues: VQ_PAIRS_SET; True: kick."""
        if not 0 <= queue_pairs <= 0xFFFF:
            raise ValueError(f"queue_pairs {queue_pairs} is not a le16")
        return self.post(
            VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, CTRL_MQ.pack(queue_pairs)
        )

    def set_rx_mode(self, promisc: bool, allmulti: bool) -> bool:
        """virtnet_set_rx_mode's two commands, PROMISC then ALLMULTI, in one batch."""
        kick = self.post(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, RX_ON.pack(bool(promisc)))
        # kick_prepare only looks at what was added since it last ran: either may say kick.
        return (
            self.post(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, RX_ON.pack(bool(allmulti)))
            or kick
        )

    def set_rx_flag(self, cmd: int, on: bool) -> bool:
        """Any one VIRTIO_NET_CTRL_RX_* switch (the CTRL_RX_EXTRA ones too)."""
        return self.post(VIRTIO_NET_CTRL_RX, cmd, RX_ON.pack(bool(on)))

    def set_mac_table(self, uni: Sequence[bytes], multi: Sequence[bytes]) -> bool:
        """virtnet_set_rx_mode's MAC_TABLE_SET: unicast and multicast tables, two sgs."""
        return self.post(
            VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, pack_mac_table(uni, multi)
        )

    def set_mac_address(self, mac: bytes) -> bool:
        """virtnet_set_mac_address with CTRL_MAC_ADDR: MAC_ADDR_SET."""
        if len(mac) != ETH_ALEN:
            raise ValueError(f"MAC address must be {ETH_ALEN} bytes, got {len(mac)}")
        return self.post(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, bytes(mac))

    def set_vlan(self, vid: int, add: bool = True) -> bool:
        """virtnet_vlan_rx_add_vid / _kill_vid."""
        if not 0 <= vid <= 0xFFFF:
            raise ValueError(f"vid {vid} is not a le16")
        cmd = VIRTIO_NET_CTRL_VLAN_ADD if add else VIRTIO_NET_CTRL_VLAN_DEL
        return self.post(VIRTIO_NET_CTRL_VLAN, cmd, VLAN_VID.pack(vid))

    def set_guest_offloads(self, offloads: int) -> bool:
        """virtnet_set_guest_offloads: GUEST_OFFLOADS_SET with a le64 of feature bits."""
        return self.post(
            VIRTIO_NET_CTRL_GUEST_OFFLOADS,
            VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
            GUEST_OFFLOADS.pack(offloads & 0xFFFFFFFFFFFFFFFF),
        )

    def ack_announce(self) -> bool:
        """virtnet_ack_link_announce: ANNOUNCE_ACK, no data."""
        return self.post(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK)


class OffloadsSink(Protocol):
    """What serve_control tells a back-end (ports/backends.py's Backend does)."""

    def on_guest_offloads(self, offloads: int) -> None: ...


def serve_control(
    ctrl: ControlDevice, devices: Sequence[VirtnetDevice], backends: Sequence[OffloadsSink]
) -> None:
    """Let a ControlDevice's commands act on the device it answers for (one process:
    the driver meets virtnet's own device): the receive filter on every pair, the
    guest offloads re-applied to each pair and its back-end (a tap: TUNSETOFFLOAD,
    as QEMU's virtio_net_apply_guest_offloads)."""

    def rx_mode(mode: RxMode) -> None:
        # Promiscuous takes every frame: no filter on the hot path then.
        for dev in devices:
            dev.rx_filter = None if mode.promisc else ctrl.rx_filter

    def offloads(bits: int) -> None:
        for dev in devices:
            dev.set_guest_offloads(bits)
        for backend in backends:
            backend.on_guest_offloads(bits)

    ctrl.on_rx_mode = rx_mode
    ctrl.on_guest_offloads = offloads


def build_control(memory: GuestMemory, area: ControlArea, features: int, index: int,
                  max_pairs: int) -> tuple[ControlQueue, ControlDevice]:  # fmt: skip
    """Both ends of a control queue in one process: the driver's ControlQueue and the
    ControlDevice answering it, as DPDK's virtio_user shadows the control queue in
    the front-end (no vhost-user back-end serves one)."""
    event_idx = has(features, VirtioF.RING_EVENT_IDX)
    ring = area.ring
    vq: RingDriver
    cvq: RingDevice
    if isinstance(ring, PackedAddrs):
        pviews = PackedViews.from_memory(memory, ring)
        vq = vring_create_virtqueue(pviews, event_idx=event_idx, index=index)
        cvq = PackedQueueDevice(pviews, memory, event_idx=event_idx,
                                last_avail_idx=FRESH_PACKED_BASE, index=index)  # fmt: skip
    else:
        views = VringViews.from_memory(memory, ring)
        vq = vring_create_virtqueue(views, event_idx=event_idx, index=index)
        cvq = SplitQueueDevice(views, memory, event_idx=event_idx, last_avail_idx=0,
                               index=index)  # fmt: skip
    ctrl = ControlQueue(vq, memory.view(area.buf, CTRL_BUF_SIZE), area.buf)
    return ctrl, ControlDevice(cvq, features, max_pairs)
