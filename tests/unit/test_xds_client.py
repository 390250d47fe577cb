"""The client's delta ADS state machine, driven in memory: DeltaDiscoveryResponses in, the
requests of a (re)connect and the ACK or NACK of each response out; and the client and the
server's stream wired to each other without a socket."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.any_pb2 import Any as AnyMessage

from ztagent.control import parse_documents, translate
from ztagent.control.xds import build_resources
from ztagent.errors import LocalError
from ztagent.xds.client import INVALID_ARGUMENT, L7_TYPE, MAX_NACK_MESSAGE, TYPES, DeltaClient
from ztagent.xds.connection import node_identity, parse_address
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads
from ztagent.xds.gen.istio.workload import workload_pb2 as workload_pb
from ztagent.xds.stream import ADDRESS_TYPE, AUTHORIZATION_TYPE, Ack, DeltaStream, Nack

CONFIG = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node-b, serviceAccountName: db}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]
"""
WEB = "Kubernetes//Pod/shop/web"
DB = "Kubernetes//Pod/shop/db"
SERVICE = "shop/web.shop.svc.cluster.local"
POLICY = "shop/db-allow-web"
VIRTUAL_SERVICE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "vs", "namespace": "shop"},
    "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}]},
}


def served(text: str = CONFIG, l7: tuple[dict[str, Any], ...] = ()) -> Any:
    return build_resources(translate(parse_documents(text).resources), l7=l7)


RESOURCES = served()


def node() -> Any:
    return node_identity(
        instance_ip="10.0.0.1",
        pod_name="zt-1",
        pod_namespace="ztagent-system",
        node_name="node-a",
        cluster_id="Kubernetes",
    )


def response(
    type_url: str = ADDRESS_TYPE,
    names: tuple[str, ...] | None = None,
    *,
    nonce: str = "1",
    removed: tuple[str, ...] = (),
    table: Any = RESOURCES,
) -> ads.DeltaDiscoveryResponse:
    chosen = table[type_url] if names is None else {n: table[type_url][n] for n in names}
    return ads.DeltaDiscoveryResponse(
        type_url=type_url,
        nonce=nonce,
        resources=[
            ads.Resource(name=r.name, version=r.version, resource=r.body) for r in chosen.values()
        ],
        removed_resources=removed,
    )


def is_ack(reply: ads.DeltaDiscoveryRequest, nonce: str = "1") -> bool:
    return reply.response_nonce == nonce and not reply.HasField("error_detail")


# --- connect -------------------------------------------------------------------------------


def test_connect_subscribes_to_every_type_by_wildcard():
    client = DeltaClient(node())
    requests = client.connect_requests()
    assert [r.type_url for r in requests] == list(TYPES)
    assert all(list(r.resource_names_subscribe) == ["*"] for r in requests)
    assert all(not r.initial_resource_versions and not r.response_nonce for r in requests)


def test_only_the_first_request_carries_the_node():
    first, second = DeltaClient(node()).connect_requests()
    assert first.node.id == "ztunnel~10.0.0.1~zt-1.ztagent-system~ztagent-system.svc.cluster.local"
    assert first.node.metadata["NODE_NAME"] == "node-a"
    assert first.node.metadata["CLUSTER_ID"] == "Kubernetes"
    assert not second.HasField("node")


def test_reconnect_sends_what_it_holds_as_initial_versions():
    client = DeltaClient(node())
    client.receive(response())
    address, policy = client.connect_requests()
    expected = {n: r.version for n, r in RESOURCES[ADDRESS_TYPE].items()}
    assert dict(address.initial_resource_versions) == expected
    assert not policy.initial_resource_versions


def test_a_waypoint_adds_the_l7_type():
    client = DeltaClient(node(), (*TYPES, L7_TYPE))
    assert [r.type_url for r in client.connect_requests()] == [*TYPES, L7_TYPE]


def test_a_type_it_cannot_decode_is_refused():
    with pytest.raises(LocalError, match="cannot decode"):
        DeltaClient(node(), (ADDRESS_TYPE, "type.googleapis.com/envoy.config.cluster.v3.Cluster"))


# --- responses -----------------------------------------------------------------------------


def test_a_good_response_is_acked_and_applied():
    client = DeltaClient(node())
    reply, changed = client.receive(response())
    assert reply.type_url == ADDRESS_TYPE and is_ack(reply) and changed
    snapshot = client.snapshot()
    assert [w.uid for w in snapshot.workloads] == [DB, WEB]
    assert [s.key for s in snapshot.services] == [SERVICE]
    assert client.acks == 1 and client.nacks == 0


def test_the_same_resources_again_change_nothing():
    client = DeltaClient(node())
    client.receive(response())
    reply, changed = client.receive(response(nonce="2"))
    assert is_ack(reply, "2") and not changed


def test_a_removal_applies():
    client = DeltaClient(node())
    client.receive(response())
    reply, changed = client.receive(response(names=(), removed=(DB,), nonce="2"))
    assert is_ack(reply, "2") and changed
    assert [w.uid for w in client.snapshot().workloads] == [WEB]
    assert DB not in client.versions(ADDRESS_TYPE)


def test_removing_what_it_does_not_hold_changes_nothing():
    client = DeltaClient(node())
    client.receive(response())
    _, changed = client.receive(response(names=(), removed=("shop/nothing",), nonce="2"))
    assert not changed


def test_policies_apply_to_the_snapshot():
    client = DeltaClient(node())
    reply, changed = client.receive(response(AUTHORIZATION_TYPE))
    assert is_ack(reply) and changed
    assert [p.key for p in client.snapshot().policies] == [POLICY]


def test_a_resource_of_the_wrong_type_is_nacked_and_the_others_apply():
    client = DeltaClient(node())
    bad = response()
    bad.resources[0].resource.type_url = AUTHORIZATION_TYPE
    reply, changed = client.receive(bad)
    assert reply.response_nonce == "1" and reply.error_detail.code == INVALID_ARGUMENT
    assert bad.resources[0].name in reply.error_detail.message
    assert "resource" in reply.error_detail.message
    assert changed and len(client.versions(ADDRESS_TYPE)) == 2
    assert client.nacks == 1 and client.acks == 0


def test_bytes_that_do_not_decode_are_nacked():
    client = DeltaClient(node())
    garbage = ads.DeltaDiscoveryResponse(
        type_url=ADDRESS_TYPE,
        nonce="1",
        resources=[
            ads.Resource(
                name=WEB, version="1", resource=AnyMessage(type_url=ADDRESS_TYPE, value=b"\xff")
            )
        ],
    )
    reply, changed = client.receive(garbage)
    assert f"{WEB}: not a valid message" in reply.error_detail.message and not changed


def test_a_name_that_does_not_match_its_resource_is_nacked():
    client = DeltaClient(node())
    wrong = response(names=(WEB,))
    wrong.resources[0].name = DB
    reply, changed = client.receive(wrong)
    assert reply.error_detail.code == INVALID_ARGUMENT
    assert f"{DB}: name:" in reply.error_detail.message and not changed
    assert client.versions(ADDRESS_TYPE) == {}


def test_a_rejected_update_keeps_the_last_good_version():
    client = DeltaClient(node())
    client.receive(response(names=(WEB,)))
    good = client.versions(ADDRESS_TYPE)[WEB]
    update = response(names=(WEB,), nonce="2")
    update.resources[0].version = "new"
    update.resources[0].resource.value = workload_pb.Address(
        workload=workload_pb.Workload(uid=WEB, name="web", namespace="shop", addresses=[b"\x01"])
    ).SerializeToString()
    reply, _ = client.receive(update)
    assert reply.HasField("error_detail") and reply.response_nonce == "2"
    assert client.versions(ADDRESS_TYPE) == {WEB: good}


def test_the_nack_reason_is_bounded():
    client = DeltaClient(node())
    bad = ads.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE, nonce="1")
    for i in range(500):
        bad.resources.add(
            name=f"shop/{i}", version="1", resource=AnyMessage(type_url="x", value=b"")
        )
    reply, _ = client.receive(bad)
    assert len(reply.error_detail.message) == MAX_NACK_MESSAGE


def test_a_response_of_a_type_not_subscribed_is_nacked():
    client = DeltaClient(node())
    reply, changed = client.receive(response(L7_TYPE, table=served(l7=(VIRTUAL_SERVICE,))))
    assert reply.error_detail.code == INVALID_ARGUMENT and not changed
    assert "was not subscribed" in reply.error_detail.message
    assert not client.answered(L7_TYPE)


def test_synced_once_every_type_had_a_response():
    client = DeltaClient(node())
    assert not client.synced
    client.receive(ads.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE, nonce="1"))
    assert client.answered(ADDRESS_TYPE) and not client.synced
    client.receive(ads.DeltaDiscoveryResponse(type_url=AUTHORIZATION_TYPE, nonce="2"))
    assert client.synced


def test_l7_objects_are_decoded_in_name_order():
    table = served(
        l7=(VIRTUAL_SERVICE, {**VIRTUAL_SERVICE, "metadata": {"name": "a", "namespace": "shop"}})
    )
    client = DeltaClient(node(), (*TYPES, L7_TYPE))
    reply, changed = client.receive(response(L7_TYPE, table=table))
    assert is_ack(reply) and changed
    objects = client.l7_objects()
    assert [o["metadata"]["name"] for o in objects] == ["a", "vs"]
    assert objects[1] == VIRTUAL_SERVICE
    assert client.snapshot().workloads == ()


# --- client and server stream together ------------------------------------------------------


def exchange(client: DeltaClient, stream: DeltaStream, table: Any) -> list[Any]:
    """Feed the client's requests to the stream and the stream's responses back until quiet;
    returns the server's events."""
    events: list[Any] = []
    requests = client.connect_requests()
    for _ in range(20):
        if not requests:
            return events
        responses = []
        for req in requests:
            out, happened = stream.receive(req, table)
            responses.extend(out)
            events.extend(happened)
        requests = [client.receive(r)[0] for r in responses]
    raise AssertionError("no quiet")


def test_client_and_stream_sync_and_ack():
    client, stream = DeltaClient(node()), DeltaStream()
    events = exchange(client, stream, RESOURCES)
    assert client.synced and {type(e) for e in events} == {Ack} and len(events) == 2
    assert stream.node_id == node().id
    assert client.versions(ADDRESS_TYPE) == stream.known(ADDRESS_TYPE)


def test_a_reconnect_resends_nothing_the_client_holds():
    client = DeltaClient(node())
    exchange(client, DeltaStream(), RESOURCES)
    again = DeltaStream()
    responses = []
    for req in client.connect_requests():
        out, _ = again.receive(req, RESOURCES)
        responses.extend(out)
    assert len(responses) == 2 and all(not r.resources for r in responses)


def test_a_push_the_client_rejects_comes_back_as_a_nack():
    client, stream = DeltaClient(node()), DeltaStream()
    exchange(client, stream, RESOURCES)
    changed = served(CONFIG.replace("podIP: 10.244.2.10", "podIP: 10.244.2.11"))
    (push,) = stream.push(changed)
    push.resources[0].resource.type_url = "wrong"
    reply, _ = client.receive(push)
    _, (event,) = stream.receive(reply, changed)
    assert isinstance(event, Nack) and event.names == (DB,) and DB in event.message


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("https://istiod.istio-system.svc:15012", "istiod.istio-system.svc:15012"),
        ("istiod:15012/", "istiod:15012"),
        ("grpcs://[::1]:15012", "[::1]:15012"),
    ],
)
def test_parse_address(text, target):
    assert parse_address(text, "--xds-address") == target


@pytest.mark.parametrize("text", ["http://istiod:15010", "istiod", "https://istiod:port"])
def test_parse_address_refuses(text):
    with pytest.raises(LocalError, match="--xds-address"):
        parse_address(text, "--xds-address")
