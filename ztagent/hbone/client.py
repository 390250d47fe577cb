"""The HBONE client: tunnels TCP connections to a destination through pooled connections."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ztagent.errors import RemoteError
from ztagent.hbone.connection import ConnectionInfo, HboneConnection, TcpLeg
from ztagent.hbone.frames import Settings, format_authority
from ztagent.hbone.pool import MAX_STREAMS_PER_CONNECTION, ConnectionPool, PoolKey
from ztagent.hbone.session import HboneSession, Role
from ztagent.hbone.tls import TlsConfig
from ztagent.hbone.transport import TlsTransport, open_tls
from ztagent.identity.spiffe import Identity

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


class TunnelRefused(RemoteError):
    """The HBONE server answered the CONNECT with something other than 200 (`code`)."""


class TunnelFailed(RemoteError):
    """No tunnel: the HBONE connection could not be made or was lost."""


@dataclass(frozen=True, slots=True)
class Tunnel:
    """Where one tunnel goes: through `via` (an HBONE endpoint) to `authority`."""

    via: tuple[str, int]
    target: tuple[str, int]
    expected_identities: frozenset[Identity] = frozenset()
    source: tuple[str, int] | None = None
    source_ip: str | None = None
    host: str | None = None
    baggage: Mapping[str, str] = field(default_factory=dict)
    traceparent: str | None = None

    @property
    def authority(self) -> str:
        return format_authority(*self.target)


def new_traceparent() -> str:
    """A W3C trace context for a new trace (ids need to be unique, not secret)."""
    return f"00-{random.getrandbits(128):032x}-{random.getrandbits(64) or 1:016x}-01"


def tunnel_headers(tunnel: Tunnel) -> list[tuple[str, str]]:
    """The request headers ztunnel sends with a CONNECT."""
    headers: list[tuple[str, str]] = []
    if tunnel.source is not None:
        forwarded = f'for="{format_authority(*tunnel.source)}"'
        if tunnel.host:
            forwarded += f";host={tunnel.host}"
        headers.append(("forwarded", forwarded))
    if tunnel.baggage:
        headers.append(("baggage", ",".join(f"{k}={v}" for k, v in tunnel.baggage.items())))
    headers.append(("traceparent", tunnel.traceparent or new_traceparent()))
    return headers


class HboneClient:
    """Opens tunnels as one local identity; connections are pooled per `PoolKey`."""

    def __init__(
        self,
        tls: TlsConfig,
        settings: Settings | None = None,
        mark: int | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_streams: int = MAX_STREAMS_PER_CONNECTION,
    ) -> None:
        self.tls = tls
        self.settings = settings or Settings()
        self.mark = mark
        self.connect_timeout = connect_timeout
        self.pool = ConnectionPool(self._connect, max_streams=max_streams)

    async def _connect(self, key: PoolKey) -> HboneConnection:
        loop = asyncio.get_running_loop()
        try:
            stream = await open_tls(
                loop,
                self.tls.client_context,
                key.destination,
                source_ip=key.source_ip,
                mark=self.mark,
                timeout=self.connect_timeout,
            )
        except TimeoutError:
            raise TunnelFailed(f"HBONE connect to {_addr(key.destination)} timed out") from None
        except ssl.SSLError as exc:
            raise TunnelFailed(
                f"TLS with {_addr(key.destination)} failed: {exc.reason or exc}"
            ) from None
        except OSError as exc:
            raise TunnelFailed(
                f"HBONE connect to {_addr(key.destination)} failed: {exc.strerror or exc}"
            ) from None
        try:
            identity = self.tls.check_server(stream.obj, key.destination_identities)
        except RemoteError:
            stream.close()
            raise
        local = stream.sock.getsockname()[:2]
        session = HboneSession(Role.CLIENT, self.settings, loop.time())
        conn = HboneConnection(loop, session, ConnectionInfo(identity, local, key.destination))
        conn.start(TlsTransport(loop, stream, conn))
        # The server's SETTINGS (its stream limit) decide how many tunnels the pool puts here.
        try:
            await asyncio.wait_for(asyncio.shield(conn.settings_received), self.connect_timeout)
        except TimeoutError:
            conn.close()
            raise TunnelFailed(f"no HTTP/2 SETTINGS from {_addr(key.destination)}") from None
        if conn.closed:
            reason = conn.close_reason
            detail = f": {getattr(reason, 'reason', None) or reason}" if reason else ""
            raise TunnelFailed(
                f"HBONE connection to {_addr(key.destination)} closed at start{detail}"
            )
        return conn

    async def open(self, leg: TcpLeg, tunnel: Tunnel) -> HboneConnection:
        """Tunnel `leg` (an accepted app connection) to `tunnel.target`; raises on failure."""
        key = PoolKey(self.tls.identity, tunnel.expected_identities, tunnel.source_ip, tunnel.via)
        conn, sid = await self.pool.open_stream(key, tunnel.authority, tunnel_headers(tunnel))
        future: asyncio.Future[int] = conn.loop.create_future()
        conn.responses[sid] = future
        conn.attach(leg, sid)
        # The app's bytes follow the CONNECT at once (RFC 9113 8.5): the server holds them
        # until it has decided and connected, so they never pass a refusal, and the first
        # byte saves a round trip. A refusal aborts the app's connection (see
        # HboneConnection: a non-200 response resets the leg).
        conn.start_relay(leg)
        try:
            status = await asyncio.wait_for(future, self.connect_timeout)
        except TimeoutError:
            conn.drop_leg(leg)
            raise TunnelFailed(f"CONNECT {tunnel.authority} timed out") from None
        if status != 200:
            conn.drop_leg(leg)
            if status == 0:
                raise TunnelFailed(f"HBONE connection lost before CONNECT {tunnel.authority}")
            raise TunnelRefused(f"CONNECT {tunnel.authority} refused with {status}", status)
        return conn

    def close(self) -> None:
        self.pool.close()


def _addr(address: tuple[str, int]) -> str:
    return format_authority(*address)


def expected(identities: Iterable[str]) -> frozenset[Identity]:
    return frozenset(Identity.parse(i) for i in identities)
