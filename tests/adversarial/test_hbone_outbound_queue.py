"""A peer that sends PINGs and never reads the answers: the server must not buffer answers
without bound; past Envoy's 1000 unread control frames the connection is closed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.adversarial._hbone_harness import (
    RawPeer,
    echo_server,
    good_tunnel,
    hbone_serve,
    make_pki,
    rss_mb,
)
from ztagent.hbone.frames import FrameType, pack_frame

pytestmark = pytest.mark.integration

BATCH = 2000
MAX_PINGS = 3_000_000
MAX_SECONDS = 15.0


def test_unread_ping_answers_close_the_connection(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with echo_server() as echo, hbone_serve(pki) as (port, proc):
        good_tunnel(pki, port, echo)
        rss_before = rss_mb(proc.pid)
        peak = rss_before
        peer = RawPeer(pki, port, timeout=2.0, rcvbuf=4096)
        pings = pack_frame(FrameType.PING, 0, 0, b"unread!!") * BATCH
        sent = 0
        closed = False
        started = time.monotonic()
        try:
            while sent < MAX_PINGS and time.monotonic() - started < MAX_SECONDS:
                try:
                    peer.send(pings)
                except OSError:
                    closed = True
                    break
                sent += BATCH
                if sent % (100 * BATCH) == 0:
                    peak = max(peak, rss_mb(proc.pid))
            peak = max(peak, rss_mb(proc.pid))
            latency = good_tunnel(pki, port, echo)
        finally:
            peer.close()
        print(f"{sent} PINGs sent; closed {closed}; RSS {rss_before:.0f} -> {peak:.0f} MB")
        print(f"good client {latency:.3f}s")
        assert closed, f"{sent} PINGs sent and the connection is still open"
        assert peak - rss_before < 20
        assert latency < 2.0
