"""envoy.extensions.filters.http.fault.v3.HTTPFault (``envoy.filters.http.fault``) translation.

Supported: ``delay`` (fixed_delay or header_delay, percentage), ``abort`` (http_status or
header_abort, percentage), ``upstream_cluster``, ``headers``, ``max_active_faults``. Refused,
each with the reason: gRPC aborts, ``downstream_nodes`` (the HCM strips the
x-envoy-downstream-service-node header it reads), ``response_rate_limit`` and every
``*_runtime`` key (ubimesh has no runtime).
"""

from __future__ import annotations

from typing import Any

from ubimesh.proxy.snapshot.types import FaultConfig
from ubimesh.proxy.xds import common
from ubimesh.proxy.xds.context import Ctx, item, join, seconds, wrapped

_NO_RUNTIME = "ubimesh has no runtime; leave the runtime key unset (Envoy's default key applies)"

_FAULT = {"delay", "abort", "upstream_cluster", "headers", "max_active_faults"}
_FAULT_HINTS = {
    "downstream_nodes": "matching x-envoy-downstream-service-node is not implemented (the "
    "connection manager strips that header from every external request); remove "
    "downstream_nodes",
    "response_rate_limit": "response body rate limiting is not implemented; remove "
    "response_rate_limit",
    "delay_percent_runtime": _NO_RUNTIME,
    "abort_percent_runtime": _NO_RUNTIME,
    "delay_duration_runtime": _NO_RUNTIME,
    "abort_http_status_runtime": _NO_RUNTIME,
    "max_active_faults_runtime": _NO_RUNTIME,
    "response_rate_limit_percent_runtime": _NO_RUNTIME,
    "abort_grpc_status_runtime": _NO_RUNTIME,
    "disable_downstream_cluster_stats": "per downstream cluster fault stats are not "
    "implemented (so there is nothing to disable); remove the field",
    "filter_metadata": "fault filter metadata is not implemented; remove filter_metadata",
}
_DELAY = {"fixed_delay", "header_delay", "percentage"}
_ABORT = {"http_status", "header_abort", "percentage"}
_ABORT_HINTS = {
    "grpc_status": "gRPC aborts are not implemented; use http_status (or header_abort)",
}


def http_fault(ctx: Ctx, msg: Any, path: str) -> FaultConfig:
    """HTTPFault: the filter's config (``path`` is its typed_config)."""
    ctx.fields(msg, path, _FAULT, _FAULT_HINTS)
    has_delay = msg.HasField("delay")
    delay: float | None = None
    header_delay = False
    delay_percent = (0, 100)
    if has_delay:
        dpath = join(path, "delay")
        d = msg.delay
        ctx.fields(d, dpath, _DELAY)
        which = d.WhichOneof("fault_delay_secifier")
        if which == "fixed_delay":
            delay = seconds(d.fixed_delay)
        elif which == "header_delay":
            header_delay = True
        else:
            ctx.error(dpath, "needs fixed_delay or header_delay")
        delay_percent = _percent(ctx, d, dpath)
    has_abort = msg.HasField("abort")
    abort_status: int | None = None
    header_abort = False
    abort_percent = (0, 100)
    if has_abort:
        apath = join(path, "abort")
        a = msg.abort
        ctx.fields(a, apath, _ABORT, _ABORT_HINTS)
        which = a.WhichOneof("error_type")
        if which == "http_status":
            abort_status = a.http_status
        elif which == "header_abort":
            header_abort = True
        elif which is None:
            ctx.error(apath, "needs http_status or header_abort")
        abort_percent = _percent(ctx, a, apath)
    hpath = join(path, "headers")
    headers = tuple(
        common.header_matcher(ctx, h, item(hpath, i)) for i, h in enumerate(msg.headers)
    )
    return FaultConfig(
        has_delay=has_delay,
        delay=delay,
        header_delay=header_delay,
        delay_percent=delay_percent,
        has_abort=has_abort,
        abort_status=abort_status,
        header_abort=header_abort,
        abort_percent=abort_percent,
        upstream_cluster=msg.upstream_cluster,
        headers=headers,
        max_active_faults=wrapped(msg, "max_active_faults", None),
    )


def _percent(ctx: Ctx, msg: Any, path: str) -> tuple[int, int]:
    """The fault's ``percentage``; unset is 0 % in Envoy (the fault never fires)."""
    if not msg.HasField("percentage"):
        return (0, 100)
    return common.fractional_percent(ctx, msg.percentage, join(path, "percentage"))
