"""Kubernetes and Istio resources -> the workload and L4 policy model the node agent enforces.

The input is what users write (Namespace, Pod, Service, ServiceEntry, AuthorizationPolicy,
PeerAuthentication, waypoint Gateway); the output is a `ConfigSnapshot` of `Workload`,
`Service` and `Authorization` values, the same types ztunnel's local config and istiod's
workload xDS produce, so the node agent consumes it unchanged. The meaning follows istiod's
ambient controller:

- Pods become workloads `<cluster>//Pod/<ns>/<name>`, HBONE when their namespace (or the pod)
  is labelled `istio.io/dataplane-mode=ambient` and the pod does not opt out with `none`;
  the Services and ServiceEntries that select a pod fill its `services` map, named target
  ports resolved from the pod's container ports.
- Services and ServiceEntry hosts become services `<ns>/<hostname>`; ServiceEntry endpoints
  become workloads.
- AuthorizationPolicy becomes an L4 policy: scope GLOBAL (root namespace, no selector),
  NAMESPACE (no selector) or WORKLOAD_SELECTOR (listed in the selected workloads'
  `authorization_policies`). Attributes the node agent cannot see (HTTP methods, paths, hosts,
  request principals, remote IPs, trust domains, HTTP `when` keys) fail closed: an ALLOW rule
  using them is dropped, a DENY rule keeps only its L4 part (a DENY rule left with nothing to
  match denies everything in scope, as Istio does for TCP traffic). Policies with `targetRefs`
  belong to waypoints and AUDIT/CUSTOM ones are not enforced here: both are skipped with a note.
- PeerAuthentication becomes istiod's static `istio_converted_static_strict` DENY policy listed
  by every workload whose effective mode is STRICT, plus a `converted_peer_authentication_<name>`
  policy for a workload policy whose port-level modes differ from its effective mode.
- A Gateway of class `istio-waypoint` is a waypoint; `istio.io/use-waypoint` on a Pod or
  Service (or else its namespace) points the workload or service at it, `none` opts out.

Every resource is checked on its own: a bad one is left out with a `ResourceError` naming its
kind, `namespace/name`, the field path and the reason, and everything else is translated.
Resource kinds that play no part here are ignored. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity, InvalidIdentity
from ztagent.istio.authorization.l4 import DEFAULT_ROOT_NAMESPACE, STATIC_STRICT_POLICY_NAME
from ztagent.istio.envelope import Resource, ResourceError
from ztagent.model.fields import Invalid, show
from ztagent.model.fields import at as _at
from ztagent.model.fields import kube_type_name as _type_name
from ztagent.model.fields import labels as _labels
from ztagent.model.fields import mapping as _map
from ztagent.model.fields import only as _only
from ztagent.model.fields import sequence as _list
from ztagent.model.fields import string as _str
from ztagent.model.fields import strings as _strings
from ztagent.model.policy import (
    Action,
    Authorization,
    CidrMatch,
    Clause,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.workload import (
    HBONE_MTLS_PORT,
    GatewayAddress,
    IPAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)

log = logging.getLogger(__name__)

DEFAULT_CLUSTER_ID = "Kubernetes"
DEFAULT_DOMAIN_SUFFIX = "cluster.local"
WAYPOINT_CLASS = "istio-waypoint"
CONVERTED_PEER_AUTHENTICATION_PREFIX = "converted_peer_authentication_"

LABEL_DATAPLANE_MODE = "istio.io/dataplane-mode"
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"
LABEL_USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
LABEL_GATEWAY_MANAGED = "gateway.istio.io/managed"
LABEL_TUNNEL = "networking.istio.io/tunnel"
LABEL_WORKLOAD_NAME = "service.istio.io/workload-name"
ANNOTATION_REDIRECTION = "ambient.istio.io/redirection"
ANNOTATION_SIDECAR_STATUS = "sidecar.istio.io/status"
ANNOTATION_DRY_RUN = "istio.io/dry-run"
MESH_CONTROLLER = "istio.io-mesh-controller"

_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
_WAYPOINT_FOR = ("service", "workload", "all", "none")
_MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
_RS_HASH = re.compile(r"-[bcdfghjklmnpqrstvwxz2456789]{6,10}$")
_CRONJOB_SUFFIX = re.compile(r"^(.+)-\d{8,10}$")

_KINDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "Namespace"): ("v1",),
    ("", "Pod"): ("v1",),
    ("", "Service"): ("v1",),
    ("networking.istio.io", "ServiceEntry"): ("v1", "v1beta1", "v1alpha3"),
    ("security.istio.io", "AuthorizationPolicy"): ("v1", "v1beta1"),
    ("security.istio.io", "PeerAuthentication"): ("v1", "v1beta1"),
    ("gateway.networking.k8s.io", "Gateway"): ("v1", "v1beta1"),
}


@dataclass(frozen=True, slots=True)
class TranslateOptions:
    """Mesh settings istiod takes from its flags and MeshConfig."""

    cluster_id: str = DEFAULT_CLUSTER_ID
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
    network: str = ""


@dataclass(frozen=True, slots=True)
class Translation:
    """The snapshot and the notes: resources accepted with a caveat or skipped on purpose."""

    snapshot: ConfigSnapshot
    notes: tuple[ResourceError, ...] = ()


def _port(value: object, path: str, *, low: int = 1) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        number = int(value)
    if number is None or not low <= number <= 65535:
        raise Invalid(path, f"{show(value)} is not a port number ({low}-65535)")
    return number


def _ip(value: object, path: str) -> IPAddress:
    if not isinstance(value, str):
        raise Invalid(path, f"must be an IP address string, got {_type_name(value)}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise Invalid(path, f"{show(value)} is not an IP address") from None


def _cidr(value: str, path: str) -> CidrMatch:
    try:
        return CidrMatch.parse(value)
    except ValueError:
        raise Invalid(path, f"{show(value)} is not an IP address or CIDR") from None


def _selector(value: object, path: str) -> dict[str, str] | None:
    """`selector.matchLabels`; None for no selector (an empty one selects nothing extra)."""
    if value is None:
        return None
    data = _map(value, path)
    _only(data, path, ("matchLabels",))
    labels = _labels(data.get("matchLabels"), _at(path, "matchLabels"))
    return labels or None


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- parsed resources --------------------------------------------------------------------------


@dataclass(slots=True)
class _Meta:
    resource: Resource
    kind: str
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    created: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(slots=True)
class _Pod:
    meta: _Meta
    ips: list[IPAddress]
    node: str
    service_account: str
    ready: bool
    container_ports: dict[str, int]
    workload_name: str
    workload_type: str
    host_network: bool
    terminal: bool


@dataclass(slots=True)
class _ServicePort:
    port: int
    target: int | str
    index: int


@dataclass(slots=True)
class _KubeService:
    meta: _Meta
    selector: dict[str, str]
    ports: list[_ServicePort]
    vips: list[IPAddress]


@dataclass(slots=True)
class _SEPort:
    number: int
    name: str
    target: int


@dataclass(slots=True)
class _SEEndpoint:
    address: str
    ip: IPAddress | None
    ports: dict[str, int]
    labels: dict[str, str]
    network: str
    service_account: str
    index: int


@dataclass(slots=True)
class _ServiceEntry:
    meta: _Meta
    hosts: list[str]
    addresses: list[IPAddress]
    ports: list[_SEPort]
    endpoints: list[_SEEndpoint]
    selector: dict[str, str] | None
    subject_alt_names: list[str]


@dataclass(slots=True)
class _AuthzPolicy:
    meta: _Meta
    policy: Authorization
    selector: dict[str, str] | None


@dataclass(slots=True)
class _PeerAuth:
    meta: _Meta
    selector: dict[str, str] | None
    mode: str
    ports: dict[int, str]

    @property
    def order(self) -> tuple[str, str, str]:
        return (self.meta.created, self.meta.namespace, self.meta.name)


@dataclass(slots=True)
class _Waypoint:
    meta: _Meta
    traffic: str
    address: GatewayAddress
    from_namespaces: str
    namespace_selector: dict[str, str] | None

    def serves(self, target: str) -> bool:
        return self.traffic in (target, "all")

    def admits(self, namespace: str, namespace_labels: Mapping[str, str]) -> bool:
        if self.from_namespaces == "All":
            return True
        if self.from_namespaces == "Selector":
            return self.namespace_selector is not None and _selects(
                self.namespace_selector, namespace_labels
            )
        return namespace == self.meta.namespace


@dataclass(slots=True)
class _Context:
    options: TranslateOptions
    errors: list[ResourceError] = field(default_factory=list)
    notes: list[ResourceError] = field(default_factory=list)
    namespaces: dict[str, _Meta] = field(default_factory=dict)
    pods: list[_Pod] = field(default_factory=list)
    services: list[_KubeService] = field(default_factory=list)
    entries: list[_ServiceEntry] = field(default_factory=list)
    authz: list[_AuthzPolicy] = field(default_factory=list)
    peer: list[_PeerAuth] = field(default_factory=list)
    waypoints: dict[tuple[str, str], _Waypoint] = field(default_factory=dict)
    reported: set[tuple[str, str, str]] = field(default_factory=set)

    def error(self, meta: _Meta, path: str, reason: str) -> None:
        token = (meta.kind + " " + meta.key, path, reason)
        if token in self.reported:
            return
        self.reported.add(token)
        res = meta.resource
        self.errors.append(ResourceError(meta.kind, res.index, meta.key, path, reason, res.file))

    def note(self, meta: _Meta, path: str, reason: str) -> None:
        res = meta.resource
        self.notes.append(ResourceError(meta.kind, res.index, meta.key, path, reason, res.file))
        log.debug("%s %s: %s", meta.kind, meta.key, reason)

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        meta = self.namespaces.get(namespace)
        return meta.labels if meta is not None else {}

    def hostname(self, name: str, namespace: str) -> str:
        return f"{name}.{namespace}.svc.{self.options.domain_suffix}"


def _meta(resource: Resource, *, namespaced: bool = True) -> _Meta:
    metadata = _map(resource.body.get("metadata"), "metadata")
    labels = _labels(metadata.get("labels"), "metadata.labels")
    annotations = _labels(metadata.get("annotations"), "metadata.annotations")
    created = metadata.get("creationTimestamp")
    created_text = "" if created is None else str(created)
    if namespaced:
        namespace = resource.namespace or "default"
    elif resource.namespace:
        raise Invalid("metadata.namespace", f"{resource.kind} is not namespaced")
    else:
        namespace = ""
    return _Meta(
        resource, resource.kind, resource.name, namespace, labels, annotations, created_text
    )


def _spec(resource: Resource) -> dict[str, Any]:
    return _map(resource.body.get("spec"), "spec")


# --- reading each kind -------------------------------------------------------------------------


def _read_namespace(ctx: _Context, resource: Resource) -> None:
    meta = _meta(resource, namespaced=False)
    ctx.namespaces[meta.name] = meta


def _owner(meta: _Meta) -> tuple[str, str]:
    """Workload name and type from the controller owner, as istiod's heuristics."""
    if LABEL_WORKLOAD_NAME in meta.labels:
        return meta.labels[LABEL_WORKLOAD_NAME], "pod"
    metadata = _map(meta.resource.body.get("metadata"), "metadata")
    for i, ref in enumerate(_list(metadata.get("ownerReferences"), "metadata.ownerReferences")):
        path = _at("metadata.ownerReferences", i)
        data = _map(ref, path)
        if data.get("controller") is not True:
            continue
        kind = _str(data.get("kind"), _at(path, "kind"))
        name = _str(data.get("name"), _at(path, "name"))
        if not name:
            raise Invalid(_at(path, "name"), "is required")
        if kind == "ReplicaSet":
            template_hash = meta.labels.get("pod-template-hash", "")
            if template_hash and name.endswith("-" + template_hash):
                return name[: -len(template_hash) - 1], "deployment"
            if not template_hash and _RS_HASH.search(name):
                return _RS_HASH.sub("", name), "deployment"
            return name, "pod"
        if kind == "Job":
            cron = _CRONJOB_SUFFIX.match(name)
            return (cron.group(1), "cronjob") if cron else (name, "job")
        return name, "pod"
    return meta.name, "pod"


def _read_pod(ctx: _Context, resource: Resource) -> None:
    meta = _meta(resource)
    spec = _spec(resource)
    status = _map(resource.body.get("status"), "status")
    ips: list[IPAddress] = []
    for i, item in enumerate(_list(status.get("podIPs"), "status.podIPs")):
        path = _at("status.podIPs", i)
        ips.append(_ip(_map(item, path).get("ip"), _at(path, "ip")))
    if not ips and status.get("podIP") not in (None, ""):
        ips.append(_ip(status.get("podIP"), "status.podIP"))
    if len(set(ips)) != len(ips):
        raise Invalid("status.podIPs", "lists an address twice")
    account = _str(spec.get("serviceAccountName"), "spec.serviceAccountName") or "default"
    try:
        Identity(ctx.options.trust_domain, meta.namespace, account)
    except InvalidIdentity as exc:
        raise Invalid("spec.serviceAccountName", f"no valid identity: {exc}") from None
    ready = False
    for i, item in enumerate(_list(status.get("conditions"), "status.conditions")):
        condition = _map(item, _at("status.conditions", i))
        if condition.get("type") == "Ready":
            ready = condition.get("status") in ("True", True)
    ports: dict[str, int] = {}
    for c, container in enumerate(_list(spec.get("containers"), "spec.containers")):
        cpath = _at("spec.containers", c)
        for p, item in enumerate(_list(_map(container, cpath).get("ports"), _at(cpath, "ports"))):
            ppath = _at(_at(cpath, "ports"), p)
            data = _map(item, ppath)
            name = _str(data.get("name"), _at(ppath, "name"))
            number = _port(data.get("containerPort"), _at(ppath, "containerPort"))
            protocol = _str(data.get("protocol"), _at(ppath, "protocol"), "TCP")
            if name and protocol == "TCP":
                ports.setdefault(name, number)
    workload_name, workload_type = _owner(meta)
    metadata = _map(resource.body.get("metadata"), "metadata")
    phase = status.get("phase")
    ctx.pods.append(
        _Pod(
            meta=meta,
            ips=ips,
            node=_str(spec.get("nodeName"), "spec.nodeName"),
            service_account=account,
            ready=ready and metadata.get("deletionTimestamp") is None,
            container_ports=ports,
            workload_name=workload_name,
            workload_type=workload_type,
            host_network=spec.get("hostNetwork") is True,
            terminal=phase in ("Succeeded", "Failed"),
        )
    )


def _read_service(ctx: _Context, resource: Resource) -> None:
    meta = _meta(resource)
    spec = _spec(resource)
    selector = _labels(spec.get("selector"), "spec.selector")
    ports: list[_ServicePort] = []
    seen: set[int] = set()
    for i, item in enumerate(_list(spec.get("ports"), "spec.ports")):
        path = _at("spec.ports", i)
        data = _map(item, path)
        number = _port(data.get("port"), _at(path, "port"))
        if number in seen:
            raise Invalid(_at(path, "port"), f"port {number} is listed twice")
        seen.add(number)
        raw_target = data.get("targetPort")
        target: int | str
        if raw_target is None:
            target = number
        elif isinstance(raw_target, str) and not raw_target.isdigit():
            if not raw_target:
                raise Invalid(_at(path, "targetPort"), "must not be empty")
            target = raw_target
        else:
            target = _port(raw_target, _at(path, "targetPort"))
        ports.append(_ServicePort(number, target, i))
    raw_ips = spec.get("clusterIPs")
    ip_path = "spec.clusterIPs"
    if raw_ips is None:
        raw_ips = [] if spec.get("clusterIP") is None else [spec.get("clusterIP")]
        ip_path = "spec.clusterIP"
    vips: list[IPAddress] = []
    for i, item in enumerate(_list(raw_ips, ip_path)):
        if item in ("None", ""):
            continue
        vips.append(_ip(item, _at(ip_path, i) if ip_path == "spec.clusterIPs" else ip_path))
    ctx.services.append(_KubeService(meta, selector, ports, vips))


def _read_service_entry(ctx: _Context, resource: Resource) -> None:
    meta = _meta(resource)
    spec = _spec(resource)
    hosts = _strings(spec.get("hosts"), "spec.hosts")
    if not hosts:
        raise Invalid("spec.hosts", "is required (at least one host)")
    addresses: list[IPAddress] = []
    for i, text in enumerate(_strings(spec.get("addresses"), "spec.addresses")):
        path = _at("spec.addresses", i)
        network = _cidr(text, path).network
        if network.prefixlen != network.max_prefixlen:
            raise Invalid(path, f"{show(text)}: CIDR ranges are not supported, give addresses")
        addresses.append(network.network_address)
    ports: list[_SEPort] = []
    for i, item in enumerate(_list(spec.get("ports"), "spec.ports")):
        path = _at("spec.ports", i)
        data = _map(item, path)
        number = _port(data.get("number"), _at(path, "number"))
        if any(p.number == number for p in ports):
            raise Invalid(_at(path, "number"), f"port {number} is listed twice")
        target = data.get("targetPort")
        ports.append(
            _SEPort(
                number,
                _str(data.get("name"), _at(path, "name")),
                number if target in (None, 0) else _port(target, _at(path, "targetPort")),
            )
        )
    endpoints: list[_SEEndpoint] = []
    for i, item in enumerate(_list(spec.get("endpoints"), "spec.endpoints")):
        path = _at("spec.endpoints", i)
        data = _map(item, path)
        address = _str(data.get("address"), _at(path, "address"))
        ip: IPAddress | None = None
        if address.startswith("unix://"):
            raise Invalid(_at(path, "address"), "unix domain socket endpoints are not supported")
        if address:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
        elif not data.get("network"):
            raise Invalid(_at(path, "address"), "is required")
        endpoint_ports: dict[str, int] = {}
        for name, number in _map(data.get("ports"), _at(path, "ports")).items():
            endpoint_ports[name] = _port(number, _at(_at(path, "ports"), name))
        account = _str(data.get("serviceAccount"), _at(path, "serviceAccount")) or "default"
        try:
            Identity(ctx.options.trust_domain, meta.namespace, account)
        except InvalidIdentity as exc:
            raise Invalid(_at(path, "serviceAccount"), f"no valid identity: {exc}") from None
        endpoints.append(
            _SEEndpoint(
                address=address,
                ip=ip,
                ports=endpoint_ports,
                labels=_labels(data.get("labels"), _at(path, "labels")),
                network=_str(data.get("network"), _at(path, "network")),
                service_account=account,
                index=i,
            )
        )
    selector: dict[str, str] | None = None
    if spec.get("workloadSelector") is not None:
        ws = _map(spec.get("workloadSelector"), "spec.workloadSelector")
        selector = _labels(ws.get("labels"), "spec.workloadSelector.labels") or None
        if endpoints:
            raise Invalid("spec.workloadSelector", "cannot be used together with endpoints")
    sans = _strings(spec.get("subjectAltNames"), "spec.subjectAltNames")
    ctx.entries.append(_ServiceEntry(meta, hosts, addresses, ports, endpoints, selector, sans))


def _read_gateway(ctx: _Context, resource: Resource) -> None:
    meta = _meta(resource)
    spec = _spec(resource)
    if spec.get("gatewayClassName") != WAYPOINT_CLASS:
        log.debug("Gateway %s is not a waypoint; ignored", meta.key)
        return
    traffic = meta.labels.get(LABEL_WAYPOINT_FOR, "service")
    if traffic not in _WAYPOINT_FOR:
        raise Invalid(
            _at("metadata.labels", LABEL_WAYPOINT_FOR),
            f"{show(traffic)} is not one of {', '.join(_WAYPOINT_FOR)}",
        )
    from_namespaces = "Same"
    selector: dict[str, str] | None = None
    hbone = False
    for i, item in enumerate(_list(spec.get("listeners"), "spec.listeners")):
        path = _at("spec.listeners", i)
        listener = _map(item, path)
        if listener.get("protocol") != "HBONE":
            continue
        _port(listener.get("port"), _at(path, "port"))
        hbone = True
        routes = _map(listener.get("allowedRoutes"), _at(path, "allowedRoutes"))
        namespaces = _map(routes.get("namespaces"), _at(_at(path, "allowedRoutes"), "namespaces"))
        npath = _at(_at(path, "allowedRoutes"), "namespaces")
        from_namespaces = _str(namespaces.get("from"), _at(npath, "from"), "Same")
        if from_namespaces not in ("Same", "All", "Selector"):
            raise Invalid(_at(npath, "from"), f"{show(from_namespaces)} is not Same, All, Selector")
        if from_namespaces == "Selector":
            selector = _selector(namespaces.get("selector"), _at(npath, "selector")) or {}
        break
    if not hbone:
        ctx.note(meta, "spec.listeners", "no HBONE listener (expected port 15008, protocol HBONE)")
    address = GatewayAddress(
        hostname=NamespacedHostname(meta.namespace, ctx.hostname(meta.name, meta.namespace)),
        hbone_mtls_port=HBONE_MTLS_PORT,
    )
    status = _map(resource.body.get("status"), "status")
    for i, item in enumerate(_list(status.get("addresses"), "status.addresses")):
        data = _map(item, _at("status.addresses", i))
        if data.get("type") == "Hostname" and isinstance(data.get("value"), str):
            host = data["value"]
            address = GatewayAddress(hostname=NamespacedHostname(meta.namespace, host))
            break
    ctx.waypoints[(meta.namespace, meta.name)] = _Waypoint(
        meta, traffic, address, from_namespaces, selector
    )


# --- AuthorizationPolicy -----------------------------------------------------------------------

_SOURCE_L4 = (
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
)
_SOURCE_OTHER = (
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "trustDomains",
    "notTrustDomains",
)
_OPERATION_L4 = ("ports", "notPorts")
_OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_WHEN_L4 = (
    "source.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "destination.ip",
    "destination.port",
)
_WHEN_OTHER_EXACT = (
    "remote.ip",
    "source.trustDomain",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
)
_WHEN_OTHER_PREFIX = ("request.headers[", "request.auth.claims[", "experimental.envoy.filters.")
_WHEN_REJECTED = {
    "destination.namespace": "is replaced by the policy's namespace",
    "destination.name": "is no longer supported",
    "destination.user": "is no longer supported",
}


def _service_account(text: str, path: str, namespace: str) -> ServiceAccountMatch:
    ns, slash, account = text.partition("/")
    if not slash:
        ns, account = namespace, text
    if not ns or not account or "/" in account or "*" in text:
        raise Invalid(path, f'{show(text)} is not "namespace/serviceaccount" or "serviceaccount"')
    return ServiceAccountMatch(ns, account)


def _source_match(value: object, path: str, namespace: str) -> tuple[Match, list[str]]:
    src = _map(value, path)
    _only(src, path, _SOURCE_L4 + _SOURCE_OTHER)
    if not any(src.get(key) for key in _SOURCE_L4 + _SOURCE_OTHER):
        raise Invalid(path, "must not be empty")
    values = {key: _strings(src.get(key), _at(path, key)) for key in _SOURCE_L4 + _SOURCE_OTHER}
    if (values["serviceAccounts"] or values["notServiceAccounts"]) and (
        values["principals"]
        or values["notPrincipals"]
        or values["namespaces"]
        or values["notNamespaces"]
    ):
        raise Invalid(path, "serviceAccounts cannot be combined with principals or namespaces")
    for key in ("remoteIpBlocks", "notRemoteIpBlocks"):
        for i, text in enumerate(values[key]):
            _cidr(text, _at(_at(path, key), i))

    def cidrs(key: str) -> tuple[CidrMatch, ...]:
        return tuple(_cidr(t, _at(_at(path, key), i)) for i, t in enumerate(values[key]))

    def accounts(key: str) -> tuple[ServiceAccountMatch, ...]:
        return tuple(
            _service_account(t, _at(_at(path, key), i), namespace)
            for i, t in enumerate(values[key])
        )

    match = Match(
        principals=tuple(StringMatch.from_istio(t) for t in values["principals"]),
        not_principals=tuple(StringMatch.from_istio(t) for t in values["notPrincipals"]),
        namespaces=tuple(StringMatch.from_istio(t) for t in values["namespaces"]),
        not_namespaces=tuple(StringMatch.from_istio(t) for t in values["notNamespaces"]),
        source_ips=cidrs("ipBlocks"),
        not_source_ips=cidrs("notIpBlocks"),
        service_accounts=accounts("serviceAccounts"),
        not_service_accounts=accounts("notServiceAccounts"),
    )
    return match, [key for key in _SOURCE_OTHER if values[key]]


def _operation_match(value: object, path: str) -> tuple[Match, list[str]]:
    op = _map(value, path)
    _only(op, path, _OPERATION_L4 + _OPERATION_L7)
    if not any(op.get(key) for key in _OPERATION_L4 + _OPERATION_L7):
        raise Invalid(path, "must not be empty")

    def ports(key: str) -> tuple[int, ...]:
        items = _list(op.get(key), _at(path, key))
        return tuple(_port(p, _at(_at(path, key), i), low=0) for i, p in enumerate(items))

    l7 = [key for key in _OPERATION_L7 if _strings(op.get(key), _at(path, key))]
    return Match(destination_ports=ports("ports"), not_destination_ports=ports("notPorts")), l7


def _when_values(
    key: str, values: list[str], path: str, namespace: str
) -> dict[str, tuple[Any, ...]]:
    if key in ("source.ip", "destination.ip", "remote.ip"):
        cidrs = tuple(_cidr(v, _at(path, i)) for i, v in enumerate(values))
        return {
            "source.ip": {"source_ips": cidrs},
            "destination.ip": {"destination_ips": cidrs},
        }.get(key, {})
    if key == "destination.port":
        return {
            "destination_ports": tuple(_port(v, _at(path, i), low=0) for i, v in enumerate(values))
        }
    if key == "source.serviceAccount":
        return {
            "service_accounts": tuple(
                _service_account(v, _at(path, i), namespace) for i, v in enumerate(values)
            )
        }
    strings = tuple(StringMatch.from_istio(v) for v in values)
    if key == "source.namespace":
        return {"namespaces": strings}
    if key == "source.principal":
        return {"principals": strings}
    return {}


def _when_match(value: object, path: str, namespace: str) -> tuple[Match | None, str | None]:
    """The Match for one `when` condition, or (None, key) for a key L4 cannot see."""
    cond = _map(value, path)
    _only(cond, path, ("key", "values", "notValues"))
    key = _str(cond.get("key"), _at(path, "key"))
    if not key:
        raise Invalid(_at(path, "key"), "is required")
    values = _strings(cond.get("values"), _at(path, "values"))
    not_values = _strings(cond.get("notValues"), _at(path, "notValues"))
    if not values and not not_values:
        raise Invalid(path, f"at least one of values and notValues must be set for {key}")
    if key in _WHEN_REJECTED:
        raise Invalid(_at(path, "key"), f"{key} {_WHEN_REJECTED[key]}")
    known = (
        key in _WHEN_L4
        or key in _WHEN_OTHER_EXACT
        or (key.startswith(_WHEN_OTHER_PREFIX) and key.endswith("]"))
        or key.startswith("experimental.envoy.filters.")
    )
    if not known:
        raise Invalid(_at(path, "key"), f"{show(key)} is not a known attribute")
    positive = _when_values(key, values, _at(path, "values"), namespace)
    negative = _when_values(key, not_values, _at(path, "notValues"), namespace)
    if key not in _WHEN_L4:
        return None, key
    fields_: dict[str, Any] = dict(positive)
    for name, items in negative.items():
        fields_["not_" + name] = items
    return Match(**fields_), None


def _rule(
    value: object, path: str, action: Action, namespace: str
) -> tuple[Rule | None, list[str]]:
    """One AuthorizationPolicy rule; None when an ALLOW rule is dropped for its L7 part."""
    if value is None:
        raise Invalid(path, "must not be null (use {} to match everything)")
    data = _map(value, path)
    _only(data, path, ("from", "to", "when"))
    clauses: list[Clause] = []
    unseen: list[str] = []

    def entries(
        key: str, inner: str, read: Callable[[object, str], tuple[Match, list[str]]]
    ) -> None:
        if key not in data:
            return
        items = _list(data[key], _at(path, key))
        if not items:
            raise Invalid(_at(path, key), "must not be empty when given")
        matches: list[Match] = []
        match_all = False
        for i, item in enumerate(items):
            ipath = _at(_at(path, key), i)
            entry = _map(item, ipath)
            _only(entry, ipath, (inner,))
            if entry.get(inner) is None:
                raise Invalid(_at(ipath, inner), "is required")
            match, other = read(entry[inner], _at(ipath, inner))
            unseen.extend(f"{key}.{inner}.{name}" for name in other)
            if match.is_empty:
                match_all = True
            else:
                matches.append(match)
        if not match_all:
            clauses.append(Clause(tuple(matches)))

    entries("from", "source", lambda v, p: _source_match(v, p, namespace))
    entries("to", "operation", _operation_match)
    for i, item in enumerate(_list(data.get("when"), _at(path, "when"))):
        match, other = _when_match(item, _at(_at(path, "when"), i), namespace)
        if match is None:
            unseen.append(f"when {other}")
        else:
            clauses.append(Clause((match,)))
    if unseen and action is Action.ALLOW:
        return None, unseen
    return Rule(tuple(clauses)), unseen


def _read_authorization_policy(ctx: _Context, resource: Resource) -> None:
    meta = _meta(resource)
    spec = _spec(resource)
    _only(spec, "spec", ("selector", "targetRef", "targetRefs", "action", "provider", "rules"))
    selector = _selector(spec.get("selector"), "spec.selector")
    if spec.get("targetRef") is not None or spec.get("targetRefs"):
        if spec.get("selector") is not None:
            raise Invalid("spec", "selector cannot be combined with targetRef/targetRefs")
        ctx.note(
            meta, "spec.targetRefs", "attached to a waypoint by targetRefs; not for the node agent"
        )
        return
    action_name = _str(spec.get("action"), "spec.action", "ALLOW")
    if action_name in ("AUDIT", "CUSTOM"):
        ctx.note(meta, "spec.action", f"{action_name} policies are not enforced by the node agent")
        return
    if action_name not in ("ALLOW", "DENY"):
        raise Invalid(
            "spec.action", f"{show(action_name)} is not one of ALLOW, DENY, AUDIT, CUSTOM"
        )
    if spec.get("provider") is not None:
        raise Invalid("spec.provider", "is only allowed with action CUSTOM")
    action = Action(action_name)
    dry_run_text = meta.annotations.get(ANNOTATION_DRY_RUN, "false").lower()
    if dry_run_text not in ("true", "false"):
        raise Invalid(
            _at("metadata.annotations", ANNOTATION_DRY_RUN),
            f"{show(dry_run_text)} is not true or false",
        )
    rules: list[Rule] = []
    raw_rules = _list(spec.get("rules"), "spec.rules")
    for i, item in enumerate(raw_rules):
        path = _at("spec.rules", i)
        rule, unseen = _rule(item, path, action, meta.namespace)
        if unseen:
            found = ", ".join(sorted(set(unseen)))
            if rule is None:
                reason = f"ALLOW rule dropped: the node agent cannot check {found} (use a waypoint)"
            elif not rule.clauses:
                reason = f"DENY rule enforced without {found}: it now denies all traffic in scope"
            else:
                reason = f"DENY rule enforced without {found} (more restrictive than written)"
            ctx.note(meta, path, reason)
        if rule is not None:
            rules.append(rule)
    if not raw_rules and action is Action.DENY:
        ctx.note(meta, "spec.rules", "a DENY policy without rules denies nothing")
    if selector is not None:
        scope = Scope.WORKLOAD_SELECTOR
    elif meta.namespace == ctx.options.root_namespace:
        scope = Scope.GLOBAL
    else:
        scope = Scope.NAMESPACE
    policy = Authorization(
        name=meta.name,
        namespace=meta.namespace,
        scope=scope,
        action=action,
        rules=tuple(rules),
        dry_run=dry_run_text == "true",
    )
    ctx.authz.append(_AuthzPolicy(meta, policy, selector))


# --- PeerAuthentication ------------------------------------------------------------------------


def _mode(value: object, path: str) -> str:
    data = _map(value, path)
    _only(data, path, ("mode",))
    mode = _str(data.get("mode"), _at(path, "mode"), "UNSET")
    if mode not in _MTLS_MODES:
        raise Invalid(_at(path, "mode"), f"{show(mode)} is not one of {', '.join(_MTLS_MODES)}")
    return mode


def _read_peer_authentication(ctx: _Context, resource: Resource) -> None:
    meta = _meta(resource)
    spec = _spec(resource)
    _only(spec, "spec", ("selector", "mtls", "portLevelMtls"))
    selector = _selector(spec.get("selector"), "spec.selector")
    mode = _mode(spec.get("mtls"), "spec.mtls")
    ports: dict[int, str] = {}
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None:
        if not isinstance(raw_ports, dict):
            raise Invalid("spec.portLevelMtls", f"must be a mapping, got {_type_name(raw_ports)}")
        for key, item in raw_ports.items():
            path = _at("spec.portLevelMtls", str(key))
            ports[_port(key, path)] = _mode(item, path)
        if ports and selector is None:
            raise Invalid("spec.portLevelMtls", "requires a workload selector")
    if selector is not None and meta.namespace == ctx.options.root_namespace:
        ctx.note(meta, "spec.selector", "a selector policy in the root namespace has no effect")
    ctx.peer.append(_PeerAuth(meta, selector, mode, ports))


_READERS: dict[str, Callable[[_Context, Resource], None]] = {
    "Namespace": _read_namespace,
    "Pod": _read_pod,
    "Service": _read_service,
    "ServiceEntry": _read_service_entry,
    "AuthorizationPolicy": _read_authorization_policy,
    "PeerAuthentication": _read_peer_authentication,
    "Gateway": _read_gateway,
}


def _peek_meta(resource: Resource) -> _Meta:
    namespace = "" if resource.kind == "Namespace" else resource.namespace or "default"
    return _Meta(resource, resource.kind, resource.name, namespace, {}, {}, "")


def _read(ctx: _Context, resources: Iterable[Resource]) -> None:
    seen: dict[tuple[str, str, str, str], Resource] = {}
    for resource in resources:
        versions = _KINDS.get((resource.group, resource.kind))
        if versions is None:
            log.debug("ignoring %s %s (%s)", resource.kind, resource.name, resource.location)
            continue
        meta = _peek_meta(resource)
        version = resource.api_version.rpartition("/")[2]
        if version not in versions:
            ctx.error(
                meta,
                "apiVersion",
                f"{show(resource.api_version)} is not supported (use "
                + ", ".join(
                    f"{resource.group + '/' if resource.group else ''}{v}" for v in versions
                )
                + ")",
            )
            continue
        identity = (resource.group, resource.kind, meta.namespace, resource.name)
        if identity in seen:
            ctx.error(meta, "", f"duplicate of the one in {seen[identity].location}")
            continue
        seen[identity] = resource
        try:
            _READERS[resource.kind](ctx, resource)
        except Invalid as exc:
            ctx.error(meta, exc.path, exc.reason)
        except RecursionError:
            ctx.error(meta, "", "nested too deeply")


# --- waypoints ---------------------------------------------------------------------------------


def _waypoint(
    ctx: _Context, meta: _Meta, target: str, labels: Mapping[str, str] | None = None
) -> GatewayAddress | None:
    """The waypoint `meta` (a Pod, Service, ServiceEntry) uses for `target` traffic."""
    labels = meta.labels if labels is None else labels
    path = _at("metadata.labels", LABEL_USE_WAYPOINT)
    name = labels.get(LABEL_USE_WAYPOINT)
    ns_labels = ctx.namespace_labels(meta.namespace)
    if name == "none":
        return None
    if name is not None:
        wns = labels.get(LABEL_USE_WAYPOINT_NAMESPACE) or meta.namespace
        waypoint = ctx.waypoints.get((wns, name))
        if waypoint is None:
            ctx.error(
                meta,
                path,
                f"waypoint {wns}/{name} not found (no Gateway of class {WAYPOINT_CLASS})",
            )
            return None
        if not waypoint.admits(meta.namespace, ns_labels):
            ctx.error(
                meta, path, f"waypoint {wns}/{name} does not accept namespace {meta.namespace}"
            )
            return None
        if not waypoint.serves(target):
            ctx.error(
                meta, path, f"waypoint {wns}/{name} is for {waypoint.traffic} traffic, not {target}"
            )
            return None
        return waypoint.address
    ns_meta = ctx.namespaces.get(meta.namespace)
    name = ns_labels.get(LABEL_USE_WAYPOINT)
    if ns_meta is None or name is None or name == "none":
        return None
    wns = ns_labels.get(LABEL_USE_WAYPOINT_NAMESPACE) or meta.namespace
    waypoint = ctx.waypoints.get((wns, name))
    if waypoint is None:
        ctx.error(
            ns_meta, path, f"waypoint {wns}/{name} not found (no Gateway of class {WAYPOINT_CLASS})"
        )
        return None
    if not waypoint.admits(meta.namespace, ns_labels):
        ctx.error(
            ns_meta, path, f"waypoint {wns}/{name} does not accept namespace {meta.namespace}"
        )
        return None
    return waypoint.address if waypoint.serves(target) else None


def _is_waypoint_instance(ctx: _Context, meta: _Meta) -> bool:
    if meta.labels.get(LABEL_GATEWAY_MANAGED) == MESH_CONTROLLER:
        return True
    name = meta.labels.get(LABEL_GATEWAY_NAME)
    return name is not None and (meta.namespace, name) in ctx.waypoints


# --- PeerAuthentication conversion -------------------------------------------------------------


def _oldest(candidates: Iterable[_PeerAuth]) -> _PeerAuth | None:
    return min(candidates, key=lambda pa: pa.order, default=None)


@dataclass(slots=True)
class _PeerScope:
    mesh: _PeerAuth | None
    namespace: _PeerAuth | None

    @property
    def parent_strict(self) -> bool:
        """The effective mode above the workload policy is STRICT (namespace, else mesh)."""
        if self.namespace is not None and self.namespace.mode != "UNSET":
            return self.namespace.mode == "STRICT"
        return self.mesh is not None and self.mesh.mode == "STRICT"


def _peer_scope(ctx: _Context, namespace: str) -> _PeerScope:
    root = ctx.options.root_namespace
    mesh = _oldest(pa for pa in ctx.peer if pa.meta.namespace == root and pa.selector is None)
    ns = None
    if namespace != root:
        ns = _oldest(
            pa for pa in ctx.peer if pa.meta.namespace == namespace and pa.selector is None
        )
    return _PeerScope(mesh, ns)


_NO_IDENTITY = Match(not_principals=(StringMatch.presence(),))
_NON_STRICT = ("PERMISSIVE", "DISABLE")


def _converted_peer_policy(ctx: _Context, pa: _PeerAuth) -> Authorization | None:
    """A workload PeerAuthentication with port-level modes as a DENY policy (istiod's shape)."""
    if pa.selector is None or not pa.ports or pa.meta.namespace == ctx.options.root_namespace:
        return None
    scope = _peer_scope(ctx, pa.meta.namespace)
    parent_strict = pa.mode == "STRICT" or (pa.mode == "UNSET" and scope.parent_strict)
    clauses: list[Clause] = []
    rules: list[Rule] = []
    if pa.mode == "STRICT":
        clauses.append(Clause((_NO_IDENTITY,)))
    found_non_strict = False
    for port, mode in sorted(pa.ports.items()):
        if mode == "STRICT":
            if parent_strict:
                continue
            strict_port = Match(not_principals=(StringMatch.presence(),), destination_ports=(port,))
            rules.append(Rule((Clause((strict_port,)),)))
        elif mode in _NON_STRICT:
            if not parent_strict:
                continue
            found_non_strict = True
            clauses.append(Clause((Match(not_destination_ports=(port,)),)))
    if pa.mode == "STRICT" and not found_non_strict:
        return None
    if found_non_strict and Clause((_NO_IDENTITY,)) not in clauses:
        clauses.append(Clause((_NO_IDENTITY,)))
    if clauses:
        rules.append(Rule(tuple(clauses)))
    if not rules:
        return None
    return Authorization(
        name=CONVERTED_PEER_AUTHENTICATION_PREFIX + pa.meta.name,
        namespace=pa.meta.namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=tuple(rules),
    )


def _peer_keys(
    ctx: _Context, namespace: str, labels: Mapping[str, str], converted: Mapping[str, Authorization]
) -> list[str]:
    """The PeerAuthentication-derived policies a workload lists, as istiod computes them."""
    if not ctx.peer:
        return []
    root = ctx.options.root_namespace
    scope = _peer_scope(ctx, namespace)
    strict = scope.parent_strict
    workload = None
    if namespace != root:
        workload = _oldest(
            pa
            for pa in ctx.peer
            if pa.meta.namespace == namespace
            and pa.selector is not None
            and _selects(pa.selector, labels)
        )
    port_key = ""
    if workload is not None:
        if workload.mode == "STRICT":
            strict = True
        elif workload.mode in _NON_STRICT:
            strict = False
        modes = set(workload.ports.values())
        key = (
            f"{workload.meta.namespace}/{CONVERTED_PEER_AUTHENTICATION_PREFIX}{workload.meta.name}"
        )
        if modes and key in converted:
            if workload.mode == "STRICT" and modes & set(_NON_STRICT):
                port_key, strict = key, False
            elif workload.mode in _NON_STRICT and "STRICT" in modes:
                port_key = key
            elif workload.mode == "UNSET":
                if strict and modes & set(_NON_STRICT):
                    port_key, strict = key, False
                elif not strict and "STRICT" in modes:
                    port_key = key
    keys = [f"{root}/{STATIC_STRICT_POLICY_NAME}"] if strict else []
    if port_key:
        keys.append(port_key)
    return sorted(keys)


def _static_strict(ctx: _Context) -> Authorization:
    return Authorization(
        name=STATIC_STRICT_POLICY_NAME,
        namespace=ctx.options.root_namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=(Rule((Clause((_NO_IDENTITY,)),)),),
    )


# --- assembling the snapshot -------------------------------------------------------------------


def _canonical(labels: Mapping[str, str], workload_name: str) -> tuple[str, str]:
    name = next((labels[k] for k in _NAME_LABELS if k in labels), workload_name)
    revision = next((labels[k] for k in _REVISION_LABELS if k in labels), "latest")
    return name, revision


def _selector_policies(ctx: _Context, namespace: str, labels: Mapping[str, str]) -> list[str]:
    root = ctx.options.root_namespace
    return sorted(
        p.policy.key
        for p in ctx.authz
        if p.selector is not None
        and p.policy.namespace in (namespace, root)
        and _selects(p.selector, labels)
    )


def _pod_enrolled(ctx: _Context, pod: _Pod) -> bool:
    meta = pod.meta
    mode = meta.labels.get(LABEL_DATAPLANE_MODE)
    if mode == "none" or ANNOTATION_SIDECAR_STATUS in meta.annotations:
        return False
    if mode == "ambient" or meta.annotations.get(ANNOTATION_REDIRECTION) == "enabled":
        return True
    return ctx.namespace_labels(meta.namespace).get(LABEL_DATAPLANE_MODE) == "ambient"


def _pod_services(ctx: _Context, pod: _Pod) -> dict[str, dict[int, int]]:
    services: dict[str, dict[int, int]] = {}
    meta = pod.meta
    for svc in ctx.services:
        if svc.meta.namespace != meta.namespace or not svc.selector:
            continue
        if not _selects(svc.selector, meta.labels):
            continue
        ports: dict[int, int] = {}
        for port in svc.ports:
            if isinstance(port.target, int):
                ports[port.port] = port.target
            elif port.target in pod.container_ports:
                ports[port.port] = pod.container_ports[port.target]
            else:
                ctx.error(
                    svc.meta,
                    _at(_at("spec.ports", port.index), "targetPort"),
                    f"named port {show(port.target)} is not a TCP container port of pod "
                    f"{meta.key}; port {port.port} is left out for that pod",
                )
        services[f"{meta.namespace}/{ctx.hostname(svc.meta.name, meta.namespace)}"] = ports
    for entry in ctx.entries:
        if entry.meta.namespace != meta.namespace or entry.selector is None:
            continue
        if not _selects(entry.selector, meta.labels):
            continue
        se_ports = {
            p.number: pod.container_ports.get(p.name, p.target) if p.name else p.target
            for p in entry.ports
        }
        for host in entry.hosts:
            services.setdefault(f"{meta.namespace}/{host}", se_ports)
    return services


def _pod_workload(
    ctx: _Context, pod: _Pod, converted: Mapping[str, Authorization]
) -> Workload | None:
    meta = pod.meta
    if pod.terminal:
        return None
    if pod.host_network:
        ctx.note(meta, "spec.hostNetwork", "host-network pods are not part of the mesh")
        return None
    if not pod.ips:
        ctx.note(meta, "status.podIPs", "no IP address yet; not a workload until it has one")
        return None
    opts = ctx.options
    enrolled = _pod_enrolled(ctx, pod)
    waypoint = None if _is_waypoint_instance(ctx, meta) else _waypoint(ctx, meta, "workload")
    canonical_name, canonical_revision = _canonical(meta.labels, pod.workload_name)
    policies = _selector_policies(ctx, meta.namespace, meta.labels)
    policies += _peer_keys(ctx, meta.namespace, meta.labels, converted)
    return Workload(
        uid=f"{opts.cluster_id}//Pod/{meta.namespace}/{meta.name}",
        name=meta.name,
        namespace=meta.namespace,
        addresses=tuple(pod.ips),
        network=opts.network,
        tunnel_protocol=TunnelProtocol.HBONE if enrolled else TunnelProtocol.NONE,
        trust_domain=opts.trust_domain,
        service_account=pod.service_account,
        waypoint=waypoint,
        node=pod.node,
        canonical_name=canonical_name,
        canonical_revision=canonical_revision,
        workload_type=pod.workload_type,
        workload_name=pod.workload_name,
        authorization_policies=tuple(policies),
        status=WorkloadStatus.HEALTHY if pod.ready else WorkloadStatus.UNHEALTHY,
        cluster_id=opts.cluster_id,
        services=_pod_services(ctx, pod),
    )


def _kube_service(ctx: _Context, svc: _KubeService) -> Service:
    meta = svc.meta
    waypoint = None if _is_waypoint_instance(ctx, meta) else _waypoint(ctx, meta, "service")
    return Service(
        name=meta.name,
        namespace=meta.namespace,
        hostname=ctx.hostname(meta.name, meta.namespace),
        addresses=tuple(NetworkAddress(ctx.options.network, ip) for ip in svc.vips),
        ports={p.port: p.target if isinstance(p.target, int) else 0 for p in svc.ports},
        waypoint=waypoint,
    )


def _entry_services(ctx: _Context, entry: _ServiceEntry) -> list[Service]:
    meta = entry.meta
    waypoint = _waypoint(ctx, meta, "service")
    ports = {p.number: p.target for p in entry.ports}
    return [
        Service(
            name=meta.name,
            namespace=meta.namespace,
            hostname=host,
            addresses=tuple(NetworkAddress(ctx.options.network, ip) for ip in entry.addresses),
            ports=ports,
            subject_alt_names=tuple(entry.subject_alt_names),
            waypoint=waypoint,
        )
        for host in entry.hosts
    ]


def _entry_workloads(
    ctx: _Context, entry: _ServiceEntry, converted: Mapping[str, Authorization]
) -> list[Workload]:
    meta = entry.meta
    opts = ctx.options
    canonical_name, canonical_revision = _canonical(meta.labels, meta.name)
    policies = _selector_policies(ctx, meta.namespace, meta.labels)
    policies += _peer_keys(ctx, meta.namespace, meta.labels, converted)
    hbone = meta.labels.get(LABEL_TUNNEL) == "http"
    out: list[Workload] = []
    seen: set[str] = set()
    for endpoint in entry.endpoints:
        if endpoint.address in seen:
            ctx.error(
                meta,
                _at(_at("spec.endpoints", endpoint.index), "address"),
                f"{show(endpoint.address)} is listed twice",
            )
            continue
        seen.add(endpoint.address)
        services: dict[str, dict[int, int]] = {}
        for host in entry.hosts:
            services[f"{meta.namespace}/{host}"] = {
                p.number: endpoint.ports.get(p.name, p.target) for p in entry.ports
            }
        endpoint_meta = _Meta(
            meta.resource, meta.kind, meta.name, meta.namespace, endpoint.labels, {}, meta.created
        )
        out.append(
            Workload(
                uid=f"{opts.cluster_id}/networking.istio.io/ServiceEntry/"
                f"{meta.namespace}/{meta.name}/{endpoint.address}",
                name=meta.name,
                namespace=meta.namespace,
                addresses=(endpoint.ip,) if endpoint.ip is not None else (),
                hostname="" if endpoint.ip is not None else endpoint.address,
                network=endpoint.network or opts.network,
                tunnel_protocol=TunnelProtocol.HBONE if hbone else TunnelProtocol.NONE,
                trust_domain=opts.trust_domain,
                service_account=endpoint.service_account,
                waypoint=_waypoint(ctx, endpoint_meta, "workload"),
                canonical_name=canonical_name,
                canonical_revision=canonical_revision,
                workload_type="pod",
                workload_name=meta.name,
                authorization_policies=tuple(policies),
                status=WorkloadStatus.HEALTHY,
                cluster_id=opts.cluster_id,
                services=services,
            )
        )
    return out


def translate_resources(
    resources: Iterable[Resource], options: TranslateOptions | None = None
) -> Translation:
    """Translate `resources`; bad resources are left out with an error, nothing raises."""
    ctx = _Context(options or TranslateOptions())
    _read(ctx, resources)

    converted: dict[str, Authorization] = {}
    for pa in ctx.peer:
        policy = _converted_peer_policy(ctx, pa)
        if policy is not None:
            converted[policy.key] = policy

    workloads: list[Workload] = []
    claimed: dict[NetworkAddress, str] = {}

    def add_workload(workload: Workload, meta: _Meta, path: str) -> None:
        for address in workload.network_addresses:
            if address in claimed:
                shown = address if address.network else address.address
                ctx.error(meta, path, f"address {shown} is already used by {claimed[address]}")
                return
        for address in workload.network_addresses:
            claimed[address] = f"{meta.kind} {meta.key}"
        workloads.append(workload)

    for pod in ctx.pods:
        workload = _pod_workload(ctx, pod, converted)
        if workload is not None:
            add_workload(workload, pod.meta, "status.podIPs")
    for entry in ctx.entries:
        for workload in _entry_workloads(ctx, entry, converted):
            add_workload(workload, entry.meta, "spec.endpoints")

    services: list[Service] = []
    keys: dict[str, str] = {}
    vips: dict[NetworkAddress, str] = {}

    def add_service(service: Service, meta: _Meta, path: str) -> None:
        owner = f"{meta.kind} {meta.key}"
        if service.key in keys:
            ctx.error(
                meta, path, f"hostname {service.hostname} is already used by {keys[service.key]}"
            )
            return
        for address in service.addresses:
            if address in vips and vips[address] != owner:
                shown = address if address.network else address.address
                ctx.error(meta, path, f"address {shown} is already used by {vips[address]}")
                return
        keys[service.key] = owner
        for address in service.addresses:
            vips[address] = owner
        services.append(service)

    for svc in ctx.services:
        add_service(_kube_service(ctx, svc), svc.meta, "spec.clusterIPs")
    for entry in ctx.entries:
        for service in _entry_services(ctx, entry):
            add_service(service, entry.meta, "spec.hosts")

    policies = [p.policy for p in ctx.authz] + list(converted.values())
    if ctx.peer:
        policies.append(_static_strict(ctx))

    errors = sorted(ctx.errors, key=lambda e: (e.file, -1 if e.index is None else e.index))
    snapshot = ConfigSnapshot(
        workloads=tuple(sorted(workloads, key=lambda w: w.uid)),
        services=tuple(sorted(services, key=lambda s: s.key)),
        policies=tuple(sorted(policies, key=lambda p: p.key)),
        errors=tuple(errors),
    )
    return Translation(snapshot, tuple(ctx.notes))


def translate(
    resources: Iterable[Resource], options: TranslateOptions | None = None
) -> ConfigSnapshot:
    """`translate_resources` without the notes."""
    return translate_resources(resources, options).snapshot


# --- ztunnel's local config form ---------------------------------------------------------------


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


def to_local_config(snapshot: ConfigSnapshot) -> dict[str, Any]:
    """The snapshot as ztunnel's local config (`LOCAL_XDS_PATH`): plain, JSON-ready data.

    `parse_local_config` reads it back to an equal snapshot; string matches use
    AuthorizationPolicy spelling (`*`, `x*`, `*x`).
    """
    workloads = []
    for w in snapshot.workloads:
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
        workloads.append(data)
    services = []
    for s in snapshot.services:
        sdata: dict[str, Any] = {
            "name": s.name,
            "namespace": s.namespace,
            "hostname": s.hostname,
            "vips": [str(a) for a in s.addresses],
            "ports": {port: target for port, target in sorted(s.ports.items())},
        }
        if s.subject_alt_names:
            sdata["subjectAltNames"] = list(s.subject_alt_names)
        if s.waypoint is not None:
            sdata["waypoint"] = _gateway_data(s.waypoint)
        services.append(sdata)
    policies = []
    for p in snapshot.policies:
        pdata: dict[str, Any] = {
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
            pdata["dryRun"] = True
        policies.append(pdata)
    return {"workloads": workloads, "services": services, "policies": policies}


__all__ = [
    "DEFAULT_CLUSTER_ID",
    "DEFAULT_DOMAIN_SUFFIX",
    "TranslateOptions",
    "Translation",
    "to_local_config",
    "translate",
    "translate_resources",
]
