"""What every rx strategy shares: posting, the error paths, the hooks of the skeleton.

A strategy posts buffers through ``add_recvbufs`` and turns one used buffer into a
packet in ``receive_buf``. The mergeable ones (deferred, ewma, prealloc) do it with
``deferred.receive_mergeable``, the seed's ``receive_skb``, filling in the hooks
below (where a buffer's bytes are, which skb the packet is built in, what becomes
of the buffer); the non-mergeable ones (small, big) write their own.

Every error path converges on ``free_unused_buf``, which gives a buffer back with
its page, like virtio_net.c's err_buf: a short packet, a ``num_buffers`` lie
(5.1.6.4), missing buffers, a used entry the ring refused, a packet too long.

A ring hands its tokens back as ``object``: each strategy knows what it posted
and names it once per buffer, with a ``cast``, in a typed local. An entry on the
ring always has its page (``assert page is not None``): the page leaves the
entry only with the packet that filled it.
"""

from __future__ import annotations

from collections.abc import Iterator
from operator import length_hint
from typing import ClassVar, Final

from virtnet.net.constants import ETH_HLEN, MAX_SKB_FRAGS
from virtnet.net.rx.queue import EwmaPktLen, RxQueue, Segment, Used
from virtnet.net.skb import Page, PagePool, SkbAllocator, SkBuff
from virtnet.net.stats import DriverStats
from virtnet.net.xdp import XdpHook
from virtnet.virtio.errors import UsedIndexError, UsedRingError

__all__ = ["NO_BUF_LIMIT", "HeadBuf", "RxStrategy", "Segment", "Used"]

# head_skb's answer: the skb a packet is built in (None: out of memory), and where
# its first buffer's bytes are, as buf_frag says (page, offset, truesize).
HeadBuf = tuple[SkBuff | None, Page, int, int]

# No bound on a packet's buffers but num_buffers' own, a le16 (for a strategy
# bounded by skb frags instead).
NO_BUF_LIMIT: Final = 0xFFFF


class RxStrategy:
    """The per-strategy half of the receive path, over one ``RxQueue``."""

    name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True

    def __init__(self, rq: RxQueue) -> None:
        self.rq = rq
        self.stats: DriverStats = rq.stats
        self.pool: PagePool = rq.pool
        self.skbs: SkbAllocator = rq.skbs
        self.hdr_len: int = rq.hdr_len
        self.xdp: XdpHook | None = None
        # receive_mergeable's bounds on one packet: skb frags (MAX_SKB_FRAGS, past
        # which Linux chains a frag list) and buffers (ewma bounds those instead).
        self.max_frags = MAX_SKB_FRAGS
        self.max_bufs = NO_BUF_LIMIT
        # rq->mrg_avg_pkt_len when the strategy reads it (ewma), fed by receive_mergeable.
        self.avg_pkt_len: EwmaPktLen | None = None
        # A frame's further buffers already taken off the ring (the XDP path
        # collects them before the program runs); _more_bufs yields these first.
        self._pending: Iterator[Used] | None = None

    def descs_per_buf(self) -> int:
        return 1

    def add_recvbuf(self) -> bool:
        """Post one receive buffer; False when memory ran out (try_fill_recv stops)."""
        return self.add_recvbufs(1) == 1

    def add_recvbufs(self, n: int) -> int:
        """Post up to ``n`` receive buffers; how many (a refill burst)."""
        raise NotImplementedError

    def receive_buf(self, buf: object, length: int) -> None:
        """Turn the used buffer ``buf`` (and, mergeable, its followers) into a packet."""
        raise NotImplementedError

    def free_unused_buf(self, buf: object) -> None:
        """Give back a buffer that carried no packet, page and all (errors, teardown)."""
        raise NotImplementedError

    def remove(self) -> None:
        """Free whatever the strategy caches (after every buffer came back)."""

    # -- the hooks of receive_mergeable (deferred.py) -----------------------------------------

    def buf_frag(self, buf: object) -> Segment:
        """Where a posted buffer's bytes are: (page, offset, truesize)."""
        raise NotImplementedError

    def head_skb(self, buf: object) -> HeadBuf:
        """The skb the packet starting in ``buf`` is built in (None: out of memory),
        and ``buf_frag(buf)``: one call for the first buffer."""
        raise NotImplementedError

    def put_head(self, buf: object, page: Page, in_skb: bool) -> None:
        """The first buffer read: ``in_skb``, its page is now an skb frag; else the
        packet was copied whole and the page stays free for the next one."""
        raise NotImplementedError

    def consume(self, buf: object) -> None:
        """A further buffer whose page is now an skb frag: its entry given back."""
        raise NotImplementedError

    def _num_buffers(self, buf: object) -> int:
        return 1

    def xdp_segments(self, buf: object, length: int, first: bool) -> list[Segment]:
        """(page, offset, size) of the frame bytes ``buf`` holds (after the header)."""
        raise NotImplementedError

    def attach_xdp(self, hook: XdpHook | None) -> None:
        """Load (or, with None, unload) a program: every frame then goes through it
        (virtnet_poll calls rx.xdp.receive_buf_xdp instead of receive_buf while one is)."""
        self.xdp = hook

    # -- the shared error paths -------------------------------------------------------------

    def _short(self, length: int) -> bool:
        if length < self.hdr_len + ETH_HLEN:
            # virtio_net.c receive_buf(): "short packet"
            self.stats.rx_length_errors += 1
            self._name_short(length)
            return True
        return False

    def _name_short(self, length: int) -> None:
        rq = self.rq
        rq.faults.report("short", f"vq {rq.vq.index}: short packet {length}")

    def _bad_num_buffers(self, num_buf: int) -> bool:
        """5.1.6.4: 1 <= num_buffers, and never more buffers than the driver has out
        (this one, the rest of the burst taken, and those still posted): either lie
        is named and the packet dropped."""
        rq = self.rq
        if num_buf == 0:
            self.stats.rx_length_errors += 1
            rq.faults.report("num_buffers_small", f"vq {rq.vq.index}: num_buffers 0")
            return True
        out = self._bufs_out()
        if num_buf > out:
            self.stats.rx_length_errors += 1
            rq.faults.report("num_buffers_big", f"vq {rq.vq.index}: num_buffers {num_buf} "
                             f"> {out} buffers posted")  # fmt: skip
            return True
        return False

    def _bufs_out(self) -> int:
        """The most buffers a packet may name: this one, the rest of the burst taken,
        those still posted (and, on the XDP path, its buffers collected already)."""
        rq = self.rq
        out = rq.num + length_hint(rq.burst) + 1
        if self._pending is not None:
            out += length_hint(self._pending)
        return out

    def _too_long(self, num_buf: int, limit: int = MAX_SKB_FRAGS) -> None:
        # More buffers than a 64 KiB packet can fill: num_buffers was a lie.
        rq = self.rq
        rq.faults.report("num_buffers_big", f"vq {rq.vq.index}: packet too long: "
                         f"num_buffers {num_buf} > {limit} frags")  # fmt: skip

    def _copy_head(self, skb: SkBuff, view: memoryview, offset: int, length: int) -> int:
        """Copy up to the skb's tailroom (GOOD_COPY_LEN) of the packet into its head."""
        copy = min(length, skb.tailroom)
        skb.put(view[offset : offset + copy])
        return copy

    def _more_bufs(self, num_buf: int) -> Iterator[Used]:
        """Yield (buf, len) for the packet's remaining ``num_buf - 1`` buffers.

        Stops early (rx_length_errors) when the device returned fewer
        buffers than its header promised: "rx error: %d buffers missing".
        A used entry the ring refuses is consumed, counted, its buffer (if
        known) recycled, and not yielded — the caller sees fewer buffers
        than ``num_buf`` and drops the packet.
        """
        rq = self.rq
        stats = self.stats
        pending = self._pending
        if pending is not None:  # XDP_PASS: the buffers were collected already
            for _ in range(num_buf - 1):
                got = next(pending, None)
                if got is None:
                    return
                yield got
            return
        for k in range(num_buf - 1):
            try:
                got = rq.next_used()
            except UsedIndexError as jump:  # (each handler its own name: see driver.poll)
                rq.ring_broken(jump)  # the packet so far is dropped by the caller
                return
            except UsedRingError as e:
                self.bad_used(e)
                if rq.vq.broken:
                    return
                continue
            if got is None:
                stats.rx_length_errors += 1
                # virtio_net.c: "rx error: %d buffers out of %d missing"
                rq.faults.report("num_buffers_big", f"vq {rq.vq.index}: rx error: "
                                 f"{num_buf - 1 - k} buffers out of {num_buf} missing")  # fmt: skip
                return
            yield got

    def _drain(self, num_buf: int) -> None:
        """Give back the rest of a dropped packet's buffers (their pages with them)."""
        for buf, _ in self._more_bufs(num_buf):
            self.free_unused_buf(buf)

    def _drop(self, skb: SkBuff) -> None:
        self.stats.rx_dropped += 1
        skb.free()

    def bad_used(self, e: UsedRingError) -> object:
        """Count a used entry the ring refused; recycle its buffer if it names one."""
        self.stats.rx_length_errors += 1
        token = self.rq.refused(e)
        if token is not None:
            self.free_unused_buf(token)
        return token

    def bad_first_buf(self, e: UsedRingError) -> None:
        """A packet's first buffer came back with a bad length: drop the whole packet.

        Mergeable strategies also drain the ``num_buffers - 1`` buffers that
        belong to it, or they would be read as packets (virtio_net.c:
        receive_mergeable → err_skb → mergeable_buf_free).
        """
        token = e.token
        num_buf = self._num_buffers(token) if token is not None and self.mergeable else 1
        self.bad_used(e)
        self._drain(num_buf)
