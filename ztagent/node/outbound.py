"""Outbound decisions of the node agent: pure functions over the workload model, no I/O.

For a connection from a local workload (captured, or asked for through SOCKS5) `decide` says
where it goes (`routing.route_outbound`), whether the destination's policy allows it when the
destination is on this node, which tunnel carries it, and what the metrics and the access log
will say. `NodeAgent` does what it says.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ztagent.hbone.client import Tunnel
from ztagent.hbone.frames import format_authority
from ztagent.istio.authorization.l4 import ConnectionAttributes, Verdict, evaluate
from ztagent.model.store import ProxyState
from ztagent.model.workload import Workload
from ztagent.node.routing import Pick, Route, RouteKind, route_outbound
from ztagent.telemetry.accesslog import ConnectionRecord
from ztagent.telemetry.metrics import ConnectionLabels, ResponseFlags, connection_labels


@dataclass(frozen=True, slots=True)
class Relay:
    """Plain TCP to `address`: passthrough, or a workload on this node (then `inbound` holds
    what its policy allowed, so a policy change can re-check the connection)."""

    address: tuple[str, int]
    labels: ConnectionLabels
    record: ConnectionRecord
    inbound: ConnectionAttributes | None = None
    workload: Workload | None = None
    verdict: Verdict | None = None


@dataclass(frozen=True, slots=True)
class OpenTunnel:
    """HBONE, as `source`'s identity, through `route.via`."""

    source: Workload
    route: Route
    tunnel: Tunnel
    labels: ConnectionLabels
    record: ConnectionRecord


@dataclass(frozen=True, slots=True)
class OutboundRefused:
    """Refuse the connection; report `labels`/`record` when given (a caller that is not a
    local workload is refused without a report)."""

    reason: str
    labels: ConnectionLabels | None = None
    record: ConnectionRecord | None = None
    verdict: Verdict | None = None


OutboundDecision = Relay | OpenTunnel | OutboundRefused


def decide(
    state: ProxyState,
    client: tuple[str, int],
    destination: tuple[str, int],
    *,
    pick: Pick,
    cluster: str,
    deny_unknown: bool = False,
) -> OutboundDecision:
    source = state.local_workload_by_ip(ipaddress.ip_address(client[0]))
    if source is None:
        return OutboundRefused(f"{client[0]} is not a local workload")
    route = route_outbound(state, source, destination, pick=pick, deny_unknown=deny_unknown)
    record = ConnectionRecord(
        src_addr=format_authority(*client),
        dst_addr=format_authority(*route.address),
        direction="outbound",
        src_workload=source.name,
        src_namespace=source.namespace,
        src_identity=str(source.identity),
        dst_service=route.service.hostname if route.service else None,
        dst_workload=route.workload.name if route.workload else None,
        dst_namespace=route.workload.namespace if route.workload else None,
        dst_identity=str(route.workload.identity) if route.workload else None,
    )
    labels = connection_labels(
        "source",
        source,
        source.identity,
        route.workload,
        route.service,
        route.kind is RouteKind.HBONE,
        cluster,
    )
    if route.kind is RouteKind.DENY:
        return OutboundRefused(
            route.reason,
            labels.with_response_flags(ResponseFlags.DENY),
            record.failed(route.reason),
        )
    if route.kind is RouteKind.LOCAL:
        assert route.workload is not None
        attributes = ConnectionAttributes(
            source.identity,
            ipaddress.ip_address(client[0]),
            ipaddress.ip_address(route.address[0]),
            route.address[1],
        )
        verdict = evaluate(attributes, state.policies_for(route.workload))
        if not verdict.allowed:
            return OutboundRefused(
                verdict.reason,
                labels.with_response_flags(ResponseFlags.DENY),
                record.failed(f"RBAC: {verdict.reason}"),
                verdict,
            )
        return Relay(route.address, labels, record, attributes, route.workload, verdict)
    if route.kind is RouteKind.PASSTHROUGH:
        return Relay(route.address, labels, record)
    tunnel = Tunnel(
        via=route.via,
        target=route.address,
        expected_identities=route.expected_identities(),
        source=client,
        host=route.service.hostname if route.service else None,
        baggage=baggage(source, cluster),
    )
    record = record.with_hbone_address(format_authority(*route.via))
    return OpenTunnel(source, route, tunnel, labels, record)


def baggage(workload: Workload, cluster: str) -> dict[str, str]:
    """The `baggage` a tunnel carries about its source (metric labels for the peer, never a
    policy input)."""
    kind = (workload.workload_type or "deployment").lower()
    return {
        "k8s.cluster.name": workload.cluster_id or cluster,
        "k8s.namespace.name": workload.namespace,
        f"k8s.{kind}.name": workload.workload_name or workload.name,
        "service.name": workload.canonical_name or workload.name,
        "service.version": workload.canonical_revision or "latest",
    }
