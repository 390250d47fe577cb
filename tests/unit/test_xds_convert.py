"""The model <-> Istio wire messages: golden xDS resources per translation case, round trips,
and the checks the node agent applies to untrusted resources."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf.json_format import MessageToDict

from ztagent.control import read_directory, translate
from ztagent.model.fields import Invalid
from ztagent.xds import convert
from ztagent.xds.gen.istio.security import authorization_pb2 as security_pb
from ztagent.xds.gen.istio.workload import workload_pb2 as workload_pb

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
