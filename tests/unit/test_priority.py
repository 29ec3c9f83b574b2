"""Priority levels: Envoy's priority load, overprovisioning, spill-over and normalization."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ubimesh.proxy.snapshot.types import Cluster, DiscoveryType, LbPolicy, SocketAddress
from ubimesh.proxy.upstream.cluster import UpstreamCluster
from ubimesh.proxy.upstream.host import Host
from ubimesh.proxy.upstream.priority import (
    PriorityLoad,
    choose_priority,
    compute_priority_load,
    level_health,
    priority_load_for_counts,
)
from ubimesh.telemetry.stats import Store


@pytest.mark.parametrize(
    ("healthy_pct", "p0", "p1"),
    [
        # The table of Envoy's priority levels documentation (P=1 fully healthy, factor 1.4).
        (100, 100, 0),
        (72, 100, 0),
        (71, 99, 1),
        (50, 70, 30),
        (25, 35, 65),
        (0, 0, 100),
    ],
)
def test_two_levels_envoy_table(healthy_pct: int, p0: int, p1: int) -> None:
    load = priority_load_for_counts(140, [(100, healthy_pct, 0), (100, 100, 0)])
    assert load.healthy == (p0, p1)
    assert load.degraded == (0, 0)


def test_overprovisioning_factor_changes_the_threshold() -> None:
    # With factor 100 (no overprovisioning) 80 % healthy keeps only 80 % of the traffic.
    assert priority_load_for_counts(100, [(10, 8, 0), (10, 10, 0)]).healthy == (80, 20)
    # With factor 200, half the hosts are enough.
    assert priority_load_for_counts(200, [(10, 5, 0), (10, 10, 0)]).healthy == (100, 0)


def test_three_levels_spill_in_order() -> None:
    # P0 20 % healthy -> 28, P1 40 % healthy -> 56, P2 takes the remaining 16.
    load = priority_load_for_counts(140, [(10, 2, 0), (10, 4, 0), (10, 10, 0)])
    assert load.healthy == (28, 56, 16)


def test_normalization_when_total_health_below_100() -> None:
    # P0 and P1 20 % healthy each score 28: together 56 < 100, scaled up to 50 / 50.
    load = priority_load_for_counts(140, [(10, 2, 0), (10, 2, 0)])
    assert load.healthy == (50, 50)
    # Uneven: 14 and 28 -> 33 and 66, rounding remainder to the first healthy level.
    load = priority_load_for_counts(140, [(10, 1, 0), (10, 2, 0)])
    assert load.healthy == (34, 66)
    assert sum(load.healthy) == 100


def test_degraded_example_from_envoy_source() -> None:
    # Scores 10/20/10 healthy and 20/10/0 degraded: 16/28/14 healthy and 28/14/0 degraded.
    load = compute_priority_load([10, 20, 10], [20, 10, 0])
    assert load.healthy == (16, 28, 14)
    assert load.degraded == (28, 14, 0)


def test_degraded_hosts_take_what_healthy_hosts_cannot() -> None:
    # One level, half healthy and half degraded: 70 % to healthy hosts, 30 % to degraded.
    load = priority_load_for_counts(140, [(2, 1, 1)])
    assert load.healthy == (70,)
    assert load.degraded == (30,)


def test_nothing_available_means_no_load() -> None:
    load = priority_load_for_counts(140, [(3, 0, 0), (2, 0, 0)])
    assert load == PriorityLoad((0, 0), (0, 0))
    assert load.total == 0


def test_empty_levels_in_between() -> None:
    load = priority_load_for_counts(140, [(4, 2, 0), (0, 0, 0), (4, 4, 0)])
    assert load.healthy == (70, 0, 30)


def test_level_health() -> None:
    assert level_health(140, 5, 10) == 70
    assert level_health(140, 10, 10) == 100
    assert level_health(140, 0, 0) == 0


def test_choose_priority_walks_cumulative_load() -> None:
    load = PriorityLoad((70, 20), (0, 10))
    slots = Counter(choose_priority(load, h) for h in range(100))
    assert slots == {(0, False): 70, (1, False): 20, (1, True): 10}
    assert choose_priority(load, 69) == (0, False)
    assert choose_priority(load, 70) == (1, False)
    assert choose_priority(load, 199) == (1, True)


def test_load_arguments_must_match() -> None:
    with pytest.raises(ValueError):
        compute_priority_load([100], [0, 0])


# -- through UpstreamCluster -----------------------------------------------------------------


def make(policy: LbPolicy, priorities: list[int], factor: int = 140) -> UpstreamCluster:
    hs = [Host(SocketAddress(f"10.0.0.{i + 1}", 80), priority=p) for i, p in enumerate(priorities)]
    spec = Cluster("c", DiscoveryType.STATIC, lb_policy=policy, overprovisioning_factor=factor)
    return UpstreamCluster(spec, Store(), hs, rng=random.Random(7))


@pytest.mark.parametrize("policy", [LbPolicy.ROUND_ROBIN, LbPolicy.RANDOM, LbPolicy.RING_HASH])
def test_cluster_spills_70_30(policy: LbPolicy) -> None:
    c = make(policy, [0, 0, 1, 1])
    p0 = c.hosts[:2]
    assert {c.choose_host() for _ in range(200)} <= set(p0)  # P0 healthy: all traffic
    c.set_host_health(p0[0], False)
    assert c.priority_load.healthy == (70, 30)
    n = 20_000
    share_p0 = sum(c.choose_host().priority == 0 for _ in range(n)) / n  # type: ignore[union-attr]
    assert share_p0 == pytest.approx(0.70, abs=0.02)


def test_cluster_ring_hash_priority_is_decided_by_the_key() -> None:
    c = make(LbPolicy.RING_HASH, [0, 0, 1, 1])
    c.set_host_health(c.hosts[0], False)
    # hash % 100 < 70 goes to P0, the rest to P1; and a key always lands on the same host.
    for key in (5, 69, 165, 2**63 + 3):
        host = c.choose_host(key)
        assert host is not None and host.priority == 0
        assert c.choose_host(key) is host
    for key in (70, 99, 185):
        host = c.choose_host(key)
        assert host is not None and host.priority == 1


def test_cluster_recovers_when_health_returns() -> None:
    c = make(LbPolicy.ROUND_ROBIN, [0, 0, 1])
    for h in c.hosts[:2]:
        c.set_host_health(h, False)
    assert c.priority_load.healthy == (0, 100)
    assert {c.choose_host() for _ in range(10)} == {c.hosts[2]}
    for h in c.hosts[:2]:
        c.set_host_health(h, True)
    assert c.priority_load.healthy == (100, 0)
    assert {c.choose_host() for _ in range(10)} == set(c.hosts[:2])


def test_cluster_degraded_hosts_get_the_remainder() -> None:
    c = make(LbPolicy.ROUND_ROBIN, [0, 0])
    healthy, degraded = c.hosts
    c.set_host_health(degraded, True, degraded=True)
    assert c.priority_load == PriorityLoad((70,), (30,))
    n = 10_000
    counts = Counter(c.choose_host() for _ in range(n))
    assert counts[degraded] / n == pytest.approx(0.30, abs=0.02)
    assert counts[healthy] / n == pytest.approx(0.70, abs=0.02)
    assert c.is_degraded(degraded)
