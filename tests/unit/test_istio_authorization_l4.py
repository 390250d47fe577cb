"""L4 authorization: every match field and its not-form, precedence, empties, dry run, STRICT."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from ztagent.identity.spiffe import Identity
from ztagent.istio.authorization.l4 import (
    STATIC_STRICT_POLICY_NAME,
    ConnectionAttributes,
    Verdict,
    evaluate,
    policy_matches,
    strict_peer_authentication,
)
from ztagent.model.localconfig import parse_local_config
from ztagent.model.policy import (
    Action,
    Authorization,
    CidrMatch,
    Clause,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztagent.model.store import ProxyState

ip = ipaddress.ip_address

# The three connections ztunnel's own rbac tests use, in our terms.
PLAINTEXT = ConnectionAttributes(None, ip("127.0.0.1"), ip("127.0.0.2"), 8080)
TLS = ConnectionAttributes(
    Identity("td", "namespace", "account"), ip("127.0.0.1"), ip("127.0.0.2"), 8080
)
TLS_ALT = ConnectionAttributes(
    Identity("td-alt", "ns-alt", "sa-alt"), ip("127.0.0.3"), ip("127.0.0.4"), 9090
)


def policy(
    *matches: Match,
    action: Action = Action.ALLOW,
    name: str = "p",
    namespace: str = "ns",
    scope: Scope = Scope.NAMESPACE,
    dry_run: bool = False,
) -> Authorization:
    """One rule, one clause, the given matches."""
    return Authorization(name, namespace, scope, action, (Rule((Clause(matches),)),), dry_run)


def exact(text: str) -> tuple[StringMatch, ...]:
    return (StringMatch.exact(text),)


def cidr(text: str) -> tuple[CidrMatch, ...]:
    return (CidrMatch.parse(text),)


SA = (ServiceAccountMatch("namespace", "account"),)

# field, value, expected for (PLAINTEXT, TLS, TLS_ALT); the same table as ztunnel's tests.
FIELD_MATRIX = [
    ("namespaces", exact("namespace"), (False, True, False)),
    ("not_namespaces", exact("namespace"), (True, False, True)),
    ("service_accounts", SA, (False, True, False)),
    ("not_service_accounts", SA, (True, False, True)),
    ("principals", exact("td/ns/namespace/sa/account"), (False, True, False)),
    ("not_principals", exact("td/ns/namespace/sa/account"), (True, False, True)),
    ("source_ips", cidr("127.0.0.1/32"), (True, True, False)),
    ("not_source_ips", cidr("127.0.0.1/32"), (False, False, True)),
    ("destination_ips", cidr("127.0.0.2/32"), (True, True, False)),
    ("not_destination_ips", cidr("127.0.0.2/32"), (False, False, True)),
    ("destination_ips", cidr("127.0.0.1/24"), (True, True, True)),
    ("destination_ports", (8080,), (True, True, False)),
    ("not_destination_ports", (8080,), (False, False, True)),
]


@pytest.mark.parametrize(("field", "value", "expected"), FIELD_MATRIX)
def test_each_match_field_and_its_not_form(field, value, expected):
    pol = policy(Match(**{field: value}))
    got = tuple(policy_matches(pol, conn) for conn in (PLAINTEXT, TLS, TLS_ALT))
    assert got == expected


@pytest.mark.parametrize(("field", "value", "expected"), FIELD_MATRIX)
def test_each_field_decides_allow_and_deny(field, value, expected):
    for conn, matches in zip((PLAINTEXT, TLS, TLS_ALT), expected, strict=True):
        allow = evaluate(conn, [policy(Match(**{field: value}))])
        assert allow.allowed is matches
        assert allow.policy == ("ns/p" if matches else None)
        deny = evaluate(conn, [policy(Match(**{field: value}), action=Action.DENY)])
        assert deny.allowed is not matches
        assert deny.policy == ("ns/p" if matches else None)


def test_principal_forms_and_spiffe_prefix():
    principal = "td/ns/namespace/sa/account"
    for match, expected in [
        (StringMatch.exact(principal), True),
        (StringMatch.exact("spiffe://" + principal), False),
        (StringMatch.prefix("td/ns/namespace/"), True),
        (StringMatch.suffix("/sa/account"), True),
        (StringMatch.suffix("/sa/other"), False),
        (StringMatch.presence(), True),
        (StringMatch.from_istio("td/*"), True),
        (StringMatch.from_istio("*/sa/account"), True),
        (StringMatch.from_istio("*"), True),
    ]:
        pol = policy(Match(principals=(match,)))
        assert policy_matches(pol, TLS) is expected, match
        assert policy_matches(pol, PLAINTEXT) is False, match


def test_identityless_connection_never_matches_positive_identity_fields():
    for m in (
        Match(principals=(StringMatch.prefix(""),)),
        Match(namespaces=(StringMatch.prefix(""),)),
        Match(namespaces=(StringMatch.suffix(""),)),
        Match(service_accounts=SA),
    ):
        assert not policy_matches(policy(m), PLAINTEXT)
    for m in (
        Match(not_principals=(StringMatch.presence(),)),
        Match(not_namespaces=(StringMatch.presence(),)),
        Match(not_service_accounts=SA),
    ):
        assert policy_matches(policy(m), PLAINTEXT)


def test_string_match_forms():
    assert StringMatch.exact("foo").matches("foo")
    assert not StringMatch.exact("foo").matches("")
    assert StringMatch.prefix("foo").matches("foobar")
    assert not StringMatch.prefix("foo").matches("notfoo")
    assert StringMatch.suffix("foo").matches("barfoo")
    assert not StringMatch.suffix("foo").matches("foonot")
    assert StringMatch.presence().matches("x")
    assert not StringMatch.presence().matches("")
    for text in ("*", "*x", "x*", "x"):
        assert str(StringMatch.from_istio(text)) == text


def test_cidr_match():
    assert CidrMatch.parse("10.1.2.3/8").contains(ip("10.200.0.1"))
    assert not CidrMatch.parse("10.0.0.0/8").contains(ip("11.0.0.1"))
    assert not CidrMatch.parse("::/0").contains(ip("10.0.0.1"))
    assert CidrMatch.parse("fd00::/8").contains(ip("fd12::1"))
    assert CidrMatch.parse("10.0.0.1").contains(ip("10.0.0.1"))
    assert not CidrMatch.parse("10.0.0.1").contains(ip("10.0.0.2"))
    assert CidrMatch.parse("10.0.0.0/8").contains(ip("::ffff:10.0.0.1"))
    assert not CidrMatch.parse("10.0.0.0/8").contains(ip("::ffff:11.0.0.1"))


def test_values_of_one_field_are_ored_and_fields_are_anded():
    m = Match(namespaces=exact("a") + exact("namespace"), destination_ports=(80, 8080))
    assert policy_matches(policy(m), TLS)
    m = Match(namespaces=exact("namespace"), destination_ports=(80,))
    assert not policy_matches(policy(m), TLS)
    m = Match(destination_ports=(8080,), not_destination_ports=(8080,))
    assert not policy_matches(policy(m), TLS)


def test_nesting_rules_or_clauses_and_matches_or():
    ns_a = Match(namespaces=exact("namespace"))
    ns_b = Match(namespaces=exact("ns-alt"))
    port_8080 = Match(destination_ports=(8080,))
    pol = Authorization(
        "nested",
        "ns",
        Scope.NAMESPACE,
        Action.ALLOW,
        (Rule((Clause((ns_a, ns_b)), Clause((port_8080,)))),),
    )
    assert policy_matches(pol, TLS)  # namespace a, port 8080
    assert not policy_matches(pol, TLS_ALT)  # namespace b, but port 9090
    two_rules = Authorization(
        "multi",
        "ns",
        Scope.NAMESPACE,
        Action.ALLOW,
        (Rule((Clause((ns_a,)),)), Rule((Clause((ns_b,)),))),
    )
    assert policy_matches(two_rules, TLS)
    assert policy_matches(two_rules, TLS_ALT)
    assert not policy_matches(two_rules, PLAINTEXT)


def test_empty_forms_follow_ztunnel():
    def with_rules(*rules: Rule) -> Authorization:
        return Authorization("e", "ns", Scope.NAMESPACE, Action.ALLOW, rules)

    for conn in (PLAINTEXT, TLS, TLS_ALT):
        assert not policy_matches(with_rules(), conn)  # rules: [] never matches
        assert policy_matches(with_rules(Rule(())), conn)  # a rule with no clauses: all
        assert policy_matches(with_rules(Rule((Clause(()),))), conn)  # a clause with no matches
        assert not policy_matches(with_rules(Rule((Clause((Match(),)),))), conn)  # empty Match
        # An empty Match beside a real one is just skipped.
        clause = Clause((Match(), Match(destination_ports=(conn.destination_port,))))
        assert policy_matches(with_rules(Rule((clause,))), conn)


def test_allow_with_empty_rules_allows_nothing_and_match_all_allows_everything():
    allow_nothing = Authorization("none", "ns", Scope.NAMESPACE, Action.ALLOW, ())
    allow_all = Authorization("all", "ns", Scope.NAMESPACE, Action.ALLOW, (Rule(()),))
    assert evaluate(TLS, [allow_nothing]) == Verdict(
        False, None, "no ALLOW policy matched (1 applied)"
    )
    assert evaluate(TLS, [allow_nothing, allow_all]) == Verdict(
        True, "ns/all", "allowed by ALLOW policy ns/all"
    )
    deny_all = Authorization("deny-all", "ns", Scope.NAMESPACE, Action.DENY, (Rule(()),))
    deny_nothing = Authorization("deny-none", "ns", Scope.NAMESPACE, Action.DENY, ())
    assert not evaluate(TLS, [deny_all, allow_all]).allowed
    assert evaluate(TLS, [deny_nothing]).allowed


def test_precedence():
    allow_ns = policy(Match(namespaces=exact("namespace")), name="allow-ns")
    deny_port = policy(Match(destination_ports=(8080,)), action=Action.DENY, name="deny-8080")
    allow_other = policy(Match(namespaces=exact("other")), name="allow-other")

    assert evaluate(TLS, []) == Verdict(True, None, "no ALLOW policy applies")
    # DENY beats a matching ALLOW, whatever the order.
    for order in ([allow_ns, deny_port], [deny_port, allow_ns]):
        verdict = evaluate(TLS, order)
        assert verdict == Verdict(False, "ns/deny-8080", "denied by DENY policy ns/deny-8080")
    # A DENY that does not match, and no ALLOW at all: allow.
    assert evaluate(TLS_ALT, [deny_port]).allowed
    # Some ALLOW applies; one matches: allow, naming it.
    assert evaluate(TLS, [allow_other, allow_ns]) == Verdict(
        True, "ns/allow-ns", "allowed by ALLOW policy ns/allow-ns"
    )
    # ALLOW policies apply but none matches: deny.
    assert evaluate(TLS, [allow_other]) == Verdict(
        False, None, "no ALLOW policy matched (1 applied)"
    )
    # A policy listed twice counts once.
    assert evaluate(TLS, [allow_other, allow_other]).reason == "no ALLOW policy matched (1 applied)"


def test_dry_run_never_decides_but_is_reported():
    deny_dry = policy(Match(destination_ports=(8080,)), action=Action.DENY, name="d", dry_run=True)
    allow_dry = policy(Match(namespaces=exact("other")), name="a", dry_run=True)
    allow_dry_match = policy(Match(namespaces=exact("namespace")), name="am", dry_run=True)

    verdict = evaluate(TLS, [deny_dry])
    assert verdict == Verdict(True, None, "no ALLOW policy applies", ("ns/d",))
    # A dry-run ALLOW does not count as "an ALLOW policy applies".
    assert evaluate(TLS, [allow_dry]) == Verdict(True, None, "no ALLOW policy applies", ())
    assert evaluate(TLS, [allow_dry_match, deny_dry]).dry_run_matches == ("ns/am", "ns/d")
    # Beside a real decision the dry-run matches are still reported.
    real_deny = policy(Match(destination_ports=(8080,)), action=Action.DENY, name="real")
    verdict = evaluate(TLS, [deny_dry, real_deny])
    assert (verdict.allowed, verdict.policy, verdict.dry_run_matches) == (
        False,
        "ns/real",
        ("ns/d",),
    )


def test_strict_peer_authentication_denies_only_plaintext():
    strict = strict_peer_authentication()
    assert strict.key == f"istio-system/{STATIC_STRICT_POLICY_NAME}"
    assert (strict.action, strict.scope, strict.dry_run) == (
        Action.DENY,
        Scope.WORKLOAD_SELECTOR,
        False,
    )
    assert strict.rules == (Rule((Clause((Match(not_principals=(StringMatch.presence(),)),)),)),)
    assert evaluate(PLAINTEXT, [strict]) == Verdict(
        False, strict.key, f"denied by DENY policy {strict.key}"
    )
    assert evaluate(TLS, [strict]).allowed
    assert evaluate(TLS_ALT, [strict]).allowed


def test_strict_with_permissive_port_exception():
    strict = strict_peer_authentication("converted", "ns", permissive_ports=[9090])
    assert not evaluate(PLAINTEXT, [strict]).allowed
    plaintext_9090 = ConnectionAttributes(None, ip("10.0.0.1"), ip("10.0.0.2"), 9090)
    assert evaluate(plaintext_9090, [strict]).allowed
    assert evaluate(TLS, [strict]).allowed


STORE_CONFIG = """
workloads:
- {uid: a, name: a, namespace: app, workloadIps: ["10.0.0.1"], node: n1,
   authorizationPolicies: [app/selected, istio-system/istio_converted_static_strict, app/missing]}
- {uid: b, name: b, namespace: app, workloadIps: ["10.0.0.2"], node: n1}
- {uid: c, name: c, namespace: other, workloadIps: ["10.0.0.3"], node: n1}
policies:
- {name: mesh-deny-9999, namespace: istio-system, scope: Global, action: Deny,
   rules: [[[{destinationPorts: [9999]}]]]}
- {name: misplaced-global, namespace: app, scope: Global, action: Deny, rules: [[]]}
- {name: ns-allow, namespace: app, scope: Namespace, action: Allow,
   rules: [[[{namespaces: [{Exact: app}]}]]]}
- {name: selected, namespace: app, scope: WorkloadSelector, action: Deny,
   rules: [[[{sourceIps: ["192.0.2.0/24"]}]]]}
- {name: istio_converted_static_strict, namespace: istio-system, scope: WorkloadSelector,
   action: Deny, rules: [[[{notPrincipals: [{Presence: []}]}]]]}
"""


def test_three_scopes_and_strict_through_the_store():
    snap = parse_local_config(textwrap.dedent(STORE_CONFIG))
    assert snap.errors == ()
    state = ProxyState("n1", snapshot=snap)
    a, b, c = (state.workload(uid) for uid in "abc")
    assert a is not None and b is not None and c is not None
    assert [p.key for p in state.policies_for(a)] == [
        "istio-system/mesh-deny-9999",
        "app/ns-allow",
        "app/selected",
        f"istio-system/{STATIC_STRICT_POLICY_NAME}",
    ]
    assert [p.key for p in state.policies_for(b)] == [
        "istio-system/mesh-deny-9999",
        "app/ns-allow",
    ]
    assert [p.key for p in state.policies_for(c)] == ["istio-system/mesh-deny-9999"]
    assert state.policies_for(a)[-1] == strict_peer_authentication()

    def conn(identity: Identity | None, src: str, port: int) -> ConnectionAttributes:
        return ConnectionAttributes(identity, ip(src), ip("10.0.0.1"), port)

    app_id = Identity("cluster.local", "app", "default")
    other_id = Identity("cluster.local", "other", "default")
    # GLOBAL from the root namespace applies everywhere.
    for w in (a, b, c):
        assert not evaluate(conn(app_id, "10.1.0.1", 9999), state.policies_for(w)).allowed
    # NAMESPACE applies in its namespace only.
    assert evaluate(conn(app_id, "10.1.0.1", 80), state.policies_for(b)).allowed
    assert not evaluate(conn(other_id, "10.1.0.1", 80), state.policies_for(b)).allowed
    assert evaluate(conn(other_id, "10.1.0.1", 80), state.policies_for(c)).allowed
    # WORKLOAD_SELECTOR applies to the workload listing it.
    assert not evaluate(conn(app_id, "192.0.2.7", 80), state.policies_for(a)).allowed
    assert evaluate(conn(app_id, "192.0.2.7", 80), state.policies_for(b)).allowed
    # STRICT: plaintext to a is refused; to b it only meets the namespace ALLOW.
    verdict = evaluate(conn(None, "10.1.0.1", 80), state.policies_for(a))
    assert verdict.policy == f"istio-system/{STATIC_STRICT_POLICY_NAME}"
    assert not verdict.allowed
    # A GLOBAL policy outside the root namespace applies only with root_namespace=None.
    anywhere = ProxyState("n1", root_namespace=None, snapshot=snap)
    assert "app/misplaced-global" in [p.key for p in anywhere.policies_for(c)]
