"""``HcmRuntime``: one HTTP connection manager's compiled configuration and stats handles.

Built once per filter chain per snapshot (never per request). It holds what the codec and the
router consult on every request: limits, the compiled route table, the stats objects, and the
request and response header rules that Envoy's connection manager applies
(x-forwarded-for, x-forwarded-proto, x-request-id, internal-header sanitizing, server, date).
"""

from __future__ import annotations

import ipaddress
import random
from typing import TYPE_CHECKING

from ubimesh.proto import path as pathnorm
from ubimesh.proto.headers import Headers
from ubimesh.proxy.http.router import route_request
from ubimesh.proxy.routing.formatter import FormatContext
from ubimesh.proxy.routing.hashing import compute_hash
from ubimesh.proxy.routing.redirect import redirect_location, rewrite_authority, rewrite_path
from ubimesh.proxy.routing.table import RouteTable
from ubimesh.proxy.routing.weighted import pick_weighted
from ubimesh.proxy.snapshot.types import (
    HttpConnectionManagerConfig,
    Route,
    RouteAction,
    VirtualHost,
    WeightedClusterEntry,
)
from ubimesh.proxy.upstream.host import Host
from ubimesh.telemetry.stats import Counter, Store

if TYPE_CHECKING:
    from ubimesh.proxy.network.http_manager import ActiveStream, HttpConnection
    from ubimesh.proxy.upstream.cluster_manager import ClusterManager

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade",
     "trailer", "expect"}
)  # fmt: skip
_INTERNAL = frozenset(
    {
        "x-envoy-decorator-operation", "x-envoy-downstream-service-cluster",
        "x-envoy-downstream-service-node", "x-envoy-expected-rq-timeout-ms",
        "x-envoy-external-address", "x-envoy-force-trace", "x-envoy-hedge-on-per-try-timeout",
        "x-envoy-internal", "x-envoy-ip-tags", "x-envoy-max-retries", "x-envoy-original-path",
        "x-envoy-retriable-header-names", "x-envoy-retriable-status-codes",
        "x-envoy-retry-grpc-on", "x-envoy-retry-on", "x-envoy-upstream-alt-stat-name",
        "x-envoy-upstream-rq-per-try-timeout-ms", "x-envoy-upstream-rq-timeout-alt-response",
        "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-stream-duration-ms",
    }
)  # fmt: skip


LocalReply = tuple[int, bytes, str, list[tuple[str, str]] | None]
_BAD_REQUEST: LocalReply = (400, b"", "DPE", None)


def is_internal_address(ip: str) -> bool:
    """Envoy's default internal-address rule: RFC 1918, loopback, link-local and ULA."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return bool(addr.is_private or addr.is_loopback)


class ClusterStats:
    """The per-cluster request counters the router bumps."""

    __slots__ = (
        "by_class",
        "by_code",
        "no_healthy",
        "prefix",
        "rq_reset",
        "rq_timeout",
        "rq_total",
        "store",
    )  # fmt: skip

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.prefix = p = f"cluster.{name}."
        self.rq_total = store.counter(p + "upstream_rq_total")
        self.rq_timeout = store.counter(p + "upstream_rq_timeout")
        self.rq_reset = store.counter(p + "upstream_rq_pending_failure_eject")
        self.no_healthy = store.counter(p + "upstream_cx_none_healthy")
        self.by_class = [store.counter(f"{p}upstream_rq_{c}xx") for c in range(6)]
        self.by_code: dict[int, Counter] = {}

    def count(self, status: int) -> None:
        self.by_class[min(status // 100, 5)].value += 1
        c = self.by_code.get(status)
        if c is None:
            c = self.by_code[status] = self.store.counter(f"{self.prefix}upstream_rq_{status}")
        c.value += 1


class HcmRuntime:
    """What every request on connections of one HCM filter chain shares."""

    def __init__(
        self,
        config: HttpConnectionManagerConfig,
        clusters: ClusterManager,
        stats: Store,
        node_cluster: str = "",
    ) -> None:
        self.config = config
        self.clusters = clusters
        self.stats = stats
        self.table = RouteTable(config.route_config)
        self.route_config = config.route_config
        self.connections: set[HttpConnection] = set()
        self.router_factory = route_request
        self.max_header_bytes = config.max_request_headers_kb * 1024
        self.max_headers_count = config.max_headers_count
        self.underscores_action = config.headers_with_underscores_action
        self.request_headers_timeout = config.request_headers_timeout
        self.idle_timeout = config.idle_timeout
        self.max_pipelined = 32
        transformation = config.server_header_transformation
        self.server_header: str | None = (
            None if transformation == "PASS_THROUGH" else config.server_name or "envoy"
        )
        self.server_overwrite = transformation == "OVERWRITE"
        self.cluster_not_found_code = 503
        self.normalize = (
            config.normalize_path
            or config.merge_slashes
            or config.path_with_escaped_slashes_action.value != 1
        )
        self._cluster_stats: dict[str, ClusterStats] = {}
        p = f"http.{config.stat_prefix}."
        self.rq_total = stats.counter(p + "downstream_rq_total")
        self.rq_active = stats.gauge(p + "downstream_rq_active")
        self.cx_total = stats.counter(p + "downstream_cx_total")
        self.cx_active = stats.gauge(p + "downstream_cx_active")
        self.cx_idle_timeout = stats.counter(p + "downstream_cx_idle_timeout")
        self.rq_no_route = stats.counter(p + "no_route")
        self.rq_no_cluster = stats.counter(p + "no_cluster")
        self.rx_codec_error = stats.counter(p + "downstream_cx_protocol_error")
        self.rx_request_timeout = stats.counter(p + "downstream_rq_header_timeout")
        self.mirror_stats = stats.counter(p + "rq_mirrored")
        self.dropped_headers_with_underscores = stats.counter(
            p + "dropped_headers_with_underscores"
        )
        self.requests_rejected_with_underscores = stats.counter(
            p + "requests_rejected_with_underscores_in_headers"
        )
        self.by_class = [stats.counter(f"{p}downstream_rq_{c}xx") for c in range(6)]
        self.rq_time = stats.histogram(p + "downstream_rq_time")

    # -- stats ----------------------------------------------------------------------------------

    def count_status(self, status: int) -> None:
        self.by_class[min(status // 100, 5)].value += 1

    def cluster_stats(self, name: str) -> ClusterStats:
        cs = self._cluster_stats.get(name)
        if cs is None:
            cs = self._cluster_stats[name] = ClusterStats(self.stats, name)
        return cs

    def observe(self, stream: ActiveStream) -> None:
        """Per-request bookkeeping once a stream ends (access logs hook in here later)."""

    # -- request rules ------------------------------------------------------------------------

    def prepare_request(self, stream: ActiveStream, conn: HttpConnection) -> LocalReply | None:
        """Apply the HCM's request rules in Envoy's order. Returns a local reply when the
        request must be answered by the proxy (refused, or redirected to a normalized path)."""
        config = self.config
        headers = stream.headers
        items = headers.items
        target = stream.target
        # Authority: absolute-form request targets carry it (RFC 9112 section 3.2.2).
        if target[:1] != "/":
            if target == "*" and stream.method == "OPTIONS":
                return _BAD_REQUEST
            scheme_end = target.find("://")
            if scheme_end <= 0:
                return _BAD_REQUEST
            rest = target[scheme_end + 3 :]
            slash = rest.find("/")
            authority = rest if slash < 0 else rest[:slash]
            target = "/" if slash < 0 else rest[slash:]
            headers.set("host", authority)
        host = None
        host_count = 0
        strip = False
        for k, v in items:
            if k == "host":
                host = v
                host_count += 1
            elif k in _HOP_BY_HOP or (k in _INTERNAL):
                strip = True
        if host_count > 1:
            return _BAD_REQUEST
        if host is None:
            if not stream.http10:
                return _BAD_REQUEST
            host = ""
        stream.host_header = host
        # Path normalization happens before routing so that what the route (and, later,
        # authorization) sees is byte for byte what is forwarded.
        if self.normalize:
            result = pathnorm.normalize_request_path(
                target,
                normalize=config.normalize_path,
                merge_slashes=config.merge_slashes,
                escaped_slashes=config.path_with_escaped_slashes_action,
            )
            if result.reject:
                return _BAD_REQUEST
            if result.redirect:
                return 307, b"", "", [("location", result.path)]
            target = result.path
        stream.path = target
        if strip:
            upgrade = stream.upgrade and "websocket" in self.config.upgrade_types
            internal_ok = not config.use_remote_address
            kept = []
            for kv in items:
                k = kv[0]
                if k in _HOP_BY_HOP:
                    if upgrade and k in ("connection", "upgrade"):
                        kept.append(kv)
                    continue
                if k in _INTERNAL and not internal_ok:
                    continue
                kept.append(kv)
            headers.items = items = kept
        elif stream.upgrade:
            pass
        if stream.upgrade and "websocket" not in self.config.upgrade_types:
            stream.upgrade = False
        remote_ip = conn.remote[0]
        # x-forwarded-for and internal/external classification (Envoy's use_remote_address).
        if config.use_remote_address:
            internal = is_internal_address(remote_ip)
            if not config.skip_xff_append:
                xff = headers.get("x-forwarded-for")
                headers.set("x-forwarded-for", remote_ip if xff is None else f"{xff},{remote_ip}")
            if internal:
                headers.set("x-envoy-internal", "true")
            else:
                headers.set("x-envoy-external-address", remote_ip)
            headers.set("x-forwarded-proto", "http")
        else:
            internal = True
            if "x-forwarded-proto" not in headers:
                headers.add("x-forwarded-proto", "http")
        if config.generate_request_id:
            rid = headers.get_first("x-request-id")
            if rid is None or (
                config.use_remote_address
                and not internal
                and not config.preserve_external_request_id
            ):
                from ubimesh.proxy.network.http_manager import new_request_id

                headers.set("x-request-id", new_request_id())
        return None

    def route_table_match(self, stream: ActiveStream) -> Route | None:
        found = self.table.route(stream.host_header, stream.method, stream.path, stream.headers)
        if found is None:
            return None
        stream.vhost, route = found
        return route

    # -- router support -------------------------------------------------------------------------

    def pick_cluster(
        self, stream: ActiveStream, action: RouteAction
    ) -> tuple[str, WeightedClusterEntry | None]:
        """The cluster name for this request, and the weighted entry it came from (if any)."""
        if action.cluster:
            return action.cluster, None
        if action.weighted_clusters:
            entry = pick_weighted(
                action.weighted_clusters, action.total_weight, random.getrandbits(63)
            )
            return ("", None) if entry is None else (entry.name, entry)
        if action.cluster_header:
            return stream.headers.get_first(action.cluster_header) or "", None
        return "", None

    def hash_key(self, stream: ActiveStream, action: RouteAction) -> int | None:
        return compute_hash(
            action.hash_policies, stream.headers, stream.conn.remote[0], stream.path
        )

    def format_context(
        self, stream: ActiveStream, response_headers: Headers | None = None
    ) -> FormatContext:
        conn = stream.conn
        return FormatContext(
            stream.headers,
            method=stream.method,
            path=stream.path,
            authority=stream.host_header,
            protocol="HTTP/1.0" if stream.http10 else "HTTP/1.1",
            downstream_remote=conn.remote,
            downstream_local=conn.local,
            start_time=stream.wall_start,
            response_headers=response_headers,
        )

    def build_upstream_head(
        self,
        stream: ActiveStream,
        route: Route,
        action: RouteAction,
        host: Host | None,
        entry: WeightedClusterEntry | None = None,
        shadow: bool = False,
    ) -> bytes:
        """The request head as the upstream gets it: route rewrites and header rules applied.
        The primary request mutates the stream's headers in place (they are not needed
        afterwards); a shadow works on a copy."""
        headers = stream.headers.copy() if shadow else stream.headers
        vhost = stream.vhost
        assert isinstance(vhost, VirtualHost)
        rules = self.table.request_header_rules(vhost, route, entry)
        if rules:
            ctx = self.format_context(stream)
            ctx.request_headers = headers
            for r in rules:
                r.apply(headers, ctx)
        path = rewrite_path(route, stream.path) or stream.path
        authority = rewrite_authority(action, host.hostname if host is not None else "")
        if authority is not None:
            headers.set("host", authority)
        if shadow:
            headers.set("host", shadow_host(headers.get_first("host") or ""))
        if action.timeout:
            headers.set("x-envoy-expected-rq-timeout-ms", str(int(action.timeout * 1000)))
        if stream.chunked:
            headers.remove("content-length")
            headers.add("transfer-encoding", "chunked")
        head = f"{stream.method} {path} HTTP/1.1\r\n"
        return (head + "".join([f"{k}: {v}\r\n" for k, v in headers.items]) + "\r\n").encode(
            "latin-1"
        )

    def apply_response_mutations(
        self,
        stream: ActiveStream,
        route: Route,
        headers: list[tuple[str, str]],
        entry: WeightedClusterEntry | None = None,
    ) -> list[tuple[str, str]]:
        """Apply the response header rules of the route's levels; returns the header list."""
        vhost = stream.vhost
        if not isinstance(vhost, VirtualHost):
            return headers
        rules = self.table.response_header_rules(vhost, route, entry)
        if not rules:
            return headers
        resp = Headers(headers)
        ctx = self.format_context(stream, resp)
        for r in rules:
            r.apply(resp, ctx)
        return resp.items

    def redirect_location(self, stream: ActiveStream, route: Route) -> str:
        return redirect_location(
            route,
            scheme="http",
            authority=stream.host_header,
            path=stream.path,
            forwarded_proto=stream.headers.get_first("x-forwarded-proto"),
        )


def shadow_host(host: str) -> str:
    """Envoy appends "-shadow" to the host of mirrored requests (before any port)."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] + "-shadow" + host[end + 1 :]
    colon = host.rfind(":")
    if colon > 0:
        return host[:colon] + "-shadow" + host[colon:]
    return host + "-shadow"
