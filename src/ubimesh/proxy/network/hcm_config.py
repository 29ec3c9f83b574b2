"""``HcmRuntime``: one HTTP connection manager's compiled configuration and stats handles.

Built once per filter chain per snapshot (never per request). It holds what the codec and the
router consult on every request: limits, the compiled route table, the stats objects, and the
request and response header rules that Envoy's connection manager applies
(x-forwarded-for, x-forwarded-proto, x-request-id, internal-header sanitizing, server, date).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ubimesh.proto import path as pathnorm
from ubimesh.proto.headers import Headers
from ubimesh.proxy.access_log.logger import AccessLogs, build_access_logs, log_stream
from ubimesh.proxy.http.codec import encode_request_head
from ubimesh.proxy.http.rbac import HttpRbac, NetworkRbac
from ubimesh.proxy.http.router import route_request
from ubimesh.proxy.routing.formatter import FormatContext
from ubimesh.proxy.routing.hashing import compute_hash
from ubimesh.proxy.routing.headers import HeaderRules
from ubimesh.proxy.routing.redirect import redirect_location, rewrite_authority, rewrite_path
from ubimesh.proxy.routing.table import RouteTable
from ubimesh.proxy.routing.text import strip_port
from ubimesh.proxy.routing.weighted import pick_weighted
from ubimesh.proxy.snapshot.types import (
    ForwardClientCertDetails,
    HeadersWithUnderscoresAction,
    HttpConnectionManagerConfig,
    MirrorPolicy,
    Route,
    RouteAction,
    RouteConfiguration,
    VirtualHost,
    WeightedClusterEntry,
)
from ubimesh.proxy.tracing.context import TRACE_HEADERS
from ubimesh.proxy.tracing.sampler import GENERATED
from ubimesh.proxy.upstream.host import Host
from ubimesh.runtime.netinfo import first_non_loopback_ipv4
from ubimesh.telemetry.mesh_metrics import MeshMetrics
from ubimesh.telemetry.stats import Counter, Histogram, Store

if TYPE_CHECKING:
    from ubimesh.proxy.http.filter_chain import DecoderFilter
    from ubimesh.proxy.network.http_manager import ActiveStream, HttpConnection
    from ubimesh.proxy.tracing.span import HcmTracer
    from ubimesh.proxy.upstream.cluster_manager import ClusterManager

# The clock as a constant: under mypyc a Final is a C static, where ``time.monotonic`` is a
# generic attribute lookup on the module (about 200 instructions) per call.
_monotonic: Final = time.monotonic

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade",
     "trailer", "expect", "http2-settings"}
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
# Codec-level refusals carry the reason phrase as their body, as Envoy's do.
_BAD_REQUEST: LocalReply = (400, b"Bad Request", "DPE", None)
_UPGRADE_REQUIRED: LocalReply = (426, b"Upgrade Required", "DPE", None)
_FORBIDDEN_UPGRADE: LocalReply = (403, b"", "", None)
_PATH_REJECTED: LocalReply = (400, b"", "DPE", None)
#: An absolute-form request target as Envoy's HTTP/1 codec accepts it: the group is the host
#: and port (user information left out); the path, if any, follows the match.
_ABSOLUTE_FORM = re.compile(
    r"(?i:https?)://(?:[^/?@]*@)?((?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?)(?=/|\Z)"
)
_STRIP_CANDIDATES = _HOP_BY_HOP | _INTERNAL | {"x-forwarded-client-cert"}
#: The HTTP RBAC filter's config type (HttpFilterConfig.type_name).
HTTP_RBAC_TYPE = "envoy.extensions.filters.http.rbac.v3.RBAC"
#: The fault and local rate limit filters' config types: either makes a decoder filter chain.
HTTP_FAULT_TYPE = "envoy.extensions.filters.http.fault.v3.HTTPFault"
LOCAL_RATELIMIT_TYPE = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_CHAIN_TYPES = frozenset({HTTP_FAULT_TYPE, LOCAL_RATELIMIT_TYPE})
#: Request headers Envoy keeps as one entry (its "inline" headers): repeated ones are joined
#: with "," in arrival order. Other repeated headers stay separate.
_COALESCED = frozenset(
    {"accept", "accept-encoding", "cache-control", "content-type", "user-agent", "via",
     "x-forwarded-for", "x-forwarded-proto", "x-request-id", "origin", "referer",
     "grpc-timeout", "grpc-accept-encoding", "access-control-request-method",
     "access-control-request-headers", "x-forwarded-host"}
)  # fmt: skip
_FOLDED = _COALESCED | {"host"}


# Request header flags, set by the codec as headers arrive (one dict lookup per header), so that
# the request rules below never scan the header list to find out what is there.
F_HOST = 1
F_TRANSFER_ENCODING = 2
F_CONTENT_LENGTH = 4
F_EXPECT = 8
F_STRIP = 16
"""A hop-by-hop, internal or otherwise sanitized header is present."""
F_FORWARDED_PROTO = 32
F_REQUEST_ID = 64
F_REPEATED = 128
"""A header Envoy folds into one entry appeared more than once."""
F_TRACE: Final = 256
"""A trace context header (``tracing.context.TRACE_HEADERS``) is present: without it the
tracer reads no header but x-request-id (Final: compiled readers inline the value)."""
F_CONNECTION = 512
"""A Connection or Proxy-Connection header is present (llhttp reads both for keep-alive)."""
_ONCE_BITS = 16
ONCE_MASK = ~((1 << _ONCE_BITS) - 1)
"""Bits above 16 record, per foldable header name, that it was seen (to detect repeats)."""


def _request_header_flags() -> dict[str, int]:
    flags: dict[str, int] = {}
    for i, name in enumerate(sorted(_COALESCED | {"host"})):
        flags[name] = flags.get(name, 0) | (1 << (_ONCE_BITS + i))
    for name in _STRIP_CANDIDATES:
        flags[name] = flags.get(name, 0) | F_STRIP
    flags["host"] |= F_HOST
    flags["transfer-encoding"] |= F_TRANSFER_ENCODING
    flags["content-length"] = flags.get("content-length", 0) | F_CONTENT_LENGTH
    flags["expect"] |= F_EXPECT
    flags["x-forwarded-proto"] |= F_FORWARDED_PROTO
    flags["x-request-id"] |= F_REQUEST_ID
    flags["connection"] |= F_CONNECTION
    flags["proxy-connection"] |= F_CONNECTION
    for name in TRACE_HEADERS:
        flags[name] = flags.get(name, 0) | F_TRACE
    return flags


REQUEST_HEADER_FLAGS = _request_header_flags()


def _coalesce(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: dict[str, int] = {}
    out: list[tuple[str, str]] = []
    for k, v in items:
        if k in _FOLDED:
            i = seen.get(k)
            if i is not None:
                out[i] = (k, out[i][1] + "," + v)
                continue
            seen[k] = len(out)
        out.append((k, v))
    return out


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


#: Random bytes are drawn for this many request ids at a time (one getrandom call each
#: time instead of one per request, as Envoy's random generator buffers them).
_IDS_PER_DRAW = 256
_random = b""
_random_at = 0


def _forget_random() -> None:
    # A forked worker must not hand out the ids its parent had drawn but not used.
    global _random, _random_at
    _random = b""
    _random_at = 0


os.register_at_fork(after_in_child=_forget_random)


def new_request_id() -> str:
    """A random UUID4 string (RFC 9562 section 5.4), as Envoy's x-request-id."""
    global _random, _random_at
    at = _random_at
    raw = _random
    if at + 16 > len(raw):
        raw = _random = os.urandom(16 * _IDS_PER_DRAW)
        at = 0
    _random_at = at + 16
    b = bytearray(raw[at : at + 16])
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    text = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    # The tracer's sampling draw is the id's first 8 hex digits: noted as bytes, they need
    # not be parsed back from the text (about 450 instructions a traced request).
    GENERATED.note(text, raw, at)
    return text


#: Statuses 0-999 (every three-digit code) have a slot in ``RequestStats.by_code``.
_CODE_SLOTS = 1000


class RequestStats:
    """A cluster's HTTP request counters (``cluster.<name>.upstream_rq_*``), which the router
    bumps. The cluster's connection and membership stats live on its UpstreamCluster.

    As in Envoy: ``upstream_rq_total`` counts requests given an upstream connection; a request
    that fails before a response (no connection, reset, timeout) is charged the status the
    proxy answered with (``upstream_rq_503``, ``upstream_rq_5xx``) and ``upstream_rq_completed``;
    the per-code and per-class counters and ``upstream_rq_time`` appear when first used."""

    __slots__ = ("by_class", "by_code", "prefix", "rq_completed", "rq_pending_failure",
                 "rq_rx_reset", "rq_time", "rq_timeout", "rq_total", "store")  # fmt: skip

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.prefix = p = f"cluster.{name}."
        self.rq_total = store.counter(p + "upstream_rq_total")
        self.rq_timeout = store.counter(p + "upstream_rq_timeout")
        self.rq_pending_failure = store.counter(p + "upstream_rq_pending_failure_eject")
        self.rq_rx_reset = store.counter(p + "upstream_rq_rx_reset")
        self.rq_completed = store.counter(p + "upstream_rq_completed")
        self.rq_time: Histogram | None = None
        """From the upstream request's first byte written to its response's last byte read."""
        self.by_class: list[Counter | None] = [None] * 6
        self.by_code: list[Counter | None] = [None] * _CODE_SLOTS
        """Per-code counters by status (an index, not a formatted name, per request)."""

    def count(self, status: int) -> None:
        """Count one response of ``status`` (``upstream_rq_<N>xx`` and ``upstream_rq_<code>``,
        each made when first used). Per request: two list lookups, two bumps."""
        i = status // 100
        if i > 5:
            i = 5
        k = self.by_class[i]
        if k is None:
            k = self.by_class[i] = self.store.counter(f"{self.prefix}upstream_rq_{i}xx")
        k.value += 1
        if 0 <= status < _CODE_SLOTS:
            c = self.by_code[status]
            if c is None:
                c = self.by_code[status] = self._code_counter(status)
        else:  # never from an HTTP/1 parser (three digits); only an odd configured status
            c = self._code_counter(status)
        c.value += 1

    def _code_counter(self, status: int) -> Counter:
        return self.store.counter(f"{self.prefix}upstream_rq_{status}")

    def record_time(self, ms: float) -> None:
        h = self.rq_time
        if h is None:
            h = self.rq_time = self.store.histogram(self.prefix + "upstream_rq_time")
        h.record(ms)

    def charge_local(self, status: int) -> None:
        """A request that got no upstream response: the proxy's answer is charged (Envoy's
        chargeUpstreamAbort)."""
        self.count(status)
        self.rq_completed.value += 1


class HcmRuntime:
    """What every request on connections of one HCM filter chain shares."""

    def __init__(
        self,
        config: HttpConnectionManagerConfig,
        clusters: ClusterManager,
        stats: Store,
        *,
        listener: str = "",
        denial_header: str = "internal",
        network_rbac: NetworkRbac | None = None,
    ) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        # Bound once: ``loop.call_later`` looked up on the loop object binds a new method
        # object per call (a generic lookup, about 300 instructions under callgrind); the
        # router arms a route timer per request.
        self.call_later: Callable[..., asyncio.TimerHandle] = self.loop.call_later
        self.clusters = clusters
        self.stats = stats
        self.table = _route_table(config.route_config)
        self.connections: set[HttpConnection] = set()
        self.router_factory = route_request
        self.max_header_bytes = config.max_request_headers_kb * 1024
        self.max_headers_count = config.max_headers_count
        self.underscores_action = config.headers_with_underscores_action
        mode = config.forward_client_cert_details
        # x-forwarded-client-cert, as Envoy's mutateXfccRequestHeader: a client-sent header is
        # kept with ALWAYS_FORWARD_ONLY, and on mutual TLS with FORWARD_ONLY and
        # APPEND_FORWARD; APPEND_FORWARD and SANITIZE_SET add this hop's element on mutual TLS.
        self.xfcc_always = mode is ForwardClientCertDetails.ALWAYS_FORWARD_ONLY
        self.xfcc_keep_on_mtls = mode in (
            ForwardClientCertDetails.FORWARD_ONLY,
            ForwardClientCertDetails.APPEND_FORWARD,
        )
        self.xfcc_append = mode is ForwardClientCertDetails.APPEND_FORWARD
        self.xfcc_set = mode in (
            ForwardClientCertDetails.APPEND_FORWARD,
            ForwardClientCertDetails.SANITIZE_SET,
        )
        self.check_underscores = (
            config.headers_with_underscores_action is not HeadersWithUnderscoresAction.ALLOW
        )
        self.request_headers_timeout = config.request_headers_timeout
        self.request_timeout = config.request_timeout
        self.stream_idle_timeout = config.stream_idle_timeout
        self.idle_timeout = config.idle_timeout
        self.max_pipelined = 32
        transformation = config.server_header_transformation
        self.server_header: str | None = (
            None if transformation == "PASS_THROUGH" else config.server_name or "envoy"
        )
        self.server_overwrite = transformation == "OVERWRITE"
        # Settings read by every request, copied into native fields: on the interpreted
        # config each read is a generic attribute lookup (about 160 instructions).
        self.strip_any_host_port: bool = config.strip_any_host_port
        self.use_remote_address: bool = config.use_remote_address
        self.generate_request_id: bool = config.generate_request_id
        self.normalize = (
            config.normalize_path
            or config.merge_slashes
            or config.path_with_escaped_slashes_action.value != 1
        )
        self._request_stats: dict[str, RequestStats] = {}
        # Keyed by object ids of the route and weighted entry: both live as long as the route
        # table (this object), so an id cannot be reused while it is cached.
        self._rules_cache: dict[
            tuple[int, int], tuple[tuple[HeaderRules, ...], tuple[HeaderRules, ...]]
        ] = {}
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
        self.rq_timeout = stats.counter(p + "downstream_rq_timeout")
        self.rq_idle_timeout = stats.counter(p + "downstream_rq_idle_timeout")
        self.mirror_stats = stats.counter(p + "rq_mirrored")
        # Envoy's HTTP/1 codec stats live in the root scope (http1.*), shared by every HCM.
        self.dropped_headers_with_underscores = stats.counter(
            "http1.dropped_headers_with_underscores"
        )
        self.requests_rejected_with_underscores = stats.counter(
            "http1.requests_rejected_with_underscores_in_headers"
        )
        # Envoy has downstream_rq_1xx to 5xx; slot 0 (a status below 100) is counted nowhere.
        self.by_class = [Counter()] + [
            stats.counter(f"{p}downstream_rq_{c}xx") for c in range(1, 6)
        ]
        self.rq_time = stats.histogram(p + "downstream_rq_time")
        self.rq_completed = stats.counter(p + "downstream_rq_completed")
        self.cx_http1_total = stats.counter(p + "downstream_cx_http1_total")
        self.cx_destroy = stats.counter(p + "downstream_cx_destroy")
        self.cx_length = stats.histogram(p + "downstream_cx_length_ms")
        # RBAC: the network filters before this HCM (run when a connection is accepted) and
        # the HTTP filters before the router (run per request, after the request rules).
        self.network_rbac = network_rbac
        # Istio's mesh metrics, when the listener's metadata asks for them.
        telemetry = config.mesh_telemetry
        self.mesh: MeshMetrics | None = (
            MeshMetrics(telemetry, stats) if telemetry is not None else None
        )
        rbac_configs = [f.config for f in config.http_filters if f.type_name == HTTP_RBAC_TYPE]
        self.access_logs: AccessLogs | None = build_access_logs(config.access_log, stats)
        """None without access logs: then observe() pays one attribute check for them."""
        self.tracer: HcmTracer | None = None
        """None without HCM tracing: then a request pays one attribute check for it."""
        if config.tracing is not None:
            # Imported only by a proxy that traces.
            from ubimesh.proxy.tracing.span import HcmTracer

            self.tracer = HcmTracer(config.tracing, stats, config.stat_prefix, clusters)
        self.rbac: HttpRbac | None = None
        if rbac_configs:
            self.rbac = HttpRbac(
                rbac_configs,
                stats,
                config.stat_prefix,
                listener=listener,
                denial_header=denial_header,
                use_remote_address=config.use_remote_address,
                xff_num_trusted_hops=config.xff_num_trusted_hops,
                skip_xff_append=config.skip_xff_append,
            )
        self.decoder_filters: tuple[DecoderFilter, ...] | None = _decoder_filters(
            config, self.rbac, stats, self.loop
        )
        """None unless a fault or local rate limit filter is configured: then the stream runs
        this chain (RBAC included) instead of ``rbac``; without them, one attribute check."""

    def take_routes(self, config: HttpConnectionManagerConfig) -> None:
        """Route with ``config.route_config`` from the next request on (an RDS update):
        ``config`` differs from the current one in its route configuration only."""
        self.config = config
        self.table = _route_table(config.route_config)
        self._rules_cache.clear()  # keyed by ids of the old table's routes
        for f in self.decoder_filters or ():
            f.routes_changed()

    # -- stats ----------------------------------------------------------------------------------

    def count_status(self, status: int) -> None:
        i = status // 100
        self.by_class[i if i < 5 else 5].value += 1

    def request_stats(self, name: str) -> RequestStats:
        rs = self._request_stats.get(name)
        if rs is None:
            rs = self._request_stats[name] = RequestStats(self.stats, name)
        return rs

    def observe(self, stream: ActiveStream) -> None:
        """Per-request bookkeeping once a stream ends: stats, mesh metrics, access logs."""
        now = _monotonic()  # one clock read for the span, the access logs and the stats
        span = stream.span
        if span is not None:
            stream.span = None
            tracer = self.tracer
            if tracer is not None:
                tracer.finish(stream, span, now)
        logs = self.access_logs
        if logs is not None:
            log_stream(logs, stream, now)  # one clock read for both
        duration_ms = (now - stream.start_time) * 1000.0
        # Native calls and field bumps: ``stats`` is compiled with this module.
        self.rq_time.record(duration_ms)
        self.rq_completed.value += 1
        mesh = self.mesh
        if mesh is not None:
            mesh.observe_http(stream, duration_ms)

    # -- request rules ------------------------------------------------------------------------

    def prepare_request(self, stream: ActiveStream, conn: HttpConnection) -> LocalReply | None:
        """Apply the HCM's request rules in Envoy's order. Returns a local reply when the
        request must be answered by the proxy (refused, or redirected to a normalized path)."""
        config = self.config
        if stream.http10 and not config.accept_http_10:
            return _UPGRADE_REQUIRED
        headers = stream.headers
        items = headers.items
        target = stream.target
        flags = stream.hflags
        if "#" in target:
            # Envoy's HTTP/1 codec refuses a fragment anywhere in the request target; routing
            # and authorization must never see a path that an upstream would cut elsewhere.
            return _BAD_REQUEST
        # Authority: absolute-form request targets carry it (RFC 9112 section 3.2.2).
        if target[:1] != "/":
            if target == "*" and stream.method == "OPTIONS":
                return _BAD_REQUEST
            absolute = _ABSOLUTE_FORM.match(target)
            if absolute is None:
                return _BAD_REQUEST
            # As Envoy: http or https, user information dropped, the authority a plain host
            # (or IP literal) with an optional port, which is what the Host becomes.
            authority = absolute.group(1)
            target = target[absolute.end() :] or "/"
            headers.set("host", authority)
            items = headers.items
            stream.host_header = authority
            flags |= F_HOST
        if flags & F_REPEATED:
            # Envoy keeps its inline headers (Host among them) as one entry: repeats are
            # folded into "first,second". A folded Host matches no domain but "*".
            items = headers.items = _coalesce(items)
            if flags & F_HOST:
                stream.host_header = headers.get_first("host") or ""
        if not flags & F_HOST and not stream.http10:
            return _BAD_REQUEST
        host = stream.host_header
        if self.strip_any_host_port and host:
            stripped = strip_port(host)
            if stripped != host:
                host = stream.host_header = stripped
                headers.set("host", host)
                items = headers.items
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
                return _PATH_REJECTED
            if result.redirect:
                return 307, b"", "", [("location", result.path)]
            target = result.path
        stream.path = target
        if stream.upgrade:
            upgrade = (headers.get_first("upgrade") or "").lower()
            if upgrade == "h2c":
                # Envoy ignores h2c upgrade offers over HTTP/1.1 and forwards the request.
                stream.upgrade = False
            elif upgrade not in config.upgrade_types:
                return _FORBIDDEN_UPGRADE
        if flags & F_STRIP:
            items = headers.items = self._strip_request_headers(stream, items)
        if self.xfcc_set:
            tls = conn.tls
            if tls is not None and tls.presented:
                element = tls.xfcc(config.set_current_client_cert_details)
                previous = headers.get("x-forwarded-client-cert") if self.xfcc_append else None
                headers.set(
                    "x-forwarded-client-cert",
                    element if previous is None else f"{previous},{element}",
                )
                items = headers.items
        # x-forwarded-for, x-forwarded-proto and the edge classification, as Envoy's
        # ConnectionManagerUtility::mutateRequestHeaders does it. With no internal address
        # configuration (Envoy 1.40's default), no downstream counts as internal.
        if self.use_remote_address:
            remote_ip = conn.remote[0]
            trusted_hops = config.xff_num_trusted_hops
            xff = headers.get("x-forwarded-for")
            client_ip = remote_ip
            if trusted_hops and xff:
                entries = [e.strip() for e in xff.split(",")]
                if len(entries) >= trusted_hops:
                    client_ip = entries[len(entries) - trusted_hops]
            if not config.skip_xff_append:
                appended = remote_ip
                if is_loopback(remote_ip):
                    appended = first_non_loopback_ipv4()
                headers.set("x-forwarded-for", appended if xff is None else f"{xff},{appended}")
            headers.set("x-envoy-external-address", client_ip)
            if not (trusted_hops and "x-forwarded-proto" in headers):
                headers.set("x-forwarded-proto", "http" if conn.tls is None else "https")
            edge = True
        else:
            edge = False
            if not flags & F_FORWARDED_PROTO:
                headers.items.append(
                    ("x-forwarded-proto", "http" if conn.tls is None else "https")
                )
        if self.generate_request_id:
            if not flags & F_REQUEST_ID:
                headers.items.append(("x-request-id", new_request_id()))
            elif edge and not config.preserve_external_request_id:
                headers.set("x-request-id", new_request_id())
        return None

    def _strip_request_headers(
        self, stream: ActiveStream, items: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """Drop hop-by-hop headers (and those the Connection header nominates), Envoy's
        internal x-envoy-* headers (x-envoy-internal among them: no downstream is internal
        without an internal address configuration) and a client-sent certificate header."""
        upgrade = stream.upgrade
        tls = stream.conn.tls
        mtls = tls is not None and tls.presented
        nominated: set[str] = set()
        for k, v in items:
            if k == "connection":
                for token in v.split(","):
                    t = token.strip().lower()
                    if t and t not in ("close", "keep-alive", "upgrade", "host") and t[0] != ":":
                        nominated.add(t)
        kept = []
        for kv in items:
            k = kv[0]
            if k in _HOP_BY_HOP:
                if upgrade and k in ("connection", "upgrade"):
                    kept.append(("connection", "upgrade") if k == "connection" else kv)
                elif k == "te" and "trailers" in [t.strip() for t in kv[1].lower().split(",")]:
                    kept.append(("te", "trailers"))
                continue
            if k in nominated:
                continue
            if k == "x-forwarded-client-cert":
                # Only a peer that proved its certificate may pass the header on (and only in
                # the forwarding modes); otherwise it is removed, so that a client cannot
                # claim an identity (Envoy's rules).
                if self.xfcc_always or (self.xfcc_keep_on_mtls and mtls):
                    kept.append(kv)
                continue
            if k in _INTERNAL:
                # No downstream is internal without an internal address configuration, and
                # Envoy cleans these control headers from every external request.
                continue
            kept.append(kv)
        return kept

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
        cluster = action.cluster  # read once: a generic lookup on the interpreted dataclass
        if cluster:
            return cluster, None
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
            start_time=time.time() - (time.monotonic() - stream.start_time),
            response_headers=response_headers,
        )

    def build_upstream_head(
        self,
        stream: ActiveStream,
        route: Route,
        action: RouteAction,
        host: Host | None,
        entry: WeightedClusterEntry | None = None,
        timeout: float | None = None,
        shadow: MirrorPolicy | None = None,
    ) -> bytes:
        """The request head as the upstream gets it: route rewrites and header rules applied.
        The primary request mutates the stream's headers in place (they are not needed
        afterwards); a shadow works on a copy."""
        headers = stream.headers.copy() if shadow is not None else stream.headers
        vhost = stream.vhost
        assert vhost is not None  # set by route_table_match before the router runs
        rules = self._header_rules(vhost, route, entry)[0]
        if rules:
            ctx = self.format_context(stream)
            ctx.request_headers = headers
            for r in rules:
                r.apply(headers, ctx)
        path = stream.path
        # Most routes rewrite nothing: the action says so in its hot tuple, which spares the
        # interpreted rewrite helpers and their reads of the action (about 2k instructions).
        if action.hot[4]:
            rewritten = rewrite_path(route, path)
            if rewritten is not None:
                # Envoy's router records what it rewrote (unless suppress_envoy_headers).
                headers.set("x-envoy-original-path", path)
                path = rewritten
            authority = rewrite_authority(action, host.hostname if host is not None else "")
            if authority is None and action.host_rewrite_header:
                authority = headers.get_first(action.host_rewrite_header) or None
            if authority is not None:
                headers.set("x-envoy-original-host", stream.host_header)
                headers.set("host", authority)
        if shadow is not None:
            # Envoy sends shadows through its internal async client, which marks them
            # internal and records the proxy's own address.
            if not shadow.disable_shadow_host_suffix_append:
                headers.set("host", shadow_host(headers.get_first("host") or ""))
            xff = headers.get("x-forwarded-for")
            me = first_non_loopback_ipv4()
            headers.set("x-forwarded-for", me if xff is None else f"{xff},{me}")
            headers.set("x-envoy-internal", "true")
        if timeout:
            headers.set("x-envoy-expected-rq-timeout-ms", str(int(timeout * 1000)))
        if stream.chunked:
            headers.remove("content-length")
            headers.add("transfer-encoding", "chunked")
        return encode_request_head(stream.method, path, headers.items)

    def _header_rules(
        self, vhost: VirtualHost, route: Route, entry: WeightedClusterEntry | None
    ) -> tuple[tuple[HeaderRules, ...], tuple[HeaderRules, ...]]:
        """The request and response header rules for a route (and weighted entry), looked up
        in the route table once per route and then cached here."""
        key = (id(route), id(entry))
        found = self._rules_cache.get(key)
        if found is None:
            found = self._rules_cache[key] = (
                self.table.request_header_rules(vhost, route, entry),
                self.table.response_header_rules(vhost, route, entry),
            )
        return found

    def apply_response_mutations(
        self,
        stream: ActiveStream,
        route: Route,
        headers: list[tuple[str, str]],
        entry: WeightedClusterEntry | None = None,
    ) -> list[tuple[str, str]]:
        """Apply the response header rules of the route's levels; returns the header list."""
        vhost = stream.vhost
        if vhost is None:
            return headers
        rules = self._header_rules(vhost, route, entry)[1]
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


def _decoder_filters(
    config: HttpConnectionManagerConfig,
    rbac: HttpRbac | None,
    stats: Store,
    loop: asyncio.AbstractEventLoop,
) -> tuple[DecoderFilter, ...] | None:
    """The decoder filter chain in ``http_filters`` order, or None when the HCM has no fault
    and no local rate limit filter (RBAC alone keeps its direct call). Consecutive RBAC
    filters are one stage of the HCM's HttpRbac."""
    if not any(f.type_name in _CHAIN_TYPES for f in config.http_filters):
        return None
    # Imported only by a proxy that configures these filters.
    from ubimesh.proxy.http.fault import FaultFilter
    from ubimesh.proxy.http.filter_chain import RbacStage
    from ubimesh.proxy.http.local_ratelimit import LocalRateLimitFilter

    chain: list[DecoderFilter] = []
    rbac_index = 0
    run_start = -1
    for f in config.http_filters:
        if f.type_name == HTTP_RBAC_TYPE:
            if run_start < 0:
                run_start = rbac_index
            rbac_index += 1
            continue
        if run_start >= 0:
            assert rbac is not None
            chain.append(RbacStage(rbac, run_start, rbac_index))
            run_start = -1
        if f.type_name == HTTP_FAULT_TYPE:
            chain.append(FaultFilter(f.config, stats, config.stat_prefix))
        elif f.type_name == LOCAL_RATELIMIT_TYPE:
            chain.append(LocalRateLimitFilter(f.name, f.config, stats, loop))
    if run_start >= 0:
        assert rbac is not None
        chain.append(RbacStage(rbac, run_start, rbac_index))
    return tuple(chain)


def _route_table(rc: RouteConfiguration) -> RouteTable:
    return RouteTable(
        rc,
        ignore_port_in_host_matching=rc.ignore_port_in_host_matching,
        most_specific_header_mutations_wins=rc.most_specific_header_mutations_wins,
    )
