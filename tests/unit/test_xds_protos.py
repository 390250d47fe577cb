"""Wire types for istiod-compatible xDS and CA: field numbers, round trips, regeneration."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, empty_pb2, struct_pb2

from ztagent.xds.gen.envoy.config.core.v3 import base_pb2
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2, discovery_pb2_grpc
from ztagent.xds.gen.google.rpc import status_pb2
from ztagent.xds.gen.istio.security import authorization_pb2 as authz
from ztagent.xds.gen.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ztagent.xds.gen.istio.workload import workload_pb2 as wl

REPO_ROOT = Path(__file__).resolve().parents[2]
GEN_DIR = REPO_ROOT / "ztagent" / "xds" / "gen"

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"


# --- hand-written protobuf wire encoding -------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def f_varint(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def f_len(field: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(field << 3 | 2) + varint(len(data)) + data


def f_packed(field: int, values: list[int]) -> bytes:
    return f_len(field, b"".join(varint(v) for v in values))


def test_varint_helper() -> None:
    assert varint(1) == b"\x01"
    assert varint(300) == b"\xac\x02"
    assert f_varint(20, 1) == b"\xa0\x01\x01"


# --- istio.workload ----------------------------------------------------------------------------

# A Workload with every field we declare, fields in ascending number order (the order protobuf
# serializes them in, so re-encoding must give the same bytes back).
WORKLOAD_WIRE = b"".join(
    [
        f_len(1, "productpage-v1-abc"),  # name
        f_len(2, "bookinfo"),  # namespace
        f_len(3, bytes([10, 0, 0, 7])),  # addresses
        f_len(3, bytes(15) + b"\x01"),
        f_len(4, "net1"),  # network
        f_varint(5, 1),  # tunnel_protocol = HBONE
        f_len(6, "cluster.local"),  # trust_domain
        f_len(7, "bookinfo-productpage"),  # service_account
        f_len(  # waypoint: GatewayAddress{hostname: NamespacedHostname, hbone_mtls_port}
            8,
            f_len(1, f_len(1, "bookinfo") + f_len(2, "waypoint.bookinfo.svc.cluster.local"))
            + f_varint(3, 15008),
        ),
        f_len(9, "node-a"),  # node
        f_len(10, "productpage"),  # canonical_name
        f_len(11, "v1"),  # canonical_revision
        f_varint(12, 2),  # workload_type = POD
        f_len(13, "productpage-v1"),  # workload_name
        f_len(16, "bookinfo/allow-reviews"),  # authorization_policies
        f_varint(17, 1),  # status = UNHEALTHY
        f_len(18, "Kubernetes"),  # cluster_id
        f_len(  # network_gateway: GatewayAddress{address: NetworkAddress}
            19, f_len(2, f_len(1, "net2") + f_len(2, bytes([192, 168, 1, 1]))) + f_varint(3, 15008)
        ),
        f_len(20, "Kubernetes//Pod/bookinfo/productpage-v1-abc"),  # uid
        f_len(21, "productpage.example"),  # hostname
        f_len(  # services: map entry {key, value: PortList{ports: Port}}
            22,
            f_len(1, "bookinfo/productpage.bookinfo.svc.cluster.local")
            + f_len(2, f_len(1, f_varint(1, 9080) + f_varint(2, 9081) + f_varint(3, 1))),
        ),
        f_len(23, f_varint(1, 1) + f_varint(2, 15088)),  # application_tunnel = PROXY
        f_len(24, f_len(1, "us-east1") + f_len(2, "us-east1-b") + f_len(3, "rack7")),  # locality
        f_varint(25, 1),  # network_mode = HOST_NETWORK
    ]
)


def test_workload_field_numbers() -> None:
    w = wl.Workload.FromString(WORKLOAD_WIRE)
    assert w.uid == "Kubernetes//Pod/bookinfo/productpage-v1-abc"
    assert w.name == "productpage-v1-abc"
    assert w.namespace == "bookinfo"
    assert list(w.addresses) == [bytes([10, 0, 0, 7]), bytes(15) + b"\x01"]
    assert w.network == "net1"
    assert w.tunnel_protocol == wl.HBONE
    assert w.trust_domain == "cluster.local"
    assert w.service_account == "bookinfo-productpage"
    assert w.waypoint.WhichOneof("destination") == "hostname"
    assert w.waypoint.hostname.namespace == "bookinfo"
    assert w.waypoint.hostname.hostname == "waypoint.bookinfo.svc.cluster.local"
    assert w.waypoint.hbone_mtls_port == 15008
    assert w.node == "node-a"
    assert w.canonical_name == "productpage"
    assert w.canonical_revision == "v1"
    assert w.workload_type == wl.POD
    assert w.workload_name == "productpage-v1"
    assert list(w.authorization_policies) == ["bookinfo/allow-reviews"]
    assert w.status == wl.UNHEALTHY
    assert w.cluster_id == "Kubernetes"
    assert w.network_gateway.WhichOneof("destination") == "address"
    assert w.network_gateway.address.network == "net2"
    assert w.network_gateway.address.address == bytes([192, 168, 1, 1])
    assert w.hostname == "productpage.example"
    ports = w.services["bookinfo/productpage.bookinfo.svc.cluster.local"].ports
    assert [(p.service_port, p.target_port, p.app_protocol) for p in ports] == [
        (9080, 9081, wl.HTTP11)
    ]
    assert w.application_tunnel.protocol == wl.ApplicationTunnel.PROXY
    assert w.application_tunnel.port == 15088
    assert (w.locality.region, w.locality.zone, w.locality.subzone) == (
        "us-east1",
        "us-east1-b",
        "rack7",
    )
    assert w.network_mode == wl.HOST_NETWORK
    assert w.SerializeToString() == WORKLOAD_WIRE


def test_enum_numbers() -> None:
    assert (wl.NONE, wl.HBONE, wl.LEGACY_ISTIO_MTLS) == (0, 1, 2)
    assert (wl.HEALTHY, wl.UNHEALTHY) == (0, 1)
    assert (wl.DEPLOYMENT, wl.CRONJOB, wl.POD, wl.JOB) == (0, 1, 2, 3)
    assert (wl.STANDARD, wl.HOST_NETWORK) == (0, 1)
    assert (wl.UNKNOWN, wl.HTTP11, wl.HTTP2, wl.GRPC, wl.TCP, wl.TLS) == (0, 1, 2, 3, 4, 5)
    assert (authz.GLOBAL, authz.NAMESPACE, authz.WORKLOAD_SELECTOR) == (0, 1, 2)
    assert (authz.ALLOW, authz.DENY) == (0, 1)


def test_unknown_fields_decode_and_survive() -> None:
    # native_tunnel=14 (bool) and capacity=27 (UInt32Value) are Istio fields we do not declare.
    wire = f_varint(14, 1) + f_len(20, "uid-1") + f_len(27, f_varint(1, 5))
    w = wl.Workload.FromString(wire)
    assert w.uid == "uid-1"
    # Known fields are written first, then the unknown ones as received.
    assert w.SerializeToString() == f_len(20, "uid-1") + f_varint(14, 1) + f_len(27, f_varint(1, 5))


SERVICE_WIRE = b"".join(
    [
        f_len(1, "productpage"),  # name
        f_len(2, "bookinfo"),  # namespace
        f_len(3, "productpage.bookinfo.svc.cluster.local"),  # hostname
        f_len(4, f_len(1, "net1") + f_len(2, bytes([10, 96, 0, 10]))),  # addresses
        f_len(5, f_varint(1, 9080) + f_varint(2, 9080)),  # ports
        f_len(6, "spiffe://cluster.local/ns/bookinfo/sa/productpage"),  # subject_alt_names
        f_len(7, f_len(2, f_len(1, "net1") + f_len(2, bytes([10, 0, 0, 9]))) + f_varint(3, 15008)),
        f_len(8, f_packed(1, [4, 2]) + f_varint(2, 2) + f_varint(3, 1)),  # load_balancing
    ]
)


def test_service_field_numbers() -> None:
    s = wl.Service.FromString(SERVICE_WIRE)
    assert (s.name, s.namespace, s.hostname) == (
        "productpage",
        "bookinfo",
        "productpage.bookinfo.svc.cluster.local",
    )
    assert [(a.network, a.address) for a in s.addresses] == [("net1", bytes([10, 96, 0, 10]))]
    assert [(p.service_port, p.target_port) for p in s.ports] == [(9080, 9080)]
    assert list(s.subject_alt_names) == ["spiffe://cluster.local/ns/bookinfo/sa/productpage"]
    assert s.waypoint.address.address == bytes([10, 0, 0, 9])
    assert s.waypoint.hbone_mtls_port == 15008
    lb = s.load_balancing
    assert list(lb.routing_preference) == [wl.LoadBalancing.NODE, wl.LoadBalancing.ZONE]
    assert lb.mode == wl.LoadBalancing.FAILOVER
    assert lb.health_policy == wl.LoadBalancing.ALLOW_ALL
    assert s.SerializeToString() == SERVICE_WIRE


def test_address_oneof() -> None:
    workload_wire = f_len(1, f_len(20, "uid-1"))
    a = wl.Address.FromString(workload_wire)
    assert a.WhichOneof("type") == "workload"
    assert a.workload.uid == "uid-1"
    assert not a.HasField("service")

    a = wl.Address.FromString(f_len(2, SERVICE_WIRE))
    assert a.WhichOneof("type") == "service"
    assert a.service.hostname == "productpage.bookinfo.svc.cluster.local"

    # Setting one member clears the other.
    a.workload.uid = "uid-1"
    assert a.WhichOneof("type") == "workload"
    assert a.SerializeToString() == workload_wire


def test_address_in_any() -> None:
    packed = any_pb2.Any()
    packed.Pack(wl.Address(workload=wl.Workload(uid="uid-1")))
    assert packed.type_url == ADDRESS_TYPE_URL
    out = wl.Address()
    assert packed.Unpack(out)
    assert out.workload.uid == "uid-1"

    packed.Pack(authz.Authorization(name="p", namespace="ns"))
    assert packed.type_url == AUTHORIZATION_TYPE_URL


# --- istio.security ----------------------------------------------------------------------------


def cidr(address: bytes, length: int) -> bytes:
    return f_len(1, address) + f_varint(2, length)


FD00 = bytes([0xFD]) + bytes(15)

MATCH_WIRE = b"".join(
    [
        f_len(1, f_len(1, "bookinfo")),  # namespaces: exact
        f_len(2, f_len(2, "kube-")),  # not_namespaces: prefix
        f_len(3, f_len(3, "/sa/productpage")),  # principals: suffix
        f_len(4, f_len(4, b"")),  # not_principals: presence
        f_len(5, cidr(bytes([10, 0, 0, 0]), 8)),  # source_ips
        f_len(6, cidr(bytes([10, 1, 0, 0]), 16)),  # not_source_ips
        f_len(7, cidr(FD00, 8)),  # destination_ips
        f_len(8, cidr(bytes([10, 0, 0, 7]), 32)),  # not_destination_ips
        f_packed(9, [9080, 9443]),  # destination_ports
        f_packed(10, [15000]),  # not_destination_ports
        f_len(11, f_len(1, "bookinfo") + f_len(2, "reviews")),  # service_accounts
        f_len(12, f_len(1, "default") + f_len(2, "default")),  # not_service_accounts
    ]
)

AUTHORIZATION_WIRE = b"".join(
    [
        f_len(1, "deny-external"),  # name
        f_len(2, "bookinfo"),  # namespace
        f_varint(3, 2),  # scope = WORKLOAD_SELECTOR
        f_varint(4, 1),  # action = DENY
        # rules: two rules; the first has two clauses (matches are field 2 of Clause).
        f_len(5, f_len(1, f_len(2, MATCH_WIRE)) + f_len(1, f_len(2, f_packed(9, [80])))),
        f_len(5, f_len(1, f_len(2, f_len(1, f_len(1, "other"))))),
        f_varint(6, 1),  # dry_run
    ]
)


def test_authorization_field_numbers() -> None:
    p = authz.Authorization.FromString(AUTHORIZATION_WIRE)
    assert (p.name, p.namespace) == ("deny-external", "bookinfo")
    assert p.scope == authz.WORKLOAD_SELECTOR
    assert p.action == authz.DENY
    assert p.dry_run
    assert len(p.rules) == 2
    first, second = p.rules
    assert len(first.clauses) == 2
    assert list(first.clauses[1].matches[0].destination_ports) == [80]
    assert second.clauses[0].matches[0].namespaces[0].exact == "other"

    m = first.clauses[0].matches[0]
    assert [s.exact for s in m.namespaces] == ["bookinfo"]
    assert [s.prefix for s in m.not_namespaces] == ["kube-"]
    assert [s.suffix for s in m.principals] == ["/sa/productpage"]
    assert [s.WhichOneof("match_type") for s in m.not_principals] == ["presence"]
    assert m.not_principals[0].presence == empty_pb2.Empty()
    assert [(a.address, a.length) for a in m.source_ips] == [(bytes([10, 0, 0, 0]), 8)]
    assert [(a.address, a.length) for a in m.not_source_ips] == [(bytes([10, 1, 0, 0]), 16)]
    assert [(a.address, a.length) for a in m.destination_ips] == [(FD00, 8)]
    assert [(a.address, a.length) for a in m.not_destination_ips] == [(bytes([10, 0, 0, 7]), 32)]
    assert list(m.destination_ports) == [9080, 9443]
    assert list(m.not_destination_ports) == [15000]
    assert [(s.namespace, s.service_account) for s in m.service_accounts] == [
        ("bookinfo", "reviews")
    ]
    assert [(s.namespace, s.service_account) for s in m.not_service_accounts] == [
        ("default", "default")
    ]
    assert p.SerializeToString() == AUTHORIZATION_WIRE


def test_authorization_round_trip() -> None:
    p = authz.Authorization(
        name="allow",
        namespace="istio-system",
        scope=authz.GLOBAL,
        action=authz.ALLOW,
        rules=[
            authz.Rule(
                clauses=[
                    authz.Clause(
                        matches=[
                            authz.Match(
                                principals=[authz.StringMatch(exact="cluster.local/ns/a/sa/b")],
                                source_ips=[authz.Address(address=bytes(4), length=0)],
                            ),
                            authz.Match(namespaces=[authz.StringMatch(presence=empty_pb2.Empty())]),
                        ]
                    ),
                    authz.Clause(matches=[authz.Match(destination_ports=[8080])]),
                ]
            )
        ],
    )
    again = authz.Authorization.FromString(p.SerializeToString())
    assert again == p
    assert again.rules[0].clauses[0].matches[1].namespaces[0].HasField("presence")


# --- istio.v1.auth -----------------------------------------------------------------------------

CSR_PEM = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
IMPERSONATED = "spiffe://cluster.local/ns/bookinfo/sa/reviews"


def test_certificate_request_field_numbers() -> None:
    # metadata: Struct{fields: map entry{key, value: Value{string_value = 3}}}
    metadata = f_len(1, f_len(1, "ImpersonatedIdentity") + f_len(2, f_len(3, IMPERSONATED)))
    wire = f_len(1, CSR_PEM) + f_varint(3, 86400) + f_len(4, metadata)
    req = ca_pb2.IstioCertificateRequest.FromString(wire)
    assert req.csr == CSR_PEM
    assert req.validity_duration == 86400
    assert req.metadata.fields["ImpersonatedIdentity"].string_value == IMPERSONATED
    assert req.SerializeToString() == wire


def test_certificate_request_round_trip() -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"ImpersonatedIdentity": IMPERSONATED})
    req = ca_pb2.IstioCertificateRequest(csr=CSR_PEM, validity_duration=3600, metadata=metadata)
    again = ca_pb2.IstioCertificateRequest.FromString(req.SerializeToString())
    assert again == req
    assert again.metadata["ImpersonatedIdentity"] == IMPERSONATED


def test_certificate_response_field_numbers() -> None:
    wire = f_len(1, "leaf") + f_len(1, "intermediate") + f_len(1, "root")
    resp = ca_pb2.IstioCertificateResponse.FromString(wire)
    assert list(resp.cert_chain) == ["leaf", "intermediate", "root"]
    assert resp.SerializeToString() == wire


# --- envoy.service.discovery.v3 ----------------------------------------------------------------


def test_delta_request_field_numbers() -> None:
    node_metadata = f_len(1, f_len(1, "NODE_NAME") + f_len(2, f_len(3, "node-a")))
    node = (
        f_len(1, "ztunnel~10.0.0.2~ztunnel-x.istio-system~istio-system.svc.cluster.local")
        + f_len(2, "Kubernetes")
        + f_len(3, node_metadata)
    )
    detail = f_len(1, "type.googleapis.com/google.protobuf.Empty")
    status = f_varint(1, 3) + f_len(2, "bad resource") + f_len(3, detail)
    wire = b"".join(
        [
            f_len(1, node),
            f_len(2, ADDRESS_TYPE_URL),
            f_len(3, "uid-1"),
            f_len(4, "uid-2"),
            f_len(5, f_len(1, "uid-3") + f_len(2, "v7")),
            f_len(6, "nonce-1"),
            f_len(7, status),
        ]
    )
    req = discovery_pb2.DeltaDiscoveryRequest.FromString(wire)
    assert req.node.id.startswith("ztunnel~10.0.0.2~")
    assert req.node.cluster == "Kubernetes"
    assert req.node.metadata["NODE_NAME"] == "node-a"
    assert req.type_url == ADDRESS_TYPE_URL
    assert list(req.resource_names_subscribe) == ["uid-1"]
    assert list(req.resource_names_unsubscribe) == ["uid-2"]
    assert dict(req.initial_resource_versions) == {"uid-3": "v7"}
    assert req.response_nonce == "nonce-1"
    assert req.error_detail.code == 3
    assert req.error_detail.message == "bad resource"
    assert req.error_detail.details[0].type_url == "type.googleapis.com/google.protobuf.Empty"
    assert req.SerializeToString() == wire


def test_delta_response_field_numbers() -> None:
    address = f_len(1, f_len(20, "uid-1"))
    resource = f_len(1, "v1") + f_len(2, f_len(1, ADDRESS_TYPE_URL) + f_len(2, address))
    resource += f_len(3, "uid-1")
    wire = b"".join(
        [
            f_len(1, "2024-01-01T00:00:00Z/1"),
            f_len(2, resource),
            f_len(4, ADDRESS_TYPE_URL),
            f_len(5, "nonce-2"),
            f_len(6, "uid-gone"),
        ]
    )
    resp = discovery_pb2.DeltaDiscoveryResponse.FromString(wire)
    assert resp.system_version_info == "2024-01-01T00:00:00Z/1"
    assert resp.type_url == ADDRESS_TYPE_URL
    assert resp.nonce == "nonce-2"
    assert list(resp.removed_resources) == ["uid-gone"]
    (res,) = resp.resources
    assert (res.name, res.version) == ("uid-1", "v1")
    out = wl.Address()
    assert res.resource.Unpack(out)
    assert out.workload.uid == "uid-1"
    assert resp.SerializeToString() == wire


def test_delta_round_trip() -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"NAMESPACE": "istio-system", "INSTANCE_IPS": "10.0.0.2"})
    req = discovery_pb2.DeltaDiscoveryRequest(
        node=base_pb2.Node(id="ztunnel~10.0.0.2~z.istio-system~istio-system.svc.cluster.local"),
        type_url=AUTHORIZATION_TYPE_URL,
        initial_resource_versions={"ns/p": "3"},
        error_detail=status_pb2.Status(code=13, message="boom"),
    )
    req.node.metadata.CopyFrom(metadata)
    assert discovery_pb2.DeltaDiscoveryRequest.FromString(req.SerializeToString()) == req

    res = discovery_pb2.Resource(name="ns/p", version="3")
    res.resource.Pack(authz.Authorization(name="p", namespace="ns"))
    resp = discovery_pb2.DeltaDiscoveryResponse(
        type_url=AUTHORIZATION_TYPE_URL, resources=[res], nonce="n", removed_resources=["ns/q"]
    )
    assert discovery_pb2.DeltaDiscoveryResponse.FromString(resp.SerializeToString()) == resp


# --- packages, services, a real gRPC call ------------------------------------------------------


def test_descriptor_names() -> None:
    assert wl.DESCRIPTOR.package == "istio.workload"
    assert authz.DESCRIPTOR.package == "istio.security"
    assert ca_pb2.DESCRIPTOR.package == "istio.v1.auth"
    assert discovery_pb2.DESCRIPTOR.package == "envoy.service.discovery.v3"
    assert base_pb2.Node.DESCRIPTOR.full_name == "envoy.config.core.v3.Node"
    assert status_pb2.Status.DESCRIPTOR.full_name == "google.rpc.Status"

    ads = discovery_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"]
    assert ads.full_name == "envoy.service.discovery.v3.AggregatedDiscoveryService"
    delta = ads.methods_by_name["DeltaAggregatedResources"]
    assert delta.client_streaming and delta.server_streaming
    ca = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
    assert ca.full_name == "istio.v1.auth.IstioCertificateService"
    create = ca.methods_by_name["CreateCertificate"]
    assert not create.client_streaming and not create.server_streaming


class _CA(ca_pb2_grpc.IstioCertificateServiceServicer):
    def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        who = request.metadata["ImpersonatedIdentity"]
        return ca_pb2.IstioCertificateResponse(cert_chain=[f"leaf for {who}", "root"])


class _ADS(discovery_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def DeltaAggregatedResources(
        self,
        request_iterator: Iterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[discovery_pb2.DeltaDiscoveryResponse]:
        for n, req in enumerate(request_iterator):
            yield discovery_pb2.DeltaDiscoveryResponse(
                type_url=req.type_url, nonce=f"{n}", removed_resources=[req.response_nonce]
            )


def test_grpc_services_over_loopback() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(_CA(), server)
    discovery_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_ADS(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            metadata = struct_pb2.Struct()
            metadata.update({"ImpersonatedIdentity": IMPERSONATED})
            resp = ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=CSR_PEM, metadata=metadata), timeout=10
            )
            assert list(resp.cert_chain) == [f"leaf for {IMPERSONATED}", "root"]

            requests = [
                discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL),
                discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL, response_nonce="0"),
            ]
            stub = discovery_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            responses = list(stub.DeltaAggregatedResources(iter(requests), timeout=10))
            assert [(r.nonce, list(r.removed_resources)) for r in responses] == [
                ("0", [""]),
                ("1", ["0"]),
            ]
    finally:
        server.stop(None)


# --- regeneration ------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_regeneration_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "gen-protos.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    committed = _tree(GEN_DIR)
    regenerated = _tree(out)
    assert sorted(regenerated) == sorted(committed)
    changed = [name for name in committed if committed[name] != regenerated[name]]
    assert not changed, f"scripts/gen-protos.sh changes {changed}; commit the regenerated files"


def test_every_proto_is_generated() -> None:
    protos = sorted((REPO_ROOT / "ztagent" / "xds" / "proto").rglob("*.proto"))
    assert protos
    for proto in protos:
        rel = proto.relative_to(REPO_ROOT / "ztagent" / "xds" / "proto")
        assert (GEN_DIR / rel.parent / f"{rel.stem}_pb2.py").is_file()


@pytest.mark.parametrize(
    "module",
    [
        "ztagent.xds.gen.istio.workload.workload_pb2",
        "ztagent.xds.gen.istio.security.authorization_pb2",
        "ztagent.xds.gen.istio.v1.auth.ca_pb2_grpc",
        "ztagent.xds.gen.envoy.service.discovery.v3.discovery_pb2_grpc",
    ],
)
def test_generated_modules_import_standalone(module: str) -> None:
    # A fresh interpreter: the generated imports resolve inside ztagent.xds.gen only.
    code = f"import {module}"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
