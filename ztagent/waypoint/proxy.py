"""The waypoint proxy: HBONE in, HTTP policy and routing, HBONE out to the chosen endpoint.

Per tunnel (a CONNECT from a node agent, `:authority` = the service VIP:port or pod IP:port the
client dialed): the first bytes decide HTTP/1.1, HTTP/2 (prior knowledge, gRPC included) or
plain TCP, which is relayed to an endpoint without L7 processing, as Istio's waypoint does.

Per HTTP request, in Envoy's filter order: request id and trace context; RequestAuthentication
(an invalid token -> 401, no token -> anonymous); AuthorizationPolicy (denied -> 403 `RBAC:
access denied`); route selection (VirtualService or HTTPRoute; none -> the service itself);
fault injection; the weighted destination; DestinationRule policy (load balancer, connection
pool, outlier detection) over the destination's endpoints; the upstream request through a
pooled connection with retries, per-try and route timeouts; response header edits; metrics
(reporter="waypoint") and a span.

Request bodies stream. A body is replayed on retry only when its length is known and at most
`REPLAY_LIMIT` bytes (it is read whole first); a longer or unbounded body is sent once, as
Envoy does past its retry buffer. Mirrored requests copy replayable bodies only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ztagent.hbone.client import HboneClient, Tunnel, TunnelFailed, TunnelRefused
from ztagent.hbone.connection import TcpLeg
from ztagent.hbone.frames import format_authority
from ztagent.hbone.server import Deny, InboundRequest, Serve
from ztagent.identity.spiffe import Identity
from ztagent.model.store import ProxyState
from ztagent.model.workload import HBONE_MTLS_PORT, Service, Workload
from ztagent.telemetry.metrics import peer_labels
from ztagent.telemetry.requests import RequestLabels, RequestMetrics
from ztagent.telemetry.tracing import OtlpExporter, ensure_request_id, start_span
from ztagent.waypoint import authz, jwt
from ztagent.waypoint.balancer import Balancer, HashInput, new_balancer
from ztagent.waypoint.config import WaypointConfig
from ztagent.waypoint.destination import (
    DEFAULT_POLICY,
    ConnectionPool,
    EffectivePolicy,
    Overflow,
    rule_for_host,
)
from ztagent.waypoint.http import (
    Body,
    BodyError,
    RequestHead,
    ResponseHead,
    UpstreamError,
    detect_protocol,
    serve_http1,
    serve_http2,
)
from ztagent.waypoint.outlier import LocalOrigin, OutlierDetector
from ztagent.waypoint.pipe import leg_streams
from ztagent.waypoint.resilience import Failure, RetryPolicy
from ztagent.waypoint.routes import (
    DirectResponse,
    Forward,
    Headers,
    Redirect,
    Request,
    RouteTable,
    ServiceRef,
    SourceInfo,
)
from ztagent.waypoint.upstream import (
    UpstreamConnectError,
    UpstreamKey,
    UpstreamOverflow,
    Upstreams,
)

log = logging.getLogger(__name__)

REPLAY_LIMIT = 64 * 1024
DETECT_TIMEOUT = 1.0
LABEL_CACHE_SIZE = 4096

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


@dataclass(frozen=True, slots=True)
class Downstream:
    """One tunnel into the waypoint: who sent it and where the client was going."""

    peer_identity: Identity
    client_ip: str
    """The original client's IP (the CONNECT's `forwarded: for=`, else the peer's)."""
    target: tuple[str, int]
    """The CONNECT `:authority`: service VIP:port or workload IP:port."""
    service: Service | None
    workload: Workload | None
    source: Workload | None


@dataclass
class Reply:
    """A response produced by the waypoint or received from upstream, with what telemetry needs."""

    head: ResponseHead
    body: Body
    flags: str = NO_FLAGS
    endpoint: Workload | None = None
    service: Service | None = None
    done: Callable[[bool], None] | None = None


@dataclass
class Cluster:
    """One destination (service host, subset, port) and its DestinationRule state, as Envoy
    builds a cluster: balancer, connection pool counters, outlier detector."""

    service: Service
    subset_labels: Mapping[str, str]
    port: int
    policy: EffectivePolicy
    http2: bool
    balancer: Balancer[_Endpoint]
    pool: ConnectionPool
    outlier: OutlierDetector | None
    known: frozenset[str] = frozenset()
    endpoints_version: int = -1
    endpoints: list[_Endpoint] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    workload: Workload
    labels: Mapping[str, str] = field(hash=False)

    @property
    def key(self) -> str:
        return self.workload.uid


def _protocol_is_http2(protocol: str, downstream_http2: bool) -> bool:
    if protocol in ("http2", "grpc", "grpc-web"):
        return True
    if protocol == "http":
        return False
    return downstream_http2


def _grpc_status(head: ResponseHead, trailers: Sequence[tuple[str, str]] = ()) -> int | None:
    for name, value in (*head.headers, *trailers):
        if name == "grpc-status":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def _local_reply(
    status: int,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    flags: str = NO_FLAGS,
    *,
    content_type: str = "text/plain",
) -> Reply:
    out = [*headers]
    if body and not any(k == "content-type" for k, _ in out):
        out.append(("content-type", content_type))
    out.append(("content-length", str(len(body))))
    return Reply(ResponseHead(status, out), Body.of(body), flags)


def _grpc_local_reply(grpc_status: int, message: str, flags: str) -> Reply:
    headers = [
        ("content-type", GRPC_CONTENT_TYPE),
        ("grpc-status", str(grpc_status)),
        ("grpc-message", message),
    ]
    return Reply(ResponseHead(200, headers), Body.empty(), flags)


class Waypoint:
    """The L7 engine of one waypoint instance; `decide` is its HBONE server's hook."""

    def __init__(
        self,
        *,
        gateway: tuple[str, str],
        identity: Identity,
        state: ProxyState,
        client_for: Callable[[], Awaitable[HboneClient]],
        metrics: RequestMetrics,
        exporter: OtlpExporter | None = None,
        cluster_id: str = "Kubernetes",
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.identity = identity
        self.state = state
        self.config = WaypointConfig.empty()
        self.metrics = metrics
        self.exporter = exporter
        self.cluster_id = cluster_id
        self.rng = rng or random.Random()
        self.clock = clock
        self._client_for = client_for
        self.upstreams = Upstreams(self._connect_upstream)
        self._tables: dict[tuple[str, int], RouteTable] = {}
        self._clusters: dict[tuple[str, str, int, bool], Cluster] = {}
        self._policy_cache: dict[
            str, tuple[jwt.Authenticator | None, list[authz.WaypointPolicy]]
        ] = {}
        # Connection pool counters of pod-addressed traffic (no DestinationRule), per workload.
        self._direct_pools: dict[str, ConnectionPool] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._label_cache: dict[tuple[Any, ...], RequestLabels] = {}
        self.requests = 0
        self.tunnels = 0

    # ------------------------------------------------------------------ config

    def set_config(self, config: WaypointConfig) -> None:
        self.config = config
        self._tables.clear()
        self._clusters.clear()
        self._policy_cache.clear()
        for error in config.errors:
            log.warning("L7 config: %s", error)

    # ------------------------------------------------------------------ tunnels

    def decide(self, request: InboundRequest) -> Serve | Deny:
        ip_text = request.target[0]
        try:
            ip = ipaddress.ip_address(ip_text)
        except ValueError:
            return Deny(400, f"{ip_text!r} is not an IP address")
        service = self.state.service_by_vip("", ip)
        workload = None
        if service is None:
            workload = self.state.workload_by_address("", ip)
            if workload is None:
                return Deny(404, f"no service or workload at {request.authority}")
        client_ip = request.forwarded_client_ip() or request.peer_address[0]
        source = self.state.workload_by_address("", ipaddress.ip_address(client_ip))
        downstream = Downstream(
            request.peer_identity, client_ip, request.target, service, workload, source
        )
        return Serve(lambda leg: self._serve_leg(leg, downstream))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("waypoint task failed", exc_info=task.exception())

    def _serve_leg(self, leg: TcpLeg, downstream: Downstream) -> None:
        reader, writer = leg_streams(leg, asyncio.get_running_loop())
        self.tunnels += 1
        self._spawn(self._serve_tunnel(reader, writer, downstream))

    async def _serve_tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, down: Downstream
    ) -> None:
        data = b""
        kind = "more"
        try:
            while kind == "more":
                try:
                    chunk = await asyncio.wait_for(reader.read(8192), DETECT_TIMEOUT)
                except TimeoutError:
                    kind = "tcp"  # the client waits for the server: not HTTP
                    break
                if not chunk:
                    kind = "tcp" if data else "empty"
                    break
                data += chunk
                kind = detect_protocol(data)

            async def handler(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
                return await self.handle(head, body, down)

            if kind == "http1":
                await serve_http1(reader, writer, handler, early=data)
            elif kind == "http2":
                await serve_http2(reader, writer, handler, early=data)
            elif kind == "tcp":
                await self._relay_tcp(reader, writer, data, down)
        except (ConnectionError, BodyError) as exc:
            log.debug("tunnel from %s ended: %s", down.peer_identity, exc)
        finally:
            writer.close()

    # ------------------------------------------------------------------ requests

    async def handle(
        self, head: RequestHead, body: Body, down: Downstream
    ) -> tuple[ResponseHead, Body]:
        started = self.clock()
        self.requests += 1
        headers, request_id = ensure_request_id(list(head.headers))
        span = start_span(
            headers,
            name=f"{down.service.hostname if down.service else down.target[0]}:{down.target[1]}/*",
            kind="SERVER",
            rng=self.rng,
            now_ns=time.time_ns(),
        )
        grpc = any(k == "content-type" and v.startswith(GRPC_CONTENT_TYPE) for k, v in headers)
        try:
            reply = await self._process(head, headers, body, down, span)
        except Exception:
            log.exception("request %s %s failed", head.method, head.path)
            reply = _local_reply(500, b"internal error", flags=NO_FLAGS)
        if not any(k == "x-request-id" for k, _ in reply.head.headers):
            reply.head.headers.append(("x-request-id", request_id))
        length = reply.body.length
        if not reply.body.ended and length is not None and length <= REPLAY_LIMIT:
            reply = await _read_small(reply)
        if reply.body.ended:
            # Complete already (a local reply, a trailers-only gRPC answer): pass it on as
            # is, so the client gets it in one piece (HEADERS with END_STREAM for gRPC).
            if reply.done is not None:
                reply.done(True)
            self._record_request(
                reply, reply.body.buffered, head, body, down, grpc, started, span, request_id
            )
            return reply.head, reply.body
        out = Body(reply.body.length)
        self._spawn(self._finish(reply, out, head, body, down, grpc, started, span, request_id))
        return reply.head, out

    async def _finish(
        self,
        reply: Reply,
        out: Body,
        head: RequestHead,
        request_body: Body,
        down: Downstream,
        grpc: bool,
        started: float,
        span: Any,
        request_id: str,
    ) -> None:
        """Stream the response body to the client, then record the request."""
        sent = 0
        ok = False
        try:
            while chunk := await reply.body.read():
                sent += len(chunk)
                await out.feed(chunk)
            out.end(list(reply.body.trailers or []) or None)
            ok = True
        except BodyError as exc:
            out.fail(exc)
        except asyncio.CancelledError:
            out.fail(BodyError("cancelled"))
            raise
        finally:
            if reply.done is not None:
                reply.done(ok)
        self._record_request(reply, sent, head, request_body, down, grpc, started, span, request_id)

    def _record_request(
        self,
        reply: Reply,
        sent: int,
        head: RequestHead,
        request_body: Body,
        down: Downstream,
        grpc: bool,
        started: float,
        span: Any,
        request_id: str,
    ) -> None:
        status = reply.head.status
        grpc_status = _grpc_status(reply.head, reply.body.trailers or ())
        labels = self._labels(down, reply, grpc, status, grpc_status)
        duration = self.clock() - started
        self.metrics.record(labels, duration, request_body.bytes_read, sent)
        span.end(
            time.time_ns(),
            status,
            {
                "http.method": head.method,
                "http.url": f"http://{head.authority}{head.path}",
                "http.status_code": str(status),
                "response_flags": reply.flags,
                "request_size": str(request_body.bytes_read),
                "response_size": str(sent),
                "guid:x-request-id": request_id,
                "upstream_cluster": reply.service.hostname if reply.service else "",
                "istio.namespace": self.gateway[0],
            },
        )
        if self.exporter is not None:
            self.exporter.submit(span)
        if not log.isEnabledFor(logging.DEBUG):
            return
        log.debug(
            "%s %s%s %s %d %s %.1fms -> %s",
            head.method,
            head.authority,
            head.path,
            head.protocol,
            status,
            reply.flags,
            duration * 1000,
            reply.endpoint.name if reply.endpoint else "-",
        )

    def _labels(
        self,
        down: Downstream,
        reply: Reply,
        grpc: bool,
        status: int,
        grpc_status: int | None,
    ) -> RequestLabels:
        service = reply.service or down.service
        key = (
            down.source.uid if down.source else str(down.peer_identity),
            reply.endpoint.uid if reply.endpoint else "",
            service.key if service else "",
            grpc,
            status,
            grpc_status,
            reply.flags,
        )
        cached = self._label_cache.get(key)
        if cached is not None:
            return cached
        if len(self._label_cache) >= LABEL_CACHE_SIZE:
            self._label_cache.clear()
        values: dict[str, str] = {"reporter": "waypoint"}
        values.update(peer_labels("source", down.source, down.peer_identity, self.cluster_id))
        endpoint = reply.endpoint
        identity = endpoint.identity if endpoint else None
        values.update(peer_labels("destination", endpoint, identity, self.cluster_id))
        if service is not None:
            values["destination_service"] = service.hostname
            values["destination_service_name"] = service.name
            values["destination_service_namespace"] = service.namespace
        values["request_protocol"] = "grpc" if grpc else "http"
        values["response_code"] = str(status)
        values["grpc_response_status"] = "" if grpc_status is None else str(grpc_status)
        values["response_flags"] = reply.flags
        values["connection_security_policy"] = "mutual_tls"
        labels = self._label_cache[key] = RequestLabels(**values)
        return labels

    async def _process(
        self,
        head: RequestHead,
        headers: list[tuple[str, str]],
        body: Body,
        down: Downstream,
        span: Any,
    ) -> Reply:
        service = down.service
        port = down.target[1]
        path = head.path
        authenticator, policies = self._policies(service)
        auth: authz.RequestAuth | None = None
        if authenticator is not None:
            result = authenticator.authenticate(
                headers, path, now=time.time(), host=head.authority, scheme=head.scheme
            )
            if not result.allowed:
                assert result.status is not None
                return _local_reply(
                    result.status,
                    result.body.encode(),
                    result.response_headers,
                    FLAG_JWT,
                )
            auth = result.auth
            edits = result.edits
            if edits.remove:
                gone = set(edits.remove)
                headers = [(k, v) for k, v in headers if k not in gone]
            headers.extend(edits.add)
            if edits.path is not None:
                path = edits.path
        if policies:
            decision = authz.evaluate(
                policies,
                authz.RequestContext(
                    method=head.method,
                    path=path,
                    host=head.authority,
                    destination_port=port,
                    headers=authz.Headers.of(headers),
                    source_identity=down.peer_identity,
                    source_ip=_ip(down.client_ip),
                    destination_ip=_ip(down.target[0]),
                    auth=auth,
                ),
            )
            if not decision.allowed:
                log.info("%s %s denied: %s", head.method, path, decision.reason)
                return _local_reply(403, decision.body, flags=FLAG_RBAC)
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
            # Pod-addressed: no routes apply; the workload itself is the destination.
            assert down.workload is not None
            return await self._to_workload(request, headers, body, down, span)
        choice = self._table(service, port).select(request)
        action = choice.action
        if isinstance(action, DirectResponse):
            flags = NO_FLAGS if choice.matched else FLAG_NO_ROUTE
            return _local_reply(action.status, action.body, flags=flags)
        if isinstance(action, Redirect):
            return _local_reply(action.status, b"", [("location", choice.location(request))])
        assert isinstance(action, Forward)
        route = choice.route
        flags = NO_FLAGS
        if route.fault is not None:
            fault = route.fault.decide(self.rng)
            if fault.delay:
                await asyncio.sleep(fault.delay)
                flags = FLAG_FAULT_DELAY
            if fault.aborts:
                if fault.grpc_status is not None:
                    return _grpc_local_reply(
                        fault.grpc_status, "fault filter abort", FLAG_FAULT_ABORT
                    )
                assert fault.abort_status is not None
                return _local_reply(
                    fault.abort_status, b"fault filter abort", flags=FLAG_FAULT_ABORT
                )
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
        replay = await _replayable(body)
        for mirror in route.mirrors:
            if replay is not None and mirror.should_mirror(self.rng):
                self._spawn(
                    self._mirror(
                        mirror.destination.host,
                        mirror.destination.port_for(request),
                        mirror.destination.subset,
                        upstream,
                        replay,
                        head.protocol == "HTTP/2",
                    )
                )
        cluster = self._cluster(
            destination.host,
            destination.subset,
            destination.port_for(request),
            head.protocol == "HTTP/2",
        )
        if cluster is None:
            return _local_reply(503, b"no healthy upstream", flags=FLAG_NO_HEALTHY)
        reply = await self._forward(
            cluster, upstream, body, replay, route.retry, route.timeout, request, down
        )
        if reply.flags == NO_FLAGS and flags != NO_FLAGS:
            reply.flags = flags
        edited = choice.response_headers(Headers.of(reply.head.headers), destination)
        reply.head = ResponseHead(reply.head.status, list(edited))
        return reply

    async def _to_workload(
        self,
        request: Request,
        headers: list[tuple[str, str]],
        body: Body,
        down: Downstream,
        span: Any,
    ) -> Reply:
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
        try:
            head, response, done = await self.upstreams.request(key, pool, upstream, body)
        except (UpstreamConnectError, UpstreamError) as exc:
            return _local_reply(503, f"upstream connect error: {exc}".encode(), flags=FLAG_CONNECT)
        return Reply(head, response, NO_FLAGS, workload, None, done)

    def _policies(
        self, service: Service | None
    ) -> tuple[jwt.Authenticator | None, list[authz.WaypointPolicy]]:
        """The RequestAuthentications (ready to check tokens) and AuthorizationPolicies that
        apply to requests for `service` through this waypoint."""
        key = service.key if service else ""
        found = self._policy_cache.get(key)
        if found is None:
            target = ("Service", service.namespace, service.name) if service else None
            config = self.config
            authn = authz.policies_for(config.authentication.policies, self.gateway, target)
            policies = authz.policies_for(config.authorization.policies, self.gateway, target)
            found = (jwt.Authenticator(authn) if authn else None, policies)
            self._policy_cache[key] = found
        return found

    def _table(self, service: Service, port: int) -> RouteTable:
        key = (service.key, port)
        table = self._tables.get(key)
        if table is None:
            ref = ServiceRef(service.name, service.namespace, service.hostname)
            table = self._tables[key] = self.config.routes.table(ref, port)
        return table

    def _cluster(self, host: str, subset: str, port: int, downstream_http2: bool) -> Cluster | None:
        key = (host, subset, port, downstream_http2)
        cluster = self._clusters.get(key)
        if cluster is not None:
            return cluster
        service = self.state.service_by_hostname(host)
        if service is None:
            return None
        rule = rule_for_host(self.config.destination_rules.rules, host)
        labels: Mapping[str, str] = {}
        policy = DEFAULT_POLICY
        if rule is not None:
            try:
                policy = rule.policy(subset or None, port)
            except KeyError:
                return None
            found = rule.subset(subset) if subset else None
            labels = found.labels if found is not None else {}
        elif subset:
            return None
        protocol = self.config.protocol(host, port)
        outlier = None
        if policy.outlier_detection is not None:
            outlier = OutlierDetector(policy.outlier_detection, self.clock())
        cluster = self._clusters[key] = Cluster(
            service=service,
            subset_labels=labels,
            port=port,
            policy=policy,
            http2=_protocol_is_http2(protocol, downstream_http2),
            balancer=new_balancer(policy.load_balancer, self.rng),
            pool=ConnectionPool(policy.connection_pool),
            outlier=outlier,
        )
        return cluster

    def _endpoints(self, cluster: Cluster) -> list[_Endpoint]:
        if cluster.endpoints_version != self.state.version:
            cluster.endpoints = self._subset_endpoints(cluster)
            cluster.endpoints_version = self.state.version
        found = cluster.endpoints
        outlier = cluster.outlier
        if outlier is not None:
            keys = frozenset(e.key for e in found)
            if keys != cluster.known:
                outlier.update_endpoints(keys)
                cluster.known = keys
            outlier.sweep(self.clock())
            return outlier.usable(found)
        return found

    def _subset_endpoints(self, cluster: Cluster) -> list[_Endpoint]:
        service = self.state.service(cluster.service.key) or cluster.service
        found: list[_Endpoint] = []
        for workload in self.state.endpoints(service):
            if (
                not workload.healthy
                or self.state.target_port(service, workload, cluster.port) is None
            ):
                continue
            labels = self.config.labels_for(workload)
            if all(labels.get(k) == v for k, v in cluster.subset_labels.items()):
                found.append(_Endpoint(workload, labels))
        return found

    def _pick(self, cluster: Cluster, request: Request, tried: set[str]) -> _Endpoint | None:
        endpoints = self._endpoints(cluster)
        fresh = [e for e in endpoints if e.key not in tried] or endpoints
        key = None
        lb = cluster.policy.load_balancer
        if lb.consistent_hash is not None:
            key = lb.consistent_hash.key_for(
                HashInput(
                    headers={k: v for k, v in request.headers},
                    source_ip=request.source.address,
                )
            )
        return cluster.balancer.pick(fresh, key)

    async def _forward(
        self,
        cluster: Cluster,
        head: RequestHead,
        body: Body,
        replay: bytes | None,
        retry: RetryPolicy | None,
        timeout: float | None,
        request: Request,
        down: Downstream,
    ) -> Reply:
        loop = asyncio.get_running_loop()
        deadline = None if not timeout else loop.time() + timeout
        attempt = 1
        tried: set[str] = set()
        last: Reply | None = None
        while True:
            endpoint = self._pick(cluster, request, tried)
            if endpoint is None:
                return _local_reply(503, b"no healthy upstream", flags=FLAG_NO_HEALTHY)
            tried.add(endpoint.key)
            admission = cluster.pool.try_acquire_request()
            if isinstance(admission, Overflow):
                return _overflow(admission)
            workload = endpoint.workload
            key = self._upstream_key(cluster, workload, down.client_ip)
            assert key is not None  # endpoints are only those with a target port
            per_try = retry.per_try_timeout if retry is not None else None
            limit = per_try
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    cluster.pool.release_request()
                    return _local_reply(504, b"upstream request timeout", flags=FLAG_TIMEOUT)
                limit = remaining if limit is None else min(limit, remaining)
            attempt_body = Body.of(replay) if replay is not None else body
            cluster.balancer.request_started(endpoint.key)
            outcome: int | Failure
            reply: Reply | None = None
            grpc_status: int | None = None
            try:
                async with asyncio.timeout(limit):
                    response, response_body, done = await self.upstreams.request(
                        key, cluster.pool, head, attempt_body
                    )
                outcome = response.status
                grpc_status = _grpc_status(response)
                release = _releaser(cluster, endpoint.key, done)
                reply = Reply(response, response_body, NO_FLAGS, workload, cluster.service, release)
                self._record(cluster, endpoint.key, response.status)
            except UpstreamOverflow as exc:
                cluster.pool.release_request()
                cluster.balancer.request_finished(endpoint.key)
                return _overflow(exc.overflow)
            except UpstreamConnectError as exc:
                cluster.pool.release_request()
                cluster.balancer.request_finished(endpoint.key)
                outcome = Failure.CONNECT_FAILURE
                self._record(cluster, endpoint.key, LocalOrigin.CONNECT_FAILED)
                last = _local_reply(
                    503,
                    f"upstream connect error or disconnect/reset before headers. reset reason: "
                    f"connection failure, {exc}".encode(),
                    flags=FLAG_CONNECT,
                )
            except UpstreamError as exc:
                cluster.pool.release_request()
                cluster.balancer.request_finished(endpoint.key)
                outcome = Failure.RESET if exc.reset else Failure.CONNECT_FAILURE
                self._record(cluster, endpoint.key, LocalOrigin.RESET)
                last = _local_reply(
                    503,
                    b"upstream connect error or disconnect/reset before headers. "
                    b"reset reason: connection termination",
                    flags=FLAG_RESET,
                )
            except TimeoutError:
                cluster.pool.release_request()
                cluster.balancer.request_finished(endpoint.key)
                outcome = Failure.TIMEOUT
                self._record(cluster, endpoint.key, LocalOrigin.TIMEOUT)
                last = _local_reply(504, b"upstream request timeout", flags=FLAG_TIMEOUT)
            if reply is not None:
                last = reply
            can_retry = (
                retry is not None
                and replay is not None
                and retry.should_retry(attempt, outcome, grpc_status=grpc_status)
            )
            if not can_retry:
                assert last is not None
                if (
                    retry is not None
                    and attempt > 1
                    and retry.retries(outcome, grpc_status=grpc_status)
                ):
                    last.flags = FLAG_RETRY_LIMIT if last.flags == NO_FLAGS else last.flags
                return last
            assert retry is not None
            budget = cluster.pool.try_acquire_retry()
            if isinstance(budget, Overflow):
                assert last is not None
                return last
            if reply is not None:
                self._spawn(_discard(reply))
            await asyncio.sleep(retry.backoff(attempt, self.rng))
            cluster.pool.release_retry()
            attempt += 1

    def _upstream_key(
        self, cluster: Cluster, workload: Workload, source_ip: str = ""
    ) -> UpstreamKey | None:
        """Where a request to `workload` in `cluster` goes (None: no such port on it)."""
        target = self.state.target_port(cluster.service, workload, cluster.port)
        if target is None:
            return None
        ip = str(workload.addresses[0])
        return UpstreamKey(ip, target, cluster.http2, str(workload.identity), source_ip)

    def _record(self, cluster: Cluster, key: str, result: int | LocalOrigin) -> None:
        """An endpoint's response status, or a failure seen locally, for outlier detection."""
        outlier = cluster.outlier
        if outlier is None:
            return
        if isinstance(result, LocalOrigin):
            ejection = outlier.record_local(key, result, self.clock())
        else:
            ejection = outlier.record_status(key, result, self.clock())
        if ejection is not None:
            log.info(
                "outlier detection ejected %s for %.1fs (%s)",
                key,
                ejection.duration,
                ejection.cause.value,
            )

    async def _mirror(
        self, host: str, port: int, subset: str, head: RequestHead, body: bytes, http2: bool
    ) -> None:
        """Send a copy; the response is read and dropped (shadow host gets `-shadow`)."""
        cluster = self._cluster(host, subset, port, http2)
        if cluster is None:
            return
        request = Request(method=head.method, path=head.path, authority=head.authority)
        endpoint = self._pick(cluster, request, set())
        if endpoint is None:
            return
        key = self._upstream_key(cluster, endpoint.workload)
        if key is None:
            return
        host_name, _, host_port = head.authority.partition(":")
        shadow = RequestHead(
            head.method,
            f"{host_name}-shadow" + (f":{host_port}" if host_port else ""),
            head.path,
            list(head.headers),
            head.scheme,
            head.protocol,
        )
        admission = cluster.pool.try_acquire_request()
        if isinstance(admission, Overflow):
            return
        try:
            _, response, done = await self.upstreams.request(
                key, cluster.pool, shadow, Body.of(body)
            )
            ok = True
            try:
                while await response.read():
                    pass
            except BodyError:
                ok = False
            done(ok)
        except (UpstreamError, UpstreamConnectError, UpstreamOverflow, OSError) as exc:
            log.debug("mirror to %s failed: %s", host, exc)
        finally:
            cluster.pool.release_request()

    # ------------------------------------------------------------------ upstream tunnels

    async def _connect_upstream(
        self, key: UpstreamKey
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        leg = TcpLeg()
        reader, writer = leg_streams(leg, asyncio.get_running_loop())
        tunnel = Tunnel(
            via=(key.ip, HBONE_MTLS_PORT),
            target=(key.ip, key.port),
            expected_identities=frozenset({Identity.parse(key.identity)}),
            source=(key.source_ip, 0) if key.source_ip else None,
        )
        client = await self._client_for()
        try:
            await client.open(leg, tunnel)
        except (TunnelFailed, TunnelRefused) as exc:
            writer.close()
            raise UpstreamConnectError(str(exc)) from None
        return reader, writer

    async def _relay_tcp(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        early: bytes,
        down: Downstream,
    ) -> None:
        """Not HTTP: relay the bytes to an endpoint of the service (or the workload)."""
        endpoint: Workload | None = down.workload
        port = down.target[1]
        if down.service is not None:
            cluster = self._cluster(down.service.hostname, "", port, False)
            endpoint = None
            if cluster is not None:
                picked = self._pick(
                    cluster, Request("", "/", source=SourceInfo(address=down.client_ip)), set()
                )
                if picked is not None:
                    endpoint = picked.workload
                    port = self.state.target_port(down.service, endpoint, port) or port
        if endpoint is None:
            log.info("TCP from %s to %s: no endpoint", down.peer_identity, down.target)
            return
        key = UpstreamKey(
            str(endpoint.addresses[0]), port, False, str(endpoint.identity), down.client_ip
        )
        try:
            up_reader, up_writer = await self._connect_upstream(key)
        except UpstreamConnectError as exc:
            log.info("TCP to %s failed: %s", format_authority(key.ip, key.port), exc)
            return
        if early:
            up_writer.write(early)
        await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        up_writer.close()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.upstreams.close()
        for task in list(self._tasks):
            task.cancel()


async def _replayable(body: Body) -> bytes | None:
    """The whole body when its length is known and small (so a retry can resend it)."""
    if body.length is None or body.length > REPLAY_LIMIT:
        return None
    parts = []
    while chunk := await body.read():
        parts.append(chunk)
    return b"".join(parts)


async def _read_small(reply: Reply) -> Reply:
    """A small response of known length, read whole: its bytes are arriving anyway, and the
    client then gets head and body in one write, without a task to stream it."""
    parts: list[bytes] = []
    try:
        while chunk := await reply.body.read():
            parts.append(chunk)
    except BodyError:
        if reply.done is not None:
            reply.done(False)
        return _local_reply(503, b"upstream reset before the response body ended", flags=FLAG_RESET)
    body = Body.of(b"".join(parts))
    body.trailers = list(reply.body.trailers)
    reply.body = body
    return reply


async def _discard(reply: Reply) -> None:
    ok = True
    try:
        while await reply.body.read():
            pass
    except BodyError:
        ok = False
    if reply.done is not None:
        reply.done(ok)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


def _releaser(cluster: Cluster, key: str, done: Callable[[bool], None]) -> Callable[[bool], None]:
    def release(ok: bool) -> None:
        cluster.pool.release_request()
        cluster.balancer.request_finished(key)
        done(ok)

    return release


def _overflow(overflow: Overflow) -> Reply:
    return _local_reply(
        overflow.status,
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
        [("x-envoy-overloaded", "true")],
        flags=FLAG_OVERFLOW,
    )


def _with_propagation(
    headers: list[tuple[str, str]], span: Any, down: Downstream
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
