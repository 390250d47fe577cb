"""The server side of one delta ADS stream, without I/O.

`DeltaStream` is one client's stream. Per type it holds the subscription (wildcard and/or
names) and what the client holds (`known`: name -> version, seeded from
`initial_resource_versions` on a reconnect). Every request and every new set of resources
yields the responses to send: the resources in the client's view whose version differs from
what it holds, and the removals. The rules:

- The first request of a type is always answered, even with nothing, so the client knows it is
  in sync. Later, a response is produced only when the client's view changed.
- An empty first subscription, or `*`, is a wildcard (all resources of the type).
- ACK: a request carrying the nonce of a response and no `error_detail`. NACK: the same with an
  `error_detail`; it is reported (`Nack`, its message cut to `MAX_SHOWN_NACK` characters) and
  the resources stay marked as sent, so they are not sent again until they change.
- Responses may be in flight together; each gets a fresh nonce.

A client is a hostile peer: what it makes the stream hold is capped. More than
`MAX_SUBSCRIBED_NAMES` names subscribed on one stream, a name longer than `MAX_NAME_LENGTH`
or a node id longer than `MAX_NODE_ID_LENGTH` raises `StreamRefused`, with the gRPC status
to end the stream with. `initial_resource_versions` needs no count cap of its own: the first
response of a type removes every name the server does not have in the client's view, so what
stays held is bounded by the server's own resources.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message

from ztagent.xds import convert
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads

ADDRESS_TYPE = convert.ADDRESS_TYPE
AUTHORIZATION_TYPE = convert.AUTHORIZATION_TYPE
L7_TYPE = convert.L7_TYPE
TYPES = (ADDRESS_TYPE, AUTHORIZATION_TYPE, L7_TYPE)
"""What the control plane serves."""
WILDCARD = "*"

MAX_SUBSCRIBED_NAMES = 4096
"""Names one stream may subscribe to by name, all types together. Node agents and waypoints
subscribe by wildcard; names come from on-demand lookups (ztunnel subscribes to an Address by
name for a destination it does not know), a few per unknown destination. 4096 names of at most
`MAX_NAME_LENGTH` hold at most ~4 MiB per stream, the size of one request under gRPC's default
maximum receive message size (4 MiB, which istiod keeps)."""
MAX_NAME_LENGTH = 1024
"""A resource name's length: Istio's names are built of Kubernetes names (a namespace is at
most 63 characters, a name or DNS hostname at most 253), e.g. `cluster//Pod/namespace/name`
or `namespace/hostname`; 1024 leaves room for all of them."""
MAX_NODE_ID_LENGTH = 1024
"""The node id (`ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`) is built of the same."""
MAX_PENDING = 64
"""Responses remembered for their ACK/NACK; a client that never ACKs must not grow this."""
MAX_SHOWN_NACK = 512
"""Characters of a NACK's `error_detail.message` kept for the log; the message can be as long
as a request (4 MiB)."""


class StreamRefused(Exception):
    """The client broke a rule of the stream; end it with gRPC status `code` (the name of a
    `grpc.StatusCode`) and `details`."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True, slots=True)
class VersionedResource:
    name: str
    version: str
    body: AnyMessage


Resources = Mapping[str, Mapping[str, VersionedResource]]
"""type URL -> resource name -> resource."""


def versioned(name: str, message: Message, type_url: str) -> VersionedResource:
    """`message` as the resource `name`, its version a digest of its bytes (so an unchanged
    resource keeps its version and is never resent)."""
    data = message.SerializeToString(deterministic=True)
    version = hashlib.blake2b(data, digest_size=8).hexdigest()
    return VersionedResource(name, version, AnyMessage(type_url=type_url, value=data))


@dataclass(frozen=True, slots=True)
class Ack:
    type_url: str
    nonce: str


@dataclass(frozen=True, slots=True)
class Nack:
    type_url: str
    nonce: str
    message: str
    """The start of the client's reason (at most `MAX_SHOWN_NACK` characters)."""
    names: tuple[str, ...]
    """The resources of the NACKed response (they are not resent until they change)."""
    length: int = 0
    """The length of the whole reason."""

    @property
    def shown(self) -> str:
        """The reason for a log line: cut, with its length, when it is long."""
        if self.length <= len(self.message):
            return self.message or "(no reason given)"
        return f"{self.message}... ({self.length} characters)"


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


def _check_names(names: Iterable[str]) -> None:
    for name in names:
        if len(name) > MAX_NAME_LENGTH:
            raise StreamRefused(
                "INVALID_ARGUMENT",
                f"resource name of {len(name)} characters (at most {MAX_NAME_LENGTH})",
            )


class DeltaStream:
    """One client's delta ADS stream (sans-IO)."""

    def __init__(self, peer: str = "", *, types: Iterable[str] = TYPES) -> None:
        self.peer = peer
        self.node_id = ""
        self.served = frozenset(types)
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

    def subscribed(self, type_url: str) -> tuple[bool, frozenset[str]]:
        """Whether `type_url` is subscribed by wildcard, and the names subscribed to."""
        state = self._types.get(type_url)
        return (state.wildcard, frozenset(state.names)) if state else (False, frozenset())

    @property
    def subscribed_names(self) -> int:
        """Names subscribed to on this stream, all types together."""
        return sum(len(s.names) for s in self._types.values())

    @property
    def pending(self) -> int:
        """Responses sent and not yet ACKed or NACKed (of the last `MAX_PENDING`)."""
        return len(self._pending)

    def receive(
        self, request: ads.DeltaDiscoveryRequest, resources: Resources
    ) -> tuple[list[ads.DeltaDiscoveryResponse], list[Event]]:
        """Apply one request; returns the responses to send and what happened. Raises
        `StreamRefused` for a request over a cap (the stream then ends; nothing of the request
        is applied)."""
        if request.HasField("node") and request.node.id:
            if len(request.node.id) > MAX_NODE_ID_LENGTH:
                raise StreamRefused(
                    "INVALID_ARGUMENT",
                    f"node id of {len(request.node.id)} characters (at most {MAX_NODE_ID_LENGTH})",
                )
            self.node_id = request.node.id
        type_url = request.type_url
        events: list[Event] = []
        if type_url not in self.served:
            return [], [Unknown(type_url)]
        if request.response_nonce:
            sent = self._pending.pop(request.response_nonce, None)
            names = sent[1] if sent else ()
            if request.HasField("error_detail") and (
                request.error_detail.code or request.error_detail.message
            ):
                self.nacks += 1
                message = request.error_detail.message
                shown = message[:MAX_SHOWN_NACK]
                events.append(Nack(type_url, request.response_nonce, shown, names, len(message)))
            else:
                self.acks += 1
                events.append(Ack(type_url, request.response_nonce))

        state = self._types.get(type_url) or _TypeState()
        subscribe = self._new_names(state, request.resource_names_subscribe)
        self._types[type_url] = state
        first = not state.started
        if first:
            state.started = True
            state.wildcard = not request.resource_names_subscribe or WILDCARD in subscribe
            state.known.update(request.initial_resource_versions)
        elif WILDCARD in subscribe:
            state.wildcard = True
        subscribe.discard(WILDCARD)
        state.names.update(subscribe)
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                state.wildcard = False
            else:
                state.names.discard(name)
                state.known.pop(name, None)

        response = self._diff(type_url, state, resources.get(type_url, {}), always=first)
        return ([response] if response is not None else []), events

    def _new_names(self, state: _TypeState, subscribe: Collection[str]) -> set[str]:
        """The names of a subscribe list, checked against the caps before any is kept."""
        total = self.subscribed_names
        if len(subscribe) > MAX_SUBSCRIBED_NAMES + 1:  # never build a set of a huge list
            raise self._too_many(total + len(subscribe))
        names = set(subscribe)
        _check_names(names)
        added = len(names - state.names - {WILDCARD})
        if total + added > MAX_SUBSCRIBED_NAMES:
            raise self._too_many(total + added)
        return names

    def _too_many(self, count: int) -> StreamRefused:
        return StreamRefused(
            "RESOURCE_EXHAUSTED",
            f"{count} resource names subscribed on one stream (at most {MAX_SUBSCRIBED_NAMES})",
        )

    def push(self, resources: Resources) -> list[ads.DeltaDiscoveryResponse]:
        """The responses a new set of resources calls for (none when this client's view is
        unchanged)."""
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
        if len(self._pending) > MAX_PENDING:
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
