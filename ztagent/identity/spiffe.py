"""SPIFFE workload identities in Istio's shape: `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.

This module owns the parsing and validation of identity strings, which arrive from certificates,
CSRs and configuration written by others. It does no I/O and knows nothing of certificates.
Validation follows the SPIFFE ID specification (lowercase trust domain, restricted path
characters, no empty or dot segments, at most 2048 bytes) narrowed to Istio's path shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ztagent.errors import LocalError

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
DEFAULT_TRUST_DOMAIN = "cluster.local"

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_SHAPE = "spiffe://<trust domain>/ns/<namespace>/sa/<service account>"


class InvalidIdentity(LocalError):
    """A string that is not an Istio-shaped SPIFFE id."""


def _show(text: str) -> str:
    """Quote untrusted text for an error message without echoing kilobytes of it."""
    return repr(text) if len(text) <= 80 else repr(text[:77] + "...")


def check_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a valid SPIFFE trust domain name, else raise."""
    if not trust_domain:
        raise InvalidIdentity("trust domain is empty")
    if len(trust_domain.encode("utf-8", "surrogatepass")) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidIdentity(
            f"trust domain {_show(trust_domain)} is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
        )
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        hint = ""
        if ":" in trust_domain:
            hint = " (a port is not allowed)"
        elif "@" in trust_domain:
            hint = " (user info is not allowed)"
        elif trust_domain.lower() != trust_domain:
            hint = " (it must be lowercase)"
        raise InvalidIdentity(
            f"trust domain {_show(trust_domain)} may only hold lowercase letters, digits, "
            f"'.', '-' and '_'{hint}"
        )
    return trust_domain


def _check_segment(what: str, value: str) -> None:
    if not value:
        raise InvalidIdentity(f"{what} is empty")
    if value in (".", ".."):
        raise InvalidIdentity(f"{what} may not be {value!r}")
    if not _SEGMENT_RE.fullmatch(value):
        raise InvalidIdentity(
            f"{what} {_show(value)} may only hold letters, digits, '.', '-' and '_'"
        )


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    """One workload identity; constructing it validates it, so every instance is well formed."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_segment("namespace", self.namespace)
        _check_segment("service account", self.service_account)
        size = len(self.uri.encode("utf-8"))
        if size > MAX_ID_BYTES:
            raise InvalidIdentity(f"SPIFFE id is {size} bytes long, the limit is {MAX_ID_BYTES}")

    @classmethod
    def parse(cls, text: str) -> Identity:
        """Parse `spiffe://<td>/ns/<ns>/sa/<sa>`, raising InvalidIdentity saying what is wrong."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_ID_BYTES:
            raise InvalidIdentity(f"SPIFFE id is {size} bytes long, the limit is {MAX_ID_BYTES}")
        if not text.startswith(SCHEME):
            if "://" in text:
                raise InvalidIdentity(f"{_show(text)}: the scheme must be 'spiffe://'")
            raise InvalidIdentity(f"{_show(text)}: missing 'spiffe://' scheme")
        rest = text[len(SCHEME) :]
        if "?" in rest or "#" in rest:
            raise InvalidIdentity(f"{_show(text)}: a query or fragment is not allowed")
        trust_domain, slash, path = rest.partition("/")
        try:
            check_trust_domain(trust_domain)
        except InvalidIdentity as exc:
            raise InvalidIdentity(f"{_show(text)}: {exc}") from None
        if not slash or not path:
            raise InvalidIdentity(f"{_show(text)}: missing path, expected {_SHAPE}")
        segments = path.split("/")
        if segments[-1] == "" and len(segments) > 1:
            raise InvalidIdentity(f"{_show(text)}: trailing '/' is not allowed")
        if "" in segments:
            raise InvalidIdentity(f"{_show(text)}: empty path segment ('//')")
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise InvalidIdentity(f"{_show(text)}: wrong path shape, expected {_SHAPE}")
        try:
            return cls(trust_domain, segments[1], segments[3])
        except InvalidIdentity as exc:
            raise InvalidIdentity(f"{_show(text)}: {exc}") from None

    @classmethod
    def try_parse(cls, text: str) -> Identity | None:
        """Like `parse`, but None instead of an error, for peers whose id is merely informative."""
        try:
            return cls.parse(text)
        except InvalidIdentity:
            return None

    @property
    def uri(self) -> str:
        """The SPIFFE id as it appears in a certificate's URI SAN."""
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The id without its scheme: Istio authorization policies name principals this way."""
        return self.uri[len(SCHEME) :]

    def __str__(self) -> str:
        return self.uri
