"""Outlier detection: ejecting endpoints that keep failing, as a DestinationRule asks.

Owns the resolved `outlierDetection` settings (`OutlierDetection`, with Istio's defaults) and
the per-destination detector. The detector follows Envoy's consecutive-error detector, which is
what Istio configures:

- Each endpoint counts consecutive 5xx responses and consecutive gateway errors (502, 503, 504);
  any other status resets both counters, a 5xx that is not a gateway error resets the gateway
  counter. Failures the proxy sees itself are mapped to statuses as Envoy does: a failed connect
  or a reset is a 503, a timeout a 504. With `splitExternalLocalOriginErrors` those count
  separately instead, against `consecutiveLocalOriginFailures`.
- When a counter reaches its threshold (0 disables it) the endpoint is ejected at once, if
  ejecting it keeps the ejected share at or under `maxEjectionPercent`; the counter is reset
  either way. An ejection lasts `baseEjectionTime` times the endpoint's backoff count, capped at
  max(300 s, baseEjectionTime); the count grows by one on each ejection and shrinks by one at
  each sweep an endpoint spends back in service for at least an interval.
- Ejected endpoints return only at a sweep: sweeps run every `interval` from the detector's
  creation time (`sweep(now)`; `next_deadline()` says when one is next needed).
- `usable()` gives the endpoints a balancer may pick: the ones not ejected, or all of them when
  fewer than `minHealthPercent` percent are healthy (Envoy's panic mode; Istio's default 0
  turns it off, so an all-ejected destination has no usable endpoint).

Pure: time comes in as `now` (seconds, monotonic), nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ztagent.istio.balancer import EndpointLike

DEFAULT_CONSECUTIVE_5XX_ERRORS = 5
DEFAULT_CONSECUTIVE_LOCAL_ORIGIN_FAILURES = 5
DEFAULT_INTERVAL = 10.0
DEFAULT_BASE_EJECTION_TIME = 30.0
DEFAULT_MAX_EJECTION_PERCENT = 10
DEFAULT_MAX_EJECTION_TIME = 300.0
GATEWAY_ERRORS = frozenset((502, 503, 504))

E = TypeVar("E", bound=EndpointLike)


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """A resolved `outlierDetection`; durations in seconds, thresholds 0 when disabled."""

    consecutive_5xx_errors: int = DEFAULT_CONSECUTIVE_5XX_ERRORS
    consecutive_gateway_errors: int = 0
    interval: float = DEFAULT_INTERVAL
    base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME
    max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT
    min_health_percent: int = 0
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failures: int = DEFAULT_CONSECUTIVE_LOCAL_ORIGIN_FAILURES

    @property
    def max_ejection_time(self) -> float:
        """Envoy's `max_ejection_time`, which Istio leaves at its default."""
        return max(DEFAULT_MAX_EJECTION_TIME, self.base_ejection_time)


class LocalOrigin(enum.Enum):
    """A result the proxy observes itself rather than a status from the endpoint."""

    CONNECT_FAILED = "connect-failed"
    TIMEOUT = "timeout"
    RESET = "reset"
    CONNECT_SUCCESS = "connect-success"


_LOCAL_STATUS = {
    LocalOrigin.CONNECT_FAILED: 503,
    LocalOrigin.TIMEOUT: 504,
    LocalOrigin.RESET: 503,
}


class EjectionCause(enum.Enum):
    CONSECUTIVE_5XX = "consecutive_5xx"
    CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"


@dataclass(frozen=True, slots=True)
class Ejection:
    """An endpoint taken out of service: why, when, for how long, and how often so far."""

    key: str
    cause: EjectionCause
    at: float
    duration: float
    ejections: int

    @property
    def until(self) -> float:
        """The earliest time it may return (it returns at the first sweep from then on)."""
        return self.at + self.duration


class _Host:
    __slots__ = (
        "backoff",
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "ejected_at",
        "ejected_for",
        "ejections",
        "readmitted_at",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.ejections = 0
        self.backoff = 0
        self.ejected_at: float | None = None
        self.ejected_for = 0.0
        self.readmitted_at: float | None = None


class OutlierDetector:
    """The ejection state of one destination's endpoints (one Envoy cluster)."""

    def __init__(
        self, settings: OutlierDetection, now: float, endpoints: Iterable[str] = ()
    ) -> None:
        if settings.interval <= 0 or settings.base_ejection_time <= 0:
            raise ValueError("interval and baseEjectionTime must be positive")
        self.settings = settings
        self._start = now
        self._next_sweep = now + settings.interval
        self._hosts: dict[str, _Host] = {}
        self.overflows = 0
        """Ejections refused because of `maxEjectionPercent` (Envoy's ejections_overflow)."""
        self.update_endpoints(endpoints)

    # --- membership -----------------------------------------------------------------------

    def update_endpoints(self, keys: Iterable[str]) -> None:
        """Track exactly `keys`: new endpoints start healthy, removed ones are forgotten."""
        wanted = list(dict.fromkeys(keys))
        current = set(wanted)
        for key in [k for k in self._hosts if k not in current]:
            del self._hosts[key]
        for key in wanted:
            self._hosts.setdefault(key, _Host())

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(self._hosts)

    # --- results ----------------------------------------------------------------------------

    def record_status(self, key: str, status: int, now: float) -> Ejection | None:
        """A response status from endpoint `key`; returns the ejection it caused, if any."""
        host = self._hosts.get(key)
        if host is None:
            return None
        if not 500 <= status <= 599:
            host.consecutive_5xx = 0
            host.consecutive_gateway = 0
            return None
        ejection: Ejection | None = None
        if status in GATEWAY_ERRORS:
            host.consecutive_gateway += 1
            if host.consecutive_gateway == self.settings.consecutive_gateway_errors:
                ejection = self._detected(key, host, EjectionCause.CONSECUTIVE_GATEWAY_FAILURE, now)
        else:
            host.consecutive_gateway = 0
        host.consecutive_5xx += 1
        if host.consecutive_5xx == self.settings.consecutive_5xx_errors:
            ejection = self._detected(key, host, EjectionCause.CONSECUTIVE_5XX, now) or ejection
        return ejection

    def record_local(self, key: str, result: LocalOrigin, now: float) -> Ejection | None:
        """A failure (or a successful connect) the proxy saw itself on endpoint `key`."""
        host = self._hosts.get(key)
        if host is None:
            return None
        if not self.settings.split_external_local_origin_errors:
            status = _LOCAL_STATUS.get(result)
            return None if status is None else self.record_status(key, status, now)
        if result is LocalOrigin.CONNECT_SUCCESS:
            host.consecutive_local = 0
            return None
        if result is LocalOrigin.RESET:
            # With the split, a reset after connecting is the endpoint's failure (a 5xx).
            return self.record_status(key, 503, now)
        host.consecutive_local += 1
        if host.consecutive_local == self.settings.consecutive_local_origin_failures:
            return self._detected(key, host, EjectionCause.CONSECUTIVE_LOCAL_ORIGIN_FAILURE, now)
        return None

    def _detected(self, key: str, host: _Host, cause: EjectionCause, now: float) -> Ejection | None:
        if host.ejected_at is not None:
            return None
        ejection = self._eject(key, host, cause, now)
        if cause is EjectionCause.CONSECUTIVE_5XX:
            host.consecutive_5xx = 0
        elif cause is EjectionCause.CONSECUTIVE_GATEWAY_FAILURE:
            host.consecutive_gateway = 0
        else:
            host.consecutive_local = 0
        return ejection

    def _eject(self, key: str, host: _Host, cause: EjectionCause, now: float) -> Ejection | None:
        settings = self.settings
        ejected_share = 100.0 * (self.ejected_count + 1) / len(self._hosts)
        if ejected_share > min(100, settings.max_ejection_percent):
            self.overflows += 1
            return None
        base = settings.base_ejection_time
        maximum = settings.max_ejection_time
        if host.backoff * base < maximum + base:
            host.backoff += 1
        host.ejections += 1
        host.ejected_at = now
        host.ejected_for = min(base * host.backoff, maximum)
        self._align(now)
        return Ejection(key, cause, now, host.ejected_for, host.ejections)

    # --- sweeps -----------------------------------------------------------------------------

    def _align(self, now: float) -> None:
        """Move the next sweep to the first tick of the interval grid after `now` if it passed."""
        if self._next_sweep <= now:
            interval = self.settings.interval
            ticks = math.floor((now - self._start) / interval) + 1
            self._next_sweep = self._start + ticks * interval

    def sweep(self, now: float) -> tuple[str, ...]:
        """Run the interval sweep if one is due; returns the endpoints readmitted."""
        if now < self._next_sweep:
            return ()
        readmitted: list[str] = []
        for key, host in self._hosts.items():
            if host.ejected_at is not None and now - host.ejected_at >= host.ejected_for:
                host.ejected_at = None
                host.readmitted_at = now
                host.consecutive_5xx = 0
                host.consecutive_gateway = 0
                host.consecutive_local = 0
                readmitted.append(key)
        interval = self.settings.interval
        for host in self._hosts.values():
            if (
                host.ejected_at is None
                and host.readmitted_at is not None
                and now - host.readmitted_at >= interval
                and host.backoff > 0
            ):
                host.backoff -= 1
        self._align(now)
        return tuple(readmitted)

    def next_deadline(self) -> float | None:
        """When `sweep` next has work: None while no endpoint is ejected or backing off."""
        if any(h.ejected_at is not None or h.backoff > 0 for h in self._hosts.values()):
            return self._next_sweep
        return None

    # --- state ------------------------------------------------------------------------------

    def is_ejected(self, key: str) -> bool:
        host = self._hosts.get(key)
        return host is not None and host.ejected_at is not None

    @property
    def ejected(self) -> frozenset[str]:
        return frozenset(k for k, h in self._hosts.items() if h.ejected_at is not None)

    @property
    def ejected_count(self) -> int:
        return sum(1 for h in self._hosts.values() if h.ejected_at is not None)

    def ejections(self, key: str) -> int:
        """How many times `key` has been ejected since it was first tracked."""
        host = self._hosts.get(key)
        return 0 if host is None else host.ejections

    def in_panic(self, endpoints: Sequence[EndpointLike]) -> bool:
        """True when fewer than `minHealthPercent` percent of `endpoints` are healthy."""
        if not endpoints or self.settings.min_health_percent <= 0:
            return False
        healthy = sum(1 for e in endpoints if not self.is_ejected(e.key))
        return 100.0 * healthy / len(endpoints) < self.settings.min_health_percent

    def usable(self, endpoints: Sequence[E]) -> list[E]:
        """The endpoints a balancer may pick from (see the module docstring)."""
        if self.in_panic(endpoints):
            return list(endpoints)
        return [e for e in endpoints if not self.is_ejected(e.key)]


__all__ = [
    "DEFAULT_BASE_EJECTION_TIME",
    "DEFAULT_CONSECUTIVE_5XX_ERRORS",
    "DEFAULT_INTERVAL",
    "DEFAULT_MAX_EJECTION_PERCENT",
    "GATEWAY_ERRORS",
    "Ejection",
    "EjectionCause",
    "LocalOrigin",
    "OutlierDetection",
    "OutlierDetector",
]
