"""Workload keys and certificate signing requests in the shape Istio's CA expects.

A CSR is ECDSA P-256 signed with SHA-256, has an empty subject and exactly one URI SAN holding
the SPIFFE id. `csr_identity` is the CA side: it reads a CSR that arrived from someone else, so it
checks the signature and the SAN before trusting anything in it. No files, no network.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ztagent.errors import LocalError
from ztagent.identity.spiffe import Identity, InvalidIdentity

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
"""Private keys that can sign certificates and TLS handshakes."""

MIN_RSA_BITS = 2048
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class InvalidKey(LocalError):
    """A private key that cannot be read or cannot be used for signing."""


class InvalidCsr(LocalError):
    """A certificate signing request the CA must not sign."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key: what Istio's node agents generate for workloads."""
    return ec.generate_private_key(ec.SECP256R1())


def signature_hash(key: SigningKey) -> hashes.SHA256 | None:
    """The digest to sign with: SHA-256, except Ed25519 which hashes internally."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def create_csr(identity: Identity, key: SigningKey) -> bytes:
    """A PEM CSR with an empty subject and `identity` as its single (critical) URI SAN."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(san, critical=True)
        .sign(key, signature_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: SigningKey) -> bytes:
    """Unencrypted PKCS#8 PEM: readable by OpenSSL, Go and Envoy alike."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> SigningKey:
    """Read an unencrypted PEM private key (PKCS#8 or traditional) that can sign."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKey(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, SigningKey):
        raise InvalidKey(f"unsupported private key type {type(key).__name__}")
    return key


def check_public_key(key: object) -> None:
    """Refuse keys too weak or too exotic for a mesh certificate."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ACCEPTED_CURVES):
            raise InvalidCsr(f"unsupported elliptic curve {key.curve.name}")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidCsr(f"RSA key of {key.key_size} bits is too small (min {MIN_RSA_BITS})")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise InvalidCsr(f"unsupported public key type {type(key).__name__}")


def csr_identity(csr_pem: bytes) -> Identity:
    """The identity a CSR asks for, after checking its signature, key and single URI SAN."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidCsr(f"not a PEM certificate signing request: {exc}") from None
    try:
        check_public_key(csr.public_key())
        if not csr.is_signature_valid:
            raise InvalidCsr("the CSR signature does not verify")
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidCsr("the CSR has no subject alternative name") from None
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
        raise InvalidCsr(f"unreadable CSR: {exc}") from None
    names = list(san)
    uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    if len(uris) != 1 or len(names) != 1:
        raise InvalidCsr(
            f"the CSR must carry exactly one subject alternative name, a URI; it has "
            f"{len(uris)} URI(s) among {len(names)} name(s)"
        )
    try:
        return Identity.parse(uris[0])
    except InvalidIdentity as exc:
        raise InvalidCsr(f"the CSR's URI SAN is not a SPIFFE id: {exc}") from None
