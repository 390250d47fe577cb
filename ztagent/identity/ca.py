"""A small certificate authority for mesh workloads, in istiod's plugged-in `cacerts` layout.

The directory holds ca-cert.pem (the signing certificate), ca-key.pem (its key), root-cert.pem
(the roots workloads trust) and cert-chain.pem (the signing certificate up to its root), so a CA
made here can be handed to istiod and one made for istiod can be used here, including an
intermediate signed by an offline root. This module owns what goes into a workload certificate;
it does not decide who may ask for one (that is the CA server's job) and it never serves anything.
"""

from __future__ import annotations

import ipaddress
import itertools
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztagent.errors import LocalError
from ztagent.identity.certs import (
    InvalidCertificate,
    StrPath,
    WorkloadCertificate,
    cert_to_pem,
    load_pem_certs,
    public_key_der,
    read_file,
    uri_sans,
    write_file,
)
from ztagent.identity.keys import (
    InvalidKey,
    SigningKey,
    create_csr,
    csr_identity,
    generate_key,
    key_to_pem,
    load_key,
    signature_hash,
)
from ztagent.identity.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    SCHEME,
    Identity,
    InvalidIdentity,
    check_trust_domain,
)

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"

DEFAULT_TTL = timedelta(hours=24)
ROOT_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(minutes=1)
"""Backdating of notBefore so peers whose clocks run a little behind accept a fresh cert."""

Clock = Callable[[], datetime]


class InvalidCa(LocalError):
    """CA material that cannot be used to sign: missing, unreadable or inconsistent."""


class SigningRefused(LocalError):
    """A request the CA will not sign (wrong trust domain, wrong identity, expired CA)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def _serial() -> int:
    """A random 128-bit serial; never zero, which RFC 5280 forbids."""
    return secrets.randbits(128) or 1


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=not cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


def _extension(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def trust_domain_of(certs: Sequence[x509.Certificate]) -> str | None:
    """The trust domain named by a `spiffe://<td>` URI SAN on the first CA cert that has one."""
    for cert in certs:
        for uri in uri_sans(cert):
            if uri.startswith(SCHEME):
                candidate = uri[len(SCHEME) :].rstrip("/")
                try:
                    return check_trust_domain(candidate)
                except InvalidIdentity:
                    continue
    return None


class CertificateAuthority:
    """Signs workload CSRs with one signing key; `now` is injectable so tests control time."""

    def __init__(
        self,
        signing_cert: x509.Certificate,
        signing_key: SigningKey,
        chain: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        now: Clock | None = None,
    ) -> None:
        """Check the material hangs together; errors name the `cacerts` file at fault."""
        self._now: Clock = now or utc_now
        self._trust_domain = check_trust_domain(trust_domain)
        if public_key_der(signing_key.public_key()) != public_key_der(signing_cert.public_key()):
            raise InvalidCa(f"{CA_KEY} does not match the certificate in {CA_CERT}")
        constraints = _extension(signing_cert, x509.BasicConstraints)
        if constraints is None or not constraints.ca:
            raise InvalidCa(f"{CA_CERT} is not a CA certificate (basicConstraints CA:TRUE missing)")
        usage = _extension(signing_cert, x509.KeyUsage)
        if usage is not None and not usage.key_cert_sign:
            raise InvalidCa(f"{CA_CERT} may not sign certificates (keyUsage lacks keyCertSign)")
        if not roots:
            raise InvalidCa(f"{ROOT_CERT} holds no certificate")
        chain = list(chain) or [signing_cert]
        if chain[0] != signing_cert:
            raise InvalidCa(f"{CERT_CHAIN} must start with the certificate in {CA_CERT}")
        for cert, issuer in itertools.pairwise(chain):
            if not _issued_by(cert, issuer):
                raise InvalidCa(
                    f"{CERT_CHAIN} is broken: {cert.subject.rfc4514_string()!r} is not signed by "
                    f"the next certificate {issuer.subject.rfc4514_string()!r}"
                )
        if chain[-1] not in roots:
            root = next((r for r in roots if _issued_by(chain[-1], r)), None)
            if root is None:
                raise InvalidCa(f"{CERT_CHAIN} does not lead to a certificate in {ROOT_CERT}")
            chain.append(root)
        self._cert = signing_cert
        self._key = signing_key
        self._chain = tuple(chain)
        self._roots = tuple(roots)

    @classmethod
    def load(
        cls, directory: StrPath, trust_domain: str | None = None, now: Clock | None = None
    ) -> CertificateAuthority:
        """Read a `cacerts` directory; cert-chain.pem may be absent when ca-cert is the root.

        The trust domain comes from a `spiffe://<td>` SAN on the CA certificates, else from
        `trust_domain`, else cluster.local; a SAN that contradicts `trust_domain` is an error.
        """
        base = Path(directory)

        def certs(name: str, required: bool = True) -> list[x509.Certificate]:
            path = base / name
            if not required and not path.exists():
                return []
            try:
                return load_pem_certs(read_file(path))
            except InvalidCertificate as exc:
                raise InvalidCa(f"{path}: {exc}") from None

        signing_cert = certs(CA_CERT)[0]
        try:
            signing_key = load_key(read_file(base / CA_KEY))
        except InvalidKey as exc:
            raise InvalidCa(f"{base / CA_KEY}: {exc}") from None
        roots = certs(ROOT_CERT)
        chain = certs(CERT_CHAIN, required=False)
        named = trust_domain_of([signing_cert, *chain, *roots])
        if trust_domain is not None and named is not None and named != trust_domain:
            raise InvalidCa(
                f"{base / CA_CERT}: the CA belongs to trust domain {named!r}, not {trust_domain!r}"
            )
        try:
            return cls(
                signing_cert,
                signing_key,
                chain,
                roots,
                trust_domain=named or trust_domain or DEFAULT_TRUST_DOMAIN,
                now=now,
            )
        except InvalidCa as exc:
            raise InvalidCa(f"{base}: {exc}") from None

    @classmethod
    def create(
        cls,
        directory: StrPath,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        now: Clock | None = None,
    ) -> CertificateAuthority:
        """Make a self-signed P-256 root valid for ten years; never overwrites an existing key."""
        check_trust_domain(trust_domain)
        clock = now or utc_now
        base = Path(directory)
        if not base.exists():
            try:
                base.mkdir(mode=0o700, parents=True)
                base.chmod(0o700)
            except OSError as exc:
                raise InvalidCa(f"cannot create {base}: {exc.strerror or exc}") from None
        if (base / CA_KEY).exists():
            raise InvalidCa(f"{base / CA_KEY} already exists; refusing to overwrite a CA key")
        key = generate_key()
        start = clock()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        spiffe_td = x509.UniformResourceIdentifier(SCHEME + trust_domain)
        root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(start - CLOCK_SKEW)
            .not_valid_after(start + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .add_extension(x509.SubjectAlternativeName([spiffe_td]), critical=False)
            .sign(key, signature_hash(key))
        )
        pem = cert_to_pem(root)
        for name_ in (CA_CERT, ROOT_CERT, CERT_CHAIN):
            write_file(base / name_, pem)
        write_file(base / CA_KEY, key_to_pem(key), 0o600)
        return cls(root, key, [root], [root], trust_domain=trust_domain, now=now)

    @classmethod
    def load_or_create(
        cls,
        directory: StrPath,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        now: Clock | None = None,
    ) -> CertificateAuthority:
        """The CA in `directory`, made on first use: what an embedded CA wants at start-up."""
        if (Path(directory) / CA_KEY).exists():
            return cls.load(directory, trust_domain, now)
        return cls.create(directory, trust_domain, now)

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def signing_cert(self) -> x509.Certificate:
        return self._cert

    @property
    def not_after(self) -> datetime:
        """No leaf outlives this: the signing certificate's own expiry."""
        return self._cert.not_valid_after_utc

    @property
    def roots_pem(self) -> bytes:
        """The trust bundle to hand to workloads (several roots while a root is rotated)."""
        return b"".join(cert_to_pem(r) for r in self._roots)

    @property
    def chain_pem(self) -> tuple[bytes, ...]:
        """The signing certificate up to its root, one PEM each, as appended to every leaf."""
        return tuple(cert_to_pem(c) for c in self._chain)

    def sign_csr(
        self,
        csr_pem: bytes,
        ttl: timedelta = DEFAULT_TTL,
        expected: Identity | None = None,
    ) -> tuple[bytes, ...]:
        """Sign a workload CSR; returns the leaf then the chain up to the root, one PEM each.

        The leaf carries only what the CSR's SPIFFE id justifies: an empty subject, that id as
        its one (critical) SAN, and server plus client auth so the same cert serves both ends
        of an mTLS tunnel. It never outlives the signing certificate.
        """
        identity = csr_identity(csr_pem)
        if identity.trust_domain != self._trust_domain:
            raise SigningRefused(
                f"CSR for {identity} is outside this CA's trust domain {self._trust_domain!r}"
            )
        if expected is not None and identity != expected:
            raise SigningRefused(f"CSR asks for {identity}, but the caller may only get {expected}")
        if ttl <= timedelta(0):
            raise SigningRefused(f"certificate lifetime must be positive, got {ttl}")
        now = self._now()
        if now >= self.not_after:
            raise SigningRefused(f"the CA certificate expired at {self.not_after.isoformat()}")
        public_key = x509.load_pem_x509_csr(csr_pem).public_key()
        leaf = self._leaf(
            public_key,
            [x509.UniformResourceIdentifier(identity.uri)],
            ttl,
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        return (cert_to_pem(leaf), *self.chain_pem)

    def _leaf(
        self,
        public_key: CertificatePublicKeyTypes,
        names: list[x509.GeneralName],
        ttl: timedelta,
        usages: list[x509.ObjectIdentifier],
    ) -> x509.Certificate:
        now = self._now()
        issuer_ski = _extension(self._cert, x509.SubjectKeyIdentifier)
        aki = (
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
            if issuer_ski is not None
            else x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        )
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + ttl, self.not_after))
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._key, signature_hash(self._key))
        )

    def issue_serving(
        self, names: Sequence[str], ttl: timedelta = DEFAULT_TTL
    ) -> tuple[tuple[bytes, ...], bytes]:
        """A TLS server certificate for the control plane itself (DNS names and IPs as SANs),
        as istiod's serving certificate: returns the chain (leaf first, one PEM each) and key."""
        if not names:
            raise SigningRefused("a serving certificate needs at least one DNS name or IP")
        general: list[x509.GeneralName] = []
        for name in dict.fromkeys(names):
            try:
                general.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                general.append(x509.DNSName(name))
        key = generate_key()
        leaf = self._leaf(key.public_key(), general, ttl, [ExtendedKeyUsageOID.SERVER_AUTH])
        return (cert_to_pem(leaf), *self.chain_pem), key_to_pem(key)

    def issue(self, identity: Identity, ttl: timedelta = DEFAULT_TTL) -> WorkloadCertificate:
        """Key, CSR and signature in one step, for an in-process CA that trusts its caller."""
        key = generate_key()
        chain = self.sign_csr(create_csr(identity, key), ttl, expected=identity)
        return WorkloadCertificate.from_pem(chain, key_to_pem(key), self.roots_pem)
