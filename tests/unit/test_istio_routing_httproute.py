"""HTTPRoute routing: parsing (golden and field errors), parents, Gateway API precedence,
binding and misses, timeouts. Pure: inline YAML."""

from __future__ import annotations

import pytest

from tests.unit.routing_helpers import (
    NS,
    backend,
    chosen,
    doc,
    docs,
    hr,
    hr_rule,
    load,
    only_error,
    req,
    to,
    vs,
)
from ztagent.istio.resilience import DEFAULT_RETRY_POLICY, RetryPolicy
from ztagent.istio.routing import Destination, DirectResponse, Forward, RouteOptions
from ztagent.istio.routing.actions import HeaderOps, Mirror, Rewrite
from ztagent.istio.routing.match import HeaderMatch, MatchKind, QueryMatch, RequestMatch, ValueMatch

# --- golden parse -------------------------------------------------------------------------------

GOLDEN_HTTPROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ratings, namespace: shop}
spec:
  parentRefs:
  - {group: "", kind: Service, name: ratings, port: 9080}
  - {name: some-gateway}
  hostnames: [ignored.example.com]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /v1/}
      headers: [{name: X-Env, value: prod}, {name: x-env, value: ignored}]
      queryParams: [{type: RegularExpression, name: page, value: "[0-9]+"}]
      method: GET
    - path: {type: Exact, value: /health}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-A, value: "1"}]
        add: [{name: x-b, value: "2"}]
        remove: [x-c]
    - type: URLRewrite
      urlRewrite: {hostname: ratings.internal}
    - type: RequestMirror
      requestMirror:
        backendRef: {name: ratings-shadow, port: 9080}
        fraction: {numerator: 1, denominator: 4}
    backendRefs:
    - {name: ratings-v1, port: 9080, weight: 3}
    - {name: ratings-v2, port: 9080}
    - {name: ratings-v3, port: 9080, weight: 0}
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {attempts: 4, backoff: 100ms, codes: [502, 503]}
  - backendRefs: []
"""


def test_golden_http_route():
    config = load(GOLDEN_HTTPROUTE)
    assert config.errors == () and config.notes == ()
    (parsed,) = config.http_routes
    assert [(p.namespace, p.name, p.port) for p in parsed.parents] == [(NS, "ratings", 9080)]
    first, second, third = parsed.routes
    assert (first.source.rule, first.source.match) == (0, 0)
    assert (second.source.rule, second.source.match) == (0, 1)
    assert first.matches == (
        RequestMatch(
            path=ValueMatch(MatchKind.SEGMENT_PREFIX, "/v1"),
            method=ValueMatch(MatchKind.EXACT, "GET"),
            headers=(HeaderMatch("x-env", ValueMatch(MatchKind.EXACT, "prod")),),
            query_params=(QueryMatch("page", ValueMatch(MatchKind.REGEX, "[0-9]+")),),
        ),
    )
    assert second.matches == (RequestMatch(path=ValueMatch(MatchKind.EXACT, "/health")),)
    host = "ratings-{}.shop.svc.cluster.local"
    assert first.action == Forward(
        (Destination(host.format("v1"), 9080, weight=3), Destination(host.format("v2"), 9080))
    )
    assert first.request_headers == HeaderOps(
        set=(("x-a", "1"),), add=(("x-b", "2"),), remove=("x-c",)
    )
    assert first.rewrite == Rewrite(authority="ratings.internal")
    assert first.mirrors == (
        Mirror(Destination("ratings-shadow.shop.svc.cluster.local", 9080), 25.0),
    )
    assert first.timeout == 10.0
    assert first.retry == RetryPolicy(
        4,
        frozenset(
            {
                "connect-failure",
                "refused-stream",
                "unavailable",
                "cancelled",
                "retriable-status-codes",
            }
        ),
        frozenset({502, 503}),
        per_try_timeout=2.0,
        backoff_base=0.1,
    )
    assert third.action == DirectResponse(500)
    assert third.matches == (RequestMatch(path=ValueMatch(MatchKind.SEGMENT_PREFIX, "")),)
    assert third.retry is None and third.timeout is None


# --- errors -------------------------------------------------------------------------------------

HR_ERRORS = [
    (
        hr_rule(matches=[{"path": {"type": "Bogus", "value": "/"}}]),
        "spec.rules[0].matches[0].path.type",
        "not Exact, PathPrefix",
    ),
    (
        hr_rule(matches=[{"path": {"type": "Exact", "value": "foo"}}]),
        "spec.rules[0].matches[0].path.value",
        "absolute path",
    ),
    (
        hr_rule(matches=[{"path": {"value": "/a//b"}}]),
        "spec.rules[0].matches[0].path.value",
        "must not contain",
    ),
    (
        hr_rule(matches=[{"path": {"value": "/a/.."}}]),
        "spec.rules[0].matches[0].path.value",
        "must not end",
    ),
    (
        hr_rule(matches=[{"path": {"type": "RegularExpression", "value": "(?<=a)b"}}]),
        "spec.rules[0].matches[0].path.value",
        "lookbehind",
    ),
    (
        hr_rule(matches=[{"headers": [{"name": "x", "type": "RegularExpression", "value": "[a"}]}]),
        "spec.rules[0].matches[0].headers[0].value",
        "missing closing ]",
    ),
    (
        hr_rule(matches=[{"headers": [{"name": "x"}]}]),
        "spec.rules[0].matches[0].headers[0].value",
        "is required",
    ),
    (
        hr_rule(matches=[{"queryParams": [{"name": "q", "type": "Prefix", "value": "a"}]}]),
        "spec.rules[0].matches[0].queryParams[0].type",
        "not Exact or RegularExpression",
    ),
    (hr_rule(matches=[{"method": "FETCH"}]), "spec.rules[0].matches[0].method", "not one of GET"),
    (hr_rule(filters=[{"type": "Bogus"}]), "spec.rules[0].filters[0].type", "not a filter type"),
    (
        hr_rule(
            filters=[
                {"type": "ExtensionRef", "extensionRef": {"group": "", "kind": "x", "name": "y"}}
            ]
        ),
        "spec.rules[0].filters[0].type",
        "not supported",
    ),
    (
        hr_rule(filters=[{"type": "URLRewrite"}]),
        "spec.rules[0].filters[0].urlRewrite",
        "is required",
    ),
    (
        hr_rule(filters=[{"type": "URLRewrite", "urlRewrite": {}, "requestRedirect": {}}]),
        "spec.rules[0].filters[0].requestRedirect",
        "must not be set",
    ),
    (
        hr_rule(
            matches=[{"path": {"type": "Exact", "value": "/a"}}],
            filters=[
                {
                    "type": "URLRewrite",
                    "urlRewrite": {
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}
                    },
                }
            ],
        ),
        "spec.rules[0].filters[0].urlRewrite.path",
        "ReplacePrefixMatch requires PathPrefix",
    ),
    (
        hr_rule(
            filters=[{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath"}}}]
        ),
        "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
        "is required",
    ),
    (
        hr_rule(
            filters=[
                {"type": "URLRewrite", "urlRewrite": {"hostname": "a"}},
                {"type": "RequestRedirect", "requestRedirect": {"hostname": "b"}},
            ]
        ),
        "spec.rules[0].filters",
        "cannot be used on the same rule",
    ),
    (
        hr_rule(
            filters=[
                {"type": "URLRewrite", "urlRewrite": {"hostname": "a"}},
                {"type": "URLRewrite", "urlRewrite": {"hostname": "b"}},
            ]
        ),
        "spec.rules[0].filters[1].type",
        "only once",
    ),
    (
        hr_rule(filters=[{"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}}]),
        "spec.rules[0].filters[0].requestRedirect.statusCode",
        "not 301, 302",
    ),
    (
        hr_rule(filters=[{"type": "RequestRedirect", "requestRedirect": {"scheme": "ws"}}]),
        "spec.rules[0].filters[0].requestRedirect.scheme",
        '"http" or "https"',
    ),
    (
        hr_rule(
            filters=[
                {
                    "type": "RequestMirror",
                    "requestMirror": {
                        "backendRef": {"name": "m", "port": 80},
                        "percent": 5,
                        "fraction": {"numerator": 1},
                    },
                }
            ]
        ),
        "spec.rules[0].filters[0].requestMirror",
        "one of percent and fraction",
    ),
    (
        hr_rule(
            filters=[
                {
                    "type": "RequestMirror",
                    "requestMirror": {
                        "backendRef": {"name": "m", "port": 80},
                        "fraction": {"numerator": 5, "denominator": 4},
                    },
                }
            ]
        ),
        "spec.rules[0].filters[0].requestMirror.fraction",
        "numerator must not be greater",
    ),
    (
        {"backendRefs": [{"name": "v1"}]},
        "spec.rules[0].backendRefs[0].port",
        "required for a Service",
    ),
    (
        {"backendRefs": [{"name": "v1", "port": 80, "weight": 2_000_000}]},
        "spec.rules[0].backendRefs[0].weight",
        "not in 0-1000000",
    ),
    (
        {"backendRefs": [{"kind": "Pod", "name": "v1", "port": 80}]},
        "spec.rules[0].backendRefs[0].kind",
        "not a supported backend",
    ),
    (
        {
            "backendRefs": [
                {"name": "v1", "port": 80, "filters": [{"type": "URLRewrite", "urlRewrite": {}}]}
            ]
        },
        "spec.rules[0].backendRefs[0].filters[0].type",
        "not supported on a backendRef",
    ),
    (
        hr_rule(timeouts={"request": "1.5s"}),
        "spec.rules[0].timeouts.request",
        "not a Gateway API duration",
    ),
    (
        hr_rule(timeouts={"request": "1s", "backendRequest": "2s"}),
        "spec.rules[0].timeouts.backendRequest",
        "cannot be longer",
    ),
    (hr_rule(retry={"codes": [200]}), "spec.rules[0].retry.codes[0]", "not in 400-599"),
    (hr_rule(retry={"attempts": -1}), "spec.rules[0].retry.attempts", "not in"),
    (hr_rule(retry={"backoff": "0s"}), "spec.rules[0].retry.backoff", "greater than 0"),
    (hr_rule(bogus=True), "spec.rules[0].bogus", "unknown field"),
]


@pytest.mark.parametrize(("rule", "path", "reason"), HR_ERRORS)
def test_http_route_errors_name_the_field(rule, path, reason):
    config = load(docs(hr([rule], name="bad"), hr([hr_rule()], name="good")))
    text = only_error(config)
    assert text.startswith(f"HTTPRoute {NS}/bad: {path}: "), text
    assert reason in text
    assert [h.name for h in config.http_routes] == ["good"]
    assert chosen(config, req()) == "v1"


def test_http_route_parent_errors_and_notes():
    section = doc(
        "HTTPRoute",
        {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "reviews", "sectionName": "http"}
            ]
        },
    )
    assert "spec.parentRefs[0].sectionName: is not supported" in only_error(load(section))
    gateway_only = load(doc("HTTPRoute", {"parentRefs": [{"name": "gw"}], "rules": [hr_rule()]}))
    assert gateway_only.errors == () and gateway_only.http_routes == ()
    assert "no Service parent" in str(gateway_only.notes[0])


# --- HTTPRoute precedence ----------------------------------------------------------------------

PRECEDENCE = hr(
    [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": [backend("root")],
        },
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/a"}}],
            "backendRefs": [backend("prefix-a")],
        },
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/a/b/"}}],
            "backendRefs": [backend("prefix-ab")],
        },
        {
            "matches": [{"path": {"type": "Exact", "value": "/a/b"}}],
            "backendRefs": [backend("exact-ab")],
        },
        {
            "matches": [{"path": {"type": "RegularExpression", "value": "/a/b/.*"}}],
            "backendRefs": [backend("regex")],
        },
        {
            "matches": [{"path": {"value": "/m"}, "method": "POST"}],
            "backendRefs": [backend("method")],
        },
        {
            "matches": [
                {
                    "path": {"value": "/m"},
                    "headers": [{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "2"}],
                }
            ],
            "backendRefs": [backend("two-headers")],
        },
        {
            "matches": [{"path": {"value": "/m"}, "headers": [{"name": "x-a", "value": "1"}]}],
            "backendRefs": [backend("one-header")],
        },
        {
            "matches": [{"path": {"value": "/m"}, "queryParams": [{"name": "q", "value": "1"}]}],
            "backendRefs": [backend("query")],
        },
        {"matches": [{"path": {"value": "/m"}}], "backendRefs": [backend("plain-m")]},
    ]
)

HR_MATCHES = [
    (req("/a/b"), "exact-ab"),
    (req("/a/b/c"), "prefix-ab"),
    (req("/a/bc"), "prefix-a"),
    (req("/a"), "prefix-a"),
    (req("/ab"), "root"),  # PathPrefix matches whole segments
    (req("/m", "POST", headers={"x-a": "1", "x-b": "2"}), "method"),
    (req("/m", headers={"x-a": "1", "x-b": "2"}), "two-headers"),
    (req("/m?q=1", headers={"x-a": "1"}), "one-header"),
    (req("/m?q=1"), "query"),
    (req("/m/x"), "plain-m"),
    (req("/zzz"), "root"),
]


@pytest.mark.parametrize(("request_", "expected"), HR_MATCHES)
def test_http_route_precedence(request_, expected):
    config = load(PRECEDENCE)
    assert config.errors == ()
    assert chosen(config, request_) == expected


def test_http_route_precedence_across_routes_and_ties():
    older = hr([{"backendRefs": [backend("older")]}], name="z", created="2024-01-01T00:00:00Z")
    newer = hr(
        [
            {"matches": [{"path": {"value": "/x"}}], "backendRefs": [backend("newer-x")]},
            {"backendRefs": [backend("newer")]},
        ],
        name="a",
        created="2024-02-01T00:00:00Z",
    )
    config = load(docs(newer, older))
    assert chosen(config, req("/x")) == "newer-x"  # longer prefix beats age
    assert chosen(config, req("/y")) == "older"  # same match: oldest wins
    same_a = hr([{"backendRefs": [backend("a")]}], name="a", created="2024-01-01T00:00:00Z")
    same_b = hr([{"backendRefs": [backend("b")]}], name="b", created="2024-01-01T00:00:00Z")
    assert chosen(load(docs(same_b, same_a)), req()) == "a"
    rules = hr([{"backendRefs": [backend("rule0")]}, {"backendRefs": [backend("rule1")]}])
    assert chosen(load(rules), req()) == "rule0"


def test_http_route_binding_and_misses():
    config = load(
        hr(
            [
                {
                    "matches": [{"path": {"type": "Exact", "value": "/only"}}],
                    "backendRefs": [backend("v1")],
                }
            ],
            port=9080,
        )
    )
    assert chosen(config, req("/only")) == "v1"
    assert chosen(config, req("/other")) == "404"
    assert chosen(config, req("/only", port=8080)) == "reviews"  # parentRef port: not bound
    parent = {"group": "", "kind": "Service", "name": "reviews", "namespace": NS}
    other_ns = doc(
        "HTTPRoute",
        {"parentRefs": [parent], "rules": [{"backendRefs": [backend("v1")]}]},
        namespace="other",
    )
    assert chosen(load(other_ns), req()) == "reviews"
    assert chosen(load(other_ns, RouteOptions(waypoint_namespace="other")), req()) == "v1"


def test_http_route_shadows_virtual_service():
    config = load(
        docs(
            vs([{"route": [to("vs")]}]),
            hr([{"matches": [{"path": {"value": "/hr"}}], "backendRefs": [backend("hr")]}]),
        )
    )
    assert chosen(config, req("/hr")) == "hr"
    assert chosen(config, req("/else")) == "404"


def test_http_route_no_backends_answers_500():
    config = load(hr([{"backendRefs": [backend("v1", 0), backend("v2", 0)]}]))
    assert chosen(config, req()) == "500"
    config = load(hr([{}]))
    assert chosen(config, req()) == "500"


def test_backend_request_timeout_without_retry_is_the_route_timeout():
    config = load(hr([hr_rule(timeouts={"request": "0s", "backendRequest": "3s"})]))
    route = config.http_routes[0].routes[0]
    assert route.timeout == 3.0
    assert route.retry == DEFAULT_RETRY_POLICY
    disabled = load(hr([hr_rule(retry={"attempts": 0})])).http_routes[0].routes[0]
    assert disabled.retry is None
