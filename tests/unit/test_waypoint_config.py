"""The waypoint's L7 configuration from the objects the control plane serves: parsers run on
decoded JSON dicts, Service port tables and Istio's protocol selection, errors per object."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from ztagent.control.sources import parse_documents
from ztagent.control.xds import waypoint_resources
from ztagent.istio.routing import ServiceRef
from ztagent.model.workload import Workload
from ztagent.waypoint.config import ServicePort, WaypointConfig, build_config, select_protocol

OBJECTS = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  ports:
  - {name: http, port: 9080, targetPort: 8080}
  - {name: grpc-api, port: 9090, targetPort: grpc}
  - {name: metrics, port: 9100, appProtocol: http}
  - {name: db, port: 3306}
  - {name: dns, port: 5353, protocol: UDP}
  - {name: other, port: 7000}
  - {port: 7001, appProtocol: kubernetes.io/h2c}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-get, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: reviews-jwt, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  jwtRules:
  - issuer: https://issuer.example
    jwks: '{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
      "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
      "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}'
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec: {accessLogging: [{providers: [{name: envoy}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""

REVIEWS = "reviews.shop.svc.cluster.local"


def objects(text: str = OBJECTS) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_parsers_run_on_every_object():
    config = build_config(objects())
    assert config.errors == ()
    summary = config.summary()
    assert summary == {
        "virtualServices": ["shop/reviews"],
        "httpRoutes": [],
        "destinationRules": ["shop/reviews"],
        "authorizationPolicies": ["shop/reviews-get"],
        "requestAuthentications": ["shop/reviews-jwt"],
        "telemetry": ["istio-system/mesh-default"],
        "services": [REVIEWS],
        "errors": 0,
    }
    table = config.routes.table(ServiceRef("reviews", "shop", REVIEWS), 9080)
    assert len(table.routes) == 1
    rule = config.destination_rules.rules[0]
    assert rule.host == REVIEWS and rule.subset("v2") is not None
    assert config.authentication.policies[0].rules[0].keys  # inline keys were read
    assert config.authorization.policies[0].targets[0].name == "reviews"


def test_service_ports_and_protocols():
    config = build_config(objects())
    ports = config.services[REVIEWS].ports
    assert ports[9080] == ServicePort(9080, "http", "", 8080)
    assert ports[9090].target_port == "grpc"
    assert {p: config.protocol(REVIEWS, p) for p in ports} == {
        9080: "http",
        9090: "grpc",
        9100: "http",  # appProtocol wins over the name
        3306: "tcp",  # a well-known port with a name Istio does not know
        5353: "udp",
        7000: "unknown",
        7001: "http2",
    }
    assert config.protocol(REVIEWS, 1) == "unknown"
    assert config.protocol("nothing.shop.svc.cluster.local", 9080) == "unknown"


def test_domain_suffix_names_the_services():
    config = build_config(objects(), domain_suffix="corp.example")
    assert set(config.services) == {"reviews.shop.svc.corp.example"}
    assert config.destination_rules.rules[0].host == "reviews.shop.svc.corp.example"


@pytest.mark.parametrize(
    ("name", "app_protocol", "expected"),
    [
        ("http", "", "http"),
        ("http-web", "", "http"),
        ("HTTP2-x", "", "http2"),
        ("grpc", "", "grpc"),
        ("grpc-web", "", "grpc-web"),
        ("grpc-web-ui", "", "grpc-web"),
        ("tcp-db", "", "tcp"),
        ("tls", "", "tls"),
        ("https", "", "https"),
        ("mongo", "", "mongo"),
        ("web", "", "unknown"),
        ("", "", "unknown"),
        ("web", "http", "http"),
        ("http", "tcp", "tcp"),
        ("http", "kubernetes.io/h2c", "http2"),
        ("x", "kubernetes.io/ws", "http"),
        ("x", "kubernetes.io/wss", "https"),
        ("http", "custom.io/thing", "unknown"),  # appProtocol set: the name is not read
        ("x", "grpc-web", "grpc-web"),
    ],
)
def test_protocol_selection(name, app_protocol, expected):
    assert select_protocol(8000, name, app_protocol) == expected


def test_bad_objects_are_errors_and_the_rest_applies():
    text = OBJECTS.replace("weight: 90", "weight: -1").replace("methods: [GET]", "methods: GET")
    bad: list[Any] = [
        *objects(text),
        {"kind": "Service", "metadata": {"name": "x"}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"ports": [{"port": 0}]},
        },
        "not an object",
    ]
    config = build_config(bad)
    found = {(e.kind, e.key, e.path) for e in config.errors}
    assert ("VirtualService", "shop/reviews", "spec.http[0].route[0].weight") in found
    assert ("AuthorizationPolicy", "shop/reviews-get", "spec.rules[0].to[0].operation.methods") in (
        found
    )
    assert ("Service", None, "apiVersion") in found
    assert ("Service", "shop/broken", "spec.ports[0].port") in found
    assert ("", None, "") in found
    assert config.routes.virtual_services == ()
    assert config.authorization.policies == ()
    # The others still apply.
    assert [r.name for r in config.destination_rules.rules] == ["reviews"]
    assert REVIEWS in config.services
    assert all(e.file == "xds" for e in config.errors)


def test_labels_for_subsets_come_from_the_canonical_name_and_revision():
    workload = Workload(
        uid="Kubernetes//Pod/shop/reviews-1",
        name="reviews-1",
        namespace="shop",
        canonical_name="reviews",
        canonical_revision="v2",
    )
    labels = WaypointConfig.empty().labels_for(workload)
    assert labels["app"] == "reviews" and labels["version"] == "v2"
    assert labels["service.istio.io/canonical-revision"] == "v2"
    assert WaypointConfig.empty().protocol(REVIEWS, 9080) == "unknown"


TRAFFIC = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad-weight, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}, weight: -1}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad-timeout, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}], timeout: 1.0005s}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad-port, namespace: shop}
spec:
  hosts: [reviews]
  http: [{match: [{port: "9080"}], route: [{destination: {host: reviews}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: good, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{sourceNamespace: other}]
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad-backoff, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules: [{retry: {backoff: 1.5s}, backendRefs: [{name: reviews, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: good, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bad-interval, namespace: shop}
spec:
  host: reviews
  trafficPolicy: {outlierDetection: {interval: '-1s'}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: good, namespace: shop}
spec:
  host: reviews
  trafficPolicy: {outlierDetection: {interval: 5s}}
"""


def test_control_plane_checks_traffic_objects_with_the_waypoints_parsers():
    """What the control plane refuses to serve is exactly what the waypoint refuses to apply,
    field and reason alike: both read routes and DestinationRules with one parser."""
    batch = parse_documents(TRAFFIC, "traffic.yaml")
    assert batch.errors == ()
    served = waypoint_resources(batch.resources)
    config = build_config(objects(TRAFFIC))

    def verdicts(errors: Any) -> set[tuple[str, str | None, str, str]]:
        return {(e.kind, e.key, e.path, e.reason) for e in errors}

    assert verdicts(served.errors) == verdicts(config.errors)
    assert {key for _, key, _, _ in verdicts(config.errors)} == {
        "shop/bad-weight",
        "shop/bad-timeout",
        "shop/bad-port",
        "shop/bad-backoff",
        "shop/bad-interval",
    }
    assert sorted(served.objects) == sorted(
        f"{kind}/shop/good" for kind in ("VirtualService", "HTTPRoute", "DestinationRule")
    )
    assert [v.name for v in config.routes.virtual_services] == ["good"]
    assert [h.name for h in config.routes.http_routes] == ["good"]
    assert [r.name for r in config.destination_rules.rules] == ["good"]
