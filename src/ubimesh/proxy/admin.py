"""The admin server: Envoy's admin HTTP interface on the bootstrap's ``admin.address``.

``AdminServer`` is a small HTTP/1.1 server (asyncio streams + httptools) that answers the admin
paths with Envoy's status codes, content types and body formats (checked against Envoy 1.40).
It knows nothing about the proxy: everything it shows or changes goes through ``AdminHooks``,
which the proxy server implements. Every hook may be a plain method or a coroutine function.

Paths. Those marked (POST) answer any other method with 405 ``Method GET not allowed, POST
required.``; the others accept any method, as Envoy does, and HEAD omits the body.

* ``/``: HTML page listing the paths; ``/help``: the same as plain text.
* ``/stats``: ``format=text|json|prometheus|html``, ``filter``, ``invert_filter``,
  ``usedonly``, ``type``, ``histogram_buckets`` (layouts in ``ubimesh.telemetry.render``).
* ``/stats/prometheus``: ``filter``, ``invert_filter``, ``usedonly``,
  ``histogram_buckets=cumulative|summary`` (``ubimesh.telemetry.prometheus``).
* ``/server_info``: the ``server_info`` hook as pretty JSON; ``/hot_restart_version``: its
  ``hot_restart_version``; ``/ready``: 200 ``LIVE`` or 503 with its ``state``.
* ``/config_dump``: the ``config_dump`` hook with Envoy's ``resource``, ``mask``, ``name_regex``
  and ``include_eds``.
* ``/clusters``: ``ClusterStatus`` list as Envoy's ``::`` lines or ``format=json``; ``filter``.
* ``/listeners``: ``ListenerStatus`` list as ``name::address`` lines or ``format=json``.
* ``/runtime``, ``/certs``: Envoy's empty answers (ubimesh has no runtime layers, no TLS yet).
* ``/healthcheck/fail``, ``/healthcheck/ok`` (POST); ``/drain_listeners`` (POST) with
  ``graceful`` and ``inboundonly``; ``/logging`` (POST) with Envoy's ``level=``, ``paths=``,
  ``group=`` and ``<logger>=<level>``; ``/quitquitquit`` (POST) answers ``OK`` and then calls the
  ``quit`` hook.
* Any other path: 404 with ``invalid path.`` and the help text.

Robustness: the request line and headers are limited to ``max_request_header_bytes`` and
``max_headers`` (431), a body to ``max_body_bytes`` (413); a request must arrive completely
within ``request_timeout`` of its first byte (else 408), an idle keep-alive connection is closed
after ``idle_timeout``, a response must be taken by the client within ``write_timeout``, a hook
must answer within ``handler_timeout`` (else 503), and at most ``max_connections`` connections
are served at once (more are closed on accept). After an error answer the connection is closed
with a short bounded linger, so the client reads the answer instead of a reset. A failing hook
gives 500 and is logged; it never takes the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import inspect
import json
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import (
    TYPE_CHECKING,
    Any,
    Protocol,
    TypeAlias,
    TypeVar,
    cast,
    runtime_checkable,
)
from urllib.parse import unquote

import httptools

from ubimesh.proxy.http.codec import http_date
from ubimesh.proxy.snapshot.types import Locality, SocketAddress
from ubimesh.telemetry.stats import StatsSnapshot

if TYPE_CHECKING:
    from ubimesh.telemetry.render import HistogramBuckets, StatsQuery

# The stats renderers (about 1.4 MB resident) load on the first /stats request: a proxy that is
# never scraped should not pay for them.

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: A hook may answer directly or with an awaitable (``async def``).
MaybeAwaitable: TypeAlias = _T | Awaitable[_T]

TEXT = "text/plain; charset=UTF-8"
JSON = "application/json"
HTML = "text/html; charset=UTF-8"

# ---------------------------------------------------------------------------------------------
# What the hooks return


@dataclass(frozen=True, slots=True)
class HostStatus:
    """One upstream host as /clusters shows it. Counters and gauges are summed over workers.

    ``health_flags`` are Envoy's flag names: ``failed_active_hc``, ``failed_outlier_check``,
    ``failed_eds_health``, ``degraded_active_hc``, ``degraded_eds_health``,
    ``pending_dynamic_removal``, ``pending_active_hc``, ``excluded_via_immediate_hc_fail``,
    ``active_hc_timeout``, ``eds_status_draining``; none means healthy.
    """

    address: SocketAddress
    hostname: str = ""
    health_flags: tuple[str, ...] = ()
    weight: int = 1
    priority: int = 0
    locality: Locality = field(default_factory=Locality)
    # counters
    cx_connect_fail: int = 0
    cx_total: int = 0
    rq_error: int = 0
    rq_success: int = 0
    rq_timeout: int = 0
    rq_total: int = 0
    # gauges
    cx_active: int = 0
    rq_active: int = 0
    rq_pending_active: int = 0
    # outlier detection's last success rate pass (-1: none)
    success_rate: float = -1.0
    local_origin_success_rate: float = -1.0


@dataclass(frozen=True, slots=True)
class CircuitBreakerThresholds:
    """One priority's circuit-breaker limits (Envoy's defaults); ``priority`` DEFAULT or HIGH."""

    priority: str = "DEFAULT"
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """One cluster as /clusters shows it. ``observability_name`` defaults to ``name``.
    ``circuit_breakers`` (DEFAULT then HIGH) is printed only when given."""

    name: str
    hosts: tuple[HostStatus, ...] = ()
    observability_name: str = ""
    added_via_api: bool = False
    circuit_breakers: tuple[CircuitBreakerThresholds, ...] = ()
    outlier: tuple[float, ...] | None = None
    """With outlier detection: the success rate average and ejection threshold, external
    then local origin (-1 when unknown), printed as Envoy's ``outlier::`` lines."""


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    """One listener as /listeners shows it: its name and the address it is bound to."""

    name: str
    address: SocketAddress


# ---------------------------------------------------------------------------------------------
# The hooks


class AdminHooks(Protocol):
    """What the admin server needs from the proxy. Every method may be ``async``."""

    def stats_snapshot(self) -> MaybeAwaitable[StatsSnapshot]:
        """All stats, merged across workers (``merge_snapshots``)."""
        ...

    def server_info(self) -> MaybeAwaitable[Mapping[str, Any]]:
        """Envoy's /server_info document: ``version``, ``state`` (LIVE, DRAINING,
        PRE_INITIALIZING), ``uptime_current_epoch``/``uptime_all_epochs`` ("12s"),
        ``hot_restart_version``, ``command_line_options`` {``concurrency``, ``service_node``,
        ``service_cluster``, ``log_level``, ``config_path``, ...}, ``node``."""
        ...

    def config_dump(self) -> MaybeAwaitable[Mapping[str, Any]]:
        """Envoy's /config_dump document, ready-made: ``{"configs": [{"@type":
        "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": ...},
        ClustersConfigDump, ListenersConfigDump, RoutesConfigDump, ...]}``. An
        EndpointsConfigDump may be included: it is shown only with ``include_eds``."""
        ...

    def clusters(self) -> MaybeAwaitable[Sequence[ClusterStatus]]:
        """Every cluster with its hosts and their counters, in the order to show them."""
        ...

    def listeners(self) -> MaybeAwaitable[Sequence[ListenerStatus]]:
        """Every active listener with the address it is bound to."""
        ...

    def is_ready(self) -> MaybeAwaitable[bool]:
        """True when the server is LIVE (/ready answers 200), else /ready answers 503 with
        ``server_info()["state"]``."""
        ...

    def set_healthcheck_failed(self, failed: bool) -> MaybeAwaitable[None]:
        """POST /healthcheck/fail (True) and /healthcheck/ok (False)."""
        ...

    def drain_listeners(self, graceful: bool, inbound_only: bool) -> MaybeAwaitable[None]:
        """POST /drain_listeners: start draining; return once the drain has started (do not wait
        for the drain period)."""
        ...

    def quit(self) -> MaybeAwaitable[None]:
        """POST /quitquitquit: shut the server down. Called after the response is sent, outside
        the request, so it may stop this admin server."""
        ...


@runtime_checkable
class LogLevelHooks(Protocol):
    """Optional: implement it on the hooks object to handle POST /logging yourself (for
    example to apply the change in worker processes too). Without it the admin server
    changes the levels of this process's ``ubimesh`` loggers with ``apply_log_levels``."""

    def set_log_levels(self, levels: Mapping[str, str]) -> MaybeAwaitable[Mapping[str, str]]:
        """Apply ``levels`` (see ``apply_log_levels``) and return every logger's level."""
        ...


async def _resolve(value: MaybeAwaitable[_T]) -> _T:
    if inspect.isawaitable(value):
        return cast(_T, await value)
    return value


# ---------------------------------------------------------------------------------------------
# Logging levels

#: Envoy's level names, most verbose first, with the Python level each one maps to.
LOG_LEVELS: dict[str, int] = {
    "trace": 5,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}


def envoy_level_name(level: int) -> str:
    """The Envoy name of a Python logging level (rounding up to the next Envoy level)."""
    for name, value in LOG_LEVELS.items():
        if level <= value:
            return name
    return "off"


def apply_log_levels(levels: Mapping[str, str], *, root: str = "ubimesh") -> dict[str, str]:
    """Set this process's logging levels the way Envoy's /logging does; return all levels.

    ``levels`` maps a logger name to an Envoy level name (``LOG_LEVELS``). The name ``""``
    means every logger. Names are Python logger names: ``root`` itself or any existing logger
    under it (``ubimesh.proxy.http``). Raises ``KeyError`` for an unknown logger and
    ``ValueError`` for an unknown level, before changing anything.
    """
    manager = logging.Logger.manager
    names = sorted(
        n
        for n, lg in manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and (n == root or n.startswith(root + "."))
    )
    if root not in names:
        names.insert(0, root)
    for name, level in levels.items():
        if level not in LOG_LEVELS:
            raise ValueError(level)
        if name and name not in names:
            raise KeyError(name)
    for name, level in levels.items():
        for target in names if not name else [name]:
            logging.getLogger(target).setLevel(LOG_LEVELS[level])
    return {n: envoy_level_name(logging.getLogger(n).getEffectiveLevel()) for n in names}


# ---------------------------------------------------------------------------------------------
# /clusters and /listeners rendering

_HOST_COUNTERS = ("cx_connect_fail", "cx_total", "rq_error", "rq_success", "rq_timeout", "rq_total")
_HOST_GAUGES = ("cx_active", "rq_active", "rq_pending_active")

_FLAG_TO_JSON = {
    "failed_active_hc": "failed_active_health_check",
    "failed_outlier_check": "failed_outlier_check",
    "degraded_active_hc": "failed_active_degraded_check",
    "pending_dynamic_removal": "pending_dynamic_removal",
    "pending_active_hc": "pending_active_hc",
    "excluded_via_immediate_hc_fail": "excluded_via_immediate_hc_fail",
    "active_hc_timeout": "active_hc_timeout",
}
_FLAG_TO_EDS = {
    "failed_eds_health": "UNHEALTHY",
    "degraded_eds_health": "DEGRADED",
    "eds_status_draining": "DRAINING",
}


_OUTLIER_LINES = (
    "success_rate_average",
    "success_rate_ejection_threshold",
    "local_origin_success_rate_average",
    "local_origin_success_rate_ejection_threshold",
)


def _number(value: float) -> str:
    """A double as Envoy's fmt prints it: shortest form, no ``.0`` on whole numbers."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def clusters_text(clusters: Sequence[ClusterStatus]) -> str:
    """Envoy's /clusters text: ``cluster::...`` and ``cluster::host:port::stat::value`` lines."""
    out: list[str] = []
    for c in clusters:
        n = c.name
        out.append(f"{n}::observability_name::{c.observability_name or n}")
        if c.outlier is not None:
            for label, value in zip(_OUTLIER_LINES, c.outlier, strict=False):
                out.append(f"{n}::outlier::{label}::{_number(value)}")
        for cb in c.circuit_breakers:
            prio = "high_priority" if cb.priority.upper() == "HIGH" else "default_priority"
            out.append(f"{n}::{prio}::max_connections::{cb.max_connections}")
            out.append(f"{n}::{prio}::max_pending_requests::{cb.max_pending_requests}")
            out.append(f"{n}::{prio}::max_requests::{cb.max_requests}")
            out.append(f"{n}::{prio}::max_retries::{cb.max_retries}")
        out.append(f"{n}::added_via_api::{str(c.added_via_api).lower()}")
        for h in c.hosts:
            p = f"{n}::{h.address}"
            for stat in sorted(_HOST_COUNTERS + _HOST_GAUGES):
                out.append(f"{p}::{stat}::{getattr(h, stat)}")
            flags = "".join("/" + f for f in h.health_flags) or "healthy"
            out.append(f"{p}::hostname::{h.hostname}")
            out.append(f"{p}::health_flags::{flags}")
            out.append(f"{p}::weight::{h.weight}")
            out.append(f"{p}::region::{h.locality.region}")
            out.append(f"{p}::zone::{h.locality.zone}")
            out.append(f"{p}::sub_zone::{h.locality.sub_zone}")
            out.append(f"{p}::canary::false")
            out.append(f"{p}::priority::{h.priority}")
            out.append(f"{p}::success_rate::{_number(h.success_rate)}")
            out.append(f"{p}::local_origin_success_rate::{_number(h.local_origin_success_rate)}")
    return "".join(line + "\n" for line in out)


def _socket_address_json(a: SocketAddress) -> dict[str, Any]:
    sa: dict[str, Any] = {"address": a.host}
    if a.port:
        sa["port_value"] = a.port
    return {"socket_address": sa}


def _host_json(h: HostStatus) -> dict[str, Any]:
    stats: list[dict[str, Any]] = []
    for name in _HOST_COUNTERS:
        v = getattr(h, name)
        stats.append({"value": str(v), "name": name} if v else {"name": name})
    for name in _HOST_GAUGES:
        v = getattr(h, name)
        entry: dict[str, Any] = {"type": "GAUGE"}
        if v:
            entry["value"] = str(v)
        entry["name"] = name
        stats.append(entry)
    health: dict[str, Any] = {}
    for flag in h.health_flags:
        if flag in _FLAG_TO_JSON:
            health[_FLAG_TO_JSON[flag]] = True
    eds = next((_FLAG_TO_EDS[f] for f in h.health_flags if f in _FLAG_TO_EDS), "HEALTHY")
    health["eds_health_status"] = eds
    out: dict[str, Any] = {
        "address": _socket_address_json(h.address),
        "stats": stats,
        "health_status": health,
        "weight": h.weight,
    }
    if h.hostname:
        out["hostname"] = h.hostname
    if h.priority:
        out["priority"] = h.priority
    loc = {
        k: v
        for k, v in (
            ("region", h.locality.region),
            ("zone", h.locality.zone),
            ("sub_zone", h.locality.sub_zone),
        )
        if v
    }
    out["locality"] = loc
    return out


def clusters_json(clusters: Sequence[ClusterStatus]) -> dict[str, Any]:
    """Envoy's /clusters?format=json document (proto JSON: 64-bit numbers as strings, zero
    values left out)."""
    statuses: list[dict[str, Any]] = []
    for c in clusters:
        entry: dict[str, Any] = {"name": c.name}
        if c.added_via_api:
            entry["added_via_api"] = True
        entry["host_statuses"] = [_host_json(h) for h in c.hosts]
        if c.circuit_breakers:
            thresholds = []
            for cb in c.circuit_breakers:
                t: dict[str, Any] = {}
                if cb.priority.upper() == "HIGH":
                    t["priority"] = "HIGH"
                t.update(
                    max_connections=cb.max_connections,
                    max_pending_requests=cb.max_pending_requests,
                    max_requests=cb.max_requests,
                    max_retries=cb.max_retries,
                )
                thresholds.append(t)
            entry["circuit_breakers"] = {"thresholds": thresholds}
        entry["observability_name"] = c.observability_name or c.name
        statuses.append(entry)
    return {"cluster_statuses": statuses}


def listeners_text(listeners: Sequence[ListenerStatus]) -> str:
    return "".join(f"{li.name}::{li.address}\n" for li in listeners)


def listeners_json(listeners: Sequence[ListenerStatus]) -> dict[str, Any]:
    return {
        "listener_statuses": [
            {"name": li.name, "local_address": _socket_address_json(li.address)} for li in listeners
        ]
    }


# ---------------------------------------------------------------------------------------------
# /config_dump filtering

_ADMIN_TYPE = "type.googleapis.com/envoy.admin.v3."

#: Element message of each repeated field of the admin ConfigDump messages (for ?resource=).
_ELEMENT_TYPES: dict[str, str] = {
    "static_clusters": "ClustersConfigDump.StaticCluster",
    "dynamic_active_clusters": "ClustersConfigDump.DynamicCluster",
    "dynamic_warming_clusters": "ClustersConfigDump.DynamicCluster",
    "static_listeners": "ListenersConfigDump.StaticListener",
    "dynamic_listeners": "ListenersConfigDump.DynamicListener",
    "static_route_configs": "RoutesConfigDump.StaticRouteConfig",
    "dynamic_route_configs": "RoutesConfigDump.DynamicRouteConfig",
    "inline_scoped_route_configs": "ScopedRoutesConfigDump.InlineScopedRouteConfigs",
    "dynamic_scoped_route_configs": "ScopedRoutesConfigDump.DynamicScopedRouteConfigs",
    "static_secrets": "SecretsConfigDump.StaticSecret",
    "dynamic_active_secrets": "SecretsConfigDump.DynamicSecret",
    "dynamic_warming_secrets": "SecretsConfigDump.DynamicSecret",
    "static_endpoint_configs": "EndpointsConfigDump.StaticEndpointConfig",
    "dynamic_endpoint_configs": "EndpointsConfigDump.DynamicEndpointConfig",
}


class _HttpError(Exception):
    def __init__(self, status: int, body: str, content_type: str = TEXT) -> None:
        super().__init__(body)
        self.status = status
        self.body = body
        self.content_type = content_type


def _resource_name(element: Any) -> str:
    if not isinstance(element, Mapping):
        return ""
    name = element.get("name")
    if isinstance(name, str):
        return name
    for value in element.values():
        if isinstance(value, Mapping) and isinstance(value.get("name"), str):
            return str(value["name"])
    return ""


def _mask(obj: Mapping[str, Any], paths: list[list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "@type" in obj:
        out["@type"] = obj["@type"]
    for path in paths:
        src: Any = obj
        dst = out
        for i, key in enumerate(path):
            if not isinstance(src, Mapping) or key not in src:
                break
            if i == len(path) - 1:
                dst[key] = src[key]
            elif isinstance(src[key], Mapping):
                dst = dst.setdefault(key, {})
                src = src[key]
            else:
                break  # a FieldMask path cannot go through a repeated or scalar field
    return out


#: What Envoy shows in place of an inline private key: base64 of "[redacted]".
REDACTED = {"inline_bytes": "W3JlZGFjdGVkXQ=="}
_SECRET_FIELDS = frozenset({"private_key", "password", "privateKey"})


def redact_private_keys(value: Any) -> Any:
    """``value`` with every inline private key (and key password) replaced as Envoy's
    /config_dump does; a key given by file name keeps its name (it says nothing secret)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key in _SECRET_FIELDS and isinstance(item, Mapping) and (
                "filename" not in item
            ):
                out[key] = dict(REDACTED)
            else:
                out[key] = redact_private_keys(item)
        return out
    if isinstance(value, list | tuple):
        return [redact_private_keys(item) for item in value]
    return value


def filter_config_dump(
    dump: Mapping[str, Any],
    *,
    resource: str = "",
    mask: str = "",
    name_regex: str = "",
    include_eds: bool = False,
) -> dict[str, Any]:
    """Apply /config_dump's query parameters to a full dump, as Envoy does.

    Raises ``_HttpError`` (400 for a bad regex, 404 for an unknown resource).
    """
    configs = [c for c in dump.get("configs", ()) if isinstance(c, Mapping)]
    if not include_eds:
        configs = [c for c in configs if c.get("@type") != _ADMIN_TYPE + "EndpointsConfigDump"]
    if name_regex:
        try:
            rx = re.compile(name_regex)
        except re.error as e:
            raise _HttpError(
                400, f"INVALID_ARGUMENT: Error while parsing name_regex from {name_regex}: {e}"
            ) from None
        kept: list[Mapping[str, Any]] = []
        for c in configs:
            if c.get("@type") == _ADMIN_TYPE + "BootstrapConfigDump":
                kept.append(c)
                continue
            kept.append(
                {
                    k: [e for e in v if rx.fullmatch(_resource_name(e))]
                    if isinstance(v, list)
                    else v
                    for k, v in c.items()
                }
            )
        configs = kept
    paths = [p.split(".") for p in mask.split(",") if p] if mask else []
    if resource:
        for c in configs:
            items = c.get(resource)
            if isinstance(items, list):
                element_type = _ELEMENT_TYPES.get(resource)
                parent = str(c.get("@type", ""))
                type_url = _ADMIN_TYPE + element_type if element_type else parent
                elements = [{"@type": type_url, **e} for e in items if isinstance(e, Mapping)]
                if paths:
                    elements = [_mask(e, paths) for e in elements]
                return {"configs": elements}
        raise _HttpError(404, f"{resource} not found in config dump", "text/plain")
    if paths:
        return {"configs": [_mask(c, paths) for c in configs]}
    return {"configs": [dict(c) for c in configs]}


# ---------------------------------------------------------------------------------------------
# HTTP plumbing


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: dict[str, str]
    keep_alive: bool
    http_version: str


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = TEXT
    after: Callable[[], object] | None = None
    """Run once the response has been written (for /quitquitquit)."""


def _text(body: str, status: int = 200) -> _Response:
    return _Response(status, body.encode(), TEXT)


def _json(doc: Any, *, pretty: bool = True) -> _Response:
    if pretty:
        data = json.dumps(doc, indent=1, ensure_ascii=False)
    else:
        data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return _Response(200, data.encode(), JSON)


def _parse_query(raw: str) -> dict[str, str]:
    """``a=1&b&c=%2F`` -> {"a": "1", "b": "", "c": "/"}. Only %-escapes are decoded ("+" stays
    "+", which matters in regexes); the last of repeated keys wins."""
    out: dict[str, str] = {}
    for part in raw.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        out[unquote(key)] = unquote(value)
    return out


class _Parser:
    """httptools callbacks for one connection; completed requests queue up in ``ready``."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[_Request] = deque()
        self.error: tuple[int, str] | None = None
        self.in_message = False
        self.in_headers = True
        self.header_bytes = 0
        self.header_count = 0
        self.body_bytes = 0
        self.expect_continue = False
        self.content_length: int | None = None
        self.url = bytearray()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.in_message = True
        self.in_headers = True
        self.header_count = 0
        self.body_bytes = 0
        self.content_length = None
        self.url = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.server.max_request_header_bytes:
            self._fail(431, "Request Header Fields Too Large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > self.server.max_headers:
            self._fail(431, "Request Header Fields Too Large")
        lname = name.lower()
        if lname == b"expect" and value.strip().lower() == b"100-continue":
            self.expect_continue = True
        elif lname == b"content-length":
            try:
                self.content_length = int(value)
            except ValueError:
                self._fail(400, "Bad Request")

    def on_headers_complete(self) -> None:
        self.in_headers = False
        if self.content_length is not None and self.content_length > self.server.max_body_bytes:
            self._fail(413, "Payload Too Large")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.server.max_body_bytes:
            self._fail(413, "Payload Too Large")

    def on_message_complete(self) -> None:
        try:
            url = httptools.parse_url(bytes(self.url))
        except httptools.HttpParserError:
            self._fail(400, "Bad Request")
        path = (url.path or b"/").decode("latin-1")
        query = _parse_query(url.query.decode("latin-1")) if url.query else {}
        self.ready.append(
            _Request(
                method=self.parser.get_method().decode("latin-1"),
                path=path,
                query=query,
                keep_alive=self.parser.should_keep_alive(),
                http_version=self.parser.get_http_version(),
            )
        )
        self.in_message = False
        self.in_headers = True
        self.header_bytes = 0
        self.expect_continue = False

    def _fail(self, status: int, reason: str) -> None:
        if self.error is None:
            self.error = (status, reason)
        raise _StopParsing


class _StopParsing(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Endpoint:
    path: str
    help: str
    handler: Callable[[_Request], Awaitable[_Response]]
    post_only: bool = False
    params: tuple[tuple[str, str], ...] = ()


_STATS_FORMATS = ("html", "active-html", "json", "prometheus", "text")
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1024 * 1024


class AdminServer:
    """Envoy-compatible admin HTTP server bound to ``address`` only."""

    def __init__(
        self,
        address: SocketAddress,
        hooks: AdminHooks,
        *,
        request_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        write_timeout: float = 30.0,
        handler_timeout: float = 30.0,
        max_request_header_bytes: int = 60 * 1024,
        max_headers: int = 100,
        max_body_bytes: int = 64 * 1024,
        max_connections: int = 128,
    ) -> None:
        self.address = address
        self.hooks = hooks
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.handler_timeout = handler_timeout
        self.max_request_header_bytes = max_request_header_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._endpoints: dict[str, _Endpoint] = {
            e.path: e
            for e in (
                _Endpoint("/", "Admin home page", self._home),
                _Endpoint("/certs", "print certs on machine", self._certs),
                _Endpoint(
                    "/clusters",
                    "upstream cluster status",
                    self._clusters,
                    params=(
                        ("format", "File format to use; One of (text, json)"),
                        ("filter", "Regular expression for filtering clusters by name"),
                    ),
                ),
                _Endpoint(
                    "/config_dump",
                    "dump current Envoy configs",
                    self._config_dump,
                    params=(
                        ("resource", "The resource to dump"),
                        ("mask", "The mask to apply, a comma-separated list of field paths"),
                        (
                            "name_regex",
                            "Dump only the currently loaded configurations whose names match "
                            "the specified regex",
                        ),
                        ("include_eds", "Dump currently loaded configuration including EDS"),
                    ),
                ),
                _Endpoint(
                    "/drain_listeners",
                    "drain listeners",
                    self._drain_listeners,
                    post_only=True,
                    params=(
                        (
                            "graceful",
                            "When draining listeners, enter a graceful drain period prior to "
                            "closing listeners",
                        ),
                        ("inboundonly", "Drains all inbound listeners"),
                    ),
                ),
                _Endpoint(
                    "/healthcheck/fail",
                    "cause the server to fail health checks",
                    self._healthcheck_fail,
                    post_only=True,
                ),
                _Endpoint(
                    "/healthcheck/ok",
                    "cause the server to pass health checks",
                    self._healthcheck_ok,
                    post_only=True,
                ),
                _Endpoint("/help", "print out list of admin commands", self._help),
                _Endpoint(
                    "/hot_restart_version",
                    "print the hot restart compatibility version",
                    self._hot_restart_version,
                ),
                _Endpoint(
                    "/listeners",
                    "print listener info",
                    self._listeners,
                    params=(("format", "File format to use; One of (text, json)"),),
                ),
                _Endpoint(
                    "/logging",
                    "query/change logging levels",
                    self._logging,
                    post_only=True,
                    params=(
                        (
                            "paths",
                            "Change multiple logging levels by setting to "
                            "<logger_name1>:<desired_level1>,<logger_name2>:<desired_level2>.",
                        ),
                        ("group", "Change given logger to desired level: <logger_name>:<level>."),
                        (
                            "level",
                            "desired logging level, this will change all loggers's level; "
                            "One of (" + ", ".join(LOG_LEVELS) + ")",
                        ),
                    ),
                ),
                _Endpoint("/quitquitquit", "exit the server", self._quit, post_only=True),
                _Endpoint(
                    "/ready",
                    "print server state, return 200 if LIVE, otherwise return 503",
                    self._ready,
                ),
                _Endpoint("/runtime", "print runtime values", self._runtime),
                _Endpoint(
                    "/server_info", "print server version/status information", self._server_info
                ),
                _Endpoint(
                    "/stats",
                    "print server stats",
                    self._stats,
                    params=(
                        (
                            "usedonly",
                            "Only include stats that have been written by system since restart",
                        ),
                        ("filter", "Regular expression for filtering stats"),
                        ("invert_filter", "Invert the filter regex"),
                        ("format", "Format to use; One of (html, active-html, text, json)"),
                        (
                            "type",
                            "Stat types to include.; One of (All, Counters, Histograms, Gauges, "
                            "TextReadouts)",
                        ),
                        (
                            "histogram_buckets",
                            "Histogram bucket display mode; One of (cumulative, disjoint, "
                            "detailed, summary)",
                        ),
                    ),
                ),
                _Endpoint(
                    "/stats/prometheus",
                    "print server stats in prometheus format",
                    self._stats_prometheus,
                    params=(
                        (
                            "usedonly",
                            "Only include stats that have been written by system since restart",
                        ),
                        ("filter", "Regular expression for filtering stats"),
                        ("invert_filter", "Invert the filter regex"),
                        (
                            "histogram_buckets",
                            "Histogram bucket display mode; One of (cumulative, summary)",
                        ),
                    ),
                ),
            )
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (``address.port`` may be 0)."""
        if self._server is not None:
            return self.port
        self._server = await asyncio.start_server(
            self._serve_connection,
            host=self.address.host,
            port=self.address.port,
            limit=16 * 1024,
        )
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        return self.port

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, close every connection and wait (up to ``timeout``) for their
        handlers. Safe to call more than once and from a hook (``quit``)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._connections.values()):
            writer.close()
        current = asyncio.current_task()
        pending = [t for t in self._connections if t is not current]
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for t in still:
                t.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout)

    # -- connections ----------------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections or self._server is None:
            writer.close()
            return
        self._connections[task] = writer
        try:
            await self._connection_loop(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:
            log.exception("admin: connection failed")
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _connection_loop(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        p = _Parser(self)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        upgraded = False
        while True:
            if p.in_message:
                if deadline is None:
                    deadline = loop.time() + self.request_timeout
                wait = deadline - loop.time()
            else:
                deadline = None
                wait = self.idle_timeout
            try:
                data = await asyncio.wait_for(reader.read(16 * 1024), max(wait, 0.0))
            except TimeoutError:
                if p.in_message:
                    await self._write_simple(writer, 408, "request timeout", close=True)
                    await self._linger(reader, writer)
                return
            if not data:
                return
            if p.in_headers:
                p.header_bytes += len(data)
            try:
                p.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                upgraded = True  # answer what was asked, then close (no protocol switch)
            except httptools.HttpParserError:
                # Our own limits are already in p.error; anything else is a malformed request.
                if p.error is None:
                    p.error = (400, "Bad Request")
            if (
                p.error is None
                and p.in_message
                and p.in_headers
                and p.header_bytes > self.max_request_header_bytes
            ):
                p.error = (431, "Request Header Fields Too Large")
            if p.error is not None:
                # Answer what was complete before the error, then the error, then close.
                while p.ready:
                    if not await self._respond(writer, p.ready.popleft(), force_close=False):
                        return
                status, reason = p.error
                await self._write_simple(writer, status, reason, close=True)
                await self._linger(reader, writer)
                return
            if p.expect_continue and not p.in_headers and p.in_message:
                p.expect_continue = False
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            while p.ready:
                req = p.ready.popleft()
                last = upgraded and not p.ready
                if not await self._respond(writer, req, force_close=last):
                    return
            if upgraded:
                return

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error answer: send FIN, then read and drop what the client still sends
        (at most ``_LINGER_BYTES`` for ``_LINGER_SECONDS``). Closing a socket with unread
        input makes the kernel send RST, which can destroy the answer before the client has
        read it (a client still uploading a too-large request would never see the 413)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _LINGER_SECONDS
        received = 0
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            while received < _LINGER_BYTES:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                data = await asyncio.wait_for(reader.read(64 * 1024), remaining)
                if not data:
                    break
                received += len(data)

    async def _respond(
        self, writer: asyncio.StreamWriter, req: _Request, force_close: bool
    ) -> bool:
        """Handle one request and write the response; False when the connection must close."""
        try:
            resp = await asyncio.wait_for(self._dispatch(req), self.handler_timeout)
        except TimeoutError:
            log.warning("admin: %s %s timed out", req.method, req.path)
            resp = _text("admin handler timed out\n", 503)
        keep_alive = req.keep_alive and not force_close and self._server is not None
        await self._write(writer, resp, head_only=req.method == "HEAD", keep_alive=keep_alive)
        if resp.after is not None:
            self._run_after(resp.after)
        return keep_alive

    def _run_after(self, fn: Callable[[], object]) -> None:
        loop = asyncio.get_running_loop()

        def call() -> None:
            try:
                result = fn()
            except Exception:
                log.exception("admin: post-response action failed")
                return
            if inspect.isawaitable(result):
                fut = asyncio.ensure_future(result)
                self._background.add(fut)
                fut.add_done_callback(self._background_done)

        loop.call_soon(call)

    def _background_done(self, fut: asyncio.Future[Any]) -> None:
        self._background.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("admin: post-response action failed", exc_info=fut.exception())

    async def _write(
        self, writer: asyncio.StreamWriter, resp: _Response, *, head_only: bool, keep_alive: bool
    ) -> None:
        try:
            reason = HTTPStatus(resp.status).phrase
        except ValueError:
            reason = "Unknown"
        headers = [
            f"HTTP/1.1 {resp.status} {reason}",
            f"content-type: {resp.content_type}",
            "cache-control: no-cache, max-age=0",
            "x-content-type-options: nosniff",
            f"date: {http_date(time.time())}",
            "server: envoy",
            f"content-length: {len(resp.body)}",
        ]
        if not keep_alive:
            headers.append("connection: close")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
        if not head_only and resp.body:
            writer.write(resp.body)
        await asyncio.wait_for(writer.drain(), self.write_timeout)

    async def _write_simple(
        self, writer: asyncio.StreamWriter, status: int, body: str, *, close: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self._write(writer, _text(body, status), head_only=False, keep_alive=not close)

    async def _dispatch(self, req: _Request) -> _Response:
        endpoint = self._endpoints.get(req.path)
        if endpoint is None:
            return _text("invalid path. " + self.help_text(), 404)
        if endpoint.post_only and req.method != "POST":
            return _text(f"Method {req.method} not allowed, POST required.", 405)
        try:
            return await endpoint.handler(req)
        except _HttpError as e:
            return _Response(e.status, e.body.encode(), e.content_type)
        except Exception as e:
            log.exception("admin: %s %s failed", req.method, req.path)
            return _text(f"admin handler failed: {type(e).__name__}: {e}\n", 500)

    # -- handlers ---------------------------------------------------------------------------------

    def help_text(self) -> str:
        lines = ["admin commands are:"]
        for e in sorted(self._endpoints.values(), key=lambda e: e.path):
            lines.append(f"  {e.path}{' (POST)' if e.post_only else ''}: {e.help}")
            lines.extend(f"      {name}: {text}" for name, text in e.params)
        return "".join(line + "\n" for line in lines)

    async def _help(self, req: _Request) -> _Response:
        return _text(self.help_text())

    async def _home(self, req: _Request) -> _Response:
        rows = []
        for e in sorted(self._endpoints.values(), key=lambda e: e.path):
            path = html.escape(e.path)
            if e.post_only:
                cell = (
                    f"<form action='{path}' method='post'>"
                    f"<button type='submit'>{path}</button></form>"
                )
            else:
                cell = f"<a href='{path}'>{path}</a>"
            rows.append(f"<tr><td>{cell}</td><td>{html.escape(e.help)}</td></tr>")
        page = (
            "<!DOCTYPE html>\n<html lang='en'>\n<head><title>Envoy Admin</title></head>\n"
            "<body>\n<table>\n" + "\n".join(rows) + "\n</table>\n</body>\n</html>\n"
        )
        return _Response(200, page.encode(), HTML)

    @staticmethod
    def _stats_query(req: _Request, *, buckets: HistogramBuckets) -> StatsQuery:
        from ubimesh.telemetry.render import StatsQuery, StatType

        q = req.query
        rx = None
        if q.get("filter"):
            try:
                rx = re.compile(q["filter"])
            except re.error as e:
                raise _HttpError(400, f"Invalid re2 regex: {e}") from None
        kind = StatType.ALL
        if "type" in q:
            try:
                kind = StatType(q["type"])
            except ValueError:
                raise _HttpError(400, "invalid &type= param") from None
        return StatsQuery(
            filter=rx,
            invert="invert_filter" in q,
            used_only="usedonly" in q,
            type=kind,
            histogram_buckets=buckets,
        )

    async def _stats(self, req: _Request) -> _Response:
        fmt = req.query.get("format", "text")
        if fmt not in _STATS_FORMATS:
            raise _HttpError(
                400, "usage: /stats?format=(html|active-html|json|prometheus|text)\n\n"
            )
        if fmt == "prometheus":
            return await self._stats_prometheus(req)
        from ubimesh.telemetry.render import HistogramBuckets, render_json, render_text

        mode = req.query.get("histogram_buckets", "summary")
        try:
            buckets = HistogramBuckets(mode)
        except ValueError:
            raise _HttpError(
                400, "usage: /stats?histogram_buckets=(cumulative|disjoint|detailed|summary)\n\n"
            ) from None
        query = self._stats_query(req, buckets=buckets)
        snap = await _resolve(self.hooks.stats_snapshot())
        if fmt == "json":
            return _Response(200, render_json(snap, query).encode(), JSON)
        text = render_text(snap, query)
        if fmt in ("html", "active-html"):
            page = (
                "<!DOCTYPE html>\n<html lang='en'>\n<head><title>Envoy Admin: stats</title>"
                "</head>\n<body>\n<pre>\n" + html.escape(text) + "</pre>\n</body>\n</html>\n"
            )
            return _Response(200, page.encode(), HTML)
        return _text(text)

    async def _stats_prometheus(self, req: _Request) -> _Response:
        mode = req.query.get("histogram_buckets", "cumulative")
        if mode not in ("cumulative", "summary"):
            raise _HttpError(400, "unsupported prometheus histogram bucket mode")
        from ubimesh.telemetry import prometheus
        from ubimesh.telemetry.render import HistogramBuckets

        buckets = HistogramBuckets(mode)
        query = self._stats_query(req, buckets=buckets)
        snap = await _resolve(self.hooks.stats_snapshot())
        body = prometheus.render(snap, query=query, histogram_buckets=buckets)
        return _Response(200, body.encode(), prometheus.CONTENT_TYPE)

    async def _server_info(self, req: _Request) -> _Response:
        return _json(dict(await _resolve(self.hooks.server_info())))

    async def _ready(self, req: _Request) -> _Response:
        if await _resolve(self.hooks.is_ready()):
            return _text("LIVE\n")
        info = await _resolve(self.hooks.server_info())
        state = str(info.get("state") or "PRE_INITIALIZING")
        return _text(f"{state}\n", 503)

    async def _hot_restart_version(self, req: _Request) -> _Response:
        info = await _resolve(self.hooks.server_info())
        return _text(str(info.get("hot_restart_version", "disabled")))

    async def _config_dump(self, req: _Request) -> _Response:
        q = req.query
        dump = redact_private_keys(await _resolve(self.hooks.config_dump()))
        doc = filter_config_dump(
            dump,
            resource=q.get("resource", ""),
            mask=q.get("mask", ""),
            name_regex=q.get("name_regex", ""),
            include_eds="include_eds" in q,
        )
        return _json(doc)

    async def _clusters(self, req: _Request) -> _Response:
        clusters = list(await _resolve(self.hooks.clusters()))
        flt = req.query.get("filter", "")
        if flt:
            try:
                rx = re.compile(flt)
            except re.error as e:
                raise _HttpError(400, f"Invalid re2 regex: {e}") from None
            clusters = [c for c in clusters if rx.search(c.name)]
        if req.query.get("format") == "json":
            return _json(clusters_json(clusters))
        return _text(clusters_text(clusters))

    async def _listeners(self, req: _Request) -> _Response:
        listeners = list(await _resolve(self.hooks.listeners()))
        if req.query.get("format") == "json":
            return _json(listeners_json(listeners))
        return _text(listeners_text(listeners))

    async def _runtime(self, req: _Request) -> _Response:
        return _json({"layers": [], "entries": {}})

    async def _certs(self, req: _Request) -> _Response:
        return _json({"certificates": []})

    async def _healthcheck_fail(self, req: _Request) -> _Response:
        await _resolve(self.hooks.set_healthcheck_failed(True))
        return _text("OK\n")

    async def _healthcheck_ok(self, req: _Request) -> _Response:
        await _resolve(self.hooks.set_healthcheck_failed(False))
        return _text("OK\n")

    async def _drain_listeners(self, req: _Request) -> _Response:
        await _resolve(
            self.hooks.drain_listeners(
                graceful="graceful" in req.query, inbound_only="inboundonly" in req.query
            )
        )
        return _text("OK\n")

    async def _quit(self, req: _Request) -> _Response:
        resp = _text("OK\n")
        resp.after = self.hooks.quit
        return resp

    async def _logging(self, req: _Request) -> _Response:
        usage = (
            "usage: /logging?<name>=<level> (change single level)\n"
            "usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)\n"
            "usage: /logging?level=<level> (change all levels)\n"
            "usage: /logging?group=<group_name>:<level> (change group of loggers)\n"
            "levels: " + " ".join(LOG_LEVELS) + " \n"
        )
        changes: dict[str, str] = {}
        for key, value in req.query.items():
            if key == "level":
                changes[""] = value
            elif key in ("paths", "group"):
                for item in value.split(","):
                    name, sep, level = item.rpartition(":")
                    if not sep or not name:
                        raise _HttpError(400, f"error: invalid {key} value\n\n{usage}")
                    changes[name] = level
            else:
                changes[key] = value
        if any(level not in LOG_LEVELS for level in changes.values()):
            raise _HttpError(400, f"error: unknown logger level\n\n{usage}")
        try:
            if isinstance(self.hooks, LogLevelHooks):
                levels = dict(await _resolve(self.hooks.set_log_levels(changes)))
            else:
                levels = apply_log_levels(changes)
        except KeyError as e:
            raise _HttpError(400, f"error: unknown logger name {e}\n\n{usage}") from None
        except ValueError:
            raise _HttpError(400, f"error: unknown logger level\n\n{usage}") from None
        body = "active loggers:\n" + "".join(f"  {n}: {lv}\n" for n, lv in sorted(levels.items()))
        return _text(body)
