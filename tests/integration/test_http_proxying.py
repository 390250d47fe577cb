"""The HTTP stack (`ztagent.http`) on loopback, between real clients and real servers.

A tiny forwarding proxy is built from the module under test: `sniff_protocol` on the first
bytes, then `serve_http1`/`serve_http2` downstream, and each request forwarded through
`Http1Client`/`Http2Client` to a backend. Clients are curl, httpx and grpcio; backends are an
h11 server written here and a grpcio server.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import h11
import httpx
import pytest

from ztagent.http.body import Body, BodyError
from ztagent.http.detect import sniff_protocol
from ztagent.http.h1 import Http1Client, serve_http1
from ztagent.http.h2 import Http2Client, serve_http2
from ztagent.http.messages import RequestHead, ResponseHead, UpstreamError

pytestmark = pytest.mark.integration

CURL = shutil.which("curl")
MiB = 1024 * 1024


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 10) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout=timeout)

    asyncio.run(bounded())


# ------------------------------------------------------------------ h11 backend


@dataclass
class Backend:
    """An HTTP/1.1 origin written directly on h11 (independent of the code under test)."""

    connections: int = 0
    requests: list[tuple[str, str, list[tuple[bytes, bytes]]]] = field(default_factory=list)
    counted: list[int] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)

        async def next_event() -> Any:
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                conn.receive_data(await reader.read(65536))

        def send(event: Any) -> None:
            writer.write(conn.send(event) or b"")

        try:
            while True:
                request = await next_event()
                if not isinstance(request, h11.Request):
                    return
                target = request.target.decode()
                self.requests.append((request.method.decode(), target, list(request.headers)))
                if target.startswith("/close"):
                    return  # close without answering
                size = 0
                small = bytearray()
                while not isinstance(event := await next_event(), h11.EndOfMessage):
                    size += len(event.data)
                    if len(small) < 65536:
                        small += event.data
                if target.startswith("/count"):
                    self.counted.append(size)
                    payload = str(size).encode()
                    send(
                        h11.Response(
                            status_code=200, headers=[("content-length", str(len(payload)))]
                        )
                    )
                    send(h11.Data(data=payload))
                    send(h11.EndOfMessage())
                elif target.startswith("/chunked"):
                    send(h11.Response(status_code=200, headers=[("content-type", "text/plain")]))
                    for part in (b"one,", b"two,", b"three"):
                        send(h11.Data(data=part))
                        await writer.drain()
                    send(h11.EndOfMessage())
                elif target.startswith("/trailers"):
                    send(h11.Response(status_code=200, headers=[("trailer", "x-checksum")]))
                    send(h11.Data(data=b"with trailers"))
                    send(h11.EndOfMessage(headers=[("x-checksum", "abc123")]))
                else:
                    host = dict(request.headers).get(b"host", b"").decode()
                    text = f"{request.method.decode()} {target} host={host} body=".encode()
                    payload = text + bytes(small)
                    headers = [("content-length", str(len(payload))), ("x-backend", "h11")]
                    send(h11.Response(status_code=200, headers=headers))
                    send(h11.Data(data=payload))
                    send(h11.EndOfMessage())
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError):
            return
        finally:
            writer.close()


# ------------------------------------------------------------------ forwarding proxy


@dataclass
class Proxy:
    """sniff -> serve_http1/serve_http2 -> Http1Client/Http2Client to one upstream port."""

    upstream_port: int
    upstream: Literal["h1", "h2"] = "h1"
    server: asyncio.Server | None = None
    h1_pool: list[Http1Client] = field(default_factory=list)
    h2_client: Http2Client | None = None
    errors: list[BaseException] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for client in self.h1_pool:
            client.close()
        if self.h2_client is not None:
            self.h2_client.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, early = await sniff_protocol(reader)
        self.protocols.append(kind)
        if kind == "http2":
            await serve_http2(reader, writer, self.forward, early=early)
        elif kind == "http1":
            await serve_http1(reader, writer, self.forward, early=early)
        else:
            writer.close()

    async def forward(self, head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        try:
            if self.upstream == "h2":
                if self.h2_client is None or self.h2_client.available == 0:
                    r, w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                    self.h2_client = Http2Client(r, w)
                return await self.h2_client.request(head, body)
            client = next((c for c in self.h1_pool if c.reusable), None)
            if client is None:
                r, w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                client = Http1Client(r, w)
                self.h1_pool.append(client)
            return await client.request(head, body)
        except UpstreamError as exc:
            self.errors.append(exc)
            status = 503 if exc.reset else 502
            return ResponseHead(status, [("content-type", "text/plain")]), Body.of(
                str(exc).encode()
            )


@contextlib.asynccontextmanager
async def stack(upstream: Literal["h1", "h2"] = "h1") -> AsyncIterator[tuple[Backend, Proxy]]:
    backend = Backend()
    await backend.start()
    proxy = Proxy(backend.port, upstream)
    try:
        await proxy.start()
        yield backend, proxy
    finally:
        await proxy.stop()
        await backend.stop()


async def curl(*args: str) -> tuple[int, bytes]:
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        CURL,
        "-s",
        "--noproxy",
        "*",
        "--max-time",
        "5",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 8)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out


# ------------------------------------------------------------------ curl


@pytest.mark.skipif(CURL is None, reason="curl not installed")
@pytest.mark.parametrize("version", ["--http1.1", "--http2-prior-knowledge"])
def test_curl_get_and_post_through_proxy(version: str) -> None:
    async def main() -> None:
        async with stack() as (_backend, proxy):
            base = f"http://127.0.0.1:{proxy.port}"
            rc, out = await curl(version, f"{base}/hello?x=1")
            assert rc == 0
            assert out == f"GET /hello?x=1 host=127.0.0.1:{proxy.port} body=".encode()
            rc, out = await curl(version, "--data-binary", "payload-123", f"{base}/echo")
            assert rc == 0
            assert out.endswith(b"POST /echo host=127.0.0.1:%d body=payload-123" % proxy.port)
            rc, out = await curl(version, "-D", "-", f"{base}/chunked")
            assert rc == 0 and out.endswith(b"one,two,three")
            if version == "--http1.1":
                assert b"transfer-encoding: chunked" in out.lower()
                expect = ("-H", "Expect: 100-continue", "--data-binary", "after-continue")
                rc, out = await curl(version, "-D", "-", *expect, f"{base}/echo")
                assert rc == 0 and out.startswith(b"HTTP/1.1 100 Continue")
                assert out.endswith(b"body=after-continue")
            n = 4 if version == "--http1.1" else 3
            assert proxy.protocols == ["http1" if version == "--http1.1" else "http2"] * n
            assert not proxy.errors

    run(main)


@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_response_trailers_over_http2_end_to_end() -> None:
    """h11 backend sends chunked trailers -> Http1Client -> serve_http2 -> curl over HTTP/2,
    and the same through Http2Client as the downstream client."""

    async def main() -> None:
        async with stack() as (_backend, proxy):
            url = f"http://127.0.0.1:{proxy.port}/trailers"
            rc, out = await curl("--http2-prior-knowledge", "-D", "-", "-H", "te: trailers", url)
            assert rc == 0
            assert b"x-checksum: abc123" in out
            assert b"with trailers" in out

            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            client = Http2Client(reader, writer)
            try:
                head = RequestHead(
                    "GET", f"127.0.0.1:{proxy.port}", "/trailers", [("te", "trailers")]
                )
                resp, body = await client.request(head, Body.empty())
                assert resp.status == 200
                assert [c async for c in body] == [b"with trailers"]
                assert body.trailers == [("x-checksum", "abc123")]
            finally:
                client.close()

    run(main)


# ------------------------------------------------------------------ httpx


@pytest.mark.parametrize("http2", [False, True])
def test_httpx_keepalive_reuses_one_upstream_connection(http2: bool) -> None:
    async def main() -> None:
        async with (
            stack() as (backend, proxy),
            httpx.AsyncClient(http1=not http2, http2=http2, trust_env=False, timeout=5) as client,
        ):
            base = f"http://127.0.0.1:{proxy.port}"
            for i in range(5):
                response = await client.get(f"{base}/get/{i}")
                assert response.status_code == 200
                assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                assert response.text.startswith(f"GET /get/{i} ")
                assert response.headers["x-backend"] == "h11"
                response = await client.post(f"{base}/post/{i}", content=b"x" * (1000 * i))
                assert response.text.endswith("body=" + "x" * (1000 * i))
            assert backend.connections == 1
            assert len(backend.requests) == 10
            assert len(proxy.protocols) == 1

    run(main)


@pytest.mark.parametrize("http2", [False, True])
def test_streamed_upload_64mib_stays_bounded(http2: bool) -> None:
    """64 MiB of streamed upload through serve_http1 (chunked) or serve_http2 (flow-controlled)
    -> Http1Client; peak traced memory of the whole process (client, proxy, backend) stays far
    below the body size."""
    chunk = b"z" * 65536
    total = (16 if http2 else 64) * MiB  # h2's pure-Python framing is slower: keep it brief

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(total // len(chunk)):
            yield chunk

    async def main() -> None:
        async with (
            stack() as (backend, proxy),
            httpx.AsyncClient(http1=not http2, http2=http2, trust_env=False, timeout=10) as client,
        ):
            url = f"http://127.0.0.1:{proxy.port}/count"
            await client.get(f"http://127.0.0.1:{proxy.port}/warm")  # open connections first
            tracemalloc.start()
            try:
                tracemalloc.reset_peak()
                response = await client.post(url, content=gen())
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert response.status_code == 200
            assert response.text == str(total)
            assert backend.counted == [total]
            assert peak < 4 * MiB, f"peak traced memory {peak} bytes"

    run(main, timeout=30)


def test_http10_client_gets_a_close_delimited_response() -> None:
    async def main() -> None:
        async with stack() as (_backend, proxy):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"GET /chunked HTTP/1.0\r\nHost: example\r\n\r\n")
                await writer.drain()
                reply = await asyncio.wait_for(reader.read(), 5)  # until the proxy closes
            finally:
                writer.close()
            head, _, payload = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"transfer-encoding" not in head.lower()
            assert b"content-length" not in head.lower()
            assert payload == b"one,two,three"

    run(main)


# ------------------------------------------------------------------ errors


def test_upstream_closing_before_the_head_is_a_reset() -> None:
    async def main() -> None:
        async with stack() as (backend, proxy):
            reader, writer = await asyncio.open_connection("127.0.0.1", backend.port)
            client = Http1Client(reader, writer)
            try:
                head = RequestHead("GET", "backend", "/close", [])
                with pytest.raises(UpstreamError) as info:
                    await client.request(head, Body.empty())
                assert info.value.reset is True
                assert client.closed and not client.reusable
            finally:
                client.close()
            async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
                response = await http.get(f"http://127.0.0.1:{proxy.port}/close")
            assert response.status_code == 503
            assert isinstance(proxy.errors[0], UpstreamError) and proxy.errors[0].reset

    run(main)


def test_handler_error_is_500_and_malformed_request_is_400() -> None:
    async def failing(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        raise RuntimeError("boom")

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, early = await sniff_protocol(reader)
        if kind == "http2":
            await serve_http2(reader, writer, failing, early=early)
        else:
            await serve_http1(reader, writer, failing, early=early)

    async def main() -> None:
        server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for http2 in (False, True):
                async with httpx.AsyncClient(
                    http1=not http2, http2=http2, trust_env=False, timeout=5
                ) as client:
                    response = await client.get(f"http://127.0.0.1:{port}/")
                    assert response.status_code == 500
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nbad header line\r\n\r\n")
                await writer.drain()
                reply = await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()
            assert reply.startswith(b"HTTP/1.1 400 ")
        finally:
            server.close()
            await server.wait_closed()

    run(main)


# ------------------------------------------------------------------ gRPC


def _grpc_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"echo:" + request


def _grpc_missing(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("abort returns only by raising")


@contextlib.contextmanager
def grpc_server() -> Any:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "Unary": grpc.unary_unary_rpc_method_handler(_grpc_unary),
        "Missing": grpc.unary_unary_rpc_method_handler(_grpc_missing),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def test_grpc_through_serve_http2_and_http2_client() -> None:
    def call(port: int) -> tuple[bytes, grpc.StatusCode, str | None]:
        options = [("grpc.enable_http_proxy", 0)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/test.Echo/Unary"
            )
            reply = unary(b"ping", timeout=5)
            missing: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/test.Echo/Missing"
            )
            try:
                missing(b"x", timeout=5)
            except grpc.RpcError as err:
                return reply, err.code(), err.details()
            raise AssertionError("the NOT_FOUND call succeeded")

    async def main() -> None:
        with grpc_server() as grpc_port:
            proxy = Proxy(grpc_port, "h2")
            await proxy.start()
            try:
                reply, code, details = await asyncio.to_thread(call, proxy.port)
            finally:
                await proxy.stop()
        assert reply == b"echo:ping"
        assert code == grpc.StatusCode.NOT_FOUND
        assert details == "no such thing"
        assert proxy.protocols == ["http2"]
        assert not proxy.errors

    run(main)


# ------------------------------------------------------------------ HTTP/2 resets


def test_http2_stream_reset_fails_the_body_and_a_closed_upstream_is_a_reset() -> None:
    seen: list[bytes | BaseException] = []
    got_part = asyncio.Event()

    async def reading(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        try:
            while chunk := await body.read():
                seen.append(chunk)
                got_part.set()
        except BodyError as exc:
            seen.append(exc)
            raise
        return ResponseHead(200, []), Body.empty()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _kind, early = await sniff_protocol(reader)
        await serve_http2(reader, writer, reading, early=early)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        closer = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        clients: list[Http2Client] = []
        try:
            r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            clients.append(client := Http2Client(r, w))
            body = Body()
            call = asyncio.ensure_future(client.request(RequestHead("POST", "a", "/", []), body))
            await body.feed(b"part")
            await asyncio.wait_for(got_part.wait(), 5)
            body.fail(BodyError("downstream went away"))  # -> RST_STREAM(CANCEL) upstream
            with pytest.raises(UpstreamError):
                await asyncio.wait_for(call, 5)
            for _ in range(100):
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.01)
            assert seen[0] == b"part" and isinstance(seen[1], BodyError)
            assert client.active_streams == 0 and client.available > 0

            r, w = await asyncio.open_connection("127.0.0.1", closer.sockets[0].getsockname()[1])
            clients.append(gone := Http2Client(r, w))
            with pytest.raises(UpstreamError) as info:
                await gone.request(RequestHead("GET", "a", "/", []), Body.empty())
            assert info.value.reset is True
            assert gone.closed and gone.available == 0
        finally:
            for c in clients:
                c.close()
            server.close()
            closer.close()
            await server.wait_closed()
            await closer.wait_closed()

    run(main)
