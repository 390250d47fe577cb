"""The waypoint's per-request decisions: given a request, say what to do, never do it.

This module owns the order of Envoy's HTTP filters as Istio's waypoint configures them, and
what each one decides: RequestAuthentication (an invalid token -> 401, no token -> anonymous),
AuthorizationPolicy (denied -> 403 `RBAC: access denied`), route selection (VirtualService or
HTTPRoute; none -> the service itself), fault injection, the weighted destination, mirrors, and
per upstream attempt the endpoint, the time left, and whether a failure is retried.

`Pipeline.request` returns one command (frozen dataclasses below): `Respond` (a local reply),
`Delay` (wait, then `Pipeline.resume`), `Forward` (to a cluster, with its mirrors) or
`ForwardToWorkload` (a pod-addressed request). A `Forward` is carried out attempt by attempt
through a `RetryState`: `next_attempt` names the endpoint (`Attempt`) or answers, `answered` /
`failed` / `overflowed` say what an attempt's outcome means (`Deliver`, `RetryAfter`, or the
final `Respond`). `Pipeline.tunnel` admits a CONNECT (`Downstream`) or `Refuse`s it, and
`with_request_id` finishes every response's headers. The asyncio layer (`proxy.Waypoint`)
executes these commands.

No asyncio, no I/O, no clock, no global randomness: `now` (monotonic, the waypoint's clock),
`loop_time` (the event loop's clock, which upstream timeouts use) and `wall` (epoch seconds,
for token expiry) are arguments, and every draw comes from the injected `rng`. The route
tables, policies and clusters derived from one L7 config are cached until `set_config`.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ztagent.http.messages import RequestHead
from ztagent.identity.spiffe import Identity
from ztagent.istio import jwt, routing
from ztagent.istio.authorization import l7
from ztagent.istio.authorization.policy import AuthorizationPolicy
from ztagent.istio.connection_pool import ConnectionPool, Overflow
from ztagent.istio.destination import DEFAULT_POLICY
from ztagent.istio.outlier import LocalOrigin
from ztagent.istio.resilience import Failure, RetryPolicy
from ztagent.istio.routing import Headers, Request, RouteChoice, ServiceRef, SourceInfo
from ztagent.model.store import ProxyState
from ztagent.model.workload import Service, Workload
from ztagent.telemetry.tracing import REQUEST_ID, Span
from ztagent.waypoint.cluster import Cluster, Clusters, Endpoint, UpstreamKey
from ztagent.waypoint.config import WaypointConfig

log = logging.getLogger(__name__)

REPLAY_LIMIT = 64 * 1024
"""Largest request body (of known length) kept whole so that retries and mirrors can resend it."""

# Envoy's response flags.
NO_FLAGS = "-"
FLAG_NO_ROUTE = "NR"
FLAG_NO_HEALTHY = "UH"
FLAG_CONNECT = "UF"
FLAG_OVERFLOW = "UO"
FLAG_RESET = "UC"
FLAG_TIMEOUT = "UT"
FLAG_RETRY_LIMIT = "URX"
FLAG_FAULT_ABORT = "FI"
FLAG_FAULT_DELAY = "DI"
FLAG_RBAC = "RBAC"
FLAG_JWT = "UAEX"

GRPC_CONTENT_TYPE = "application/grpc"


def replayable(length: int | None) -> bool:
    """Whether a request body of declared `length` is read whole before forwarding, so that
    retries and mirrors can resend it (Envoy's retry buffer)."""
    return length is not None and length <= REPLAY_LIMIT


@dataclass(frozen=True, slots=True)
class Downstream:
    """One tunnel into the waypoint: who sent it and where the client was going."""

    peer_identity: Identity
    client_ip: str
    """The original client's IP: the CONNECT's `forwarded: for=` when it is an address of a
    workload with the peer's identity, else the peer's own address."""
    target: tuple[str, int]
    """The CONNECT `:authority`: service VIP:port or workload IP:port."""
    service: Service | None
    workload: Workload | None
    source: Workload | None


def with_request_id(headers: list[tuple[str, str]], request_id: str) -> list[tuple[str, str]]:
    """The response headers with the request's `x-request-id` added when they carry none
    (a local reply, or an upstream that did not echo it)."""
    if any(k == REQUEST_ID for k, _ in headers):
        return headers
    return [*headers, (REQUEST_ID, request_id)]


def grpc_status(
    headers: Sequence[tuple[str, str]], trailers: Sequence[tuple[str, str]] = ()
) -> int | None:
    """A response's grpc-status (the head's, else the trailers'), None without a valid one."""
    for name, value in (*headers, *trailers):
        if name == "grpc-status":
            try:
                return int(value)
            except ValueError:
                continue
    return None


# ------------------------------------------------------------------ commands


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse a tunnel (the CONNECT is answered with `status`)."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client from the waypoint itself (`headers` complete, length included)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    flags: str = NO_FLAGS


def respond(
    status: int,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    flags: str = NO_FLAGS,
    *,
    content_type: str = "text/plain",
) -> Respond:
    """A local reply: `headers`, a content-type when there is a body, the content-length."""
    out = [*headers]
    if body and not any(k == "content-type" for k, _ in out):
        out.append(("content-type", content_type))
    out.append(("content-length", str(len(body))))
    return Respond(status, tuple(out), body, flags)


def grpc_respond(grpc_status: int, message: str, flags: str) -> Respond:
    """A trailers-only gRPC answer: HTTP 200 with grpc-status and grpc-message, no body."""
    headers = (
        ("content-type", GRPC_CONTENT_TYPE),
        ("grpc-status", str(grpc_status)),
        ("grpc-message", message),
    )
    return Respond(200, headers, b"", flags)


def overflow_respond(overflow: Overflow) -> Respond:
    """A connection pool limit refused the request (Envoy's UO)."""
    return respond(
        overflow.status,
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
        [("x-envoy-overloaded", "true")],
        flags=FLAG_OVERFLOW,
    )


def connect_failure_respond(detail: str) -> Respond:
    """No connection to the chosen endpoint (Envoy's UF)."""
    return respond(
        503,
        f"upstream connect error or disconnect/reset before headers. reset reason: "
        f"connection failure, {detail}".encode(),
        flags=FLAG_CONNECT,
    )


def workload_connect_failure(detail: str) -> Respond:
    """A pod-addressed request whose workload could not be reached."""
    return respond(503, f"upstream connect error: {detail}".encode(), flags=FLAG_CONNECT)


NO_HEALTHY_UPSTREAM = respond(503, b"no healthy upstream", flags=FLAG_NO_HEALTHY)
UPSTREAM_TIMEOUT = respond(504, b"upstream request timeout", flags=FLAG_TIMEOUT)
UPSTREAM_RESET = respond(
    503,
    b"upstream connect error or disconnect/reset before headers. "
    b"reset reason: connection termination",
    flags=FLAG_RESET,
)
RESPONSE_BODY_RESET = respond(
    503, b"upstream reset before the response body ended", flags=FLAG_RESET
)
INTERNAL_ERROR = respond(500, b"internal error", flags=NO_FLAGS)


@dataclass(frozen=True, slots=True)
class Mirror:
    """Send a copy of the request to `host`/`subset`/`port` (Host gets `-shadow`); the
    response is read and dropped. Only replayable bodies are mirrored."""

    host: str
    port: int
    subset: str
    head: RequestHead
    http2: bool
    request: Request
    """What the mirror's balancer hashes on."""


@dataclass(frozen=True, slots=True)
class MirrorTarget:
    """Where one mirrored copy goes; its pool request slot is taken (release it when done)."""

    cluster: Cluster
    key: UpstreamKey


@dataclass(frozen=True, slots=True)
class Forward:
    """Send `head` upstream to `cluster` (after reading a replayable body and starting the
    mirrors), attempt by attempt through a `RetryState`; then `reply_flags` and
    `response_headers` finish the response. `cluster` None: the destination has no cluster
    (unknown host or subset); once the mirrors are started, `Pipeline.retry_state` answers
    `NO_HEALTHY_UPSTREAM`."""

    cluster: Cluster | None
    head: RequestHead
    request: Request
    source_ip: str
    retry: RetryPolicy | None
    timeout: float | None
    """Seconds for the whole request, retries included (the route's `timeout`), or None."""
    mirrors: tuple[Mirror, ...]
    choice: RouteChoice
    destination: routing.Destination
    flags: str
    """The flags the request carries so far (a fault delay's DI)."""

    def reply_flags(self, flags: str) -> str:
        """The response's flags: its own, else those this request picked up on the way."""
        return self.flags if flags == NO_FLAGS else flags

    def response_headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The response headers after the route's then the destination's edits."""
        return list(self.choice.response_headers(Headers.of(headers), self.destination))


@dataclass(frozen=True, slots=True)
class ForwardToWorkload:
    """A pod-addressed request: no routes apply; send `head` to the workload itself."""

    workload: Workload
    key: UpstreamKey
    pool: ConnectionPool
    head: RequestHead

    def failed(self, detail: str) -> Respond:
        """The answer when the workload could not be reached (no retries: no route)."""
        return workload_connect_failure(detail)


@dataclass(frozen=True, slots=True)
class _Routed:
    """A forward decided up to the destination draw, held over a fault delay."""

    choice: RouteChoice
    action: routing.Forward
    request: Request
    head: RequestHead
    down: Downstream
    span: Span
    replayable: bool


@dataclass(frozen=True, slots=True)
class Delay:
    """Wait `seconds` (a fault delay), then `Pipeline.resume` says what follows."""

    seconds: float
    then: Respond | _Routed


Step = Respond | Delay | Forward | ForwardToWorkload


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream try: this endpoint, at `key`, within `timeout` seconds (None: no limit)."""

    endpoint: Endpoint
    key: UpstreamKey
    timeout: float | None


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Retry once `seconds` of backoff have passed (drop the attempt's response, if any)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Deliver:
    """The attempt's response is the answer, with these response flags."""

    flags: str


DELIVER = Deliver(NO_FLAGS)
DELIVER_RETRY_LIMIT = Deliver(FLAG_RETRY_LIMIT)


class AttemptError(enum.Enum):
    """How an upstream attempt ended without a response head."""

    CONNECT = "connect"
    """No connection to the endpoint could be made."""
    RESET = "reset"
    """The connection or stream was reset or closed before the response head."""
    PROTOCOL = "protocol"
    """The upstream broke the protocol before the response head."""
    TIMEOUT = "timeout"
    """The per-try or route timeout expired."""


# How each error counts for retries and for outlier detection.
_ERROR_OUTCOMES: dict[AttemptError, tuple[Failure, LocalOrigin]] = {
    AttemptError.CONNECT: (Failure.CONNECT_FAILURE, LocalOrigin.CONNECT_FAILED),
    AttemptError.RESET: (Failure.RESET, LocalOrigin.RESET),
    AttemptError.PROTOCOL: (Failure.CONNECT_FAILURE, LocalOrigin.RESET),
    AttemptError.TIMEOUT: (Failure.TIMEOUT, LocalOrigin.TIMEOUT),
}


class RetryState:
    """The attempts of one `Forward` (Envoy's router retry state): which endpoint next, how
    long it may take, and what each outcome means; it holds the cluster's counters (pool
    requests and retries, balancer load) while attempts are in flight."""

    __slots__ = (
        "_backing_off",
        "_clusters",
        "_rng",
        "attempt",
        "cluster",
        "deadline",
        "forward",
        "replayable",
        "tried",
    )

    def __init__(
        self,
        forward: Forward,
        cluster: Cluster,
        clusters: Clusters,
        *,
        replayable: bool,
        loop_time: float,
        rng: random.Random,
    ) -> None:
        self.forward = forward
        self.cluster = cluster
        self._clusters = clusters
        self.replayable = replayable
        self.deadline = None if not forward.timeout else loop_time + forward.timeout
        self.attempt = 1
        """The try under way or next (1 = the original request)."""
        self.tried: set[str] = set()
        self._backing_off = False
        self._rng = rng

    def next_attempt(self, now: float, loop_time: float) -> Attempt | Respond:
        """The next endpoint to try, or the answer when there is none, the pool is full or
        the route's time is up."""
        cluster = self.cluster
        if self._backing_off:
            cluster.pool.release_retry()
            self._backing_off = False
            self.attempt += 1
        endpoint = self._clusters.pick(cluster, self.forward.request, self.tried, now)
        if endpoint is None:
            return NO_HEALTHY_UPSTREAM
        self.tried.add(endpoint.key)
        admission = cluster.pool.try_acquire_request()
        if isinstance(admission, Overflow):
            return overflow_respond(admission)
        key = self._clusters.upstream_key(cluster, endpoint.workload, self.forward.source_ip)
        assert key is not None  # endpoints are only those with a target port
        retry = self.forward.retry
        limit = retry.per_try_timeout if retry is not None else None
        if self.deadline is not None:
            remaining = self.deadline - loop_time
            if remaining <= 0:
                cluster.pool.release_request()
                return UPSTREAM_TIMEOUT
            limit = remaining if limit is None else min(limit, remaining)
        cluster.balancer.request_started(endpoint.key)
        return Attempt(endpoint, key, limit)

    def answered(
        self,
        attempt: Attempt,
        status: int,
        headers: Sequence[tuple[str, str]],
        now: float,
    ) -> Deliver | RetryAfter:
        """The attempt got a response head (`status`, `headers`): deliver it, or retry after
        a backoff. A delivered response holds the attempt's counters until `finished`."""
        Clusters.record(self.cluster, attempt.endpoint.key, status, now)
        grpc = grpc_status(headers)
        decision = self._decide(status, grpc)
        if decision is None:
            retry = self.forward.retry
            if retry is not None and self.attempt > 1 and retry.retries(status, grpc_status=grpc):
                return DELIVER_RETRY_LIMIT
            return DELIVER
        if isinstance(decision, Overflow):
            return DELIVER
        return decision

    def failed(
        self, attempt: Attempt, error: AttemptError, detail: str, now: float
    ) -> Respond | RetryAfter:
        """The attempt ended without a response head: answer, or retry after a backoff."""
        self._release(attempt)
        failure, origin = _ERROR_OUTCOMES[error]
        Clusters.record(self.cluster, attempt.endpoint.key, origin, now)
        decision = self._decide(failure, None)
        if isinstance(decision, RetryAfter):
            return decision
        if error is AttemptError.CONNECT:
            return connect_failure_respond(detail)
        if error is AttemptError.TIMEOUT:
            return UPSTREAM_TIMEOUT
        return UPSTREAM_RESET

    def overflowed(self, attempt: Attempt, overflow: Overflow) -> Respond:
        """A connection limit refused the attempt: answer with the overflow, no retry."""
        self._release(attempt)
        return overflow_respond(overflow)

    def finished(self, attempt: Attempt) -> None:
        """A delivered or dropped response was read to its end or abandoned."""
        self._release(attempt)

    def _release(self, attempt: Attempt) -> None:
        self.cluster.pool.release_request()
        self.cluster.balancer.request_finished(attempt.endpoint.key)

    def _decide(
        self, outcome: int | Failure, grpc_status: int | None
    ) -> RetryAfter | Overflow | None:
        """RetryAfter, the retry budget's Overflow (no retry), or None (not retriable)."""
        retry = self.forward.retry
        if (
            retry is None
            or not self.replayable
            or not retry.should_retry(self.attempt, outcome, grpc_status=grpc_status)
        ):
            return None
        budget = self.cluster.pool.try_acquire_retry()
        if isinstance(budget, Overflow):
            return budget
        self._backing_off = True
        return RetryAfter(retry.backoff(self.attempt, self._rng))


# ------------------------------------------------------------------ the pipeline


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
                then = abort or _Routed(choice, action, request, head, down, span, replayable)
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
