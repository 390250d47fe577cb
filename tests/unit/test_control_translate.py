"""Translation of Kubernetes/Istio resources into the node agent's model.

Golden tests: each directory under tests/data/control/ holds `input/` (YAML as users write it)
and `expected.yaml` (the snapshot in ztunnel's local-config form, plus the errors and notes).
Set ZTAGENT_UPDATE_GOLDEN=1 to rewrite the expected files after a deliberate change, then
review the diff by hand.
"""

from __future__ import annotations

import ipaddress
import os
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ztagent.control import (
    ResourceError,
    TranslateOptions,
    parse_documents,
    read_directory,
    to_local_config,
    translate,
    translate_resources,
)
from ztagent.identity.spiffe import Identity
from ztagent.istio.authorization.l4 import ConnectionAttributes, evaluate
from ztagent.istio.envelope import Resource
from ztagent.model.localconfig import parse_local_config
from ztagent.model.policy import Action, Authorization, Scope, StringMatch
from ztagent.model.snapshot import ConfigSnapshot, ObjectError
from ztagent.model.workload import (
    GatewayAddress,
    NamespacedHostname,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)

DATA = Path(__file__).parent.parent / "data" / "control"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "input").is_dir())
ip = ipaddress.ip_address


def resources(text: str, file: str = "test.yaml") -> list[Resource]:
    batch = parse_documents(textwrap.dedent(text), file)
    assert batch.errors == ()
    return list(batch.resources)


def run(text: str, options: TranslateOptions | None = None) -> ConfigSnapshot:
    return translate(resources(text), options)


def errors(snapshot: ConfigSnapshot) -> list[str]:
    return [str(e) for e in snapshot.errors]


def golden(case: str) -> dict[str, Any]:
    batch = read_directory(DATA / case / "input")
    result = translate_resources(batch.resources)
    data = to_local_config(result.snapshot)
    data["errors"] = [str(e) for e in (*batch.errors, *result.snapshot.errors)]
    data["notes"] = [str(n) for n in result.notes]
    return data


# --- golden files ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    actual = golden(case)
    expected_path = DATA / case / "expected.yaml"
    if os.environ.get("ZTAGENT_UPDATE_GOLDEN") == "1":
        text = yaml.safe_dump(actual, sort_keys=False, width=200, allow_unicode=True)
        header = "# Expected translation of input/ (see the test module's docstring)\n"
        expected_path.write_text(header + text)
    expected = yaml.safe_load(expected_path.read_text())
    for section in ("workloads", "services", "policies", "errors", "notes"):
        assert actual[section] == expected[section], section


@pytest.mark.parametrize("case", CASES)
def test_golden_output_is_valid_local_config(case):
    """The node agent's own loader reads the translation back to the same values."""
    batch = read_directory(DATA / case / "input")
    snapshot = translate(batch.resources)
    document = {k: v for k, v in to_local_config(snapshot).items()}
    reread = parse_local_config(yaml.safe_dump(document))
    assert reread.workloads == snapshot.workloads
    assert reread.policies == snapshot.policies
    # ztunnel's file format refuses two services on one VIP; a ServiceEntry with several hosts
    # and addresses has exactly that, and the node agent's store accepts it.
    rejected = {e.key for e in reread.errors}
    assert all("is already used" in e.reason for e in reread.errors)
    assert reread.services == tuple(s for s in snapshot.services if s.key not in rejected)


def test_every_kind_has_a_golden_case():
    kinds: set[str] = set()
    for case in CASES:
        kinds |= {r.kind for r in read_directory(DATA / case / "input").resources}
    assert {
        "Namespace",
        "Pod",
        "Service",
        "ServiceEntry",
        "AuthorizationPolicy",
        "PeerAuthentication",
        "Gateway",
    } <= kinds


# --- workloads and services -----------------------------------------------------------------

SHOP = """
    apiVersion: v1
    kind: Namespace
    metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: shop}
    spec:
      selector: {app: web}
      clusterIP: 10.96.0.10
      ports:
      - {port: 80, targetPort: http}
      - {port: 443}
    ---
    apiVersion: v1
    kind: Pod
    metadata:
      name: web-5c6b9d8f7-abcde
      namespace: shop
      labels: {app: web, version: v1, pod-template-hash: 5c6b9d8f7}
      ownerReferences: [{kind: ReplicaSet, name: web-5c6b9d8f7, controller: true}]
    spec:
      nodeName: node-a
      containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
    status:
      podIPs: [{ip: 10.244.0.5}]
      conditions: [{type: Ready, status: "True"}]
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: other, namespace: shop, labels: {app: web}}
    status: {podIP: 10.244.0.6}
"""


def workload(snapshot: ConfigSnapshot, name: str) -> Workload:
    (found,) = [w for w in snapshot.workloads if w.name == name]
    return found


def test_pod_becomes_a_workload_like_istiod_builds_it():
    snap = run(SHOP)
    web = workload(snap, "web-5c6b9d8f7-abcde")
    assert web.uid == "Kubernetes//Pod/shop/web-5c6b9d8f7-abcde"
    assert web.addresses == (ip("10.244.0.5"),)
    assert web.tunnel_protocol is TunnelProtocol.HBONE
    assert web.service_account == "default"
    assert web.node == "node-a"
    assert (web.workload_name, web.workload_type) == ("web", "deployment")
    assert (web.canonical_name, web.canonical_revision) == ("web", "v1")
    assert web.status is WorkloadStatus.HEALTHY
    assert web.identity == Identity("cluster.local", "shop", "default")
    other = workload(snap, "other")
    assert other.status is WorkloadStatus.UNHEALTHY
    assert (other.workload_name, other.workload_type) == ("other", "pod")


def test_named_target_port_resolved_per_pod_and_unresolvable_reported():
    snap = run(SHOP)
    (service,) = snap.services
    assert service.key == "shop/web.shop.svc.cluster.local"
    assert dict(service.ports) == {80: 0, 443: 443}
    web = workload(snap, "web-5c6b9d8f7-abcde")
    assert dict(web.services[service.key]) == {80: 8080, 443: 443}
    other = workload(snap, "other")
    assert dict(other.services[service.key]) == {443: 443}
    (error,) = snap.errors
    assert isinstance(error, ObjectError)
    assert (error.kind, error.key, error.path) == (
        "Service",
        "shop/web",
        "spec.ports[0].targetPort",
    )
    assert '"http"' in error.reason and "shop/other" in error.reason


def test_tunnel_protocol_follows_enrollment():
    snap = run(
        """
        apiVersion: v1
        kind: Namespace
        metadata: {name: plain}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: a, namespace: plain}
        status: {podIP: 10.0.0.1}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: b, namespace: plain, labels: {istio.io/dataplane-mode: ambient}}
        status: {podIP: 10.0.0.2}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: c, namespace: nowhere}
        status: {podIP: 10.0.0.3}
        """
    )
    protocols = {w.name: w.tunnel_protocol for w in snap.workloads}
    assert protocols == {
        "a": TunnelProtocol.NONE,
        "b": TunnelProtocol.HBONE,
        "c": TunnelProtocol.NONE,
    }


def test_options_reach_the_output():
    options = TranslateOptions(cluster_id="east", trust_domain="example.org", network="net1")
    snap = run(SHOP, options)
    web = workload(snap, "web-5c6b9d8f7-abcde")
    assert web.uid.startswith("east//Pod/")
    assert web.cluster_id == "east"
    assert web.trust_domain == "example.org"
    assert web.network == "net1"
    assert str(snap.services[0].addresses[0]) == "net1/10.96.0.10"


# --- AuthorizationPolicy ------------------------------------------------------------------

POD_DB = """
    apiVersion: v1
    kind: Namespace
    metadata: {name: prod, labels: {istio.io/dataplane-mode: ambient}}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: db, namespace: prod, labels: {app: db}}
    status: {podIP: 10.1.0.6}
"""


def policy(snapshot: ConfigSnapshot, name: str) -> Authorization:
    (found,) = [p for p in snapshot.policies if p.name == name]
    return found


def applying(snapshot: ConfigSnapshot, target: Workload) -> list[Authorization]:
    """The policies the node agent applies to `target` (by scope, and listed by it)."""
    listed = set(target.authorization_policies)
    return [
        p
        for p in snapshot.policies
        if p.scope is Scope.GLOBAL
        or (p.scope is Scope.NAMESPACE and p.namespace == target.namespace)
        or p.key in listed
    ]


def conn(
    source: Identity | None, port: int, src: str = "10.9.0.1", dst: str = "10.1.0.6"
) -> ConnectionAttributes:
    return ConnectionAttributes(source, ip(src), ip(dst), port)


FROM_X = Identity("cluster.local", "x", "default")
FROM_PROD = Identity("cluster.local", "prod", "api")


def test_scopes_and_selector_listing():
    snap = run(
        POD_DB
        + """
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: global, namespace: istio-system}
    spec: {action: DENY, rules: [{from: [{source: {ipBlocks: [192.0.2.0/24]}}]}]}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: ns, namespace: prod}
    spec: {rules: [{}]}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: mesh-selector, namespace: istio-system}
    spec: {selector: {matchLabels: {app: db}}, rules: [{}]}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: sel, namespace: prod}
    spec: {selector: {matchLabels: {app: db}}}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: other-sel, namespace: prod}
    spec: {selector: {matchLabels: {app: web}}}
    """
    )
    assert policy(snap, "global").scope is Scope.GLOBAL
    assert policy(snap, "ns").scope is Scope.NAMESPACE
    assert policy(snap, "sel").scope is Scope.WORKLOAD_SELECTOR
    db = workload(snap, "db")
    assert db.authorization_policies == ("istio-system/mesh-selector", "prod/sel")


def test_empty_rule_matches_everything_and_no_rules_match_nothing():
    snap = run(
        POD_DB
        + """
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: all, namespace: prod}
    spec: {rules: [{}]}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: nothing, namespace: other}
    spec: {}
    """
    )
    assert evaluate(conn(None, 1), [policy(snap, "all")]).allowed
    assert not evaluate(conn(FROM_X, 1), [policy(snap, "nothing")]).allowed


L7_POLICIES = """
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-get, namespace: prod}
    spec:
      rules:
      - to: [{operation: {methods: [GET], ports: ["5432"]}}]
      - from: [{source: {namespaces: [x], requestPrincipals: ["*"]}}]
      - when: [{key: "request.auth.claims[iss]", values: [me]}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-mixed, namespace: prod}
    spec:
      action: DENY
      rules:
      - from: [{source: {namespaces: [x]}}]
        to: [{operation: {paths: [/admin]}}, {operation: {ports: ["80"]}}]
"""


def test_l7_allow_rules_are_dropped_and_fail_closed():
    result = translate_resources(resources(POD_DB + L7_POLICIES))
    allow = policy(result.snapshot, "allow-get")
    assert allow.rules == ()
    for identity in (FROM_X, FROM_PROD, None):
        assert not evaluate(conn(identity, 5432), [allow]).allowed
    dropped = [n for n in result.notes if n.key == "prod/allow-get"]
    assert [n.path for n in dropped] == ["spec.rules[0]", "spec.rules[1]", "spec.rules[2]"]
    assert "to.operation.methods" in dropped[0].reason
    assert "from.source.requestPrincipals" in dropped[1].reason
    assert "request.auth.claims[iss]" in dropped[2].reason
    assert result.snapshot.errors == ()


def test_l7_deny_rules_are_kept_without_their_l7_part():
    snap = run(POD_DB + L7_POLICIES)
    deny = policy(snap, "deny-mixed")
    # `to` had an HTTP-only entry: with paths gone it matches any port, so the DENY applies
    # to every port from namespace x (more restrictive than written, never less).
    (rule,) = deny.rules
    (clause,) = rule.clauses
    assert clause.matches[0].namespaces == (StringMatch.exact("x"),)
    assert not evaluate(conn(FROM_X, 80), [deny]).allowed
    assert not evaluate(conn(FROM_X, 9999), [deny]).allowed
    assert evaluate(conn(FROM_PROD, 80), [deny]).allowed


def test_deny_rule_with_only_l7_denies_everything_in_scope():
    result = translate_resources(
        resources(
            POD_DB
            + """
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-delete, namespace: prod}
    spec:
      action: DENY
      rules: [{to: [{operation: {methods: [DELETE]}}]}]
    """
        )
    )
    deny = policy(result.snapshot, "deny-delete")
    assert not evaluate(conn(FROM_PROD, 5432), [deny]).allowed
    (note,) = result.notes
    assert "denies all traffic" in note.reason


def test_when_keys_and_service_accounts():
    snap = run(
        """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: p, namespace: prod}
    spec:
      rules:
      - from: [{source: {serviceAccounts: [api, other/reader]}}]
        when:
        - {key: source.ip, values: [10.9.0.0/16], notValues: [10.9.9.0/24]}
        - {key: destination.port, values: ["5432"]}
        - {key: source.serviceAccount, notValues: [prod/banned]}
    """
    )
    p = policy(snap, "p")
    assert evaluate(conn(FROM_PROD, 5432), [p]).allowed
    assert not evaluate(conn(FROM_PROD, 5433), [p]).allowed
    assert not evaluate(conn(FROM_PROD, 5432, src="10.9.9.9"), [p]).allowed
    assert not evaluate(conn(FROM_X, 5432), [p]).allowed
    reader = Identity("cluster.local", "other", "reader")
    assert evaluate(conn(reader, 5432), [p]).allowed


def test_targetrefs_audit_and_custom_are_skipped_with_a_note():
    result = translate_resources(
        resources(
            """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: wp, namespace: prod}
    spec:
      targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
      rules: [{to: [{operation: {methods: [GET]}}]}]
    ---
    apiVersion: security.istio.io/v1beta1
    kind: AuthorizationPolicy
    metadata: {name: wp1, namespace: prod}
    spec:
      targetRef: {kind: Service, group: "", name: db}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: audit, namespace: prod}
    spec: {action: AUDIT, rules: [{}]}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: ext, namespace: prod}
    spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}
    """
        )
    )
    assert result.snapshot.policies == ()
    assert result.snapshot.errors == ()
    assert sorted(n.key or "" for n in result.notes) == [
        "prod/audit",
        "prod/ext",
        "prod/wp",
        "prod/wp1",
    ]


def test_dry_run_annotation():
    snap = run(
        """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: p, namespace: prod, annotations: {istio.io/dry-run: "true"}}
    spec: {action: DENY, rules: [{}]}
    """
    )
    assert policy(snap, "p").dry_run
    assert evaluate(conn(FROM_X, 1), snap.policies).allowed


# --- PeerAuthentication -------------------------------------------------------------------


def peer_case() -> tuple[ConfigSnapshot, dict[str, Workload]]:
    snap = translate(read_directory(DATA / "peer-authentication" / "input").resources)
    return snap, {f"{w.namespace}/{w.name}": w for w in snap.workloads}


@pytest.mark.parametrize(
    ("name", "port", "plaintext_allowed"),
    [
        ("relaxed/plain", 80, True),  # namespace PERMISSIVE beats mesh STRICT
        ("relaxed/db", 80, False),  # workload STRICT
        ("relaxed/cache", 80, True),  # PERMISSIVE ...
        ("relaxed/cache", 6379, False),  # ... but STRICT on 6379
        ("strict/plain", 80, False),  # mesh STRICT inherited
        ("strict/web", 80, False),  # STRICT ...
        ("strict/web", 8080, True),  # ... but PERMISSIVE on 8080
        ("strict/legacy", 80, True),  # DISABLE
        ("strict/metrics", 80, False),  # UNSET inherits STRICT ...
        ("strict/metrics", 9100, True),  # ... but DISABLE on 9100
    ],
)
def test_peer_authentication_effective_mode(name, port, plaintext_allowed):
    snap, workloads = peer_case()
    target = workloads[name]
    dst = str(target.addresses[0])
    verdict = evaluate(conn(None, port, dst=dst), applying(snap, target))
    assert verdict.allowed is plaintext_allowed, verdict.reason
    # mTLS callers are never refused by PeerAuthentication.
    assert evaluate(conn(FROM_X, port, dst=dst), applying(snap, target)).allowed


def test_static_strict_policy_is_istiods():
    snap, workloads = peer_case()
    static = policy(snap, "istio_converted_static_strict")
    assert static.key == "istio-system/istio_converted_static_strict"
    assert static.scope is Scope.WORKLOAD_SELECTOR and static.action is Action.DENY
    assert workloads["strict/plain"].authorization_policies == (static.key,)
    assert workloads["strict/web"].authorization_policies == (
        "strict/converted_peer_authentication_web-health",
    )


def test_no_peer_authentication_no_strict_policy():
    snap = run(POD_DB)
    assert snap.policies == ()
    assert workload(snap, "db").authorization_policies == ()


# --- waypoints -------------------------------------------------------------------------------


def test_waypoint_label_precedence():
    snap = translate(read_directory(DATA / "waypoints" / "input").resources)
    services = {s.name: s for s in snap.services}

    def at(ns: str, name: str) -> GatewayAddress:
        return GatewayAddress(hostname=NamespacedHostname(ns, f"{name}.{ns}.svc.cluster.local"))

    assert services["inherit"].waypoint == at("app", "ns-waypoint")
    assert services["own"].waypoint == at("app", "all-waypoint")
    assert services["direct"].waypoint is None
    assert services["ns-waypoint"].waypoint is None
    assert services["typo"].waypoint is None
    pods = {w.name: w for w in snap.workloads}
    assert pods["a"].waypoint is None
    assert pods["b"].waypoint == at("app", "all-waypoint")
    assert pods["c"].waypoint == at("infra", "shared")
    assert pods["d"].waypoint is None
    assert {(e.kind, e.key) for e in snap.errors} == {("Pod", "app/d"), ("Service", "app/typo")}


def test_cross_namespace_waypoint_needs_allowed_routes():
    snap = run(
        """
    apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: {name: wp, namespace: infra}
    spec:
      gatewayClassName: istio-waypoint
      listeners: [{name: mesh, port: 15008, protocol: HBONE}]
    ---
    apiVersion: v1
    kind: Service
    metadata:
      name: s
      namespace: app
      labels: {istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra}
    spec: {ports: [{port: 80}]}
    """
    )
    assert snap.services[0].waypoint is None
    assert "does not accept namespace app" in errors(snap)[0]


# --- validation ----------------------------------------------------------------------------


def test_error_names_kind_object_field_and_reason():
    snap = run(
        POD_DB
        + """
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-x, namespace: prod}
    spec:
      rules:
      - from:
        - source:
            ipBlocks: ["10.0.0.0/8", "10.0.0.300/8"]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: fine, namespace: prod}
    spec: {rules: [{}]}
    """
    )
    (error,) = snap.errors
    assert isinstance(error, ResourceError)
    assert (error.kind, error.key, error.file, error.index) == (
        "AuthorizationPolicy",
        "prod/allow-x",
        "test.yaml",
        2,
    )
    assert error.path == "spec.rules[0].from[0].source.ipBlocks[1]"
    assert str(error) == (
        "AuthorizationPolicy prod/allow-x: spec.rules[0].from[0].source.ipBlocks[1]: "
        '"10.0.0.300/8" is not an IP address or CIDR (test.yaml#2)'
    )
    assert [p.name for p in snap.policies] == ["fine"]
    assert [w.name for w in snap.workloads] == ["db"]


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        ("{rules: [{from: [{source: {principal: [x]}}]}]}", "source.principal", "unknown field"),
        ("{rules: [{from: [{source: {}}]}]}", "from[0].source", "must not be empty"),
        ("{rules: [{from: []}]}", "rules[0].from", "must not be empty"),
        ("{rules: [{to: [{operation: {ports: [http]}}]}]}", "ports[0]", "not a port"),
        ("{rules: [{when: [{key: source.ip}]}]}", "when[0]", "at least one of"),
        ("{rules: [{when: [{key: nope, values: [x]}]}]}", "when[0].key", "not a known"),
        ("{rules: [null]}", "rules[0]", "must not be null"),
        ("{action: REJECT}", "spec.action", "is not one of"),
        ("{rules: [{from: [{source: {principals: ['']}}]}]}", "principals[0]", "must not be"),
        (
            "{rules: [{from: [{source: {namespaces: [a], serviceAccounts: [b]}}]}]}",
            "source",
            "cannot be combined",
        ),
        ("{selector: {matchLabels: {a: b}}, targetRefs: [{name: x}]}", "spec", "cannot be"),
    ],
)
def test_authorization_policy_validation(spec, path, reason):
    snap = run(
        f"""
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{name: p, namespace: prod}}
    spec: {spec}
    """
    )
    (error,) = snap.errors
    assert error.path.endswith(path), error
    assert reason in error.reason, error
    assert snap.policies == ()


def test_unknown_kinds_are_ignored_not_errors():
    snap = run(
        """
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: d, namespace: prod}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: v, namespace: prod}
    spec: {hosts: [x]}
    """
    )
    assert snap == ConfigSnapshot() and snap.errors == ()


def test_duplicates_keep_the_first():
    snap = run(
        """
    apiVersion: v1
    kind: Pod
    metadata: {name: a, namespace: prod}
    status: {podIP: 10.0.0.1}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: a, namespace: prod}
    status: {podIP: 10.0.0.2}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: b, namespace: prod}
    status: {podIP: 10.0.0.1}
    """
    )
    assert [(w.name, str(w.addresses[0])) for w in snap.workloads] == [("a", "10.0.0.1")]
    assert errors(snap) == [
        "Pod prod/a: duplicate of the one in test.yaml#0 (test.yaml#1)",
        "Pod prod/b: status.podIPs: address 10.0.0.1 is already used by Pod prod/a (test.yaml#2)",
    ]


# --- sources -------------------------------------------------------------------------------


def test_documents_are_indexed_per_file_and_errors_do_not_hide_the_rest():
    batch = parse_documents(
        textwrap.dedent(
            """\
            ---
            # comment-only documents do not count
            ---
            apiVersion: v1
            kind: Namespace
            metadata: {name: a}
            ---
            apiVersion: v1
            kind: Pod
            metadata: {name: [broken
            ---
            kind: Pod
            metadata: {name: x}
            ---
            apiVersion: v1
            kind: Namespace
            metadata: {name: b}
            ...
            """
        ),
        "f.yaml",
    )
    assert [(r.name, r.index) for r in batch.resources] == [("a", 0), ("b", 3)]
    assert [(e.file, e.index) for e in batch.errors] == [("f.yaml", 1), ("f.yaml", 2)]
    assert str(batch.errors[0]).startswith("f.yaml#1: not valid YAML:")
    assert "line 10" in str(batch.errors[0])
    assert str(batch.errors[1]) == "Pod: apiVersion: is required (a non-empty string) (f.yaml#2)"


def test_read_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n"
    (tmp_path / "b.yaml").write_text(ns % "b")
    (tmp_path / "sub" / "a.yml").write_text(ns % "a1" + "---\n" + ns % "a2")
    (tmp_path / "c.json").write_text(
        '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "c"}}'
    )
    (tmp_path / ".hidden" / "x.yaml").write_text(ns % "hidden")
    (tmp_path / "notes.txt").write_text("not yaml at all: [")
    batch = read_directory(tmp_path)
    assert [(r.file, r.index, r.name) for r in batch.resources] == [
        ("b.yaml", 0, "b"),
        ("c.json", 0, "c"),
        ("sub/a.yml", 0, "a1"),
        ("sub/a.yml", 1, "a2"),
    ]
    assert batch.errors == ()
    assert str(read_directory(tmp_path / "missing").errors[0]).endswith("no such directory")


# --- arbitrary input -------------------------------------------------------------------------

KINDS = [
    ("v1", "Namespace"),
    ("v1", "Pod"),
    ("v1", "Service"),
    ("networking.istio.io/v1", "ServiceEntry"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("security.istio.io/v1beta1", "PeerAuthentication"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
]
FIELD_NAMES = [
    "spec",
    "status",
    "metadata",
    "rules",
    "from",
    "to",
    "when",
    "source",
    "operation",
    "principals",
    "ipBlocks",
    "ports",
    "port",
    "targetPort",
    "selector",
    "matchLabels",
    "labels",
    "podIP",
    "podIPs",
    "ip",
    "mtls",
    "mode",
    "portLevelMtls",
    "hosts",
    "endpoints",
    "address",
    "action",
    "key",
    "values",
    "containers",
    "name",
    "namespace",
    "clusterIP",
    "listeners",
    "gatewayClassName",
    "istio.io/use-waypoint",
    "conditions",
    "type",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.sampled_from(
        [
            "",
            "*",
            "STRICT",
            "DENY",
            "10.0.0.1",
            "10.0.0.0/8",
            "http",
            "app",
            "x*",
            "istio-waypoint",
            "ambient",
            "none",
            "True",
            "Ready",
            "::1",
            "a/b",
        ]
    ),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=25,
)


@st.composite
def documents(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    api_version, kind = draw(st.sampled_from(KINDS))
    document = draw(st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=4))
    document["apiVersion"] = api_version
    document["kind"] = kind
    metadata = draw(st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=3))
    metadata["name"] = draw(st.sampled_from(["a", "b", "waypoint"]))
    if draw(st.booleans()):
        metadata["namespace"] = draw(st.sampled_from(["prod", "istio-system", "default"]))
    document["metadata"] = metadata
    return document


def check_snapshot(snapshot: ConfigSnapshot) -> None:
    assert all(isinstance(e, ResourceError) and str(e) for e in snapshot.errors)
    keys = [w.uid for w in snapshot.workloads]
    assert len(keys) == len(set(keys))
    services = [s.key for s in snapshot.services]
    assert len(services) == len(set(services))
    # The node agent's loader accepts what we produce.
    yaml.safe_dump(to_local_config(snapshot))


@settings(max_examples=300)
@given(st.lists(documents(), max_size=8))
def test_arbitrary_documents_only_ever_produce_errors(docs: Iterable[Any]):
    text = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    batch = parse_documents(text, "fuzz.yaml")
    result = translate_resources(batch.resources)
    check_snapshot(result.snapshot)


@settings(max_examples=200)
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text: str):
    batch = parse_documents(text, "fuzz.yaml")
    check_snapshot(translate(batch.resources))
