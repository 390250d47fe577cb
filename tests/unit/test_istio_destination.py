"""DestinationRule parsing, policy merging and subsets."""

from __future__ import annotations

import textwrap
from fractions import Fraction

import pytest

from ztagent.control.sources import parse_documents
from ztagent.fields import parse_go_duration
from ztagent.istio.balancer import (
    Algorithm,
    ConsistentHash,
    Endpoint,
    HashSource,
    LoadBalancerSettings,
)
from ztagent.istio.connection_pool import (
    UNLIMITED,
    ConnectionPoolSettings,
)
from ztagent.istio.destination import (
    DEFAULT_POLICY,
    DestinationRule,
    EffectivePolicy,
    PortPolicy,
    Subset,
    TrafficPolicy,
    parse_destination_rule,
    parse_destination_rules,
    rule_for_host,
    subset_endpoints,
)
from ztagent.istio.envelope import Resource
from ztagent.istio.outlier import OutlierDetection

GOLDEN = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: bookinfo
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 0.5s
      http:
        http1MaxPendingRequests: 10
        http2MaxRequests: 1000
        maxRequestsPerConnection: 5
        maxRetries: 3
        idleTimeout: 1m30s
    outlierDetection:
      consecutive5xxErrors: 3
      consecutiveGatewayErrors: 2
      interval: 1s
      baseEjectionTime: 30s
      maxEjectionPercent: 100
      minHealthPercent: 50
    portLevelSettings:
    - port:
        number: 9080
      loadBalancer:
        simple: RANDOM
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpHeaderName: x-user
      portLevelSettings:
      - port:
          number: 9443
        connectionPool:
          tcp:
            maxConnections: 7
"""


def resources(text: str) -> list[Resource]:
    batch = parse_documents(textwrap.dedent(text), "dr.yaml")
    assert not batch.errors, batch.errors
    return list(batch.resources)


def parse_one(text: str, **kwargs: str) -> DestinationRule:
    (resource,) = resources(text)
    rule, errors, _ = parse_destination_rule(resource, **kwargs)
    assert not errors, [str(e) for e in errors]
    assert rule is not None
    return rule


def rule_with(spec: str, namespace: str = "default") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return (
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n"
        f"metadata:\n  name: dr\n  namespace: {namespace}\nspec:\n{body}\n"
    )


def errors_of(spec: str) -> list[str]:
    parsed = parse_destination_rules(resources(rule_with(spec)))
    assert not parsed.rules
    return [str(e) for e in parsed.errors]


# --- parsing ---------------------------------------------------------------------------------


def test_golden_parse_with_subsets_and_port_level_settings() -> None:
    rule = parse_one(GOLDEN)
    expected_pool = ConnectionPoolSettings(
        max_connections=100,
        connect_timeout=0.5,
        max_pending_requests=10,
        max_requests=1000,
        max_requests_per_connection=5,
        max_retries=3,
        idle_timeout=90.0,
    )
    expected_outlier = OutlierDetection(
        consecutive_5xx_errors=3,
        consecutive_gateway_errors=2,
        interval=1.0,
        base_ejection_time=30.0,
        max_ejection_percent=100,
        min_health_percent=50,
    )
    assert rule == DestinationRule(
        namespace="bookinfo",
        name="reviews",
        host="reviews.bookinfo.svc.cluster.local",
        traffic_policy=TrafficPolicy(
            load_balancer=LoadBalancerSettings(Algorithm.ROUND_ROBIN),
            connection_pool=expected_pool,
            outlier_detection=expected_outlier,
            port_level_settings=(
                PortPolicy(9080, load_balancer=LoadBalancerSettings(Algorithm.RANDOM)),
            ),
        ),
        subsets=(
            Subset("v1", {"version": "v1"}),
            Subset(
                "v2",
                {"version": "v2"},
                TrafficPolicy(
                    load_balancer=LoadBalancerSettings(
                        Algorithm.LEAST_REQUEST, ConsistentHash(HashSource.HEADER, "x-user")
                    ),
                    port_level_settings=(
                        PortPolicy(9443, connection_pool=ConnectionPoolSettings(max_connections=7)),
                    ),
                ),
            ),
        ),
    )
    assert rule.key == "bookinfo/reviews"


def test_every_supported_version_and_domain_suffix() -> None:
    for version in ("v1", "v1beta1", "v1alpha3"):
        text = GOLDEN.replace("networking.istio.io/v1", f"networking.istio.io/{version}")
        rule = parse_one(text, domain_suffix="example.org")
        assert rule.host == "reviews.bookinfo.svc.example.org"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("reviews", "reviews.default.svc.cluster.local"),
        ("reviews.other", "reviews.other"),
        ("reviews.other.svc.cluster.local", "reviews.other.svc.cluster.local"),
        ("*.example.com", "*.example.com"),
        ("*", "*"),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_host_resolution(host: str, expected: str) -> None:
    assert parse_one(rule_with(f"host: {host!r}")).host == expected


def test_namespace_defaults_to_default() -> None:
    text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
    text += "metadata: {name: x}\nspec: {host: ratings}\n"
    assert parse_one(text).host == "ratings.default.svc.cluster.local"


def test_defaults_when_fields_are_omitted() -> None:
    rule = parse_one(rule_with("host: r\ntrafficPolicy:\n  outlierDetection: {}"))
    policy = rule.policy()
    assert policy.load_balancer == LoadBalancerSettings(Algorithm.LEAST_REQUEST)
    assert policy.connection_pool == ConnectionPoolSettings()
    assert policy.connection_pool.max_connections == UNLIMITED == 2**32 - 1
    assert policy.connection_pool.max_pending_requests == UNLIMITED
    assert policy.connection_pool.max_requests == UNLIMITED
    assert policy.connection_pool.max_retries == UNLIMITED
    assert policy.connection_pool.max_requests_per_connection == 0
    assert policy.outlier_detection == OutlierDetection(
        consecutive_5xx_errors=5,
        consecutive_gateway_errors=0,
        interval=10.0,
        base_ejection_time=30.0,
        max_ejection_percent=10,
        min_health_percent=0,
    )
    # No outlierDetection at all: detection is off.
    assert parse_one(rule_with("host: r")).policy() == DEFAULT_POLICY == EffectivePolicy()
    assert DEFAULT_POLICY.outlier_detection is None


def test_zero_limits_mean_default_and_zero_thresholds_disable() -> None:
    spec = """
    host: r
    trafficPolicy:
      connectionPool:
        tcp: {maxConnections: 0}
        http: {http2MaxRequests: 0}
      outlierDetection: {consecutive5xxErrors: 0, maxEjectionPercent: 0}
    """
    policy = parse_one(rule_with(spec)).policy()
    assert policy.connection_pool.max_connections == UNLIMITED
    assert policy.connection_pool.max_requests == UNLIMITED
    assert policy.outlier_detection is not None
    assert policy.outlier_detection.consecutive_5xx_errors == 0
    assert policy.outlier_detection.max_ejection_percent == 10


@pytest.mark.parametrize(
    ("simple", "algorithm"),
    [
        ("ROUND_ROBIN", Algorithm.ROUND_ROBIN),
        ("LEAST_REQUEST", Algorithm.LEAST_REQUEST),
        ("LEAST_CONN", Algorithm.LEAST_REQUEST),
        ("UNSPECIFIED", Algorithm.LEAST_REQUEST),
        ("RANDOM", Algorithm.RANDOM),
    ],
)
def test_simple_algorithms_and_aliases(simple: str, algorithm: Algorithm) -> None:
    spec = f"host: r\ntrafficPolicy:\n  loadBalancer: {{simple: {simple}}}"
    assert parse_one(rule_with(spec)).policy().load_balancer.simple is algorithm


def test_passthrough_is_noted_and_uses_the_default() -> None:
    spec = "host: r\ntrafficPolicy:\n  loadBalancer: {simple: PASSTHROUGH}"
    parsed = parse_destination_rules(resources(rule_with(spec)))
    assert parsed.rules[0].policy().load_balancer.simple is Algorithm.LEAST_REQUEST
    (note,) = parsed.notes
    assert note.path == "spec.trafficPolicy.loadBalancer.simple"
    assert "PASSTHROUGH" in note.reason


@pytest.mark.parametrize(
    ("hash_spec", "expected"),
    [
        ("{httpHeaderName: X-User}", ConsistentHash(HashSource.HEADER, "X-User")),
        ("{useSourceIp: true}", ConsistentHash(HashSource.SOURCE_IP)),
        ("{httpQueryParameterName: u}", ConsistentHash(HashSource.QUERY_PARAMETER, "u")),
        ("{httpCookie: {name: session}}", ConsistentHash(HashSource.COOKIE, "session")),
        (
            "{httpHeaderName: x, ringHash: {minimumRingSize: 4096}}",
            ConsistentHash(HashSource.HEADER, "x", 4096),
        ),
        ("{httpHeaderName: x, minimumRingSize: 64}", ConsistentHash(HashSource.HEADER, "x", 64)),
    ],
)
def test_consistent_hash_keys(hash_spec: str, expected: ConsistentHash) -> None:
    spec = f"host: r\ntrafficPolicy:\n  loadBalancer:\n    consistentHash: {hash_spec}"
    assert parse_one(rule_with(spec)).policy().load_balancer.consistent_hash == expected


def test_unsupported_but_valid_fields_are_noted() -> None:
    spec = """
    host: r
    workloadSelector: {matchLabels: {app: r}}
    trafficPolicy:
      tls: {mode: ISTIO_MUTUAL}
      loadBalancer:
        consistentHash:
          httpCookie: {name: s, ttl: 10s}
          maglev: {tableSize: 65537}
      connectionPool:
        tcp: {tcpKeepalive: {time: 10s}}
    """
    parsed = parse_destination_rules(resources(rule_with(spec)))
    assert len(parsed.rules) == 1
    paths = {n.path for n in parsed.notes}
    assert paths == {
        "spec.workloadSelector",
        "spec.trafficPolicy.tls",
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev",
        "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
    }
    tls = next(n for n in parsed.notes if n.path.endswith("tls"))
    assert "HBONE" in tls.reason
    assert str(tls).startswith("DestinationRule default/dr: spec.trafficPolicy.tls: ")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("0.5s", 0.5),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        (".5s", 0.5),
        ("1s500ms", 1.5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == Fraction(round(seconds * 1e9), 10**9)
    spec = f"host: r\ntrafficPolicy:\n  outlierDetection: {{interval: {text!r}}}"
    outlier = parse_one(rule_with(spec)).policy().outlier_detection
    assert outlier is not None and outlier.interval == seconds


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        ("{}", "spec.host", "is required"),
        ("host: 5", "spec.host", "must be a string, got a number"),
        ("host: 'bad_host!'", "spec.host", "is not a valid host name"),
        ("host: r\nbogus: 1", "spec.bogus", "unknown field"),
        ("host: r\ntrafficPolicy: []", "spec.trafficPolicy", "must be a mapping, got a list"),
        (
            "host: r\ntrafficPolicy: {loadBalancer: {simple: FASTEST}}",
            "spec.trafficPolicy.loadBalancer.simple",
            '"FASTEST" is not one of',
        ),
        (
            "host: r\ntrafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {}}}",
            "spec.trafficPolicy.loadBalancer",
            "mutually exclusive",
        ),
        (
            "host: r\ntrafficPolicy:\n  loadBalancer:\n"
            "    consistentHash: {httpHeaderName: a, useSourceIp: true}",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "httpHeaderName and useSourceIp are mutually exclusive",
        ),
        (
            "host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: ''}}}",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
            "must not be empty",
        ),
        (
            "host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {ttl: 1s}}}}",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
            "is required",
        ),
        (
            "host: r\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}",
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
            "must not be negative",
        ),
        (
            "host: r\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: '5'}}}",
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
            "must be an integer, got a string",
        ),
        (
            "host: r\ntrafficPolicy: {connectionPool: {http: {http2MaxRequests: true}}}",
            "spec.trafficPolicy.connectionPool.http.http2MaxRequests",
            "must be an integer, got a boolean",
        ),
        (
            "host: r\ntrafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: 1.5}}}",
            "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
            "must be an integer",
        ),
        (
            "host: r\ntrafficPolicy: {connectionPool: {http: {maxRetries: 2147483648}}}",
            "spec.trafficPolicy.connectionPool.http.maxRetries",
            "is larger than",
        ),
        (
            "host: r\ntrafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: -2}}}",
            "spec.trafficPolicy.connectionPool.http.maxRequestsPerConnection",
            "must not be negative",
        ),
        (
            "host: r\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: 10}}}",
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "must be a duration string",
        ),
        (
            "host: r\ntrafficPolicy: {connectionPool: {udp: {}}}",
            "spec.trafficPolicy.connectionPool.udp",
            "unknown field",
        ),
        (
            "host: r\ntrafficPolicy: {outlierDetection: {interval: soon}}",
            "spec.trafficPolicy.outlierDetection.interval",
            '"soon" is not a duration',
        ),
        (
            "host: r\ntrafficPolicy: {outlierDetection: {interval: '-1s'}}",
            "spec.trafficPolicy.outlierDetection.interval",
            "is not a duration",
        ),
        (
            "host: r\ntrafficPolicy: {outlierDetection: {baseEjectionTime: 0s}}",
            "spec.trafficPolicy.outlierDetection.baseEjectionTime",
            "at least 1ms",
        ),
        (
            "host: r\ntrafficPolicy: {outlierDetection: {baseEjectionTime: 1500us}}",
            "spec.trafficPolicy.outlierDetection.baseEjectionTime",
            "whole milliseconds",
        ),
        (
            "host: r\ntrafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}",
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            "is not a percentage",
        ),
        (
            "host: r\ntrafficPolicy: {outlierDetection: {minHealthPercent: -1}}",
            "spec.trafficPolicy.outlierDetection.minHealthPercent",
            "must not be negative",
        ),
        (
            "host: r\ntrafficPolicy: {outlierDetection: {consecutive5xxErrors: x}}",
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
            "must be an integer",
        ),
        (
            "host: r\ntrafficPolicy: {outlierDetection: {consecutiveGatewayErrors: -3}}",
            "spec.trafficPolicy.outlierDetection.consecutiveGatewayErrors",
            "must not be negative",
        ),
        (
            "host: r\ntrafficPolicy: {outlierDetection: {consecutiveErrors: 3}}",
            "spec.trafficPolicy.outlierDetection.consecutiveErrors",
            "use consecutive5xxErrors",
        ),
        (
            "host: r\ntrafficPolicy: {outlierDetection: {splitExternalLocalOriginErrors: 1}}",
            "spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors",
            "must be a boolean",
        ),
        (
            "host: r\ntrafficPolicy: {portLevelSettings: [{loadBalancer: {simple: RANDOM}}]}",
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "is required",
        ),
        (
            "host: r\ntrafficPolicy: {portLevelSettings: [{port: {number: 70000}}]}",
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "is larger than 65535",
        ),
        (
            "host: r\ntrafficPolicy: {portLevelSettings: [{port: {number: 80}, tunnel: {}}]}",
            "spec.trafficPolicy.portLevelSettings[0].tunnel",
            "unknown field",
        ),
        ("host: r\nsubsets: [{labels: {a: b}}]", "spec.subsets[0].name", "is required"),
        ("host: r\nsubsets: [{name: V_1}]", "spec.subsets[0].name", "DNS-1123 label"),
        ("host: r\nsubsets: [{name: a}, {name: a}]", "spec.subsets[1].name", "defined twice"),
        (
            "host: r\nsubsets: [{name: a, labels: {version: 1}}]",
            "spec.subsets[0].labels.version",
            "must be a string, got a number",
        ),
        (
            "host: r\nsubsets: [{name: a, labels: {app.kubernetes.io/v: 1}}]",
            'spec.subsets[0].labels["app.kubernetes.io/v"]',
            "must be a string",
        ),
        (
            "host: r\nsubsets:\n- name: a\n"
            "  trafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}",
            "spec.subsets[0].trafficPolicy.connectionPool.tcp.maxConnections",
            "must not be negative",
        ),
        ("host: r\nexportTo: [1]", "spec.exportTo[0]", "must be a string"),
    ],
)
def test_every_error_names_its_field(spec: str, path: str, reason: str) -> None:
    parsed = parse_destination_rules(resources(rule_with(spec)))
    assert not parsed.rules
    (error,) = parsed.errors
    assert error.kind == "DestinationRule"
    assert error.key == "default/dr"
    assert error.path == path
    assert reason in error.reason
    assert str(error).startswith(f"DestinationRule default/dr: {path}: ")
    assert error.file == "dr.yaml"


def test_bad_rule_is_left_out_and_the_rest_still_parses() -> None:
    text = "\n---\n".join(
        [
            rule_with("host: a"),
            rule_with("host: b\ntrafficPolicy: {loadBalancer: {simple: NOPE}}").replace(
                "name: dr", "name: bad"
            ),
            rule_with("host: c").replace("name: dr", "name: other"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {}\n",
            rule_with("host: d").replace("networking.istio.io/v1beta1", "networking.istio.io/v2"),
            rule_with("host: e"),
        ]
    )
    parsed = parse_destination_rules(resources(text))
    assert [r.host for r in parsed.rules] == [
        "a.default.svc.cluster.local",
        "c.default.svc.cluster.local",
    ]
    assert [(e.key, e.path, e.index) for e in parsed.errors] == [
        ("default/bad", "spec.trafficPolicy.loadBalancer.simple", 1),
        ("default/dr", "apiVersion", 4),
        ("default/dr", "", 5),
    ]
    assert "duplicate of the one in dr.yaml#0" in parsed.errors[2].reason


# --- merging ---------------------------------------------------------------------------------

MERGE = """
host: r
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  connectionPool: {tcp: {maxConnections: 10}}
  outlierDetection: {consecutive5xxErrors: 7}
  portLevelSettings:
  - port: {number: 8080}
    connectionPool: {http: {http2MaxRequests: 5}}
subsets:
- name: plain
  labels: {version: v1}
- name: lb
  labels: {version: v2}
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
- name: ports
  labels: {version: v3}
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: LEAST_REQUEST}
"""


def test_subset_overrides_only_what_it_sets() -> None:
    rule = parse_one(rule_with(MERGE))
    top = rule.policy()
    assert top.load_balancer.simple is Algorithm.ROUND_ROBIN
    assert top.connection_pool.max_connections == 10
    assert top.outlier_detection is not None
    assert top.outlier_detection.consecutive_5xx_errors == 7

    assert rule.policy("plain") == top
    lb = rule.policy("lb")
    assert lb.load_balancer.simple is Algorithm.RANDOM
    assert lb.connection_pool == top.connection_pool
    assert lb.outlier_detection == top.outlier_detection


def test_port_level_settings_replace_and_do_not_inherit() -> None:
    rule = parse_one(rule_with(MERGE))
    on_port = rule.policy(port=8080)
    assert on_port.connection_pool == ConnectionPoolSettings(max_requests=5)
    assert on_port.load_balancer == LoadBalancerSettings()  # default, not ROUND_ROBIN
    assert on_port.outlier_detection is None
    # Another port: the rule's own settings.
    assert rule.policy(port=80) == rule.policy()
    # A subset without a port-level entry inherits the rule's port-level result.
    lb = rule.policy("lb", port=8080)
    assert lb.load_balancer.simple is Algorithm.RANDOM
    assert lb.connection_pool == ConnectionPoolSettings(max_requests=5)
    assert lb.outlier_detection is None


def test_subset_port_level_settings_replace_everything() -> None:
    rule = parse_one(rule_with(MERGE))
    ports = rule.policy("ports", port=9090)
    assert ports == EffectivePolicy(LoadBalancerSettings(Algorithm.LEAST_REQUEST))
    other = rule.policy("ports", port=1234)
    assert other.load_balancer.simple is Algorithm.ROUND_ROBIN
    assert other.outlier_detection is not None
    assert other.outlier_detection.consecutive_5xx_errors == 2


def test_unknown_subset_raises() -> None:
    rule = parse_one(rule_with(MERGE))
    with pytest.raises(KeyError, match="no subset 'v9'"):
        rule.policy("v9")


def test_subset_endpoints_by_label_match() -> None:
    rule = parse_one(rule_with(MERGE))
    endpoints = [
        Endpoint("a", {"app": "r", "version": "v1"}),
        Endpoint("b", {"app": "r", "version": "v2"}),
        Endpoint("c", {"app": "r"}),
    ]
    assert subset_endpoints(rule.subset("plain"), endpoints) == [endpoints[0]]
    assert subset_endpoints(rule.subset("lb"), endpoints) == [endpoints[1]]
    assert subset_endpoints(rule.subset("ports"), endpoints) == []
    assert subset_endpoints(None, endpoints) == endpoints
    assert subset_endpoints(Subset("all", {}), endpoints) == endpoints


def test_rule_for_host_prefers_exact_then_longest_wildcard_then_oldest() -> None:
    def rule(name: str, host: str, created: str = "") -> DestinationRule:
        return DestinationRule("ns", name, host, created=created)

    rules = [
        rule("star", "*"),
        rule("wide", "*.com"),
        rule("narrow", "*.example.com"),
        rule("new", "api.example.com", "2024-02-01T00:00:00Z"),
        rule("old", "api.example.com", "2024-01-01T00:00:00Z"),
    ]
    assert rule_for_host(rules, "api.example.com").name == "old"  # type: ignore[union-attr]
    assert rule_for_host(rules, "www.example.com").name == "narrow"  # type: ignore[union-attr]
    assert rule_for_host(rules, "x.org").name == "star"  # type: ignore[union-attr]
    assert rule_for_host(rules[1:], "x.org") is None


def test_repeated_port_level_entry_is_noted_and_the_first_wins() -> None:
    spec = """
    host: r
    trafficPolicy:
      portLevelSettings:
      - port: {number: 80}
        loadBalancer: {simple: RANDOM}
      - port: {number: 80}
        loadBalancer: {simple: ROUND_ROBIN}
    """
    parsed = parse_destination_rules(resources(rule_with(spec)))
    assert parsed.rules[0].policy(port=80).load_balancer.simple is Algorithm.RANDOM
    (note,) = parsed.notes
    assert note.path == "spec.trafficPolicy.portLevelSettings[1]"


def test_other_kinds_are_refused_by_the_single_reader() -> None:
    (resource,) = resources("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n")
    rule, errors, _ = parse_destination_rule(resource)
    assert rule is None
    assert [(e.path, e.reason) for e in errors] == [("kind", '"Service" is not DestinationRule')]
