"""Kubernetes and Istio resources -> the workload and L4 policy model the node agent enforces.

The input is what users write (Namespace, Pod, Service, ServiceEntry, AuthorizationPolicy,
PeerAuthentication, waypoint Gateway); the output is a `ConfigSnapshot` of `Workload`,
`Service` and `Authorization` values, the same types ztunnel's local config and istiod's
workload xDS produce, so the node agent consumes it unchanged. Each kind is read by its module
under `ztagent.istio` (`kubernetes`, `serviceentry`, `gateway`, `peerauthentication`,
`authorization.policy`); this module dispatches the resources to them and assembles the
snapshot, following istiod's ambient controller:

- Pods become workloads `<cluster>//Pod/<ns>/<name>`, HBONE when their namespace (or the pod)
  is labelled `istio.io/dataplane-mode=ambient` and the pod does not opt out with `none`;
  the Services and ServiceEntries that select a pod fill its `services` map, named target
  ports resolved from the pod's container ports.
- Services and ServiceEntry hosts become services `<ns>/<hostname>`; ServiceEntry endpoints
  become workloads.
- AuthorizationPolicy becomes an L4 policy (`ztagent.istio.authorization.l4.lower`); a
  WORKLOAD_SELECTOR one is listed in the selected workloads' `authorization_policies`.
  Policies with `targetRefs` belong to waypoints and AUDIT/CUSTOM ones are not enforced here:
  both are skipped with a note.
- PeerAuthentication becomes istiod's static STRICT policy and converted port-level policies
  (`ztagent.istio.peerauthentication`).
- A Gateway of class `istio-waypoint` is a waypoint; `istio.io/use-waypoint` on a Pod or
  Service (or else its namespace) points the workload or service at it, `none` opts out.

Every resource is checked on its own: a bad one is left out with a `ResourceError` naming its
kind, `namespace/name`, the field path and the reason, and everything else is translated.
Resource kinds that play no part here are ignored. Pure: no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ztagent.fields import Invalid, show
from ztagent.fields import at as _at
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from ztagent.istio import gateway, kubernetes, peerauthentication, serviceentry
from ztagent.istio.authorization import l4
from ztagent.istio.authorization.policy import read_authorization_policy
from ztagent.istio.envelope import Resource, ResourceError
from ztagent.istio.gateway import WAYPOINT_CLASS, Waypoint
from ztagent.istio.kubernetes import KubeService, Meta, Pod, selects
from ztagent.istio.localconfig import to_local_config
from ztagent.istio.peerauthentication import PeerAuthentication
from ztagent.istio.serviceentry import ServiceEntry
from ztagent.model.policy import Authorization
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.workload import (
    GatewayAddress,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from ztagent.names import DEFAULT_DOMAIN_SUFFIX, DEFAULT_ROOT_NAMESPACE, service_hostname

log = logging.getLogger(__name__)

DEFAULT_CLUSTER_ID = "Kubernetes"

LABEL_DATAPLANE_MODE = "istio.io/dataplane-mode"
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"
LABEL_USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
LABEL_GATEWAY_MANAGED = "gateway.istio.io/managed"
LABEL_TUNNEL = "networking.istio.io/tunnel"
ANNOTATION_REDIRECTION = "ambient.istio.io/redirection"
ANNOTATION_SIDECAR_STATUS = "sidecar.istio.io/status"
MESH_CONTROLLER = "istio.io-mesh-controller"

_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")

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


@dataclass(slots=True)
class _Selected:
    """An L4 policy and the selector that lists it in workloads (None: by scope)."""

    policy: Authorization
    selector: Mapping[str, str] | None


@dataclass(slots=True)
class _Context:
    options: TranslateOptions
    errors: list[ResourceError] = field(default_factory=list)
    notes: list[ResourceError] = field(default_factory=list)
    namespaces: dict[str, Meta] = field(default_factory=dict)
    pods: list[Pod] = field(default_factory=list)
    services: list[KubeService] = field(default_factory=list)
    entries: list[ServiceEntry] = field(default_factory=list)
    authorization: list[_Selected] = field(default_factory=list)
    peer: list[PeerAuthentication] = field(default_factory=list)
    waypoints: dict[tuple[str, str], Waypoint] = field(default_factory=dict)
    reported: set[tuple[str, str, str]] = field(default_factory=set)

    def error(self, meta: Meta, path: str, reason: str) -> None:
        token = (meta.kind + " " + meta.key, path, reason)
        if token in self.reported:
            return
        self.reported.add(token)
        res = meta.resource
        self.errors.append(ResourceError(meta.kind, res.index, meta.key, path, reason, res.file))

    def note(self, meta: Meta, path: str, reason: str) -> None:
        res = meta.resource
        self.notes.append(ResourceError(meta.kind, res.index, meta.key, path, reason, res.file))
        log.debug("%s %s: %s", meta.kind, meta.key, reason)

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        meta = self.namespaces.get(namespace)
        return meta.labels if meta is not None else {}

    def hostname(self, name: str, namespace: str) -> str:
        return service_hostname(name, namespace, self.options.domain_suffix)


# --- reading each kind -------------------------------------------------------------------------


def _read_namespace(ctx: _Context, resource: Resource) -> None:
    meta = kubernetes.read_namespace(resource)
    ctx.namespaces[meta.name] = meta


def _read_pod(ctx: _Context, resource: Resource) -> None:
    ctx.pods.append(kubernetes.read_pod(resource, ctx.options.trust_domain))


def _read_service(ctx: _Context, resource: Resource) -> None:
    ctx.services.append(kubernetes.read_service(resource))


def _read_service_entry(ctx: _Context, resource: Resource) -> None:
    ctx.entries.append(serviceentry.read_service_entry(resource, ctx.options.trust_domain))


def _read_gateway(ctx: _Context, resource: Resource) -> None:
    waypoint, notes = gateway.read_waypoint(resource, ctx.options.domain_suffix)
    if waypoint is None:
        return
    for path, reason in notes:
        ctx.note(waypoint.meta, path, reason)
    ctx.waypoints[(waypoint.meta.namespace, waypoint.meta.name)] = waypoint


def _read_authorization_policy(ctx: _Context, resource: Resource) -> None:
    meta = kubernetes.read_meta(resource)
    root = ctx.options.root_namespace
    header = read_authorization_policy(resource, root_namespace=root, rules=False)
    skipped = l4.not_enforced(header)
    if skipped is not None:
        ctx.note(meta, *skipped)
        return
    policy = read_authorization_policy(resource, root_namespace=root)
    lowered = l4.lower(policy, root_namespace=root)
    for path, reason in lowered.notes:
        ctx.note(meta, path, reason)
    ctx.authorization.append(_Selected(lowered.authorization, policy.selector))


def _read_peer_authentication(ctx: _Context, resource: Resource) -> None:
    root = ctx.options.root_namespace
    peer, notes = peerauthentication.read_peer_authentication(resource, root)
    for path, reason in notes:
        ctx.note(peer.meta, path, reason)
    ctx.peer.append(peer)


_READERS: dict[str, Callable[[_Context, Resource], None]] = {
    "Namespace": _read_namespace,
    "Pod": _read_pod,
    "Service": _read_service,
    "ServiceEntry": _read_service_entry,
    "AuthorizationPolicy": _read_authorization_policy,
    "PeerAuthentication": _read_peer_authentication,
    "Gateway": _read_gateway,
}


def _read(ctx: _Context, resources: Iterable[Resource]) -> None:
    seen: dict[tuple[str, str, str, str], Resource] = {}
    for resource in resources:
        versions = _KINDS.get((resource.group, resource.kind))
        if versions is None:
            log.debug("ignoring %s %s (%s)", resource.kind, resource.name, resource.location)
            continue
        meta = kubernetes.peek_meta(resource)
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
    ctx: _Context, meta: Meta, target: str, labels: Mapping[str, str] | None = None
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


def _is_waypoint_instance(ctx: _Context, meta: Meta) -> bool:
    if meta.labels.get(LABEL_GATEWAY_MANAGED) == MESH_CONTROLLER:
        return True
    name = meta.labels.get(LABEL_GATEWAY_NAME)
    return name is not None and (meta.namespace, name) in ctx.waypoints


# --- assembling the snapshot -------------------------------------------------------------------


def _canonical(labels: Mapping[str, str], workload_name: str) -> tuple[str, str]:
    name = next((labels[k] for k in _NAME_LABELS if k in labels), workload_name)
    revision = next((labels[k] for k in _REVISION_LABELS if k in labels), "latest")
    return name, revision


def _selector_policies(ctx: _Context, namespace: str, labels: Mapping[str, str]) -> list[str]:
    root = ctx.options.root_namespace
    return sorted(
        p.policy.key
        for p in ctx.authorization
        if p.selector is not None
        and p.policy.namespace in (namespace, root)
        and selects(p.selector, labels)
    )


def _pod_enrolled(ctx: _Context, pod: Pod) -> bool:
    meta = pod.meta
    mode = meta.labels.get(LABEL_DATAPLANE_MODE)
    if mode == "none" or ANNOTATION_SIDECAR_STATUS in meta.annotations:
        return False
    if mode == "ambient" or meta.annotations.get(ANNOTATION_REDIRECTION) == "enabled":
        return True
    return ctx.namespace_labels(meta.namespace).get(LABEL_DATAPLANE_MODE) == "ambient"


def _pod_services(ctx: _Context, pod: Pod) -> dict[str, dict[int, int]]:
    services: dict[str, dict[int, int]] = {}
    meta = pod.meta
    for svc in ctx.services:
        if svc.meta.namespace != meta.namespace or not svc.selector:
            continue
        if not selects(svc.selector, meta.labels):
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
        if not selects(entry.selector, meta.labels):
            continue
        se_ports = {
            p.number: pod.container_ports.get(p.name, p.target) if p.name else p.target
            for p in entry.ports
        }
        for host in entry.hosts:
            services.setdefault(f"{meta.namespace}/{host}", se_ports)
    return services


def _pod_workload(
    ctx: _Context, pod: Pod, converted: Mapping[str, Authorization]
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
    policies += peerauthentication.policy_keys(
        ctx.peer, meta.namespace, meta.labels, converted, ctx.options.root_namespace
    )
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


def _kube_service(ctx: _Context, svc: KubeService) -> Service:
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


def _entry_services(ctx: _Context, entry: ServiceEntry) -> list[Service]:
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
    ctx: _Context, entry: ServiceEntry, converted: Mapping[str, Authorization]
) -> list[Workload]:
    meta = entry.meta
    opts = ctx.options
    canonical_name, canonical_revision = _canonical(meta.labels, meta.name)
    policies = _selector_policies(ctx, meta.namespace, meta.labels)
    policies += peerauthentication.policy_keys(
        ctx.peer, meta.namespace, meta.labels, converted, ctx.options.root_namespace
    )
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
        endpoint_meta = Meta(
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
        policy = peerauthentication.converted_policy(ctx.peer, pa, ctx.options.root_namespace)
        if policy is not None:
            converted[policy.key] = policy

    workloads: list[Workload] = []
    claimed: dict[NetworkAddress, str] = {}

    def add_workload(workload: Workload, meta: Meta, path: str) -> None:
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

    def add_service(service: Service, meta: Meta, path: str) -> None:
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

    policies = [p.policy for p in ctx.authorization] + list(converted.values())
    if ctx.peer:
        policies.append(peerauthentication.static_strict(ctx.options.root_namespace))

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


__all__ = [
    "DEFAULT_CLUSTER_ID",
    "DEFAULT_DOMAIN_SUFFIX",
    "WAYPOINT_CLASS",
    "TranslateOptions",
    "Translation",
    "to_local_config",
    "translate",
    "translate_resources",
]
