"""Reads ztunnel's local config file (`LOCAL_XDS_PATH`) into a `ConfigSnapshot`.

The format is ztunnel's: top-level `workloads`, `services` and `policies`, camelCase keys, serde's
spelling of enums (`protocol: HBONE|TCP`, `scope: Namespace`, `action: Allow`, string matches as
`{Exact: x}` / `{Prefix: x}` / `{Suffix: x}` / `{Presence: []}` or serde_yaml's `!Exact x` tags).
ztunnel's own examples/localhost.yaml loads unchanged. A few conveniences are also accepted:
proto enum names (`ALLOW`, `WORKLOAD_SELECTOR`, `NONE`), lower-case match keys (`exact:`),
AuthorizationPolicy strings for string matches (`"*"`, `"*x"`, `"x*"`, `"x"`), `"ns/sa"`
for service accounts, bare IPs for IP blocks, and `{clauses: [...]}` / `{matches: [...]}` for
the rule and clause lists.

The file is written by people, so every object is checked on its own: a malformed workload,
service or policy is left out with an `ObjectError` naming it, the field path and the reason,
and the valid objects beside it still load. Only a file that is not YAML or whose top level is
not a mapping fails as a whole (`ConfigError`), so the caller keeps its last good snapshot.
Unknown keys are errors, as in ztunnel (`deny_unknown_fields`), so a typo is never silently
ignored; keys ztunnel knows but this agent does not use are accepted and ignored.

Pure: `parse_local_config` takes text; `load_local_config` only adds reading the file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ztagent import fields
from ztagent.errors import LocalError
from ztagent.fields import Invalid, join, show, type_name
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN, InvalidIdentity
from ztagent.model.policy import (
    Action,
    Authorization,
    CidrMatch,
    Clause,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ztagent.model.snapshot import ConfigSnapshot, ObjectError
from ztagent.model.workload import (
    DEFAULT_SERVICE_ACCOUNT,
    HBONE_MTLS_PORT,
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)

T = TypeVar("T")

MAX_CONFIG_BYTES = 64 * 1024 * 1024


class ConfigError(LocalError):
    """The config file as a whole cannot be used (unreadable, not YAML, not a mapping)."""


# --- YAML -------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML plus serde_yaml's enum tags (`!Exact foo`), read as one-key mappings."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        assert isinstance(node, yaml.MappingNode)
        value = loader.construct_mapping(node, deep=True)
    return {suffix: value}


_Loader.add_multi_constructor("!", _tagged)


def _load_yaml(text: str | bytes, source: str) -> Any:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{source}: not valid YAML: {detail}") from None
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None


# --- field readers ------------------------------------------------------------------------------


class _Object:
    """Reads one mapping's fields, remembering which keys were used to report unknown ones."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(path, f"must be a mapping, got {type_name(value)}")
        self.data: dict[Any, Any] = value
        self.path = path
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def at(self, key: str) -> str:
        return join(self.path, key)

    def string(self, key: str, default: str | None = None) -> str:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise Invalid(self.at(key), "is required")
            return default
        if not isinstance(value, str):
            raise Invalid(self.at(key), f"must be a string, got {type_name(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise Invalid(self.at(key), f"must be true or false, got {show(value)}")
        return value

    def items(self, key: str, read: Callable[[Any, str], T], *, required: bool = False) -> list[T]:
        value = self.raw(key)
        path = self.at(key)
        if value is None:
            if required:
                raise Invalid(path, "is required")
            return []
        if not isinstance(value, list):
            raise Invalid(path, f"must be a list, got {type_name(value)}")
        return [read(item, join(path, i)) for i, item in enumerate(value)]

    def ignore(self, *keys: str) -> None:
        self.used.update(keys)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.used:
                where = join(self.path, key) if isinstance(key, str) else self.path
                reason = (
                    "unknown field"
                    if isinstance(key, str)
                    else f"unknown field {show(key)} (keys must be strings)"
                )
                raise Invalid(where, reason)


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise Invalid(path, f"must be a string, got {type_name(value)}")
    return value


def _port_map(value: object, path: str) -> dict[int, int]:
    if not isinstance(value, dict):
        raise Invalid(path, f"must be a mapping of port to target port, got {type_name(value)}")
    ports: dict[int, int] = {}
    for key, target in value.items():
        number = fields.port(key, path)
        ports[number] = fields.port(target, join(path, str(number)), low=0)
    return ports


def _network_address(value: object, path: str) -> NetworkAddress:
    """`network/ip`, with an empty network allowed (`/10.0.0.1`), as ztunnel's `vips`."""
    if not isinstance(value, str):
        raise Invalid(path, f'must be a "network/IP" string, got {type_name(value)}')
    network, slash, ip = value.rpartition("/")
    if not slash:
        raise Invalid(path, f'{show(value)} is not "network/IP" (use "/{value}" for no network)')
    try:
        return NetworkAddress(network, ipaddress.ip_address(ip))
    except ValueError:
        raise Invalid(path, f"{show(ip)} in {show(value)} is not an IP address") from None


def _namespaced_hostname(value: str, path: str) -> NamespacedHostname:
    namespace, slash, hostname = value.partition("/")
    if not slash or not namespace or not hostname:
        raise Invalid(path, f'{show(value)} is not "namespace/hostname"')
    return NamespacedHostname(namespace, hostname)


def _gateway(value: object, path: str) -> GatewayAddress:
    """ztunnel's `{destination: "net/ip" | "ns/hostname", hboneMtlsPort: N}`."""
    obj = _Object(value, path)
    destination = obj.string("destination")
    mtls = obj.raw("hboneMtlsPort")
    mtls_port = HBONE_MTLS_PORT if mtls is None else fields.port(mtls, obj.at("hboneMtlsPort"))
    obj.finish()
    network, slash, ip = destination.rpartition("/")
    if slash:
        try:
            address = NetworkAddress(network, ipaddress.ip_address(ip))
        except ValueError:
            pass
        else:
            return GatewayAddress(address=address, hbone_mtls_port=mtls_port)
    hostname = _namespaced_hostname(destination, obj.at("destination"))
    return GatewayAddress(hostname=hostname, hbone_mtls_port=mtls_port)


_PROTOCOLS = {
    "TCP": TunnelProtocol.NONE,
    "HBONE": TunnelProtocol.HBONE,
    "NONE": TunnelProtocol.NONE,
    "LEGACY_ISTIO_MTLS": TunnelProtocol.LEGACY_ISTIO_MTLS,
}
_STATUSES = {
    "Healthy": WorkloadStatus.HEALTHY,
    "Unhealthy": WorkloadStatus.UNHEALTHY,
    "HEALTHY": WorkloadStatus.HEALTHY,
    "UNHEALTHY": WorkloadStatus.UNHEALTHY,
}
_SCOPES = {
    "Global": Scope.GLOBAL,
    "Namespace": Scope.NAMESPACE,
    "WorkloadSelector": Scope.WORKLOAD_SELECTOR,
    "GLOBAL": Scope.GLOBAL,
    "NAMESPACE": Scope.NAMESPACE,
    "WORKLOAD_SELECTOR": Scope.WORKLOAD_SELECTOR,
}
_ACTIONS = {"Allow": Action.ALLOW, "Deny": Action.DENY, "ALLOW": Action.ALLOW, "DENY": Action.DENY}


def _choices(names: Mapping[str, object]) -> str:
    return ", ".join(names)


def _pick(value: object, path: str, names: Mapping[str, T]) -> T:
    if isinstance(value, str) and value in names:
        return names[value]
    raise Invalid(path, f"{show(value)} is not one of {_choices(names)}")


# --- workloads and services ----------------------------------------------------------------------

_WORKLOAD_IGNORED = (
    "networkMode",
    "nativeTunnel",
    "applicationTunnel",
    "locality",
    "capacity",
)


def _workload_services(value: object, path: str) -> dict[str, dict[int, int]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(
            path, f'must be a mapping of "namespace/hostname" to ports, got {type_name(value)}'
        )
    services: dict[str, dict[int, int]] = {}
    for key, ports in value.items():
        if not isinstance(key, str):
            raise Invalid(path, f'key {show(key)} must be a "namespace/hostname" string')
        where = join(path, key)
        _namespaced_hostname(key, where)
        services[key] = {} if ports is None else _port_map(ports, where)
    return services


def _read_workload(value: object, path: str, trust_domain: str) -> Workload:
    obj = _Object(value, path)
    namespace = obj.string("namespace")
    name = obj.string("name", "")
    uid = obj.string("uid", "")
    if not uid:
        if not name:
            raise Invalid(obj.at("uid"), "is required when name is empty")
        uid = f"{namespace}/{name}"
    addresses = obj.items("workloadIps", fields.ip, required=True)
    protocol = obj.raw("protocol")
    tunnel = (
        TunnelProtocol.NONE if protocol is None else _pick(protocol, obj.at("protocol"), _PROTOCOLS)
    )
    status = obj.raw("status")
    health = (
        WorkloadStatus.HEALTHY if status is None else _pick(status, obj.at("status"), _STATUSES)
    )
    waypoint = _gateway(obj.raw("waypoint"), obj.at("waypoint")) if obj.has("waypoint") else None
    gateway = (
        _gateway(obj.raw("networkGateway"), obj.at("networkGateway"))
        if obj.has("networkGateway")
        else None
    )
    workload = Workload(
        uid=uid,
        name=name,
        namespace=namespace,
        addresses=tuple(addresses),
        network=obj.string("network", ""),
        tunnel_protocol=tunnel,
        trust_domain=obj.string("trustDomain", "") or trust_domain,
        service_account=obj.string("serviceAccount", "") or DEFAULT_SERVICE_ACCOUNT,
        waypoint=waypoint,
        network_gateway=gateway,
        node=obj.string("node", ""),
        canonical_name=obj.string("canonicalName", ""),
        canonical_revision=obj.string("canonicalRevision", ""),
        workload_type=obj.string("workloadType", ""),
        workload_name=obj.string("workloadName", ""),
        authorization_policies=tuple(obj.items("authorizationPolicies", _string)),
        status=health,
        cluster_id=obj.string("clusterId", ""),
        hostname=obj.string("hostname", ""),
        services=_workload_services(obj.raw("services"), obj.at("services")),
    )
    obj.ignore(*_WORKLOAD_IGNORED)
    obj.finish()
    try:
        workload.identity  # noqa: B018 - validates namespace, account and trust domain
    except InvalidIdentity as exc:
        raise Invalid(path, f"no valid identity: {exc}") from None
    return workload


_SERVICE_IGNORED = (
    "cidrVips",
    "endpoints",
    "weightedWaypoints",
    "loadBalancer",
    "ipFamilies",
    "canonical",
    "visibility",
)


def _read_service(value: object, path: str) -> Service:
    obj = _Object(value, path)
    namespace = obj.string("namespace")
    hostname = obj.string("hostname")
    if not namespace:
        raise Invalid(obj.at("namespace"), "must not be empty")
    if not hostname:
        raise Invalid(obj.at("hostname"), "must not be empty")
    ports = obj.raw("ports")
    service = Service(
        name=obj.string("name", ""),
        namespace=namespace,
        hostname=hostname,
        addresses=tuple(obj.items("vips", _network_address)),
        ports={} if ports is None else _port_map(ports, obj.at("ports")),
        subject_alt_names=tuple(obj.items("subjectAltNames", _string)),
        waypoint=_gateway(obj.raw("waypoint"), obj.at("waypoint")) if obj.has("waypoint") else None,
    )
    obj.ignore(*_SERVICE_IGNORED)
    obj.finish()
    return service


# --- policies ------------------------------------------------------------------------------------

_STRING_MATCH_KEYS = {
    "Exact": StringMatchKind.EXACT,
    "Prefix": StringMatchKind.PREFIX,
    "Suffix": StringMatchKind.SUFFIX,
    "Presence": StringMatchKind.PRESENCE,
    "exact": StringMatchKind.EXACT,
    "prefix": StringMatchKind.PREFIX,
    "suffix": StringMatchKind.SUFFIX,
    "presence": StringMatchKind.PRESENCE,
}


def _string_match(value: object, path: str) -> StringMatch:
    if isinstance(value, str):
        return StringMatch.from_istio(value)
    if isinstance(value, dict) and len(value) == 1:
        ((key, inner),) = value.items()
        kind = _STRING_MATCH_KEYS.get(key) if isinstance(key, str) else None
        if kind is StringMatchKind.PRESENCE:
            if inner not in (None, [], {}, ""):
                raise Invalid(join(path, key), f"takes no value, got {show(inner)}")
            return StringMatch.presence()
        if kind is not None:
            return StringMatch(kind, _string(inner, join(path, key)))
    raise Invalid(
        path,
        f"{show(value)} is not a string match ({{Exact: x}}, {{Prefix: x}}, {{Suffix: x}}, "
        '{Presence: []} or "*", "x*", "*x", "x")',
    )


def _service_account_match(value: object, path: str) -> ServiceAccountMatch:
    if isinstance(value, str):
        namespace, slash, account = value.partition("/")
        if slash and namespace and account:
            return ServiceAccountMatch(namespace, account)
        raise Invalid(path, f'{show(value)} is not "namespace/serviceaccount"')
    obj = _Object(value, path)
    match = ServiceAccountMatch(obj.string("namespace"), obj.string("serviceAccount"))
    obj.finish()
    return match


def _cidr_block(value: object, path: str) -> CidrMatch:
    return CidrMatch(fields.cidr(value, path))


def _rule_port(value: object, path: str) -> int:
    return fields.port(value, path, low=0)


_MATCH_FIELDS: tuple[tuple[str, str, Callable[[Any, str], Any]], ...] = (
    ("namespaces", "namespaces", _string_match),
    ("notNamespaces", "not_namespaces", _string_match),
    ("principals", "principals", _string_match),
    ("notPrincipals", "not_principals", _string_match),
    ("sourceIps", "source_ips", _cidr_block),
    ("notSourceIps", "not_source_ips", _cidr_block),
    ("destinationIps", "destination_ips", _cidr_block),
    ("notDestinationIps", "not_destination_ips", _cidr_block),
    ("destinationPorts", "destination_ports", _rule_port),
    ("notDestinationPorts", "not_destination_ports", _rule_port),
    ("serviceAccounts", "service_accounts", _service_account_match),
    ("notServiceAccounts", "not_service_accounts", _service_account_match),
)


def _match(value: object, path: str) -> Match:
    obj = _Object(value, path)
    values = {attr: tuple(obj.items(key, read)) for key, attr, read in _MATCH_FIELDS}
    obj.finish()
    return Match(**values)


def _list_or_wrapped(value: object, path: str, wrapper: str) -> tuple[list[Any], str]:
    """ztunnel writes nested lists; the proto shape wraps each list in a one-key mapping."""
    if isinstance(value, dict):
        obj = _Object(value, path)
        inner = obj.raw(wrapper)
        obj.finish()
        path = obj.at(wrapper)
        value = [] if inner is None else inner
    if not isinstance(value, list):
        raise Invalid(path, f"must be a list, got {type_name(value)}")
    return value, path


def _clause(value: object, path: str) -> Clause:
    items, path = _list_or_wrapped(value, path, "matches")
    return Clause(tuple(_match(item, join(path, i)) for i, item in enumerate(items)))


def _rule(value: object, path: str) -> Rule:
    items, path = _list_or_wrapped(value, path, "clauses")
    return Rule(tuple(_clause(item, join(path, i)) for i, item in enumerate(items)))


def _read_policy(value: object, path: str) -> Authorization:
    obj = _Object(value, path)
    name = obj.string("name")
    namespace = obj.string("namespace")
    if not name:
        raise Invalid(obj.at("name"), "must not be empty")
    policy = Authorization(
        name=name,
        namespace=namespace,
        scope=_pick(obj.raw("scope"), obj.at("scope"), _SCOPES),
        action=_pick(obj.raw("action"), obj.at("action"), _ACTIONS),
        rules=tuple(obj.items("rules", _rule)),
        dry_run=obj.boolean("dryRun", False),
    )
    obj.finish()
    return policy


# --- the file ------------------------------------------------------------------------------------


def _peek_key(kind: str, value: object) -> str | None:
    """The object's name for error messages, read leniently before validation."""
    if not isinstance(value, dict):
        return None
    get = value.get
    if kind == "workloads":
        uid = get("uid")
        if isinstance(uid, str) and uid:
            return uid
        ns, name = get("namespace"), get("name")
        return f"{ns}/{name}" if isinstance(ns, str) and isinstance(name, str) and name else None
    second = "hostname" if kind == "services" else "name"
    ns, name = get("namespace"), get(second)
    if isinstance(ns, str) and isinstance(name, str):
        return f"{ns}/{name}"
    return None


def _read_all(
    kind: str,
    section: object,
    read: Callable[[Any, str], T],
    errors: list[ObjectError],
) -> list[tuple[int, T]]:
    if section is None:
        return []
    if not isinstance(section, list):
        errors.append(
            ObjectError(kind, None, None, "", f"must be a list, got {type_name(section)}")
        )
        return []
    out: list[tuple[int, T]] = []
    for index, item in enumerate(section):
        try:
            out.append((index, read(item, "")))
        except Invalid as exc:
            errors.append(ObjectError(kind, index, _peek_key(kind, item), exc.path, exc.reason))
        except RecursionError:
            errors.append(ObjectError(kind, index, None, "", "nested too deeply"))
    return out


def _unique(
    kind: str,
    items: Iterable[tuple[int, T]],
    key: Callable[[T], str],
    claims: Callable[[T], Iterable[tuple[str, str]]],
    errors: list[ObjectError],
) -> list[T]:
    """Drop later objects whose key, or an address they claim, an earlier object already has."""
    seen: dict[str, int] = {}
    claimed: dict[str, tuple[int, str]] = {}
    kept: list[T] = []
    for index, item in items:
        k = key(item)
        if k in seen:
            errors.append(ObjectError(kind, index, k, "", f"duplicate of {kind}[{seen[k]}]"))
            continue
        clash = None
        for claim, where in claims(item):
            if claim in claimed:
                other, _ = claimed[claim]
                clash = ObjectError(
                    kind, index, k, where, f"{claim} is already used by {kind}[{other}]"
                )
                break
        if clash is not None:
            errors.append(clash)
            continue
        seen[k] = index
        for claim, where in claims(item):
            claimed[claim] = (index, where)
        kept.append(item)
    return kept


def _workload_claims(workload: Workload) -> Iterable[tuple[str, str]]:
    for i, address in enumerate(workload.network_addresses):
        yield f"address {address}", f"workloadIps[{i}]"


def _service_claims(service: Service) -> Iterable[tuple[str, str]]:
    for i, address in enumerate(service.addresses):
        yield f"VIP {address}", f"vips[{i}]"


def _no_claims(_: object) -> Iterable[tuple[str, str]]:
    return ()


def parse_local_config(
    text: str | bytes,
    *,
    source: str = "<config>",
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> ConfigSnapshot:
    """Read a local config document; raise `ConfigError` only if the whole file is unusable.

    `trust_domain` is given to workloads that do not name one (ztunnel's TRUST_DOMAIN).
    """
    document = _load_yaml(text, source)
    if document is None:
        return ConfigSnapshot()
    if not isinstance(document, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping with workloads, services and policies, "
            f"got {type_name(document)}"
        )
    errors: list[ObjectError] = []
    for key in document:
        if key not in ("workloads", "services", "policies"):
            errors.append(
                ObjectError(
                    "config",
                    None,
                    None,
                    str(key),
                    "unknown top-level key (expected workloads, services, policies)",
                )
            )

    def read_workload(value: Any, path: str) -> Workload:
        return _read_workload(value, path, trust_domain)

    workloads = _unique(
        "workloads",
        _read_all("workloads", document.get("workloads"), read_workload, errors),
        lambda w: w.uid,
        _workload_claims,
        errors,
    )
    services = _unique(
        "services",
        _read_all("services", document.get("services"), _read_service, errors),
        lambda s: s.key,
        _service_claims,
        errors,
    )
    policies = _unique(
        "policies",
        _read_all("policies", document.get("policies"), _read_policy, errors),
        lambda p: p.key,
        _no_claims,
        errors,
    )
    order = {"config": 0, "workloads": 1, "services": 2, "policies": 3}
    errors.sort(key=lambda e: (order[e.kind], -1 if e.index is None else e.index))
    return ConfigSnapshot(tuple(workloads), tuple(services), tuple(policies), tuple(errors))


def load_local_config(
    path: str | Path, *, trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> ConfigSnapshot:
    """Read and parse the file at `path`; unreadable files raise `ConfigError`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_local_config(data, source=str(path), trust_domain=trust_domain)


__all__ = [
    "ConfigError",
    "load_local_config",
    "parse_local_config",
]
