"""Metrics: label sets and values after a sequence of calls, read back with the parser."""

from __future__ import annotations

import dataclasses

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ztagent.errors import LocalError
from ztagent.telemetry.metrics import (
    LABEL_NAMES,
    ConnectionLabels,
    Metrics,
    Reporter,
    ResponseFlags,
    SecurityPolicy,
)


def _samples(m: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _labels(**kw: str) -> ConnectionLabels:
    base = {
        "reporter": "destination",
        "source_workload": "sleep",
        "source_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
        "source_app": "sleep",
        "source_canonical_service": "sleep",
        "destination_workload": "echo",
        "destination_workload_namespace": "prod",
        "destination_principal": "spiffe://cluster.local/ns/prod/sa/echo",
        "destination_service": "echo.prod.svc.cluster.local",
        "destination_service_name": "echo",
        "destination_service_namespace": "prod",
        "connection_security_policy": "mutual_tls",
    }
    base.update(kw)
    return ConnectionLabels(**base)


def test_label_names_match_fields_and_ztunnel_set() -> None:
    names = [f.name for f in dataclasses.fields(ConnectionLabels) if f.init]
    assert tuple(names) == LABEL_NAMES
    for side in ("source", "destination"):
        for suffix in (
            "workload",
            "workload_namespace",
            "principal",
            "app",
            "version",
            "canonical_service",
            "canonical_revision",
            "cluster",
        ):
            assert f"{side}_{suffix}" in LABEL_NAMES
    assert {"destination_service", "destination_service_name", "destination_service_namespace"} <= (
        set(LABEL_NAMES)
    )
    assert {"reporter", "request_protocol", "response_flags", "connection_security_policy"} <= (
        set(LABEL_NAMES)
    )


def test_defaults_are_unknown_and_empty_becomes_unknown() -> None:
    labels = ConnectionLabels(source_workload="", destination_workload="echo")
    d = labels.as_dict()
    assert d["reporter"] == "source"
    assert d["source_workload"] == "unknown"
    assert d["destination_workload"] == "echo"
    assert d["source_principal"] == "unknown"
    assert d["request_protocol"] == "tcp"
    assert d["response_flags"] == "-"
    assert d["connection_security_policy"] == "unknown"
    assert type(ConnectionLabels(reporter=Reporter.DESTINATION).reporter) is str


def test_labels_hash_and_equality() -> None:
    a, b = _labels(), _labels()
    assert a == b and hash(a) == hash(b)
    c = a.with_response_flags(ResponseFlags.DENY)
    assert c != a and c.response_flags == "DENY"
    assert {a: 1}[b] == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"reporter": "waypoint"},
        {"connection_security_policy": "plaintext"},
        {"response_flags": "NOPE"},
        {"source_workload": 3},
    ],
)
def test_bad_label_values_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(LocalError):
        ConnectionLabels(**kw)  # type: ignore[arg-type]


def test_counters_after_a_connection_lifecycle() -> None:
    m = Metrics()
    ok = _labels()
    m.opened(ok)
    m.received(ok, 100)
    m.sent(ok, 40)
    m.received(ok, 23)
    m.closed(ok)
    m.opened(ok)
    denied = _labels(connection_security_policy=SecurityPolicy.UNKNOWN).with_response_flags(
        ResponseFlags.DENY
    )
    m.closed(denied)
    m.failed(denied)

    s = _samples(m)
    assert s["istio_tcp_connections_opened_total"] == [(ok.as_dict(), 2.0)]
    assert s["istio_tcp_received_bytes_total"] == [(ok.as_dict(), 123.0)]
    assert s["istio_tcp_sent_bytes_total"] == [(ok.as_dict(), 40.0)]
    closed = {tuple(sorted(lbl.items())): v for lbl, v in s["istio_tcp_connections_closed_total"]}
    assert closed == {
        tuple(sorted(ok.as_dict().items())): 1.0,
        tuple(sorted(denied.as_dict().items())): 1.0,
    }
    assert s["istio_tcp_connections_failed_total"] == [(denied.as_dict(), 1.0)]
    failed_labels = s["istio_tcp_connections_failed_total"][0][0]
    assert failed_labels["response_flags"] == "DENY"
    assert failed_labels["connection_security_policy"] == "unknown"
    assert not any(n.endswith("_created") for n in s)


def test_opened_creates_zero_byte_series() -> None:
    m = Metrics()
    m.opened(_labels())
    s = _samples(m)
    assert [v for _, v in s["istio_tcp_sent_bytes_total"]] == [0.0]
    assert [v for _, v in s["istio_tcp_received_bytes_total"]] == [0.0]
    assert "istio_tcp_connections_failed_total" not in s


def test_forget_workload_drops_series_naming_it_either_side() -> None:
    m = Metrics()
    as_dest = _labels()
    as_source = _labels(
        source_workload="echo",
        source_workload_namespace="prod",
        destination_workload="db",
        destination_workload_namespace="prod",
    )
    other = _labels(destination_workload="other", destination_workload_namespace="prod")
    same_name_other_ns = _labels(destination_workload="echo", destination_workload_namespace="qa")
    for labels in (as_dest, as_source, other, same_name_other_ns):
        m.opened(labels)
        m.sent(labels, 5)
        m.closed(labels)
    assert m.series_count() == 4

    assert m.forget_workload("prod", "echo") == 2
    assert m.series_count() == 2
    s = _samples(m)
    remaining = {
        (lbl["destination_workload"], lbl["destination_workload_namespace"])
        for lbl, _ in s["istio_tcp_connections_opened_total"]
    }
    assert remaining == {("other", "prod"), ("echo", "qa")}
    for name in ("istio_tcp_sent_bytes_total", "istio_tcp_connections_closed_total"):
        assert len(s[name]) == 2
    assert m.forget_workload("prod", "echo") == 0


def test_gauges_cert_expiry_config_and_build() -> None:
    m = Metrics(component="ztunnel", tag="1.2.3")
    m.set_cert_expiry("spiffe://cluster.local/ns/a/sa/x", 1_700_000_000)
    m.set_cert_expiry("spiffe://cluster.local/ns/b/sa/y", 1_700_000_500)
    m.set_config_version(7, updated_at=1_600_000_000)
    s = _samples(m)
    expiry = {lbl["identity"]: v for lbl, v in s["ztagent_cert_expiry_timestamp_seconds"]}
    assert expiry == {
        "spiffe://cluster.local/ns/a/sa/x": 1_700_000_000,
        "spiffe://cluster.local/ns/b/sa/y": 1_700_000_500,
    }
    assert s["ztagent_config_version"] == [({}, 7.0)]
    assert s["ztagent_config_last_update_timestamp_seconds"] == [({}, 1_600_000_000)]
    assert s["istio_build"] == [({"component": "ztunnel", "tag": "1.2.3"}, 1.0)]

    m.drop_cert("spiffe://cluster.local/ns/a/sa/x")
    m.drop_cert("spiffe://cluster.local/ns/never/sa/seen")
    s = _samples(m)
    assert [lbl["identity"] for lbl, _ in s["ztagent_cert_expiry_timestamp_seconds"]] == [
        "spiffe://cluster.local/ns/b/sa/y"
    ]


def test_own_registry_not_global() -> None:
    before = prometheus_client.generate_latest(prometheus_client.REGISTRY)
    m1, m2 = Metrics(), Metrics()
    m1.opened(_labels())
    assert b"istio_tcp" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)
    assert b"istio_tcp_connections_opened_total{" not in m2.render()
    assert before.count(b"istio_build") == 0
