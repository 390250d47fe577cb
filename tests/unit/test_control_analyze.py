"""`ztagent analyze`: offline findings about a directory of Kubernetes/Istio YAML."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest

from ztagent.control.analyze import Finding, analyze, register
from ztagent.control.sources import read_directory
from ztagent.errors import LocalError

BASE = """
apiVersion: v1
kind: Namespace
metadata:
  name: prod
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: api
  namespace: prod
  labels: {app: api, version: v1}
spec:
  nodeName: node-a
status:
  podIP: 10.1.0.5
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: prod
spec:
  selector: {app: api}
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
"""

LEGACY_POD = """
apiVersion: v1
kind: Pod
metadata:
  name: legacy
  namespace: default
  labels: {app: legacy}
status:
  podIP: 10.1.0.9
"""


def write(directory: Path, *documents: str) -> Path:
    directory.mkdir(exist_ok=True)
    text = "\n---\n".join(textwrap.dedent(d).strip() for d in documents)
    (directory / "all.yaml").write_text(text + "\n")
    return directory


def run(tmp_path: Path, *documents: str) -> list[Finding]:
    batch = read_directory(write(tmp_path / "in", *documents))
    return analyze(batch.resources, read_errors=batch.errors)


def codes(findings: list[Finding]) -> list[tuple[str, str, str]]:
    return [(f.level, f.code, f.name) for f in findings]


def test_clean_directory_has_no_findings(tmp_path: Path) -> None:
    assert run(tmp_path, BASE) == []


def test_schema_errors_from_reader_and_translation(tmp_path: Path) -> None:
    findings = run(
        tmp_path,
        BASE,
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: bad, namespace: prod}
        spec:
          action: MAYBE
        """,
        "kind: Pod\nmetadata: {name: x}",
    )
    assert codes(findings) == [
        ("Error", "SchemaError", "bad"),
        ("Error", "SchemaError", ""),
    ]
    bad = findings[0]
    assert (bad.kind, bad.namespace, bad.field, bad.file) == (
        "AuthorizationPolicy",
        "prod",
        "spec.action",
        "all.yaml#3",
    )
    assert str(bad).startswith(
        "Error [SchemaError] (AuthorizationPolicy prod/bad all.yaml#3) spec.action: "
    )
    assert findings[1].field == "apiVersion"
    assert str(findings[1]) == (
        "Error [SchemaError] (Pod all.yaml#4) apiVersion: is required (a non-empty string)"
    )


def test_selector_matches_nothing(tmp_path: Path) -> None:
    findings = run(
        tmp_path,
        BASE,
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: nobody, namespace: prod}
        spec:
          selector: {matchLabels: {app: nope}}
          rules: [{}]
        """,
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: api-only, namespace: prod}
        spec:
          selector: {matchLabels: {app: api}}
          mtls: {mode: PERMISSIVE}
        """,
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: ghost, namespace: prod}
        spec:
          selector: {matchLabels: {app: ghost}}
          mtls: {mode: PERMISSIVE}
        """,
    )
    assert codes(findings) == [
        ("Warning", "SelectorMatchesNothing", "nobody"),
        ("Warning", "SelectorMatchesNothing", "ghost"),
    ]
    assert findings[0].field == "spec.selector"
    assert "namespace prod" in findings[0].message


L7_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: prod}
spec:
  selector: {matchLabels: {app: api}}
  rules:
  - to:
    - operation: {methods: [GET]}
"""


def test_l7_fields_without_waypoint(tmp_path: Path) -> None:
    findings = run(tmp_path, BASE, L7_POLICY)
    assert codes(findings) == [("Warning", "L7PolicyWithoutWaypoint", "get-only")]
    assert findings[0].field == "spec.rules[0]"
    assert "needs a waypoint; the node agent drops/strips it" in findings[0].message
    assert "prod/api" in findings[0].message


def test_l7_fields_with_waypoint_is_only_a_note(tmp_path: Path) -> None:
    with_waypoint = BASE.replace(
        "istio.io/dataplane-mode: ambient",
        "istio.io/dataplane-mode: ambient\n    istio.io/use-waypoint: wp",
    )
    gateway = """
    apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata:
      name: wp
      namespace: prod
      labels: {istio.io/waypoint-for: all}
    spec:
      gatewayClassName: istio-waypoint
      listeners: [{name: mesh, port: 15008, protocol: HBONE}]
    status:
      addresses: [{type: IPAddress, value: 10.96.0.99}]
    """
    findings = run(tmp_path, with_waypoint, gateway, L7_POLICY)
    assert [c for c in codes(findings) if c[1] == "L7PolicyWithoutWaypoint"] == []
    assert ("Info", "TranslationNote", "get-only") in codes(findings)


def test_hosts_that_match_no_service(tmp_path: Path) -> None:
    findings = run(
        tmp_path,
        BASE,
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ext, namespace: prod}
        spec:
          hosts: [api.example.com]
          ports: [{number: 443, name: tls, protocol: TLS}]
          resolution: DNS
        """,
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: good, namespace: prod}
        spec:
          host: api
        """,
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: elsewhere, namespace: default}
        spec:
          host: api
        """,
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs, namespace: default}
        spec:
          hosts: [api.prod, "*.example.com", missing.example.com]
          http:
          - route:
            - destination: {host: api.prod.svc.cluster.local}
              weight: 50
            - destination: {host: nothere}
              weight: 50
        """,
    )
    found = [(f.name, f.field) for f in findings if f.code == "ReferencedHostNotFound"]
    assert found == [
        ("elsewhere", "spec.host"),
        ("vs", "spec.hosts[2]"),
        ("vs", "spec.http[0].route[1].destination.host"),
    ]
    assert all(f.level == "Warning" for f in findings)


def test_subset_labels_match_no_pod(tmp_path: Path) -> None:
    findings = run(
        tmp_path,
        BASE,
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: api, namespace: prod}
        spec:
          host: api.prod.svc.cluster.local
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}}
        """,
    )
    assert codes(findings) == [("Warning", "SubsetMatchesNothing", "api")]
    assert findings[0].field == "spec.subsets[1].labels"
    assert '"v2"' in findings[0].message


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: prod}
spec:
  mtls: {mode: STRICT}
"""


def test_strict_with_non_enrolled_pod(tmp_path: Path) -> None:
    findings = run(tmp_path, BASE, STRICT, LEGACY_POD)
    assert codes(findings) == [("Warning", "StrictMtlsNonEnrolledClient", "strict")]
    assert "prod/api" in findings[0].message
    assert "default/legacy" in findings[0].message


def test_strict_without_non_enrolled_pod(tmp_path: Path) -> None:
    assert run(tmp_path, BASE, STRICT) == []


def test_conflicting_allow_and_deny(tmp_path: Path) -> None:
    policy = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{name: {name}, namespace: prod}}
    spec:
      action: {action}
      rules:
      - from:
        - source: {{namespaces: [other]}}
    """
    findings = run(
        tmp_path,
        BASE,
        policy.format(name="allow-other", action="ALLOW"),
        policy.format(name="deny-other", action="DENY"),
    )
    assert codes(findings) == [("Info", "ConflictingPolicies", "allow-other")]
    assert "prod/deny-other" in findings[0].message


# --- the command --------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ztagent")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def test_command_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = write(tmp_path / "in", BASE)
    assert main(["analyze", str(directory)]) == 0
    assert capsys.readouterr().out.startswith("\u2714 No validation issues found")
    assert main(["analyze", str(directory), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_command_warnings_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = write(tmp_path / "in", BASE, STRICT, LEGACY_POD)
    assert main(["analyze", str(directory)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Warning [StrictMtlsNonEnrolledClient] (PeerAuthentication prod/strict")


def test_command_errors_exit_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = write(tmp_path / "in", BASE, "kind: [broken")
    assert main(["analyze", str(directory)]) == 1
    assert capsys.readouterr().out.startswith("Error [SchemaError] (all.yaml#3) not valid YAML")
    assert main(["analyze", str(directory), "-o", "json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data[0]["level"] == "Error"
    assert data[0]["code"] == "SchemaError"
    assert data[0]["file"] == "all.yaml#3"
    assert set(data[0]) == {
        "level",
        "code",
        "kind",
        "namespace",
        "name",
        "field",
        "message",
        "file",
    }


def test_command_root_namespace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: mesh-wide, namespace: mesh-root}
    spec:
      selector: {matchLabels: {app: api}}
      rules: [{}]
    """
    directory = write(tmp_path / "in", BASE, policy)
    assert main(["analyze", str(directory)]) == 0
    assert "SelectorMatchesNothing" in capsys.readouterr().out
    assert main(["analyze", str(directory), "--root-namespace", "mesh-root"]) == 0
    assert capsys.readouterr().out.startswith("\u2714")


def test_command_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(LocalError):
        main(["analyze", str(tmp_path / "nope")])
