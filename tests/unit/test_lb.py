"""Load balancer semantics: round robin, least request, random, ring hash, Maglev."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ubimesh.proxy.snapshot.types import (
    Cluster,
    DiscoveryType,
    LbPolicy,
    LeastRequestConfig,
    RingHashConfig,
    SocketAddress,
)
from ubimesh.proxy.upstream.cluster import UpstreamCluster
from ubimesh.proxy.upstream.hashing import xxh64
from ubimesh.proxy.upstream.host import Host
from ubimesh.proxy.upstream.lb import (
    EdfPicker,
    MaglevPicker,
    P2CPicker,
    RingHashPicker,
    edf_schedule,
)
from ubimesh.telemetry.stats import Store


def hosts(weights: list[int], priorities: list[int] | None = None) -> list[Host]:
    return [
        Host(
            SocketAddress(f"10.0.{i // 250}.{i % 250 + 1}", 8080),
            cluster_name="c",
            weight=w,
            priority=priorities[i] if priorities else 0,
        )
        for i, w in enumerate(weights)
    ]


def cluster(policy: LbPolicy, hs: list[Host], seed: int = 1, **kw: object) -> UpstreamCluster:
    spec = Cluster("c", DiscoveryType.STATIC, lb_policy=policy, **kw)  # type: ignore[arg-type]
    return UpstreamCluster(spec, Store(), hs, rng=random.Random(seed))


def picks(c: UpstreamCluster, n: int, hash_key: int | None = None) -> Counter[Host]:
    out: Counter[Host] = Counter()
    for _ in range(n):
        h = c.choose_host(hash_key)
        assert h is not None
        out[h] += 1
    return out


# -- hashing ---------------------------------------------------------------------------------


def test_xxh64_reference_vectors() -> None:
    # Published XXH64 test vectors (seed 0 unless given); the long one covers 32-byte stripes.
    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"a") == 0xD24EC4F1A98C6E5B
    assert xxh64(b"abc") == 0x44BC2CF5AD770999
    assert xxh64(b"Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1


# -- round robin -----------------------------------------------------------------------------


def test_round_robin_equal_weights_visits_every_host_in_turn() -> None:
    hs = hosts([1, 1, 1, 1])
    c = cluster(LbPolicy.ROUND_ROBIN, hs)
    seq = [c.choose_host() for _ in range(12)]
    first = hs.index(seq[0])  # type: ignore[arg-type]
    assert seq == [hs[(first + i) % 4] for i in range(12)]


def test_edf_schedule_matches_envoy_order() -> None:
    a, b = hosts([3, 1])
    # Deadlines a: 1/3, 2/3, 1; b: 1 (queued before a's third entry, so it wins the tie).
    assert edf_schedule([a, b]) == [a, a, b, a]
    x, y, z = hosts([1, 2, 3])
    assert edf_schedule([x, y, z]) == [z, y, z, x, y, z]


def test_edf_schedule_reduces_by_gcd_and_refuses_long_periods() -> None:
    hs = hosts([200, 400, 600])
    sched = edf_schedule(hs)
    assert sched is not None and len(sched) == 6
    assert edf_schedule(hosts([70_000, 1])) is None


def test_weighted_round_robin_exact_proportions() -> None:
    hs = hosts([1, 2, 3, 4])
    c = cluster(LbPolicy.ROUND_ROBIN, hs)
    counts = picks(c, 10 * 100)  # 100 full periods
    assert [counts[h] for h in hs] == [100, 200, 300, 400]


def test_weighted_round_robin_is_smooth() -> None:
    # A weight-1 host among weight-5 hosts is spread out, never twice in a row, and no host
    # gets a burst longer than its share allows.
    hs = hosts([5, 5, 1])
    c = cluster(LbPolicy.ROUND_ROBIN, hs)
    seq = [c.choose_host() for _ in range(110)]
    for i in range(len(seq) - 2):
        assert not (seq[i] is seq[i + 1] is seq[i + 2])
    assert Counter(seq)[hs[2]] == 10


def test_long_weighted_period_falls_back_to_live_edf() -> None:
    hs = hosts([65_537, 1])  # period above MAX_SCHEDULE
    c = cluster(LbPolicy.ROUND_ROBIN, hs)
    counts = picks(c, 65_538 * 2)
    assert counts[hs[1]] in (1, 2, 3)
    assert counts[hs[0]] >= 65_537 * 2 - 1


# -- least request ---------------------------------------------------------------------------


def test_p2c_prefers_the_less_loaded_host() -> None:
    hs = hosts([1, 1, 1])
    hs[0].active_requests = 0
    hs[1].active_requests = 5
    hs[2].active_requests = 50
    c = cluster(LbPolicy.LEAST_REQUEST, hs)
    n = 30_000
    counts = picks(c, n)
    # Two samples with replacement: the idle host wins unless both miss it: 1 - (2/3)^2 = 5/9.
    assert counts[hs[0]] / n == pytest.approx(5 / 9, abs=0.02)
    # The busiest host is picked only when both samples land on it: 1/9.
    assert counts[hs[2]] / n == pytest.approx(1 / 9, abs=0.02)
    assert counts[hs[0]] > counts[hs[1]] > counts[hs[2]]


def test_p2c_choice_count_sharpens_the_choice() -> None:
    hs = hosts([1] * 4)
    for i, h in enumerate(hs):
        h.active_requests = i
    rng = random.Random(3)
    two = P2CPicker(hs, 2, rng)
    five = P2CPicker(hs, 5, rng)
    n = 20_000
    share_two = sum(two.pick(None) is hs[0] for _ in range(n)) / n
    share_five = sum(five.pick(None) is hs[0] for _ in range(n)) / n
    assert share_two == pytest.approx(1 - (3 / 4) ** 2, abs=0.02)
    assert share_five == pytest.approx(1 - (3 / 4) ** 5, abs=0.02)


def test_p2c_reacts_to_active_requests_changing() -> None:
    hs = hosts([1, 1])
    c = cluster(LbPolicy.LEAST_REQUEST, hs, least_request=LeastRequestConfig(choice_count=2))
    hs[0].active_requests = 10
    assert picks(c, 2000)[hs[1]] > 1400
    hs[0].active_requests = 0
    hs[1].active_requests = 10
    assert picks(c, 2000)[hs[0]] > 1400


def test_weighted_least_request_scales_weight_by_active_requests() -> None:
    hs = hosts([1, 2])
    hs[1].active_requests = 3  # dynamic weight 2 / (3 + 1) = 0.5 against 1 / 1
    c = cluster(LbPolicy.LEAST_REQUEST, hs)
    n = 9000
    counts = picks(c, n)
    assert counts[hs[0]] / n == pytest.approx(2 / 3, abs=0.01)
    hs[1].active_requests = 0  # now 1 : 2
    counts = picks(c, n)
    assert counts[hs[1]] / n == pytest.approx(2 / 3, abs=0.01)


def test_weighted_least_request_with_idle_hosts_is_weighted_round_robin() -> None:
    hs = hosts([1, 3])
    edf = EdfPicker(hs, lambda h: h.weight / (h.active_requests + 1), random.Random(0))
    counts = Counter(edf.pick(None) for _ in range(400))
    assert counts[hs[0]] == 100 and counts[hs[1]] == 300


# -- random ----------------------------------------------------------------------------------


def test_random_is_uniform_and_ignores_weights() -> None:
    hs = hosts([1, 10, 100])
    c = cluster(LbPolicy.RANDOM, hs)
    n = 30_000
    counts = picks(c, n)
    for h in hs:
        assert counts[h] / n == pytest.approx(1 / 3, abs=0.02)


# -- ring hash -------------------------------------------------------------------------------


def test_ring_hash_same_key_same_host() -> None:
    hs = hosts([1] * 8)
    c = cluster(LbPolicy.RING_HASH, hs)
    for key in range(0, 2**64, 2**58 + 12345):
        first = c.choose_host(key)
        assert all(c.choose_host(key) is first for _ in range(5))
    # A second cluster built from the same hosts maps keys identically (no randomness).
    c2 = cluster(LbPolicy.RING_HASH, hs, seed=99)
    keys = [xxh64(f"user-{i}".encode()) for i in range(500)]
    assert [c.choose_host(k) for k in keys] == [c2.choose_host(k) for k in keys]


def test_ring_hash_removing_a_host_moves_about_one_nth_of_keys() -> None:
    n_hosts = 10
    hs = hosts([1] * n_hosts)
    before = cluster(LbPolicy.RING_HASH, hs)
    after = cluster(LbPolicy.RING_HASH, hs[:-1])
    keys = [xxh64(f"session-{i}".encode()) for i in range(20_000)]
    on_removed = 0
    survivors_moved = 0
    for k in keys:
        a = before.choose_host(k)
        b = after.choose_host(k)
        if a is hs[-1]:
            on_removed += 1
            assert b is not hs[-1]
        elif a is not b:
            survivors_moved += 1
    # The removed host held ~1/N of the keys; those must move.
    assert on_removed / len(keys) == pytest.approx(1 / n_hosts, abs=0.03)
    # Keys of the surviving hosts move only where the rebuilt ring gives them new points. As in
    # Envoy, the ring keeps its minimum size, so each survivor gains ~1/N more points, and
    # those take over ~1/N of the ring: well under a full reshuffle (which would move ~90 %).
    assert survivors_moved / len(keys) < 1 / n_hosts + 0.03


def test_ring_hash_unhealthy_host_keys_move_and_few_others() -> None:
    hs = hosts([1] * 5)
    c = cluster(LbPolicy.RING_HASH, hs)
    keys = [xxh64(str(i).encode()) for i in range(5000)]
    before = [c.choose_host(k) for k in keys]
    c.set_host_health(hs[2], False)
    after = [c.choose_host(k) for k in keys]
    assert hs[2] not in after
    changed = sum(a is not b for a, b in zip(before, after, strict=True))
    on_removed = sum(a is hs[2] for a in before)
    # Its keys move, plus about 1/N more where the survivors' new ring points land.
    assert on_removed <= changed < on_removed + (1 / 5 + 0.03) * len(keys)


def test_ring_size_follows_min_and_max_and_weights() -> None:
    hs = hosts([1, 3])
    ring = RingHashPicker(hs, 1024, 8 * 1024 * 1024, random.Random(0))
    # The lighter host (1/4) gets ceil(0.25 * 1024) = 256 points, the other three times more.
    assert len(ring.hashes) == 1024
    assert Counter(ring.ring_hosts) == {hs[0]: 256, hs[1]: 768}
    small = RingHashPicker(hs, 1024, 100, random.Random(0))
    assert len(small.hashes) == 100
    assert ring.hashes == sorted(ring.hashes)


def test_ring_hash_places_points_like_envoy() -> None:
    # Points are xxh64("<address>_<i>"), so a ring is reproducible from the addresses alone.
    (h,) = hosts([1])
    ring = RingHashPicker([h, *hosts([1, 1])[1:]], 16, 16, random.Random(0))
    expected = {xxh64(f"{h.address}_{i}".encode()) for i in range(8)}
    assert expected <= set(ring.hashes)


def test_ring_hash_weights_shift_share() -> None:
    hs = hosts([1, 4])
    c = cluster(LbPolicy.RING_HASH, hs, ring_hash=RingHashConfig(minimum_ring_size=4096))
    n = 20_000
    counts = Counter(c.choose_host(xxh64(str(i).encode())) for i in range(n))
    assert counts[hs[1]] / n == pytest.approx(0.8, abs=0.05)


def test_ring_hash_without_key_picks_randomly() -> None:
    hs = hosts([1] * 4)
    c = cluster(LbPolicy.RING_HASH, hs)
    counts = picks(c, 8000)
    assert set(counts) == set(hs)
    for h in hs:
        assert counts[h] / 8000 == pytest.approx(0.25, abs=0.07)


# -- maglev ----------------------------------------------------------------------------------


def test_maglev_consistency_and_balance() -> None:
    hs = hosts([1] * 7)
    m = MaglevPicker(hs, random.Random(0))
    assert len(m.table) == 65537
    counts = Counter(m.table)
    for h in hs:
        assert abs(counts[h] - 65537 / 7) <= 1
    smaller = MaglevPicker(hs[:-1], random.Random(0))
    moved = sum(a is not b for a, b in zip(m.table, smaller.table, strict=True) if a is not hs[-1])
    # Maglev keeps most entries of the remaining hosts in place.
    assert moved / 65537 < 0.1
    key = xxh64(b"k")
    assert m.pick(key) is m.pick(key)


def test_maglev_weights() -> None:
    hs = hosts([1, 3])
    m = MaglevPicker(hs, random.Random(0))
    counts = Counter(m.table)
    assert counts[hs[1]] / 65537 == pytest.approx(0.75, abs=0.01)


# -- cluster level ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(LbPolicy))
def test_no_healthy_host_returns_none(policy: LbPolicy) -> None:
    hs = hosts([1, 1, 1])
    c = cluster(policy, hs, healthy_panic_threshold=0.0)  # panic off: see test_lb_panic.py
    for h in hs:
        c.set_host_health(h, False)
    assert c.choose_host() is None
    assert c.choose_host(12345) is None
    c.set_host_health(hs[1], True)
    assert c.choose_host() is hs[1]
    assert c.choose_host(12345) is hs[1]


@pytest.mark.parametrize("policy", list(LbPolicy))
def test_unhealthy_hosts_are_never_picked(policy: LbPolicy) -> None:
    hs = hosts([1, 2, 3, 4])
    c = cluster(policy, hs)
    c.set_host_health(hs[3], False)
    seen = {c.choose_host(xxh64(str(i).encode())) for i in range(2000)}
    seen |= {c.choose_host() for _ in range(2000)}
    assert seen == set(hs[:3])


def test_empty_cluster() -> None:
    c = cluster(LbPolicy.ROUND_ROBIN, [])
    assert c.choose_host() is None
    assert c.stats.membership_total.value == 0


def test_membership_stats() -> None:
    store = Store()
    hs = hosts([1, 5, 2])
    c = UpstreamCluster(Cluster("web", DiscoveryType.STATIC), store, hs)
    assert store.gauges["cluster.web.membership_total"].value == 3
    assert store.gauges["cluster.web.membership_healthy"].value == 3
    assert store.gauges["cluster.web.max_host_weight"].value == 5
    c.set_host_health(hs[0], False)
    c.set_host_health(hs[1], True, degraded=True)
    assert store.gauges["cluster.web.membership_healthy"].value == 1
    assert store.gauges["cluster.web.membership_degraded"].value == 1
    changes = store.counters["cluster.web.membership_change"].value
    c.set_hosts(hs[:2])
    assert store.counters["cluster.web.membership_change"].value == changes + 1
    assert store.gauges["cluster.web.membership_total"].value == 2


def test_set_host_health_without_change_keeps_balancer() -> None:
    hs = hosts([1, 1])
    c = cluster(LbPolicy.ROUND_ROBIN, hs)
    pickers = c.pickers
    c.set_host_health(hs[0], True)
    assert c.pickers is pickers
    c.set_host_health(hs[0], False)
    assert c.pickers is not pickers


def test_hash_key_ignored_by_round_robin() -> None:
    hs = hosts([1, 1])
    c = cluster(LbPolicy.ROUND_ROBIN, hs)
    assert {c.choose_host(42) for _ in range(4)} == set(hs)
