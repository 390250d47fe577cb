"""The lab's Kubernetes and Istio objects, read back by the control plane's translator and the
waypoint's own parsers (the same code that serves them in the lab)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
import yaml

from ztagent.control.sources import parse_documents
from ztagent.control.translate import translate_resources
from ztagent.istio.authorization.waypoint import read_authorization_policies
from ztagent.istio.destination import parse_destination_rules
from ztagent.istio.envelope import Resource
from ztagent.istio.jwt import load_jwks, read_request_authentications
from ztagent.istio.routing import Headers, Request, ServiceRef, parse_routes
from ztagent.lab.resources import (
    JWT_AUDIENCE,
    JWT_ISSUER,
    JwtSigner,
    lab_resources,
    scenario_resources,
)
from ztagent.lab.topology import Plan, Settings, make_plan
from ztagent.model.workload import TunnelProtocol


@pytest.fixture(scope="module")
def plan() -> Plan:
    return make_plan(Settings(directory=Path("/tmp/lab")))


@pytest.fixture(scope="module")
def signer() -> JwtSigner:
    return JwtSigner.generate()


def as_resources(files: dict[str, list[dict[str, Any]]]) -> list[Resource]:
    """Through YAML text and the control plane's reader, as `lab up` and `control` do."""
    out: list[Resource] = []
    for name, documents in files.items():
        batch = parse_documents(yaml.safe_dump_all(documents, sort_keys=False), name)
        assert batch.errors == (), batch.errors
        out += batch.resources
    return out


def by_kind(files: dict[str, list[dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for docs in files.values() for d in docs if d["kind"] == kind]


def test_lab_objects_translate_without_errors(plan: Plan) -> None:
    files = lab_resources(plan)
    assert sorted(files) == ["namespaces.yaml", "pods.yaml", "services.yaml", "waypoint.yaml"]
    snapshot = translate_resources(as_resources(files)).snapshot
    assert snapshot.errors == ()
    services = {s.name: s for s in snapshot.services}
    assert sorted(services) == ["echo", "waypoint", "web"]
    waypoint = services["web"].waypoint
    assert waypoint is not None and waypoint.hostname is not None
    assert waypoint.hostname.hostname == "waypoint.demo.svc.cluster.local"
    assert services["echo"].waypoint is None and services["waypoint"].waypoint is None
    assert services["web"].ports == {80: 8080, 9090: 9090}
    workloads = {w.name: w for w in snapshot.workloads}
    assert workloads["b-waypt"].tunnel_protocol == TunnelProtocol.NONE
    assert workloads["b-waypt"].service_account == "waypoint"
    assert workloads["b-web2"].tunnel_protocol == TunnelProtocol.HBONE
    assert workloads["b-web2"].canonical_revision == "v2"
    web_host = "demo/web.demo.svc.cluster.local"
    assert workloads["a-web1"].services[web_host] == {80: 8080, 9090: 9090}
    assert "demo/waypoint.demo.svc.cluster.local" in workloads["b-waypt"].services


def test_gateway_and_services_as_written(plan: Plan) -> None:
    files = lab_resources(plan)
    (gateway,) = by_kind(files, "Gateway")
    assert gateway["metadata"] == {
        "name": "waypoint",
        "namespace": "demo",
        "labels": {"istio.io/waypoint-for": "service"},
    }
    assert gateway["spec"] == {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    }
    services = {s["metadata"]["name"]: s for s in by_kind(files, "Service")}
    assert services["waypoint"]["spec"]["selector"] == {
        "gateway.networking.k8s.io/gateway-name": "waypoint"
    }
    assert services["waypoint"]["spec"]["ports"] == [
        {"name": "mesh", "port": 15008, "targetPort": 15008}
    ]
    web = services["web"]
    assert web["metadata"]["labels"] == {"istio.io/use-waypoint": "waypoint"}
    assert web["spec"]["clusterIP"] == plan.service("web").vip
    assert web["spec"]["ports"][1] == {
        "name": "grpc",
        "port": 9090,
        "targetPort": 9090,
        "appProtocol": "grpc",
    }
    pods = {p["metadata"]["name"]: p for p in by_kind(files, "Pod")}
    assert pods["b-waypt"]["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert pods["b-waypt"]["spec"]["serviceAccountName"] == "waypoint"


@pytest.mark.parametrize("outlier", [False, True])
def test_scenario_objects_parse_cleanly(plan: Plan, signer: JwtSigner, outlier: bool) -> None:
    resources = as_resources(scenario_resources(plan, signer.jwks(), outlier))
    routes = parse_routes(resources)
    rules = parse_destination_rules(resources)
    authorization = read_authorization_policies(resources)
    authn = read_request_authentications(resources)
    for parsed in (routes, rules, authorization, authn):
        assert parsed.errors == ()
    assert len(authorization.policies) == 2 and len(authn.policies) == 1
    (rule,) = rules.rules
    assert rule.name == ("web-outlier" if outlier else "web")
    assert [s.name for s in rule.subsets] == ["v1", "v2"]
    policy = rule.traffic_policy
    assert (policy is not None and policy.outlier_detection is not None) == outlier


def test_routes_choose_as_the_demo_expects(plan: Plan, signer: JwtSigner) -> None:
    resources = as_resources(scenario_resources(plan, signer.jwks(), False))
    table = parse_routes(resources).table(ServiceRef.kubernetes("web", "demo"), 80)

    def route(path: str, headers: dict[str, str] | None = None) -> Any:
        request = Request("GET", path, "10.244.255.2", headers=Headers.of(headers or {}))
        return table.select(request).route

    def subset(path: str, headers: dict[str, str] | None = None) -> str:
        return str(route(path, headers).action.destinations[0].subset)

    assert subset("/flaky", {"x-canary": "v2"}) == "v2"
    assert subset("/flaky/1") == "v1" and route("/flaky/1").retry.attempts == 10
    stable = route("/stable/2").retry
    assert subset("/stable/2") == "v1" and (stable is None or stable.attempts == 0)
    assert subset("/ztlab.Echo/Call") == "v2"
    rng = random.Random(7)
    split = route("/").action
    picks = [split.choose(rng).subset for _ in range(10000)]
    assert 0.08 < picks.count("v2") / len(picks) < 0.12


def test_jwt_signer_tokens(signer: JwtSigner, tmp_path: Path) -> None:
    keys = load_jwks(signer.jwks())
    assert keys is not None
    jwk = json.loads(signer.jwks())["keys"][0]
    public = pyjwt.PyJWK(jwk).key
    claims = pyjwt.decode(signer.mint(), public, algorithms=["ES256"], audience=JWT_AUDIENCE)
    assert claims["iss"] == JWT_ISSUER and claims["sub"] == "lab-user"
    with pytest.raises(pyjwt.ExpiredSignatureError):
        pyjwt.decode(signer.mint(lifetime=-600), public, algorithms=["ES256"], audience="web")
    rogue = JwtSigner.generate()
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt.decode(rogue.mint(), public, algorithms=["ES256"], audience="web")
    again = JwtSigner.from_pem(signer.pem())
    assert again.jwks() == signer.jwks()
