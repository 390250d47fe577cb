"""The workload model <-> Istio's wire messages (`istio.workload.Address`, L4 `Authorization`),
and Kubernetes objects <-> our `ztagent.waypoint.v1.L7Resource`.

The control plane encodes `Workload`, `Service` and `Authorization` values into the messages
istiod sends ztunnel; the node agent's xDS client decodes them back. Waypoints also receive
their L7 configuration (routes, destination rules, policies, services) as `L7Resource`s: each
carries one whole Kubernetes object as JSON. Decoding reads untrusted input, so every field is
checked and a bad resource raises `Invalid` with the field path (proto field names, then the
object's own fields under `json`), which the client turns into a NACK for that resource while
the others apply. Pure: no I/O.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from ztagent.fields import Invalid, join
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity, InvalidIdentity
from ztagent.model.policy import (
    Action,
    Authorization,
    CidrMatch,
    Clause,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ztagent.model.workload import (
    GatewayAddress,
    IPAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from ztagent.xds.gen.istio.security import authorization_pb2 as security_pb
from ztagent.xds.gen.istio.workload import workload_pb2 as workload_pb
from ztagent.xds.gen.ztagent.waypoint.v1 import l7_pb2 as l7_pb

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"
L7_TYPE = "type.googleapis.com/ztagent.waypoint.v1.L7Resource"

T = TypeVar("T")

_TUNNEL = {
    TunnelProtocol.NONE: workload_pb.NONE,
    TunnelProtocol.HBONE: workload_pb.HBONE,
    TunnelProtocol.LEGACY_ISTIO_MTLS: workload_pb.LEGACY_ISTIO_MTLS,
}
_TUNNEL_BACK: dict[int, TunnelProtocol] = {int(v): k for k, v in _TUNNEL.items()}
_WORKLOAD_TYPES = {
    "deployment": workload_pb.DEPLOYMENT,
    "cronjob": workload_pb.CRONJOB,
    "pod": workload_pb.POD,
    "job": workload_pb.JOB,
}
_WORKLOAD_TYPES_BACK = {v: k for k, v in _WORKLOAD_TYPES.items()}
_SCOPES = {
    Scope.GLOBAL: security_pb.GLOBAL,
    Scope.NAMESPACE: security_pb.NAMESPACE,
    Scope.WORKLOAD_SELECTOR: security_pb.WORKLOAD_SELECTOR,
}
_SCOPES_BACK: dict[int, Scope] = {int(v): k for k, v in _SCOPES.items()}
_ACTIONS = {Action.ALLOW: security_pb.ALLOW, Action.DENY: security_pb.DENY}
_ACTIONS_BACK: dict[int, Action] = {int(v): k for k, v in _ACTIONS.items()}


# --- encoding (control plane) ------------------------------------------------------------------


def _network_address_pb(address: NetworkAddress) -> workload_pb.NetworkAddress:
    return workload_pb.NetworkAddress(network=address.network, address=address.address.packed)


def _gateway_pb(gateway: GatewayAddress) -> workload_pb.GatewayAddress:
    message = workload_pb.GatewayAddress(hbone_mtls_port=gateway.hbone_mtls_port)
    if gateway.hostname is not None:
        message.hostname.namespace = gateway.hostname.namespace
        message.hostname.hostname = gateway.hostname.hostname
    elif gateway.address is not None:
        message.address.CopyFrom(_network_address_pb(gateway.address))
    return message


def _ports_pb(ports: Iterable[tuple[int, int]]) -> list[workload_pb.Port]:
    return [workload_pb.Port(service_port=s, target_port=t) for s, t in sorted(ports)]


def workload_to_proto(workload: Workload) -> workload_pb.Workload:
    message = workload_pb.Workload(
        uid=workload.uid,
        name=workload.name,
        namespace=workload.namespace,
        addresses=[ip.packed for ip in workload.addresses],
        hostname=workload.hostname,
        network=workload.network,
        tunnel_protocol=_TUNNEL[workload.tunnel_protocol],
        trust_domain=workload.trust_domain,
        service_account=workload.service_account,
        node=workload.node,
        canonical_name=workload.canonical_name,
        canonical_revision=workload.canonical_revision,
        workload_type=_WORKLOAD_TYPES.get(workload.workload_type.lower(), workload_pb.DEPLOYMENT),
        workload_name=workload.workload_name,
        authorization_policies=list(workload.authorization_policies),
        status=workload_pb.HEALTHY if workload.healthy else workload_pb.UNHEALTHY,
        cluster_id=workload.cluster_id,
    )
    if workload.waypoint is not None:
        message.waypoint.CopyFrom(_gateway_pb(workload.waypoint))
    if workload.network_gateway is not None:
        message.network_gateway.CopyFrom(_gateway_pb(workload.network_gateway))
    for key, ports in workload.services.items():
        message.services[key].ports.extend(_ports_pb(ports.items()))
    return message


def service_to_proto(service: Service) -> workload_pb.Service:
    message = workload_pb.Service(
        name=service.name,
        namespace=service.namespace,
        hostname=service.hostname,
        addresses=[_network_address_pb(a) for a in service.addresses],
        ports=_ports_pb(service.ports.items()),
        subject_alt_names=list(service.subject_alt_names),
    )
    if service.waypoint is not None:
        message.waypoint.CopyFrom(_gateway_pb(service.waypoint))
    return message


def _string_match_pb(match: StringMatch) -> security_pb.StringMatch:
    message = security_pb.StringMatch()
    if match.kind is StringMatchKind.EXACT:
        message.exact = match.value
    elif match.kind is StringMatchKind.PREFIX:
        message.prefix = match.value
    elif match.kind is StringMatchKind.SUFFIX:
        message.suffix = match.value
    else:
        message.presence.SetInParent()
    return message


def _cidr_pb(cidr: CidrMatch) -> security_pb.Address:
    network = cidr.network
    return security_pb.Address(address=network.network_address.packed, length=network.prefixlen)


def _accounts_pb(accounts: Iterable[ServiceAccountMatch]) -> list[security_pb.ServiceAccountMatch]:
    return [
        security_pb.ServiceAccountMatch(namespace=a.namespace, service_account=a.service_account)
        for a in accounts
    ]


def _match_pb(match: Match) -> security_pb.Match:
    return security_pb.Match(
        namespaces=[_string_match_pb(m) for m in match.namespaces],
        not_namespaces=[_string_match_pb(m) for m in match.not_namespaces],
        principals=[_string_match_pb(m) for m in match.principals],
        not_principals=[_string_match_pb(m) for m in match.not_principals],
        source_ips=[_cidr_pb(c) for c in match.source_ips],
        not_source_ips=[_cidr_pb(c) for c in match.not_source_ips],
        destination_ips=[_cidr_pb(c) for c in match.destination_ips],
        not_destination_ips=[_cidr_pb(c) for c in match.not_destination_ips],
        destination_ports=list(match.destination_ports),
        not_destination_ports=list(match.not_destination_ports),
        service_accounts=_accounts_pb(match.service_accounts),
        not_service_accounts=_accounts_pb(match.not_service_accounts),
    )


def authorization_to_proto(policy: Authorization) -> security_pb.Authorization:
    return security_pb.Authorization(
        name=policy.name,
        namespace=policy.namespace,
        scope=_SCOPES[policy.scope],
        action=_ACTIONS[policy.action],
        dry_run=policy.dry_run,
        rules=[
            security_pb.Rule(
                clauses=[
                    security_pb.Clause(matches=[_match_pb(m) for m in clause.matches])
                    for clause in rule.clauses
                ]
            )
            for rule in policy.rules
        ],
    )


def address_of_workload(workload: Workload) -> workload_pb.Address:
    return workload_pb.Address(workload=workload_to_proto(workload))


def address_of_service(service: Service) -> workload_pb.Address:
    return workload_pb.Address(service=service_to_proto(service))


# --- decoding (node agent) ---------------------------------------------------------------------


def _ip_from_bytes(raw: bytes, path: str) -> IPAddress:
    """A protobuf `bytes` address (4 or 16 bytes), not a text field: `fields.ip` reads those."""
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise Invalid(path, f"an address is 4 or 16 bytes, got {len(raw)}")


def _port_from_pb(value: int, path: str, *, allow_zero: bool = False) -> int:
    """A protobuf `uint32` port (never negative, never a string): only the range is checked."""
    if value > 65535 or (value == 0 and not allow_zero):
        raise Invalid(path, f"port {value} is out of range")
    return value


def _enum(value: int, table: dict[int, T], path: str) -> T:
    if value not in table:
        raise Invalid(path, f"unknown value {value}")
    return table[value]


def _network_address(message: workload_pb.NetworkAddress, path: str) -> NetworkAddress:
    return NetworkAddress(message.network, _ip_from_bytes(message.address, join(path, "address")))


def _gateway(message: workload_pb.GatewayAddress, path: str) -> GatewayAddress:
    port = _port_from_pb(message.hbone_mtls_port, join(path, "hbone_mtls_port"))
    which = message.WhichOneof("destination")
    if which == "hostname":
        name = message.hostname
        if not name.hostname:
            raise Invalid(join(path, "hostname.hostname"), "must not be empty")
        return GatewayAddress(
            hostname=NamespacedHostname(name.namespace, name.hostname), hbone_mtls_port=port
        )
    if which == "address":
        address = _network_address(message.address, join(path, "address"))
        return GatewayAddress(address=address, hbone_mtls_port=port)
    raise Invalid(path, "needs a hostname or an address")


def _port_map(ports: Iterable[workload_pb.Port], path: str) -> dict[int, int]:
    result: dict[int, int] = {}
    for i, port in enumerate(ports):
        at = join(path, i)
        service_port = _port_from_pb(port.service_port, join(at, "service_port"))
        result[service_port] = _port_from_pb(
            port.target_port, join(at, "target_port"), allow_zero=True
        )
    return result


def workload_from_proto(message: workload_pb.Workload) -> Workload:
    """A checked `Workload`; raises `Invalid` naming the proto field that is wrong."""
    if not message.uid:
        raise Invalid("uid", "must not be empty")
    services = {}
    for key, port_list in message.services.items():
        if "/" not in key:
            raise Invalid(join("services", key, quote_odd=True), "key must be namespace/hostname")
        services[key] = _port_map(port_list.ports, join(join("services", key), "ports"))
    workload = Workload(
        uid=message.uid,
        name=message.name,
        namespace=message.namespace,
        addresses=tuple(
            _ip_from_bytes(raw, join("addresses", i)) for i, raw in enumerate(message.addresses)
        ),
        network=message.network,
        tunnel_protocol=_enum(message.tunnel_protocol, _TUNNEL_BACK, "tunnel_protocol"),
        trust_domain=message.trust_domain or DEFAULT_TRUST_DOMAIN,
        service_account=message.service_account or "default",
        waypoint=_gateway(message.waypoint, "waypoint") if message.HasField("waypoint") else None,
        network_gateway=(
            _gateway(message.network_gateway, "network_gateway")
            if message.HasField("network_gateway")
            else None
        ),
        node=message.node,
        canonical_name=message.canonical_name,
        canonical_revision=message.canonical_revision,
        workload_type=_WORKLOAD_TYPES_BACK.get(message.workload_type, ""),
        workload_name=message.workload_name,
        authorization_policies=tuple(message.authorization_policies),
        status=WorkloadStatus.HEALTHY
        if message.status == workload_pb.HEALTHY
        else WorkloadStatus.UNHEALTHY,
        cluster_id=message.cluster_id,
        hostname=message.hostname,
        services=services,
    )
    try:
        Identity(workload.trust_domain, workload.namespace, workload.service_account)
    except InvalidIdentity as exc:
        raise Invalid("service_account", str(exc)) from None
    return workload


def service_from_proto(message: workload_pb.Service) -> Service:
    """A checked `Service`; raises `Invalid` naming the proto field that is wrong."""
    if not message.hostname:
        raise Invalid("hostname", "must not be empty")
    return Service(
        name=message.name,
        namespace=message.namespace,
        hostname=message.hostname,
        addresses=tuple(
            _network_address(a, join("addresses", i)) for i, a in enumerate(message.addresses)
        ),
        ports=_port_map(message.ports, "ports"),
        subject_alt_names=tuple(message.subject_alt_names),
        waypoint=_gateway(message.waypoint, "waypoint") if message.HasField("waypoint") else None,
    )


def address_from_proto(message: workload_pb.Address) -> Workload | Service:
    which = message.WhichOneof("type")
    if which == "workload":
        return workload_from_proto(message.workload)
    if which == "service":
        return service_from_proto(message.service)
    raise Invalid("type", "needs a workload or a service")


def _string_match(message: security_pb.StringMatch, path: str) -> StringMatch:
    which = message.WhichOneof("match_type")
    if which == "exact":
        return StringMatch.exact(message.exact)
    if which == "prefix":
        return StringMatch.prefix(message.prefix)
    if which == "suffix":
        return StringMatch.suffix(message.suffix)
    if which == "presence":
        return StringMatch.presence()
    raise Invalid(path, "needs exact, prefix, suffix or presence")


def _cidr_from_pb(message: security_pb.Address, path: str) -> CidrMatch:
    ip = _ip_from_bytes(message.address, join(path, "address"))
    if message.length > ip.max_prefixlen:
        raise Invalid(join(path, "length"), f"prefix length {message.length} is too long")
    return CidrMatch(ipaddress.ip_network((ip, message.length), strict=False))


def _account(message: security_pb.ServiceAccountMatch, path: str) -> ServiceAccountMatch:
    if not message.namespace or not message.service_account:
        raise Invalid(path, "needs a namespace and a service_account")
    return ServiceAccountMatch(message.namespace, message.service_account)


def _match(message: security_pb.Match, path: str) -> Match:
    def strings(name: str) -> tuple[StringMatch, ...]:
        return tuple(
            _string_match(m, join(join(path, name), i))
            for i, m in enumerate(getattr(message, name))
        )

    def cidrs(name: str) -> tuple[CidrMatch, ...]:
        return tuple(
            _cidr_from_pb(m, join(join(path, name), i))
            for i, m in enumerate(getattr(message, name))
        )

    def accounts(name: str) -> tuple[ServiceAccountMatch, ...]:
        return tuple(
            _account(m, join(join(path, name), i)) for i, m in enumerate(getattr(message, name))
        )

    def ports(name: str) -> tuple[int, ...]:
        return tuple(
            _port_from_pb(p, join(join(path, name), i))
            for i, p in enumerate(getattr(message, name))
        )

    return Match(
        namespaces=strings("namespaces"),
        not_namespaces=strings("not_namespaces"),
        principals=strings("principals"),
        not_principals=strings("not_principals"),
        source_ips=cidrs("source_ips"),
        not_source_ips=cidrs("not_source_ips"),
        destination_ips=cidrs("destination_ips"),
        not_destination_ips=cidrs("not_destination_ips"),
        destination_ports=ports("destination_ports"),
        not_destination_ports=ports("not_destination_ports"),
        service_accounts=accounts("service_accounts"),
        not_service_accounts=accounts("not_service_accounts"),
    )


def authorization_from_proto(message: security_pb.Authorization) -> Authorization:
    """A checked `Authorization`; raises `Invalid` naming the proto field that is wrong."""
    if not message.name:
        raise Invalid("name", "must not be empty")
    rules = []
    for r, rule in enumerate(message.rules):
        clauses = []
        for c, clause in enumerate(rule.clauses):
            at = f"rules[{r}].clauses[{c}].matches"
            clauses.append(
                Clause(tuple(_match(m, join(at, i)) for i, m in enumerate(clause.matches)))
            )
        rules.append(Rule(tuple(clauses)))
    return Authorization(
        name=message.name,
        namespace=message.namespace,
        scope=_enum(message.scope, _SCOPES_BACK, "scope"),
        action=_enum(message.action, _ACTIONS_BACK, "action"),
        rules=tuple(rules),
        dry_run=message.dry_run,
    )


# --- L7 resources (Kubernetes objects for waypoints) -------------------------------------------


def l7_name(kind: str, namespace: str, name: str) -> str:
    """The xDS resource name of one object: `<Kind>/<namespace>/<name>`."""
    return f"{kind}/{namespace}/{name}"


def _utc_text(moment: datetime.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    moment = moment.astimezone(datetime.UTC)
    spec = "seconds" if not moment.microsecond else "microseconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _jsonable(value: object) -> Any:
    """`value` with what YAML can hold but JSON cannot made JSON: timestamps as Kubernetes
    writes them (RFC 3339, UTC), binary as base64, other keys and scalars as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, datetime.datetime):
        return _utc_text(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def l7_json(document: Mapping[str, Any]) -> str:
    """The object as compact JSON with sorted keys (the same object gives the same text)."""
    return json.dumps(
        _jsonable(document), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def l7_to_proto(document: Mapping[str, Any]) -> l7_pb.L7Resource:
    """One Kubernetes object (with `apiVersion`, `kind`, `metadata.name`) as an `L7Resource`."""
    metadata = document.get("metadata")
    if not isinstance(metadata, Mapping):
        raise ValueError("the object has no metadata")
    return l7_pb.L7Resource(
        api_version=str(document.get("apiVersion", "")),
        kind=str(document.get("kind", "")),
        namespace=str(metadata.get("namespace") or ""),
        name=str(metadata.get("name", "")),
        json=l7_json(document),
    )


def l7_from_proto(message: l7_pb.L7Resource) -> dict[str, Any]:
    """The checked object; raises `Invalid` naming the field that is wrong."""
    for name in ("api_version", "kind", "name"):
        if not getattr(message, name):
            raise Invalid(name, "must not be empty")
    try:
        document = json.loads(message.json)
    except (ValueError, RecursionError) as exc:
        raise Invalid("json", f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise Invalid("json", "must be a JSON object")
    for key, field_name in (("apiVersion", "api_version"), ("kind", "kind")):
        if document.get(key) != getattr(message, field_name):
            expected = getattr(message, field_name)
            raise Invalid(join("json", key), f"does not match {field_name} {expected!r}")
    metadata = document.get("metadata")
    if not isinstance(metadata, dict):
        raise Invalid("json.metadata", "must be an object")
    if metadata.get("name") != message.name:
        raise Invalid("json.metadata.name", f"does not match name {message.name!r}")
    if (metadata.get("namespace") or "") != message.namespace:
        raise Invalid("json.metadata.namespace", f"does not match namespace {message.namespace!r}")
    return document
