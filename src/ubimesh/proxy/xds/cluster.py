"""envoy.config.cluster.v3.Cluster, its load assignment and its HTTP protocol options."""

from __future__ import annotations

from typing import Any

from ubimesh.proxy.snapshot.circuit_breakers import CircuitBreakers
from ubimesh.proxy.snapshot.types import (
    Cluster,
    DiscoveryType,
    DnsLookupFamily,
    Endpoint,
    LbPolicy,
    LeastRequestConfig,
    Locality,
    LocalityEndpoints,
    RingHashConfig,
    TelemetryMeta,
)
from ubimesh.proxy.xds import common, dynamic, extensions, tls
from ubimesh.proxy.xds import health_check as _health_check
from ubimesh.proxy.xds import outlier as _outlier
from ubimesh.proxy.xds.circuit_breakers import circuit_breakers as _circuit_breakers
from ubimesh.proxy.xds.context import Ctx, entry, item, join, seconds, timeout, wrapped

_NOT_YET = "not implemented yet"

_CLUSTER = {
    "name",
    "type",
    "connect_timeout",
    "lb_policy",
    "ring_hash_lb_config",
    "least_request_lb_config",
    "load_assignment",
    "dns_refresh_rate",
    "dns_lookup_family",
    "per_connection_buffer_limit_bytes",
    "typed_extension_protocol_options",
    "max_requests_per_connection",
    "common_http_protocol_options",
    "eds_cluster_config",
    "transport_socket",
    "metadata",
    "circuit_breakers",
    "outlier_detection",
    "health_checks",
    "common_lb_config",
}
_CLUSTER_HINTS = {
    "respect_dns_ttl": "the resolver (getaddrinfo) reports no TTLs; use dns_refresh_rate",
    "transport_socket_matches": "transport socket matches are " + _NOT_YET + "; use "
    "transport_socket",
    "cluster_type": "custom cluster types are not implemented",
    "http_protocol_options": "put explicit_http_config.http_protocol_options in "
    "typed_extension_protocol_options' envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "http2_protocol_options": "HTTP/2 upstreams are " + _NOT_YET,
    "load_balancing_policy": "use lb_policy",
    "upstream_connection_options": "upstream socket options are " + _NOT_YET,
}
_TYPES = {
    0: DiscoveryType.STATIC,
    1: DiscoveryType.STRICT_DNS,
    2: DiscoveryType.LOGICAL_DNS,
    3: DiscoveryType.EDS,
}
_TYPE_HINTS = {4: "type ORIGINAL_DST is " + _NOT_YET}
_EDS_CLUSTER_CONFIG = {"eds_config", "service_name"}
_HTTP2_OPTIONS_HINT = (
    "HTTP/2 protocol options are " + _NOT_YET + "; only an empty http2_protocol_options is "
    "accepted, on the ADS cluster"
)
_LB_POLICIES = {
    0: LbPolicy.ROUND_ROBIN,
    1: LbPolicy.LEAST_REQUEST,
    2: LbPolicy.RING_HASH,
    3: LbPolicy.RANDOM,
}
_LB_POLICY_NAMES = {5: "MAGLEV", 6: "CLUSTER_PROVIDED", 7: "LOAD_BALANCING_POLICY_CONFIG"}

_RING_HASH = {"minimum_ring_size", "maximum_ring_size"}
_RING_HASH_HINTS = {"hash_function": "only XX_HASH is implemented"}
_LEAST_REQUEST = {"choice_count"}
_LEAST_REQUEST_HINTS = {
    "active_request_bias": "active request bias is " + _NOT_YET,
    "slow_start_config": "slow start is " + _NOT_YET,
}

_LOAD_ASSIGNMENT = {"cluster_name", "endpoints", "policy"}
_LOAD_ASSIGNMENT_HINTS = {"named_endpoints": "named endpoints are " + _NOT_YET}
_POLICY = {"overprovisioning_factor"}
_LOCALITY_LB_ENDPOINTS = {"locality", "lb_endpoints", "load_balancing_weight", "priority"}
_LOCALITY_LB_ENDPOINTS_HINTS = {"leds_cluster_locality_config": "LEDS is " + _NOT_YET}
_LOCALITY = {"region", "zone", "sub_zone"}
_LB_ENDPOINT = {"endpoint", "health_status", "load_balancing_weight"}
_LB_ENDPOINT_HINTS = {"endpoint_name": "named endpoints are " + _NOT_YET}
_ENDPOINT = {"address", "hostname"}
_ENDPOINT_HINTS = {
    "health_check_config": "per-endpoint health check settings (port, hostname, address) are "
    + _NOT_YET
    + "; health checks use the endpoint's address and the check's host",
    "additional_addresses": "additional endpoint addresses are " + _NOT_YET,
}

_UPSTREAM_HTTP_OPTIONS = {"common_http_protocol_options", "explicit_http_config"}
_UPSTREAM_HTTP_OPTIONS_HINTS = {
    "upstream_http_protocol_options": "auto SNI and SAN validation are " + _NOT_YET + "; set "
    "the UpstreamTlsContext's sni and SAN matchers",
    "use_downstream_protocol_config": "use explicit_http_config with http_protocol_options",
    "auto_config": "use explicit_http_config with http_protocol_options",
    "http_filters": "upstream HTTP filters are " + _NOT_YET,
}
_EXPLICIT_HTTP = {"http_protocol_options"}
_EXPLICIT_HTTP_HINTS = {
    "http2_protocol_options": "HTTP/2 upstreams are " + _NOT_YET + "; only the cluster that "
    "dynamic_resources.ads_config names may set it",
    "http3_protocol_options": "HTTP/3 is not implemented",
}
_HTTP1_OPTIONS_HINT = (
    "HTTP/1 protocol options are " + _NOT_YET + "; only an empty http_protocol_options is accepted"
)
_COMMON_OPTIONS = {"idle_timeout", "max_requests_per_connection"}
_COMMON_OPTIONS_HINTS = {
    "max_connection_duration": "connection durations are " + _NOT_YET,
    "max_stream_duration": "stream durations are " + _NOT_YET,
    "max_headers_count": "upstream header limits are " + _NOT_YET,
}

_STATIC_IP_ONLY = (
    "STATIC cluster endpoints must be IP addresses; use type STRICT_DNS or LOGICAL_DNS for a name"
)


def cluster(ctx: Ctx, msg: Any, path: str) -> Cluster:
    """envoy.config.cluster.v3.Cluster."""
    ctx.fields(msg, path, _CLUSTER, _CLUSTER_HINTS)
    kind = _TYPES.get(msg.type)
    if kind is None:
        ctx.unsupported(join(path, "type"), _TYPE_HINTS.get(msg.type, f"type {msg.type}"))
        kind = DiscoveryType.STATIC
    lb_policy = _LB_POLICIES.get(msg.lb_policy)
    if lb_policy is None:
        name = _LB_POLICY_NAMES.get(msg.lb_policy, str(msg.lb_policy))
        ctx.unsupported(join(path, "lb_policy"), f"lb_policy {name}")
        lb_policy = LbPolicy.ROUND_ROBIN

    ring_hash = RingHashConfig()
    if msg.HasField("ring_hash_lb_config"):
        ring_hash = _ring_hash(ctx, msg.ring_hash_lb_config, join(path, "ring_hash_lb_config"))
        if lb_policy is not LbPolicy.RING_HASH:
            ctx.error(
                join(path, "ring_hash_lb_config"),
                "needs lb_policy RING_HASH (Envoy ignores it with another policy)",
            )
    least_request = LeastRequestConfig()
    if msg.HasField("least_request_lb_config"):
        lpath = join(path, "least_request_lb_config")
        ctx.fields(msg.least_request_lb_config, lpath, _LEAST_REQUEST, _LEAST_REQUEST_HINTS)
        least_request = LeastRequestConfig(wrapped(msg.least_request_lb_config, "choice_count", 2))
        if lb_policy is not LbPolicy.LEAST_REQUEST:
            ctx.error(lpath, "needs lb_policy LEAST_REQUEST (Envoy ignores it with another policy)")

    endpoints: tuple[LocalityEndpoints, ...] = ()
    overprovisioning = 140
    if kind is DiscoveryType.EDS:
        endpoints, overprovisioning = _eds(ctx, msg, path)
    elif msg.HasField("eds_cluster_config"):
        ctx.error(join(path, "eds_cluster_config"), "needs type EDS")
    if msg.HasField("load_assignment"):
        if kind is DiscoveryType.EDS:
            ctx.error(
                join(path, "load_assignment"),
                "an EDS cluster takes its endpoints from its ClusterLoadAssignment over ADS; "
                "remove load_assignment",
            )
        else:
            endpoints, overprovisioning = _load_assignment(
                ctx, msg.load_assignment, join(path, "load_assignment"), kind
            )
    if kind is DiscoveryType.LOGICAL_DNS and (
        len(endpoints) != 1 or len(endpoints[0].endpoints) != 1
    ):
        ctx.error(
            join(path, "load_assignment"),
            "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
        )

    idle_timeout, max_requests = _protocol_options(ctx, msg, path)
    context = None
    if msg.HasField("transport_socket"):
        context = tls.transport_socket(
            ctx, msg.transport_socket, join(path, "transport_socket"), server=False
        )
    telemetry = _telemetry(ctx, msg, path) if msg.HasField("metadata") else None
    return Cluster(
        name=msg.name,
        type=kind,
        connect_timeout=seconds(msg.connect_timeout) if msg.HasField("connect_timeout") else 5.0,
        lb_policy=lb_policy,
        endpoints=endpoints,
        overprovisioning_factor=overprovisioning,
        max_requests_per_connection=max_requests,
        idle_timeout=idle_timeout,
        per_connection_buffer_limit_bytes=wrapped(
            msg, "per_connection_buffer_limit_bytes", 1024 * 1024
        ),
        dns_refresh_rate=seconds(msg.dns_refresh_rate) if msg.HasField("dns_refresh_rate") else 5.0,
        dns_lookup_family=ctx.enum(
            msg, "dns_lookup_family", path, DnsLookupFamily, DnsLookupFamily.AUTO
        ),
        ring_hash=ring_hash,
        least_request=least_request,
        transport_socket=context,
        telemetry=telemetry,
        circuit_breakers=_circuit_breakers_of(ctx, msg, path),
        outlier_detection=(
            _outlier.outlier_detection(ctx, msg.outlier_detection, join(path, "outlier_detection"))
            if msg.HasField("outlier_detection")
            else None
        ),
        health_checks=_health_check.health_checks(ctx, msg, path),
        healthy_panic_threshold=_panic_threshold(ctx, msg, path),
    )


_COMMON_LB = {"healthy_panic_threshold"}
_COMMON_LB_HINTS = {
    "ignore_new_hosts_until_first_hc": "new hosts of a health checked cluster start failed "
    "until their first check passes (Envoy's default); excluding them is " + _NOT_YET,
    "zone_aware_lb_config": "zone aware routing is " + _NOT_YET,
    "locality_weighted_lb_config": "locality weighted balancing is " + _NOT_YET,
    "update_merge_window": "host updates are applied at once (no merge window)",
    "close_connections_on_host_set_change": _NOT_YET,
    "consistent_hashing_lb_config": _NOT_YET,
    "override_host_status": "host overrides are " + _NOT_YET,
}


def _panic_threshold(ctx: Ctx, msg: Any, path: str) -> float:
    """common_lb_config.healthy_panic_threshold in percent (Envoy's default 50; 0 disables
    panic mode)."""
    if not msg.HasField("common_lb_config"):
        return 50.0
    cpath = join(path, "common_lb_config")
    ctx.fields(msg.common_lb_config, cpath, _COMMON_LB, _COMMON_LB_HINTS)
    if not msg.common_lb_config.HasField("healthy_panic_threshold"):
        return 50.0
    ppath = join(cpath, "healthy_panic_threshold")
    ctx.fields(msg.common_lb_config.healthy_panic_threshold, ppath, {"value"})
    # Envoy's own constraint (0 to 100) is checked by ctx.fields.
    return float(msg.common_lb_config.healthy_panic_threshold.value)


def _circuit_breakers_of(ctx: Ctx, msg: Any, path: str) -> CircuitBreakers:
    """Cluster.circuit_breakers (``xds/circuit_breakers.py``); Envoy's defaults when unset."""
    if not msg.HasField("circuit_breakers"):
        return CircuitBreakers()
    return _circuit_breakers(ctx, msg.circuit_breakers, join(path, "circuit_breakers"))


def _telemetry(ctx: Ctx, msg: Any, path: str) -> TelemetryMeta | None:
    """Cluster.metadata: other namespaces are accepted and ignored, as Envoy does (it only
    reads them for subset load balancing and such, which ubimesh refuses); ubimesh's own
    ``ubimesh.telemetry`` describes the destination in mesh metrics."""
    from ubimesh.proxy.xds.listener import TELEMETRY_METADATA, telemetry_metadata

    mpath = join(path, "metadata")
    ctx.fields(msg.metadata, mpath, {"filter_metadata"}, {"typed_filter_metadata": "use "
               "filter_metadata"})  # fmt: skip
    meta = msg.metadata.filter_metadata
    if TELEMETRY_METADATA not in meta:
        return None
    npath = entry(join(mpath, "filter_metadata"), TELEMETRY_METADATA)
    return telemetry_metadata(ctx, meta[TELEMETRY_METADATA], npath, listener=False)


def eds_name(msg: Any) -> str:
    """The name of the ClusterLoadAssignment an EDS cluster waits for: its
    ``eds_cluster_config.service_name``, or else the cluster's name."""
    name: str = msg.eds_cluster_config.service_name or msg.name
    return name


def _eds(ctx: Ctx, msg: Any, path: str) -> tuple[tuple[LocalityEndpoints, ...], int]:
    """A cluster of type EDS: its endpoints come from the ClusterLoadAssignment the ADS stream
    delivered (none yet when a bootstrap is translated alone)."""
    epath = join(path, "eds_cluster_config")
    if ctx.ads_cluster is None:
        ctx.unsupported(
            join(path, "type"),
            "type EDS without dynamic_resources.ads_config; ubimesh takes EDS over ADS only",
        )
        if msg.HasField("eds_cluster_config"):
            ctx.unsupported(epath, "EDS needs the ADS stream of dynamic_resources.ads_config")
        return (), 140
    if not msg.HasField("eds_cluster_config"):
        ctx.error(epath, "is required with type EDS: {eds_config: {ads: {}}}")
        return (), 140
    config = msg.eds_cluster_config
    ctx.fields(config, epath, _EDS_CLUSTER_CONFIG)
    cpath = join(epath, "eds_config")
    if config.HasField("eds_config"):
        dynamic.config_source(ctx, config.eds_config, cpath)
    else:
        ctx.error(cpath, "is required: {ads: {}, resource_api_version: V3}")
    if ctx.dynamic is None:
        return (), 140
    name = eds_name(msg)
    found = ctx.dynamic.of(dynamic.ENDPOINT_TYPE).get(name)
    if found is None:
        ctx.error(epath, f"ClusterLoadAssignment {name!r} has not been received over ADS")
        return (), 140
    lpath = dynamic.resource_path(dynamic.ENDPOINT_TYPE, name)
    return _load_assignment(ctx, found, lpath, DiscoveryType.EDS)


def _ring_hash(ctx: Ctx, msg: Any, path: str) -> RingHashConfig:
    ctx.fields(msg, path, _RING_HASH, _RING_HASH_HINTS)
    minimum = wrapped(msg, "minimum_ring_size", 1024)
    maximum = wrapped(msg, "maximum_ring_size", 8 * 1024 * 1024)
    if minimum > maximum:
        ctx.error(path, f"minimum_ring_size ({minimum}) > maximum_ring_size ({maximum})")
    return RingHashConfig(minimum, maximum)


def _load_assignment(
    ctx: Ctx, msg: Any, path: str, kind: DiscoveryType
) -> tuple[tuple[LocalityEndpoints, ...], int]:
    """envoy.config.endpoint.v3.ClusterLoadAssignment: (localities, overprovisioning factor)."""
    ctx.fields(msg, path, _LOAD_ASSIGNMENT, _LOAD_ASSIGNMENT_HINTS)
    overprovisioning = 140
    if msg.HasField("policy"):
        ppath = join(path, "policy")
        ctx.fields(msg.policy, ppath, _POLICY)
        overprovisioning = wrapped(msg.policy, "overprovisioning_factor", 140)
    ip_only = ""
    if kind is DiscoveryType.STATIC:
        ip_only = _STATIC_IP_ONLY
    elif kind is DiscoveryType.EDS:
        ip_only = "EDS endpoints must be IP addresses"
    out = []
    endpoints_path = join(path, "endpoints")
    for i, lle in enumerate(msg.endpoints):
        lpath = item(endpoints_path, i)
        ctx.fields(lle, lpath, _LOCALITY_LB_ENDPOINTS, _LOCALITY_LB_ENDPOINTS_HINTS)
        locality = Locality()
        if lle.HasField("locality"):
            ctx.fields(lle.locality, join(lpath, "locality"), _LOCALITY)
            locality = Locality(lle.locality.region, lle.locality.zone, lle.locality.sub_zone)
        hosts = []
        hosts_path = join(lpath, "lb_endpoints")
        for j, lbe in enumerate(lle.lb_endpoints):
            hpath = item(hosts_path, j)
            ctx.fields(lbe, hpath, _LB_ENDPOINT, _LB_ENDPOINT_HINTS)
            epath = join(hpath, "endpoint")
            if not lbe.HasField("endpoint"):
                ctx.error(epath, "is required")
                continue
            endpoint = lbe.endpoint
            ctx.fields(endpoint, epath, _ENDPOINT, _ENDPOINT_HINTS)
            if not endpoint.HasField("address"):
                ctx.error(join(epath, "address"), "is required")
                continue
            address = common.socket_address(
                ctx, endpoint.address, join(epath, "address"), ip_only=ip_only
            )
            hosts.append(
                Endpoint(
                    address=address,
                    weight=wrapped(lbe, "load_balancing_weight", 1),
                    hostname=endpoint.hostname,
                    health_status=lbe.health_status,
                )
            )
        out.append(
            LocalityEndpoints(
                locality=locality,
                endpoints=tuple(hosts),
                priority=lle.priority,
                load_balancing_weight=wrapped(lle, "load_balancing_weight", None),
            )
        )
    return tuple(out), overprovisioning


def _protocol_options(ctx: Ctx, msg: Any, path: str) -> tuple[float | None, int | None]:
    """The upstream idle timeout and max requests per connection, from the typed
    HttpProtocolOptions or the deprecated cluster fields (not both)."""
    common_opts = None
    common_path = ""
    options_path = join(path, "typed_extension_protocol_options")
    for key in sorted(msg.typed_extension_protocol_options):
        kpath = entry(options_path, key)
        packed = msg.typed_extension_protocol_options[key]
        if key != extensions.UPSTREAM_HTTP_OPTIONS_TYPE:
            ctx.unsupported(
                kpath,
                f"protocol options for {key}; only {extensions.UPSTREAM_HTTP_OPTIONS_TYPE} is",
            )
            continue
        options = extensions.unpack(
            ctx, packed, kpath, extensions.CLUSTER_PROTOCOL_OPTIONS, f"under the key {key}"
        )
        if options is None:
            continue
        ctx.fields(options, kpath, _UPSTREAM_HTTP_OPTIONS, _UPSTREAM_HTTP_OPTIONS_HINTS)
        if options.HasField("explicit_http_config"):
            xpath = join(kpath, "explicit_http_config")
            explicit = options.explicit_http_config
            supported = _EXPLICIT_HTTP
            if (
                explicit.HasField("http2_protocol_options")
                and ctx.ads_cluster
                and msg.name == ctx.ads_cluster
            ):
                # The ADS cluster carries the gRPC stream of the ADS client, which speaks
                # HTTP/2 itself; translate.py refuses it again if traffic is routed to it.
                h2path = join(xpath, "http2_protocol_options")
                ctx.fields(
                    explicit.http2_protocol_options, h2path, (), default_hint=_HTTP2_OPTIONS_HINT
                )
                ctx.http2_clusters[msg.name] = h2path
                supported = _EXPLICIT_HTTP | {"http2_protocol_options"}
            ctx.fields(explicit, xpath, supported, _EXPLICIT_HTTP_HINTS)
            if explicit.HasField("http_protocol_options"):
                ctx.fields(
                    explicit.http_protocol_options,
                    join(xpath, "http_protocol_options"),
                    (),
                    default_hint=_HTTP1_OPTIONS_HINT,
                )
        if options.HasField("common_http_protocol_options"):
            common_opts = options.common_http_protocol_options
            common_path = join(kpath, "common_http_protocol_options")

    if msg.HasField("common_http_protocol_options"):
        legacy_path = join(path, "common_http_protocol_options")
        if common_opts is not None:
            ctx.error(
                legacy_path,
                "set common_http_protocol_options in one place: in the typed "
                "HttpProtocolOptions (this cluster field is deprecated)",
            )
        else:
            common_opts, common_path = msg.common_http_protocol_options, legacy_path

    idle_timeout: float | None = 3600.0
    max_requests = None
    if common_opts is not None:
        ctx.fields(common_opts, common_path, _COMMON_OPTIONS, _COMMON_OPTIONS_HINTS)
        idle_timeout = timeout(common_opts, "idle_timeout", 3600.0)
        max_requests = wrapped(common_opts, "max_requests_per_connection", None)
    if msg.HasField("max_requests_per_connection"):
        if max_requests is not None:
            ctx.error(
                join(path, "max_requests_per_connection"),
                "only one of "
                "max_requests_per_connection from Cluster or HttpProtocolOptions can be "
                "specified",
            )
        max_requests = msg.max_requests_per_connection.value
    return idle_timeout, (max_requests or None)
