"""A small asyncio HTTP/1.1 server for the agent's admin, metrics and readiness ports.

Owns only the plumbing: h11 parses and frames (sans-IO), this module moves bytes, looks the
path up in a route table `{path: handler}` and writes the handler's `Response`. Handlers
are plain functions (sync or async) of a `Request`. Limits keep a misbehaving client from
costing more than one connection: request heads and bodies are bounded, idle or slow
connections time out, keep-alive is capped per connection, and so is the connection count.
A malformed request is answered (400, or h11's hint such as 431) and its connection closed;
a handler that raises is answered 500 and logged; the server keeps serving either way.
It must not grow into a web framework: no middleware, no pattern routes, no TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

from ztagent.errors import LocalError

log = logging.getLogger(__name__)

METHODS = frozenset({"GET", "HEAD", "POST"})
_READ_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    peer: str = ""

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The last value of query parameter `name` ("" for a bare `?name`)."""
        values = self.query.get(name)
        return values[-1] if values else default

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class Response:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @classmethod
    def text(
        cls, body: str, status: int = 200, content_type: str = "text/plain; charset=utf-8"
    ) -> Response:
        return cls(status, (("content-type", content_type),), body.encode())

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        body = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
        return cls(status, (("content-type", "application/json"),), body.encode())


Handler = Callable[[Request], Response | Awaitable[Response]]


class _Reject(Exception):
    """The request cannot be served; answer `status` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class HttpServer:
    """Serves `routes` (exact paths) on one listening socket. `request_timeout` bounds both
    an idle keep-alive connection's wait and the reading of one whole request."""

    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        name: str = "http",
        max_head_bytes: int = 16 * 1024,
        max_body_bytes: int = 1024 * 1024,
        request_timeout: float = 30.0,
        max_connections: int = 64,
        max_requests_per_connection: int = 1000,
    ) -> None:
        self.routes = dict(routes)
        self.name = name
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_requests_per_connection = max_requests_per_connection
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        if self._server is not None:
            raise LocalError(f"{self.name} server already started")
        self._server = await asyncio.start_server(self._serve, host, port)
        log.info("%s server listening", self.name, extra={"fields": {"addr": self.url}})
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise LocalError(f"{self.name} server is not listening")
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop listening and end every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> HttpServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -------------------------------------------------------------------- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            if task is None or len(self._connections) >= self.max_connections:
                return
            self._connections.add(task)
            peer = writer.get_extra_info("peername")
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head_bytes)
            await self._serve_requests(conn, reader, writer, _peer_text(peer))
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("%s server: connection failed", self.name)
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_requests(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        for _ in range(self.max_requests_per_connection):
            try:
                # One deadline for the wait and the whole request: trickling bytes buys nothing.
                async with asyncio.timeout(self.request_timeout):
                    request = await self._read_request(conn, reader, writer, peer)
            except _Reject as e:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    log.debug("%s server: bad request from %s: %s", self.name, peer, e)
                    resp = Response.text(f"{e}\n", e.status)
                    await self._write(conn, writer, resp, head_only=False, close=True)
                return
            if request is None:
                return
            response = await self._dispatch(request)
            await self._write(conn, writer, response, head_only=request.method == "HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        budget = self.max_head_bytes + self.max_body_bytes + _READ_SIZE
        while budget > 0:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise _Reject(e.error_status_hint, f"bad request: {e}") from None
            if event is not h11.NEED_DATA:
                return event
            data = await reader.read(_READ_SIZE)
            budget -= max(len(data), 1)
            conn.receive_data(data)
        raise _Reject(413, "request too large")

    async def _read_request(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> Request | None:
        event = await self._next_event(conn, reader)
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):
            raise _Reject(400, "expected a request")
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("latin-1")
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers)
        head_size = len(method) + len(target) + sum(len(k) + len(v) + 4 for k, v in headers)
        if head_size > self.max_head_bytes:
            # h11 only limits heads that arrive in pieces; a whole one in a read passes.
            raise _Reject(431, "request head too large")
        length = next((v for k, v in headers if k == "content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise _Reject(413, "request body too large")
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        body = bytearray()
        for _ in range(self.max_body_bytes + 1):
            event = await self._next_event(conn, reader)
            if isinstance(event, h11.EndOfMessage):
                break
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body_bytes:
                    raise _Reject(413, "request body too large")
            elif isinstance(event, h11.ConnectionClosed):
                return None
        try:
            split = urlsplit(target)
        except ValueError:  # an unclosed "[" of an IPv6 host, among others
            raise _Reject(400, "bad request target") from None
        query: dict[str, tuple[str, ...]] = {}
        for k, v in parse_qsl(split.query, keep_blank_values=True):
            query[k] = (*query.get(k, ()), v)
        return Request(method, unquote(split.path) or "/", query, headers, bytes(body), peer)

    async def _dispatch(self, request: Request) -> Response:
        if request.method not in METHODS:
            allow = ", ".join(sorted(METHODS))
            return Response(405, (("allow", allow),), b"method not allowed\n")
        handler = self.routes.get(request.path)
        if handler is None:
            return Response.text("not found\n", 404)
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
            if not isinstance(result, Response):
                raise LocalError(f"handler for {request.path} returned {type(result).__name__}")
            return result
        except Exception:
            log.exception("%s server: handler for %s failed", self.name, request.path)
            return Response.text("internal error\n", 500)

    async def _write(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        response: Response,
        head_only: bool,
        close: bool = False,
    ) -> None:
        headers = [(k, v) for k, v in response.headers if k.lower() != "content-length"]
        headers.append(("content-length", str(len(response.body))))
        if close:
            headers.append(("connection", "close"))
        out = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if response.body and not head_only:
            out += conn.send(h11.Data(data=response.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        await writer.drain()


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer or "")
