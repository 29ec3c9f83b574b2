"""Scenario ``resilience``: what retries, circuit breakers and outlier detection cost on the
request path when nothing fails (issue 7 bar: at most 5 % of throughput).

Two targets, both ubimesh with one worker, on the S1 setup (``configs.ubimesh_bootstrap``:
plain HTTP/1.1, one route, the nginx upstream), measured closed-loop with wrk:

* ``ubimesh``: the S1 bootstrap as it is (Envoy's default circuit breakers, which ubimesh
  always counts, no retry policy, no outlier detection);
* ``ubimesh-resilience``: the same with what a mesh route and cluster get by default and more:
  a route ``retry_policy`` (5xx, reset, connect-failure, gateway-error; 2 retries; a per-try
  timeout; the previous_hosts predicate), cluster ``circuit_breakers`` with explicit
  thresholds and a retry budget, and ``outlier_detection`` (consecutive 5xx and gateway
  failures, success rate).

Nothing fails during the run, so the difference is the bookkeeping every request pays: the
retry state, the breaker counters, the outlier detector's per-response accounting.

The report adds the bar: rps of ``ubimesh-resilience`` divided by rps of ``ubimesh``, PASS at
0.95 or more, per size and load.
"""

from __future__ import annotations

import copy
from typing import Any

from benchlib import configs, report

PRODUCTS = ("ubimesh",)
PLAIN = "ubimesh"
WITH_RESILIENCE = "ubimesh-resilience"
TARGETS = (PLAIN, WITH_RESILIENCE)
BAR = 0.95
PREVIOUS_HOSTS = (
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
)


RETRY_POLICY: dict[str, Any] = {
    "retry_on": "5xx,reset,connect-failure,gateway-error",
    "num_retries": 2,
    "per_try_timeout": "5s",
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": PREVIOUS_HOSTS},
        }
    ],
    "host_selection_retry_max_attempts": 3,
}
CIRCUIT_BREAKERS: dict[str, Any] = {
    "thresholds": [
        {
            "priority": "DEFAULT",
            "max_connections": 10000,
            "max_pending_requests": 10000,
            "max_requests": 10000,
            "retry_budget": {
                "budget_percent": {"value": 20.0},
                "min_retry_concurrency": 10,
            },
        }
    ]
}
OUTLIER_DETECTION: dict[str, Any] = {
    "consecutive_5xx": 5,
    "consecutive_gateway_failure": 5,
    "enforcing_consecutive_gateway_failure": 100,
    "interval": "1s",
    "base_ejection_time": "10s",
    "max_ejection_percent": 50,
}

#: What ``resilience_bootstrap`` adds (all by default; telemetry_cpu.py measures each alone).
FEATURES = ("retry", "breakers", "outlier")


def resilience_bootstrap(
    listen_port: int, admin_port: int, upstream_port: int, features: tuple[str, ...] = FEATURES
) -> dict[str, Any]:
    """The S1 bootstrap with a retry policy, circuit breakers and outlier detection (those of
    ``features``)."""
    cfg = configs.ubimesh_bootstrap(listen_port, admin_port, upstream_port)  # a new dict
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    cluster = cfg["static_resources"]["clusters"][0]
    if "retry" in features:
        route["retry_policy"] = copy.deepcopy(RETRY_POLICY)
    if "breakers" in features:
        cluster["circuit_breakers"] = copy.deepcopy(CIRCUIT_BREAKERS)
    if "outlier" in features:
        cluster["outlier_detection"] = copy.deepcopy(OUTLIER_DETECTION)
    return cfg


def bootstrap(target: str, listen: int, admin: int, upstream: int) -> dict[str, Any]:
    if target == PLAIN:
        return configs.ubimesh_bootstrap(listen, admin, upstream)
    if target == WITH_RESILIENCE:
        return resilience_bootstrap(listen, admin, upstream)
    raise ValueError(f"unknown target {target!r} for --scenario resilience")


def bar_section(rows: list[dict[str, Any]]) -> str:
    """Markdown: rps with and without the resilience features, their ratio, and the bar."""
    return report.ratio_bar_section(
        rows,
        heading="Retries, circuit breakers and outlier detection when nothing fails: the bar",
        bar_text=(
            f"Bar (issue 7): throughput with them is at least {BAR:.0%} of throughput without "
            "(closed loop, same proxy, same run). Medians over repetitions."
        ),
        plain=PLAIN,
        subject=WITH_RESILIENCE,
        bar=BAR,
        without="without",
        with_="with",
    )
