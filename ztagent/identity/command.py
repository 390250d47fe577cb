"""`ztagent ca ...`: make a mesh CA in istiod's `cacerts` layout and issue workload certificates.

Only argument handling and printing live here; the certificate work is in `ztagent.identity.ca`.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from ztagent.errors import LocalError
from ztagent.fields import parse_go_duration
from ztagent.identity.ca import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    ROOT_CERT,
    CertificateAuthority,
)
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity


class InvalidDuration(LocalError):
    """A duration flag that is not in Go's `time.ParseDuration` form."""


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration (24h, 90m, 1h30m, 1.5h, 500ms), as Istio's flags take them
    (`ztagent.fields.parse_go_duration`).

    Signs are refused: no duration this command takes can be negative. Precision below a
    microsecond is rounded away, since `timedelta` cannot hold it.
    """
    usage = "expected numbers with units h, m, s, ms, us or ns, such as 24h, 90m or 1h30m"
    if text[:1] == "+":
        raise InvalidDuration(f"invalid duration {text[:40]!r}: {usage}")
    try:
        seconds = parse_go_duration(text)
    except ValueError as exc:
        raise InvalidDuration(f"{exc}: {usage}") from None
    try:
        return timedelta(microseconds=round(seconds * 1_000_000))
    except OverflowError:
        raise InvalidDuration(f"duration {text[:40]!r} is too long") from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ca init` and `ca issue` to the top-level `ztagent` parser."""
    ca = subparsers.add_parser(
        "ca",
        help="mesh certificate authority: create one, issue workload certificates",
        description=(
            "A small certificate authority for SPIFFE workload identities. Its directory uses "
            f"istiod's plugged-in CA layout ({CA_CERT}, {CA_KEY}, {ROOT_CERT}, {CERT_CHAIN}), "
            "so the same directory can be mounted into istiod as its cacerts secret, and an "
            "intermediate CA made for istiod can sign here."
        ),
    )
    actions = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init",
        help="create a self-signed root CA in a directory",
        description=(
            "Create a self-signed ECDSA P-256 root valid for ten years and write it in the "
            "cacerts layout. Refuses to overwrite an existing ca-key.pem."
        ),
    )
    init.add_argument(
        "directory",
        metavar="DIR",
        help="directory for the CA files; created with mode 0700 if missing",
    )
    init.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        help="SPIFFE trust domain the CA issues identities in (default: %(default)s)",
    )
    init.set_defaults(handler=run_init)

    issue = actions.add_parser(
        "issue",
        help="issue a workload certificate and key from a CA directory",
        description=(
            "Generate a P-256 key and sign a workload certificate for one SPIFFE identity: "
            "empty subject, the identity as its only SAN, usable for both TLS client and server."
        ),
    )
    issue.add_argument("directory", metavar="DIR", help="CA directory in the cacerts layout")
    issue.add_argument(
        "--identity",
        required=True,
        metavar="SPIFFE_ID",
        help="identity to certify: spiffe://<trust domain>/ns/<namespace>/sa/<service account>",
    )
    issue.add_argument(
        "--cert",
        required=True,
        metavar="OUT.pem",
        help="where to write the certificate chain: leaf first, then the CA chain up to its root",
    )
    issue.add_argument(
        "--key",
        required=True,
        metavar="OUT.key",
        help="where to write the private key (PKCS#8 PEM, mode 0600)",
    )
    issue.add_argument(
        "--roots",
        metavar="OUT.pem",
        help="also write the CA's root bundle, what peers need to trust the certificate",
    )
    issue.add_argument(
        "--ttl",
        default="24h",
        metavar="DURATION",
        help=(
            "certificate lifetime as a Go duration such as 24h, 90m or 1h30m; never beyond "
            "the CA's own expiry (default: %(default)s)"
        ),
    )
    issue.add_argument(
        "--trust-domain",
        default=None,
        help=(
            "trust domain of a CA whose certificates do not name one in a spiffe:// SAN "
            f"(default: the CA's own, else {DEFAULT_TRUST_DOMAIN})"
        ),
    )
    issue.set_defaults(handler=run_issue)


def run_init(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    ca = CertificateAuthority.create(directory, trust_domain=args.trust_domain)
    print(f"created CA for trust domain {ca.trust_domain}, valid until {ca.not_after:%Y-%m-%d}")
    for name in (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN):
        print(f"wrote {directory / name}")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl)
    if ttl <= timedelta(0):
        raise InvalidDuration(f"--ttl must be positive, got {args.ttl!r}")
    identity = Identity.parse(args.identity)
    ca = CertificateAuthority.load(args.directory, trust_domain=args.trust_domain)
    cert = ca.issue(identity, ttl)
    cert.write(args.cert, args.key, args.roots)
    print(f"issued {identity}, valid until {cert.not_after:%Y-%m-%dT%H:%M:%SZ}")
    if cert.not_after < cert.not_before + ttl + timedelta(seconds=30):
        print(f"note: lifetime cut short by the CA certificate's expiry ({ca.not_after:%Y-%m-%d})")
    print(f"wrote {args.cert}")
    print(f"wrote {args.key}")
    if args.roots:
        print(f"wrote {args.roots}")
    return 0
