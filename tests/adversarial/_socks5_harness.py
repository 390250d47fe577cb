"""A real SOCKS5 listener (`Socks5Listener` on a loopback port, its own event loop in a
thread) for the SOCKS5 adversarial tests; the destinations it hands on are recorded."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import uvloop

from ztagent.socks5.handshake import Reply
from ztagent.socks5.listener import HandshakeSlots, ReplyFn, Socks5Listener


@dataclass
class Running:
    port: int
    slots: HandshakeSlots
    handed_on: list[tuple[str, int]] = field(default_factory=list)


GREETING = b"\x05\x01\x00"


def request_v4(ip: str, port: int) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton(ip) + struct.pack("!H", port)


def request_v6(ip: str, port: int) -> bytes:
    return b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, ip) + struct.pack("!H", port)


def ask(port: int, request: bytes) -> int:
    """Greeting and `request` on a new connection: the reply code."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(GREETING + request)
        answer = b""
        while len(answer) < 4 and (chunk := sock.recv(64)):
            answer += chunk
    assert answer[:2] == b"\x05\x00", answer
    return answer[3]


@contextlib.contextmanager
def socks5_listener(timeout: float = 10.0, cap: int = 16) -> Iterator[Running]:
    """Every request that passes the listener is answered SUCCEEDED and closed."""
    slots = HandshakeSlots(cap)
    handed_on: list[tuple[str, int]] = []

    def answer(
        transport: asyncio.Transport,
        _client: tuple[str, int],
        destination: tuple[str, int],
        _early: list[bytes],
        reply: ReplyFn,
    ) -> None:
        handed_on.append(destination)
        transport.write(reply(Reply.SUCCEEDED, None))
        transport.close()

    started = threading.Event()
    port: list[int] = []
    stops: list[asyncio.Event] = []
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(
                lambda: Socks5Listener(
                    lambda _name: None, answer, handshake_timeout=timeout, slots=slots
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
        yield Running(port[0], slots, handed_on)
    finally:
        loops[0].call_soon_threadsafe(stops[0].set)
        thread.join(10)
