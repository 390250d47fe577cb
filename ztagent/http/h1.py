"""HTTP/1.1 on h11 over asyncio streams: one downstream server connection, one upstream client.

`H1Connection` serves the requests of one downstream connection: each request head becomes a
`RequestHead`, its body streams into a `Body` while the handler runs, and the handler's
response is framed back (Content-Length, chunked, or close-delimited for HTTP/1.0). What a
client may cost is bounded by `H1Limits`: the size and count of request headers, how long a
request head may take to arrive, how long a kept-alive connection may sit idle, and how many
requests one connection carries. `Http1Client` is one upstream connection carrying one request
at a time, kept alive when both sides allow; the waypoint pools it, the OTLP exporter uses it
for its collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import h11

from ztagent.http.body import Body, BodyError
from ztagent.http.messages import (
    BODYLESS_METHODS,
    Handler,
    RequestHead,
    ResponseHead,
    UpstreamError,
    clean_headers,
    content_length,
    dec,
    enc,
    framed,
    has_no_body,
    reason,
)

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024

MAX_HEAD_BYTES = 60 * 1024
"""Envoy's `max_request_headers_kb` default (60 KiB): the most a request head may take; a
larger one is answered 431. Also the client's bound on a response head (Envoy's
`max_response_headers_kb`, 60 KiB)."""

MAX_HEADERS = 100
"""Envoy's `max_headers_count` default: more request headers are answered 431."""


@dataclass(frozen=True, slots=True)
class H1Limits:
    """What one downstream HTTP/1.1 connection may cost. Timeouts of None never fire.

    `head_timeout` bounds the arrival of a whole request head, counted from the connection's
    start for the first request and from the first byte for later ones (Envoy's
    `request_headers_timeout`); `idle_timeout` bounds the wait for that first byte between
    requests (Envoy's `idle_timeout`); after `max_requests` the connection closes (Envoy's
    `max_requests_per_connection`). A head past a timeout closes the connection unanswered.
    """

    max_head_bytes: int = MAX_HEAD_BYTES
    max_headers: int = MAX_HEADERS
    head_timeout: float | None = None
    idle_timeout: float | None = None
    max_requests: int | None = None


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


class _HeadTooLarge(Exception):
    pass


# ------------------------------------------------------------------ HTTP/1.1 server


def _h11_request_head(event: h11.Request, version: str) -> tuple[RequestHead, int | None]:
    """The neutral head of an h11 request and the body length h11 will deliver (None when
    chunked)."""
    raw = list(event.headers)
    method = dec(event.method).upper()
    target = dec(event.target)
    authority = next((dec(v) for n, v in raw if n == b"host"), "")
    scheme = "http"
    path = target
    match = re.match(r"(?i)(https?)://([^/?#]*)(.*)", target)
    if match:
        scheme, authority, path = match.group(1).lower(), match.group(2), match.group(3)
        path = path or "/"
    headers = clean_headers(raw)
    chunked = any(n == b"transfer-encoding" for n, _ in raw)
    length = None if chunked else (content_length(headers) or 0)
    head = RequestHead(method, authority, path, headers, scheme=scheme, protocol=version)
    return head, length


def _head_size(event: h11.Request) -> int:
    return (
        len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
    )


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
                body.end([(dec(n), dec(v)) for n, v in event.headers])
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


class H1Connection:
    """Serves HTTP/1.x requests on one downstream connection until it closes (`run`).

    Keep-alive follows h11 (HTTP/1.0 and `connection: close` close after the response). Request
    bodies stream into the Body while the handler runs; 100-continue is answered when the body is
    first needed. Responses use Content-Length when the Body has a `length`, else chunked
    (HTTP/1.1) or close-delimited (HTTP/1.0); trailers are sent only in chunked responses to
    clients that sent `te: trailers`. A handler exception answers 500 (if nothing was sent yet)
    and closes; a malformed request answers 400 (431 for a head over the limits) and closes.

    `idle` is True while no request is being served (none has arrived yet, or only part of its
    head), and `idle_since` tells since when (the loop's clock): what a server needs to pick a
    connection to close when it has too many.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Handler,
        *,
        limits: H1Limits | None = None,
        early: bytes = b"",
    ) -> None:
        self.limits = limits or H1Limits()
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes
        )
        if early:
            self._conn.receive_data(early)
        self._loop = asyncio.get_running_loop()
        self.idle = True
        self.idle_since = self._loop.time()
        self.requests = 0

    async def run(self) -> None:
        conn, writer = self._conn, self._writer
        try:
            while True:
                try:
                    event = await self._next_request()
                except h11.RemoteProtocolError as exc:
                    self._error_response(exc.error_status_hint)
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    return
                except _HeadTooLarge:
                    self._error_response(431)
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    return
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed, a timeout (None), or PAUSED (cannot happen here)
                self.idle = False
                self.requests += 1
                if not await self._exchange(event):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                limit = self.limits.max_requests
                if limit is not None and self.requests >= limit:
                    return
                conn.start_next_cycle()
                self.idle = True
                self.idle_since = self._loop.time()
        except ConnectionError:
            return
        finally:
            await _close_writer(writer)

    async def _next_request(self) -> Any:
        """The next h11 event of a request head within the limits, or None past a timeout."""
        conn, limits = self._conn, self.limits
        begun = self.requests == 0 or bool(conn.trailing_data[0])
        timeout = limits.head_timeout if begun else limits.idle_timeout
        deadline = None if timeout is None else self._loop.time() + timeout
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.Request) and (
                    len(event.headers) > limits.max_headers
                    or _head_size(event) > limits.max_head_bytes
                ):
                    # h11 bounds only heads that arrive in pieces; a whole one in a read passes.
                    raise _HeadTooLarge
                return event
            try:
                if deadline is None:
                    data = await self._reader.read(READ_SIZE)
                else:
                    async with asyncio.timeout_at(deadline):
                        data = await self._reader.read(READ_SIZE)
            except TimeoutError:
                return None
            except ConnectionError:
                data = b""
            if data and not begun:
                begun = True
                timeout = limits.head_timeout
                deadline = None if timeout is None else self._loop.time() + timeout
            conn.receive_data(data)

    def _error_response(self, status: int) -> None:
        headers = [(b"content-length", b"0"), (b"connection", b"close")]
        try:
            response = h11.Response(status_code=status, headers=headers, reason=reason(status))
            data = self._conn.send(response) or b""
            data += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return  # a response already started: nothing sensible to add
        self._writer.write(data)

    async def _exchange(self, request: h11.Request) -> bool:
        """One request and its response. True when the connection may continue."""
        conn, reader, writer = self._conn, self._reader, self._writer
        version = "HTTP/1.0" if request.http_version == b"1.0" else "HTTP/1.1"
        head, length = _h11_request_head(request, version)
        te_trailers = ("te", "trailers") in head.headers
        body = Body(length)
        pump = asyncio.ensure_future(_pump_h11_request(conn, reader, writer, body))
        resp_body: Body | None = None
        complete = False
        try:
            try:
                resp_head, resp_body = await self._handler(head, body)
            except Exception:
                log.exception("HTTP/1.1 handler failed for %s %s", head.method, head.path)
                self._error_response(500)
                await writer.drain()
                return False
            complete = await self._respond(head, resp_head, resp_body, te_trailers)
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

    async def _respond(
        self, head: RequestHead, resp_head: ResponseHead, resp_body: Body, te_trailers: bool
    ) -> bool:
        conn, writer = self._conn, self._writer
        status = resp_head.status
        no_body = has_no_body(head.method, status)
        headers = resp_head.headers if no_body else framed(resp_head.headers, resp_body.length)
        chunked = not no_body and resp_body.length is None and conn.their_http_version == b"1.1"
        response = h11.Response(
            status_code=status,
            headers=[(enc(n), enc(v)) for n, v in headers],
            reason=reason(status),
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
            end = h11.EndOfMessage(headers=[(enc(n), enc(v)) for n, v in trailers])
            writer.write(conn.send(end) or b"")
            await writer.drain()
        except BodyError as exc:
            log.debug("response body failed: %s", exc)
            return False
        except h11.LocalProtocolError as exc:
            log.warning("response to %s %s not sent whole: %s", head.method, head.path, exc)
            return False
        return True


async def serve_http1(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    *,
    early: bytes = b"",
    limits: H1Limits | None = None,
) -> None:
    """Serve HTTP/1.x requests on one connection until it closes (see `H1Connection`)."""
    await H1Connection(reader, writer, handler, limits=limits, early=early).run()


# ------------------------------------------------------------------ HTTP/1.1 client

_INLINE_BODY = 64 * 1024


class Http1Client:
    """One upstream HTTP/1.1 connection; one request at a time, kept alive when possible."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
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
        headers = [(b"host", enc(head.authority))]
        headers += [(enc(n), enc(v)) for n, v in head.headers if n != "content-length"]
        chunked = body.length is None
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        elif body.length or head.method not in BODYLESS_METHODS:
            headers.append((b"content-length", str(body.length).encode()))
        request = h11.Request(
            method=enc(head.method), target=enc(head.path or "/"), headers=headers
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
        no_body = has_no_body(head.method, resp_head.status)
        length = None if no_body else content_length(resp_head.headers)
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
            end = h11.EndOfMessage(headers=[(enc(n), enc(v)) for n, v in trailers])
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
                    size = len(event.reason) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                    if size > MAX_HEAD_BYTES:
                        raise UpstreamError("upstream response head too large", reset=False)
                    return ResponseHead(event.status_code, clean_headers(event.headers))
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
                    body.end([(dec(n), dec(v)) for n, v in event.headers])
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
