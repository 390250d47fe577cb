"""The asyncio layer under HBONE with real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from collections.abc import Iterator

import pytest
import uvloop

from ztagent.hbone.transport import connect_socket

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def descriptors_above(limit: int) -> Iterator[None]:
    """Hold open enough descriptors that the next socket's number is above `limit`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < limit + 64:
        pytest.skip(f"open-files hard limit {hard} is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit + 64), hard))
    held: list[socket.socket] = []
    try:
        while not held or held[-1].fileno() <= limit:
            held.append(socket.socket())
        yield
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connect_socket_works_past_descriptor_1023() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()

    async def main() -> int:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await connect_socket(asyncio.get_running_loop(), sock, address, timeout=5)
            return sock.fileno()
        finally:
            sock.close()

    try:
        with descriptors_above(1100):
            fd = uvloop.run(main())
        assert fd > 1023
    finally:
        listener.close()


def test_connect_socket_reports_refusal() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    async def main() -> None:
        with socket.socket() as sock:
            sock.setblocking(False)
            await connect_socket(
                asyncio.get_running_loop(), sock, ("127.0.0.1", closed_port), timeout=5
            )

    with pytest.raises(ConnectionRefusedError):
        uvloop.run(main())
