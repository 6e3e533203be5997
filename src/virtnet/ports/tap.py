"""A TAP device with a virtio-net header: the only file that talks to /dev/net/tun.

With ``IFF_VNET_HDR`` every frame read from or written to the tap is preceded by a
``virtio_net_hdr`` (include/uapi/linux/virtio_net.h), so the kernel hands us partially
checksummed, 64 KiB TSO frames and takes them back as they are: the tap's header *is*
the virtqueue's header (Firecracker ``tap.rs``, QEMU ``net/tap-linux.c``).

Facts a reader of this tap relies on:

- with ``TUNSETVNETHDRSZ`` 12 (``virtio_net_hdr_mrg_rxbuf``) the kernel writes only the
  10-byte ``virtio_net_hdr`` on read; bytes 10..11 (``num_buffers``) are never meaningful.
  Older kernels (Debian 12's 6.1) leave them *unwritten* (``iov_iter_advance``: whatever
  the buffer held stays); kernels with "tun: Pad virtio header with zero" (2025; 6.18 here)
  zero them. Either way the device sets ``num_buffers`` itself;
- on write the kernel skips the whole 12 bytes, ``num_buffers`` included;
- one read returns one frame; a buffer smaller than the frame truncates it silently, so
  a reader must post ``vnet_hdr_size + MAX_FRAME_LEN`` bytes when TSO is on.

Multi-queue (``IFF_MULTI_QUEUE``, Documentation/networking/tuntap.rst "Multiqueue tuntap
interface"): every fd attached to the same name is one queue pair. The kernel picks the
queue of a frame the stack sends by its flow hash (``tun_select_queue`` → ``tun_automq``),
so one flow stays on one fd; what is written on any fd enters the stack. The vnet header
size and the offloads are the *device's* (``tun->vnet_hdr_sz``, ``set_offload`` on the
netdev): setting them on one fd sets them for all queues, so every queue must agree.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from virtnet.ports.tapio import TapIO

TUN_PATH = "/dev/net/tun"

# include/uapi/linux/if_tun.h: _IOW('T', nr, int) = 0x40045400 | nr, _IOR = 0x80045400 | nr.
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int): attach this fd to (or create) a device
TUNGETFEATURES = 0x800454CF  # _IOR('T', 207, unsigned int): IFF_* flags the kernel supports
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int): TUN_F_* the reader can accept
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int): fills ifreq with name and IFF_* flags
TUNGETVNETHDRSZ = 0x800454D7  # _IOR('T', 215, int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int): 10 (virtio_net_hdr) or 12 (_mrg_rxbuf)
TUNSETQUEUE = 0x400454D9  # _IOW('T', 217, int): ifreq with IFF_ATTACH_QUEUE / IFF_DETACH_QUEUE

# TUNSETIFF flags (ifr_flags).
IFF_TUN = 0x0001
IFF_TAP = 0x0002  # Ethernet frames, not IP packets
IFF_NO_PI = 0x1000  # no 4-byte packet-information prefix: the vnet header comes first
IFF_VNET_HDR = 0x4000  # each frame is preceded by a virtio_net_hdr
IFF_MULTI_QUEUE = 0x0100  # one fd per queue, many fds on one name
IFF_ATTACH_QUEUE = 0x0200  # TUNSETQUEUE: this fd's queue takes frames again
IFF_DETACH_QUEUE = 0x0400  # TUNSETQUEUE: the kernel stops steering frames to this fd

# drivers/net/tun.c: the most fds (queues) one tap can have attached (numqueues +
# numdisabled); the kernel says E2BIG beyond it.
MAX_TAP_QUEUES = 256

# TUNSETOFFLOAD flags: what *we* (the reader of the tap) accept, so what the kernel may
# hand us instead of finishing it itself.
TUN_F_CSUM = 0x01  # partial checksums (VIRTIO_NET_HDR_F_NEEDS_CSUM)
TUN_F_TSO4 = 0x02  # TCPv4 segmentation offload (GSO_TCPV4); needs TUN_F_CSUM
TUN_F_TSO6 = 0x04  # TCPv6 segmentation offload (GSO_TCPV6); needs TUN_F_CSUM
TUN_F_TSO_ECN = 0x08  # TSO frames with CWR set (GSO_ECN); needs a TSO flag
TUN_F_UFO = 0x10  # UDP fragmentation offload (GSO_UDP); needs TUN_F_CSUM

TUN_F_DEFAULT = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN

IFNAMSIZ = 16  # include/uapi/linux/if.h, the name plus its NUL
IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name, ifr_flags, rest of the union
INT = struct.Struct("i")

VNET_HDR_SIZES = (10, 12)  # virtio_net_hdr, virtio_net_hdr_mrg_rxbuf
VIRTIO_NET_HDR_MRG_RXBUF_SIZE = 12

# The largest frame a TSO tap hands over: Ethernet + VLAN tag + IPv6 header + a full
# 64 KiB payload (an IPv4 TSO frame, 14 + 65535, is smaller). gso_max_size is 64 KiB on a
# tap unless BIG TCP is switched on, which virtnet never does.
MAX_FRAME_LEN = 14 + 4 + 40 + 65535

# virtio-net feature bits (VIRTIO 1.2, 5.1.3) that decide the tap's offloads. Kept as plain
# numbers so that ports/ stays below net/ (the net layer owns the named feature set).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14


class TapError(OSError):
    """Opening or configuring a tap failed; the message names the step and the cause."""


def offloads_for_guest_features(features: int) -> int:
    """TUN_F_* flags for a negotiated virtio-net feature mask.

    Frames read from the tap go to the guest's receive queue, so the tap may only
    produce what the guest accepts: its GUEST_* bits (QEMU ``virtio_net_apply_guest_offloads``).
    TSO/UFO without GUEST_CSUM is meaningless (a GSO frame is always partially checksummed)
    and the kernel ignores it, so it is dropped here too.
    """
    return _offloads(
        features,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
    )


def offloads_for_host_features(features: int) -> int:
    """TUN_F_* flags for frames read from a tap that go to a device's *transmit* queue.

    The driver side of virtnet reads its guest stack's frames from a tap and
    transmits them: the device accepts what its HOST_* bits say.
    """
    return _offloads(
        features,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
    )


def _offloads(features: int, csum: int, tso4: int, tso6: int, ecn: int, ufo: int) -> int:
    """The TUN_F_* flags of one direction's feature bits (its CSUM, TSO4, TSO6, ECN, UFO)."""

    def has(bit: int) -> bool:
        return bool(features >> bit & 1)

    if not has(csum):
        return 0
    flags = TUN_F_CSUM
    if has(tso4):
        flags |= TUN_F_TSO4
    if has(tso6):
        flags |= TUN_F_TSO6
    if has(ecn) and flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags |= TUN_F_TSO_ECN
    if has(ufo):
        flags |= TUN_F_UFO
    return flags


class Tap(TapIO):
    """An open, configured tap: one fd, one frame per read, vnet header first.

    Reading and writing frames (``readv_into``, ``writev``), ``fileno`` and
    ``close`` are :class:`~virtnet.ports.tapio.TapIO`'s, compiled with the data
    plane; opening and configuring it, here.
    """

    def __init__(
        self, fd: int, name: str, vnet_hdr_size: int, offloads: int, *, multi_queue: bool = False
    ) -> None:
        super().__init__(fd, name)
        self.vnet_hdr_size = vnet_hdr_size
        self.offloads = offloads
        self.multi_queue = multi_queue  # this fd is one queue of an IFF_MULTI_QUEUE tap
        self.queue_enabled = True  # False: detached by set_queue_enabled, gets no frames

    @classmethod
    def from_fd(cls, fd: int) -> Tap:
        """Adopt an fd that is already a configured tap (like QEMU's ``-netdev tap,fd=N``)."""
        ifr = bytearray(IFREQ.size)
        try:
            fcntl.ioctl(fd, TUNGETIFF, ifr)
            hdr = bytearray(INT.size)
            fcntl.ioctl(fd, TUNGETVNETHDRSZ, hdr)
        except OSError as e:
            raise TapError(e.errno, f"fd {fd} is not a tap: {e.strerror}") from None
        name: bytes
        flags: int
        name, flags = IFREQ.unpack(ifr)
        if not flags & IFF_VNET_HDR or flags & IFF_TUN:
            raise TapError(errno.EINVAL, f"fd {fd}: a tap without IFF_VNET_HDR ({flags:#x})")
        os.set_blocking(fd, False)
        # One fd of a multi-queue tap is one queue of it: adopt it like any other.
        hdr_size: int = INT.unpack(hdr)[0]
        return cls(fd, name.rstrip(b"\0").decode(), hdr_size, -1,
                   multi_queue=bool(flags & IFF_MULTI_QUEUE))  # fmt: skip

    def set_offload(self, offloads: int) -> None:
        """TUNSETOFFLOAD: what the kernel may hand us (re-set after negotiation)."""
        _ioctl_int(self.fileno(), TUNSETOFFLOAD, offloads, f"tap {self.name}: TUNSETOFFLOAD")
        self.offloads = offloads

    def set_queue_enabled(self, enabled: bool) -> None:
        """TUNSETQUEUE: attach or detach this fd's queue of a multi-queue tap.

        A detached queue gets no frames (the kernel steers over the attached ones only)
        until attached again; it keeps its fd, its tap, and writes still enter the stack
        (``__tun_detach`` without clean keeps ``tfile->tun``). What a device does for the
        queue pairs a driver leaves unused (QEMU ``tap_fd_disable``).
        """
        if not self.multi_queue:
            raise TapError(errno.EINVAL, f"tap {self.name}: only a multi-queue tap has queues "
                           "to attach or detach")  # fmt: skip
        if enabled == self.queue_enabled:
            return  # the kernel says EINVAL to a second attach or detach
        flag = IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self.fileno(), TUNSETQUEUE, IFREQ.pack(b"", flag))
        except OSError as e:
            verb = "attach" if enabled else "detach"
            raise TapError(e.errno, f"tap {self.name}: TUNSETQUEUE {verb}: {e.strerror}") from None
        self.queue_enabled = enabled

    def flags(self) -> int:
        """The IFF_* flags the kernel holds for this tap (TUNGETIFF)."""
        ifr = bytearray(IFREQ.size)
        fcntl.ioctl(self.fileno(), TUNGETIFF, ifr)
        flags: int = IFREQ.unpack(ifr)[1]
        return flags

    def kernel_vnet_hdr_size(self) -> int:
        """The vnet header size the kernel uses for this tap (TUNGETVNETHDRSZ)."""
        buf = bytearray(INT.size)
        fcntl.ioctl(self.fileno(), TUNGETVNETHDRSZ, buf)
        size: int = INT.unpack(buf)[0]
        return size

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        mq = ", multi_queue" if self.multi_queue else ""
        return (
            f"Tap({self.name!r}, {state}, vnet_hdr={self.vnet_hdr_size}, "
            f"offloads={self.offloads:#x}{mq})"
        )


def open_tap(
    name: str = "",
    vnet_hdr_size: int = VIRTIO_NET_HDR_MRG_RXBUF_SIZE,
    offloads: int = TUN_F_DEFAULT,
    *,
    multi_queue: bool = False,
) -> Tap:
    """Create (or attach to) tap ``name`` with a vnet header and ``offloads`` (TUN_F_*).

    An empty name lets the kernel pick ``tapN``. The fd is non-blocking and close-on-exec.
    ``multi_queue``: attach one more queue (fd) to an IFF_MULTI_QUEUE tap, creating it if
    missing; a tap is either multi-queue or not, for every fd (the kernel says EINVAL).
    """
    encoded = _check_name(name)
    _check_vnet_hdr_size(vnet_hdr_size)
    iff = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
    fd = _open_tun()
    try:
        name = _set_iff(fd, encoded, name, iff)
        _ioctl_int(fd, TUNSETVNETHDRSZ, vnet_hdr_size, f"tap {name}: TUNSETVNETHDRSZ")
        _ioctl_int(fd, TUNSETOFFLOAD, offloads, f"tap {name}: TUNSETOFFLOAD {offloads:#x}")
    except BaseException:
        os.close(fd)
        raise
    return Tap(fd, name, vnet_hdr_size, offloads, multi_queue=multi_queue)


def open_tap_queues(
    name: str,
    queues: int,
    vnet_hdr_size: int = VIRTIO_NET_HDR_MRG_RXBUF_SIZE,
    offloads: int = TUN_F_DEFAULT,
) -> list[Tap]:
    """Open ``queues`` fds on the IFF_MULTI_QUEUE tap ``name``: one Tap per queue.

    The tap is created if missing (an empty name: the kernel picks it for the first
    queue, the others attach to that). Either all queues open or none stays open; a tap
    this call created then disappears with its last fd.
    """
    check_queues(queues)
    taps: list[Tap] = []
    try:
        for _ in range(queues):
            taps.append(open_tap(name, vnet_hdr_size, offloads, multi_queue=True))
            name = taps[0].name
    except BaseException:
        for tap in taps:
            tap.close()
        raise
    return taps


def check_queues(queues: int) -> None:
    """A queue count a tap can have, or a TapError saying why not."""
    if isinstance(queues, bool) or not isinstance(queues, int) or queues < 1:
        raise TapError(errno.EINVAL, f"queues {queues!r}: a tap needs at least 1 queue")
    if queues > MAX_TAP_QUEUES:
        raise TapError(
            errno.E2BIG, f"queues {queues}: a tap has at most {MAX_TAP_QUEUES} queues "
            "(MAX_TAP_QUEUES in drivers/net/tun.c)",
        )  # fmt: skip


def _check_name(name: str) -> bytes:
    encoded = name.encode()
    if len(encoded) >= IFNAMSIZ:
        raise TapError(
            errno.EINVAL, f"tap name {name!r} is too long: {len(encoded)} bytes, at most "
            f"{IFNAMSIZ - 1} (IFNAMSIZ)",
        )  # fmt: skip
    if "/" in name or any(c.isspace() for c in name):
        raise TapError(errno.EINVAL, f"tap name {name!r} may not contain '/' or whitespace")
    return encoded


def _check_vnet_hdr_size(size: int) -> None:
    if size not in VNET_HDR_SIZES:
        raise TapError(
            errno.EINVAL, f"vnet_hdr_size {size} not supported: virtnet uses {VNET_HDR_SIZES}"
        )


def _open_tun() -> int:
    try:
        return os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TapError(
            errno.ENOENT, f"{TUN_PATH} is missing: load the tun module (modprobe tun) "
            "or run where the device node exists",
        ) from None  # fmt: skip
    except PermissionError as e:
        raise TapError(e.errno, f"cannot open {TUN_PATH}: {e.strerror} (need root)") from None


def _set_iff(fd: int, encoded: bytes, name: str, iff: int) -> str:
    ifr = bytearray(IFREQ.pack(encoded, iff))
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        raise TapError(e.errno, _tunsetiff_reason(name, iff, e)) from None
    name_field: bytes = IFREQ.unpack(ifr)[0]
    return name_field.rstrip(b"\0").decode()


def _tunsetiff_reason(name: str, iff: int, e: OSError) -> str:
    mq = bool(iff & IFF_MULTI_QUEUE)
    what = f"TUNSETIFF {name or '(kernel-chosen name)'}{' multi_queue' if mq else ''}"
    if e.errno == errno.EPERM:
        return f"{what}: permission denied (need root or CAP_NET_ADMIN)"
    if e.errno == errno.EBUSY:
        return f"{what}: the device exists and is a single-queue tap already attached to an fd"
    if e.errno == errno.E2BIG:
        return f"{what}: the tap already has {MAX_TAP_QUEUES} queues (MAX_TAP_QUEUES)"
    if e.errno == errno.EINVAL:
        # tun_set_iff: the name exists and is not a tap of the asked kind; a tap is
        # multi-queue or not for all its fds.
        existing = _existing_kind(name)
        if existing == SINGLE_QUEUE_TAP and mq:
            return (f"{what}: {name} exists as a single-queue tap, which cannot take more "
                    f"queues: delete it (ip link del {name}) or use 1 queue")  # fmt: skip
        if existing == MULTI_QUEUE_TAP and not mq:
            return (f"{what}: {name} exists as a multi-queue tap: attach its queues with "
                    "IFF_MULTI_QUEUE (open_tap_queues, open_tap(multi_queue=True))")  # fmt: skip
        if existing:
            return f"{what}: {name} exists as {existing}, not a tap"
        kind, other = ("multi", "single") if mq else ("single", "multi")
        return (f"{what}: {name or 'the name'} exists and is not a {kind}-queue tap (a "
                f"{other}-queue tap, or not a tap): delete it or pick another name")  # fmt: skip
    return f"{what}: {e.strerror}"


SINGLE_QUEUE_TAP, MULTI_QUEUE_TAP = "a single-queue tap", "a multi-queue tap"


def _existing_kind(name: str) -> str:
    """What ``name`` is in this thread's namespace, for an error message; "" if unknown.

    sysfs shows the namespace it was mounted in, so it is trusted only when its ifindex is
    the one this namespace gives the name.
    """
    if not name:
        return ""
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        return ""
    sysfs = f"/sys/class/net/{name}"
    try:
        with open(f"{sysfs}/ifindex") as f:
            if int(f.read()) != index:
                return ""  # another namespace's sysfs
    except (OSError, ValueError):
        return ""
    try:
        with open(f"{sysfs}/tun_flags") as f:
            flags = int(f.read(), 16)
    except (OSError, ValueError):
        return "a network device"  # no tun_flags: not a tun/tap at all
    if flags & IFF_TUN:
        return "a tun (IP, not Ethernet) device"
    return MULTI_QUEUE_TAP if flags & IFF_MULTI_QUEUE else SINGLE_QUEUE_TAP


def _ioctl_int(fd: int, request: int, value: int, what: str) -> None:
    try:
        # The kernel reads an int through the pointer for TUNSETVNETHDRSZ and takes the
        # value itself for TUNSETOFFLOAD; fcntl passes an int by value and a buffer by
        # pointer, so pick by request.
        arg: int | bytes = INT.pack(value) if request == TUNSETVNETHDRSZ else value
        fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise TapError(e.errno, f"{what}: {e.strerror}") from None
