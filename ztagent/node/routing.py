"""Where an outbound connection goes: pure decisions over the workload model, no I/O."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ztagent.identity.spiffe import Identity
from ztagent.model.store import ProxyState
from ztagent.model.workload import Service, TunnelProtocol, Workload

# The agent's own ports are never a destination (a connection to them would loop).
RESERVED_PORTS = frozenset({15001, 15006, 15008, 15080})
HBONE_PORT = 15008


class RouteKind(enum.Enum):
    HBONE = "hbone"  # tunnel to the destination node's agent
    LOCAL = "local"  # destination on this node: no tunnel, inbound policy applies here
    PASSTHROUGH = "passthrough"  # plain TCP, not in the mesh
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    address: tuple[str, int]  # where the bytes go (endpoint IP and target port)
    workload: Workload | None = None
    service: Service | None = None
    reason: str = ""

    @property
    def hbone_address(self) -> tuple[str, int]:
        return (self.address[0], HBONE_PORT)

    def expected_identities(self) -> frozenset[Identity]:
        """Who may answer the tunnel: the workload, and the service's subject_alt_names."""
        found: set[Identity] = set()
        if self.workload is not None:
            found.add(self.workload.identity)
        if self.service is not None:
            for name in self.service.subject_alt_names:
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


class RoundRobin:
    """Endpoint choice per service, in turn."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def __call__(self, service: Service, endpoints: Sequence[Workload]) -> Workload:
        index = self._next.get(service.key, 0)
        self._next[service.key] = index + 1
        return endpoints[index % len(endpoints)]
