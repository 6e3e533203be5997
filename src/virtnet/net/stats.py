"""Counters, named once. Driver names follow Linux's netdev stats plus the
allocation counters the seed argues about; device names follow vhost-net's
and ``ethtool -S`` habits. Everything that reports stats (JSON, tables, live
counters) iterates these tuples, so a name is never spelled twice.
"""

from __future__ import annotations

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
    """A bag of integer counters with a fixed set of names."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = names
        for name in names:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self._names}

    def __repr__(self) -> str:
        return "Stats(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items() if v) + ")"


def driver_stats() -> Stats:
    return Stats(DRIVER_STATS)


def device_stats() -> Stats:
    return Stats(DEVICE_STATS)


def ctrl_stats() -> Stats:
    return Stats(CTRL_STATS)
