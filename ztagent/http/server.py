"""Serving HTTP on asyncio streams: a small route-table server, and one connection of either
version for the waypoint.

`HttpServer` is the agent's admin, metrics and readiness server: it listens on one socket,
serves each connection with `H1Connection`, reads each request whole (bounded) into a
`Request`, looks the path up in a route table `{path: route}` and writes the route's
`Response`. Routes are plain functions (sync or async) of a `Request`. Limits keep a
misbehaving client from costing more than one connection: request heads and bodies are
bounded, slow or idle connections time out, keep-alive is capped per connection, and so is the
connection count. A malformed request is answered (400, or 431 for a head too large) and its
connection closed; a route that raises is answered 500 and logged; the server keeps serving
either way. It must not grow into a web framework: no middleware, no pattern routes, no TLS.

`serve_http` serves one already-accepted stream whose protocol is known (`ztagent.http.detect`)
with a streaming `Handler`: what the waypoint runs inside each HBONE tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from ztagent.errors import LocalError
from ztagent.http.body import Body, BodyError, read_all
from ztagent.http.h1 import H1Connection, H1Limits, serve_http1
from ztagent.http.h2 import serve_http2
from ztagent.http.messages import Handler, Request, RequestHead, Response, ResponseHead, peer_text

log = logging.getLogger(__name__)

METHODS = frozenset({"GET", "HEAD", "POST"})

HEAD_TIMEOUT = 10.0
"""A request head must be whole this long after the connection opens (or its first byte):
Envoy's `request_headers_timeout` idea, which Envoy leaves off by default; 10 s is ample for
a probe or a scrape and keeps a silent socket from holding a slot."""

IDLE_TIMEOUT = 30.0
"""How long a kept-alive connection may wait for its next request."""

Route = Callable[[Request], Response | Awaitable[Response]]


async def serve_http(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    protocol: Literal["http1", "http2"],
    *,
    early: bytes = b"",
    limits: H1Limits | None = None,
) -> None:
    """Serve one connection of a known HTTP version until it ends; `early` holds the bytes
    already read from it (those that told the version)."""
    if protocol == "http2":
        await serve_http2(reader, writer, handler, early=early)
    else:
        await serve_http1(reader, writer, handler, early=early, limits=limits)


class _Connection:
    """What the server knows of one of its connections, to choose one to close."""

    __slots__ = ("h1", "reading_since", "started")

    def __init__(self) -> None:
        self.h1: H1Connection | None = None
        self.reading_since: float | None = None  # reading a request body since
        self.started = asyncio.get_running_loop().time()

    def idle(self) -> bool:
        """No request in hand: waiting for (the rest of) a head, or for a body to arrive."""
        return self.h1 is None or self.h1.idle or self.reading_since is not None

    def idle_since(self) -> float:
        if self.h1 is None:
            return self.started
        if self.reading_since is not None:
            return self.reading_since
        return self.h1.idle_since


def _closing(response: Response) -> Response:
    return Response(response.status, (*response.headers, ("connection", "close")), response.body)


class HttpServer:
    """Serves `routes` (exact paths) on one listening socket.

    A request head must be whole within `head_timeout` of the connection's start (or, on a
    kept-alive connection, of its first byte); a kept-alive connection may wait `idle_timeout`
    for the next request; a request body must be read within `request_timeout`. When
    `max_connections` are open, a new connection closes the one that has been idle longest
    (no request in hand: none arrived yet, half a head, or a body still arriving), so idle
    sockets cannot hold the port; only when every connection is busy answering is the new one
    refused.
    """

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        name: str = "http",
        max_head_bytes: int = 16 * 1024,
        max_body_bytes: int = 1024 * 1024,
        head_timeout: float = HEAD_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        request_timeout: float = 30.0,
        max_connections: int = 64,
        max_requests_per_connection: int = 1000,
    ) -> None:
        self.routes = dict(routes)
        self.name = name
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_requests_per_connection = max_requests_per_connection
        self.limits = H1Limits(
            max_head_bytes=max_head_bytes,
            head_timeout=head_timeout,
            idle_timeout=idle_timeout,
            max_requests=max_requests_per_connection,
        )
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}

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

    def _make_room(self) -> bool:
        """Below the cap, or room made by closing the connection idle longest."""
        if len(self._connections) < self.max_connections:
            return True
        idle = [(c.idle_since(), task) for task, c in self._connections.items() if c.idle()]
        if not idle:
            return False
        _, oldest = min(idle, key=lambda pair: pair[0])
        oldest.cancel()
        del self._connections[oldest]  # its slot is free now, whenever its task ends
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            if task is None or not self._make_room():
                log.debug("%s server: every connection busy, one refused", self.name)
                return
            record = self._connections[task] = _Connection()
            peer = peer_text(writer.get_extra_info("peername"))

            async def handler(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
                response = await self._answer(head, body, peer, record)
                headers = [(k.lower(), v) for k, v in response.headers]
                headers = [(k, v) for k, v in headers if k != "content-length"]
                headers.append(("content-length", str(len(response.body))))
                return ResponseHead(response.status, headers), Body.of(response.body)

            record.h1 = H1Connection(reader, writer, handler, limits=self.limits)
            await record.h1.run()
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("%s server: connection failed", self.name)
        finally:
            if task is not None:
                self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(
        self, head: RequestHead, body: Body, peer: str, record: _Connection
    ) -> Response:
        """The response to one request; those that leave the connection unusable (a body
        too large, unreadable or too slow) close it."""
        if head.method not in METHODS:
            return Response.method_not_allowed(*sorted(METHODS))
        if body.length is not None and body.length > self.max_body_bytes:
            return _closing(Response.text("request body too large\n", 413))
        record.reading_since = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self.request_timeout):
                data = await read_all(body, self.max_body_bytes)
        except TimeoutError:
            return _closing(Response.text("request body too slow\n", 408))
        except BodyError as e:
            log.debug("%s server: bad request body from %s: %s", self.name, peer, e)
            return _closing(Response.text(f"bad request: {e}\n", 400))
        finally:
            record.reading_since = None
        if data is None:
            return _closing(Response.text("request body too large\n", 413))
        try:
            split = urlsplit(head.path)
        except ValueError:  # an unclosed "[" of an IPv6 host, among others
            return _closing(Response.text("bad request target\n", 400))
        query: dict[str, tuple[str, ...]] = {}
        for k, v in parse_qsl(split.query, keep_blank_values=True):
            query[k] = (*query.get(k, ()), v)
        request = Request(
            head.method, unquote(split.path) or "/", query, tuple(head.headers), data, peer
        )
        return await self._dispatch(request)

    async def _dispatch(self, request: Request) -> Response:
        route = self.routes.get(request.path)
        if route is None:
            return Response.text("not found\n", 404)
        try:
            result = route(request)
            if inspect.isawaitable(result):
                result = await result
            if not isinstance(result, Response):
                raise LocalError(f"route for {request.path} returned {type(result).__name__}")
            return result
        except Exception:
            log.exception("%s server: handler for %s failed", self.name, request.path)
            return Response.text("internal error\n", 500)
