"""A workload's certificate, its key and the trust bundle, as one value that can be checked.

This module owns the checks that make a `WorkloadCertificate` usable (the key matches the leaf,
the leaf names a SPIFFE id) and the files it is saved to: keys are written 0600 and every file
is replaced atomically, so a reader never sees half a rotation. It does not sign anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ztagent.errors import LocalError
from ztagent.identity.keys import InvalidKey, load_key
from ztagent.identity.spiffe import Identity, InvalidIdentity

StrPath = str | os.PathLike[str]


class InvalidCertificate(LocalError):
    """Certificate material that is unreadable or does not hang together."""


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI subject alternative name of `cert`, in order; empty when it has none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_pem_certs(data: bytes) -> list[x509.Certificate]:
    """All certificates in a PEM blob, in order; raises InvalidCertificate when there are none."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidCertificate(f"no readable PEM certificate: {exc}") from None


def split_pem_certs(data: bytes) -> tuple[bytes, ...]:
    """One normalised PEM string per certificate, so chains can be compared and re-joined."""
    return tuple(cert_to_pem(c) for c in load_pem_certs(data))


def public_key_der(key: PublicKeyTypes) -> bytes:
    """SubjectPublicKeyInfo DER, to tell whether a private key and a certificate pair up."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_file(path: StrPath, data: bytes, mode: int = 0o644) -> None:
    """Write through a temporary file and rename, so readers see the old file or the new one."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)
    except OSError as exc:
        raise LocalError(f"cannot write {target}: {exc.strerror or exc}") from None


def read_file(path: StrPath) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise LocalError(f"cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class WorkloadCertificate:
    """What a workload shows in mTLS: key, chain (leaf first, root last) and the roots it trusts."""

    identity: Identity
    key_pem: bytes
    chain_pem: tuple[bytes, ...]
    roots_pem: bytes
    not_before: datetime
    not_after: datetime

    @classmethod
    def from_pem(
        cls, chain_pem: bytes | Sequence[bytes], key_pem: bytes, roots_pem: bytes
    ) -> WorkloadCertificate:
        """Check and assemble a CA answer or file contents; the leaf names the identity."""
        blob = chain_pem if isinstance(chain_pem, bytes) else b"".join(chain_pem)
        certs = load_pem_certs(blob)
        leaf = certs[0]
        load_pem_certs(roots_pem)
        try:
            key = load_key(key_pem)
        except InvalidKey as exc:
            raise InvalidCertificate(str(exc)) from None
        if public_key_der(key.public_key()) != public_key_der(leaf.public_key()):
            raise InvalidCertificate("the private key does not match the leaf certificate")
        uris = uri_sans(leaf)
        if not uris:
            raise InvalidCertificate("the leaf certificate has no URI SAN (SPIFFE id)")
        try:
            identity = Identity.parse(uris[0])
        except InvalidIdentity as exc:
            raise InvalidCertificate(f"the leaf certificate's URI SAN: {exc}") from None
        return cls(
            identity=identity,
            key_pem=key_pem,
            chain_pem=tuple(cert_to_pem(c) for c in certs),
            roots_pem=roots_pem,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    @classmethod
    def load(
        cls, cert_path: StrPath, key_path: StrPath, roots_path: StrPath | None = None
    ) -> WorkloadCertificate:
        """Read files written by `write` or istio-agent; without roots, trust the chain's end."""
        chain_pem = read_file(cert_path)
        key_pem = read_file(key_path)
        try:
            certs = load_pem_certs(chain_pem)
        except InvalidCertificate as exc:
            raise InvalidCertificate(f"{cert_path}: {exc}") from None
        if roots_path is None:
            if len(certs) < 2:
                raise InvalidCertificate(f"{cert_path}: holds no root and no roots file was given")
            roots_pem = cert_to_pem(certs[-1])
        else:
            roots_pem = read_file(roots_path)
            try:
                load_pem_certs(roots_pem)
            except InvalidCertificate as exc:
                raise InvalidCertificate(f"{roots_path}: {exc}") from None
        try:
            key = load_key(key_pem)
        except InvalidKey as exc:
            raise InvalidCertificate(f"{key_path}: {exc}") from None
        if public_key_der(key.public_key()) != public_key_der(certs[0].public_key()):
            raise InvalidCertificate(
                f"{key_path}: the private key does not match the leaf certificate in {cert_path}"
            )
        try:
            return cls.from_pem(chain_pem, key_pem, roots_pem)
        except InvalidCertificate as exc:
            raise InvalidCertificate(f"{cert_path}: {exc}") from None

    def cert_chain_pem(self) -> bytes:
        """The chain as one PEM file, leaf first: what TLS libraries load as the cert file."""
        return b"".join(self.chain_pem)

    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.chain_pem[0])

    def refresh_at(self, received: datetime | None = None) -> datetime:
        """Half-way through the validity left when the certificate arrived at `received`.

        istio-agent measures its rotation (SECRET_GRACE_PERIOD_RATIO 0.5) from the moment it got
        the certificate, not from notBefore: CAs backdate notBefore for clock skew (ours by a
        minute), and half of the backdated span puts the refresh too early, or in the past for
        a short lifetime. Without `received`, half of the whole validity (for display).
        """
        start = self.not_before
        if received is not None:
            start = min(max(received, self.not_before), self.not_after)
        return start + (self.not_after - start) / 2

    def valid_at(self, now: datetime) -> bool:
        return self.not_before <= now < self.not_after

    def write(
        self, cert_path: StrPath, key_path: StrPath, roots_path: StrPath | None = None
    ) -> None:
        """Save the key first (0600), then the chain, so a new chain never pairs with an old key."""
        write_file(key_path, self.key_pem, 0o600)
        write_file(cert_path, self.cert_chain_pem())
        if roots_path is not None:
            write_file(roots_path, self.roots_pem)
