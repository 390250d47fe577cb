"""Our CustomResourceDefinitions: valid CRDs with Istio's and the Gateway API's real names,
versions and storage versions, structural schemas, and they accept the Istio objects ztagent's
tests and lab use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DAEMONSET, REPO, render

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

CRDS = DAEMONSET / "crds"
# Example objects: the lab's configuration when present, and the control-plane test inputs
# (except `errors/`, whose objects are wrong on purpose).
EXAMPLE_DIRS = [REPO / "ztagent" / "lab" / "config", REPO / "tests" / "data" / "control"]

NETWORKING_VERSIONS = ["v1", "v1alpha3", "v1beta1"]
SECURITY_VERSIONS = ["v1", "v1beta1"]
GATEWAY_VERSIONS = ["v1", "v1beta1"]
# (group, kind, plural, served versions); every one stores v1, as Istio 1.28+ and the Gateway
# API's standard channel do.
EXPECTED = {
    ("networking.istio.io", "ServiceEntry", "serviceentries", *NETWORKING_VERSIONS),
    ("networking.istio.io", "VirtualService", "virtualservices", *NETWORKING_VERSIONS),
    ("networking.istio.io", "DestinationRule", "destinationrules", *NETWORKING_VERSIONS),
    ("security.istio.io", "AuthorizationPolicy", "authorizationpolicies", *SECURITY_VERSIONS),
    ("security.istio.io", "PeerAuthentication", "peerauthentications", *SECURITY_VERSIONS),
    ("security.istio.io", "RequestAuthentication", "requestauthentications", *SECURITY_VERSIONS),
    ("gateway.networking.k8s.io", "Gateway", "gateways", *GATEWAY_VERSIONS),
    ("gateway.networking.k8s.io", "HTTPRoute", "httproutes", *GATEWAY_VERSIONS),
}

# Example objects the Kubernetes API server would refuse with Istio's own CRDs too (ztagent's
# translator reads them leniently): ours must refuse them as well.
SCHEMA_INVALID_EXAMPLES = {
    # operation.ports is a list of strings in Istio's schema; this one has the integer 8080.
    (
        "tests/data/control/authorization/input/policies.yaml",
        "AuthorizationPolicy",
        "allow-l4",
    ),
}

# Kinds with no object in the example directories yet, written as in Istio's documentation.
EXTRA_EXAMPLES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
    - match:
        - headers: {end-user: {exact: jason}}
      route:
        - destination: {host: reviews, subset: v2}
    - route:
        - destination: {host: reviews, subset: v1, port: {number: 9080}}
          weight: 90
        - destination: {host: reviews, subset: v3}
          weight: 10
      timeout: 2s
      retries: {attempts: 3, perTryTimeout: 1s}
      fault: {delay: {percentage: {value: 10}, fixedDelay: 5s}}
  tcp:
    - match: [{port: 27017}]
      route: [{destination: {host: mongo, port: {number: 5555}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool: {tcp: {maxConnections: 100}}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5m, baseEjectionTime: 15m}
  subsets:
    - name: v1
      labels: {version: v1}
    - name: v2
      labels: {version: v2}
      trafficPolicy:
        loadBalancer: {simple: ROUND_ROBIN}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  targetRefs:
    - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}
  jwtRules:
    - issuer: issuer-foo
      jwksUri: https://example.com/.well-known/jwks.json
      fromHeaders: [{name: x-jwt-assertion, prefix: "Bearer "}]
      forwardOriginalToken: true
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs:
    - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
    - matches: [{path: {type: PathPrefix, value: /v2}}]
      backendRefs: [{name: reviews-v2, port: 9080, weight: 90}]
"""


def _crds() -> list[dict[str, Any]]:
    return [d for d in render(CRDS) if d]


def _schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> openAPIV3Schema."""
    out = {}
    for crd in _crds():
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (spec["group"], version["name"], spec["names"]["kind"])
            out[key] = version["schema"]["openAPIV3Schema"]
    return out


def _examples() -> list[tuple[str, dict[str, Any]]]:
    groups = {g for g, *_ in EXPECTED}
    found: list[tuple[str, dict[str, Any]]] = []
    for root in EXAMPLE_DIRS:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.y*ml")):
            if "errors" in path.parts or path.name == "expected.yaml":
                continue
            for doc in yaml.safe_load_all(path.read_text()):
                if isinstance(doc, dict) and str(doc.get("apiVersion", "")).split("/")[0] in groups:
                    found.append((str(path.relative_to(REPO)), doc))
    found += [("EXTRA_EXAMPLES", d) for d in yaml.safe_load_all(EXTRA_EXAMPLES) if d]
    return found


def _validate(obj: dict[str, Any], schemas: dict[tuple[str, str, str], dict[str, Any]]) -> None:
    group, version = str(obj["apiVersion"]).split("/")
    schema = schemas.get((group, version, obj["kind"]))
    if schema is None:
        raise LookupError(f"no CRD serves {obj['apiVersion']} {obj['kind']}")
    jsonschema.Draft202012Validator(schema).validate(obj)


def _structural_problems(node: dict[str, Any], path: str) -> list[str]:
    """What makes a schema non-structural: a node without a type (unless int-or-string or
    preserve-unknown-fields), or an object without properties that does not keep its fields."""
    problems = []
    if "type" not in node and not (
        node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    ):
        problems.append(f"{path}: no type")
    if (
        node.get("type") == "object"
        and "properties" not in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        problems.append(f"{path}: object that drops every field")
    for name, child in node.get("properties", {}).items():
        problems += _structural_problems(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += _structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _structural_problems(node["additionalProperties"], f"{path}{{}}")
    return problems


def test_crds_are_valid_custom_resource_definitions() -> None:
    crds = _crds()
    seen = set()
    for crd in crds:
        kubernetes_validate.validate(crd, "1.30", strict=True)
        spec = crd["spec"]
        names = spec["names"]
        assert crd["metadata"]["name"] == f"{names['plural']}.{spec['group']}"
        assert spec["scope"] == "Namespaced"
        assert names["listKind"] == names["kind"] + "List"
        versions = spec["versions"]
        assert all(v["served"] for v in versions)
        assert [v["name"] for v in versions if v["storage"]] == ["v1"]
        for version in versions:
            schema = version["schema"]["openAPIV3Schema"]
            assert _structural_problems(schema, f"{names['kind']}/{version['name']}") == []
            assert version["subresources"] == {"status": {}}
        seen.add(
            (spec["group"], names["kind"], names["plural"], *sorted(v["name"] for v in versions))
        )
    assert seen == EXPECTED


def test_crds_accept_the_example_objects() -> None:
    schemas = _schemas()
    examples = _examples()
    kinds = {obj["kind"] for _, obj in examples}
    assert kinds >= {"AuthorizationPolicy", "PeerAuthentication", "ServiceEntry", "Gateway"}
    assert kinds >= {"VirtualService", "DestinationRule", "RequestAuthentication", "HTTPRoute"}
    rejected = set()
    for where, obj in examples:
        key = (where, obj["kind"], obj["metadata"]["name"])
        try:
            _validate(obj, schemas)
        except jsonschema.ValidationError as exc:
            if key not in SCHEMA_INVALID_EXAMPLES:
                pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")
            rejected.add(key)
    assert rejected == set(SCHEMA_INVALID_EXAMPLES)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"spec": {"action": "MAYBE"}}, "unknown action"),
        ({"spec": {"rules": [{"when": [{"values": ["a"]}]}]}}, "condition without key"),
        ({"spec": {"selector": {"matchLabels": {"app": 3}}}}, "label value not a string"),
        ({"apiVersion": "security.istio.io/v1alpha1"}, "version Istio does not serve"),
    ],
)
def test_crds_reject_wrong_objects(change: dict[str, Any], why: str) -> None:
    policy: dict[str, Any] = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "demo"},
        "spec": {"action": "DENY"},
    }
    schemas = _schemas()
    _validate(policy, schemas)  # the unchanged policy is fine
    for key, value in change.items():
        if isinstance(value, dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = value
    with pytest.raises((jsonschema.ValidationError, LookupError)):
        _validate(policy, schemas)


def test_crd_files_are_all_listed() -> None:
    listed = yaml.safe_load((CRDS / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in Path(CRDS).glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
