"""Route actions: weighted choice, header edits, redirects, rewrites and mirrors, for
VirtualService and HTTPRoute alike. Pure: inline YAML, injected random sources."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.routing_helpers import (
    REVIEWS,
    ROUTE,
    backend,
    chosen,
    constant,
    hr,
    hr_rule,
    load,
    req,
    to,
    vs,
)
from ztagent.istio.routing import Destination, Forward, Headers, Redirect, Request
from ztagent.istio.routing.actions import HeaderOps, PortMode, Rewrite
from ztagent.istio.routing.match import ValueMatch

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
