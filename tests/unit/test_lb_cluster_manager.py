"""ClusterManager: building clusters and swapping configuration while keeping hosts."""

from __future__ import annotations

import asyncio
import dataclasses

from ubimesh.proxy.snapshot.types import (
    Cluster,
    DiscoveryType,
    Endpoint,
    LbPolicy,
    Locality,
    LocalityEndpoints,
    SocketAddress,
)
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.telemetry.stats import Store


class RecordingPool:
    """Stands in for the HTTP pool a router hangs on a host: it only counts close() calls."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class AsyncClosePool:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        await asyncio.sleep(0)
        self.closed = True


def ep(port: int, weight: int = 1, health: int = 0, ip: str = "10.0.0.1") -> Endpoint:
    return Endpoint(SocketAddress(ip, port), weight=weight, health_status=health)


def static(name: str, *groups: tuple[int, list[Endpoint]], **kw: object) -> Cluster:
    le = tuple(LocalityEndpoints(Locality(zone="z"), tuple(eps), priority=p) for p, eps in groups)
    return Cluster(name, DiscoveryType.STATIC, endpoints=le, **kw)  # type: ignore[arg-type]


def test_static_clusters_are_built_with_endpoint_attributes() -> None:
    store = Store()
    spec = static("a", (0, [ep(1, weight=3), ep(2)]), (1, [ep(3, health=2)]))
    cm = ClusterManager({"a": spec}, store)
    c = cm.get("a")
    assert c is not None and c.spec is spec and c.name == "a"
    assert [(h.address.port, h.weight, h.priority, h.healthy) for h in c.hosts] == [
        (1, 3, 0, True),
        (2, 1, 0, True),
        (3, 1, 1, False),
    ]
    assert all(h.cluster_name == "a" and h.locality.zone == "z" for h in c.hosts)
    assert cm.get("nope") is None
    assert store.gauges["cluster.a.membership_total"].value == 3
    assert store.gauges["cluster.a.membership_healthy"].value == 2
    assert store.counters["cluster_manager.cluster_added"].value == 1
    assert store.gauges["cluster_manager.active_clusters"].value == 1
    assert len(cm) == 1 and list(cm) == [c]


def test_degraded_health_status() -> None:
    cm = ClusterManager({"a": static("a", (0, [ep(1), ep(2, health=5)]))}, Store())
    c = cm.get("a")
    assert c is not None
    assert c.is_degraded(c.hosts[1]) and not c.is_degraded(c.hosts[0])
    assert c.priority_load.healthy == (70,) and c.priority_load.degraded == (30,)


def test_update_keeps_hosts_of_unchanged_endpoints_and_closes_removed_pools() -> None:
    store = Store()
    cm = ClusterManager({"a": static("a", (0, [ep(1), ep(2), ep(3)]))}, store)
    old = cm.get("a")
    assert old is not None
    pools = {}
    for h in old.hosts:
        h.pool = pools[h.address.port] = RecordingPool()
    kept1, kept2, gone = old.hosts

    cm.update({"a": static("a", (0, [ep(1), ep(2, weight=5), ep(4)]))})
    new = cm.get("a")
    assert new is not None and new is not old
    assert old.closed and not new.closed
    assert new.hosts[0] is kept1 and new.hosts[1] is kept2
    assert kept2.weight == 5  # attributes follow the new endpoint
    assert new.hosts[2] is not gone and new.hosts[2].address.port == 4
    assert pools[3].closed == 1
    assert pools[1].closed == 0 and pools[2].closed == 0
    assert store.counters["cluster_manager.cluster_modified"].value == 1


def test_update_with_identical_spec_keeps_the_cluster() -> None:
    spec = static("a", (0, [ep(1)]))
    cm = ClusterManager({"a": spec}, Store())
    c = cm.get("a")
    cm.update({"a": dataclasses.replace(spec)})
    assert cm.get("a") is c


def test_update_keeps_runtime_health_unless_configured_status_changes() -> None:
    cm = ClusterManager({"a": static("a", (0, [ep(1), ep(2)]))}, Store())
    c = cm.get("a")
    assert c is not None
    h1, h2 = c.hosts
    c.set_host_health(h1, False)  # e.g. an active health check failed
    cm.update(
        {
            "a": static(
                "a",
                (0, [ep(1), ep(2, health=2)]),
                lb_policy=LbPolicy.RANDOM,
                healthy_panic_threshold=0.0,  # no panic: no healthy host means no host
            )
        }
    )
    c2 = cm.get("a")
    assert c2 is not None and c2.hosts == [h1, h2]
    assert not h1.healthy  # the configured status did not change: runtime health stays
    assert not h2.healthy  # the configured status changed to UNHEALTHY
    assert c2.choose_host() is None
    cm.update({"a": static("a", (0, [ep(1, health=1), ep(2)]), lb_policy=LbPolicy.RANDOM)})
    c3 = cm.get("a")
    assert c3 is not None and h1.healthy and h2.healthy


def test_update_priority_move_keeps_host() -> None:
    cm = ClusterManager({"a": static("a", (0, [ep(1), ep(2)]))}, Store())
    c = cm.get("a")
    assert c is not None
    h1, h2 = c.hosts
    cm.update({"a": static("a", (0, [ep(1)]), (1, [ep(2)]))})
    c2 = cm.get("a")
    assert c2 is not None and c2.hosts == [h1, h2] and h2.priority == 1
    assert {c2.choose_host() for _ in range(10)} == {h1}


def test_connection_settings_change_gives_fresh_hosts() -> None:
    cm = ClusterManager({"a": static("a", (0, [ep(1)]))}, Store())
    c = cm.get("a")
    assert c is not None
    (h,) = c.hosts
    h.pool = pool = RecordingPool()
    cm.update({"a": static("a", (0, [ep(1)]), connect_timeout=1.0)})
    c2 = cm.get("a")
    assert c2 is not None and c2.hosts[0] is not h
    assert pool.closed == 1


def test_removed_and_added_clusters() -> None:
    store = Store()
    cm = ClusterManager({"a": static("a", (0, [ep(1)]))}, store)
    a = cm.get("a")
    assert a is not None
    a.hosts[0].pool = pool = RecordingPool()
    cm.update({"b": static("b", (0, [ep(9)]))})
    assert cm.get("a") is None and a.closed
    assert pool.closed == 1
    b = cm.get("b")
    assert b is not None and b.hosts[0].address.port == 9
    assert store.counters["cluster_manager.cluster_removed"].value == 1
    assert store.counters["cluster_manager.cluster_added"].value == 2
    assert store.gauges["cluster_manager.active_clusters"].value == 1


def test_pool_without_close_is_ignored() -> None:
    cm = ClusterManager({"a": static("a", (0, [ep(1)]))}, Store())
    c = cm.get("a")
    assert c is not None
    c.hosts[0].pool = object()
    cm.update({})
    assert cm.get("a") is None


def test_async_pool_close_is_awaited_by_stop() -> None:
    async def body() -> AsyncClosePool:
        cm = ClusterManager({"a": static("a", (0, [ep(1), ep(2)]))}, Store())
        await cm.start()
        c = cm.get("a")
        assert c is not None
        c.hosts[0].pool = removed = AsyncClosePool()
        c.hosts[1].pool = remaining = AsyncClosePool()
        cm.update({"a": static("a", (0, [ep(2)]))})
        await asyncio.wait_for(cm.stop(), 5)
        assert remaining.closed
        return removed

    assert asyncio.run(body()).closed


def test_same_address_twice_gets_two_hosts() -> None:
    cm = ClusterManager({"a": static("a", (0, [ep(1), ep(1)]))}, Store())
    c = cm.get("a")
    assert c is not None
    h1, h2 = c.hosts
    assert h1 is not h2
    cm.update({"a": static("a", (0, [ep(1), ep(1), ep(1)]))})
    c2 = cm.get("a")
    assert c2 is not None and c2.hosts[:2] == [h1, h2] and len(c2.hosts) == 3
