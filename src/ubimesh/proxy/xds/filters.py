"""Network filters (HTTP connection manager, TCP proxy, RBAC) and HTTP filters (RBAC, router)."""

from __future__ import annotations

from typing import Any

from ubimesh.proxy.snapshot.types import (
    ClientCertDetail,
    ForwardClientCertDetails,
    HeadersWithUnderscoresAction,
    HttpConnectionManagerConfig,
    HttpFilterConfig,
    NetworkFilterConfig,
    PathWithEscapedSlashesAction,
    RouteConfiguration,
    RouterConfig,
    TcpProxyConfig,
    WeightedClusterEntry,
)
from ubimesh.proxy.xds import dynamic, extensions, rbac
from ubimesh.proxy.xds import tracing as xds_tracing
from ubimesh.proxy.xds.access_log import access_logs
from ubimesh.proxy.xds.context import Ctx, item, join, timeout, wrapped
from ubimesh.proxy.xds.fault import http_fault
from ubimesh.proxy.xds.local_ratelimit import local_ratelimit
from ubimesh.proxy.xds.route import route_configuration

_NOT_YET = "not implemented yet"

# ---------------------------------------------------------------------------------------------
# Network filters

_FILTER = {"name", "typed_config"}
_FILTER_HINTS = {"config_discovery": "filter config discovery (ECDS) is " + _NOT_YET}


def network_filters(ctx: Ctx, filters: Any, path: str) -> tuple[NetworkFilterConfig, ...]:
    """A filter chain's ``filters``: RBAC filters (``envoy.filters.network.rbac``, any number),
    then exactly one terminal filter (HttpConnectionManager or TcpProxy), last."""
    if not filters:
        ctx.error(
            path,
            "a filter chain needs a terminal network filter (HttpConnectionManager or "
            "TcpProxy); Envoy would accept an empty chain and close every connection",
        )
        return ()
    out: list[NetworkFilterConfig] = []
    last = len(filters) - 1
    for i, flt in enumerate(filters):
        fpath = item(path, i)
        ctx.fields(flt, fpath, _FILTER, _FILTER_HINTS)
        tpath = join(fpath, "typed_config")
        if not flt.HasField("typed_config"):
            ctx.error(tpath, f"is required (no typed_config for filter {flt.name!r})")
            continue
        config = extensions.unpack(
            ctx, flt.typed_config, tpath, extensions.NETWORK_FILTERS, "as a network filter"
        )
        if config is None:
            continue
        type_name = config.DESCRIPTOR.full_name
        terminal = type_name in extensions.TERMINAL_NETWORK_FILTERS
        if terminal and i != last:
            ctx.error(
                fpath,
                f"terminal filter {flt.name!r} ({type_name}) must "
                "be the last filter in a network filter chain",
            )
        elif not terminal and i == last:
            ctx.error(
                fpath,
                f"non-terminal filter {flt.name!r} ({type_name}) is the last filter in a "
                "network filter chain; end it with HttpConnectionManager or TcpProxy",
            )
        if type_name == extensions.HCM_TYPE:
            out.append(http_connection_manager(ctx, config, tpath))
        elif type_name == extensions.NETWORK_RBAC_TYPE:
            out.append(rbac.network_rbac(ctx, config, tpath))
        else:
            out.append(tcp_proxy(ctx, config, tpath))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# HTTP connection manager

_HCM = {
    "codec_type",
    "stat_prefix",
    "route_config",
    "http_filters",
    "generate_request_id",
    "preserve_external_request_id",
    "use_remote_address",
    "xff_num_trusted_hops",
    "skip_xff_append",
    "server_name",
    "server_header_transformation",
    "common_http_protocol_options",
    "max_request_headers_kb",
    "request_timeout",
    "request_headers_timeout",
    "stream_idle_timeout",
    "drain_timeout",
    "upgrade_configs",
    "normalize_path",
    "merge_slashes",
    "path_with_escaped_slashes_action",
    "forward_client_cert_details",
    "set_current_client_cert_details",
    "http_protocol_options",
    "internal_address_config",
    "strip_any_host_port",
    "access_log",
    "tracing",
}
#: With an ADS stream (dynamic_resources.ads_config), the route configuration may also come
#: over RDS; without one, rds is refused.
_HCM_WITH_ADS = _HCM | {"rds"}
_HCM_HINTS = {
    "rds": "RDS without dynamic_resources.ads_config; ubimesh takes RDS over ADS only, or put "
    "the RouteConfiguration inline in route_config",
    "scoped_routes": "scoped routes are " + _NOT_YET + "; use route_config",
    "http2_protocol_options": "HTTP/2 is " + _NOT_YET,
    "http3_protocol_options": "HTTP/3 is not implemented",
    "delayed_close_timeout": "the delayed close timeout is " + _NOT_YET,
    "request_id_extension": "the UUID request ID is the only one implemented",
}
_HCM_COMMON_OPTIONS = {"idle_timeout", "max_headers_count", "headers_with_underscores_action"}
_HCM_COMMON_OPTIONS_HINTS = {
    "max_connection_duration": "connection durations are " + _NOT_YET,
    "max_stream_duration": "stream durations are " + _NOT_YET,
    "max_requests_per_connection": "limiting downstream requests per connection is " + _NOT_YET,
}
_HTTP1_OPTIONS_HINT = (
    "HTTP/1 protocol options are " + _NOT_YET + "; only an empty http_protocol_options is accepted"
)
_HCM_UPGRADE = {"upgrade_type", "enabled"}
_HCM_UPGRADE_HINTS = {"filters": "upgrade-specific filter chains are " + _NOT_YET}
_INTERNAL_ADDRESS = {"unix_sockets"}
_INTERNAL_ADDRESS_HINTS = {"cidr_ranges": "internal CIDR ranges are " + _NOT_YET}

_CODECS = {0: "AUTO", 1: "HTTP1"}
_CODEC_NAMES = {2: "HTTP2", 3: "HTTP3"}
_SERVER_HEADER = {0: "OVERWRITE", 1: "APPEND_IF_ABSENT", 2: "PASS_THROUGH"}


def http_connection_manager(ctx: Ctx, msg: Any, path: str) -> HttpConnectionManagerConfig:
    """envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager."""
    ctx.fields(msg, path, _HCM if ctx.ads_cluster is None else _HCM_WITH_ADS, _HCM_HINTS)
    codec = _CODECS.get(msg.codec_type)
    if codec is None:
        name = _CODEC_NAMES.get(msg.codec_type, str(msg.codec_type))
        ctx.unsupported(join(path, "codec_type"), f"codec_type {name}; use AUTO or HTTP1")
        codec = "AUTO"

    if msg.HasField("route_config"):
        route_config = route_configuration(ctx, msg.route_config, join(path, "route_config"))
    elif msg.HasField("rds"):
        route_config = rds(ctx, msg.rds, join(path, "rds"))
    else:
        route_config = RouteConfiguration("", ())

    idle_timeout: float | None = 3600.0
    max_headers_count = 100
    underscores = HeadersWithUnderscoresAction.ALLOW
    if msg.HasField("common_http_protocol_options"):
        opts = msg.common_http_protocol_options
        opath = join(path, "common_http_protocol_options")
        ctx.fields(opts, opath, _HCM_COMMON_OPTIONS, _HCM_COMMON_OPTIONS_HINTS)
        idle_timeout = timeout(opts, "idle_timeout", 3600.0)
        max_headers_count = wrapped(opts, "max_headers_count", 100)
        underscores = ctx.enum(
            opts,
            "headers_with_underscores_action",
            opath,
            HeadersWithUnderscoresAction,
            HeadersWithUnderscoresAction.ALLOW,
        )

    if msg.HasField("http_protocol_options"):
        hpath = join(path, "http_protocol_options")
        ctx.fields(msg.http_protocol_options, hpath, (), default_hint=_HTTP1_OPTIONS_HINT)

    unix_sockets = False
    if msg.HasField("internal_address_config"):
        ipath = join(path, "internal_address_config")
        ctx.fields(msg.internal_address_config, ipath, _INTERNAL_ADDRESS, _INTERNAL_ADDRESS_HINTS)
        unix_sockets = msg.internal_address_config.unix_sockets

    # IMPLEMENTATION_SPECIFIC_DEFAULT (0) is KEEP_UNCHANGED in Envoy.
    escaped = PathWithEscapedSlashesAction.KEEP_UNCHANGED
    if msg.path_with_escaped_slashes_action != 0:
        escaped = ctx.enum(
            msg, "path_with_escaped_slashes_action", path, PathWithEscapedSlashesAction, escaped
        )
    drain = timeout(msg, "drain_timeout", 5.0)
    return HttpConnectionManagerConfig(
        stat_prefix=msg.stat_prefix,
        route_config=route_config,
        http_filters=http_filters(ctx, msg.http_filters, join(path, "http_filters")),
        generate_request_id=wrapped(msg, "generate_request_id", True),
        preserve_external_request_id=msg.preserve_external_request_id,
        use_remote_address=wrapped(msg, "use_remote_address", False),
        xff_num_trusted_hops=msg.xff_num_trusted_hops,
        skip_xff_append=msg.skip_xff_append,
        server_name=msg.server_name or "envoy",
        server_header_transformation=_SERVER_HEADER.get(
            msg.server_header_transformation, "OVERWRITE"
        ),
        idle_timeout=idle_timeout,
        max_headers_count=max_headers_count,
        headers_with_underscores_action=underscores,
        max_request_headers_kb=wrapped(msg, "max_request_headers_kb", 60),
        request_timeout=timeout(msg, "request_timeout", None),
        request_headers_timeout=timeout(msg, "request_headers_timeout", None),
        stream_idle_timeout=timeout(msg, "stream_idle_timeout", 300.0),
        drain_timeout=drain if drain is not None else 0.0,
        upgrade_types=hcm_upgrades(ctx, msg.upgrade_configs, join(path, "upgrade_configs")),
        normalize_path=wrapped(msg, "normalize_path", False),
        merge_slashes=msg.merge_slashes,
        path_with_escaped_slashes_action=escaped,
        forward_client_cert_details=ctx.enum(
            msg,
            "forward_client_cert_details",
            path,
            ForwardClientCertDetails,
            ForwardClientCertDetails.SANITIZE,
        ),
        set_current_client_cert_details=_cert_details(
            ctx, msg, join(path, "set_current_client_cert_details")
        ),
        internal_address_config_unix_sockets=unix_sockets,
        strip_any_host_port=msg.strip_any_host_port,
        codec_type=codec,
        access_log=access_logs(ctx, msg.access_log, join(path, "access_log")),
        tracing=(
            xds_tracing.hcm_tracing(ctx, msg.tracing, join(path, "tracing"))
            if msg.HasField("tracing")
            else None
        ),
    )


_CERT_DETAILS = {"subject", "uri", "dns"}
_CERT_DETAILS_HINTS = {
    "cert": "forwarding the client certificate's PEM is " + _NOT_YET + "; Hash, Subject, URI "
    "and DNS are",
    "chain": "forwarding the client certificate chain's PEM is " + _NOT_YET + "; Hash, "
    "Subject, URI and DNS are",
}


def _cert_details(ctx: Ctx, msg: Any, path: str) -> tuple[ClientCertDetail, ...]:
    """HttpConnectionManager.SetCurrentClientCertDetails, as the ordered details Envoy emits
    after By and Hash (Subject, URI, DNS; Cert and Chain come first in Envoy, refused here)."""
    if not msg.HasField("set_current_client_cert_details"):
        return ()
    details = msg.set_current_client_cert_details
    ctx.fields(details, path, _CERT_DETAILS, _CERT_DETAILS_HINTS)
    out = []
    if wrapped(details, "subject", False):
        out.append(ClientCertDetail.SUBJECT)
    if details.uri:
        out.append(ClientCertDetail.URI)
    if details.dns:
        out.append(ClientCertDetail.DNS)
    return tuple(out)


_RDS = {"config_source", "route_config_name"}


def rds(ctx: Ctx, msg: Any, path: str) -> RouteConfiguration:
    """HttpConnectionManager.rds: the RouteConfiguration named ``route_config_name``, from the
    resources the ADS stream delivered (``ctx.dynamic``). Translating a bootstrap alone (no
    stream yet) checks the reference and gives an empty route configuration."""
    ctx.fields(msg, path, _RDS)
    cpath = join(path, "config_source")
    if msg.HasField("config_source"):
        dynamic.config_source(ctx, msg.config_source, cpath)
    else:
        ctx.error(cpath, "is required: {ads: {}, resource_api_version: V3}")
    name = msg.route_config_name
    npath = join(path, "route_config_name")
    if not name:
        ctx.error(npath, "is required")
        return RouteConfiguration("", ())
    if ctx.dynamic is None:
        return RouteConfiguration(name, ())
    cached = ctx.route_cache.get(name)
    if cached is not None:
        assert isinstance(cached, RouteConfiguration)
        return cached
    found = ctx.dynamic.of(dynamic.ROUTE_TYPE).get(name)
    if found is None:
        ctx.error(npath, f"RouteConfiguration {name!r} has not been received over ADS")
        return RouteConfiguration(name, ())
    rpath = dynamic.resource_path(dynamic.ROUTE_TYPE, name)
    translated = route_configuration(ctx, found, rpath, dynamic=True)
    ctx.route_cache[name] = translated
    return translated


def hcm_upgrades(ctx: Ctx, configs: Any, path: str) -> frozenset[str]:
    """HttpConnectionManager.upgrade_configs: the enabled upgrade types (only websocket)."""
    enabled: set[str] = set()
    seen: set[str] = set()
    for i, config in enumerate(configs):
        upath = item(path, i)
        ctx.fields(config, upath, _HCM_UPGRADE, _HCM_UPGRADE_HINTS)
        kind = config.upgrade_type.lower()
        if kind in seen:
            ctx.error(
                join(upath, "upgrade_type"),
                f"multiple upgrade configs with the same name: {config.upgrade_type!r}",
            )
        seen.add(kind)
        if kind != "websocket":
            if kind:
                ctx.unsupported(
                    join(upath, "upgrade_type"),
                    f"upgrade type {config.upgrade_type!r}; only websocket is",
                )
            continue
        if wrapped(config, "enabled", True):
            enabled.add(kind)
    return frozenset(enabled)


# ---------------------------------------------------------------------------------------------
# HTTP filters

_HTTP_FILTER = {"name", "typed_config"}
_HTTP_FILTER_HINTS = {
    "config_discovery": "filter config discovery (ECDS) is " + _NOT_YET,
    "is_optional": "every configured filter must be one ubimesh implements",
    "disabled": "disabling filters per route is " + _NOT_YET,
}
_ROUTER = {"dynamic_stats", "suppress_envoy_headers"}
_ROUTER_HINTS = {
    "upstream_log": "upstream access logs are " + _NOT_YET,
    "start_child_span": "upstream child spans are " + _NOT_YET + "; the HCM's span covers "
    "the upstream request",
    "upstream_http_filters": "upstream HTTP filters are " + _NOT_YET,
}


def http_filters(ctx: Ctx, filters: Any, path: str) -> tuple[HttpFilterConfig, ...]:
    """HttpConnectionManager.http_filters: RBAC, fault and local rate limit filters in their
    order, then the router, which must be last."""
    if not filters:
        ctx.error(
            path,
            "the HTTP filter chain must end with the router filter "
            f"({extensions.ROUTER_TYPE}); Envoy would accept an empty list and answer no "
            "request",
        )
        return ()
    out: list[HttpFilterConfig] = []
    last = len(filters) - 1
    for i, flt in enumerate(filters):
        fpath = item(path, i)
        ctx.fields(flt, fpath, _HTTP_FILTER, _HTTP_FILTER_HINTS)
        tpath = join(fpath, "typed_config")
        if not flt.HasField("typed_config"):
            ctx.error(tpath, f"is required (no typed_config for filter {flt.name!r})")
            continue
        config = extensions.unpack(
            ctx, flt.typed_config, tpath, extensions.HTTP_FILTERS, "as an HTTP filter"
        )
        if config is None:
            continue
        type_name = config.DESCRIPTOR.full_name
        if type_name == extensions.ROUTER_TYPE:
            if i != last:
                ctx.error(
                    fpath,
                    f"terminal filter {flt.name!r} ({type_name}) must be the last "
                    "filter in an HTTP filter chain",
                )
            ctx.fields(config, tpath, _ROUTER, _ROUTER_HINTS)
            compiled = RouterConfig(
                dynamic_stats=wrapped(config, "dynamic_stats", True),
                suppress_envoy_headers=config.suppress_envoy_headers,
            )
            out.append(HttpFilterConfig(flt.name, type_name, compiled))
        else:
            if i == last:
                ctx.error(
                    fpath,
                    f"non-terminal filter {flt.name!r} ({type_name}) is the last filter in an "
                    f"HTTP filter chain; end it with the router ({extensions.ROUTER_TYPE})",
                )
            compiled_filter: object
            if type_name == extensions.HTTP_FAULT_TYPE:
                compiled_filter = http_fault(ctx, config, tpath)
            elif type_name == extensions.LOCAL_RATELIMIT_TYPE:
                compiled_filter = local_ratelimit(ctx, config, tpath)
            else:
                compiled_filter = rbac.http_rbac(ctx, config, tpath)
            out.append(HttpFilterConfig(flt.name, type_name, compiled_filter))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# TCP proxy

_TCP_PROXY = {
    "stat_prefix",
    "cluster",
    "weighted_clusters",
    "idle_timeout",
    "max_connect_attempts",
    "access_log",
}
_TCP_PROXY_HINTS = {
    "tunneling_config": "tunneling is " + _NOT_YET,
    "hash_policy": "hashing in the TCP proxy is " + _NOT_YET,
}
_TCP_WEIGHTED = {"clusters"}
_TCP_CLUSTER_WEIGHT = {"name", "weight"}


def tcp_proxy(ctx: Ctx, msg: Any, path: str) -> TcpProxyConfig:
    """envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy."""
    ctx.fields(msg, path, _TCP_PROXY, _TCP_PROXY_HINTS)
    entries: list[WeightedClusterEntry] = []
    if msg.WhichOneof("cluster_specifier") == "cluster":
        if not msg.cluster:
            ctx.error(join(path, "cluster"), "must not be empty")
        ctx.refer_cluster(msg.cluster, join(path, "cluster"), "tcp_proxy")
    elif msg.WhichOneof("cluster_specifier") == "weighted_clusters":
        wpath = join(path, "weighted_clusters")
        ctx.fields(msg.weighted_clusters, wpath, _TCP_WEIGHTED)
        cpath = join(wpath, "clusters")
        for i, cw in enumerate(msg.weighted_clusters.clusters):
            epath = item(cpath, i)
            ctx.fields(cw, epath, _TCP_CLUSTER_WEIGHT)
            ctx.refer_cluster(cw.name, join(epath, "name"), "tcp_proxy weighted cluster")
            entries.append(WeightedClusterEntry(cw.name, cw.weight))
    return TcpProxyConfig(
        stat_prefix=msg.stat_prefix,
        cluster=msg.cluster,
        weighted_clusters=tuple(entries),
        total_weight=sum(e.weight for e in entries),
        idle_timeout=timeout(msg, "idle_timeout", 3600.0),
        max_connect_attempts=wrapped(msg, "max_connect_attempts", 1),
        access_log=access_logs(ctx, msg.access_log, join(path, "access_log")),
    )
