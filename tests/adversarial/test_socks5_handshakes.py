"""Half-open SOCKS5 handshakes on a real listener: they time out, and at the cap the oldest is
closed so a new client still gets through."""

from __future__ import annotations

import socket
import time

import pytest

from tests.adversarial._socks5_harness import GREETING, ask, request_v4, socks5_listener
from ztagent.socks5.handshake import Reply
from ztagent.socks5.listener import SOCKS5_HANDSHAKE_TIMEOUT

pytestmark = pytest.mark.integration


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
    with socks5_listener(timeout=0.5, cap=16) as running:
        port, slots = running.port, running.slots
        sock = _half_open(port)
        try:
            started = time.monotonic()
            assert _closed_within(sock, 5)
            assert time.monotonic() - started < 2
            assert len(slots) == 0
        finally:
            sock.close()


def test_at_the_cap_the_oldest_is_closed_and_a_new_client_gets_through() -> None:
    with socks5_listener(timeout=60, cap=16) as running:
        port, slots = running.port, running.slots
        socks = [_half_open(port) for _ in range(26)]
        try:
            assert len(slots) == 16
            assert all(_closed_within(s, 2) for s in socks[:10])
            assert not any(_closed_within(s, 0.05) for s in socks[10:])
            assert ask(port, request_v4("127.0.0.1", 9)) == Reply.SUCCEEDED
        finally:
            for s in socks:
                s.close()
