"""L7 authorization at the waypoint: AuthorizationPolicy attached by `targetRefs`. Pure, no I/O.

This module owns reading AuthorizationPolicy resources that belong to a waypoint, what a request
looks like to policy (`RequestContext`), and the decision (`evaluate`). It does not own JWT
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

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar

from ztagent.identity.spiffe import Identity
from ztagent.istio.envelope import Resource, ResourceError
from ztagent.model.fields import Invalid, show
from ztagent.model.fields import at as _at
from ztagent.model.fields import mapping as _map
from ztagent.model.fields import only as _only
from ztagent.model.fields import sequence as _list
from ztagent.model.fields import string as _str
from ztagent.model.fields import strings as _strings
from ztagent.model.policy import CidrMatch, ServiceAccountMatch, StringMatch, StringMatchKind
from ztagent.model.workload import IPAddress

API_GROUP = "security.istio.io"
API_VERSIONS = ("v1", "v1beta1")
KIND = "AuthorizationPolicy"
ANNOTATION_DRY_RUN = "istio.io/dry-run"
DEFAULT_ROOT_NAMESPACE = "istio-system"
WAYPOINT_CLASS = "istio-waypoint"

DENIED_STATUS = 403
DENIED_BODY = b"RBAC: access denied"

GATEWAY_GROUP = "gateway.networking.k8s.io"
NETWORKING_GROUP = "networking.istio.io"
_TARGET_KINDS: dict[str, tuple[str, ...]] = {
    "Gateway": (GATEWAY_GROUP,),
    "GatewayClass": (GATEWAY_GROUP,),
    "Service": ("", "core"),
    "ServiceEntry": (NETWORKING_GROUP,),
}


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


# --- request side ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Headers:
    """Request headers by lower-case name, each with its values in arrival order."""

    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]] | Mapping[str, str]) -> Headers:
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        merged: dict[str, list[str]] = {}
        for name, value in items:
            merged.setdefault(name.lower(), []).append(value)
        return cls({name: tuple(values) for name, values in merged.items()})

    def get_all(self, name: str) -> tuple[str, ...]:
        return self.values.get(name.lower(), ())

    def joined(self, name: str) -> str | None:
        """All values of `name` joined with `,` (how Envoy matches a repeated header)."""
        values = self.get_all(name)
        return ",".join(values) if values else None


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

# Characters a URI-template literal or `{*}` segment may hold (RFC 3986 pchar without `*` and
# `=`, as Envoy's uri_template library defines them); Istio additionally admits `=` in literals.
_TEMPLATE_CHARS = r"a-zA-Z0-9\-._~%!$&'()+,;:@"
_TEMPLATE_LITERAL = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+")
MATCH_ONE = "{*}"
MATCH_ANY = "{**}"


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """An Istio path template: `{*}` is one path segment, `{**}` the rest of the path (may be
    empty, may span segments), each a whole segment; everything else is literal."""

    template: str
    pattern: re.Pattern[str] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, template: str) -> PathTemplate:
        """Raises ValueError naming the problem, in Istio's terms."""
        if not template.startswith("/"):
            raise ValueError("a path template must start with /")
        parts: list[str] = []
        seen_any = False
        segments = template[1:].split("/")
        for index, segment in enumerate(segments):
            last = index == len(segments) - 1
            if segment in (MATCH_ONE, MATCH_ANY):
                if seen_any:
                    raise ValueError("{**} must be the last operator")
                seen_any = segment == MATCH_ANY
                chars = _TEMPLATE_CHARS + "/" if seen_any else _TEMPLATE_CHARS
                parts.append(f"[{chars}]*" if seen_any else f"[{chars}]+")
                continue
            if "{" in segment or "}" in segment:
                raise ValueError(f"segment {show(segment)} has {{ or }} beyond {{*}} and {{**}}")
            if segment == "" and last:
                parts.append("")  # a trailing slash is literal
                continue
            if not _TEMPLATE_LITERAL.fullmatch(segment):
                raise ValueError(f"segment {show(segment)} is not a valid path literal")
            parts.append(re.escape(segment))
        return cls(template, re.compile("/" + "/".join(parts)))

    def matches(self, path: str) -> bool:
        return self.pattern.fullmatch(path) is not None

    def __str__(self) -> str:
        return self.template


PathMatch = StringMatch | PathTemplate


def _strings_match(values: tuple[StringMatch, ...], text: str | None) -> bool:
    return text is not None and any(value.matches(text) for value in values)


def _cidrs_match(values: tuple[CidrMatch, ...], ip: IPAddress | None) -> bool:
    return ip is not None and any(value.contains(ip) for value in values)


@dataclass(frozen=True, slots=True)
class RequestPrincipalMatch:
    """One `requestPrincipals` value, compared on `iss` and `sub` as istiod generates it."""

    issuer: StringMatch
    subject: StringMatch

    @classmethod
    def parse(cls, text: str) -> RequestPrincipalMatch:
        anything = StringMatch.presence()
        iss, slash, sub = text.rpartition("/")
        if not slash:
            iss, sub = text, ""
        if text == "*":
            return cls(anything, anything)
        if text.startswith("*"):
            if not slash:
                return cls(anything, StringMatch.suffix(text[1:]))
            issuer = anything if iss == "*" else StringMatch.suffix(iss[1:])
            return cls(issuer, StringMatch.exact(sub))
        if text.endswith("*"):
            if not slash:
                return cls(StringMatch.prefix(text[:-1]), anything)
            subject = anything if sub == "*" else StringMatch.prefix(sub[:-1])
            return cls(StringMatch.exact(iss), subject)
        return cls(StringMatch.exact(iss), StringMatch.exact(sub))

    def matches(self, auth: RequestAuth | None) -> bool:
        if auth is None:
            return False
        iss, sub = auth.issuer, auth.subject
        return (
            iss is not None
            and sub is not None
            and self.issuer.matches(iss)
            and self.subject.matches(sub)
        )


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


@dataclass(frozen=True, slots=True)
class Source:
    """`from.source`: every set field must hold, every `not_*` field must not."""

    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    request_principals: tuple[RequestPrincipalMatch, ...] = ()
    not_request_principals: tuple[RequestPrincipalMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    ip_blocks: tuple[CidrMatch, ...] = ()
    not_ip_blocks: tuple[CidrMatch, ...] = ()
    remote_ip_blocks: tuple[CidrMatch, ...] = ()
    not_remote_ip_blocks: tuple[CidrMatch, ...] = ()

    def holds(self, request: RequestContext) -> bool:
        identity = request.source_identity
        principal = identity.principal if identity is not None else None
        namespace = identity.namespace if identity is not None else None
        auth = request.auth
        source_ip = request.source_ip

        def accounts(values: tuple[ServiceAccountMatch, ...]) -> bool:
            return identity is not None and any(sa.matches(identity) for sa in values)

        def request_principal(values: tuple[RequestPrincipalMatch, ...]) -> bool:
            return any(value.matches(auth) for value in values)

        return (
            _holds(self.principals, self.not_principals, lambda v: _strings_match(v, principal))
            and _holds(self.namespaces, self.not_namespaces, lambda v: _strings_match(v, namespace))
            and _holds(self.service_accounts, self.not_service_accounts, accounts)
            and _holds(self.request_principals, self.not_request_principals, request_principal)
            and _holds(self.ip_blocks, self.not_ip_blocks, lambda v: _cidrs_match(v, source_ip))
            and _holds(
                self.remote_ip_blocks,
                self.not_remote_ip_blocks,
                lambda v: _cidrs_match(v, request.client_ip),
            )
        )


@dataclass(frozen=True, slots=True)
class Operation:
    """`to.operation`: every set field must hold, every `not_*` field must not."""

    hosts: tuple[StringMatch, ...] = ()
    not_hosts: tuple[StringMatch, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[StringMatch, ...] = ()
    not_methods: tuple[StringMatch, ...] = ()
    paths: tuple[PathMatch, ...] = ()
    not_paths: tuple[PathMatch, ...] = ()

    def holds(self, request: RequestContext) -> bool:
        host = request.host.lower()
        path = request.url_path
        port = request.destination_port

        def hosts(values: tuple[StringMatch, ...]) -> bool:
            # Values are stored lower-case; `*` is Envoy's present_match (any host at all).
            return any(v.kind is StringMatchKind.PRESENCE or v.matches(host) for v in values)

        def paths(values: tuple[PathMatch, ...]) -> bool:
            return any(value.matches(path) for value in values)

        if self.hosts and not hosts(self.hosts):
            return False
        if self.not_hosts and hosts(self.not_hosts):
            return False
        if self.ports and port not in self.ports:
            return False
        if self.not_ports and port in self.not_ports:
            return False
        if self.methods and not _strings_match(self.methods, request.method):
            return False
        if self.not_methods and _strings_match(self.not_methods, request.method):
            return False
        if self.paths and not paths(self.paths):
            return False
        return not (self.not_paths and paths(self.not_paths))


class Attribute(enum.Enum):
    """The `when` keys a waypoint understands."""

    REQUEST_HEADER = "request.headers"
    SOURCE_IP = "source.ip"
    REMOTE_IP = "remote.ip"
    SOURCE_NAMESPACE = "source.namespace"
    SOURCE_PRINCIPAL = "source.principal"
    SOURCE_SERVICE_ACCOUNT = "source.serviceAccount"
    REQUEST_PRINCIPAL = "request.auth.principal"
    REQUEST_AUDIENCES = "request.auth.audiences"
    REQUEST_PRESENTER = "request.auth.presenter"
    REQUEST_CLAIM = "request.auth.claims"
    DESTINATION_IP = "destination.ip"
    DESTINATION_PORT = "destination.port"
    CONNECTION_SNI = "connection.sni"


@dataclass(frozen=True, slots=True)
class Condition:
    """One `when` entry. `name` is the header name (lower-case) or the claim path for the
    bracketed keys; the values are already parsed for the attribute's type."""

    key: str
    attribute: Attribute
    values: tuple[Any, ...] = ()
    not_values: tuple[Any, ...] = ()
    name: tuple[str, ...] = ()

    def _test(self, values: tuple[Any, ...], request: RequestContext) -> bool:
        attribute = self.attribute
        identity = request.source_identity
        if attribute is Attribute.REQUEST_HEADER:
            joined = request.headers.joined(self.name[0])
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
            return any(value.matches(request.auth) for value in values)
        if attribute is Attribute.REQUEST_AUDIENCES:
            return _claim_matches(values, _lookup_claim(request.auth, ("aud",)))
        if attribute is Attribute.REQUEST_PRESENTER:
            return _claim_matches(values, _lookup_claim(request.auth, ("azp",)))
        if attribute is Attribute.REQUEST_CLAIM:
            return _claim_matches(values, _lookup_claim(request.auth, self.name))
        return _strings_match(values, request.sni)

    def holds(self, request: RequestContext) -> bool:
        if self.values and not self._test(self.values, request):
            return False
        return not (self.not_values and self._test(self.not_values, request))


@dataclass(frozen=True, slots=True)
class Rule:
    """`from` (None when absent) and `to` each need one entry to hold; every `when` holds."""

    sources: tuple[Source, ...] | None = None
    operations: tuple[Operation, ...] | None = None
    conditions: tuple[Condition, ...] = ()

    def holds(self, request: RequestContext) -> bool:
        if self.sources is not None and not any(s.holds(request) for s in self.sources):
            return False
        if self.operations is not None and not any(o.holds(request) for o in self.operations):
            return False
        return all(condition.holds(request) for condition in self.conditions)


@dataclass(frozen=True, slots=True)
class TargetRef:
    """One `targetRefs` entry; `namespace` is the policy's (cross-namespace refs are refused)."""

    group: str
    kind: str
    name: str
    namespace: str

    def __str__(self) -> str:
        group = f"{self.group}/" if self.group else ""
        return f"{group}{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class WaypointPolicy:
    """One AuthorizationPolicy attached to waypoints or services by `targetRefs`."""

    name: str
    namespace: str
    action: Action
    targets: tuple[TargetRef, ...]
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def matches(self, request: RequestContext) -> bool:
        """Any rule holds; a policy without rules matches nothing."""
        return any(rule.holds(request) for rule in self.rules)


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
    policies: list[WaypointPolicy], request: RequestContext
) -> tuple[bool, str | None, str]:
    for action in (Action.CUSTOM, Action.DENY):
        for policy in policies:
            if policy.action is action and policy.matches(request):
                if action is Action.CUSTOM:
                    why = f"denied by CUSTOM policy {policy.key} (no external authorizer)"
                else:
                    why = f"denied by DENY policy {policy.key}"
                return False, policy.key, why
    allow = [policy for policy in policies if policy.action is Action.ALLOW]
    if not allow:
        return True, None, "no ALLOW policy applies"
    for policy in allow:
        if policy.matches(request):
            return True, policy.key, f"allowed by ALLOW policy {policy.key}"
    return False, None, f"no ALLOW policy matched ({len(allow)} applied)"


def evaluate(policies: Iterable[WaypointPolicy], request: RequestContext) -> Decision:
    """Decide one request against the policies that apply to it (see `policies_for`).

    A policy listed twice counts once.
    """
    unique: dict[str, WaypointPolicy] = {}
    for policy in policies:
        unique.setdefault(policy.key, policy)
    enforced = [p for p in unique.values() if not p.dry_run and p.action is not Action.AUDIT]
    allowed, key, reason = _decide(enforced, request)

    audits = tuple(
        p.key
        for p in unique.values()
        if p.action is Action.AUDIT and not p.dry_run and p.matches(request)
    )
    dry = [p for p in unique.values() if p.dry_run]
    dry_matches = tuple(p.key for p in dry if p.matches(request))
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


# --- reading AuthorizationPolicy ---------------------------------------------------------------


def _port(value: object, path: str) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        number = int(value)
    if number is None or not 0 <= number <= 65535:
        raise Invalid(path, f"{show(value)} is not a port number (0-65535)")
    return number


def _cidr(value: str, path: str) -> CidrMatch:
    try:
        return CidrMatch.parse(value)
    except ValueError:
        raise Invalid(path, f"{show(value)} is not an IP address or CIDR") from None


def _service_account(text: str, path: str, namespace: str) -> ServiceAccountMatch:
    ns, slash, account = text.partition("/")
    if not slash:
        ns, account = namespace, text
    if not ns or not account or "/" in account or "*" in text:
        raise Invalid(path, f'{show(text)} is not "namespace/serviceaccount" or "serviceaccount"')
    return ServiceAccountMatch(ns, account)


def _path_match(text: str, path: str) -> PathMatch:
    if MATCH_ONE in text or MATCH_ANY in text:
        try:
            return PathTemplate.parse(text)
        except ValueError as exc:
            raise Invalid(path, f"{show(text)} is not a valid path template: {exc}") from None
    if "{" in text or "}" in text:
        raise Invalid(path, f"{show(text)} has {{ or }} beyond the templates {{*}} and {{**}}")
    return StringMatch.from_istio(text)


def _host_match(text: str) -> StringMatch:
    return StringMatch.from_istio(text.lower())


_SOURCE_FIELDS = (
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
)
_OPERATION_FIELDS = (
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
)


def _source(value: object, path: str, namespace: str) -> Source:
    data = _map(value, path)
    _only(data, path, _SOURCE_FIELDS)
    values = {key: _strings(data.get(key), _at(path, key)) for key in _SOURCE_FIELDS}
    if not any(values.values()):
        raise Invalid(path, "must not be empty")
    if (values["serviceAccounts"] or values["notServiceAccounts"]) and (
        values["principals"]
        or values["notPrincipals"]
        or values["namespaces"]
        or values["notNamespaces"]
    ):
        raise Invalid(path, "serviceAccounts cannot be combined with principals or namespaces")

    def strings(key: str) -> tuple[StringMatch, ...]:
        return tuple(StringMatch.from_istio(t) for t in values[key])

    def cidrs(key: str) -> tuple[CidrMatch, ...]:
        return tuple(_cidr(t, _at(_at(path, key), i)) for i, t in enumerate(values[key]))

    def accounts(key: str) -> tuple[ServiceAccountMatch, ...]:
        return tuple(
            _service_account(t, _at(_at(path, key), i), namespace)
            for i, t in enumerate(values[key])
        )

    def request_principals(key: str) -> tuple[RequestPrincipalMatch, ...]:
        return tuple(RequestPrincipalMatch.parse(t) for t in values[key])

    return Source(
        principals=strings("principals"),
        not_principals=strings("notPrincipals"),
        request_principals=request_principals("requestPrincipals"),
        not_request_principals=request_principals("notRequestPrincipals"),
        namespaces=strings("namespaces"),
        not_namespaces=strings("notNamespaces"),
        service_accounts=accounts("serviceAccounts"),
        not_service_accounts=accounts("notServiceAccounts"),
        ip_blocks=cidrs("ipBlocks"),
        not_ip_blocks=cidrs("notIpBlocks"),
        remote_ip_blocks=cidrs("remoteIpBlocks"),
        not_remote_ip_blocks=cidrs("notRemoteIpBlocks"),
    )


def _operation(value: object, path: str) -> Operation:
    data = _map(value, path)
    _only(data, path, _OPERATION_FIELDS)

    def ports(key: str) -> tuple[int, ...]:
        items = _list(data.get(key), _at(path, key))
        return tuple(_port(p, _at(_at(path, key), i)) for i, p in enumerate(items))

    def paths(key: str) -> tuple[PathMatch, ...]:
        items = _strings(data.get(key), _at(path, key))
        return tuple(_path_match(t, _at(_at(path, key), i)) for i, t in enumerate(items))

    def strings(key: str) -> list[str]:
        return _strings(data.get(key), _at(path, key))

    operation = Operation(
        hosts=tuple(_host_match(t) for t in strings("hosts")),
        not_hosts=tuple(_host_match(t) for t in strings("notHosts")),
        ports=ports("ports"),
        not_ports=ports("notPorts"),
        methods=tuple(StringMatch.from_istio(t) for t in strings("methods")),
        not_methods=tuple(StringMatch.from_istio(t) for t in strings("notMethods")),
        paths=paths("paths"),
        not_paths=paths("notPaths"),
    )
    if not any(getattr(operation, f.name) for f in fields(operation)):
        raise Invalid(path, "must not be empty")
    return operation


_BRACKETS = re.compile(r"(?:\[[^\[\]]+\])+")
_REJECTED_KEYS = {
    "destination.namespace": "is replaced by the policy's namespace",
    "destination.name": "is no longer supported",
    "destination.user": "is no longer supported",
}


def _bracketed(key: str, prefix: str, path: str, *, nested: bool) -> tuple[str, ...]:
    rest = key[len(prefix) :]
    if not _BRACKETS.fullmatch(rest) or (not nested and rest.count("[") != 1):
        shape = f"{prefix}[name]" + ("[name]..." if nested else "")
        raise Invalid(path, f"{show(key)} must have the form {shape}")
    return tuple(rest[1:-1].split("]["))


def _attribute(key: str, path: str) -> tuple[Attribute, tuple[str, ...]]:
    if key in _REJECTED_KEYS:
        raise Invalid(path, f"{key} {_REJECTED_KEYS[key]}")
    if key.startswith("destination.labels"):
        raise Invalid(path, f"{key} is replaced by the policy's targetRefs")
    if key.startswith(("experimental.", "request.experimental.")):
        raise Invalid(path, f"{show(key)}: experimental attributes are not supported")
    if key.startswith("request.headers["):
        (name,) = _bracketed(key, "request.headers", path, nested=False)
        return Attribute.REQUEST_HEADER, (name.lower(),)
    if key.startswith("request.auth.claims["):
        return Attribute.REQUEST_CLAIM, _bracketed(key, "request.auth.claims", path, nested=True)
    try:
        attribute = Attribute(key)
    except ValueError:
        raise Invalid(path, f"{show(key)} is not a known attribute") from None
    if attribute in (Attribute.REQUEST_HEADER, Attribute.REQUEST_CLAIM):
        raise Invalid(path, f"{show(key)} needs a name in brackets, e.g. {key}[name]")
    return attribute, ()


def _condition_values(
    attribute: Attribute, values: list[str], path: str, namespace: str
) -> tuple[Any, ...]:
    if attribute in (Attribute.SOURCE_IP, Attribute.REMOTE_IP, Attribute.DESTINATION_IP):
        return tuple(_cidr(v, _at(path, i)) for i, v in enumerate(values))
    if attribute is Attribute.DESTINATION_PORT:
        return tuple(_port(v, _at(path, i)) for i, v in enumerate(values))
    if attribute is Attribute.SOURCE_SERVICE_ACCOUNT:
        return tuple(_service_account(v, _at(path, i), namespace) for i, v in enumerate(values))
    if attribute is Attribute.REQUEST_PRINCIPAL:
        return tuple(RequestPrincipalMatch.parse(v) for v in values)
    return tuple(StringMatch.from_istio(v) for v in values)


def _condition(value: object, path: str, namespace: str) -> Condition:
    data = _map(value, path)
    _only(data, path, ("key", "values", "notValues"))
    key = _str(data.get("key"), _at(path, "key"))
    if not key:
        raise Invalid(_at(path, "key"), "is required")
    attribute, name = _attribute(key, _at(path, "key"))
    values = _strings(data.get("values"), _at(path, "values"))
    not_values = _strings(data.get("notValues"), _at(path, "notValues"))
    if not values and not not_values:
        raise Invalid(path, f"at least one of values and notValues must be set for {key}")
    return Condition(
        key,
        attribute,
        _condition_values(attribute, values, _at(path, "values"), namespace),
        _condition_values(attribute, not_values, _at(path, "notValues"), namespace),
        name,
    )


def _rule(value: object, path: str, namespace: str) -> Rule:
    if value is None:
        raise Invalid(path, "must not be null (use {} to match everything)")
    data = _map(value, path)
    _only(data, path, ("from", "to", "when"))

    def entries(key: str, inner: str) -> list[tuple[object, str]]:
        items = _list(data[key], _at(path, key))
        if not items:
            raise Invalid(_at(path, key), "must not be empty when given")
        out = []
        for i, item in enumerate(items):
            ipath = _at(_at(path, key), i)
            entry = _map(item, ipath)
            _only(entry, ipath, (inner,))
            if entry.get(inner) is None:
                raise Invalid(_at(ipath, inner), "is required")
            out.append((entry[inner], _at(ipath, inner)))
        return out

    sources = None
    if "from" in data:
        sources = tuple(_source(v, p, namespace) for v, p in entries("from", "source"))
    operations = None
    if "to" in data:
        operations = tuple(_operation(v, p) for v, p in entries("to", "operation"))
    conditions = tuple(
        _condition(item, _at(_at(path, "when"), i), namespace)
        for i, item in enumerate(_list(data.get("when"), _at(path, "when")))
    )
    return Rule(sources, operations, conditions)


def _target(value: object, path: str, namespace: str, root_namespace: str) -> TargetRef:
    data = _map(value, path)
    _only(data, path, ("group", "kind", "name", "namespace"))
    group = _str(data.get("group"), _at(path, "group"))
    kind = _str(data.get("kind"), _at(path, "kind"))
    name = _str(data.get("name"), _at(path, "name"))
    target_namespace = _str(data.get("namespace"), _at(path, "namespace"))
    if not kind:
        raise Invalid(_at(path, "kind"), "is required")
    if not name:
        raise Invalid(_at(path, "name"), "is required")
    groups = _TARGET_KINDS.get(kind)
    if groups is None:
        raise Invalid(
            _at(path, "kind"),
            f"{show(kind)} is not a supported target (Gateway, GatewayClass, Service, "
            "ServiceEntry)",
        )
    if group not in groups:
        want = groups[0] or '"" (core)'
        raise Invalid(_at(path, "group"), f"{show(group)} is not the group of {kind} ({want})")
    if target_namespace and target_namespace != namespace:
        raise Invalid(_at(path, "namespace"), "cross-namespace references are not supported")
    if kind == "GatewayClass":
        if namespace != root_namespace:
            raise Invalid(
                path,
                f"a GatewayClass can only be targeted from the root namespace {root_namespace}",
            )
        if name != WAYPOINT_CLASS:
            raise Invalid(_at(path, "name"), f"only GatewayClass {WAYPOINT_CLASS} is supported")
    return TargetRef(GATEWAY_GROUP if kind.startswith("Gateway") else group, kind, name, namespace)


def read_target_refs(
    spec: Mapping[str, Any], namespace: str, *, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> tuple[TargetRef, ...]:
    """`spec.targetRefs` (or the single `spec.targetRef`) of a policy in `namespace`.

    Empty when the policy has none. Raises `Invalid` for unsupported kinds or groups,
    cross-namespace references, or a `selector` alongside targets.
    """
    refs = _list(spec.get("targetRefs"), "spec.targetRefs")
    targets: tuple[TargetRef, ...]
    if spec.get("targetRef") is not None:
        if refs:
            raise Invalid("spec", "targetRef and targetRefs cannot both be set")
        targets = (_target(spec["targetRef"], "spec.targetRef", namespace, root_namespace),)
    else:
        targets = tuple(
            _target(item, _at("spec.targetRefs", i), namespace, root_namespace)
            for i, item in enumerate(refs)
        )
    if targets and spec.get("selector") is not None:
        raise Invalid("spec", "selector cannot be combined with targetRef/targetRefs")
    return targets


def parse_authorization_policy(
    resource: Resource, *, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> WaypointPolicy | None:
    """Read one AuthorizationPolicy; None when it is not attached by `targetRefs`.

    Raises `Invalid` naming the field path for anything Istio would reject.
    """
    if resource.group != API_GROUP or resource.kind != KIND:
        raise Invalid("kind", f"{resource.api_version} {resource.kind} is not an {KIND}")
    version = resource.api_version.rpartition("/")[2]
    if version not in API_VERSIONS:
        supported = ", ".join(f"{API_GROUP}/{v}" for v in API_VERSIONS)
        raise Invalid("apiVersion", f"{show(resource.api_version)} is not supported ({supported})")
    namespace = resource.namespace or "default"
    metadata = _map(resource.body.get("metadata"), "metadata")
    annotations = _map(metadata.get("annotations"), "metadata.annotations")
    spec = _map(resource.body.get("spec"), "spec")
    _only(spec, "spec", ("selector", "targetRef", "targetRefs", "action", "provider", "rules"))

    targets = read_target_refs(spec, namespace, root_namespace=root_namespace)

    action_name = _str(spec.get("action"), "spec.action", "ALLOW")
    try:
        action = Action(action_name)
    except ValueError:
        raise Invalid(
            "spec.action", f"{show(action_name)} is not one of ALLOW, DENY, AUDIT, CUSTOM"
        ) from None
    if spec.get("provider") is not None and action is not Action.CUSTOM:
        raise Invalid("spec.provider", "is only allowed with action CUSTOM")
    if action is Action.CUSTOM and spec.get("provider") is None:
        raise Invalid("spec.provider", "is required with action CUSTOM")
    dry_run_text = annotations.get(ANNOTATION_DRY_RUN, "false")
    if not isinstance(dry_run_text, str) or dry_run_text.lower() not in ("true", "false"):
        raise Invalid(
            _at("metadata.annotations", ANNOTATION_DRY_RUN),
            f"{show(dry_run_text)} is not true or false",
        )
    rules = tuple(
        _rule(item, _at("spec.rules", i), namespace)
        for i, item in enumerate(_list(spec.get("rules"), "spec.rules"))
    )
    if not targets:
        return None
    return WaypointPolicy(
        name=resource.name,
        namespace=namespace,
        action=action,
        targets=targets,
        rules=rules,
        dry_run=dry_run_text.lower() == "true",
    )


@dataclass(frozen=True, slots=True)
class AuthzConfig:
    """The waypoint's policies, the errors of those left out, and notes on skipped ones."""

    policies: tuple[WaypointPolicy, ...] = ()
    errors: tuple[ResourceError, ...] = ()
    notes: tuple[ResourceError, ...] = ()


def resource_error(resource: Resource, path: str, reason: str) -> ResourceError:
    """A `ResourceError` about `resource` keyed `namespace/name`."""
    key = f"{resource.namespace or 'default'}/{resource.name}"
    return ResourceError(resource.kind, resource.index, key, path, reason, resource.file)


def read_authorization_policies(
    resources: Iterable[Resource], *, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> AuthzConfig:
    """Every AuthorizationPolicy among `resources` that belongs to waypoints.

    Other kinds are ignored. A bad policy becomes a `ResourceError` and the rest are read;
    policies for the node agent or sidecars (selector, or no target) become notes, and so do
    CUSTOM policies (enforced here as DENY, since no external authorizer is configured).
    """
    policies: list[WaypointPolicy] = []
    errors: list[ResourceError] = []
    notes: list[ResourceError] = []
    for resource in resources:
        if resource.group != API_GROUP or resource.kind != KIND:
            continue
        try:
            policy = parse_authorization_policy(resource, root_namespace=root_namespace)
        except Invalid as exc:
            errors.append(resource_error(resource, exc.path, exc.reason))
            continue
        except RecursionError:
            errors.append(resource_error(resource, "", "nested too deeply"))
            continue
        if policy is None:
            notes.append(resource_error(resource, "spec", "no targetRefs: not a waypoint policy"))
            continue
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
    return AuthzConfig(tuple(policies), tuple(errors), tuple(notes))
