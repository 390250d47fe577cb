"""Whose address policy sees on an inbound CONNECT: `forwarded: for=` only from the
destination's own waypoint (ztunnel `from_waypoint`), and in the waypoint only for a workload
of the peer's identity."""

from __future__ import annotations

import ipaddress

import pytest

from tests.unit.test_node_routing import (
    BY_NAME,
    ECHO_HOST,
    ECHO_KEY,
    ECHO_VIP,
    NODE,
    SLEEP,
    WAYPOINT,
    WAYPOINT_SERVICE,
    pod,
)
from ztagent.hbone.server import InboundRequest
from ztagent.identity.spiffe import Identity
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.store import ProxyState
from ztagent.model.workload import NetworkAddress, Service, Workload
from ztagent.node.inbound import client_address

ip = ipaddress.ip_address

ATTACKER = pod("attacker", "10.0.1.9", NODE, namespace="test")


def state(
    *, pod_waypoint: bool = False, service_waypoint: bool = False
) -> tuple[ProxyState, Workload]:
    echo = pod(
        "echo",
        "10.0.2.1",
        "node-b",
        services={ECHO_KEY: {80: 8080}},
        waypoint=BY_NAME if pod_waypoint else None,
    )
    service = Service(
        "echo",
        "prod",
        ECHO_HOST,
        addresses=(NetworkAddress("", ip(ECHO_VIP)),),
        ports={80: 8080},
        waypoint=BY_NAME if service_waypoint else None,
    )
    snapshot = ConfigSnapshot(
        workloads=(SLEEP, ATTACKER, echo, WAYPOINT), services=(service, WAYPOINT_SERVICE)
    )
    return ProxyState("node-b", snapshot=snapshot), echo


def connect(identity: Identity, peer_ip: str, forwarded: str | None) -> InboundRequest:
    headers = [("forwarded", f'for="{forwarded}:40000"')] if forwarded else []
    return InboundRequest(
        1,
        "10.0.2.1:8080",
        ("10.0.2.1", 8080),
        headers,
        identity,
        ("10.0.2.1", 15008),
        (peer_ip, 51000),
    )


@pytest.mark.parametrize(("pod_waypoint", "service_waypoint"), [(True, False), (False, True)])
def test_the_destinations_waypoint_names_the_client(
    pod_waypoint: bool, service_waypoint: bool
) -> None:
    proxy, echo = state(pod_waypoint=pod_waypoint, service_waypoint=service_waypoint)
    request = connect(WAYPOINT.identity, "10.0.3.1", "10.0.1.1")
    assert client_address(proxy, echo, request) == "10.0.1.1"


def test_any_other_peer_is_its_own_source() -> None:
    proxy, echo = state(service_waypoint=True)
    # An authenticated workload claiming sleep's address.
    assert (
        client_address(proxy, echo, connect(ATTACKER.identity, "10.0.1.9", "10.0.1.1"))
        == "10.0.1.9"
    )
    # The waypoint's identity from an address that is not the waypoint's.
    assert (
        client_address(proxy, echo, connect(WAYPOINT.identity, "10.0.1.9", "10.0.1.1"))
        == "10.0.1.9"
    )
    # The waypoint's own address with another identity.
    assert (
        client_address(proxy, echo, connect(ATTACKER.identity, "10.0.3.1", "10.0.1.1"))
        == "10.0.3.1"
    )


def test_a_waypoint_that_does_not_serve_the_destination_is_not_trusted() -> None:
    proxy, echo = state()
    request = connect(WAYPOINT.identity, "10.0.3.1", "10.0.1.1")
    assert client_address(proxy, echo, request) == "10.0.3.1"


def test_a_peer_names_workloads_of_its_own_identity() -> None:
    """sleep's agent carries sleep's connection with sleep's identity, from the node."""
    proxy, echo = state()
    assert (
        client_address(proxy, echo, connect(SLEEP.identity, "10.0.0.1", "10.0.1.1")) == "10.0.1.1"
    )


def test_no_forwarded_header_is_the_peer() -> None:
    proxy, echo = state(service_waypoint=True)
    assert client_address(proxy, echo, connect(WAYPOINT.identity, "10.0.3.1", None)) == "10.0.3.1"


def test_speaks_for_only_its_own_workloads() -> None:
    proxy, _ = state()
    assert proxy.speaks_for(SLEEP.identity, "", ip("10.0.1.1"))
    assert not proxy.speaks_for(ATTACKER.identity, "", ip("10.0.1.1"))
    assert not proxy.speaks_for(SLEEP.identity, "", ip("10.9.9.9"))
