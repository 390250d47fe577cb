"""Pooled HBONE connections, keyed as ztunnel keys them.

One key is (source identity, destination identity set, source IP, destination address). A
connection carries at most min(100, the peer's MAX_CONCURRENT_STREAMS) tunnels; past that a
new connection is opened. Callers that arrive while a connection is being established wait
for it rather than opening their own. A connection idle for 5 minutes is drained.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from ztagent.hbone.connection import HboneConnection
from ztagent.identity.spiffe import Identity

log = logging.getLogger(__name__)

MAX_STREAMS_PER_CONNECTION = 100
IDLE_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class PoolKey:
    source_identity: Identity
    destination_identities: frozenset[Identity]
    source_ip: str | None
    destination: tuple[str, int]


Connector = Callable[[PoolKey], Awaitable[HboneConnection]]


class ConnectionPool:
    def __init__(
        self,
        connect: Connector,
        max_streams: int = MAX_STREAMS_PER_CONNECTION,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._connect = connect
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self._connections: dict[PoolKey, list[HboneConnection]] = {}
        self._pending: dict[PoolKey, list[tuple[asyncio.Task[HboneConnection], list[int]]]] = {}
        self._idle: dict[HboneConnection, asyncio.TimerHandle] = {}
        self._keys: dict[HboneConnection, PoolKey] = {}

    def connections(self, key: PoolKey | None = None) -> list[HboneConnection]:
        if key is not None:
            return list(self._connections.get(key, ()))
        return [c for conns in self._connections.values() for c in conns]

    def capacity(self, conn: HboneConnection) -> int:
        session = conn.session
        if conn.closed or not session.can_open_stream:
            return 0
        limit = min(self.max_streams, session.peer_max_concurrent_streams)
        return limit - session.open_streams

    async def open_stream(
        self, key: PoolKey, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> tuple[HboneConnection, int]:
        """A new CONNECT stream on a pooled connection for `key` (opened without yielding in
        between, so concurrent callers each see the others' streams)."""
        headers = list(headers)
        while True:
            for conn in self._connections.get(key, ()):
                if self.capacity(conn) > 0:
                    self._touch(conn)
                    return conn, conn.session.open_stream(authority, headers)
            await self._wait_for_connection(key)

    async def _wait_for_connection(self, key: PoolKey) -> None:
        pending = self._pending.setdefault(key, [])
        for task, waiters in pending:
            if waiters[0] < self.max_streams:
                waiters[0] += 1
                try:
                    await asyncio.shield(task)
                finally:
                    waiters[0] -= 1
                return
        task = asyncio.get_running_loop().create_task(self._establish(key))
        entry = (task, [1])
        pending.append(entry)
        try:
            await asyncio.shield(task)
        finally:
            entry[1][0] -= 1

    async def _establish(self, key: PoolKey) -> HboneConnection:
        try:
            conn = await self._connect(key)
        finally:
            pending = self._pending.get(key, [])
            self._pending[key] = [(t, w) for t, w in pending if t is not asyncio.current_task()]
            if not self._pending[key]:
                del self._pending[key]
        if not conn.closed:
            self._connections.setdefault(key, []).append(conn)
            self._keys[conn] = key
            conn.on_closed = self._forget
            conn.on_stream_closed = self._stream_closed
        return conn

    def _touch(self, conn: HboneConnection) -> None:
        timer = self._idle.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _stream_closed(self, conn: HboneConnection) -> None:
        if conn.session.open_streams or conn.closed or conn in self._idle:
            return
        self._idle[conn] = conn.loop.call_later(self.idle_timeout, self._expire, conn)

    def _expire(self, conn: HboneConnection) -> None:
        self._idle.pop(conn, None)
        if not conn.session.open_streams:
            log.debug("releasing idle HBONE connection to %s", conn.info.peer_address)
            self._forget(conn)
            conn.drain()

    def _forget(self, conn: HboneConnection) -> None:
        self._touch(conn)
        key = self._keys.pop(conn, None)
        if key is None:
            return
        conns = self._connections.get(key, [])
        if conn in conns:
            conns.remove(conn)
        if not conns:
            self._connections.pop(key, None)

    def close(self) -> None:
        for conn in self.connections():
            conn.close()
        for entries in self._pending.values():
            for task, _ in entries:
                task.cancel()
