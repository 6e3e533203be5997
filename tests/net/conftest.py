"""A driver and a device over real rings in one bytearray guest memory, and a device that lies.

``make_pair`` builds what a guest and a host would build (``guest.build_driver`` /
``guest.build_device`` over one ``GuestLayout``), for any strategy and feature set;
``Pair`` plays the host's side of a packet (``send``), NAPI (``napi``) and teardown
(``teardown``), and records every delivered skb as (virtio-net header, frame bytes).

``LyingDevice`` is the device a test scripts by hand: it pops the driver's rx chains
through the device-side ring API, writes whatever header bytes it likes (any
``num_buffers``) and publishes whatever used entries it likes (any id, any length) —
the buggy or hostile host of the issue's "scripted device that lies".
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from virtnet.net.constants import MAX_SKB_FRAGS, PAGE_SIZE
from virtnet.net.device import VirtnetDevice, scatter
from virtnet.net.driver import VirtnetDriver
from virtnet.net.features import GUEST_OFFLOADS, SUPPORTED, VirtioNetF
from virtnet.net.guest import RX, TX, GuestLayout, build_device, build_driver
from virtnet.net.header import MRG_HDR_LEN, VirtioNetHdr
from virtnet.net.skb import SkBuff
from virtnet.virtio.features import VirtioF, bit
from virtnet.virtio.memory import GuestMemory
from virtnet.virtio.ring.split import Chain

# -- feature sets: one per path virtnet_probe can pick ---------------------------------------

MRG = SUPPORTED
NO_INDIRECT = ~bit(VirtioF.RING_INDIRECT_DESC)
NO_EVENT_IDX = ~bit(VirtioF.RING_EVENT_IDX)
NO_MRG = ~bit(VirtioNetF.MRG_RXBUF)
# virtnet_probe: no MRG_RXBUF but GUEST_TSO → big buffers; neither → small ones.
BIG = SUPPORTED & NO_MRG
SMALL = SUPPORTED & NO_MRG & ~GUEST_OFFLOADS

FEATURE_SETS: dict[str, int] = {
    "mrg": MRG,
    "mrg-noindirect": MRG & NO_INDIRECT,
    "mrg-noeventidx": MRG & NO_EVENT_IDX,
    "big": BIG,
    "big-noindirect": BIG & NO_INDIRECT,
    "small": SMALL,
}

# (strategy, features): every strategy once, with the features that select it.
STRATEGY_FEATURES: dict[str, int] = {
    "deferred": MRG,
    "prealloc": MRG,
    "ewma": MRG,
    "big": BIG,
    "small": SMALL,
}
# Every (strategy, feature set) the driver can run as, for the teardown sweep.
ALL_CONFIGS: list[tuple[str, str]] = [
    ("deferred", "mrg"),
    ("deferred", "mrg-noindirect"),
    ("deferred", "mrg-noeventidx"),
    ("prealloc", "mrg"),
    ("prealloc", "mrg-noindirect"),
    ("prealloc", "mrg-noeventidx"),
    ("ewma", "mrg"),
    ("ewma", "mrg-noindirect"),
    ("ewma", "mrg-noeventidx"),
    ("big", "big"),
    ("big", "big-noindirect"),
    ("small", "small"),
]

ZERO_HDR = bytes(MRG_HDR_LEN)
USED_ELEM = struct.Struct("<II")
LE16 = struct.Struct("<H")


def frame(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic pseudo-random bytes: an Ethernet frame's worth of anything."""
    return random.Random(seed * 1_000_003 + n).randbytes(n)


def hdr(num_buffers: int = 0, **fields) -> bytes:
    """Raw virtio_net_hdr_mrg_rxbuf bytes, any field any value."""
    return VirtioNetHdr(num_buffers=num_buffers, **fields).pack()


def frame_buf_limit(p: Pair) -> int:
    """How many full buffers a packet may span before the driver drops it as "too
    long": MAX_SKB_FRAGS frags for the seed's strategies; ewma bounds buffers (its
    frags coalesce) at what the largest legal frame needs in its smallest buffers."""
    return p.drv.rx.max_bufs if p.strategy == "ewma" else MAX_SKB_FRAGS


def pages_for_frame(n: int) -> int:
    """num_buffers a mergeable device needs for an ``n``-byte frame in 4 KiB buffers."""
    return -(-(MRG_HDR_LEN + n) // PAGE_SIZE)


@dataclass
class Pair:
    """A driver (guest) and a device (host) sharing one guest memory."""

    memory: GuestMemory
    layout: GuestLayout
    features: int
    drv: VirtnetDriver
    dev: VirtnetDevice
    delivered: list[tuple[bytes, bytes]] = field(default_factory=list)
    held: list[SkBuff] = field(default_factory=list)
    hold: bool = False  # keep delivered skbs (the stack still owns their pages)

    # -- the stack above the driver ----------------------------------------------------

    def netif_receive_skb(self, skb: SkBuff) -> None:
        self.delivered.append((skb.vnet_hdr, skb.to_bytes()))
        if self.hold:
            self.held.append(skb)
        else:
            skb.free()

    def release_held(self) -> None:
        """The stack is done with the skbs it kept: put_page on every frag."""
        for skb in self.held:
            skb.free()
        self.held.clear()

    @property
    def frames(self) -> list[bytes]:
        return [data for _, data in self.delivered]

    # -- the host's side -----------------------------------------------------------------

    def send(self, data: bytes, vnet_hdr: bytes = ZERO_HDR) -> bool:
        """The device delivers one frame and publishes it (no poll)."""
        ok = self.dev.receive_packet([data], vnet_hdr)
        self.dev.flush_rx()
        return ok

    def napi(self, budget: int = 64) -> int:
        """Poll until a poll returns under budget (NAPI's loop); packets received."""
        total = 0
        while True:
            received, kick = self.drv.poll(budget)
            total += received
            if received < budget and not kick:
                return total

    def teardown(self) -> None:
        """virtnet_remove after the device reset; the stack gives back what it held."""
        self.dev.reset()
        self.drv.remove()
        self.release_held()

    # -- reading the rings as the spec lays them out --------------------------------------

    def used_entries(self, q: int = RX, start: int = 0, stop: int | None = None):
        """(id, len) of used ring ``q`` from index ``start`` up to ``stop`` (default: idx)."""
        addrs = self.layout.rings[q]
        if stop is None:
            stop = LE16.unpack(self.memory.read(addrs.used + 2, 2))[0]
        out = []
        for k in range((stop - start) & 0xFFFF):
            slot = (start + k) % addrs.num
            out.append(USED_ELEM.unpack(self.memory.read(addrs.used + 4 + 8 * slot, 8)))
        return out

    @property
    def strategy(self) -> str:
        return self.drv.strategy


def make_pair(
    strategy: str = "deferred",
    features: int = MRG,
    *,
    queue_size: int = 64,
    npages: int | None = None,
    page_limit: int | None = None,
    fill: bool = True,
    hold: bool = False,
    packed: bool = False,
) -> Pair:
    """A driver+device pair over one bytearray; ``fill`` posts the rx ring (probe does);
    ``packed``: RING_PACKED negotiated, packed rings."""
    layout = GuestLayout(queue_size, npages or GuestLayout.pages_for(queue_size), packed=packed)
    memory = GuestMemory.from_buffer(bytearray(layout.size))
    if packed:
        features |= bit(VirtioF.RING_PACKED)
    pair_box: list[Pair] = []
    drv = build_driver(
        memory, layout, features, strategy, page_limit=page_limit,
        netif_receive_skb=lambda skb: pair_box[0].netif_receive_skb(skb),
    )  # fmt: skip
    dev = build_device(memory, layout.ring_views(memory), features)
    pair = Pair(memory, layout, features, drv, dev, hold=hold)
    pair_box.append(pair)
    if fill:
        drv.try_fill_recv()
    return pair


@pytest.fixture
def pair_factory() -> Iterator[Callable[..., Pair]]:
    """``make_pair`` whose pairs are torn down (and checked for lost pages) after the test."""
    made: list[Pair] = []

    def factory(*args, **kwargs) -> Pair:
        p = make_pair(*args, **kwargs)
        made.append(p)
        return p

    yield factory
    for p in made:
        p.teardown()
        assert p.drv.pool.outstanding == 0, f"{p.strategy}: pages lost after teardown"


MERGEABLE_STRATEGIES = ["deferred", "prealloc", "ewma"]


@pytest.fixture(params=MERGEABLE_STRATEGIES)
def mergeable(request, pair_factory) -> Pair:
    """A filled pair for each mergeable strategy (the seed, the code it replaced, and
    what came after it)."""
    return pair_factory(request.param, MRG)


@pytest.fixture
def deferred(pair_factory) -> Pair:
    return pair_factory("deferred", MRG)


@pytest.fixture
def prealloc(pair_factory) -> Pair:
    return pair_factory("prealloc", MRG)


# -- a device that lies ------------------------------------------------------------------------


class LyingDevice:
    """Writes rx buffers and used entries by hand, on the device side of the pair's rx ring.

    It shares the pair device's ``SplitQueueDevice`` so the used index stays
    consistent with what the honest device publishes; it takes the chains the
    honest device popped in a burst and cached first, then pops more, so it
    uses the driver's buffers in the order the driver posted them.
    """

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.q = pair.dev.rxq

    def pop(self) -> Chain:
        dev = self.pair.dev
        if dev._rx_cache:
            chain = dev._rx_cache.popleft()
            dev._rx_cached -= chain.in_len
            return chain
        chain = self.q.pop()
        assert chain is not None, "the driver has no rx buffer posted"
        return chain

    def pending(self) -> int:
        return len(self.pair.dev._rx_cache) + self.q.avail_pending()

    def sizes(self, n: int) -> list[int]:
        """The writable lengths of the next ``n`` chains, left on the ring: a frame
        that fills them exactly, whatever the strategy sizes its buffers at."""
        cached = list(self.pair.dev._rx_cache)[:n]
        sizes = [c.in_len for c in cached]
        more = n - len(cached)
        for _ in range(more):
            chain = self.q.pop()
            assert chain is not None, "the driver has no rx buffer posted"
            sizes.append(chain.in_len)
        self.q.unpop(more)
        return sizes

    def room(self, n: int) -> int:
        return sum(self.sizes(n))

    @staticmethod
    def write(chain: Chain, data: bytes, offset: int = 0) -> None:
        """Raw bytes into the chain's writable space at ``offset``."""
        views = []
        skip = offset
        for v in chain.writable:
            if skip >= len(v):
                skip -= len(v)
                continue
            views.append(v[skip:])
            skip = 0
        assert scatter([data], views) == len(data), "data larger than the chain"

    def used(self, head: int, length: int) -> None:
        """One used entry: any id, any length."""
        self.q.push_used(head, length)

    def flush(self) -> None:
        self.q.flush_used()

    def buffer(self, data: bytes, length: int | None = None) -> Chain:
        """Pop a chain, fill it with ``data``, use it with ``length`` (default len(data))."""
        chain = self.pop()
        self.write(chain, data)
        self.used(chain.head, len(data) if length is None else length)
        return chain

    def packet(
        self,
        data: bytes,
        *,
        num_buffers: int | None = None,
        nchains: int | None = None,
        vnet_hdr: bytes | None = None,
        lengths: list[int] | None = None,
        flush: bool = True,
    ) -> list[Chain]:
        """Header + ``data`` spread over ``nchains`` chains (default: as many as it takes),
        with ``num_buffers`` written in the header (default: the truth) and ``lengths``
        as the used lengths (default: the bytes each chain got)."""
        total = MRG_HDR_LEN + len(data)
        if nchains is None:  # as many chains as it takes, whatever their sizes
            chains = [self.pop()]
            while sum(c.in_len for c in chains) < total:
                chains.append(self.pop())
            nchains = len(chains)
        else:
            chains = [self.pop() for _ in range(nchains)]
        base = VirtioNetHdr.unpack(vnet_hdr) if vnet_hdr is not None else VirtioNetHdr()
        base.num_buffers = nchains if num_buffers is None else num_buffers
        payload = base.pack() + data
        views = [v for c in chains for v in c.writable]
        assert scatter([payload], views) == total, "data larger than the chains"
        left = total
        for k, chain in enumerate(chains):
            n = min(left, chain.in_len)
            left -= n
            self.used(chain.head, n if lengths is None else lengths[k])
        if flush:
            self.flush()
        return chains


__all__ = [
    "ALL_CONFIGS",
    "BIG",
    "FEATURE_SETS",
    "LyingDevice",
    "MERGEABLE_STRATEGIES",
    "MRG",
    "NO_EVENT_IDX",
    "NO_INDIRECT",
    "NO_MRG",
    "Pair",
    "RX",
    "SMALL",
    "STRATEGY_FEATURES",
    "TX",
    "ZERO_HDR",
    "frame",
    "frame_buf_limit",
    "hdr",
    "make_pair",
    "pages_for_frame",
]
