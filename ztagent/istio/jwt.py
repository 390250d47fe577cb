"""Request authentication at the waypoint: RequestAuthentication and JWT validation. Pure, no I/O.

This module owns reading RequestAuthentication resources attached to waypoints by `targetRefs`
(one with a `selector`, or neither, is for the node agent or sidecars and is skipped with a
note), parsing JSON Web Key Sets, finding tokens in a request and validating them. It reads no
files and no clock: a `jwksUri` of the form `file:///path` is left for the caller to read and
hand back as bytes (`RequestAuthentication.with_jwks_files`), and `now` is an argument. Other
URIs (http, https) are not fetched: tokens from such an issuer are rejected, fail closed, as
Istio does when it cannot fetch a JWKS.

Behaviour, as Istio configures Envoy's jwt_authn filter (one provider per jwtRule, satisfied by
any provider, or by no token at all):
  - tokens are looked for in each rule's `fromHeaders` (name and prefix), `fromParams` and
    `fromCookies`; a rule that names none uses `Authorization: Bearer <token>` and the query
    parameter `access_token`;
  - no token: the request goes on anonymous (`RequestAuth` None); AuthorizationPolicy decides
    whether that is enough (`requestPrincipals: ["*"]` denies it);
  - every token found must be valid, checked in Envoy's order: well-formed (`alg: none` and
    unknown algorithms are refused), an issuer that a rule covering that location names,
    `nbf`/`exp` with 60 s of clock skew (Envoy's default), the rule's `audiences` if any
    (compared without `http://`/`https://` and a trailing `/`), then the signature with a key
    from the rule's JWKS whose `kid` and `alg` do not contradict the token's;
  - an invalid token is answered 401 with Envoy's message as the body (`Jwt is expired`,
    `Jwt issuer is not configured`, `Jwt verification fails`, ...) and
    `www-authenticate: Bearer realm="<uri>", error="invalid_token"`; a token whose audience is
    not allowed gets 403 `Audiences in Jwt are not allowed`, as Envoy answers it;
  - a valid token yields the request principal `iss/sub`, its claims, audiences and presenter
    (`azp`); the first token found is the one reported;
  - header edits: the output headers any rule writes are always removed from the incoming
    request (a client cannot forge them); for a valid token, `outputPayloadToHeader` gets the
    token's base64url payload, `outputClaimToHeaders` the claims (strings as they are, numbers
    and booleans as text); unless `forwardOriginalToken` is true the token is removed (its header,
    or its query parameter; cookies are left as they are, as Envoy does).
Symmetric (`oct`/HS*) keys are not accepted: a waypoint verifies with public keys only.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec

from ztagent.fields import Invalid, boolean, show
from ztagent.fields import at as _at
from ztagent.fields import mapping as _map
from ztagent.fields import only as _only
from ztagent.fields import sequence as _list
from ztagent.fields import string as _str
from ztagent.fields import strings as _strings
from ztagent.istio.authorization.l7 import RequestAuth
from ztagent.istio.authorization.policy import TargetRef, read_target_refs
from ztagent.istio.authorization.waypoint import check_kind, read_attached, resource_error
from ztagent.istio.envelope import Resource, ResourceError
from ztagent.names import DEFAULT_ROOT_NAMESPACE

KIND = "RequestAuthentication"

CLOCK_SKEW_SECONDS = 60
"""Envoy jwt_authn's default `clock_skew_seconds`; Istio does not change it."""
AUTHORIZATION = "authorization"
BEARER_PREFIX = "Bearer "
ACCESS_TOKEN_PARAM = "access_token"
MAX_REALM_PATH = 256

ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
"""Signature algorithms accepted in a token header (public-key ones Envoy implements)."""

_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class JwtStatus(enum.Enum):
    """Why a token was refused; the value is Envoy's wording, which becomes the response body."""

    BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature"
    HEADER_PARSE_ERROR = "Jwt header is an invalid Base64url input or an invalid JSON"
    HEADER_BAD_ALG = "Jwt header [alg] field is not a string"
    HEADER_NOT_IMPLEMENTED_ALG = "Jwt header [alg] field value is invalid"
    HEADER_BAD_KID = "Jwt header [kid] field is not a string"
    PAYLOAD_PARSE_ERROR = "Jwt payload is an invalid Base64 or an invalid JSON"
    SIGNATURE_PARSE_ERROR = "Jwt signature is an invalid Base64"
    UNKNOWN_ISSUER = "Jwt issuer is not configured"
    NOT_YET_VALID = "Jwt not yet valid"
    EXPIRED = "Jwt is expired"
    AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
    VERIFICATION_FAIL = "Jwt verification fails"
    JWKS_PARSE_ERROR = "Jwks is an invalid JSON"
    JWKS_NO_KEYS = "Jwks does not have [keys] field"
    JWKS_BAD_KEYS = "[keys] in Jwks is not an array"
    JWKS_NO_VALID_KEYS = "Jwks doesn't have any valid public key"
    JWKS_KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"
    JWKS_FETCH_FAIL = "Jwks remote fetch is failed"

    @property
    def http_status(self) -> int:
        return 403 if self is JwtStatus.AUDIENCE_NOT_ALLOWED else 401


class JwksError(ValueError):
    """A JWKS that cannot be used; `status` says why in Envoy's words."""

    def __init__(self, status: JwtStatus) -> None:
        super().__init__(status.value)
        self.status = status


# --- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublicKey:
    """One usable key of a JWKS: `kty` RSA, EC or OKP, with its optional `kid` and `alg`."""

    kty: str
    key: Any = field(repr=False)
    kid: str | None = None
    alg: str | None = None
    crv: str | None = None

    def fits(self, alg: str) -> bool:
        """The key can check a signature made with `alg` (type and curve agree)."""
        if _KEY_TYPES.get(alg[:2]) != self.kty:
            return False
        if self.kty == "EC":
            return isinstance(self.key, ec.EllipticCurvePublicKey) and (
                self.key.curve.name == _EC_CURVES.get(alg)
            )
        return True


KeySet = tuple[PublicKey, ...]
_PUBLIC_MEMBERS = ("kty", "crv", "n", "e", "x", "y", "alg")


def _public_key(data: Mapping[str, Any]) -> PublicKey | None:
    kty = data.get("kty")
    kid = data.get("kid")
    alg = data.get("alg")
    if kty not in ("RSA", "EC", "OKP"):
        return None  # missing, unknown, or symmetric: skipped as Envoy skips invalid keys
    if kid is not None and not isinstance(kid, str):
        return None
    if alg is not None and (not isinstance(alg, str) or _KEY_TYPES.get(alg[:2]) != kty):
        return None
    public = {k: data[k] for k in _PUBLIC_MEMBERS if k in data}
    try:
        parsed = pyjwt.PyJWK(public)
    except (pyjwt.PyJWKError, pyjwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    crv = data.get("crv") if isinstance(data.get("crv"), str) else None
    return PublicKey(kty, parsed.key, kid, alg, crv)


def load_jwks(data: bytes | str) -> KeySet:
    """Parse a JSON Web Key Set (the `jwks` field, or a `jwksUri` file's bytes).

    Keys Envoy would not use are skipped; raises `JwksError` when nothing usable is left.
    """
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise JwksError(JwtStatus.JWKS_PARSE_ERROR) from None
    if not isinstance(document, dict):
        raise JwksError(JwtStatus.JWKS_PARSE_ERROR)
    if "keys" not in document:
        raise JwksError(JwtStatus.JWKS_NO_KEYS)
    keys = document["keys"]
    if not isinstance(keys, list):
        raise JwksError(JwtStatus.JWKS_BAD_KEYS)
    usable = tuple(
        key for key in (_public_key(item) for item in keys if isinstance(item, dict)) if key
    )
    if not usable:
        raise JwksError(JwtStatus.JWKS_NO_VALID_KEYS)
    return usable


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JwksSource:
    """Where a rule's keys come from: inline JSON (`jwks`) or a URI (`jwksUri`)."""

    inline: str | None = None
    uri: str | None = None

    @property
    def file_path(self) -> str | None:
        """The local path of a `file://` URI (host empty or `localhost`), else None."""
        if self.inline is not None or self.uri is None:
            return None
        parts = urllib.parse.urlsplit(self.uri)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
            return None
        return urllib.parse.unquote(parts.path)


@dataclass(frozen=True, slots=True)
class HeaderLocation:
    """`fromHeaders` entry: the header (lower-case) and the prefix before the token."""

    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    header: str
    claim: str


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One `jwtRules` entry. `keys` is None until known; `keys_problem` then says why."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: JwksSource = field(default_factory=JwksSource)
    from_headers: tuple[HeaderLocation, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_payload_to_header: str | None = None
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    keys: KeySet | None = None
    keys_problem: JwtStatus | None = JwtStatus.JWKS_FETCH_FAIL

    @property
    def locations(self) -> tuple[HeaderLocation | _Param | _Cookie, ...]:
        """Where this rule looks for tokens, with Envoy's defaults when it names none."""
        if not (self.from_headers or self.from_params or self.from_cookies):
            return (HeaderLocation(AUTHORIZATION, BEARER_PREFIX), _Param(ACCESS_TOKEN_PARAM))
        return (
            *self.from_headers,
            *(_Param(name) for name in self.from_params),
            *(_Cookie(name) for name in self.from_cookies),
        )

    def with_jwks(self, data: bytes | str) -> JwtRule:
        """This rule with its keys read from `data` (a `jwksUri` file's content)."""
        try:
            return replace(self, keys=load_jwks(data), keys_problem=None)
        except JwksError as exc:
            return replace(self, keys=(), keys_problem=exc.status)


@dataclass(frozen=True, slots=True)
class _Param:
    name: str


@dataclass(frozen=True, slots=True)
class _Cookie:
    name: str


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    """One RequestAuthentication attached by `targetRefs`."""

    name: str
    namespace: str
    targets: tuple[TargetRef, ...]
    rules: tuple[JwtRule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def jwks_files(self) -> tuple[str, ...]:
        """The local files the rules' keys must be read from."""
        paths = (rule.jwks.file_path for rule in self.rules)
        return tuple(dict.fromkeys(path for path in paths if path is not None))

    def with_jwks_files(self, files: Mapping[str, bytes]) -> RequestAuthentication:
        """This policy with the keys of every rule whose `file://` JWKS is in `files`."""
        rules = []
        for rule in self.rules:
            path = rule.jwks.file_path
            rules.append(
                rule.with_jwks(files[path]) if path is not None and path in files else rule
            )
        return replace(self, rules=tuple(rules))


def _header_name(value: object, path: str) -> str:
    name = _str(value, path)
    if not _HEADER_NAME.fullmatch(name):
        raise Invalid(path, f"{show(name)} is not a valid HTTP header name")
    return name.lower()


def _jwks_source(data: Mapping[str, Any], path: str) -> tuple[JwksSource, str | None]:
    """The source, and a problem to report when the keys cannot be had."""
    inline = _str(data.get("jwks"), _at(path, "jwks")) or None
    uri = _str(data.get("jwksUri"), _at(path, "jwksUri")) or None
    if uri is not None:
        try:
            parts = urllib.parse.urlsplit(uri)
        except ValueError:  # an unclosed "[" of an IPv6 host, among others
            parts = urllib.parse.SplitResult("", "", "", "", "")
        if parts.scheme not in ("file", "http", "https") or (
            parts.scheme != "file" and not parts.netloc
        ):
            raise Invalid(_at(path, "jwksUri"), f"{show(uri)} is not an http, https or file URI")
    source = JwksSource(inline, uri)
    if inline is not None:
        return source, None
    if uri is None:
        return source, "neither jwks nor jwksUri is set (OpenID discovery is not supported)"
    if source.file_path is None:
        return source, f"{show(uri)} is not fetched: only file:// URIs are supported"
    return source, None


def _jwt_rule(value: object, path: str) -> tuple[JwtRule, list[tuple[str, str]]]:
    data = _map(value, path)
    _only(
        data,
        path,
        (
            "issuer",
            "audiences",
            "jwksUri",
            "jwks",
            "fromHeaders",
            "fromParams",
            "fromCookies",
            "outputPayloadToHeader",
            "outputClaimToHeaders",
            "forwardOriginalToken",
            "timeout",
        ),
    )
    problems: list[tuple[str, str]] = []
    issuer = _str(data.get("issuer"), _at(path, "issuer"))
    if not issuer:
        raise Invalid(_at(path, "issuer"), "is required")
    audiences = tuple(_strings(data.get("audiences"), _at(path, "audiences")))
    headers = []
    for i, item in enumerate(_list(data.get("fromHeaders"), _at(path, "fromHeaders"))):
        ipath = _at(_at(path, "fromHeaders"), i)
        entry = _map(item, ipath)
        _only(entry, ipath, ("name", "prefix"))
        name = _header_name(entry.get("name"), _at(ipath, "name"))
        headers.append(HeaderLocation(name, _str(entry.get("prefix"), _at(ipath, "prefix"))))
    claims = []
    for i, item in enumerate(
        _list(data.get("outputClaimToHeaders"), _at(path, "outputClaimToHeaders"))
    ):
        ipath = _at(_at(path, "outputClaimToHeaders"), i)
        entry = _map(item, ipath)
        _only(entry, ipath, ("header", "claim"))
        header = _header_name(entry.get("header"), _at(ipath, "header"))
        claim = _str(entry.get("claim"), _at(ipath, "claim"))
        if not claim:
            raise Invalid(_at(ipath, "claim"), "is required")
        claims.append(ClaimToHeader(header, claim))
    payload_header = None
    if data.get("outputPayloadToHeader"):
        payload_header = _header_name(
            data["outputPayloadToHeader"], _at(path, "outputPayloadToHeader")
        )
    source, problem = _jwks_source(data, path)
    rule = JwtRule(
        issuer=issuer,
        audiences=audiences,
        jwks=source,
        from_headers=tuple(headers),
        from_params=tuple(_strings(data.get("fromParams"), _at(path, "fromParams"))),
        from_cookies=tuple(_strings(data.get("fromCookies"), _at(path, "fromCookies"))),
        forward_original_token=boolean(
            data.get("forwardOriginalToken"), _at(path, "forwardOriginalToken")
        ),
        output_payload_to_header=payload_header,
        output_claim_to_headers=tuple(claims),
    )
    if source.inline is not None:
        rule = rule.with_jwks(source.inline)
        if rule.keys_problem is not None:
            problem = f"no usable key: {rule.keys_problem.value}"
            problems.append((_at(path, "jwks"), problem + "; tokens from this issuer are refused"))
    elif problem is not None:
        where = _at(path, "jwksUri" if source.uri else "jwks")
        problems.append((where, problem + "; tokens from this issuer are refused"))
    return rule, problems


def parse_request_authentication(
    resource: Resource, *, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> tuple[RequestAuthentication | None, list[tuple[str, str]]]:
    """Read one RequestAuthentication: the policy (None without `targetRefs`) and problems
    `(field path, reason)` that leave it in force but refusing some tokens (unusable keys).

    Raises `Invalid` for anything Istio would reject.
    """
    check_kind(resource, KIND)
    namespace = resource.namespace or "default"
    spec = _map(resource.body.get("spec"), "spec")
    _only(spec, "spec", ("selector", "targetRef", "targetRefs", "jwtRules"))
    targets = read_target_refs(spec, namespace, root_namespace=root_namespace)
    rules: list[JwtRule] = []
    problems: list[tuple[str, str]] = []
    for i, item in enumerate(_list(spec.get("jwtRules"), "spec.jwtRules")):
        rule, found = _jwt_rule(item, _at("spec.jwtRules", i))
        rules.append(rule)
        problems.extend(found)
    if not targets:
        return None, []
    return RequestAuthentication(resource.name, namespace, targets, tuple(rules)), problems


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """The waypoint's RequestAuthentications, errors (policies left out, or kept with rules
    that refuse every token of their issuer) and notes on policies that are not the waypoint's."""

    policies: tuple[RequestAuthentication, ...] = ()
    errors: tuple[ResourceError, ...] = ()
    notes: tuple[ResourceError, ...] = ()


def read_request_authentications(
    resources: Iterable[Resource], *, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> JwtConfig:
    """Every RequestAuthentication among `resources` that belongs to waypoints."""

    def parse(
        resource: Resource,
    ) -> tuple[RequestAuthentication, list[tuple[str, str]]] | None:
        policy, problems = parse_request_authentication(resource, root_namespace=root_namespace)
        return None if policy is None else (policy, problems)

    found, errors, notes = read_attached(resources, KIND, parse)
    policies: list[RequestAuthentication] = []
    for resource, (policy, problems) in found:
        errors.extend(resource_error(resource, path, reason) for path, reason in problems)
        policies.append(policy)
    return JwtConfig(tuple(policies), tuple(errors), tuple(notes))


# --- tokens ------------------------------------------------------------------------------------


def _b64decode(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(_b64decode(text))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _is_time(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 0 and float(value).is_integer()


@dataclass(frozen=True, slots=True)
class _Jwt:
    alg: str
    kid: str | None
    payload: dict[str, Any]
    payload_b64: str
    signing_input: bytes
    signature: bytes

    @property
    def issuer(self) -> str:
        value = self.payload.get("iss")
        return value if isinstance(value, str) else ""

    @property
    def audiences(self) -> tuple[str, ...]:
        value = self.payload.get("aud")
        if isinstance(value, str):
            return (value,)
        return tuple(value) if isinstance(value, list) else ()


def _parse_jwt(token: str) -> _Jwt | JwtStatus:
    parts = token.split(".")
    if len(parts) != 3:
        return JwtStatus.BAD_FORMAT
    try:
        header = _json_object(parts[0])
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return JwtStatus.HEADER_PARSE_ERROR
    alg = header.get("alg")
    if not isinstance(alg, str):
        return JwtStatus.HEADER_BAD_ALG
    if alg not in ALGORITHMS:
        return JwtStatus.HEADER_NOT_IMPLEMENTED_ALG
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return JwtStatus.HEADER_BAD_KID
    try:
        payload = _json_object(parts[1])
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return JwtStatus.PAYLOAD_PARSE_ERROR
    for name in ("iss", "sub", "jti"):
        if name in payload and not isinstance(payload[name], str):
            return JwtStatus.PAYLOAD_PARSE_ERROR
    aud = payload.get("aud")
    if aud is not None and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        return JwtStatus.PAYLOAD_PARSE_ERROR
    for name in ("exp", "nbf", "iat"):
        if name in payload and not _is_time(payload[name]):
            return JwtStatus.PAYLOAD_PARSE_ERROR
    try:
        signature = _b64decode(parts[2])
    except (ValueError, binascii.Error):
        return JwtStatus.SIGNATURE_PARSE_ERROR
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    return _Jwt(alg, kid, payload, parts[1], signing_input, signature)


def _sanitize_audience(text: str) -> str:
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    return text.removesuffix("/")


def _verify_signature(token: _Jwt, keys: KeySet) -> JwtStatus | None:
    algorithm = pyjwt.get_algorithm_by_name(token.alg)
    tried = False
    for key in keys:
        if token.kid is not None and key.kid is not None and key.kid != token.kid:
            continue
        if key.alg is not None and key.alg != token.alg:
            continue
        if not key.fits(token.alg):
            continue
        tried = True
        try:
            if algorithm.verify(token.signing_input, key.key, token.signature):
                return None
        except (ValueError, TypeError, pyjwt.PyJWTError):
            continue
    return JwtStatus.VERIFICATION_FAIL if tried else JwtStatus.JWKS_KID_ALG_MISMATCH


def _verify_token(
    token: str, rules: Sequence[JwtRule], *, now: float
) -> tuple[_Jwt, JwtRule] | JwtStatus:
    """Validate one token against the rules allowed where it was found (Envoy's order)."""
    parsed = _parse_jwt(token)
    if isinstance(parsed, JwtStatus):
        return parsed
    rule = next((r for r in rules if r.issuer == parsed.issuer), None)
    if rule is None:
        return JwtStatus.UNKNOWN_ISSUER
    seconds = int(now)
    nbf = parsed.payload.get("nbf")
    if nbf is not None and seconds + CLOCK_SKEW_SECONDS < nbf:
        return JwtStatus.NOT_YET_VALID
    exp = parsed.payload.get("exp")
    if exp is not None and seconds > exp + CLOCK_SKEW_SECONDS:
        return JwtStatus.EXPIRED
    if rule.audiences:
        allowed = {_sanitize_audience(a) for a in rule.audiences}
        if not any(_sanitize_audience(a) in allowed for a in parsed.audiences):
            return JwtStatus.AUDIENCE_NOT_ALLOWED
    if rule.keys is None or not rule.keys:
        return rule.keys_problem or JwtStatus.JWKS_NO_VALID_KEYS
    problem = _verify_signature(parsed, rule.keys)
    return problem if problem is not None else (parsed, rule)


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """Changes to the request before it goes upstream: remove these headers (lower-case
    names), then add these; `path` replaces `:path` when a token left the query string."""

    remove: tuple[str, ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    path: str | None = None


@dataclass(frozen=True, slots=True)
class AuthnResult:
    """The outcome for one request.

    `status` None lets the request through (`auth` is None for anonymous); otherwise answer
    `status` with `body` and `response_headers`, and `failure` says which check failed.
    """

    status: int | None = None
    body: str = ""
    failure: JwtStatus | None = None
    response_headers: tuple[tuple[str, str], ...] = ()
    auth: RequestAuth | None = None
    edits: HeaderEdits = field(default_factory=HeaderEdits)

    @property
    def allowed(self) -> bool:
        return self.status is None


def _query_params(path: str) -> list[tuple[str, str, str]]:
    """`(name, value, raw item)` for each query item, names and values percent-decoded."""
    _, mark, query = path.partition("?")
    query = query.partition("#")[0]
    if not mark or not query:
        return []
    out = []
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        out.append((urllib.parse.unquote(name), urllib.parse.unquote(value), item))
    return out


def _without_param(path: str, param: str) -> str:
    base, mark, rest = path.partition("?")
    _, hash_mark, fragment = rest.partition("#")
    kept = [raw for name, _, raw in _query_params(path) if name != param]
    text = base + ("?" + "&".join(kept) if kept else "")
    return text + (hash_mark + fragment if hash_mark else "") if mark else path


def _cookies(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in headers:
        if name.lower() != "cookie":
            continue
        for item in value.split(";"):
            key, eq, text = item.strip().partition("=")
            if eq and key and key not in found:
                if len(text) >= 2 and text[0] == text[-1] == '"':
                    text = text[1:-1]
                found[key] = text
    return found


def _from_header(value: str, prefix: str) -> str | None:
    if not prefix:
        return value
    at = value.find(prefix)
    if at == -1:
        return None
    start = at + len(prefix)
    while start < len(value) and value[start] not in _TOKEN_CHARS:
        start += 1
    return value[start:] if start < len(value) else value


def _claim_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or None
    if isinstance(value, int):
        return str(value) if value >= 0 else f"{value:.6f}"
    if isinstance(value, float):
        if value.is_integer() and 0 <= value < 2**64:
            return str(int(value))
        return f"{value:.6f}"
    return None


def _claim(payload: Mapping[str, Any], name: str) -> object:
    node: object = payload
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True, slots=True)
class _Found:
    token: str
    location: HeaderLocation | _Param | _Cookie
    rules: tuple[JwtRule, ...]


class Authenticator:
    """The RequestAuthentications that apply to one destination, ready to check requests."""

    def __init__(self, policies: Iterable[RequestAuthentication]) -> None:
        self.rules: tuple[JwtRule, ...] = tuple(r for p in policies for r in p.rules)
        where: dict[HeaderLocation | _Param | _Cookie, list[JwtRule]] = {}
        for rule in self.rules:
            for location in rule.locations:
                where.setdefault(location, []).append(rule)
        self._locations = {location: tuple(rules) for location, rules in where.items()}
        outputs: list[str] = []
        for rule in self.rules:
            if rule.output_payload_to_header:
                outputs.append(rule.output_payload_to_header)
            outputs.extend(c.header for c in rule.output_claim_to_headers)
        self._outputs = tuple(dict.fromkeys(outputs))

    def _find(self, headers: Sequence[tuple[str, str]], path: str) -> list[_Found]:
        found: list[_Found] = []
        params = None
        cookies = None
        for location, rules in self._locations.items():
            if isinstance(location, HeaderLocation):
                for name, value in headers:
                    if name.lower() == location.name:
                        token = _from_header(value, location.prefix)
                        if token is not None:
                            found.append(_Found(token, location, rules))
            elif isinstance(location, _Param):
                if params is None:
                    params = _query_params(path)
                param = next((v for n, v, _ in params if n == location.name), None)
                if param is not None:
                    found.append(_Found(param, location, rules))
            else:
                if cookies is None:
                    cookies = _cookies(headers)
                if location.name in cookies:
                    found.append(_Found(cookies[location.name], location, rules))
        return found

    def authenticate(
        self,
        headers: Sequence[tuple[str, str]],
        path: str,
        *,
        now: float,
        host: str = "",
        scheme: str = "http",
    ) -> AuthnResult:
        """Check one request's tokens. `headers` are the request's header pairs, `path` its
        `:path` (query string included), `now` the time in seconds since the epoch; `host`
        and `scheme` only shape the realm of a `www-authenticate` answer."""
        remove = list(self._outputs)
        add: list[tuple[str, str]] = []
        new_path: str | None = None
        first: RequestAuth | None = None
        for found in self._find(headers, path):
            outcome = _verify_token(found.token, found.rules, now=now)
            if isinstance(outcome, JwtStatus):
                realm = f"{scheme}://{host}{path[:MAX_REALM_PATH]}"
                challenge = f'Bearer realm="{realm}", error="invalid_token"'
                return AuthnResult(
                    status=outcome.http_status,
                    body=outcome.value,
                    failure=outcome,
                    response_headers=(("www-authenticate", challenge),),
                )
            token, rule = outcome
            if first is None:
                first = RequestAuth(token.payload)
            if rule.output_payload_to_header:
                add.append((rule.output_payload_to_header, token.payload_b64.rstrip("=")))
            for item in rule.output_claim_to_headers:
                text = _claim_text(_claim(token.payload, item.claim))
                if text is not None:
                    add.append((item.header, text))
            if not rule.forward_original_token:
                location = found.location
                if isinstance(location, HeaderLocation):
                    remove.append(location.name)
                elif isinstance(location, _Param):
                    new_path = _without_param(new_path or path, location.name)
        edits = HeaderEdits(tuple(dict.fromkeys(remove)), tuple(add), new_path)
        return AuthnResult(auth=first, edits=edits)
