"""Half-open SOCKS5 handshakes on a real listener: they time out, and at the cap the oldest is
closed so a new client still gets through."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import uvloop

from ztagent.socks5.handshake import Reply
from ztagent.socks5.listener import (
    SOCKS5_HANDSHAKE_TIMEOUT,
    HandshakeSlots,
    ReplyFn,
    Socks5Listener,
)

pytestmark = pytest.mark.integration

GREETING = b"\x05\x01\x00"
REQUEST = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", 9)


def _answer(
    transport: asyncio.Transport,
    _client: tuple[str, int],
    _dest: tuple[str, int],
    _early: list[bytes],
    reply: ReplyFn,
) -> None:
    transport.write(reply(Reply.SUCCEEDED, None))
    transport.close()


@contextlib.contextmanager
def socks5_listener(timeout: float, cap: int) -> Iterator[tuple[int, HandshakeSlots]]:
    slots = HandshakeSlots(cap)
    started = threading.Event()
    port: list[int] = []
    stops: list[asyncio.Event] = []
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(
                lambda: Socks5Listener(
                    lambda _name: None, _answer, handshake_timeout=timeout, slots=slots
                ),
                "127.0.0.1",
                0,
            )
            stop = asyncio.Event()
            port.append(server.sockets[0].getsockname()[1])
            stops.append(stop)
            loops.append(loop)
            started.set()
            await stop.wait()
            server.close()

        uvloop.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield port[0], slots
    finally:
        loops[0].call_soon_threadsafe(stops[0].set)
        thread.join(10)


def _half_open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(GREETING)
    assert sock.recv(2) == b"\x05\x00"
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_the_timeout_is_ten_seconds() -> None:
    assert SOCKS5_HANDSHAKE_TIMEOUT == 10.0


def test_a_half_open_handshake_times_out() -> None:
    with socks5_listener(timeout=0.5, cap=16) as (port, slots):
        sock = _half_open(port)
        try:
            started = time.monotonic()
            assert _closed_within(sock, 5)
            assert time.monotonic() - started < 2
            assert len(slots) == 0
        finally:
            sock.close()


def test_at_the_cap_the_oldest_is_closed_and_a_new_client_gets_through() -> None:
    with socks5_listener(timeout=60, cap=16) as (port, slots):
        socks = [_half_open(port) for _ in range(26)]
        try:
            assert len(slots) == 16
            assert all(_closed_within(s, 2) for s in socks[:10])
            assert not any(_closed_within(s, 0.05) for s in socks[10:])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as good:
                good.sendall(GREETING + REQUEST)
                answer = b""
                while len(answer) < 12 and (chunk := good.recv(12)):
                    answer += chunk
                assert answer[:4] == b"\x05\x00\x05\x00"  # method, then SUCCEEDED
        finally:
            for s in socks:
                s.close()
