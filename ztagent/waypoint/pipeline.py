"""The waypoint's per-request decisions: given a request, say what to do, never do it.

This module owns the order of Envoy's HTTP filters as Istio's waypoint configures them, and
what each one decides: RequestAuthentication (an invalid token -> 401, no token -> anonymous),
AuthorizationPolicy (denied -> 403 `RBAC: access denied`), route selection (VirtualService or
HTTPRoute; none -> the service itself), fault injection, the weighted destination, mirrors, and
per upstream attempt the endpoint, the time left, and whether a failure is retried.

`Pipeline.request` returns one command (see `commands`): `Respond`, `Delay` (wait, then
`Pipeline.resume`), `Forward` or `ForwardToWorkload`. A `Forward` is carried out attempt by
attempt through the `RetryState` (see `retry`) that `Pipeline.retry_state` gives.
`Pipeline.tunnel` admits a CONNECT (`Downstream`) or `Refuse`s it. The asyncio layer
(`proxy.Waypoint`) executes these commands.

No asyncio, no I/O, no clock, no global randomness: `now` (monotonic, the waypoint's clock),
`loop_time` (the event loop's clock, which upstream timeouts use) and `wall` (epoch seconds,
for token expiry) are arguments, and every draw comes from the injected `rng`. The route
tables, policies and clusters derived from one L7 config are cached until `set_config`.
"""

from __future__ import annotations

import ipaddress
import logging
import random

from ztagent.http.messages import RequestHead
from ztagent.identity.spiffe import Identity
from ztagent.istio import jwt, routing
from ztagent.istio.authorization import l7
from ztagent.istio.authorization.policy import AuthorizationPolicy
from ztagent.istio.connection_pool import ConnectionPool, Overflow
from ztagent.istio.destination import DEFAULT_POLICY
from ztagent.istio.routing import Headers, Request, RouteChoice, ServiceRef, SourceInfo
from ztagent.model.store import ProxyState
from ztagent.model.workload import Service, Workload
from ztagent.telemetry.tracing import Span
from ztagent.waypoint.cluster import Clusters, UpstreamKey
from ztagent.waypoint.commands import (
    FLAG_FAULT_ABORT,
    FLAG_FAULT_DELAY,
    FLAG_JWT,
    FLAG_NO_ROUTE,
    FLAG_RBAC,
    NO_FLAGS,
    NO_HEALTHY_UPSTREAM,
    Delay,
    Downstream,
    Forward,
    ForwardToWorkload,
    Mirror,
    MirrorTarget,
    Refuse,
    Respond,
    Routed,
    Step,
    grpc_respond,
    respond,
)
from ztagent.waypoint.config import WaypointConfig
from ztagent.waypoint.retry import RetryState

log = logging.getLogger(__name__)


class Pipeline:
    """The decisions of one waypoint over its current L7 config and the proxy state."""

    def __init__(self, *, gateway: tuple[str, str], state: ProxyState, rng: random.Random) -> None:
        self.gateway = gateway
        self.state = state
        self.rng = rng
        self.config = WaypointConfig.empty()
        self.clusters = Clusters(state, rng)
        self._tables: dict[tuple[str, int], routing.RouteTable] = {}
        self._policy_cache: dict[
            str, tuple[jwt.Authenticator | None, list[AuthorizationPolicy]]
        ] = {}
        # Connection pool counters of pod-addressed traffic (no DestinationRule), per workload.
        self._direct_pools: dict[str, ConnectionPool] = {}

    def set_config(self, config: WaypointConfig) -> None:
        self.config = config
        self.clusters.set_config(config)
        self._tables.clear()
        self._policy_cache.clear()

    # -------------------------------------------------------------- cached per config

    def policies(
        self, service: Service | None
    ) -> tuple[jwt.Authenticator | None, list[AuthorizationPolicy]]:
        """The RequestAuthentications (ready to check tokens) and AuthorizationPolicies that
        apply to requests for `service` through this waypoint."""
        key = service.key if service else ""
        found = self._policy_cache.get(key)
        if found is None:
            target = ("Service", service.namespace, service.name) if service else None
            config = self.config
            authn = l7.policies_for(config.authentication.policies, self.gateway, target)
            policies = l7.policies_for(config.authorization.policies, self.gateway, target)
            found = (jwt.Authenticator(authn) if authn else None, policies)
            self._policy_cache[key] = found
        return found

    def table(self, service: Service, port: int) -> routing.RouteTable:
        key = (service.key, port)
        table = self._tables.get(key)
        if table is None:
            ref = ServiceRef(service.name, service.namespace, service.hostname)
            table = self._tables[key] = self.config.routes.table(ref, port)
        return table

    # -------------------------------------------------------------- one tunnel

    def tunnel(
        self,
        target: tuple[str, int],
        authority: str,
        peer_identity: Identity,
        peer_ip: str,
        forwarded_ip: str | None,
    ) -> Downstream | Refuse:
        """Who a CONNECT to `target` comes from and what it reaches: a service VIP, else a
        workload address, else it is refused. The sending agent carries one workload with
        that workload's identity, so the client address it names in `forwarded`
        (`forwarded_ip`) counts only if it is an address of a workload with the peer's
        identity; otherwise the peer's own address `peer_ip` stands for the client."""
        ip_text = target[0]
        try:
            ip = ipaddress.ip_address(ip_text)
        except ValueError:
            return Refuse(400, f"{ip_text!r} is not an IP address")
        state = self.state
        service = state.service_by_vip("", ip)
        workload = None
        if service is None:
            workload = state.workload_by_address("", ip)
            if workload is None:
                return Refuse(404, f"no service or workload at {authority}")
        client_ip = peer_ip
        if forwarded_ip is not None and state.speaks_for(
            peer_identity, "", ipaddress.ip_address(forwarded_ip)
        ):
            client_ip = forwarded_ip
        source = state.workload_by_address("", ipaddress.ip_address(client_ip))
        return Downstream(peer_identity, client_ip, target, service, workload, source)

    # -------------------------------------------------------------- one request

    def request(
        self,
        head: RequestHead,
        headers: list[tuple[str, str]],
        down: Downstream,
        span: Span,
        *,
        replayable: bool,
        now: float,
        wall: float,
    ) -> Step:
        """What to do with a request: `headers` are the request's (request id included),
        `replayable` whether its body is kept whole (see `replayable()`)."""
        service = down.service
        port = down.target[1]
        path = head.path
        authenticator, policies = self.policies(service)
        auth: l7.RequestAuth | None = None
        if authenticator is not None:
            result = authenticator.authenticate(
                headers, path, now=wall, host=head.authority, scheme=head.scheme
            )
            if not result.allowed:
                assert result.status is not None
                return respond(
                    result.status, result.body.encode(), result.response_headers, FLAG_JWT
                )
            auth = result.auth
            edits = result.edits
            if edits.remove:
                gone = set(edits.remove)
                headers = [(k, v) for k, v in headers if k not in gone]
            if edits.add:
                headers = [*headers, *edits.add]
            if edits.path is not None:
                path = edits.path
        if policies:
            decision = l7.evaluate(
                policies,
                l7.RequestContext(
                    method=head.method,
                    path=path,
                    host=head.authority,
                    destination_port=port,
                    headers=Headers.of(headers),
                    source_identity=down.peer_identity,
                    source_ip=_ip(down.client_ip),
                    destination_ip=_ip(down.target[0]),
                    auth=auth,
                ),
            )
            if not decision.allowed:
                log.info("%s %s denied: %s", head.method, path, decision.reason)
                return respond(403, decision.body, flags=FLAG_RBAC)
        request = Request(
            method=head.method,
            path=path,
            authority=head.authority,
            scheme=head.scheme,
            headers=Headers.of(headers),
            port=port,
            source=SourceInfo(
                namespace=down.peer_identity.namespace,
                principal=str(down.peer_identity),
                address=down.client_ip,
            ),
        )
        if service is None:
            return self._to_workload(request, headers, down, span)
        choice = self.table(service, port).select(request)
        action = choice.action
        if isinstance(action, routing.DirectResponse):
            flags = NO_FLAGS if choice.matched else FLAG_NO_ROUTE
            return respond(action.status, action.body, flags=flags)
        if isinstance(action, routing.Redirect):
            return respond(action.status, b"", [("location", choice.location(request))])
        fault_policy = choice.route.fault
        if fault_policy is not None:
            fault = fault_policy.decide(self.rng)
            abort: Respond | None = None
            if fault.grpc_status is not None:
                abort = grpc_respond(fault.grpc_status, "fault filter abort", FLAG_FAULT_ABORT)
            elif fault.abort_status is not None:
                abort = respond(fault.abort_status, b"fault filter abort", flags=FLAG_FAULT_ABORT)
            if fault.delay:
                then = abort or Routed(choice, action, request, head, down, span, replayable)
                return Delay(fault.delay, then)
            if abort is not None:
                return abort
        return self._forward(choice, action, request, head, down, span, replayable, NO_FLAGS, now)

    def resume(self, delay: Delay, now: float) -> Respond | Forward:
        """What follows a fault delay: the abort, or the forward (flagged DI)."""
        then = delay.then
        if isinstance(then, Respond):
            return then
        return self._forward(
            then.choice,
            then.action,
            then.request,
            then.head,
            then.down,
            then.span,
            then.replayable,
            FLAG_FAULT_DELAY,
            now,
        )

    def _forward(
        self,
        choice: RouteChoice,
        action: routing.Forward,
        request: Request,
        head: RequestHead,
        down: Downstream,
        span: Span,
        replayable: bool,
        flags: str,
        now: float,
    ) -> Forward:
        destination = action.choose(self.rng)
        upstream_headers = choice.upstream_headers(request, destination)
        upstream = RequestHead(
            method=head.method,
            authority=choice.upstream_authority(request, destination),
            path=choice.upstream_path(request),
            headers=_with_propagation(list(upstream_headers), span, down),
            scheme=head.scheme,
            protocol=head.protocol,
        )
        http2 = head.protocol == "HTTP/2"
        route = choice.route
        mirrors: tuple[Mirror, ...] = ()
        if replayable and route.mirrors:
            mirrors = tuple(
                _mirror(m.destination, request, upstream, http2)
                for m in route.mirrors
                if m.should_mirror(self.rng)
            )
        port = destination.port_for(request)
        cluster = self.clusters.cluster(destination.host, destination.subset, port, http2, now)
        return Forward(
            cluster,
            upstream,
            request,
            down.client_ip,
            route.retry,
            route.timeout,
            mirrors,
            choice,
            destination,
            flags,
        )

    def retry_state(
        self, forward: Forward, *, replayable: bool, loop_time: float
    ) -> RetryState | Respond:
        """The attempts of `forward`, or the answer when its destination has no cluster
        (an unknown host or subset: Envoy's `no healthy upstream`)."""
        if forward.cluster is None:
            return NO_HEALTHY_UPSTREAM
        return RetryState(
            forward,
            forward.cluster,
            self.clusters,
            replayable=replayable,
            loop_time=loop_time,
            rng=self.rng,
        )

    def _to_workload(
        self,
        request: Request,
        headers: list[tuple[str, str]],
        down: Downstream,
        span: Span,
    ) -> ForwardToWorkload:
        workload = down.workload
        assert workload is not None
        upstream = RequestHead(
            method=request.method,
            authority=request.authority,
            path=request.path,
            headers=_with_propagation(headers, span, down),
        )
        key = UpstreamKey(
            str(workload.addresses[0]),
            down.target[1],
            False,
            str(workload.identity),
            down.client_ip,
        )
        pool = self._direct_pools.get(workload.uid)
        if pool is None:
            pool = self._direct_pools[workload.uid] = ConnectionPool(DEFAULT_POLICY.connection_pool)
        return ForwardToWorkload(workload, key, pool, upstream)

    def mirror_target(self, mirror: Mirror, now: float) -> MirrorTarget | None:
        """Where a mirrored copy goes, its pool slot taken; None: nowhere (no cluster, no
        endpoint, or the pool is full), the copy is dropped."""
        cluster = self.clusters.cluster(mirror.host, mirror.subset, mirror.port, mirror.http2, now)
        if cluster is None:
            return None
        endpoint = self.clusters.pick(cluster, mirror.request, set(), now)
        if endpoint is None:
            return None
        key = self.clusters.upstream_key(cluster, endpoint.workload)
        if key is None:
            return None
        if isinstance(cluster.pool.try_acquire_request(), Overflow):
            return None
        return MirrorTarget(cluster, key)

    def tcp_destination(self, down: Downstream, now: float) -> UpstreamKey | None:
        """Where a tunnel that is not HTTP goes: an endpoint of the service (or the workload
        itself), None when there is none."""
        endpoint: Workload | None = down.workload
        port = down.target[1]
        if down.service is not None:
            cluster = self.clusters.cluster(down.service.hostname, "", port, False, now)
            endpoint = None
            if cluster is not None:
                request = Request("", "/", source=SourceInfo(address=down.client_ip))
                picked = self.clusters.pick(cluster, request, set(), now)
                if picked is not None:
                    endpoint = picked.workload
                    port = self.state.target_port(down.service, endpoint, port) or port
        if endpoint is None:
            return None
        return UpstreamKey(
            str(endpoint.addresses[0]), port, False, str(endpoint.identity), down.client_ip
        )


def _mirror(
    destination: routing.Destination, request: Request, upstream: RequestHead, http2: bool
) -> Mirror:
    host, _, host_port = upstream.authority.partition(":")
    shadow = RequestHead(
        upstream.method,
        f"{host}-shadow" + (f":{host_port}" if host_port else ""),
        upstream.path,
        list(upstream.headers),
        upstream.scheme,
        upstream.protocol,
    )
    hashed = Request(method=upstream.method, path=upstream.path, authority=upstream.authority)
    return Mirror(
        destination.host,
        destination.port_for(request),
        destination.subset,
        shadow,
        http2,
        hashed,
    )


def _with_propagation(
    headers: list[tuple[str, str]], span: Span, down: Downstream
) -> list[tuple[str, str]]:
    propagated = span.propagation_headers()
    names = {k for k, _ in propagated} | {"x-forwarded-for"}
    out = [(k, v) for k, v in headers if k not in names]
    out.extend(propagated)
    forwarded = next((v for k, v in headers if k == "x-forwarded-for"), None)
    client = down.client_ip
    out.append(("x-forwarded-for", f"{forwarded}, {client}" if forwarded else client))
    return out


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
