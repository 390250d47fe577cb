"""DestinationRule traffic policy for the waypoint: parsing, subsets, merging.

Owns reading Istio `DestinationRule` resources (networking.istio.io v1, v1beta1, v1alpha3) into
frozen values, choosing the rule for a host, the effective policy of a (subset, port) and the
endpoints of a subset. Load balancing lives in `balancer`, connection pool limits and their
accounting in `connection_pool`, outlier detection in `outlier`.

Meaning follows Istio and the Envoy configuration istiod generates:

- `host` short names are resolved against the rule's namespace (`reviews` ->
  `reviews.<ns>.svc.cluster.local`); names with a dot, `*` and IP addresses are kept.
- Effective policy (istiod's MergeSubsetTrafficPolicy): the rule's port-level settings for the
  port replace its loadBalancer, connectionPool and outlierDetection wholesale (a part a
  port-level entry omits takes the default, it is not inherited). A subset's parts then override
  the parts they set; a subset's own port-level entry for the port again replaces all three.
- Defaults where a field is omitted: LEAST_REQUEST balancing; connection limits 2^32-1
  (istiod's circuit breaker defaults; a 0 also means "default", as istiod cannot tell it from
  unset); no outlier detection without `outlierDetection`, and within it Envoy's defaults
  (consecutive5xxErrors 5, gateway errors off, interval 10s, baseEjectionTime 30s,
  maxEjectionPercent 10, minHealthPercent 0).
- `simple: LEAST_CONN` is LEAST_REQUEST, `UNSPECIFIED` the default. `PASSTHROUGH` (forward to the
  original destination address) has no meaning behind a waypoint that already chose a service:
  it is noted and the default balancing is used. `tls` is noted and ignored: traffic to mesh
  endpoints is carried by HBONE, which is mutual TLS. Fields the waypoint does not apply
  (locality load balancing, warm-up, cookie generation, maglev table size, TCP keepalive,
  tunnel, proxy protocol, workloadSelector) are noted, never silently dropped.
- Durations are strings as Kubernetes stores them: Go/protobuf durations such as "10s", "0.5s",
  "1m30s", "250ms"; Istio requires at least 1ms and whole milliseconds
  (`ztagent.fields.duration`).

A bad rule is left out with a `ResourceError` naming the kind, `namespace/name`, the field path
and the reason; every other rule is still read. Pure: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ztagent.fields import Invalid, duration, show
from ztagent.fields import at as _at
from ztagent.fields import boolean as _bool
from ztagent.fields import kube_type_name as _type_name
from ztagent.fields import labels as _labels
from ztagent.fields import mapping as _map
from ztagent.fields import only as _only
from ztagent.fields import sequence as _list
from ztagent.fields import string as _str
from ztagent.istio.balancer import (
    DEFAULT_MINIMUM_RING_SIZE,
    Algorithm,
    ConsistentHash,
    EndpointLike,
    HashSource,
    LoadBalancerSettings,
)
from ztagent.istio.connection_pool import (
    DEFAULT_CONNECT_TIMEOUT,
    UNLIMITED,
    ConnectionPoolSettings,
)
from ztagent.istio.envelope import Resource, ResourceError
from ztagent.istio.outlier import (
    DEFAULT_BASE_EJECTION_TIME,
    DEFAULT_CONSECUTIVE_5XX_ERRORS,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_EJECTION_PERCENT,
    OutlierDetection,
)
from ztagent.names import DEFAULT_DOMAIN_SUFFIX, qualify_host

log = logging.getLogger(__name__)

KIND = "DestinationRule"
GROUP = "networking.istio.io"
VERSIONS = ("v1", "v1beta1", "v1alpha3")

E = TypeVar("E", bound=EndpointLike)


# --- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """One `portLevelSettings` entry; a part left None takes its default, not the rule's."""

    port: int
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """A `trafficPolicy` as written: None for the parts it does not set."""

    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    port_level_settings: tuple[PortPolicy, ...] = ()

    def port_policy(self, port: int | None) -> PortPolicy | None:
        """The first port-level entry for `port`, as istiod picks it."""
        if port is None:
            return None
        for entry in self.port_level_settings:
            if entry.port == port:
                return entry
        return None


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """What applies to one (host, subset, port): every part resolved."""

    load_balancer: LoadBalancerSettings = field(default_factory=LoadBalancerSettings)
    connection_pool: ConnectionPoolSettings = field(default_factory=ConnectionPoolSettings)
    outlier_detection: OutlierDetection | None = None
    """None: outlier detection is off."""


DEFAULT_POLICY = EffectivePolicy()
"""The policy of a destination without a DestinationRule."""


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str]
    traffic_policy: TrafficPolicy | None = None

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.labels.items())


@dataclass(frozen=True, slots=True)
class DestinationRule:
    namespace: str
    name: str
    host: str
    """Fully qualified (short names resolved), or a wildcard such as `*.example.com`."""
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    created: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def subset(self, name: str) -> Subset | None:
        for subset in self.subsets:
            if subset.name == name:
                return subset
        return None

    def policy(self, subset: str | None = None, port: int | None = None) -> EffectivePolicy:
        """The effective policy for traffic to `subset` (None: the whole host) on `port`.

        Raises KeyError for a subset the rule does not define (istiod builds no cluster for
        it; the router answers such a route with 503 NR).
        """
        top = _apply_port(self.traffic_policy, port)
        if subset is None:
            return _resolve(top)
        found = self.subset(subset)
        if found is None:
            raise KeyError(f"{KIND} {self.key} has no subset {subset!r}")
        policy = found.traffic_policy
        if policy is None:
            return _resolve(top)
        port_entry = policy.port_policy(port)
        if port_entry is not None:
            return _resolve(_from_port(port_entry))
        lb, pool, outlier = top
        return _resolve(
            (
                policy.load_balancer or lb,
                policy.connection_pool or pool,
                policy.outlier_detection or outlier,
            )
        )


_Parts = tuple[LoadBalancerSettings | None, ConnectionPoolSettings | None, OutlierDetection | None]


def _from_port(entry: PortPolicy) -> _Parts:
    return (entry.load_balancer, entry.connection_pool, entry.outlier_detection)


def _apply_port(policy: TrafficPolicy | None, port: int | None) -> _Parts:
    if policy is None:
        return (None, None, None)
    entry = policy.port_policy(port)
    if entry is not None:
        return _from_port(entry)
    return (policy.load_balancer, policy.connection_pool, policy.outlier_detection)


def _resolve(parts: _Parts) -> EffectivePolicy:
    lb, pool, outlier = parts
    return EffectivePolicy(lb or LoadBalancerSettings(), pool or ConnectionPoolSettings(), outlier)


def subset_endpoints(subset: Subset | None, endpoints: Iterable[E]) -> list[E]:
    """The endpoints whose labels carry every label of `subset` (all of them for None)."""
    if subset is None:
        return list(endpoints)
    return [e for e in endpoints if subset.selects(e.labels)]


def _host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


def rule_for_host(rules: Iterable[DestinationRule], host: str) -> DestinationRule | None:
    """The rule for `host`: an exact host first, else the longest matching wildcard; among
    equals the oldest (creationTimestamp, then namespace/name), Istio's usual tie-break."""
    best: tuple[bool, int, str, str, str] | None = None
    chosen: DestinationRule | None = None
    for rule in rules:
        if not _host_matches(rule.host, host):
            continue
        rank = (rule.host != host, -len(rule.host), rule.created, rule.namespace, rule.name)
        if best is None or rank < best:
            best, chosen = rank, rule
    return chosen


# --- parsing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DestinationRules:
    """Every DestinationRule read, the errors of those left out, and notes on those kept."""

    rules: tuple[DestinationRule, ...] = ()
    errors: tuple[ResourceError, ...] = ()
    notes: tuple[ResourceError, ...] = ()


class _Reader:
    """Field readers for one resource; collects notes."""

    def __init__(self, resource: Resource, key: str) -> None:
        self.resource = resource
        self.key = key
        self.notes: list[ResourceError] = []

    def note(self, path: str, reason: str) -> None:
        res = self.resource
        self.notes.append(ResourceError(KIND, res.index, self.key, path, reason, res.file))
        log.debug("%s %s: %s: %s", KIND, self.key, path, reason)


def _int(value: object, path: str, *, maximum: int = 2**31 - 1) -> int | None:
    """A non-negative integer up to `maximum`; None when absent."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(path, f"must be an integer, got {_type_name(value)}")
    if value < 0:
        raise Invalid(path, f"{value} must not be negative")
    if value > maximum:
        raise Invalid(path, f"{value} is larger than {maximum}")
    return value


def _percent(value: object, path: str) -> int | None:
    number = _int(value, path)
    if number is not None and number > 100:
        raise Invalid(path, f"{number} is not a percentage (0-100)")
    return number


def _duration(value: object, path: str) -> float | None:
    """Seconds (Istio's ValidateDuration: at least 1ms, whole milliseconds); None when unset."""
    return None if value is None else duration(value, path)


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DNS1123_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _host(value: object, path: str, namespace: str, domain_suffix: str) -> str:
    host = _str(value, path)
    if not host:
        raise Invalid(path, "is required")
    if host == "*":
        return host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return host
    labels = host.split(".")
    check = labels[1:] if labels[0] == "*" else labels
    if len(host) > 255 or not check or not all(_LABEL.fullmatch(label) for label in check):
        raise Invalid(path, f"{show(host)} is not a valid host name")
    return qualify_host(host, namespace, domain_suffix)


_SIMPLE = {
    "UNSPECIFIED": Algorithm.LEAST_REQUEST,
    "LEAST_CONN": Algorithm.LEAST_REQUEST,
    "LEAST_REQUEST": Algorithm.LEAST_REQUEST,
    "ROUND_ROBIN": Algorithm.ROUND_ROBIN,
    "RANDOM": Algorithm.RANDOM,
    "PASSTHROUGH": Algorithm.LEAST_REQUEST,
}
_LB_FIELDS = ("simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup")
_HASH_KEYS = tuple(source.value for source in HashSource)
_HASH_FIELDS = (*_HASH_KEYS, "ringHash", "maglev", "minimumRingSize")


def _load_balancer(r: _Reader, value: object, path: str) -> LoadBalancerSettings | None:
    if value is None:
        return None
    data = _map(value, path)
    _only(data, path, _LB_FIELDS)
    for name in ("localityLbSetting", "warmupDurationSecs", "warmup"):
        if data.get(name) is not None:
            r.note(_at(path, name), "not applied by the waypoint")
    if data.get("simple") is not None and data.get("consistentHash") is not None:
        raise Invalid(path, "simple and consistentHash are mutually exclusive")
    if data.get("consistentHash") is not None:
        chash = _consistent_hash(r, data["consistentHash"], _at(path, "consistentHash"))
        return LoadBalancerSettings(Algorithm.LEAST_REQUEST, chash)
    simple = _str(data.get("simple"), _at(path, "simple")) or "UNSPECIFIED"
    if simple not in _SIMPLE:
        raise Invalid(
            _at(path, "simple"),
            f"{show(simple)} is not one of " + ", ".join(_SIMPLE),
        )
    if simple == "PASSTHROUGH":
        r.note(
            _at(path, "simple"),
            "PASSTHROUGH forwards to the original destination address, which a waypoint does "
            "not have; LEAST_REQUEST is used instead",
        )
    return LoadBalancerSettings(_SIMPLE[simple])


def _consistent_hash(r: _Reader, value: object, path: str) -> ConsistentHash:
    data = _map(value, path)
    _only(data, path, _HASH_FIELDS)
    present = [k for k in _HASH_KEYS if data.get(k) is not None]
    if len(present) > 1:
        raise Invalid(path, f"{' and '.join(present)} are mutually exclusive")
    if data.get("ringHash") is not None and data.get("maglev") is not None:
        raise Invalid(path, "ringHash and maglev are mutually exclusive")
    ring_size = DEFAULT_MINIMUM_RING_SIZE
    legacy = _int(data.get("minimumRingSize"), _at(path, "minimumRingSize"), maximum=2**23)
    if legacy:
        ring_size = legacy
    if data.get("ringHash") is not None:
        ring_path = _at(path, "ringHash")
        ring = _map(data["ringHash"], ring_path)
        _only(ring, ring_path, ("minimumRingSize",))
        size_path = _at(ring_path, "minimumRingSize")
        size = _int(ring.get("minimumRingSize"), size_path, maximum=2**23)
        if size:
            ring_size = size
    if data.get("maglev") is not None:
        maglev_path = _at(path, "maglev")
        maglev = _map(data["maglev"], maglev_path)
        _only(maglev, maglev_path, ("tableSize",))
        _int(maglev.get("tableSize"), _at(maglev_path, "tableSize"), maximum=2**63 - 1)
        r.note(maglev_path, "a hash ring is used in place of Maglev (the same stability)")
    if not present:
        r.note(path, "no hash key is set: every request gets a random endpoint")
        return ConsistentHash(None, minimum_ring_size=ring_size)
    source = HashSource(present[0])
    key_path = _at(path, source.value)
    raw = data[source.value]
    if source is HashSource.SOURCE_IP:
        if not _bool(raw, key_path):
            r.note(key_path, "false sets no hash key: every request gets a random endpoint")
            return ConsistentHash(None, minimum_ring_size=ring_size)
        return ConsistentHash(source, "", ring_size)
    if source is HashSource.COOKIE:
        cookie = _map(raw, key_path)
        _only(cookie, key_path, ("name", "path", "ttl", "attributes"))
        name = _str(cookie.get("name"), _at(key_path, "name"))
        if not name:
            raise Invalid(_at(key_path, "name"), "is required")
        _str(cookie.get("path"), _at(key_path, "path"))
        if _duration(cookie.get("ttl"), _at(key_path, "ttl")) is not None:
            r.note(
                _at(key_path, "ttl"),
                "the waypoint does not generate the cookie: requests without it get a random "
                "endpoint",
            )
        return ConsistentHash(source, name, ring_size)
    name = _str(raw, key_path)
    if not name:
        raise Invalid(key_path, "must not be empty")
    return ConsistentHash(source, name, ring_size)


_TCP_FIELDS = (
    "maxConnections",
    "connectTimeout",
    "tcpKeepalive",
    "maxConnectionDuration",
    "idleTimeout",
)
_HTTP_FIELDS = (
    "http1MaxPendingRequests",
    "http2MaxRequests",
    "maxRequestsPerConnection",
    "maxRetries",
    "idleTimeout",
    "h2UpgradePolicy",
    "useClientProtocol",
    "maxConcurrentStreams",
)
_H2_UPGRADE = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")


def _limit(value: object, path: str) -> int:
    number = _int(value, path)
    return number or UNLIMITED


def _connection_pool(r: _Reader, value: object, path: str) -> ConnectionPoolSettings | None:
    if value is None:
        return None
    data = _map(value, path)
    _only(data, path, ("tcp", "http"))
    tcp_path = _at(path, "tcp")
    http_path = _at(path, "http")
    tcp = _map(data.get("tcp"), tcp_path)
    http = _map(data.get("http"), http_path)
    _only(tcp, tcp_path, _TCP_FIELDS)
    _only(http, http_path, _HTTP_FIELDS)
    for name in ("tcpKeepalive", "maxConnectionDuration"):
        if tcp.get(name) is not None:
            r.note(_at(tcp_path, name), "not applied by the waypoint")
    _duration(tcp.get("maxConnectionDuration"), _at(tcp_path, "maxConnectionDuration"))
    for name in ("h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams"):
        if http.get(name) is not None:
            r.note(_at(http_path, name), "not applied by the waypoint")
    upgrade = _str(http.get("h2UpgradePolicy"), _at(http_path, "h2UpgradePolicy"))
    if upgrade and upgrade not in _H2_UPGRADE:
        raise Invalid(
            _at(http_path, "h2UpgradePolicy"),
            f"{show(upgrade)} is not one of {', '.join(_H2_UPGRADE)}",
        )
    client = _bool(http.get("useClientProtocol"), _at(http_path, "useClientProtocol"))
    if upgrade == "UPGRADE" and client:
        raise Invalid(
            http_path, "useClientProtocol must not be true when h2UpgradePolicy is UPGRADE"
        )
    _int(http.get("maxConcurrentStreams"), _at(http_path, "maxConcurrentStreams"))
    connect = _duration(tcp.get("connectTimeout"), _at(tcp_path, "connectTimeout"))
    idle = _duration(http.get("idleTimeout"), _at(http_path, "idleTimeout"))
    tcp_idle = _duration(tcp.get("idleTimeout"), _at(tcp_path, "idleTimeout"))
    return ConnectionPoolSettings(
        max_connections=_limit(tcp.get("maxConnections"), _at(tcp_path, "maxConnections")),
        connect_timeout=DEFAULT_CONNECT_TIMEOUT if connect is None else connect,
        max_pending_requests=_limit(
            http.get("http1MaxPendingRequests"), _at(http_path, "http1MaxPendingRequests")
        ),
        max_requests=_limit(http.get("http2MaxRequests"), _at(http_path, "http2MaxRequests")),
        max_requests_per_connection=_int(
            http.get("maxRequestsPerConnection"), _at(http_path, "maxRequestsPerConnection")
        )
        or 0,
        max_retries=_limit(http.get("maxRetries"), _at(http_path, "maxRetries")),
        idle_timeout=idle if idle is not None else tcp_idle,
    )


_OUTLIER_FIELDS = (
    "consecutive5xxErrors",
    "consecutiveGatewayErrors",
    "interval",
    "baseEjectionTime",
    "maxEjectionPercent",
    "minHealthPercent",
    "splitExternalLocalOriginErrors",
    "consecutiveLocalOriginFailures",
    "consecutiveErrors",
)


def _outlier(r: _Reader, value: object, path: str) -> OutlierDetection | None:
    if value is None:
        return None
    data = _map(value, path)
    _only(data, path, _OUTLIER_FIELDS)

    def number(name: str, default: int) -> int:
        found = _int(data.get(name), _at(path, name), maximum=2**32 - 1)
        return default if found is None else found

    def seconds(name: str, default: float) -> float:
        found = _duration(data.get(name), _at(path, name))
        return default if found is None else found

    if data.get("consecutiveErrors") is not None:
        raise Invalid(
            _at(path, "consecutiveErrors"),
            "is no longer part of the Istio API; use consecutive5xxErrors",
        )
    max_percent = _percent(data.get("maxEjectionPercent"), _at(path, "maxEjectionPercent"))
    min_health = _percent(data.get("minHealthPercent"), _at(path, "minHealthPercent"))
    split = _bool(
        data.get("splitExternalLocalOriginErrors"), _at(path, "splitExternalLocalOriginErrors")
    )
    local = _int(
        data.get("consecutiveLocalOriginFailures"),
        _at(path, "consecutiveLocalOriginFailures"),
        maximum=2**32 - 1,
    )
    return OutlierDetection(
        consecutive_5xx_errors=number("consecutive5xxErrors", DEFAULT_CONSECUTIVE_5XX_ERRORS),
        consecutive_gateway_errors=number("consecutiveGatewayErrors", 0),
        interval=seconds("interval", DEFAULT_INTERVAL),
        base_ejection_time=seconds("baseEjectionTime", DEFAULT_BASE_EJECTION_TIME),
        # istiod passes maxEjectionPercent only when > 0, so 0 means Envoy's default.
        max_ejection_percent=max_percent or DEFAULT_MAX_EJECTION_PERCENT,
        min_health_percent=min_health or 0,
        split_external_local_origin_errors=split,
        consecutive_local_origin_failures=local if split and local else 5,
    )


_POLICY_FIELDS = (
    "loadBalancer",
    "connectionPool",
    "outlierDetection",
    "tls",
    "portLevelSettings",
    "tunnel",
    "proxyProtocol",
    "retryBudget",
)
_PORT_FIELDS = ("port", "loadBalancer", "connectionPool", "outlierDetection", "tls")


def _tls_note(r: _Reader, data: Mapping[str, Any], path: str) -> None:
    if data.get("tls") is not None:
        _map(data["tls"], _at(path, "tls"))
        r.note(_at(path, "tls"), "ignored: HBONE carries mutual TLS to mesh endpoints")


def _port_policy(r: _Reader, value: object, path: str) -> PortPolicy:
    data = _map(value, path)
    _only(data, path, _PORT_FIELDS)
    port_path = _at(path, "port")
    port_data = _map(data.get("port"), port_path)
    _only(port_data, port_path, ("number",))
    number = _int(port_data.get("number"), _at(port_path, "number"), maximum=65535)
    if not number:
        raise Invalid(_at(port_path, "number"), "is required (1-65535)")
    _tls_note(r, data, path)
    return PortPolicy(
        number,
        _load_balancer(r, data.get("loadBalancer"), _at(path, "loadBalancer")),
        _connection_pool(r, data.get("connectionPool"), _at(path, "connectionPool")),
        _outlier(r, data.get("outlierDetection"), _at(path, "outlierDetection")),
    )


def _traffic_policy(r: _Reader, value: object, path: str) -> TrafficPolicy | None:
    if value is None:
        return None
    data = _map(value, path)
    _only(data, path, _POLICY_FIELDS)
    _tls_note(r, data, path)
    for name in ("tunnel", "proxyProtocol", "retryBudget"):
        if data.get(name) is not None:
            r.note(_at(path, name), "not applied by the waypoint")
    ports: list[PortPolicy] = []
    seen: set[int] = set()
    levels_path = _at(path, "portLevelSettings")
    for i, item in enumerate(_list(data.get("portLevelSettings"), levels_path)):
        entry = _port_policy(r, item, _at(levels_path, i))
        if entry.port in seen:
            r.note(_at(levels_path, i), f"port {entry.port} is listed before; this entry is unused")
        seen.add(entry.port)
        ports.append(entry)
    return TrafficPolicy(
        _load_balancer(r, data.get("loadBalancer"), _at(path, "loadBalancer")),
        _connection_pool(r, data.get("connectionPool"), _at(path, "connectionPool")),
        _outlier(r, data.get("outlierDetection"), _at(path, "outlierDetection")),
        tuple(ports),
    )


def _subsets(r: _Reader, value: object, path: str) -> tuple[Subset, ...]:
    subsets: list[Subset] = []
    names: set[str] = set()
    for i, item in enumerate(_list(value, path)):
        item_path = _at(path, i)
        data = _map(item, item_path)
        _only(data, item_path, ("name", "labels", "trafficPolicy"))
        name = _str(data.get("name"), _at(item_path, "name"))
        if not name:
            raise Invalid(_at(item_path, "name"), "is required")
        if not _DNS1123_LABEL.fullmatch(name):
            raise Invalid(_at(item_path, "name"), f"{show(name)} is not a valid DNS-1123 label")
        if name in names:
            raise Invalid(_at(item_path, "name"), f"subset {show(name)} is defined twice")
        names.add(name)
        labels = _labels(data.get("labels"), _at(item_path, "labels"))
        policy = _traffic_policy(r, data.get("trafficPolicy"), _at(item_path, "trafficPolicy"))
        subsets.append(Subset(name, dict(labels), policy))
    return tuple(subsets)


def parse_destination_rule(
    resource: Resource, *, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
) -> tuple[DestinationRule | None, tuple[ResourceError, ...], tuple[ResourceError, ...]]:
    """One DestinationRule: (the rule or None, its errors, its notes)."""
    namespace = resource.namespace or "default"
    key = f"{namespace}/{resource.name}"
    r = _Reader(resource, key)

    def error(path: str, reason: str) -> ResourceError:
        return ResourceError(KIND, resource.index, key, path, reason, resource.file)

    if resource.kind != KIND:
        return None, (error("kind", f"{show(resource.kind)} is not {KIND}"),), ()
    version = resource.api_version.rpartition("/")[2]
    if resource.group != GROUP or version not in VERSIONS:
        supported = ", ".join(f"{GROUP}/{v}" for v in VERSIONS)
        reason = f"{show(resource.api_version)} is not supported (use {supported})"
        return None, (error("apiVersion", reason),), ()
    try:
        metadata = _map(resource.body.get("metadata"), "metadata")
        created = metadata.get("creationTimestamp")
        spec = _map(resource.body.get("spec"), "spec")
        _only(spec, "spec", ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"))
        host = _host(spec.get("host"), "spec.host", namespace, domain_suffix)
        policy = _traffic_policy(r, spec.get("trafficPolicy"), "spec.trafficPolicy")
        subsets = _subsets(r, spec.get("subsets"), "spec.subsets")
        export_to = tuple(
            _str(item, _at("spec.exportTo", i))
            for i, item in enumerate(_list(spec.get("exportTo"), "spec.exportTo"))
        )
        if spec.get("workloadSelector") is not None:
            _map(spec["workloadSelector"], "spec.workloadSelector")
            r.note("spec.workloadSelector", "applies to sidecars only; ignored by the waypoint")
    except Invalid as exc:
        return None, (error(exc.path, exc.reason),), tuple(r.notes)
    except RecursionError:
        return None, (error("", "nested too deeply"),), tuple(r.notes)
    rule = DestinationRule(
        namespace=namespace,
        name=resource.name,
        host=host,
        traffic_policy=policy,
        subsets=subsets,
        export_to=export_to,
        created="" if created is None else str(created),
    )
    return rule, (), tuple(r.notes)


def parse_destination_rules(
    resources: Iterable[Resource], *, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
) -> DestinationRules:
    """Every DestinationRule among `resources` (other kinds are skipped); nothing raises."""
    rules: list[DestinationRule] = []
    errors: list[ResourceError] = []
    notes: list[ResourceError] = []
    seen: dict[tuple[str, str], Resource] = {}
    for resource in resources:
        if resource.kind != KIND or resource.group != GROUP:
            continue
        identity = (resource.namespace or "default", resource.name)
        supported = resource.api_version.rpartition("/")[2] in VERSIONS
        if supported and identity in seen:
            key = f"{identity[0]}/{identity[1]}"
            reason = f"duplicate of the one in {seen[identity].location}"
            errors.append(ResourceError(KIND, resource.index, key, "", reason, resource.file))
            continue
        if supported:
            seen[identity] = resource
        rule, rule_errors, rule_notes = parse_destination_rule(
            resource, domain_suffix=domain_suffix
        )
        errors.extend(rule_errors)
        notes.extend(rule_notes)
        if rule is not None:
            rules.append(rule)
    return DestinationRules(tuple(rules), tuple(errors), tuple(notes))


__all__ = [
    "DEFAULT_POLICY",
    "DestinationRule",
    "DestinationRules",
    "EffectivePolicy",
    "PortPolicy",
    "Subset",
    "TrafficPolicy",
    "parse_destination_rule",
    "parse_destination_rules",
    "rule_for_host",
    "subset_endpoints",
]
