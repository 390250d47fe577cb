from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.x509.oid import NameOID

from ztagent.errors import LocalError
from ztagent.identity.keys import (
    InvalidCsr,
    InvalidKey,
    SigningKey,
    create_csr,
    csr_identity,
    generate_key,
    key_to_pem,
    load_key,
)
from ztagent.identity.spiffe import Identity

WEB = Identity("cluster.local", "default", "web")


def _csr(key: SigningKey, names: Sequence[x509.GeneralName] | None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def test_generate_key_is_p256():
    key = generate_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


def test_csr_shape():
    key = generate_key()
    pem = create_csr(WEB, key)
    assert pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    assert len(csr.subject) == 0
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(WEB.uri)]
    assert len(csr.extensions) == 1


def test_csr_identity_round_trip():
    assert csr_identity(create_csr(WEB, generate_key())) == WEB


def test_csr_identity_accepts_rsa_and_ed25519():
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert csr_identity(create_csr(WEB, rsa_key)) == WEB
    assert csr_identity(create_csr(WEB, ed25519.Ed25519PrivateKey.generate())) == WEB


def _tamper(pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the signature's `s` integer
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: b"not a csr", "not a PEM certificate signing request"),
        (lambda: _tamper(create_csr(WEB, generate_key())), "signature does not verify"),
        (lambda: _csr(generate_key(), None), "no subject alternative name"),
        (
            lambda: _csr(
                generate_key(),
                [x509.UniformResourceIdentifier(WEB.uri), x509.UniformResourceIdentifier(WEB.uri)],
            ),
            "exactly one subject alternative name",
        ),
        (
            lambda: _csr(
                generate_key(),
                [x509.UniformResourceIdentifier(WEB.uri), x509.DNSName("web.default")],
            ),
            "exactly one subject alternative name",
        ),
        (lambda: _csr(generate_key(), [x509.DNSName("web")]), "has 0 URI(s)"),
        (
            lambda: _csr(generate_key(), [x509.UniformResourceIdentifier("https://example.com/")]),
            "not a SPIFFE id",
        ),
        (
            lambda: _csr(
                generate_key(), [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a")]
            ),
            "wrong path shape",
        ),
        (
            lambda: _csr(
                rsa.generate_private_key(public_exponent=65537, key_size=1024),
                [x509.UniformResourceIdentifier(WEB.uri)],
            ),
            "too small",
        ),
        (
            lambda: _csr(
                ec.generate_private_key(ec.SECP256K1()), [x509.UniformResourceIdentifier(WEB.uri)]
            ),
            "unsupported elliptic curve",
        ),
    ],
)
def test_csr_identity_rejects(make, fragment):
    with pytest.raises(InvalidCsr) as info:
        csr_identity(make())
    assert fragment in str(info.value)
    assert isinstance(info.value, LocalError)


def test_key_pem_round_trip():
    key = generate_key()
    pem = key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_key(pem)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()


def test_load_key_accepts_traditional_ec_format():
    key = generate_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert pem.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert isinstance(load_key(pem), ec.EllipticCurvePrivateKey)


def test_load_key_rejects():
    with pytest.raises(InvalidKey, match="not an unencrypted PEM private key"):
        load_key(b"garbage")
    encrypted = generate_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(InvalidKey, match="not an unencrypted PEM private key"):
        load_key(encrypted)
    x_key = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(InvalidKey, match="unsupported private key type"):
        load_key(x_key)
