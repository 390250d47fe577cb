"""Istio's HTTP request metrics, as a waypoint (Envoy with Istio's stats filter) reports them.

Owns `istio_requests_total` and the three histograms `istio_request_duration_milliseconds`,
`istio_request_bytes` and `istio_response_bytes`, with Istio's names, label set, label
defaults and buckets, so Istio's dashboards and Kiali read them unchanged. It knows nothing
of the workload model or the proxy: callers build `RequestLabels` from plain strings and call
`RequestMetrics.record` once per finished request.

As in `metrics`, the series live in a plain dict behind one collector (no prometheus-client
`Histogram` objects, no `_created` series). The number of series is capped: a label set seen
for the first time once the cap is reached is not recorded, and
`ztagent_request_metric_series_dropped_total` counts the requests lost that way, so a
high-cardinality caller (e.g. one destination per request) costs bounded memory.

To serve these next to the node agent's metrics on one `/metrics`, build
`RequestMetrics(registry=metrics.registry)`: `Metrics.render()` then shows both. Without a
registry, `RequestMetrics` has its own and `render()` returns just these families.
"""

from __future__ import annotations

import enum
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

from ztagent.errors import LocalError
from ztagent.telemetry.metrics import CONTENT_TYPE, UNKNOWN

__all__ = [
    "BYTES_BUCKETS",
    "CONTENT_TYPE",
    "DEFAULT_MAX_SERIES",
    "DURATION_BUCKETS_MS",
    "REQUEST_LABEL_NAMES",
    "EnvoyFlag",
    "RequestLabels",
    "RequestMetrics",
    "RequestProtocol",
    "RequestReporter",
]

# Istio's buckets (istio/proxy stats filter): milliseconds and bytes.
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
BYTES_BUCKETS: tuple[float, ...] = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)

DEFAULT_MAX_SERIES = 10_000


class RequestReporter(enum.StrEnum):
    """Who reports: a waypoint reports "waypoint"; sidecars report source or destination."""

    WAYPOINT = "waypoint"
    SOURCE = "source"
    DESTINATION = "destination"


class RequestProtocol(enum.StrEnum):
    HTTP = "http"
    GRPC = "grpc"


class EnvoyFlag(enum.StrEnum):
    """Envoy's short response flags most often seen on a waypoint. `response_flags` is "-"
    for none, else these joined with "," (Envoy's `%RESPONSE_FLAGS%`)."""

    NONE = "-"
    UPSTREAM_OVERFLOW = "UO"  # circuit breaker / connection pool limit
    UPSTREAM_RETRY_LIMIT = "URX"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    NO_HEALTHY_UPSTREAM = "UH"
    NO_ROUTE = "NR"
    NO_CLUSTER = "NC"
    DELAY_INJECTED = "DI"
    FAULT_INJECTED = "FI"
    UPSTREAM_REQUEST_TIMEOUT = "UT"
    UPSTREAM_CONNECTION_TERMINATION = "UC"
    UPSTREAM_REMOTE_RESET = "UR"
    LOCAL_RESET = "LR"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    STREAM_IDLE_TIMEOUT = "SI"
    RATE_LIMITED = "RL"
    UNAUTHORIZED_EXTERNAL_SERVICE = "UAEX"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    UPSTREAM_PROTOCOL_ERROR = "UPE"


_REPORTERS = frozenset(RequestReporter)
_PROTOCOLS = frozenset(RequestProtocol)
_POLICIES = frozenset({"mutual_tls", "none", UNKNOWN})
_FLAGS_RE = re.compile(r"-|[A-Z]{1,6}(,[A-Z]{1,6})*")
_CODE_RE = re.compile(r"[0-9]{1,3}")
_GRPC_STATUS_RE = re.compile(r"|[0-9]{1,2}")
# Labels for which "" is a value of its own rather than "unknown".
_EMPTY_ALLOWED = frozenset({"grpc_response_status"})


@dataclass(frozen=True, slots=True)
class RequestLabels:
    """The label set of one request, in the order Envoy's Istio stats filter writes them.

    Empty strings become "unknown" (Istio's encoding of a missing value), except
    `grpc_response_status`, which Istio leaves empty for plain HTTP. `response_code` is "0"
    when no response was sent (the client went away), as in Envoy. `source_principal` should
    only be an identity proven by mTLS. Hashed once, at construction.
    """

    reporter: str = RequestReporter.WAYPOINT
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = RequestProtocol.HTTP
    response_code: str = "0"
    grpc_response_status: str = ""
    response_flags: str = EnvoyFlag.NONE
    connection_security_policy: str = "mutual_tls"
    _values: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = []
        for f in fields(self)[: len(REQUEST_LABEL_NAMES)]:
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise LocalError(f"metric label {f.name} must be a string, got {value!r}")
            value = str(value)  # StrEnum members become plain strings
            if not value and f.name not in _EMPTY_ALLOWED:
                value = UNKNOWN
            object.__setattr__(self, f.name, value)
            values.append(value)
        if self.reporter not in _REPORTERS:
            raise LocalError(f"metric label reporter must be one of {sorted(_REPORTERS)}")
        if self.request_protocol not in _PROTOCOLS:
            raise LocalError(
                f"metric label request_protocol must be http or grpc: {self.request_protocol!r}"
            )
        if not _CODE_RE.fullmatch(self.response_code):
            raise LocalError(f"metric label response_code must be 0-999: {self.response_code!r}")
        if not _GRPC_STATUS_RE.fullmatch(self.grpc_response_status):
            raise LocalError(
                f"metric label grpc_response_status must be a gRPC status number or empty: "
                f"{self.grpc_response_status!r}"
            )
        if not _FLAGS_RE.fullmatch(self.response_flags):
            raise LocalError(
                f"metric label response_flags must be '-' or Envoy flags like 'UO,URX': "
                f"{self.response_flags!r}"
            )
        if self.connection_security_policy not in _POLICIES:
            raise LocalError(
                "metric label connection_security_policy must be mutual_tls, none or unknown: "
                f"{self.connection_security_policy!r}"
            )
        object.__setattr__(self, "_values", tuple(values))
        object.__setattr__(self, "_hash", hash(self._values))

    def __hash__(self) -> int:
        return self._hash

    @property
    def values(self) -> tuple[str, ...]:
        """The label values in `REQUEST_LABEL_NAMES` order."""
        return self._values

    def as_dict(self) -> dict[str, str]:
        return dict(zip(REQUEST_LABEL_NAMES, self._values, strict=True))

    def with_response(
        self,
        response_code: int,
        response_flags: str | Iterable[str] = EnvoyFlag.NONE,
        grpc_response_status: int | None = None,
    ) -> RequestLabels:
        """The same source/destination pair with one request's outcome: `response_flags` is
        "-", one flag, or several flags (joined with "," as Envoy does)."""
        if not isinstance(response_flags, str):
            response_flags = ",".join(response_flags) or EnvoyFlag.NONE
        return replace(
            self,
            response_code=str(response_code),
            response_flags=response_flags,
            grpc_response_status="" if grpc_response_status is None else str(grpc_response_status),
        )

    def names_workload(self, namespace: str, name: str) -> bool:
        """True when this series names workload `namespace/name` as its source or destination."""
        return (self.source_workload == name and self.source_workload_namespace == namespace) or (
            self.destination_workload == name and self.destination_workload_namespace == namespace
        )


REQUEST_LABEL_NAMES: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else format(bound, ".15g")


class _Histogram:
    """Per-bucket counts (not cumulative; the last slot is +Inf) and the sum of one series."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((_le(bound), running))
        return out


class _Series:
    __slots__ = ("duration", "request_bytes", "requests", "response_bytes")

    def __init__(self) -> None:
        self.requests = 0
        self.duration = _Histogram(DURATION_BUCKETS_MS)
        self.request_bytes = _Histogram(BYTES_BUCKETS)
        self.response_bytes = _Histogram(BYTES_BUCKETS)


_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    (
        "istio_request_duration_milliseconds",
        "The duration of requests, in milliseconds",
        "duration",
    ),
    ("istio_request_bytes", "The sizes of requests, in bytes", "request_bytes"),
    ("istio_response_bytes", "The sizes of responses, in bytes", "response_bytes"),
)
_DROPPED = "ztagent_request_metric_series_dropped"


class _RequestCollector:
    def __init__(self, owner: RequestMetrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[Metric]:
        out: list[Metric] = [
            CounterMetricFamily("istio_requests", "", labels=REQUEST_LABEL_NAMES),
        ]
        out += [HistogramMetricFamily(n, d, labels=REQUEST_LABEL_NAMES) for n, d, _ in _HISTOGRAMS]
        out.append(CounterMetricFamily(_DROPPED, ""))
        return out

    def collect(self) -> Iterator[Metric]:
        snapshot = list(self._owner._series.items())
        requests = CounterMetricFamily(
            "istio_requests", "Counts total number of requests", labels=REQUEST_LABEL_NAMES
        )
        for labels, s in snapshot:
            requests.add_metric(labels.values, s.requests)
        yield requests
        for name, doc, attr in _HISTOGRAMS:
            family = HistogramMetricFamily(name, doc, labels=REQUEST_LABEL_NAMES)
            for labels, s in snapshot:
                h: _Histogram = getattr(s, attr)
                family.add_metric(labels.values, h.cumulative(), h.total)
            yield family
        yield CounterMetricFamily(
            _DROPPED,
            "Requests not recorded in the istio_request* metrics because the series cap was "
            "reached",
            value=self._owner.dropped,
        )


class RequestMetrics:
    """A waypoint's request metrics. Not thread-safe: call it from the event loop that owns
    the proxy. `record` once per finished request (or per request the proxy answered itself,
    e.g. a 503 with flag UH)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        """`registry`: share one (e.g. `Metrics().registry`) to serve both sets on one
        `/metrics`; by default a new registry of our own."""
        if max_series < 1:
            raise LocalError(f"max_series must be at least 1, got {max_series}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.max_series = max_series
        self.dropped = 0
        self._series: dict[RequestLabels, _Series] = {}
        self.registry.register(_RequestCollector(self))

    def record(
        self,
        labels: RequestLabels,
        duration_seconds: float,
        request_bytes: int,
        response_bytes: int,
    ) -> bool:
        """Count one request. Sizes are what crossed the wire (headers and body, as Envoy
        counts them). Returns False when the series cap kept it out."""
        s = self._series.get(labels)
        if s is None:
            if len(self._series) >= self.max_series:
                self.dropped += 1
                return False
            s = self._series[labels] = _Series()
        s.requests += 1
        s.duration.observe(max(duration_seconds, 0.0) * 1000.0)
        s.request_bytes.observe(max(request_bytes, 0))
        s.response_bytes.observe(max(response_bytes, 0))
        return True

    def forget_workload(self, namespace: str, name: str) -> int:
        """Drop every series naming `namespace/name` as source or destination (it left the
        mesh). Returns how many were dropped."""
        gone = [labels for labels in self._series if labels.names_workload(namespace, name)]
        for labels in gone:
            del self._series[labels]
        return len(gone)

    def series_count(self) -> int:
        return len(self._series)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (`CONTENT_TYPE`); when the registry is
        shared with `Metrics`, this is the same text as `Metrics.render()`."""
        return bytes(generate_latest(self.registry))
