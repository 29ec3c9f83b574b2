"""Cluster outlier detection (envoy.config.cluster.v3.OutlierDetection): the supported part.

Filled in by the translator (``xds/outlier.py``) and run by ``upstream/outlier.py``. Defaults
are Envoy's; durations are float seconds, percentages integers 0..100.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    interval: float = 10.0
    """How often ejections are lifted and the success rate pass runs."""
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    """Cap on base_ejection_time x (ejection multiplier); the translator makes the default
    max(300 s, base_ejection_time), as Envoy does."""
    max_ejection_time_jitter: float = 0.0
    max_ejection_percent: int = 10
    always_eject_one_host: bool = False
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_consecutive_local_origin_failure: int = 100
    enforcing_success_rate: int = 100
    enforcing_local_origin_success_rate: int = 100
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    """In thousandths: 1900 is 1.9 standard deviations."""
    failure_percentage_threshold: int = 85
    enforcing_failure_percentage: int = 0
    enforcing_failure_percentage_local_origin: int = 0
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    split_external_local_origin_errors: bool = False
    successful_active_health_check_uneject_host: bool = True
