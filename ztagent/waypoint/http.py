"""HTTP/1.1 and HTTP/2 for the waypoint: servers and clients over asyncio streams.

This module owns the HTTP wire inside an HBONE tunnel: telling HTTP/2, HTTP/1.x and opaque TCP
apart from the first bytes (`detect_protocol`), serving requests on a downstream stream
(`serve_http1` with h11, `serve_http2` with h2) and forwarding them on upstream streams
(`Http1Client`, `Http2Client`). It does not route, authorize, retry or pool: the waypoint proxy
does that with the protocol-neutral `RequestHead`/`ResponseHead` and streamed `Body` objects
defined here, which carry the same meaning whichever HTTP version produced them.

Bodies are never held whole. A `Body` is a bounded queue between one producer and one consumer:
over HTTP/1.1 the producer waits (`feed`) while more than `limit` bytes are unread, which stops
reading the socket; over HTTP/2 the producer never waits (one connection carries many streams)
and the bound is the stream's flow-control window, whose credit is returned to the peer only as
the consumer reads. Failing a Body from either side (`fail`) tells the other side to stop: a
consumer that goes away makes the producer's next `feed` raise `BodyError`.

Heads hold lower-case header names without pseudo-headers and without hop-by-hop headers
(`HOP_BY_HOP`, plus any named in `Connection`), except `te: trailers`, which gRPC needs and
HTTP/2 allows. `content-length` may appear in a head; when a message is sent, the Body's
`length` decides the framing and any `content-length` header is replaced by it (except for
responses that have no body: HEAD, 204, 304, where the headers pass as they are).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11

log = logging.getLogger(__name__)

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "http2-settings",
        "host",
    }
)

DEFAULT_BODY_LIMIT = 64 * 1024
"""Unread bytes a Body holds before its HTTP/1.1 producer waits."""

MAX_REQUEST_LINE = 8 * 1024
"""How long `detect_protocol` waits for an HTTP/1.x request line before calling it TCP."""

READ_SIZE = 64 * 1024
H2_STREAM_WINDOW = 64 * 1024
"""Per-stream receive window we advertise: the most one HTTP/2 stream buffers unread."""
H2_CONNECTION_WINDOW = 1024 * 1024
"""Connection receive window: bounds what all streams of one connection buffer together."""

_NO_BODY_STATUSES = frozenset({204, 304})
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

Protocol = Literal["http2", "http1", "tcp", "more"]


# ------------------------------------------------------------------ protocol detection

_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e\x80-\xff]+ HTTP/1\.[01]\r\n")


def detect_protocol(data: bytes) -> Protocol:
    """From the first bytes of a stream: the HTTP/2 preface -> "http2"; an HTTP/1.x request line
    (token method, SP, target, SP, HTTP/1.0 or HTTP/1.1, CRLF) -> "http1"; "more" while the bytes
    so far are a prefix of either and shorter than needed (at most 8 KiB for a request line);
    anything else -> "tcp"."""
    if not data:
        return "more"
    if data.startswith(HTTP2_PREFACE):
        return "http2"
    if HTTP2_PREFACE.startswith(data):
        return "more"
    end = data.find(b"\r\n", 0, MAX_REQUEST_LINE)
    if end >= 0:
        return "http1" if _REQUEST_LINE.fullmatch(data, 0, end + 2) else "tcp"
    if len(data) >= MAX_REQUEST_LINE:
        return "tcp"
    return "more" if _is_request_line_prefix(data) else "tcp"


def _is_request_line_prefix(data: bytes) -> bool:
    """Whether `data` (no CRLF in it) can still grow into a valid HTTP/1.x request line."""
    parts = data.split(b" ")
    if len(parts) > 3:
        return False
    method = parts[0]
    if not all(c in _TOKEN_CHARS for c in method):
        return False
    if len(parts) == 1:
        return True
    if not method:
        return False
    target = parts[1]
    if any(c <= 0x20 or c == 0x7F for c in target):
        return False
    if len(parts) == 2:
        return True
    if not target:
        return False
    version = parts[2]
    return any((v + b"\r").startswith(version) for v in (b"HTTP/1.0", b"HTTP/1.1"))


async def sniff_protocol(reader: asyncio.StreamReader) -> tuple[Protocol, bytes]:
    """Read from `reader` until `detect_protocol` decides; returns the answer and the bytes read
    (to pass on as `early`). At end of stream an undecided prefix counts as "tcp"."""
    data = b""
    while True:
        kind = detect_protocol(data)
        if kind != "more":
            return kind, data
        chunk = await reader.read(MAX_REQUEST_LINE)
        if not chunk:
            return "tcp", data
        data += chunk


# ------------------------------------------------------------------ heads and bodies


@dataclass(slots=True)
class RequestHead:
    method: str
    authority: str
    path: str
    headers: list[tuple[str, str]]
    scheme: str = "http"
    protocol: str = "HTTP/1.1"


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: list[tuple[str, str]]


class BodyError(Exception):
    """The body could not be read or written: peer reset, malformed framing, connection lost,
    or the other side of the Body gave up."""


class UpstreamError(Exception):
    """The upstream failed before a response head arrived. `reset` is True when the connection
    or stream was reset or closed (Envoy's "reset"), False for e.g. a protocol error."""

    def __init__(self, message: str, *, reset: bool) -> None:
        super().__init__(message)
        self.reset = reset


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


Handler = Callable[[RequestHead, Body], Awaitable[tuple[ResponseHead, Body]]]


# ------------------------------------------------------------------ header helpers


def _dec(value: bytes) -> str:
    return value.decode("latin-1")


def _enc(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _clean_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Lower-case names; drop pseudo-headers, hop-by-hop headers and those named in
    `Connection`; keep `te: trailers`."""
    pairs = [(_dec(n).lower(), _dec(v)) for n, v in raw]
    named = {
        token.strip().lower()
        for name, value in pairs
        if name == "connection"
        for token in value.split(",")
    }
    out: list[tuple[str, str]] = []
    for name, value in pairs:
        if name.startswith(":"):
            continue
        if name == "te":
            if "trailers" in (t.strip().lower() for t in value.split(",")):
                out.append(("te", "trailers"))
            continue
        if name in HOP_BY_HOP or name in named:
            continue
        out.append((name, value))
    return out


def _content_length(headers: Iterable[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name == "content-length":
            with contextlib.suppress(ValueError):
                length = int(value.split(",")[0].strip())
                if length >= 0:
                    return length
            return None
    return None


def _framed(headers: list[tuple[str, str]], length: int | None) -> list[tuple[str, str]]:
    """`headers` with content-length replaced by `length` (none when unknown)."""
    out = [(n, v) for n, v in headers if n != "content-length"]
    if length is not None:
        out.append(("content-length", str(length)))
    return out


def _has_no_body(method: str, status: int) -> bool:
    return method == "HEAD" or status in _NO_BODY_STATUSES or 100 <= status < 200


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


# ------------------------------------------------------------------ HTTP/1.1 server


async def _h11_next(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    """The next h11 event, reading from `reader` as h11 needs data (EOF on errors)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await reader.read(READ_SIZE)
        except ConnectionError:
            data = b""
        conn.receive_data(data)


def _h11_request_head(event: h11.Request, version: str) -> tuple[RequestHead, int | None]:
    """The neutral head of an h11 request and the body length h11 will deliver (None when
    chunked)."""
    raw = list(event.headers)
    method = _dec(event.method).upper()
    target = _dec(event.target)
    authority = next((_dec(v) for n, v in raw if n == b"host"), "")
    scheme = "http"
    path = target
    match = re.match(r"(?i)(https?)://([^/?#]*)(.*)", target)
    if match:
        scheme, authority, path = match.group(1).lower(), match.group(2), match.group(3)
        path = path or "/"
    headers = _clean_headers(raw)
    chunked = any(n == b"transfer-encoding" for n, _ in raw)
    length = None if chunked else (_content_length(headers) or 0)
    head = RequestHead(method, authority, path, headers, scheme=scheme, protocol=version)
    return head, length


async def _pump_h11_request(
    conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: Body
) -> bool:
    """Move one request body from the connection into `body`. True when it arrived whole."""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    continue_ = h11.InformationalResponse(
                        status_code=100, headers=[], reason=b"Continue"
                    )
                    writer.write(conn.send(continue_) or b"")
                try:
                    data = await reader.read(READ_SIZE)
                except ConnectionError:
                    data = b""
                conn.receive_data(data)
            elif isinstance(event, h11.Data):
                await body.feed(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                body.end([(_dec(n), _dec(v)) for n, v in event.headers])
                return True
            else:
                body.fail(BodyError("connection closed in the request body"))
                return False
    except h11.RemoteProtocolError as exc:
        body.fail(BodyError(f"malformed request body: {exc}"))
    except BodyError:
        pass  # the handler gave up on the body
    except h11.LocalProtocolError as exc:
        body.fail(BodyError(str(exc)))
    return False


async def serve_http1(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    *,
    early: bytes = b"",
) -> None:
    """Serve HTTP/1.x requests on one connection until it closes.

    Keep-alive follows h11 (HTTP/1.0 and `connection: close` close after the response). Request
    bodies stream into the Body while the handler runs; 100-continue is answered when the body is
    first needed. Responses use Content-Length when the Body has a `length`, else chunked
    (HTTP/1.1) or close-delimited (HTTP/1.0); trailers are sent only in chunked responses to
    clients that sent `te: trailers`. A handler exception answers 500 (if nothing was sent yet)
    and closes; a malformed request answers 400 and closes.
    """
    conn = h11.Connection(h11.SERVER)
    if early:
        conn.receive_data(early)
    try:
        while True:
            try:
                event = await _h11_next(conn, reader)
            except h11.RemoteProtocolError as exc:
                _h11_error_response(conn, writer, exc.error_status_hint)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed (or PAUSED, which cannot happen here)
            if not await _serve_h11_exchange(conn, reader, writer, handler, event):
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except ConnectionError:
        return
    finally:
        await _close_writer(writer)


def _h11_error_response(conn: h11.Connection, writer: asyncio.StreamWriter, status: int) -> None:
    headers = [(b"content-length", b"0"), (b"connection", b"close")]
    try:
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    except h11.LocalProtocolError:
        return  # a response already started: nothing sensible to add
    writer.write(data)


async def _serve_h11_exchange(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    request: h11.Request,
) -> bool:
    """One request and its response. True when the connection may continue."""
    version = "HTTP/1.0" if request.http_version == b"1.0" else "HTTP/1.1"
    head, length = _h11_request_head(request, version)
    te_trailers = ("te", "trailers") in head.headers
    body = Body(length)
    pump = asyncio.ensure_future(_pump_h11_request(conn, reader, writer, body))
    resp_body: Body | None = None
    complete = False
    try:
        try:
            resp_head, resp_body = await handler(head, body)
        except Exception:
            log.exception("HTTP/1.1 handler failed for %s %s", head.method, head.path)
            _h11_error_response(conn, writer, 500)
            await writer.drain()
            return False
        complete = await _send_h11_response(conn, writer, head, resp_head, resp_body, te_trailers)
        return complete
    finally:
        if resp_body is not None and not complete:
            resp_body.fail(BodyError("downstream connection closed"))
        if not body.ended and not pump.done():
            await asyncio.sleep(0)  # a body already received only needs the pump to run once
        if not body.ended:
            body.fail(BodyError("the response ended before the request body"))
            pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


async def _send_h11_response(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    head: RequestHead,
    resp_head: ResponseHead,
    resp_body: Body,
    te_trailers: bool,
) -> bool:
    status = resp_head.status
    no_body = _has_no_body(head.method, status)
    headers = resp_head.headers if no_body else _framed(resp_head.headers, resp_body.length)
    chunked = not no_body and resp_body.length is None and conn.their_http_version == b"1.1"
    response = h11.Response(
        status_code=status,
        headers=[(_enc(n), _enc(v)) for n, v in headers],
        reason=_reason(status),
    )
    try:
        writer.write(conn.send(response) or b"")
        if no_body:
            resp_body.fail(BodyError("this response has no body"))
        else:
            while chunk := await resp_body.read():
                writer.write(conn.send(h11.Data(data=chunk)) or b"")
                await writer.drain()
        trailers = resp_body.trailers if chunked and te_trailers else []
        end = h11.EndOfMessage(headers=[(_enc(n), _enc(v)) for n, v in trailers])
        writer.write(conn.send(end) or b"")
        await writer.drain()
    except BodyError as exc:
        log.debug("response body failed: %s", exc)
        return False
    except h11.LocalProtocolError as exc:
        log.warning("response to %s %s not sent whole: %s", head.method, head.path, exc)
        return False
    return True


# ------------------------------------------------------------------ HTTP/1.1 client


_INLINE_BODY = 64 * 1024


class Http1Client:
    """One upstream HTTP/1.1 connection; one request at a time, kept alive when possible."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = h11.Connection(h11.CLIENT)
        self._eof = False
        self._sender: asyncio.Task[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._idle_watch: asyncio.Task[None] | None = None
        self._request_body: Body | None = None
        self._response_body: Body | None = None
        self.busy = False
        self.closed = False

    @property
    def reusable(self) -> bool:
        return (
            not self.busy
            and not self.closed
            and self._conn.our_state is h11.IDLE
            and self._conn.their_state is h11.IDLE
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.busy = False
        current = asyncio.current_task()
        for task in (self._sender, self._receiver, self._idle_watch):
            if task is not None and task is not current:
                task.cancel()
        if self._response_body is not None:
            self._response_body.fail(BodyError("upstream connection closed"))
        if self._request_body is not None and not self._request_body.ended:
            self._request_body.fail(BodyError("upstream connection closed"))
        self._writer.close()

    async def _next_event(self) -> Any:
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self._reader.read(READ_SIZE)
            except ConnectionError:
                data = b""
            if not data:
                self._eof = True
            self._conn.receive_data(data)

    async def request(self, head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        """Send `head` and stream `body`; return when the response head arrives. The response
        Body is fed by a background task. Raises UpstreamError when the connection fails first."""
        if self.closed:
            raise UpstreamError("upstream connection closed", reset=True)
        if not self.reusable:
            raise RuntimeError("Http1Client takes one request at a time")
        if self._idle_watch is not None:
            self._idle_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_watch
            self._idle_watch = None
            if self.closed:
                raise UpstreamError("upstream closed the idle connection", reset=True)
        self.busy = True
        self._request_body = body
        self._response_body = None
        headers = [(b"host", _enc(head.authority))]
        headers += [(_enc(n), _enc(v)) for n, v in head.headers if n != "content-length"]
        chunked = body.length is None
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        elif body.length or head.method not in _BODYLESS_METHODS:
            headers.append((b"content-length", str(body.length).encode()))
        request = h11.Request(
            method=_enc(head.method), target=_enc(head.path or "/"), headers=headers
        )
        try:
            self._writer.write(self._conn.send(request) or b"")
        except h11.LocalProtocolError as exc:
            self.close()
            raise UpstreamError(f"request not sendable: {exc}", reset=False) from exc
        if body.ended and body.buffered <= _INLINE_BODY:
            # Complete and small: written now, in the same write burst as the head (one
            # segment on the wire) rather than from a task in a later loop iteration.
            await self._send_body(body, chunked)
        else:
            self._sender = asyncio.ensure_future(self._send_body(body, chunked))
        try:
            resp_head = await self._read_head(head.method)
        except BaseException:
            self.close()
            raise
        no_body = _has_no_body(head.method, resp_head.status)
        length = None if no_body else _content_length(resp_head.headers)
        resp_body = Body(length)
        self._response_body = resp_body
        self._receiver = asyncio.ensure_future(self._receive_body(resp_body))
        return resp_head, resp_body

    async def _send_body(self, body: Body, chunked: bool) -> None:
        try:
            while chunk := await body.read():
                self._writer.write(self._conn.send(h11.Data(data=chunk)) or b"")
                await self._writer.drain()
            trailers = body.trailers if chunked else []
            end = h11.EndOfMessage(headers=[(_enc(n), _enc(v)) for n, v in trailers])
            self._writer.write(self._conn.send(end) or b"")
            await self._writer.drain()
        except (BodyError, h11.LocalProtocolError) as exc:
            log.debug("request body not sent whole: %s", exc)
            self.close()
        except ConnectionError:
            self._eof = True  # the receiver sees the end of the connection too
            if self._response_body is not None:
                self.close()

    async def _read_head(self, method: str) -> ResponseHead:
        try:
            while True:
                event = await self._next_event()
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    return ResponseHead(event.status_code, _clean_headers(event.headers))
                raise UpstreamError("upstream closed before the response", reset=True)
        except h11.RemoteProtocolError as exc:
            if self._eof:
                raise UpstreamError(
                    "upstream closed the connection before the response", reset=True
                ) from exc
            raise UpstreamError(f"bad upstream response: {exc}", reset=False) from exc

    async def _receive_body(self, body: Body) -> None:
        try:
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    await body.feed(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    body.end([(_dec(n), _dec(v)) for n, v in event.headers])
                    break
                else:
                    body.fail(BodyError("upstream closed in the response body"))
                    self.close()
                    return
        except h11.RemoteProtocolError as exc:
            body.fail(BodyError(f"upstream response body: {exc}"))
            self.close()
            return
        except BodyError:
            self.close()  # the consumer went away: the rest of the body is unwanted
            return
        self._finish()

    def _finish(self) -> None:
        """After a whole response: back to idle when both sides are done, else close."""
        if self.closed:
            return
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self.busy = False
            self._request_body = None
            self._response_body = None
            self._idle_watch = asyncio.ensure_future(self._watch_idle())
        else:
            self.close()

    async def _watch_idle(self) -> None:
        """While idle, anything from upstream (normally its close) ends the connection."""
        with contextlib.suppress(ConnectionError):
            await self._reader.read(1)
        self.close()


# ------------------------------------------------------------------ HTTP/2 common


class _StreamGone(Exception):
    """The stream was reset or the connection closed while we were sending on it."""


@dataclass(slots=True, eq=False)
class _H2Stream:
    body: Body | None = None  # what the peer sends us on this stream
    window: asyncio.Event = field(default_factory=asyncio.Event)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    head: asyncio.Future[tuple[ResponseHead, Body]] | None = None
    task: asyncio.Task[None] | None = None
    method: str = "GET"
    reset: bool = False
    local_done: bool = False
    remote_done: bool = False


class _H2Link:
    """What the HTTP/2 server and client share: one h2 connection over a stream pair."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: h2.connection.H2Connection,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self._streams: dict[int, _H2Stream] = {}
        self._write_lock = asyncio.Lock()
        self._closed = False

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and not self._closed and not self._writer.is_closing():
            self._writer.write(data)

    async def _drain(self) -> None:
        async with self._write_lock:
            await self._writer.drain()

    def _acker(self, stream_id: int) -> Callable[[int], None]:
        def ack(n: int) -> None:
            if self._closed:
                return
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._conn.acknowledge_received_data(n, stream_id)
                self._flush()

        return ack

    def _reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        if self._closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._conn.reset_stream(stream_id, code)
            self._flush()

    def _wake_all(self) -> None:
        for stream in self._streams.values():
            stream.window.set()

    async def _wait_window(self, stream_id: int, stream: _H2Stream) -> int:
        while True:
            if stream.reset or self._closed:
                raise _StreamGone
            try:
                window = self._conn.local_flow_control_window(stream_id)
            except h2.exceptions.ProtocolError as exc:
                raise _StreamGone from exc
            if window > 0:
                return int(window)
            stream.window.clear()
            await stream.window.wait()

    async def _send_body(self, stream_id: int, stream: _H2Stream, body: Body) -> None:
        """Stream `body` as DATA within the peer's windows, then trailers or END_STREAM."""
        try:
            while chunk := await body.read():
                view = memoryview(chunk)
                while view:
                    window = await self._wait_window(stream_id, stream)
                    n = min(window, len(view), self._conn.max_outbound_frame_size)
                    self._conn.send_data(stream_id, bytes(view[:n]))
                    self._flush()
                    view = view[n:]
                    await self._drain()
            if stream.reset or self._closed:
                raise _StreamGone
            if body.trailers:
                trailers = [(_enc(n), _enc(v)) for n, v in body.trailers]
                self._conn.send_headers(stream_id, trailers, end_stream=True)
            else:
                self._conn.end_stream(stream_id)
            stream.local_done = True
            self._flush()
            await self._drain()
        except h2.exceptions.ProtocolError as exc:
            raise _StreamGone from exc

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        size = event.flow_controlled_length or 0
        data = event.data or b""
        if stream is None or stream.body is None:
            self._acker(event.stream_id)(size)
            return
        if size > len(data):
            self._acker(event.stream_id)(size - len(data))  # padding
        try:
            stream.body.put_nowait(data)
        except (BodyError, RuntimeError):
            self._acker(event.stream_id)(len(data))
            self._on_unwanted_data(event.stream_id, stream)

    def _on_unwanted_data(self, stream_id: int, stream: _H2Stream) -> None:
        """DATA arrived for a body nobody reads any more."""
        self._reset(stream_id, h2.errors.ErrorCodes.CANCEL)
        stream.reset = True
        stream.window.set()

    def _on_common_event(self, event: h2.events.Event) -> bool:
        """Events both ends handle alike; False when the event is not one of them."""
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream.trailers = _clean_headers(event.headers or [])
        elif isinstance(event, h2.events.WindowUpdated):
            if not event.stream_id:
                self._wake_all()
            elif (stream := self._streams.get(event.stream_id)) is not None:
                stream.window.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._wake_all()
        else:
            return False
        return True

    def _forget(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and (stream.reset or (stream.local_done and stream.remote_done)):
            del self._streams[stream_id]


def _h2_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    pairs = list(raw)
    pseudo = {_dec(n): _dec(v) for n, v in pairs if n.startswith(b":")}
    return pseudo, _clean_headers(pairs)


def _join_cookies(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """HTTP/2 may split `cookie` into crumbs; HTTP/1.1 wants one header (RFC 9113 8.2.3)."""
    crumbs = [v for n, v in headers if n == "cookie"]
    if len(crumbs) < 2:
        return headers
    out = [(n, v) for n, v in headers if n != "cookie"]
    out.append(("cookie", "; ".join(crumbs)))
    return out


# ------------------------------------------------------------------ HTTP/2 server


class _H2Server(_H2Link):
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Handler,
        max_concurrent_streams: int,
    ) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        conn = h2.connection.H2Connection(config=config)
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: H2_STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            },
        )
        super().__init__(reader, writer, conn)
        self._handler = handler

    async def run(self, early: bytes) -> None:
        self._conn.initiate_connection()
        self._conn.increment_flow_control_window(H2_CONNECTION_WINDOW - 65535)
        self._flush()
        data = early
        try:
            while True:
                if data:
                    try:
                        events = self._conn.receive_data(data)
                    except h2.exceptions.ProtocolError as exc:
                        log.debug("HTTP/2 protocol error from the client: %s", exc)
                        self._flush()  # h2 queued the GOAWAY
                        break
                    terminated = False
                    for event in events:
                        terminated |= self._on_event(event)
                    self._flush()
                    await self._drain()
                    if terminated:
                        break
                try:
                    data = await self._reader.read(READ_SIZE)
                except ConnectionError:
                    break
                if not data:
                    break
        except ConnectionError:
            pass
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        if not self._closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._conn.close_connection()
            self._flush()
        self._closed = True
        tasks = []
        for stream in self._streams.values():
            stream.reset = True
            stream.window.set()
            if stream.body is not None:
                stream.body.fail(BodyError("connection closed"))
            if stream.task is not None:
                stream.task.cancel()
                tasks.append(stream.task)
        self._streams.clear()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(ConnectionError):
            await self._drain()
        await _close_writer(self._writer)

    def _on_event(self, event: h2.events.Event) -> bool:
        """Handle one event; True when the connection is over."""
        if self._on_common_event(event):
            return False
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None and stream.body is not None:
                stream.body.end(stream.trailers)
                stream.remote_done = True
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream.reset = True
                stream.window.set()
                if stream.body is not None:
                    stream.body.fail(BodyError("client reset the stream"))
        elif isinstance(event, h2.events.ConnectionTerminated):
            return True
        return False

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id or 0
        pseudo, headers = _h2_headers(event.headers or [])
        headers = _join_cookies(headers)
        authority = pseudo.get(":authority") or next(
            (_dec(v) for n, v in (event.headers or []) if n == b"host"), ""
        )
        head = RequestHead(
            method=pseudo.get(":method", "GET"),
            authority=authority,
            path=pseudo.get(":path", ""),
            headers=headers,
            scheme=pseudo.get(":scheme", "http"),
            protocol="HTTP/2",
        )
        length = _content_length(headers)
        if event.stream_ended is not None:
            length = 0
        stream = _H2Stream(body=Body(length, on_consumed=self._acker(stream_id)))
        stream.method = head.method
        self._streams[stream_id] = stream
        stream.task = asyncio.ensure_future(self._run_stream(stream_id, stream, head))

    async def _run_stream(self, stream_id: int, stream: _H2Stream, head: RequestHead) -> None:
        assert stream.body is not None
        resp_body: Body | None = None
        started = False
        try:
            try:
                resp_head, resp_body = await self._handler(head, stream.body)
            except asyncio.CancelledError:
                raise
            except Exception:
                if stream.reset or self._closed:
                    log.debug("HTTP/2 handler ended with its stream gone", exc_info=True)
                    return
                log.exception("HTTP/2 handler failed for %s %s", head.method, head.path)
                if not stream.reset and not self._closed:
                    self._conn.send_headers(stream_id, [(b":status", b"500")], end_stream=True)
                    stream.local_done = True
                    self._flush()
                return
            if stream.reset or self._closed:
                return
            status = resp_head.status
            no_body = _has_no_body(head.method, status)
            headers = resp_head.headers if no_body else _framed(resp_head.headers, resp_body.length)
            block = [(b":status", str(status).encode())]
            block += [(_enc(n), _enc(v)) for n, v in headers]
            end_now = no_body or (resp_body.exhausted and not resp_body.trailers)
            self._conn.send_headers(stream_id, block, end_stream=end_now)
            started = True
            self._flush()
            if end_now:
                stream.local_done = True
                resp_body.fail(BodyError("this response has no body"))
            else:
                await self._send_body(stream_id, stream, resp_body)
            await self._drain()
        except BodyError as exc:
            log.debug("HTTP/2 response body failed: %s", exc)
            if started or resp_body is not None:
                self._reset(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            stream.reset = True
        except (_StreamGone, h2.exceptions.ProtocolError, ConnectionError):
            stream.reset = True
        finally:
            if resp_body is not None and not stream.local_done:
                resp_body.fail(BodyError("downstream stream closed"))
            if not stream.body.ended and not stream.reset:
                # Response complete before the request body: stop the client sending it.
                stream.body.fail(BodyError("the response ended before the request body"))
                self._reset(stream_id, h2.errors.ErrorCodes.NO_ERROR)
                stream.reset = True
            stream.remote_done = True
            self._forget(stream_id)


async def serve_http2(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    *,
    early: bytes = b"",
    max_concurrent_streams: int = 1000,
) -> None:
    """Serve HTTP/2 (prior knowledge: `early` starts with the preface) until the connection ends.

    Each stream runs `handler` in its own task. Request DATA feeds the Body and flow-control
    credit returns only as the handler reads. Response DATA respects the client's windows and
    frame size; trailers end the stream as a HEADERS frame. A handler exception answers 500, or
    RST_STREAM(INTERNAL_ERROR) once the response started. GOAWAY on close.
    """
    await _H2Server(reader, writer, handler, max_concurrent_streams).run(early)


# ------------------------------------------------------------------ HTTP/2 client


class Http2Client(_H2Link):
    """One upstream HTTP/2 connection (prior knowledge) carrying concurrent requests."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_concurrent_streams: int = 100,
    ) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        conn = h2.connection.H2Connection(config=config)
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: H2_STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            },
        )
        super().__init__(reader, writer, conn)
        self._max_streams = max_concurrent_streams
        self._goaway = False
        conn.initiate_connection()
        conn.increment_flow_control_window(H2_CONNECTION_WINDOW - 65535)
        self._flush()
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def active_streams(self) -> int:
        return int(self._conn.open_outbound_streams)

    @property
    def available(self) -> int:
        if self._closed or self._goaway:
            return 0
        peer_max = int(self._conn.remote_settings.max_concurrent_streams)
        return max(0, min(peer_max, self._max_streams) - self.active_streams)

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._conn.close_connection()
        self._flush()
        self._fail_all(None)
        self._closed = True
        if self._task is not asyncio.current_task():
            self._task.cancel()
        self._writer.close()

    def _fail_all(self, last_stream_id: int | None) -> None:
        """Fail streams above `last_stream_id` (all when None) as reset."""
        for stream_id, stream in list(self._streams.items()):
            if last_stream_id is not None and stream_id <= last_stream_id:
                continue
            self._fail_stream(stream, "upstream connection closed")
            del self._streams[stream_id]

    def _fail_stream(self, stream: _H2Stream, reason: str) -> None:
        stream.reset = True
        stream.window.set()
        if stream.head is not None and not stream.head.done():
            stream.head.set_exception(UpstreamError(reason, reset=True))
        elif stream.body is not None:
            stream.body.fail(BodyError(reason))
        if stream.task is not None and stream.task is not asyncio.current_task():
            stream.task.cancel()

    async def request(self, head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        """Send one request on a new stream; return when the response head arrives.
        RST_STREAM or GOAWAY before the head raises UpstreamError(reset=True); after it, the
        response Body fails with BodyError."""
        if self._closed or self._goaway:
            raise UpstreamError("upstream connection closed", reset=True)
        if self.available <= 0:
            raise UpstreamError("no stream available on the upstream connection", reset=False)
        stream_id = int(self._conn.get_next_available_stream_id())
        block = [
            (b":method", _enc(head.method)),
            (b":scheme", _enc(head.scheme or "http")),
            (b":authority", _enc(head.authority)),
            (b":path", _enc(head.path or "/")),
        ]
        headers = _framed(head.headers, body.length)
        if body.length == 0 and head.method in _BODYLESS_METHODS:
            headers = [(n, v) for n, v in headers if n != "content-length"]
        block += [(_enc(n), _enc(v)) for n, v in headers]
        end_now = body.length == 0 or (body.exhausted and not body.trailers)
        head_future: asyncio.Future[tuple[ResponseHead, Body]] = (
            asyncio.get_running_loop().create_future()
        )
        stream = _H2Stream(head=head_future, method=head.method, local_done=end_now)
        self._streams[stream_id] = stream
        try:
            self._conn.send_headers(stream_id, block, end_stream=end_now)
        except h2.exceptions.ProtocolError as exc:
            del self._streams[stream_id]
            raise UpstreamError(f"request not sendable: {exc}", reset=False) from exc
        self._flush()
        if not end_now:
            stream.task = asyncio.ensure_future(self._send_request_body(stream_id, stream, body))
        try:
            return await head_future
        except asyncio.CancelledError:
            self._reset(stream_id, h2.errors.ErrorCodes.CANCEL)
            self._fail_stream(stream, "request cancelled")
            self._streams.pop(stream_id, None)
            raise

    async def _send_request_body(self, stream_id: int, stream: _H2Stream, body: Body) -> None:
        try:
            await self._send_body(stream_id, stream, body)
        except BodyError as exc:
            log.debug("request body failed: %s", exc)
            self._reset(stream_id, h2.errors.ErrorCodes.CANCEL)
            self._fail_stream(stream, f"request body failed: {exc}")
        except _StreamGone:
            body.fail(BodyError("upstream stream closed"))
        except ConnectionError:
            body.fail(BodyError("upstream connection lost"))
        except asyncio.CancelledError:
            body.fail(BodyError("upstream stream closed"))
            raise
        finally:
            stream.local_done = True
            self._forget(stream_id)

    async def _run(self) -> None:
        try:
            while not self._closed:
                try:
                    data = await self._reader.read(READ_SIZE)
                except ConnectionError:
                    break
                if not data:
                    break
                try:
                    events = self._conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    log.debug("HTTP/2 protocol error from upstream: %s", exc)
                    self._flush()
                    break
                for event in events:
                    self._on_event(event)
                self._flush()
                await self._drain()
        except ConnectionError:
            pass
        finally:
            if not self._closed:
                self._fail_all(None)
                self._closed = True
                self._writer.close()

    def _on_event(self, event: h2.events.Event) -> None:
        if self._on_common_event(event):
            return
        if isinstance(event, h2.events.ResponseReceived):
            self._on_response(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream_id = event.stream_id or 0
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream.remote_done = True
                if stream.body is not None:
                    stream.body.end(stream.trailers)
                self._forget(stream_id)
        elif isinstance(event, h2.events.StreamReset):
            stream_id = event.stream_id or 0
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                self._fail_stream(stream, f"upstream reset the stream ({event.error_code!r})")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway = True
            self._fail_all(event.last_stream_id or 0)

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream_id = event.stream_id or 0
        stream = self._streams.get(stream_id)
        if stream is None or stream.head is None or stream.head.done():
            return
        pseudo, headers = _h2_headers(event.headers or [])
        try:
            status = int(pseudo.get(":status", ""))
        except ValueError:
            self._reset(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self._streams.pop(stream_id, None)
            stream.head.set_exception(UpstreamError("response without :status", reset=False))
            return
        if _has_no_body(stream.method, status):
            length: int | None = None
        else:
            length = _content_length(headers)
        body = Body(length, on_consumed=self._acker(stream_id))
        stream.body = body
        stream.head.set_result((ResponseHead(status, headers), body))

    def _on_unwanted_data(self, stream_id: int, stream: _H2Stream) -> None:
        super()._on_unwanted_data(stream_id, stream)
        self._streams.pop(stream_id, None)
