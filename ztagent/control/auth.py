"""Who is calling the control plane: bearer tokens in, a `Caller` out.

Node agents and workloads authenticate to the xDS and CA services with a bearer token in the
`authorization` header, as ztunnel does with istiod. What proves the token depends on the
source of configuration:

- the YAML-directory mode signs its own tokens (`TokenSigner`, ES256 JWTs shaped like
  Kubernetes projected service-account tokens, one file per node agent);
- the cluster mode asks the Kubernetes API (TokenReview, see `ztagent.control.kube`).

Either way the result is a `Caller`: the SPIFFE identity of the token's service account and,
when the token is bound to a pod, the pod and node it runs on (what the CA needs to decide
whether a node agent may impersonate a workload).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from ztagent.errors import LocalError, ZtagentError
from ztagent.identity.certs import read_file, write_file
from ztagent.identity.keys import InvalidKey, generate_key, key_to_pem, load_key
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity, InvalidIdentity

AUDIENCE = "istio-ca"
"""The audience ztunnel's projected token carries and istiod checks."""

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
TOKEN_SIGNING_KEY = "token-signing-key.pem"
DEFAULT_TOKEN_TTL = 365 * 24 * 3600


class AuthenticationError(ZtagentError):
    """The token is missing, malformed, expired, or not one we trust (gRPC UNAUTHENTICATED)."""


class AuthenticationUnavailable(AuthenticationError):
    """The token could not be checked right now (the API server is down): gRPC UNAVAILABLE."""


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller."""

    identity: Identity
    node: str | None = None
    """The node the caller's pod runs on, when the token says so."""
    pod: str | None = None
    """`namespace/name` of the caller's pod, when the token is bound to one."""

    @property
    def account(self) -> str:
        """`namespace/serviceaccount`, the form of the trusted node-agent list."""
        return f"{self.identity.namespace}/{self.identity.service_account}"


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Caller:
        """The caller the token proves, or `AuthenticationError`."""
        ...


def bearer_token(metadata: Any) -> str:
    """The token of an `authorization: Bearer ...` entry of gRPC invocation metadata."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("the authorization header is not 'Bearer <token>'")
        return token.strip()
    raise AuthenticationError("no bearer token: the authorization header is missing")


def service_account_identity(username: str, trust_domain: str) -> Identity:
    """`system:serviceaccount:<ns>:<sa>` -> the SPIFFE identity in `trust_domain`."""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        raise AuthenticationError(f"{username!r} is not a service account")
    namespace, colon, account = username[len(SERVICE_ACCOUNT_PREFIX) :].partition(":")
    if not colon:
        raise AuthenticationError(f"{username!r} is not a service account")
    try:
        return Identity(trust_domain, namespace, account)
    except InvalidIdentity as exc:
        raise AuthenticationError(f"{username!r}: {exc}") from None


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if not path.exists():
        write_file(path, key_to_pem(generate_key()), 0o600)
    try:
        key = load_key(read_file(path))
    except InvalidKey as exc:
        raise LocalError(f"{path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise LocalError(f"{path}: not an EC private key")
    return key


class TokenSigner:
    """Issues and checks the YAML-directory mode's tokens.

    The tokens carry the claims of a Kubernetes projected service-account token (`sub`
    `system:serviceaccount:<ns>:<sa>`, `aud`, `exp`, and `kubernetes.io` with the namespace,
    service account, pod and node), signed with a P-256 key kept next to the CA
    (`token-signing-key.pem`, created on first use).
    """

    def __init__(
        self,
        key_path: str | Path,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        issuer: str = "ztagent-control",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = _load_or_create_key(Path(key_path))
        self._public = self._key.public_key()
        self.trust_domain = trust_domain
        self.issuer = issuer
        self._clock = clock

    def issue(
        self,
        namespace: str,
        service_account: str,
        *,
        node: str | None = None,
        pod: str | None = None,
        ttl: int = DEFAULT_TOKEN_TTL,
    ) -> str:
        Identity(self.trust_domain, namespace, service_account)  # validates the names
        now = int(self._clock())
        binding: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {"name": service_account},
        }
        if pod:
            binding["pod"] = {"name": pod}
        if node:
            binding["node"] = {"name": node}
        claims = {
            "iss": self.issuer,
            "sub": f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{service_account}",
            "aud": [AUDIENCE],
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "kubernetes.io": binding,
        }
        return jwt.encode(claims, self._key, algorithm="ES256")

    async def authenticate(self, token: str) -> Caller:
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=["ES256"],
                audience=AUDIENCE,
                issuer=self.issuer,
                options={"require": ["exp", "sub", "aud"]},
                leeway=0,
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"token rejected: {exc}") from None
        if claims.get("exp", 0) <= self._clock():
            raise AuthenticationError("token rejected: Signature has expired")
        identity = service_account_identity(str(claims["sub"]), self.trust_domain)
        binding = claims.get("kubernetes.io")
        node = pod = None
        if isinstance(binding, dict):
            node_claim = binding.get("node")
            pod_claim = binding.get("pod")
            if isinstance(node_claim, dict) and isinstance(node_claim.get("name"), str):
                node = node_claim["name"]
            if isinstance(pod_claim, dict) and isinstance(pod_claim.get("name"), str):
                pod = f"{identity.namespace}/{pod_claim['name']}"
        return Caller(identity, node=node, pod=pod)
