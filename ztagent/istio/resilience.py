"""Retry, fault-injection and mirroring decisions of the waypoint: pure functions of their inputs.

This module owns what Istio's `retries`, `fault` and `mirror` settings mean once they are
parsed (`routes` reads them from VirtualService and HTTPRoute): whether a failed attempt is
retried, how long to back off, whether a request is delayed or aborted, whether it is
mirrored. It never sleeps, sends or reads a clock; randomness comes in as an argument
(`random.Random` or any callable returning a float in [0, 1)), so tests replay exact draws.

Semantics follow Envoy as Istio configures it:

- `RetryPolicy.attempts` counts retries (Envoy's `num_retries`), not tries: attempts 2 means at
  most three tries. Istio's route default when `retries` is absent is `DEFAULT_RETRY_POLICY`
  (2 retries on connect-failure, refused-stream, gRPC unavailable/cancelled, and HTTP 503);
  `retries.attempts: 0` disables retries.
- A reset or per-try timeout is retried under `5xx` and `gateway-error` as well as `reset`,
  because Envoy counts an upstream that never answered as a 5xx; a local overflow (the
  connection pool refused the request) is never retried.
- Backoff is Envoy's fully jittered exponential backoff: before retry n (1-based) wait a random
  time in [0, (2^n - 1) x base), capped at `backoff_max` (10 x base unless given), base 25 ms.
- Fault percentages are floats in [0, 100]; a fault whose percentage is not given applies to no
  request (Envoy's zero default, which is what Istio's translation produces). Delay and abort
  are drawn independently, delay first.
"""

from __future__ import annotations

import enum
import http
import random
from collections.abc import Callable
from dataclasses import dataclass

RandomSource = random.Random | Callable[[], float]
"""Where random draws come from: a `random.Random`, or a callable returning a float in [0, 1)."""

DEFAULT_BACKOFF_BASE = 0.025
"""Envoy's default retry backoff base interval, in seconds."""

BACKOFF_MAX_FACTOR = 10
"""Envoy caps the backoff at this many base intervals unless a maximum is configured."""


def draw(rng: RandomSource) -> float:
    """One draw in [0, 1) from `rng`."""
    value = rng.random() if isinstance(rng, random.Random) else rng()
    if not 0.0 <= value < 1.0:
        raise ValueError(f"random source returned {value!r}, outside [0, 1)")
    return value


def chance(rng: RandomSource, percent: float) -> bool:
    """True for `percent` out of 100 draws: 0 never draws, 100 always (one draw either way)."""
    return draw(rng) * 100.0 < percent


class Failure(enum.Enum):
    """How an attempt failed when no response status arrived."""

    CONNECT_FAILURE = "connect-failure"
    """The upstream connection could not be established (refused, timed out, TLS failed)."""
    REFUSED_STREAM = "refused-stream"
    """The upstream refused the stream (HTTP/2 REFUSED_STREAM): the request was not processed."""
    RESET = "reset"
    """The upstream reset or closed the stream after the request was sent."""
    TIMEOUT = "timeout"
    """The per-try timeout expired before a response arrived."""
    OVERFLOW = "overflow"
    """The request was refused locally by a connection pool limit; never retried."""


class GrpcStatus(enum.IntEnum):
    """gRPC status codes (the names Istio's fault `grpcStatus` accepts)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# The retryOn tokens Istio accepts (Envoy's x-envoy-retry-on and x-envoy-retry-grpc-on).
RETRY_ON_TOKENS = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)

_GRPC_TOKENS = {
    "cancelled": GrpcStatus.CANCELLED,
    "deadline-exceeded": GrpcStatus.DEADLINE_EXCEEDED,
    "internal": GrpcStatus.INTERNAL,
    "resource-exhausted": GrpcStatus.RESOURCE_EXHAUSTED,
    "unavailable": GrpcStatus.UNAVAILABLE,
}
_GATEWAY_ERRORS = frozenset({502, 503, 504})
_KNOWN_STATUS = frozenset(int(s) for s in http.HTTPStatus)


def parse_retry_on(text: str) -> tuple[frozenset[str], frozenset[int]]:
    """Split an Istio `retryOn` value into Envoy tokens and bare status codes.

    Raises ValueError naming the first entry that is neither a known token nor an HTTP status
    code. As in Istio, codes imply `retriable-status-codes`; entries are not trimmed.
    """
    tokens: set[str] = set()
    codes: set[int] = set()
    for part in text.split(","):
        if part.isascii() and part.isdigit() and int(part) in _KNOWN_STATUS:
            codes.add(int(part))
        elif part in RETRY_ON_TOKENS:
            tokens.add(part)
        else:
            raise ValueError(f"{part!r} is not a valid retryOn policy")
    if codes:
        tokens.add("retriable-status-codes")
    return frozenset(tokens), frozenset(codes)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to retry a failed attempt, how many times, and how long to wait in between."""

    attempts: int
    """Retries allowed after the first try (Envoy's num_retries)."""
    retry_on: frozenset[str]
    retriable_status_codes: frozenset[int] = frozenset()
    per_try_timeout: float | None = None
    """Seconds each try may take, or None for no per-try limit."""
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_max: float | None = None
    """Cap on one backoff, seconds; None means 10 x `backoff_base` (Envoy's default)."""
    avoid_previous_hosts: bool = True
    """Prefer endpoints not tried yet (Istio sets Envoy's previous_hosts predicate by default)."""

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError("attempts cannot be negative")
        if self.backoff_base <= 0:
            raise ValueError("backoff_base must be positive")

    def retries(self, outcome: int | Failure, *, grpc_status: int | None = None) -> bool:
        """Whether `outcome` is a retriable failure under `retry_on`, ignoring the count.

        `outcome` is the response status, or how the attempt failed without one;
        `grpc_status` is the response's grpc-status (header or trailer-only) when present.
        """
        on = self.retry_on
        if isinstance(outcome, Failure):
            if outcome is Failure.OVERFLOW:
                return False
            if on & {"5xx", "gateway-error", "reset"}:
                return True
            if outcome is Failure.CONNECT_FAILURE:
                return bool(on & {"connect-failure", "reset-before-request"})
            if outcome is Failure.REFUSED_STREAM:
                return bool(on & {"refused-stream", "reset-before-request"})
            return False
        if "5xx" in on and 500 <= outcome <= 599:
            return True
        if "gateway-error" in on and outcome in _GATEWAY_ERRORS:
            return True
        if "retriable-4xx" in on and outcome == 409:
            return True
        if "retriable-status-codes" in on and outcome in self.retriable_status_codes:
            return True
        if grpc_status is not None:
            for token, status in _GRPC_TOKENS.items():
                if token in on and grpc_status == status:
                    return True
        return False

    def should_retry(
        self, attempt: int, outcome: int | Failure, *, grpc_status: int | None = None
    ) -> bool:
        """Whether to try again after try number `attempt` (1 = the original request) ended
        with `outcome`: the outcome must be retriable and retries must be left."""
        if attempt < 1:
            raise ValueError("attempt counts tries from 1")
        return attempt <= self.attempts and self.retries(outcome, grpc_status=grpc_status)

    def backoff(self, retry: int, rng: RandomSource) -> float:
        """Seconds to wait before retry number `retry` (1 = the first retry)."""
        if retry < 1:
            raise ValueError("retry counts from 1")
        # (2^n - 1) grows past any cap quickly; stop the exponent before the float overflows.
        ceiling = ((1 << min(retry, 62)) - 1) * self.backoff_base
        return min(draw(rng) * ceiling, self.max_backoff)

    @property
    def max_backoff(self) -> float:
        if self.backoff_max is not None:
            return self.backoff_max
        return BACKOFF_MAX_FACTOR * self.backoff_base


DEFAULT_RETRY_POLICY = RetryPolicy(
    attempts=2,
    retry_on=frozenset(
        {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
    ),
    retriable_status_codes=frozenset({503}),
)
"""Istio's route retry policy when a route says nothing about retries."""


def retry_policy(
    *,
    attempts: int,
    retry_on: str | None = None,
    per_try_timeout: float | None = None,
    backoff: float | None = None,
    ignore_previous_hosts: bool | None = None,
) -> RetryPolicy | None:
    """Istio's reading of a `retries` block: the default policy with the given fields
    replaced, or None when `attempts` is 0 (retries disabled). `retry_on` replaces both the
    default tokens and the default status codes."""
    if attempts == 0:
        return None
    tokens, codes = DEFAULT_RETRY_POLICY.retry_on, DEFAULT_RETRY_POLICY.retriable_status_codes
    if retry_on:
        tokens, codes = parse_retry_on(retry_on)
    return RetryPolicy(
        attempts=attempts,
        retry_on=tokens,
        retriable_status_codes=codes,
        per_try_timeout=per_try_timeout,
        backoff_base=backoff if backoff is not None else DEFAULT_BACKOFF_BASE,
        avoid_previous_hosts=(
            DEFAULT_RETRY_POLICY.avoid_previous_hosts
            if ignore_previous_hosts is None
            else ignore_previous_hosts
        ),
    )


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What fault injection does to one request: wait `delay` seconds, then maybe abort."""

    delay: float = 0.0
    abort_status: int | None = None
    """HTTP status to answer with instead of forwarding, or None."""
    grpc_status: int | None = None
    """gRPC status to answer with (HTTP 200, trailers-only) instead of forwarding, or None."""

    @property
    def aborts(self) -> bool:
        return self.abort_status is not None or self.grpc_status is not None

    @property
    def none(self) -> bool:
        return self.delay == 0.0 and not self.aborts


NO_FAULT = FaultDecision()


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """Istio's `fault`: an optional fixed delay and an optional abort, each with a percentage."""

    delay: float | None = None
    """Seconds to delay, or None for no delay fault."""
    delay_percent: float = 0.0
    abort_status: int | None = None
    abort_grpc_status: int | None = None
    abort_percent: float = 0.0

    def __post_init__(self) -> None:
        for name in ("delay_percent", "abort_percent"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name} {value} is not in [0, 100]")

    def decide(self, rng: RandomSource) -> FaultDecision:
        """Draw the delay (if configured) then the abort (if configured) for one request."""
        delay = 0.0
        if self.delay is not None and chance(rng, self.delay_percent):
            delay = self.delay
        status = grpc = None
        aborts = self.abort_status is not None or self.abort_grpc_status is not None
        if aborts and chance(rng, self.abort_percent):
            status, grpc = self.abort_status, self.abort_grpc_status
        if delay == 0.0 and status is None and grpc is None:
            return NO_FAULT
        return FaultDecision(delay, status, grpc)
