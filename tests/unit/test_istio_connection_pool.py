"""Connection pool accounting: circuit breaker counters, overflow answers, releases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztagent.istio.connection_pool import ADMITTED, ConnectionPool, ConnectionPoolSettings, Overflow


def test_request_overflow_is_503_uo_and_release_admits_again() -> None:
    pool = ConnectionPool(ConnectionPoolSettings(max_requests=2))
    assert pool.try_acquire_request() is ADMITTED
    assert pool.try_acquire_request().ok
    overflow = pool.try_acquire_request()
    assert overflow == Overflow("connectionPool.http.http2MaxRequests", 2)
    assert not overflow.ok
    assert isinstance(overflow, Overflow)
    assert (overflow.status, overflow.response_flag) == (503, "UO")
    assert pool.active_requests == 2
    pool.release_request()
    assert pool.try_acquire_request().ok


def test_pending_and_retry_overflow() -> None:
    pool = ConnectionPool(ConnectionPoolSettings(max_pending_requests=1, max_retries=1))
    assert pool.try_acquire_pending().ok
    assert pool.try_acquire_pending() == Overflow("connectionPool.http.http1MaxPendingRequests", 1)
    pool.release_pending()
    assert pool.pending == 0
    assert pool.try_acquire_retry().ok
    assert not pool.try_acquire_retry().ok
    pool.release_retry()
    assert pool.retries == 0


def test_connection_limit_and_requests_per_connection() -> None:
    pool = ConnectionPool(ConnectionPoolSettings(max_connections=1, max_requests_per_connection=2))
    assert pool.try_acquire_connection("c1").ok
    assert pool.try_acquire_connection("c2") == Overflow("connectionPool.tcp.maxConnections", 1)
    assert pool.connections == 1
    assert pool.can_reuse("c1")
    assert pool.assign_request("c1") is True
    assert pool.assign_request("c1") is False  # served its 2 requests: close after this one
    assert not pool.can_reuse("c1")
    with pytest.raises(ValueError):
        pool.assign_request("c1")
    pool.release_connection("c1")
    assert pool.try_acquire_connection("c2").ok
    assert not pool.can_reuse("gone")


def test_unlimited_requests_per_connection_and_keepalive_off() -> None:
    pool = ConnectionPool(ConnectionPoolSettings())
    pool.try_acquire_connection(1)
    assert all(pool.assign_request(1) for _ in range(100))
    single = ConnectionPool(ConnectionPoolSettings(max_requests_per_connection=1))
    single.try_acquire_connection(1)
    assert single.assign_request(1) is False


def test_releasing_what_was_not_acquired_is_an_error() -> None:
    pool = ConnectionPool(ConnectionPoolSettings())
    for release in (pool.release_request, pool.release_pending, pool.release_retry):
        with pytest.raises(ValueError):
            release()
    with pytest.raises(ValueError):
        pool.release_connection("x")
    pool.try_acquire_connection("x")
    with pytest.raises(ValueError):
        pool.try_acquire_connection("x")


_OPS = st.lists(
    st.sampled_from(
        ["req", "unreq", "pend", "unpend", "retry", "unretry", "conn", "unconn", "use"]
    ),
    max_size=200,
)


@given(
    ops=_OPS,
    limits=st.tuples(*[st.integers(min_value=1, max_value=4)] * 5),
)
def test_pool_counters_stay_within_zero_and_the_limit(
    ops: list[str], limits: tuple[int, int, int, int, int]
) -> None:
    settings = ConnectionPoolSettings(
        max_connections=limits[0],
        max_pending_requests=limits[1],
        max_requests=limits[2],
        max_retries=limits[3],
        max_requests_per_connection=limits[4],
    )
    pool = ConnectionPool(settings)
    next_id = 0
    open_ids: list[int] = []
    for op in ops:
        try:
            if op == "req":
                pool.try_acquire_request()
            elif op == "unreq":
                pool.release_request()
            elif op == "pend":
                pool.try_acquire_pending()
            elif op == "unpend":
                pool.release_pending()
            elif op == "retry":
                pool.try_acquire_retry()
            elif op == "unretry":
                pool.release_retry()
            elif op == "conn":
                if pool.try_acquire_connection(next_id).ok:
                    open_ids.append(next_id)
                next_id += 1
            elif op == "unconn" and open_ids:
                pool.release_connection(open_ids.pop())
            elif op == "use" and open_ids:
                pool.assign_request(open_ids[-1])
        except ValueError:
            pass
        assert 0 <= pool.active_requests <= settings.max_requests
        assert 0 <= pool.pending <= settings.max_pending_requests
        assert 0 <= pool.retries <= settings.max_retries
        assert 0 <= pool.connections <= settings.max_connections
