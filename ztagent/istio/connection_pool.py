"""DestinationRule `connectionPool`: its resolved settings and the circuit breaker counters
that enforce them for one destination (an Envoy cluster), across its endpoints.

Limits are istiod's: 2^32-1 (math.MaxUint32) where a field is not set. A limit that is hit
answers 503 with Envoy's response flag UO (upstream overflow); for `http.maxRetries` the retry
is simply not made. Pure counters: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

UNLIMITED = 2**32 - 1
"""istiod's default for every circuit breaker threshold (math.MaxUint32)."""
DEFAULT_CONNECT_TIMEOUT = 10.0
"""MeshConfig connectTimeout default."""
OVERFLOW_FLAG = "UO"
OVERFLOW_STATUS = 503


@dataclass(frozen=True, slots=True)
class ConnectionPoolSettings:
    """A resolved `connectionPool`; limits are 2^32-1 when not set; durations in seconds."""

    max_connections: int = UNLIMITED
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED
    """`http2MaxRequests`: active requests to the destination, HTTP/1.1 and HTTP/2 alike."""
    max_requests_per_connection: int = 0
    """0 is unlimited; 1 disables keep-alive."""
    max_retries: int = UNLIMITED
    idle_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """The request or connection may go ahead."""

    ok: ClassVar[bool] = True


ADMITTED = Admitted()


@dataclass(frozen=True, slots=True)
class Overflow:
    """A circuit breaker limit was hit: answer `status` with response flag `response_flag`.

    `limit` names the DestinationRule field. For `http.maxRetries` the retry is simply not
    made and the last response stands, as Envoy does.
    """

    limit: str
    maximum: int
    status: int = OVERFLOW_STATUS
    response_flag: str = OVERFLOW_FLAG
    ok: ClassVar[bool] = False


Admission = Admitted | Overflow


class ConnectionPool:
    """Circuit breaker counters for one destination (an Envoy cluster), across its endpoints.

    Each `try_acquire_*` either counts one more and returns `ADMITTED`, or returns an
    `Overflow` and changes nothing; each `release_*` undoes one acquire (releasing what was
    never acquired is a bug in the caller and raises ValueError). Connections are tracked by a
    caller-chosen id so `maxRequestsPerConnection` can be enforced per connection.
    """

    def __init__(self, settings: ConnectionPoolSettings) -> None:
        self.settings = settings
        self.pending = 0
        self.active_requests = 0
        self.retries = 0
        self._served: dict[object, int] = {}

    @property
    def connections(self) -> int:
        return len(self._served)

    def try_acquire_connection(self, connection: object) -> Admission:
        """Open `connection`. On overflow an HTTP request waits as pending instead."""
        if connection in self._served:
            raise ValueError(f"connection {connection!r} is already open")
        if len(self._served) >= self.settings.max_connections:
            return Overflow("connectionPool.tcp.maxConnections", self.settings.max_connections)
        self._served[connection] = 0
        return ADMITTED

    def release_connection(self, connection: object) -> None:
        if connection not in self._served:
            raise ValueError(f"connection {connection!r} is not open")
        del self._served[connection]

    def try_acquire_pending(self) -> Admission:
        """Queue a request that waits for a connection."""
        if self.pending >= self.settings.max_pending_requests:
            return Overflow(
                "connectionPool.http.http1MaxPendingRequests", self.settings.max_pending_requests
            )
        self.pending += 1
        return ADMITTED

    def release_pending(self) -> None:
        if self.pending <= 0:
            raise ValueError("no pending request to release")
        self.pending -= 1

    def try_acquire_request(self) -> Admission:
        """Start a request (HTTP/1.1 or HTTP/2) to any endpoint of the destination."""
        if self.active_requests >= self.settings.max_requests:
            return Overflow("connectionPool.http.http2MaxRequests", self.settings.max_requests)
        self.active_requests += 1
        return ADMITTED

    def release_request(self) -> None:
        if self.active_requests <= 0:
            raise ValueError("no active request to release")
        self.active_requests -= 1

    def try_acquire_retry(self) -> Admission:
        if self.retries >= self.settings.max_retries:
            return Overflow("connectionPool.http.maxRetries", self.settings.max_retries)
        self.retries += 1
        return ADMITTED

    def release_retry(self) -> None:
        if self.retries <= 0:
            raise ValueError("no retry to release")
        self.retries -= 1

    def can_reuse(self, connection: object) -> bool:
        """Whether `connection` may carry another request."""
        served = self._served.get(connection)
        if served is None:
            return False
        limit = self.settings.max_requests_per_connection
        return limit <= 0 or served < limit

    def assign_request(self, connection: object) -> bool:
        """Count a request sent on `connection`; False when it must close after this one."""
        if not self.can_reuse(connection):
            raise ValueError(f"connection {connection!r} cannot take another request")
        self._served[connection] += 1
        return self.can_reuse(connection)


__all__ = [
    "ADMITTED",
    "DEFAULT_CONNECT_TIMEOUT",
    "OVERFLOW_FLAG",
    "OVERFLOW_STATUS",
    "UNLIMITED",
    "Admission",
    "Admitted",
    "ConnectionPool",
    "ConnectionPoolSettings",
    "Overflow",
]
