"""The SOCKS5 listener's protocol, and what a SOCKS5 client hears once its connection is routed.

`Socks5Listener` runs the handshake on an accepted connection, resolves a domain name through
its owner, then hands the connection over (paused, with the client's bytes read so far) with
a `ReplyFn` to answer the client once the connection is tried. For a connection that goes
through an HBONE tunnel, `tunnel_response` is the leg's response hook: the client hears the
SOCKS5 reply for the CONNECT's status before any tunnel bytes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import cast

from ztagent.hbone.connection import ResponseHook

# The agent's own ports (`names.AGENT_PORTS`) are never a SOCKS5 destination on one of this
# host's addresses, or a local workload could drive the agent itself (`/quitquitquit` on 15000).
from ztagent.names import AGENT_PORTS
from ztagent.socks5.handshake import ConnectRequested, Failed, NeedMore, Reply, Socks5Handshake

# The reply for a `Reply` code and the bound address (None: 0.0.0.0:0).
ReplyFn = Callable[[int, tuple[str, int] | None], bytes]
# A domain name's address, or None when nothing is known by that name.
Resolve = Callable[[str], str | None]
# Takes the connection over: (transport, client, destination, bytes read so far, reply).
# The list of bytes may grow until the transport gets a new protocol.
Connect = Callable[
    [asyncio.Transport, tuple[str, int], tuple[str, int], list[bytes], ReplyFn], None
]

# A client must finish its greeting and request within this (Envoy's and ztunnel's connect
# timeouts are 10 s; a half-open SOCKS5 handshake is held no longer).
SOCKS5_HANDSHAKE_TIMEOUT = 10.0
# SOCKS5 handshakes under way at once, at most: past it the oldest is closed to admit the
# new one (as the HBONE listener's pending TLS handshakes, `MAX_PENDING_HANDSHAKES`).
MAX_PENDING_SOCKS5_HANDSHAKES = 1024


class HandshakeSlots:
    """The handshakes under way on one or more listeners, oldest first, up to `cap`."""

    def __init__(self, cap: int = MAX_PENDING_SOCKS5_HANDSHAKES) -> None:
        self.cap = cap
        self._pending: dict[Socks5Listener, None] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def admit(self, listener: Socks5Listener) -> None:
        while len(self._pending) >= self.cap:
            oldest = next(iter(self._pending))
            self.release(oldest)
            oldest.give_up()
        self._pending[listener] = None

    def release(self, listener: Socks5Listener) -> None:
        self._pending.pop(listener, None)


# Shared by every listener that is not given its own.
DEFAULT_SLOTS = HandshakeSlots()


def is_own_address(ip: str) -> bool:
    """Whether `ip` reaches this host: loopback, unspecified, or an address of one of its
    interfaces (binding to it succeeds; EADDRNOTAVAIL says it is someone else's)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback or addr.is_unspecified:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(addr), 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL
    return True


def refused_destination(destination: tuple[str, int]) -> str | None:
    """Why a SOCKS5 destination is refused here, or None."""
    host, port = destination
    if port in AGENT_PORTS and is_own_address(host):
        return f"port {port} belongs to the agent"
    return None


# What SOCKS5 says for each way an HBONE CONNECT can be refused.
_FOR_STATUS = {401: Reply.NOT_ALLOWED, 400: Reply.NOT_ALLOWED, 503: Reply.CONNECTION_REFUSED}


def reply_code(status: int) -> int:
    """The SOCKS5 reply for an HBONE CONNECT status."""
    if status == 200:
        return Reply.SUCCEEDED
    return _FOR_STATUS.get(status, Reply.GENERAL_FAILURE)


def tunnel_response(reply: ReplyFn) -> ResponseHook:
    """A tunnel leg's response hook that answers the SOCKS5 client for the CONNECT's status."""

    def on_response(transport: asyncio.Transport, status: int) -> bool:
        transport.write(reply(reply_code(status), None))
        return True

    return on_response


class Socks5Listener(asyncio.Protocol):
    """One SOCKS5 client: the handshake; then the connection is `connect`'s."""

    def __init__(
        self,
        resolve: Resolve,
        connect: Connect,
        *,
        handshake_timeout: float = SOCKS5_HANDSHAKE_TIMEOUT,
        slots: HandshakeSlots = DEFAULT_SLOTS,
    ) -> None:
        self.resolve = resolve
        self.connect = connect
        self.handshake_timeout = handshake_timeout
        self.slots = slots
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        # After the request: bytes the client sent (the transport may deliver a read even
        # after `pause_reading()`) until the connection is taken over.
        self.held: list[bytes] = []
        self.handshake = Socks5Handshake()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(self.handshake_timeout, self.give_up)
        self.slots.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._handshake_over()

    def _handshake_over(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.slots.release(self)

    def give_up(self) -> None:
        """The handshake took too long, or made room for a newer one: close the connection."""
        self._handshake_over()
        if self.transport is not None and not self.handshake.done:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.handshake.done:
            self.held.append(data)
            transport.pause_reading()
            return
        event = self.handshake.receive_data(data)
        out = self.handshake.data_to_send()
        if out:
            transport.write(out)
        if isinstance(event, NeedMore):
            return
        self._handshake_over()
        if isinstance(event, Failed):
            if event.reply:
                transport.write(event.reply)
            transport.close()
            return
        assert isinstance(event, ConnectRequested)
        transport.pause_reading()
        if event.early_data:
            self.held.append(event.early_data)
        host = event.host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            address = self.resolve(host)
            if address is None:
                transport.write(self.handshake.reply(Reply.HOST_UNREACHABLE))
                transport.close()
                return
            host = address
        peer = transport.get_extra_info("peername")
        destination = (host, event.port)
        if refused_destination(destination) is not None:
            transport.write(self.handshake.reply(Reply.NOT_ALLOWED))
            transport.close()
            return
        self.connect(transport, (peer[0], peer[1]), destination, self.held, self.handshake.reply)
