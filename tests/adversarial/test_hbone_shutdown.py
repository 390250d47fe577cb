"""`ztagent hbone serve` exits promptly on SIGTERM even while upstream connects hang: drain
cancels them (and answers their CONNECTs 503) instead of waiting them out."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.adversarial._hbone_harness import (
    RawPeer,
    blackhole,
    connect_headers,
    hbone_serve,
    make_pki,
)

pytestmark = pytest.mark.integration


def test_sigterm_with_pending_upstream_connects_exits_within_5_s(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with blackhole() as hole, hbone_serve(pki) as (port, proc):
        peer = RawPeer(pki, port)
        try:
            peer.send(b"".join(connect_headers(sid, f"127.0.0.1:{hole}") for sid in (1, 3, 5)))
            time.sleep(0.3)  # the connects are under way
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(8)
            took = time.monotonic() - started
        finally:
            peer.close()
        print(f"exited after {took:.2f}s with {proc.returncode}")
        assert proc.returncode == 0
        assert took < 2.0
