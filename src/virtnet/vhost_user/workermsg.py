"""The messages between the control process and a queue pair's worker.

Requests are ``(command, args...)`` tuples, answered by ``("ok", value)`` or
``("error", text)``; a worker may also send ``("event", text)`` on its own.
One message is one SOCK_SEQPACKET datagram, fds by SCM_RIGHTS; both ends are
this program, so pickle is the codec.

Its own module so that the per-pair loops (``device_loop``, ``driver_loop``)
and the supervision of their processes (``worker``) share it without
importing each other.
"""

from __future__ import annotations

import pickle
import socket

from virtnet.vhost_user.messages import close_fds

MAX_MSG = 1 << 16
MAX_FDS = 16  # a memory table's regions (VHOST_MEMORY_BASELINE_NREGIONS is 8)


def send_msg(sock: socket.socket, obj: object, fds: list[int] | tuple[int, ...] = ()) -> None:
    socket.send_fds(sock, [pickle.dumps(obj)], list(fds))


def recv_msg(sock: socket.socket) -> tuple[object, list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MSG, MAX_FDS)
    if not data:
        close_fds(fds)
        raise EOFError("the other end closed")
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        raise EOFError("a truncated message")
    return pickle.loads(data), fds
