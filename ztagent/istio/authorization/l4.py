"""L4 authorization: the node agent's form of an AuthorizationPolicy (`lower`, from the one
model `ztagent.istio.authorization.policy` reads, to ztunnel's workload-API `Authorization`) and
whether a policy set allows one inbound connection (`evaluate`). Pure functions, no I/O.

Lowering follows istiod's ambient translation: scope GLOBAL (root namespace, no selector),
NAMESPACE (no selector) or WORKLOAD_SELECTOR (listed by the selected workloads). Attributes a
connection does not carry (HTTP methods, paths, hosts, request principals, remote IPs, trust
domains, HTTP `when` keys) fail closed: an ALLOW rule using them is dropped, a DENY rule keeps
only its L4 part (a DENY rule left with nothing to match denies everything in scope, as Istio
does for TCP traffic). Policies with `targetRefs` belong to waypoints and AUDIT/CUSTOM ones are
not enforced by the node agent: `not_enforced` says why.

The decision follows Istio's AuthorizationPolicy order, as ztunnel enforces it:
  1. any matching DENY policy (not dry-run) denies;
  2. if no ALLOW policy (not dry-run) applies, allow;
  3. if any ALLOW policy matches, allow;
  4. otherwise deny.
Dry-run policies never decide; those that match are reported in `Verdict.dry_run_matches`.

Matching, the same as ztunnel's `rbac.rs`:
  - rules are ORed; an Authorization with no rules matches nothing (so an ALLOW without rules
    is "allow nothing");
  - the clauses of a rule are ANDed; a rule without clauses matches everything;
  - the matches of a clause are ORed; a clause without matches matches everything, but a Match
    with no field set matches nothing (ztunnel skips empty matches);
  - inside a Match every non-empty field must hold (any of its values matches) and every
    non-empty `not_*` field must not (none of its values matches).
Principals are compared without `spiffe://`. A connection without a source identity (plaintext
on 15006) matches no positive principals / namespaces / service_accounts entry, and therefore
satisfies every `not_*` form of them: that is how STRICT mTLS (a DENY with `not_principals: *`)
catches exactly the identity-less connections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ztagent.fields import Invalid, at, show
from ztagent.identity.spiffe import Identity
from ztagent.istio.authorization import policy as model
from ztagent.model.policy import (
    Action,
    Authorization,
    CidrMatch,
    Clause,
    Match,
    Rule,
    Scope,
    StringMatch,
)
from ztagent.model.workload import IPAddress
from ztagent.names import DEFAULT_ROOT_NAMESPACE

STATIC_STRICT_POLICY_NAME = "istio_converted_static_strict"
"""istiod's name for the policy that expresses an effective PeerAuthentication STRICT."""


@dataclass(frozen=True, slots=True)
class ConnectionAttributes:
    """What L4 policy can see of a connection; namespace and account come from the identity."""

    source_identity: Identity | None
    source_ip: IPAddress
    destination_ip: IPAddress
    destination_port: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision, the policy that made it (None for a default), and a reason for logs."""

    allowed: bool
    policy: str | None
    reason: str
    dry_run_matches: tuple[str, ...] = ()


def _strings(values: tuple[StringMatch, ...], text: str | None) -> bool:
    if text is None:
        return False
    return any(value.matches(text) for value in values)


def _cidrs(values: tuple[CidrMatch, ...], ip: IPAddress) -> bool:
    return any(value.contains(ip) for value in values)


def match_holds(match: Match, conn: ConnectionAttributes) -> bool:
    """Every set field of `match` holds for `conn`; an empty Match never holds."""
    if match.is_empty:
        return False
    identity = conn.source_identity
    principal = identity.principal if identity is not None else None
    namespace = identity.namespace if identity is not None else None

    if match.destination_ips and not _cidrs(match.destination_ips, conn.destination_ip):
        return False
    if match.not_destination_ips and _cidrs(match.not_destination_ips, conn.destination_ip):
        return False
    if match.source_ips and not _cidrs(match.source_ips, conn.source_ip):
        return False
    if match.not_source_ips and _cidrs(match.not_source_ips, conn.source_ip):
        return False
    if match.destination_ports and conn.destination_port not in match.destination_ports:
        return False
    if match.not_destination_ports and conn.destination_port in match.not_destination_ports:
        return False
    if match.service_accounts and not (
        identity is not None and any(sa.matches(identity) for sa in match.service_accounts)
    ):
        return False
    if (
        match.not_service_accounts
        and identity is not None
        and any(sa.matches(identity) for sa in match.not_service_accounts)
    ):
        return False
    if match.principals and not _strings(match.principals, principal):
        return False
    if match.not_principals and _strings(match.not_principals, principal):
        return False
    if match.namespaces and not _strings(match.namespaces, namespace):
        return False
    return not (match.not_namespaces and _strings(match.not_namespaces, namespace))


def clause_holds(clause: Clause, conn: ConnectionAttributes) -> bool:
    """Any match holds; a clause without matches always holds."""
    if not clause.matches:
        return True
    return any(match_holds(match, conn) for match in clause.matches)


def rule_holds(rule: Rule, conn: ConnectionAttributes) -> bool:
    """Every clause holds; a rule without clauses always holds."""
    return all(clause_holds(clause, conn) for clause in rule.clauses)


def policy_matches(policy: Authorization, conn: ConnectionAttributes) -> bool:
    """Any rule holds; a policy without rules never matches."""
    return any(rule_holds(rule, conn) for rule in policy.rules)


def evaluate(conn: ConnectionAttributes, policies: Iterable[Authorization]) -> Verdict:
    """Decide one connection against the policies that apply to its destination workload.

    Each policy counts once even if listed twice (by scope and by the workload).
    """
    unique: dict[str, Authorization] = {}
    for policy in policies:
        unique.setdefault(policy.key, policy)

    dry_run: list[str] = []
    deny: str | None = None
    allow_policies = 0
    allow: str | None = None
    for key, policy in unique.items():
        if policy.dry_run:
            if policy_matches(policy, conn):
                dry_run.append(key)
            continue
        if policy.action is Action.DENY:
            if deny is None and policy_matches(policy, conn):
                deny = key
        else:
            allow_policies += 1
            if allow is None and policy_matches(policy, conn):
                allow = key
    dry = tuple(dry_run)
    if deny is not None:
        return Verdict(False, deny, f"denied by DENY policy {deny}", dry)
    if allow_policies == 0:
        return Verdict(True, None, "no ALLOW policy applies", dry)
    if allow is not None:
        return Verdict(True, allow, f"allowed by ALLOW policy {allow}", dry)
    return Verdict(False, None, f"no ALLOW policy matched ({allow_policies} applied)", dry)


def strict_peer_authentication(
    name: str = STATIC_STRICT_POLICY_NAME,
    namespace: str = DEFAULT_ROOT_NAMESPACE,
    scope: Scope = Scope.WORKLOAD_SELECTOR,
    *,
    permissive_ports: Iterable[int] = (),
    dry_run: bool = False,
) -> Authorization:
    """PeerAuthentication STRICT as the DENY policy istiod sends to ztunnel.

    With the defaults this is istiod's static `istio-system/istio_converted_static_strict`:
    scope WORKLOAD_SELECTOR, so it applies to the workloads whose `authorization_policies`
    list it (istiod lists it for every workload whose effective mode is STRICT). It denies
    connections without a peer identity (`not_principals: [presence]`). `permissive_ports`
    are the port-level PERMISSIVE exceptions: istiod ANDs a `not_destination_ports` clause for
    each, so plaintext to those ports passes.
    """
    clauses = [Clause((Match(not_principals=(StringMatch.presence(),)),))]
    clauses.extend(
        Clause((Match(not_destination_ports=(port,)),)) for port in sorted(set(permissive_ports))
    )
    return Authorization(
        name=name,
        namespace=namespace,
        scope=scope,
        action=Action.DENY,
        rules=(Rule(tuple(clauses)),),
        dry_run=dry_run,
    )


# --- lowering an AuthorizationPolicy -----------------------------------------------------------

_SOURCE_UNSEEN = (
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "trustDomains",
    "notTrustDomains",
)
_OPERATION_UNSEEN = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_CONDITION_FIELDS: dict[model.Attribute, str] = {
    model.Attribute.SOURCE_IP: "source_ips",
    model.Attribute.DESTINATION_IP: "destination_ips",
    model.Attribute.DESTINATION_PORT: "destination_ports",
    model.Attribute.SOURCE_SERVICE_ACCOUNT: "service_accounts",
    model.Attribute.SOURCE_NAMESPACE: "namespaces",
    model.Attribute.SOURCE_PRINCIPAL: "principals",
}
"""The `when` keys a connection carries, and the `Match` field each becomes."""
_WHEN_OTHER_EXACT = ("source.trustDomain",)
_WHEN_OTHER_PREFIX = ("request.headers[", "request.auth.claims[")
"""Keys Istio knows that the model keeps without an attribute (see `_istio_key`)."""

_E = TypeVar("_E", model.Source, model.Operation)


@dataclass(frozen=True, slots=True)
class Lowered:
    """An AuthorizationPolicy as the node agent enforces it, with notes `(path, reason)` on
    what it could not keep."""

    authorization: Authorization
    notes: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def not_enforced(policy: model.AuthorizationPolicy) -> tuple[str, str] | None:
    """`(path, reason)` when `policy` is not the node agent's to enforce, else None."""
    if policy.targets:
        return "spec.targetRefs", "attached to a waypoint by targetRefs; not for the node agent"
    if policy.action in (model.Action.AUDIT, model.Action.CUSTOM):
        return "spec.action", f"{policy.action.value} policies are not enforced by the node agent"
    return None


def _source_match(source: model.Source) -> Match:
    return Match(
        principals=source.principals,
        not_principals=source.not_principals,
        namespaces=source.namespaces,
        not_namespaces=source.not_namespaces,
        source_ips=source.ip_blocks,
        not_source_ips=source.not_ip_blocks,
        service_accounts=source.service_accounts,
        not_service_accounts=source.not_service_accounts,
    )


def _operation_match(operation: model.Operation) -> Match:
    return Match(destination_ports=operation.ports, not_destination_ports=operation.not_ports)


def _istio_key(key: str) -> bool:
    """A `when` key Istio knows that the waypoint does not evaluate (`source.trustDomain`,
    `request.headers[...]` and `request.auth.claims[...]` of any shape, the
    `experimental.envoy.filters.*` keys)."""
    return (
        key in _WHEN_OTHER_EXACT
        or (key.startswith(_WHEN_OTHER_PREFIX) and key.endswith("]"))
        or key.startswith("experimental.envoy.filters.")
    )


def _lower_rule(rule: model.PolicyRule, path: str, action: Action) -> tuple[Rule | None, list[str]]:
    """One rule as `Clause`s; None when an ALLOW rule is dropped for what L4 cannot see."""
    clauses: list[Clause] = []
    unseen: list[str] = []

    def entries(
        items: tuple[_E, ...],
        where: str,
        spelled: Mapping[str, str],
        names: tuple[str, ...],
        to_match: Callable[[_E], Match],
    ) -> None:
        """`from` or `to`: one clause ORing its entries; an entry with only unseen fields
        matches everything at L4, and so then does the clause (it is left out)."""
        matches = []
        for item in items:
            unseen.extend(where + name for name in names if getattr(item, spelled[name]))
            matches.append(to_match(item))
        if all(not match.is_empty for match in matches):
            clauses.append(Clause(tuple(matches)))

    if rule.sources is not None:
        entries(rule.sources, "from.source.", model.SOURCE_FIELDS, _SOURCE_UNSEEN, _source_match)
    if rule.operations is not None:
        entries(
            rule.operations,
            "to.operation.",
            model.OPERATION_FIELDS,
            _OPERATION_UNSEEN,
            _operation_match,
        )
    for c, condition in enumerate(rule.conditions):
        name = _CONDITION_FIELDS.get(condition.attribute) if condition.attribute else None
        if name is None:
            if condition.attribute is None and not _istio_key(condition.key):
                key_path = at(at(at(path, "when"), c), "key")
                raise Invalid(key_path, f"{show(condition.key)} is not a known attribute")
            unseen.append(f"when {condition.key}")
            continue
        fields_: dict[str, Any] = {name: condition.values}
        if condition.not_values:
            fields_["not_" + name] = condition.not_values
        clauses.append(Clause((Match(**fields_),)))
    if unseen and action is Action.ALLOW:
        return None, unseen
    return Rule(tuple(clauses)), unseen


def lower(
    policy: model.AuthorizationPolicy, *, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> Lowered:
    """An ALLOW or DENY policy without `targetRefs` (see `not_enforced`) as ztunnel's
    `Authorization`, with a note for each rule enforced differently from how it is written."""
    action = Action.ALLOW if policy.action is model.Action.ALLOW else Action.DENY
    rules: list[Rule] = []
    notes: list[tuple[str, str]] = []
    for i, item in enumerate(policy.rules):
        rule, unseen = _lower_rule(item, at("spec.rules", i), action)
        if unseen:
            found = ", ".join(sorted(set(unseen)))
            if rule is None:
                reason = f"ALLOW rule dropped: the node agent cannot check {found} (use a waypoint)"
            elif not rule.clauses:
                reason = f"DENY rule enforced without {found}: it now denies all traffic in scope"
            else:
                reason = f"DENY rule enforced without {found} (more restrictive than written)"
            notes.append((at("spec.rules", i), reason))
        if rule is not None:
            rules.append(rule)
    if not policy.rules and action is Action.DENY:
        notes.append(("spec.rules", "a DENY policy without rules denies nothing"))
    if policy.selector is not None:
        scope = Scope.WORKLOAD_SELECTOR
    elif policy.namespace == root_namespace:
        scope = Scope.GLOBAL
    else:
        scope = Scope.NAMESPACE
    authorization = Authorization(
        name=policy.name,
        namespace=policy.namespace,
        scope=scope,
        action=action,
        rules=tuple(rules),
        dry_run=policy.dry_run,
    )
    return Lowered(authorization, tuple(notes))
