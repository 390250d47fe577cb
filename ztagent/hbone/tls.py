"""TLS for HBONE: contexts, and who the peer is.

Both sides present certificates; trust is a bundle of roots, and identity is the peer leaf's
first SPIFFE URI SAN, never a hostname. TLS 1.3 only unless 1.2 is asked for, ALPN h2,
AES-GCM suites only (checked after the handshake, since Python cannot restrict the TLS 1.3
suites it offers), no SNI and no session resumption.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

from ztagent.errors import LocalError, RemoteError
from ztagent.identity.certs import WorkloadCertificate
from ztagent.identity.spiffe import Identity

ALLOWED_CIPHERS = frozenset(
    {
        "TLS_AES_256_GCM_SHA384",
        "TLS_AES_128_GCM_SHA256",
        # TLS 1.2, only reachable when explicitly allowed.
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES128-GCM-SHA256",
    }
)
TLS12_CIPHERS = "ECDHE+AESGCM"


class PeerRejected(RemoteError):
    """The peer completed TLS but is not who we accept (identity, trust domain, cipher, ALPN)."""


def _load_chain(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    # The ssl module loads keys from files only; keep them private and short-lived.
    fd, path = tempfile.mkstemp(prefix="ztagent-", suffix=".pem")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(chain_pem)
            handle.write(b"\n")
            handle.write(key_pem)
        context.load_cert_chain(path)
    except ssl.SSLError as exc:
        raise LocalError(f"cannot use certificate/key: {exc}") from None
    finally:
        os.unlink(path)


def _context(server_side: bool, cert: WorkloadCertificate, allow_tls12: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2 if allow_tls12 else ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    if allow_tls12:
        context.set_ciphers(TLS12_CIPHERS)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cadata=cert.roots_pem.decode())
    except ssl.SSLError as exc:
        raise LocalError(f"cannot use trust roots: {exc}") from None
    _load_chain(context, cert.cert_chain_pem(), cert.key_pem)
    context.set_alpn_protocols(["h2"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET | ssl.OP_CIPHER_SERVER_PREFERENCE
    if server_side:
        context.num_tickets = 0
    return context


TlsObject = ssl.SSLObject | ssl.SSLSocket


def peer_identity(sock: TlsObject) -> Identity | None:
    """The first URI SAN of the verified peer certificate, when it is a SPIFFE id."""
    cert = sock.getpeercert()
    if not cert:
        return None
    for entry in cert.get("subjectAltName", ()):
        if len(entry) == 2 and entry[0] == "URI":
            return Identity.try_parse(str(entry[1]))
    return None


@dataclass
class TlsConfig:
    """The TLS side of one local identity: its certificate, trust roots, and both contexts."""

    certificate: WorkloadCertificate
    allow_tls12: bool = False
    server_context: ssl.SSLContext = field(init=False)
    client_context: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        self.server_context = _context(True, self.certificate, self.allow_tls12)
        self.client_context = _context(False, self.certificate, self.allow_tls12)

    @property
    def identity(self) -> Identity:
        return self.certificate.identity

    @classmethod
    def from_files(
        cls, cert_path: str, key_path: str, roots_path: str, allow_tls12: bool = False
    ) -> TlsConfig:
        return cls(WorkloadCertificate.load(cert_path, key_path, roots_path), allow_tls12)

    def check_session(self, sock: TlsObject) -> None:
        """What both roles require of a finished handshake."""
        if sock.selected_alpn_protocol() != "h2":
            raise PeerRejected("peer did not negotiate ALPN h2")
        cipher = sock.cipher()
        if cipher is None or cipher[0] not in ALLOWED_CIPHERS:
            raise PeerRejected(f"cipher {cipher[0] if cipher else None} is not allowed")

    def check_server(self, sock: TlsObject, expected: Iterable[Identity]) -> Identity:
        """Client side: the server must be one of the identities we expect to reach."""
        self.check_session(sock)
        identity = peer_identity(sock)
        if identity is None:
            raise PeerRejected("server certificate has no SPIFFE identity")
        allowed = frozenset(expected)
        if allowed and identity not in allowed:
            names = ", ".join(sorted(str(i) for i in allowed))
            raise PeerRejected(f"server identity {identity} is not the expected one ({names})")
        return identity

    def check_client(self, sock: TlsObject) -> Identity:
        """Server side: the client must carry a SPIFFE identity in our trust domain."""
        self.check_session(sock)
        identity = peer_identity(sock)
        if identity is None:
            raise PeerRejected("client certificate has no SPIFFE identity")
        if identity.trust_domain != self.identity.trust_domain:
            raise PeerRejected(
                f"client identity {identity} is not in trust domain {self.identity.trust_domain}"
            )
        return identity
