"""The node agent's clients of an istiod-compatible control plane: workload xDS and the CA.

`DeltaClient` is the delta ADS protocol without I/O: it holds the resources received per type
(name -> version and decoded value), builds the requests of a (re)connect (wildcard, with
`initial_resource_versions` of what it holds), and turns each response into an ACK or a NACK.
A resource that does not decode or fails the checks of `ztagent.xds.convert` is NACKed with
its name, field and reason, and its last good version stays in use; the other resources of the
response apply. `synced` turns true once every type has had a response: readiness waits for it.
The types are chosen by the caller: a node agent takes Istio's Address and Authorization
(the default); a waypoint adds `L7_TYPE`, the Kubernetes objects of its L7 configuration,
decoded to the JSON dicts the control plane read (`l7_objects`).

`XdsClient` runs that over gRPC with TLS (the server verified against the root cert), with the
bearer token and `clusterid` headers ztunnel sends; it reconnects with exponential backoff
(10 ms doubling to 15 s, reset once a response arrives) and keeps serving the last config while
disconnected. `on_update` gets the workload snapshot, `on_l7` all L7 objects, each after a
response that changed them (and once at the first response). `CaClient` asks
`CreateCertificate` for a workload's certificate, naming the workload in `ImpersonatedIdentity`
as ztunnel does.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.struct_pb2 import Struct

from ztagent.errors import LocalError
from ztagent.identity.certs import WorkloadCertificate
from ztagent.identity.keys import create_csr, generate_key, key_to_pem
from ztagent.identity.spiffe import Identity
from ztagent.model.fields import Invalid
from ztagent.model.policy import Authorization
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.workload import Service, Workload
from ztagent.xds import convert
from ztagent.xds.gen.envoy.config.core.v3 import base_pb2
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2_grpc as ads_grpc
from ztagent.xds.gen.istio.security import authorization_pb2 as security_pb
from ztagent.xds.gen.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ztagent.xds.gen.istio.workload import workload_pb2 as workload_pb
from ztagent.xds.gen.ztagent.waypoint.v1 import l7_pb2 as l7_pb

log = logging.getLogger(__name__)

TYPES = (convert.ADDRESS_TYPE, convert.AUTHORIZATION_TYPE)
"""What a node agent subscribes to."""
L7_TYPE = convert.L7_TYPE
WORKLOAD_TYPES = frozenset(TYPES)
INITIAL_BACKOFF = 0.01
MAX_BACKOFF = 15.0
INVALID_ARGUMENT = 3
DEFAULT_ROOT_CA = "/var/run/secrets/istio/root-cert.pem"
DEFAULT_TOKEN_PATH = "/var/run/secrets/tokens/istio-token"

Decoded = Workload | Service | Authorization | dict[str, Any]


def _decode(type_url: str, resource: ads.Resource) -> Decoded:
    body = resource.resource
    if body.type_url != type_url:
        raise Invalid("resource", f"type {body.type_url!r} in a {type_url} response")
    decoded: Decoded
    if type_url == convert.ADDRESS_TYPE:
        address = convert.address_from_proto(workload_pb.Address.FromString(body.value))
        decoded, key = address, address.uid if isinstance(address, Workload) else address.key
    elif type_url == L7_TYPE:
        message = l7_pb.L7Resource.FromString(body.value)
        decoded = convert.l7_from_proto(message)
        key = convert.l7_name(message.kind, message.namespace, message.name)
    else:
        policy = convert.authorization_from_proto(security_pb.Authorization.FromString(body.value))
        decoded, key = policy, policy.key
    if key != resource.name:
        raise Invalid("name", f"resource {resource.name!r} holds {key!r}")
    return decoded


@dataclass(slots=True)
class _Held:
    resources: dict[str, tuple[str, Decoded]] = field(default_factory=dict)
    answered: bool = False


class DeltaClient:
    """The client side of delta ADS for Istio's workload types and our L7 type (sans-IO)."""

    def __init__(self, node: base_pb2.Node, types: Iterable[str] = TYPES) -> None:
        self.node = node
        self._held = {t: _Held() for t in dict.fromkeys(types)}
        unknown = set(self._held) - WORKLOAD_TYPES - {L7_TYPE}
        if unknown:
            raise LocalError(f"xDS types this client cannot decode: {', '.join(sorted(unknown))}")
        self.acks = 0
        self.nacks = 0

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self._held)

    def answered(self, type_url: str) -> bool:
        """Whether `type_url` had its first response."""
        held = self._held.get(type_url)
        return held is not None and held.answered

    def l7_objects(self) -> list[dict[str, Any]]:
        """Every L7 object held, in resource-name order."""
        held = self._held.get(L7_TYPE)
        if held is None:
            return []
        return [
            value for _, (_, value) in sorted(held.resources.items()) if isinstance(value, dict)
        ]

    @property
    def synced(self) -> bool:
        return all(h.answered for h in self._held.values())

    def versions(self, type_url: str) -> dict[str, str]:
        return {name: v for name, (v, _) in self._held[type_url].resources.items()}

    def connect_requests(self) -> list[ads.DeltaDiscoveryRequest]:
        """The first requests of a stream: a wildcard subscription per type."""
        requests = []
        for i, type_url in enumerate(self._held):
            request = ads.DeltaDiscoveryRequest(
                type_url=type_url,
                resource_names_subscribe=["*"],
                initial_resource_versions=self.versions(type_url),
            )
            if i == 0:
                request.node.CopyFrom(self.node)
            requests.append(request)
        return requests

    def receive(
        self, response: ads.DeltaDiscoveryResponse
    ) -> tuple[ads.DeltaDiscoveryRequest, bool]:
        """Apply a response; returns the ACK or NACK to send and whether anything changed."""
        type_url = response.type_url
        reply = ads.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)
        held = self._held.get(type_url)
        if held is None:
            self.nacks += 1
            reply.error_detail.code = INVALID_ARGUMENT
            reply.error_detail.message = f"type {type_url} was not subscribed"
            return reply, False
        held.answered = True
        changed = False
        problems: list[str] = []
        for resource in response.resources:
            try:
                decoded = _decode(type_url, resource)
            except Invalid as exc:
                problems.append(f"{resource.name}: {exc.path}: {exc.reason}")
                continue
            except DecodeError as exc:
                problems.append(f"{resource.name}: not a valid message: {exc}")
                continue
            previous = held.resources.get(resource.name)
            held.resources[resource.name] = (resource.version, decoded)
            changed = changed or previous is None or previous[1] != decoded
        for name in response.removed_resources:
            if held.resources.pop(name, None) is not None:
                changed = True
        if problems:
            self.nacks += 1
            reply.error_detail.code = INVALID_ARGUMENT
            reply.error_detail.message = "; ".join(problems)[:4000]
        else:
            self.acks += 1
        return reply, changed

    def snapshot(self) -> ConfigSnapshot:
        workloads: list[Workload] = []
        services: list[Service] = []
        policies: list[Authorization] = []
        for held in self._held.values():
            for _, value in held.resources.values():
                if isinstance(value, Workload):
                    workloads.append(value)
                elif isinstance(value, Service):
                    services.append(value)
                elif isinstance(value, Authorization):
                    policies.append(value)
        return ConfigSnapshot(
            workloads=tuple(sorted(workloads, key=lambda w: w.uid)),
            services=tuple(sorted(services, key=lambda s: s.key)),
            policies=tuple(sorted(policies, key=lambda p: p.key)),
        )


def node_identity(
    *, instance_ip: str, pod_name: str, pod_namespace: str, node_name: str, cluster_id: str
) -> base_pb2.Node:
    """ztunnel's node: id `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` and its metadata."""
    node = base_pb2.Node(
        id=f"ztunnel~{instance_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local"
    )
    node.metadata.update(
        {
            "NAME": pod_name,
            "NAMESPACE": pod_namespace,
            "INSTANCE_IPS": instance_ip,
            "NODE_NAME": node_name,
            "CLUSTER_ID": cluster_id,
        }
    )
    return node


def parse_address(text: str, flag: str) -> str:
    """`https://host:port` or `host:port` -> the gRPC target `host:port`."""
    target = text.strip()
    for scheme in ("https://", "grpcs://"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
    if target.startswith("http://"):
        raise LocalError(f"{flag}: plaintext ({text}) is not allowed; use https://")
    target = target.rstrip("/")
    host, colon, port = target.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise LocalError(f"{flag}: expected https://HOST:PORT or HOST:PORT, got {text!r}")
    return target


@dataclass(frozen=True, slots=True)
class ControlPlaneConnection:
    """How to reach and authenticate to the control plane (shared by xDS and the CA)."""

    target: str
    root_ca: Path
    token_path: Path
    cluster_id: str

    def channel(self) -> grpc.aio.Channel:
        try:
            roots = self.root_ca.read_bytes()
        except OSError as exc:
            raise LocalError(
                f"cannot read the control plane's root cert {self.root_ca}: {exc}"
            ) from None
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.aio.secure_channel(
            self.target,
            credentials,
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        try:
            token = self.token_path.read_text().strip()
        except OSError as exc:
            raise LocalError(f"cannot read the token {self.token_path}: {exc}") from None
        return (("authorization", f"Bearer {token}"), ("clusterid", self.cluster_id))


class XdsClient:
    """Keeps a delta ADS stream to the control plane and reports each applied config."""

    def __init__(
        self,
        connection: ControlPlaneConnection,
        node: base_pb2.Node,
        on_update: Callable[[ConfigSnapshot], None],
        *,
        types: Iterable[str] = TYPES,
        on_l7: Callable[[list[dict[str, Any]]], None] | None = None,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.connection = connection
        self.core = DeltaClient(node, types)
        self.on_update = on_update
        self.on_l7 = on_l7
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._rng = rng
        self.connected = False
        self.last_error: str | None = None
        self.synced = asyncio.Event()
        """Set once every subscribed type had its first response."""
        self._workloads_reported = False

    async def run(self) -> None:
        backoff = self.initial_backoff
        while True:
            got_response = False
            try:
                async for _ in self._stream():
                    got_response = True
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
            except LocalError as exc:
                self.last_error = str(exc)
            except Exception as exc:  # never let one bad stream stop the client
                log.exception("xDS stream failed")
                self.last_error = repr(exc)
            else:
                self.last_error = "the server closed the stream"
            self.connected = False
            if got_response:
                backoff = self.initial_backoff
            delay = backoff * (0.5 + self._rng() / 2)
            log.warning(
                "xDS %s: %s; keeping the last config, reconnecting in %.2fs",
                self.connection.target,
                self.last_error,
                delay,
            )
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, self.max_backoff)

    async def _stream(self) -> AsyncIterator[ads.DeltaDiscoveryResponse]:
        async with self.connection.channel() as channel:
            stub = ads_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.DeltaAggregatedResources(metadata=self.connection.metadata())
            for request in self.core.connect_requests():
                await call.write(request)
            while True:
                message = await call.read()
                if message is grpc.aio.EOF or not isinstance(message, ads.DeltaDiscoveryResponse):
                    return
                response = message
                if not self.connected:
                    self.connected = True
                    log.info("xDS connected to %s", self.connection.target)
                first = not self.core.answered(response.type_url)
                reply, changed = self.core.receive(response)
                if reply.HasField("error_detail"):
                    log.error("xDS NACK of %s: %s", response.type_url, reply.error_detail.message)
                self._report(response.type_url, changed, first)
                if self.core.synced:
                    self.synced.set()
                await call.write(reply)
                yield response

    def _report(self, type_url: str, changed: bool, first: bool) -> None:
        """Hand the applied config to the callbacks: the workload snapshot after a change to
        a workload type (and at the first sync), the L7 objects after a change to them (and
        at their first response)."""
        if type_url == L7_TYPE:
            if (changed or first) and self.on_l7 is not None:
                self.on_l7(self.core.l7_objects())
            return
        if type_url not in WORKLOAD_TYPES:
            return
        workload_synced = all(self.core.answered(t) for t in self.core.types if t in WORKLOAD_TYPES)
        if changed or (workload_synced and not self._workloads_reported):
            self._workloads_reported = workload_synced or self._workloads_reported
            self.on_update(self.core.snapshot())


class CaClient:
    """Fetches workload certificates from an istiod-compatible CA."""

    def __init__(
        self, connection: ControlPlaneConnection, ttl: timedelta, *, timeout: float = 10.0
    ) -> None:
        self.connection = connection
        self.ttl = ttl
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        key = generate_key()
        metadata = Struct()
        metadata.update({"ImpersonatedIdentity": identity.uri})
        request = ca_pb2.IstioCertificateRequest(
            csr=create_csr(identity, key).decode(),
            validity_duration=int(self.ttl.total_seconds()),
            metadata=metadata,
        )
        if self._channel is None:
            self._channel = self.connection.channel()
        stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
        try:
            response = await stub.CreateCertificate(
                request, metadata=self.connection.metadata(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise LocalError(
                f"CA {self.connection.target} refused {identity}: "
                f"{exc.code().name}: {exc.details()}"
            ) from None
        chain = [pem.encode() for pem in response.cert_chain]
        if len(chain) < 2:
            raise LocalError(f"CA {self.connection.target} sent a chain without a root")
        return WorkloadCertificate.from_pem(chain[:-1], key_to_pem(key), chain[-1])

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


__all__ = [
    "L7_TYPE",
    "TYPES",
    "CaClient",
    "ControlPlaneConnection",
    "DeltaClient",
    "XdsClient",
    "node_identity",
    "parse_address",
]
