"""L7 authorization at the waypoint: AuthorizationPolicy attached by `targetRefs`. Pure, no I/O.

This module owns what a request looks like to policy (`RequestContext`) and the decision
(`evaluate`) over the `AuthorizationPolicy` model (`ztagent.istio.authorization.policy` reads
it; `ztagent.istio.authorization.waypoint` picks the waypoint's policies). It does not own JWT
validation (`ztagent.istio.jwt` produces the `RequestAuth` a context carries), path
normalization (the proxy normalizes once, for routing and policy alike) or sending the 403.

Which policies are the waypoint's (as istiod decides for ambient):
  - a policy with `targetRefs` (or the older single `targetRef`) naming a Gateway
    (gateway.networking.k8s.io), a Service (core group) or a ServiceEntry (networking.istio.io)
    in the policy's own namespace, or the `istio-waypoint` GatewayClass from the root namespace;
  - a policy with a `selector`, or with neither, is enforced elsewhere (node agent or sidecar) and
    is skipped with a note; `selector` together with `targetRefs` is an error.
  `policies_for` picks the policies of one waypoint and, optionally, one destination service.

The decision follows Istio's order:
  1. a matching CUSTOM policy denies: no external authorizer is wired to the waypoint, and istiod
     turns a CUSTOM policy whose provider it cannot use into a DENY of the same rules
     ("deny-due-to-bad-CUSTOM-action"), so this fails closed the same way;
  2. a matching DENY policy denies;
  3. with no ALLOW policy, allow;
  4. a matching ALLOW policy allows; otherwise deny.
AUDIT policies never change the decision; a match sets `Decision.audited`. Dry-run policies
(annotation `istio.io/dry-run: "true"`) are evaluated on the side: `dry_run_matches` lists those
that matched and `dry_run_allowed` is what the decision would have been with them enforced.
A denied request gets Istio's answer: 403 with body `RBAC: access denied`.

Matching (the same structure as `ztagent.istio.authorization.l4`, with its string and CIDR
tests reused):
  - rules are ORed, a policy without rules matches nothing; a rule `{}` matches everything;
  - in a rule, `from`, `to` and every `when` condition must hold; `from` holds when any of its
    sources holds, `to` when any of its operations holds;
  - in a source or operation every set field must hold (any of its values) and every `not*`
    field must not; an attribute the request lacks (no peer identity, no JWT, no header) matches
    no positive value and therefore satisfies every negative one.
  String values use Istio's forms: `*` (any non-empty value), `x*` (prefix), `*x` (suffix), else
  exact. Per field:
  - `paths` match the path without its query string and fragment; a path with `{*}` (exactly one
    segment) or `{**}` (any rest, including `/`, only as the last operator) is an Envoy URI
    template, each operator a whole segment;
  - `hosts` match the `:authority` ignoring case, port included as sent: `example.com` does not
    match `example.com:8080` (Istio's documented behaviour; write `example.com:*` for any port);
  - `methods` are case-sensitive; `request.headers[name]` compares the values of all headers of
    that name joined with `,`, and `*` there means "present", even with an empty value;
  - `requestPrincipals` and `request.auth.principal` are `iss/sub`, split at the last `/` and
    compared on the JWT's `iss` and `sub` claims as istiod does (`*` needs both to be non-empty);
  - `request.auth.claims[a][b]` walks nested claims; a claim holding a list matches when any
    string element matches, and non-string values never match (Envoy's metadata matchers);
  - `request.auth.audiences` and `request.auth.presenter` are the claims `aud` and `azp`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ztagent.identity.spiffe import Identity
from ztagent.istio.authorization.policy import (
    Action,
    Attribute,
    AuthorizationPolicy,
    Condition,
    Operation,
    PathMatch,
    PolicyRule,
    RequestPrincipalMatch,
    Source,
    TargetRef,
)
from ztagent.istio.gateway import WAYPOINT_CLASS
from ztagent.istio.routing.request import Headers
from ztagent.model.policy import CidrMatch, ServiceAccountMatch, StringMatch, StringMatchKind
from ztagent.model.workload import IPAddress
from ztagent.names import DEFAULT_ROOT_NAMESPACE

DENIED_STATUS = 403
DENIED_BODY = b"RBAC: access denied"


# --- request side ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestAuth:
    """A request's validated JWT, as `ztagent.istio.jwt` reports it."""

    claims: Mapping[str, Any]

    @property
    def issuer(self) -> str | None:
        value = self.claims.get("iss")
        return value if isinstance(value, str) else None

    @property
    def subject(self) -> str | None:
        value = self.claims.get("sub")
        return value if isinstance(value, str) else None

    @property
    def principal(self) -> str | None:
        """`iss/sub`, Istio's request principal; None when either claim is missing."""
        if self.issuer is None or self.subject is None:
            return None
        return f"{self.issuer}/{self.subject}"

    @property
    def audiences(self) -> tuple[str, ...]:
        value = self.claims.get("aud")
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(item for item in value if isinstance(item, str))
        return ()

    @property
    def presenter(self) -> str | None:
        value = self.claims.get("azp")
        return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What L7 policy can see of one request.

    `path` is the request's `:path` as normalized by the proxy, query string included (it is
    removed here for matching). `host` is the `:authority`. `source_identity` is the peer's
    workload identity (the HBONE client), `source_ip` its address, `remote_ip` the original
    client address when the proxy derived one (defaults to `source_ip`), `destination_port` the
    service port the request was sent to. `auth` is the validated JWT, None for anonymous.
    """

    method: str
    path: str
    host: str
    destination_port: int
    headers: Headers = field(default_factory=Headers)
    source_identity: Identity | None = None
    source_ip: IPAddress | None = None
    remote_ip: IPAddress | None = None
    destination_ip: IPAddress | None = None
    sni: str | None = None
    auth: RequestAuth | None = None

    @property
    def url_path(self) -> str:
        """The path without query string and fragment: what `paths` match."""
        return strip_query(self.path)

    @property
    def client_ip(self) -> IPAddress | None:
        return self.remote_ip if self.remote_ip is not None else self.source_ip


def strip_query(path: str) -> str:
    """Drop everything from the first `?` or `#`, as Envoy's path matchers do."""
    end = len(path)
    for mark in ("?", "#"):
        at = path.find(mark)
        if at != -1:
            end = min(end, at)
    return path[:end]


# --- leaf matchers -----------------------------------------------------------------------------


def _strings_match(values: tuple[StringMatch, ...], text: str | None) -> bool:
    return text is not None and any(value.matches(text) for value in values)


def _cidrs_match(values: tuple[CidrMatch, ...], ip: IPAddress | None) -> bool:
    return ip is not None and any(value.contains(ip) for value in values)


def _claim_matches(values: tuple[StringMatch, ...], claim: object) -> bool:
    if isinstance(claim, str):
        return any(value.matches(claim) for value in values)
    if isinstance(claim, list):
        return any(_claim_matches(values, item) for item in claim if isinstance(item, str))
    return False


def _lookup_claim(auth: RequestAuth | None, path: tuple[str, ...]) -> object:
    node: object = auth.claims if auth is not None else None
    for name in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(name)
    return node


# --- policy model ------------------------------------------------------------------------------

_T = TypeVar("_T")


def _holds(
    positive: tuple[_T, ...], negative: tuple[_T, ...], test: Callable[[tuple[_T, ...]], bool]
) -> bool:
    """A field pair holds: some positive value matches (if any are set) and no negative one."""
    if positive and not test(positive):
        return False
    return not (negative and test(negative))


def _request_principal(values: tuple[RequestPrincipalMatch, ...], auth: RequestAuth | None) -> bool:
    if auth is None:
        return False
    return any(value.matches(auth.issuer, auth.subject) for value in values)


def source_holds(source: Source, request: RequestContext) -> bool:
    """Every set field of `from.source` holds and no `not_*` field does."""
    identity = request.source_identity
    principal = identity.principal if identity is not None else None
    namespace = identity.namespace if identity is not None else None
    source_ip = request.source_ip

    def accounts(values: tuple[ServiceAccountMatch, ...]) -> bool:
        return identity is not None and any(sa.matches(identity) for sa in values)

    return (
        _holds(source.principals, source.not_principals, lambda v: _strings_match(v, principal))
        and _holds(source.namespaces, source.not_namespaces, lambda v: _strings_match(v, namespace))
        and _holds(source.service_accounts, source.not_service_accounts, accounts)
        and _holds(
            source.request_principals,
            source.not_request_principals,
            lambda v: _request_principal(v, request.auth),
        )
        and _holds(source.ip_blocks, source.not_ip_blocks, lambda v: _cidrs_match(v, source_ip))
        and _holds(
            source.remote_ip_blocks,
            source.not_remote_ip_blocks,
            lambda v: _cidrs_match(v, request.client_ip),
        )
    )


def operation_holds(operation: Operation, request: RequestContext) -> bool:
    """Every set field of `to.operation` holds and no `not_*` field does."""
    host = request.host.lower()
    path = request.url_path
    port = request.destination_port

    def hosts(values: tuple[StringMatch, ...]) -> bool:
        # Values are stored lower-case; `*` is Envoy's present_match (any host at all).
        return any(v.kind is StringMatchKind.PRESENCE or v.matches(host) for v in values)

    def paths(values: tuple[PathMatch, ...]) -> bool:
        return any(value.matches(path) for value in values)

    if operation.hosts and not hosts(operation.hosts):
        return False
    if operation.not_hosts and hosts(operation.not_hosts):
        return False
    if operation.ports and port not in operation.ports:
        return False
    if operation.not_ports and port in operation.not_ports:
        return False
    if operation.methods and not _strings_match(operation.methods, request.method):
        return False
    if operation.not_methods and _strings_match(operation.not_methods, request.method):
        return False
    if operation.paths and not paths(operation.paths):
        return False
    return not (operation.not_paths and paths(operation.not_paths))


def _condition_test(condition: Condition, values: tuple[Any, ...], request: RequestContext) -> bool:
    attribute = condition.attribute
    identity = request.source_identity
    if attribute is Attribute.REQUEST_HEADER:
        joined = request.headers.joined(condition.name[0])
        if joined is None:
            return False
        return any(v.kind is StringMatchKind.PRESENCE or v.matches(joined) for v in values)
    if attribute is Attribute.SOURCE_IP:
        return _cidrs_match(values, request.source_ip)
    if attribute is Attribute.REMOTE_IP:
        return _cidrs_match(values, request.client_ip)
    if attribute is Attribute.DESTINATION_IP:
        return _cidrs_match(values, request.destination_ip)
    if attribute is Attribute.DESTINATION_PORT:
        return request.destination_port in values
    if attribute is Attribute.SOURCE_NAMESPACE:
        return _strings_match(values, identity.namespace if identity else None)
    if attribute is Attribute.SOURCE_PRINCIPAL:
        return _strings_match(values, identity.principal if identity else None)
    if attribute is Attribute.SOURCE_SERVICE_ACCOUNT:
        return identity is not None and any(sa.matches(identity) for sa in values)
    if attribute is Attribute.REQUEST_PRINCIPAL:
        return _request_principal(values, request.auth)
    if attribute is Attribute.REQUEST_AUDIENCES:
        return _claim_matches(values, _lookup_claim(request.auth, ("aud",)))
    if attribute is Attribute.REQUEST_PRESENTER:
        return _claim_matches(values, _lookup_claim(request.auth, ("azp",)))
    if attribute is Attribute.REQUEST_CLAIM:
        return _claim_matches(values, _lookup_claim(request.auth, condition.name))
    if attribute is Attribute.CONNECTION_SNI:
        return _strings_match(values, request.sni)
    # Trust domains and experimental keys never reach a waypoint (its reader refuses them).
    return False


def condition_holds(condition: Condition, request: RequestContext) -> bool:
    """A `when` entry holds: some value matches (if any) and no `notValues` entry does."""
    if condition.values and not _condition_test(condition, condition.values, request):
        return False
    return not (condition.not_values and _condition_test(condition, condition.not_values, request))


def rule_holds(rule: PolicyRule, request: RequestContext) -> bool:
    """`from` (when given) and `to` (when given) each have an entry that holds; every `when`
    holds."""
    if rule.sources is not None and not any(source_holds(s, request) for s in rule.sources):
        return False
    if rule.operations is not None and not any(
        operation_holds(o, request) for o in rule.operations
    ):
        return False
    return all(condition_holds(condition, request) for condition in rule.conditions)


def policy_matches(policy: AuthorizationPolicy, request: RequestContext) -> bool:
    """Any rule holds; a policy without rules matches nothing."""
    return any(rule_holds(rule, request) for rule in policy.rules)


class Attached(Protocol):
    """Anything attached by `targetRefs`: waypoint policies and RequestAuthentications."""

    @property
    def namespace(self) -> str: ...

    @property
    def targets(self) -> tuple[TargetRef, ...]: ...


_A = TypeVar("_A", bound=Attached)


def policies_for(
    policies: Iterable[_A],
    waypoint: tuple[str, str],
    service: tuple[str, str, str] | None = None,
    *,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> list[_A]:
    """The policies one request through waypoint `(namespace, name)` must pass.

    `service` is the destination as `(kind, namespace, name)` with kind `Service` or
    `ServiceEntry`. Policies targeting the waypoint's Gateway apply to everything it carries;
    those targeting the `istio-waypoint` GatewayClass (root namespace only) to every waypoint;
    those targeting a service only to requests for that service. Works for AuthorizationPolicy
    and RequestAuthentication alike.
    """
    selected: list[_A] = []
    for policy in policies:
        for target in policy.targets:
            if target.kind == "Gateway":
                hit = (target.namespace, target.name) == waypoint
            elif target.kind == "GatewayClass":
                hit = target.name == WAYPOINT_CLASS and policy.namespace == root_namespace
            else:
                hit = (
                    service is not None and (target.kind, target.namespace, target.name) == service
                )
            if hit:
                selected.append(policy)
                break
    return selected


# --- evaluation --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """The decision, the policy that made it (None for a default) and a reason for logs.

    `audited` is set when an AUDIT policy matched (`audit_policies` names them);
    `dry_run_matches` lists dry-run policies that matched and `dry_run_allowed` is the decision
    with dry-run policies enforced too (None when no dry-run policy applies).
    """

    allowed: bool
    policy: str | None
    reason: str
    audited: bool = False
    audit_policies: tuple[str, ...] = ()
    dry_run_matches: tuple[str, ...] = ()
    dry_run_allowed: bool | None = None

    @property
    def status(self) -> int | None:
        """The HTTP status to answer with, None to let the request through."""
        return None if self.allowed else DENIED_STATUS

    @property
    def body(self) -> bytes:
        return b"" if self.allowed else DENIED_BODY


def _decide(
    policies: list[AuthorizationPolicy], request: RequestContext
) -> tuple[bool, str | None, str]:
    for action in (Action.CUSTOM, Action.DENY):
        for policy in policies:
            if policy.action is action and policy_matches(policy, request):
                if action is Action.CUSTOM:
                    why = f"denied by CUSTOM policy {policy.key} (no external authorizer)"
                else:
                    why = f"denied by DENY policy {policy.key}"
                return False, policy.key, why
    allow = [policy for policy in policies if policy.action is Action.ALLOW]
    if not allow:
        return True, None, "no ALLOW policy applies"
    for policy in allow:
        if policy_matches(policy, request):
            return True, policy.key, f"allowed by ALLOW policy {policy.key}"
    return False, None, f"no ALLOW policy matched ({len(allow)} applied)"


def evaluate(policies: Iterable[AuthorizationPolicy], request: RequestContext) -> Decision:
    """Decide one request against the policies that apply to it (see `policies_for`).

    A policy listed twice counts once.
    """
    unique: dict[str, AuthorizationPolicy] = {}
    for policy in policies:
        unique.setdefault(policy.key, policy)
    enforced = [p for p in unique.values() if not p.dry_run and p.action is not Action.AUDIT]
    allowed, key, reason = _decide(enforced, request)

    audits = tuple(
        p.key
        for p in unique.values()
        if p.action is Action.AUDIT and not p.dry_run and policy_matches(p, request)
    )
    dry = [p for p in unique.values() if p.dry_run]
    dry_matches = tuple(p.key for p in dry if policy_matches(p, request))
    dry_allowed: bool | None = None
    if dry:
        together = enforced + [p for p in dry if p.action is not Action.AUDIT]
        dry_allowed = _decide(together, request)[0]
    return Decision(
        allowed,
        key,
        reason,
        audited=bool(audits),
        audit_policies=audits,
        dry_run_matches=dry_matches,
        dry_run_allowed=dry_allowed,
    )
