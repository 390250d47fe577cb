"""Where an outbound connection goes: pure decisions over the workload model, no I/O.

Waypoints follow ztunnel: a connection to a Service VIP whose Service has a waypoint, or to a
pod IP whose Workload has one, is tunnelled to an instance of that waypoint with the original
destination as `:authority`; the waypoint picks the endpoint. A source that is itself the
waypoint goes direct (no loop), and a waypoint that cannot be resolved denies the connection:
it is never silently skipped.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ztagent.identity.spiffe import Identity
from ztagent.model.store import ProxyState
from ztagent.model.workload import GatewayAddress, Service, TunnelProtocol, Workload
from ztagent.names import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, SOCKS5_PORT

# The agent's own ports are never a destination (a connection to them would loop).
RESERVED_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT, SOCKS5_PORT})


class RouteKind(enum.Enum):
    HBONE = "hbone"  # tunnel to the destination node's agent
    LOCAL = "local"  # destination on this node: no tunnel, inbound policy applies here
    PASSTHROUGH = "passthrough"  # plain TCP, not in the mesh
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Route:
    """One decision. `address` is the destination as the tunnel names it (`:authority`): the
    chosen endpoint and target port, or through a waypoint the original VIP or pod address.
    `workload` is the destination workload if known (None when a waypoint picks the endpoint
    of a service); `waypoint` the waypoint instance the tunnel goes to."""

    kind: RouteKind
    address: tuple[str, int]
    workload: Workload | None = None
    service: Service | None = None
    reason: str = ""
    waypoint: Workload | None = None
    waypoint_service: Service | None = None
    gateway: tuple[str, int] | None = None  # the waypoint's HBONE address

    @property
    def via(self) -> tuple[str, int]:
        """Where the HBONE connection goes: the waypoint, or the destination's agent."""
        return self.gateway or (self.address[0], HBONE_PORT)

    def expected_identities(self) -> frozenset[Identity]:
        """Who may answer the tunnel: the waypoint (and its service's subject_alt_names) when
        there is one; otherwise the workload, and the service's subject_alt_names."""
        if self.waypoint is not None:
            return _identities(self.waypoint, self.waypoint_service)
        return _identities(self.workload, self.service)


def _identities(workload: Workload | None, service: Service | None) -> frozenset[Identity]:
    found: set[Identity] = set()
    if workload is not None:
        found.add(workload.identity)
    if service is not None:
        for name in service.subject_alt_names:
            identity = Identity.try_parse(name)
            if identity is not None:
                found.add(identity)
    return frozenset(found)


Pick = Callable[[Service, Sequence[Workload]], Workload]


def route_outbound(
    state: ProxyState,
    source: Workload,
    destination: tuple[str, int],
    *,
    pick: Pick,
    deny_unknown: bool = False,
) -> Route:
    ip_text, port = destination
    if port in RESERVED_PORTS:
        return Route(RouteKind.DENY, destination, reason=f"port {port} belongs to the agent")
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        return Route(RouteKind.DENY, destination, reason=f"{ip_text!r} is not an IP address")
    network = source.network
    service = state.service_by_vip(network, ip)
    if service is not None:
        if service.waypoint is not None and not _is_instance(state, source, service.waypoint):
            return _to_waypoint(state, source, service.waypoint, destination, None, service, pick)
        # Addressed to a service: an endpoint's own waypoint is not used (ztunnel does the same).
        healthy = [w for w in state.endpoints(service) if w.healthy]
        candidates = [w for w in healthy if state.target_port(service, w, port)]
        if not candidates:
            return Route(
                RouteKind.DENY,
                destination,
                service=service,
                reason=f"service {service.key} has no healthy endpoint for port {port}",
            )
        endpoint = pick(service, candidates)
        target = state.target_port(service, endpoint, port)
        assert target is not None
        return _to_workload(state, endpoint, target, service)
    workload = state.workload_by_address(network, ip)
    if workload is not None:
        if workload.waypoint is not None and not _is_instance(state, source, workload.waypoint):
            return _to_waypoint(state, source, workload.waypoint, destination, workload, None, pick)
        return _to_workload(state, workload, port, None, ip_text)
    if deny_unknown:
        return Route(RouteKind.DENY, destination, reason="unknown destination")
    return Route(RouteKind.PASSTHROUGH, destination)


def _to_workload(
    state: ProxyState, workload: Workload, port: int, service: Service | None, ip: str = ""
) -> Route:
    address = (ip or str(workload.addresses[0]), port)
    if workload.tunnel_protocol is not TunnelProtocol.HBONE:
        return Route(RouteKind.PASSTHROUGH, address, workload, service)
    local = state.node_name != "" and workload.node == state.node_name
    return Route(RouteKind.LOCAL if local else RouteKind.HBONE, address, workload, service)


def _is_instance(state: ProxyState, source: Workload, gateway: GatewayAddress) -> bool:
    """Whether `source` is the waypoint `gateway` names: its traffic goes on directly."""
    if gateway.address is not None and gateway.address in source.network_addresses:
        return True
    return any(w.uid == source.uid for w in state.waypoint_instances(gateway))


def _to_waypoint(
    state: ProxyState,
    source: Workload,
    gateway: GatewayAddress,
    destination: tuple[str, int],
    workload: Workload | None,
    service: Service | None,
    pick: Pick,
) -> Route:
    """HBONE to an instance of the waypoint, `:authority` the original destination.

    Always a tunnel, also when the waypoint runs on this node: it takes HBONE on its own
    address and is not captured, so the local plain relay cannot reach it."""
    waypoint_service = state.waypoint_service(gateway)
    instances = [w for w in state.waypoint_instances(gateway) if w.healthy and w.addresses]
    if not instances:
        known = waypoint_service is not None or bool(state.waypoint_instances(gateway))
        why = "has no healthy instance" if known else "is unknown"
        return Route(
            RouteKind.DENY,
            destination,
            workload=workload,
            service=service,
            reason=f"waypoint {gateway} {why}",
        )
    if waypoint_service is not None and len(instances) > 1:
        chosen = pick(waypoint_service, instances)
    else:
        chosen = instances[0]
    if gateway.address is not None and gateway.address in chosen.network_addresses:
        ip = str(gateway.address.address)
    else:
        on_network = [a for a in chosen.network_addresses if a.network == source.network]
        ip = str((on_network or list(chosen.network_addresses))[0].address)
    return Route(
        RouteKind.HBONE,
        destination,
        workload=workload,
        service=service,
        waypoint=chosen,
        waypoint_service=waypoint_service,
        gateway=(ip, gateway.hbone_mtls_port),
    )


class RoundRobin:
    """Endpoint choice per service, in turn."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def __call__(self, service: Service, endpoints: Sequence[Workload]) -> Workload:
        index = self._next.get(service.key, 0)
        self._next[service.key] = index + 1
        return endpoints[index % len(endpoints)]
