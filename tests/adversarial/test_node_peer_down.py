"""The destination's agent dies: the app must see a reset, never a clean end, and a connection
opened while it is down must fail at once with an access-log error and its metrics.

The node lab (two `ztagent node` processes on loopback); node-b, echo's agent, is killed with
SIGKILL, as a crashed or OOM-killed agent goes.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator

import pytest

from tests.integration import nodelab
from tests.integration.nodelab import APP_PORT, ECHO_IP, SLEEP_ID, Lab, Socks5Refused

pytestmark = pytest.mark.integration

CLOSED = "istio_tcp_connections_closed_total"
FAILED = "istio_tcp_connections_failed_total"
SOURCE = {"reporter": "source", "destination_workload": "echo"}


@pytest.fixture(scope="module", autouse=True)
def exclusive() -> Iterator[None]:
    with nodelab.exclusive():
        yield


@pytest.fixture
def lab(tmp_path) -> Iterator[Lab]:
    """A lab of its own per test: the test kills node-b."""
    with nodelab.node_lab(tmp_path / "lab") as lab:
        yield lab


def _kill_b(lab: Lab) -> None:
    lab.b.proc.send_signal(signal.SIGKILL)
    lab.b.proc.wait(10)


def test_peer_agent_dying_mid_transfer_resets_the_app_connection(lab: Lab):
    sock = lab.connect((ECHO_IP, APP_PORT))
    with contextlib.closing(sock):
        chunk = nodelab.pattern(64 * 1024)
        sock.sendall(chunk)
        got = 0
        sock.settimeout(10.0)
        while got < len(chunk):
            got += len(sock.recv(65536))
        _kill_b(lab)
        ending = "timeout"
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:  # only read: a write to a closed socket would draw a reset anyway
                data = sock.recv(65536)
            except ConnectionResetError:
                ending = "reset"
                break
            except TimeoutError:
                continue
            if not data:
                ending = "fin"
                break
        assert ending == "reset", f"the truncated stream ended with {ending}"


def test_a_connection_while_the_peer_agent_is_down_fails_at_once_and_is_reported(lab: Lab):
    _kill_b(lab)
    before = lab.a.metrics()
    since = lab.a.log_offset()
    started = time.monotonic()
    with pytest.raises((Socks5Refused, ConnectionResetError)):
        socket_ = lab.connect((ECHO_IP, APP_PORT))
        socket_.close()
    assert time.monotonic() - started < 5.0
    line = lab.a.wait_log("connection complete", SLEEP_ID, since=since)
    assert "HBONE connect" in line and "error" in line, line
    after = lab.a.wait_samples(
        lambda s: (
            nodelab.metric_sum(s, CLOSED, **SOURCE) > nodelab.metric_sum(before, CLOSED, **SOURCE)
        ),
        "the failed connection counted as closed",
    )
    assert (
        nodelab.metric_sum(after, FAILED, **SOURCE)
        == nodelab.metric_sum(before, FAILED, **SOURCE) + 1
    )
