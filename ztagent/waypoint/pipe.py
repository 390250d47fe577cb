"""An in-process byte pipe with asyncio transport semantics on both ends.

The waypoint terminates HBONE tunnels and speaks HTTP inside them in the same process. A tunnel's
app side is a `TcpLeg` (an asyncio protocol that expects a transport, as for a real socket);
`pipe()` gives it one, and the other end carries an `asyncio.StreamReader`/`StreamWriter` for
the HTTP code. Both ends keep transport semantics: `write` delivers to the peer's protocol,
`pause_reading` on one end queues what the peer writes and, past `HIGH_WATER` queued bytes,
pauses the peer's protocol (`pause_writing`) until the queue drains below `LOW_WATER`;
`write_eof` is the peer's `eof_received`; `close` delivers what is queued, then EOF, then
`connection_lost` on both ends; `abort` drops the queue and ends both at once.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
STREAM_LIMIT = 64 * 1024
COALESCE_LIMIT = 16 * 1024


class PipeEnd(asyncio.Transport):
    """One end of a pipe: what is written here arrives at the peer's protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        super().__init__()
        self._loop = loop
        self._name = name
        self.peer: PipeEnd | None = None
        self._protocol: asyncio.BaseProtocol | None = None
        self._inbox: collections.deque[bytes] = collections.deque()
        self._inbox_size = 0
        self._inbox_eof = False  # the peer wrote EOF; deliver it after the inbox
        self._close_after_inbox = False  # the peer closed: end this side once delivered
        self._eof_delivered = False
        self._reading = True
        self._delivering = False
        self._writer_paused = False  # whether the peer's protocol was told to pause writing
        self._closing = False
        self._lost = False
        self._scheduled = False

    # ---------------------------------------------------------------- transport API

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("pipe", 0), "sockname": (self._name, 0)}.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def is_reading(self) -> bool:
        return self._reading and not self._lost

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        self._schedule()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        peer = self.peer
        if self._closing or self._lost or peer is None or not data:
            return
        peer._receive(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        peer = self.peer
        if self._lost or peer is None or peer._inbox_eof:
            return
        peer._inbox_eof = True
        peer._schedule()

    def get_write_buffer_size(self) -> int:
        peer = self.peer
        return 0 if peer is None else peer._inbox_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (LOW_WATER, HIGH_WATER)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return

    def close(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True
        self.write_eof()
        peer = self.peer
        if peer is not None:
            peer._close_after_inbox = True
            peer._schedule()
        else:
            self._lose(None)

    def abort(self) -> None:
        self._lose(None)
        peer = self.peer
        if peer is not None:
            peer._lose(ConnectionResetError("the other end of the pipe aborted"))

    # ---------------------------------------------------------------- delivery

    def _receive(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost:
            return
        if (
            self._reading
            and not self._inbox
            and not self._delivering
            and not isinstance(self._protocol, asyncio.BufferedProtocol)
        ):
            self._deliver(data)
            return
        # Toward a tunnel (a buffered protocol: every delivery becomes a TLS record and a
        # send): queue, and deliver what was written in this loop iteration at once, so an
        # HTTP head and body written one after the other leave in one record.
        self._inbox.append(bytes(data))
        self._inbox_size += len(data)
        self._check_pressure()
        self._schedule()

    def _deliver(self, data: bytes | bytearray | memoryview) -> None:
        """Hand `data` to the protocol now; what it does not take (it paused) is queued."""
        protocol = self._protocol
        if protocol is None:
            return
        self._delivering = True
        try:
            if isinstance(protocol, asyncio.BufferedProtocol):
                view = memoryview(data)
                while view:
                    if not self._reading or self._lost:
                        rest = bytes(view)
                        self._inbox.appendleft(rest)
                        self._inbox_size += len(rest)
                        self._check_pressure()
                        break
                    buf = memoryview(protocol.get_buffer(len(view)))
                    n = min(len(buf), len(view))
                    buf[:n] = view[:n]
                    view = view[n:]
                    protocol.buffer_updated(n)
            else:
                assert isinstance(protocol, asyncio.Protocol)
                protocol.data_received(bytes(data))
        finally:
            self._delivering = False

    def _schedule(self) -> None:
        if not self._scheduled and not self._lost:
            self._scheduled = True
            self._loop.call_soon(self._drain_inbox)

    def _drain_inbox(self) -> None:
        self._scheduled = False
        while self._inbox and self._reading and not self._lost:
            chunk = self._inbox.popleft()
            if self._inbox and len(chunk) < COALESCE_LIMIT:
                parts = [chunk]
                size = len(chunk)
                while self._inbox and size + len(self._inbox[0]) <= COALESCE_LIMIT:
                    part = self._inbox.popleft()
                    parts.append(part)
                    size += len(part)
                chunk = b"".join(parts)
            self._inbox_size -= len(chunk)
            self._deliver(chunk)
        self._check_pressure()
        if self._inbox or self._lost:
            return
        if self._inbox_eof and not self._eof_delivered and self._reading:
            self._eof_delivered = True
            protocol = self._protocol
            keep_open = isinstance(protocol, asyncio.Protocol | asyncio.BufferedProtocol) and bool(
                protocol.eof_received()
            )
            if not keep_open:
                self._close_after_inbox = True
        if self._close_after_inbox and self._eof_delivered:
            self._lose(None)
            peer = self.peer
            if peer is not None and peer._closing:
                peer._lose(None)

    def _check_pressure(self) -> None:
        """Pause or resume the writing peer's protocol by this end's queued bytes."""
        peer = self.peer
        if peer is None or peer._protocol is None or peer._lost:
            return
        if not self._writer_paused and self._inbox_size > HIGH_WATER:
            self._writer_paused = True
            peer._protocol.pause_writing()
        elif self._writer_paused and self._inbox_size <= LOW_WATER:
            self._writer_paused = False
            peer._protocol.resume_writing()

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._inbox.clear()
        self._inbox_size = 0
        protocol = self._protocol
        if protocol is not None:
            self._loop.call_soon(protocol.connection_lost, exc)


def pipe(loop: asyncio.AbstractEventLoop) -> tuple[PipeEnd, PipeEnd]:
    """Two connected ends; give each a protocol with `set_protocol` + `connection_made`."""
    a, b = PipeEnd(loop, "a"), PipeEnd(loop, "b")
    a.peer, b.peer = b, a
    return a, b


def leg_streams(
    leg: asyncio.BaseProtocol, loop: asyncio.AbstractEventLoop
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect a tunnel's app side (`leg`, e.g. a `TcpLeg`) to a new stream pair in-process."""
    near, far = pipe(loop)
    near.set_protocol(leg)
    leg.connection_made(near)
    return open_streams(far, loop)


def open_streams(
    end: PipeEnd, loop: asyncio.AbstractEventLoop
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An asyncio stream pair on `end` (its protocol becomes a StreamReaderProtocol)."""
    reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    end.set_protocol(protocol)
    protocol.connection_made(end)
    writer = asyncio.StreamWriter(end, protocol, reader, loop)
    return reader, writer
