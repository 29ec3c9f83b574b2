"""HttpConnectionManager.tracing: providers envoy.tracers.zipkin and envoy.tracers.opentelemetry.

Importing this module registers ZipkinConfig and OpenTelemetryConfig in protobuf's descriptor
pool (what parsing a ``typed_config`` with their ``@type`` needs).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from envoy.config.trace.v3 import opentelemetry_pb2, zipkin_pb2

from ubimesh.proxy.snapshot.types import (
    CustomTag,
    CustomTagKind,
    FilterChain,
    HttpConnectionManagerConfig,
    RouteTracing,
    TracingConfig,
    TracingProvider,
    TracingProviderKind,
)
from ubimesh.proxy.xds import extensions
from ubimesh.proxy.xds.context import Ctx, item, join, seconds, wrapped

ZipkinConfig = zipkin_pb2.ZipkinConfig
OpenTelemetryConfig = opentelemetry_pb2.OpenTelemetryConfig
ZIPKIN_TYPE = ZipkinConfig.DESCRIPTOR.full_name
OTEL_TYPE = OpenTelemetryConfig.DESCRIPTOR.full_name
PROVIDERS = {ZIPKIN_TYPE: ZipkinConfig, OTEL_TYPE: OpenTelemetryConfig}

_NOT_YET = "not implemented yet"

_TRACING = {
    "provider",
    "client_sampling",
    "random_sampling",
    "overall_sampling",
    "custom_tags",
    "max_path_tag_length",
    "verbose",
}
_TRACING_HINTS = {
    "spawn_upstream_span": "upstream spans are " + _NOT_YET + "; the HCM's span is the hop's "
    "only span (Envoy's default)",
    "operation": "span name formatters are " + _NOT_YET + "; spans are named as Envoy names "
    "them by default",
    "upstream_operation": "span name formatters are " + _NOT_YET,
}
_PROVIDER = {"name", "typed_config"}
_ZIPKIN = {
    "collector_cluster",
    "collector_endpoint",
    "collector_endpoint_version",
    "trace_id_128bit",
    "shared_span_context",
    "collector_hostname",
    "trace_context_option",
    "collector_service",
}
_ZIPKIN_HINTS = {"split_spans_for_request": "split client/server spans are " + _NOT_YET}
_OTEL = {"http_service", "service_name"}
_OTEL_HINTS = {
    "grpc_service": "OTLP over gRPC is not implemented; use http_service",
    "resource_detectors": "resource detectors are " + _NOT_YET,
    "sampler": "OpenTelemetry samplers are " + _NOT_YET + "; use the HCM's sampling settings",
    "max_cache_size": "the OpenTelemetry span cache is " + _NOT_YET,
}
_HTTP_SERVICE = {"http_uri", "request_headers_to_add"}
_HTTP_URI = {"uri", "cluster", "timeout"}
_HEADER_OPTION = {"header", "append_action", "append"}
_HEADER_VALUE = {"key", "value"}
_CUSTOM_TAG = {"tag", "literal", "request_header", "environment"}
_CUSTOM_TAG_HINTS = {
    "metadata": "metadata custom tags are " + _NOT_YET,
    "value": "formatted custom tags are " + _NOT_YET + "; use literal or request_header",
}
_JSON = 1


def hcm_tracing(ctx: Ctx, msg: Any, path: str) -> TracingConfig | None:
    """HttpConnectionManager.Tracing. The provider is required: ubimesh does not take the
    bootstrap's tracing.http, which Envoy deprecated."""
    ctx.fields(msg, path, _TRACING, _TRACING_HINTS)
    ppath = join(path, "provider")
    if not msg.HasField("provider"):
        ctx.error(
            ppath,
            "is required: set envoy.tracers.zipkin or envoy.tracers.opentelemetry here "
            "(ubimesh does not use the bootstrap's tracing.http)",
        )
        return None
    provider = _provider(ctx, msg.provider, ppath)
    tags = tuple(
        t
        for i, m in enumerate(msg.custom_tags)
        if (t := _custom_tag(ctx, m, item(join(path, "custom_tags"), i))) is not None
    )
    if provider is None:
        return None
    return TracingConfig(
        provider=provider,
        client_sampling=_percent(msg, "client_sampling"),
        random_sampling=_percent(msg, "random_sampling"),
        overall_sampling=_percent(msg, "overall_sampling"),
        custom_tags=tags,
        max_path_tag_length=wrapped(msg, "max_path_tag_length", 256),
        verbose=msg.verbose,
    )


def _percent(msg: Any, name: str) -> float:
    return float(getattr(msg, name).value) if msg.HasField(name) else 100.0


def _provider(ctx: Ctx, msg: Any, path: str) -> TracingProvider | None:
    ctx.fields(msg, path, _PROVIDER)
    tpath = join(path, "typed_config")
    if not msg.HasField("typed_config"):
        ctx.error(tpath, f"is required (no typed_config for tracer {msg.name!r})")
        return None
    config = extensions.unpack(ctx, msg.typed_config, tpath, PROVIDERS, "as a tracer")
    if config is None:
        return None
    if config.DESCRIPTOR.full_name == ZIPKIN_TYPE:
        return _zipkin(ctx, config, tpath)
    return _otel(ctx, config, tpath)


def _zipkin(ctx: Ctx, msg: Any, path: str) -> TracingProvider | None:
    ctx.fields(msg, path, _ZIPKIN, _ZIPKIN_HINTS)
    version = msg.collector_endpoint_version
    vpath = join(path, "collector_endpoint_version")
    if version == 0:
        ctx.error(
            vpath,
            "must be set to HTTP_JSON (Envoy refuses the deprecated default "
            "DEPRECATED_AND_UNAVAILABLE_DO_NOT_USE)",
        )
    elif version != _JSON:
        name = ZipkinConfig.CollectorEndpointVersion.Name(version)
        ctx.unsupported(vpath, f"{name}: only HTTP_JSON (Zipkin v2 JSON) is implemented")
    common: dict[str, Any] = {
        "shared_span_context": wrapped(msg, "shared_span_context", True),
        "trace_id_128bit": msg.trace_id_128bit,
        "w3c": msg.trace_context_option == 1,
    }
    if msg.HasField("collector_service"):
        spath = join(path, "collector_service")
        for name in ("collector_cluster", "collector_endpoint", "collector_hostname"):
            if getattr(msg, name):
                ctx.error(join(path, name), "set either collector_service or " + name)
        service = _http_service(ctx, msg.collector_service, spath, "/api/v2/spans")
        if service is None:
            return None
        cluster, target, host, timeout, headers = service
        return TracingProvider(TracingProviderKind.ZIPKIN, cluster, target, host, timeout,
                               headers, **common)  # fmt: skip
    if not msg.collector_cluster:
        ctx.error(join(path, "collector_cluster"), "is required (or collector_service)")
        return None
    if not msg.collector_endpoint.startswith("/"):
        ctx.error(join(path, "collector_endpoint"), "is required: a path such as /api/v2/spans")
    ctx.refer_cluster(msg.collector_cluster, join(path, "collector_cluster"), "zipkin tracer")
    return TracingProvider(
        TracingProviderKind.ZIPKIN,
        msg.collector_cluster,
        msg.collector_endpoint,
        msg.collector_hostname or msg.collector_cluster,
        **common,
    )


def _otel(ctx: Ctx, msg: Any, path: str) -> TracingProvider | None:
    ctx.fields(msg, path, _OTEL, _OTEL_HINTS)
    if not msg.HasField("http_service"):
        if not msg.HasField("grpc_service"):
            ctx.error(join(path, "http_service"), "is required (OTLP over HTTP with JSON)")
        return None
    service = _http_service(ctx, msg.http_service, join(path, "http_service"), "/v1/traces")
    if service is None:
        return None
    cluster, target, host, timeout, headers = service
    return TracingProvider(
        TracingProviderKind.OPENTELEMETRY,
        cluster,
        target,
        host,
        timeout,
        headers,
        service_name=msg.service_name,
    )


def _http_service(
    ctx: Ctx, msg: Any, path: str, default_path: str
) -> tuple[str, str, str, float, tuple[tuple[str, str], ...]] | None:
    """HttpService: (cluster, request path, Host, timeout, headers)."""
    ctx.fields(msg, path, _HTTP_SERVICE)
    upath = join(path, "http_uri")
    if not msg.HasField("http_uri"):
        ctx.error(upath, "is required")
        return None
    uri = msg.http_uri
    ctx.fields(uri, upath, _HTTP_URI)
    parts = urlsplit(uri.uri)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        ctx.error(join(upath, "uri"), f"{uri.uri!r} is not an http:// URI")
        return None
    if not uri.cluster:
        ctx.error(join(upath, "cluster"), "is required")
        return None
    ctx.refer_cluster(uri.cluster, join(upath, "cluster"), "tracer http_uri")
    timeout = seconds(uri.timeout) if uri.HasField("timeout") else 0.0
    if timeout <= 0:
        ctx.error(join(upath, "timeout"), "is required and must be positive")
        timeout = 5.0
    target = (parts.path or default_path) + (f"?{parts.query}" if parts.query else "")
    headers = []
    hpath = join(path, "request_headers_to_add")
    for i, option in enumerate(msg.request_headers_to_add):
        opath = item(hpath, i)
        ctx.fields(option, opath, _HEADER_OPTION)
        ctx.fields(option.header, join(opath, "header"), _HEADER_VALUE)
        headers.append((option.header.key.lower(), option.header.value))
    return uri.cluster, target, parts.netloc, timeout, tuple(headers)


def _custom_tag(ctx: Ctx, msg: Any, path: str) -> CustomTag | None:
    ctx.fields(msg, path, _CUSTOM_TAG, _CUSTOM_TAG_HINTS)
    kind = msg.WhichOneof("type")
    if kind == "literal":
        return CustomTag(msg.tag, CustomTagKind.LITERAL, msg.literal.value)
    if kind == "request_header":
        h = msg.request_header
        return CustomTag(msg.tag, CustomTagKind.REQUEST_HEADER, h.name.lower(), h.default_value)
    if kind == "environment":
        # Envoy reads the variable once, when it loads the config.
        env = msg.environment
        value = os.environ.get(env.name, env.default_value)
        return CustomTag(msg.tag, CustomTagKind.ENVIRONMENT, value)
    return None


_DECORATOR = {"operation", "propagate"}
_ROUTE_TRACING = {"client_sampling", "random_sampling", "overall_sampling", "custom_tags"}
_ROUTE_TRACING_HINTS = {
    "operation": "span name formatters are " + _NOT_YET + "; use the route's decorator",
    "upstream_operation": "span name formatters are " + _NOT_YET,
}


def route_decorator(ctx: Ctx, route: Any, path: str) -> tuple[str, bool]:
    """Route.decorator: (operation, propagate); ("", True) without one."""
    if not route.HasField("decorator"):
        return "", True
    msg = route.decorator
    dpath = join(path, "decorator")
    ctx.fields(msg, dpath, _DECORATOR)
    return msg.operation, wrapped(msg, "propagate", True)


def route_tracing(ctx: Ctx, msg: Any, path: str) -> RouteTracing:
    """envoy.config.route.v3.Tracing (the percentages are FractionalPercent here)."""
    ctx.fields(msg, path, _ROUTE_TRACING, _ROUTE_TRACING_HINTS)
    tags = tuple(
        t
        for i, m in enumerate(msg.custom_tags)
        if (t := _custom_tag(ctx, m, item(join(path, "custom_tags"), i))) is not None
    )
    return RouteTracing(
        client_sampling=_fractional(msg, "client_sampling"),
        random_sampling=_fractional(msg, "random_sampling"),
        overall_sampling=_fractional(msg, "overall_sampling"),
        custom_tags=tags,
    )


_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}


def _fractional(msg: Any, name: str) -> float:
    """A FractionalPercent as a percentage (unset: 100)."""
    if not msg.HasField(name):
        return 100.0
    value = getattr(msg, name)
    return min(100.0, value.numerator * 100.0 / _DENOMINATORS.get(value.denominator, 100))


def with_direction(chains: tuple[FilterChain, ...], outbound: bool) -> tuple[FilterChain, ...]:
    """The listener's filter chains with their HCMs' tracing told the listener's
    traffic_direction (OUTBOUND: egress, CLIENT spans)."""
    if not outbound:
        return chains
    out = []
    for chain in chains:
        filters = tuple(
            replace(f, tracing=replace(f.tracing, egress=True))
            if isinstance(f, HttpConnectionManagerConfig) and f.tracing is not None
            else f
            for f in chain.filters
        )
        out.append(replace(chain, filters=filters) if filters != chain.filters else chain)
    return tuple(out)
