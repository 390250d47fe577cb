"""Waypoint request authentication: RequestAuthentication, JWKS, token validation, header edits."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ztagent.istio.authorization.l7 import RequestContext, evaluate
from ztagent.istio.authorization.waypoint import parse_authorization_policy
from ztagent.istio.envelope import Resource
from ztagent.istio.jwt import (
    CLOCK_SKEW_SECONDS,
    Authenticator,
    JwksError,
    JwtStatus,
    RequestAuthentication,
    load_jwks,
    parse_request_authentication,
    read_request_authentications,
)
from ztagent.istio.routing import Headers

NOW = 1_700_000_000
ISSUER = "https://issuer.example.com"
WAYPOINT = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def jwk(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(public, as_dict=True)
    data["kid"] = kid
    if alg:
        data["alg"] = alg
    return data


JWKS = json.dumps(
    {"keys": [jwk(RSA_KEY, "rsa", "RS256"), jwk(EC_KEY, "ec"), jwk(ED_KEY, "ed", "EdDSA")]}
)


def token(
    key: Any = RSA_KEY,
    alg: str = "RS256",
    kid: str | None = "rsa",
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {"iss": ISSUER, "sub": "alice", "exp": NOW + 300, "aud": "shop"}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid else None
    return pyjwt.encode(payload, key, algorithm=alg, headers=headers)


def resource(spec: dict[str, Any], *, name: str = "ra", index: int = 0) -> Resource:
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": spec,
    }
    return Resource(
        "ra.yaml", index, "security.istio.io/v1", "RequestAuthentication", name, "ns", body
    )


def policy(*rules: dict[str, Any]) -> RequestAuthentication:
    parsed, _problems = parse_request_authentication(
        resource({"targetRefs": [WAYPOINT], "jwtRules": list(rules)})
    )
    assert parsed is not None
    return parsed


def rule(**extra: Any) -> dict[str, Any]:
    return {"issuer": ISSUER, "jwks": JWKS, **extra}


def check(
    auth: Authenticator, headers: list[tuple[str, str]] | None = None, path: str = "/x"
) -> Any:
    return auth.authenticate(headers or [], path, now=NOW, host="shop.ns:8080")


def bearer(value: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {value}")]


DEFAULT = Authenticator([policy(rule(audiences=["shop"]))])


# --- valid tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg", "kid"),
    [(RSA_KEY, "RS256", "rsa"), (EC_KEY, "ES256", "ec"), (ED_KEY, "EdDSA", "ed")],
)
def test_valid_token(key: Any, alg: str, kid: str) -> None:
    result = check(DEFAULT, bearer(token(key, alg, kid, azp="web")))
    assert result.allowed and result.status is None
    assert result.auth is not None
    assert result.auth.principal == f"{ISSUER}/alice"
    assert result.auth.audiences == ("shop",)
    assert result.auth.presenter == "web"
    assert result.edits.remove == ("authorization",)  # forwardOriginalToken defaults to false


def test_token_without_kid_finds_its_key_among_several() -> None:
    assert check(DEFAULT, bearer(token(EC_KEY, "ES256", None))).allowed


def test_no_token_is_anonymous() -> None:
    result = check(DEFAULT, [("Authorization", "Basic dXNlcjpwdw==")])
    assert result.allowed and result.auth is None
    assert result.edits.remove == ()


# --- invalid tokens ----------------------------------------------------------------------------


def rejected(result: Any, status: JwtStatus, code: int = 401) -> None:
    assert not result.allowed
    assert (result.status, result.failure, result.body) == (code, status, status.value)


def test_expired_with_clock_skew() -> None:
    rejected(check(DEFAULT, bearer(token(exp=NOW - CLOCK_SKEW_SECONDS - 1))), JwtStatus.EXPIRED)
    assert check(DEFAULT, bearer(token(exp=NOW - CLOCK_SKEW_SECONDS))).allowed
    assert JwtStatus.EXPIRED.value == "Jwt is expired"


def test_not_yet_valid_with_clock_skew() -> None:
    rejected(check(DEFAULT, bearer(token(nbf=NOW + 61))), JwtStatus.NOT_YET_VALID)
    assert check(DEFAULT, bearer(token(nbf=NOW + 60))).allowed


def test_wrong_audience_is_forbidden() -> None:
    result = check(DEFAULT, bearer(token(aud=["billing"])))
    rejected(result, JwtStatus.AUDIENCE_NOT_ALLOWED, 403)
    assert result.body == "Audiences in Jwt are not allowed"
    rejected(check(DEFAULT, bearer(token(aud=None))), JwtStatus.AUDIENCE_NOT_ALLOWED, 403)
    # Scheme and trailing slash are ignored on both sides.
    assert check(DEFAULT, bearer(token(aud="https://shop/"))).allowed


def test_no_audiences_configured_accepts_any() -> None:
    assert check(Authenticator([policy(rule())]), bearer(token(aud="whatever"))).allowed


def test_wrong_issuer() -> None:
    result = check(DEFAULT, bearer(token(iss="https://evil.example.com")))
    rejected(result, JwtStatus.UNKNOWN_ISSUER)
    assert result.body == "Jwt issuer is not configured"
    assert result.response_headers == (
        ("www-authenticate", 'Bearer realm="http://shop.ns:8080/x", error="invalid_token"'),
    )


def test_bad_signature() -> None:
    forged = token(RSA_OTHER, "RS256", "rsa")
    result = check(DEFAULT, bearer(forged))
    rejected(result, JwtStatus.VERIFICATION_FAIL)
    assert result.body == "Jwt verification fails"
    head, payload, signature = token().split(".")
    tampered = f"{head}.{payload[:-2]}xy.{signature}"
    assert not check(DEFAULT, bearer(tampered)).allowed


def test_alg_none_and_symmetric_algorithms_are_refused() -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    claims = {"iss": ISSUER, "sub": "alice", "aud": "shop"}
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    unsigned = f"{header}.{body}."
    rejected(check(DEFAULT, bearer(unsigned)), JwtStatus.HEADER_NOT_IMPLEMENTED_ALG)
    hmac = pyjwt.encode({"iss": ISSUER, "aud": "shop"}, "a" * 32, algorithm="HS256")
    rejected(check(DEFAULT, bearer(hmac)), JwtStatus.HEADER_NOT_IMPLEMENTED_ALG)


def test_unknown_kid_with_several_keys() -> None:
    result = check(DEFAULT, bearer(token(kid="rotated-away")))
    rejected(result, JwtStatus.JWKS_KID_ALG_MISMATCH)
    # A key whose alg contradicts the token's is not tried either.
    rejected(
        check(DEFAULT, bearer(token(RSA_KEY, "RS384", "rsa"))), JwtStatus.JWKS_KID_ALG_MISMATCH
    )


def test_malformed_tokens() -> None:
    rejected(check(DEFAULT, bearer("not-a-jwt")), JwtStatus.BAD_FORMAT)
    rejected(check(DEFAULT, bearer("a.b.c")), JwtStatus.HEADER_PARSE_ERROR)
    good = token().split(".")
    rejected(check(DEFAULT, bearer(f"{good[0]}.@@.{good[2]}")), JwtStatus.PAYLOAD_PARSE_ERROR)
    string_exp = token(exp="soon")
    rejected(check(DEFAULT, bearer(string_exp)), JwtStatus.PAYLOAD_PARSE_ERROR)


def test_every_token_must_be_valid() -> None:
    headers = [*bearer(token()), ("x", "y")]
    path = "/x?access_token=" + token(exp=NOW - 3600)
    rejected(check(DEFAULT, headers, path), JwtStatus.EXPIRED)


# --- locations and header edits ----------------------------------------------------------------


def test_token_from_the_default_query_parameter() -> None:
    result = check(DEFAULT, [], f"/items?a=1&access_token={token()}&b=2")
    assert result.allowed and result.auth is not None
    assert result.edits.path == "/items?a=1&b=2"  # removed, as the token is not forwarded


def test_token_from_a_configured_param_header_and_cookie() -> None:
    auth = Authenticator(
        [
            policy(
                rule(
                    fromParams=["jwt"],
                    fromHeaders=[{"name": "X-Jwt", "prefix": "Token "}],
                    fromCookies=["session"],
                )
            )
        ]
    )
    assert check(auth, [], f"/p?jwt={token()}").edits.path == "/p"
    result = check(auth, [("x-jwt", f"Token {token()}")])
    assert result.allowed and result.edits.remove == ("x-jwt",)
    assert check(auth, [("cookie", f"a=b; session={token()}")]).auth is not None
    # Configured locations replace the defaults.
    assert check(auth, bearer(token())).auth is None
    assert check(auth, [], f"/p?access_token={token()}").auth is None


def test_token_where_its_issuer_does_not_look_is_refused() -> None:
    other = {"issuer": "https://other", "jwks": JWKS, "fromHeaders": [{"name": "x-other"}]}
    auth = Authenticator([policy(rule(fromHeaders=[{"name": "x-jwt"}]), other)])
    rejected(check(auth, [("x-other", token())]), JwtStatus.UNKNOWN_ISSUER)
    assert check(auth, [("x-jwt", token())]).allowed


def test_forward_original_token_keeps_it() -> None:
    auth = Authenticator([policy(rule(forwardOriginalToken=True))])
    result = check(auth, bearer(token()), f"/p?access_token={token()}")
    assert result.allowed and result.edits.remove == () and result.edits.path is None


def test_output_payload_and_claims_to_headers() -> None:
    auth = Authenticator(
        [
            policy(
                rule(
                    outputPayloadToHeader="x-jwt-payload",
                    outputClaimToHeaders=[
                        {"header": "x-sub", "claim": "sub"},
                        {"header": "x-level", "claim": "level"},
                        {"header": "x-admin", "claim": "admin"},
                        {"header": "x-team", "claim": "org.team"},
                        {"header": "x-groups", "claim": "groups"},
                    ],
                )
            )
        ]
    )
    signed = token(level=3, admin=True, org={"team": "payments"}, groups=["a"])
    result = check(auth, [*bearer(signed), ("x-sub", "forged")])
    assert result.allowed
    added = dict(result.edits.add)
    payload_text = added["x-jwt-payload"]
    assert "=" not in payload_text and payload_text == signed.split(".")[1]
    decoded = json.loads(base64.urlsafe_b64decode(payload_text + "=" * (-len(payload_text) % 4)))
    assert decoded["sub"] == "alice"
    assert added["x-sub"] == "alice" and added["x-level"] == "3" and added["x-admin"] == "true"
    assert added["x-team"] == "payments" and "x-groups" not in added  # lists are not copied
    # Output headers are always stripped from the incoming request, token or not.
    assert set(result.edits.remove) >= {"x-jwt-payload", "x-sub", "authorization"}
    assert "x-sub" in check(auth, [("x-sub", "forged")]).edits.remove


# --- configuration -----------------------------------------------------------------------------


def test_jwks_from_a_file_is_filled_by_the_caller() -> None:
    parsed = policy({"issuer": ISSUER, "jwksUri": "file:///etc/jwks/keys.json"})
    assert parsed.jwks_files() == ("/etc/jwks/keys.json",)
    unresolved = Authenticator([parsed])
    rejected(check(unresolved, bearer(token())), JwtStatus.JWKS_FETCH_FAIL)
    resolved = parsed.with_jwks_files({"/etc/jwks/keys.json": JWKS.encode()})
    assert check(Authenticator([resolved]), bearer(token())).allowed
    broken = parsed.with_jwks_files({"/etc/jwks/keys.json": b"{"})
    rejected(check(Authenticator([broken]), bearer(token())), JwtStatus.JWKS_PARSE_ERROR)


def test_remote_jwks_is_an_error_but_fails_closed() -> None:
    config = read_request_authentications(
        [
            resource(
                {
                    "targetRefs": [WAYPOINT],
                    "jwtRules": [{"issuer": ISSUER, "jwksUri": "https://issuer.example.com/k"}],
                }
            )
        ]
    )
    (kept,) = config.policies
    (error,) = config.errors
    assert error.path == "spec.jwtRules[0].jwksUri" and "only file://" in error.reason
    rejected(check(Authenticator([kept]), bearer(token())), JwtStatus.JWKS_FETCH_FAIL)
    assert check(Authenticator([kept])).allowed  # requests without a token still pass


def test_read_request_authentications() -> None:
    good = resource({"targetRefs": [WAYPOINT], "jwtRules": [rule()]}, name="good")
    selector = resource(
        {"selector": {"matchLabels": {"app": "x"}}, "jwtRules": [rule()]}, name="sel"
    )
    bad = resource({"targetRefs": [WAYPOINT], "jwtRules": [{"jwks": JWKS}]}, name="bad")
    bad_keys = resource(
        {"targetRefs": [WAYPOINT], "jwtRules": [{"issuer": ISSUER, "jwks": '{"keys": []}'}]},
        name="nokeys",
    )
    header = resource(
        {"targetRefs": [WAYPOINT], "jwtRules": [rule(fromHeaders=[{"name": "bad header"}])]},
        name="hdr",
    )
    config = read_request_authentications([good, selector, bad, bad_keys, header])
    assert [p.name for p in config.policies] == ["good", "nokeys"]
    assert [n.key for n in config.notes] == ["ns/sel"]
    by_key = {e.key: e for e in config.errors}
    assert by_key["ns/bad"].path == "spec.jwtRules[0].issuer"
    assert "Jwks doesn't have any valid public key" in by_key["ns/nokeys"].reason
    assert by_key["ns/hdr"].path == "spec.jwtRules[0].fromHeaders[0].name"


def test_load_jwks_errors() -> None:
    for data, status in (
        (b"[", JwtStatus.JWKS_PARSE_ERROR),
        (b"{}", JwtStatus.JWKS_NO_KEYS),
        (b'{"keys": 1}', JwtStatus.JWKS_BAD_KEYS),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', JwtStatus.JWKS_NO_VALID_KEYS),
        (b'{"keys": [{"kty": "RSA", "n": "AQAB"}]}', JwtStatus.JWKS_NO_VALID_KEYS),
    ):
        with pytest.raises(JwksError) as caught:
            load_jwks(data)
        assert caught.value.status is status
    keys = load_jwks(JWKS)
    assert [k.kid for k in keys] == ["rsa", "ec", "ed"]


# --- with authorization ------------------------------------------------------------------------


def test_jwt_result_feeds_authorization() -> None:
    require = parse_authorization_policy(
        Resource(
            "p.yaml",
            0,
            "security.istio.io/v1",
            "AuthorizationPolicy",
            "require-jwt",
            "ns",
            {
                "spec": {
                    "targetRefs": [WAYPOINT],
                    "rules": [{"from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}]}],
                }
            },
        )
    )
    assert require is not None

    def decide(headers: list[tuple[str, str]]) -> bool:
        result = check(DEFAULT, headers)
        assert result.allowed
        context = RequestContext(
            "GET", "/x", "shop.ns:8080", 8080, Headers.of(headers), auth=result.auth
        )
        return evaluate([require], context).allowed

    assert decide(bearer(token()))
    assert not decide([])  # anonymous passes authentication, then authorization denies it


# --- robustness --------------------------------------------------------------------------------


@given(
    value=st.text(max_size=200),
    path=st.text(max_size=100),
    cookie=st.text(max_size=100),
)
def test_arbitrary_input_never_raises(value: str, path: str, cookie: str) -> None:
    auth = Authenticator([policy(rule(fromCookies=["s"]), rule(issuer="https://b"))])
    headers = [("authorization", value), ("cookie", cookie)]
    result = auth.authenticate(headers, "/" + path, now=NOW)
    assert result.status in (None, 401, 403)


@given(st.lists(st.sampled_from(["e30", "eyJhbGciOiJSUzI1NiJ9", "x", "", "."]), max_size=5))
def test_odd_token_shapes(parts: list[str]) -> None:
    result = check(DEFAULT, bearer(".".join(parts)))
    assert result.status in (None, 401)
