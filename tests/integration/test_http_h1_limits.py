"""HTTP/1.1 limits of `ztagent.http.h1` on loopback: head size and count, head and idle
timeouts, requests per connection, and the client's bound on a response head."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ztagent.http.body import Body
from ztagent.http.h1 import MAX_HEAD_BYTES, MAX_HEADERS, H1Limits, Http1Client, serve_http1
from ztagent.http.messages import RequestHead, ResponseHead, UpstreamError

pytestmark = pytest.mark.integration


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 15))


async def _ok(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
    return ResponseHead(200, []), Body.of(b"ok")


@contextlib.asynccontextmanager
async def _server(limits: H1Limits | None = None) -> AsyncIterator[tuple[str, int]]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_http1(reader, writer, _ok, limits=limits)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        yield host, port
    finally:
        server.close()


async def _exchange(addr: tuple[str, int], data: bytes, pieces: int = 1) -> bytes:
    """Send `data` in `pieces` writes, then read until the server closes."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            writer.write(data[i : i + step])
            await writer.drain()
            await asyncio.sleep(0.01)
        return await asyncio.wait_for(reader.read(1 << 20), 5)
    finally:
        writer.close()


def _request(*headers: str) -> bytes:
    lines = ["GET / HTTP/1.1", "Host: x", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


def test_head_size_limit_is_envoys_60_kib() -> None:
    async def main() -> None:
        async with _server() as addr:
            below = _request("X-Big: " + "a" * (MAX_HEAD_BYTES - 1024))
            assert (await _exchange(addr, below, pieces=8)).startswith(b"HTTP/1.1 200 ")
            above = _request("X-Big: " + "a" * MAX_HEAD_BYTES)
            for pieces in (1, 8):
                reply = await _exchange(addr, above, pieces=pieces)
                assert reply.startswith(b"HTTP/1.1 431 "), reply[:60]

    run(main)


def test_header_count_limit_is_envoys_100() -> None:
    async def main() -> None:
        async with _server() as addr:
            # Host and Connection count too.
            fits = _request(*(f"X-{i}: v" for i in range(MAX_HEADERS - 2)))
            assert (await _exchange(addr, fits)).startswith(b"HTTP/1.1 200 ")
            many = _request(*(f"X-{i}: v" for i in range(MAX_HEADERS)))
            assert (await _exchange(addr, many)).startswith(b"HTTP/1.1 431 ")

    run(main)


def test_head_timeout_and_idle_timeout_close_the_connection() -> None:
    async def main() -> None:
        limits = H1Limits(head_timeout=0.3, idle_timeout=0.6)
        async with _server(limits) as addr:
            # Half a head: closed unanswered once the head timeout passes.
            reader, writer = await asyncio.open_connection(*addr)
            started = time.monotonic()
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            assert await asyncio.wait_for(reader.read(100), 5) == b""
            assert 0.2 < time.monotonic() - started < 2
            writer.close()
            # One answered request, then silence: closed once the idle timeout passes.
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
            assert reply.startswith(b"HTTP/1.1 200 ")
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(100), 5) == b""
            assert 0.5 < time.monotonic() - started < 3
            writer.close()

    run(main)


def test_max_requests_per_connection() -> None:
    async def main() -> None:
        async with _server(H1Limits(max_requests=2)) as addr:
            request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            reply = await _exchange(addr, request * 3)
            assert reply.count(b"HTTP/1.1 200 ") == 2

    run(main)


def test_client_refuses_a_response_head_over_60_kib() -> None:
    async def main() -> None:
        async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            big = b"x-big: " + b"a" * (MAX_HEAD_BYTES + 1024) + b"\r\n"
            for i in range(0, len(big), 4096):  # in pieces, as a slow origin would
                writer.write(big[i : i + 4096] if i else b"HTTP/1.1 200 OK\r\n" + big[:4096])
                await writer.drain()
            writer.write(b"content-length: 0\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(origin, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            client = Http1Client(reader, writer)
            with pytest.raises(UpstreamError):
                await client.request(RequestHead("GET", "x", "/", []), Body.empty())
            client.close()
        finally:
            server.close()

    run(main)
