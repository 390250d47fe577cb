"""L7 routing of the waypoint: VirtualService and HTTPRoute -> route tables -> per-request choices.

This package owns the route model and everything that is a pure function of configuration and
one request: reading Istio `VirtualService` (networking.istio.io v1/v1beta1/v1alpha3) and
Gateway API `HTTPRoute` (gateway.networking.k8s.io v1/v1beta1) into one model, choosing the
route for a request, choosing a weighted destination, rewriting the path and authority,
computing redirects and header edits. It does no I/O and never reads a clock; randomness is an
argument. Retry, fault and mirror decisions live in `resilience`; load balancing, connection
pools and outlier detection belong to `destination`; policy to `authorization.l7` and `jwt`.

Modules, one concern each: `request` (the request and its headers), `re2` (RE2 patterns for
Python's `re`), `match` (match conditions), `actions` (forward, redirect, direct response,
rewrites, header edits, mirrors), `table` (routes, route tables and `RouteConfig`), `reader`
(what reading both kinds shares), `virtualservice`, `httproute`, `parse` (`parse_routes`).
Callers import from the package; tests may import a module's own names.

Reading: `parse_routes(resources)` returns a `RouteConfig` holding every valid resource and a
`ResourceError` (kind, `ns/name`, field path, reason) for each bad one; a bad resource is left
out whole and the others still route. `RouteConfig.table(service, port)` builds the
`RouteTable` a waypoint uses for one service port, and `RouteTable.select(request)` answers
with a `RouteChoice`.

Semantics follow istiod's waypoint translation (pilot listener_waypoint.go, route.go,
kube/gateway conversion.go) and Envoy:

- A VirtualService applies to a service when it lives in the service's namespace or the
  waypoint's, one of its `hosts` (short names resolved in its own namespace; `*.suffix`
  wildcards allowed) matches the service hostname, and its `gateways` are empty or include
  `mesh`. Several such VirtualServices are merged in (creationTimestamp, namespace, name)
  order, oldest first, and the first matching route wins across them (istiod merges them
  the same way; with a catch-all in the oldest, the oldest effectively wins).
- A match with `port` applies only on that service port; a match with `sourceLabels` is
  dropped (ambient has no source labels: istiod drops it too), as is one with `gateways` not
  including `mesh`, a `sourceNamespace` other than the waypoint's, or a JWT-claim header.
- When VirtualService routes exist for the port and none matches, the answer is 404, as
  Envoy answers a route miss; when no VirtualService has routes for the port, the request
  goes to the original service with Istio's default retry policy. When any HTTPRoute binds
  the service, its VirtualServices are not used: istiod would concatenate both by age, which
  mixes the two APIs' precedence rules, so this waypoint takes the HTTPRoutes alone. A
  route miss then is 404 and a port no HTTPRoute binds goes to the service.
- HTTPRoute binds through `parentRefs` of kind Service (group "" or "core"), optionally one
  `port`; `hostnames` are ignored for Service parents, as istiod does. Routes from all
  HTTPRoutes of a service are ordered by Gateway API precedence: Exact path, then the longest
  PathPrefix, then RegularExpression; then a method match, more header matches, more query
  matches; ties by oldest creationTimestamp, then namespace/name, then rule and match order.
- Weights are relative (Istio no longer requires a sum of 100): with more than one
  destination a weight-0 destination is never chosen and an all-zero total is an error; a
  single destination's weight is ignored. HTTPRoute weights default to 1 and a rule whose
  backends all weigh 0 answers 500.
- Durations in VirtualService are Go durations ("1s", "0.5s", "100ms", "1m30s": istiod reads
  them with time.ParseDuration) of at least 1 ms and whole milliseconds
  (`ztagent.fields.duration`); HTTPRoute durations use the Gateway API form ("10s",
  "500ms", "1h30m"; `fields.gateway_duration`), "0s" meaning no timeout.
- Regular expressions have RE2 syntax; they are translated for Python's `re` and constructs
  RE2 lacks (backreferences, lookaround, atomic groups, possessive quantifiers) are rejected.
  Paths, headers and query values must match the whole value.
- VirtualService `uri` prefix matches are plain string prefixes; HTTPRoute PathPrefix
  matches whole segments ("/foo" matches "/foo" and "/foo/bar", not "/foobar").
  Matching looks at the path without its query string. A VirtualService `rewrite.uri`
  replaces what the match matched (Envoy's prefix_rewrite); HTTPRoute ReplacePrefixMatch
  follows the Gateway API table, also for a "/" prefix ("/foo" -> "/xyz/foo").
"""

from ztagent.istio.routing.actions import Destination, DirectResponse, Forward, Redirect
from ztagent.istio.routing.parse import parse_routes
from ztagent.istio.routing.request import Headers, Request, SourceInfo
from ztagent.istio.routing.table import (
    RouteChoice,
    RouteConfig,
    RouteOptions,
    RouteTable,
    ServiceRef,
)

__all__ = [
    "Destination",
    "DirectResponse",
    "Forward",
    "Headers",
    "Redirect",
    "Request",
    "RouteChoice",
    "RouteConfig",
    "RouteOptions",
    "RouteTable",
    "ServiceRef",
    "SourceInfo",
    "parse_routes",
]
