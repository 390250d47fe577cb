"""Waypoints: a Gateway of class `istio-waypoint` (Gateway API) is a waypoint for service,
workload or all traffic, reachable by HBONE at its address, accepting the namespaces its HBONE
listener's `allowedRoutes` admit. `read_waypoint` takes a `Resource`; which workloads and
services use a waypoint (`istio.io/use-waypoint`) is the control plane's assembly. Pure, no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from ztagent.fields import Invalid, port, show
from ztagent.fields import at as _at
from ztagent.fields import mapping as _map
from ztagent.fields import sequence as _list
from ztagent.fields import string as _str
from ztagent.istio.envelope import Resource
from ztagent.istio.kubernetes import Meta, read_meta, read_selector, read_spec, selects
from ztagent.model.workload import HBONE_MTLS_PORT, GatewayAddress, NamespacedHostname
from ztagent.names import DEFAULT_DOMAIN_SUFFIX, HBONE_PORT, service_hostname

log = logging.getLogger(__name__)

WAYPOINT_CLASS = "istio-waypoint"
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"
_WAYPOINT_FOR = ("service", "workload", "all", "none")


@dataclass(slots=True)
class Waypoint:
    meta: Meta
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
            return self.namespace_selector is not None and selects(
                self.namespace_selector, namespace_labels
            )
        return namespace == self.meta.namespace


def read_waypoint(
    resource: Resource, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
) -> tuple[Waypoint | None, list[tuple[str, str]]]:
    """A Gateway of class `istio-waypoint` as a `Waypoint` (None for other classes), with
    notes `(path, reason)`; raises `Invalid` naming the field path."""
    meta = read_meta(resource)
    spec = read_spec(resource)
    if spec.get("gatewayClassName") != WAYPOINT_CLASS:
        log.debug("Gateway %s is not a waypoint; ignored", meta.key)
        return None, []
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
        port(listener.get("port"), _at(path, "port"))
        hbone = True
        routes = _map(listener.get("allowedRoutes"), _at(path, "allowedRoutes"))
        namespaces = _map(routes.get("namespaces"), _at(_at(path, "allowedRoutes"), "namespaces"))
        npath = _at(_at(path, "allowedRoutes"), "namespaces")
        from_namespaces = _str(namespaces.get("from"), _at(npath, "from"), "Same")
        if from_namespaces not in ("Same", "All", "Selector"):
            raise Invalid(_at(npath, "from"), f"{show(from_namespaces)} is not Same, All, Selector")
        if from_namespaces == "Selector":
            selector = read_selector(namespaces.get("selector"), _at(npath, "selector")) or {}
        break
    notes: list[tuple[str, str]] = []
    if not hbone:
        notes.append(
            ("spec.listeners", f"no HBONE listener (expected port {HBONE_PORT}, protocol HBONE)")
        )
    address = GatewayAddress(
        hostname=NamespacedHostname(
            meta.namespace, service_hostname(meta.name, meta.namespace, domain_suffix)
        ),
        hbone_mtls_port=HBONE_MTLS_PORT,
    )
    status = _map(resource.body.get("status"), "status")
    for i, item in enumerate(_list(status.get("addresses"), "status.addresses")):
        data = _map(item, _at("status.addresses", i))
        if data.get("type") == "Hostname" and isinstance(data.get("value"), str):
            host = data["value"]
            address = GatewayAddress(hostname=NamespacedHostname(meta.namespace, host))
            break
    return Waypoint(meta, traffic, address, from_namespaces, selector), notes
