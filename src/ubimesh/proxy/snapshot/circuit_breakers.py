"""Cluster circuit breakers (envoy.config.cluster.v3.CircuitBreakers): the supported part.

Filled in by the translator and read by ``upstream/circuit_breaker.py``. Defaults are Envoy's.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Thresholds:
    """One priority's limits (CircuitBreakers.Thresholds)."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    """Thresholds for routing priority DEFAULT and HIGH."""

    default: Thresholds = field(default_factory=Thresholds)
    high: Thresholds = field(default_factory=Thresholds)
