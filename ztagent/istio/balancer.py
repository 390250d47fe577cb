"""Load balancing over a destination's endpoints, as a DestinationRule's `loadBalancer` asks.

Owns the load balancer settings (`LoadBalancerSettings`, `ConsistentHash`), the endpoint shape
the balancers work on (`EndpointLike`, `Endpoint`) and the balancers themselves, which follow
Envoy's algorithms for equally weighted hosts:

- `RoundRobin`: hosts in order from a random starting point, one counter per balancer.
- `LeastRequest`: Envoy's power of two choices: two hosts drawn at random (with replacement),
  the one with fewer active requests wins, the first drawn on a tie.
- `RandomPick`: a uniformly random host.
- `RingHash`: a hash ring on which every host owns `minimumRingSize` points (1024 by default,
  at most 8192); a request's hash key maps to the first point at or after its hash, so a key
  keeps its host while the host set is unchanged and only the keys of a removed host move. A
  request without a hash key gets a random host, as in Envoy.

Balancers are handed the endpoints they may use on every pick (the healthy set, after outlier
detection), so they never hold stale endpoint lists. Pure: no I/O, no clock; randomness comes
from an injected `random.Random`.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

DEFAULT_MINIMUM_RING_SIZE = 1024
MAXIMUM_POINTS_PER_ENDPOINT = 8192
LEAST_REQUEST_CHOICES = 2


class EndpointLike(Protocol):
    """What a balancer needs of an endpoint: a stable key (the workload uid) and labels."""

    @property
    def key(self) -> str: ...

    @property
    def labels(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The simplest `EndpointLike`: a key and its labels."""

    key: str
    labels: Mapping[str, str] = field(default_factory=dict)


E = TypeVar("E", bound=EndpointLike)


class Algorithm(enum.Enum):
    """`loadBalancer.simple`, after Istio's aliases (`LEAST_CONN`, `UNSPECIFIED`) are resolved."""

    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"


class HashSource(enum.Enum):
    """Where a consistent hash takes its key from (the DestinationRule field name)."""

    HEADER = "httpHeaderName"
    COOKIE = "httpCookie"
    SOURCE_IP = "useSourceIp"
    QUERY_PARAMETER = "httpQueryParameterName"


@dataclass(frozen=True, slots=True)
class HashInput:
    """The parts of a request a hash key can come from; header names in lower case."""

    headers: Mapping[str, str] = field(default_factory=dict)
    source_ip: str = ""
    query: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    """`loadBalancer.consistentHash`: the key's source and the ring size.

    `source` None means the rule names no key: every request then gets a random host.
    """

    source: HashSource | None
    name: str = ""
    """The header, cookie or query parameter name (empty for the source IP)."""
    minimum_ring_size: int = DEFAULT_MINIMUM_RING_SIZE

    def key_for(self, request: HashInput) -> str | None:
        """The request's hash key, None when it has none (a random host is used then)."""
        if self.source is HashSource.HEADER:
            return request.headers.get(self.name.lower())
        if self.source is HashSource.SOURCE_IP:
            return request.source_ip or None
        if self.source is HashSource.QUERY_PARAMETER:
            return request.query.get(self.name)
        if self.source is HashSource.COOKIE:
            return _cookie(request.headers.get("cookie", ""), self.name)
        return None


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key == name:
            return value
    return None


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    """A resolved `loadBalancer`: Istio's default is LEAST_REQUEST."""

    simple: Algorithm = Algorithm.LEAST_REQUEST
    consistent_hash: ConsistentHash | None = None


class Balancer(Generic[E]):
    """Chooses one endpoint per request; counts active requests per endpoint key.

    The caller reports `request_started`/`request_finished` around each request so that
    least-request balancing sees the load; the other algorithms ignore the counts.
    """

    def __init__(self) -> None:
        self._active: dict[str, int] = {}

    def pick(self, endpoints: Sequence[E], key: str | None = None) -> E | None:
        """One of `endpoints` (None when there are none); `key` is the hash key if any."""
        raise NotImplementedError

    def active(self, key: str) -> int:
        return self._active.get(key, 0)

    def request_started(self, key: str) -> None:
        self._active[key] = self._active.get(key, 0) + 1

    def request_finished(self, key: str) -> None:
        count = self._active.get(key, 0)
        if count <= 0:
            raise ValueError(f"no active request on endpoint {key!r} to finish")
        if count == 1:
            del self._active[key]
        else:
            self._active[key] = count - 1


class RoundRobin(Balancer[E]):
    """Endpoints in turn; the first pick starts at a random index, as Envoy's does."""

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._next = rng.randrange(1 << 32) if rng is not None else 0

    def pick(self, endpoints: Sequence[E], key: str | None = None) -> E | None:
        if not endpoints:
            return None
        chosen = endpoints[self._next % len(endpoints)]
        self._next += 1
        return chosen


class LeastRequest(Balancer[E]):
    """Power of two choices over active request counts."""

    def __init__(self, rng: random.Random, choices: int = LEAST_REQUEST_CHOICES) -> None:
        super().__init__()
        if choices < 1:
            raise ValueError("choices must be at least 1")
        self._rng = rng
        self._choices = choices

    def pick(self, endpoints: Sequence[E], key: str | None = None) -> E | None:
        if not endpoints:
            return None
        candidate: E | None = None
        for _ in range(self._choices):
            sampled = endpoints[self._rng.randrange(len(endpoints))]
            if candidate is None or self.active(sampled.key) < self.active(candidate.key):
                candidate = sampled
        return candidate


class RandomPick(Balancer[E]):
    """A uniformly random endpoint."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self._rng = rng

    def pick(self, endpoints: Sequence[E], key: str | None = None) -> E | None:
        if not endpoints:
            return None
        return endpoints[self._rng.randrange(len(endpoints))]


def hash64(text: str) -> int:
    """A stable 64-bit hash (the same in every process, unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _Ring:
    __slots__ = ("hashes", "owners")

    def __init__(self, points: Mapping[str, Sequence[int]]) -> None:
        entries = sorted((h, key) for key, hashes in points.items() for h in hashes)
        self.hashes = [h for h, _ in entries]
        self.owners = [k for _, k in entries]

    def owner(self, value: int) -> str:
        index = bisect.bisect_left(self.hashes, value)
        return self.owners[index if index < len(self.hashes) else 0]


class RingHash(Balancer[E]):
    """Consistent hashing on a ring; the ring is rebuilt only when the endpoint set changes.

    Every endpoint owns the same number of ring points whatever the size of the set, so that
    removing an endpoint moves only the keys it owned and adding one takes keys only to it.
    (Envoy spreads a fixed total over the hosts instead, which also moves a few keys between
    the hosts that stay.)
    """

    def __init__(self, rng: random.Random, minimum_ring_size: int = DEFAULT_MINIMUM_RING_SIZE):
        super().__init__()
        self._rng = rng
        self._per_endpoint = max(1, min(minimum_ring_size, MAXIMUM_POINTS_PER_ENDPOINT))
        self._points: dict[str, list[int]] = {}
        self._ring: _Ring | None = None
        self._ring_keys: frozenset[str] = frozenset()

    def owner_key(self, endpoints: Sequence[E], key: str) -> str | None:
        """The endpoint key that `key` maps to over `endpoints` (None when there are none)."""
        keys = frozenset(e.key for e in endpoints)
        if not keys:
            return None
        if self._ring is None or keys != self._ring_keys:
            for stale in [k for k in self._points if k not in keys]:
                del self._points[stale]
            for k in keys:
                if k not in self._points:
                    self._points[k] = [hash64(f"{k}_{i}") for i in range(self._per_endpoint)]
            self._ring = _Ring(self._points)
            self._ring_keys = keys
        return self._ring.owner(hash64(key))

    def pick(self, endpoints: Sequence[E], key: str | None = None) -> E | None:
        if not endpoints:
            return None
        if key is None:
            return endpoints[self._rng.randrange(len(endpoints))]
        owner = self.owner_key(endpoints, key)
        for endpoint in endpoints:
            if endpoint.key == owner:
                return endpoint
        return None  # pragma: no cover - the owner is always one of `endpoints`


def new_balancer(settings: LoadBalancerSettings, rng: random.Random) -> Balancer[E]:
    """The balancer `settings` describe; `rng` is its only source of randomness."""
    if settings.consistent_hash is not None:
        return RingHash(rng, settings.consistent_hash.minimum_ring_size)
    if settings.simple is Algorithm.ROUND_ROBIN:
        return RoundRobin(rng)
    if settings.simple is Algorithm.RANDOM:
        return RandomPick(rng)
    return LeastRequest(rng)


__all__ = [
    "DEFAULT_MINIMUM_RING_SIZE",
    "Algorithm",
    "Balancer",
    "ConsistentHash",
    "Endpoint",
    "EndpointLike",
    "HashInput",
    "HashSource",
    "LeastRequest",
    "LoadBalancerSettings",
    "RandomPick",
    "RingHash",
    "RoundRobin",
    "hash64",
    "new_balancer",
]
