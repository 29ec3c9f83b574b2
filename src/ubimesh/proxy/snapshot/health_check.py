"""Cluster active health checks (envoy.config.core.v3.HealthCheck): the supported part.

Filled in by the translator and run by ``upstream/health_check.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HealthCheck:
    timeout: float
    interval: float
    unhealthy_threshold: int
    healthy_threshold: int
