"""Kubernetes' own kinds as the mesh reads them: object metadata, label selectors, Namespace,
Pod and Service. Each reader takes a `Resource` (`ztagent.istio.envelope`) and returns a typed
value, or raises `Invalid` naming the field path; what the values become (workloads, services)
is the control plane's assembly. Pure, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztagent.fields import Invalid, ip, port
from ztagent.fields import at as _at
from ztagent.fields import labels as _labels
from ztagent.fields import mapping as _map
from ztagent.fields import only as _only
from ztagent.fields import sequence as _list
from ztagent.fields import string as _str
from ztagent.identity.spiffe import Identity, InvalidIdentity
from ztagent.istio.envelope import Resource
from ztagent.model.workload import IPAddress

LABEL_WORKLOAD_NAME = "service.istio.io/workload-name"

_RS_HASH = re.compile(r"-[bcdfghjklmnpqrstvwxz2456789]{6,10}$")
_CRONJOB_SUFFIX = re.compile(r"^(.+)-\d{8,10}$")


def read_selector(value: object, path: str) -> dict[str, str] | None:
    """`selector.matchLabels`; None for no selector (an empty one selects nothing extra)."""
    if value is None:
        return None
    data = _map(value, path)
    _only(data, path, ("matchLabels",))
    labels = _labels(data.get("matchLabels"), _at(path, "matchLabels"))
    return labels or None


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Every label of `selector` is in `labels` with the same value."""
    return all(labels.get(key) == value for key, value in selector.items())


@dataclass(slots=True)
class Meta:
    """An object's metadata; `namespace` is `default` when a namespaced object gives none."""

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


def read_meta(resource: Resource, *, namespaced: bool = True) -> Meta:
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
    return Meta(
        resource, resource.kind, resource.name, namespace, labels, annotations, created_text
    )


def peek_meta(resource: Resource) -> Meta:
    """The metadata an error about `resource` names, before (or without) reading it."""
    namespace = "" if resource.kind == "Namespace" else resource.namespace or "default"
    return Meta(resource, resource.kind, resource.name, namespace, {}, {}, "")


def read_spec(resource: Resource) -> dict[str, Any]:
    return _map(resource.body.get("spec"), "spec")


def service_account(value: object, path: str, namespace: str, trust_domain: str) -> str:
    """A service account name (`default` when not given) that makes a valid SPIFFE identity
    in `namespace`."""
    account = _str(value, path) or "default"
    try:
        Identity(trust_domain, namespace, account)
    except InvalidIdentity as exc:
        raise Invalid(path, f"no valid identity: {exc}") from None
    return account


@dataclass(slots=True)
class Pod:
    meta: Meta
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
class ServicePort:
    port: int
    target: int | str
    index: int


@dataclass(slots=True)
class KubeService:
    meta: Meta
    selector: dict[str, str]
    ports: list[ServicePort]
    vips: list[IPAddress]


def read_namespace(resource: Resource) -> Meta:
    return read_meta(resource, namespaced=False)


def owner(meta: Meta) -> tuple[str, str]:
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


def read_pod(resource: Resource, trust_domain: str) -> Pod:
    meta = read_meta(resource)
    spec = read_spec(resource)
    status = _map(resource.body.get("status"), "status")
    ips: list[IPAddress] = []
    for i, item in enumerate(_list(status.get("podIPs"), "status.podIPs")):
        path = _at("status.podIPs", i)
        ips.append(ip(_map(item, path).get("ip"), _at(path, "ip")))
    if not ips and status.get("podIP") not in (None, ""):
        ips.append(ip(status.get("podIP"), "status.podIP"))
    if len(set(ips)) != len(ips):
        raise Invalid("status.podIPs", "lists an address twice")
    account = service_account(
        spec.get("serviceAccountName"), "spec.serviceAccountName", meta.namespace, trust_domain
    )
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
            number = port(data.get("containerPort"), _at(ppath, "containerPort"))
            protocol = _str(data.get("protocol"), _at(ppath, "protocol"), "TCP")
            if name and protocol == "TCP":
                ports.setdefault(name, number)
    workload_name, workload_type = owner(meta)
    metadata = _map(resource.body.get("metadata"), "metadata")
    phase = status.get("phase")
    return Pod(
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


def read_service(resource: Resource) -> KubeService:
    meta = read_meta(resource)
    spec = read_spec(resource)
    selector = _labels(spec.get("selector"), "spec.selector")
    ports: list[ServicePort] = []
    seen: set[int] = set()
    for i, item in enumerate(_list(spec.get("ports"), "spec.ports")):
        path = _at("spec.ports", i)
        data = _map(item, path)
        number = port(data.get("port"), _at(path, "port"))
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
            target = port(raw_target, _at(path, "targetPort"))
        ports.append(ServicePort(number, target, i))
    raw_ips = spec.get("clusterIPs")
    ip_path = "spec.clusterIPs"
    if raw_ips is None:
        raw_ips = [] if spec.get("clusterIP") is None else [spec.get("clusterIP")]
        ip_path = "spec.clusterIP"
    vips: list[IPAddress] = []
    for i, item in enumerate(_list(raw_ips, ip_path)):
        if item in ("None", ""):
            continue
        vips.append(ip(item, _at(ip_path, i) if ip_path == "spec.clusterIPs" else ip_path))
    return KubeService(meta, selector, ports, vips)
