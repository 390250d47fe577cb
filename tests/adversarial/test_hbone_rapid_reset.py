"""Rapid reset (CVE-2023-44487): a peer that opens streams and resets them at once must not
leave their upstream connects behind, and is sent GOAWAY ENHANCE_YOUR_CALM."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.adversarial._hbone_harness import (
    RawPeer,
    blackhole,
    connect_headers,
    echo_server,
    fds,
    good_tunnel,
    hbone_serve,
    make_pki,
    rss_mb,
    rst_stream,
)
from ztagent.hbone.frames import ErrorCode

pytestmark = pytest.mark.integration

STREAMS = 3000


def test_rapid_reset_cancels_connects_and_ends_the_connection(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with echo_server() as echo, blackhole() as hole, hbone_serve(pki) as (port, proc):
        good_tunnel(pki, port, echo)
        base_fds = fds(proc.pid)
        peer = RawPeer(pki, port)
        peak_fds = base_fds
        latencies: list[float] = []
        stop = threading.Event()

        def good_clients() -> None:
            while not stop.is_set():
                latencies.append(good_tunnel(pki, port, echo))
                time.sleep(0.1)

        prober = threading.Thread(target=good_clients, daemon=True)
        prober.start()
        try:
            for batch in range(0, STREAMS, 100):
                frames = b"".join(
                    connect_headers(sid, f"127.0.0.1:{hole}") + rst_stream(sid)
                    for sid in range(2 * batch + 1, 2 * (batch + 100), 2)
                )
                try:
                    peer.send(frames)
                except OSError:
                    break  # the server ended the connection
                peak_fds = max(peak_fds, fds(proc.pid))
            code = peer.goaway_code()
            peak_fds = max(peak_fds, fds(proc.pid))
            rss = rss_mb(proc.pid)
        finally:
            stop.set()
            prober.join(15)
            peer.close()
        print(f"GOAWAY {code} peak fds {peak_fds} (base {base_fds}) rss {rss:.0f} MB")
        print(f"good client worst {max(latencies):.3f}s over {len(latencies)}")
        assert code == ErrorCode.ENHANCE_YOUR_CALM
        # Reset streams' connects were cancelled: no socket per reset stream was kept.
        assert peak_fds < base_fds + 50
        assert max(latencies) < 2.0
