import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    PolicyBuilder,
    Store,
    VerificationError,
    VerifiedClient,
)

from ztagent.errors import LocalError
from ztagent.identity.ca import (
    CLOCK_SKEW,
    ROOT_VALIDITY,
    CertificateAuthority,
    InvalidCa,
    SigningRefused,
)
from ztagent.identity.certs import WorkloadCertificate, uri_sans
from ztagent.identity.keys import InvalidCsr, SigningKey, create_csr, generate_key, key_to_pem
from ztagent.identity.spiffe import Identity

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
WEB = Identity("cluster.local", "default", "web")


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_cert(
    subject: str,
    key: SigningKey,
    issuer_name: str,
    issuer_key: SigningKey,
    *,
    days: int = 3650,
    san: str | None = None,
    usage: bool = True,
    ca: bool = True,
) -> x509.Certificate:
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(days=1))
        .not_valid_after(T0 + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cacerts(
    directory: Path,
    ca_cert: x509.Certificate,
    ca_key: SigningKey,
    roots: list[x509.Certificate],
    chain: list[x509.Certificate] | None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes(_pem(ca_cert))
    (directory / "ca-key.pem").write_bytes(key_to_pem(ca_key))
    (directory / "root-cert.pem").write_bytes(b"".join(_pem(c) for c in roots))
    if chain is not None:
        (directory / "cert-chain.pem").write_bytes(b"".join(_pem(c) for c in chain))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ca(tmp_path, clock):
    return CertificateAuthority.create(tmp_path / "ca", now=clock)


@pytest.fixture
def intermediate(tmp_path):
    """An offline root and an RSA intermediate in the cacerts layout, as a platform team makes."""
    root_key = generate_key()
    root = _ca_cert("Root CA", root_key, "Root CA", root_key)
    inter_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    inter = _ca_cert(
        "Intermediate", inter_key, "Root CA", root_key, days=365, san="spiffe://example.org"
    )
    directory = tmp_path / "inter"
    _write_cacerts(directory, inter, inter_key, [root], [inter, root])
    return directory, root, inter


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _verify(
    chain_pem: tuple[bytes, ...], roots: list[x509.Certificate], at: datetime
) -> VerifiedClient:
    certs = [x509.load_pem_x509_certificate(p) for p in chain_pem]
    verifier = PolicyBuilder().store(Store(roots)).time(at).build_client_verifier()
    return verifier.verify(certs[0], certs[1:])


def test_create_layout(tmp_path, clock):
    directory = tmp_path / "new" / "ca"
    ca = CertificateAuthority.create(directory, trust_domain="example.org", now=clock)
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
    assert _mode(directory) == 0o700
    assert _mode(directory / "ca-key.pem") == 0o600
    cert_pem = (directory / "ca-cert.pem").read_bytes()
    assert cert_pem == (directory / "root-cert.pem").read_bytes()
    assert cert_pem == (directory / "cert-chain.pem").read_bytes()
    assert ca.trust_domain == "example.org"
    assert ca.chain_pem == (cert_pem,)
    assert ca.roots_pem == cert_pem


def test_created_root_shape(ca, clock):
    root = ca.signing_cert
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "cluster.local"
    )
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert uri_sans(root) == ["spiffe://cluster.local"]
    assert root.not_valid_after_utc == T0 + ROOT_VALIDITY
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    root.verify_directly_issued_by(root)


def test_create_refuses_to_overwrite(tmp_path, ca):
    key_before = (tmp_path / "ca" / "ca-key.pem").read_bytes()
    with pytest.raises(InvalidCa, match="already exists"):
        CertificateAuthority.create(tmp_path / "ca")
    assert (tmp_path / "ca" / "ca-key.pem").read_bytes() == key_before


def test_create_rejects_bad_trust_domain(tmp_path):
    with pytest.raises(LocalError, match="lowercase"):
        CertificateAuthority.create(tmp_path / "ca", trust_domain="Example.ORG")


def test_load_created(tmp_path, ca, clock):
    loaded = CertificateAuthority.load(tmp_path / "ca", now=clock)
    assert loaded.trust_domain == "cluster.local"
    assert loaded.chain_pem == ca.chain_pem
    assert loaded.roots_pem == ca.roots_pem
    chain = loaded.sign_csr(create_csr(WEB, generate_key()))
    assert len(chain) == 2
    assert chain[1] == ca.roots_pem


def test_load_or_create(tmp_path, clock):
    first = CertificateAuthority.load_or_create(tmp_path / "ca", "example.org", now=clock)
    again = CertificateAuthority.load_or_create(tmp_path / "ca", "example.org", now=clock)
    assert again.roots_pem == first.roots_pem
    assert again.trust_domain == "example.org"
    with pytest.raises(InvalidCa, match=r"trust domain 'example\.org', not 'other\.org'"):
        CertificateAuthority.load_or_create(tmp_path / "ca", "other.org")


def test_load_without_trust_domain_san(tmp_path):
    key = generate_key()
    root = _ca_cert("Root", key, "Root", key)
    _write_cacerts(tmp_path, root, key, [root], [root])
    assert CertificateAuthority.load(tmp_path).trust_domain == "cluster.local"
    assert CertificateAuthority.load(tmp_path, trust_domain="corp.example").trust_domain == (
        "corp.example"
    )


def test_load_missing_files_names_them(tmp_path, ca):
    (tmp_path / "ca" / "root-cert.pem").unlink()
    with pytest.raises(LocalError, match=r"root-cert\.pem"):
        CertificateAuthority.load(tmp_path / "ca")
    with pytest.raises(LocalError, match=r"ca-cert\.pem: No such file"):
        CertificateAuthority.load(tmp_path / "nowhere")


def test_load_garbage_names_file(tmp_path, ca):
    (tmp_path / "ca" / "ca-cert.pem").write_bytes(b"junk")
    with pytest.raises(InvalidCa, match=r"ca-cert\.pem: no readable PEM certificate"):
        CertificateAuthority.load(tmp_path / "ca")


def test_load_bad_key_names_file(tmp_path, ca):
    (tmp_path / "ca" / "ca-key.pem").write_bytes(b"junk")
    with pytest.raises(InvalidCa, match=r"ca-key\.pem: not an unencrypted PEM private key"):
        CertificateAuthority.load(tmp_path / "ca")


def test_load_rejects_key_mismatch(tmp_path, ca):
    (tmp_path / "ca" / "ca-key.pem").write_bytes(key_to_pem(generate_key()))
    with pytest.raises(InvalidCa, match=r"ca-key\.pem does not match the certificate in ca-cert"):
        CertificateAuthority.load(tmp_path / "ca")


def test_load_rejects_non_ca_cert(tmp_path):
    key = generate_key()
    cert = _ca_cert("Leaf", key, "Leaf", key, ca=False)
    _write_cacerts(tmp_path, cert, key, [cert], None)
    with pytest.raises(InvalidCa, match="not a CA certificate"):
        CertificateAuthority.load(tmp_path)


def test_load_rejects_ca_without_cert_sign(tmp_path):
    key = generate_key()
    cert = _ca_cert("CA", key, "CA", key, usage=False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0 + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_cacerts(tmp_path, cert, key, [cert], None)
    with pytest.raises(InvalidCa, match="lacks keyCertSign"):
        CertificateAuthority.load(tmp_path)


def test_ca_without_key_usage_is_accepted(tmp_path):
    """RFC 5280: no keyUsage means no restriction; OpenSSL's default roots look like this."""
    key = generate_key()
    cert = _ca_cert("CA", key, "CA", key, usage=False)
    _write_cacerts(tmp_path, cert, key, [cert], None)
    assert CertificateAuthority.load(tmp_path).chain_pem == (_pem(cert),)


def test_intermediate(intermediate, clock):
    directory, root, inter = intermediate
    ca = CertificateAuthority.load(directory, now=clock)
    assert ca.trust_domain == "example.org"
    assert ca.chain_pem == (_pem(inter), _pem(root))
    assert ca.roots_pem == _pem(root)
    ident = Identity("example.org", "prod", "api")
    chain = ca.sign_csr(create_csr(ident, generate_key()))
    assert chain[1:] == (_pem(inter), _pem(root))
    leaf = x509.load_pem_x509_certificate(chain[0])
    leaf.verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(root)
    assert leaf.issuer == inter.subject
    verified = _verify(chain, [root], T0)
    assert verified.subjects == [x509.UniformResourceIdentifier(ident.uri)]


def test_intermediate_chain_without_root_is_completed(intermediate, clock):
    directory, root, inter = intermediate
    (directory / "cert-chain.pem").write_bytes(_pem(inter))
    assert CertificateAuthority.load(directory).chain_pem == (_pem(inter), _pem(root))
    (directory / "cert-chain.pem").unlink()
    assert CertificateAuthority.load(directory).chain_pem == (_pem(inter), _pem(root))


def test_intermediate_with_several_roots(intermediate):
    directory, root, _ = intermediate
    other_key = generate_key()
    other = _ca_cert("Other root", other_key, "Other root", other_key)
    (directory / "root-cert.pem").write_bytes(_pem(other) + _pem(root))
    ca = CertificateAuthority.load(directory)
    assert ca.roots_pem == _pem(other) + _pem(root)
    assert ca.chain_pem[-1] == _pem(root)


def test_broken_chain_is_rejected(intermediate):
    directory, root, inter = intermediate
    stranger_key = generate_key()
    stranger = _ca_cert("Stranger", stranger_key, "Stranger", stranger_key)
    (directory / "cert-chain.pem").write_bytes(_pem(inter) + _pem(stranger))
    with pytest.raises(InvalidCa, match=r"cert-chain\.pem is broken"):
        CertificateAuthority.load(directory)
    (directory / "cert-chain.pem").write_bytes(_pem(root))
    with pytest.raises(InvalidCa, match=r"must start with the certificate in ca-cert\.pem"):
        CertificateAuthority.load(directory)
    (directory / "cert-chain.pem").write_bytes(_pem(inter) + _pem(root))
    (directory / "root-cert.pem").write_bytes(_pem(stranger))
    with pytest.raises(InvalidCa, match=r"does not lead to a certificate in root-cert\.pem"):
        CertificateAuthority.load(directory)


def test_leaf_shape(ca, clock):
    key = generate_key()
    chain = ca.sign_csr(create_csr(WEB, key), ttl=timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert len(leaf.subject) == 0
    assert leaf.issuer == ca.signing_cert.subject
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(WEB.uri)]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert leaf.not_valid_before_utc == T0 - CLOCK_SKEW
    assert leaf.not_valid_after_utc == T0 + timedelta(hours=1)
    assert 0 < leaf.serial_number < 2**128
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    verified = _verify(chain, [ca.signing_cert], T0)
    assert verified.subjects == [x509.UniformResourceIdentifier(WEB.uri)]


def test_chain_rejected_by_other_root_and_after_expiry(ca):
    chain = ca.sign_csr(create_csr(WEB, generate_key()), ttl=timedelta(hours=1))
    other_key = generate_key()
    other = _ca_cert("Other", other_key, "Other", other_key)
    with pytest.raises(VerificationError):
        _verify(chain, [other], T0)
    with pytest.raises(VerificationError):
        _verify(chain, [ca.signing_cert], T0 + timedelta(hours=2))


def test_serials_are_random(ca):
    serials = {
        x509.load_pem_x509_certificate(
            ca.sign_csr(create_csr(WEB, generate_key()))[0]
        ).serial_number
        for _ in range(5)
    }
    assert len(serials) == 5


def test_ttl_capped_at_ca_expiry(ca, clock):
    clock.now = ca.not_after - timedelta(hours=2)
    chain = ca.sign_csr(create_csr(WEB, generate_key()), ttl=timedelta(hours=24))
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert leaf.not_valid_after_utc == ca.not_after


def test_expired_ca_refuses(ca, clock):
    clock.now = ca.not_after + timedelta(seconds=1)
    with pytest.raises(SigningRefused, match="expired"):
        ca.sign_csr(create_csr(WEB, generate_key()))


def test_refuses_other_trust_domain(ca):
    other = Identity("evil.example", "default", "web")
    with pytest.raises(SigningRefused, match=r"outside this CA's trust domain 'cluster\.local'"):
        ca.sign_csr(create_csr(other, generate_key()))


def test_refuses_unexpected_identity(ca):
    with pytest.raises(SigningRefused, match="may only get"):
        ca.sign_csr(
            create_csr(WEB, generate_key()), expected=Identity("cluster.local", "default", "db")
        )
    assert ca.sign_csr(create_csr(WEB, generate_key()), expected=WEB)


def test_refuses_bad_ttl_and_bad_csr(ca):
    with pytest.raises(SigningRefused, match="must be positive"):
        ca.sign_csr(create_csr(WEB, generate_key()), ttl=timedelta(0))
    with pytest.raises(InvalidCsr):
        ca.sign_csr(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        )


def test_issue(ca):
    cert = ca.issue(WEB, ttl=timedelta(hours=2))
    assert isinstance(cert, WorkloadCertificate)
    assert cert.identity == WEB
    assert cert.roots_pem == ca.roots_pem
    assert cert.chain_pem[1:] == ca.chain_pem
    assert cert.not_after - cert.not_before == timedelta(hours=2) + CLOCK_SKEW
    assert cert.refresh_at() == T0 - CLOCK_SKEW + (timedelta(hours=2) + CLOCK_SKEW) / 2
