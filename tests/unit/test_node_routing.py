"""`route_outbound`: direct, local, passthrough and deny, and routing through waypoints."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence

import pytest

from ztagent.identity.spiffe import Identity
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.store import ProxyState
from ztagent.model.workload import (
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from ztagent.node.routing import RoundRobin, Route, RouteKind, route_outbound

ip = ipaddress.ip_address

NODE = "node-a"
HBONE = TunnelProtocol.HBONE

WAYPOINT_HOST = "waypoint.prod.svc.cluster.local"
WAYPOINT_KEY = f"prod/{WAYPOINT_HOST}"
BY_NAME = GatewayAddress(hostname=NamespacedHostname("prod", WAYPOINT_HOST))
ECHO_HOST = "echo.prod.svc.cluster.local"
ECHO_KEY = f"prod/{ECHO_HOST}"
ECHO_VIP = "10.96.0.10"


def pod(
    name: str,
    address: str,
    node: str,
    *,
    namespace: str = "prod",
    services: dict[str, dict[int, int]] | None = None,
    waypoint: GatewayAddress | None = None,
    protocol: TunnelProtocol = HBONE,
    status: WorkloadStatus = WorkloadStatus.HEALTHY,
) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{namespace}/{name}",
        name=name,
        namespace=namespace,
        addresses=(ip(address),),
        tunnel_protocol=protocol,
        service_account=name,
        node=node,
        services=services or {},
        waypoint=waypoint,
        status=status,
    )


SLEEP = pod("sleep", "10.0.1.1", NODE, namespace="test")
ECHO = pod("echo", "10.0.2.1", "node-b", services={ECHO_KEY: {80: 8080}})
WAYPOINT = pod("waypoint", "10.0.3.1", "node-b", services={WAYPOINT_KEY: {15008: 15008}})
WAYPOINT_SERVICE = Service(
    "waypoint",
    "prod",
    WAYPOINT_HOST,
    addresses=(NetworkAddress("", ip("10.96.0.20")),),
    ports={15008: 15008},
    subject_alt_names=("spiffe://cluster.local/ns/prod/sa/waypoint-san",),
)


def echo_service(waypoint: GatewayAddress | None = None) -> Service:
    return Service(
        "echo",
        "prod",
        ECHO_HOST,
        addresses=(NetworkAddress("", ip(ECHO_VIP)),),
        ports={80: 8080},
        subject_alt_names=("spiffe://cluster.local/ns/prod/sa/echo",),
        waypoint=waypoint,
    )


def state(workloads: Sequence[Workload], services: Sequence[Service]) -> ProxyState:
    return ProxyState(NODE, snapshot=ConfigSnapshot(tuple(workloads), tuple(services)))


def route(proxy: ProxyState, destination: tuple[str, int], source: Workload = SLEEP) -> Route:
    return route_outbound(proxy, source, destination, pick=RoundRobin())


# --------------------------------------------------------------------------- without waypoints


def test_service_without_waypoint_picks_an_endpoint() -> None:
    found = route(
        state([SLEEP, ECHO, WAYPOINT], [echo_service(), WAYPOINT_SERVICE]), (ECHO_VIP, 80)
    )
    assert found.kind is RouteKind.HBONE
    assert found.address == ("10.0.2.1", 8080)
    assert found.via == ("10.0.2.1", 15008)
    assert found.workload == ECHO and found.waypoint is None
    assert found.expected_identities() == {
        ECHO.identity,
        Identity.parse("spiffe://cluster.local/ns/prod/sa/echo"),
    }


def test_service_addressed_traffic_ignores_the_endpoints_own_waypoint() -> None:
    echo = dataclasses.replace(ECHO, waypoint=BY_NAME)
    found = route(
        state([SLEEP, echo, WAYPOINT], [echo_service(), WAYPOINT_SERVICE]), (ECHO_VIP, 80)
    )
    assert found.kind is RouteKind.HBONE
    assert found.address == ("10.0.2.1", 8080)
    assert found.waypoint is None


def test_local_destination_without_waypoint_is_local() -> None:
    echo = dataclasses.replace(ECHO, node=NODE)
    found = route(state([SLEEP, echo], [echo_service()]), ("10.0.2.1", 8080))
    assert found.kind is RouteKind.LOCAL
    assert found.address == ("10.0.2.1", 8080)


# --------------------------------------------------------------------------- service waypoints


def test_service_with_waypoint_goes_to_the_waypoint_with_the_vip_as_authority() -> None:
    proxy = state([SLEEP, ECHO, WAYPOINT], [echo_service(BY_NAME), WAYPOINT_SERVICE])
    found = route(proxy, (ECHO_VIP, 80))
    assert found.kind is RouteKind.HBONE
    assert found.address == (ECHO_VIP, 80)  # the waypoint chooses the endpoint
    assert found.via == ("10.0.3.1", 15008)
    assert found.workload is None
    assert found.service is not None and found.service.key == ECHO_KEY
    assert found.waypoint == WAYPOINT
    assert found.expected_identities() == {
        WAYPOINT.identity,
        Identity.parse("spiffe://cluster.local/ns/prod/sa/waypoint-san"),
    }


def test_service_waypoint_uses_its_hbone_port_and_skips_unhealthy_instances() -> None:
    sick = pod(
        "waypoint-sick",
        "10.0.3.2",
        "node-b",
        services={WAYPOINT_KEY: {}},
        status=WorkloadStatus.UNHEALTHY,
    )
    gateway = dataclasses.replace(BY_NAME, hbone_mtls_port=15009)
    proxy = state([SLEEP, ECHO, WAYPOINT, sick], [echo_service(gateway), WAYPOINT_SERVICE])
    for _ in range(3):
        assert route(proxy, (ECHO_VIP, 80)).via == ("10.0.3.1", 15009)


def test_service_waypoint_instances_take_turns() -> None:
    second = pod("waypoint-2", "10.0.3.2", "node-b", services={WAYPOINT_KEY: {}})
    proxy = state([SLEEP, ECHO, WAYPOINT, second], [echo_service(BY_NAME), WAYPOINT_SERVICE])
    pick = RoundRobin()
    vias = {route_outbound(proxy, SLEEP, (ECHO_VIP, 80), pick=pick).via for _ in range(4)}
    assert vias == {("10.0.3.1", 15008), ("10.0.3.2", 15008)}


def test_waypoint_on_this_node_is_still_reached_over_hbone() -> None:
    waypoint = dataclasses.replace(WAYPOINT, node=NODE)
    echo = dataclasses.replace(ECHO, node=NODE, waypoint=BY_NAME)
    proxy = state([SLEEP, echo, waypoint], [echo_service(BY_NAME), WAYPOINT_SERVICE])
    for destination, authority in (((ECHO_VIP, 80), (ECHO_VIP, 80)), (("10.0.2.1", 8080), None)):
        found = route(proxy, destination)
        assert found.kind is RouteKind.HBONE, found
        assert found.via == ("10.0.3.1", 15008)
        assert found.address == (authority or destination)
    assert proxy.is_waypoint(waypoint)
    assert not proxy.is_waypoint(echo)


def test_waypoint_by_address() -> None:
    gateway = GatewayAddress(address=NetworkAddress("", ip("10.0.3.1")))
    proxy = state([SLEEP, ECHO, WAYPOINT], [echo_service(gateway)])
    found = route(proxy, (ECHO_VIP, 80))
    assert found.kind is RouteKind.HBONE
    assert found.via == ("10.0.3.1", 15008)
    assert found.address == (ECHO_VIP, 80)
    assert found.expected_identities() == {WAYPOINT.identity}


def test_waypoint_by_service_vip_address() -> None:
    gateway = GatewayAddress(address=NetworkAddress("", ip("10.96.0.20")))
    proxy = state([SLEEP, ECHO, WAYPOINT], [echo_service(gateway), WAYPOINT_SERVICE])
    found = route(proxy, (ECHO_VIP, 80))
    assert found.via == ("10.0.3.1", 15008)
    assert found.waypoint == WAYPOINT


@pytest.mark.parametrize(
    ("gateway", "why"),
    [
        (GatewayAddress(hostname=NamespacedHostname("prod", "missing.example")), "is unknown"),
        (GatewayAddress(address=NetworkAddress("", ip("10.0.9.9"))), "is unknown"),
        (BY_NAME, "has no healthy instance"),
    ],
)
def test_unresolvable_waypoint_denies(gateway: GatewayAddress, why: str) -> None:
    # The waypoint Service exists but nothing backs it.
    proxy = state([SLEEP, ECHO], [echo_service(gateway), WAYPOINT_SERVICE])
    found = route(proxy, (ECHO_VIP, 80))
    assert found.kind is RouteKind.DENY
    assert found.reason == f"waypoint {gateway} {why}"
    assert found.service is not None and found.service.key == ECHO_KEY


def test_unhealthy_waypoint_denies_pod_traffic() -> None:
    waypoint = dataclasses.replace(WAYPOINT, status=WorkloadStatus.UNHEALTHY)
    echo = dataclasses.replace(ECHO, waypoint=BY_NAME)
    found = route(state([SLEEP, echo, waypoint], [WAYPOINT_SERVICE]), ("10.0.2.1", 8080))
    assert found.kind is RouteKind.DENY
    assert "has no healthy instance" in found.reason
    assert found.workload == echo


def test_source_that_is_the_service_waypoint_goes_direct() -> None:
    proxy = state([SLEEP, ECHO, WAYPOINT], [echo_service(BY_NAME), WAYPOINT_SERVICE])
    found = route(proxy, (ECHO_VIP, 80), source=WAYPOINT)
    assert found.kind is RouteKind.HBONE
    assert found.address == ("10.0.2.1", 8080)
    assert found.waypoint is None


# --------------------------------------------------------------------------- workload waypoints


def test_pod_with_waypoint_goes_to_the_waypoint_with_the_pod_as_authority() -> None:
    echo = dataclasses.replace(ECHO, waypoint=BY_NAME)
    proxy = state([SLEEP, echo, WAYPOINT], [echo_service(), WAYPOINT_SERVICE])
    found = route(proxy, ("10.0.2.1", 8080))
    assert found.kind is RouteKind.HBONE
    assert found.address == ("10.0.2.1", 8080)
    assert found.via == ("10.0.3.1", 15008)
    assert found.workload == echo
    assert found.waypoint == WAYPOINT
    assert WAYPOINT.identity in found.expected_identities()
    assert echo.identity not in found.expected_identities()


def test_pod_waypoint_is_used_even_for_a_plain_tcp_destination() -> None:
    plain = pod("plain", "10.0.2.2", "node-b", protocol=TunnelProtocol.NONE, waypoint=BY_NAME)
    found = route(state([SLEEP, plain, WAYPOINT], [WAYPOINT_SERVICE]), ("10.0.2.2", 8080))
    assert found.kind is RouteKind.HBONE
    assert found.via == ("10.0.3.1", 15008)


def test_source_that_is_the_pod_waypoint_goes_direct() -> None:
    echo = dataclasses.replace(ECHO, waypoint=BY_NAME)
    proxy = state([SLEEP, echo, WAYPOINT], [WAYPOINT_SERVICE])
    found = route(proxy, ("10.0.2.1", 8080), source=WAYPOINT)
    assert found.kind is RouteKind.HBONE
    assert found.via == ("10.0.2.1", 15008)
    assert found.waypoint is None
    assert found.expected_identities() == {echo.identity}


def test_source_that_owns_the_waypoint_address_goes_direct() -> None:
    gateway = GatewayAddress(address=NetworkAddress("", ip("10.0.3.1")))
    echo = dataclasses.replace(ECHO, waypoint=gateway)
    proxy = state([SLEEP, echo, WAYPOINT], [])
    assert route(proxy, ("10.0.2.1", 8080), source=WAYPOINT).waypoint is None
    assert route(proxy, ("10.0.2.1", 8080)).via == ("10.0.3.1", 15008)


def test_reserved_ports_are_denied_before_any_waypoint() -> None:
    echo = dataclasses.replace(ECHO, waypoint=BY_NAME)
    found = route(state([SLEEP, echo, WAYPOINT], [WAYPOINT_SERVICE]), ("10.0.2.1", 15008))
    assert found.kind is RouteKind.DENY
