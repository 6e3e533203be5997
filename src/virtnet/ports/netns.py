"""Network namespaces, links and addresses for real-traffic tests and benchmarks.

Everything goes through pyroute2 (rtnetlink); only programs that must *run* inside a
namespace (iperf3) go through ``ip netns exec``. Test traffic never leaves the machine:
addresses are only ever put on links inside namespaces (``add_address`` refuses the root
namespace), and a ``Topology`` deletes every namespace, link and process it made on exit,
also when the body raises or the user presses Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypedDict, Unpack

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from virtnet.ports.tap import (
    TUN_F_DEFAULT,
    VIRTIO_NET_HDR_MRG_RXBUF_SIZE,
    Tap,
    open_tap,
    open_tap_queues,
)

NETNS_PREFIX = "vn-"  # every namespace virtnet creates, so leftovers are easy to find
NUD_PERMANENT = 0x80  # include/uapi/linux/neighbour.h: a static neighbour entry
PROCESS_STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL of a namespace process


class NetnsError(RuntimeError):
    """A namespace, link or address operation failed; the message names which."""


def unique_name(label: str, prefix: str = NETNS_PREFIX) -> str:
    """``prefix`` + ``label`` + a random suffix, so parallel runs never collide."""
    return f"{prefix}{label}-{secrets.token_hex(3)}"


def unique_ifname(kind: str) -> str:
    """A short interface name (``vn<kind><6 hex>``) that fits IFNAMSIZ."""
    return f"vn{kind}{secrets.token_hex(3)}"


# --- namespaces ---------------------------------------------------------------------------


def list_netns(prefix: str = NETNS_PREFIX) -> list[str]:
    """Named namespaces (/var/run/netns) whose name starts with ``prefix``."""
    return sorted(n for n in pr_netns.listnetns() if n.startswith(prefix))


def create_netns(name: str) -> None:
    if name in pr_netns.listnetns():
        raise NetnsError(f"netns {name}: already exists")
    try:
        pr_netns.create(name)
    except OSError as e:
        raise NetnsError(f"netns {name}: create failed: {e}") from e


def delete_netns(name: str) -> None:
    """Remove the name; the kernel frees the namespace (and its veths) once unused."""
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        pass  # already gone: deleting is idempotent, so cleanup paths can call it twice
    except OSError as e:
        raise NetnsError(f"netns {name}: delete failed: {e}") from e


@contextlib.contextmanager
def iproute(netns: str | None = None) -> Iterator[IPRoute]:
    """An rtnetlink socket in ``netns`` (None: the root namespace); never creates one."""
    try:
        ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    except FileNotFoundError:
        raise NetnsError(f"netns {netns}: does not exist") from None
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(ipr: IPRoute, ifname: str, netns: str | None = None) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(f"link {ifname}: not found in netns {netns or '(root)'}")
    return found[0]


# --- links and addresses ------------------------------------------------------------------


def move_link(ifname: str, netns: str, from_netns: str | None = None) -> None:
    """Move ``ifname`` into ``netns``; an open tap fd keeps working across the move."""
    with iproute(from_netns) as ipr:
        idx = link_index(ipr, ifname, from_netns)
        _rtnl(f"move {ifname} to netns {netns}", ipr.link, "set", index=idx, net_ns_fd=netns)


def set_link(
    netns: str | None, ifname: str, *, up: bool | None = None, mtu: int | None = None
) -> None:
    """Set the MTU and/or administrative state of ``ifname`` in ``netns``."""
    attrs: dict[str, Any] = {}
    if mtu is not None:
        attrs["mtu"] = mtu
    if up is not None:
        attrs["state"] = "up" if up else "down"
    if not attrs:
        return
    with iproute(netns) as ipr:
        idx = link_index(ipr, ifname, netns)
        _rtnl(f"set {ifname} {attrs}", ipr.link, "set", index=idx, **attrs)


def add_address(netns: str, ifname: str, cidr: str) -> None:
    """Add ``cidr`` (``10.77.0.1/24``) to ``ifname`` inside ``netns``.

    The root namespace is refused: virtnet's test traffic must stay inside namespaces
    it created, never reach a host interface.
    """
    if not netns:
        raise NetnsError(f"refusing to put {cidr} on {ifname} in the root namespace")
    iface = ipaddress.ip_interface(cidr)
    with iproute(netns) as ipr:
        idx = link_index(ipr, ifname, netns)
        _rtnl(
            f"add {cidr} to {ifname} in netns {netns}", ipr.addr, "add",
            index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen,
        )  # fmt: skip


def _address_up(netns: str, ifname: str, cidr: str, mtu: int | None) -> None:
    """A link of ours in ``netns``: addressed, its MTU set, up."""
    add_address(netns, ifname, cidr)
    set_link(netns, ifname, mtu=mtu, up=True)


def add_neighbour(netns: str, ifname: str, ip: str, mac: str) -> None:
    """A permanent neighbour entry, so a send needs no ARP/ND round trip first."""
    with iproute(netns) as ipr:
        idx = link_index(ipr, ifname, netns)
        _rtnl(
            f"add neighbour {ip} {mac} on {ifname}", ipr.neigh, "add",
            dst=ip, lladdr=mac, ifindex=idx, state=NUD_PERMANENT,
        )  # fmt: skip


def link_mac(netns: str | None, ifname: str) -> str:
    with iproute(netns) as ipr:
        idx = link_index(ipr, ifname, netns)
        return ipr.get_links(idx)[0].get("address")


def create_veth(ifname_a: str, netns_a: str, ifname_b: str, netns_b: str) -> None:
    """A veth pair with one end in each namespace, created there (never in the root)."""
    with iproute(netns_a) as ipr:
        _rtnl(
            f"create veth {ifname_a}@{netns_a} <-> {ifname_b}@{netns_b}", ipr.link, "add",
            ifname=ifname_a, kind="veth", peer={"ifname": ifname_b, "net_ns_fd": netns_b},
        )  # fmt: skip


def create_tap(netns: str, ifname: str, *, multi_queue: bool = False) -> None:
    """A persistent tap (IFF_VNET_HDR, no PI) created inside ``netns``, no fd attached.

    Like ``ip -n NETNS tuntap add dev IFNAME mode tap vnet_hdr [multi_queue]``: a process
    in that namespace attaches to it by name, one fd per queue when ``multi_queue``
    (``tap:IFNAME --queues N``, or :func:`open_tap_queues_in`). It goes with its namespace.
    """
    ifr = {"no_pi": 1, "vnet_hdr": 1, "multi_queue": int(multi_queue)}
    with iproute(netns) as ipr:
        _rtnl(
            f"create tap {ifname}{' multi_queue' if multi_queue else ''} in netns {netns}",
            ipr.link, "add", ifname=ifname, kind="tuntap", mode="tap", ifr=ifr,
        )  # fmt: skip


@contextlib.contextmanager
def entered_netns(netns: str) -> Iterator[None]:
    """This thread inside ``netns`` for the block: what it opens there (a tap fd) stays there.

    TUNSETIFF looks the name up in the namespace /dev/net/tun was opened in, so attaching
    to a tap that lives in a namespace means opening it from inside. setns(2) moves only
    the calling thread; it is moved back on exit.
    """
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            pr_netns.setns(netns, flags=0)  # flags=0: never create a missing namespace
        except OSError as e:
            raise NetnsError(f"netns {netns}: cannot enter: {e}") from None
        try:
            yield
        finally:
            pr_netns.setns(saved)
    finally:
        os.close(saved)


def open_tap_queues_in(
    netns: str,
    ifname: str,
    queues: int,
    vnet_hdr_size: int = VIRTIO_NET_HDR_MRG_RXBUF_SIZE,
    offloads: int = TUN_F_DEFAULT,
) -> list[Tap]:
    """``queues`` fds on the multi-queue tap ``ifname`` inside ``netns`` (made if missing)."""
    with entered_netns(netns):
        return open_tap_queues(ifname, queues, vnet_hdr_size, offloads)


def _rtnl(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except Exception as e:  # pyroute2 raises NetlinkError, OSError, or its own types
        raise NetnsError(f"{what}: {e}") from e


# --- processes and sockets inside a namespace ---------------------------------------------


def netns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    # ``ip netns exec`` execs the program (no extra process), so its pid is the Popen pid
    # and also remounts /sys for the namespace.
    return ["ip", "netns", "exec", netns, *argv]


def popen_in_netns(netns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start ``argv`` inside ``netns`` (own session: Ctrl-C is handled by our cleanup)."""
    kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(netns_argv(netns, argv), **kwargs)


def run_in_netns(
    netns: str, argv: Sequence[str], timeout: float, **kwargs: Any
) -> subprocess.CompletedProcess:
    """Run ``argv`` inside ``netns`` to completion, killed after ``timeout`` seconds."""
    return subprocess.run(netns_argv(netns, argv), timeout=timeout, **kwargs)


def socket_in_netns(
    netns: str, family: int = socket.AF_INET, sock_type: int = socket.SOCK_DGRAM
) -> socket.socket:
    """A socket that lives in ``netns`` (made by a child there and passed back by fd)."""
    return pr_netns.create_socket(netns, family, sock_type, flags=0)


def stop_process(proc: subprocess.Popen, timeout: float = PROCESS_STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: only ever this pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


# --- Topology -----------------------------------------------------------------------------


class TapOptions(TypedDict, total=False):
    """The keywords :meth:`Topology.add_tap` passes on to :meth:`Topology.add_tap_queues`."""

    ifname: str | None
    vnet_hdr_size: int
    offloads: int
    mtu: int | None


class Topology:
    """Namespaces, taps, veths and processes for one test or bench; all gone on exit.

    >>> with Topology() as topo:
    ...     a, b = topo.add_netns("a"), topo.add_netns("b")
    ...     tap_a = topo.add_tap(a, "10.77.0.1/24")
    ...     topo.add_veth(a, "10.77.1.1/24", b, "10.77.1.2/24")
    """

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.taps: list[Tap] = []
        self.veths: list[tuple[str, str, str, str]] = []
        self.processes: list[subprocess.Popen] = []

    def add_netns(self, label: str) -> str:
        """A fresh ``vn-<label>-<hex>`` namespace with loopback up."""
        name = unique_name(label)
        with _deferred_sigint():
            create_netns(name)
            self.namespaces.append(name)
        set_link(name, "lo", up=True)
        return name

    def add_tap(self, netns: str, cidr: str, **opts: Unpack[TapOptions]) -> Tap:
        """Open a tap in the root namespace, move it into ``netns``, address it, set up.

        The tap is only in the root namespace while down and without an address.
        """
        return self.add_tap_queues(netns, cidr, 1, **opts)[0]

    def add_tap_queues(
        self,
        netns: str,
        cidr: str,
        queues: int,
        *,
        ifname: str | None = None,
        vnet_hdr_size: int = VIRTIO_NET_HDR_MRG_RXBUF_SIZE,
        offloads: int = TUN_F_DEFAULT,
        mtu: int | None = None,
    ) -> list[Tap]:
        """:meth:`add_tap` with ``queues`` fds: one Tap per queue of an IFF_MULTI_QUEUE tap,
        or for one queue a plain tap (as QEMU's ``-netdev tap,queues=1``)."""
        if queues == 1:
            opener = lambda: [open_tap(ifname or unique_ifname("t"), vnet_hdr_size, offloads)]  # noqa: E731
        else:
            opener = lambda: open_tap_queues(  # noqa: E731
                ifname or unique_ifname("q"), queues, vnet_hdr_size, offloads)  # fmt: skip
        return self._add_taps(netns, cidr, mtu, opener)

    def _add_taps(self, netns: str, cidr: str, mtu: int | None, opener) -> list[Tap]:
        """Open the tap's fds in the root namespace, then place it in ``netns``."""
        taps = self._open_taps(netns, opener)
        self._place(netns, taps[0].name, cidr, mtu)
        return taps

    def _open_taps(self, netns: str, opener: Callable[[], list[Tap]]) -> list[Tap]:
        """The fds ``opener`` opens for a tap of ``netns``, kept for cleanup even if a
        Ctrl-C arrives between the open and the bookkeeping."""
        self._check_own(netns)
        with _deferred_sigint():
            taps = opener()
            self.taps.extend(taps)
        return taps

    def add_persistent_tap(
        self,
        netns: str,
        cidr: str,
        *,
        ifname: str | None = None,
        multi_queue: bool = True,
        mtu: int | None = None,
    ) -> str:
        """A persistent tap made inside ``netns``, addressed and up, no fd yet; its name.

        Attach queues with :meth:`attach_tap_queues` (or a process run in the namespace).
        """
        self._check_own(netns)
        name = ifname or unique_ifname("p")
        create_tap(netns, name, multi_queue=multi_queue)  # goes with the namespace
        _address_up(netns, name, cidr, mtu)
        return name

    def attach_tap_queues(self, netns: str, ifname: str, queues: int) -> list[Tap]:
        """``queues`` more fds (the default vnet header and offloads) on the multi-queue tap
        ``ifname`` in ``netns``; closed on exit."""
        return self._open_taps(netns, lambda: open_tap_queues_in(netns, ifname, queues))

    def _place(self, netns: str, ifname: str, cidr: str, mtu: int | None) -> None:
        # The tap is only in the root namespace while down and without an address.
        move_link(ifname, netns)
        _address_up(netns, ifname, cidr, mtu)

    def add_veth(
        self, netns_a: str, cidr_a: str, netns_b: str, cidr_b: str, *, mtu: int | None = None
    ) -> tuple[str, str]:
        """A veth pair between two of our namespaces, addressed and up; returns the names."""
        self._check_own(netns_a)
        self._check_own(netns_b)
        name_a, name_b = unique_ifname("v"), unique_ifname("v")
        create_veth(name_a, netns_a, name_b, netns_b)
        self.veths.append((name_a, netns_a, name_b, netns_b))
        for ns, name, cidr in ((netns_a, name_a, cidr_a), (netns_b, name_b, cidr_b)):
            _address_up(ns, name, cidr, mtu)
        return name_a, name_b

    def popen(self, netns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process in one of our namespaces; it is stopped on exit."""
        self._check_own(netns)
        with _deferred_sigint():
            proc = popen_in_netns(netns, argv, **kwargs)
            self.processes.append(proc)
        return proc

    def close(self) -> None:
        """Stop processes, close taps, delete namespaces; every step runs even if one fails."""
        errors: list[BaseException] = []
        with _deferred_sigint():
            # Processes first: a namespace outlives its name while a process is inside it.
            for proc in reversed(self.processes):
                _collect(errors, stop_process, proc)
            # Closing the last fd deletes a tap, wherever it lives (a persistent one goes
            # with its namespace, which a tap fd opened inside it keeps alive till closed).
            for tap in reversed(self.taps):
                _collect(errors, tap.close)
            # Veths die with their namespace.
            for name in reversed(self.namespaces):
                _collect(errors, delete_netns, name)
            self.processes.clear()
            self.taps.clear()
            self.veths.clear()
            self.namespaces.clear()
        if errors:
            raise NetnsError(f"topology cleanup: {len(errors)} step(s) failed: {errors}")

    def _check_own(self, netns: str) -> None:
        if netns not in self.namespaces:
            raise NetnsError(f"netns {netns}: not created by this Topology")

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except NetnsError:
            if exc is None:
                raise  # don't let a cleanup error hide the body's own exception


def _collect(errors: list[BaseException], fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:
        errors.append(e)


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then raise it.

    A KeyboardInterrupt between "created" and "recorded for cleanup" would leak a
    namespace; so would one in the middle of the cleanup itself. Only the main thread
    can swap handlers; elsewhere this is a no-op (Ctrl-C lands in the main thread anyway).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: leave it alone
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt
