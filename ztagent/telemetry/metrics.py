"""Istio's node-proxy TCP metrics, plus the agent's own gauges, in a registry of our own.

Owns the counters a node agent reports per connection (the same names, labels and label
defaults as ztunnel, so Istio's dashboards and Kiali read them unchanged) and a few gauges
about the agent itself (build, certificate expiry, config version). It never touches
prometheus-client's global registry and knows nothing of the workload model: callers build
`ConnectionLabels` from plain strings.

The TCP counters live in plain dicts behind one collector rather than in prometheus-client
`Counter`s: the byte counters are bumped on every read on the data path, and a dict lookup on
a cached hash is much cheaper than `labels(...)` with its lock. It also lets
`forget_workload` drop series in one pass, and the output carries no `_created` series
(ztunnel does not export them either).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from ztagent import __version__
from ztagent.errors import LocalError
from ztagent.identity.spiffe import Identity
from ztagent.model.workload import Service, Workload

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
UNKNOWN = "unknown"


class Reporter(enum.StrEnum):
    """Which end of the connection reports: the client's node agent or the server's."""

    SOURCE = "source"
    DESTINATION = "destination"


class SecurityPolicy(enum.StrEnum):
    MUTUAL_TLS = "mutual_tls"
    UNKNOWN = "unknown"


class ResponseFlags(enum.StrEnum):
    """Why a connection ended badly; ztunnel's values. `NONE` ("-") is a clean connection."""

    NONE = "-"
    DENY = "DENY"
    CONNECT = "CONNECT"
    TLS_FAILURE = "TLS_FAILURE"
    H2_HANDSHAKE_FAILURE = "H2_HANDSHAKE_FAILURE"
    NETWORK_POLICY = "NETWORK_POLICY"
    IDENTITY_ERROR = "IDENTITY_ERROR"
    CERT_REVOKED = "CERT_REVOKED"


_REPORTERS = frozenset(Reporter)
_POLICIES = frozenset(SecurityPolicy)
_FLAGS = frozenset(ResponseFlags)


@dataclass(frozen=True, slots=True)
class ConnectionLabels:
    """The label set of one connection, in ztunnel's label order.

    Empty strings become "unknown", as ztunnel encodes a missing value. `source_principal`
    should only be the identity proven by mTLS (leave it empty for plaintext callers).
    Label sets are hashed once, at construction, since they key the counters on the data path.
    """

    reporter: str = Reporter.SOURCE
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = ResponseFlags.NONE
    connection_security_policy: str = SecurityPolicy.UNKNOWN
    _values: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = []
        for f in fields(self)[: len(LABEL_NAMES)]:
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise LocalError(f"metric label {f.name} must be a string, got {value!r}")
            value = str(value) if value else UNKNOWN  # StrEnum members become plain strings
            object.__setattr__(self, f.name, value)
            values.append(value)
        if self.reporter not in _REPORTERS:
            raise LocalError(
                f"metric label reporter must be source or destination: {self.reporter!r}"
            )
        if self.connection_security_policy not in _POLICIES:
            raise LocalError(
                "metric label connection_security_policy must be mutual_tls or unknown: "
                f"{self.connection_security_policy!r}"
            )
        if self.response_flags not in _FLAGS:
            raise LocalError(f"unknown response_flags value {self.response_flags!r}")
        object.__setattr__(self, "_values", tuple(values))
        object.__setattr__(self, "_hash", hash(self._values))

    def __hash__(self) -> int:
        return self._hash

    @property
    def values(self) -> tuple[str, ...]:
        """The label values in `LABEL_NAMES` order."""
        return self._values

    def as_dict(self) -> dict[str, str]:
        return dict(zip(LABEL_NAMES, self._values, strict=True))

    def with_response_flags(self, flags: str) -> ConnectionLabels:
        """The same connection, ended for the reason `flags` (e.g. `ResponseFlags.DENY`)."""
        return replace(self, response_flags=flags)

    def names_workload(self, namespace: str, name: str) -> bool:
        """True when this series names workload `namespace/name` as its source or destination."""
        return (self.source_workload == name and self.source_workload_namespace == namespace) or (
            self.destination_workload == name and self.destination_workload_namespace == namespace
        )


def peer_labels(
    side: str, workload: Workload | None, identity: Identity | None, cluster: str
) -> dict[str, str]:
    """One side's labels (`side` is "source" or "destination"), as Istio derives them from a
    workload: name, namespace, principal, app/canonical service, version/revision, cluster."""
    return {f"{side}_{k}": v for k, v in _peer_labels(workload, identity, cluster).items()}


def connection_labels(
    reporter: str,
    source: Workload | None,
    source_identity: Identity | None,
    destination: Workload | None,
    service: Service | None,
    mtls: bool,
    cluster: str,
    flags: str = ResponseFlags.NONE,
) -> ConnectionLabels:
    """The labels of one connection as a node agent reports it: both sides' workload labels,
    the service it was addressed to, and whether mTLS carried it."""
    values: dict[str, str] = {"reporter": reporter, "response_flags": flags}
    values.update(peer_labels("source", source, source_identity, cluster))
    dest_identity = destination.identity if destination is not None else None
    values.update(peer_labels("destination", destination, dest_identity, cluster))
    if service is not None:
        values["destination_service"] = service.hostname
        values["destination_service_name"] = service.name
        values["destination_service_namespace"] = service.namespace
    values["connection_security_policy"] = (
        SecurityPolicy.MUTUAL_TLS if mtls else SecurityPolicy.UNKNOWN
    )
    return ConnectionLabels(**values)


def _peer_labels(
    workload: Workload | None, identity: Identity | None, cluster: str
) -> dict[str, str]:
    if workload is None:
        return {"principal": str(identity) if identity else ""}
    name = workload.workload_name or workload.name
    return {
        "workload": name,
        "workload_namespace": workload.namespace,
        "principal": str(identity or workload.identity),
        "app": workload.canonical_name or name,
        "canonical_service": workload.canonical_name or name,
        "version": workload.canonical_revision or "latest",
        "canonical_revision": workload.canonical_revision or "latest",
        "cluster": workload.cluster_id or cluster,
    }


LABEL_NAMES: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


class _Series:
    """The five counters of one label set. Bytes appear once the connection opened (as in
    ztunnel, where opening a connection creates its byte series at zero)."""

    __slots__ = ("closed", "failed", "has_bytes", "opened", "received", "sent")

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.failed = 0
        self.sent = 0
        self.received = 0
        self.has_bytes = False


# (metric name without _total, help, attribute of _Series)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("istio_tcp_connections_opened", "The total number of TCP connections opened", "opened"),
    ("istio_tcp_connections_closed", "The total number of TCP connections closed", "closed"),
    (
        "istio_tcp_received_bytes",
        "The size of total bytes received during request in case of a TCP connection",
        "received",
    ),
    (
        "istio_tcp_sent_bytes",
        "The size of total bytes sent during response in case of a TCP connection",
        "sent",
    ),
    (
        "istio_tcp_connections_failed",
        "The total number of TCP connections that failed to establish",
        "failed",
    ),
)


class _TcpCollector:
    def __init__(self, series: dict[ConnectionLabels, _Series]) -> None:
        self._series = series

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(name, doc, labels=LABEL_NAMES) for name, doc, _ in _COUNTERS]

    def collect(self) -> Iterator[Metric]:
        snapshot = list(self._series.items())
        for name, doc, attr in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=LABEL_NAMES)
            is_bytes = attr in ("sent", "received")
            for labels, s in snapshot:
                value: int = getattr(s, attr)
                if value or (is_bytes and s.has_bytes):
                    family.add_metric(labels.values, value)
            yield family


class Metrics:
    """The agent's metrics. Not thread-safe: call it from the event loop that owns the agent.

    Byte counters follow Istio's meaning for both reporters: `received` is the request
    direction (client to server), `sent` the response direction (server to client).
    """

    def __init__(self, *, component: str = "ztunnel", tag: str = __version__) -> None:
        """`component`/`tag` label `istio_build`; "ztunnel" keeps Istio's dashboards, which
        select the node proxy by that label, working unchanged."""
        self.registry = CollectorRegistry()
        self._series: dict[ConnectionLabels, _Series] = {}
        self.registry.register(_TcpCollector(self._series))
        self._build = Gauge(
            "istio_build",
            "Istio component build info",
            ["component", "tag"],
            registry=self.registry,
        )
        self._build.labels(component, tag).set(1)
        self._cert_expiry = Gauge(
            "ztagent_cert_expiry_timestamp_seconds",
            "When the workload certificate held for an identity expires (unix time)",
            ["identity"],
            registry=self.registry,
        )
        self._config_version = Gauge(
            "ztagent_config_version",
            "Generation of the workload/policy configuration in force",
            registry=self.registry,
        )
        self._config_updated = Gauge(
            "ztagent_config_last_update_timestamp_seconds",
            "When the configuration in force was applied (unix time)",
            registry=self.registry,
        )
        self._identities: set[str] = set()

    # -------------------------------------------------------------------- connections

    def _get(self, labels: ConnectionLabels) -> _Series:
        s = self._series.get(labels)
        if s is None:
            s = self._series[labels] = _Series()
        return s

    def opened(self, labels: ConnectionLabels) -> None:
        s = self._get(labels)
        s.opened += 1
        s.has_bytes = True

    def sent(self, labels: ConnectionLabels, n: int) -> None:
        s = self._get(labels)
        s.sent += n
        s.has_bytes = True

    def received(self, labels: ConnectionLabels, n: int) -> None:
        s = self._get(labels)
        s.received += n
        s.has_bytes = True

    def closed(self, labels: ConnectionLabels) -> None:
        """Every connection that was opened or refused is closed once, clean or not."""
        self._get(labels).closed += 1

    def failed(self, labels: ConnectionLabels) -> None:
        """A connection that could not be established; `labels.response_flags` says why."""
        self._get(labels).failed += 1

    def forget_workload(self, namespace: str, name: str) -> int:
        """Drop every series naming `namespace/name` as source or destination (it left the
        mesh), so series do not pile up as pods come and go. Returns how many were dropped."""
        gone = [labels for labels in self._series if labels.names_workload(namespace, name)]
        for labels in gone:
            del self._series[labels]
        return len(gone)

    def series_count(self) -> int:
        return len(self._series)

    # -------------------------------------------------------------------- agent gauges

    def set_cert_expiry(self, identity: str, expires_at: float) -> None:
        self._cert_expiry.labels(identity).set(expires_at)
        self._identities.add(identity)

    def drop_cert(self, identity: str) -> None:
        if identity in self._identities:
            self._identities.discard(identity)
            self._cert_expiry.remove(identity)

    def set_config_version(self, version: int, updated_at: float | None = None) -> None:
        self._config_version.set(version)
        self._config_updated.set(time.time() if updated_at is None else updated_at)

    # -------------------------------------------------------------------- exposition

    def render(self) -> bytes:
        """Everything in the Prometheus text format (`CONTENT_TYPE`)."""
        return bytes(generate_latest(self.registry))
