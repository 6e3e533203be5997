"""One ring interface: what ``net/`` and the pair loops call on a virtqueue, either layout.

``QueueDriver`` and ``QueueDevice`` are the contract (Linux's virtqueue API on the driver
side, vhost's vring calls on the device side); ``split`` and ``packed`` implement both,
and mypy checks it below. Callers are typed with ``RingDriver`` / ``RingDevice``, the
union of the two classes, rather than with the protocols: mypyc calls a method of a union
of native classes natively (a type check per class, then a direct call), a method of a
protocol generically, by name — and these calls are on the per-packet path.

What is not here is one layout's own: the split ring's 16-bit indices (``last_used_idx``,
``used_idx``), the packed ring's positions and wrap counters (``last_used``, ``used_wrap``,
``used_pos``), a device's raw ``push_used_unchecked`` for ``--faults``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from virtnet.virtio.ring.chain import Chain, IndirectArea, Segment
from virtnet.virtio.ring.layout import PackedViews, VringViews
from virtnet.virtio.ring.packed import PackedQueueDevice, PackedQueueDriver
from virtnet.virtio.ring.split import SplitQueueDevice, SplitQueueDriver

RingDriver = SplitQueueDriver | PackedQueueDriver
RingDevice = SplitQueueDevice | PackedQueueDevice


def vring_create_virtqueue(
    ring: VringViews | PackedViews,
    *,
    event_idx: bool = False,
    indirect: IndirectArea | None = None,
    index: int = 0,
) -> RingDriver:
    """The driver's half of the virtqueue at ``ring``, of the ring's own layout (Linux's
    vring_create_virtqueue picks packed or split the same way, by the feature)."""
    if isinstance(ring, PackedViews):
        return PackedQueueDriver(ring, event_idx, indirect, index)
    return SplitQueueDriver(ring, event_idx, indirect, index)


class QueueDriver(Protocol):
    """The driver's half of a virtqueue (Linux: struct virtqueue and virtqueue_*)."""

    num: int
    index: int
    num_free: int
    broken: bool

    # adding buffers (virtqueue_add_inbuf / _outbuf / virtqueue_add_sgs)
    def add_inbuf(self, addr: int, length: int, token: object) -> int: ...
    def add_outbuf(self, addr: int, length: int, token: object) -> int: ...
    def add_inbufs(self, bufs: list[tuple[int, int, object]]) -> int: ...
    def add(self, out: Sequence[Segment], in_: Sequence[Segment], token: object) -> int: ...

    # notifying the device (virtqueue_kick_prepare)
    def kick_prepare(self) -> bool: ...

    # getting used buffers (virtqueue_get_buf, virtqueue_detach_unused_buf)
    def more_used(self) -> bool: ...
    def get_buf(self) -> tuple[object, int] | None: ...
    def get_bufs(self, budget: int) -> list[tuple[object, int]]: ...
    def detach_unused_buf(self) -> object | None: ...

    # used-buffer notifications (virtqueue_disable_cb, _enable_cb_prepare, _poll, _enable_cb)
    def disable_cb(self) -> None: ...
    def enable_cb_prepare(self) -> int: ...
    def poll(self, last_used_idx: int) -> bool: ...
    def enable_cb(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...


class QueueDevice(Protocol):
    """The device's half of a virtqueue (vhost: vhost_get_vq_desc, vhost_add_used_n, ...)."""

    num: int
    index: int

    # available chains (vhost_get_vq_desc, vhost_discard_vq_desc)
    def avail_pending(self) -> int: ...
    def pop(self) -> Chain | None: ...
    def pop_burst(self, budget: int) -> list[Chain]: ...
    def unpop(self, n: int = 1) -> None: ...
    def vring_base(self, unpopped: int = 0) -> int: ...

    # returning chains (vhost_add_used, vhost_add_used_n) and telling the driver
    def push_used(self, head: int, length: int) -> None: ...
    def push_used_burst(self, used: Sequence[tuple[int, int]]) -> None: ...
    def has_unflushed(self) -> bool: ...
    def flush_used(self) -> None: ...
    def needs_notify(self) -> bool: ...

    # driver notifications (vhost_disable_notify, vhost_enable_notify)
    def disable_notify(self) -> None: ...
    def enable_notify(self) -> bool: ...


class UsedPublisher(Protocol):
    """The part of ``QueueDevice`` that publishes (a ring, or ``--faults``' layer on one)."""

    def has_unflushed(self) -> bool: ...
    def flush_used(self) -> None: ...
    def needs_notify(self) -> bool: ...


def publish_used(vq: UsedPublisher) -> bool:
    """Make the used entries pushed since the last call visible; whether the driver
    wants an interrupt for them (vhost_add_used_and_signal_n's test). False, and no
    store, when nothing was pushed."""
    if not vq.has_unflushed():
        return False
    vq.flush_used()
    return vq.needs_notify()


if TYPE_CHECKING:  # mypy checks that both layouts implement the whole interface

    def _split_driver(q: SplitQueueDriver) -> QueueDriver:
        return q

    def _packed_driver(q: PackedQueueDriver) -> QueueDriver:
        return q

    def _split_device(q: SplitQueueDevice) -> QueueDevice:
        return q

    def _packed_device(q: PackedQueueDevice) -> QueueDevice:
        return q
