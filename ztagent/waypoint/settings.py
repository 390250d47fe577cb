"""What one `ztagent waypoint` process is told: its control plane, identity and addresses.

`command` builds these settings from flags and the environment; `server` runs the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity


@dataclass(frozen=True)
class WaypointSettings:
    xds_address: str
    ca_address: str
    xds_root_ca: str
    ca_root_ca: str
    token_path: str
    pod_name: str
    pod_namespace: str
    service_account: str
    instance_ip: str
    node_name: str
    gateway: str
    listen: tuple[str, int]
    admin_addr: tuple[str, int]
    metrics_addr: tuple[str, int]
    readiness_addr: tuple[str, int]
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_id: str = "Kubernetes"
    secret_ttl: timedelta = timedelta(hours=24)
    otlp_endpoint: str = ""
    log_format: str = "text"

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.pod_namespace, self.service_account)
