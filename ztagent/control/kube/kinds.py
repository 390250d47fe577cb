"""The kinds the control plane lists and watches: `KindSpec` and `DEFAULT_KINDS`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One kind to list and watch: its group, kind, resource (plural) and versions.

    `versions` are in order of preference; for a non-core group the first one the server
    serves is used, else the server's preferred version of the group.
    """

    group: str
    kind: str
    plural: str
    versions: tuple[str, ...]
    namespaced: bool = True

    @property
    def label(self) -> str:
        """`Kind.group` (just `Kind` for the core group), as logs name it."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def path(self, version: str) -> str:
        """The collection's path across all namespaces."""
        if self.group:
            return f"/apis/{self.group}/{version}/{self.plural}"
        return f"/api/{version}/{self.plural}"

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version


_ISTIO_VERSIONS = ("v1", "v1beta1")
_ISTIO_NETWORKING_VERSIONS = ("v1", "v1beta1", "v1alpha3")
_GATEWAY_VERSIONS = ("v1", "v1beta1")

DEFAULT_KINDS: tuple[KindSpec, ...] = (
    KindSpec("", "Namespace", "namespaces", ("v1",), namespaced=False),
    KindSpec("", "Pod", "pods", ("v1",)),
    KindSpec("", "Service", "services", ("v1",)),
    KindSpec("discovery.k8s.io", "EndpointSlice", "endpointslices", ("v1",)),
    KindSpec("networking.istio.io", "ServiceEntry", "serviceentries", _ISTIO_NETWORKING_VERSIONS),
    KindSpec(
        "networking.istio.io", "VirtualService", "virtualservices", _ISTIO_NETWORKING_VERSIONS
    ),
    KindSpec(
        "networking.istio.io", "DestinationRule", "destinationrules", _ISTIO_NETWORKING_VERSIONS
    ),
    KindSpec("security.istio.io", "AuthorizationPolicy", "authorizationpolicies", _ISTIO_VERSIONS),
    KindSpec("security.istio.io", "PeerAuthentication", "peerauthentications", _ISTIO_VERSIONS),
    KindSpec(
        "security.istio.io", "RequestAuthentication", "requestauthentications", _ISTIO_VERSIONS
    ),
    KindSpec("gateway.networking.k8s.io", "Gateway", "gateways", _GATEWAY_VERSIONS),
    KindSpec("gateway.networking.k8s.io", "HTTPRoute", "httproutes", _GATEWAY_VERSIONS),
)

__all__ = ["DEFAULT_KINDS", "KindSpec"]
