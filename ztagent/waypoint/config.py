"""A waypoint's L7 configuration, built from the Kubernetes objects the control plane serves.

The control plane sends a waypoint its objects (`ztagent.waypoint.v1.L7Resource` over delta
ADS, decoded to JSON dicts by the xDS client): VirtualService, HTTPRoute, DestinationRule,
AuthorizationPolicy and RequestAuthentication attached by `targetRefs`, Telemetry, Services
and waypoint Gateways. `build_config` turns that list into `Resource`s and runs the parsers of
this package, so what the waypoint applies is exactly what they accept; every object they
reject becomes a `ResourceError` in `errors`, and the others still apply.

Services give the port table (name, `appProtocol`, `targetPort`) that decides how a port's
traffic is read: `protocol` follows Istio's protocol selection (`kube.ConvertProtocol`):
`protocol: UDP` is udp; otherwise `appProtocol` when set, else the port name, is read as
`grpc-web...`, or its part before the first `-` (`http-web` -> http) as one of Istio's
protocol names; Kubernetes' `kubernetes.io/h2c` is http2 and `kubernetes.io/ws` http (`wss`
https); anything else is `unknown`, except tcp for the well-known ports 25, 53, 3306 and 27017.

Pure: no I/O. A `jwksUri: file://` RequestAuthentication arrives with its keys inlined (the
control plane reads the file); one that does not is left to the caller, as `jwt` describes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztagent.fields import Invalid, join, show
from ztagent.fields import port as read_port
from ztagent.istio.authorization.waypoint import (
    AuthorizationConfig,
    read_authorization_policies,
)
from ztagent.istio.destination import DestinationRules, parse_destination_rules
from ztagent.istio.envelope import Resource, ResourceError, envelope
from ztagent.istio.jwt import JwtConfig, read_request_authentications
from ztagent.istio.routing import RouteConfig, RouteOptions, parse_routes
from ztagent.model.workload import Workload
from ztagent.names import DEFAULT_DOMAIN_SUFFIX, DEFAULT_ROOT_NAMESPACE, service_hostname

SOURCE = "xds"
"""The `file` of the `Resource`s built here (errors show `xds#<index in the list>`)."""
UNKNOWN = "unknown"

_PROTOCOLS = {
    "tcp": "tcp",
    "udp": "udp",
    "grpc": "grpc",
    "grpc-web": "grpc-web",
    "http": "http",
    "http_proxy": "http_proxy",
    "http2": "http2",
    "https": "https",
    "tls": "tls",
    "mongo": "mongo",
    "redis": "redis",
    "mysql": "mysql",
}
_KUBERNETES_APP_PROTOCOLS = {
    "kubernetes.io/h2c": "http2",
    "kubernetes.io/ws": "http",
    "kubernetes.io/wss": "https",
}
_WELL_KNOWN_TCP_PORTS = frozenset({25, 53, 3306, 27017})
"""Ports Istio treats as TCP when the name says nothing (SMTP, DNS, MySQL, MongoDB)."""
_CANONICAL_LABELS = (
    ("app", "service.istio.io/canonical-name"),
    ("version", "service.istio.io/canonical-revision"),
)


def select_protocol(port: int, name: str, app_protocol: str = "", transport: str = "TCP") -> str:
    """Istio's protocol for a Service port (see the module docstring), lower case."""
    if transport.upper() == "UDP":
        return "udp"
    text = app_protocol or name
    if app_protocol in _KUBERNETES_APP_PROTOCOLS:
        return _KUBERNETES_APP_PROTOCOLS[app_protocol]
    if text[:8].lower() == "grpc-web":
        return "grpc-web"
    found = _PROTOCOLS.get(text.partition("-")[0].lower())
    if found is None:
        return "tcp" if port in _WELL_KNOWN_TCP_PORTS else UNKNOWN
    return found


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a Service: its number, name, `appProtocol`, `targetPort` (a number, a
    container port name, or None when the Service does not say), and transport protocol."""

    port: int
    name: str = ""
    app_protocol: str = ""
    target_port: int | str | None = None
    transport: str = "TCP"

    @property
    def protocol(self) -> str:
        return select_protocol(self.port, self.name, self.app_protocol, self.transport)


@dataclass(frozen=True, slots=True)
class ServicePorts:
    """A Service's ports by port number."""

    name: str
    namespace: str
    hostname: str
    ports: Mapping[int, ServicePort] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WaypointConfig:
    """What the parsers made of the waypoint's objects, and every error they found."""

    routes: RouteConfig = field(default_factory=RouteConfig)
    destination_rules: DestinationRules = field(default_factory=DestinationRules)
    authorization: AuthorizationConfig = field(default_factory=AuthorizationConfig)
    authentication: JwtConfig = field(default_factory=JwtConfig)
    services: Mapping[str, ServicePorts] = field(default_factory=dict)
    """By hostname, `name.namespace.svc.<domain suffix>`."""
    telemetry: tuple[Resource, ...] = ()
    """Telemetry objects, as they came (not interpreted here)."""
    errors: tuple[ResourceError, ...] = ()
    notes: tuple[ResourceError, ...] = ()

    @classmethod
    def empty(cls) -> WaypointConfig:
        return cls()

    def protocol(self, hostname: str, port: int) -> str:
        """Istio's protocol for `port` of the Service `hostname`; `unknown` when there is no
        such Service or port, or its name and `appProtocol` say nothing Istio knows."""
        service = self.services.get(hostname)
        found = service.ports.get(port) if service is not None else None
        return found.protocol if found is not None else UNKNOWN

    def labels_for(self, workload: Workload) -> dict[str, str]:
        """The labels DestinationRule subsets are matched against. Workload xDS carries no pod
        labels, only the canonical name and revision (read from `app`/`version` and their
        `service.istio.io/canonical-*` and `app.kubernetes.io/*` forms), so those stand in:
        `app` and `version` (and the canonical labels) with the workload's values."""
        values = (workload.canonical_name, workload.canonical_revision)
        labels: dict[str, str] = {}
        for value, keys in zip(values, _CANONICAL_LABELS, strict=True):
            if value:
                labels.update(dict.fromkeys(keys, value))
        return labels

    def summary(self) -> dict[str, Any]:
        """Which objects are in force, by kind (for a config dump)."""
        return {
            "virtualServices": sorted(
                f"{v.namespace}/{v.name}" for v in self.routes.virtual_services
            ),
            "httpRoutes": sorted(f"{h.namespace}/{h.name}" for h in self.routes.http_routes),
            "destinationRules": sorted(r.key for r in self.destination_rules.rules),
            "authorizationPolicies": sorted(p.key for p in self.authorization.policies),
            "requestAuthentications": sorted(p.key for p in self.authentication.policies),
            "telemetry": sorted(f"{t.namespace}/{t.name}" for t in self.telemetry),
            "services": sorted(self.services),
            "errors": len(self.errors),
        }


def _service_ports(resource: Resource, domain_suffix: str) -> ServicePorts:
    """A Service's ports; raises Invalid naming the field for a malformed one."""
    namespace = resource.namespace or "default"
    spec = resource.body.get("spec")
    if not isinstance(spec, Mapping):
        raise Invalid("spec", "must be a mapping")
    items = spec.get("ports") or []
    if not isinstance(items, list):
        raise Invalid("spec.ports", "must be a list")
    ports: dict[int, ServicePort] = {}
    for i, item in enumerate(items):
        at = join(join("spec", "ports"), i)
        if not isinstance(item, Mapping):
            raise Invalid(at, "must be a mapping")
        number = read_port(item.get("port"), join(at, "port"), digit_strings=False)
        target = item.get("targetPort")
        if isinstance(target, bool) or not isinstance(target, int | str | None):
            raise Invalid(join(at, "targetPort"), f"{show(target)} is not a port")
        texts = {}
        for key in ("name", "appProtocol", "protocol"):
            value = item.get(key)
            if value is not None and not isinstance(value, str):
                raise Invalid(join(at, key), "must be a string")
            texts[key] = value or ""
        ports[number] = ServicePort(
            port=number,
            name=texts["name"],
            app_protocol=texts["appProtocol"],
            target_port=target,
            transport=texts["protocol"] or "TCP",
        )
    hostname = service_hostname(resource.name, namespace, domain_suffix)
    return ServicePorts(resource.name, namespace, hostname, ports)


def build_config(
    objects: Iterable[Mapping[str, Any]],
    *,
    domain_suffix: str = DEFAULT_DOMAIN_SUFFIX,
    waypoint_namespace: str = "",
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> WaypointConfig:
    """The configuration made of `objects` (Kubernetes objects as dicts); nothing raises.

    `waypoint_namespace` is the waypoint's own namespace (its routes apply to every service it
    serves); `root_namespace` is the mesh root, where policies may target the GatewayClass.
    """
    resources: list[Resource] = []
    errors: list[ResourceError] = []
    for index, document in enumerate(objects):
        built = envelope(document, SOURCE, index)
        if isinstance(built, ResourceError):
            errors.append(built)
        else:
            resources.append(built)

    services: dict[str, ServicePorts] = {}
    telemetry: list[Resource] = []
    for resource in resources:
        if resource.group == "" and resource.kind == "Service":
            try:
                service = _service_ports(resource, domain_suffix)
            except Invalid as exc:
                key = f"{resource.namespace or 'default'}/{resource.name}"
                errors.append(
                    ResourceError(resource.kind, resource.index, key, exc.path, exc.reason, SOURCE)
                )
                continue
            services[service.hostname] = service
        elif resource.group == "telemetry.istio.io" and resource.kind == "Telemetry":
            telemetry.append(resource)

    options = RouteOptions(domain_suffix=domain_suffix, waypoint_namespace=waypoint_namespace)
    routes = parse_routes(resources, options)
    rules = parse_destination_rules(resources, domain_suffix=domain_suffix)
    authorization = read_authorization_policies(resources, root_namespace=root_namespace)
    authentication = read_request_authentications(resources, root_namespace=root_namespace)
    errors += [
        *routes.errors,
        *rules.errors,
        *authorization.errors,
        *authentication.errors,
    ]
    notes = (*routes.notes, *rules.notes, *authorization.notes, *authentication.notes)
    return WaypointConfig(
        routes=routes,
        destination_rules=rules,
        authorization=authorization,
        authentication=authentication,
        services=services,
        telemetry=tuple(telemetry),
        errors=tuple(errors),
        notes=notes,
    )


__all__ = [
    "UNKNOWN",
    "ServicePort",
    "ServicePorts",
    "WaypointConfig",
    "build_config",
    "select_protocol",
]
