"""Routes in order and the tables a waypoint builds from them: `Route` (matches, action,
edits, policies), `RouteTable` for one service port with its fallback, `RouteChoice` for one
request, and `RouteConfig`, every VirtualService and HTTPRoute read, which builds the table
of a service port (VirtualService merge order, Gateway API precedence)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ztagent.istio.envelope import ResourceError
from ztagent.istio.resilience import DEFAULT_RETRY_POLICY, FaultPolicy, RetryPolicy
from ztagent.istio.routing.actions import (
    NO_HEADER_OPS,
    Destination,
    DirectResponse,
    Forward,
    HeaderOps,
    Mirror,
    Redirect,
    Rewrite,
    RouteAction,
)
from ztagent.istio.routing.match import MATCH_ALL, MatchKind, RequestMatch
from ztagent.istio.routing.request import Headers, Request
from ztagent.names import DEFAULT_DOMAIN_SUFFIX, service_hostname

VIRTUAL_SERVICE = "VirtualService"
HTTP_ROUTE = "HTTPRoute"


@dataclass(frozen=True, slots=True)
class RouteSource:
    """Which resource and rule a route came from (for logs, metrics and precedence ties)."""

    kind: str
    namespace: str
    name: str
    rule: int
    """Index in `spec.http` (VirtualService) or `spec.rules` (HTTPRoute); -1 for defaults."""
    match: int = 0
    """Index in the rule's matches (HTTPRoute rules become one route per match)."""
    created: datetime | None = None
    rule_name: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        if self.rule < 0:
            return f"{self.kind} {self.key}"
        where = "http" if self.kind == VIRTUAL_SERVICE else "rules"
        return f"{self.kind} {self.key} {where}[{self.rule}]"


@dataclass(frozen=True, slots=True)
class Route:
    """One ordered routing rule: any of `matches` selects it; then its action and policies."""

    source: RouteSource
    action: RouteAction
    matches: tuple[RequestMatch, ...] = (MATCH_ALL,)
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    rewrite: Rewrite | None = None
    timeout: float | None = None
    """Seconds for the whole request including retries, or None for no limit."""
    retry: RetryPolicy | None = DEFAULT_RETRY_POLICY
    fault: FaultPolicy | None = None
    mirrors: tuple[Mirror, ...] = ()

    def first_match(self, request: Request) -> RequestMatch | None:
        return next((m for m in self.matches if m.matches(request)), None)


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The route chosen for one request, the match that chose it, and what follows from it."""

    route: Route
    match: RequestMatch
    matched: bool
    """False when no route matched and the table's fallback answered."""

    @property
    def action(self) -> RouteAction:
        return self.route.action

    def upstream_path(self, request: Request) -> str:
        rewrite = self.route.rewrite
        return request.path if rewrite is None else rewrite.path(request, self.match)

    def upstream_authority(self, request: Request, destination: Destination) -> str:
        """Route-level rewrite wins over a destination's own authority header edit."""
        rewrite = self.route.rewrite
        if rewrite is not None and rewrite.authority is not None:
            return rewrite.authority
        if destination.authority is not None:
            return destination.authority
        return request.authority

    def upstream_headers(self, request: Request, destination: Destination) -> Headers:
        """Request headers after the route's then the destination's edits."""
        headers = self.route.request_headers.apply(request.headers)
        return destination.request_headers.apply(headers)

    def response_headers(self, headers: Headers, destination: Destination | None) -> Headers:
        headers = self.route.response_headers.apply(headers)
        return headers if destination is None else destination.response_headers.apply(headers)

    def location(self, request: Request) -> str:
        """The redirect target; only for a `Redirect` action."""
        action = self.route.action
        if not isinstance(action, Redirect):
            raise TypeError("the chosen route does not redirect")
        return action.location(request, self.match)


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The routes of one service port, in order, and what to do when none matches."""

    host: str
    port: int
    routes: tuple[Route, ...]
    fallback: Route

    def select(self, request: Request) -> RouteChoice:
        for route in self.routes:
            match = route.first_match(request)
            if match is not None:
                return RouteChoice(route, match, True)
        return RouteChoice(self.fallback, MATCH_ALL, False)


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """Mesh settings the waypoint needs to read routes the way istiod does."""

    domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
    waypoint_namespace: str = ""
    """The waypoint's own namespace: its VirtualServices and HTTPRoutes apply to every
    service it serves; a `sourceNamespace` match compares against it."""


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """A service the waypoint serves: Kubernetes name and namespace, and its hostname."""

    name: str
    namespace: str
    hostname: str

    @classmethod
    def kubernetes(
        cls, name: str, namespace: str, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
    ) -> ServiceRef:
        return cls(name, namespace, service_hostname(name, namespace, domain_suffix))


@dataclass(frozen=True, slots=True)
class VirtualServiceRoutes:
    namespace: str
    name: str
    created: datetime | None
    hosts: tuple[str, ...]
    """Fully qualified hostnames or wildcards (`*`, `*.suffix`)."""
    routes: tuple[Route, ...]

    def binds(self, hostname: str) -> bool:
        return any(host_matches(pattern, hostname) for pattern in self.hosts)


@dataclass(frozen=True, slots=True)
class ParentRef:
    """An HTTPRoute parent of kind Service."""

    namespace: str
    name: str
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteRoutes:
    namespace: str
    name: str
    created: datetime | None
    parents: tuple[ParentRef, ...]
    routes: tuple[Route, ...]
    """One route per (rule, match) in rule order, each with a single match."""

    def binds(self, service: ServiceRef, port: int | None) -> bool:
        return any(
            p.name == service.name
            and p.namespace == service.namespace
            and (port is None or p.port is None or p.port == port)
            for p in self.parents
        )


def host_matches(pattern: str, hostname: str) -> bool:
    """Istio host matching: exact, `*` for all, `*.suffix` for any name ending in `.suffix`."""
    pattern, hostname = pattern.lower(), hostname.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return hostname.endswith(pattern[1:])
    return pattern == hostname


def default_route(host: str, namespace: str = "") -> Route:
    """The route to the original service when no configured route applies."""
    source = RouteSource("default", namespace, host, -1)
    return Route(source, Forward((Destination(host),)))


def not_found_route(host: str, namespace: str = "") -> Route:
    """Envoy's answer to a route miss (response flag NR)."""
    return Route(RouteSource("not-found", namespace, host, -1), DirectResponse(404), retry=None)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Every VirtualService and HTTPRoute the waypoint read, and the errors of those left out."""

    virtual_services: tuple[VirtualServiceRoutes, ...] = ()
    http_routes: tuple[HTTPRouteRoutes, ...] = ()
    errors: tuple[ResourceError, ...] = ()
    notes: tuple[ResourceError, ...] = ()
    """Resources (or parts) accepted with a caveat, or ignored on purpose."""
    options: RouteOptions = RouteOptions()

    def _applies(self, namespace: str, service: ServiceRef) -> bool:
        return namespace in (service.namespace, self.options.waypoint_namespace)

    def table(self, service: ServiceRef, port: int) -> RouteTable:
        """The routes the waypoint applies to requests addressed to `service` on `port`."""
        http_routes = [
            hr
            for hr in self.http_routes
            if self._applies(hr.namespace, service) and hr.binds(service, None)
        ]
        if http_routes:
            entries = [
                route for hr in http_routes if hr.binds(service, port) for route in hr.routes
            ]
            entries.sort(key=_gateway_precedence)
            fallback = not_found_route(service.hostname, service.namespace)
            if not entries:
                fallback = default_route(service.hostname, service.namespace)
            return RouteTable(service.hostname, port, tuple(entries), fallback)

        bound = [
            vs
            for vs in self.virtual_services
            if self._applies(vs.namespace, service) and vs.binds(service.hostname)
        ]
        bound.sort(key=lambda vs: creation_order(vs.created, vs.namespace, vs.name))
        routes: list[Route] = []
        for vs in bound:
            for route in vs.routes:
                matches = tuple(m for m in route.matches if m.port in (None, port))
                if matches:
                    routes.append(
                        route if matches == route.matches else replace(route, matches=matches)
                    )
        fallback = (
            not_found_route(service.hostname, service.namespace)
            if routes
            else default_route(service.hostname, service.namespace)
        )
        return RouteTable(service.hostname, port, tuple(routes), fallback)


_PATH_RANK = {MatchKind.EXACT: 3, MatchKind.SEGMENT_PREFIX: 2, MatchKind.REGEX: 1}


def _gateway_precedence(route: Route) -> tuple[Any, ...]:
    match = route.matches[0]
    path = match.path
    rank = _PATH_RANK.get(path.kind, 0) if path is not None else 2
    length = len(path.value) if path is not None else 0
    source = route.source
    return (
        -rank,
        -length,
        match.method is None,
        -len(match.headers),
        -len(match.query_params),
        *creation_order(source.created, source.namespace, source.name),
        source.rule,
        source.match,
    )


def creation_order(created: datetime | None, namespace: str, name: str) -> tuple[Any, ...]:
    """Oldest first; resources without a timestamp before all others, then namespace/name."""
    return (created is not None, created or datetime.min.replace(tzinfo=UTC), namespace, name)
