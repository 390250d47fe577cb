"""One AuthorizationPolicy model, two outputs: the node agent's L4 lowering and the waypoint's
L7 evaluation read the same `AuthorizationPolicy`, each refusing only what it cannot enforce."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from ztagent.fields import Invalid
from ztagent.identity.spiffe import Identity
from ztagent.istio.authorization import l4, l7
from ztagent.istio.authorization.policy import (
    Action,
    Attribute,
    AuthorizationPolicy,
    read_authorization_policy,
)
from ztagent.istio.authorization.waypoint import (
    check_kind,
    parse_authorization_policy,
    read_authorization_policies,
)
from ztagent.istio.envelope import Resource
from ztagent.model.policy import Action as L4Action
from ztagent.model.policy import Scope

WAYPOINT = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}
CLIENT = Identity("cluster.local", "prod", "client")
ip = ipaddress.ip_address


def resource(spec: dict[str, Any], *, namespace: str = "prod", kind: str = "AuthorizationPolicy"):
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": "p", "namespace": namespace},
        "spec": spec,
    }
    return Resource("p.yaml", 0, "security.istio.io/v1", kind, "p", namespace, body)


def connection(port: int, identity: Identity | None = CLIENT) -> l4.ConnectionAttributes:
    return l4.ConnectionAttributes(identity, ip("10.0.0.1"), ip("10.0.0.2"), port)


def request(method: str, port: int = 8080) -> l7.RequestContext:
    return l7.RequestContext(method, "/", "db", port, source_identity=CLIENT)


RULES = [
    {
        "from": [{"source": {"principals": ["cluster.local/ns/prod/sa/client"]}}],
        "to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}],
    }
]


def test_one_model_read_once_serves_both_enforcement_points() -> None:
    model = read_authorization_policy(resource({"action": "DENY", "rules": RULES}))
    assert isinstance(model, AuthorizationPolicy)
    assert (model.key, model.action, model.selector, model.targets) == (
        "prod/p",
        Action.DENY,
        None,
        (),
    )
    (rule,) = model.rules
    assert rule.operations is not None and rule.operations[0].ports == (8080,)

    lowered = l4.lower(model)
    assert lowered.authorization.action is L4Action.DENY
    assert lowered.authorization.scope is Scope.NAMESPACE
    # L4 cannot see the method: the DENY rule keeps its L4 part, more restrictive than written.
    assert lowered.notes == (
        (
            "spec.rules[0]",
            "DENY rule enforced without to.operation.methods (more restrictive than written)",
        ),
    )
    policies = [lowered.authorization]
    assert not l4.evaluate(connection(8080), policies).allowed
    assert l4.evaluate(connection(8081), policies).allowed

    # The same model decides requests at L7, method included.
    assert not l7.evaluate([model], request("GET")).allowed
    assert l7.evaluate([model], request("POST")).allowed


def test_allow_rule_with_http_fields_is_dropped_at_l4_only() -> None:
    model = read_authorization_policy(resource({"rules": RULES}))
    lowered = l4.lower(model)
    assert lowered.authorization.rules == ()
    assert "ALLOW rule dropped" in lowered.notes[0][1]
    assert not l4.evaluate(connection(8080), [lowered.authorization]).allowed
    assert l7.evaluate([model], request("GET")).allowed


def test_root_namespace_and_selector_scopes() -> None:
    root = read_authorization_policy(resource({"rules": [{}]}, namespace="istio-system"))
    assert l4.lower(root).authorization.scope is Scope.GLOBAL
    selected = read_authorization_policy(resource({"selector": {"matchLabels": {"app": "db"}}}))
    assert selected.selector == {"app": "db"}
    assert l4.lower(selected).authorization.scope is Scope.WORKLOAD_SELECTOR


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"targetRefs": [WAYPOINT]}, "attached to a waypoint"),
        ({"action": "AUDIT"}, "AUDIT policies are not enforced"),
        ({"action": "CUSTOM", "provider": {"name": "opa"}}, "CUSTOM policies are not enforced"),
    ],
)
def test_not_the_node_agents_policy(spec: dict[str, Any], reason: str) -> None:
    # Read without rules: a waypoint policy's rules are the waypoint's to report.
    spec = {**spec, "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}
    model = read_authorization_policy(resource(spec), rules=False)
    assert model.rules == ()
    skipped = l4.not_enforced(model)
    assert skipped is not None and reason in skipped[1]
    with pytest.raises(Invalid, match="not a port number"):
        read_authorization_policy(resource(spec))


@pytest.mark.parametrize(
    ("rule", "path", "waypoint_reason", "unseen"),
    [
        (
            {"from": [{"source": {"trustDomains": ["td"]}}]},
            "spec.rules[0].from[0].source.trustDomains",
            "unknown field",
            "from.source.trustDomains",
        ),
        (
            {"when": [{"key": "experimental.envoy.filters.a[b]", "values": ["x"]}]},
            "spec.rules[0].when[0].key",
            "experimental attributes are not supported",
            "when experimental.envoy.filters.a[b]",
        ),
        (
            {"when": [{"key": "source.trustDomain", "values": ["td"]}]},
            "spec.rules[0].when[0].key",
            "is not a known attribute",
            "when source.trustDomain",
        ),
        (
            {"when": [{"key": "request.headers[a][b]", "values": ["x"]}]},
            "spec.rules[0].when[0].key",
            "must have the form",
            "when request.headers[a][b]",
        ),
        (
            {"to": [{"operation": {"paths": ["/a/{id}"]}}]},
            "spec.rules[0].to[0].operation.paths[0]",
            "beyond the templates",
            "to.operation.paths",
        ),
    ],
)
def test_what_only_the_waypoint_refuses(
    rule: dict[str, Any], path: str, waypoint_reason: str, unseen: str
) -> None:
    spec = {"action": "DENY", "rules": [rule]}
    model = read_authorization_policy(resource(spec))
    assert model.unsupported[0][0] == path
    # The node agent sees none of these attributes: it enforces the DENY without them.
    lowered = l4.lower(model)
    assert lowered.authorization.rules[0].clauses == ()
    assert unseen in lowered.notes[0][1]
    # The waypoint could not evaluate them: the policy is refused, naming the field.
    config = read_authorization_policies([resource({**spec, "targetRefs": [WAYPOINT]})])
    (error,) = config.errors
    assert error.path == path and waypoint_reason in error.reason


@pytest.mark.parametrize(
    ("key", "l4_reason", "waypoint_reason"),
    [
        ("destination.labels[app]", "is not a known attribute", "replaced by the policy's"),
        ("experimental.other", "is not a known attribute", "experimental attributes"),
        ("nope", "is not a known attribute", "is not a known attribute"),
    ],
)
def test_keys_neither_enforcement_point_takes(
    key: str, l4_reason: str, waypoint_reason: str
) -> None:
    spec = {"rules": [{"when": [{"key": key, "values": ["x"]}]}]}
    model = read_authorization_policy(resource(spec))
    (condition,) = model.rules[0].conditions
    assert condition.attribute is None
    with pytest.raises(Invalid, match=l4_reason) as info:
        l4.lower(model)
    assert info.value.path == "spec.rules[0].when[0].key"
    config = read_authorization_policies([resource({**spec, "targetRefs": [WAYPOINT]})])
    assert waypoint_reason in config.errors[0].reason


def test_when_keys_the_node_agent_enforces() -> None:
    spec = {
        "rules": [
            {
                "when": [
                    {"key": "destination.port", "values": ["8080"], "notValues": ["0"]},
                    {"key": "source.namespace", "values": ["prod"]},
                ]
            }
        ]
    }
    model = read_authorization_policy(resource(spec))
    assert [c.attribute for c in model.rules[0].conditions] == [
        Attribute.DESTINATION_PORT,
        Attribute.SOURCE_NAMESPACE,
    ]
    lowered = l4.lower(model)
    assert lowered.notes == ()
    policies = [lowered.authorization]
    assert l4.evaluate(connection(8080), policies).allowed
    assert not l4.evaluate(connection(8081), policies).allowed
    assert not l4.evaluate(connection(8080, identity=None), policies).allowed


def test_kind_check_names_the_kind() -> None:
    check_kind(resource({}), "AuthorizationPolicy")
    with pytest.raises(Invalid, match="is not a RequestAuthentication"):
        check_kind(resource({}), "RequestAuthentication")
    with pytest.raises(Invalid, match="is not an AuthorizationPolicy"):
        parse_authorization_policy(resource({}, kind="PeerAuthentication"))
