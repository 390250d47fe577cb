import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from ztagent.errors import LocalError
from ztagent.identity.certs import WorkloadCertificate
from ztagent.identity.manager import CertificateManager, CertificateSchedule
from ztagent.identity.spiffe import Identity

WEB = Identity("cluster.local", "default", "web")
DB = Identity("cluster.local", "default", "db")
T0 = 1_900_000_000.0
DAY = 86_400.0


def _cert(identity: Identity, start: float, lifetime: float = DAY) -> WorkloadCertificate:
    """Certificates without PEM: the schedule and the manager only look at identity and times."""
    return WorkloadCertificate(
        identity,
        b"",
        (),
        b"",
        not_before=datetime.fromtimestamp(start, UTC),
        not_after=datetime.fromtimestamp(start + lifetime, UTC),
    )


def _schedule(initial_backoff: float = 0.5, min_refresh: float = 5.0) -> CertificateSchedule:
    return CertificateSchedule(
        initial_backoff=initial_backoff, min_refresh=min_refresh, rand=lambda: 0.0
    )


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeCa:
    """A fetch function that counts calls and can be made to fail or to wait."""

    def __init__(self, clock: Callable[[], float], lifetime: float = DAY) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls: list[Identity] = []
        self.times: list[float] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, identity: Identity) -> WorkloadCertificate:
        self.calls.append(identity)
        self.times.append(self.clock())
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return _cert(identity, self.clock(), self.lifetime)


# --- CertificateSchedule: the policy, without I/O ---


def test_new_identity_is_due_at_once():
    s = _schedule()
    assert s.track(WEB, T0)
    assert not s.track(WEB, T0 + 5)
    assert s.due(T0) == [WEB]
    assert s.next_wakeup() == T0
    assert WEB in s and len(s) == 1


def test_refresh_exactly_at_half_life():
    s = _schedule()
    s.track(WEB, T0)
    s.begin(WEB)
    assert s.due(T0) == [] and s.next_wakeup() is None
    due = s.succeeded(WEB, _cert(WEB, T0), T0)
    assert due == T0 + DAY / 2
    assert s.cert(WEB) == _cert(WEB, T0)
    assert s.next_wakeup() == T0 + DAY / 2
    assert s.due(T0 + DAY / 2 - 0.001) == []
    assert s.due(T0 + DAY / 2) == [WEB]


def test_half_life_counts_from_arrival_not_backdated_not_before():
    s = _schedule()
    s.track(WEB, T0)
    backdated = _cert(WEB, T0 - 60, DAY + 60)
    assert s.succeeded(WEB, backdated, T0) == T0 + DAY / 2


def test_backoff_sequence():
    s = _schedule()
    s.track(WEB, T0)
    now = T0
    delays = []
    for _ in range(12):
        s.begin(WEB)
        delay = s.failed(WEB, now)
        assert delay is not None
        delays.append(delay)
        assert s.due(now + delay - 0.001) == []
        now += delay
        assert s.due(now) == [WEB]
    assert delays == [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 150, 150, 150]
    assert s.failures(WEB) == 12


def test_success_resets_backoff_and_keeps_cert_on_failure():
    s = _schedule()
    s.track(WEB, T0)
    s.failed(WEB, T0)
    s.failed(WEB, T0 + 1)
    s.succeeded(WEB, _cert(WEB, T0 + 2), T0 + 2)
    assert s.failures(WEB) == 0
    assert s.failed(WEB, T0 + DAY / 2) == 0.5
    assert s.cert(WEB) == _cert(WEB, T0 + 2)


def test_jitter_shortens_backoff_deterministically():
    s = CertificateSchedule(jitter=0.2, rand=lambda: 1.0)
    assert s.backoff(1) == pytest.approx(0.4)
    assert s.backoff(20) == pytest.approx(120.0)
    with pytest.raises(ValueError):
        CertificateSchedule(jitter=1.0)


def test_schedule_release_forgets():
    s = _schedule()
    s.track(WEB, T0)
    s.track(DB, T0 + 1)
    s.succeeded(WEB, _cert(WEB, T0), T0)
    s.release(WEB)
    assert WEB not in s
    assert s.cert(WEB) is None
    assert s.due(T0 + DAY) == [DB]
    assert s.succeeded(WEB, _cert(WEB, T0), T0) is None
    assert s.failed(WEB, T0) is None
    assert WEB not in s
    s.release(DB)
    assert s.next_wakeup() is None
    assert s.identities() == []


def test_short_lived_cert_does_not_spin():
    s = _schedule()
    s.track(WEB, T0)
    stale = _cert(WEB, T0 - 100, 102)  # expires in 2 s
    assert s.succeeded(WEB, stale, T0) == T0 + 5.0


def test_due_is_soonest_first():
    s = _schedule()
    s.track(DB, T0)
    s.track(WEB, T0 - 1)
    assert s.due(T0) == [WEB, DB]


def test_abandon_makes_due_again():
    s = _schedule()
    s.track(WEB, T0)
    s.begin(WEB)
    s.abandon(WEB)
    assert s.due(T0) == [WEB]
    assert s.failures(WEB) == 0


# --- CertificateManager: the asyncio adapter ---


def test_get_fetches_once_and_caches():
    clock = Clock()
    ca = FakeCa(clock)
    m = CertificateManager(ca, clock=clock, schedule=_schedule())

    async def main() -> None:
        first = await m.get(WEB)
        clock.now += 3600
        assert await m.get(WEB) is first
        assert m.get_cached(WEB) is first
        assert m.get_cached(DB) is None

    asyncio.run(main())
    assert ca.calls == [WEB]


def test_concurrent_get_shares_one_fetch():
    clock = Clock()
    ca = FakeCa(clock)
    m = CertificateManager(ca, clock=clock, schedule=_schedule())

    async def main() -> list[WorkloadCertificate]:
        ca.gate = asyncio.Event()
        waiters = [asyncio.create_task(m.get(WEB)) for _ in range(10)]
        await asyncio.sleep(0)
        ca.gate.set()
        return await asyncio.gather(*waiters)

    certs = asyncio.run(main())
    assert ca.calls == [WEB]
    assert all(c is certs[0] for c in certs)


def test_cancelled_caller_does_not_cancel_shared_fetch():
    clock = Clock()
    ca = FakeCa(clock)
    m = CertificateManager(ca, clock=clock, schedule=_schedule())

    async def main() -> WorkloadCertificate:
        ca.gate = asyncio.Event()
        impatient = asyncio.create_task(m.get(WEB))
        patient = asyncio.create_task(m.get(WEB))
        await asyncio.sleep(0)
        impatient.cancel()
        await asyncio.sleep(0)
        ca.gate.set()
        return await patient

    assert asyncio.run(main()).identity == WEB
    assert ca.calls == [WEB]


def test_rotation_at_half_life_with_injected_clock():
    clock = Clock()
    ca = FakeCa(clock)
    m = CertificateManager(ca, clock=clock, schedule=_schedule())

    async def main() -> None:
        first = await m.get(WEB)
        clock.now = first.refresh_at().timestamp() - 0.001
        await m.refresh_due()
        assert len(ca.calls) == 1
        clock.now = first.refresh_at().timestamp()
        await m.refresh_due()
        assert len(ca.calls) == 2
        second = m.get_cached(WEB)
        assert second is not None and second is not first
        assert second.not_before.timestamp() == clock.now
        assert m.schedule.due_at(WEB) == clock.now + DAY / 2

    asyncio.run(main())


def test_failure_backs_off_and_keeps_valid_cert():
    clock = Clock()
    ca = FakeCa(clock)
    m = CertificateManager(ca, clock=clock, schedule=_schedule())

    async def main() -> None:
        first = await m.get(WEB)
        ca.fail = ConnectionError("CA unreachable")
        clock.now = first.refresh_at().timestamp()
        expected = [0.5, 1.0, 2.0, 4.0]
        for delay in expected:
            await m.refresh_due()
            assert m.schedule.due_at(WEB) == clock.now + delay
            assert await m.get(WEB) is first  # still valid: no extra fetch
            clock.now += delay - 0.001
            await m.refresh_due()
            clock.now += 0.001
        assert len(ca.calls) == 1 + len(expected)
        ca.fail = None
        await m.refresh_due()
        assert m.schedule.failures(WEB) == 0
        assert m.get_cached(WEB) is not first

    asyncio.run(main())


def test_get_raises_when_first_fetch_fails():
    clock = Clock()
    ca = FakeCa(clock)
    ca.fail = ConnectionError("refused")
    m = CertificateManager(ca, clock=clock, schedule=_schedule())

    async def main() -> None:
        with pytest.raises(ConnectionError):
            await m.get(WEB)
        assert m.schedule.failures(WEB) == 1
        assert m.schedule.due_at(WEB) == T0 + 0.5

    asyncio.run(main())


def test_expired_cert_is_not_served():
    clock = Clock()
    ca = FakeCa(clock, lifetime=100)
    m = CertificateManager(ca, clock=clock, schedule=_schedule())

    async def main() -> None:
        first = await m.get(WEB)
        clock.now += 100
        assert m.get_cached(WEB) is None
        assert await m.get(WEB) is not first

    asyncio.run(main())
    assert len(ca.calls) == 2


def test_wrong_identity_is_a_failure():
    clock = Clock()

    async def fetch(identity: Identity) -> WorkloadCertificate:
        return _cert(DB, clock())

    m = CertificateManager(fetch, clock=clock, schedule=_schedule())

    async def main() -> None:
        with pytest.raises(LocalError, match="got one for"):
            await m.get(WEB)
        assert m.get_cached(WEB) is None
        assert m.schedule.failures(WEB) == 1

    asyncio.run(main())


def test_manager_release_forgets():
    clock = Clock()
    ca = FakeCa(clock)
    m = CertificateManager(ca, clock=clock, schedule=_schedule())

    async def main() -> None:
        await m.get(WEB)
        m.release(WEB)
        assert m.get_cached(WEB) is None
        clock.now += DAY
        await m.refresh_due()
        assert ca.calls == [WEB]

    asyncio.run(main())


def test_release_during_fetch_does_not_resurrect():
    clock = Clock()
    ca = FakeCa(clock)
    m = CertificateManager(ca, clock=clock, schedule=_schedule())

    async def main() -> None:
        ca.gate = asyncio.Event()
        waiter = asyncio.create_task(m.get(WEB))
        await asyncio.sleep(0)
        m.release(WEB)
        ca.gate.set()
        cert = await waiter
        assert cert.identity == WEB
        assert WEB not in m.schedule
        assert m.get_cached(WEB) is None

    asyncio.run(main())


def test_prefetch_and_background_refresh():
    """Real time, short certificates: the loop must refresh at half life on its own."""
    ca = FakeCa(time.time, lifetime=0.2)
    m = CertificateManager(ca, schedule=_schedule(initial_backoff=0.01, min_refresh=0.01))

    async def main() -> None:
        m.start()
        m.prefetch(WEB)
        m.prefetch(WEB)
        while len(ca.calls) < 3:
            await asyncio.sleep(0.01)
        await m.stop()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert set(ca.calls) == {WEB}
    gaps = [b - a for a, b in zip(ca.times, ca.times[1:], strict=False)]
    assert all(gap >= 0.099 for gap in gaps)  # never before half life (0.1 s)


def test_stop_cancels_fetches():
    clock = Clock()
    ca = FakeCa(clock)
    m = CertificateManager(ca, clock=clock, schedule=_schedule())

    async def main() -> None:
        ca.gate = asyncio.Event()
        m.start()
        m.prefetch(WEB)
        await asyncio.sleep(0)
        await m.stop()
        assert m.schedule.due(clock.now) == [WEB]
        assert m.schedule.failures(WEB) == 0

    asyncio.run(main())


def test_refresh_at_is_wall_clock():
    """The schedule compares certificate times as epoch seconds, whatever the timezone."""
    s = _schedule()
    s.track(WEB, T0)
    c = _cert(WEB, T0)
    plus_five = timezone(timedelta(hours=5))
    local = WorkloadCertificate(
        WEB, b"", (), b"", c.not_before.astimezone(plus_five), c.not_after.astimezone(plus_five)
    )
    assert s.succeeded(WEB, local, T0) == T0 + DAY / 2
