"""A streamed message body with backpressure, shared by the HTTP/1.1 and HTTP/2 sides.

Bodies are never held whole. A `Body` is a bounded queue between one producer and one consumer:
over HTTP/1.1 the producer waits (`feed`) while more than `limit` bytes are unread, which stops
reading the socket; over HTTP/2 the producer never waits (one connection carries many streams)
and the bound is the stream's flow-control window, whose credit is returned to the peer only as
the consumer reads. Failing a Body from either side (`fail`) tells the other side to stop: a
consumer that goes away makes the producer's next `feed` raise `BodyError`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable

DEFAULT_BODY_LIMIT = 64 * 1024
"""Unread bytes a Body holds before its HTTP/1.1 producer waits."""


class BodyError(Exception):
    """The body could not be read or written: peer reset, malformed framing, connection lost,
    or the other side of the Body gave up."""


class Body:
    """A streamed message body with backpressure, between one producer and one consumer.

    Producer: `await feed(data)` (waits while more than `limit` bytes are unread),
    `put_nowait(data)` (never waits: for producers bounded by flow control), `end(trailers)`,
    `fail(exc)`. Consumer: `await read()` (next chunk, b"" once ended; raises BodyError after a
    failure), `trailers` (valid after the end), `length` (declared Content-Length or None),
    `bytes_read`. `on_consumed(n)` is called as n buffered bytes are read or dropped.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_ended",
        "_error",
        "_limit",
        "_on_consumed",
        "_readable",
        "_writable",
        "bytes_read",
        "length",
        "trailers",
    )

    def __init__(
        self,
        length: int | None = None,
        *,
        limit: int = DEFAULT_BODY_LIMIT,
        on_consumed: Callable[[int], None] | None = None,
    ) -> None:
        self.length = length
        self.trailers: list[tuple[str, str]] = []
        self.bytes_read = 0
        self._limit = limit
        self._on_consumed = on_consumed
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._ended = False
        self._error: BodyError | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    @classmethod
    def empty(cls) -> Body:
        body = cls(0)
        body.end()
        return body

    @classmethod
    def of(cls, data: bytes) -> Body:
        body = cls(len(data), limit=max(len(data), 1))
        if data:
            body.put_nowait(data)
        body.end()
        return body

    # -- state

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet read."""
        return self._buffered

    @property
    def ended(self) -> bool:
        """The producer has called `end`."""
        return self._ended

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def exhausted(self) -> bool:
        """Ended, failed, or nothing left to read: no further `read` returns data."""
        return self._error is not None or (self._ended and not self._chunks)

    # -- producer

    async def feed(self, data: bytes) -> None:
        """Queue `data`; wait while more than `limit` bytes are unread. Raises BodyError if the
        body failed (the consumer went away), before or while waiting."""
        self.put_nowait(data)
        while self._buffered > self._limit and self._error is None:
            self._writable.clear()
            await self._writable.wait()
        if self._error is not None:
            raise BodyError(str(self._error))

    def put_nowait(self, data: bytes) -> None:
        """Queue `data` without waiting (the producer is bounded some other way)."""
        if self._error is not None:
            raise BodyError(str(self._error))
        if self._ended:
            raise RuntimeError("data after the end of the body")
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            self._readable.set()

    def end(self, trailers: Iterable[tuple[str, str]] | None = None) -> None:
        if self._ended or self._error is not None:
            return
        self.trailers = list(trailers or ())
        self._ended = True
        self._readable.set()

    def fail(self, exc: BaseException) -> None:
        """Fail the body: the reader gets BodyError, the producer's next `feed` raises. Buffered
        bytes are dropped. No effect once the body has been read to its end."""
        if self._error is not None or (self._ended and not self._chunks):
            return
        self._error = exc if isinstance(exc, BodyError) else BodyError(str(exc) or repr(exc))
        dropped = self._buffered
        self._chunks.clear()
        self._buffered = 0
        self._readable.set()
        self._writable.set()
        if dropped and self._on_consumed is not None:
            self._on_consumed(dropped)

    # -- consumer

    async def read(self) -> bytes:
        while True:
            if self._error is not None:
                raise BodyError(str(self._error)) from self._error
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                self.bytes_read += len(chunk)
                if self._buffered <= self._limit:
                    self._writable.set()
                if self._on_consumed is not None:
                    self._on_consumed(len(chunk))
                return chunk
            if self._ended:
                return b""
            self._readable.clear()
            await self._readable.wait()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk


async def read_all(body: Body, limit: int) -> bytes | None:
    """The whole of `body`, or None once more than `limit` bytes arrived (the rest unread)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await body.read():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)
