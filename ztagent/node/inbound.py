"""Inbound decisions of the node agent: pure functions over the workload model, no I/O."""

from __future__ import annotations

import ipaddress

from ztagent.hbone.server import InboundRequest
from ztagent.model.store import ProxyState
from ztagent.model.workload import Workload


def client_address(state: ProxyState, destination: Workload, request: InboundRequest) -> str:
    """The source address policy sees for a CONNECT to `destination`.

    `forwarded: for=` names the original client only when the peer is the destination's own
    waypoint (ztunnel `inbound.rs`, `from_waypoint`: the peer's identity and address are an
    instance of it); from any other peer the source is the connection's own address, so a
    workload cannot claim another's address to pass a policy on source IPs.
    """
    peer_ip = request.peer_address[0]
    forwarded = request.forwarded_client_ip()
    if forwarded is None or forwarded == peer_ip:
        return peer_ip
    if state.is_own_waypoint(destination, request.peer_identity, ipaddress.ip_address(peer_ip)):
        return forwarded
    return peer_ip
