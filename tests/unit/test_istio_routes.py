"""Waypoint routing: VirtualService and HTTPRoute parsing, matching, precedence, weights,
header edits, redirects and rewrites. Pure: inline YAML, injected random sources."""

from __future__ import annotations

import contextlib
import random
import re
import textwrap
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ztagent.control.sources import parse_documents
from ztagent.istio.resilience import DEFAULT_RETRY_POLICY, FaultPolicy, RetryPolicy
from ztagent.istio.routing import (
    Destination,
    DirectResponse,
    Forward,
    Headers,
    Redirect,
    Request,
    RouteConfig,
    RouteOptions,
    ServiceRef,
    parse_routes,
)
from ztagent.istio.routing.actions import (
    HeaderOps,
    Mirror,
    PortMode,
    Rewrite,
    replace_segment_prefix,
)
from ztagent.istio.routing.match import (
    MATCH_ALL,
    HeaderMatch,
    MatchKind,
    QueryMatch,
    RequestMatch,
    ValueMatch,
)
from ztagent.istio.routing.re2 import compile_re2, re2_to_python
from ztagent.model.fields import parse_go_duration

NS = "shop"
REVIEWS = ServiceRef.kubernetes("reviews", NS)
RATINGS = ServiceRef.kubernetes("ratings", NS)


def load(text: str, options: RouteOptions | None = None) -> RouteConfig:
    batch = parse_documents(textwrap.dedent(text), "test.yaml")
    assert batch.errors == ()
    return parse_routes(batch.resources, options)


def doc(
    kind: str,
    spec: dict[str, Any],
    name: str = "r",
    namespace: str = NS,
    created: str | None = None,
) -> str:
    api = {
        "VirtualService": "networking.istio.io/v1",
        "HTTPRoute": "gateway.networking.k8s.io/v1",
    }[kind]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if created:
        metadata["creationTimestamp"] = created
    body = {"apiVersion": api, "kind": kind, "metadata": metadata, "spec": spec}
    return yaml.safe_dump(body, sort_keys=False)


def docs(*parts: str) -> str:
    return "---\n".join(parts)


def vs(http: list[dict[str, Any]], hosts: tuple[str, ...] = ("reviews",), **kw: Any) -> str:
    return doc("VirtualService", {"hosts": list(hosts), "http": http}, **kw)


def hr(
    rules: list[dict[str, Any]], service: str = "reviews", port: int | None = None, **kw: Any
) -> str:
    parent: dict[str, Any] = {"group": "", "kind": "Service", "name": service}
    if port is not None:
        parent["port"] = port
    return doc("HTTPRoute", {"parentRefs": [parent], "rules": rules}, **kw)


def req(path: str = "/", method: str = "GET", port: int = 9080, **kw: Any) -> Request:
    headers = kw.pop("headers", {})
    return Request(
        method,
        path,
        kw.pop("authority", "reviews:9080"),
        headers=Headers.of(headers),
        port=port,
        **kw,
    )


def to(subset: str, weight: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": {"host": "reviews", "subset": subset}}
    if weight is not None:
        out["weight"] = weight
    return out


def backend(name: str, weight: int | None = None, port: int = 9080) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": port}
    if weight is not None:
        out["weight"] = weight
    return out


def chosen(config: RouteConfig, request: Request, service: ServiceRef = REVIEWS) -> str:
    """The subset (VirtualService) or backend name (HTTPRoute) a request goes to, or the
    status of a direct answer."""
    choice = config.table(service, request.port).select(request)
    action = choice.action
    if isinstance(action, Forward):
        dest = action.destinations[0]
        return dest.subset or dest.host.split(".")[0]
    if isinstance(action, DirectResponse):
        return str(action.status)
    return "redirect"


def constant(value: float) -> Callable[[], float]:
    return lambda: value


def only_error(config: RouteConfig) -> str:
    assert len(config.errors) == 1, [str(e) for e in config.errors]
    return str(config.errors[0])


# --- golden parse ------------------------------------------------------------------------------

GOLDEN_VS = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
  creationTimestamp: "2024-05-01T10:00:00Z"
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers:
        end-user: {exact: jason}
      uri: {prefix: /api/}
      ignoreUriCase: true
    - queryParams:
        debug: {regex: "1|true"}
      withoutHeaders:
        x-canary: {}
      port: 9080
    route:
    - destination: {host: reviews, subset: v2, port: {number: 9080}}
      headers:
        request:
          set: {x-subset: v2}
    rewrite: {uri: /v2/}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "gateway-error,409"}
    headers:
      request:
        set: {x-route: jason}
        add: {x-trace: "1"}
        remove: [x-drop]
      response:
        remove: [server]
    mirror: {host: reviews-shadow.other.svc.cluster.local}
    mirrorPercentage: {value: 12.5}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v3}
      weight: 10
    fault:
      delay: {fixedDelay: 100ms, percentage: {value: 5}}
      abort: {httpStatus: 503, percentage: {value: 0.5}}
    retries: {attempts: 0}
"""


def test_golden_virtual_service():
    config = load(GOLDEN_VS)
    assert config.errors == () and config.notes == ()
    (parsed,) = config.virtual_services
    assert parsed.hosts == ("reviews.shop.svc.cluster.local",)
    assert parsed.created == datetime(2024, 5, 1, 10, tzinfo=UTC)
    first, second = parsed.routes
    assert str(first.source) == "VirtualService shop/reviews http[0]"
    assert first.source.rule_name == "jason"
    assert first.matches == (
        RequestMatch(
            path=ValueMatch(MatchKind.PREFIX, "/api/", ignore_case=True),
            headers=(HeaderMatch("end-user", ValueMatch(MatchKind.EXACT, "jason")),),
        ),
        RequestMatch(
            headers=(HeaderMatch("x-canary", ValueMatch(MatchKind.PRESENT), invert=True),),
            query_params=(QueryMatch("debug", ValueMatch(MatchKind.REGEX, "1|true")),),
            port=9080,
        ),
    )
    assert first.action == Forward(
        (
            Destination(
                "reviews.shop.svc.cluster.local",
                9080,
                "v2",
                0,
                request_headers=HeaderOps(set=(("x-subset", "v2"),)),
            ),
        )
    )
    assert first.rewrite == Rewrite(prefix="/v2/")
    assert first.timeout == 1.5
    assert first.retry == RetryPolicy(
        3, frozenset({"gateway-error", "retriable-status-codes"}), frozenset({409}), 0.5
    )
    assert first.request_headers == HeaderOps(
        set=(("x-route", "jason"),), add=(("x-trace", "1"),), remove=("x-drop",)
    )
    assert first.response_headers == HeaderOps(remove=("server",))
    assert first.mirrors == (Mirror(Destination("reviews-shadow.other.svc.cluster.local"), 12.5),)
    assert first.fault is None

    assert second.matches == (MATCH_ALL,)
    assert second.action == Forward(
        (
            Destination("reviews.shop.svc.cluster.local", None, "v1", 90),
            Destination("reviews.shop.svc.cluster.local", None, "v3", 10),
        )
    )
    assert second.fault == FaultPolicy(0.1, 5.0, 503, None, 0.5)
    assert second.retry is None  # attempts 0 disables retries
    assert second.timeout is None


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


# --- errors ------------------------------------------------------------------------------------

ROUTE = [to("v1")]

VS_ERRORS = [
    ({"timeout": "100", "route": ROUTE}, "spec.http[0].timeout", "is not a duration"),
    ({"timeout": 5, "route": ROUTE}, "spec.http[0].timeout", "must be a duration string"),
    ({"timeout": "0.5ms", "route": ROUTE}, "spec.http[0].timeout", "at least 1ms"),
    ({"timeout": "1.0005s", "route": ROUTE}, "spec.http[0].timeout", "ms precision"),
    ({"bogus": 1, "route": ROUTE}, "spec.http[0].bogus", "unknown field"),
    (
        {"match": [{"uri": {"regex": "(a)\\1"}}], "route": ROUTE},
        "spec.http[0].match[0].uri.regex",
        "backreferences",
    ),
    (
        {"match": [{"uri": {"regex": "a(?=b)"}}], "route": ROUTE},
        "spec.http[0].match[0].uri.regex",
        "lookahead",
    ),
    (
        {"match": [{"uri": {"regex": "a*+"}}], "route": ROUTE},
        "spec.http[0].match[0].uri.regex",
        "possessive",
    ),
    (
        {"match": [{"uri": {"regex": "(?>a)"}}], "route": ROUTE},
        "spec.http[0].match[0].uri.regex",
        "atomic",
    ),
    (
        {"match": [{"uri": {"regex": "a("}}], "route": ROUTE},
        "spec.http[0].match[0].uri.regex",
        "not a valid RE2",
    ),
    (
        {"match": [{"uri": {"exact": "/a", "prefix": "/b"}}], "route": ROUTE},
        "spec.http[0].match[0].uri",
        "only one of",
    ),
    (
        {"match": [{"headers": {"x-a": {"prefix": ""}}}], "route": ROUTE},
        'spec.http[0].match[0].headers["x-a"].prefix',
        "should not be empty",
    ),
    (
        {"match": [{"headers": {"x a": {"exact": "1"}}}], "route": ROUTE},
        'spec.http[0].match[0].headers["x a"]',
        "not a valid header name",
    ),
    (
        {"match": [{"headers": {":foo": {"exact": "1"}}}], "route": ROUTE},
        'spec.http[0].match[0].headers[":foo"]',
        "not a pseudo-header",
    ),
    ({"match": [{"port": 70000}], "route": ROUTE}, "spec.http[0].match[0].port", "not in 1-65535"),
    (
        {"match": [{"method": {"regex": ""}}], "route": ROUTE},
        "spec.http[0].match[0].method.regex",
        "should not be empty",
    ),
    ({"route": ROUTE, "redirect": {"uri": "/x"}}, "spec.http[0]", "both route and redirect"),
    (
        {"redirect": {"uri": "/x"}, "fault": {"abort": {"httpStatus": 500}}},
        "spec.http[0]",
        "both fault and redirect",
    ),
    (
        {"directResponse": {"status": 200}, "route": ROUTE},
        "spec.http[0]",
        "both route and directResponse",
    ),
    ({}, "spec.http[0]", "HTTP route, redirect or directResponse is required"),
    (
        {"route": [{"destination": {"host": "reviews"}, "weight": -1}]},
        "spec.http[0].route[0].weight",
        "not in",
    ),
    ({"route": [to("v1", 0), to("v2", 0)]}, "spec.http[0].route", "total destination weight = 0"),
    (
        {"route": [{"destination": {"subset": "v1"}}]},
        "spec.http[0].route[0].destination.host",
        "is required",
    ),
    (
        {"route": [{"destination": {"host": "*.shop"}}]},
        "spec.http[0].route[0].destination.host",
        "wildcard",
    ),
    (
        {"route": [{"destination": {"host": "reviews", "subset": "V_1"}}]},
        "spec.http[0].route[0].destination.subset",
        "not a valid subset",
    ),
    (
        {"route": [{"destination": {"host": "reviews", "port": {"number": 0.5}}}]},
        "spec.http[0].route[0].destination.port.number",
        "integer",
    ),
    (
        {"route": ROUTE, "retries": {"attempts": 0, "perTryTimeout": "1s"}},
        "spec.http[0].retries",
        "attempts are set to 0",
    ),
    ({"route": ROUTE, "retries": {"attempts": -1}}, "spec.http[0].retries.attempts", "not in"),
    (
        {"route": ROUTE, "retries": {"attempts": 2, "retryOn": "5xx,bogus"}},
        "spec.http[0].retries.retryOn",
        "'bogus' is not a valid retryOn policy",
    ),
    (
        {"route": ROUTE, "retries": {"attempts": 2, "perTryTimeout": "1x"}},
        "spec.http[0].retries.perTryTimeout",
        "not a duration",
    ),
    ({"route": ROUTE, "fault": {}}, "spec.http[0].fault", "abort and/or a delay"),
    (
        {"route": ROUTE, "fault": {"abort": {"httpStatus": 700}}},
        "spec.http[0].fault.abort.httpStatus",
        "not in 200-599",
    ),
    (
        {"route": ROUTE, "fault": {"abort": {"grpcStatus": "NOPE"}}},
        "spec.http[0].fault.abort.grpcStatus",
        "not a gRPC status",
    ),
    (
        {"route": ROUTE, "fault": {"abort": {"http2Error": "x"}}},
        "spec.http[0].fault.abort.http2Error",
        "not supported",
    ),
    (
        {"route": ROUTE, "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 150}}}},
        "spec.http[0].fault.abort.percentage.value",
        "not in 0-100",
    ),
    (
        {"route": ROUTE, "fault": {"delay": {"exponentialDelay": "1s"}}},
        "spec.http[0].fault.delay.exponentialDelay",
        "not supported",
    ),
    (
        {"route": ROUTE, "fault": {"delay": {"percent": 5}}},
        "spec.http[0].fault.delay.fixedDelay",
        "is required",
    ),
    (
        {"route": ROUTE, "mirror": {"host": "m"}, "mirrorPercentage": {"value": 101}},
        "spec.http[0].mirrorPercentage.value",
        "not in 0-100",
    ),
    (
        {"route": ROUTE, "mirrors": [{"percentage": {"value": 5}}]},
        "spec.http[0].mirrors[0].destination",
        "is required",
    ),
    (
        {"redirect": {"uri": "/x", "redirectCode": 305}},
        "spec.http[0].redirect.redirectCode",
        "not supported",
    ),
    (
        {"redirect": {"uri": "/x", "redirectCode": 200}},
        "spec.http[0].redirect.redirectCode",
        "not in 300-399",
    ),
    ({"redirect": {}}, "spec.http[0].redirect", "must specify uri, authority, scheme, or port"),
    ({"redirect": {"scheme": "ftp"}}, "spec.http[0].redirect.scheme", '"http" or "https"'),
    (
        {"redirect": {"uri": "/a", "prefixRewrite": "/b"}},
        "spec.http[0].redirect",
        "one of uri or prefixRewrite",
    ),
    (
        {"match": [{"uri": {"exact": "/a"}}], "redirect": {"prefixRewrite": "/b"}},
        "spec.http[0].redirect.prefixRewrite",
        "prefix matches",
    ),
    (
        {"redirect": {"port": 8080, "derivePort": "FROM_REQUEST_PORT"}},
        "spec.http[0].redirect",
        "one of port and derivePort",
    ),
    ({"directResponse": {"status": 99}}, "spec.http[0].directResponse.status", "not in 200-599"),
    (
        {"directResponse": {"status": 200, "body": {"bytes": "!!"}}},
        "spec.http[0].directResponse.body.bytes",
        "base64",
    ),
    ({"route": ROUTE, "rewrite": {}}, "spec.http[0].rewrite", "at least one of"),
    (
        {
            "route": ROUTE,
            "rewrite": {"uri": "/a", "uriRegexRewrite": {"match": "a", "rewrite": "b"}},
        },
        "spec.http[0].rewrite",
        "one of uri or uriRegexRewrite",
    ),
    (
        {"route": ROUTE, "rewrite": {"uriRegexRewrite": {"match": "a"}}},
        "spec.http[0].rewrite.uriRegexRewrite",
        "both match and rewrite",
    ),
    (
        {"route": ROUTE, "rewrite": {"uriRegexRewrite": {"match": "(a)", "rewrite": "\\n"}}},
        "spec.http[0].rewrite.uriRegexRewrite.rewrite",
        "invalid escape",
    ),
    (
        {"route": ROUTE, "headers": {"request": {"set": {":path": "/x"}}}},
        'spec.http[0].headers.request.set[":path"]',
        "cannot have",
    ),
    (
        {"route": ROUTE, "headers": {"response": {"set": {"host": "x"}}}},
        "spec.http[0].headers.response.set.host",
        "Host header",
    ),
    (
        {"route": ROUTE, "headers": {"request": {"set": {"x-a": "a\nb"}}}},
        'spec.http[0].headers.request.set["x-a"]',
        "control characters",
    ),
    (
        {
            "route": ROUTE,
            "rewrite": {"authority": "a"},
            "headers": {"request": {"set": {"host": "b"}}},
        },
        "spec.http[0]",
        "authority header cannot be set multiple times",
    ),
    ({"route": ROUTE, "delegate": {"name": "x"}}, "spec.http[0].delegate", "not supported"),
]


@pytest.mark.parametrize(("http", "path", "reason"), VS_ERRORS)
def test_virtual_service_errors_name_the_field(http, path, reason):
    config = load(docs(vs([http], name="bad"), vs([{"route": [to("v1")]}], name="good")))
    text = only_error(config)
    assert text.startswith(f"VirtualService {NS}/bad: {path}: "), text
    assert reason in text
    assert text.endswith("(test.yaml#0)")
    # The other resource still routes.
    assert [v.name for v in config.virtual_services] == ["good"]
    assert chosen(config, req()) == "v1"


@pytest.mark.parametrize(
    ("text", "path", "reason"),
    [
        (doc("VirtualService", {"http": []}), "spec.hosts", "is required"),
        (doc("VirtualService", {"hosts": "reviews"}), "spec.hosts", "must be a list"),
        (doc("VirtualService", {"hosts": ["a"], "http": {}}), "spec.http", "must be a list"),
        (
            doc("VirtualService", {"hosts": ["a"]}, created="yesterday"),
            "metadata.creationTimestamp",
            "RFC 3339",
        ),
        (
            doc("VirtualService", {"hosts": ["a"]}).replace(
                "networking.istio.io/v1", "networking.istio.io/v2"
            ),
            "apiVersion",
            "is not supported",
        ),
    ],
)
def test_virtual_service_spec_errors(text, path, reason):
    error = only_error(load(text))
    assert f": {path}: " in error and reason in error


def test_duplicate_resource_is_an_error():
    config = load(docs(vs(ROUTE and [{"route": ROUTE}]), vs([{"route": ROUTE}])))
    assert "duplicate of the one in test.yaml#0" in only_error(config)
    assert len(config.virtual_services) == 1


def hr_rule(**fields: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"backendRefs": [backend("v1")]}
    rule.update(fields)
    return rule


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


# --- VirtualService matching -------------------------------------------------------------------

MATCH_VS = vs(
    [
        {"match": [{"uri": {"exact": "/exact"}}], "route": [to("exact")]},
        {"match": [{"uri": {"prefix": "/CaSe"}, "ignoreUriCase": True}], "route": [to("case")]},
        {"match": [{"uri": {"regex": "/items/[0-9]+"}}], "route": [to("regex")]},
        {
            "match": [{"method": {"exact": "POST"}, "uri": {"prefix": "/api"}}],
            "route": [to("post")],
        },
        {"match": [{"uri": {"prefix": "/api"}}], "route": [to("api")]},
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [to("jason")]},
        {"match": [{"headers": {"x-tier": {"prefix": "gold"}}}], "route": [to("gold")]},
        {"match": [{"headers": {"x-id": {"regex": "[a-f]{4}"}}}], "route": [to("hex")]},
        {"match": [{"headers": {"x-present": {}}}], "route": [to("present")]},
        {"match": [{"headers": {"x-star": {"regex": "*"}}}], "route": [to("star")]},
        {"match": [{"queryParams": {"v": {"exact": "2"}}}], "route": [to("query")]},
        {"match": [{"queryParams": {"flag": {}}}], "route": [to("flag")]},
        {"match": [{"scheme": {"exact": "https"}}], "route": [to("https")]},
        {"match": [{"authority": {"prefix": "reviews.other"}}], "route": [to("authority")]},
        {"match": [{"port": 8080}], "route": [to("port8080")]},
        {"match": [{"withoutHeaders": {"x-allow": {"exact": "yes"}}}], "route": [to("without")]},
        {"route": [to("rest")]},
    ]
)

VS_MATCHES = [
    (req("/exact"), "exact"),
    (req("/exact?x=1"), "exact"),
    (req("/exact/"), "without"),
    (req("/case/x"), "case"),
    (req("/CASE"), "case"),
    (req("/items/42"), "regex"),
    (req("/items/42x"), "without"),
    (req("/api/v1", "POST"), "post"),
    (req("/api/v1"), "api"),
    (req("/apix"), "api"),  # VirtualService prefixes are plain string prefixes
    (req("/", headers={"End-User": "jason"}), "jason"),
    (req("/", headers={"end-user": "Jason"}), "without"),
    (req("/", headers={"x-tier": "golden"}), "gold"),
    (req("/", headers={"x-id": "beef"}), "hex"),
    (req("/", headers={"x-id": "beefy"}), "without"),
    (req("/", headers={"x-present": ""}), "present"),
    (req("/", headers={"x-star": "anything"}), "star"),
    (req("/?v=2"), "query"),
    (req("/?v=20"), "without"),
    (req("/?a=1&v=2"), "query"),
    (req("/?flag"), "flag"),
    (req("/", scheme="https"), "https"),
    (req("/", authority="reviews.other:9080"), "authority"),
    (req("/", port=8080), "port8080"),
    (req("/", headers={"x-allow": "no"}), "without"),
    (req("/", headers={"x-allow": "yes"}), "rest"),
]


@pytest.mark.parametrize(("request_", "expected"), VS_MATCHES)
def test_virtual_service_matching(request_, expected):
    config = load(MATCH_VS)
    assert config.errors == ()
    assert chosen(config, request_) == expected


def test_repeated_headers_match_joined():
    config = load(
        vs(
            [
                {"match": [{"headers": {"x-a": {"exact": "1,2"}}}], "route": [to("both")]},
                {"route": [to("rest")]},
            ]
        )
    )
    assert chosen(config, req(headers=[("x-a", "1"), ("X-A", "2")])) == "both"


def test_virtual_service_miss_is_404_and_unbound_port_goes_to_service():
    config = load(
        vs([{"match": [{"uri": {"prefix": "/api"}, "port": 9080}], "route": [to("api")]}])
    )
    table = config.table(REVIEWS, 9080)
    miss = table.select(req("/other"))
    assert not miss.matched and miss.action == DirectResponse(404)
    other_port = config.table(REVIEWS, 8080).select(req("/api", port=8080))
    assert not other_port.matched
    assert other_port.action == Forward((Destination(REVIEWS.hostname),))
    assert other_port.route.retry == DEFAULT_RETRY_POLICY
    unbound = config.table(RATINGS, 9080).select(req("/api"))
    assert unbound.action == Forward((Destination(RATINGS.hostname),))


def test_virtual_services_merge_oldest_first():
    older = vs(
        [{"match": [{"uri": {"prefix": "/a"}}], "route": [to("older")]}],
        name="z",
        created="2024-01-01T00:00:00Z",
    )
    newer = vs([{"route": [to("newer")]}], name="a", created="2024-06-01T00:00:00Z")
    config = load(docs(newer, older))
    assert chosen(config, req("/a")) == "older"
    assert chosen(config, req("/b")) == "newer"
    # Same timestamp: namespace/name order.
    first = vs([{"route": [to("first")]}], name="a", created="2024-01-01T00:00:00Z")
    second = vs([{"route": [to("second")]}], name="b", created="2024-01-01T00:00:00Z")
    assert chosen(load(docs(second, first)), req()) == "first"


def test_virtual_service_scope_hosts_and_namespaces():
    elsewhere = vs(
        [{"route": [to("elsewhere")]}], namespace="other", hosts=("reviews.shop.svc.cluster.local",)
    )
    assert chosen(load(elsewhere), req()) == REVIEWS.hostname.split(".")[0]  # default route
    waypoint_ns = RouteOptions(waypoint_namespace="other")
    assert chosen(load(elsewhere, waypoint_ns), req()) == "elsewhere"
    wildcard = vs([{"route": [to("wild")]}], hosts=("*.shop.svc.cluster.local",))
    assert chosen(load(wildcard), req()) == "wild"
    short_elsewhere = vs([{"route": [to("x")]}], hosts=("reviews",), namespace="other")
    config = load(short_elsewhere, waypoint_ns)
    assert config.virtual_services[0].hosts == ("reviews.other.svc.cluster.local",)
    assert chosen(config, req()) == "reviews"


def test_gateway_bound_virtual_service_is_not_for_waypoints():
    config = load(
        doc(
            "VirtualService",
            {"hosts": ["reviews"], "gateways": ["ingress"], "http": [{"route": ROUTE}]},
        )
    )
    assert config.virtual_services == () and "does not include mesh" in str(config.notes[0])
    mesh = load(
        doc(
            "VirtualService",
            {"hosts": ["reviews"], "gateways": ["ingress", "mesh"], "http": [{"route": ROUTE}]},
        )
    )
    assert chosen(mesh, req()) == "v1"


def test_unusable_matches_are_dropped_with_a_note():
    config = load(
        vs(
            [
                {"match": [{"sourceLabels": {"app": "x"}}], "route": [to("labels")]},
                {"match": [{"gateways": ["ingress"]}], "route": [to("gateway")]},
                {"match": [{"sourceNamespace": "istio-system"}], "route": [to("sourcens")]},
                {
                    "match": [{"headers": {"@request.auth.claims.group": {"exact": "a"}}}],
                    "route": [to("claims")],
                },
                {
                    "match": [{"sourceLabels": {"app": "x"}}, {"uri": {"prefix": "/kept"}}],
                    "route": [to("kept")],
                },
                {"route": [to("rest")]},
            ]
        )
    )
    assert config.errors == ()
    notes = [str(n) for n in config.notes]
    assert len(notes) == 5
    assert "spec.http[0].match[0].sourceLabels: ambient has no source labels" in notes[0]
    assert "spec.http[1].match[0].gateways: does not include mesh" in notes[1]
    assert "JWT claim routing is not supported" in notes[3]
    assert chosen(config, req("/kept")) == "kept"
    assert chosen(config, req("/x")) == "rest"
    assert len(config.virtual_services[0].routes) == 2


def test_source_namespace_compares_with_waypoint_namespace():
    text = vs(
        [
            {"match": [{"sourceNamespace": "istio-waypoints"}], "route": [to("ns")]},
            {"route": [to("rest")]},
        ]
    )
    assert chosen(load(text, RouteOptions(waypoint_namespace="istio-waypoints")), req()) == "ns"
    assert chosen(load(text), req()) == "rest"


def test_fault_without_percentage_injects_nothing_and_says_so():
    config = load(
        vs(
            [
                {
                    "route": ROUTE,
                    "fault": {"abort": {"httpStatus": 500}, "delay": {"fixedDelay": "1s"}},
                }
            ]
        )
    )
    fault = config.virtual_services[0].routes[0].fault
    assert fault == FaultPolicy(1.0, 0.0, 500, None, 0.0)
    assert len(config.notes) == 2 and "no request is aborted" in str(config.notes[1])
    rng = random.Random(3)
    assert all(fault.decide(rng).none for _ in range(100))


def test_istio_durations():
    assert parse_go_duration("1.5s") == 1.5
    assert parse_go_duration("100ms") == Fraction(1, 10)
    assert parse_go_duration("1m30s") == 90
    assert parse_go_duration("1.500s") == 1.5
    assert parse_go_duration("0") == 0
    for bad in ("", "1", "s", "1d", "-1s", "1.5.5s"):
        with pytest.raises(ValueError):
            parse_go_duration(bad)
    config = load(
        vs(
            [
                {
                    "route": ROUTE,
                    "timeout": "1m",
                    "retries": {"attempts": 1, "perTryTimeout": "250ms", "backoff": "0.05s"},
                }
            ]
        )
    )
    route = config.virtual_services[0].routes[0]
    assert route.timeout == 60.0
    assert route.retry is not None and route.retry.per_try_timeout == 0.25
    assert route.retry.backoff_base == 0.05


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


# --- weights -----------------------------------------------------------------------------------


def test_weight_distribution_virtual_service():
    config = load(vs([{"route": [to("v1", 90), to("v2", 10), to("never", 0)]}]))
    (route,) = config.virtual_services[0].routes
    assert isinstance(route.action, Forward)
    assert [d.subset for d in route.action.destinations] == ["v1", "v2"]
    rng = random.Random(12345)
    counts = Counter(route.action.choose(rng).subset for _ in range(10_000))
    assert counts["v1"] / 10_000 == pytest.approx(0.90, abs=0.015)
    assert counts["v2"] / 10_000 == pytest.approx(0.10, abs=0.015)


def test_weight_distribution_http_route_relative_weights():
    config = load(
        hr([{"backendRefs": [backend("a"), backend("b"), backend("c", 2), backend("z", 0)]}])
    )
    forward = config.http_routes[0].routes[0].action
    assert isinstance(forward, Forward)
    rng = random.Random(99)
    counts = Counter(forward.choose(rng).host.split(".")[0] for _ in range(10_000))
    assert set(counts) == {"a", "b", "c"}
    assert counts["a"] / 10_000 == pytest.approx(0.25, abs=0.015)
    assert counts["c"] / 10_000 == pytest.approx(0.50, abs=0.015)


def test_weight_zero_never_chosen_and_single_destination_ignores_weight():
    forward = Forward(
        (Destination("a", weight=0), Destination("b", weight=1), Destination("c", weight=0))
    )
    assert {forward.choose(constant(v)).host for v in (0.0, 0.5, 0.999999)} == {"b"}
    single = load(vs([{"route": [to("only", 0)]}])).virtual_services[0].routes[0].action
    assert isinstance(single, Forward)
    assert single.choose(lambda: 0.7).subset == "only"
    with pytest.raises(ValueError):
        Forward(())


@given(st.lists(st.integers(0, 100), min_size=2, max_size=6), st.floats(0.0, 1.0, exclude_max=True))
def test_weighted_choice_property(weights, value):
    if sum(weights) == 0:
        return
    forward = Forward(tuple(Destination(str(i), weight=w) for i, w in enumerate(weights)))
    dest = forward.choose(lambda: value)
    assert dest.weight > 0


# --- headers -----------------------------------------------------------------------------------


def test_header_ops_order_and_case():
    headers = Headers.of([("X-Keep", "1"), ("x-set", "old"), ("X-Set", "old2"), ("x-drop", "d")])
    ops = HeaderOps(set=(("x-set", "new"),), add=(("x-keep", "2"),), remove=("X-DROP",))
    out = ops.apply(headers)
    assert out.get_all("x-keep") == ("1", "2")
    assert out.get_all("X-SET") == ("new",)
    assert "x-drop" not in out
    assert len(out) == 3


def test_route_and_destination_header_edits():
    config = load(
        vs(
            [
                {
                    "route": [
                        {
                            "destination": {"host": "reviews", "subset": "v1"},
                            "headers": {
                                "request": {
                                    "set": {"x-who": "destination", "host": "dest.example"}
                                },
                                "response": {"add": {"x-dest": "1"}},
                            },
                        }
                    ],
                    "headers": {
                        "request": {"set": {"x-who": "route"}, "add": {"x-route": "1"}},
                        "response": {"set": {"x-resp": "r"}, "remove": ["server"]},
                    },
                }
            ]
        )
    )
    request = req(headers={"x-who": "client", "x-other": "o"})
    choice = config.table(REVIEWS, 9080).select(request)
    assert isinstance(choice.action, Forward)
    dest = choice.action.choose(lambda: 0.5)
    upstream = choice.upstream_headers(request, dest)
    assert upstream.get_all("x-who") == ("destination",)
    assert upstream.get("x-route") == "1" and upstream.get("x-other") == "o"
    assert choice.upstream_authority(request, dest) == "dest.example"
    response = choice.response_headers(Headers.of({"server": "app", "x-resp": "old"}), dest)
    assert list(response) == [("x-resp", "r"), ("x-dest", "1")]


def test_authority_rewrite_wins_over_destination_authority():
    config = load(
        vs(
            [
                {
                    "route": [
                        {
                            "destination": {"host": "reviews"},
                            "headers": {"request": {"set": {":authority": "d"}}},
                        }
                    ],
                    "rewrite": {"authority": "r.example"},
                }
            ]
        )
    )
    request = req()
    choice = config.table(REVIEWS, 9080).select(request)
    assert isinstance(choice.action, Forward)
    assert choice.upstream_authority(request, choice.action.destinations[0]) == "r.example"


# --- redirects ---------------------------------------------------------------------------------

VS_REDIRECTS = [
    (
        {"uri": "/new"},
        req("/old?q=1", authority="shop.example"),
        "http://shop.example/new?q=1",
        301,
    ),
    (
        {"uri": "/new?x=2"},
        req("/old?q=1", authority="shop.example"),
        "http://shop.example/new?x=2",
        301,
    ),
    (
        {"authority": "other.example", "redirectCode": 302},
        req("/p", authority="a:9080"),
        "http://other.example/p",
        302,
    ),
    ({"scheme": "https"}, req("/p", authority="shop.example:80"), "https://shop.example/p", 301),
    (
        {"scheme": "https"},
        req("/p", authority="shop.example:8080"),
        "https://shop.example:8080/p",
        301,
    ),
    (
        {"port": 8443, "scheme": "https"},
        req("/p", authority="shop.example:80"),
        "https://shop.example:8443/p",
        301,
    ),
    (
        {"port": 443, "scheme": "https"},
        req("/p", authority="shop.example"),
        "https://shop.example/p",
        301,
    ),
    (
        {"derivePort": "FROM_REQUEST_PORT", "authority": "b"},
        req("/p", port=9080),
        "http://b:9080/p",
        301,
    ),
    (
        {"derivePort": "FROM_PROTOCOL_DEFAULT", "scheme": "https"},
        req("/p", authority="a:9080"),
        "https://a/p",
        301,
    ),
    ({"prefixRewrite": "/v2"}, req("/api/items?x", authority="a"), "http://a/v2/items?x", 308),
]


@pytest.mark.parametrize(("redirect", "request_", "location", "status"), VS_REDIRECTS)
def test_virtual_service_redirects(redirect, request_, location, status):
    if status == 308:
        redirect = {**redirect, "redirectCode": 308}
    config = load(
        vs(
            [
                {
                    "match": [{"uri": {"prefix": "/api"}}, {"uri": {"prefix": "/"}}],
                    "redirect": redirect,
                }
            ]
        )
    )
    assert config.errors == ()
    choice = config.table(REVIEWS, request_.port).select(request_)
    assert isinstance(choice.action, Redirect) and choice.action.status == status
    assert choice.location(request_) == location
    assert choice.route.retry is None


HR_REDIRECTS = [
    ({"scheme": "https"}, req("/p", authority="a:9080"), "https://a/p", 302),
    ({"hostname": "b.example"}, req("/p", port=9080), "http://b.example:9080/p", 302),
    ({"hostname": "b.example"}, req("/p", port=80), "http://b.example/p", 302),
    (
        {"port": 8443, "scheme": "https", "statusCode": 301},
        req("/p", authority="a"),
        "https://a:8443/p",
        301,
    ),
    (
        {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/full"}},
        req("/foo/bar?q", authority="a", port=80),
        "http://a/full?q",
        302,
    ),
    (
        {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/xyz"}},
        req("/foo/bar", authority="a", port=80),
        "http://a/xyz/bar",
        302,
    ),
    (
        {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}},
        req("/foo/bar", authority="a", port=80),
        "http://a/bar",
        302,
    ),
]


@pytest.mark.parametrize(("redirect", "request_", "location", "status"), HR_REDIRECTS)
def test_http_route_redirects(redirect, request_, location, status):
    rule = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/foo"}}, {"path": {"value": "/"}}],
        "filters": [{"type": "RequestRedirect", "requestRedirect": redirect}],
    }
    config = load(hr([rule]))
    assert config.errors == ()
    choice = config.table(REVIEWS, request_.port).select(request_)
    assert isinstance(choice.action, Redirect) and choice.action.status == status
    assert choice.location(request_) == location


def test_redirect_on_ipv6_authority():
    redirect = Redirect(scheme="https", port_mode=PortMode.KEEP)
    assert redirect.location(Request("GET", "/", "[::1]:80")) == "https://[::1]/"
    assert Redirect(port=8080).location(Request("GET", "/", "[::1]:80")) == "http://[::1]:8080/"


# --- rewrites ----------------------------------------------------------------------------------

VS_REWRITES = [
    # (match, rewrite.uri, request path, upstream path): Envoy prefix_rewrite semantics.
    ({"uri": {"prefix": "/api/"}}, "/v2/", "/api/items?x=1", "/v2/items?x=1"),
    ({"uri": {"prefix": "/api"}}, "/", "/api/items", "//items"),
    ({"uri": {"prefix": "/API"}, "ignoreUriCase": True}, "/v2", "/api/items", "/v2/items"),
    ({"uri": {"exact": "/old"}}, "/new", "/old?q", "/new?q"),
    ({"uri": {"regex": "/r/.*"}}, "/whole", "/r/x/y", "/whole"),
    ({"headers": {"x-a": {"exact": "1"}}}, "/v2", "/a/b", "/v2a/b"),
]


@pytest.mark.parametrize(("match", "uri", "path", "upstream"), VS_REWRITES)
def test_virtual_service_prefix_rewrite(match, uri, path, upstream):
    config = load(vs([{"match": [match], "route": ROUTE, "rewrite": {"uri": uri}}]))
    request = req(path, headers={"x-a": "1"})
    assert config.table(REVIEWS, 9080).select(request).upstream_path(request) == upstream


def test_virtual_service_regex_rewrite():
    config = load(
        vs(
            [
                {
                    "route": ROUTE,
                    "rewrite": {
                        "uriRegexRewrite": {
                            "match": "^/service/([^/]+)(/.*)$",
                            "rewrite": "\\2/instance/\\1",
                        }
                    },
                }
            ]
        )
    )
    request = req("/service/foo/v1/api?x=1")
    assert (
        config.table(REVIEWS, 9080).select(request).upstream_path(request)
        == "/v1/api/instance/foo?x=1"
    )
    every = Rewrite(regex=ValueMatch.regex("o"), substitution="0")
    assert every.path(req("/foo/boo")) == "/f00/b00"


# The Gateway API ReplacePrefixMatch table (HTTPPathModifier docs).
REPLACE_PREFIX = [
    ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
    ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
    ("/foo/", "/foo/bar", "/xyz", "/xyz/bar"),
    ("/foo/", "/foo/bar", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz"),
    ("/foo", "/foo/", "/xyz", "/xyz/"),
    ("/foo", "/foo/", "/xyz/", "/xyz/"),
    ("/foo/", "/foo/", "/xyz", "/xyz/"),
    ("/foo", "/foo", "", "/"),
    ("/foo/", "/foo", "", "/"),
    ("/foo", "/foo/", "", "/"),
    ("/foo/", "/foo/", "", "/"),
    ("/foo", "/foo", "/", "/"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo/", "/", "/"),
    ("/foo/", "/foo/", "/", "/"),
    ("/", "/foo", "/xyz", "/xyz/foo"),
    ("/", "/", "/xyz", "/xyz/"),
]


@pytest.mark.parametrize(("prefix", "path", "replacement", "expected"), REPLACE_PREFIX)
def test_http_route_replace_prefix_match(prefix, path, replacement, expected):
    rule = {
        "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
        "filters": [
            {
                "type": "URLRewrite",
                "urlRewrite": {
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": replacement}
                },
            }
        ],
        "backendRefs": [backend("v1")],
    }
    config = load(hr([rule]))
    assert config.errors == ()
    request = req(path + "?q=1")
    choice = config.table(REVIEWS, 9080).select(request)
    assert choice.matched
    assert choice.upstream_path(request) == expected + "?q=1"


def test_http_route_prefix_does_not_match_inside_a_segment():
    rule = {"matches": [{"path": {"value": "/foo"}}], "backendRefs": [backend("foo")]}
    config = load(hr([rule]))
    assert chosen(config, req("/foo/bar")) == "foo"
    assert chosen(config, req("/foo")) == "foo"
    assert chosen(config, req("/foobar")) == "404"


def test_http_route_replace_full_path_keeps_query():
    rule = hr_rule(
        filters=[
            {
                "type": "URLRewrite",
                "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/x"}},
            }
        ]
    )
    request = req("/a/b?c=d")
    assert load(hr([rule])).table(REVIEWS, 9080).select(request).upstream_path(request) == "/x?c=d"


# --- mirrors -----------------------------------------------------------------------------------


def test_mirror_percentages():
    config = load(
        vs(
            [
                {
                    "route": ROUTE,
                    "mirror": {"host": "shadow"},
                    "mirrorPercentage": {"value": 20},
                    "mirrors": [
                        {"destination": {"host": "always"}},
                        {"destination": {"host": "off"}, "percentage": {"value": 0}},
                    ],
                }
            ]
        )
    )
    mirrors = config.virtual_services[0].routes[0].mirrors
    assert [(m.destination.host, m.percent) for m in mirrors] == [
        ("shadow.shop.svc.cluster.local", 20.0),
        ("always.shop.svc.cluster.local", 100.0),
    ]
    rng = random.Random(5)
    share = sum(mirrors[0].should_mirror(rng) for _ in range(10_000)) / 10_000
    assert share == pytest.approx(0.20, abs=0.015)
    assert all(mirrors[1].should_mirror(rng) for _ in range(100))


# --- RE2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("[[:digit:]]+", "123", True),
        ("[[:alpha:]_]+", "ab_c", True),
        ("[[:alpha:]]+", "a1", False),
        ("a\\z", "a", True),
        ("(?P<x>a)b", "ab", True),
        ("(?<x>a)b", "ab", True),
        ("(?i)abc", "ABC", True),
        ("\\x{41}", "A", True),
        ("[a&&b]+", "a&b", True),
        ("\\d+", "١٢", False),  # ASCII digits only, as RE2
        ("a{2,3}", "aaa", True),
        ("a{,3}", "a{,3}", True),  # not a repetition in RE2
        ("a{x}", "a{x}", True),
    ],
)
def test_re2_translation(pattern, text, matches):
    assert (compile_re2(pattern).fullmatch(text) is not None) is matches


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(a)\\1", "backreferences"),
        ("(?P<n>a)(?P=n)", "backreferences"),
        ("a(?!b)", "lookahead"),
        ("(?<!a)b", "lookbehind"),
        ("a++", "possessive"),
        ("(?>ab)", "atomic"),
        ("(?(1)a|b)", "conditional"),
        ("(?#c)a", "comment"),
        ("\\pL", "Unicode classes"),
        ("a\\Z", "\\Z"),
        ("\\N{DIGIT ONE}", "\\N is not supported"),
        ("\\u0041", "\\u is not supported"),
        ("(?U)a*", "ungreedy"),
        ("a{1001}", "repeat count"),
        ("[[:^alpha:]]", "negated POSIX"),
        ("[[:bogus:]]", "unknown POSIX"),
        ("", "must not be empty"),
        ("a" * 1025, "longer than 1024"),
    ],
)
def test_re2_rejects(pattern, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        compile_re2(pattern)


@given(st.text(max_size=40))
def test_re2_check_raises_only_value_error(pattern):
    with contextlib.suppress(ValueError):
        compile_re2(pattern)


@given(st.text(alphabet="ab()[]{}*+?|\\^$.:-=!<>P123zZdwx,", max_size=20))
def test_re2_translation_is_stable_on_regex_alphabet(pattern):
    try:
        translated = re2_to_python(pattern)
    except ValueError:
        return
    assert isinstance(translated, str)


# --- properties --------------------------------------------------------------------------------

segment = st.text(alphabet="abcXYZ019-_.~", min_size=1, max_size=6)
paths = st.lists(segment, min_size=0, max_size=4).map(lambda parts: "/" + "/".join(parts))


@given(paths, paths)
def test_exact_path_never_matches_another_path(route_path, request_path):
    match = RequestMatch(path=ValueMatch(MatchKind.EXACT, route_path))
    assert match.matches(Request("GET", request_path + "?q=1")) is (request_path == route_path)


@given(paths, paths)
def test_segment_prefix_semantics(prefix, path):
    value = prefix.rstrip("/")
    match = RequestMatch(path=ValueMatch(MatchKind.SEGMENT_PREFIX, value))
    expected = path == value or path.startswith(value + "/")
    assert match.matches(Request("GET", path)) is expected
    if expected:
        rewritten = replace_segment_prefix(path, prefix, "/new")
        assert rewritten.startswith("/new")
        assert rewritten[len("/new") :] == path[len(value) :]


@given(paths, paths)
def test_string_prefix_semantics(prefix, path):
    match = RequestMatch(path=ValueMatch(MatchKind.PREFIX, prefix))
    assert match.matches(Request("GET", path + "#frag")) is path.startswith(prefix)


@given(paths, st.text(alphabet="/abc", max_size=8))
def test_replace_segment_prefix_always_absolute(path, replacement):
    assert replace_segment_prefix(path, "/", replacement).startswith("/")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 70000)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "uri",
                    "exact",
                    "prefix",
                    "regex",
                    "route",
                    "destination",
                    "host",
                    "weight",
                    "match",
                    "headers",
                    "x",
                    "redirect",
                    "uri",
                    "timeout",
                    "port",
                    "number",
                    "percentage",
                    "value",
                ]
            ),
            inner,
            max_size=3,
        )
    ),
    max_leaves=12,
)


@given(json_values)
def test_parse_never_raises_on_arbitrary_virtual_service(http):
    text = doc("VirtualService", {"hosts": ["reviews"], "http": [http]})
    config = load(text)
    if not config.errors:
        config.table(REVIEWS, 9080).select(req())


@given(json_values)
def test_parse_never_raises_on_arbitrary_http_route(rule):
    config = load(hr([rule]))
    if not config.errors:
        config.table(REVIEWS, 9080).select(req())
