"""The local config loader: ztunnel's example file, precise errors, and arbitrary input."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ztagent.errors import LocalError
from ztagent.model.localconfig import ConfigError, load_local_config, parse_local_config
from ztagent.model.policy import (
    Action,
    CidrMatch,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztagent.model.snapshot import ConfigSnapshot, keep_rejected
from ztagent.model.workload import (
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    TunnelProtocol,
    WorkloadStatus,
)

DATA = Path(__file__).parent.parent / "data"
ip = ipaddress.ip_address


def parse(text: str) -> ConfigSnapshot:
    return parse_local_config(textwrap.dedent(text))


def errors(snapshot: ConfigSnapshot) -> list[str]:
    return [str(e) for e in snapshot.errors]


# --- ztunnel's own example ---


def test_ztunnel_localhost_example_loads_unchanged():
    path = DATA / "ztunnel-localhost.yaml"
    assert path.read_text().startswith("# This shows an example local config for ztunnel")
    snap = load_local_config(path)
    assert snap.errors == ()

    local, tcp = snap.workloads
    assert local.uid == "cluster1//v1/Pod/default/local"
    assert (local.name, local.namespace, local.service_account) == ("local", "default", "default")
    assert local.addresses == (ip("127.0.0.1"),)
    assert local.tunnel_protocol is TunnelProtocol.HBONE
    assert local.node == "local"
    assert local.network == ""
    assert local.status is WorkloadStatus.HEALTHY
    assert dict(local.services) == {
        "default/example.com": {80: 8080},
        "default/example2.com": {80: 8080},
    }
    assert str(local.identity) == "spiffe://cluster.local/ns/default/sa/default"
    assert tcp.uid == "cluster1//v1/Pod/default/local-tcp"
    assert tcp.tunnel_protocol is TunnelProtocol.NONE
    assert tcp.addresses == (ip("127.0.0.2"),)

    example, example2 = snap.services
    assert example.key == "default/example.com"
    assert example.name == "local"
    assert example.addresses == (NetworkAddress("", ip("127.10.0.1")),)
    assert dict(example.ports) == {80: 8080}
    assert example.subject_alt_names == ("spiffe://cluster.local/ns/default/sa/local",)
    assert example2.key == "default/example2.com"
    assert example2.addresses == (NetworkAddress("remote", ip("127.10.0.2")),)

    (policy,) = snap.policies
    assert policy.key == "default/deny-9999"
    assert policy.action is Action.ALLOW
    assert policy.scope is Scope.NAMESPACE
    assert policy.dry_run is False
    assert len(policy.rules) == 1
    ((clause,),) = [rule.clauses for rule in policy.rules]
    assert clause.matches == (Match(not_destination_ports=(9999,)),)


# --- every field ---

FULL = """
workloads:
- uid: c1//Pod/ns1/a
  name: a
  namespace: ns1
  serviceAccount: sa-a
  trustDomain: example.org
  workloadIps: ["10.0.0.1", "fd00::1"]
  protocol: HBONE
  network: net1
  node: node-a
  canonicalName: app-a
  canonicalRevision: v1
  workloadType: deployment
  workloadName: a-deploy
  clusterId: c1
  hostname: a.example
  status: Unhealthy
  authorizationPolicies: [ns1/only-a]
  waypoint: {destination: "ns1/wp.ns1.svc.cluster.local", hboneMtlsPort: 15008}
  networkGateway: {destination: "net2/192.0.2.1", hboneMtlsPort: 15009}
  capacity: 1
  services:
    ns1/svc.ns1.svc.cluster.local: {80: 8080, 443: 0}
services:
- name: svc
  namespace: ns1
  hostname: svc.ns1.svc.cluster.local
  vips: ["net1/10.96.0.1", "/fd00::96"]
  ports: {80: 8080, 443: 8443}
  subjectAltNames: [spiffe://example.org/ns/ns1/sa/sa-a]
  waypoint: {destination: "net1/10.0.0.9", hboneMtlsPort: 15008}
  canonical: true
policies:
- name: all-forms
  namespace: ns1
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - namespaces: [{Exact: ns2}, {Prefix: pre}, {Suffix: suf}, {Presence: []}]
        notNamespaces: ["*", "x*", "*y", z]
        principals: [!Exact td/ns/a/sa/b, !Presence []]
        notPrincipals: [{exact: e}, {presence: {}}]
        sourceIps: ["10.0.0.0/8", "10.1.2.3"]
        notSourceIps: ["fd00::/64"]
        destinationIps: ["192.168.0.0/16"]
        notDestinationIps: ["192.168.1.1/32"]
        destinationPorts: [80, "443"]
        notDestinationPorts: [9999]
        serviceAccounts: [{namespace: ns1, serviceAccount: sa-a}, "ns2/sa-b"]
        notServiceAccounts: [{namespace: ns3, serviceAccount: sa-c}]
      - {}
    - []
  - clauses:
    - matches: [{destinationPorts: [1]}]
- {name: global, namespace: istio-system, scope: GLOBAL, action: ALLOW, rules: []}
"""


def test_every_field_is_read():
    snap = parse(FULL)
    assert snap.errors == ()
    (w,) = snap.workloads
    assert w.addresses == (ip("10.0.0.1"), ip("fd00::1"))
    assert w.network_addresses == (
        NetworkAddress("net1", ip("10.0.0.1")),
        NetworkAddress("net1", ip("fd00::1")),
    )
    assert str(w.identity) == "spiffe://example.org/ns/ns1/sa/sa-a"
    assert (w.node, w.canonical_name, w.canonical_revision) == ("node-a", "app-a", "v1")
    assert (w.workload_type, w.workload_name, w.cluster_id, w.hostname) == (
        "deployment",
        "a-deploy",
        "c1",
        "a.example",
    )
    assert w.status is WorkloadStatus.UNHEALTHY and not w.healthy
    assert w.authorization_policies == ("ns1/only-a",)
    assert w.waypoint == GatewayAddress(
        hostname=NamespacedHostname("ns1", "wp.ns1.svc.cluster.local")
    )
    assert w.network_gateway == GatewayAddress(
        address=NetworkAddress("net2", ip("192.0.2.1")), hbone_mtls_port=15009
    )
    assert dict(w.services) == {"ns1/svc.ns1.svc.cluster.local": {80: 8080, 443: 0}}

    (s,) = snap.services
    assert s.addresses == (
        NetworkAddress("net1", ip("10.96.0.1")),
        NetworkAddress("", ip("fd00::96")),
    )
    assert dict(s.ports) == {80: 8080, 443: 8443}
    assert s.waypoint == GatewayAddress(address=NetworkAddress("net1", ip("10.0.0.9")))

    policy, global_policy = snap.policies
    assert (policy.scope, policy.action, policy.dry_run) == (
        Scope.WORKLOAD_SELECTOR,
        Action.DENY,
        True,
    )
    assert (global_policy.scope, global_policy.action, global_policy.rules) == (
        Scope.GLOBAL,
        Action.ALLOW,
        (),
    )
    first, second = policy.rules
    clause1, clause2 = first.clauses
    m, empty = clause1.matches
    assert empty == Match() and empty.is_empty
    assert clause2.matches == ()
    assert m.namespaces == (
        StringMatch.exact("ns2"),
        StringMatch.prefix("pre"),
        StringMatch.suffix("suf"),
        StringMatch.presence(),
    )
    assert m.not_namespaces == (
        StringMatch.presence(),
        StringMatch.prefix("x"),
        StringMatch.suffix("y"),
        StringMatch.exact("z"),
    )
    assert m.principals == (StringMatch.exact("td/ns/a/sa/b"), StringMatch.presence())
    assert m.not_principals == (StringMatch.exact("e"), StringMatch.presence())
    assert m.source_ips == (CidrMatch.parse("10.0.0.0/8"), CidrMatch.parse("10.1.2.3/32"))
    assert m.not_source_ips == (CidrMatch.parse("fd00::/64"),)
    assert m.destination_ips == (CidrMatch.parse("192.168.0.0/16"),)
    assert m.not_destination_ips == (CidrMatch.parse("192.168.1.1"),)
    assert m.destination_ports == (80, 443)
    assert m.not_destination_ports == (9999,)
    assert m.service_accounts == (
        ServiceAccountMatch("ns1", "sa-a"),
        ServiceAccountMatch("ns2", "sa-b"),
    )
    assert m.not_service_accounts == (ServiceAccountMatch("ns3", "sa-c"),)
    assert second.clauses[0].matches == (Match(destination_ports=(1,)),)


def test_defaults():
    snap = parse(
        """
        workloads:
        - {name: w, namespace: ns, workloadIps: ["10.0.0.1"]}
        """
    )
    (w,) = snap.workloads
    assert w.uid == "ns/w"
    assert w.tunnel_protocol is TunnelProtocol.NONE
    assert (w.trust_domain, w.service_account) == ("cluster.local", "default")
    assert dict(w.services) == {}
    other_td = parse_local_config(
        "workloads: [{name: w, namespace: ns, workloadIps: []}]", trust_domain="corp.example"
    )
    assert other_td.workloads[0].trust_domain == "corp.example"


def test_empty_file_is_an_empty_config():
    assert parse_local_config("") == ConfigSnapshot()
    assert parse_local_config("workloads: []\nservices:\npolicies: []\n") == ConfigSnapshot()


# --- errors name the object, the field and the reason; the rest loads ---

BAD = """
workloads:
- {uid: good, namespace: ns, workloadIps: ["10.0.0.1"]}
- {uid: also-good, namespace: ns, workloadIps: ["10.0.0.2"]}
- {uid: x, namespace: ns, workloadIps: ["10.0.0.300"]}
- {uid: y, namespace: ns, workloadIps: ["10.0.0.4"], protocol: QUIC}
- {uid: z, workloadIps: []}
- {uid: t, namespace: ns, workloadIps: [], workloadIP: ["10.0.0.5"]}
- {uid: s, namespace: ns, workloadIps: [], services: {"no-slash": {80: 80}}}
- {uid: p, namespace: ns, workloadIps: [], services: {"ns/h": {80: 70000}}}
- {uid: good, namespace: ns, workloadIps: ["10.0.0.7"]}
- {uid: clash, namespace: ns, workloadIps: ["10.0.0.8", "10.0.0.2"]}
- {uid: bad-sa, namespace: ns, serviceAccount: "a b", workloadIps: []}
- just a string
services:
- {name: s, namespace: ns, hostname: ok.example, vips: ["/10.96.0.1"], ports: {80: 8080}}
- {name: s, namespace: ns, hostname: bad.example, vips: ["10.96.0.2"], ports: {}}
- {name: s, namespace: ns, hostname: bad2.example, vips: ["/10.96.0.1"], ports: {}}
- {name: s, namespace: ns, hostname: bad3.example, vips: [], ports: {"http": 80}}
policies:
- {name: ok, namespace: ns, scope: Namespace, action: Allow, rules: [[[{destinationPorts: [80]}]]]}
- {name: bad-action, namespace: ns, scope: Namespace, action: Audit, rules: []}
- {name: bad-ip, namespace: ns, scope: Global, action: Deny,
   rules: [[[{sourceIps: ["10.0.0.0/33"]}]]]}
- {name: bad-field, namespace: ns, scope: Global, action: Deny, rules: [[[{sourcePorts: [1]}]]]}
- {name: bad-match, namespace: ns, scope: Global, action: Deny,
   rules: [[[{principals: [{Regex: x}]}]]]}
- {name: bad-rule, namespace: ns, scope: Global, action: Deny, rules: [5]}
- {name: bad-dry, namespace: ns, scope: Global, action: Deny, dryRun: "yes please"}
- {namespace: ns, scope: Global, action: Deny}
extra: 1
"""


def test_malformed_objects_are_named_and_the_rest_loads():
    snap = parse(BAD)
    assert [w.uid for w in snap.workloads] == ["good", "also-good"]
    assert [s.key for s in snap.services] == ["ns/ok.example"]
    assert [p.key for p in snap.policies] == ["ns/ok"]
    assert errors(snap) == [
        "config: extra: unknown top-level key (expected workloads, services, policies)",
        'workloads[2] (uid "x"): workloadIps[0]: "10.0.0.300" is not an IP address',
        'workloads[3] (uid "y"): protocol: "QUIC" is not one of TCP, HBONE, NONE, '
        "LEGACY_ISTIO_MTLS",
        'workloads[4] (uid "z"): namespace: is required',
        'workloads[5] (uid "t"): workloadIP: unknown field',
        'workloads[6] (uid "s"): services.no-slash: "no-slash" is not "namespace/hostname"',
        'workloads[7] (uid "p"): services.ns/h.80: 70000 is not a port number (0-65535)',
        'workloads[8] (uid "good"): duplicate of workloads[0]',
        'workloads[9] (uid "clash"): workloadIps[1]: address /10.0.0.2 is already used by '
        "workloads[1]",
        'workloads[10] (uid "bad-sa"): no valid identity: service account '
        "'a b' may only hold letters, digits, '.', '-' and '_'",
        "workloads[11]: must be a mapping, got a string",
        'services[1] (key "ns/bad.example"): vips[0]: "10.96.0.2" is not "network/IP" '
        '(use "/10.96.0.2" for no network)',
        'services[2] (key "ns/bad2.example"): vips[0]: VIP /10.96.0.1 is already used by '
        "services[0]",
        'services[3] (key "ns/bad3.example"): ports: "http" is not a port number (1-65535)',
        'policies[1] (key "ns/bad-action"): action: "Audit" is not one of Allow, Deny, ALLOW, DENY',
        'policies[2] (key "ns/bad-ip"): rules[0][0][0].sourceIps[0]: "10.0.0.0/33" is not an '
        "IP address or CIDR block",
        'policies[3] (key "ns/bad-field"): rules[0][0][0].sourcePorts: unknown field',
        'policies[4] (key "ns/bad-match"): rules[0][0][0].principals[0]: {"Regex": "x"} is not a '
        'string match ({Exact: x}, {Prefix: x}, {Suffix: x}, {Presence: []} or "*", "x*", "*x", '
        '"x")',
        'policies[5] (key "ns/bad-rule"): rules[0]: must be a list, got an integer',
        'policies[6] (key "ns/bad-dry"): dryRun: must be true or false, got "yes please"',
        "policies[7]: name: is required",
    ]
    assert all(e.kind in ("config", "workloads", "services", "policies") for e in snap.errors)
    assert snap.errors[1].key == "x" and snap.errors[1].path == "workloadIps[0]"


def test_section_of_the_wrong_type_is_one_error():
    snap = parse(
        "workloads: {a: 1}\npolicies: [{name: p, namespace: n, scope: Global, action: Deny}]\n"
    )
    assert errors(snap) == ["workloads: must be a list, got a mapping"]
    assert [p.key for p in snap.policies] == ["n/p"]


@pytest.mark.parametrize(
    "text",
    [
        "workloads: [",
        "- just\n- a list\n",
        "42",
        "key: !!python/object:os.system {}",
        "\t: bad",
        "a: b: c",
    ],
)
def test_unusable_file_is_one_config_error(text):
    with pytest.raises(ConfigError) as info:
        parse_local_config(text, source="/etc/zt.yaml")
    assert isinstance(info.value, LocalError)
    assert str(info.value).startswith("/etc/zt.yaml: ")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_local_config(tmp_path / "missing.yaml")


def test_keep_rejected_carries_the_last_good_version():
    before = parse(
        """
        workloads:
        - {uid: a, namespace: ns, workloadIps: ["10.0.0.1"]}
        - {uid: b, namespace: ns, workloadIps: ["10.0.0.2"]}
        services:
        - {namespace: ns, hostname: h, vips: ["/10.96.0.1"], ports: {80: 80}}
        policies:
        - {name: p, namespace: ns, scope: Namespace, action: Allow, rules: [[]]}
        """
    )
    after = parse(
        """
        workloads:
        - {uid: a, namespace: ns, workloadIps: ["10.0.0.1.5"]}
        - {uid: c, namespace: ns, workloadIps: ["10.0.0.3"]}
        services:
        - {namespace: ns, hostname: h, vips: ["10.96.0.1"], ports: {80: 80}}
        policies:
        - {name: p, namespace: ns, scope: Namespace, action: Maybe}
        """
    )
    merged = keep_rejected(after, before)
    assert sorted(w.uid for w in merged.workloads) == ["a", "c"]
    assert merged.workloads[-1] == before.workloads[0]
    assert [s.key for s in merged.services] == ["ns/h"]
    assert [p.key for p in merged.policies] == ["ns/p"]
    assert merged.errors == after.errors
    assert keep_rejected(before, after) is before


def test_keep_rejected_does_not_resurrect_into_a_clash():
    before = parse("workloads: [{uid: a, namespace: ns, workloadIps: ['10.0.0.1']}]")
    after = parse(
        "workloads: [{uid: b, namespace: ns, workloadIps: ['10.0.0.1']},"
        " {uid: a, namespace: ns, workloadIps: 5}]"
    )
    assert [w.uid for w in keep_rejected(after, before).workloads] == ["b"]


# --- arbitrary input never escapes as anything but ConfigError ---

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["10.0.0.1", "/10.0.0.1", "ns/h", "HBONE", "Allow", "Global", "*", "a*"]),
)
keys = st.sampled_from(
    [
        "workloads",
        "services",
        "policies",
        "uid",
        "name",
        "namespace",
        "workloadIps",
        "protocol",
        "services",
        "vips",
        "ports",
        "hostname",
        "rules",
        "scope",
        "action",
        "dryRun",
        "waypoint",
        "destination",
        "principals",
        "notPrincipals",
        "sourceIps",
        "destinationPorts",
        "serviceAccounts",
        "Exact",
        "Presence",
        "clauses",
        "matches",
        "status",
        "serviceAccount",
        "trustDomain",
    ]
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(keys, st.integers(0, 70000), st.text(max_size=5)), inner, max_size=5
        ),
    ),
    max_leaves=40,
)


def check_never_raises(text: str | bytes) -> None:
    try:
        snap = parse_local_config(text)
    except ConfigError:
        return
    assert isinstance(snap, ConfigSnapshot)
    for error in snap.errors:
        assert str(error)


@settings(max_examples=400, deadline=None)
@given(documents)
def test_arbitrary_structures_never_raise(document):
    check_never_raises(yaml.safe_dump(document))
    check_never_raises(
        yaml.safe_dump({"workloads": [document], "services": [document], "policies": [document]})
    )


@settings(max_examples=300, deadline=None)
@given(documents)
def test_arbitrary_rules_never_raise(document):
    text = yaml.safe_dump(
        {
            "policies": [
                {
                    "name": "p",
                    "namespace": "n",
                    "scope": "Global",
                    "action": "Deny",
                    "rules": document,
                }
            ]
        }
    )
    check_never_raises(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_arbitrary_text_never_raises(text):
    check_never_raises(text)
