"""L4 authorization policies as Istio's `istio.security.Authorization` describes them.

istiod translates each AuthorizationPolicy (and PeerAuthentication) into one `Authorization`:
rules are ORed, the clauses of a rule ANDed, the matches of a clause ORed; inside one `Match`
every field that is set must hold. This module owns those values and the leaf tests (string,
CIDR and service-account matching); combining them into a verdict is
`ztagent.istio.authorization.l4`'s job.
No I/O.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, fields

from ztagent.fields import Invalid, show
from ztagent.identity.spiffe import Identity
from ztagent.model.workload import IPAddress


class Scope(enum.Enum):
    """Which workloads a policy applies to without being listed by them."""

    GLOBAL = "GLOBAL"
    """Every workload; istiod gives this scope to selector-less policies in the root namespace."""
    NAMESPACE = "NAMESPACE"
    """Every workload in the policy's namespace."""
    WORKLOAD_SELECTOR = "WORKLOAD_SELECTOR"
    """Only workloads whose `authorization_policies` list the policy's key."""


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class StringMatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One string test; `presence` matches any non-empty string."""

    kind: StringMatchKind
    value: str = ""

    @classmethod
    def exact(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.EXACT, value)

    @classmethod
    def prefix(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.PREFIX, value)

    @classmethod
    def suffix(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.SUFFIX, value)

    @classmethod
    def presence(cls) -> StringMatch:
        return cls(StringMatchKind.PRESENCE)

    @classmethod
    def from_istio(cls, text: str) -> StringMatch:
        """Read AuthorizationPolicy syntax: `*` presence, `*x` suffix, `x*` prefix, else exact."""
        if text == "*":
            return cls.presence()
        if text.startswith("*"):
            return cls.suffix(text[1:])
        if text.endswith("*"):
            return cls.prefix(text[:-1])
        return cls.exact(text)

    def matches(self, text: str) -> bool:
        kind = self.kind
        if kind is StringMatchKind.EXACT:
            return text == self.value
        if kind is StringMatchKind.PREFIX:
            return text.startswith(self.value)
        if kind is StringMatchKind.SUFFIX:
            return text.endswith(self.value)
        return text != ""

    def __str__(self) -> str:
        """The AuthorizationPolicy spelling of this match."""
        if self.kind is StringMatchKind.PRESENCE:
            return "*"
        if self.kind is StringMatchKind.PREFIX:
            return f"{self.value}*"
        if self.kind is StringMatchKind.SUFFIX:
            return f"*{self.value}"
        return self.value


@dataclass(frozen=True, slots=True)
class CidrMatch:
    """An IP block (`ipBlocks`, `source.ip`, `destination.ip`); a bare IP is a /32 or /128."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    @classmethod
    def parse(cls, text: str) -> CidrMatch:
        """Parse `10.0.0.0/8` or `10.1.2.3`; host bits are ignored, as ztunnel's ipnet does.

        Raises ValueError for anything else.
        """
        return cls(ipaddress.ip_network(text, strict=False))

    def contains(self, ip: IPAddress) -> bool:
        """`ip` is in the block; an IPv4-mapped IPv6 address (dual-stack socket) counts as IPv4."""
        network = self.network
        if ip.version == 6 and network.version == 4:
            mapped = ip.ipv4_mapped
            if mapped is not None:
                ip = mapped
        if ip.version != network.version:
            return False
        return (int(ip) & int(network.netmask)) == int(network.network_address)

    def __str__(self) -> str:
        return str(self.network)


def cidr_match(value: str, path: str) -> CidrMatch:
    """A `CidrMatch` read from a policy field; `Invalid` naming `path` if it is not one."""
    try:
        return CidrMatch.parse(value)
    except ValueError:
        raise Invalid(path, f"{show(value)} is not an IP address or CIDR") from None


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    """`serviceAccounts` entries: namespace and account of the source identity, both exact."""

    namespace: str
    service_account: str

    def matches(self, identity: Identity) -> bool:
        return (
            identity.namespace == self.namespace
            and identity.service_account == self.service_account
        )

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


@dataclass(frozen=True, slots=True)
class Match:
    """One `Match`: each non-empty field must hold (any of its values); `not_*` must not."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[CidrMatch, ...] = ()
    not_source_ips: tuple[CidrMatch, ...] = ()
    destination_ips: tuple[CidrMatch, ...] = ()
    not_destination_ips: tuple[CidrMatch, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, tuple):
                object.__setattr__(self, f.name, tuple(value))

    @property
    def is_empty(self) -> bool:
        """A Match with no field set; ztunnel treats it as matching nothing."""
        return not any(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True, slots=True)
class Clause:
    """Matches ORed together; a clause with no matches holds for every connection."""

    matches: tuple[Match, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "matches", tuple(self.matches))


@dataclass(frozen=True, slots=True)
class Rule:
    """Clauses ANDed together; a rule with no clauses holds for every connection."""

    clauses: tuple[Clause, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "clauses", tuple(self.clauses))


@dataclass(frozen=True, slots=True)
class Authorization:
    """One L4 policy; rules ORed, and an empty `rules` never matches (ALLOW-nothing)."""

    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    @property
    def key(self) -> str:
        """`namespace/name`: the xDS resource name; `Workload.authorization_policies` lists it."""
        return f"{self.namespace}/{self.name}"
