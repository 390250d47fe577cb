"""The client side of delta ADS, without I/O.

`DeltaClient` holds the resources received per type (name -> version and decoded value),
builds the requests of a (re)connect (wildcard, with `initial_resource_versions` of what it
holds), and turns each response into an ACK or a NACK. A resource that does not decode or fails
the checks of `ztagent.xds.convert` is NACKed with its name, field and reason, and its last good
version stays in use; the other resources of the response apply. `synced` turns true once every
type has had a response: readiness waits for it. The types are chosen by the caller: a node
agent takes Istio's Address and Authorization (the default); a waypoint adds `L7_TYPE`, the
Kubernetes objects of its L7 configuration, decoded to the JSON dicts the control plane read
(`l7_objects`).

`ztagent.xds.adsclient` runs it over gRPC.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from ztagent.errors import LocalError
from ztagent.fields import Invalid
from ztagent.model.policy import Authorization
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.workload import Service, Workload
from ztagent.xds import convert
from ztagent.xds.gen.envoy.config.core.v3 import base_pb2
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads
from ztagent.xds.gen.istio.security import authorization_pb2 as security_pb
from ztagent.xds.gen.istio.workload import workload_pb2 as workload_pb
from ztagent.xds.gen.ztagent.waypoint.v1 import l7_pb2 as l7_pb

TYPES = (convert.ADDRESS_TYPE, convert.AUTHORIZATION_TYPE)
"""What a node agent subscribes to."""
L7_TYPE = convert.L7_TYPE
WORKLOAD_TYPES = frozenset(TYPES)
INVALID_ARGUMENT = 3
"""gRPC's status code, in a NACK's `error_detail`."""
MAX_NACK_MESSAGE = 4000
"""Characters of a NACK's reason sent back."""

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
            reply.error_detail.message = "; ".join(problems)[:MAX_NACK_MESSAGE]
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
