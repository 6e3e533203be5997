"""An XDP-style hook: a program that sees a received frame before any skb exists.

Linux runs an eBPF program on the raw rx buffer (virtio_net.c: ``virtnet_xdp_handler``
from ``receive_small`` / ``receive_mergeable``); here the program is a Python callable

    prog(data: memoryview, frags: tuple[memoryview, ...]) -> int

``data`` is the frame's bytes in its first buffer (after the virtio-net header),
``frags`` the rest of a multi-buffer frame, one view per further buffer (Linux's
xdp_buff frags), both straight into guest memory — the program may rewrite the
frame in place (e.g. swap MAC addresses before ``XDP_TX``). It returns an
``XdpAction``: PASS (build the skb as usual), DROP (the buffers go straight back
to the page lists: no skb, no page allocation), TX (send the frame back on the tx
queue, zero-copy), REDIRECT (hand it to the port the owner set) or ABORTED.

Bad programs are contained per frame, like Linux's ``bpf_warn_invalid_xdp_action``
and ``trace_xdp_exception``: a program that raises, returns something that is not
a verdict, or keeps a reference to a buffer view after returning (it would alias
guest memory that is about to be reused) gets a rate-limited error in the log and
that frame is ABORTED; the views are released after every run, so a kept view is
dead. Counters (``net/stats.py``) use virtio_net's ethtool names.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import sys
import time
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from types import ModuleType
from typing import final

from virtnet.net.skb import Page
from virtnet.net.stats import DriverStats

log = logging.getLogger("virtnet.xdp")


class XdpAction(IntEnum):
    """include/uapi/linux/bpf.h: enum xdp_action (same values)."""

    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = XdpAction

XdpProgram = Callable[[memoryview, tuple[memoryview, ...]], int]
# A redirect target: takes the frame's views (valid only during the call) and
# returns True when it took the frame (copied or wrote it), False to drop it.
XdpRedirect = Callable[[list[memoryview]], bool]


@final
class XdpLoadError(Exception):
    """``--xdp MODULE:FUNCTION`` could not be loaded; the message says why."""


@final
class RateLimit:
    """net_ratelimit(): at most ``burst`` messages per ``interval`` seconds."""

    def __init__(self, burst: int = 10, interval: float = 5.0) -> None:
        self.burst = burst
        self.interval = interval
        self._start = 0.0
        self._n = 0
        self.suppressed = 0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._start >= self.interval:
            if self.suppressed:
                log.warning("xdp: %d messages suppressed", self.suppressed)
            self._start, self._n, self.suppressed = now, 0, 0
        if self._n < self.burst:
            self._n += 1
            return True
        self.suppressed += 1
        return False


@final
class XdpHook:
    """A loaded program, its redirect target and the counters (netdev's xdp_prog)."""

    def __init__(
        self,
        prog: XdpProgram,
        stats: DriverStats,
        *,
        redirect: XdpRedirect | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(prog):
            raise TypeError(f"an XDP program must be callable, not {type(prog).__name__}")
        self.prog = prog
        self.stats = stats
        self.redirect = redirect
        self.name = name if name else str(getattr(prog, "__qualname__", repr(prog)))
        self.ratelimit = RateLimit()
        # False once the tx ring is stopped (teardown): XDP_TX frames are then drops.
        self.tx_enabled = True

    def error(self, what: str) -> None:
        if self.ratelimit():
            log.error("xdp program %s: %s", self.name, what)

    def run(self, views: list[memoryview]) -> XdpAction:
        """Run the program on a frame's views (first buffer, then frags); release them.

        A reference the program kept shows as a view whose reference count grew,
        a new view on the same memory (a slice or cast: its managed buffer's count
        grew), or an export that stops ``release()`` (e.g. numpy.frombuffer).
        """
        self.stats.rx_xdp_packets += 1
        before = _refcounts(views)
        frags = tuple(views[1:])
        # What the program returned: anything, until XdpAction() says it is a verdict.
        ret: object = None
        problem: str | None = None
        # Called as returning object: compiled, a call typed to return int checks the
        # result first (a TypeError), and a non-verdict is told apart below instead.
        prog: Callable[[memoryview, tuple[memoryview, ...]], object] = self.prog
        try:
            ret = prog(views[0], frags)
        except Exception as e:  # noqa: BLE001 — any failure of the program is its frame's
            problem = f"raised {type(e).__name__}: {e}"
            del e
        del frags
        kept = _refcounts(views) != before
        exported = False
        for v in views:
            try:
                v.release()
            except BufferError:
                exported = True
        if problem is None and exported:
            problem = "kept an export of the frame's buffer (numpy.frombuffer, ctypes from_buffer)"
        elif problem is None and kept:
            problem = "kept a reference to the frame's buffer after returning"
        act = XDP_ABORTED
        if problem is None:
            try:
                # Whatever the program returned: XdpAction() raises ValueError unless
                # it is a verdict, which is the check (so no isinstance first).
                act = XdpAction(ret)  # type: ignore[arg-type]
            except ValueError:
                problem = (f"returned {ret!r}, not an XDP action (return an XdpAction "
                           "member, e.g. XdpAction.PASS or XDP_DROP, or Linux's int 0-4: "
                           "0 ABORTED, 1 DROP, 2 PASS, 3 TX, 4 REDIRECT)")
        if problem is not None:
            self.error(f"{problem}; frame aborted")
            act = XDP_ABORTED
        return act


def _refcounts(views: list[memoryview]) -> list[int]:
    """The reference counts of ``views`` and of the managed buffer behind each.

    Counted in a function of its own, before and after the program: whatever
    references the counting itself holds (a compiled build keeps its temporaries
    differently from the interpreter) are the same both times and gone between.
    """
    counts = [sys.getrefcount(v) for v in views]
    for v in views:
        counts.append(sys.getrefcount(gc.get_referents(v)[0]))
    return counts


# -- the bench's programs -----------------------------------------------------------------------


def xdp_drop(data: memoryview, frags: tuple[memoryview, ...]) -> int:
    return XDP_DROP


def xdp_pass(data: memoryview, frags: tuple[memoryview, ...]) -> int:
    return XDP_PASS


def xdp_tx(data: memoryview, frags: tuple[memoryview, ...]) -> int:
    """Send every frame back where it came from (xdp2 / xdp_tx_iptunnel's echo)."""
    return XDP_TX


BUILTIN: dict[str, XdpProgram] = {"drop": xdp_drop, "pass": xdp_pass, "tx": xdp_tx}


# -- loading ------------------------------------------------------------------------------------


def load_program(spec: str) -> XdpProgram:
    """``MODULE:FUNCTION`` (MODULE importable with the current directory on
    ``sys.path``, as uvicorn does), ``path/to/file.py:FUNCTION``, or a built-in
    name (``drop``, ``pass``, ``tx``)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    mod_name, sep, func = spec.rpartition(":")
    if not sep or not mod_name or not func:
        raise XdpLoadError(
            f"--xdp {spec!r}: expected MODULE:FUNCTION or path/to/file.py:FUNCTION "
            f"(or one of {', '.join(BUILTIN)})"
        )
    module = _import(spec, mod_name)
    prog: object = getattr(module, func, None)
    if prog is None:
        raise XdpLoadError(f"--xdp {spec!r}: {mod_name} has no attribute {func!r}")
    if not callable(prog):
        raise XdpLoadError(f"--xdp {spec!r}: {func!r} is a {type(prog).__name__}, not callable")
    # A callable of the user's: what it takes and returns is checked when it runs
    # (XdpHook.run contains whatever it does), not here.
    return prog


def _import(spec: str, mod_name: str) -> ModuleType:
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise XdpLoadError(f"--xdp {spec!r}: no such file {mod_name}")
        name = f"virtnet_xdp_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise XdpLoadError(f"--xdp {spec!r}: cannot load {mod_name}")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise XdpLoadError(f"--xdp {spec!r}: {mod_name} raised {e!r} on import") from e
        return module
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(mod_name)
    except ImportError as missing:  # one name per clause: compiled, a name keeps one type
        raise XdpLoadError(f"--xdp {spec!r}: cannot import {mod_name}: {missing}") from missing
    except Exception as e:
        raise XdpLoadError(f"--xdp {spec!r}: {mod_name} raised {e!r} on import") from e


@final
class XdpFrame:
    """A frame sent by XDP_TX: no skb, its rx buffers go out on the tx ring in place
    (virtnet_xdp_xmit's xdp_frame). Shaped like an ``SkBuff`` for ``start_xmit``;
    ``free`` (tx done, or teardown) gives the buffers back to the rx strategy."""

    __slots__ = ("vnet_hdr", "frags", "len", "head_len", "_release")

    def __init__(
        self, hdr_len: int, frags: list[tuple[Page, int, int]], release: Callable[[], None]
    ) -> None:
        self.vnet_hdr = bytes(hdr_len)  # virtnet_xdp_xmit: a zeroed header
        self.frags = frags
        self.len = sum(size for _, _, size in frags)
        self.head_len = 0  # no linear part: every byte is in the rx buffers
        self._release: Callable[[], None] | None = release

    def linear(self) -> memoryview:
        return memoryview(b"")

    def data_views(self) -> list[memoryview]:
        return [page.view[off : off + size] for page, off, size in self.frags]

    def free(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


def views_of(segments: Sequence[tuple[Page, int, int]]) -> list[memoryview]:
    return [page.view[off : off + size] for page, off, size in segments]
