"""The XDP hook's place in the receive path (net/xdp.py holds the hook itself).

virtio_net.c runs ``virtnet_xdp_handler`` from ``receive_small`` /
``receive_mergeable`` before any skb exists. Here ``receive_buf_xdp`` does it for
every strategy: the whole frame's buffers are taken off the ring, the program
runs on them, and only PASS goes on to build an skb (the strategy's own
``receive_buf``, fed the collected buffers). Malformed frames take the strategy's
own error paths.
"""

from __future__ import annotations

from virtnet.net.constants import ETH_HLEN
from virtnet.net.rx.base import RxStrategy
from virtnet.net.rx.queue import Segment, Used
from virtnet.net.xdp import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, XdpFrame, XdpHook, views_of


def receive_buf_xdp(rx: RxStrategy, buf: object, length: int) -> None:
    """One frame through the program loaded on ``rx`` (virtnet_poll calls this
    instead of ``rx.receive_buf`` while one is)."""
    hook = rx.xdp
    if hook is None:  # unloaded since the poll began
        rx.receive_buf(buf, length)
        return
    hdr_len = rx.hdr_len
    num_buf = rx._num_buffers(buf) if rx.mergeable and length >= hdr_len else 1
    if length < hdr_len + ETH_HLEN or num_buf == 0 or num_buf > rx._bufs_out():
        # Short, or num_buffers a lie (_bad_num_buffers): checked before any further
        # buffer is taken off the ring, and dropped, counted and named by the
        # strategy's own path, exactly as without a program.
        rx.receive_buf(buf, length)
        return
    bufs: list[Used] = [(buf, length)]
    bufs.extend(rx._more_bufs(num_buf))
    if len(bufs) < num_buf:  # "buffers missing": counted by _more_bufs
        rx.stats.rx_dropped += 1
        xdp_release(rx, bufs)
        return
    segments = rx.xdp_segments(buf, length, True)
    for b, n in bufs[1:]:
        segments += rx.xdp_segments(b, n, False)
    act = hook.run(views_of(segments))
    if act == XDP_PASS:
        rx._pending = iter(bufs[1:])
        try:
            rx.receive_buf(buf, length)
        finally:
            rx._pending = None
    elif act == XDP_TX:
        _xdp_tx(rx, hook, bufs, segments)
    elif act == XDP_REDIRECT:
        _xdp_redirect(rx, hook, bufs, segments)
    else:
        if act == XDP_DROP:
            rx.stats.rx_xdp_drops += 1
        else:
            rx.stats.rx_xdp_aborted += 1
        xdp_release(rx, bufs)


def xdp_release(rx: RxStrategy, bufs: list[Used]) -> None:
    """The frame consumed without an skb: its buffers straight back to the lists."""
    for b, _ in bufs:
        rx.free_unused_buf(b)


def _xdp_tx(rx: RxStrategy, hook: XdpHook, bufs: list[Used], segments: list[Segment]) -> None:
    frame = XdpFrame(rx.hdr_len, segments, lambda: xdp_release(rx, bufs))
    if hook.tx_enabled and rx.rq.xdp_xmit(frame):
        rx.stats.rx_xdp_tx += 1
    else:  # tx ring full (or stopped): virtnet_xdp_xmit fails, the frame is dropped
        rx.stats.rx_xdp_drops += 1
        frame.free()


def _xdp_redirect(
    rx: RxStrategy, hook: XdpHook, bufs: list[Used], segments: list[Segment]
) -> None:
    views = views_of(segments)
    try:
        if hook.redirect is None:
            hook.error("XDP_REDIRECT without a redirect target, frame dropped")
            ok = False
        else:
            ok = bool(hook.redirect(views))
    except Exception as e:  # noqa: BLE001 — a failing port drops its frame only
        hook.error(f"XDP_REDIRECT target raised {type(e).__name__}: {e}; frame dropped")
        ok = False
    for v in views:
        try:
            v.release()
        except BufferError:
            hook.error("XDP_REDIRECT target kept an export of the frame's buffer")
    if ok:
        rx.stats.rx_xdp_redirects += 1
    else:
        rx.stats.rx_xdp_drops += 1
    xdp_release(rx, bufs)
