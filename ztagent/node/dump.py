"""The admin `/config_dump` document: the agent's current view as plain JSON values.

`config_dump` turns a `ProxyState` and the certificate manager's per-identity status into
dicts, lists, strings, numbers, booleans and None, so any JSON encoder can write it unchanged
and `ztagent ctl` can read it back. Every list of objects is sorted by its key (workload uid,
service key, policy key, identity), port maps by port, so two dumps of the same state are
byte-for-byte equal. Times are RFC 3339 in UTC (`2024-05-01T12:00:00Z`). No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from ztagent.identity.certs import WorkloadCertificate
from ztagent.identity.spiffe import Identity, InvalidIdentity
from ztagent.model.policy import Authorization, Clause, Match, Rule
from ztagent.model.store import ProxyState
from ztagent.model.workload import GatewayAddress, PortMap, Service, Workload

AVAILABLE = "available"
PENDING = "pending"
FAILED = "failed"
CERTIFICATE_STATES = (AVAILABLE, PENDING, FAILED)

Json = dict[str, Any]


@dataclass(frozen=True)
class CertificateStatus:
    """Where one local identity's certificate stands.

    `state` is `available` (a usable certificate is held), `pending` (the first fetch has not
    finished) or `failed` (the last fetch failed; `certificate` may still hold the previous,
    not yet expired one). `error` is the last failure's message.
    """

    identity: Identity
    state: str
    certificate: WorkloadCertificate | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.state not in CERTIFICATE_STATES:
            raise ValueError(
                f"certificate state {self.state!r} is not one of {', '.join(CERTIFICATE_STATES)}"
            )


def rfc3339(moment: datetime) -> str:
    """`moment` in UTC as RFC 3339 with a `Z`; fractions of a second only when present.

    A naive datetime is taken to be UTC already.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _ports(ports: PortMap) -> dict[str, int]:
    return {str(port): ports[port] for port in sorted(ports)}


def _gateway(gateway: GatewayAddress | None) -> Json | None:
    if gateway is None:
        return None
    destination = gateway.hostname if gateway.hostname is not None else gateway.address
    return {"destination": str(destination), "hbone_mtls_port": gateway.hbone_mtls_port}


def _identity_uri(workload: Workload) -> str | None:
    try:
        return workload.identity.uri
    except InvalidIdentity:
        return None


def _workload(workload: Workload, node: str) -> Json:
    return {
        "uid": workload.uid,
        "name": workload.name,
        "namespace": workload.namespace,
        "node": workload.node,
        "addresses": [str(address) for address in workload.network_addresses],
        "protocol": workload.tunnel_protocol.value,
        "identity": _identity_uri(workload),
        "service_account": workload.service_account,
        "workload_name": workload.workload_name,
        "canonical_name": workload.canonical_name,
        "canonical_revision": workload.canonical_revision,
        "status": workload.status.value,
        "cluster_id": workload.cluster_id,
        "services": {key: _ports(workload.services[key]) for key in sorted(workload.services)},
        "authorization_policies": sorted(workload.authorization_policies),
        "waypoint": _gateway(workload.waypoint),
        "local": bool(node) and workload.node == node,
    }


def _service(service: Service, endpoints: Iterable[Workload]) -> Json:
    return {
        "key": service.key,
        "name": service.name,
        "namespace": service.namespace,
        "hostname": service.hostname,
        "vips": [str(vip) for vip in service.addresses],
        "ports": _ports(service.ports),
        "subject_alt_names": list(service.subject_alt_names),
        "endpoints": sorted(workload.uid for workload in endpoints),
        "waypoint": _gateway(service.waypoint),
    }


def match_to_json(match: Match) -> Json:
    """The non-empty fields of `match`, each a list in AuthorizationPolicy spelling.

    String matches read `*`, `x*`, `*x` or `x`; IP blocks as CIDR text; service accounts as
    `ns/sa`; ports as numbers.
    """
    out: Json = {}
    for f in fields(match):
        values = getattr(match, f.name)
        if values:
            out[f.name] = [value if isinstance(value, int) else str(value) for value in values]
    return out


def _clause(clause: Clause) -> list[Json]:
    return [match_to_json(match) for match in clause.matches]


def _rule(rule: Rule) -> list[list[Json]]:
    return [_clause(clause) for clause in rule.clauses]


def _policy(policy: Authorization) -> Json:
    return {
        "key": policy.key,
        "name": policy.name,
        "namespace": policy.namespace,
        "scope": policy.scope.value,
        "action": policy.action.value,
        "dry_run": policy.dry_run,
        "rules": [_rule(rule) for rule in policy.rules],
    }


def _certificate(status: CertificateStatus) -> Json:
    cert = status.certificate
    return {
        "identity": status.identity.uri,
        "state": status.state,
        "not_before": rfc3339(cert.not_before) if cert else None,
        "not_after": rfc3339(cert.not_after) if cert else None,
        "refresh_at": rfc3339(cert.refresh_at()) if cert else None,
        "chain_length": len(cert.chain_pem) if cert else 0,
        "error": status.error,
    }


def config_dump(
    state: ProxyState,
    certificates: Iterable[CertificateStatus],
    *,
    config_source: str,
    node: str,
) -> Json:
    """The `/config_dump` document for `state` and `certificates` (see the module doc).

    `node` is NODE_NAME: a workload is `local` when its node equals it (never for an empty
    `node`, as in `ProxyState`).
    """
    workloads = sorted(state.workloads, key=lambda w: w.uid)
    services = sorted(state.services, key=lambda s: s.key)
    policies = sorted(state.policies, key=lambda p: p.key)
    by_identity: Mapping[Identity, CertificateStatus] = {c.identity: c for c in certificates}
    return {
        "node": node,
        "version": state.version,
        "config_source": config_source,
        "errors": [str(error) for error in state.snapshot.errors],
        "workloads": [_workload(workload, node) for workload in workloads],
        "services": [_service(service, state.endpoints(service)) for service in services],
        "policies": [_policy(policy) for policy in policies],
        "certificates": [_certificate(by_identity[i]) for i in sorted(by_identity)],
    }
