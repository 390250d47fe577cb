"""`ztagent control`: Istio resources in, workload xDS and certificates out, over gRPC with TLS.

`ControlPlane` owns the configuration: sources publish the current set of resources, a
debounce (100 ms after the last change, at most 1 s after the first) batches bursts, the
translation builds the snapshot, and every connected stream gets only what changed in its own
view. A resource that fails translation keeps its last good version (the error is reported
and served by `/debug/config_dump`), so an edit with a typo never withdraws config. The same
holds for the waypoints' L7 objects (`waypoint_resources`): one the waypoint parsers reject
keeps its last good version, and the `jwksUri: file://` files of RequestAuthentications are
read here, at each configuration change, and served inlined.

`DiscoveryService` (delta ADS) and `CertificateService` (the CA) are thin gRPC adapters on one
TLS port (15012, as istiod); both authenticate the caller's bearer token. The monitoring port
(15014, as istiod) serves `/ready`, `/metrics` and `/debug/config_dump`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ztagent.control.auth import TOKEN_SIGNING_KEY, Authenticator, TokenSigner
from ztagent.control.ca import CaPolicy, CertificateRefused, CertificateService
from ztagent.control.sources import DirectorySource, SourceBatch
from ztagent.control.translate import TranslateOptions, to_local_config, translate_resources
from ztagent.control.xds import build_resources, waypoint_resources
from ztagent.errors import LocalError
from ztagent.http.messages import Request, Response
from ztagent.http.server import HttpServer, Route
from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.spiffe import Identity
from ztagent.istio.envelope import Resource, ResourceError
from ztagent.model.snapshot import ConfigSnapshot, ObjectError
from ztagent.telemetry.metrics import CONTENT_TYPE
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2_grpc as ads_grpc
from ztagent.xds.gen.istio.v1.auth import ca_pb2_grpc
from ztagent.xds.stream import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    L7_TYPE,
    Ack,
    DeltaStream,
    Nack,
    Resources,
    StreamRefused,
    Unknown,
)

log = logging.getLogger(__name__)

DEBOUNCE_AFTER = 0.1
DEBOUNCE_MAX = 1.0
SERVING_CERT_TTL = timedelta(days=90)
MAX_JWKS_BYTES = 1024 * 1024
MAX_QUEUED_BATCHES = 8
"""Batches of responses queued for one stream before its next request is read. One request can
call for the whole of a type (a wildcard subscription), so a client that sends and never reads
would otherwise grow the queue without end. istiod handles a delta stream's requests one at a
time in the loop that sends its responses, so there too a client that does not read is not
read either."""

_TYPE_LABELS = {ADDRESS_TYPE: "address", AUTHORIZATION_TYPE: "authorization", L7_TYPE: "l7"}


def type_label(type_url: str) -> str:
    return _TYPE_LABELS.get(type_url, "other")


def read_jwks_file(path: str) -> bytes:
    """A `jwksUri: file://` file: a regular file of at most `MAX_JWKS_BYTES` (never a pipe or
    a device, which could block or never end)."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer.
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        data = file.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise OSError(f"{path} is larger than {MAX_JWKS_BYTES} bytes")
    return data


class ControlMetrics:
    """istiod's metric names for what this control plane does."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.clients = Gauge("pilot_xds", "Connected xDS clients.", registry=r)
        self.pushes = Counter(
            "pilot_xds_pushes", "xDS responses sent, by type.", ["type"], registry=r
        )
        self.rejects = Counter(
            "pilot_total_xds_rejects", "xDS responses NACKed, by type.", ["type"], registry=r
        )
        self.push_time = Histogram(
            "pilot_xds_push_time",
            "Seconds from a configuration change to its responses being queued.",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.config_errors = Gauge(
            "ztagent_control_config_errors", "Resources rejected by validation.", registry=r
        )
        self.csr = Counter("citadel_server_csr_count", "Certificate requests.", registry=r)
        self.issued = Counter(
            "citadel_server_success_cert_issue_count", "Certificates issued.", registry=r
        )
        self.csr_refused = Counter(
            "citadel_server_csr_refused_count",
            "Certificate requests refused, by gRPC status.",
            ["code"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(eq=False)
class _Attached:
    stream: DeltaStream
    send: Callable[[list[ads.DeltaDiscoveryResponse]], None]
    caller: str
    connected_at: float = field(default_factory=time.time)


def _error_id(error: ObjectError) -> tuple[str, str] | None:
    return (error.kind, error.key) if error.kind and error.key else None


def _resource_key(resource: Resource) -> tuple[str, str]:
    key = f"{resource.namespace}/{resource.name}" if resource.namespace else resource.name
    return (resource.kind, key)


class ControlPlane:
    """Current configuration and the streams it is pushed to (one event loop)."""

    def __init__(
        self,
        options: TranslateOptions,
        metrics: ControlMetrics | None = None,
        *,
        debounce: float = DEBOUNCE_AFTER,
        debounce_max: float = DEBOUNCE_MAX,
    ) -> None:
        self.options = options
        self.metrics = metrics or ControlMetrics()
        self.debounce = debounce
        self.debounce_max = debounce_max
        self.snapshot = ConfigSnapshot()
        self.l7: dict[str, Mapping[str, Any]] = {}
        """The waypoints' objects being served, by resource name."""
        self.resources: Resources = {}
        self.errors: tuple[ObjectError, ...] = ()
        self.notes: tuple[ResourceError, ...] = ()
        self.version = 0
        self.synced = False
        self._batch: SourceBatch | None = None
        self._good: dict[tuple[str, str], Resource] = {}
        self._good_l7: dict[str, Mapping[str, Any]] = {}
        self._streams: set[_Attached] = set()
        self._first_change: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._nodes: dict[str, frozenset[Identity]] = {}

    # --- configuration in ---------------------------------------------------------------

    def publish(self, batch: SourceBatch) -> None:
        """A source's current resources; applied after the debounce (call in the loop)."""
        self._batch = batch
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._first_change is None:
            self._first_change = now
        if self._timer is not None:
            self._timer.cancel()
        delay = min(self.debounce, max(0.0, self._first_change + self.debounce_max - now))
        self._timer = loop.call_later(delay, self._debounced)

    def _debounced(self) -> None:
        self._timer = None
        started = self._first_change
        self._first_change = None
        try:
            self.apply_now()
        except Exception:  # a bug here must not stop later updates
            log.exception("applying configuration failed")
        if started is not None:
            self.metrics.push_time.observe(
                max(0.0, asyncio.get_running_loop().time() - started - self.debounce)
            )

    def apply_now(self) -> None:
        """Translate the latest batch and push the differences (synchronously)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._first_change = None
        batch = self._batch
        if batch is None:
            return
        resources = list(batch.resources)
        result = translate_resources(resources, self.options)
        errors = (*batch.errors, *result.snapshot.errors)
        rejected = {i for e in errors if (i := _error_id(e)) is not None}
        # Keep the last good version of each rejected object that had one.
        substitutes = {i: self._good[i] for i in rejected if i in self._good}
        if substitutes:
            present = {_resource_key(r) for r in resources}
            patched = [substitutes.get(_resource_key(r), r) for r in resources]
            patched += [r for i, r in substitutes.items() if i not in present]
            result = translate_resources(patched, self.options)
            resources = patched
            errors = (*batch.errors, *result.snapshot.errors)
            rejected |= {i for e in result.snapshot.errors if (i := _error_id(e)) is not None}
        self._good = {
            key: r
            for r in resources
            if (key := _resource_key(r)) not in rejected or key in substitutes
        }
        waypoint = waypoint_resources(resources, self.options, read_file=read_jwks_file)
        l7 = dict(waypoint.objects)
        for name, fallback in waypoint.rejected.items():
            good = self._good_l7.get(name, fallback)
            if good is not None:
                l7[name] = good
        self._good_l7 = {
            name: document
            for name, document in l7.items()
            if name not in waypoint.rejected or name in self._good_l7
        }
        errors = (*errors, *waypoint.errors)
        for error in errors:
            if error not in self.errors:
                log.warning("config rejected: %s", error)
        self.errors = tuple(errors)
        self.notes = (*result.notes, *waypoint.notes)
        self.metrics.config_errors.set(len(self.errors))
        self.set_snapshot(result.snapshot, l7)
        self.synced = True

    def set_snapshot(
        self, snapshot: ConfigSnapshot, l7: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        """Serve `snapshot` and the waypoints' `l7` objects (None: keep the current ones)."""
        if l7 is not None:
            self.l7 = dict(l7)
        resources = build_resources(snapshot, self.resources, l7=self.l7.values())
        self.snapshot = snapshot
        self.resources = resources
        self.version += 1
        nodes: dict[str, set[Identity]] = {}
        for workload in snapshot.workloads:
            if workload.node:
                nodes.setdefault(workload.node, set()).add(workload.identity)
        self._nodes = {node: frozenset(ids) for node, ids in nodes.items()}
        pushed = 0
        for attached in list(self._streams):
            responses = attached.stream.push(resources)
            if responses:
                pushed += 1
                self._send(attached, responses)
        log.info(
            "config version %d: %d workloads, %d services, %d policies, %d waypoint objects, "
            "%d errors; pushed to %d of %d clients",
            self.version,
            len(snapshot.workloads),
            len(snapshot.services),
            len(snapshot.policies),
            len(self.l7),
            len(self.errors),
            pushed,
            len(self._streams),
        )

    def identities_on_node(self, node: str) -> Collection[Identity]:
        return self._nodes.get(node, frozenset())

    # --- streams ------------------------------------------------------------------------

    def attach(
        self,
        stream: DeltaStream,
        send: Callable[[list[ads.DeltaDiscoveryResponse]], None],
        caller: str,
    ) -> _Attached:
        attached = _Attached(stream, send, caller)
        self._streams.add(attached)
        self.metrics.clients.set(len(self._streams))
        return attached

    def detach(self, attached: _Attached) -> None:
        self._streams.discard(attached)
        self.metrics.clients.set(len(self._streams))

    def _send(self, attached: _Attached, responses: list[ads.DeltaDiscoveryResponse]) -> None:
        for response in responses:
            self.metrics.pushes.labels(type_label(response.type_url)).inc()
        attached.send(responses)

    def receive(self, attached: _Attached, request: ads.DeltaDiscoveryRequest) -> None:
        stream = attached.stream
        responses, events = stream.receive(request, self.resources)
        for event in events:
            if isinstance(event, Nack):
                self.metrics.rejects.labels(type_label(event.type_url)).inc()
                log.warning(
                    "xDS NACK from %s (node %s) for %s nonce %s: %s; resources: %s",
                    attached.caller,
                    stream.node_id or "-",
                    type_label(event.type_url),
                    event.nonce,
                    event.shown,
                    ", ".join(event.names) or "-",
                )
            elif isinstance(event, Unknown):
                log.info("%s asked for unserved type %s", attached.caller, event.type_url)
            elif isinstance(event, Ack):
                log.debug("xDS ACK from %s nonce %s", attached.caller, event.nonce)
        if responses:
            self._send(attached, responses)

    def dump(self) -> dict[str, Any]:
        data = to_local_config(self.snapshot)
        data["version"] = self.version
        data["errors"] = [str(e) for e in self.errors]
        data["notes"] = [str(n) for n in self.notes]
        data["waypointResources"] = sorted(self.l7)
        data["clients"] = [
            {
                "caller": a.caller,
                "node": a.stream.node_id,
                "connectedAt": a.connected_at,
                "acks": a.stream.acks,
                "nacks": a.stream.nacks,
                "resources": {type_label(t): len(a.stream.known(t)) for t in self.resources},
            }
            for a in sorted(self._streams, key=lambda a: a.connected_at)
        ]
        return data


class DiscoveryService(ads_grpc.AggregatedDiscoveryServiceServicer):
    """Delta ADS over gRPC: one `DeltaStream` per call, fed by the `ControlPlane`. A request
    over one of the stream's caps ends the call with that status (RESOURCE_EXHAUSTED or
    INVALID_ARGUMENT), one that does not decode with INVALID_ARGUMENT; the next request is not
    read while `MAX_QUEUED_BATCHES` batches of responses wait to be sent."""

    def __init__(self, plane: ControlPlane, certificates: CertificateService) -> None:
        self._plane = plane
        self._certificates = certificates

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[ads.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[ads.DeltaDiscoveryRequest, ads.DeltaDiscoveryResponse],
    ) -> AsyncIterator[ads.DeltaDiscoveryResponse]:
        try:
            caller = await self._certificates.authenticate(context.invocation_metadata())
        except CertificateRefused as exc:
            log.warning("xDS refused (%s): %s", context.peer(), exc)
            await context.abort(exc.code, str(exc))
        queue: asyncio.Queue[list[ads.DeltaDiscoveryResponse] | StreamRefused | None] = (
            asyncio.Queue()
        )
        room = asyncio.Event()
        room.set()

        def send(batch: list[ads.DeltaDiscoveryResponse]) -> None:
            queue.put_nowait(batch)
            if queue.qsize() >= MAX_QUEUED_BATCHES:
                room.clear()

        name = f"{caller.identity} ({context.peer()})"
        attached = self._plane.attach(DeltaStream(name), send, name)
        log.info("xDS client connected: %s", name)

        async def read() -> None:
            end: StreamRefused | None = None
            try:
                async for request in request_iterator:
                    self._plane.receive(attached, request)
                    await room.wait()  # a client that does not read is not read either
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            except DecodeError as exc:  # the request deserializer's error, from the iterator
                end = StreamRefused("INVALID_ARGUMENT", f"not a DeltaDiscoveryRequest: {exc}")
            except StreamRefused as exc:
                end = exc
            finally:
                queue.put_nowait(end)

        reader = asyncio.create_task(read(), name=f"xds read {name}")
        try:
            while (batch := await queue.get()) is not None:
                if queue.qsize() < MAX_QUEUED_BATCHES:
                    room.set()
                if isinstance(batch, StreamRefused):
                    log.warning("xDS stream of %s ended: %s", name, batch)
                    await context.abort(grpc.StatusCode[batch.code], batch.details)
                    return
                for response in batch:
                    yield response
        finally:
            reader.cancel()
            self._plane.detach(attached)
            log.info("xDS client disconnected: %s", name)


class CountingCertificateService(CertificateService):
    """The CA service with istiod's citadel counters."""

    def __init__(self, *args: Any, metrics: ControlMetrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics = metrics

    async def sign(self, request: Any, metadata: Any) -> list[str]:
        self._metrics.csr.inc()
        try:
            chain = await super().sign(request, metadata)
        except CertificateRefused as exc:
            self._metrics.csr_refused.labels(exc.code.name).inc()
            raise
        self._metrics.issued.inc()
        return chain


@dataclass(frozen=True, slots=True)
class ControlSettings:
    config_dir: Path | None
    kubernetes: bool
    listen: str
    admin: str
    ca_dir: Path
    trust_domain: str
    cluster_id: str
    root_namespace: str
    domain_suffix: str
    trusted_node_agents: frozenset[str]
    serving_names: tuple[str, ...]
    poll_interval: float = 0.25


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise LocalError(f"{what}: expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class ControlServer:
    """The running control plane: sources, gRPC (xDS + CA) and the monitoring port."""

    def __init__(self, settings: ControlSettings) -> None:
        self.settings = settings
        self.metrics = ControlMetrics()
        self.ca = CertificateAuthority.load_or_create(settings.ca_dir, settings.trust_domain)
        options = TranslateOptions(
            cluster_id=settings.cluster_id,
            trust_domain=settings.trust_domain,
            root_namespace=settings.root_namespace,
            domain_suffix=settings.domain_suffix,
        )
        self.plane = ControlPlane(options, self.metrics)
        self.authenticator: Authenticator = TokenSigner(
            settings.ca_dir / TOKEN_SIGNING_KEY, trust_domain=settings.trust_domain
        )
        self._kube: Any = None
        if settings.kubernetes:
            from ztagent.control import kube

            self._kube = kube.KubernetesSource()
            self.authenticator = kube.TokenReviewAuthenticator(
                trust_domain=settings.trust_domain, pod_node=self._kube.pod_node
            )
        policy = CaPolicy(settings.cluster_id, settings.trusted_node_agents)
        self.certificates = CountingCertificateService(
            self.ca,
            self.authenticator,
            policy,
            self.plane.identities_on_node,
            metrics=self.metrics,
        )
        self._grpc: grpc.aio.Server | None = None
        self._admin: HttpServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0

    def admin_routes(self) -> dict[str, Route]:
        def ready(req: Request) -> Response:
            if self.plane.synced:
                return Response.text("ready\n")
            return Response.text("not ready: configuration not read yet\n", 503)

        def metrics(req: Request) -> Response:
            return Response(200, (("content-type", CONTENT_TYPE),), self.metrics.render())

        def dump(req: Request) -> Response:
            return Response.json(self.plane.dump())

        return {
            "/ready": ready,
            "/metrics": metrics,
            "/stats/prometheus": metrics,
            "/debug/config_dump": dump,
        }

    async def start(self) -> None:
        s = self.settings
        host, port = _split_host_port(s.listen, "--listen")
        names = list(s.serving_names) or ["localhost"]
        if host not in ("0.0.0.0", "::") and host not in names:
            names.append(host)
        chain, key = self.ca.issue_serving(names, SERVING_CERT_TTL)
        credentials = grpc.ssl_server_credentials([(key, b"".join(chain))])
        server = grpc.aio.server(
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ]
        )
        ads_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            DiscoveryService(self.plane, self.certificates), server
        )
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(self.certificates, server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = server.add_secure_port(address, credentials)
        if not self.port:
            raise LocalError(f"--listen: cannot listen on {s.listen}")
        await server.start()
        self._grpc = server
        log.info("serving xDS and CA on %s:%d (TLS, names %s)", host, self.port, ", ".join(names))
        admin_host, admin_port = _split_host_port(s.admin, "--admin")
        self._admin = HttpServer(self.admin_routes(), name="monitoring")
        await self._admin.start(admin_host, admin_port)
        if self._kube is not None:
            self._tasks.append(asyncio.create_task(self._kube.run(self.plane.publish)))
        elif s.config_dir is not None:
            self._tasks.append(asyncio.create_task(self._watch(DirectorySource(s.config_dir))))

    async def _watch(self, source: DirectorySource) -> None:
        source.poll()
        self.plane.publish(source.batch)
        self.plane.apply_now()  # serve the first read at once, without the debounce
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            if source.poll():
                self.plane.publish(source.batch)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._grpc is not None:
            await self._grpc.stop(grace=1)
        if self._admin is not None:
            await self._admin.close()

    async def run_forever(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await self.stop()
