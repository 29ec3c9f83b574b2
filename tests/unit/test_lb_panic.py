"""Panic threshold (UpstreamCluster.refresh): Envoy's per-priority and total panic.

Envoy (load_balancer_impl.cc): a level whose healthy + degraded share of its non-excluded
hosts is below ``healthy_panic_threshold`` (default 50 %) is in panic unless the levels
together are fully available (normalized total availability 100); a level in panic balances
over all its hosts; when every level is in panic, the load follows host counts.
"""

from __future__ import annotations

import random
from collections import Counter

from ubimesh.proxy.snapshot.types import Cluster, DiscoveryType, LbPolicy, SocketAddress
from ubimesh.proxy.upstream.cluster import UpstreamCluster
from ubimesh.proxy.upstream.host import (
    DEGRADED_EDS_HEALTH,
    EDS_STATUS_DRAINING,
    FAILED_ACTIVE_HC,
    FAILED_OUTLIER_CHECK,
    Host,
)
from ubimesh.proxy.upstream.priority import PriorityLoad
from ubimesh.telemetry.stats import Store

N = 3000


def make(
    priorities: list[int],
    threshold: float = 50.0,
    factor: int = 140,
    policy: LbPolicy = LbPolicy.ROUND_ROBIN,
) -> UpstreamCluster:
    hs = [Host(SocketAddress(f"10.0.0.{i + 1}", 80), priority=p) for i, p in enumerate(priorities)]
    spec = Cluster(
        "c", DiscoveryType.STATIC, lb_policy=policy, overprovisioning_factor=factor,
        healthy_panic_threshold=threshold,
    )  # fmt: skip
    return UpstreamCluster(spec, Store(), hs, rng=random.Random(3))


def fail(c: UpstreamCluster, *idx: int, flag: int = FAILED_ACTIVE_HC) -> None:
    for i in idx:
        c.set_flags(c.hosts[i], c.hosts[i].health_flags | flag)


def picks(c: UpstreamCluster) -> Counter[Host]:
    out: Counter[Host] = Counter()
    for _ in range(N):
        h = c.choose_host()
        assert h is not None
        out[h] += 1
    return out


def test_below_threshold_a_single_level_balances_over_every_host() -> None:
    c = make([0, 0, 0])
    fail(c, 0, 1)  # 33 % healthy < 50 %
    assert c.panic == (True,)
    assert set(picks(c)) == set(c.hosts)
    assert c.stats.lb_healthy_panic.value == N
    c.set_flags(c.hosts[1], 0)  # 67 %: out of panic
    assert c.panic == (False,)
    assert set(picks(c)) == set(c.hosts[1:])
    assert c.stats.lb_healthy_panic.value == N


def test_everything_failed_still_routes_in_panic_but_not_with_panic_off() -> None:
    c = make([0, 0], policy=LbPolicy.RING_HASH)
    fail(c, 0, 1, flag=FAILED_OUTLIER_CHECK)
    assert c.choose_host(12345) in c.hosts
    off = make([0, 0], threshold=0.0)
    fail(off, 0, 1)
    assert off.choose_host() is None


def test_exactly_at_the_threshold_is_no_panic() -> None:
    c = make([0, 0, 0, 0])
    fail(c, 0, 1)  # 50 %
    assert c.panic == (False,)
    assert set(picks(c)) == set(c.hosts[2:])


def test_full_total_availability_means_no_panic_anywhere() -> None:
    # P0 25 % healthy (35 with factor 140) + P1 fully healthy: availability 100.
    c = make([0, 0, 0, 0, 1, 1])
    fail(c, 0, 1, 2)
    assert c.panic == (False, False)
    assert c.priority_load.healthy == (35, 65)
    assert c.hosts[0] not in picks(c)


def test_one_level_in_panic_balances_its_share_over_all_its_hosts() -> None:
    # factor 100: P0 1/3 healthy (33, panic), P1 3/5 (60, no panic); availability 93.
    c = make([0, 0, 0, 1, 1, 1, 1, 1], factor=100)
    fail(c, 0, 1, 3, 4)
    assert c.panic == (True, False)
    assert c.priority_load == PriorityLoad((36, 64), (0, 0))
    counts = picks(c)
    p0 = sum(n for h, n in counts.items() if h.priority == 0)
    assert abs(p0 / N - 0.36) < 0.03
    assert {h for h in counts if h.priority == 0} == set(c.hosts[:3])  # failed ones too
    assert {h for h in counts if h.priority == 1} == set(c.hosts[5:])  # healthy only


def test_total_panic_spreads_by_host_count() -> None:
    c = make([0, 0, 0, 0, 1, 1])
    fail(c, 0, 1, 2, 4)  # P0 35 + P1 70: availability 100, nobody panics
    assert c.panic == (False, False)
    fail(c, 5)  # P0 25 % and P1 0 %: both in panic
    assert c.panic == (True, True)
    assert c.priority_load == PriorityLoad((67, 33), (0, 0))
    counts = picks(c)
    assert set(counts) == set(c.hosts)
    p0 = sum(n for h, n in counts.items() if h.priority == 0)
    assert abs(p0 / N - 0.67) < 0.03


def test_degraded_hosts_count_as_available_and_draining_ones_are_excluded() -> None:
    c = make([0, 0, 0, 0])
    fail(c, 0, 1)
    fail(c, 2, flag=DEGRADED_EDS_HEALTH)  # 1 healthy + 1 degraded of 4: 50 %
    assert c.panic == (False,)
    c2 = make([0, 0, 0])
    fail(c2, 0, flag=EDS_STATUS_DRAINING)
    fail(c2, 1)  # 1 healthy of the 2 counted hosts: 50 %, no panic
    assert c2.panic == (False,)
    assert c2.stats.membership_excluded.value == 1
    assert set(picks(c2)) == {c2.hosts[2]}
