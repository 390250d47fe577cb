"""Keeps one fresh workload certificate per identity the node serves, the way istio-agent does.

Rules: fetch on first use (or ahead of traffic via `prefetch`), refresh at half the validity
left when the certificate arrived (never sooner than `MIN_REFRESH_DELAY`), retry a failed fetch
after 0.5 s, 1 s, 2 s ... capped at 150 s, keep serving the old certificate while it is still
valid, and forget an identity once it is released.

`CertificateSchedule` is the whole policy as plain bookkeeping: time is an argument, and it
answers which identities are due and when it next needs to be woken. `CertificateManager` is the
thin asyncio adapter that calls the fetch function and sleeps until the schedule's next deadline.
Times are wall-clock seconds since the epoch, because certificate validity is wall-clock time;
both classes take the clock as an input so tests move time without sleeping. Neither class knows
how a certificate is obtained (in-process CA, gRPC to istiod): that is the injected `fetch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial

from ztagent.errors import LocalError
from ztagent.identity.certs import WorkloadCertificate
from ztagent.identity.spiffe import Identity

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 150.0
MIN_REFRESH_DELAY = 5.0
"""Shortest time between a certificate's arrival and its refresh, whatever the CA hands out: a
CA issuing certificates that live a few seconds costs one request per identity per 5 s, not a
loop (istio-agent and ztunnel clamp a past refresh time to "now"; we add a floor)."""
MIN_SECRET_TTL = timedelta(minutes=1)
"""Shortest workload certificate lifetime we ask for: the CA backdates notBefore by a minute
for clock skew, and anything shorter renews so often that the CA becomes the bottleneck."""
DEFAULT_JITTER = 0.1
MAX_SLEEP = 60.0
"""Longest single sleep: asyncio sleeps on a monotonic clock, so re-read the wall clock often."""

Clock = Callable[[], float]
Fetch = Callable[[Identity], Awaitable[WorkloadCertificate]]


def check_secret_ttl(ttl: timedelta, flag: str = "--secret-ttl (SECRET_TTL)") -> timedelta:
    """`ttl` when it is a lifetime worth asking for; a `LocalError` naming `flag` otherwise."""
    if ttl < MIN_SECRET_TTL:
        raise LocalError(
            f"{flag}: {ttl.total_seconds():g}s is too short; workload certificates must live "
            f"at least {MIN_SECRET_TTL.total_seconds():g}s (the CA backdates them by a minute "
            "for clock skew and they are renewed at half their lifetime)"
        )
    return ttl


def refresh_due(cert: WorkloadCertificate, now: float, floor: float = MIN_REFRESH_DELAY) -> float:
    """When to refresh `cert` that arrived at `now`: half its remaining validity, at least `floor`.

    A certificate that expires sooner than `floor` is still refreshed after `floor`: a CA that
    hands out nearly expired certificates must not make every identity spin against it.
    """
    received = datetime.fromtimestamp(now, UTC)
    return max(cert.refresh_at(received).timestamp(), now + floor)


@dataclass(slots=True)
class _Entry:
    cert: WorkloadCertificate | None = None
    due: float = 0.0
    failures: int = 0
    in_flight: bool = False


class CertificateSchedule:
    """When each tracked identity needs a fetch; pure, so every rule is tested without I/O.

    `jitter` shortens each backoff by up to that fraction (drawn from `rand`) so that many
    identities failing together do not retry in lock step; inject `rand` for determinism.
    """

    def __init__(
        self,
        *,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        jitter: float = DEFAULT_JITTER,
        min_refresh: float = MIN_REFRESH_DELAY,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self._min_refresh = min_refresh
        self._initial = initial_backoff
        self._max = max_backoff
        self._jitter = jitter
        self._rand = rand
        self._entries: dict[Identity, _Entry] = {}

    def __contains__(self, identity: object) -> bool:
        return identity in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def identities(self) -> list[Identity]:
        return sorted(self._entries)

    def track(self, identity: Identity, now: float) -> bool:
        """Start looking after `identity`, due at once; False if it was already tracked."""
        if identity in self._entries:
            return False
        self._entries[identity] = _Entry(due=now)
        return True

    def release(self, identity: Identity) -> None:
        """Forget `identity` and its certificate; a fetch still running will not bring it back."""
        self._entries.pop(identity, None)

    def cert(self, identity: Identity) -> WorkloadCertificate | None:
        entry = self._entries.get(identity)
        return entry.cert if entry else None

    def failures(self, identity: Identity) -> int:
        entry = self._entries.get(identity)
        return entry.failures if entry else 0

    def due_at(self, identity: Identity) -> float | None:
        entry = self._entries.get(identity)
        return entry.due if entry else None

    def due(self, now: float) -> list[Identity]:
        """Identities whose fetch time has come and that are not being fetched, soonest first."""
        ready = [(e.due, i) for i, e in self._entries.items() if not e.in_flight and e.due <= now]
        return [i for _, i in sorted(ready)]

    def next_wakeup(self) -> float | None:
        """The earliest time something becomes due; None when nothing waits on a timer."""
        times = [e.due for e in self._entries.values() if not e.in_flight]
        return min(times, default=None)

    def begin(self, identity: Identity) -> None:
        """A fetch started: keep `identity` out of `due` until it ends."""
        entry = self._entries.get(identity)
        if entry is not None:
            entry.in_flight = True

    def abandon(self, identity: Identity) -> None:
        """A fetch was cancelled (shutdown): neither success nor failure, still due."""
        entry = self._entries.get(identity)
        if entry is not None:
            entry.in_flight = False

    def succeeded(self, identity: Identity, cert: WorkloadCertificate, now: float) -> float | None:
        """Store `cert`; returns when it is due for refresh (None if `identity` was released).

        The refresh comes at half the validity left at `now` and never sooner than the floor
        (`refresh_due`), so a CA that backdates notBefore or hands out short-lived certificates
        cannot make us spin.
        """
        entry = self._entries.get(identity)
        if entry is None:
            return None
        entry.cert = cert
        entry.failures = 0
        entry.in_flight = False
        entry.due = refresh_due(cert, now, self._min_refresh)
        return entry.due

    def failed(self, identity: Identity, now: float) -> float | None:
        """Count a failure; returns the backoff delay before the retry (None if released)."""
        entry = self._entries.get(identity)
        if entry is None:
            return None
        entry.failures += 1
        entry.in_flight = False
        delay = self.backoff(entry.failures)
        entry.due = now + delay
        return delay

    def backoff(self, failures: int) -> float:
        """Delay after `failures` consecutive failures: 0.5 s doubling, capped, minus jitter."""
        base = min(self._initial * 2.0 ** max(failures - 1, 0), self._max)
        return base * (1.0 - self._jitter * self._rand())


class CertificateManager:
    """Serves certificates from the schedule, fetching on first use and refreshing in background.

    Callers asking for the same identity at once share one fetch. `start()` runs the refresh
    loop; without it certificates are still fetched on demand and by `refresh_due()`.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        clock: Clock = time.time,
        schedule: CertificateSchedule | None = None,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._schedule = schedule if schedule is not None else CertificateSchedule()
        self._inflight: dict[Identity, asyncio.Task[WorkloadCertificate]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def schedule(self) -> CertificateSchedule:
        return self._schedule

    def get_cached(self, identity: Identity) -> WorkloadCertificate | None:
        """The current certificate if one is held and not yet expired; never fetches."""
        cert = self._schedule.cert(identity)
        if cert is None or cert.not_after.timestamp() <= self._clock():
            return None
        return cert

    async def get(self, identity: Identity) -> WorkloadCertificate:
        """A valid certificate for `identity`, fetching (once, shared) if none is held."""
        self._schedule.track(identity, self._clock())
        cert = self.get_cached(identity)
        if cert is not None:
            return cert
        # shield: one caller giving up must not cancel the fetch the others wait for.
        return await asyncio.shield(self._start(identity))

    def prefetch(self, identity: Identity) -> None:
        """Track `identity` and start fetching now, ahead of its first connection."""
        if self._schedule.track(identity, self._clock()):
            self._start(identity)

    def release(self, identity: Identity) -> None:
        """Stop refreshing `identity` and drop its certificate (its last workload left)."""
        self._schedule.release(identity)
        self._wake.set()

    async def refresh_due(self) -> None:
        """Fetch everything due now and wait for those fetches; failures are only scheduled."""
        tasks = self._start_due()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def start(self) -> None:
        """Run the refresh loop in the background; call from within the event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="certificate refresh"
            )

    async def stop(self) -> None:
        """Stop the refresh loop and cancel fetches still running."""
        tasks: list[asyncio.Task[object]] = [*self._inflight.values()]
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start_due(self) -> list[asyncio.Task[WorkloadCertificate]]:
        return [self._start(identity) for identity in self._schedule.due(self._clock())]

    def _start(self, identity: Identity) -> asyncio.Task[WorkloadCertificate]:
        self._schedule.begin(identity)
        task = self._inflight.get(identity)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fetch_one(identity), name=f"certificate fetch {identity}"
            )
            self._inflight[identity] = task
            task.add_done_callback(partial(self._fetch_done, identity))
        return task

    def _fetch_done(self, identity: Identity, task: asyncio.Task[WorkloadCertificate]) -> None:
        if self._inflight.get(identity) is task:
            del self._inflight[identity]
        if not task.cancelled():
            task.exception()  # failures are logged and scheduled; mark them as seen.
        self._wake.set()

    async def _fetch_one(self, identity: Identity) -> WorkloadCertificate:
        try:
            cert = await self._fetch(identity)
            if cert.identity != identity:
                raise LocalError(
                    f"asked for a certificate for {identity}, got one for {cert.identity}"
                )
        except asyncio.CancelledError:
            self._schedule.abandon(identity)
            raise
        except Exception as exc:
            delay = self._schedule.failed(identity, self._clock())
            if delay is not None:
                log.warning(
                    "certificate for %s: fetch failed (%s); retrying in %.1fs", identity, exc, delay
                )
            raise
        due = self._schedule.succeeded(identity, cert, self._clock())
        if due is not None:
            log.info(
                "certificate for %s: valid until %s, refresh in %.0fs",
                identity,
                cert.not_after.isoformat(),
                due - self._clock(),
            )
        return cert

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            self._start_due()
            wake_at = self._schedule.next_wakeup()
            delay = MAX_SLEEP if wake_at is None else wake_at - self._clock()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(max(delay, 0.0), MAX_SLEEP))
