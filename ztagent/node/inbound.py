"""Inbound decisions of the node agent: pure functions over the workload model, no I/O.

For a connection to a local workload (over HBONE, or plaintext from outside the mesh) they say
whether it is served, what L4 policy saw, and what the metrics and the access log will say.
`NodeAgent` does what they say.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ztagent.hbone.frames import format_authority
from ztagent.hbone.server import InboundRequest
from ztagent.istio.authorization.l4 import ConnectionAttributes, Verdict, evaluate
from ztagent.model.store import ProxyState
from ztagent.model.workload import Workload
from ztagent.names import INBOUND_PLAINTEXT_PORT
from ztagent.telemetry.accesslog import ConnectionRecord
from ztagent.telemetry.metrics import ConnectionLabels, ResponseFlags, connection_labels

# The plaintext inbound port when listened on a workload's IP (not captured).
PLAINTEXT_PORT = INBOUND_PLAINTEXT_PORT


@dataclass(frozen=True, slots=True)
class InboundAccepted:
    """Serve the connection: relay it to `address` (the workload's IP and target port)."""

    address: tuple[str, int]
    workload: Workload
    attributes: ConnectionAttributes
    verdict: Verdict
    labels: ConnectionLabels
    record: ConnectionRecord


@dataclass(frozen=True, slots=True)
class InboundRefused:
    """Refuse it: `status` is the HBONE answer; `labels`/`record` are what to report (None
    when there is nothing to report, such as an address of no local workload)."""

    status: int
    reason: str
    verdict: Verdict | None = None
    labels: ConnectionLabels | None = None
    record: ConnectionRecord | None = None


InboundDecision = InboundAccepted | InboundRefused


def client_address(state: ProxyState, destination: Workload, request: InboundRequest) -> str:
    """The source address policy sees for a CONNECT to `destination`.

    `forwarded: for=` names the original client when the peer is the destination's own
    waypoint (ztunnel `inbound.rs`, `from_waypoint`: the peer's identity and address are an
    instance of it), or when the address it names is a workload of the peer's own identity
    (a node agent carries its pod's connection with the pod's identity, from the node's
    address). From any other peer the source is the connection's own address, so a workload
    cannot claim another identity's address to pass a policy on source IPs.
    """
    peer_ip = request.peer_address[0]
    forwarded = request.forwarded_client_ip()
    if forwarded is None or forwarded == peer_ip:
        return peer_ip
    identity = request.peer_identity
    if state.is_own_waypoint(destination, identity, ipaddress.ip_address(peer_ip)):
        return forwarded
    if state.speaks_for(identity, destination.network, ipaddress.ip_address(forwarded)):
        return forwarded
    return peer_ip


def decide_hbone(state: ProxyState, request: InboundRequest, cluster: str) -> InboundDecision:
    """A CONNECT to a local workload: the authority must be the address the connection was
    made to, the workload must be local, and its policies must allow the peer."""
    ip, port = request.target
    if ip != request.local_address[0]:
        return InboundRefused(
            400, f"authority {request.authority} is not this connection's destination"
        )
    workload = state.local_workload_by_ip(ipaddress.ip_address(ip))
    if workload is None:
        return InboundRefused(503, f"no local workload with address {ip}")
    source_ip = client_address(state, workload, request)
    attributes = ConnectionAttributes(
        request.peer_identity, ipaddress.ip_address(source_ip), ipaddress.ip_address(ip), port
    )
    source = state.workload_by_address(workload.network, ipaddress.ip_address(source_ip))
    verdict = evaluate(attributes, state.policies_for(workload))
    record = ConnectionRecord(
        src_addr=source_ip,
        dst_addr=format_authority(ip, port),
        direction="inbound",
        src_workload=source.name if source else None,
        src_namespace=source.namespace if source else None,
        src_identity=str(request.peer_identity),
        dst_hbone_addr=format_authority(*request.local_address),
        dst_workload=workload.name,
        dst_namespace=workload.namespace,
        dst_identity=str(workload.identity),
    )
    if not verdict.allowed:
        labels = connection_labels(
            "destination",
            source,
            request.peer_identity,
            workload,
            None,
            True,
            cluster,
            ResponseFlags.DENY,
        )
        return InboundRefused(
            401, verdict.reason, verdict, labels, record.failed(f"RBAC: {verdict.reason}")
        )
    labels = connection_labels(
        "destination", source, request.peer_identity, workload, None, True, cluster
    )
    return InboundAccepted((ip, port), workload, attributes, verdict, labels, record)


def decide_plaintext(
    state: ProxyState, peer: tuple[str, int], local: tuple[str, int], cluster: str
) -> InboundDecision:
    """A plaintext connection to a local workload (from outside the mesh). Captured, `local`
    is the original destination; on a workload IP's own plaintext listener the target is the
    workload's first service target port."""
    ip, port = local
    workload = state.local_workload_by_ip(ipaddress.ip_address(ip))
    if workload is None:
        return InboundRefused(503, f"no local workload with address {ip}")
    if port == PLAINTEXT_PORT:
        targets = [t for ports in workload.services.values() for t in ports.values() if t]
        if not targets:
            return InboundRefused(503, f"workload {workload.name} has no service target port")
        port = targets[0]
    attributes = ConnectionAttributes(
        None, ipaddress.ip_address(peer[0]), ipaddress.ip_address(ip), port
    )
    source = state.workload_by_address(workload.network, ipaddress.ip_address(peer[0]))
    record = ConnectionRecord(
        src_addr=format_authority(*peer),
        dst_addr=format_authority(ip, port),
        direction="inbound",
        src_workload=source.name if source else None,
        src_namespace=source.namespace if source else None,
        dst_workload=workload.name,
        dst_namespace=workload.namespace,
        dst_identity=str(workload.identity),
    )
    verdict = evaluate(attributes, state.policies_for(workload))
    if not verdict.allowed:
        labels = connection_labels(
            "destination", source, None, workload, None, False, cluster, ResponseFlags.DENY
        )
        return InboundRefused(
            401, verdict.reason, verdict, labels, record.failed(f"RBAC: {verdict.reason}")
        )
    labels = connection_labels("destination", source, None, workload, None, False, cluster)
    return InboundAccepted((ip, port), workload, attributes, verdict, labels, record)
