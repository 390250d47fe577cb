"""What the control plane serves over delta ADS, without I/O.

`build_resources` turns a `ConfigSnapshot` into versioned xDS resources: `istio.workload.Address`
named by workload uid or `namespace/hostname`, `istio.security.Authorization` named
`namespace/name`, each with a version that is a digest of its bytes, so an unchanged resource
keeps its version across rebuilds and is never resent. Waypoints also subscribe to
`ztagent.waypoint.v1.L7Resource` (named `<Kind>/<namespace>/<name>`): the objects
`waypoint_resources` selects and checks. Node agents do not subscribe to it, so it never
reaches them.

`waypoint_resources` picks a waypoint's objects out of all resources: VirtualService,
HTTPRoute, DestinationRule, Telemetry, every Service, Gateways of class `istio-waypoint`, and
AuthorizationPolicy and RequestAuthentication attached by `targetRef(s)`. It checks each one
with the waypoint's own parsers (`ztagent.waypoint`), so what a waypoint would reject is an
error here, with its kind, `namespace/name`, field and reason. A RequestAuthentication's
`jwksUri: file:///path` is read (with the injected `read_file`) and served with the keys
inlined as `jwks`, as istiod fetches `jwksUri` and hands the proxy the keys; only the public
members of each key are kept.

The stream itself (`DeltaStream`, what each client is sent) is `ztagent.xds.stream`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztagent.control.translate import WAYPOINT_CLASS, TranslateOptions
from ztagent.fields import Invalid, join, show
from ztagent.istio import destination, jwt, routing
from ztagent.istio.authorization.waypoint import read_authorization_policies, resource_error
from ztagent.istio.envelope import Resource, ResourceError
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.xds import convert
from ztagent.xds.stream import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    L7_TYPE,
    Resources,
    VersionedResource,
    versioned,
)


def build_resources(
    snapshot: ConfigSnapshot,
    previous: Resources | None = None,
    *,
    l7: Iterable[Mapping[str, Any]] = (),
) -> dict[str, dict[str, VersionedResource]]:
    """The snapshot (and the waypoints' `l7` objects) as xDS resources; unchanged values reuse
    `previous`'s objects."""
    addresses: dict[str, VersionedResource] = {}
    for workload in snapshot.workloads:
        message = convert.address_of_workload(workload)
        addresses[workload.uid] = versioned(workload.uid, message, ADDRESS_TYPE)
    for service in snapshot.services:
        message = convert.address_of_service(service)
        addresses[service.key] = versioned(service.key, message, ADDRESS_TYPE)
    policies = {
        p.key: versioned(p.key, convert.authorization_to_proto(p), AUTHORIZATION_TYPE)
        for p in snapshot.policies
    }
    objects: dict[str, VersionedResource] = {}
    for document in l7:
        l7_message = convert.l7_to_proto(document)
        name = convert.l7_name(l7_message.kind, l7_message.namespace, l7_message.name)
        objects[name] = versioned(name, l7_message, L7_TYPE)
    built = {ADDRESS_TYPE: addresses, AUTHORIZATION_TYPE: policies, L7_TYPE: objects}
    if previous:
        for type_url, table in built.items():
            old = previous.get(type_url, {})
            for name, resource in table.items():
                kept = old.get(name)
                if kept is not None and kept.version == resource.version:
                    table[name] = kept
    return built


# --- the waypoints' L7 resources ---------------------------------------------------------------

_VIRTUAL_SERVICE = ("networking.istio.io", "VirtualService")
_HTTP_ROUTE = ("gateway.networking.k8s.io", "HTTPRoute")
_DESTINATION_RULE = ("networking.istio.io", "DestinationRule")
_TELEMETRY = ("telemetry.istio.io", "Telemetry")
_SERVICE = ("", "Service")
_GATEWAY = ("gateway.networking.k8s.io", "Gateway")
_AUTHORIZATION_POLICY = ("security.istio.io", "AuthorizationPolicy")
_REQUEST_AUTHENTICATION = ("security.istio.io", "RequestAuthentication")
_EVERY_ONE = frozenset({_VIRTUAL_SERVICE, _HTTP_ROUTE, _DESTINATION_RULE, _TELEMETRY, _SERVICE})
_ATTACHED = frozenset({_AUTHORIZATION_POLICY, _REQUEST_AUTHENTICATION})
JWKS_MEMBERS = ("kty", "kid", "use", "alg", "crv", "n", "e", "x", "y")
"""The members of a JSON Web Key that are served: the public ones."""

ReadFile = Callable[[str], bytes]
"""Reads a local file (a `jwksUri: file://` path); raises `OSError` when it cannot."""


@dataclass(frozen=True, slots=True)
class WaypointResources:
    """The objects to serve to waypoints and what is wrong with the others.

    `objects` are the valid ones by resource name, as served. `rejected` holds each object
    with an error, mapped to what to serve when it has no last good version: None (nothing),
    or, for a RequestAuthentication whose keys cannot be had, the object as it is, so that the
    waypoint refuses its issuer's tokens (fail closed) rather than not checking them.
    """

    objects: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    rejected: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)
    errors: tuple[ResourceError, ...] = ()
    notes: tuple[ResourceError, ...] = ()


def is_waypoint_object(resource: Resource) -> bool:
    """Whether a waypoint needs `resource` (see the module docstring for the selection)."""
    kind = (resource.group, resource.kind)
    if kind in _EVERY_ONE:
        return True
    spec = resource.body.get("spec")
    if not isinstance(spec, Mapping):
        return False
    if kind in _ATTACHED:
        return bool(spec.get("targetRefs") or spec.get("targetRef"))
    return kind == _GATEWAY and spec.get("gatewayClassName") == WAYPOINT_CLASS


def public_jwks(data: bytes) -> str:
    """A JSON Web Key Set file's public part as compact JSON; raises `ValueError` for a file
    the waypoint could not use (not a JWKS, or no usable public key)."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError(jwt.JwtStatus.JWKS_PARSE_ERROR.value) from None
    if not isinstance(document, dict):
        raise ValueError(jwt.JwtStatus.JWKS_PARSE_ERROR.value)
    keys = document.get("keys")
    if not isinstance(keys, list):
        status = jwt.JwtStatus.JWKS_NO_KEYS if keys is None else jwt.JwtStatus.JWKS_BAD_KEYS
        raise ValueError(status.value)
    public = [
        {k: key[k] for k in JWKS_MEMBERS if k in key} for key in keys if isinstance(key, dict)
    ]
    text = json.dumps({"keys": public}, sort_keys=True, separators=(",", ":"))
    try:
        jwt.load_jwks(text)
    except jwt.JwksError as exc:
        raise ValueError(exc.status.value) from None
    return text


def _inline_jwks(body: dict[str, Any], read_file: ReadFile | None) -> list[tuple[str, str]]:
    """Put the keys of each `jwksUri: file://` rule into its `jwks` (in place); returns the
    problems `(field path, reason)` of rules whose keys cannot be had."""
    spec = body.get("spec")
    rules = spec.get("jwtRules") if isinstance(spec, dict) else None
    if not isinstance(rules, list):
        return []
    problems: list[tuple[str, str]] = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or rule.get("jwks"):
            continue
        uri = rule.get("jwksUri")
        if not isinstance(uri, str) or not uri:
            continue
        path = join(join(join("spec", "jwtRules"), i), "jwksUri")
        local = jwt.JwksSource(uri=uri).file_path
        if local is None:
            problems.append((path, f"{show(uri)}: only file:// URIs can be read; use jwks"))
            continue
        if read_file is None:
            continue
        try:
            text = public_jwks(read_file(local))
        except OSError as exc:
            problems.append((path, f"cannot read {local}: {exc.strerror or exc}"))
            continue
        except ValueError as exc:
            problems.append((path, f"{local}: {exc}"))
            continue
        rules[i] = {**rule, "jwks": text}
    return problems


def _check(
    resource: Resource, options: TranslateOptions
) -> tuple[list[ResourceError], list[ResourceError], bool]:
    """The waypoint parsers' errors and notes about one object, and whether it was left out
    whole (False: it is in force, with parts that refuse requests)."""
    kind = (resource.group, resource.kind)
    if kind in (_VIRTUAL_SERVICE, _HTTP_ROUTE):
        options_ = routing.RouteOptions(domain_suffix=options.domain_suffix)
        parsed = routing.parse_routes([resource], options_)
        return list(parsed.errors), list(parsed.notes), True
    if kind == _DESTINATION_RULE:
        rules = destination.parse_destination_rules([resource], domain_suffix=options.domain_suffix)
        return list(rules.errors), list(rules.notes), True
    if kind == _AUTHORIZATION_POLICY:
        policies = read_authorization_policies([resource], root_namespace=options.root_namespace)
        return list(policies.errors), list(policies.notes), True
    if kind == _REQUEST_AUTHENTICATION:
        try:
            _, problems = jwt.parse_request_authentication(
                resource, root_namespace=options.root_namespace
            )
        except Invalid as exc:
            return [resource_error(resource, exc.path, exc.reason)], [], True
        errors = [resource_error(resource, path, why) for path, why in problems]
        return errors, [], False
    return [], [], False


def waypoint_resources(
    resources: Iterable[Resource],
    options: TranslateOptions | None = None,
    *,
    read_file: ReadFile | None = None,
) -> WaypointResources:
    """The waypoints' objects among `resources`, checked; nothing raises.

    Each served object has `metadata.namespace` set (`default` when the document has none).
    Without `read_file`, `file://` JWKS are left as they are.
    """
    options = options or TranslateOptions()
    objects: dict[str, Mapping[str, Any]] = {}
    rejected: dict[str, Mapping[str, Any] | None] = {}
    errors: list[ResourceError] = []
    notes: list[ResourceError] = []
    seen: dict[str, Resource] = {}
    for resource in resources:
        if not is_waypoint_object(resource):
            continue
        namespace = resource.namespace or "default"
        name = convert.l7_name(resource.kind, namespace, resource.name)
        if name in seen:
            reason = f"duplicate of the one in {seen[name].location}"
            errors.append(resource_error(resource, "", reason))
            continue
        seen[name] = resource
        body = copy.deepcopy(dict(resource.body))
        body["metadata"] = {**body["metadata"], "namespace": namespace}
        own: list[tuple[str, str]] = []
        if (resource.group, resource.kind) == _REQUEST_AUTHENTICATION:
            own = _inline_jwks(body, read_file)
        served = dataclasses.replace(resource, namespace=namespace, body=body)
        try:
            found, remarks, whole = _check(served, options)
        except RecursionError:
            found, remarks, whole = (
                [resource_error(resource, "", "nested too deeply")],
                [],
                True,
            )
        reported = {path for path, _ in own}
        found = [resource_error(served, p, r) for p, r in own] + [
            e for e in found if e.path not in reported
        ]
        errors.extend(found)
        notes.extend(remarks)
        if found:
            rejected[name] = None if whole else body
        else:
            objects[name] = body
    return WaypointResources(objects, rejected, tuple(errors), tuple(notes))
