"""Pooled HTTP connections from the waypoint to endpoints, each carried in an HBONE tunnel.

One `Upstreams` per waypoint keeps, per endpoint and protocol (`UpstreamKey`), idle HTTP/1.1
connections for reuse and HTTP/2 connections that multiplex requests. A connection is one HBONE
tunnel to the endpoint's node agent (the tunnels of many connections share the pooled mTLS
connection to that node). DestinationRule `connectionPool` limits are enforced through the
destination's `ConnectionPool` counters: a new connection beyond `tcp.maxConnections` waits
as a pending request (beyond `http1MaxPendingRequests` the request overflows), and
`maxRequestsPerConnection` retires a connection after that many requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ztagent.http.body import Body
from ztagent.http.h1 import Http1Client
from ztagent.http.h2 import Http2Client
from ztagent.http.messages import RequestHead, ResponseHead
from ztagent.istio.connection_pool import ConnectionPool, Overflow
from ztagent.waypoint.cluster import UpstreamKey

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 60.0

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connect = Callable[[UpstreamKey], Awaitable[Streams]]


class UpstreamOverflow(Exception):
    """A connection pool limit refused the request (Envoy's UO)."""

    def __init__(self, overflow: Overflow) -> None:
        super().__init__(f"{overflow.limit} ({overflow.maximum}) reached")
        self.overflow = overflow


class UpstreamConnectError(Exception):
    """No connection to the endpoint could be made (Envoy's UF)."""


Client = Http1Client | Http2Client


@dataclass
class _Slot:
    idle: list[Http1Client] = field(default_factory=list)
    h2: list[Http2Client] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Upstreams:
    def __init__(self, connect: Connect, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._connect = connect
        self._slots: dict[UpstreamKey, _Slot] = {}
        self._owner: dict[Client, ConnectionPool] = {}
        self.idle_timeout = idle_timeout
        self.opened = 0

    def connections(self) -> int:
        return len(self._owner)

    async def request(
        self, key: UpstreamKey, pool: ConnectionPool, head: RequestHead, body: Body
    ) -> tuple[ResponseHead, Body, Callable[[bool], None]]:
        """Send one request; returns the response and `done(ok)`, to call once the response
        body was read to the end (ok) or abandoned (the connection is then closed)."""
        client = await self._client(key, pool)
        reuse = pool.assign_request(client)
        try:
            response, response_body = await client.request(head, body)
        except BaseException:
            self._retire(client)
            raise

        def done(ok: bool) -> None:
            if isinstance(client, Http2Client):
                if not reuse or client.closed:
                    self._retire_when_idle(client)
                return
            if ok and reuse and client.reusable:
                self._park(key, client)
            else:
                self._retire(client)

        return response, response_body, done

    async def _client(self, key: UpstreamKey, pool: ConnectionPool) -> Client:
        slot = self._slots.setdefault(key, _Slot())
        pending = False
        try:
            while True:
                client = self._reusable(slot, pool)
                if client is not None:
                    return client
                placeholder = _Placeholder()
                admission = pool.try_acquire_connection(placeholder)
                if isinstance(admission, Overflow):
                    if not pending:
                        wait = pool.try_acquire_pending()
                        if isinstance(wait, Overflow):
                            raise UpstreamOverflow(wait)
                        pending = True
                    waiter = asyncio.get_running_loop().create_future()
                    slot.waiters.append(waiter)
                    try:
                        await waiter
                    finally:
                        with contextlib.suppress(ValueError):
                            slot.waiters.remove(waiter)
                    continue
                try:
                    client = await self._open(key)
                except BaseException:
                    pool.release_connection(placeholder)
                    self._wake(slot)
                    raise
                pool.release_connection(placeholder)
                pool.try_acquire_connection(client)
                self._owner[client] = pool
                if isinstance(client, Http2Client):
                    slot.h2.append(client)
                return client
        finally:
            if pending:
                pool.release_pending()

    def _reusable(self, slot: _Slot, pool: ConnectionPool) -> Client | None:
        while slot.idle:
            client = slot.idle.pop()
            if client.reusable and pool.can_reuse(client):
                return client
            self._retire(client)
        for h2 in list(slot.h2):
            if h2.closed:
                slot.h2.remove(h2)
                self._retire(h2)
            elif h2.available > 0 and pool.can_reuse(h2):
                return h2
        return None

    async def _open(self, key: UpstreamKey) -> Client:
        try:
            reader, writer = await self._connect(key)
        except UpstreamConnectError:
            raise
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(str(exc) or type(exc).__name__) from None
        self.opened += 1
        if key.http2:
            return Http2Client(reader, writer)
        return Http1Client(reader, writer)

    def _park(self, key: UpstreamKey, client: Http1Client) -> None:
        slot = self._slots.get(key)
        if slot is None:
            self._retire(client)
            return
        slot.idle.append(client)
        loop = asyncio.get_running_loop()
        loop.call_later(self.idle_timeout, self._expire, key, client)
        self._wake(slot)

    def _expire(self, key: UpstreamKey, client: Http1Client) -> None:
        slot = self._slots.get(key)
        if slot is not None and client in slot.idle:
            slot.idle.remove(client)
            self._retire(client)

    def _retire_when_idle(self, client: Http2Client) -> None:
        if client.active_streams == 0 or client.closed:
            for slot in self._slots.values():
                if client in slot.h2:
                    slot.h2.remove(client)
            self._retire(client)

    def _retire(self, client: Client) -> None:
        pool = self._owner.pop(client, None)
        if pool is not None:
            with contextlib.suppress(ValueError):
                pool.release_connection(client)
        client.close()
        for slot in self._slots.values():
            self._wake(slot)

    @staticmethod
    def _wake(slot: _Slot) -> None:
        for waiter in slot.waiters:
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for client in list(self._owner):
            client.close()
        self._owner.clear()
        self._slots.clear()


class _Placeholder:
    """A connection being opened, counted against `maxConnections` until it exists."""
