"""envoy.config.cluster.v3.CircuitBreakers: a cluster's limits per routing priority.

Supported: ``thresholds`` (one per priority, DEFAULT or HIGH) with ``max_connections``,
``max_pending_requests``, ``max_requests``, ``max_retries``, ``retry_budget`` and
``track_remaining``. Refused: ``max_connection_pools`` (a pool is made per host and kept with
it, so there is nothing to bound) and ``per_host_thresholds``. Two thresholds for one priority
are an error (Envoy takes the first and ignores the others without a word).
"""

from __future__ import annotations

from typing import Any

from ubimesh.proxy.snapshot.circuit_breakers import CircuitBreakers, RetryBudget, Thresholds
from ubimesh.proxy.xds.context import Ctx, item, join, wrapped

_CIRCUIT_BREAKERS = {"thresholds"}
_CIRCUIT_BREAKERS_HINTS = {
    "per_host_thresholds": "per-host circuit breakers are not implemented yet; use the "
    "cluster-wide thresholds",
}
_THRESHOLDS = {
    "priority",
    "max_connections",
    "max_pending_requests",
    "max_requests",
    "max_retries",
    "retry_budget",
    "track_remaining",
}
_THRESHOLDS_HINTS = {
    "max_connection_pools": "ubimesh makes one connection pool per host and keeps it as long "
    "as the host: there is no pool count to bound",
}
_RETRY_BUDGET = {"budget_percent", "min_retry_concurrency"}
_PERCENT = {"value"}

# envoy.config.core.v3.RoutingPriority
_DEFAULT = 0
_HIGH = 1
_PRIORITY_NAMES = {_DEFAULT: "DEFAULT", _HIGH: "HIGH"}

# Envoy's defaults, as the snapshot types carry them.
_T = Thresholds()
_B = RetryBudget()


def circuit_breakers(ctx: Ctx, msg: Any, path: str) -> CircuitBreakers:
    """Cluster.circuit_breakers. A priority without thresholds keeps Envoy's defaults."""
    ctx.fields(msg, path, _CIRCUIT_BREAKERS, _CIRCUIT_BREAKERS_HINTS)
    found: dict[int, Thresholds] = {}
    tpath = join(path, "thresholds")
    for i, t in enumerate(msg.thresholds):
        ipath = item(tpath, i)
        thresholds = _thresholds(ctx, t, ipath)
        priority = t.priority
        if priority not in _PRIORITY_NAMES:
            continue  # reported by the field rules (defined_only)
        if priority in found:
            name = _PRIORITY_NAMES[priority]
            ctx.error(
                join(ipath, "priority"),
                f"a second thresholds entry for priority {name}; Envoy would use the first "
                "and ignore this one: keep one entry per priority",
            )
            continue
        found[priority] = thresholds
    return CircuitBreakers(
        default=found.get(_DEFAULT, Thresholds()),
        high=found.get(_HIGH, Thresholds()),
    )


def _thresholds(ctx: Ctx, msg: Any, path: str) -> Thresholds:
    ctx.fields(msg, path, _THRESHOLDS, _THRESHOLDS_HINTS)
    budget = None
    if msg.HasField("retry_budget"):
        budget = _retry_budget(ctx, msg.retry_budget, join(path, "retry_budget"))
    return Thresholds(
        max_connections=wrapped(msg, "max_connections", _T.max_connections),
        max_pending_requests=wrapped(msg, "max_pending_requests", _T.max_pending_requests),
        max_requests=wrapped(msg, "max_requests", _T.max_requests),
        max_retries=wrapped(msg, "max_retries", _T.max_retries),
        retry_budget=budget,
        track_remaining=msg.track_remaining,
    )


def _retry_budget(ctx: Ctx, msg: Any, path: str) -> RetryBudget:
    """Thresholds.retry_budget: each field keeps Envoy's default when unset (20 %, 3)."""
    ctx.fields(msg, path, _RETRY_BUDGET)
    percent = _B.budget_percent
    if msg.HasField("budget_percent"):
        ctx.fields(msg.budget_percent, join(path, "budget_percent"), _PERCENT)
        percent = msg.budget_percent.value
    return RetryBudget(
        budget_percent=percent,
        min_retry_concurrency=wrapped(msg, "min_retry_concurrency", _B.min_retry_concurrency),
    )
