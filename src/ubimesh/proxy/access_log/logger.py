"""Access logs at run time: a configured log (filter, format, sink) and the entries it logs.

``build_access_logs`` compiles a tuple of ``AccessLogConfig`` once per filter chain (or
listener) per snapshot; it returns None for none, so the request path pays one attribute check
when no access log is configured. ``log_stream`` runs when an HTTP stream ends (from
``HcmRuntime.observe``), ``log_connection`` when a TCP proxy connection closes or a listener
refuses one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from ubimesh.proxy.access_log.filters import Predicate, compile_filter
from ubimesh.proxy.access_log.format import LogEntry, LogFormat, compile_log_format
from ubimesh.proxy.access_log.sink import FileSink, file_sink
from ubimesh.proxy.name_memo import NameMemo
from ubimesh.proxy.snapshot.types import (
    AccessLogConfig,
    DirectResponseAction,
    RedirectAction,
    RouteAction,
)
from ubimesh.telemetry.stats import Store

if TYPE_CHECKING:
    from ubimesh.proxy.network.http_manager import ActiveStream
    from ubimesh.proxy.tls.peer import PeerInfo


class AccessLog:
    """One configured access log."""

    __slots__ = ("filter", "format", "sink")

    def __init__(self, config: AccessLogConfig, store: Store | None = None) -> None:
        self.format: LogFormat = compile_log_format(
            config.text_format, config.json_format, config.omit_empty_values
        )
        self.filter: Predicate | None = (
            compile_filter(config.filter) if config.filter is not None else None
        )
        self.sink: FileSink = file_sink(config.path, store)

    def log(self, entry: LogEntry) -> None:
        """Log ``entry`` if the filter passes. The line is rendered later, with the sink's
        next batch (``FileSink.defer``): the request path only queues the entry."""
        f = self.filter
        if f is not None and not f(entry):
            return
        fmt = self.format
        if fmt.program is not None:
            self.sink.render_now(fmt, entry)
        else:
            self.sink.defer(fmt, entry)


AccessLogs = tuple[AccessLog, ...]


def build_access_logs(
    configs: Sequence[AccessLogConfig], store: Store | None = None
) -> AccessLogs | None:
    """The compiled logs of one HCM, TCP proxy or listener; None when there are none."""
    if not configs:
        return None
    return tuple(AccessLog(c, store) for c in configs)


# ---------------------------------------------------------------------------------------------
# HTTP

#: RESPONSE_CODE_DETAILS for the responses whose details ubimesh does not record where they
#: happen: derived from the response flag, as Envoy names them.
_FLAG_DETAILS = {
    "NR": "route_not_found",
    "NC": "cluster_not_found",
    "UH": "no_healthy_upstream",
    "UT": "upstream_response_timeout",
    "UF": "upstream_reset_before_response_started{remote_connection_failure}",
    "UC": "upstream_reset_before_response_started{connection_termination}",
    "DC": "downstream_remote_disconnect",
    "DPE": "http1.codec_error",
    "SI": "stream_idle_timeout",
}


def _details(stream: ActiveStream) -> str:
    flags = stream.flags
    if flags:
        for flag in flags.split(","):
            found = _FLAG_DETAILS.get(flag)
            if found is not None:
                return found
    up = stream.upstream
    if up is not None and up.response_started:
        return "via_upstream"
    route = stream.route
    if route is not None and stream.status:
        kind = type(route.action)
        if kind is DirectResponseAction or kind is RedirectAction:
            return "direct_response"
    return ""


def _peer_uri_san(tls: PeerInfo | None) -> str:
    if tls is None or not tls.presented:
        return ""
    return ",".join(tls.uri_sans)


class _HostText:
    """The UPSTREAM_HOST text of the last upstream address logged: a stream's host is
    usually the previous stream's, and a ``SocketAddress`` is frozen (a re-resolved host gets
    a new one), so the text is made once per address change rather than once per request."""

    __slots__ = ("address", "text")

    def __init__(self) -> None:
        self.address: object = None
        self.text = ""


_last_host: Final = _HostText()


_route_name: Final = NameMemo()
_cluster_name: Final = NameMemo()

# The clocks as constants: under mypyc a Final is a C static, where ``time.monotonic`` is a
# generic attribute lookup on the module (about 200 instructions) every call.
_monotonic: Final = time.monotonic
_wall_clock: Final = time.time


def http_entry(stream: ActiveStream, now: float = 0.0) -> LogEntry:
    """The entry of an HTTP stream that has just ended ``now`` (the monotonic clock, which
    the caller may have read already: a clock call is about 180 instructions; 0: read it)."""
    conn = stream.conn
    if now <= 0.0:
        now = _monotonic()
    started = stream.start_time or now
    upstream_host = ""
    upstream_cluster = ""
    route = stream.route
    up = stream.upstream
    if up is not None:
        host = up.host
        if host is not None:
            cache = _last_host
            address = host.address
            if address is not cache.address:
                cache.text = str(address)
                cache.address = address
            upstream_host = cache.text
        cluster = up.cluster
        if cluster is not None:
            upstream_cluster = _cluster_name.name_of(cluster)
    elif route is not None:
        action = route.action
        # Envoy knows the route's cluster as soon as the route is picked (an RBAC denial
        # shows it, with no upstream host).
        if type(action) is RouteAction and action.cluster:
            upstream_cluster = action.cluster
    tls = conn.tls
    # One positional call: the entry is built once, with no default-then-overwrite.
    return LogEntry(
        True,
        _wall_clock() - (now - started),
        int((now - started) * 1000.0),
        stream.method,
        stream.path or stream.target,
        stream.host_header,
        "HTTP/1.0" if stream.http10 else "HTTP/1.1",
        stream.headers,
        stream.response_headers,
        stream.status,
        stream.flags,
        stream.details or _details(stream),
        "",
        stream.bytes_received,
        stream.bytes_sent,
        upstream_host,
        upstream_cluster,
        _route_name.name_of(route) if route is not None else "",
        None,  # the addresses: read off ``conn`` when a format shows them (see LogEntry)
        None,
        _peer_uri_san(tls) if tls is not None else "",
        conn.sni,
        conn,
    )


def log_stream(logs: AccessLogs, stream: ActiveStream, now: float = 0.0) -> None:
    """Log a stream that has just ended ``now`` (as in ``http_entry``)."""
    entry = http_entry(stream, now)
    for access_log in logs:
        access_log.log(entry)


# ---------------------------------------------------------------------------------------------
# TCP connections (tcp_proxy, listeners)


def connection_entry(
    remote: tuple[str, int],
    local: tuple[str, int],
    tls: PeerInfo | None,
    *,
    started: float = 0.0,
    sni: str = "",
    bytes_received: int = 0,
    bytes_sent: int = 0,
    upstream_host: str = "",
    upstream_cluster: str = "",
    flags: str = "",
    details: str = "",
    termination_details: str = "",
) -> LogEntry:
    """The entry of a downstream connection (``started``: its monotonic start time, 0 for a
    connection refused as it arrived). The HTTP fields stay "not available"."""
    now = _monotonic()
    started = started or now
    return LogEntry(
        start_time=_wall_clock() - (now - started),
        duration_ms=int((now - started) * 1000.0),
        downstream_remote=remote,
        downstream_local=local,
        peer_uri_san=_peer_uri_san(tls),
        sni=sni,
        bytes_received=bytes_received,
        bytes_sent=bytes_sent,
        upstream_host=upstream_host,
        upstream_cluster=upstream_cluster,
        flags=flags,
        details=details,
        termination_details=termination_details,
    )


def log_connection(logs: AccessLogs, entry: LogEntry) -> None:
    for access_log in logs:
        access_log.log(entry)
