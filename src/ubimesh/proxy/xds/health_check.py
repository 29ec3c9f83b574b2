"""envoy.config.core.v3.HealthCheck: a cluster's active health checks (``Cluster.health_checks``).

Supported: one health check per cluster (Envoy refuses more: "Multiple health checks not
supported"), HTTP/1.1 (``http_health_check``) or TCP (``tcp_health_check``), with the
timing fields (intervals, jitters, thresholds, the no-traffic intervals), ``reuse_connection``
and ``alt_port``. Refused: gRPC and custom health checkers, event logging, TLS options (and
health checks of a cluster with a ``transport_socket``: checks are plaintext), and in HTTP
checks request payloads, request header mutations, ``service_name_matcher`` and HTTP/2 or
HTTP/3 codecs.
"""

from __future__ import annotations

import binascii
from typing import Any

from ubimesh.proxy.snapshot.health_check import HealthCheck, HttpHealthCheck, TcpHealthCheck
from ubimesh.proxy.xds.context import Ctx, duration, item, join, wrapped

_HEALTH_CHECK = {
    "timeout",
    "interval",
    "initial_jitter",
    "interval_jitter",
    "interval_jitter_percent",
    "unhealthy_threshold",
    "healthy_threshold",
    "alt_port",
    "reuse_connection",
    "http_health_check",
    "tcp_health_check",
    "no_traffic_interval",
    "no_traffic_healthy_interval",
    "unhealthy_interval",
    "unhealthy_edge_interval",
    "healthy_edge_interval",
}
_HEALTH_CHECK_HINTS = {
    "grpc_health_check": "gRPC health checks are not implemented; use http_health_check or "
    "tcp_health_check",
    "custom_health_check": "custom health checkers are not implemented; use "
    "http_health_check or tcp_health_check",
    "event_log_path": "health check event logs are not implemented; watch the cluster's "
    "health_check.* stats and /clusters health flags",
    "event_logger": "health check event logs are not implemented",
    "event_service": "health check event streaming is not implemented",
    "always_log_health_check_failures": "health check event logs are not implemented",
    "always_log_health_check_success": "health check event logs are not implemented",
    "tls_options": "health checks are plaintext: TLS health checks are not implemented",
    "transport_socket_match_criteria": "transport socket matches are not implemented",
}
_HTTP = {
    "host",
    "path",
    "receive",
    "response_buffer_size",
    "expected_statuses",
    "retriable_statuses",
    "method",
    "codec_client_type",
}
_HTTP_HINTS = {
    "send": "HTTP health check request bodies are not implemented",
    "request_headers_to_add": "request header mutations of health checks are not implemented",
    "request_headers_to_remove": "request header mutations of health checks are not implemented",
    "service_name_matcher": "x-envoy-upstream-healthchecked-cluster matching is not implemented",
}
_TCP = {"send", "receive"}
_TCP_HINTS = {"proxy_protocol_config": "PROXY protocol health checks are not implemented"}
_PAYLOAD = {"text", "binary"}
_RANGE = {"start", "end"}

# envoy.config.core.v3.RequestMethod: GET (and METHOD_UNSPECIFIED, which means GET).
_GET_METHODS = {0: "GET", 1: "GET"}
_HTTP1 = 0  # envoy.type.v3.CodecClientType.HTTP1


def health_checks(ctx: Ctx, msg: Any, path: str) -> tuple[HealthCheck, ...]:
    """Cluster.health_checks (the cluster's ``msg``): at most one."""
    hpath = join(path, "health_checks")
    if len(msg.health_checks) > 1:
        ctx.error(
            hpath,
            f'has {len(msg.health_checks)} entries; Envoy refuses more than one ("Multiple '
            'health checks not supported"): keep one',
        )
    if msg.health_checks and msg.HasField("transport_socket"):
        ctx.unsupported(
            hpath,
            "health checks of a cluster with a transport_socket (TLS health checks) are not "
            "implemented yet",
        )
        return ()
    out = []
    for i, hc in enumerate(msg.health_checks[:1]):
        checked = health_check(ctx, hc, item(hpath, i))
        if checked is not None:
            out.append(checked)
    return tuple(out)


def health_check(ctx: Ctx, msg: Any, path: str) -> HealthCheck | None:
    ctx.fields(msg, path, _HEALTH_CHECK, _HEALTH_CHECK_HINTS)
    for name in ("timeout", "interval", "unhealthy_threshold", "healthy_threshold"):
        if not msg.HasField(name):
            ctx.error(join(path, name), "is required")
    http = tcp = None
    if msg.HasField("http_health_check"):
        http = _http(ctx, msg.http_health_check, join(path, "http_health_check"))
    elif msg.HasField("tcp_health_check"):
        tcp = _tcp(ctx, msg.tcp_health_check, join(path, "tcp_health_check"))
    elif msg.WhichOneof("health_checker") is None:
        ctx.error(path, "needs a health checker: http_health_check or tcp_health_check")
    if http is None and tcp is None:
        return None


    no_traffic = duration(msg, "no_traffic_interval", 60.0)
    return HealthCheck(
        timeout=duration(msg, "timeout", 1.0) or 1.0,
        interval=duration(msg, "interval", 1.0) or 1.0,
        unhealthy_threshold=wrapped(msg, "unhealthy_threshold", 1),
        healthy_threshold=wrapped(msg, "healthy_threshold", 1),
        http=http,
        tcp=tcp,
        initial_jitter=duration(msg, "initial_jitter", 0.0) or 0.0,
        interval_jitter=duration(msg, "interval_jitter", 0.0) or 0.0,
        interval_jitter_percent=msg.interval_jitter_percent,
        no_traffic_interval=no_traffic,
        no_traffic_healthy_interval=duration(msg, "no_traffic_healthy_interval", None),
        unhealthy_interval=duration(msg, "unhealthy_interval", None),
        unhealthy_edge_interval=duration(msg, "unhealthy_edge_interval", None),
        healthy_edge_interval=duration(msg, "healthy_edge_interval", None),
        reuse_connection=wrapped(msg, "reuse_connection", True),
        alt_port=wrapped(msg, "alt_port", 0),
    )


def _http(ctx: Ctx, msg: Any, path: str) -> HttpHealthCheck:
    ctx.fields(msg, path, _HTTP, _HTTP_HINTS)
    if not msg.path:
        ctx.error(join(path, "path"), "is required (for example /healthz)")
    method = _GET_METHODS.get(msg.method)
    if method is None:
        ctx.unsupported(
            join(path, "method"), "health check methods other than GET are not implemented yet"
        )
    if msg.codec_client_type != _HTTP1:
        ctx.unsupported(
            join(path, "codec_client_type"), "HTTP/2 and HTTP/3 health checks are not "
            "implemented; use HTTP1 (the default)",
        )  # fmt: skip
    expected = _ranges(ctx, msg.expected_statuses, join(path, "expected_statuses"), "expected")
    retriable = _ranges(ctx, msg.retriable_statuses, join(path, "retriable_statuses"), "retriable")
    return HttpHealthCheck(
        path=msg.path,
        host=msg.host,
        expected_statuses=expected or ((200, 201),),
        retriable_statuses=retriable,
        receive=_payloads(ctx, msg.receive, join(path, "receive")),
        response_buffer_size=wrapped(msg, "response_buffer_size", 1024),
    )


def _tcp(ctx: Ctx, msg: Any, path: str) -> TcpHealthCheck:
    ctx.fields(msg, path, _TCP, _TCP_HINTS)
    send = b""
    if msg.HasField("send"):
        send = _payload(ctx, msg.send, join(path, "send"))
    return TcpHealthCheck(send=send, receive=_payloads(ctx, msg.receive, join(path, "receive")))


def _ranges(ctx: Ctx, ranges: Any, path: str, kind: str) -> tuple[tuple[int, int], ...]:
    """Int64Range lists, checked as Envoy checks them (100 <= start < end <= 600)."""
    out = []
    for i, r in enumerate(ranges):
        rpath = item(path, i)
        ctx.fields(r, rpath, _RANGE)
        if r.start >= r.end:
            ctx.error(rpath, f"invalid http {kind} status range: start ({r.start}) must be "
                      f"below end ({r.end}); ranges are half-open [start, end)")  # fmt: skip
        elif r.start < 100 or r.end > 600:
            ctx.error(rpath, f"invalid http {kind} status range [{r.start}, {r.end}): "
                      "statuses must lie in [100, 600)")  # fmt: skip
        else:
            out.append((int(r.start), int(r.end)))
    return tuple(out)


def _payloads(ctx: Ctx, payloads: Any, path: str) -> tuple[bytes, ...]:
    return tuple(_payload(ctx, p, item(path, i)) for i, p in enumerate(payloads))


def _payload(ctx: Ctx, msg: Any, path: str) -> bytes:
    """HealthCheck.Payload: ``text`` is hex, as in Envoy; ``binary`` raw bytes."""
    ctx.fields(msg, path, _PAYLOAD)
    if msg.WhichOneof("payload") == "text":
        try:
            return binascii.unhexlify(msg.text)
        except (binascii.Error, ValueError):
            ctx.error(join(path, "text"), f"{msg.text!r} is not hex: write the bytes as hex "
                      "digits (\"48454c4c4f\" for HELLO), or use binary")  # fmt: skip
            return b""
    return bytes(msg.binary)
