import argparse
import os
import stat
from datetime import timedelta

import pytest
from cryptography import x509

from ztagent.errors import LocalError
from ztagent.identity import command
from ztagent.identity.ca import CertificateAuthority, SigningRefused
from ztagent.identity.certs import WorkloadCertificate
from ztagent.identity.command import InvalidDuration, parse_duration
from ztagent.identity.spiffe import InvalidIdentity


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("90m", timedelta(minutes=90)),
        ("30s", timedelta(seconds=30)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1h0m0s", timedelta(hours=1)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        (".5s", timedelta(milliseconds=500)),
        ("2.s", timedelta(seconds=2)),
        ("500ms", timedelta(milliseconds=500)),
        ("1m500ms", timedelta(minutes=1, milliseconds=500)),
        ("3us", timedelta(microseconds=3)),
        ("3µs", timedelta(microseconds=3)),
        ("3μs", timedelta(microseconds=3)),
        ("2000ns", timedelta(microseconds=2)),
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        ("8760h", timedelta(days=365)),
    ],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "h", "24", "1d", "-1h", "+1h", "1 h", " 1h", "1h ", "1H", "abc", "1.2.3h", "٣h", "1hh"],
)
def test_parse_duration_rejects(text):
    with pytest.raises(InvalidDuration, match="duration") as info:
        parse_duration(text)
    assert isinstance(info.value, LocalError)


def test_parse_duration_overflow():
    with pytest.raises(InvalidDuration, match="too long"):
        parse_duration("99999999999999999h")


@pytest.fixture
def parser():
    root = argparse.ArgumentParser(prog="ztagent")
    command.register(root.add_subparsers(dest="command", required=True))
    return root


def run(parser: argparse.ArgumentParser, *argv: str) -> int:
    args = parser.parse_args(list(argv))
    result: int = args.handler(args)
    return result


def test_init_and_issue(parser, tmp_path, capsys):
    ca_dir = tmp_path / "ca"
    assert run(parser, "ca", "init", str(ca_dir), "--trust-domain", "example.org") == 0
    out = capsys.readouterr().out
    assert "trust domain example.org" in out
    assert f"wrote {ca_dir / 'ca-key.pem'}" in out
    assert stat.S_IMODE(os.stat(ca_dir / "ca-key.pem").st_mode) == 0o600

    cert, key, roots = tmp_path / "w.pem", tmp_path / "w.key", tmp_path / "roots.pem"
    ident = "spiffe://example.org/ns/shop/sa/cart"
    argv = ["ca", "issue", str(ca_dir), "--identity", ident, "--cert", str(cert), "--key", str(key)]
    assert run(parser, *argv, "--roots", str(roots), "--ttl", "1h30m") == 0
    out = capsys.readouterr().out
    assert f"issued {ident}" in out and f"wrote {roots}" in out
    assert "cut short" not in out
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    loaded = WorkloadCertificate.load(cert, key, roots)
    assert str(loaded.identity) == ident
    assert loaded.not_after - loaded.not_before == timedelta(hours=1, minutes=31)
    ca = CertificateAuthority.load(ca_dir)
    assert loaded.chain_pem[1:] == ca.chain_pem
    assert roots.read_bytes() == ca.roots_pem
    leaf = x509.load_pem_x509_certificate(loaded.chain_pem[0])
    leaf.verify_directly_issued_by(ca.signing_cert)


def test_issue_default_ttl_and_no_roots(parser, tmp_path):
    run(parser, "ca", "init", str(tmp_path / "ca"))
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    ident = "spiffe://cluster.local/ns/default/sa/web"
    run(
        parser,
        "ca",
        "issue",
        str(tmp_path / "ca"),
        "--identity",
        ident,
        "--cert",
        str(cert),
        "--key",
        str(key),
    )
    loaded = WorkloadCertificate.load(cert, key)
    assert loaded.not_after - loaded.not_before == timedelta(hours=24, minutes=1)
    assert not (tmp_path / "roots.pem").exists()


def test_init_refuses_existing(parser, tmp_path):
    run(parser, "ca", "init", str(tmp_path))
    with pytest.raises(LocalError, match="refusing to overwrite"):
        run(parser, "ca", "init", str(tmp_path))


@pytest.mark.parametrize(
    ("identity", "ttl", "error", "fragment"),
    [
        ("spiffe://cluster.local/ns/a/sa/b", "1d", InvalidDuration, "invalid duration '1d'"),
        ("spiffe://cluster.local/ns/a/sa/b", "0s", InvalidDuration, "must be positive"),
        ("spiffe://cluster.local/a", "1h", InvalidIdentity, "wrong path shape"),
        ("spiffe://other.org/ns/a/sa/b", "1h", SigningRefused, "trust domain"),
    ],
)
def test_issue_errors(parser, tmp_path, identity, ttl, error, fragment):
    run(parser, "ca", "init", str(tmp_path / "ca"))
    with pytest.raises(error, match=fragment):
        run(
            parser,
            "ca",
            "issue",
            str(tmp_path / "ca"),
            "--identity",
            identity,
            "--cert",
            str(tmp_path / "c"),
            "--key",
            str(tmp_path / "k"),
            "--ttl",
            ttl,
        )
    assert not (tmp_path / "k").exists()


def test_issue_from_missing_ca(parser, tmp_path):
    with pytest.raises(LocalError, match=r"cannot read .*ca-cert\.pem"):
        run(
            parser,
            "ca",
            "issue",
            str(tmp_path),
            "--identity",
            "spiffe://cluster.local/ns/a/sa/b",
            "--cert",
            str(tmp_path / "c"),
            "--key",
            str(tmp_path / "k"),
        )


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["ca", "--help"], ["init", "issue", "cacerts"]),
        (["ca", "init", "--help"], ["--trust-domain", "0700", "cluster.local"]),
        (["ca", "issue", "--help"], ["--identity", "--cert", "--key", "--roots", "--ttl", "1h30m"]),
    ],
)
def test_help(parser, capsys, argv, fragments):
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for fragment in fragments:
        assert fragment in out


def test_issue_requires_flags(parser, capsys):
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["ca", "issue", "dir"])
    assert info.value.code == 2
    assert "--identity" in capsys.readouterr().err
