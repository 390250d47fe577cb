"""`ztagent ca` against OpenSSL: chains we issue must verify in a TLS stack we did not write,
and a CA that OpenSSL made (an RSA intermediate under an offline root) must sign for us."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

END = b"-----END CERTIFICATE-----"
REPO = Path(__file__).resolve().parents[2]

OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
O = Example Corp
CN = Offline Root
[v3_root]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_intermediate]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = URI:spiffe://example.org
"""


def ztagent(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real command line, run as users run it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "ztagent", *map(str, args)],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
        env=env,
    )


def openssl(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=check, timeout=60
    )


def split_chain(path: Path) -> list[bytes]:
    blob = path.read_bytes()
    return [part.strip() + b"\n" for part in blob.split(END)[:-1] if part.strip()]


def pems(parts: list[bytes]) -> bytes:
    return b"".join(p.rstrip(b"\n") + b"\n" + END + b"\n" for p in parts)


def verify(
    tmp_path: Path, roots: Path, chain: Path, purpose: str, strict: bool = True
) -> subprocess.CompletedProcess[str]:
    """openssl verify the leaf of `chain`, offering the rest of it as untrusted intermediates."""
    parts = split_chain(chain)
    leaf = tmp_path / "leaf-only.pem"
    leaf.write_bytes(pems(parts[:1]))
    args = ["verify", "-purpose", purpose, "-CAfile", roots]
    if strict:
        args.append("-x509_strict")
    if len(parts) > 1:
        rest = tmp_path / "untrusted.pem"
        rest.write_bytes(pems(parts[1:]))
        args += ["-untrusted", rest]
    return openssl(*args, leaf, check=False)


def test_self_signed_root(tmp_path):
    ca = tmp_path / "cacerts"
    out = ztagent("ca", "init", ca, "--trust-domain", "cluster.local").stdout
    assert "wrote" in out and "ca-key.pem" in out
    cert, key = tmp_path / "web.pem", tmp_path / "web.key"
    ztagent(
        "ca",
        "issue",
        ca,
        "--identity",
        "spiffe://cluster.local/ns/default/sa/web",
        "--cert",
        cert,
        "--key",
        key,
        "--ttl",
        "2h",
    )
    assert len(split_chain(cert)) == 2
    for purpose in ("sslclient", "sslserver"):
        result = verify(tmp_path, ca / "root-cert.pem", cert, purpose)
        assert result.returncode == 0, result.stderr + result.stdout
        assert "OK" in result.stdout

    text = openssl("x509", "-in", cert, "-noout", "-text").stdout
    assert "URI:spiffe://cluster.local/ns/default/sa/web" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    # The key matches the leaf, as OpenSSL sees it.
    leaf_pub = openssl("x509", "-in", cert, "-noout", "-pubkey").stdout
    key_pub = openssl("pkey", "-in", key, "-pubout").stdout
    assert leaf_pub == key_pub


def test_verification_fails_under_another_root(tmp_path):
    ztagent("ca", "init", tmp_path / "a")
    ztagent("ca", "init", tmp_path / "b")
    cert = tmp_path / "w.pem"
    ztagent(
        "ca",
        "issue",
        tmp_path / "a",
        "--identity",
        "spiffe://cluster.local/ns/a/sa/w",
        "--cert",
        cert,
        "--key",
        tmp_path / "w.key",
    )
    result = verify(tmp_path, tmp_path / "b" / "root-cert.pem", cert, "sslclient")
    assert result.returncode != 0


def test_openssl_made_intermediate(tmp_path):
    config = tmp_path / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG)
    root_key, root = tmp_path / "root.key", tmp_path / "root.pem"
    openssl(
        "req",
        "-x509",
        "-config",
        config,
        "-extensions",
        "v3_root",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        root_key,
        "-out",
        root,
        "-days",
        "3650",
    )
    ca = tmp_path / "cacerts"
    ca.mkdir()
    csr = tmp_path / "intermediate.csr"
    openssl(
        "req",
        "-new",
        "-config",
        config,
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        ca / "ca-key.pem",
        "-out",
        csr,
        "-subj",
        "/O=Example Corp/CN=Mesh Intermediate",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        root,
        "-CAkey",
        root_key,
        "-set_serial",
        "0x5eed",
        "-days",
        "730",
        "-extfile",
        config,
        "-extensions",
        "v3_intermediate",
        "-out",
        ca / "ca-cert.pem",
    )
    shutil.copy(root, ca / "root-cert.pem")
    (ca / "cert-chain.pem").write_bytes((ca / "ca-cert.pem").read_bytes() + root.read_bytes())

    cert, key, roots = tmp_path / "api.pem", tmp_path / "api.key", tmp_path / "roots.pem"
    ztagent(
        "ca",
        "issue",
        ca,
        "--identity",
        "spiffe://example.org/ns/prod/sa/api",
        "--cert",
        cert,
        "--key",
        key,
        "--roots",
        roots,
        "--ttl",
        "1h30m",
    )
    parts = split_chain(cert)
    assert len(parts) == 3
    assert pems(parts[1:2]) == pems(split_chain(ca / "ca-cert.pem"))
    assert roots.read_bytes().strip() == root.read_bytes().strip()
    for purpose in ("sslclient", "sslserver"):
        result = verify(tmp_path, roots, cert, purpose)
        assert result.returncode == 0, result.stderr + result.stdout
    # Without the intermediate the leaf cannot be verified: the chain we hand out is needed.
    bare = tmp_path / "bare.pem"
    bare.write_bytes(pems(parts[:1]))
    assert verify(tmp_path, roots, bare, "sslclient").returncode != 0

    # The intermediate names example.org; a CSR for another trust domain is refused, one line.
    refused = ztagent(
        "ca",
        "issue",
        ca,
        "--identity",
        "spiffe://cluster.local/ns/a/sa/b",
        "--cert",
        tmp_path / "x.pem",
        "--key",
        tmp_path / "x.key",
        check=False,
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith("ztagent: error:")
    assert "trust domain" in refused.stderr
    assert refused.stderr.count("\n") == 1


def test_cli_errors_are_one_line(tmp_path):
    result = ztagent(
        "ca",
        "issue",
        tmp_path,
        "--identity",
        "spiffe://cluster.local/ns/a/sa/b",
        "--cert",
        tmp_path / "c",
        "--key",
        tmp_path / "k",
        "--ttl",
        "1d",
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "ztagent: error: invalid duration '1d': expected numbers with units h, m, s, ms, us "
        "or ns, such as 24h, 90m or 1h30m\n"
    )
