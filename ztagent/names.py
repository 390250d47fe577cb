"""Istio's names and well-known numbers, in one place: the cluster domain suffix, the root
namespace, the ports every component listens on, and the host names built from them.

Values are Istio's defaults (istio/istio `pkg/config/constants`, ztunnel `src/config.rs`,
REFERENCE.md "Ports"); a setting may override the suffix and the root namespace.
"""

from __future__ import annotations

DEFAULT_DOMAIN_SUFFIX = "cluster.local"
"""The cluster's DNS domain (istiod `--domain`, Kubernetes' `cluster.local`)."""

DEFAULT_ROOT_NAMESPACE = "istio-system"
"""The namespace whose policies apply mesh-wide (MeshConfig `rootNamespace`)."""

# Ports (ztunnel `src/config.rs`, Istio's "Ports used by Istio").
ADMIN_PORT = 15000
"""Admin and `/config_dump`, on localhost (ztunnel, Envoy)."""
OUTBOUND_PORT = 15001
"""Captured outbound connections (ztunnel `outbound`)."""
INBOUND_PLAINTEXT_PORT = 15006
"""Captured inbound plaintext connections (ztunnel `inbound_plaintext`)."""
HBONE_PORT = 15008
"""HBONE: HTTP/2 CONNECT over mutual TLS (ztunnel `inbound`)."""
CONTROL_XDS_PORT = 15010
"""istiod's plaintext xDS."""
CONTROL_PORT = 15012
"""istiod's xDS and CA over TLS."""
CONTROL_MONITORING_PORT = 15014
"""istiod's monitoring (metrics, readiness)."""
STATS_PORT = 15020
"""Merged Prometheus metrics (ztunnel `stats`)."""
READINESS_PORT = 15021
"""`/healthz/ready` (ztunnel `readiness`)."""
DNS_PORT = 15053
"""The DNS proxy (ztunnel `dns_proxy`)."""
SOCKS5_PORT = 15080
"""The SOCKS5 listener for local clients (ztunnel `socks5`)."""
ENVOY_PROMETHEUS_PORT = 15090
"""Envoy's Prometheus stats (waypoints)."""

AGENT_PORTS = frozenset(
    {
        ADMIN_PORT,
        OUTBOUND_PORT,
        INBOUND_PLAINTEXT_PORT,
        HBONE_PORT,
        STATS_PORT,
        READINESS_PORT,
        DNS_PORT,
        SOCKS5_PORT,
        ENVOY_PROMETHEUS_PORT,
    }
)
"""Every port a node agent or waypoint listens on itself."""


def service_hostname(name: str, namespace: str, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX) -> str:
    """A Kubernetes Service's fully qualified host: `name.namespace.svc.suffix`."""
    return f"{name}.{namespace}.svc.{domain_suffix}"


def namespace_hostname(namespace: str, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX) -> str:
    """The namespace's service domain, `namespace.svc.suffix` (a pod's first search domain)."""
    return f"{namespace}.svc.{domain_suffix}"


def qualify_host(host: str, namespace: str, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX) -> str:
    """A host as Istio resolves a name in a route or rule of `namespace`
    (istio/istio `pkg/config/host` ResolveShortnameToFQDN): a name without dots is a Service
    of that namespace, `reviews` → `reviews.<namespace>.svc.<suffix>`; `*`, names with dots
    and IPv6 addresses are kept as written."""
    if host == "*" or "." in host or ":" in host:
        return host
    return service_hostname(host, namespace, domain_suffix)
