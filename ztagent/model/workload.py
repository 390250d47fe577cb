"""Workloads and Services as Istio's workload API (`istio.workload.Address`) describes them.

This module owns the immutable values the rest of the agent reads: a `Workload` is one pod or VM
with its IPs, identity and the services it backs; a `Service` is a set of VIPs and ports. Names
follow Istio's proto (`tunnel_protocol`, `authorization_policies`, ...). Values are validated on
construction only as far as their types demand; parsing and error reporting for untrusted input
live in `localconfig` (and the xDS client), never here. No I/O.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity
from ztagent.names import HBONE_PORT

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
"""One workload or VIP address; Istio carries these as 4 or 16 raw bytes."""

HBONE_MTLS_PORT = HBONE_PORT
DEFAULT_SERVICE_ACCOUNT = "default"

PortMap = Mapping[int, int]
"""Service port -> target port; a target of 0 means "the same as the service port"."""

_EMPTY_PORTS: PortMap = MappingProxyType({})
_EMPTY_SERVICES: Mapping[str, PortMap] = MappingProxyType({})


class TunnelProtocol(enum.Enum):
    """How a workload expects inbound traffic: plain TCP (`NONE`) or HBONE on 15008."""

    NONE = "NONE"
    HBONE = "HBONE"
    LEGACY_ISTIO_MTLS = "LEGACY_ISTIO_MTLS"


class WorkloadStatus(enum.Enum):
    """Whether a workload may be picked as a service endpoint."""

    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    """An IP on a network; the same IP on two networks is two different addresses."""

    network: str
    address: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"


@dataclass(frozen=True, slots=True)
class NamespacedHostname:
    """A Service named by `namespace/hostname`, the key Istio uses for services."""

    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint or network gateway listens: a Service by name or a plain address.

    Exactly one of `hostname` and `address` is set (a proto oneof).
    """

    hostname: NamespacedHostname | None = None
    address: NetworkAddress | None = None
    hbone_mtls_port: int = HBONE_MTLS_PORT

    def __post_init__(self) -> None:
        if (self.hostname is None) == (self.address is None):
            raise ValueError("GatewayAddress needs exactly one of hostname and address")

    def __str__(self) -> str:
        return f"{self.hostname or self.address}:{self.hbone_mtls_port}"


def _freeze_ports(ports: Mapping[int, int]) -> PortMap:
    return MappingProxyType(dict(ports)) if ports else _EMPTY_PORTS


@dataclass(frozen=True, slots=True)
class Workload:
    """One addressable workload (pod, VM, ...) and everything the node agent needs about it.

    `services` maps a service key `namespace/hostname` to this workload's port map for that
    service: the endpoint's own target ports, which win over the Service's. The mappings are
    read-only copies, so a `Workload` can be shared freely (its hash leaves them out).
    """

    uid: str
    name: str
    namespace: str
    addresses: tuple[IPAddress, ...] = ()
    network: str = ""
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    node: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: str = ""
    workload_name: str = ""
    authorization_policies: tuple[str, ...] = ()
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    cluster_id: str = ""
    hostname: str = ""
    services: Mapping[str, PortMap] = field(default_factory=lambda: _EMPTY_SERVICES, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(self.addresses))
        object.__setattr__(self, "authorization_policies", tuple(self.authorization_policies))
        if self.services:
            frozen = {key: _freeze_ports(ports) for key, ports in self.services.items()}
            object.__setattr__(self, "services", MappingProxyType(frozen))
        else:
            object.__setattr__(self, "services", _EMPTY_SERVICES)

    @property
    def identity(self) -> Identity:
        """The SPIFFE identity this workload's certificate carries."""
        return Identity(self.trust_domain, self.namespace, self.service_account)

    @property
    def network_addresses(self) -> tuple[NetworkAddress, ...]:
        """This workload's IPs qualified by its network: the keys it is found by."""
        return tuple(NetworkAddress(self.network, ip) for ip in self.addresses)

    @property
    def healthy(self) -> bool:
        return self.status is WorkloadStatus.HEALTHY


@dataclass(frozen=True, slots=True)
class Service:
    """A Service: VIPs and ports; its endpoints are the workloads that list its `key`."""

    name: str
    namespace: str
    hostname: str
    addresses: tuple[NetworkAddress, ...] = ()
    ports: PortMap = field(default_factory=lambda: _EMPTY_PORTS, hash=False)
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(self.addresses))
        object.__setattr__(self, "subject_alt_names", tuple(self.subject_alt_names))
        object.__setattr__(self, "ports", _freeze_ports(self.ports))

    @property
    def key(self) -> str:
        """`namespace/hostname`: the xDS resource name and the key in `Workload.services`."""
        return f"{self.namespace}/{self.hostname}"
