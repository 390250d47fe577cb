"""`istio.v1.auth.IstioCertificateService/CreateCertificate`: who may get which certificate.

A caller proves who it is with a bearer token (`ztagent.control.auth`); the `clusterid` header,
when present, must name this control plane's cluster. The CSR's one SPIFFE SAN must be the
caller's own identity, unless the caller is a node agent asking for a workload through the
`ImpersonatedIdentity` metadata entry, which is allowed only when

- the caller's account (`namespace/serviceaccount`) is in the trusted node-agent list, and
- the token binds the caller to a node, and a workload with that identity runs on that node.

Refusals carry gRPC statuses: UNAUTHENTICATED (no, bad or expired token, unknown cluster),
PERMISSION_DENIED (the caller may not have that identity), INVALID_ARGUMENT (unreadable CSR,
negative lifetime), UNAVAILABLE (the token could not be checked right now). A lifetime outside
[1 min, 90 days] is clamped into it and logged. `decide` and `granted_ttl` hold the rules
without I/O; `CertificateService` is the gRPC adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import timedelta

import grpc

from ztagent.control.auth import (
    AuthenticationError,
    AuthenticationUnavailable,
    Authenticator,
    Caller,
    bearer_token,
)
from ztagent.errors import ZtagentError
from ztagent.identity.ca import CertificateAuthority, SigningRefused
from ztagent.identity.keys import InvalidCsr, csr_identity
from ztagent.identity.manager import MIN_SECRET_TTL
from ztagent.identity.spiffe import Identity, InvalidIdentity
from ztagent.xds.gen.istio.v1.auth import ca_pb2, ca_pb2_grpc

log = logging.getLogger(__name__)

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
CLUSTER_ID_HEADER = "clusterid"
DEFAULT_CERT_TTL = timedelta(hours=24)
MAX_CERT_TTL = timedelta(days=90)
"""istiod's `--max-workload-cert-ttl` default (90 days)."""
MIN_CERT_TTL = MIN_SECRET_TTL
"""Shorter requests are raised to this: below it every workload would renew every few seconds."""


class CertificateRefused(ZtagentError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class CaPolicy:
    cluster_id: str
    trusted_node_agents: frozenset[str]
    """`namespace/serviceaccount` of the node agents that may impersonate workloads."""
    default_ttl: timedelta = DEFAULT_CERT_TTL
    max_ttl: timedelta = MAX_CERT_TTL
    min_ttl: timedelta = MIN_CERT_TTL


def granted_ttl(policy: CaPolicy, requested_seconds: int) -> tuple[timedelta, str | None]:
    """The lifetime to sign for a request, and why it differs from the request (None if not).

    0 asks for the default; requests outside [min_ttl, max_ttl] are clamped into it rather than
    refused, so one misconfigured agent still gets a usable certificate, and the reason is logged.
    """
    if requested_seconds < 0:
        raise CertificateRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"validity_duration must not be negative, got {requested_seconds}",
        )
    if requested_seconds == 0:
        return policy.default_ttl, None
    asked = timedelta(seconds=requested_seconds)
    if asked < policy.min_ttl:
        return policy.min_ttl, (
            f"requested lifetime {requested_seconds}s is below the minimum "
            f"{policy.min_ttl.total_seconds():g}s; signed for the minimum"
        )
    if asked > policy.max_ttl:
        return policy.max_ttl, (
            f"requested lifetime {requested_seconds}s is above the maximum "
            f"{policy.max_ttl.total_seconds():g}s (--max-workload-cert-ttl); signed for the maximum"
        )
    return asked, None


def cluster_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == CLUSTER_ID_HEADER:
            return value.decode() if isinstance(value, bytes) else value
    return None


def decide(
    policy: CaPolicy,
    caller: Caller,
    csr_identity: Identity,
    impersonated: str | None,
    identities_on_node: Callable[[str], Collection[Identity]],
) -> Identity:
    """The identity the certificate may carry, or `CertificateRefused` saying why not."""
    wanted = caller.identity
    if impersonated:
        try:
            target = Identity.parse(impersonated)
        except InvalidIdentity as exc:
            raise CertificateRefused(
                grpc.StatusCode.INVALID_ARGUMENT, f"{IMPERSONATED_IDENTITY}: {exc}"
            ) from None
        if target != caller.identity:
            if caller.account not in policy.trusted_node_agents:
                raise CertificateRefused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{caller.identity} may not impersonate {target}: "
                    f"{caller.account} is not a trusted node agent",
                )
            if not caller.node:
                raise CertificateRefused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{caller.identity} may not impersonate {target}: "
                    "its token is not bound to a node",
                )
            if target not in identities_on_node(caller.node):
                raise CertificateRefused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{caller.identity} may not impersonate {target}: "
                    f"no workload with that identity runs on node {caller.node}",
                )
        wanted = target
    if csr_identity != wanted:
        raise CertificateRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the CSR asks for {csr_identity}, but the caller may only get {wanted}",
        )
    return wanted


def _impersonated(request: ca_pb2.IstioCertificateRequest) -> str | None:
    if not request.HasField("metadata"):
        return None
    value = request.metadata.fields.get(IMPERSONATED_IDENTITY)
    if value is None:
        return None
    if value.WhichOneof("kind") != "string_value":
        raise CertificateRefused(
            grpc.StatusCode.INVALID_ARGUMENT, f"{IMPERSONATED_IDENTITY} must be a string"
        )
    return value.string_value or None


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    """Signs workload certificates for authenticated, authorized callers."""

    def __init__(
        self,
        ca: CertificateAuthority,
        authenticator: Authenticator,
        policy: CaPolicy,
        identities_on_node: Callable[[str], Collection[Identity]],
    ) -> None:
        self._ca = ca
        self._authenticator = authenticator
        self._policy = policy
        self._identities_on_node = identities_on_node

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The caller of a request (shared with the xDS service)."""
        cluster = cluster_of(metadata)
        if cluster and cluster != self._policy.cluster_id:
            raise CertificateRefused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the caller claims cluster {cluster!r}, this control plane serves "
                f"{self._policy.cluster_id!r}",
            )
        try:
            return await self._authenticator.authenticate(bearer_token(metadata))
        except AuthenticationError as exc:
            code = (
                grpc.StatusCode.UNAVAILABLE
                if isinstance(exc, AuthenticationUnavailable)
                else grpc.StatusCode.UNAUTHENTICATED
            )
            raise CertificateRefused(code, str(exc)) from None

    async def sign(
        self,
        request: ca_pb2.IstioCertificateRequest,
        metadata: Iterable[tuple[str, str | bytes]] | None,
    ) -> list[str]:
        caller = await self.authenticate(metadata)
        try:
            asked = csr_identity(request.csr.encode())
        except InvalidCsr as exc:
            raise CertificateRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        identity = decide(
            self._policy, caller, asked, _impersonated(request), self._identities_on_node
        )
        ttl, clamped = granted_ttl(self._policy, request.validity_duration)
        if clamped:
            log.warning("certificate for %s: %s", identity, clamped)
        try:
            chain = self._ca.sign_csr(request.csr.encode(), ttl, expected=identity)
        except SigningRefused as exc:
            raise CertificateRefused(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
        log.info("issued a certificate for %s to %s", identity, caller.identity)
        return [pem.decode() for pem in chain]

    async def CreateCertificate(
        self,
        request: ca_pb2.IstioCertificateRequest,
        context: grpc.aio.ServicerContext[
            ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse
        ],
    ) -> ca_pb2.IstioCertificateResponse:
        try:
            chain = await self.sign(request, context.invocation_metadata())
        except CertificateRefused as exc:
            log.warning("certificate refused (%s): %s", context.peer(), exc)
            await context.abort(exc.code, str(exc))
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)
