"""The entry point of reading routes: `parse_routes` reads every VirtualService and HTTPRoute
among a list of resources into a `RouteConfig`, each bad one left out with a `ResourceError`."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ztagent.fields import Invalid, show
from ztagent.istio.envelope import Resource, ResourceError
from ztagent.istio.routing.httproute import read_http_route
from ztagent.istio.routing.reader import Reader, created_at
from ztagent.istio.routing.table import (
    HTTP_ROUTE,
    VIRTUAL_SERVICE,
    HTTPRouteRoutes,
    RouteConfig,
    RouteOptions,
    VirtualServiceRoutes,
)
from ztagent.istio.routing.virtualservice import read_virtual_service

log = logging.getLogger(__name__)

_KINDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("networking.istio.io", VIRTUAL_SERVICE): ("v1", "v1beta1", "v1alpha3"),
    ("gateway.networking.k8s.io", HTTP_ROUTE): ("v1", "v1beta1"),
}


def parse_routes(resources: Iterable[Resource], options: RouteOptions | None = None) -> RouteConfig:
    """Read every VirtualService and HTTPRoute in `resources`; other kinds are ignored.

    Never raises for bad input: a bad resource is left out with a `ResourceError`."""
    options = options or RouteOptions()
    errors: list[ResourceError] = []
    notes: list[ResourceError] = []
    virtual_services: list[VirtualServiceRoutes] = []
    http_routes: list[HTTPRouteRoutes] = []
    seen: dict[tuple[str, str, str], Resource] = {}
    for resource in resources:
        versions = _KINDS.get((resource.group, resource.kind))
        if versions is None:
            continue
        namespace = resource.namespace or "default"
        key = f"{namespace}/{resource.name}"

        def error(path: str, reason: str, res: Resource = resource, key: str = key) -> None:
            errors.append(ResourceError(res.kind, res.index, key, path, reason, res.file))

        version = resource.api_version.rpartition("/")[2]
        if version not in versions:
            supported = ", ".join(f"{resource.group}/{v}" for v in versions)
            error("apiVersion", f"{show(resource.api_version)} is not supported (use {supported})")
            continue
        identity = (resource.kind, namespace, resource.name)
        if identity in seen:
            error("", f"duplicate of the one in {seen[identity].location}")
            continue
        seen[identity] = resource
        reader: Reader | None = None
        try:
            reader = Reader(options, resource.kind, namespace, resource.name, created_at(resource))
            if resource.kind == VIRTUAL_SERVICE:
                vs = read_virtual_service(reader, resource)
                if vs is not None:
                    virtual_services.append(vs)
            else:
                hr = read_http_route(reader, resource)
                if hr is not None:
                    http_routes.append(hr)
        except Invalid as exc:
            error(exc.path, exc.reason)
            continue
        except RecursionError:
            error("", "nested too deeply")
            continue
        for path, reason in reader.notes:
            notes.append(
                ResourceError(resource.kind, resource.index, key, path, reason, resource.file)
            )
            log.debug("%s %s: %s: %s", resource.kind, key, path, reason)
    return RouteConfig(
        tuple(virtual_services), tuple(http_routes), tuple(errors), tuple(notes), options
    )
