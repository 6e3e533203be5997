"""Receive: the per-queue state (``RxQueue``) and the strategies that fill it.

Where to read what (the seed first):

- ``deferred.py`` — the seed, RFC "defer skb allocation in virtio_net": the page
  lists, ``get_a_free_page``, ``try_fill_recv``'s loop and ``receive_mergeable``
  (its ``receive_skb``), the one mergeable receive path the others plug into;
- ``prealloc.py`` — the code the seed replaced; ``ewma.py`` — what came after it;
  ``nonmergeable.py`` — ``small`` and ``big``, without MRG_RXBUF;
- ``base.py`` — what every strategy shares: the hooks and the error paths;
- ``queue.py`` — ``RxQueue``, Linux's ``struct receive_queue``;
- ``xdp.py`` — where an XDP program sees a frame (the hook is net/xdp.py).
"""

from __future__ import annotations

from virtnet.net.rx.base import RxStrategy
from virtnet.net.rx.deferred import DeferredRx, PageListRx, PageRx, receive_mergeable
from virtnet.net.rx.ewma import (
    EWMA_SHIFT,
    AllocFrag,
    EwmaPktLen,
    EwmaRx,
    MrgBuf,
    mergeable_min_buf_len,
)
from virtnet.net.rx.nonmergeable import BIG_PAGES, BigRx, SmallRx
from virtnet.net.rx.prealloc import PreallocRx
from virtnet.net.rx.queue import RxQueue, Segment, Used
from virtnet.net.rx.xdp import receive_buf_xdp

__all__ = [
    "BIG_PAGES", "EWMA_SHIFT", "STRATEGIES", "AllocFrag", "BigRx", "DeferredRx",
    "EwmaPktLen", "EwmaRx", "MrgBuf", "PageListRx", "PageRx", "PreallocRx", "RxQueue",
    "RxStrategy", "Segment", "SmallRx", "Used", "mergeable_min_buf_len", "receive_buf_xdp",
    "receive_mergeable",
]  # fmt: skip

# By name, as --strategy spells them (each class's ``name``).
STRATEGIES: dict[str, type[RxStrategy]] = {
    "deferred": DeferredRx,
    "prealloc": PreallocRx,
    "ewma": EwmaRx,
    "big": BigRx,
    "small": SmallRx,
}
