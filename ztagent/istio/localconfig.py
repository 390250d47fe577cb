"""A `ConfigSnapshot` as ztunnel's local config (`LOCAL_XDS_PATH`): the plain, JSON-ready form
`ztagent.model.localconfig.parse_local_config` reads back to an equal snapshot; the control
plane's config dump is built on it. Pure, no I/O.
"""

from __future__ import annotations

from typing import Any

from ztagent.model.policy import Action, Authorization, Match, Scope
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.workload import GatewayAddress, Service, TunnelProtocol, Workload


def _gateway_data(gateway: GatewayAddress) -> dict[str, Any]:
    destination = gateway.hostname if gateway.hostname is not None else gateway.address
    return {"destination": str(destination), "hboneMtlsPort": gateway.hbone_mtls_port}


def _match_data(match: Match) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, values in (
        ("namespaces", match.namespaces),
        ("notNamespaces", match.not_namespaces),
        ("principals", match.principals),
        ("notPrincipals", match.not_principals),
        ("sourceIps", match.source_ips),
        ("notSourceIps", match.not_source_ips),
        ("destinationIps", match.destination_ips),
        ("notDestinationIps", match.not_destination_ips),
        ("serviceAccounts", match.service_accounts),
        ("notServiceAccounts", match.not_service_accounts),
    ):
        if values:
            data[key] = [str(v) for v in values]
    if match.destination_ports:
        data["destinationPorts"] = list(match.destination_ports)
    if match.not_destination_ports:
        data["notDestinationPorts"] = list(match.not_destination_ports)
    return data


_SCOPE_NAMES = {
    Scope.GLOBAL: "Global",
    Scope.NAMESPACE: "Namespace",
    Scope.WORKLOAD_SELECTOR: "WorkloadSelector",
}


def _workload_data(w: Workload) -> dict[str, Any]:
    data: dict[str, Any] = {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "workloadIps": [str(ip) for ip in w.addresses],
        "protocol": "HBONE" if w.tunnel_protocol is TunnelProtocol.HBONE else "TCP",
        "trustDomain": w.trust_domain,
        "serviceAccount": w.service_account,
    }
    if w.tunnel_protocol is TunnelProtocol.LEGACY_ISTIO_MTLS:
        data["protocol"] = "LEGACY_ISTIO_MTLS"
    optional: dict[str, Any] = {
        "network": w.network,
        "hostname": w.hostname,
        "node": w.node,
        "clusterId": w.cluster_id,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "workloadType": w.workload_type,
        "workloadName": w.workload_name,
    }
    data.update({k: v for k, v in optional.items() if v})
    if w.waypoint is not None:
        data["waypoint"] = _gateway_data(w.waypoint)
    if w.network_gateway is not None:
        data["networkGateway"] = _gateway_data(w.network_gateway)
    if w.authorization_policies:
        data["authorizationPolicies"] = list(w.authorization_policies)
    data["status"] = "Healthy" if w.healthy else "Unhealthy"
    if w.services:
        data["services"] = {
            key: {port: target for port, target in sorted(ports.items())}
            for key, ports in sorted(w.services.items())
        }
    return data


def _service_data(s: Service) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": [str(a) for a in s.addresses],
        "ports": {port: target for port, target in sorted(s.ports.items())},
    }
    if s.subject_alt_names:
        data["subjectAltNames"] = list(s.subject_alt_names)
    if s.waypoint is not None:
        data["waypoint"] = _gateway_data(s.waypoint)
    return data


def _policy_data(p: Authorization) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": p.name,
        "namespace": p.namespace,
        "scope": _SCOPE_NAMES[p.scope],
        "action": "Allow" if p.action is Action.ALLOW else "Deny",
        "rules": [
            [[_match_data(m) for m in clause.matches] for clause in rule.clauses]
            for rule in p.rules
        ],
    }
    if p.dry_run:
        data["dryRun"] = True
    return data


def to_local_config(snapshot: ConfigSnapshot) -> dict[str, Any]:
    """The snapshot as ztunnel's local config (`LOCAL_XDS_PATH`): plain, JSON-ready data.

    `parse_local_config` reads it back to an equal snapshot; string matches use
    AuthorizationPolicy spelling (`*`, `x*`, `*x`).
    """
    return {
        "workloads": [_workload_data(w) for w in snapshot.workloads],
        "services": [_service_data(s) for s in snapshot.services],
        "policies": [_policy_data(p) for p in snapshot.policies],
    }
