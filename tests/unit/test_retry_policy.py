"""Route retry policies: translation from Envoy's protos (what comes out, the route overriding
its virtual host, what is refused with the field path and the fix), and the decisions the
router takes from a policy (which statuses and failures are retried, Envoy's jittered
exponential backoff)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from ubimesh.proxy.http.retry import (
    Backoff,
    PreviousPriorities,
    adjusted_priority_load,
    retry_on_headers,
    retry_on_reset,
)
from ubimesh.proxy.snapshot.retry import (
    RETRY_ON_5XX,
    RETRY_ON_CONNECT_FAILURE,
    RETRY_ON_GATEWAY_ERROR,
    RetryPolicy,
    retriable_statuses,
)
from ubimesh.proxy.snapshot.types import (
    Cluster,
    DiscoveryType,
    HttpConnectionManagerConfig,
    RouteAction,
    SocketAddress,
)
from ubimesh.proxy.upstream.cluster import ClusterStats, UpstreamCluster
from ubimesh.proxy.upstream.host import Host
from ubimesh.proxy.xds import ConfigErrors, load_bootstrap_dict
from ubimesh.telemetry.stats import Store

CONFIGS = Path(__file__).parent / "configs"
HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
VHOST = HCM_PATH + ".route_config.virtual_hosts[0]"
PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    },
}


def bootstrap(
    route_policy: dict[str, Any] | None = None, vhost_policy: dict[str, Any] | None = None
) -> dict[str, Any]:
    d: dict[str, Any] = yaml.safe_load((CONFIGS / "minimal.yaml").read_text())
    hcm = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    vhost["routes"].insert(
        0, {"match": {"prefix": "/plain"}, "route": {"cluster": "backend", "timeout": "2s"}}
    )
    if route_policy is not None:
        vhost["routes"][1]["route"]["retry_policy"] = route_policy
    if vhost_policy is not None:
        vhost["retry_policy"] = vhost_policy
    return d


def actions(d: dict[str, Any]) -> list[RouteAction]:
    hcm = load_bootstrap_dict(d).listeners[0].filter_chains[0].filters[-1]
    assert isinstance(hcm, HttpConnectionManagerConfig)
    out = []
    for route in hcm.route_config.virtual_hosts[0].routes:
        assert isinstance(route.action, RouteAction)
        out.append(route.action)
    return out


def errors_of(d: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_dict(d)
    return [(e.path, e.message) for e in info.value.errors]


# -- translation ------------------------------------------------------------------------------


def test_full_policy_translates() -> None:
    plain, routed = actions(
        bootstrap(
            {
                "retry_on": "5xx, connect-failure,retriable-status-codes",
                "num_retries": 3,
                "per_try_timeout": "0.5s",
                "retriable_status_codes": [409, 418],
                "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.2s"},
                "retry_host_predicate": [PREVIOUS_HOSTS],
                "host_selection_retry_max_attempts": 4,
            }
        )
    )
    assert plain.retry_policy is None
    p = routed.retry_policy
    assert p is not None
    assert p.retry_on == {"5xx", "connect-failure", "retriable-status-codes"}
    assert p.on == RETRY_ON_5XX | RETRY_ON_CONNECT_FAILURE | 32
    assert p.num_retries == 3 and p.per_try_timeout == 0.5
    assert (p.base_interval, p.max_interval) == (0.01, 0.2)
    assert p.previous_hosts and p.host_selection_max_attempts == 4
    assert p.previous_priorities == 0
    assert {418, 409, 500, 503, 599} <= p.statuses and 404 not in p.statuses


def test_previous_priorities_translates() -> None:
    (_, routed) = actions(
        bootstrap(
            {
                "retry_on": "5xx",
                "retry_priority": {
                    "name": "envoy.retry_priorities.previous_priorities",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.priority."
                        "previous_priorities.v3.PreviousPrioritiesConfig",
                        "update_frequency": 2,
                    },
                },
            }
        )
    )
    assert routed.retry_policy is not None and routed.retry_policy.previous_priorities == 2


def test_defaults_are_envoys() -> None:
    (_, routed) = actions(bootstrap({"retry_on": "gateway-error"}))
    p = routed.retry_policy
    assert p is not None
    assert p.num_retries == 1 and p.per_try_timeout is None
    assert (p.base_interval, p.max_interval) == (0.025, 0.25)
    assert not p.previous_hosts and p.host_selection_max_attempts == 0
    assert p.statuses == {502, 503, 504}
    # max_interval defaults to ten times the base interval.
    (_, routed) = actions(
        bootstrap({"retry_on": "reset", "retry_back_off": {"base_interval": "0.1s"}})
    )
    assert routed.retry_policy is not None and routed.retry_policy.max_interval == 1.0


def test_route_policy_replaces_the_virtual_hosts() -> None:
    plain, routed = actions(
        bootstrap(
            route_policy={"retry_on": "reset", "num_retries": 5},
            vhost_policy={"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "1s"},
        )
    )
    # The route without a policy inherits the virtual host's whole policy ...
    assert plain.retry_policy is not None and plain.retry_policy.retry_on == {"5xx"}
    assert plain.retry_policy.num_retries == 2
    # ... and a route policy replaces it without merging (no per_try_timeout from the vhost).
    assert routed.retry_policy is not None and routed.retry_policy.retry_on == {"reset"}
    assert routed.retry_policy.num_retries == 5 and routed.retry_policy.per_try_timeout is None


ROUTE_POLICY = VHOST + ".routes[1].route.retry_policy"


@pytest.mark.parametrize(
    ("policy", "path", "words"),
    [
        ({"retry_on": "5xx,bogus"}, ROUTE_POLICY + ".retry_on", "unknown retry_on value 'bogus'"),
        ({"retry_on": "unavailable"}, ROUTE_POLICY + ".retry_on", "gRPC retry conditions"),
        ({"retry_on": "retriable-headers"}, ROUTE_POLICY + ".retry_on", "retriable_headers"),
        (
            {"retry_on": "5xx", "retriable_headers": [{"name": "x-retry"}]},
            ROUTE_POLICY + ".retriable_headers",
            "use retriable_status_codes",
        ),
        (
            {"retry_on": "5xx", "retry_priority": {"name": "envoy.retry_priorities.x"}},
            ROUTE_POLICY + ".retry_priority.typed_config",
            "is required",
        ),
        (
            {
                "retry_on": "5xx",
                "retry_priority": {
                    "name": "x",
                    "typed_config": {
                        "@type": "type.googleapis.com/google.protobuf.Struct",
                        "value": {},
                    },
                },
            },
            ROUTE_POLICY + ".retry_priority.typed_config",
            "PreviousPrioritiesConfig",
        ),
        (
            {"retry_on": "5xx", "per_try_idle_timeout": "1s"},
            ROUTE_POLICY + ".per_try_idle_timeout",
            "per-try idle timeouts",
        ),
        (
            {
                "retry_on": "5xx",
                "retry_back_off": {"base_interval": "1s", "max_interval": "0.5s"},
            },
            ROUTE_POLICY + ".retry_back_off.max_interval",
            "less than base_interval",
        ),
        (
            {"retry_on": "5xx", "retriable_status_codes": [700]},
            ROUTE_POLICY + ".retriable_status_codes[0]",
            "not an HTTP status code",
        ),
        (
            {
                "retry_on": "5xx",
                "retry_host_predicate": [
                    {
                        "name": "x",
                        "typed_config": {
                            "@type": "type.googleapis.com/google.protobuf.Struct",
                            "value": {},
                        },
                    }
                ],
            },
            ROUTE_POLICY + ".retry_host_predicate[0].typed_config",
            "PreviousHostsPredicate",
        ),
    ],
)
def test_refused(policy: dict[str, Any], path: str, words: str) -> None:
    errors = errors_of(bootstrap(policy))
    assert any(p == path and words in m for p, m in errors), errors


def test_hedging_and_attempt_count_are_refused_with_a_reason() -> None:
    d = bootstrap({"retry_on": "5xx"})
    vhost = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]
    vhost["hedge_policy"] = {"hedge_on_per_try_timeout": True}
    vhost["include_request_attempt_count"] = True
    errors = dict(errors_of(d))
    assert "hedging" in errors[VHOST + ".hedge_policy"]
    assert "x-envoy-attempt-count" in errors[VHOST + ".include_request_attempt_count"]


# -- decisions --------------------------------------------------------------------------------


def policy(retry_on: int, codes: frozenset[int] = frozenset()) -> RetryPolicy:
    return RetryPolicy(on=retry_on, statuses=retriable_statuses(retry_on, codes))


def test_status_decisions() -> None:
    five = policy(RETRY_ON_5XX)
    assert retry_on_headers(five, 500, []) and retry_on_headers(five, 599, [])
    assert not retry_on_headers(five, 200, []) and not retry_on_headers(five, 409, [])
    gateway = policy(RETRY_ON_GATEWAY_ERROR)
    assert [s for s in (500, 502, 503, 504, 505) if retry_on_headers(gateway, s, [])] == [
        502,
        503,
        504,
    ]
    assert retry_on_headers(policy(8), 409, []) and not retry_on_headers(policy(8), 408, [])
    codes = policy(32, frozenset({418}))
    assert retry_on_headers(codes, 418, []) and not retry_on_headers(codes, 503, [])
    # envoy-ratelimited: Envoy decides on the header alone.
    limited = policy(256 | RETRY_ON_5XX)
    assert retry_on_headers(limited, 429, [("x-envoy-ratelimited", "true")])
    assert not retry_on_headers(limited, 503, [])


def test_reset_decisions() -> None:
    # A connect failure: connect-failure, or anything that counts resets as a 5xx.
    assert retry_on_reset(policy(RETRY_ON_CONNECT_FAILURE), True, False)
    assert not retry_on_reset(policy(RETRY_ON_CONNECT_FAILURE), False, True)
    for bits in (RETRY_ON_5XX, RETRY_ON_GATEWAY_ERROR, 64):
        assert retry_on_reset(policy(bits), False, True)
        assert retry_on_reset(policy(bits), True, False)
    # reset-before-request: only before a request byte was written.
    assert retry_on_reset(policy(128), False, False)
    assert not retry_on_reset(policy(128), False, True)
    # retriable-4xx and retriable-status-codes say nothing about resets.
    assert not retry_on_reset(policy(8 | 32), True, True)


def test_backoff_is_envoys_jittered_exponential() -> None:
    b = Backoff(0.025, 0.25, random.Random(7))
    draws = [b.next() for _ in range(8)]
    ceilings = [0.025, 0.075, 0.175, 0.25, 0.25, 0.25, 0.25, 0.25]
    assert all(0 <= d < c or (c == 0.25 and d <= c) for d, c in zip(draws, ceilings, strict=True))
    # Over many draws the first backoff covers its whole range [0, base).
    b2 = Backoff(0.01, 1.0, random.Random(1))
    firsts = set()
    for _ in range(200):
        b2.n = 1
        firsts.add(b2.next())
    assert min(firsts) == 0.0 and max(firsts) == 0.009
    # The ceiling grows: later backoffs reach past the earlier ceilings, up to max_interval.
    thirds = set()
    for seed in range(200):
        b3 = Backoff(0.01, 0.05, random.Random(seed))
        draws3 = [b3.next() for _ in range(4)]
        thirds.add(draws3[2])
        assert draws3[3] <= 0.05
    assert max(thirds) > 0.03  # the third ceiling is 0.07 (capped at 0.05), the second 0.03


def test_retry_stats_names() -> None:
    store = Store()
    st = ClusterStats(store, "backend").retry
    # Made with the cluster, as Envoy's: in /stats at 0 before any retry.
    assert store.counters["cluster.backend.upstream_rq_retry"].value == 0
    st.count_retried(503)
    st.count_retried(503)
    st.retry.value += 1
    assert store.counters["cluster.backend.retry.upstream_rq_503"].value == 2
    assert store.counters["cluster.backend.retry.upstream_rq_5xx"].value == 2
    assert store.counters["cluster.backend.retry.upstream_rq_completed"].value == 2
    assert store.counters["cluster.backend.upstream_rq_retry"].value == 1
    for name in (
        "upstream_rq_retry_success",
        "upstream_rq_retry_overflow",
        "upstream_rq_retry_limit_exceeded",
        "upstream_rq_retry_backoff_exponential",
        "upstream_rq_per_try_timeout",
    ):
        assert store.counters["cluster.backend." + name].value == 0


def _cluster(levels: list[int]) -> UpstreamCluster:
    """A cluster with ``levels[p]`` healthy hosts at priority p."""
    hosts = [
        Host(SocketAddress("127.0.0.1", 1000 + 10 * p + i), priority=p)
        for p, n in enumerate(levels)
        for i in range(n)
    ]
    return UpstreamCluster(Cluster("c", DiscoveryType.STATIC), Store(), hosts)


def test_previous_priorities_leave_out_the_levels_tried() -> None:
    cluster = _cluster([2, 1, 1])
    assert cluster.priority_load.healthy == (100, 0, 0)
    prio = PreviousPriorities(2)
    p0 = [h for h in cluster.hosts if h.priority == 0]
    prio.on_host_attempted(p0[0])
    assert prio.priority_load(cluster) is None  # fewer attempts than update_frequency
    prio.on_host_attempted(p0[1])
    load = prio.priority_load(cluster)
    assert load is not None and load.healthy == (0, 100, 0)
    prio.on_host_attempted(cluster.hosts[2])  # P1: kept until the next update
    assert prio.priority_load(cluster) is load
    prio.on_host_attempted(cluster.hosts[2])
    later = prio.priority_load(cluster)
    assert later is not None and later.healthy == (0, 0, 100)
    # Every level tried: back to the cluster's own load.
    prio.on_host_attempted(cluster.hosts[3])
    prio.on_host_attempted(cluster.hosts[3])
    assert prio.priority_load(cluster) is None


def test_adjusted_load_spreads_like_envoy() -> None:
    # P0 half healthy (score 70), P1 and P2 healthy: leaving out P0 gives P1 all of it.
    cluster = _cluster([2, 2, 2])
    cluster.set_host_health(cluster.hosts[0], False)
    assert cluster.priority_load.healthy == (70, 30, 0)
    load = adjusted_priority_load(cluster, {0})
    assert load is not None and load.healthy == (0, 100, 0)
    assert adjusted_priority_load(cluster, {0, 1, 2}) is None


def test_adjusted_load_counts_hosts_as_the_cluster_does() -> None:
    # A draining host is excluded: it counts in no level's total, for retries either. P0 has
    # one healthy host of the two that count (score 70), not one of three (46).
    cluster = _cluster([3, 2])
    cluster.hosts[0].set_eds_status(3)  # DRAINING
    cluster.set_host_health(cluster.hosts[1], False)
    cluster.refresh()
    assert cluster.priority_load.healthy == (70, 30)
    assert adjusted_priority_load(cluster, set()) == cluster.priority_load
    load = adjusted_priority_load(cluster, {1})
    assert load is not None and load.healthy == (100, 0)
