"""Circuit breakers: the resource manager (limits, gauges, retry budget) and the translation
of Cluster.circuit_breakers."""

from __future__ import annotations

from typing import Any

import pytest

from ubimesh.proxy.snapshot.circuit_breakers import CircuitBreakers, RetryBudget, Thresholds
from ubimesh.proxy.upstream.circuit_breaker import (
    UNLIMITED,
    ClusterResources,
    RetryBudgetResource,
)
from ubimesh.proxy.xds import ConfigErrors, load_bootstrap_dict
from ubimesh.telemetry.stats import Store

CB = "cluster.c.circuit_breakers."


def _take(resource: Any, n: int) -> None:
    for _ in range(n):
        assert resource.can_create()
        resource.inc()


def test_limits_and_open_gauges_follow_the_counts() -> None:
    store = Store()
    res = ClusterResources(
        CircuitBreakers(default=Thresholds(max_connections=2, max_pending_requests=1)), store, "c"
    ).default
    gauges = store.gauges
    assert gauges[CB + "default.cx_open"].value == 0
    _take(res.connections, 2)
    assert not res.connections.can_create()
    assert gauges[CB + "default.cx_open"].value == 1
    res.connections.dec()
    assert res.connections.can_create()
    assert gauges[CB + "default.cx_open"].value == 0
    _take(res.pending_requests, 1)
    assert gauges[CB + "default.rq_pending_open"].value == 1
    assert gauges[CB + "high.rq_pending_open"].value == 0
    # Envoy's names, for both priorities; no remaining_* without track_remaining.
    for prio in ("default", "high"):
        for name in ("cx_open", "cx_pool_open", "rq_pending_open", "rq_open", "rq_retry_open"):
            assert f"{CB}{prio}.{name}" in gauges
    assert not [n for n in gauges if "remaining" in n]


def test_remaining_gauges_with_track_remaining() -> None:
    store = Store()
    t = Thresholds(max_connections=3, max_pending_requests=2, max_requests=5, track_remaining=True)
    res = ClusterResources(CircuitBreakers(default=t), store, "c").default
    g = {n[len(CB) :]: v.value for n, v in store.gauges.items()}
    assert g["default.remaining_cx"] == 3
    assert g["default.remaining_pending"] == 2
    assert g["default.remaining_rq"] == 5
    assert g["default.remaining_retries"] == 3
    assert g["default.remaining_cx_pools"] == UNLIMITED
    assert "high.remaining_cx" not in g
    _take(res.requests, 5)
    assert store.gauges[CB + "default.remaining_rq"].value == 0
    assert store.gauges[CB + "default.rq_open"].value == 1
    res.requests.inc()  # above the maximum (a race Envoy tolerates too): remaining stays 0
    assert store.gauges[CB + "default.remaining_rq"].value == 0
    res.requests.dec()
    res.requests.dec()
    assert store.gauges[CB + "default.remaining_rq"].value == 1
    assert store.gauges[CB + "default.rq_open"].value == 0


def test_retry_budget_is_a_share_of_active_and_pending_requests() -> None:
    store = Store()
    t = Thresholds(
        max_retries=1,
        retry_budget=RetryBudget(budget_percent=25.0, min_retry_concurrency=2),
        track_remaining=True,
    )
    res = ClusterResources(CircuitBreakers(default=t), store, "c").default
    retries = res.retries
    assert isinstance(retries, RetryBudgetResource)
    # No traffic: min_retry_concurrency (2) retries, whatever max_retries (1) says.
    assert retries.limit() == 2
    _take(retries, 2)
    assert not retries.can_create()
    # 12 requests + 4 pending: 25 % of 16 = 4.
    _take(res.requests, 12)
    _take(res.pending_requests, 4)
    assert retries.limit() == 4
    _take(retries, 2)
    assert not retries.can_create()
    # Rounded down: 25 % of 15 = 3.75 -> 3.
    res.pending_requests.dec()
    assert retries.limit() == 3
    # As in Envoy: rq_retry_open follows max_retries, remaining_retries stays 0.
    assert store.gauges[CB + "default.rq_retry_open"].value == 1
    assert store.gauges[CB + "default.remaining_retries"].value == 0
    for _ in range(4):
        retries.dec()
    assert store.gauges[CB + "default.rq_retry_open"].value == 0


def test_without_budget_max_retries_bounds_retries() -> None:
    res = ClusterResources(CircuitBreakers()).default
    assert not isinstance(res.retries, RetryBudgetResource)
    _take(res.retries, 3)
    assert not res.retries.can_create()


def test_a_rebuilt_cluster_takes_the_gauges_over() -> None:
    store = Store()
    old = ClusterResources(CircuitBreakers(default=Thresholds(max_connections=1)), store, "c")
    old.default.connections.inc()
    assert store.gauges[CB + "default.cx_open"].value == 1
    new = ClusterResources(CircuitBreakers(default=Thresholds(max_connections=5)), store, "c")
    assert store.gauges[CB + "default.cx_open"].value == 0
    new.default.connections.inc()
    old.default.connections.dec()  # the old cluster's last connection closes
    assert old.default.connections.count == 0
    assert new.default.connections.count == 1
    _take(new.default.connections, 4)
    old.default.connections.inc()
    old.default.connections.dec()
    assert store.gauges[CB + "default.cx_open"].value == 1


# -- translation -----------------------------------------------------------------------------


def _bootstrap(cb: dict[str, Any]) -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": 9}}
    return {
        "static_resources": {
            "clusters": [
                {
                    "name": "c",
                    "connect_timeout": "1s",
                    "circuit_breakers": cb,
                    "load_assignment": {
                        "cluster_name": "c",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
                    },
                }
            ]
        }
    }


def test_translation_per_priority_with_envoy_defaults() -> None:
    snap = load_bootstrap_dict(
        _bootstrap(
            {
                "thresholds": [
                    {"priority": "HIGH", "max_connections": 7, "max_retries": 0},
                    {
                        "max_pending_requests": 0,
                        "max_requests": 500,
                        "track_remaining": True,
                        "retry_budget": {},
                    },
                ]
            }
        )
    )
    cb = snap.clusters["c"].circuit_breakers
    assert cb.high == Thresholds(max_connections=7, max_retries=0)
    assert cb.default == Thresholds(
        max_pending_requests=0,
        max_requests=500,
        retry_budget=RetryBudget(20.0, 3),
        track_remaining=True,
    )
    budget = {"budget_percent": {"value": 12.5}, "min_retry_concurrency": 10}
    snap = load_bootstrap_dict(_bootstrap({"thresholds": [{"retry_budget": budget}]}))
    assert snap.clusters["c"].circuit_breakers.default.retry_budget == RetryBudget(12.5, 10)
    assert load_bootstrap_dict(_bootstrap({})).clusters["c"].circuit_breakers == CircuitBreakers()


P = "static_resources.clusters[0].circuit_breakers"


@pytest.mark.parametrize(
    ("cb", "path", "words"),
    [
        ({"thresholds": [{"max_connections": 1}, {"priority": "DEFAULT"}]},
         P + ".thresholds[1].priority", "second thresholds entry for priority DEFAULT"),
        ({"per_host_thresholds": [{"max_connections": 1}]},
         P + ".per_host_thresholds", "per-host"),
        ({"thresholds": [{"max_connection_pools": 4}]},
         P + ".thresholds[0].max_connection_pools", "one connection pool per host"),
        ({"thresholds": [{"retry_budget": {"budget_percent": {"value": 101}}}]},
         P + ".thresholds[0].retry_budget.budget_percent.value", "at most 100"),
        ({"thresholds": [{"priority": 7}]}, P + ".thresholds[0].priority", "RoutingPriority"),
    ],
)  # fmt: skip
def test_translation_refuses_with_the_field_path(cb: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_dict(_bootstrap(cb))
    found = [(e.path, e.message) for e in info.value.errors]
    assert any(p == path and words in m for p, m in found), found
