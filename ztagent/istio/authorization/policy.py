"""AuthorizationPolicy, read once: a `Resource` in, one typed `AuthorizationPolicy` out.

This module owns what an AuthorizationPolicy says (action, `selector` or `targetRefs`, rules of
`from` sources, `to` operations and `when` conditions, the dry-run annotation) and Istio's
validation of it; a problem raises `Invalid` naming the field path. It does not decide anything:
the node agent's L4 lowering (`ztagent.istio.authorization.l4.lower`, ztunnel's workload-API
`Authorization`) and the waypoint's L7 evaluation (`ztagent.istio.authorization.l7`) both start
from this model. Values keep Istio's string forms already parsed: `*` (any non-empty value),
`x*` (prefix), `*x` (suffix), else exact; `hosts` are lower-cased; paths with `{*}` or `{**}`
are Envoy URI templates. Pure, no I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ztagent.fields import Invalid, port, show
from ztagent.fields import at as _at
from ztagent.fields import mapping as _map
from ztagent.fields import only as _only
from ztagent.fields import sequence as _list
from ztagent.fields import string as _str
from ztagent.fields import strings as _strings
from ztagent.istio.envelope import Resource
from ztagent.istio.gateway import WAYPOINT_CLASS
from ztagent.istio.kubernetes import read_selector
from ztagent.model.policy import CidrMatch, ServiceAccountMatch, StringMatch, cidr_match
from ztagent.names import DEFAULT_ROOT_NAMESPACE

API_GROUP = "security.istio.io"
API_VERSIONS = ("v1", "v1beta1")
KIND = "AuthorizationPolicy"
ANNOTATION_DRY_RUN = "istio.io/dry-run"

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


# --- values ------------------------------------------------------------------------------------

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

    def matches(self, issuer: str | None, subject: str | None) -> bool:
        """Both claims are present and match (`*` needs both to be non-empty)."""
        return (
            issuer is not None
            and subject is not None
            and self.issuer.matches(issuer)
            and self.subject.matches(subject)
        )


# --- the model ---------------------------------------------------------------------------------


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
    trust_domains: tuple[StringMatch, ...] = ()
    not_trust_domains: tuple[StringMatch, ...] = ()


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


SOURCE_FIELDS: dict[str, str] = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals",
    "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
    "remoteIpBlocks": "remote_ip_blocks",
    "notRemoteIpBlocks": "not_remote_ip_blocks",
    "trustDomains": "trust_domains",
    "notTrustDomains": "not_trust_domains",
}
"""`from.source` fields: Istio's spelling -> the `Source` attribute."""
OPERATION_FIELDS: dict[str, str] = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "ports": "ports",
    "notPorts": "not_ports",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}
"""`to.operation` fields: Istio's spelling -> the `Operation` attribute."""


class Attribute(enum.Enum):
    """The `when` keys a waypoint evaluates (Istio's, istio/istio `pkg/config/security`)."""

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
    bracketed keys; the values are already parsed for the attribute's type.

    `attribute` is None for a key the waypoint has no request value for (trust domains,
    experimental and `destination.labels` keys, malformed bracketed keys; see
    `AuthorizationPolicy.unsupported`); the values of such a key are kept as string matches.
    """

    key: str
    attribute: Attribute | None
    values: tuple[Any, ...] = ()
    not_values: tuple[Any, ...] = ()
    name: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """`from` (None when absent) and `to` each need one entry to hold; every `when` holds."""

    sources: tuple[Source, ...] | None = None
    operations: tuple[Operation, ...] | None = None
    conditions: tuple[Condition, ...] = ()


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
class AuthorizationPolicy:
    """One AuthorizationPolicy. `selector` is `selector.matchLabels` (None: no selector);
    `targets` its `targetRefs` (empty: none), which make it a waypoint's policy.

    `unsupported` lists `(field path, reason)` for each part only an HTTP-level evaluator
    has to refuse: `trustDomains` sources, `when` keys without an `Attribute`, paths that are
    not valid templates (kept as exact strings). The waypoint refuses a policy with any; the
    node agent sees no HTTP attribute at all and lowers the policy all the same.
    """

    name: str
    namespace: str
    action: Action
    selector: Mapping[str, str] | None = None
    targets: tuple[TargetRef, ...] = ()
    rules: tuple[PolicyRule, ...] = ()
    dry_run: bool = False
    unsupported: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- reading -----------------------------------------------------------------------------------


_TRUST_DOMAIN_FIELDS = ("trustDomains", "notTrustDomains")
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


def _attribute(key: str, path: str) -> tuple[Attribute | None, tuple[str, ...], str]:
    """`(attribute, name, "")`, or `(None, (), reason)` for a key without a request value."""
    if key in _REJECTED_KEYS:
        raise Invalid(path, f"{key} {_REJECTED_KEYS[key]}")
    if key.startswith("destination.labels"):
        return None, (), f"{key} is replaced by the policy's targetRefs"
    if key.startswith(("experimental.", "request.experimental.")):
        return None, (), f"{show(key)}: experimental attributes are not supported"
    try:
        if key.startswith("request.headers["):
            (name,) = _bracketed(key, "request.headers", path, nested=False)
            return Attribute.REQUEST_HEADER, (name.lower(),), ""
        if key.startswith("request.auth.claims["):
            claim = _bracketed(key, "request.auth.claims", path, nested=True)
            return Attribute.REQUEST_CLAIM, claim, ""
    except Invalid as exc:
        return None, (), exc.reason
    try:
        attribute = Attribute(key)
    except ValueError:
        return None, (), f"{show(key)} is not a known attribute"
    if attribute in (Attribute.REQUEST_HEADER, Attribute.REQUEST_CLAIM):
        return None, (), f"{show(key)} needs a name in brackets, e.g. {key}[name]"
    return attribute, (), ""


def _service_account(text: str, path: str, namespace: str) -> ServiceAccountMatch:
    ns, slash, account = text.partition("/")
    if not slash:
        ns, account = namespace, text
    if not ns or not account or "/" in account or "*" in text:
        raise Invalid(path, f'{show(text)} is not "namespace/serviceaccount" or "serviceaccount"')
    return ServiceAccountMatch(ns, account)


@dataclass(slots=True)
class _RuleReader:
    """Reads `spec.rules` of a policy in `namespace`: raises `Invalid` for what Istio rejects,
    and collects in `unsupported` what only the waypoint refuses."""

    namespace: str
    unsupported: list[tuple[str, str]] = field(default_factory=list)

    def path_match(self, text: str, path: str) -> PathMatch:
        if MATCH_ONE in text or MATCH_ANY in text:
            try:
                return PathTemplate.parse(text)
            except ValueError as exc:
                reason = f"{show(text)} is not a valid path template: {exc}"
                self.unsupported.append((path, reason))
                return StringMatch.exact(text)
        if "{" in text or "}" in text:
            reason = f"{show(text)} has {{ or }} beyond the templates {{*}} and {{**}}"
            self.unsupported.append((path, reason))
            return StringMatch.exact(text)
        return StringMatch.from_istio(text)

    def source(self, value: object, path: str) -> Source:
        data = _map(value, path)
        _only(data, path, SOURCE_FIELDS)
        values = {key: _strings(data.get(key), _at(path, key)) for key in SOURCE_FIELDS}
        if not any(values.values()):
            raise Invalid(path, "must not be empty")
        if (values["serviceAccounts"] or values["notServiceAccounts"]) and (
            values["principals"]
            or values["notPrincipals"]
            or values["namespaces"]
            or values["notNamespaces"]
        ):
            raise Invalid(path, "serviceAccounts cannot be combined with principals or namespaces")
        self.unsupported.extend(
            (_at(path, key), "unknown field") for key in data if key in _TRUST_DOMAIN_FIELDS
        )

        def strings(key: str) -> tuple[StringMatch, ...]:
            return tuple(StringMatch.from_istio(t) for t in values[key])

        def cidrs(key: str) -> tuple[CidrMatch, ...]:
            return tuple(cidr_match(t, _at(_at(path, key), i)) for i, t in enumerate(values[key]))

        def accounts(key: str) -> tuple[ServiceAccountMatch, ...]:
            return tuple(
                _service_account(t, _at(_at(path, key), i), self.namespace)
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
            trust_domains=strings("trustDomains"),
            not_trust_domains=strings("notTrustDomains"),
        )

    def operation(self, value: object, path: str) -> Operation:
        data = _map(value, path)
        _only(data, path, OPERATION_FIELDS)

        def ports(key: str) -> tuple[int, ...]:
            items = _list(data.get(key), _at(path, key))
            return tuple(port(p, _at(_at(path, key), i), low=0) for i, p in enumerate(items))

        def paths(key: str) -> tuple[PathMatch, ...]:
            items = _strings(data.get(key), _at(path, key))
            return tuple(self.path_match(t, _at(_at(path, key), i)) for i, t in enumerate(items))

        def strings(key: str) -> list[str]:
            return _strings(data.get(key), _at(path, key))

        operation = Operation(
            hosts=tuple(StringMatch.from_istio(t.lower()) for t in strings("hosts")),
            not_hosts=tuple(StringMatch.from_istio(t.lower()) for t in strings("notHosts")),
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

    def condition_values(
        self, attribute: Attribute | None, values: list[str], path: str
    ) -> tuple[Any, ...]:
        if attribute in (Attribute.SOURCE_IP, Attribute.REMOTE_IP, Attribute.DESTINATION_IP):
            return tuple(cidr_match(v, _at(path, i)) for i, v in enumerate(values))
        if attribute is Attribute.DESTINATION_PORT:
            return tuple(port(v, _at(path, i), low=0) for i, v in enumerate(values))
        if attribute is Attribute.SOURCE_SERVICE_ACCOUNT:
            return tuple(
                _service_account(v, _at(path, i), self.namespace) for i, v in enumerate(values)
            )
        if attribute is Attribute.REQUEST_PRINCIPAL:
            return tuple(RequestPrincipalMatch.parse(v) for v in values)
        return tuple(StringMatch.from_istio(v) for v in values)

    def condition(self, value: object, path: str) -> Condition:
        data = _map(value, path)
        _only(data, path, ("key", "values", "notValues"))
        key = _str(data.get("key"), _at(path, "key"))
        if not key:
            raise Invalid(_at(path, "key"), "is required")
        attribute, name, unsupported = _attribute(key, _at(path, "key"))
        if unsupported:
            self.unsupported.append((_at(path, "key"), unsupported))
        values = _strings(data.get("values"), _at(path, "values"))
        not_values = _strings(data.get("notValues"), _at(path, "notValues"))
        if not values and not not_values:
            raise Invalid(path, f"at least one of values and notValues must be set for {key}")
        return Condition(
            key,
            attribute,
            self.condition_values(attribute, values, _at(path, "values")),
            self.condition_values(attribute, not_values, _at(path, "notValues")),
            name,
        )

    def rule(self, value: object, path: str) -> PolicyRule:
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
            sources = tuple(self.source(v, p) for v, p in entries("from", "source"))
        operations = None
        if "to" in data:
            operations = tuple(self.operation(v, p) for v, p in entries("to", "operation"))
        conditions = tuple(
            self.condition(item, _at(_at(path, "when"), i))
            for i, item in enumerate(_list(data.get("when"), _at(path, "when")))
        )
        return PolicyRule(sources, operations, conditions)


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


def read_authorization_policy(
    resource: Resource, *, root_namespace: str = DEFAULT_ROOT_NAMESPACE, rules: bool = True
) -> AuthorizationPolicy:
    """Read one AuthorizationPolicy (its kind is not checked here); raises `Invalid` naming the
    field path for anything Istio would reject.

    With `rules=False` the rules are left unread (`rules` is empty): for a reader that first
    decides whether the policy is its own (`targetRefs`, AUDIT and CUSTOM policies are not the
    node agent's) and reads the rules only then, so the rules of another enforcement point's
    policy are never its errors.
    """
    namespace = resource.namespace or "default"
    metadata = _map(resource.body.get("metadata"), "metadata")
    annotations = _map(metadata.get("annotations"), "metadata.annotations")
    spec = _map(resource.body.get("spec"), "spec")
    _only(spec, "spec", ("selector", "targetRef", "targetRefs", "action", "provider", "rules"))
    selector = read_selector(spec.get("selector"), "spec.selector")
    if spec.get("selector") is not None and (
        spec.get("targetRef") is not None or spec.get("targetRefs")
    ):
        raise Invalid("spec", "selector cannot be combined with targetRef/targetRefs")
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
    reader = _RuleReader(namespace)
    read: tuple[PolicyRule, ...] = ()
    if rules:
        read = tuple(
            reader.rule(item, _at("spec.rules", i))
            for i, item in enumerate(_list(spec.get("rules"), "spec.rules"))
        )
    return AuthorizationPolicy(
        name=resource.name,
        namespace=namespace,
        action=action,
        selector=selector,
        targets=targets,
        rules=read,
        dry_run=dry_run_text.lower() == "true",
        unsupported=tuple(reader.unsupported),
    )
