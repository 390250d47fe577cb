"""The server's delta ADS stream state machine, driven in memory: DeltaDiscoveryRequests in,
DeltaDiscoveryResponses and events out (subscriptions, wildcard, ACK/NACK, nonces, pushes,
removals, reconnects with `initial_resource_versions`, and the caps a hostile client meets)."""

from __future__ import annotations

from typing import Any

import pytest

from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads
from ztagent.xds.gen.istio.workload import workload_pb2 as workload_pb
from ztagent.xds.stream import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    L7_TYPE,
    MAX_NAME_LENGTH,
    MAX_NODE_ID_LENGTH,
    MAX_PENDING,
    MAX_SHOWN_NACK,
    MAX_SUBSCRIBED_NAMES,
    Ack,
    DeltaStream,
    Nack,
    StreamRefused,
    Unknown,
    VersionedResource,
    versioned,
)

UNSERVED = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def service(name: str, port: int = 80) -> VersionedResource:
    message = workload_pb.Address(
        service=workload_pb.Service(
            name=name.split("/")[-1],
            namespace="shop",
            hostname=f"{name}.shop.svc.cluster.local",
            ports=[workload_pb.Port(service_port=port, target_port=port)],
        )
    )
    return versioned(name, message, ADDRESS_TYPE)


def resources(*items: VersionedResource, type_url: str = ADDRESS_TYPE) -> dict[str, Any]:
    return {type_url: {r.name: r for r in items}}


def request(type_url: str = ADDRESS_TYPE, **fields: Any) -> ads.DeltaDiscoveryRequest:
    return ads.DeltaDiscoveryRequest(type_url=type_url, **fields)


def names(response: ads.DeltaDiscoveryResponse) -> list[str]:
    return [r.name for r in response.resources]


A, B, C = service("a"), service("b"), service("c")
ABC = resources(A, B, C)


def one(stream: DeltaStream, req: ads.DeltaDiscoveryRequest, table: Any = ABC) -> Any:
    responses, events = stream.receive(req, table)
    assert len(responses) == 1, responses
    return responses[0], events


# --- subscriptions -----------------------------------------------------------------------


def test_empty_first_subscription_is_a_wildcard():
    stream = DeltaStream()
    response, events = one(stream, request())
    assert response.type_url == ADDRESS_TYPE
    assert names(response) == ["a", "b", "c"]
    assert not response.removed_resources and response.nonce and events == []
    assert stream.subscribed(ADDRESS_TYPE) == (True, frozenset())


def test_star_is_a_wildcard():
    stream = DeltaStream()
    response, _ = one(stream, request(resource_names_subscribe=["*"]))
    assert names(response) == ["a", "b", "c"]
    assert stream.subscribed(ADDRESS_TYPE)[0]


def test_resources_carry_their_version_and_body():
    response, _ = one(DeltaStream(), request())
    first = response.resources[0]
    assert first.version == A.version and first.resource == A.body
    assert first.resource.type_url == ADDRESS_TYPE


def test_first_request_is_answered_even_with_nothing():
    stream = DeltaStream()
    response, _ = one(stream, request(AUTHORIZATION_TYPE), ABC)
    assert response.type_url == AUTHORIZATION_TYPE
    assert not response.resources and not response.removed_resources and response.nonce


def test_subscribe_by_name_gets_only_those_names():
    stream = DeltaStream()
    response, _ = one(stream, request(resource_names_subscribe=["b", "missing"]))
    assert names(response) == ["b"]
    assert stream.subscribed(ADDRESS_TYPE) == (False, frozenset({"b", "missing"}))


def test_a_repeated_request_gets_no_response():
    stream = DeltaStream()
    one(stream, request(resource_names_subscribe=["a"]))
    assert stream.receive(request(resource_names_subscribe=["a"]), ABC) == ([], [])


def test_a_later_subscription_gets_just_the_new_names():
    stream = DeltaStream()
    one(stream, request(resource_names_subscribe=["a"]))
    response, _ = one(stream, request(resource_names_subscribe=["c"]))
    assert names(response) == ["c"]


def test_a_name_subscribed_before_it_exists_is_pushed_when_it_appears():
    stream = DeltaStream()
    response, _ = one(stream, request(resource_names_subscribe=["d"]))
    assert not response.resources
    assert stream.push(ABC) == []
    d = service("d")
    (pushed,) = stream.push(resources(A, d))
    assert names(pushed) == ["d"]


def test_unsubscribe_forgets_the_name_without_a_removal():
    stream = DeltaStream()
    one(stream, request(resource_names_subscribe=["a", "b"]))
    assert stream.receive(request(resource_names_unsubscribe=["a"]), ABC) == ([], [])
    assert set(stream.known(ADDRESS_TYPE)) == {"b"}
    # A change to the unsubscribed resource is not pushed.
    assert stream.push(resources(service("a", 81), B, C)) == []


def test_unsubscribing_the_wildcard_removes_what_is_not_named():
    stream = DeltaStream()
    one(stream, request(resource_names_subscribe=["*", "a"]))
    response, _ = one(stream, request(resource_names_unsubscribe=["*"]))
    assert not response.resources and list(response.removed_resources) == ["b", "c"]
    assert stream.subscribed(ADDRESS_TYPE) == (False, frozenset({"a"}))


def test_a_later_star_turns_a_named_subscription_into_a_wildcard():
    stream = DeltaStream()
    one(stream, request(resource_names_subscribe=["a"]))
    response, _ = one(stream, request(resource_names_subscribe=["*"]))
    assert names(response) == ["b", "c"]


def test_types_are_independent():
    stream = DeltaStream()
    table = {**ABC, **resources(service("p"), type_url=AUTHORIZATION_TYPE)}
    one(stream, request(), table)
    response, _ = one(stream, request(AUTHORIZATION_TYPE), table)
    assert response.type_url == AUTHORIZATION_TYPE and names(response) == ["p"]
    assert set(stream.known(ADDRESS_TYPE)) == {"a", "b", "c"}


def test_an_unserved_type_is_reported_and_not_answered():
    stream = DeltaStream()
    assert stream.receive(request(UNSERVED), ABC) == ([], [Unknown(UNSERVED)])
    assert stream.known(UNSERVED) == {}


def test_served_types_are_chosen_by_the_caller():
    stream = DeltaStream(types=(ADDRESS_TYPE,))
    assert stream.receive(request(L7_TYPE), ABC) == ([], [Unknown(L7_TYPE)])


def test_the_node_id_is_kept_from_the_first_request():
    stream = DeltaStream()
    req = request()
    req.node.id = "ztunnel~10.0.0.1~zt-1.ztagent-system~ztagent-system.svc.cluster.local"
    one(stream, req)
    one(stream, request(AUTHORIZATION_TYPE))
    assert stream.node_id.startswith("ztunnel~10.0.0.1~")


# --- ACK, NACK and nonces ----------------------------------------------------------------


def test_ack_is_reported_with_its_nonce():
    stream = DeltaStream()
    response, _ = one(stream, request())
    assert stream.pending == 1
    replies, events = stream.receive(request(response_nonce=response.nonce), ABC)
    assert replies == [] and events == [Ack(ADDRESS_TYPE, response.nonce)]
    assert stream.acks == 1 and stream.nacks == 0 and stream.pending == 0


def test_nack_names_the_resources_of_that_response():
    stream = DeltaStream()
    response, _ = one(stream, request())
    nack = request(response_nonce=response.nonce, error_detail={"code": 3, "message": "b: bad"})
    replies, events = stream.receive(nack, ABC)
    assert replies == []
    assert events == [Nack(ADDRESS_TYPE, response.nonce, "b: bad", ("a", "b", "c"), 6)]
    assert stream.nacks == 1 and stream.acks == 0


def test_nacked_resources_are_not_resent_until_they_change():
    stream = DeltaStream()
    response, _ = one(stream, request())
    stream.receive(request(response_nonce=response.nonce, error_detail={"code": 3}), ABC)
    assert stream.push(ABC) == []
    (pushed,) = stream.push(resources(A, service("b", 8080), C))
    assert names(pushed) == ["b"]


def test_nack_without_a_message_says_so():
    stream = DeltaStream()
    response, _ = one(stream, request())
    _, (event,) = stream.receive(
        request(response_nonce=response.nonce, error_detail={"code": 13}), ABC
    )
    assert isinstance(event, Nack) and event.shown == "(no reason given)"


def test_a_long_nack_reason_is_cut_with_its_length():
    stream = DeltaStream()
    response, _ = one(stream, request())
    reason = "x" * (4 * 1024 * 1024)
    _, (event,) = stream.receive(
        request(response_nonce=response.nonce, error_detail={"code": 3, "message": reason}), ABC
    )
    assert isinstance(event, Nack)
    assert len(event.message) == MAX_SHOWN_NACK and event.length == len(reason)
    assert event.shown.endswith(f"... ({len(reason)} characters)")
    assert len(event.shown) < MAX_SHOWN_NACK + 40


def test_a_nack_of_an_unknown_nonce_names_no_resources():
    stream = DeltaStream()
    one(stream, request())
    _, events = stream.receive(request(response_nonce="ffff", error_detail={"message": "?"}), ABC)
    assert events == [Nack(ADDRESS_TYPE, "ffff", "?", (), 1)]


def test_every_response_has_a_fresh_nonce():
    stream = DeltaStream()
    first, _ = one(stream, request())
    second, _ = one(stream, request(AUTHORIZATION_TYPE))
    (third,) = stream.push(resources(service("a", 81), B, C))
    assert len({first.nonce, second.nonce, third.nonce}) == 3
    assert stream.pending == 3  # responses may be in flight together


def test_responses_never_acked_are_remembered_up_to_a_cap():
    stream = DeltaStream()
    one(stream, request())
    for port in range(MAX_PENDING * 2):
        stream.push(resources(service("a", 1000 + port)))
    assert stream.pending == MAX_PENDING


# --- pushes and removals -----------------------------------------------------------------


def test_push_sends_only_what_changed():
    stream = DeltaStream()
    one(stream, request())
    assert stream.push(ABC) == []
    (pushed,) = stream.push(resources(A, service("b", 9090), C))
    assert names(pushed) == ["b"] and pushed.resources[0].version != B.version


def test_push_removes_what_is_gone():
    stream = DeltaStream()
    one(stream, request())
    (pushed,) = stream.push(resources(A, C))
    assert not pushed.resources and list(pushed.removed_resources) == ["b"]
    assert set(stream.known(ADDRESS_TYPE)) == {"a", "c"}


def test_push_to_a_named_subscription_ignores_other_names():
    stream = DeltaStream()
    one(stream, request(resource_names_subscribe=["a"]))
    assert stream.push(resources(A, service("b", 1), C, service("d"))) == []


def test_push_skips_types_never_requested():
    stream = DeltaStream()
    one(stream, request())
    table = {**ABC, **resources(service("p"), type_url=AUTHORIZATION_TYPE)}
    assert stream.push(table) == []


# --- reconnects --------------------------------------------------------------------------


def test_reconnect_with_initial_versions_gets_only_the_difference():
    stream = DeltaStream()
    held = {"a": A.version, "b": "stale", "gone": "1"}
    response, _ = one(stream, request(initial_resource_versions=held))
    assert names(response) == ["b", "c"]
    assert list(response.removed_resources) == ["gone"]
    assert stream.known(ADDRESS_TYPE) == {"a": A.version, "b": B.version, "c": C.version}


def test_reconnect_holding_everything_gets_an_empty_answer():
    stream = DeltaStream()
    held = {r.name: r.version for r in (A, B, C)}
    response, _ = one(stream, request(initial_resource_versions=held))
    assert not response.resources and not response.removed_resources


def test_initial_versions_outside_a_named_view_are_removed():
    stream = DeltaStream()
    held = {"a": A.version, "b": B.version}
    response, _ = one(
        stream, request(resource_names_subscribe=["a"], initial_resource_versions=held)
    )
    assert not response.resources and list(response.removed_resources) == ["b"]


def test_initial_versions_are_read_only_on_the_first_request():
    stream = DeltaStream()
    one(stream, request())
    assert stream.receive(request(initial_resource_versions={"x": "1"}), ABC) == ([], [])
    assert "x" not in stream.known(ADDRESS_TYPE)


# --- caps ---------------------------------------------------------------------------------


def test_one_request_over_the_name_cap_is_refused_and_not_applied():
    stream = DeltaStream()
    many = [f"n{i}" for i in range(MAX_SUBSCRIBED_NAMES + 10)]
    with pytest.raises(StreamRefused) as refused:
        stream.receive(request(resource_names_subscribe=many), ABC)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert str(MAX_SUBSCRIBED_NAMES) in refused.value.details
    assert stream.subscribed_names == 0 and stream.known(ADDRESS_TYPE) == {}


def test_names_adding_up_over_the_cap_are_refused():
    stream = DeltaStream()
    half = MAX_SUBSCRIBED_NAMES // 2
    one(stream, request(resource_names_subscribe=[f"x{i}" for i in range(half)]))
    one(
        stream, request(AUTHORIZATION_TYPE, resource_names_subscribe=[f"y{i}" for i in range(half)])
    )
    assert stream.subscribed_names == MAX_SUBSCRIBED_NAMES
    with pytest.raises(StreamRefused, match="RESOURCE_EXHAUSTED"):
        stream.receive(request(resource_names_subscribe=["one-more"]), ABC)
    assert stream.subscribed_names == MAX_SUBSCRIBED_NAMES


def test_resubscribing_and_unsubscribing_do_not_use_up_the_cap():
    stream = DeltaStream()
    full = [f"x{i}" for i in range(MAX_SUBSCRIBED_NAMES)]
    one(stream, request(resource_names_subscribe=full))
    assert stream.receive(request(resource_names_subscribe=full[:100]), ABC) == ([], [])
    stream.receive(request(resource_names_unsubscribe=full[:10]), ABC)
    stream.receive(request(resource_names_subscribe=[f"z{i}" for i in range(10)]), ABC)
    assert stream.subscribed_names == MAX_SUBSCRIBED_NAMES


def test_an_overlong_name_is_refused():
    stream = DeltaStream()
    with pytest.raises(StreamRefused) as refused:
        stream.receive(request(resource_names_subscribe=["a" * (MAX_NAME_LENGTH + 1)]), ABC)
    assert refused.value.code == "INVALID_ARGUMENT"
    name = "a" * MAX_NAME_LENGTH  # at the cap: accepted
    one(stream, request(resource_names_subscribe=[name]))


def test_an_overlong_node_id_is_refused():
    req = request()
    req.node.id = "n" * (MAX_NODE_ID_LENGTH + 1)
    with pytest.raises(StreamRefused, match="INVALID_ARGUMENT: node id"):
        DeltaStream().receive(req, ABC)


# --- versions ------------------------------------------------------------------------------


def test_versions_are_digests_of_the_bytes():
    assert service("a").version == A.version
    assert service("a", 81).version != A.version
    assert service("b").version != A.version
