"""Silent TCP connections to the HBONE port (no credentials needed) must not pile up: the
pending TLS handshakes are capped and time out sooner under load, while a good client still
gets through at once."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest

from tests.adversarial._hbone_harness import (
    echo_server,
    fds,
    good_tunnel,
    hbone_serve,
    make_pki,
    rss_mb,
)
from ztagent.hbone.server import (
    HANDSHAKE_TIMEOUT,
    MAX_PENDING_HANDSHAKES,
    MIN_HANDSHAKE_TIMEOUT,
    handshake_timeout,
)

pytestmark = pytest.mark.integration

SILENT = 2000


def test_silent_connections_are_capped_and_a_good_client_gets_through(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with echo_server() as echo, hbone_serve(pki) as (port, proc):
        good_tunnel(pki, port, echo)  # warm up
        rss_before = rss_mb(proc.pid)
        silent: list[socket.socket] = []
        try:
            for _ in range(SILENT):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", port))
                silent.append(sock)
            time.sleep(1.0)  # let the server accept them all
            latency = good_tunnel(pki, port, echo)
            held = fds(proc.pid)
            grown = rss_mb(proc.pid) - rss_before
        finally:
            for sock in silent:
                sock.close()
        print(f"latency {latency:.3f}s fds {held} rss +{grown:.1f} MB")
        assert latency < 2.0
        # The server holds no more than the cap of pending handshakes (plus its own few).
        assert held < MAX_PENDING_HANDSHAKES + 64
        assert grown < 40


def test_handshake_timeout_shrinks_with_load() -> None:
    assert handshake_timeout(0) == HANDSHAKE_TIMEOUT
    assert handshake_timeout(MAX_PENDING_HANDSHAKES // 2) == HANDSHAKE_TIMEOUT
    assert MIN_HANDSHAKE_TIMEOUT < handshake_timeout(MAX_PENDING_HANDSHAKES * 3 // 4) < 10
    assert handshake_timeout(MAX_PENDING_HANDSHAKES) == MIN_HANDSHAKE_TIMEOUT
