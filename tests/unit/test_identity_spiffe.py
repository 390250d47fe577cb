import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztagent.errors import LocalError
from ztagent.identity.spiffe import MAX_ID_BYTES, Identity, InvalidIdentity

WEB = "spiffe://cluster.local/ns/default/sa/web"


def test_parse_valid():
    ident = Identity.parse(WEB)
    assert ident == Identity("cluster.local", "default", "web")
    assert str(ident) == WEB
    assert ident.uri == WEB
    assert ident.principal == "cluster.local/ns/default/sa/web"


def test_try_parse():
    assert Identity.try_parse(WEB) == Identity("cluster.local", "default", "web")
    assert Identity.try_parse("http://x") is None


def test_is_hashable_and_ordered():
    a = Identity.parse("spiffe://td/ns/a/sa/x")
    b = Identity.parse("spiffe://td/ns/b/sa/x")
    assert sorted([b, a]) == [a, b]
    assert len({a, Identity.parse(str(a))}) == 1


def test_invalid_identity_is_local_error():
    assert issubclass(InvalidIdentity, LocalError)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "missing 'spiffe://' scheme"),
        ("cluster.local/ns/a/sa/b", "missing 'spiffe://' scheme"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "scheme must be 'spiffe://'"),
        ("https://cluster.local/ns/a/sa/b", "scheme must be 'spiffe://'"),
        ("spiffe:/cluster.local/ns/a/sa/b", "missing 'spiffe://' scheme"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "must be lowercase"),
        ("spiffe://cluster.local:8080/ns/a/sa/b", "port is not allowed"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "user info is not allowed"),
        ("spiffe://clüster/ns/a/sa/b", "lowercase letters, digits"),
        ("spiffe://cluster.local", "missing path"),
        ("spiffe://cluster.local/", "missing path"),
        ("spiffe://cluster.local/ns/a/sa/b/", "trailing '/'"),
        ("spiffe://cluster.local//ns/a/sa/b", "empty path segment"),
        ("spiffe://cluster.local/ns//sa/b", "empty path segment"),
        ("spiffe://cluster.local/ns/a/sa/", "trailing '/'"),
        ("spiffe://cluster.local/ns/a", "wrong path shape"),
        ("spiffe://cluster.local/ns/a/sa", "wrong path shape"),
        ("spiffe://cluster.local/ns/a/sa/b/c", "wrong path shape"),
        ("spiffe://cluster.local/sa/b/ns/a", "wrong path shape"),
        ("spiffe://cluster.local/NS/a/SA/b", "wrong path shape"),
        ("spiffe://cluster.local/workload", "wrong path shape"),
        ("spiffe://cluster.local/ns/a b/sa/c", "namespace 'a b' may only hold"),
        ("spiffe://cluster.local/ns/a/sa/c%41", "service account 'c%41' may only hold"),
        ("spiffe://cluster.local/ns/./sa/b", "namespace may not be '.'"),
        ("spiffe://cluster.local/ns/a/sa/..", "service account may not be '..'"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "query or fragment"),
        ("spiffe://cluster.local/ns/a/sa/b#frag", "query or fragment"),
        ("spiffe://cluster.local/ns/a/sa/b\n", "may only hold"),
    ],
)
def test_parse_rejects(text, fragment):
    with pytest.raises(InvalidIdentity, match=None) as info:
        Identity.parse(text)
    assert fragment in str(info.value)


def test_too_long():
    base = "spiffe://cluster.local/ns/a/sa/"
    ok = base + "x" * (MAX_ID_BYTES - len(base))
    assert Identity.parse(ok).service_account == "x" * (MAX_ID_BYTES - len(base))
    with pytest.raises(InvalidIdentity, match="2049 bytes long"):
        Identity.parse(ok + "x")
    with pytest.raises(InvalidIdentity, match="limit is 2048"):
        Identity("cluster.local", "a", "x" * MAX_ID_BYTES)


def test_trust_domain_limit():
    with pytest.raises(InvalidIdentity, match="longer than 255 bytes"):
        Identity("a" * 256, "ns", "sa")


def test_error_message_truncates_long_input():
    with pytest.raises(InvalidIdentity) as info:
        Identity.parse("x" * 2000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("td", "ns", "sa"),
    [("", "a", "b"), ("UPPER", "a", "b"), ("td", "", "b"), ("td", "a", "b/c"), ("td", "..", "b")],
)
def test_constructor_validates(td, ns, sa):
    with pytest.raises(InvalidIdentity):
        Identity(td, ns, sa)


trust_domains = st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True)
segments = st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)


@given(trust_domains, segments, segments)
def test_round_trip(td, ns, sa):
    ident = Identity(td, ns, sa)
    assert Identity.parse(str(ident)) == ident
    assert Identity.parse(ident.uri).principal == ident.principal


def _parse_or_invalid(text: str) -> None:
    try:
        ident = Identity.parse(text)
    except InvalidIdentity:
        assert Identity.try_parse(text) is None
        return
    assert str(ident) == text


@given(st.text())
def test_arbitrary_text_only_raises_invalid_identity(text):
    _parse_or_invalid(text)


@given(st.text(alphabet=st.sampled_from("spiffe:/nsa.-_?#@%Az0\x00\udc80é "), max_size=60))
def test_near_miss_text_only_raises_invalid_identity(text):
    _parse_or_invalid("spiffe://" + text)
    _parse_or_invalid("spiffe://td/ns/" + text)
