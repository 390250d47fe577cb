"""ProxyState lookups and the change report of `replace`."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from ztagent.identity.spiffe import Identity
from ztagent.model.localconfig import parse_local_config
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.store import KeyChanges, ProxyState
from ztagent.model.workload import GatewayAddress, NetworkAddress, Service, Workload

ip = ipaddress.ip_address

CONFIG = """
workloads:
- uid: a1
  name: a1
  namespace: app
  serviceAccount: a
  workloadIps: ["10.0.0.1", "fd00::1"]
  node: node-a
  services: {"app/svc.app": {80: 8080}}
- uid: a2
  name: a2
  namespace: app
  serviceAccount: a
  workloadIps: ["10.0.0.2"]
  node: node-a
  services: {"app/svc.app": {}}
- uid: b1
  name: b1
  namespace: app
  serviceAccount: b
  workloadIps: ["10.0.0.1"]
  network: other
  node: node-b
  services: {"app/svc.app": {80: 9090}, "app/second.app": {}}
services:
- name: svc
  namespace: app
  hostname: svc.app
  vips: ["/10.96.0.1", "other/10.96.0.1"]
  ports: {80: 8000, 81: 0}
- name: second
  namespace: app
  hostname: second.app
  vips: ["/10.96.0.2"]
  ports: {443: 8443}
- name: dup-host
  namespace: other
  hostname: svc.app
  vips: []
  ports: {}
"""


@pytest.fixture
def state() -> ProxyState:
    snap = parse_local_config(textwrap.dedent(CONFIG))
    assert snap.errors == ()
    return ProxyState("node-a", snapshot=snap)


def uids(workloads: tuple[Workload, ...]) -> list[str]:
    return [w.uid for w in workloads]


def test_workload_lookups(state: ProxyState):
    assert state.version == 1 and state.loaded
    w = state.workload_by_address("", ip("10.0.0.1"))
    assert w is not None and w.uid == "a1"
    assert state.workload_by_address("", ip("fd00::1")) is w
    other = state.workload_by_address("other", ip("10.0.0.1"))
    assert other is not None and other.uid == "b1"
    assert state.workload_by_address("", ip("10.0.0.9")) is None
    assert uids(state.local_workloads()) == ["a1", "a2"]
    local = state.local_workload_by_ip(ip("10.0.0.2"))
    assert local is not None and local.uid == "a2"
    assert state.local_workload_by_ip(ip("10.0.0.3")) is None
    assert state.local_identities() == {Identity("cluster.local", "app", "a")}
    assert uids(state.workloads) == ["a1", "a2", "b1"]


def test_service_lookups(state: ProxyState):
    svc = state.service_by_vip("", ip("10.96.0.1"))
    assert svc is not None and svc.key == "app/svc.app"
    assert state.service_by_vip("other", ip("10.96.0.1")) is svc
    assert state.service_by_vip("nowhere", ip("10.96.0.1")) is None
    assert state.service("app/svc.app") is svc
    assert state.service("app/none") is None
    assert state.service_by_hostname("svc.app") is svc
    dup = state.service_by_hostname("svc.app", "other")
    assert dup is not None and dup.name == "dup-host"
    assert state.service_by_hostname("svc.app", "missing") is None
    assert uids(state.endpoints(svc)) == ["a1", "a2", "b1"]
    assert uids(state.endpoints("app/second.app")) == ["b1"]
    assert state.endpoints("app/none") == ()


def test_target_port(state: ProxyState):
    svc = state.service("app/svc.app")
    assert svc is not None
    a1, a2, b1 = (state.workload(u) for u in ("a1", "a2", "b1"))
    assert a1 is not None and a2 is not None and b1 is not None
    assert state.target_port(svc, a1, 80) == 8080  # endpoint map wins
    assert state.target_port(svc, b1, 80) == 9090
    assert state.target_port(svc, a2, 80) == 8000  # service's target port
    assert state.target_port(svc, a2, 81) is None  # target 0 and no endpoint mapping
    assert state.target_port(svc, a2, 82) is None  # no such service port


def test_model_values():
    w = Workload("u", "n", "ns", addresses=(ip("10.0.0.1"),), services={"ns/h": {1: 2}})
    listed = Workload("u", "n", "ns", authorization_policies=["a/b"])  # type: ignore[arg-type]
    assert listed.authorization_policies == ("a/b",)
    assert isinstance(w.addresses, tuple)
    with pytest.raises(TypeError):
        w.services["ns/x"] = {}  # type: ignore[index]
    assert hash(w) == hash(Workload("u", "n", "ns", addresses=(ip("10.0.0.1"),)))
    assert w != Workload("u", "n", "ns", addresses=(ip("10.0.0.1"),))
    assert Service("s", "ns", "h.example").key == "ns/h.example"
    assert str(NetworkAddress("", ip("10.0.0.1"))) == "/10.0.0.1"
    assert str(GatewayAddress(address=NetworkAddress("n", ip("10.0.0.1")))) == "n/10.0.0.1:15008"
    with pytest.raises(ValueError):
        GatewayAddress()


def test_replace_reports_changes():
    state = ProxyState("node-a")
    assert state.version == 0 and not state.loaded
    first = parse_local_config(textwrap.dedent(CONFIG))
    change = state.replace(first)
    assert change.version == 1
    assert change.workloads == KeyChanges(added=frozenset({"a1", "a2", "b1"}))
    assert change.local_identities_added == {Identity("cluster.local", "app", "a")}

    second = parse_local_config(
        textwrap.dedent(
            """
            workloads:
            - {uid: a1, namespace: app, serviceAccount: a, workloadIps: ["10.0.0.1"], node: node-a}
            - {uid: c1, namespace: app, serviceAccount: c, workloadIps: ["10.0.0.3"], node: node-a}
            - {uid: b1, name: b1, namespace: app, serviceAccount: b, workloadIps: ["10.0.0.1"],
               network: other, node: node-b,
               services: {"app/svc.app": {80: 9090}, "app/second.app": {}}}
            services:
            - {name: second, namespace: app, hostname: second.app, vips: ["/10.96.0.2"],
               ports: {443: 8443}}
            policies:
            - {name: p, namespace: app, scope: Namespace, action: Allow}
            """
        )
    )
    change = state.replace(second)
    assert change.version == 2 and state.version == 2
    assert change.workloads == KeyChanges(
        added=frozenset({"c1"}), removed=frozenset({"a2"}), updated=frozenset({"a1"})
    )
    assert change.services == KeyChanges(
        removed=frozenset({"app/svc.app", "other/svc.app"}), updated=frozenset()
    )
    assert change.policies == KeyChanges(added=frozenset({"app/p"}))
    assert change.local_identities_added == {Identity("cluster.local", "app", "c")}
    assert change.local_identities_removed == frozenset()
    assert change and change.policy_relevant

    change = state.replace(second)
    assert not change and change.version == 3

    change = state.replace(ConfigSnapshot())
    assert change.local_identities_removed == {
        Identity("cluster.local", "app", "a"),
        Identity("cluster.local", "app", "c"),
    }
    assert state.local_workloads() == ()
