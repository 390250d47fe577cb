"""The node agent's listeners: the protocol that holds an accepted connection until the agent
takes it over, and the hitless-upgrade hand-off of accept queues. The sockets themselves come
from `ztagent.hbone.listen`. No decisions here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

log = logging.getLogger(__name__)

Address = tuple[str, int]


def migrate_accept_queues() -> None:
    """Let the kernel move connections waiting in a closed listener's queues to another
    listener of its SO_REUSEPORT group (`net.ipv4.tcp_migrate_req`, Linux 5.14), so closing
    ours on a handover resets none of them. Per network namespace; best effort."""
    try:
        Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1\n")
    except OSError as exc:
        log.warning("cannot set net.ipv4.tcp_migrate_req: %s", exc)


OnAccept = Callable[[asyncio.Transport, Address, Address, list[bytes]], None]
"""Called with the transport, the peer's and the local address, and the bytes held so far."""


class HeldConnection(asyncio.Protocol):
    """An accepted connection, paused, handed to `on_accept`. Until the agent takes it over,
    bytes the client sends are kept: the transport may deliver a read even after
    `pause_reading()`."""

    def __init__(self, on_accept: OnAccept) -> None:
        self.on_accept = on_accept
        self.transport: asyncio.Transport | None = None
        self.held: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        peer = self.transport.get_extra_info("peername")
        local = self.transport.get_extra_info("sockname")
        self.on_accept(self.transport, (peer[0], peer[1]), (local[0], local[1]), self.held)

    def data_received(self, data: bytes) -> None:
        self.held.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
