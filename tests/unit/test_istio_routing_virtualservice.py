"""VirtualService routing: parsing (golden and field errors), matching, merging and scope,
dropped matches, faults and durations. Pure: inline YAML."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from fractions import Fraction

import pytest

from tests.unit.routing_helpers import (
    NS,
    RATINGS,
    REVIEWS,
    ROUTE,
    chosen,
    doc,
    docs,
    load,
    only_error,
    req,
    to,
    vs,
)
from ztagent.fields import parse_go_duration
from ztagent.istio.resilience import DEFAULT_RETRY_POLICY, FaultPolicy, RetryPolicy
from ztagent.istio.routing import Destination, DirectResponse, Forward, RouteOptions
from ztagent.istio.routing.actions import HeaderOps, Mirror, Rewrite
from ztagent.istio.routing.match import (
    MATCH_ALL,
    HeaderMatch,
    MatchKind,
    QueryMatch,
    RequestMatch,
    ValueMatch,
)

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


# --- errors ------------------------------------------------------------------------------------

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
