"""Cluster circuit breakers (envoy.config.cluster.v3.CircuitBreakers): the supported part.

Filled in by the translator (``xds/circuit_breakers.py``) and read by
``upstream/circuit_breaker.py``. Defaults are Envoy's: 1024 connections, 1024 pending requests,
1024 requests and 3 retries per cluster and routing priority; no retry budget; no
``remaining_*`` gauges.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """CircuitBreakers.Thresholds.RetryBudget: concurrent retries may reach
    ``budget_percent`` % of the cluster's active plus pending requests, and never less than
    ``min_retry_concurrency``. When set it replaces ``max_retries`` (Envoy)."""

    budget_percent: float = 20.0
    min_retry_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class Thresholds:
    """One routing priority's limits (CircuitBreakers.Thresholds).

    ``track_remaining`` publishes the ``remaining_*`` gauges (how many of each resource are
    left before the breaker opens)."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    retry_budget: RetryBudget | None = None
    track_remaining: bool = False


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    """Thresholds for routing priority DEFAULT and HIGH."""

    default: Thresholds = field(default_factory=Thresholds)
    high: Thresholds = field(default_factory=Thresholds)
