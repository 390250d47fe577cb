"""Request metrics: names, labels, buckets and the series cap, read back with the parser."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ztagent.errors import LocalError
from ztagent.telemetry.admin import build_metrics_server
from ztagent.telemetry.metrics import ConnectionLabels, Metrics
from ztagent.telemetry.requests import (
    BYTES_BUCKETS,
    DURATION_BUCKETS_MS,
    REQUEST_LABEL_NAMES,
    EnvoyFlag,
    RequestLabels,
    RequestMetrics,
)

Samples = dict[str, list[tuple[dict[str, str], float]]]

ISTIO_LABELS = {
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
}


def _samples(text: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _types(text: bytes) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text.decode())}


def _labels(**kw: str) -> RequestLabels:
    base = {
        "source_workload": "sleep",
        "source_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
        "source_app": "sleep",
        "source_canonical_service": "sleep",
        "source_canonical_revision": "latest",
        "source_cluster": "Kubernetes",
        "destination_workload": "reviews-v1",
        "destination_workload_namespace": "bookinfo",
        "destination_principal": "spiffe://cluster.local/ns/bookinfo/sa/reviews",
        "destination_app": "reviews",
        "destination_version": "v1",
        "destination_service": "reviews.bookinfo.svc.cluster.local",
        "destination_service_name": "reviews",
        "destination_service_namespace": "bookinfo",
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v1",
        "destination_cluster": "Kubernetes",
        "response_code": "200",
    }
    base.update(kw)
    return RequestLabels(**base)


def _find(samples: Samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [
        (lbl, v)
        for lbl, v in samples.get(name, [])
        if all(lbl.get(k) == val for k, val in labels.items())
    ]


def test_label_names_are_istios_standard_set() -> None:
    names = [f.name for f in dataclasses.fields(RequestLabels) if f.init]
    assert tuple(names) == REQUEST_LABEL_NAMES
    assert set(REQUEST_LABEL_NAMES) == ISTIO_LABELS
    assert len(REQUEST_LABEL_NAMES) == len(ISTIO_LABELS)


def test_defaults_follow_istio() -> None:
    d = RequestLabels(source_workload="", destination_workload="echo").as_dict()
    assert d["reporter"] == "waypoint"
    assert d["source_workload"] == "unknown"
    assert d["source_principal"] == "unknown"
    assert d["destination_workload"] == "echo"
    assert d["request_protocol"] == "http"
    assert d["grpc_response_status"] == ""  # plain HTTP: empty, not "unknown"
    assert d["response_flags"] == "-"
    assert d["connection_security_policy"] == "mutual_tls"


def test_with_response_sets_outcome_and_joins_flags() -> None:
    base = _labels()
    ok = base.with_response(200)
    assert (ok.response_code, ok.response_flags, ok.grpc_response_status) == ("200", "-", "")
    failed = base.with_response(
        503, [EnvoyFlag.NO_HEALTHY_UPSTREAM, EnvoyFlag.UPSTREAM_RETRY_LIMIT]
    )
    assert failed.response_flags == "UH,URX"
    grpc = _labels(request_protocol="grpc").with_response(200, grpc_response_status=14)
    assert grpc.grpc_response_status == "14"
    assert ok == base.with_response(200) and hash(ok) == hash(base.with_response(200))
    assert base.with_response(503, []).response_flags == "-"


@pytest.mark.parametrize(
    "bad",
    [
        {"reporter": "client"},
        {"request_protocol": "tcp"},
        {"response_code": "abc"},
        {"response_code": "2000"},
        {"grpc_response_status": "OK"},
        {"response_flags": "uh"},
        {"response_flags": "UH,"},
        {"connection_security_policy": "tls"},
        {"source_workload": 3},
    ],
)
def test_invalid_labels_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(LocalError):
        RequestLabels(**bad)  # type: ignore[arg-type]


def test_counter_and_histograms_render_with_istio_names_and_labels() -> None:
    m = RequestMetrics()
    ok = _labels().with_response(200)
    m.record(ok, 0.004, 120, 3000)
    m.record(ok, 0.020, 80, 10)
    m.record(_labels().with_response(503, "UH"), 0.0002, 50, 19)
    text = m.render()
    types = _types(text)
    assert types["istio_requests"] == "counter"
    for name in (
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ):
        assert types[name] == "histogram"
    s = _samples(text)
    assert "istio_requests_created" not in s  # ztunnel and Envoy export no _created
    [(lbl, value)] = _find(s, "istio_requests_total", response_code="200")
    assert value == 2
    assert set(lbl) == ISTIO_LABELS
    assert lbl == ok.as_dict()
    assert lbl["source_principal"] == "spiffe://cluster.local/ns/default/sa/sleep"
    [(_, failed)] = _find(s, "istio_requests_total", response_code="503", response_flags="UH")
    assert failed == 1
    [(_, total_ms)] = _find(s, "istio_request_duration_milliseconds_sum", response_code="200")
    assert total_ms == pytest.approx(24.0)
    [(_, req_sum)] = _find(s, "istio_request_bytes_sum", response_code="200")
    assert req_sum == 200
    [(_, count)] = _find(s, "istio_response_bytes_count", response_code="200")
    assert count == 2


def _buckets(s: Samples, name: str, **labels: str) -> dict[float, float]:
    return {float(lbl["le"]): v for lbl, v in _find(s, f"{name}_bucket", **labels)}


def test_histogram_buckets_are_istios_and_cumulative() -> None:
    m = RequestMetrics()
    labels = _labels().with_response(200)
    # 0.5 ms lands in le=0.5 (buckets are "less or equal"); 7 ms in le=10; 2 h in +Inf.
    for seconds in (0.0005, 0.007, 7200.0):
        m.record(labels, seconds, 1, 5_000_000)
    s = _samples(m.render())
    duration = _buckets(s, "istio_request_duration_milliseconds")
    assert list(duration) == [*map(float, DURATION_BUCKETS_MS), float("inf")]
    assert duration[0.5] == 1
    assert duration[5] == 1
    assert duration[10] == 2
    assert duration[3600000] == 2
    assert duration[float("inf")] == 3
    req = _buckets(s, "istio_request_bytes")
    assert list(req) == [*map(float, BYTES_BUCKETS), float("inf")]
    assert req[1] == 3
    resp = _buckets(s, "istio_response_bytes")
    assert resp[1000000] == 0
    assert resp[10000000] == 3
    values = list(duration.values())
    assert values == sorted(values)


def test_series_cap_drops_new_series_and_counts_them() -> None:
    m = RequestMetrics(max_series=3)
    for code in (200, 201, 202):
        assert m.record(_labels().with_response(code), 0.001, 1, 1)
    assert not m.record(_labels().with_response(500), 0.001, 1, 1)
    assert not m.record(_labels().with_response(501), 0.001, 1, 1)
    assert m.record(_labels().with_response(200), 0.001, 1, 1)  # known series still count
    assert m.series_count() == 3
    assert m.dropped == 2
    s = _samples(m.render())
    assert s["ztagent_request_metric_series_dropped_total"] == [({}, 2.0)]
    codes = {lbl["response_code"] for lbl, _ in s["istio_requests_total"]}
    assert codes == {"200", "201", "202"}
    with pytest.raises(LocalError):
        RequestMetrics(max_series=0)


def test_forget_workload_drops_its_series() -> None:
    m = RequestMetrics()
    m.record(_labels().with_response(200), 0.001, 1, 1)
    m.record(_labels(source_workload="other").with_response(200), 0.001, 1, 1)
    assert m.forget_workload("bookinfo", "reviews-v1") == 2
    assert m.series_count() == 0
    assert m.forget_workload("bookinfo", "reviews-v1") == 0


def test_shared_registry_serves_tcp_and_request_metrics_on_one_scrape() -> None:
    agent = Metrics(component="waypoint")
    requests = RequestMetrics(agent.registry)
    agent.opened(ConnectionLabels(destination_workload="echo"))
    requests.record(_labels().with_response(200), 0.003, 10, 20)

    async def scrape() -> bytes:
        async with build_metrics_server(agent.render) as server:
            host, port = await server.start()
            url = f"http://{host}:{port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())

    body = asyncio.run(asyncio.wait_for(scrape(), 10))
    s = _samples(body)
    assert s["istio_tcp_connections_opened_total"][0][1] == 1
    assert s["istio_requests_total"][0][1] == 1
    assert requests.render() == agent.render()
