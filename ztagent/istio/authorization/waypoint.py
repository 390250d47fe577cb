"""The AuthorizationPolicies a waypoint enforces: those attached by `targetRefs`, read with the
one reader (`ztagent.istio.authorization.policy`) and checked for what the waypoint's L7
evaluation (`ztagent.istio.authorization.l7`) supports; and the reading every waypoint policy
kind of `security.istio.io` shares (`check_kind`, `read_attached`, also used for
RequestAuthentication by `ztagent.istio.jwt`). Pure, no I/O.

A policy with a `selector`, or with neither `selector` nor `targetRefs`, is the node agent's
(or a sidecar's) and is skipped with a note. Beyond Istio's own validation the waypoint refuses
what it cannot evaluate (`AuthorizationPolicy.unsupported`): `trustDomains`/`notTrustDomains`
sources (an unknown field here), `when` keys without a request value (`source.trustDomain`,
experimental and `destination.labels` keys, malformed bracketed keys) and invalid path
templates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from ztagent.fields import Invalid, show
from ztagent.istio.authorization.policy import (
    API_GROUP,
    API_VERSIONS,
    KIND,
    Action,
    AuthorizationPolicy,
    read_authorization_policy,
)
from ztagent.istio.envelope import Resource, ResourceError
from ztagent.names import DEFAULT_ROOT_NAMESPACE

_T = TypeVar("_T")


def check_kind(resource: Resource, kind: str) -> None:
    """Raise `Invalid` unless `resource` is a `security.istio.io` `kind` of a served version."""
    if resource.group != API_GROUP or resource.kind != kind:
        article = "an" if kind[:1] in "AEIOU" else "a"
        raise Invalid("kind", f"{resource.api_version} {resource.kind} is not {article} {kind}")
    version = resource.api_version.rpartition("/")[2]
    if version not in API_VERSIONS:
        supported = ", ".join(f"{API_GROUP}/{v}" for v in API_VERSIONS)
        raise Invalid("apiVersion", f"{show(resource.api_version)} is not supported ({supported})")


def read_attached(
    resources: Iterable[Resource], kind: str, parse: Callable[[Resource], _T | None]
) -> tuple[list[tuple[Resource, _T]], list[ResourceError], list[ResourceError]]:
    """Every `security.istio.io` `kind` among `resources` read by `parse` (None: the object
    has no `targetRefs`), as `(resource, value)` pairs, the errors of those that could not be
    read, and notes on those that are not the waypoint's. Other kinds are ignored."""
    found: list[tuple[Resource, _T]] = []
    errors: list[ResourceError] = []
    notes: list[ResourceError] = []
    for resource in resources:
        if resource.group != API_GROUP or resource.kind != kind:
            continue
        try:
            value = parse(resource)
        except Invalid as exc:
            errors.append(resource_error(resource, exc.path, exc.reason))
            continue
        except RecursionError:
            errors.append(resource_error(resource, "", "nested too deeply"))
            continue
        if value is None:
            notes.append(resource_error(resource, "spec", "no targetRefs: not a waypoint policy"))
            continue
        found.append((resource, value))
    return found, errors, notes


def parse_authorization_policy(
    resource: Resource, *, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> AuthorizationPolicy | None:
    """Read one AuthorizationPolicy; None when it is not attached by `targetRefs`.

    Raises `Invalid` naming the field path for anything Istio would reject, or the waypoint
    cannot evaluate.
    """
    check_kind(resource, KIND)
    policy = read_authorization_policy(resource, root_namespace=root_namespace)
    if policy.unsupported:
        path, reason = policy.unsupported[0]
        raise Invalid(path, reason)
    return policy if policy.targets else None


@dataclass(frozen=True, slots=True)
class AuthorizationConfig:
    """The waypoint's policies, the errors of those left out, and notes on skipped ones."""

    policies: tuple[AuthorizationPolicy, ...] = ()
    errors: tuple[ResourceError, ...] = ()
    notes: tuple[ResourceError, ...] = ()


def resource_error(resource: Resource, path: str, reason: str) -> ResourceError:
    """A `ResourceError` about `resource` keyed `namespace/name`."""
    key = f"{resource.namespace or 'default'}/{resource.name}"
    return ResourceError(resource.kind, resource.index, key, path, reason, resource.file)


def read_authorization_policies(
    resources: Iterable[Resource], *, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> AuthorizationConfig:
    """Every AuthorizationPolicy among `resources` that belongs to waypoints.

    Other kinds are ignored. A bad policy becomes a `ResourceError` and the rest are read;
    policies for the node agent or sidecars (selector, or no target) become notes, and so do
    CUSTOM policies (enforced here as DENY, since no external authorizer is configured).
    """
    found, errors, notes = read_attached(
        resources,
        KIND,
        lambda resource: parse_authorization_policy(resource, root_namespace=root_namespace),
    )
    policies: list[AuthorizationPolicy] = []
    for resource, policy in found:
        if policy.action is Action.CUSTOM:
            notes.append(
                resource_error(
                    resource,
                    "spec.action",
                    "CUSTOM needs an external authorizer the waypoint does not have: "
                    "requests matching its rules are denied",
                )
            )
        policies.append(policy)
    return AuthorizationConfig(tuple(policies), tuple(errors), tuple(notes))
