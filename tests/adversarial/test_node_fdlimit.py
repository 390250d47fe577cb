"""File-descriptor limits: `ztagent node` raises its soft limit, and at a hard limit it refuses
connections with a reset it counts and logs, instead of closing them silently.

One `ztagent node` process on loopback (node-a's addresses of the node lab), started with a
lowered RLIMIT_NOFILE; clients are raw TCP connections to its SOCKS5 listener.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import nodelab
from tests.integration.nodelab import AGENT_IPS, NODE_A, TRUST_DOMAIN, Agent
from ztagent.identity.ca import CertificateAuthority

pytestmark = pytest.mark.integration

EXHAUSTED = "ztagent_downstream_cx_fd_exhausted_total"


@pytest.fixture(scope="module", autouse=True)
def exclusive() -> Iterator[None]:
    """The lab's addresses are fixed: one run at a time on a host."""
    with nodelab.exclusive():
        yield


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc/PID/limits")


@contextlib.contextmanager
def limited_agent(workdir: Path, soft: int, hard: int) -> Iterator[Agent]:
    """node-a's agent with RLIMIT_NOFILE (soft, hard) set before it starts."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca_dir = workdir / "ca"
    CertificateAuthority.create(ca_dir, TRUST_DOMAIN)
    config_path = workdir / "local-config.yaml"
    nodelab.write_config(config_path, nodelab.base_config())
    ip = AGENT_IPS[NODE_A]
    env = {k: v for k, v in os.environ.items() if k not in nodelab._AGENT_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    stderr_path = workdir / "agent.stderr"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    cmd = nodelab.agent_command(NODE_A, ip, config_path, ca_dir)
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            preexec_fn=limit,
        )
    try:
        agent = Agent(NODE_A, ip, proc, stderr_path, config_path)
        agent.wait_ready()
        yield agent
    finally:
        nodelab.stop_process(proc)


def test_node_agent_raises_its_soft_limit_to_the_hard_limit(tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard open-file limit {hard} leaves nothing to raise")
    with limited_agent(tmp_path, 256, hard) as agent:
        want = hard if hard != resource.RLIM_INFINITY else 256
        assert _soft_limit(agent.proc.pid) == want
        agent.wait_log("raised the open-file limit from 256")


def _outcomes(socks: list[socket.socket], settle: float = 1.0) -> list[str]:
    """Per socket: "reset", "closed" (clean FIN) or "open" (kept, waiting for SOCKS5)."""
    time.sleep(settle)
    result = []
    for sock in socks:
        sock.setblocking(False)
        try:
            data = sock.recv(1)
        except ConnectionResetError:
            result.append("reset")
        except BlockingIOError:
            result.append("open")
        else:
            result.append("closed" if data == b"" else "open")
    return result


def test_at_the_limit_connections_are_reset_counted_and_logged(tmp_path):
    """soft = hard = 128: the agent cannot raise it; 200 clients overrun it."""
    with limited_agent(tmp_path, 128, 128) as agent:
        assert _soft_limit(agent.proc.pid) == 128
        clients: list[socket.socket] = []
        reset_at_connect = 0
        try:
            for _ in range(200):
                try:
                    clients.append(socket.create_connection(agent.socks5, timeout=5))
                except ConnectionResetError:  # the reset overtook connect()'s return
                    reset_at_connect += 1
            outcomes = _outcomes(clients) + ["reset"] * reset_at_connect
        finally:
            for c in clients:
                c.close()
        assert outcomes.count("closed") == 0, outcomes
        assert outcomes.count("reset") > 0, outcomes
        assert outcomes.count("open") > 0, outcomes
        line = agent.wait_log("socks5: out of file descriptors (open-file limit 128)")
        assert "with a reset" in line
        samples = agent.wait_samples(
            lambda s: nodelab.metric_sum(s, EXHAUSTED, listener="socks5") > 0,
            "refusals counted",
        )
        assert nodelab.metric_sum(samples, EXHAUSTED, listener="socks5") == outcomes.count("reset")
        # With the descriptors back, the listener still serves.
        with socket.create_connection(agent.socks5, timeout=5) as c:
            assert _outcomes([c]) == ["open"]
        assert agent.alive()
