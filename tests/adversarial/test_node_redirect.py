"""Capture edge cases on real namespaces: a pod reusing the 4-tuple of one of the agent's
sockets in TIME_WAIT must still connect, at once; with the agent down, captured connections
are refused at once (a reset), not left to time out, and still reach nothing.

The namespaces, the veths, the transparent helper "agent" (it answers and closes first) and
the pod2 server are those of tests/integration/test_redirect.py.
"""

from __future__ import annotations

import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import test_redirect as redirect_lab
from tests.integration.test_redirect import NODE, POD1, POD1_IP, POD2, POD2_IP, SERVER_PORT, Lab

pytestmark = pytest.mark.integration

SOURCE_PORT = 41000
CONNECT_TIMEOUT = 3.0

RECONNECT = textwrap.dedent(
    """
    import socket, sys, time
    dest, port, source_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    timeout = float(sys.argv[4])
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("0.0.0.0", source_port))
    c.settimeout(timeout)
    started = time.monotonic()
    try:
        c.connect((dest, port))
        data = b""
        while chunk := c.recv(200):  # until the agent's FIN: the agent closes first
            data += chunk
        line = data.decode().strip()
        print(f"OK {time.monotonic() - started:.3f} {line}")
    except OSError as exc:
        print(f"ERROR {time.monotonic() - started:.3f} {type(exc).__name__}")
    c.close()
    """
)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = redirect_lab._skip_reason()
    if reason is not None:
        pytest.skip(reason)
    for ns in (NODE, POD1, POD2):  # leftovers of an earlier interrupted run
        redirect_lab._run("ip", "netns", "del", ns, check=False)
    with tempfile.TemporaryDirectory(prefix="ztt-") as tmp:
        lab = Lab(Path(tmp))
        (Path(tmp) / "reconnect.py").write_text(RECONNECT)
        try:
            lab.build()
            lab.spawn(POD2, "server", SERVER_PORT, log=lab.server_log)
            yield lab
        finally:
            lab.teardown()


def _reconnect(lab: Lab) -> str:
    script = str(lab.workdir / "reconnect.py")
    args = (POD2_IP, str(SERVER_PORT), str(SOURCE_PORT), str(CONNECT_TIMEOUT))
    return redirect_lab._ns(POD1, sys.executable, script, *args).stdout.strip()


def _time_wait(port: int) -> str:
    return redirect_lab._ns(NODE, "ss", "-Htan", "state", "time-wait", f"dport = :{port}").stdout


def test_syn_reusing_a_time_wait_tuple_reaches_the_agent(lab: Lab) -> None:
    from ztagent.redirect import Capture

    capture = Capture(netns=NODE)
    try:
        capture.start()
        p1h = capture.host_veth_for(POD1_IP)
        capture.attach_pod_veth(p1h)
        capture.enrol_pod(POD1_IP, p1h)
        lab.start_agent()
        first = _reconnect(lab)
        assert first.startswith("OK ") and "agent 15001" in first, first
        # The helper agent closed first: its captured socket waits in the node namespace.
        assert f"{POD2_IP}:{SERVER_PORT}" in _time_wait(SOURCE_PORT)
        second = _reconnect(lab)
        assert second.startswith("OK "), f"same 4-tuple, TIME_WAIT in the node: {second}"
        assert "agent 15001" in second and f"peer={POD1_IP}:{SOURCE_PORT}" in second, second
        # One challenge ACK, the pod's RST and a SYN retransmitted after TCP_TIMEOUT_MIN: far
        # below the 1 s initial RTO that a dropped SYN costs.
        assert float(second.split()[1]) < 0.5, second
    finally:
        if lab.agent is not None:
            lab.kill_agent()
        capture.stop()


def test_without_an_agent_captured_connections_are_refused_at_once(lab: Lab) -> None:
    from ztagent.redirect import Capture

    capture = Capture(netns=NODE)
    try:
        capture.start()
        p1h = capture.host_veth_for(POD1_IP)
        capture.attach_pod_veth(p1h)
        capture.attach_pod_veth(capture.host_veth_for(POD2_IP))
        capture.enrol_pod(POD1_IP, p1h)
        before = len(lab.server_lines())
        # outbound from the enrolled pod, inbound HBONE and inbound plaintext to it
        for ns, ip, port in ((POD1, POD2_IP, SERVER_PORT), (POD2, POD1_IP, 15008),
                             (POD2, POD1_IP, 9999)):  # fmt: skip
            started = time.monotonic()
            reply = lab.connect(ns, ip, port, timeout=CONNECT_TIMEOUT)
            assert reply.startswith("ERROR ConnectionRefusedError"), (ns, ip, port, reply)
            assert time.monotonic() - started < 2.0
        assert len(lab.server_lines()) == before
    finally:
        capture.stop()
