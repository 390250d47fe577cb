"""Listening sockets for the node agent and the waypoint: one place for their options."""

from __future__ import annotations

import contextlib
import socket

from ztagent.errors import LocalError
from ztagent.hbone.frames import format_authority

# Accept queue of every listener, as tokio's TcpListener::bind (ztunnel's) sets it: 1024. Pass
# it to create_server too, which listens again on a given socket (100 by default).
LISTEN_BACKLOG = 1024


def listening_socket(
    address: tuple[str, int], *, transparent: bool = False, reuse_port: bool = False
) -> socket.socket:
    """A non-blocking listening socket with the agents' backlog; `transparent` sets
    IP_TRANSPARENT where permitted, `reuse_port` SO_REUSEPORT (for a hitless upgrade)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            with contextlib.suppress(PermissionError):
                sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise LocalError(f"cannot listen on {format_authority(*address)}: {exc.strerror}") from None
    return sock
