"""A stranger's idle sockets must not hold the readiness and admin ports.

The servers allow a bounded number of connections. Sockets that connect and send nothing (or
half a request head) used to fill that bound for the whole request timeout, renewable at will,
so a kubelet probe of /healthz/ready (bound to 0.0.0.0) failed for as long as the stranger
liked. Here more idle sockets than the cap are opened on loopback, then a good client's
request must be answered 200 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import pytest

from ztagent.http.messages import Response
from ztagent.http.server import HttpServer
from ztagent.telemetry.admin import build_admin_server, build_readiness_server

pytestmark = pytest.mark.integration

GOOD_CLIENT_BUDGET = 1.0


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 20) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout=timeout)

    asyncio.run(bounded())


async def _get(addr: tuple[str, int], path: str) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return await reader.read(65536)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _hold(addr: tuple[str, int], count: int, partial: bool) -> list[asyncio.StreamWriter]:
    """`count` connections that send nothing, or only the start of a request head."""
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection(*addr)
        if partial:
            writer.write(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n")
        writers.append(writer)
    await asyncio.sleep(0.2)  # let the server accept them all
    return writers


async def _good_client_latency(addr: tuple[str, int], path: str) -> float:
    started = time.monotonic()
    reply = await asyncio.wait_for(_get(addr, path), GOOD_CLIENT_BUDGET)
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:100]
    return elapsed


@pytest.mark.parametrize("partial", [False, True], ids=["silent", "half-head"])
def test_readiness_answers_past_more_idle_sockets_than_the_cap(partial: bool) -> None:
    async def main() -> None:
        server = build_readiness_server(lambda: True)
        addr = await server.start("127.0.0.1", 0)
        held: list[asyncio.StreamWriter] = []
        try:
            held = await _hold(addr, server.max_connections + 16, partial)
            for _ in range(3):
                latency = await _good_client_latency(addr, "/healthz/ready")
                assert latency < GOOD_CLIENT_BUDGET
        finally:
            for writer in held:
                writer.close()
            await server.close()

    run(main)


def test_admin_answers_past_more_idle_sockets_than_the_cap() -> None:
    async def main() -> None:
        server = build_admin_server(dict, lambda: None)
        addr = await server.start("127.0.0.1", 0)
        held: list[asyncio.StreamWriter] = []
        try:
            held = await _hold(addr, server.max_connections + 16, partial=False)
            await _good_client_latency(addr, "/config_dump")
        finally:
            for writer in held:
                writer.close()
            await server.close()

    run(main)


def test_a_silent_socket_is_closed_after_the_head_timeout() -> None:
    async def main() -> None:
        server = HttpServer({"/": lambda req: Response.text("ok\n")}, head_timeout=0.3)
        addr = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*addr)
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(100), 3) == b""
            assert 0.2 < time.monotonic() - started < 2
            writer.close()
            assert (await _get(addr, "/")).startswith(b"HTTP/1.1 200 ")
        finally:
            await server.close()

    run(main)
