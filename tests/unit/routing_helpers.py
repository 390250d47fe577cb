"""What the routing tests share: building VirtualService and HTTPRoute documents, requests,
and reading the answer."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

import yaml

from ztagent.control.sources import parse_documents
from ztagent.istio.routing import (
    DirectResponse,
    Forward,
    Headers,
    Request,
    RouteConfig,
    RouteOptions,
    ServiceRef,
    parse_routes,
)

NS = "shop"
REVIEWS = ServiceRef.kubernetes("reviews", NS)
RATINGS = ServiceRef.kubernetes("ratings", NS)


def load(text: str, options: RouteOptions | None = None) -> RouteConfig:
    batch = parse_documents(textwrap.dedent(text), "test.yaml")
    assert batch.errors == ()
    return parse_routes(batch.resources, options)


def doc(
    kind: str,
    spec: dict[str, Any],
    name: str = "r",
    namespace: str = NS,
    created: str | None = None,
) -> str:
    api = {
        "VirtualService": "networking.istio.io/v1",
        "HTTPRoute": "gateway.networking.k8s.io/v1",
    }[kind]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if created:
        metadata["creationTimestamp"] = created
    body = {"apiVersion": api, "kind": kind, "metadata": metadata, "spec": spec}
    return yaml.safe_dump(body, sort_keys=False)


def docs(*parts: str) -> str:
    return "---\n".join(parts)


def vs(http: list[dict[str, Any]], hosts: tuple[str, ...] = ("reviews",), **kw: Any) -> str:
    return doc("VirtualService", {"hosts": list(hosts), "http": http}, **kw)


def hr(
    rules: list[dict[str, Any]], service: str = "reviews", port: int | None = None, **kw: Any
) -> str:
    parent: dict[str, Any] = {"group": "", "kind": "Service", "name": service}
    if port is not None:
        parent["port"] = port
    return doc("HTTPRoute", {"parentRefs": [parent], "rules": rules}, **kw)


def req(path: str = "/", method: str = "GET", port: int = 9080, **kw: Any) -> Request:
    headers = kw.pop("headers", {})
    return Request(
        method,
        path,
        kw.pop("authority", "reviews:9080"),
        headers=Headers.of(headers),
        port=port,
        **kw,
    )


def to(subset: str, weight: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": {"host": "reviews", "subset": subset}}
    if weight is not None:
        out["weight"] = weight
    return out


def backend(name: str, weight: int | None = None, port: int = 9080) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": port}
    if weight is not None:
        out["weight"] = weight
    return out


def chosen(config: RouteConfig, request: Request, service: ServiceRef = REVIEWS) -> str:
    """The subset (VirtualService) or backend name (HTTPRoute) a request goes to, or the
    status of a direct answer."""
    choice = config.table(service, request.port).select(request)
    action = choice.action
    if isinstance(action, Forward):
        dest = action.destinations[0]
        return dest.subset or dest.host.split(".")[0]
    if isinstance(action, DirectResponse):
        return str(action.status)
    return "redirect"


def constant(value: float) -> Callable[[], float]:
    return lambda: value


def only_error(config: RouteConfig) -> str:
    assert len(config.errors) == 1, [str(e) for e in config.errors]
    return str(config.errors[0])


ROUTE = [to("v1")]


def hr_rule(**fields: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"backendRefs": [backend("v1")]}
    rule.update(fields)
    return rule
