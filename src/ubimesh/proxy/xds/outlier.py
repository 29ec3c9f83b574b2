"""envoy.config.cluster.v3.OutlierDetection: a cluster's passive health checking.

Supported: every field with Envoy's meaning and default (``upstream/outlier.py``) except
``monitors`` (outlier detection extensions). ``max_ejection_time`` defaults to
max(300 s, ``base_ejection_time``) and may not be below ``base_ejection_time``, as in Envoy.
"""

from __future__ import annotations

from typing import Any

from ubimesh.proxy.snapshot.outlier import OutlierDetection
from ubimesh.proxy.xds.context import Ctx, duration, join, wrapped

_OUTLIER = {
    "consecutive_5xx",
    "interval",
    "base_ejection_time",
    "max_ejection_percent",
    "enforcing_consecutive_5xx",
    "enforcing_success_rate",
    "success_rate_minimum_hosts",
    "success_rate_request_volume",
    "success_rate_stdev_factor",
    "consecutive_gateway_failure",
    "enforcing_consecutive_gateway_failure",
    "split_external_local_origin_errors",
    "consecutive_local_origin_failure",
    "enforcing_consecutive_local_origin_failure",
    "enforcing_local_origin_success_rate",
    "failure_percentage_threshold",
    "enforcing_failure_percentage",
    "enforcing_failure_percentage_local_origin",
    "failure_percentage_minimum_hosts",
    "failure_percentage_request_volume",
    "max_ejection_time",
    "max_ejection_time_jitter",
    "successful_active_health_check_uneject_host",
    "always_eject_one_host",
}
_OUTLIER_HINTS = {
    "monitors": "outlier detection extensions (monitors) are not implemented; use the "
    "built-in consecutive error, success rate and failure percentage detectors",
}


def outlier_detection(ctx: Ctx, msg: Any, path: str) -> OutlierDetection:
    """Cluster.outlier_detection (an empty message turns detection on with the defaults)."""
    ctx.fields(msg, path, _OUTLIER, _OUTLIER_HINTS)
    d = OutlierDetection()


    base = duration(msg, "base_ejection_time", d.base_ejection_time)
    max_time = duration(msg, "max_ejection_time", max(d.max_ejection_time, base))
    if max_time < base:
        ctx.error(
            join(path, "max_ejection_time"),
            f"{max_time:g}s is below base_ejection_time ({base:g}s); Envoy refuses this "
            '("max_ejection_time cannot be smaller than base_ejection_time"): raise it or '
            "leave it unset",
        )

    def num(name: str) -> Any:
        return wrapped(msg, name, getattr(d, name))

    return OutlierDetection(
        consecutive_5xx=num("consecutive_5xx"),
        consecutive_gateway_failure=num("consecutive_gateway_failure"),
        consecutive_local_origin_failure=num("consecutive_local_origin_failure"),
        interval=duration(msg, "interval", d.interval),
        base_ejection_time=base,
        max_ejection_time=max_time,
        max_ejection_time_jitter=duration(
            msg, "max_ejection_time_jitter", d.max_ejection_time_jitter
        ),
        max_ejection_percent=num("max_ejection_percent"),
        always_eject_one_host=num("always_eject_one_host"),
        enforcing_consecutive_5xx=num("enforcing_consecutive_5xx"),
        enforcing_consecutive_gateway_failure=num("enforcing_consecutive_gateway_failure"),
        enforcing_consecutive_local_origin_failure=num(
            "enforcing_consecutive_local_origin_failure"
        ),
        enforcing_success_rate=num("enforcing_success_rate"),
        enforcing_local_origin_success_rate=num("enforcing_local_origin_success_rate"),
        success_rate_minimum_hosts=num("success_rate_minimum_hosts"),
        success_rate_request_volume=num("success_rate_request_volume"),
        success_rate_stdev_factor=num("success_rate_stdev_factor"),
        failure_percentage_threshold=num("failure_percentage_threshold"),
        enforcing_failure_percentage=num("enforcing_failure_percentage"),
        enforcing_failure_percentage_local_origin=num("enforcing_failure_percentage_local_origin"),
        failure_percentage_minimum_hosts=num("failure_percentage_minimum_hosts"),
        failure_percentage_request_volume=num("failure_percentage_request_volume"),
        split_external_local_origin_errors=msg.split_external_local_origin_errors,
        successful_active_health_check_uneject_host=num(
            "successful_active_health_check_uneject_host"
        ),
    )
