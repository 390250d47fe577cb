"""`ztagent node` end to end on loopback: two agents, one shared local config, real apps.

See `nodelab` for the topology. Each test starts from the base config (the `lab` fixture puts
it back if an earlier test changed it) and counts metrics as differences, so the tests do not
depend on their order.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import nodelab
from tests.integration.nodelab import (
    APP_PORT,
    BASE_POLICY_KEY,
    ECHO_ID,
    ECHO_IP,
    ECHO_SERVICE,
    ECHO_SERVICE_KEY,
    ECHO_UID,
    ECHO_VIP,
    NODE_A,
    NODE_B,
    PLAIN_ID,
    PLAIN_IP,
    PLAIN_UID,
    PLAINTEXT_PORT,
    SLEEP_ID,
    SLEEP_IP,
    SLEEP_UID,
    VIP_PORT,
    Agent,
    Lab,
    Sample,
    Socks5Refused,
    metric_sum,
)
from ztagent.identity.ca import CertificateAuthority
from ztagent.istio.authorization.l4 import strict_peer_authentication
from ztagent.model.localconfig import parse_local_config

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent.parent / "data"
MIB = 1 << 20

OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"
FAILED = "istio_tcp_connections_failed_total"
SENT = "istio_tcp_sent_bytes_total"
RECEIVED = "istio_tcp_received_bytes_total"

SLEEP_PRINCIPAL = "cluster.local/ns/test/sa/sleep"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def exclusive() -> Iterator[None]:
    """The lab's addresses are fixed: one run of this module at a time on a host."""
    with nodelab.exclusive():
        yield


@pytest.fixture(scope="module")
def lab_module(exclusive: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with nodelab.node_lab(tmp_path_factory.mktemp("nodelab")) as lab:
        yield lab


@pytest.fixture
def lab(lab_module: Lab) -> Lab:
    """The running lab, both agents alive, with the base config in place."""
    for agent in lab_module.agents:
        assert agent.alive(), f"{agent.node} is not running\n{agent.log_tail()}"
    lab_module.restore()
    return lab_module


@contextlib.contextmanager
def standalone_agent(
    workdir: Path, node: str, ip: str, config_path: Path, *, wait_ready: bool = True
) -> Iterator[Agent]:
    """One more agent, with its own CA and addresses, for tests that need a fresh process."""
    ca_dir = workdir / "ca"
    if not ca_dir.exists():
        CertificateAuthority.create(ca_dir, nodelab.TRUST_DOMAIN)
    with nodelab.agent_process(
        node, ip, config_path, ca_dir, workdir, wait_ready=wait_ready
    ) as agent:
        yield agent


# --------------------------------------------------------------------------- helpers


def delta(before: list[Sample], after: list[Sample], name: str, **labels: str) -> float:
    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)


def wait_delta(
    agent: Agent,
    before: list[Sample],
    minimum: Mapping[str, float],
    labels: Mapping[str, str],
    timeout: float = 5.0,
) -> list[Sample]:
    """Wait until every counter in `minimum` grew by at least its value for series with
    `labels`; the failure message shows the series the agent has."""

    def grown(samples: list[Sample]) -> bool:
        return all(delta(before, samples, n, **labels) >= m for n, m in minimum.items())

    try:
        return agent.wait_samples(grown, f"{minimum} for {labels}", timeout)
    except nodelab.Timeout as exc:
        series = [s for s in agent.metrics() if s.name.startswith("istio_tcp_")]
        shown = "\n".join(f"  {s.name} {s.labels} {s.value}" for s in series[:40])
        raise AssertionError(f"{exc}\nseries at {agent.node}:\n{shown}") from None


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def exchange_ok(lab: Lab, dest: tuple[str, int], size: int = 4096, seed: int = 1) -> None:
    payload = nodelab.pattern(size, seed)
    with contextlib.closing(lab.connect(dest)) as sock:
        assert sha(nodelab.echo_exchange(sock, payload)) == sha(payload)


def plaintext_attempt(address: tuple[str, int], payload: bytes, timeout: float = 5.0) -> bytes:
    """Connect without SOCKS5 or TLS, send `payload`, and read until the echo is complete or
    the connection closes; returns what came back (b"" when refused or closed unanswered)."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except ConnectionRefusedError:
        return b""
    received = b""
    with contextlib.closing(sock):
        try:
            sock.sendall(payload)
            deadline = time.monotonic() + timeout
            while len(received) < len(payload) and time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError):
            pass
    return received


def allow_only_other(scope: str) -> dict[str, Any]:
    return {
        "name": "allow-other-only",
        "namespace": "prod",
        "scope": scope,
        "action": "Allow",
        "dryRun": False,
        "rules": [[[{"principals": [{"Exact": "cluster.local/ns/other/sa/x"}]}]]],
    }


DENY_SLEEP = {
    "name": "deny-sleep",
    "namespace": "prod",
    "scope": "WorkloadSelector",
    "action": "Deny",
    "dryRun": False,
    "rules": [[[{"principals": [{"Exact": SLEEP_PRINCIPAL}]}]]],
}


def strict_config() -> dict[str, Any]:
    strict = nodelab.policy_yaml(strict_peer_authentication())
    return nodelab.with_policy(nodelab.base_config(), strict, listed_by=[ECHO_UID])


def parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    assert value.tzinfo is not None, f"{text!r} has no time zone"
    return value


# --------------------------------------------------------------------------- traffic


def test_allowed_flow_echoes_1mib_with_metrics_and_access_log(lab: Lab) -> None:
    before_a, before_b = lab.a.metrics(), lab.b.metrics()
    log_b = lab.b.log_offset()
    accepted = lab.apps.count((ECHO_IP, APP_PORT))
    payload = nodelab.pattern(MIB, seed=7)

    with contextlib.closing(lab.connect((ECHO_IP, APP_PORT))) as sock:
        echoed = nodelab.echo_exchange(sock, payload)
    assert len(echoed) == MIB
    assert sha(echoed) == sha(payload)
    assert lab.apps.count((ECHO_IP, APP_PORT)) == accepted + 1

    common = {
        "source_workload": "sleep",
        "source_workload_namespace": "test",
        "source_principal": SLEEP_ID,
        "destination_workload": "echo",
        "destination_workload_namespace": "prod",
        "destination_principal": ECHO_ID,
        "connection_security_policy": "mutual_tls",
        "request_protocol": "tcp",
    }
    minimum = {OPENED: 1, CLOSED: 1, SENT: MIB, RECEIVED: MIB}
    wait_delta(
        lab.a,
        before_a,
        minimum,
        {**common, "reporter": "source", "destination_service": "unknown"},
    )
    wait_delta(lab.b, before_b, minimum, {**common, "reporter": "destination"})

    line = lab.b.wait_log("connection complete", SLEEP_ID, "inbound", since=log_b)
    assert "echo" in line


def test_service_vip_reaches_echo_with_destination_service(lab: Lab) -> None:
    before = lab.a.metrics()
    accepted = lab.apps.count((ECHO_IP, APP_PORT))

    exchange_ok(lab, (ECHO_VIP, VIP_PORT), size=64 * 1024)

    assert lab.apps.count((ECHO_IP, APP_PORT)) == accepted + 1
    wait_delta(
        lab.a,
        before,
        {OPENED: 1, CLOSED: 1},
        {
            "reporter": "source",
            "source_principal": SLEEP_ID,
            "destination_service": ECHO_SERVICE,
            "destination_service_namespace": "prod",
            "destination_service_name": "echo",
            "destination_workload": "echo",
            "connection_security_policy": "mutual_tls",
        },
    )


def test_tcp_workload_is_reached_without_tunnel(lab: Lab) -> None:
    before = lab.a.metrics()
    accepted = lab.apps.count((PLAIN_IP, APP_PORT))

    exchange_ok(lab, (PLAIN_IP, APP_PORT), size=64 * 1024)

    assert lab.apps.count((PLAIN_IP, APP_PORT)) == accepted + 1
    wait_delta(
        lab.a,
        before,
        {OPENED: 1, CLOSED: 1},
        {
            "reporter": "source",
            "source_principal": SLEEP_ID,
            "destination_workload": "plain",
            "connection_security_policy": "unknown",
        },
    )


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize("scope", ["WorkloadSelector", "Namespace"])
def test_allow_policy_for_another_principal_denies_sleep(lab: Lab, scope: str) -> None:
    policy = allow_only_other(scope)
    listed = [ECHO_UID] if scope == "WorkloadSelector" else []
    lab.apply(nodelab.with_policy(nodelab.base_config(), policy, listed_by=listed))
    before = lab.b.metrics()
    accepted = lab.apps.count((ECHO_IP, APP_PORT))

    with pytest.raises(Socks5Refused) as refused:
        sock = lab.connect((ECHO_IP, APP_PORT))
        sock.close()
    assert refused.value.code == 0x02

    assert lab.apps.count((ECHO_IP, APP_PORT)) == accepted
    wait_delta(
        lab.b,
        before,
        {OPENED: 1, FAILED: 1},
        {
            "reporter": "destination",
            "response_flags": "DENY",
            "source_principal": SLEEP_ID,
            "destination_workload": "echo",
        },
    )


def test_strict_policy_yaml_is_what_rbac_builds() -> None:
    text = yaml.safe_dump(strict_config(), sort_keys=False)
    snapshot = parse_local_config(text)
    assert snapshot.errors == ()
    assert strict_peer_authentication() in snapshot.policies


def test_plaintext_reaches_app_unless_strict(lab: Lab) -> None:
    plaintext = (ECHO_IP, PLAINTEXT_PORT)
    accepted = lab.apps.count((ECHO_IP, APP_PORT))
    assert plaintext_attempt(plaintext, b"hello plaintext") == b"hello plaintext", lab.diagnostics()
    assert lab.apps.count((ECHO_IP, APP_PORT)) == accepted + 1

    lab.apply(strict_config())
    before = lab.b.metrics()
    accepted = lab.apps.count((ECHO_IP, APP_PORT))
    assert plaintext_attempt(plaintext, b"hello again") == b""
    time.sleep(0.3)
    assert lab.apps.count((ECHO_IP, APP_PORT)) == accepted
    wait_delta(
        lab.b,
        before,
        {OPENED: 1},
        {
            "reporter": "destination",
            "response_flags": "DENY",
            "destination_workload": "echo",
            "connection_security_policy": "unknown",
        },
    )

    exchange_ok(lab, (ECHO_IP, APP_PORT))  # mTLS callers have an identity: still allowed
    assert lab.apps.count((ECHO_IP, APP_PORT)) == accepted + 1


def test_policy_change_closes_open_connection(lab: Lab) -> None:
    accepted = lab.apps.count((ECHO_IP, APP_PORT))
    with contextlib.closing(lab.connect((ECHO_IP, APP_PORT))) as sock:
        data = nodelab.pattern(32 * 1024, seed=5)
        assert nodelab.echo_exchange(sock, data) == data
        new = lab.apps.accepted((ECHO_IP, APP_PORT))[accepted:]
        assert len(new) == 1
        app_side = new[0]
        assert not app_side.closed.is_set()

        started = time.monotonic()
        lab.write(nodelab.with_policy(nodelab.base_config(), DENY_SLEEP, listed_by=[ECHO_UID]))
        how = nodelab.closed_by_peer(sock, 3.0)
        elapsed = time.monotonic() - started
        assert how is not None, f"still open 3 s after the deny policy\n{lab.diagnostics()}"
        assert elapsed <= 3.0
        assert app_side.closed.wait(3.0), "the app's side of the connection is still open"

    with pytest.raises(Socks5Refused) as refused:
        lab.connect((ECHO_IP, APP_PORT)).close()
    assert refused.value.code == 0x02


# --------------------------------------------------------------------------- SOCKS5 rules


@pytest.mark.parametrize("port", [15001, 15006, 15008, 15080])
def test_loop_guard_refuses_agent_ports(lab: Lab, port: int) -> None:
    with pytest.raises(Socks5Refused) as refused:
        lab.connect((ECHO_IP, port)).close()
    assert refused.value.code == 0x02


@pytest.mark.parametrize(
    "source", ["127.0.99.1", ECHO_IP], ids=["not-a-workload", "workload-of-another-node"]
)
def test_socks5_source_must_be_a_local_workload(lab: Lab, source: str) -> None:
    accepted = lab.apps.count()
    with pytest.raises(Socks5Refused) as refused:
        lab.connect((ECHO_IP, APP_PORT), source_ip=source).close()
    assert refused.value.code == 0x02
    assert lab.apps.count() == accepted


def test_listeners_keep_the_backlog_they_ask_for(lab: Lab) -> None:
    """create_server() must not listen again with its default of 100: a burst of new
    connections would overflow the accept queue into SYN cookies and resets."""
    import subprocess

    out = subprocess.run(
        ["ss", "-Hltn", f"( sport = :{nodelab.SOCKS5_PORT} or sport = :15006 )"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    backlogs = {line.split()[3]: int(line.split()[2]) for line in out.splitlines()}
    assert f"{SLEEP_IP}:15006" in backlogs, out
    assert f"{lab.a.ip}:{nodelab.SOCKS5_PORT}" in backlogs, out
    assert set(backlogs.values()) == {1024}, out


# --------------------------------------------------------------------------- config


def _workload_by_uid(dump: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["uid"]: w for w in dump["workloads"]}


@pytest.mark.parametrize("node", [NODE_A, NODE_B])
def test_config_dump_matches_the_file(lab: Lab, node: str) -> None:
    agent = lab.a if node == NODE_A else lab.b
    dump = agent.config_dump()
    assert dump["node"] == node
    assert dump["config_source"] == str(lab.config_path)
    assert isinstance(dump["version"], int)
    assert dump["errors"] == []

    workloads = _workload_by_uid(dump)
    assert set(workloads) == {SLEEP_UID, ECHO_UID, PLAIN_UID}
    expect = {
        SLEEP_UID: ("sleep", "test", SLEEP_IP, "HBONE", SLEEP_ID, NODE_A),
        ECHO_UID: ("echo", "prod", ECHO_IP, "HBONE", ECHO_ID, NODE_B),
        PLAIN_UID: ("plain", "prod", PLAIN_IP, "NONE", PLAIN_ID, NODE_B),
    }
    for uid, (name, namespace, ip, protocol, identity, home) in expect.items():
        w = workloads[uid]
        assert (w["name"], w["namespace"], w["node"]) == (name, namespace, home)
        assert w["addresses"] == [f"/{ip}"]
        assert w["protocol"] == protocol
        assert w["identity"] == identity
        assert w["local"] is (home == node)
        assert w["waypoint"] is None
    assert workloads[ECHO_UID]["services"] == {ECHO_SERVICE_KEY: {str(VIP_PORT): APP_PORT}}

    (service,) = dump["services"]
    assert service["key"] == ECHO_SERVICE_KEY
    assert (service["name"], service["namespace"], service["hostname"]) == (
        "echo",
        "prod",
        ECHO_SERVICE,
    )
    assert service["vips"] == [f"/{ECHO_VIP}"]
    assert service["ports"] == {str(VIP_PORT): APP_PORT}
    assert service["subject_alt_names"] == [ECHO_ID]
    assert service["endpoints"] == [ECHO_UID]

    (policy,) = dump["policies"]
    assert policy["key"] == BASE_POLICY_KEY
    assert (policy["scope"], policy["action"], policy["dry_run"]) == ("NAMESPACE", "DENY", False)

    local_ids = {w["identity"] for w in workloads.values() if w["local"]}
    assert local_ids == ({SLEEP_ID} if node == NODE_A else {ECHO_ID, PLAIN_ID})
    certs = {c["identity"]: c for c in dump["certificates"]}
    assert set(certs) == local_ids
    now = datetime.now(UTC)
    for identity, cert in certs.items():
        assert cert["state"] == "available", (identity, cert)
        assert cert["error"] is None
        assert cert["chain_length"] >= 1
        assert parse_time(cert["not_before"]) <= now < parse_time(cert["not_after"])
        assert now < parse_time(cert["refresh_at"]) < parse_time(cert["not_after"])


def test_ztunnel_localhost_example_loads(tmp_path: Path) -> None:
    config = tmp_path / "localhost.yaml"
    shutil.copyfile(DATA / "ztunnel-localhost.yaml", config)
    with standalone_agent(tmp_path, "node-z", "127.0.3.1", config) as agent:
        dump = agent.config_dump()
    assert dump["errors"] == []
    workloads = _workload_by_uid(dump)
    assert set(workloads) == {
        "cluster1//v1/Pod/default/local",
        "cluster1//v1/Pod/default/local-tcp",
    }
    local = workloads["cluster1//v1/Pod/default/local"]
    assert local["addresses"] == ["/127.0.0.1"]
    assert local["protocol"] == "HBONE"
    assert local["identity"] == "spiffe://cluster.local/ns/default/sa/default"
    assert workloads["cluster1//v1/Pod/default/local-tcp"]["protocol"] == "NONE"
    services = {s["key"]: s for s in dump["services"]}
    assert set(services) == {"default/example.com", "default/example2.com"}
    assert services["default/example.com"]["vips"] == ["/127.10.0.1"]
    assert services["default/example2.com"]["vips"] == ["remote/127.10.0.2"]
    assert services["default/example.com"]["ports"] == {"80": 8080}
    assert set(services["default/example.com"]["endpoints"]) == set(workloads)
    (policy,) = dump["policies"]
    assert policy["key"] == "default/deny-9999"
    assert (policy["scope"], policy["action"]) == ("NAMESPACE", "ALLOW")


def test_readiness_waits_for_config_and_certificates(tmp_path: Path) -> None:
    config = tmp_path / "late.yaml"
    client_id = "spiffe://cluster.local/ns/test/sa/client"
    with standalone_agent(tmp_path, "node-c", "127.0.4.1", config, wait_ready=False) as agent:
        for _ in range(5):
            assert agent.ready_status() == 503
            time.sleep(0.1)
        nodelab.write_config(
            config,
            {
                "workloads": [
                    nodelab.workload(
                        "Kubernetes//Pod/test/client-0",
                        "client",
                        "test",
                        "client",
                        "127.0.40.1",
                        "HBONE",
                        "node-c",
                    )
                ]
            },
        )
        written = time.monotonic()
        nodelab.wait_for(lambda: agent.ready_status() == 200, 3.0, "readiness 200", agent.log_tail)
        assert time.monotonic() - written <= 3.0
        dump = agent.config_dump()
        assert [c["identity"] for c in dump["certificates"]] == [client_id]
        assert dump["certificates"][0]["state"] == "available"
        agent.wait_listening(("127.0.40.1", nodelab.INBOUND_PORT), timeout=3.0)
        agent.wait_listening(("127.0.40.1", PLAINTEXT_PORT), timeout=3.0)


def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    config = tmp_path / "localhost.yaml"
    shutil.copyfile(DATA / "ztunnel-localhost.yaml", config)
    with standalone_agent(tmp_path, "node-z", "127.0.5.1", config) as agent:
        started = time.monotonic()
        code = nodelab.stop_process(agent.proc)
        assert code == 0, agent.log_tail()
        assert time.monotonic() - started < 8.0  # --drain-timeout 1


def test_malformed_config_keeps_last_good_and_serves(lab: Lab) -> None:
    broken_uid = "Kubernetes//Pod/prod/broken-0"
    extra_uid = "Kubernetes//Pod/prod/extra-0"
    config = nodelab.base_config()
    config["workloads"].append(
        nodelab.workload(broken_uid, "broken", "prod", "broken", "127.0.20.999", "HBONE", NODE_B)
    )
    config["workloads"].append(
        nodelab.workload(extra_uid, "extra", "prod", "extra", "127.0.20.3", "HBONE", "node-c")
    )
    good = {SLEEP_UID, ECHO_UID, PLAIN_UID, extra_uid}

    offsets = [agent.log_offset() for agent in lab.agents]
    lab.write(config)
    for agent, since in zip(lab.agents, offsets, strict=True):
        agent.wait_log_text(broken_uid, "workloadIps", since=since)

        def shows_partial(agent: Agent = agent) -> dict[str, Any] | None:
            dump = agent.config_dump()
            return dump if set(_workload_by_uid(dump)) == good else None

        dump = nodelab.wait_for(shows_partial, 5.0, f"{agent.node} to apply the valid part")
        assert any(broken_uid in e and "workloadIps" in e for e in dump["errors"]), dump["errors"]
        assert {s["key"] for s in dump["services"]} == {ECHO_SERVICE_KEY}
        assert {p["key"] for p in dump["policies"]} == {BASE_POLICY_KEY}
    exchange_ok(lab, (ECHO_IP, APP_PORT))

    offsets = [agent.log_offset() for agent in lab.agents]
    lab.write("workloads:\n  - uid: [unclosed\n    name: {\n")
    for agent, since in zip(lab.agents, offsets, strict=True):
        agent.wait_log_text(str(lab.config_path), "YAML", since=since)
        dump = agent.config_dump()
        assert set(_workload_by_uid(dump)) == good
        assert {s["key"] for s in dump["services"]} == {ECHO_SERVICE_KEY}
        assert {p["key"] for p in dump["policies"]} == {BASE_POLICY_KEY}
        assert agent.ready_status() == 200
    exchange_ok(lab, (ECHO_IP, APP_PORT))
    exchange_ok(lab, (ECHO_VIP, VIP_PORT))
    assert all(agent.alive() for agent in lab.agents)


def test_series_of_a_workload_that_left_are_removed(lab: Lab) -> None:
    exchange_ok(lab, (nodelab.PLAIN_IP, nodelab.APP_PORT))
    lab.a.wait_samples(
        lambda samples: bool(nodelab.select_samples(samples, OPENED, destination_workload="plain")),
        "a series for plain",
    )
    config = nodelab.base_config()
    config["workloads"] = [w for w in config["workloads"] if w["uid"] != nodelab.PLAIN_UID]
    lab.apply(config)
    nodelab.wait_for(
        lambda: not nodelab.select_samples(lab.a.metrics(), OPENED, destination_workload="plain"),
        5.0,
        "node-a to drop the series of the departed workload",
    )
