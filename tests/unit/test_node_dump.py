"""The `/config_dump` document built from a ProxyState and certificate statuses."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.spiffe import Identity
from ztagent.model.localconfig import load_local_config
from ztagent.model.policy import (
    Action,
    Authorization,
    CidrMatch,
    Clause,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztagent.model.snapshot import ConfigSnapshot, ObjectError
from ztagent.model.store import ProxyState
from ztagent.model.workload import (
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from ztagent.node.dump import (
    AVAILABLE,
    FAILED,
    PENDING,
    CertificateStatus,
    config_dump,
    match_to_json,
    rfc3339,
)

DATA = Path(__file__).parent.parent / "data" / "ztunnel-localhost.yaml"
LOCAL_ID = Identity("cluster.local", "default", "default")
REMOTE_ID = Identity("cluster.local", "other", "db")
FAILED_ID = Identity("cluster.local", "default", "broken")

WORKLOAD_KEYS = {
    "uid",
    "name",
    "namespace",
    "node",
    "addresses",
    "protocol",
    "identity",
    "service_account",
    "workload_name",
    "canonical_name",
    "canonical_revision",
    "status",
    "cluster_id",
    "services",
    "authorization_policies",
    "waypoint",
    "local",
}
SERVICE_KEYS = {
    "key",
    "name",
    "namespace",
    "hostname",
    "vips",
    "ports",
    "subject_alt_names",
    "endpoints",
    "waypoint",
}
POLICY_KEYS = {"key", "name", "namespace", "scope", "action", "dry_run", "rules"}
CERT_KEYS = {
    "identity",
    "state",
    "not_before",
    "not_after",
    "refresh_at",
    "chain_length",
    "error",
}

FULL_MATCH = Match(
    namespaces=(StringMatch.exact("default"), StringMatch.prefix("team-")),
    not_namespaces=(StringMatch.suffix("-test"),),
    principals=(StringMatch.presence(),),
    not_principals=(StringMatch.exact("cluster.local/ns/x/sa/y"),),
    source_ips=(CidrMatch.parse("10.0.0.0/8"), CidrMatch.parse("fd00::1")),
    not_source_ips=(CidrMatch.parse("10.1.2.3"),),
    destination_ips=(CidrMatch.parse("192.168.0.0/16"),),
    not_destination_ips=(CidrMatch.parse("192.168.1.0/24"),),
    destination_ports=(80, 443),
    not_destination_ports=(9999,),
    service_accounts=(ServiceAccountMatch("default", "web"),),
    not_service_accounts=(ServiceAccountMatch("other", "db"),),
)

EXTRA_POLICY = Authorization(
    name="allow-web",
    namespace="default",
    scope=Scope.WORKLOAD_SELECTOR,
    action=Action.DENY,
    rules=(
        Rule(
            (
                Clause((FULL_MATCH, Match(destination_ports=(8080,)))),
                Clause((Match(principals=(StringMatch.suffix("/sa/web"),)),)),
            )
        ),
        Rule(),
    ),
    dry_run=True,
)

REMOTE = Workload(
    uid="cluster1//v1/Pod/other/db-0",
    name="db-0",
    namespace="other",
    addresses=(ipaddress.ip_address("10.0.1.5"), ipaddress.ip_address("fd00::5")),
    network="net1",
    tunnel_protocol=TunnelProtocol.HBONE,
    service_account="db",
    waypoint=GatewayAddress(hostname=NamespacedHostname("other", "waypoint.other.svc")),
    node="node-b",
    canonical_name="db",
    canonical_revision="v2",
    workload_name="db",
    authorization_policies=("default/allow-web", "default/a-first"),
    status=WorkloadStatus.UNHEALTHY,
    cluster_id="cluster1",
    services={"other/db.other.svc": {5432: 15432, 80: 0}},
)

REMOTE_SERVICE = Service(
    name="db",
    namespace="other",
    hostname="db.other.svc",
    addresses=(NetworkAddress("net1", ipaddress.ip_address("10.96.0.9")),),
    ports={5432: 5432, 80: 8080},
    waypoint=GatewayAddress(
        address=NetworkAddress("", ipaddress.ip_address("10.0.9.9")), hbone_mtls_port=15009
    ),
)

ERROR = ObjectError("workloads", 2, "bad", "workloads[2].workloadIps", "is required")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca") / "cacerts")


@pytest.fixture
def state() -> ProxyState:
    loaded = load_local_config(DATA)
    assert loaded.ok
    snapshot = ConfigSnapshot(
        workloads=(REMOTE, *loaded.workloads),
        services=(REMOTE_SERVICE, *loaded.services),
        policies=(EXTRA_POLICY, *loaded.policies),
        errors=(ERROR,),
    )
    return ProxyState("local", snapshot=snapshot)


@pytest.fixture
def dump(state: ProxyState, ca: CertificateAuthority) -> dict[str, object]:
    statuses = [
        CertificateStatus(FAILED_ID, FAILED, None, "CA unreachable: connection refused"),
        CertificateStatus(LOCAL_ID, AVAILABLE, ca.issue(LOCAL_ID), None),
        CertificateStatus(REMOTE_ID, PENDING, None, None),
    ]
    return config_dump(state, statuses, config_source=str(DATA), node="local")


def _by(items: object, key: str) -> dict[str, dict[str, object]]:
    assert isinstance(items, list)
    return {item[key]: item for item in items}


def test_top_level(dump: dict[str, object], state: ProxyState) -> None:
    assert set(dump) == {
        "node",
        "version",
        "config_source",
        "errors",
        "workloads",
        "services",
        "policies",
        "certificates",
    }
    assert dump["node"] == "local"
    assert dump["version"] == state.version == 1
    assert dump["config_source"] == str(DATA)
    assert dump["errors"] == [str(ERROR)]
    assert dump["errors"] == ['workloads[2] (uid "bad"): workloads[2].workloadIps: is required']


def test_json_round_trip_and_stable(
    dump: dict[str, object], state: ProxyState, ca: CertificateAuthority
) -> None:
    text = json.dumps(dump, allow_nan=False)
    assert json.loads(text) == dump
    statuses = [
        CertificateStatus(REMOTE_ID, PENDING, None, None),
        CertificateStatus(FAILED_ID, FAILED, None, "x"),
    ]
    first = config_dump(state, statuses, config_source="x", node="local")
    second = config_dump(state, reversed(statuses), config_source="x", node="local")
    assert json.dumps(first) == json.dumps(second)


def test_workloads(dump: dict[str, object]) -> None:
    workloads = dump["workloads"]
    assert isinstance(workloads, list)
    uids = [w["uid"] for w in workloads]
    assert uids == sorted(uids)
    assert uids == [
        "cluster1//v1/Pod/default/local",
        "cluster1//v1/Pod/default/local-tcp",
        "cluster1//v1/Pod/other/db-0",
    ]
    for w in workloads:
        assert set(w) == WORKLOAD_KEYS
    by_uid = _by(workloads, "uid")
    local = by_uid["cluster1//v1/Pod/default/local"]
    assert local == {
        "uid": "cluster1//v1/Pod/default/local",
        "name": "local",
        "namespace": "default",
        "node": "local",
        "addresses": ["/127.0.0.1"],
        "protocol": "HBONE",
        "identity": "spiffe://cluster.local/ns/default/sa/default",
        "service_account": "default",
        "workload_name": "",
        "canonical_name": "",
        "canonical_revision": "",
        "status": "HEALTHY",
        "cluster_id": "",
        "services": {"default/example.com": {"80": 8080}, "default/example2.com": {"80": 8080}},
        "authorization_policies": [],
        "waypoint": None,
        "local": True,
    }
    assert by_uid["cluster1//v1/Pod/default/local-tcp"]["protocol"] == "NONE"
    assert by_uid["cluster1//v1/Pod/default/local-tcp"]["local"] is True

    remote = by_uid["cluster1//v1/Pod/other/db-0"]
    assert remote["local"] is False
    assert remote["addresses"] == ["net1/10.0.1.5", "net1/fd00::5"]
    assert remote["identity"] == "spiffe://cluster.local/ns/other/sa/db"
    assert remote["status"] == "UNHEALTHY"
    assert remote["cluster_id"] == "cluster1"
    assert remote["canonical_name"] == "db"
    assert remote["canonical_revision"] == "v2"
    assert remote["workload_name"] == "db"
    assert remote["services"] == {"other/db.other.svc": {"80": 0, "5432": 15432}}
    assert list(remote["services"]["other/db.other.svc"]) == ["80", "5432"]
    assert remote["authorization_policies"] == ["default/a-first", "default/allow-web"]
    assert remote["waypoint"] == {
        "destination": "other/waypoint.other.svc",
        "hbone_mtls_port": 15008,
    }


def test_local_needs_a_node_name(state: ProxyState) -> None:
    dump = config_dump(state, [], config_source="x", node="")
    assert dump["node"] == ""
    assert all(w["local"] is False for w in dump["workloads"])
    assert dump["certificates"] == []


def test_services(dump: dict[str, object]) -> None:
    services = dump["services"]
    assert isinstance(services, list)
    assert [s["key"] for s in services] == [
        "default/example.com",
        "default/example2.com",
        "other/db.other.svc",
    ]
    for s in services:
        assert set(s) == SERVICE_KEYS
    by_key = _by(services, "key")
    assert by_key["default/example.com"] == {
        "key": "default/example.com",
        "name": "local",
        "namespace": "default",
        "hostname": "example.com",
        "vips": ["/127.10.0.1"],
        "ports": {"80": 8080},
        "subject_alt_names": ["spiffe://cluster.local/ns/default/sa/local"],
        "endpoints": ["cluster1//v1/Pod/default/local", "cluster1//v1/Pod/default/local-tcp"],
        "waypoint": None,
    }
    assert by_key["default/example2.com"]["vips"] == ["remote/127.10.0.2"]
    db = by_key["other/db.other.svc"]
    assert db["ports"] == {"80": 8080, "5432": 5432}
    assert list(db["ports"]) == ["80", "5432"]
    assert db["endpoints"] == ["cluster1//v1/Pod/other/db-0"]
    assert db["subject_alt_names"] == []
    assert db["waypoint"] == {"destination": "/10.0.9.9", "hbone_mtls_port": 15009}


def test_policies(dump: dict[str, object]) -> None:
    policies = dump["policies"]
    assert isinstance(policies, list)
    assert [p["key"] for p in policies] == ["default/allow-web", "default/deny-9999"]
    for p in policies:
        assert set(p) == POLICY_KEYS
    by_key = _by(policies, "key")
    assert by_key["default/deny-9999"] == {
        "key": "default/deny-9999",
        "name": "deny-9999",
        "namespace": "default",
        "scope": "NAMESPACE",
        "action": "ALLOW",
        "dry_run": False,
        "rules": [[[{"not_destination_ports": [9999]}]]],
    }
    extra = by_key["default/allow-web"]
    assert extra["scope"] == "WORKLOAD_SELECTOR"
    assert extra["action"] == "DENY"
    assert extra["dry_run"] is True
    assert extra["rules"] == [
        [
            [match_to_json(FULL_MATCH), {"destination_ports": [8080]}],
            [{"principals": ["*/sa/web"]}],
        ],
        [],
    ]


def test_match_fields() -> None:
    assert match_to_json(FULL_MATCH) == {
        "namespaces": ["default", "team-*"],
        "not_namespaces": ["*-test"],
        "principals": ["*"],
        "not_principals": ["cluster.local/ns/x/sa/y"],
        "source_ips": ["10.0.0.0/8", "fd00::1/128"],
        "not_source_ips": ["10.1.2.3/32"],
        "destination_ips": ["192.168.0.0/16"],
        "not_destination_ips": ["192.168.1.0/24"],
        "destination_ports": [80, 443],
        "not_destination_ports": [9999],
        "service_accounts": ["default/web"],
        "not_service_accounts": ["other/db"],
    }
    assert match_to_json(Match()) == {}


def test_certificates(dump: dict[str, object], ca: CertificateAuthority) -> None:
    certificates = dump["certificates"]
    assert isinstance(certificates, list)
    for c in certificates:
        assert set(c) == CERT_KEYS
    assert [c["identity"] for c in certificates] == [
        "spiffe://cluster.local/ns/default/sa/broken",
        "spiffe://cluster.local/ns/default/sa/default",
        "spiffe://cluster.local/ns/other/sa/db",
    ]
    failed, available, pending = certificates
    assert failed == {
        "identity": "spiffe://cluster.local/ns/default/sa/broken",
        "state": "failed",
        "not_before": None,
        "not_after": None,
        "refresh_at": None,
        "chain_length": 0,
        "error": "CA unreachable: connection refused",
    }
    assert pending["state"] == "pending"
    assert pending["error"] is None
    assert pending["not_after"] is None

    assert available["state"] == "available"
    assert available["error"] is None
    assert available["chain_length"] == 2  # leaf and the self-signed root
    for key in ("not_before", "not_after", "refresh_at"):
        text = available[key]
        assert isinstance(text, str)
        assert text.endswith("Z")
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert parsed.utcoffset() == timedelta(0)
    not_before = datetime.fromisoformat(available["not_before"].replace("Z", "+00:00"))
    not_after = datetime.fromisoformat(available["not_after"].replace("Z", "+00:00"))
    refresh_at = datetime.fromisoformat(available["refresh_at"].replace("Z", "+00:00"))
    assert not_before < refresh_at < not_after
    assert abs((refresh_at - not_before) - (not_after - refresh_at)) < timedelta(seconds=1)


def test_failed_with_previous_certificate(state: ProxyState, ca: CertificateAuthority) -> None:
    cert = ca.issue(LOCAL_ID, ttl=timedelta(hours=1))
    status = CertificateStatus(LOCAL_ID, FAILED, cert, "timed out")
    [entry] = config_dump(state, [status], config_source="x", node="local")["certificates"]
    assert entry["state"] == "failed"
    assert entry["error"] == "timed out"
    assert entry["not_after"] == rfc3339(cert.not_after)


def test_certificate_status_rejects_unknown_state() -> None:
    with pytest.raises(ValueError, match="not one of available, pending, failed"):
        CertificateStatus(LOCAL_ID, "ready", None, None)
    status = CertificateStatus(LOCAL_ID, PENDING, None, None)
    with pytest.raises(AttributeError):
        status.state = AVAILABLE  # type: ignore[misc]
    assert replace(status, state=AVAILABLE).state == AVAILABLE


def test_rfc3339() -> None:
    assert rfc3339(datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)) == "2024-05-01T12:00:00Z"
    east = timezone(timedelta(hours=2))
    assert rfc3339(datetime(2024, 5, 1, 14, 0, 0, tzinfo=east)) == "2024-05-01T12:00:00Z"
    assert rfc3339(datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)) == (
        "2024-05-01T12:00:00.500000Z"
    )
    assert rfc3339(datetime(2024, 5, 1, 12, 0, 0)) == "2024-05-01T12:00:00Z"
