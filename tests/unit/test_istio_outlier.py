"""Outlier detection with an injected clock: ejection, backoff, readmission, caps, panic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztagent.istio.balancer import Endpoint
from ztagent.istio.outlier import (
    Ejection,
    EjectionCause,
    LocalOrigin,
    OutlierDetection,
    OutlierDetector,
)

KEYS = ("a", "b", "c", "d")
ALL_EJECTABLE = OutlierDetection(max_ejection_percent=100)


def detector(settings: OutlierDetection = ALL_EJECTABLE, keys: tuple[str, ...] = KEYS):
    return OutlierDetector(settings, now=0.0, endpoints=keys)


def fail(d: OutlierDetector, key: str, times: int, now: float, status: int = 500):
    result = None
    for _ in range(times):
        result = d.record_status(key, status, now) or result
    return result


def test_ejects_after_n_consecutive_5xx() -> None:
    d = detector()
    assert fail(d, "a", 4, 1.0) is None
    assert not d.is_ejected("a")
    ejection = d.record_status("a", 500, 1.0)
    assert ejection == Ejection("a", EjectionCause.CONSECUTIVE_5XX, 1.0, 30.0, 1)
    assert ejection.until == 31.0
    assert d.is_ejected("a")
    assert d.ejected == frozenset({"a"})


def test_success_resets_the_consecutive_counter() -> None:
    d = detector()
    fail(d, "a", 4, 1.0)
    d.record_status("a", 200, 1.0)
    assert fail(d, "a", 4, 1.0) is None
    d.record_status("a", 404, 1.0)  # any non-5xx is a success here
    assert fail(d, "a", 4, 1.0) is None
    assert d.record_status("a", 503, 1.0) is not None


def test_readmission_after_base_ejection_time_at_the_sweep() -> None:
    d = detector()
    fail(d, "a", 5, 5.0)
    assert d.next_deadline() == 10.0  # sweeps run every interval from creation
    assert d.sweep(9.0) == ()  # not due yet
    assert d.sweep(10.0) == ()
    assert d.sweep(30.0) == ()  # ejected at 5 for 30s: not before 35
    assert d.next_deadline() == 40.0
    assert d.sweep(40.0) == ("a",)
    assert not d.is_ejected("a")


def test_ejection_duration_grows_with_ejection_count() -> None:
    d = detector()
    first = fail(d, "a", 5, 0.0)
    assert first is not None and (first.duration, first.ejections) == (30.0, 1)
    assert d.sweep(30.0) == ("a",)
    second = fail(d, "a", 5, 31.0)
    assert second is not None and (second.duration, second.ejections) == (60.0, 2)
    assert d.sweep(90.0) == ()
    assert d.sweep(100.0) == ("a",)  # 31 + 60 = 91 -> next sweep tick
    third = fail(d, "a", 5, 101.0)
    assert third is not None and third.duration == 90.0
    assert d.ejections("a") == 3


def test_backoff_decays_while_the_endpoint_stays_healthy() -> None:
    d = detector()
    fail(d, "a", 5, 0.0)
    d.sweep(30.0)
    fail(d, "a", 5, 31.0)  # backoff 2: 60s
    d.sweep(100.0)  # readmitted at 100
    # Healthy sweeps at least an interval after readmission take the backoff down by one each.
    d.sweep(110.0)
    d.sweep(120.0)
    assert d.next_deadline() is None  # nothing ejected, nothing left to decay
    again = fail(d, "a", 5, 125.0)
    assert again is not None and again.duration == 30.0


def test_ejection_time_is_capped() -> None:
    settings = OutlierDetection(base_ejection_time=100.0, max_ejection_percent=100, interval=1.0)
    d = detector(settings)
    durations = []
    now = 0.0
    for _ in range(6):
        ejection = fail(d, "a", 5, now)
        assert ejection is not None
        durations.append(ejection.duration)
        now = ejection.until
        assert d.sweep(now) == ("a",)
    assert durations == [100.0, 200.0, 300.0, 300.0, 300.0, 300.0]


def test_max_ejection_percent_caps_ejections() -> None:
    d = detector(OutlierDetection(max_ejection_percent=50))
    assert fail(d, "a", 5, 1.0) is not None  # 25% ejected
    assert fail(d, "b", 5, 1.0) is not None  # 50% ejected: still allowed (<=)
    assert fail(d, "c", 5, 1.0) is None  # 75% would exceed the cap
    assert d.ejected == frozenset({"a", "b"})
    assert d.overflows == 1
    # The counter was reset: it takes five more failures to try again.
    assert fail(d, "c", 4, 2.0) is None
    assert d.overflows == 1


def test_default_ten_percent_ejects_nothing_among_few_endpoints() -> None:
    d = detector(OutlierDetection())
    assert fail(d, "a", 5, 1.0) is None  # 1 of 4 is 25% > 10%, as Envoy decides
    assert d.overflows == 1
    many = detector(OutlierDetection(), tuple(f"e{i}" for i in range(10)))
    assert fail(many, "e0", 5, 1.0) is not None  # 1 of 10 is 10%
    assert fail(many, "e1", 5, 1.0) is None


def test_gateway_errors_have_their_own_threshold() -> None:
    settings = OutlierDetection(
        consecutive_5xx_errors=10, consecutive_gateway_errors=3, max_ejection_percent=100
    )
    d = detector(settings)
    assert fail(d, "a", 9, 1.0, status=500) is None  # 5xx but not gateway errors
    ejection = fail(d, "b", 3, 1.0, status=502)
    assert ejection is not None and ejection.cause is EjectionCause.CONSECUTIVE_GATEWAY_FAILURE
    # A plain 500 breaks a run of gateway errors but not of 5xx.
    assert d.record_status("c", 503, 1.0) is None
    assert d.record_status("c", 504, 1.0) is None
    assert d.record_status("c", 500, 1.0) is None
    assert d.record_status("c", 503, 1.0) is None
    assert d.record_status("c", 503, 1.0) is None
    assert d.record_status("c", 503, 1.0) is not None


def test_gateway_errors_off_by_default_and_zero_disables_5xx() -> None:
    d = detector(OutlierDetection(consecutive_5xx_errors=0, max_ejection_percent=100))
    assert fail(d, "a", 50, 1.0, status=503) is None
    assert not d.ejected


def test_local_failures_count_as_gateway_errors() -> None:
    settings = OutlierDetection(
        consecutive_5xx_errors=0, consecutive_gateway_errors=2, max_ejection_percent=100
    )
    d = detector(settings)
    assert d.record_local("a", LocalOrigin.CONNECT_FAILED, 1.0) is None
    ejection = d.record_local("a", LocalOrigin.TIMEOUT, 1.0)
    assert ejection is not None and ejection.cause is EjectionCause.CONSECUTIVE_GATEWAY_FAILURE
    d.record_local("b", LocalOrigin.RESET, 1.0)
    d.record_local("b", LocalOrigin.CONNECT_SUCCESS, 1.0)  # no status: counters unchanged
    assert d.record_local("b", LocalOrigin.CONNECT_FAILED, 1.0) is not None


def test_split_local_origin_errors() -> None:
    settings = OutlierDetection(
        consecutive_5xx_errors=2,
        max_ejection_percent=100,
        split_external_local_origin_errors=True,
        consecutive_local_origin_failures=3,
    )
    d = detector(settings)
    d.record_local("a", LocalOrigin.CONNECT_FAILED, 1.0)
    d.record_local("a", LocalOrigin.TIMEOUT, 1.0)
    assert not d.is_ejected("a")  # local failures no longer count as 5xx
    d.record_local("a", LocalOrigin.CONNECT_SUCCESS, 1.0)  # resets the local counter
    d.record_local("a", LocalOrigin.CONNECT_FAILED, 1.0)
    d.record_local("a", LocalOrigin.CONNECT_FAILED, 1.0)
    ejection = d.record_local("a", LocalOrigin.CONNECT_FAILED, 1.0)
    assert ejection is not None
    assert ejection.cause is EjectionCause.CONSECUTIVE_LOCAL_ORIGIN_FAILURE


def test_min_health_percent_uses_every_endpoint_when_too_few_are_healthy() -> None:
    endpoints = [Endpoint(k) for k in KEYS]
    d = detector(OutlierDetection(max_ejection_percent=100, min_health_percent=60))
    fail(d, "a", 5, 1.0)
    assert [e.key for e in d.usable(endpoints)] == ["b", "c", "d"]  # 75% healthy
    fail(d, "b", 5, 1.0)
    assert d.in_panic(endpoints)  # 50% < 60%
    assert d.usable(endpoints) == endpoints


def test_without_min_health_percent_all_ejected_leaves_nothing() -> None:
    endpoints = [Endpoint(k) for k in ("a", "b")]
    d = detector(ALL_EJECTABLE, ("a", "b"))
    fail(d, "a", 5, 1.0)
    fail(d, "b", 5, 1.0)
    assert d.usable(endpoints) == []
    assert not d.in_panic(endpoints)


def test_endpoint_membership() -> None:
    d = detector()
    fail(d, "a", 5, 1.0)
    d.update_endpoints(["b", "c", "e"])
    assert d.endpoints == ("b", "c", "e")
    assert d.ejected == frozenset()
    assert d.record_status("a", 500, 1.0) is None  # unknown endpoints are ignored
    d.update_endpoints(["b", "c", "e", "a"])
    assert d.ejections("a") == 0  # a returning endpoint starts over


def test_already_ejected_endpoint_is_not_ejected_again() -> None:
    d = detector()
    assert fail(d, "a", 5, 1.0) is not None
    assert fail(d, "a", 20, 2.0) is None
    assert d.ejections("a") == 1


def test_late_sweep_keeps_the_interval_grid() -> None:
    d = detector()
    fail(d, "a", 5, 100.5)  # long idle: the next tick is realigned after now
    assert d.next_deadline() == 110.0
    assert d.sweep(125.0) == ()
    assert d.next_deadline() == 130.0
    assert d.sweep(131.0) == ("a",)


def test_settings_must_be_positive() -> None:
    with pytest.raises(ValueError):
        OutlierDetector(OutlierDetection(interval=0.0), now=0.0)


@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(KEYS),
            st.sampled_from([200, 500, 502, 503, 504, None]),
            st.floats(min_value=0.0, max_value=5.0),
        ),
        max_size=300,
    ),
    percent=st.integers(min_value=0, max_value=100),
)
def test_ejected_share_never_exceeds_the_cap_and_deadlines_lie_ahead(
    events: list[tuple[str, int | None, float]], percent: int
) -> None:
    d = detector(OutlierDetection(consecutive_5xx_errors=2, max_ejection_percent=percent))
    now = 0.0
    for key, status, step in events:
        now += step
        if status is None:
            d.sweep(now)
            deadline = d.next_deadline()
            assert deadline is None or deadline > now
        elif d.record_status(key, status, now) is not None:
            deadline = d.next_deadline()
            assert deadline is not None and deadline > now
        assert 100 * len(d.ejected) / len(KEYS) <= percent
