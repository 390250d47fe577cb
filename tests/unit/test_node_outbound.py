"""`outbound.decide`: what the node agent does with a connection from a local workload, and
what it will report, decided in memory."""

from __future__ import annotations

from tests.unit.test_node_routing import ECHO, ECHO_VIP, NODE, SLEEP, echo_service, pod, state
from ztagent.identity.spiffe import Identity
from ztagent.model.store import ProxyState
from ztagent.node import outbound
from ztagent.node.outbound import OpenTunnel, OutboundRefused, Relay
from ztagent.node.routing import RoundRobin


def decide(
    proxy: ProxyState, client: tuple[str, int], destination: tuple[str, int]
) -> outbound.OutboundDecision:
    return outbound.decide(
        proxy,
        client,
        destination,
        pick=RoundRobin(),
        cluster="Kubernetes",
    )


def test_a_caller_that_is_no_local_workload_is_refused_without_a_report() -> None:
    proxy = state([SLEEP, ECHO], [echo_service()])
    decision = decide(proxy, ("10.9.9.9", 40000), (ECHO_VIP, 80))
    assert isinstance(decision, OutboundRefused)
    assert decision.labels is None and decision.record is None
    assert "not a local workload" in decision.reason


def test_a_service_vip_opens_a_tunnel_to_the_endpoint_with_its_report() -> None:
    proxy = state([SLEEP, ECHO], [echo_service()])
    decision = decide(proxy, ("10.0.1.1", 40000), (ECHO_VIP, 80))
    assert isinstance(decision, OpenTunnel)
    assert decision.source == SLEEP
    assert decision.tunnel.via == ("10.0.2.1", 15008)
    assert decision.tunnel.target == ("10.0.2.1", 8080)
    assert decision.tunnel.source == ("10.0.1.1", 40000)
    assert decision.tunnel.expected_identities == frozenset({ECHO.identity})
    assert decision.tunnel.baggage["k8s.namespace.name"] == "test"
    assert decision.record.dst_hbone_addr == "10.0.2.1:15008"
    assert decision.record.dst_service == "echo.prod.svc.cluster.local"
    assert decision.labels.reporter == "source"
    assert decision.labels.connection_security_policy == "mutual_tls"
    assert decision.labels.destination_service_name == "echo"


def test_an_unknown_destination_passes_through_in_plain_tcp() -> None:
    proxy = state([SLEEP, ECHO], [echo_service()])
    decision = decide(proxy, ("10.0.1.1", 40000), ("192.0.2.10", 443))
    assert isinstance(decision, Relay)
    assert decision.address == ("192.0.2.10", 443)
    assert decision.inbound is None
    assert decision.labels.connection_security_policy == "unknown"


def test_a_local_destination_is_relayed_with_its_policy_attributes() -> None:
    local_echo = pod("echo", "10.0.2.1", NODE)
    proxy = state([SLEEP, local_echo], [])
    decision = decide(proxy, ("10.0.1.1", 40000), ("10.0.2.1", 8080))
    assert isinstance(decision, Relay)
    assert decision.workload == local_echo
    assert decision.inbound is not None
    assert decision.inbound.source_identity == Identity("cluster.local", "test", "sleep")


def test_a_denied_route_is_reported_with_the_deny_flag() -> None:
    proxy = state([SLEEP, ECHO], [echo_service()])
    decision = decide(proxy, ("10.0.1.1", 40000), ("10.0.2.1", 15008))
    assert isinstance(decision, OutboundRefused)
    assert decision.labels is not None and decision.labels.response_flags == "DENY"
    assert decision.record is not None and decision.record.error == decision.reason
