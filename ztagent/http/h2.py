"""HTTP/2 for the waypoint, on h2: a server of one downstream connection and an upstream client.

Both ends share `_H2Link`: one h2 connection over an asyncio stream pair. Request and response
bodies are `Body` objects fed without waiting (`put_nowait`): the bound is the stream's receive
window (`H2_STREAM_WINDOW`), whose credit returns to the peer only as the consumer reads; all
streams of a connection together are bounded by `H2_CONNECTION_WINDOW`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

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
)

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
H2_STREAM_WINDOW = 64 * 1024
"""Per-stream receive window we advertise: the most one HTTP/2 stream buffers unread."""
H2_CONNECTION_WINDOW = 1024 * 1024
"""Connection receive window: bounds what all streams of one connection buffer together."""
H2_MAX_HEADER_LIST = 64 * 1024
"""SETTINGS_MAX_HEADER_LIST_SIZE we advertise (Envoy's max_request_headers_kb is 60 KiB)."""


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


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
                trailers = [(enc(n), enc(v)) for n, v in body.trailers]
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
                stream.trailers = clean_headers(event.headers or [])
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
    pseudo = {dec(n): dec(v) for n, v in pairs if n.startswith(b":")}
    return pseudo, clean_headers(pairs)


def _join_cookies(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """HTTP/2 may split `cookie` into crumbs; HTTP/1.1 wants one header (RFC 9113 8.2.3)."""
    crumbs = [v for n, v in headers if n == "cookie"]
    if len(crumbs) < 2:
        return headers
    out = [(n, v) for n, v in headers if n != "cookie"]
    out.append(("cookie", "; ".join(crumbs)))
    return out


# ------------------------------------------------------------------ HTTP/2 server


def _h2_connection(
    *, client_side: bool, settings: dict[h2.settings.SettingCodes, int]
) -> h2.connection.H2Connection:
    """An h2 connection with bytes headers and our stream window (H2_STREAM_WINDOW)."""
    config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    conn = h2.connection.H2Connection(config=config)
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: H2_STREAM_WINDOW, **settings},
    )
    return conn


class _H2Server(_H2Link):
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Handler,
        max_concurrent_streams: int,
    ) -> None:
        conn = _h2_connection(
            client_side=False,
            settings={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: H2_MAX_HEADER_LIST,
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
            (dec(v) for n, v in (event.headers or []) if n == b"host"), ""
        )
        head = RequestHead(
            method=pseudo.get(":method", "GET"),
            authority=authority,
            path=pseudo.get(":path", ""),
            headers=headers,
            scheme=pseudo.get(":scheme", "http"),
            protocol="HTTP/2",
        )
        length = content_length(headers)
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
            no_body = has_no_body(head.method, status)
            headers = resp_head.headers if no_body else framed(resp_head.headers, resp_body.length)
            block = [(b":status", str(status).encode())]
            block += [(enc(n), enc(v)) for n, v in headers]
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
        conn = _h2_connection(
            client_side=True,
            settings={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
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
            (b":method", enc(head.method)),
            (b":scheme", enc(head.scheme or "http")),
            (b":authority", enc(head.authority)),
            (b":path", enc(head.path or "/")),
        ]
        headers = framed(head.headers, body.length)
        if body.length == 0 and head.method in BODYLESS_METHODS:
            headers = [(n, v) for n, v in headers if n != "content-length"]
        block += [(enc(n), enc(v)) for n, v in headers]
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
        if has_no_body(stream.method, status):
            length: int | None = None
        else:
            length = content_length(headers)
        body = Body(length, on_consumed=self._acker(stream_id))
        stream.body = body
        stream.head.set_result((ResponseHead(status, headers), body))

    def _on_unwanted_data(self, stream_id: int, stream: _H2Stream) -> None:
        super()._on_unwanted_data(stream_id, stream)
        self._streams.pop(stream_id, None)
