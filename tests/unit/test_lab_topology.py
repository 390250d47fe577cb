"""The lab's plan: pods, addresses, names and Services, as pure data."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztagent.lab.topology import (
    LABEL_DATAPLANE_MODE,
    LABEL_GATEWAY_NAME,
    LABEL_USE_WAYPOINT,
    MAX_IFNAME,
    LabError,
    Plan,
    Settings,
    make_plan,
)
from ztagent.names import HBONE_PORT


def plan(prefix: str = "ztlab-") -> Plan:
    return make_plan(Settings(prefix=prefix, directory=Path("/tmp/lab")))


def test_existing_pods_keep_their_addresses_and_new_ones_follow() -> None:
    p = plan()
    assert {pod.key: pod.ip for pod in p.pods} == {
        "a-sleep": "10.244.1.10",
        "a-echo": "10.244.1.11",
        "a-legacy": "10.244.1.12",
        "a-web1": "10.244.1.13",
        "b-echo": "10.244.2.10",
        "b-legacy": "10.244.2.11",
        "b-web1": "10.244.2.12",
        "b-web2": "10.244.2.13",
        "b-waypt": "10.244.2.14",
    }
    assert [pod.node for pod in p.pods if pod.key.startswith("b-")] == ["node-b"] * 5


def test_every_name_fits_an_interface_name() -> None:
    p = plan()
    for pod in p.pods:
        assert pod.host_veth == f"ztlab-{pod.key}" and len(pod.host_veth) <= MAX_IFNAME
        assert len(pod.key) <= 9
    with pytest.raises(LabError, match="longer than 15"):
        plan("abcdefgh")


def test_web_pods_carry_app_and_version() -> None:
    p = plan()
    web = {pod.key: pod for pod in p.pods if pod.app == "web"}
    assert sorted(web) == ["a-web1", "b-web1", "b-web2"]
    assert {k: pod.labels for k, pod in web.items()} == {
        "a-web1": {"app": "web", "version": "v1"},
        "b-web1": {"app": "web", "version": "v1"},
        "b-web2": {"app": "web", "version": "v2"},
    }
    assert all(pod.grpc and pod.enrolled and pod.namespace == "demo" for pod in web.values())
    assert p.pod("a-echo").labels == {"app": "echo", "version": "v1"}
    assert not p.pod("a-echo").grpc


def test_the_waypoint_pod_is_not_captured_and_runs_no_app() -> None:
    p = plan()
    waypoint = p.waypoint
    assert waypoint.key == "b-waypt" and waypoint.node == "node-b"
    assert waypoint.namespace == "demo" and waypoint.service_account == "waypoint"
    assert waypoint.identity == "spiffe://cluster.local/ns/demo/sa/waypoint"
    assert waypoint.labels == {LABEL_GATEWAY_NAME: "waypoint", LABEL_DATAPLANE_MODE: "none"}
    assert not waypoint.enrolled
    assert waypoint not in p.app_pods and len(p.app_pods) == len(p.pods) - 1
    assert waypoint.hbone == (waypoint.ip, HBONE_PORT)
    assert (waypoint.admin[1], waypoint.metrics[1], waypoint.readiness[1]) == (15000, 15020, 15021)
    assert p.token_path("b-waypt") == Path("/tmp/lab/tokens/b-waypt.token")
    assert p.pod("a-sleep").service_account == "sleep"


def test_services_each_have_their_own_vip() -> None:
    p = plan()
    assert [(s.name, s.vip) for s in p.services] == [
        ("echo", "10.244.255.1"),
        ("web", "10.244.255.2"),
        ("waypoint", "10.244.255.3"),
    ]
    assert p.service_vip == "10.244.255.1"
    web = p.service("web")
    assert web.hostname == "web.demo.svc.cluster.local"
    assert (web.port("http"), web.port("grpc")) == (80, 9090)
    assert dict(web.labels) == {LABEL_USE_WAYPOINT: "waypoint"}
    assert [(x.name, x.port, x.target, x.app_protocol) for x in web.ports] == [
        ("http", 80, 8080, ""),
        ("grpc", 9090, 9090, "grpc"),
    ]
    assert p.service("waypoint").hostname == "waypoint.demo.svc.cluster.local"
    with pytest.raises(LabError):
        p.service("nope")
    with pytest.raises(LabError):
        web.port("nope")


def test_other_ranges_move_every_address() -> None:
    p = make_plan(Settings("ztlt-", "10.246.0.0/17", "10.246.128.0/24", Path("/tmp/x")))
    assert p.pod("b-waypt").ip == "10.246.2.14"
    assert [s.vip for s in p.services] == ["10.246.127.1", "10.246.127.2", "10.246.127.3"]
