"""Fuzz targets for what the waypoint does with each request a client sends: route selection
and the route's edits (redirect location, rewrites, header edits), and L7 authorization.

The configuration is the readers' seeds, sometimes with edits; the request is hostile. Nothing
here may raise: a request is answered, never an exception in the proxy.
"""

from __future__ import annotations

import ipaddress
import random

from ztagent.identity.spiffe import Identity
from ztagent.istio import routing as routes
from ztagent.istio.authorization import l7
from ztagent.istio.authorization import waypoint as authorization_waypoint

from .draw import Draw
from .targets_config import _AUTHZ, _ROUTES, _objects, _resources

_SERVICE = routes.ServiceRef.kubernetes("reviews", "shop")
_SEED_ROUTES = routes.parse_routes(_resources(_ROUTES[0]))
_SEED_POLICIES = authorization_waypoint.read_authorization_policies(_resources(_AUTHZ[0])).policies
_METHODS = ("GET", "POST", "HEAD", "CONNECT", "OPTIONS", "get", "", " ", "G\u00e9T")
_REQUEST_WORDS = (
    "/",
    "/api",
    "/api/",
    "/api/x?q=xy&b=1",
    "/r/abc",
    "/old",
    "//",
    "/%2e%2e/",
    "/a/../b",
    "?",
    "#",
    "*",
    "reviews",
    "reviews:9080",
    "reviews.shop",
    "[::1]:80",
    "[::1",
    "h:",
    ":80",
    "a:b:c",
    "x-a",
    "x-r",
    "x-token",
    "end-user",
    "jason",
    "aaab",
    "abc",
    "cookie",
    "host",
    ":authority",
)


def _text(draw: Draw) -> str:
    return draw.text(_REQUEST_WORDS)


def _headers(draw: Draw) -> list[tuple[str, str]]:
    return [(_text(draw), _text(draw)) for _ in range(draw.below(6))]


def fuzz_route_request(data: bytes) -> None:
    """Select the route for a hostile request and compute everything the proxy asks of it."""
    draw = Draw(data)
    if draw.below(4) == 0:
        config = routes.parse_routes(_resources(_objects(draw, *_ROUTES)))
    else:
        config = _SEED_ROUTES
    port = draw.choice((9080, 80, 0, 65535))
    request = routes.Request(
        method=draw.choice(_METHODS),
        path=_text(draw),
        authority=_text(draw),
        scheme=draw.choice(("http", "https", "")),
        headers=routes.Headers.of(_headers(draw)),
        port=port,
        source=routes.SourceInfo("shop", "cluster.local/ns/shop/sa/web", _text(draw)),
    )
    choice = config.table(_SERVICE, port).select(request)
    action = choice.action
    if isinstance(action, routes.Redirect):
        assert isinstance(choice.location(request), str)
    elif isinstance(action, routes.Forward):
        destination = action.choose(random.Random(draw.byte()))
        choice.upstream_headers(request, destination)
        choice.upstream_authority(request, destination)
        choice.upstream_path(request)
        choice.response_headers(routes.Headers.of(_headers(draw)), destination)
        destination.port_for(request)
    else:
        assert isinstance(action, routes.DirectResponse)


def _ip(draw: Draw) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    raw = draw.choice((b"", b"\x0a\x00\x00\x09", b"\x7f\x00\x00\x01", b"\x00" * 15 + b"\x01"))
    return ipaddress.ip_address(raw) if raw else None


def fuzz_authorization_request(data: bytes) -> None:
    """Evaluate waypoint AuthorizationPolicies against a hostile request: a decision, always."""
    draw = Draw(data)
    if draw.below(4) == 0:
        policies = authorization_waypoint.read_authorization_policies(
            _resources(_objects(draw, *_AUTHZ))
        ).policies
    else:
        policies = _SEED_POLICIES
    claims = draw.value(("iss", "sub", "aud", "azp", "groups", "admin", "shop"), 3)
    request = l7.RequestContext(
        method=draw.choice(_METHODS),
        path=_text(draw),
        host=_text(draw),
        destination_port=draw.choice((9080, 80, 0, 65535)),
        headers=routes.Headers.of(_headers(draw)),
        source_identity=draw.choice((None, Identity("cluster.local", "shop", "web"))),
        source_ip=_ip(draw),
        remote_ip=_ip(draw),
        destination_ip=_ip(draw),
        sni=draw.choice((None, "", "reviews.shop")),
        auth=l7.RequestAuth(claims) if isinstance(claims, dict) and draw.flag() else None,
    )
    decision = l7.evaluate(policies, request)
    assert isinstance(decision, l7.Decision)


def request_seeds() -> dict[str, list[bytes]]:
    return {
        "route_request": [b"\x01\x00\x00\x01\x00\x00\x01", b"\x01\x00\x00\x01\x00\x00\x04"],
        "authorization_request": [b"\x01\x00\x00\x00\x00\x00\x00", b"\x01\x01\x01\x01"],
    }
