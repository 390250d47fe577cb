"""PeerAuthentication: read one (`read_peer_authentication`), and convert the mesh's set into
the L4 policies the node agent enforces, as istiod does for ambient:

- a workload whose effective mode (workload policy, else namespace, else mesh; the oldest of
  each wins) is STRICT lists istiod's static `istio_converted_static_strict` DENY policy;
- a workload policy whose port-level modes differ from its effective mode becomes a
  `converted_peer_authentication_<name>` DENY policy, listed by the workloads it selects.

Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ztagent.fields import Invalid, port, show
from ztagent.fields import at as _at
from ztagent.fields import kube_type_name as _type_name
from ztagent.fields import mapping as _map
from ztagent.fields import only as _only
from ztagent.fields import string as _str
from ztagent.istio.authorization.l4 import STATIC_STRICT_POLICY_NAME, strict_peer_authentication
from ztagent.istio.envelope import Resource
from ztagent.istio.kubernetes import Meta, read_meta, read_selector, read_spec, selects
from ztagent.model.policy import Action, Authorization, Clause, Match, Rule, Scope, StringMatch
from ztagent.names import DEFAULT_ROOT_NAMESPACE

CONVERTED_PEER_AUTHENTICATION_PREFIX = "converted_peer_authentication_"
_MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")


@dataclass(slots=True)
class PeerAuthentication:
    meta: Meta
    selector: dict[str, str] | None
    mode: str
    ports: dict[int, str]

    @property
    def order(self) -> tuple[str, str, str]:
        return (self.meta.created, self.meta.namespace, self.meta.name)


def _mode(value: object, path: str) -> str:
    data = _map(value, path)
    _only(data, path, ("mode",))
    mode = _str(data.get("mode"), _at(path, "mode"), "UNSET")
    if mode not in _MTLS_MODES:
        raise Invalid(_at(path, "mode"), f"{show(mode)} is not one of {', '.join(_MTLS_MODES)}")
    return mode


def read_peer_authentication(
    resource: Resource, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> tuple[PeerAuthentication, list[tuple[str, str]]]:
    """One PeerAuthentication, with notes `(path, reason)`; raises `Invalid` naming the field
    path."""
    meta = read_meta(resource)
    spec = read_spec(resource)
    _only(spec, "spec", ("selector", "mtls", "portLevelMtls"))
    selector = read_selector(spec.get("selector"), "spec.selector")
    mode = _mode(spec.get("mtls"), "spec.mtls")
    ports: dict[int, str] = {}
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None:
        if not isinstance(raw_ports, dict):
            raise Invalid("spec.portLevelMtls", f"must be a mapping, got {_type_name(raw_ports)}")
        for key, item in raw_ports.items():
            path = _at("spec.portLevelMtls", str(key))
            ports[port(key, path)] = _mode(item, path)
        if ports and selector is None:
            raise Invalid("spec.portLevelMtls", "requires a workload selector")
    notes: list[tuple[str, str]] = []
    if selector is not None and meta.namespace == root_namespace:
        notes.append(("spec.selector", "a selector policy in the root namespace has no effect"))
    return PeerAuthentication(meta, selector, mode, ports), notes


# --- conversion ---------------------------------------------------------------------------------


def _oldest(candidates: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    return min(candidates, key=lambda pa: pa.order, default=None)


@dataclass(slots=True)
class _PeerScope:
    mesh: PeerAuthentication | None
    namespace: PeerAuthentication | None

    @property
    def parent_strict(self) -> bool:
        """The effective mode above the workload policy is STRICT (namespace, else mesh)."""
        if self.namespace is not None and self.namespace.mode != "UNSET":
            return self.namespace.mode == "STRICT"
        return self.mesh is not None and self.mesh.mode == "STRICT"


def _peer_scope(peers: Sequence[PeerAuthentication], namespace: str, root: str) -> _PeerScope:
    mesh = _oldest(pa for pa in peers if pa.meta.namespace == root and pa.selector is None)
    ns = None
    if namespace != root:
        ns = _oldest(pa for pa in peers if pa.meta.namespace == namespace and pa.selector is None)
    return _PeerScope(mesh, ns)


_NO_IDENTITY = Match(not_principals=(StringMatch.presence(),))
_NON_STRICT = ("PERMISSIVE", "DISABLE")


def converted_policy(
    peers: Sequence[PeerAuthentication],
    pa: PeerAuthentication,
    root: str = DEFAULT_ROOT_NAMESPACE,
) -> Authorization | None:
    """A workload PeerAuthentication with port-level modes as a DENY policy (istiod's shape),
    given every PeerAuthentication of the mesh (`peers`); None when it needs none."""
    if pa.selector is None or not pa.ports or pa.meta.namespace == root:
        return None
    scope = _peer_scope(peers, pa.meta.namespace, root)
    parent_strict = pa.mode == "STRICT" or (pa.mode == "UNSET" and scope.parent_strict)
    clauses: list[Clause] = []
    rules: list[Rule] = []
    if pa.mode == "STRICT":
        clauses.append(Clause((_NO_IDENTITY,)))
    found_non_strict = False
    for number, mode in sorted(pa.ports.items()):
        if mode == "STRICT":
            if parent_strict:
                continue
            strict_port = Match(
                not_principals=(StringMatch.presence(),), destination_ports=(number,)
            )
            rules.append(Rule((Clause((strict_port,)),)))
        elif mode in _NON_STRICT:
            if not parent_strict:
                continue
            found_non_strict = True
            clauses.append(Clause((Match(not_destination_ports=(number,)),)))
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


def policy_keys(
    peers: Sequence[PeerAuthentication],
    namespace: str,
    labels: Mapping[str, str],
    converted: Mapping[str, Authorization],
    root: str = DEFAULT_ROOT_NAMESPACE,
) -> list[str]:
    """The PeerAuthentication-derived policies a workload of `namespace` with `labels` lists,
    as istiod computes them; `converted` maps keys to the `converted_policy` results."""
    if not peers:
        return []
    scope = _peer_scope(peers, namespace, root)
    strict = scope.parent_strict
    workload = None
    if namespace != root:
        workload = _oldest(
            pa
            for pa in peers
            if pa.meta.namespace == namespace
            and pa.selector is not None
            and selects(pa.selector, labels)
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


def static_strict(root: str = DEFAULT_ROOT_NAMESPACE) -> Authorization:
    """istiod's `<root>/istio_converted_static_strict` (see `strict_peer_authentication`)."""
    return strict_peer_authentication(STATIC_STRICT_POLICY_NAME, root)
