"""The delta ADS protocol as the control plane speaks it, without I/O.

`build_resources` turns a `ConfigSnapshot` into versioned xDS resources: `istio.workload.Address`
named by workload uid or `namespace/hostname`, `istio.security.Authorization` named
`namespace/name`, each with a version that is a digest of its bytes, so an unchanged resource
keeps its version across rebuilds and is never resent.

`DeltaStream` is one client's stream. Per type it holds the subscription (wildcard and/or
names) and what the client holds (`known`: name -> version, seeded from
`initial_resource_versions` on a reconnect). Every request and every new snapshot yields the
responses to send: the resources in the client's view whose version differs from what it holds,
and the removals. The rules:

- The first request of a type is always answered, even with nothing, so the client knows it is
  in sync. Later, a response is produced only when the client's view changed.
- An empty first subscription, or `*`, is a wildcard (all resources of the type).
- ACK: a request carrying the nonce of a response and no `error_detail`. NACK: the same with an
  `error_detail`; it is reported (`Nack`) and the resources stay marked as sent, so they are
  not sent again until they change.
- Responses may be in flight together; each gets a fresh nonce.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message

from ztagent.model.localconfig import ConfigSnapshot
from ztagent.xds import convert
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads

ADDRESS_TYPE = convert.ADDRESS_TYPE
AUTHORIZATION_TYPE = convert.AUTHORIZATION_TYPE
TYPES = (ADDRESS_TYPE, AUTHORIZATION_TYPE)
WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class VersionedResource:
    name: str
    version: str
    body: AnyMessage


Resources = Mapping[str, Mapping[str, VersionedResource]]
"""type URL -> resource name -> resource."""


def _versioned(name: str, message: Message, type_url: str) -> VersionedResource:
    data = message.SerializeToString(deterministic=True)
    version = hashlib.blake2b(data, digest_size=8).hexdigest()
    return VersionedResource(name, version, AnyMessage(type_url=type_url, value=data))


def build_resources(
    snapshot: ConfigSnapshot, previous: Resources | None = None
) -> dict[str, dict[str, VersionedResource]]:
    """The snapshot as xDS resources; unchanged values reuse `previous`'s objects."""
    addresses: dict[str, VersionedResource] = {}
    for workload in snapshot.workloads:
        message = convert.address_of_workload(workload)
        addresses[workload.uid] = _versioned(workload.uid, message, ADDRESS_TYPE)
    for service in snapshot.services:
        message = convert.address_of_service(service)
        addresses[service.key] = _versioned(service.key, message, ADDRESS_TYPE)
    policies = {
        p.key: _versioned(p.key, convert.authorization_to_proto(p), AUTHORIZATION_TYPE)
        for p in snapshot.policies
    }
    built = {ADDRESS_TYPE: addresses, AUTHORIZATION_TYPE: policies}
    if previous:
        for type_url, table in built.items():
            old = previous.get(type_url, {})
            for name, resource in table.items():
                kept = old.get(name)
                if kept is not None and kept.version == resource.version:
                    table[name] = kept
    return built


@dataclass(frozen=True, slots=True)
class Ack:
    type_url: str
    nonce: str


@dataclass(frozen=True, slots=True)
class Nack:
    type_url: str
    nonce: str
    message: str
    names: tuple[str, ...]
    """The resources of the NACKed response (they are not resent until they change)."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """A request for a type this server does not serve; answered with nothing."""

    type_url: str


Event = Ack | Nack | Unknown


@dataclass(slots=True)
class _TypeState:
    started: bool = False
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)

    def in_view(self, name: str) -> bool:
        return self.wildcard or name in self.names


class DeltaStream:
    """One client's delta ADS stream (sans-IO)."""

    def __init__(self, peer: str = "") -> None:
        self.peer = peer
        self.node_id = ""
        self._types: dict[str, _TypeState] = {}
        self._nonce = 0
        self._pending: dict[str, tuple[str, tuple[str, ...]]] = {}
        """nonce -> (type URL, resource names sent) for responses not yet ACKed/NACKed."""
        self.acks = 0
        self.nacks = 0

    def known(self, type_url: str) -> dict[str, str]:
        """What the client holds of `type_url` (as far as this side knows), name -> version."""
        state = self._types.get(type_url)
        return dict(state.known) if state else {}

    def receive(
        self, request: ads.DeltaDiscoveryRequest, resources: Resources
    ) -> tuple[list[ads.DeltaDiscoveryResponse], list[Event]]:
        """Apply one request; returns the responses to send and what happened."""
        if request.HasField("node") and request.node.id:
            self.node_id = request.node.id
        type_url = request.type_url
        events: list[Event] = []
        if type_url not in TYPES:
            return [], [Unknown(type_url)]
        if request.response_nonce:
            sent = self._pending.pop(request.response_nonce, None)
            names = sent[1] if sent else ()
            if request.HasField("error_detail") and (
                request.error_detail.code or request.error_detail.message
            ):
                self.nacks += 1
                message = request.error_detail.message
                events.append(Nack(type_url, request.response_nonce, message, names))
            else:
                self.acks += 1
                events.append(Ack(type_url, request.response_nonce))

        state = self._types.setdefault(type_url, _TypeState())
        first = not state.started
        subscribe = list(request.resource_names_subscribe)
        if first:
            state.started = True
            state.wildcard = not subscribe or WILDCARD in subscribe
            state.known.update(request.initial_resource_versions)
        elif WILDCARD in subscribe:
            state.wildcard = True
        state.names.update(n for n in subscribe if n != WILDCARD)
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                state.wildcard = False
            else:
                state.names.discard(name)
                state.known.pop(name, None)

        response = self._diff(type_url, state, resources.get(type_url, {}), always=first)
        return ([response] if response is not None else []), events

    def push(self, resources: Resources) -> list[ads.DeltaDiscoveryResponse]:
        """The responses a new snapshot calls for (none when this client's view is unchanged)."""
        responses = []
        for type_url, state in self._types.items():
            if state.started:
                response = self._diff(type_url, state, resources.get(type_url, {}), always=False)
                if response is not None:
                    responses.append(response)
        return responses

    def _diff(
        self,
        type_url: str,
        state: _TypeState,
        table: Mapping[str, VersionedResource],
        *,
        always: bool,
    ) -> ads.DeltaDiscoveryResponse | None:
        names: Iterable[str] = table if state.wildcard else (n for n in state.names if n in table)
        changed = [table[n] for n in names if state.known.get(n) != table[n].version]
        removed = [n for n in state.known if n not in table or not state.in_view(n)]
        if not changed and not removed and not always:
            return None
        for resource in changed:
            state.known[resource.name] = resource.version
        for name in removed:
            del state.known[name]
        self._nonce += 1
        nonce = f"{self._nonce:x}"
        self._pending[nonce] = (type_url, tuple(r.name for r in changed))
        if len(self._pending) > 64:  # a client that never ACKs must not grow this forever
            self._pending.pop(next(iter(self._pending)))
        return ads.DeltaDiscoveryResponse(
            type_url=type_url,
            nonce=nonce,
            resources=[
                ads.Resource(name=r.name, version=r.version, resource=r.body)
                for r in sorted(changed, key=lambda r: r.name)
            ],
            removed_resources=sorted(removed),
        )
