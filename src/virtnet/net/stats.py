"""Counters, named once. Driver names follow Linux's netdev stats plus the
allocation counters the seed argues about; device names follow vhost-net's
and ``ethtool -S`` habits. Everything that reports stats (JSON, tables, live
counters) iterates these tuples, so a name is never spelled twice.
"""

from __future__ import annotations

from typing import ClassVar, final

from virtnet.net.faults import FAULT_KINDS

# One counter per kind of lie: injected (device, --faults) or met (driver).
FAULT_STATS = tuple(f"fault_{kind}" for kind in FAULT_KINDS)

DRIVER_STATS = (
    "rx_packets",
    "rx_bytes",
    "rx_dropped",
    "rx_length_errors",
    "rx_bufs",  # buffers taken off the rx used ring
    "rx_kicks",
    "tx_packets",
    "tx_bytes",
    "tx_dropped",
    "tx_completed",  # tx chains the device used, each counted once (free_old_xmit_skbs)
    "tx_kicks",
    "skb_allocs",
    "skb_frees",
    "page_allocs",
    "page_frees",
    "page_reuses",
    "pages_outstanding",
    # Bytes of rx buffer memory the delivered packets came in (Linux's truesize of
    # their buffers): per rx_bytes, what a strategy's buffer sizing costs.
    "rx_truesize",
    # The XDP hook (net/xdp.py), ethtool -S names of virtio_net's per-queue stats:
    # frames run through the program and what it decided (aborted: the program
    # raised, returned an unknown verdict or kept a reference to the buffer).
    "rx_xdp_packets",
    "rx_xdp_drops",
    "rx_xdp_tx",
    "rx_xdp_redirects",
    "rx_xdp_aborted",
    *FAULT_STATS,
)

DEVICE_STATS = (
    "rx_packets",  # delivered to the driver's rx ring (host → guest)
    "rx_bytes",
    # Frames this device dropped: no (or too small) rx buffers for a generated
    # frame, a GSO frame the guest refused, a frame no buffer could ever hold.
    # On a TAP the device waits instead (as vhost-net does): frames the empty
    # ring could not take are dropped by the kernel, in the tap's tx_dropped.
    "rx_dropped",
    "rx_bufs",  # rx chains used
    "rx_filtered",  # frames the control queue's receive filter kept from the guest
    "rx_num_buffers_max",  # largest num_buffers written (mergeable)
    "rx_notifies",  # interrupts the driver asked for (EVENT_IDX / flags)
    "rx_irqs",  # interrupts sent (call eventfd writes), after --coalesce moderation
    "tx_packets",  # consumed from the driver's tx ring (guest → host)
    "tx_bytes",
    "tx_errors",  # tx chains refused (too short for a header)
    "tx_notifies",
    "tx_irqs",
    "desc_errors",  # chains refused by the ring's validation
    *FAULT_STATS,
)

# The control virtqueue (net/ctrl.py), either side: commands answered (device) or
# posted (driver), those whose ack was not VIRTIO_NET_OK, chains refused unanswered
# (no header, no ack byte, a bad descriptor) or used entries the driver refused,
# and interrupts the driver asked for.
CTRL_STATS = (
    "ctrl_commands",
    "ctrl_errors",
    "ctrl_desc_errors",
    "ctrl_notifies",
)


class Stats:
    """Integer counters with a fixed set of names (``NAMES``, in report order).

    Each counter is a typed attribute declared in ``__init__`` rather than made
    with ``setattr`` from the names: the compiled build turns a declared ``int``
    attribute into a native field, so ``stats.rx_packets += 1`` on the data path
    costs a C add, not a dictionary write. ``_check_names`` holds each class to
    its tuple at import, so a name is still spelled in one list that reports use.
    """

    NAMES: ClassVar[tuple[str, ...]] = ()

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.NAMES}

    def bump(self, name: str) -> None:
        """Count one event by counter name (fault kinds are counted by name)."""
        setattr(self, name, getattr(self, name) + 1)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.as_dict().items() if v)
        return f"{type(self).__name__}({shown})"


class FaultStats(Stats):
    """The ``fault_KIND`` counters both ends keep (faults.py's FAULT_KINDS)."""

    def __init__(self) -> None:
        self.fault_bad_id = 0
        self.fault_dup_id = 0
        self.fault_bad_len = 0
        self.fault_idx_jump = 0
        self.fault_num_buffers_big = 0
        self.fault_num_buffers_small = 0
        self.fault_short = 0
        self.fault_bad_csum = 0
        self.fault_bad_gso = 0
        self.fault_irq_drop = 0
        self.fault_irq_late = 0
        self.fault_hold = 0


@final
class DriverStats(FaultStats):
    NAMES: ClassVar[tuple[str, ...]] = DRIVER_STATS

    def __init__(self) -> None:
        super().__init__()
        self.rx_packets = 0
        self.rx_bytes = 0
        self.rx_dropped = 0
        self.rx_length_errors = 0
        self.rx_bufs = 0
        self.rx_kicks = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.tx_dropped = 0
        self.tx_completed = 0
        self.tx_kicks = 0
        self.skb_allocs = 0
        self.skb_frees = 0
        self.page_allocs = 0
        self.page_frees = 0
        self.page_reuses = 0
        self.pages_outstanding = 0
        self.rx_truesize = 0
        self.rx_xdp_packets = 0
        self.rx_xdp_drops = 0
        self.rx_xdp_tx = 0
        self.rx_xdp_redirects = 0
        self.rx_xdp_aborted = 0


@final
class DeviceStats(FaultStats):
    NAMES: ClassVar[tuple[str, ...]] = DEVICE_STATS

    def __init__(self) -> None:
        super().__init__()
        self.rx_packets = 0
        self.rx_bytes = 0
        self.rx_dropped = 0
        self.rx_bufs = 0
        self.rx_filtered = 0
        self.rx_num_buffers_max = 0
        self.rx_notifies = 0
        self.rx_irqs = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.tx_errors = 0
        self.tx_notifies = 0
        self.tx_irqs = 0
        self.desc_errors = 0


@final
class CtrlStats(Stats):
    NAMES: ClassVar[tuple[str, ...]] = CTRL_STATS

    def __init__(self) -> None:
        self.ctrl_commands = 0
        self.ctrl_errors = 0
        self.ctrl_desc_errors = 0
        self.ctrl_notifies = 0


def _check_names(cls: type[Stats]) -> None:
    # The declared attributes and the reported names must be the same set:
    # a counter missing from NAMES is never reported, one missing from the
    # class raises at its first report.
    obj = cls()
    missing = [name for name in cls.NAMES if not hasattr(obj, name)]
    if missing:
        raise ImportError(f"{cls.__name__} declares no counter {', '.join(missing)}")
    # Interpreted, the instance dict shows any counter NAMES leaves out.
    extra = sorted(set(getattr(obj, "__dict__", ())) - set(cls.NAMES))
    if extra:
        raise ImportError(f"{cls.__name__}: {', '.join(extra)} not in its NAMES")


for _cls in (DriverStats, DeviceStats, CtrlStats):
    _check_names(_cls)


def driver_stats() -> DriverStats:
    return DriverStats()


def device_stats() -> DeviceStats:
    return DeviceStats()


def ctrl_stats() -> CtrlStats:
    return CtrlStats()
