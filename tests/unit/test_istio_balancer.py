"""Load balancers: round robin, least request, random and consistent hash (seeded rng)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztagent.istio.balancer import (
    Algorithm,
    Balancer,
    ConsistentHash,
    Endpoint,
    HashInput,
    HashSource,
    LeastRequest,
    LoadBalancerSettings,
    RandomPick,
    RingHash,
    RoundRobin,
    new_balancer,
)

ENDPOINTS = [Endpoint(f"ep-{i}", {"version": "v1"}) for i in range(4)]


def test_round_robin_cycles_in_order_from_a_random_start() -> None:
    lb: RoundRobin[Endpoint] = RoundRobin(random.Random(7))
    picks = [lb.pick(ENDPOINTS) for _ in range(8)]
    first = ENDPOINTS.index(picks[0])  # type: ignore[arg-type]
    expected = [ENDPOINTS[(first + i) % 4] for i in range(8)]
    assert picks == expected
    # Without an rng the first pick is the first endpoint.
    plain: RoundRobin[Endpoint] = RoundRobin()
    assert [plain.pick(ENDPOINTS) for _ in range(5)] == [*ENDPOINTS, ENDPOINTS[0]]


def test_round_robin_counter_is_per_balancer_and_follows_set_changes() -> None:
    a: RoundRobin[Endpoint] = RoundRobin()
    b: RoundRobin[Endpoint] = RoundRobin()
    assert a.pick(ENDPOINTS) == ENDPOINTS[0]
    assert a.pick(ENDPOINTS) == ENDPOINTS[1]
    assert b.pick(ENDPOINTS) == ENDPOINTS[0]
    assert a.pick(ENDPOINTS[:2]) == ENDPOINTS[0]  # counter 2 over two endpoints


def test_empty_set_gives_none() -> None:
    rng = random.Random(1)
    balancers: list[Balancer[Endpoint]] = [
        RoundRobin(rng),
        LeastRequest(rng),
        RandomPick(rng),
        RingHash(rng),
    ]
    for lb in balancers:
        assert lb.pick([]) is None
        assert lb.pick([], "key") is None


def test_least_request_prefers_idle_endpoints() -> None:
    lb: LeastRequest[Endpoint] = LeastRequest(random.Random(42))
    busy, idle = ENDPOINTS[:3], ENDPOINTS[3]
    for endpoint in busy:
        for _ in range(5):
            lb.request_started(endpoint.key)
    counts = Counter(lb.pick(ENDPOINTS).key for _ in range(4000))  # type: ignore[union-attr]
    # The idle endpoint wins whenever it is one of the two draws: 1 - (3/4)^2 = 7/16.
    assert counts[idle.key] / 4000 == pytest.approx(7 / 16, abs=0.03)
    assert all(counts[e.key] / 4000 == pytest.approx(3 / 16, abs=0.03) for e in busy)


def test_least_request_tracks_started_and_finished_requests() -> None:
    lb: LeastRequest[Endpoint] = LeastRequest(random.Random(3))
    two = ENDPOINTS[:2]
    lb.request_started("ep-0")
    lb.request_started("ep-0")
    lb.request_started("ep-1")
    assert (lb.active("ep-0"), lb.active("ep-1")) == (2, 1)
    picks = Counter(lb.pick(two).key for _ in range(1000))  # type: ignore[union-attr]
    assert picks["ep-1"] > picks["ep-0"] * 2  # ep-1 wins all mixed draws (1/2), ties go first
    lb.request_finished("ep-0")
    lb.request_finished("ep-0")
    assert lb.active("ep-0") == 0
    with pytest.raises(ValueError):
        lb.request_finished("ep-0")


def test_least_request_under_balanced_load_spreads_evenly() -> None:
    lb: LeastRequest[Endpoint] = LeastRequest(random.Random(5))
    counts: Counter[str] = Counter()
    for _ in range(4000):
        chosen = lb.pick(ENDPOINTS)
        assert chosen is not None
        counts[chosen.key] += 1
    assert all(c / 4000 == pytest.approx(0.25, abs=0.03) for c in counts.values())


def test_random_distribution_is_uniform() -> None:
    lb: RandomPick[Endpoint] = RandomPick(random.Random(11))
    counts = Counter(lb.pick(ENDPOINTS).key for _ in range(8000))  # type: ignore[union-attr]
    assert set(counts) == {e.key for e in ENDPOINTS}
    assert all(c / 8000 == pytest.approx(0.25, abs=0.02) for c in counts.values())


def test_consistent_hash_is_stable_for_a_key() -> None:
    lb: RingHash[Endpoint] = RingHash(random.Random(1))
    for user in (f"user-{i}" for i in range(50)):
        first = lb.pick(ENDPOINTS, user)
        assert all(lb.pick(ENDPOINTS, user) == first for _ in range(5))
        # A fresh balancer (another waypoint, another process) agrees.
        other: RingHash[Endpoint] = RingHash(random.Random(99))
        assert other.pick(list(reversed(ENDPOINTS)), user) == first


def test_consistent_hash_spreads_keys() -> None:
    lb: RingHash[Endpoint] = RingHash(random.Random(1))
    counts = Counter(lb.pick(ENDPOINTS, f"k{i}").key for i in range(4000))  # type: ignore[union-attr]
    assert set(counts) == {e.key for e in ENDPOINTS}
    assert all(0.15 < c / 4000 < 0.35 for c in counts.values())


def test_consistent_hash_removal_moves_only_the_removed_endpoints_keys() -> None:
    lb: RingHash[Endpoint] = RingHash(random.Random(1))
    keys = [f"session-{i}" for i in range(2000)]
    before = {k: lb.pick(ENDPOINTS, k) for k in keys}
    removed = ENDPOINTS[2]
    remaining = [e for e in ENDPOINTS if e != removed]
    after = {k: lb.pick(remaining, k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == removed for k in moved)
    assert len(moved) == sum(1 for k in keys if before[k] == removed)
    # Adding it back restores the original mapping.
    assert {k: lb.pick(ENDPOINTS, k) for k in keys} == before


def test_consistent_hash_without_a_key_picks_at_random() -> None:
    lb: RingHash[Endpoint] = RingHash(random.Random(2))
    seen = {lb.pick(ENDPOINTS).key for _ in range(200)}  # type: ignore[union-attr]
    assert seen == {e.key for e in ENDPOINTS}


def test_hash_keys_from_the_request() -> None:
    request = HashInput(
        headers={"x-user": "alice", "cookie": "a=1; session=abc; b=2"},
        source_ip="10.0.0.7",
        query={"u": "bob"},
    )
    assert ConsistentHash(HashSource.HEADER, "X-User").key_for(request) == "alice"
    assert ConsistentHash(HashSource.SOURCE_IP).key_for(request) == "10.0.0.7"
    assert ConsistentHash(HashSource.QUERY_PARAMETER, "u").key_for(request) == "bob"
    assert ConsistentHash(HashSource.COOKIE, "session").key_for(request) == "abc"
    assert ConsistentHash(HashSource.COOKIE, "missing").key_for(request) is None
    assert ConsistentHash(HashSource.HEADER, "x-other").key_for(request) is None
    assert ConsistentHash(None).key_for(request) is None
    assert ConsistentHash(HashSource.SOURCE_IP).key_for(HashInput()) is None


def test_new_balancer_follows_the_settings() -> None:
    rng = random.Random(0)
    assert isinstance(new_balancer(LoadBalancerSettings(), rng), LeastRequest)
    assert isinstance(new_balancer(LoadBalancerSettings(Algorithm.ROUND_ROBIN), rng), RoundRobin)
    assert isinstance(new_balancer(LoadBalancerSettings(Algorithm.RANDOM), rng), RandomPick)
    chash = LoadBalancerSettings(consistent_hash=ConsistentHash(HashSource.HEADER, "x"))
    assert isinstance(new_balancer(chash, rng), RingHash)


@given(
    keys=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=12, unique=True),
    request_key=st.text(max_size=20),
    ring=st.integers(min_value=1, max_value=2048),
)
def test_consistent_hash_always_maps_into_the_set(
    keys: list[str], request_key: str, ring: int
) -> None:
    endpoints = [Endpoint(k) for k in keys]
    lb: RingHash[Endpoint] = RingHash(random.Random(0), ring)
    chosen = lb.pick(endpoints, request_key)
    assert chosen in endpoints
    assert lb.pick(endpoints, request_key) == chosen


def test_consistent_hash_addition_moves_keys_only_to_the_new_endpoint() -> None:
    lb: RingHash[Endpoint] = RingHash(random.Random(1))
    keys = [f"session-{i}" for i in range(2000)]
    before = {k: lb.pick(ENDPOINTS, k) for k in keys}
    added = Endpoint("ep-new")
    after = {k: lb.pick([*ENDPOINTS, added], k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(after[k] == added for k in moved)
    assert 0.1 < len(moved) / len(keys) < 0.3  # about a fifth of the keys
