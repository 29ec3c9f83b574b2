"""Outlier detection (upstream/outlier.py) driven directly: a fake clock, no timers, no sleeps.

Expectations follow Envoy 1.40's DetectorImpl; the ones that matter most (ejection after 5
connect failures, max_ejection_percent overflow with 2 hosts and the default 10 %, gateway
failures detected but not enforced by default) were checked against the real envoy binary.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ubimesh.proxy.snapshot.outlier import OutlierDetection
from ubimesh.proxy.snapshot.types import Cluster, DiscoveryType, SocketAddress
from ubimesh.proxy.upstream.cluster import UpstreamCluster
from ubimesh.proxy.upstream.host import FAILED_ACTIVE_HC, FAILED_OUTLIER_CHECK, Host
from ubimesh.proxy.upstream.outlier import (
    LOCAL_ORIGIN_CONNECT_FAILED,
    LOCAL_ORIGIN_CONNECT_SUCCESS,
    LOCAL_ORIGIN_CONNECT_SUCCESS_FINAL,
    LOCAL_ORIGIN_TIMEOUT,
    HostOutlier,
    OutlierDetector,
)
from ubimesh.telemetry.stats import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(
    n: int = 3, **config: object
) -> tuple[UpstreamCluster, OutlierDetector, list[Host], Clock, Store]:
    hosts = [Host(SocketAddress("10.0.0.1", 8000 + i), cluster_name="c") for i in range(n)]
    store = Store()
    cluster = UpstreamCluster(
        Cluster("c", DiscoveryType.STATIC, healthy_panic_threshold=0.0), store, hosts
    )
    clock = Clock()
    cfg = OutlierDetection(**{"max_ejection_percent": 100, **config})  # type: ignore[arg-type]
    detector = OutlierDetector(cluster, cfg, store, clock=clock, rng=random.Random(1))
    cluster.outlier = detector
    detector.sync_hosts(hosts)
    return cluster, detector, hosts, clock, store


def monitor(h: Host) -> HostOutlier:
    assert isinstance(h.outlier, HostOutlier)
    return h.outlier


def stat(store: Store, name: str) -> int:
    return store.counters[f"cluster.c.outlier_detection.{name}"].value


def ejected(h: Host) -> bool:
    return bool(h.health_flags & FAILED_OUTLIER_CHECK)


def test_five_consecutive_5xx_eject_and_the_balancer_avoids_the_host() -> None:
    cluster, detector, hosts, _, store = setup()
    bad = hosts[0]
    for _ in range(4):
        monitor(bad).put_http_status(500)
    assert not ejected(bad)
    monitor(bad).put_http_status(500)
    assert ejected(bad) and not bad.healthy
    assert {cluster.choose_host() for _ in range(30)} == set(hosts[1:])
    assert stat(store, "ejections_enforced_consecutive_5xx") == 1
    assert stat(store, "ejections_detected_consecutive_5xx") == 1
    assert store.gauges["cluster.c.outlier_detection.ejections_active"].value == 1
    assert detector.active == 1


def test_a_success_resets_the_count() -> None:
    _, _, hosts, _, _ = setup()
    m = monitor(hosts[0])
    for status in (500, 503, 500, 502, 404, 500, 500, 500, 500):
        m.put_http_status(status)  # the 404 is not a 5xx: the run starts again
    assert not ejected(hosts[0])
    m.put_http_status(500)
    assert ejected(hosts[0])


def test_gateway_failures_are_detected_but_not_enforced_by_default() -> None:
    _, _, hosts, _, store = setup()
    for _ in range(5):
        monitor(hosts[0]).put_http_status(503)
    # Both detectors fired; only consecutive_5xx is enforced (enforcing_..._gateway 0).
    assert stat(store, "ejections_detected_consecutive_gateway_failure") == 1
    assert stat(store, "ejections_enforced_consecutive_gateway_failure") == 0
    assert stat(store, "ejections_enforced_consecutive_5xx") == 1


def test_gateway_failures_eject_when_enforced() -> None:
    _, _, hosts, _, store = setup(
        consecutive_5xx=100,
        consecutive_gateway_failure=3,
        enforcing_consecutive_gateway_failure=100,
    )
    for _ in range(3):
        monitor(hosts[1]).put_http_status(502)
    assert ejected(hosts[1])
    assert stat(store, "ejections_enforced_consecutive_gateway_failure") == 1
    for _ in range(3):
        monitor(hosts[2]).put_http_status(500)  # a 500 is no gateway failure
    assert not ejected(hosts[2])


def test_max_ejection_percent_overflow() -> None:
    # Envoy ejects while (ejected + 1) / hosts <= max_ejection_percent: with 3 hosts and the
    # default 10 % nothing is ever ejected.
    _, _, hosts, _, store = setup(max_ejection_percent=10)
    for _ in range(5):
        monitor(hosts[0]).put_http_status(500)
    assert not ejected(hosts[0])
    assert stat(store, "ejections_overflow") == 1
    # ... unless always_eject_one_host, which allows one ejection, not two.
    _, _, hosts, _, store = setup(max_ejection_percent=10, always_eject_one_host=True)
    for h in hosts[:2]:
        for _ in range(5):
            monitor(h).put_http_status(500)
    assert [ejected(h) for h in hosts] == [True, False, False]
    assert stat(store, "ejections_overflow") == 1


def test_uneject_after_base_time_at_an_interval_tick_and_half_open() -> None:
    cluster, detector, hosts, clock, _ = setup(interval=1.0, base_ejection_time=5.0)
    bad = hosts[0]
    for _ in range(5):
        monitor(bad).put_http_status(503)
    clock.now += 4.9
    detector.on_interval()
    assert ejected(bad)
    clock.now += 0.1
    detector.on_interval()
    assert not ejected(bad) and bad in {cluster.choose_host() for _ in range(30)}
    # Half-open: the counts were reset, so the host needs 5 errors again, and one success
    # (the first request it gets) keeps it in.
    for _ in range(4):
        monitor(bad).put_http_status(500)
    monitor(bad).put_http_status(200)
    monitor(bad).put_http_status(500)
    assert not ejected(bad)


def test_ejection_time_grows_with_repeat_ejections_and_decays() -> None:
    _, detector, hosts, clock, _ = setup(interval=1.0, base_ejection_time=2.0)
    bad = hosts[0]
    m = monitor(bad)

    def eject() -> None:
        for _ in range(5):
            m.put_http_status(500)
        assert ejected(bad)

    def ejected_for() -> float:
        start = clock.now
        while ejected(bad):
            clock.now += 1.0
            detector.on_interval()
        return clock.now - start

    eject()
    assert ejected_for() == 2.0
    eject()  # right away: multiplier 2
    assert ejected_for() == 4.0
    eject()
    assert ejected_for() == 6.0
    # Healthy for a while: the multiplier drops by one per interval after the return.
    for _ in range(3):
        clock.now += 1.0
        detector.on_interval()
    assert m.multiplier == 0
    eject()
    assert ejected_for() == 2.0


def test_max_ejection_time_caps_the_growth() -> None:
    _, detector, hosts, clock, _ = setup(
        interval=1.0, base_ejection_time=2.0, max_ejection_time=3.0
    )
    m = monitor(hosts[0])
    durations = []
    for _ in range(4):
        for _ in range(5):
            m.put_http_status(500)
        start = clock.now
        while ejected(hosts[0]):
            clock.now += 1.0
            detector.on_interval()
        durations.append(clock.now - start)
    assert durations == [2.0, 3.0, 3.0, 3.0]


def test_local_origin_without_split_maps_to_http_statuses() -> None:
    _, _, hosts, _, store = setup()
    m = monitor(hosts[0])
    for _ in range(4):
        m.put_local_origin(LOCAL_ORIGIN_CONNECT_FAILED)
        m.put_local_origin(LOCAL_ORIGIN_CONNECT_SUCCESS)  # not reported at all
    assert not ejected(hosts[0])
    m.put_local_origin(LOCAL_ORIGIN_TIMEOUT)  # a 504: the fifth 5xx
    assert ejected(hosts[0])
    m2 = monitor(hosts[1])
    for _ in range(4):
        m2.put_local_origin(LOCAL_ORIGIN_CONNECT_FAILED)
    m2.put_local_origin(LOCAL_ORIGIN_CONNECT_SUCCESS_FINAL)  # the TCP proxy's success: a 200
    m2.put_local_origin(LOCAL_ORIGIN_CONNECT_FAILED)
    assert not ejected(hosts[1])
    assert stat(store, "ejections_enforced_consecutive_local_origin_failure") == 0


def test_local_origin_with_split_has_its_own_count() -> None:
    _, _, hosts, _, store = setup(
        split_external_local_origin_errors=True, consecutive_local_origin_failure=3
    )
    m = monitor(hosts[0])
    for _ in range(4):
        m.put_http_status(500)
    m.put_local_origin(LOCAL_ORIGIN_CONNECT_FAILED)
    m.put_local_origin(LOCAL_ORIGIN_TIMEOUT)
    assert not ejected(hosts[0])  # neither count reached its threshold
    m.put_local_origin(LOCAL_ORIGIN_CONNECT_FAILED)
    assert ejected(hosts[0])
    assert stat(store, "ejections_enforced_consecutive_local_origin_failure") == 1


def test_success_rate_ejects_the_outlier() -> None:
    _, detector, hosts, _, store = setup(n=6, success_rate_request_volume=50)
    for i, h in enumerate(hosts):
        for j in range(100):
            # host 0 fails half of its requests, never 5 in a row
            monitor(h).put_http_status(500 if i == 0 and j % 2 else 200)
    detector.on_interval()
    assert [ejected(h) for h in hosts] == [True] + [False] * 5
    assert stat(store, "ejections_enforced_success_rate") == 1
    mean, threshold = detector.sr_numbers[:2]
    assert mean == pytest.approx((50 + 5 * 100) / 6)
    assert threshold < 100 and monitor(hosts[1]).success_rate == 100.0
    assert monitor(hosts[0]).success_rate == 50.0
    # The next interval had no requests: the pass has nothing to say.
    detector.on_interval()
    assert detector.sr_numbers[:2] == [-1.0, -1.0]


def test_success_rate_needs_enough_hosts_with_enough_requests() -> None:
    _, detector, hosts, _, _ = setup(n=6, success_rate_request_volume=50)
    for i, h in enumerate(hosts):
        for j in range(100 if i < 4 else 10):  # only 4 hosts reach the volume; 5 are needed
            monitor(h).put_http_status(500 if i == 0 and j % 2 else 200)
    detector.on_interval()
    assert not any(ejected(h) for h in hosts)


def test_failure_percentage_when_enforced() -> None:
    _, detector, hosts, _, store = setup(
        n=5, enforcing_failure_percentage=100, failure_percentage_threshold=30,
        success_rate_minimum_hosts=100,
    )  # fmt: skip
    for i, h in enumerate(hosts):
        for j in range(60):
            monitor(h).put_http_status(500 if i == 2 and j % 3 == 0 else 200)  # 33 % fail
    detector.on_interval()
    assert [ejected(h) for h in hosts] == [False, False, True, False, False]
    assert stat(store, "ejections_enforced_failure_percentage") == 1


def test_passing_health_check_unejects() -> None:
    cluster, detector, hosts, _, _ = setup()
    for _ in range(5):
        monitor(hosts[0]).put_http_status(500)
    hosts[0].health_flags |= FAILED_ACTIVE_HC
    detector.on_health_check_success(hosts[0])
    assert ejected(hosts[0])  # still failing active HC: nothing to do
    hosts[0].health_flags &= ~FAILED_ACTIVE_HC
    detector.on_health_check_success(hosts[0])
    assert not ejected(hosts[0]) and detector.active == 0
    assert hosts[0] in {cluster.choose_host() for _ in range(30)}


def test_removed_host_is_forgotten_and_kept_host_keeps_its_state() -> None:
    cluster, detector, hosts, _, store = setup()
    for _ in range(5):
        monitor(hosts[0]).put_http_status(500)
    cluster.set_hosts(hosts[1:])
    assert detector.active == 0 and hosts[0] not in detector.monitors
    cluster.set_hosts(hosts)  # back (the monitor and its ejection come with the host)
    assert detector.active == 1 and ejected(hosts[0])
    assert store.gauges["cluster.c.outlier_detection.ejections_active"].value == 1


def test_picks_spread_over_the_others_while_ejected() -> None:
    cluster, _, hosts, _, _ = setup(n=4)
    for _ in range(5):
        monitor(hosts[3]).put_http_status(500)
    counts = Counter(cluster.choose_host() for _ in range(300))
    assert set(counts) == set(hosts[:3]) and min(counts.values()) == 100
