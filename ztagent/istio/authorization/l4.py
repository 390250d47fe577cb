"""L4 authorization: does a policy set allow one inbound connection? Pure functions, no I/O.

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

from collections.abc import Iterable
from dataclasses import dataclass

from ztagent.identity.spiffe import Identity
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

STATIC_STRICT_POLICY_NAME = "istio_converted_static_strict"
"""istiod's name for the policy that expresses an effective PeerAuthentication STRICT."""
DEFAULT_ROOT_NAMESPACE = "istio-system"


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
