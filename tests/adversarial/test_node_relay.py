"""Half-open relays: clients that connect and close without a byte (port probes, health checks)
must not leave the agent holding descriptors when the upstream ignores their FIN.

node-a's `ztagent node` on loopback (the node lab's addresses) relays SOCKS5 clients from the
sleep workload to a passthrough destination: a server in this process that accepts, reads the
FIN and keeps its side open, as many servers waiting for a request do.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration import nodelab
from tests.integration.nodelab import AGENT_IPS, NODE_A, SLEEP_IP, TRUST_DOMAIN, Agent
from ztagent.identity.ca import CertificateAuthority

pytestmark = pytest.mark.integration

SILENT = ("127.0.41.1", 9000)  # outside the mesh: passthrough
PROBES = 40
HALF_CLOSE = 1.0


@pytest.fixture(scope="module", autouse=True)
def exclusive() -> Iterator[None]:
    with nodelab.exclusive():
        yield


class SilentServer:
    """Accepts, notes each client's FIN, never closes its side until stopped."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_server(address, backlog=256)
        self.conns: list[socket.socket] = []
        self.fins = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(4096):
                pass
            with self._lock:
                self.fins += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.sock.close()
        self._thread.join(5.0)
        with self._lock:
            for conn in self.conns:
                conn.close()


@contextlib.contextmanager
def agent_and_server(workdir: Path, *extra: str) -> Iterator[tuple[Agent, SilentServer]]:
    workdir.mkdir(parents=True, exist_ok=True)
    ca_dir = workdir / "ca"
    CertificateAuthority.create(ca_dir, TRUST_DOMAIN)
    config_path = workdir / "local-config.yaml"
    nodelab.write_config(config_path, nodelab.base_config())
    server = SilentServer(SILENT)
    try:
        with nodelab.agent_process(
            NODE_A, AGENT_IPS[NODE_A], config_path, ca_dir, workdir, *extra
        ) as agent:
            yield agent, server
    finally:
        server.close()


def _fds(agent: Agent) -> int:
    return psutil.Process(agent.proc.pid).num_fds()


def test_connect_and_close_probes_release_their_descriptors(tmp_path):
    with agent_and_server(tmp_path, "--half-close-timeout", str(HALF_CLOSE)) as (agent, server):
        baseline = _fds(agent)
        for _ in range(PROBES):
            nodelab.socks5_connect(agent.socks5, SLEEP_IP, SILENT, 5.0).close()
        nodelab.wait_for(lambda: server.fins >= PROBES, 5.0, "the server to see every FIN")
        # The FIN went through; the upstream stays silent, and the relay gives up on it.
        nodelab.wait_for(
            lambda: _fds(agent) <= baseline,
            HALF_CLOSE + 5.0,
            f"the agent's descriptors back to {baseline} (now {_fds(agent)})",
            agent.log_tail,
        )
        assert agent.alive()


def test_a_slow_answer_after_the_clients_half_close_still_arrives(tmp_path):
    """The timer counts silence, not age: bytes moving keep a half-closed relay open."""
    with agent_and_server(tmp_path, "--half-close-timeout", str(HALF_CLOSE)) as (agent, server):
        client = nodelab.socks5_connect(agent.socks5, SLEEP_IP, SILENT, 5.0)
        with client:
            client.sendall(b"request")
            client.shutdown(socket.SHUT_WR)
            nodelab.wait_for(lambda: server.fins >= 1, 5.0, "the server to see the FIN")
            (upstream,) = server.conns
            for i in range(4):  # 2 s in all, longer than the timeout, never silent for it
                time.sleep(HALF_CLOSE / 2)
                upstream.sendall(b"%d" % i)
            upstream.close()
            client.settimeout(5.0)
            got = b""
            while chunk := client.recv(100):
                got += chunk
            assert got == b"0123"
