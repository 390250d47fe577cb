"""`ConfigSnapshot`: the workloads, services and policies one source of config yields, and the
errors of the objects it left out. The control plane's translation produces one, the node agent's
local config file and xDS client each produce one, and `ProxyState` indexes it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from ztagent.fields import show
from ztagent.model.policy import Authorization
from ztagent.model.workload import Service, Workload


@dataclass(frozen=True, slots=True)
class ObjectError:
    """One rejected object: which list, its index, its name if it had one, where and why."""

    kind: str
    """`workloads`, `services`, `policies`, or `config` for a problem with a top-level key."""
    index: int | None
    key: str | None
    """uid of a workload, `ns/hostname` of a service, `ns/name` of a policy, when readable."""
    path: str
    reason: str

    def __str__(self) -> str:
        where = self.kind if self.index is None else f"{self.kind}[{self.index}]"
        if self.key is not None:
            label = "uid" if self.kind == "workloads" else "key"
            where += f" ({label} {show(self.key)})"
        if self.path:
            where += f": {self.path}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ConfigSnapshot:
    """The valid objects of one config file, and the errors of those left out."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()
    errors: tuple[ObjectError, ...] = field(default=(), compare=False)

    @property
    def ok(self) -> bool:
        return not self.errors


_T = TypeVar("_T")


def _carry_over(
    new: tuple[_T, ...],
    previous: tuple[_T, ...],
    rejected: set[str],
    *,
    key: Callable[[_T], str],
    claims: Callable[[_T], Iterable[object]],
) -> list[_T]:
    """`new` plus the previous version of each rejected object that is missing from it and
    claims nothing (an address, a VIP) that `new` already holds."""
    merged = list(new)
    keys = {key(item) for item in merged}
    taken = {c for item in merged for c in claims(item)}
    for old in previous:
        old_claims = set(claims(old))
        if key(old) in rejected and key(old) not in keys and not taken & old_claims:
            merged.append(old)
            taken |= old_claims
    return merged


def keep_rejected(new: ConfigSnapshot, previous: ConfigSnapshot) -> ConfigSnapshot:
    """Carry over the previous version of objects that were rejected this time.

    A typo in one workload must not take it (and its open connections) away: an object whose
    key the error names, that existed before and is absent now, keeps its last good version,
    unless it would clash with an address or VIP taken by the new snapshot.
    """
    rejected: dict[str, set[str]] = {"workloads": set(), "services": set(), "policies": set()}
    for error in new.errors:
        if error.key is not None and error.kind in rejected:
            rejected[error.kind].add(error.key)
    if not any(rejected.values()):
        return new

    workloads = _carry_over(
        new.workloads,
        previous.workloads,
        rejected["workloads"],
        key=lambda w: w.uid,
        claims=lambda w: w.network_addresses,
    )
    services = _carry_over(
        new.services,
        previous.services,
        rejected["services"],
        key=lambda s: s.key,
        claims=lambda s: s.addresses,
    )
    policies = _carry_over(
        new.policies,
        previous.policies,
        rejected["policies"],
        key=lambda p: p.key,
        claims=lambda p: (),
    )
    return ConfigSnapshot(tuple(workloads), tuple(services), tuple(policies), new.errors)


__all__ = ["ConfigSnapshot", "ObjectError", "keep_rejected"]
