"""Waypoint L7 authorization: AuthorizationPolicy with targetRefs, every field, the order."""

from __future__ import annotations

import contextlib
import ipaddress
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztagent.identity.spiffe import Identity
from ztagent.istio.authorization.l7 import (
    DENIED_BODY,
    DENIED_STATUS,
    RequestAuth,
    RequestContext,
    evaluate,
    policies_for,
    strip_query,
)
from ztagent.istio.authorization.policy import Action, AuthorizationPolicy, PathTemplate
from ztagent.istio.authorization.waypoint import (
    parse_authorization_policy,
    read_authorization_policies,
)
from ztagent.istio.envelope import Resource
from ztagent.istio.routing import Headers

ip = ipaddress.ip_address
WAYPOINT = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}


def resource(
    spec: dict[str, Any],
    *,
    name: str = "p",
    namespace: str = "ns",
    annotations: dict[str, str] | None = None,
    api_version: str = "security.istio.io/v1",
    index: int = 0,
) -> Resource:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = annotations
    body = {
        "apiVersion": api_version,
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": spec,
    }
    return Resource(
        "policies.yaml", index, api_version, "AuthorizationPolicy", name, namespace, body
    )


def policy(
    rules: list[Any] | None = None,
    action: str = "ALLOW",
    *,
    name: str = "p",
    dry_run: bool = False,
    **extra: Any,
) -> AuthorizationPolicy:
    spec: dict[str, Any] = {"targetRefs": [WAYPOINT], "action": action, **extra}
    if rules is not None:
        spec["rules"] = rules
    annotations = {"istio.io/dry-run": "true"} if dry_run else None
    parsed = parse_authorization_policy(resource(spec, name=name, annotations=annotations))
    assert parsed is not None
    return parsed


CLIENT = Identity("cluster.local", "client-ns", "client-sa")


def request(**changes: Any) -> RequestContext:
    base: dict[str, Any] = {
        "method": "GET",
        "path": "/api/v1/items?x=1",
        "host": "Shop.Example.com:8080",
        "destination_port": 8080,
        "headers": Headers.of([("X-Env", "prod"), ("x-env", "eu"), ("x-empty", "")]),
        "source_identity": CLIENT,
        "source_ip": ip("10.1.2.3"),
        "destination_ip": ip("10.96.0.10"),
        "sni": "shop.example.com",
        "auth": RequestAuth(
            {
                "iss": "https://issuer.example.com",
                "sub": "alice",
                "aud": ["shop", "admin"],
                "azp": "web",
                "groups": ["dev", "ops"],
                "org": {"team": {"name": "payments"}},
                "level": 3,
            }
        ),
    }
    base.update(changes)
    return RequestContext(**base)


def allowed_by(rule: dict[str, Any], req: RequestContext | None = None) -> bool:
    """Does a single ALLOW rule let `req` through?"""
    return evaluate([policy([rule])], req or request()).allowed


# --- the decision order ------------------------------------------------------------------------


def test_no_policy_allows() -> None:
    decision = evaluate([], request())
    assert decision.allowed and decision.policy is None
    assert decision.status is None and decision.body == b""


def test_allow_match_and_default_deny_when_any_allow() -> None:
    get_only = policy([{"to": [{"operation": {"methods": ["GET"]}}]}], name="get")
    assert evaluate([get_only], request()).policy == "ns/get"
    denied = evaluate([get_only], request(method="POST"))
    assert not denied.allowed and denied.policy is None
    assert denied.status == DENIED_STATUS == 403
    assert denied.body == DENIED_BODY == b"RBAC: access denied"
    assert "no ALLOW policy matched" in denied.reason


def test_deny_beats_allow() -> None:
    allow_all = policy([{}], name="all")
    deny_get = policy([{"to": [{"operation": {"methods": ["GET"]}}]}], "DENY", name="no-get")
    decision = evaluate([allow_all, deny_get], request())
    assert not decision.allowed and decision.policy == "ns/no-get"
    assert evaluate([allow_all, deny_get], request(method="PUT")).allowed


def test_allow_without_rules_allows_nothing_and_empty_rule_everything() -> None:
    assert not evaluate([policy()], request()).allowed
    assert evaluate([policy([{}])], request()).allowed
    assert evaluate([policy(None, "DENY")], request()).allowed  # a DENY without rules: nothing


def test_audit_records_but_never_decides() -> None:
    audit = policy([{}], "AUDIT", name="audit")
    only = evaluate([audit], request())
    assert only.allowed and only.audited and only.audit_policies == ("ns/audit",)
    # AUDIT is not an ALLOW: it does not switch on default-deny, nor allow past it.
    get_only = policy([{"to": [{"operation": {"methods": ["GET"]}}]}], name="get")
    denied = evaluate([audit, get_only], request(method="POST"))
    assert not denied.allowed and denied.audited
    quiet = policy([{"to": [{"operation": {"paths": ["/nope"]}}]}], "AUDIT")
    assert not evaluate([quiet], request()).audited


def test_dry_run_is_reported_not_enforced() -> None:
    deny = policy([{}], "DENY", name="would-deny", dry_run=True)
    decision = evaluate([deny], request())
    assert decision.allowed
    assert decision.dry_run_matches == ("ns/would-deny",)
    assert decision.dry_run_allowed is False
    # A dry-run ALLOW does not switch on default-deny either.
    allow_none = policy([{"to": [{"operation": {"paths": ["/nope"]}}]}], dry_run=True)
    decision = evaluate([allow_none], request())
    assert decision.allowed and decision.dry_run_matches == ()
    assert decision.dry_run_allowed is False
    assert evaluate([policy([{}])], request()).dry_run_allowed is None


def test_custom_fails_closed_as_deny() -> None:
    custom = policy(
        [{"to": [{"operation": {"paths": ["/admin*"]}}]}], "CUSTOM", provider={"name": "ext"}
    )
    decision = evaluate([custom], request(path="/admin/users"))
    assert not decision.allowed and "CUSTOM" in decision.reason
    assert evaluate([custom], request()).allowed


def test_a_policy_listed_twice_counts_once() -> None:
    deny = policy([{}], "DENY")
    assert evaluate([deny, deny], request()).policy == "ns/p"


# --- source fields -----------------------------------------------------------------------------

SOURCE_CASES = [
    ({"principals": ["cluster.local/ns/client-ns/sa/client-sa"]}, True),
    ({"principals": ["cluster.local/ns/other/*"]}, False),
    ({"principals": ["*"]}, True),
    ({"notPrincipals": ["*/sa/client-sa"]}, False),
    ({"notPrincipals": ["cluster.local/ns/other/sa/x"]}, True),
    ({"namespaces": ["client-*"]}, True),
    ({"namespaces": ["other"]}, False),
    ({"notNamespaces": ["client-ns"]}, False),
    ({"serviceAccounts": ["client-ns/client-sa"]}, True),
    ({"serviceAccounts": ["client-sa"]}, False),  # bare name means the policy's namespace
    ({"notServiceAccounts": ["client-ns/client-sa"]}, False),
    ({"requestPrincipals": ["https://issuer.example.com/alice"]}, True),
    ({"requestPrincipals": ["https://issuer.example.com/bob"]}, False),
    ({"requestPrincipals": ["*"]}, True),
    ({"requestPrincipals": ["https://issuer.example.com/*"]}, True),
    ({"requestPrincipals": ["*/alice"]}, True),
    ({"requestPrincipals": ["*.example.com/alice"]}, True),
    ({"requestPrincipals": ["*ice"]}, True),
    ({"requestPrincipals": ["https://other*"]}, False),
    ({"notRequestPrincipals": ["*"]}, False),
    ({"ipBlocks": ["10.1.0.0/16"]}, True),
    ({"ipBlocks": ["10.2.0.0/16", "192.168.0.1"]}, False),
    ({"notIpBlocks": ["10.1.2.3"]}, False),
    ({"remoteIpBlocks": ["10.1.2.0/24"]}, True),  # remote ip defaults to the source ip
    ({"notRemoteIpBlocks": ["10.0.0.0/8"]}, False),
]


@pytest.mark.parametrize(("source", "expected"), SOURCE_CASES)
def test_source_fields(source: dict[str, Any], expected: bool) -> None:
    assert allowed_by({"from": [{"source": source}]}) is expected


def test_missing_attributes_fail_positive_and_pass_negative_fields() -> None:
    anonymous = request(source_identity=None, auth=None, source_ip=None)
    for source, positive in (
        ({"principals": ["*"]}, True),
        ({"notPrincipals": ["*"]}, False),
        ({"requestPrincipals": ["*"]}, True),
        ({"notRequestPrincipals": ["*"]}, False),
        ({"ipBlocks": ["0.0.0.0/0"]}, True),
        ({"notIpBlocks": ["0.0.0.0/0"]}, False),
    ):
        assert allowed_by({"from": [{"source": source}]}, anonymous) is not positive


def test_remote_ip_comes_from_the_remote_address_when_known() -> None:
    req = request(remote_ip=ip("203.0.113.9"))
    assert allowed_by({"from": [{"source": {"remoteIpBlocks": ["203.0.113.0/24"]}}]}, req)
    assert not allowed_by({"from": [{"source": {"remoteIpBlocks": ["10.1.2.3"]}}]}, req)
    assert allowed_by({"from": [{"source": {"ipBlocks": ["10.1.2.3"]}}]}, req)


def test_request_principal_needs_both_claims() -> None:
    no_sub = request(auth=RequestAuth({"iss": "https://issuer.example.com"}))
    assert not allowed_by({"from": [{"source": {"requestPrincipals": ["*"]}}]}, no_sub)
    # Split at the last "/": "*/alice" needs sub == "alice", not a suffix of "iss/sub".
    nested = request(auth=RequestAuth({"iss": "https://a", "sub": "x/alice"}))
    assert not allowed_by({"from": [{"source": {"requestPrincipals": ["*/alice"]}}]}, nested)
    assert RequestAuth({"iss": "i", "sub": "s"}).principal == "i/s"


def test_sources_are_ored_and_fields_anded() -> None:
    either = {
        "from": [{"source": {"namespaces": ["x"]}}, {"source": {"namespaces": ["client-ns"]}}]
    }
    assert allowed_by(either)
    both = {"from": [{"source": {"namespaces": ["client-ns"], "ipBlocks": ["192.0.2.0/24"]}}]}
    assert not allowed_by(both)


# --- operation fields --------------------------------------------------------------------------

OPERATION_CASES = [
    ({"methods": ["GET", "HEAD"]}, True),
    ({"methods": ["get"]}, False),  # methods are case-sensitive
    ({"notMethods": ["GET"]}, False),
    ({"paths": ["/api/v1/items"]}, True),  # the query string is not part of the path
    ({"paths": ["/api/v1/items?x=1"]}, False),
    ({"paths": ["/api/*"]}, True),
    ({"paths": ["*/items"]}, True),
    ({"paths": ["*"]}, True),
    ({"paths": ["/api"]}, False),
    ({"notPaths": ["/api/*"]}, False),
    ({"paths": ["/api/{*}/items"]}, True),
    ({"paths": ["/{*}/items"]}, False),
    ({"paths": ["/api/{**}"]}, True),
    ({"paths": ["/{**}"]}, True),
    ({"paths": ["/api/v1/{*}/{**}"]}, False),  # {*} needs one more segment
    ({"notPaths": ["/api/{**}"]}, False),
    ({"hosts": ["shop.example.com:8080"]}, True),  # case-insensitive
    ({"hosts": ["shop.example.com"]}, False),  # the port is part of the authority
    ({"hosts": ["SHOP.example.com:*"]}, True),
    ({"hosts": ["*.example.com:8080"]}, True),
    ({"hosts": ["*"]}, True),
    ({"notHosts": ["shop.example.com:*"]}, False),
    ({"ports": ["8080"]}, True),
    ({"ports": [9090]}, False),
    ({"notPorts": ["8080"]}, False),
    ({"notPorts": ["9090"]}, True),
]


@pytest.mark.parametrize(("operation", "expected"), OPERATION_CASES)
def test_operation_fields(operation: dict[str, Any], expected: bool) -> None:
    assert allowed_by({"to": [{"operation": operation}]}) is expected


def test_host_without_port() -> None:
    req = request(host="shop.example.com")
    assert allowed_by({"to": [{"operation": {"hosts": ["Shop.Example.COM"]}}]}, req)
    assert not allowed_by({"to": [{"operation": {"hosts": ["shop.example.com:*"]}}]}, req)


def test_from_to_and_when_are_anded() -> None:
    rule = {
        "from": [{"source": {"namespaces": ["client-ns"]}}],
        "to": [{"operation": {"methods": ["GET"]}}],
        "when": [{"key": "request.headers[x-env]", "values": ["prod*"]}],
    }
    assert allowed_by(rule)
    assert not allowed_by(rule, request(method="POST"))
    assert not allowed_by(rule, request(headers=Headers.of({"x-env": "dev"})))


# --- when conditions ---------------------------------------------------------------------------

WHEN_CASES = [
    ("request.headers[X-Env]", ["prod,eu"], None, True),  # repeated headers joined with ","
    ("request.headers[x-env]", ["prod"], None, False),
    ("request.headers[x-env]", ["*eu"], None, True),
    ("request.headers[x-empty]", ["*"], None, True),  # "*" is presence, even when empty
    ("request.headers[x-missing]", ["*"], None, False),
    ("request.headers[x-missing]", None, ["*"], True),
    ("source.ip", ["10.1.2.0/24"], None, True),
    ("source.ip", None, ["10.1.2.3"], False),
    ("remote.ip", ["10.1.2.3"], None, True),
    ("source.namespace", ["client-ns"], None, True),
    ("source.namespace", None, ["client-*"], False),
    ("source.principal", ["*/sa/client-sa"], None, True),
    ("source.serviceAccount", ["client-ns/client-sa"], None, True),
    ("request.auth.principal", ["https://issuer.example.com/alice"], None, True),
    ("request.auth.principal", None, ["*"], False),
    ("request.auth.audiences", ["admin"], None, True),
    ("request.auth.audiences", ["billing"], None, False),
    ("request.auth.presenter", ["web"], None, True),
    ("request.auth.presenter", ["cli"], None, False),
    ("request.auth.claims[groups]", ["ops"], None, True),  # any element of a list claim
    ("request.auth.claims[groups]", ["qa"], None, False),
    ("request.auth.claims[sub]", ["ali*"], None, True),
    ("request.auth.claims[org][team][name]", ["payments"], None, True),
    ("request.auth.claims[org][team][name]", ["billing"], None, False),
    ("request.auth.claims[org][team]", ["*"], None, False),  # a mapping is not a string
    ("request.auth.claims[level]", ["3"], None, False),  # numbers never match strings
    ("request.auth.claims[missing]", None, ["x"], True),
    ("destination.ip", ["10.96.0.0/12"], None, True),
    ("destination.ip", ["10.0.0.1"], None, False),
    ("destination.port", ["8080"], None, True),
    ("destination.port", None, ["8080"], False),
    ("connection.sni", ["*.example.com"], None, True),
    ("connection.sni", ["other"], None, False),
]


@pytest.mark.parametrize(("key", "values", "not_values", "expected"), WHEN_CASES)
def test_when_conditions(
    key: str, values: list[str] | None, not_values: list[str] | None, expected: bool
) -> None:
    condition: dict[str, Any] = {"key": key}
    if values is not None:
        condition["values"] = values
    if not_values is not None:
        condition["notValues"] = not_values
    assert allowed_by({"when": [condition]}) is expected


def test_claims_need_a_token() -> None:
    rule = {"when": [{"key": "request.auth.claims[groups]", "values": ["*"]}]}
    assert not allowed_by(rule, request(auth=None))


def test_strip_query() -> None:
    assert strip_query("/a/b?c=d#e") == "/a/b"
    assert strip_query("/a#x?y") == "/a"
    assert strip_query("/plain") == "/plain"


# --- path templates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("/foo/{*}", "/foo/bar", True),
        ("/foo/{*}", "/foo/bar/baz", False),
        ("/foo/{*}", "/foo/", False),
        ("/foo/{*}/baz", "/foo/x/baz", True),
        ("/foo/{**}", "/foo/", True),
        ("/foo/{**}", "/foo/a/b/c", True),
        ("/foo/{**}", "/foo", False),
        ("/{*}/{**}", "/a/b/c", True),
        ("/foo/{**}/bar", "/foo/a/b/bar", True),  # literals may follow {**}, operators not
        ("/foo/{**}/bar", "/foo/a/b", False),
        ("/foo/{*}/", "/foo/x/", True),
        ("/foo/{*}/", "/foo/x", False),
        ("/f.o/{*}", "/fxo/a", False),  # literals are literal, not regular expressions
        ("/a/{*}", "/a/b*c", False),  # `*` is not a path character of a segment
    ],
)
def test_path_template(template: str, path: str, expected: bool) -> None:
    assert PathTemplate.parse(template).matches(path) is expected


@pytest.mark.parametrize(
    "template",
    ["/foo/{**}/{**}", "/{**}/{*}", "/foo/{*}x", "/foo/{name}", "foo/{*}", "/a//{*}", "/a*/{*}"],
)
def test_bad_path_templates(template: str) -> None:
    with pytest.raises(ValueError):
        PathTemplate.parse(template)


_SEGMENT = st.text(alphabet="ab.-~%:@", min_size=1, max_size=4)
_PATTERN_PART = st.one_of(st.just("{*}"), _SEGMENT)


_PCHARS = string.ascii_letters + string.digits + "-._~%!$&'()+,;:@"


def _reference_match(template: str, path: str) -> bool:
    """Segment by segment: `{*}` one non-empty segment, `{**}` (last) any remainder."""
    want = template[1:].split("/")
    have = path[1:].split("/") if path.startswith("/") else None
    if have is None:
        return False
    if want[-1] == "{**}":
        head = want[:-1]
        if len(have) < len(head) + 1:
            return False
        rest = "/".join(have[len(head) :])
        return _segments_equal(head, have[: len(head)]) and all(c in _PCHARS + "/" for c in rest)
    return len(want) == len(have) and _segments_equal(want, have)


def _segments_equal(want: list[str], have: list[str]) -> bool:
    return all(
        (w == "{*}" and h != "" and all(c in _PCHARS for c in h)) or w == h
        for w, h in zip(want, have, strict=True)
    )


@given(
    parts=st.lists(_PATTERN_PART, min_size=1, max_size=4),
    tail=st.booleans(),
    path=st.lists(st.text(alphabet="ab.-~%:@/*=", max_size=4), min_size=1, max_size=6),
)
def test_path_template_agrees_with_segment_walk(
    parts: list[str], tail: bool, path: list[str]
) -> None:
    template = "/" + "/".join(parts + (["{**}"] if tail else []))
    text = "/" + "/".join(path)
    assert PathTemplate.parse(template).matches(text) is _reference_match(template, text)


@given(st.text(max_size=20))
def test_path_template_parse_never_crashes(text: str) -> None:
    with contextlib.suppress(ValueError):
        PathTemplate.parse("/" + text)


# --- which policies are the waypoint's ---------------------------------------------------------


def test_target_kinds_and_policies_for() -> None:
    gateway = policy([{}], name="gw")
    svc = parse_authorization_policy(
        resource({"targetRefs": [{"kind": "Service", "group": "", "name": "shop"}]}, name="svc")
    )
    entry = parse_authorization_policy(
        resource(
            {"targetRef": {"kind": "ServiceEntry", "group": "networking.istio.io", "name": "ext"}},
            name="se",
        )
    )
    cls = parse_authorization_policy(
        resource(
            {
                "targetRefs": [
                    {
                        "kind": "GatewayClass",
                        "group": "gateway.networking.k8s.io",
                        "name": "istio-waypoint",
                    }
                ]
            },
            name="class",
            namespace="istio-system",
        )
    )
    assert svc is not None and entry is not None and cls is not None
    everything = [gateway, svc, entry, cls]
    names = [
        p.name for p in policies_for(everything, ("ns", "waypoint"), ("Service", "ns", "shop"))
    ]
    assert names == ["gw", "svc", "class"]
    names = [
        p.name for p in policies_for(everything, ("ns", "other"), ("ServiceEntry", "ns", "ext"))
    ]
    assert names == ["se", "class"]
    assert [p.name for p in policies_for(everything, ("x", "waypoint"))] == ["class"]


def test_selector_or_no_target_is_not_the_waypoints() -> None:
    assert parse_authorization_policy(resource({"selector": {"matchLabels": {"a": "b"}}})) is None
    assert parse_authorization_policy(resource({"rules": [{}]})) is None


def test_read_reports_errors_and_keeps_the_rest() -> None:
    good = resource({"targetRefs": [WAYPOINT], "rules": [{}]}, name="good", index=0)
    bad = resource(
        {
            "targetRefs": [WAYPOINT],
            "rules": [{"when": [{"key": "request.bogus", "values": ["x"]}]}],
        },
        name="bad",
        index=1,
    )
    node = resource({"rules": [{}]}, name="node", index=2)
    custom = resource(
        {"targetRefs": [WAYPOINT], "action": "CUSTOM", "provider": {"name": "ext"}}, name="c"
    )
    other = Resource("x.yaml", 0, "v1", "Service", "svc", "ns", {})
    config = read_authorization_policies([good, bad, node, custom, other])
    assert [p.name for p in config.policies] == ["good", "c"]
    assert config.policies[1].action is Action.CUSTOM
    (error,) = config.errors
    assert error.kind == "AuthorizationPolicy" and error.key == "ns/bad"
    assert error.path == "spec.rules[0].when[0].key"
    assert "is not a known attribute" in error.reason
    assert "AuthorizationPolicy ns/bad: spec.rules[0].when[0].key" in str(error)
    assert [n.key for n in config.notes] == ["ns/node", "ns/c"]


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        (
            {"rules": [{"when": [{"key": "experimental.envoy.filters.a[b]", "values": ["x"]}]}]},
            "spec.rules[0].when[0].key",
            "experimental",
        ),
        (
            {"rules": [{"when": [{"key": "destination.namespace", "values": ["x"]}]}]},
            "spec.rules[0].when[0].key",
            "replaced",
        ),
        (
            {"rules": [{"when": [{"key": "request.headers[]", "values": ["x"]}]}]},
            "spec.rules[0].when[0].key",
            "must have the form",
        ),
        (
            {"rules": [{"when": [{"key": "request.auth.claims", "values": ["x"]}]}]},
            "spec.rules[0].when[0].key",
            "needs a name in brackets",
        ),
        (
            {"rules": [{"when": [{"key": "source.ip"}]}]},
            "spec.rules[0].when[0]",
            "at least one of values and notValues",
        ),
        (
            {"rules": [{"when": [{"key": "source.ip", "values": ["10.0.0.300"]}]}]},
            "spec.rules[0].when[0].values[0]",
            "not an IP address or CIDR",
        ),
        (
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]},
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "not an IP address or CIDR",
        ),
        (
            {"rules": [{"to": [{"operation": {"paths": ["/a/{**}/{*}"]}}]}]},
            "spec.rules[0].to[0].operation.paths[0]",
            "{**} must be the last operator",
        ),
        (
            {"rules": [{"to": [{"operation": {"paths": ["/a/{id}"]}}]}]},
            "spec.rules[0].to[0].operation.paths[0]",
            "{",
        ),
        (
            {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
            "spec.rules[0].to[0].operation.ports[0]",
            "not a port number",
        ),
        (
            {"rules": [{"from": [{"source": {"trustDomains": ["x"]}}]}]},
            "spec.rules[0].from[0].source.trustDomains",
            "unknown field",
        ),
        ({"rules": [{"from": [{"source": {}}]}]}, "spec.rules[0].from[0].source", "empty"),
        ({"rules": [{"to": []}]}, "spec.rules[0].to", "must not be empty"),
        ({"action": "LOG"}, "spec.action", "is not one of"),
        ({"action": "CUSTOM"}, "spec.provider", "is required"),
        ({"provider": {"name": "x"}}, "spec.provider", "only allowed with action CUSTOM"),
        ({"selector": {"matchLabels": {"a": "b"}}}, "spec", "selector cannot be combined"),
    ],
)
def test_bad_fields(spec: dict[str, Any], path: str, reason: str) -> None:
    spec = {"targetRefs": [WAYPOINT], **spec}
    config = read_authorization_policies([resource(spec)])
    (error,) = config.errors
    assert (error.path, error.key) == (path, "ns/p")
    assert reason in error.reason


@pytest.mark.parametrize(
    ("ref", "path", "reason"),
    [
        ({"kind": "HTTPRoute", "group": "gateway.networking.k8s.io", "name": "r"}, "kind", "not"),
        ({"kind": "Gateway", "group": "", "name": "w"}, "group", "gateway.networking.k8s.io"),
        ({"kind": "Service", "group": "", "name": "s", "namespace": "other"}, "namespace", "cross"),
        ({"kind": "Service", "group": ""}, "name", "is required"),
        (
            {
                "kind": "GatewayClass",
                "group": "gateway.networking.k8s.io",
                "name": "istio-waypoint",
            },
            "",
            "root namespace",
        ),
    ],
)
def test_bad_target_refs(ref: dict[str, Any], path: str, reason: str) -> None:
    config = read_authorization_policies([resource({"targetRefs": [ref]})])
    (error,) = config.errors
    assert error.path == ("spec.targetRefs[0]." + path).rstrip(".")
    assert reason in error.reason


def test_dry_run_annotation_must_be_boolean() -> None:
    config = read_authorization_policies(
        [resource({"targetRefs": [WAYPOINT]}, annotations={"istio.io/dry-run": "maybe"})]
    )
    assert config.errors[0].path == 'metadata.annotations["istio.io/dry-run"]'


def test_legacy_target_ref_and_version() -> None:
    parsed = parse_authorization_policy(
        resource({"targetRef": WAYPOINT}, api_version="security.istio.io/v1beta1")
    )
    assert parsed is not None and parsed.targets[0].name == "waypoint"
    config = read_authorization_policies(
        [resource({"targetRef": WAYPOINT, "targetRefs": [WAYPOINT]})]
    )
    assert "cannot both be set" in config.errors[0].reason
