import dataclasses
import os
import stat
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztagent.errors import LocalError
from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.certs import (
    InvalidCertificate,
    WorkloadCertificate,
    split_pem_certs,
    uri_sans,
)
from ztagent.identity.keys import generate_key, key_to_pem
from ztagent.identity.spiffe import Identity

T0 = datetime(2030, 1, 1, tzinfo=UTC)
WEB = Identity("cluster.local", "default", "web")


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.create(tmp_path / "ca", now=lambda: T0)


@pytest.fixture
def cert(ca):
    return ca.issue(WEB, ttl=timedelta(hours=24))


def _self_signed(
    names: Sequence[x509.GeneralName] | None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0 + timedelta(days=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()), key


def test_uri_sans():
    cert, _ = _self_signed(
        [
            x509.DNSName("a.example"),
            x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b"),
            x509.UniformResourceIdentifier("https://x"),
        ]
    )
    assert uri_sans(cert) == ["spiffe://td/ns/a/sa/b", "https://x"]
    assert uri_sans(_self_signed(None)[0]) == []


def test_issued_certificate(cert, ca):
    assert cert.identity == WEB
    assert len(cert.chain_pem) == 2
    assert all(p.count(b"BEGIN CERTIFICATE") == 1 for p in cert.chain_pem)
    assert cert.cert_chain_pem() == b"".join(cert.chain_pem)
    assert cert.leaf().not_valid_after_utc == cert.not_after
    assert cert.not_before == T0 - timedelta(minutes=1)
    assert cert.not_after == T0 + timedelta(hours=24)


def test_refresh_at_is_half_life(cert):
    assert cert.refresh_at() == cert.not_before + timedelta(hours=12, seconds=30)
    assert cert.valid_at(T0)
    assert not cert.valid_at(cert.not_after)
    assert not cert.valid_at(cert.not_before - timedelta(seconds=1))


def test_refresh_at_exact():
    c = WorkloadCertificate(WEB, b"", (), b"", not_before=T0, not_after=T0 + timedelta(seconds=101))
    assert c.refresh_at() == T0 + timedelta(seconds=50.5)


def test_write_and_load(tmp_path, cert):
    paths = (tmp_path / "out" / "cert.pem", tmp_path / "out" / "key.pem", tmp_path / "roots.pem")
    paths[0].parent.mkdir()
    cert.write(*paths)
    assert stat.S_IMODE(os.stat(paths[1]).st_mode) == 0o600
    assert paths[0].read_bytes() == cert.cert_chain_pem()
    assert paths[2].read_bytes() == cert.roots_pem
    assert WorkloadCertificate.load(*paths) == cert
    assert WorkloadCertificate.load(paths[0], paths[1]) == cert
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["cert.pem", "key.pem"]


def test_write_tightens_existing_key_file(tmp_path, cert):
    key = tmp_path / "key.pem"
    key.write_bytes(b"old")
    key.chmod(0o644)
    cert.write(tmp_path / "cert.pem", key)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_bytes() == cert.key_pem


def test_write_to_missing_directory_names_path(tmp_path, cert):
    with pytest.raises(LocalError, match=r"cannot write .*nodir"):
        cert.write(tmp_path / "nodir" / "c.pem", tmp_path / "nodir" / "k.pem")


def test_load_key_mismatch_names_key(tmp_path, cert):
    cert.write(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "r.pem")
    (tmp_path / "k.pem").write_bytes(key_to_pem(generate_key()))
    with pytest.raises(InvalidCertificate, match=r"k\.pem: the private key does not match"):
        WorkloadCertificate.load(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "r.pem")


@pytest.mark.parametrize(
    ("victim", "content", "fragment"),
    [
        ("c.pem", b"junk", r"c\.pem: no readable PEM certificate"),
        ("k.pem", b"junk", r"k\.pem: not an unencrypted PEM private key"),
        ("r.pem", b"junk", r"r\.pem: no readable PEM certificate"),
    ],
)
def test_load_invalid_files_name_path(tmp_path, cert, victim, content, fragment):
    cert.write(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "r.pem")
    (tmp_path / victim).write_bytes(content)
    with pytest.raises(InvalidCertificate, match=fragment):
        WorkloadCertificate.load(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "r.pem")


def test_load_missing_file_names_path(tmp_path):
    with pytest.raises(LocalError, match=r"cannot read .*absent\.pem"):
        WorkloadCertificate.load(tmp_path / "absent.pem", tmp_path / "k.pem")


def test_load_leaf_only_needs_roots(tmp_path, cert):
    (tmp_path / "c.pem").write_bytes(cert.chain_pem[0])
    (tmp_path / "k.pem").write_bytes(cert.key_pem)
    with pytest.raises(InvalidCertificate, match="no roots file was given"):
        WorkloadCertificate.load(tmp_path / "c.pem", tmp_path / "k.pem")


def test_load_without_spiffe_san(tmp_path):
    for names, fragment in [(None, "no URI SAN"), ([x509.UniformResourceIdentifier("x:y")], "URI")]:
        leaf, key = _self_signed(names)
        (tmp_path / "c.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        (tmp_path / "k.pem").write_bytes(key_to_pem(key))
        with pytest.raises(InvalidCertificate, match=fragment):
            WorkloadCertificate.load(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "c.pem")


def test_split_pem_certs_normalises(cert):
    blob = b"junk before\n" + cert.chain_pem[0] + b"\n\n" + cert.chain_pem[1]
    assert split_pem_certs(blob) == cert.chain_pem
    with pytest.raises(InvalidCertificate):
        split_pem_certs(b"")


def test_from_pem_accepts_list_or_blob(cert):
    a = WorkloadCertificate.from_pem(list(cert.chain_pem), cert.key_pem, cert.roots_pem)
    b = WorkloadCertificate.from_pem(cert.cert_chain_pem(), cert.key_pem, cert.roots_pem)
    assert a == b == cert


def test_is_frozen(cert):
    with pytest.raises(dataclasses.FrozenInstanceError):
        cert.key_pem = b""
