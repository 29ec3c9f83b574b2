"""Cluster outlier detection (envoy.config.cluster.v3.OutlierDetection): the supported part.

Filled in by the translator and read by ``upstream/outlier.py``. Defaults are Envoy's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
