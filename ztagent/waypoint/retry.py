"""The attempts of one `Forward`: which endpoint next, within what time, and what an outcome means.

`RetryState` is Envoy's router retry state for one forwarded request: `next_attempt` names the
endpoint (`Attempt`) or answers (`Respond`), and `answered` / `failed` / `overflowed` say what an
attempt's outcome means (`Deliver`, `RetryAfter`, or the final `Respond`). It holds the
cluster's counters (pool requests and retries, balancer load) while attempts are in flight.
No I/O and no clock: `now` and `loop_time` are arguments, backoff jitter comes from `rng`.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ztagent.istio.connection_pool import Overflow
from ztagent.istio.outlier import LocalOrigin
from ztagent.istio.resilience import Failure
from ztagent.waypoint.cluster import Cluster, Clusters, Endpoint, UpstreamKey
from ztagent.waypoint.commands import (
    FLAG_RETRY_LIMIT,
    NO_FLAGS,
    NO_HEALTHY_UPSTREAM,
    UPSTREAM_RESET,
    UPSTREAM_TIMEOUT,
    Forward,
    Respond,
    connect_failure_respond,
    grpc_status,
    overflow_respond,
)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream try: this endpoint, at `key`, within `timeout` seconds (None: no limit)."""

    endpoint: Endpoint
    key: UpstreamKey
    timeout: float | None


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Retry once `seconds` of backoff have passed (drop the attempt's response, if any)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Deliver:
    """The attempt's response is the answer, with these response flags."""

    flags: str


DELIVER = Deliver(NO_FLAGS)
DELIVER_RETRY_LIMIT = Deliver(FLAG_RETRY_LIMIT)


class AttemptError(enum.Enum):
    """How an upstream attempt ended without a response head."""

    CONNECT = "connect"
    """No connection to the endpoint could be made."""
    RESET = "reset"
    """The connection or stream was reset or closed before the response head."""
    PROTOCOL = "protocol"
    """The upstream broke the protocol before the response head."""
    TIMEOUT = "timeout"
    """The per-try or route timeout expired."""


# How each error counts for retries and for outlier detection.
_ERROR_OUTCOMES: dict[AttemptError, tuple[Failure, LocalOrigin]] = {
    AttemptError.CONNECT: (Failure.CONNECT_FAILURE, LocalOrigin.CONNECT_FAILED),
    AttemptError.RESET: (Failure.RESET, LocalOrigin.RESET),
    AttemptError.PROTOCOL: (Failure.CONNECT_FAILURE, LocalOrigin.RESET),
    AttemptError.TIMEOUT: (Failure.TIMEOUT, LocalOrigin.TIMEOUT),
}


class RetryState:
    """The attempts of one `Forward` (Envoy's router retry state): which endpoint next, how
    long it may take, and what each outcome means; it holds the cluster's counters (pool
    requests and retries, balancer load) while attempts are in flight."""

    __slots__ = (
        "_backing_off",
        "_clusters",
        "_rng",
        "attempt",
        "cluster",
        "deadline",
        "forward",
        "replayable",
        "tried",
    )

    def __init__(
        self,
        forward: Forward,
        cluster: Cluster,
        clusters: Clusters,
        *,
        replayable: bool,
        loop_time: float,
        rng: random.Random,
    ) -> None:
        self.forward = forward
        self.cluster = cluster
        self._clusters = clusters
        self.replayable = replayable
        self.deadline = None if not forward.timeout else loop_time + forward.timeout
        self.attempt = 1
        """The try under way or next (1 = the original request)."""
        self.tried: set[str] = set()
        self._backing_off = False
        self._rng = rng

    def next_attempt(self, now: float, loop_time: float) -> Attempt | Respond:
        """The next endpoint to try, or the answer when there is none, the pool is full or
        the route's time is up."""
        cluster = self.cluster
        if self._backing_off:
            cluster.pool.release_retry()
            self._backing_off = False
            self.attempt += 1
        endpoint = self._clusters.pick(cluster, self.forward.request, self.tried, now)
        if endpoint is None:
            return NO_HEALTHY_UPSTREAM
        self.tried.add(endpoint.key)
        admission = cluster.pool.try_acquire_request()
        if isinstance(admission, Overflow):
            return overflow_respond(admission)
        key = self._clusters.upstream_key(cluster, endpoint.workload, self.forward.source_ip)
        assert key is not None  # endpoints are only those with a target port
        retry = self.forward.retry
        limit = retry.per_try_timeout if retry is not None else None
        if self.deadline is not None:
            remaining = self.deadline - loop_time
            if remaining <= 0:
                cluster.pool.release_request()
                return UPSTREAM_TIMEOUT
            limit = remaining if limit is None else min(limit, remaining)
        cluster.balancer.request_started(endpoint.key)
        return Attempt(endpoint, key, limit)

    def answered(
        self,
        attempt: Attempt,
        status: int,
        headers: Sequence[tuple[str, str]],
        now: float,
    ) -> Deliver | RetryAfter:
        """The attempt got a response head (`status`, `headers`): deliver it, or retry after
        a backoff. A delivered response holds the attempt's counters until `finished`."""
        Clusters.record(self.cluster, attempt.endpoint.key, status, now)
        grpc = grpc_status(headers)
        decision = self._decide(status, grpc)
        if decision is None:
            retry = self.forward.retry
            if retry is not None and self.attempt > 1 and retry.retries(status, grpc_status=grpc):
                return DELIVER_RETRY_LIMIT
            return DELIVER
        if isinstance(decision, Overflow):
            return DELIVER
        return decision

    def failed(
        self, attempt: Attempt, error: AttemptError, detail: str, now: float
    ) -> Respond | RetryAfter:
        """The attempt ended without a response head: answer, or retry after a backoff."""
        self._release(attempt)
        failure, origin = _ERROR_OUTCOMES[error]
        Clusters.record(self.cluster, attempt.endpoint.key, origin, now)
        decision = self._decide(failure, None)
        if isinstance(decision, RetryAfter):
            return decision
        if error is AttemptError.CONNECT:
            return connect_failure_respond(detail)
        if error is AttemptError.TIMEOUT:
            return UPSTREAM_TIMEOUT
        return UPSTREAM_RESET

    def overflowed(self, attempt: Attempt, overflow: Overflow) -> Respond:
        """A connection limit refused the attempt: answer with the overflow, no retry."""
        self._release(attempt)
        return overflow_respond(overflow)

    def finished(self, attempt: Attempt) -> None:
        """A delivered or dropped response was read to its end or abandoned."""
        self._release(attempt)

    def _release(self, attempt: Attempt) -> None:
        self.cluster.pool.release_request()
        self.cluster.balancer.request_finished(attempt.endpoint.key)

    def _decide(
        self, outcome: int | Failure, grpc_status: int | None
    ) -> RetryAfter | Overflow | None:
        """RetryAfter, the retry budget's Overflow (no retry), or None (not retriable)."""
        retry = self.forward.retry
        if (
            retry is None
            or not self.replayable
            or not retry.should_retry(self.attempt, outcome, grpc_status=grpc_status)
        ):
            return None
        budget = self.cluster.pool.try_acquire_retry()
        if isinstance(budget, Overflow):
            return budget
        self._backing_off = True
        return RetryAfter(retry.backoff(self.attempt, self._rng))
