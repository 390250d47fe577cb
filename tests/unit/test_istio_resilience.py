"""Retry decisions and backoff, fault injection draws: pure, with injected random sources."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztagent.istio.resilience import (
    DEFAULT_RETRY_POLICY,
    NO_FAULT,
    Failure,
    FaultDecision,
    FaultPolicy,
    GrpcStatus,
    RetryPolicy,
    chance,
    draw,
    parse_retry_on,
    retry_policy,
)


def policy(retry_on: str, attempts: int = 3) -> RetryPolicy:
    result = retry_policy(attempts=attempts, retry_on=retry_on)
    assert result is not None
    return result


# --- retryOn tokens ----------------------------------------------------------------------------

# (retryOn, outcome, grpc status, retried?)
RETRY_TABLE = [
    ("5xx", 500, None, True),
    ("5xx", 503, None, True),
    ("5xx", 599, None, True),
    ("5xx", 404, None, False),
    ("5xx", Failure.RESET, None, True),
    ("5xx", Failure.CONNECT_FAILURE, None, True),
    ("5xx", Failure.REFUSED_STREAM, None, True),
    ("5xx", Failure.TIMEOUT, None, True),
    ("5xx", Failure.OVERFLOW, None, False),
    ("gateway-error", 502, None, True),
    ("gateway-error", 503, None, True),
    ("gateway-error", 504, None, True),
    ("gateway-error", 500, None, False),
    ("gateway-error", Failure.RESET, None, True),
    ("reset", Failure.RESET, None, True),
    ("reset", Failure.TIMEOUT, None, True),
    ("reset", Failure.CONNECT_FAILURE, None, True),
    ("reset", 503, None, False),
    ("connect-failure", Failure.CONNECT_FAILURE, None, True),
    ("connect-failure", Failure.RESET, None, False),
    ("connect-failure", Failure.REFUSED_STREAM, None, False),
    ("connect-failure", 503, None, False),
    ("refused-stream", Failure.REFUSED_STREAM, None, True),
    ("refused-stream", Failure.CONNECT_FAILURE, None, False),
    ("reset-before-request", Failure.CONNECT_FAILURE, None, True),
    ("reset-before-request", Failure.RESET, None, False),
    ("retriable-4xx", 409, None, True),
    ("retriable-4xx", 429, None, False),
    ("retriable-status-codes", 503, None, False),  # no codes listed
    ("503", 503, None, True),
    ("503", 502, None, False),
    ("429,503", 429, None, True),
    ("retriable-status-codes,503", 503, None, True),
    ("unavailable", 200, GrpcStatus.UNAVAILABLE, True),
    ("unavailable", 200, GrpcStatus.INTERNAL, False),
    ("cancelled", 200, GrpcStatus.CANCELLED, True),
    ("deadline-exceeded", 200, GrpcStatus.DEADLINE_EXCEEDED, True),
    ("internal", 200, GrpcStatus.INTERNAL, True),
    ("resource-exhausted", 200, GrpcStatus.RESOURCE_EXHAUSTED, True),
    ("unavailable", 200, None, False),
    ("envoy-ratelimited", 429, None, False),
    ("retriable-headers", 503, None, False),
]


@pytest.mark.parametrize(("retry_on", "outcome", "grpc", "expected"), RETRY_TABLE)
def test_retry_on_tokens(retry_on, outcome, grpc, expected):
    assert policy(retry_on).should_retry(1, outcome, grpc_status=grpc) is expected


def test_attempts_bound_retries():
    p = policy("5xx", attempts=2)
    assert p.should_retry(1, 503)
    assert p.should_retry(2, 503)
    assert not p.should_retry(3, 503)
    with pytest.raises(ValueError):
        p.should_retry(0, 503)


def test_default_policy_is_istios():
    p = DEFAULT_RETRY_POLICY
    assert p.attempts == 2
    assert p.retry_on == {
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
        "retriable-status-codes",
    }
    assert p.retriable_status_codes == {503}
    assert p.per_try_timeout is None
    assert p.avoid_previous_hosts
    assert p.should_retry(1, 503)
    assert not p.should_retry(1, 502)
    assert not p.should_retry(1, 500)
    assert p.should_retry(1, Failure.CONNECT_FAILURE)
    assert p.should_retry(2, Failure.REFUSED_STREAM)
    assert not p.should_retry(1, Failure.RESET)
    assert p.should_retry(1, 200, grpc_status=GrpcStatus.UNAVAILABLE)
    assert not p.should_retry(3, 503)


def test_retry_policy_from_istio_fields():
    assert retry_policy(attempts=0) is None
    kept = retry_policy(attempts=5)
    assert kept is not None
    assert kept.attempts == 5
    assert kept.retry_on == DEFAULT_RETRY_POLICY.retry_on
    assert kept.retriable_status_codes == {503}
    # retryOn replaces the default codes too: 5xx alone lists none.
    replaced = retry_policy(attempts=1, retry_on="5xx", per_try_timeout=0.25, backoff=0.1)
    assert replaced is not None
    assert replaced.retry_on == {"5xx"}
    assert replaced.retriable_status_codes == frozenset()
    assert replaced.per_try_timeout == 0.25
    assert replaced.backoff_base == 0.1
    assert replaced.max_backoff == pytest.approx(1.0)
    ignore = retry_policy(attempts=1, ignore_previous_hosts=False)
    assert ignore is not None and not ignore.avoid_previous_hosts


@pytest.mark.parametrize(
    ("text", "tokens", "codes"),
    [
        ("5xx", {"5xx"}, set()),
        ("gateway-error,connect-failure", {"gateway-error", "connect-failure"}, set()),
        ("503", {"retriable-status-codes"}, {503}),
        ("5xx,409,429", {"5xx", "retriable-status-codes"}, {409, 429}),
    ],
)
def test_parse_retry_on(text, tokens, codes):
    assert parse_retry_on(text) == (tokens, codes)


@pytest.mark.parametrize("text", ["bogus", "5xx, reset", "999", "5xx,", "-1"])
def test_parse_retry_on_rejects(text):
    with pytest.raises(ValueError, match="is not a valid retryOn policy"):
        parse_retry_on(text)


# --- backoff -----------------------------------------------------------------------------------


def test_backoff_bounds_envoy_defaults():
    p = DEFAULT_RETRY_POLICY
    assert p.backoff(1, lambda: 0.0) == 0.0
    almost = 0.999999
    # [0, (2^n - 1) x 25 ms), capped at 250 ms.
    assert p.backoff(1, lambda: almost) == pytest.approx(0.025, rel=1e-4)
    assert p.backoff(2, lambda: almost) == pytest.approx(0.075, rel=1e-4)
    assert p.backoff(3, lambda: almost) == pytest.approx(0.175, rel=1e-4)
    assert p.backoff(4, lambda: almost) == pytest.approx(0.25)
    assert p.backoff(100, lambda: almost) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        p.backoff(0, lambda: 0.5)


def test_backoff_seeded_draws_stay_in_range():
    rng = random.Random(7)
    p = DEFAULT_RETRY_POLICY
    for retry in range(1, 12):
        upper = min((2**retry - 1) * 0.025, 0.25)
        draws = [p.backoff(retry, rng) for _ in range(500)]
        assert all(0.0 <= d <= upper for d in draws)
        assert max(draws) > upper * 0.8  # fully jittered: the range is used


def test_backoff_custom_base_and_cap():
    p = RetryPolicy(3, frozenset({"5xx"}), backoff_base=0.1, backoff_max=0.15)
    assert p.backoff(1, lambda: 0.5) == pytest.approx(0.05)
    assert p.backoff(2, lambda: 0.99) == pytest.approx(0.15)


@given(st.integers(1, 200), st.floats(0.0, 1.0, exclude_max=True))
def test_backoff_property(retry, value):
    d = DEFAULT_RETRY_POLICY.backoff(retry, lambda: value)
    assert 0.0 <= d <= 0.25


# --- random sources ----------------------------------------------------------------------------


def test_draw_accepts_random_and_callables():
    assert 0.0 <= draw(random.Random(1)) < 1.0
    assert draw(lambda: 0.25) == 0.25
    with pytest.raises(ValueError, match="outside"):
        draw(lambda: 1.0)
    with pytest.raises(ValueError):
        draw(lambda: -0.1)


def test_chance_edges():
    assert not chance(lambda: 0.0, 0.0)
    assert chance(lambda: 0.999999, 100.0)
    assert chance(lambda: 0.49, 50.0)
    assert not chance(lambda: 0.5, 50.0)


# --- faults ------------------------------------------------------------------------------------


def test_fault_percentages_over_many_draws():
    rng = random.Random(2024)
    fault = FaultPolicy(delay=0.5, delay_percent=25.0, abort_status=503, abort_percent=10.0)
    n = 10_000
    decisions = [fault.decide(rng) for _ in range(n)]
    delayed = sum(d.delay == 0.5 for d in decisions) / n
    aborted = sum(d.abort_status == 503 for d in decisions) / n
    both = sum(d.delay and d.aborts for d in decisions) / n
    assert delayed == pytest.approx(0.25, abs=0.015)
    assert aborted == pytest.approx(0.10, abs=0.01)
    assert both == pytest.approx(0.025, abs=0.006)  # independent draws


def test_fault_always_and_never():
    rng = random.Random(1)
    always = FaultPolicy(abort_status=418, abort_percent=100.0)
    never = FaultPolicy(delay=1.0, delay_percent=0.0, abort_status=500, abort_percent=0.0)
    assert all(always.decide(rng) == FaultDecision(0.0, 418) for _ in range(200))
    assert all(never.decide(rng) is NO_FAULT for _ in range(200))
    assert NO_FAULT.none


def test_fault_grpc_abort_and_delay_only():
    grpc = FaultPolicy(abort_grpc_status=GrpcStatus.UNAVAILABLE, abort_percent=100.0)
    decision = grpc.decide(lambda: 0.3)
    assert decision.grpc_status == 14 and decision.abort_status is None and decision.aborts
    delay = FaultPolicy(delay=2.0, delay_percent=100.0)
    decision = delay.decide(lambda: 0.3)
    assert decision == FaultDecision(2.0) and not decision.aborts and not decision.none


def test_fault_draw_order_is_delay_then_abort():
    draws = iter([0.9, 0.1])  # delay misses at 50%, abort hits at 50%
    fault = FaultPolicy(delay=1.0, delay_percent=50.0, abort_status=503, abort_percent=50.0)
    assert fault.decide(lambda: next(draws)) == FaultDecision(0.0, 503)


def test_fault_rejects_bad_percent():
    with pytest.raises(ValueError):
        FaultPolicy(delay=1.0, delay_percent=101.0)
