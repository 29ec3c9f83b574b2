"""Property tests for the load balancers and the priority load."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from ubimesh.proxy.snapshot.types import Cluster, DiscoveryType, LbPolicy, SocketAddress
from ubimesh.proxy.upstream.cluster import UpstreamCluster
from ubimesh.proxy.upstream.host import Host
from ubimesh.proxy.upstream.priority import (
    compute_priority_load,
    level_health,
    priority_load_for_counts,
)
from ubimesh.telemetry.stats import Store

PICKS = 10_000

weights_st = st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=12)


def make(policy: LbPolicy, weights: list[int], seed: int) -> tuple[UpstreamCluster, list[Host]]:
    hs = [Host(SocketAddress(f"10.1.0.{i + 1}", 80), weight=w) for i, w in enumerate(weights)]
    spec = Cluster("p", DiscoveryType.STATIC, lb_policy=policy)
    return UpstreamCluster(spec, Store(), hs, rng=random.Random(seed)), hs


def assert_shares(counts: Counter[Host | None], hs: list[Host], expected: list[float]) -> None:
    for h, want in zip(hs, expected, strict=True):
        got = counts[h] / PICKS
        assert abs(got - want) <= 0.02, (h, h.weight, got, want)


@settings(max_examples=60, deadline=None)
@given(weights=weights_st, seed=st.integers(0, 2**32))
def test_weighted_round_robin_shares_follow_weights(weights: list[int], seed: int) -> None:
    c, hs = make(LbPolicy.ROUND_ROBIN, weights, seed)
    counts = Counter(c.choose_host() for _ in range(PICKS))
    total = sum(weights)
    assert_shares(counts, hs, [w / total for w in weights])


@settings(max_examples=40, deadline=None)
@given(weights=weights_st, seed=st.integers(0, 2**32))
def test_idle_weighted_least_request_shares_follow_weights(weights: list[int], seed: int) -> None:
    # With no active requests the dynamic weight is the configured weight (or P2C when all
    # weights are equal, which is uniform).
    c, hs = make(LbPolicy.LEAST_REQUEST, weights, seed)
    counts = Counter(c.choose_host() for _ in range(PICKS))
    total = sum(weights)
    assert_shares(counts, hs, [w / total for w in weights])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 10), seed=st.integers(0, 2**32))
def test_random_is_uniform(n: int, seed: int) -> None:
    c, hs = make(LbPolicy.RANDOM, [1] * n, seed)
    counts = Counter(c.choose_host() for _ in range(PICKS))
    assert_shares(counts, hs, [1 / n] * n)


@settings(max_examples=30, deadline=None)
@given(
    weights=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    keys=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50),
)
def test_ring_hash_is_a_function_of_key_and_hosts(weights: list[int], keys: list[int]) -> None:
    a, hs = make(LbPolicy.RING_HASH, weights, 1)
    b = UpstreamCluster(a.spec, Store(), hs, rng=random.Random(2))
    for k in keys:
        assert a.choose_host(k) is b.choose_host(k) is a.choose_host(k)


levels_st = st.lists(
    st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20)).map(
        lambda t: (t[0], min(t[1], t[0]), min(t[2], t[0] - min(t[1], t[0])))
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(levels=levels_st, factor=st.integers(1, 300))
def test_priority_loads_sum_to_100(levels: list[tuple[int, int, int]], factor: int) -> None:
    load = priority_load_for_counts(factor, levels)
    available = any(level_health(factor, h, t) or level_health(factor, d, t) for t, h, d in levels)
    if available:
        assert load.total == 100
    else:
        assert load.total == 0
    shares = zip(levels, load.healthy, load.degraded, strict=True)
    for (_total, healthy, degraded), hl, dl in shares:
        assert 0 <= hl <= 100 and 0 <= dl <= 100
        if healthy == 0:
            assert hl == 0
        if degraded == 0:
            assert dl == 0


@settings(max_examples=300, deadline=None)
@given(
    health=st.lists(st.integers(0, 100), min_size=1, max_size=6),
    data=st.data(),
)
def test_fully_healthy_first_level_takes_everything(health: list[int], data: st.DataObject) -> None:
    degraded = data.draw(st.lists(st.integers(0, 100), min_size=len(health), max_size=len(health)))
    health[0] = 100
    load = compute_priority_load(health, degraded)
    assert load.healthy[0] == 100
    assert sum(load.healthy) + sum(load.degraded) == 100


@settings(max_examples=100, deadline=None)
@given(
    priorities=st.lists(st.integers(0, 3), min_size=1, max_size=10),
    unhealthy=st.sets(st.integers(0, 9)),
    seed=st.integers(0, 2**32),
)
def test_cluster_picks_follow_priority_load(
    priorities: list[int], unhealthy: set[int], seed: int
) -> None:
    hs = [Host(SocketAddress(f"10.2.0.{i + 1}", 80), priority=p) for i, p in enumerate(priorities)]
    for i in unhealthy:
        if i < len(hs):
            hs[i].healthy = False
    # Panic off (test_lb_panic.py covers it): only healthy hosts, by the priority load.
    spec = Cluster(
        "q", DiscoveryType.STATIC, lb_policy=LbPolicy.ROUND_ROBIN, healthy_panic_threshold=0.0
    )
    c = UpstreamCluster(spec, Store(), hs, rng=random.Random(seed))
    picked = [c.choose_host() for _ in range(PICKS)]
    if not any(h.healthy for h in hs):
        assert picked == [None] * PICKS
        return
    assert all(h is not None and h.healthy for h in picked)
    per_level = Counter(h.priority for h in picked if h is not None)
    for p, share in enumerate(c.priority_load.healthy):
        assert abs(per_level[p] / PICKS - share / 100) <= 0.02
