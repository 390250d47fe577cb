"""The model <-> Istio wire messages: golden xDS resources per translation case, round trips,
and the checks the node agent applies to untrusted resources; the same for the waypoints'
`L7Resource` (one Kubernetes object as JSON) and the control plane's choice of those objects."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf.json_format import MessageToDict

from ztagent.control import parse_documents, read_directory, translate
from ztagent.control.xds import public_jwks, waypoint_resources
from ztagent.fields import Invalid
from ztagent.xds import convert
from ztagent.xds.gen.istio.security import authorization_pb2 as security_pb
from ztagent.xds.gen.istio.workload import workload_pb2 as workload_pb
from ztagent.xds.gen.ztagent.waypoint.v1 import l7_pb2 as l7_pb

DATA = Path(__file__).parent.parent / "data" / "control"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "input").is_dir())


def xds_resources(case: str) -> dict[str, Any]:
    snapshot = translate(read_directory(DATA / case / "input").resources)
    return {
        "addresses": {
            **{
                w.uid: MessageToDict(
                    convert.address_of_workload(w), preserving_proto_field_name=True
                )
                for w in snapshot.workloads
            },
            **{
                s.key: MessageToDict(
                    convert.address_of_service(s), preserving_proto_field_name=True
                )
                for s in snapshot.services
            },
        },
        "authorizations": {
            p.key: MessageToDict(
                convert.authorization_to_proto(p), preserving_proto_field_name=True
            )
            for p in snapshot.policies
        },
    }


@pytest.mark.parametrize("case", CASES)
def test_golden_xds_resources(case):
    """Input YAML -> the Address and Authorization resources served over xDS (proto JSON)."""
    actual = xds_resources(case)
    path = DATA / case / "expected-xds.yaml"
    if os.environ.get("ZTAGENT_UPDATE_GOLDEN") == "1":
        header = "# Expected xDS resources for input/ (proto JSON, bytes in base64)\n"
        path.write_text(header + yaml.safe_dump(actual, sort_keys=True, width=200))
    assert actual == yaml.safe_load(path.read_text())


@pytest.mark.parametrize("case", CASES)
def test_round_trip(case):
    snapshot = translate(read_directory(DATA / case / "input").resources)
    for workload in snapshot.workloads:
        wire = convert.address_of_workload(workload).SerializeToString()
        decoded = convert.address_from_proto(workload_pb.Address.FromString(wire))
        assert decoded == workload
        assert decoded.services == workload.services
    for service in snapshot.services:
        wire = convert.address_of_service(service).SerializeToString()
        decoded = convert.address_from_proto(workload_pb.Address.FromString(wire))
        assert decoded == service
        assert decoded.ports == service.ports
    for policy in snapshot.policies:
        wire = convert.authorization_to_proto(policy).SerializeToString()
        assert (
            convert.authorization_from_proto(security_pb.Authorization.FromString(wire)) == policy
        )


def invalid(message: Any) -> str:
    with pytest.raises(Invalid) as info:
        if isinstance(message, security_pb.Authorization):
            convert.authorization_from_proto(message)
        else:
            convert.address_from_proto(message)
    return f"{info.value.path}: {info.value.reason}"


def test_bad_resources_name_the_field():
    ok = workload_pb.Workload(uid="c//Pod/ns/a", name="a", namespace="ns")
    assert convert.workload_from_proto(ok).uid == "c//Pod/ns/a"

    bad = workload_pb.Workload(uid="u", name="a", namespace="ns", addresses=[b"\x01\x02\x03"])
    assert invalid(workload_pb.Address(workload=bad)) == (
        "addresses[0]: an address is 4 or 16 bytes, got 3"
    )
    assert invalid(workload_pb.Address()) == "type: needs a workload or a service"
    assert invalid(workload_pb.Address(workload=workload_pb.Workload(name="x"))) == (
        "uid: must not be empty"
    )
    bad = workload_pb.Workload(uid="u", name="a", namespace="ns", tunnel_protocol=7)  # type: ignore[arg-type]
    assert invalid(workload_pb.Address(workload=bad)).startswith("tunnel_protocol: unknown")
    bad = workload_pb.Workload(uid="u", namespace="ns", service_account="a/b")
    assert invalid(workload_pb.Address(workload=bad)).startswith("service_account:")
    bad = workload_pb.Workload(uid="u", namespace="ns")
    bad.services["ns/h"].ports.add(service_port=70000, target_port=80)
    assert invalid(workload_pb.Address(workload=bad)) == (
        "services.ns/h.ports[0].service_port: port 70000 is out of range"
    )
    bad = workload_pb.Workload(uid="u", namespace="ns")
    bad.waypoint.hbone_mtls_port = 15008
    assert invalid(workload_pb.Address(workload=bad)) == (
        "waypoint: needs a hostname or an address"
    )
    svc = workload_pb.Service(name="s", namespace="ns")
    assert invalid(workload_pb.Address(service=svc)) == "hostname: must not be empty"

    policy = security_pb.Authorization(name="p", namespace="ns", action=security_pb.DENY)
    match = policy.rules.add().clauses.add().matches.add()
    match.source_ips.add(address=bytes(4), length=33)
    assert invalid(policy) == (
        "rules[0].clauses[0].matches[0].source_ips[0].length: prefix length 33 is too long"
    )
    policy = security_pb.Authorization(name="p", namespace="ns")
    policy.rules.add().clauses.add().matches.add().principals.add()
    assert invalid(policy) == (
        "rules[0].clauses[0].matches[0].principals[0]: needs exact, prefix, suffix or presence"
    )


def test_ipv6_and_gateway_address_round_trip():
    from ztagent.model.workload import GatewayAddress, NetworkAddress, Workload

    workload = Workload(
        uid="u",
        name="a",
        namespace="ns",
        addresses=(ipaddress.ip_address("fd00::5"),),
        workload_type="deployment",  # the proto's zero value
        waypoint=GatewayAddress(address=NetworkAddress("net1", ipaddress.ip_address("10.0.0.9"))),
    )
    wire = convert.address_of_workload(workload).SerializeToString()
    assert convert.address_from_proto(workload_pb.Address.FromString(wire)) == workload


# --- L7 resources --------------------------------------------------------------------------

VIRTUAL_SERVICE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
  labels: {app: reviews}
  annotations: {note: "é"}
  creationTimestamp: 2024-05-06T07:08:09Z
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}, weight: 100}]
"""


def test_golden_l7_resource():
    """The exact message for one object: compact JSON, sorted keys, timestamps as Kubernetes
    writes them (YAML reads this unquoted one as a datetime)."""
    (resource,) = parse_documents(VIRTUAL_SERVICE).resources
    assert isinstance(resource.body["metadata"]["creationTimestamp"], datetime.datetime)
    message = convert.l7_to_proto(resource.body)
    assert MessageToDict(message, preserving_proto_field_name=True) == {
        "api_version": "networking.istio.io/v1",
        "kind": "VirtualService",
        "namespace": "shop",
        "name": "reviews",
        "json": (
            '{"apiVersion":"networking.istio.io/v1","kind":"VirtualService",'
            '"metadata":{"annotations":{"note":"é"},"creationTimestamp":"2024-05-06T07:08:09Z",'
            '"labels":{"app":"reviews"},"name":"reviews","namespace":"shop"},'
            '"spec":{"hosts":["reviews"],"http":[{"route":[{"destination":{"host":"reviews"},'
            '"weight":100}]}]}}'
        ),
    }
    assert convert.l7_name(message.kind, message.namespace, message.name) == (
        "VirtualService/shop/reviews"
    )
    wire = message.SerializeToString(deterministic=True)
    assert wire == convert.l7_to_proto(json.loads(message.json)).SerializeToString(
        deterministic=True
    )


def test_l7_values_json_cannot_hold():
    document = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "x"},
        "data": {
            1: datetime.date(2024, 1, 2),
            "t": datetime.datetime(2024, 1, 2, 3, 4, 5, 600000),
            "b": b"\x00\xff",
            "f": float("inf"),
        },
    }
    decoded = json.loads(convert.l7_to_proto(document).json)
    assert decoded["data"] == {
        "1": "2024-01-02",
        "t": "2024-01-02T03:04:05.600000Z",
        "b": "AP8=",
        "f": "inf",
    }


@pytest.mark.parametrize("case", CASES)
def test_l7_round_trip(case):
    """Every waypoint object of every case: encoded, then decoded to the same JSON object."""
    batch = read_directory(DATA / case / "input")
    selected = waypoint_resources(batch.resources)
    for name, document in selected.objects.items():
        message = l7_pb.L7Resource.FromString(convert.l7_to_proto(document).SerializeToString())
        assert convert.l7_name(message.kind, message.namespace, message.name) == name
        assert convert.l7_from_proto(message) == json.loads(convert.l7_json(document))


def l7_invalid(message: l7_pb.L7Resource) -> str:
    with pytest.raises(Invalid) as info:
        convert.l7_from_proto(message)
    return f"{info.value.path}: {info.value.reason}"


def test_bad_l7_resources_name_the_field():
    good = convert.l7_to_proto(parse_documents(VIRTUAL_SERVICE).resources[0].body)
    assert convert.l7_from_proto(good)["spec"]["hosts"] == ["reviews"]

    def edited(**fields: Any) -> l7_pb.L7Resource:
        message = l7_pb.L7Resource()
        message.CopyFrom(good)
        for key, value in fields.items():
            setattr(message, key, value)
        return message

    assert l7_invalid(edited(kind="")) == "kind: must not be empty"
    assert l7_invalid(edited(name="")) == "name: must not be empty"
    assert l7_invalid(edited(json="{")).startswith("json: not valid JSON")
    assert l7_invalid(edited(json="[]")) == "json: must be a JSON object"
    assert l7_invalid(edited(kind="HTTPRoute")) == ("json.kind: does not match kind 'HTTPRoute'")
    assert l7_invalid(edited(api_version="v1")) == (
        "json.apiVersion: does not match api_version 'v1'"
    )
    assert l7_invalid(edited(name="other")) == ("json.metadata.name: does not match name 'other'")
    assert l7_invalid(edited(namespace="")) == (
        "json.metadata.namespace: does not match namespace ''"
    )
    no_metadata = json.dumps({"apiVersion": good.api_version, "kind": good.kind})
    assert l7_invalid(edited(json=no_metadata)) == "json.metadata: must be an object"


SELECTION = """
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-1, namespace: shop}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: node-agent, namespace: shop}
spec: {selector: {matchLabels: {app: reviews}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: shop}
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: []}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec: {gatewayClassName: istio, listeners: []}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec: {}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec: {host: reviews, trafficPolicy: {loadBalancer: {simple: FASTEST}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: remote, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  jwtRules: [{issuer: https://issuer.example, jwksUri: https://issuer.example/jwks}]
"""


def test_waypoint_selection_and_checks():
    selected = waypoint_resources(parse_documents(SELECTION).resources)
    assert sorted(selected.objects) == [
        "AuthorizationPolicy/shop/waypoint",
        "Gateway/shop/waypoint",
        "Service/default/reviews",
        "Telemetry/istio-system/mesh-default",
    ]
    assert selected.objects["Service/default/reviews"]["metadata"]["namespace"] == "default"
    # A rule the waypoint parser rejects is not served; a RequestAuthentication whose keys
    # cannot be had is served as it is when it has no last good version (fail closed).
    assert selected.rejected["DestinationRule/shop/reviews"] is None
    remote = selected.rejected["RequestAuthentication/shop/remote"]
    assert remote is not None and "jwks" not in remote["spec"]["jwtRules"][0]
    errors = {(e.kind, e.key, e.path): e.reason for e in selected.errors}
    assert set(errors) == {
        ("DestinationRule", "shop/reviews", "spec.trafficPolicy.loadBalancer.simple"),
        ("RequestAuthentication", "shop/remote", "spec.jwtRules[0].jwksUri"),
    }
    assert errors["RequestAuthentication", "shop/remote", "spec.jwtRules[0].jwksUri"] == (
        '"https://issuer.example/jwks": only file:// URIs can be read; use jwks'
    )


RSA_PRIVATE_JWK = {
    "kty": "RSA",
    "kid": "k1",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tS"
        "oc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65"
        "YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyr"
        "dkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzK"
        "nqDKgw"
    ),
    "e": "AQAB",
    "d": "X4cTteJY_gn4FYPsXB8rdXix5vwsg1FLN5E3EaG6RJoVH-HLLKD9M7dx5oo7GURknchnrRweUkC7hT5fJLM0",
}


def test_public_jwks_keeps_only_public_members():
    text = public_jwks(json.dumps({"keys": [RSA_PRIVATE_JWK, "junk"]}).encode())
    (key,) = json.loads(text)["keys"]
    assert sorted(key) == ["e", "kid", "kty", "n"]
    for bad, reason in (
        (b"{", "Jwks is an invalid JSON"),
        (b"{}", "Jwks does not have [keys] field"),
        (b'{"keys": {}}', "[keys] in Jwks is not an array"),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "Jwks doesn't have any valid public key"),
    ):
        with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]")):
            public_jwks(bad)


def test_file_jwks_are_read_and_inlined():
    text = SELECTION.replace("https://issuer.example/jwks", "file:///keys/jwks.json")
    files = {"/keys/jwks.json": json.dumps({"keys": [RSA_PRIVATE_JWK]}).encode()}

    def read_file(path: str) -> bytes:
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[path]

    selected = waypoint_resources(parse_documents(text).resources, read_file=read_file)
    rule = selected.objects["RequestAuthentication/shop/remote"]["spec"]["jwtRules"][0]
    assert rule["jwksUri"] == "file:///keys/jwks.json"
    assert "X4cT" not in rule["jwks"] and json.loads(rule["jwks"])["keys"][0]["kid"] == "k1"

    files.clear()
    selected = waypoint_resources(parse_documents(text).resources, read_file=read_file)
    assert "RequestAuthentication/shop/remote" in selected.rejected
    (error,) = [e for e in selected.errors if e.kind == "RequestAuthentication"]
    assert error.path == "spec.jwtRules[0].jwksUri"
    assert error.reason == "cannot read /keys/jwks.json: No such file or directory"
