"""The collector's HTTP routes: ingest (Zipkin v2, OTLP/HTTP JSON) and Zipkin's v2 query API.

Contract:

- ``POST /api/v2/spans``: a JSON array of Zipkin v2 spans -> 202 (empty body); 400 naming the
  span index and field; 413 over ``max_body`` bytes or ``max_request_spans`` spans; 415 for
  anything but JSON; 503 with ``Retry-After`` when the write queue is full.
- ``POST /v1/traces``: an OTLP ExportTraceServiceRequest in JSON -> 200 ``{}``; errors as
  above with a ``google.rpc.Status``-shaped JSON body (``{"code": 3, "message": ...}``);
  ``application/x-protobuf`` is answered 415 (only JSON is supported).
- Both accept ``Content-Encoding: gzip``; the size bound applies to the decoded body.
- ``GET /api/v2/services``, ``/spans?serviceName=``, ``/remoteServices?serviceName=``,
  ``/traces``, ``/trace/{traceId}``, ``/traceMany?traceIds=``, ``/dependencies``,
  ``/autocompleteKeys``, ``/autocompleteValues``: Zipkin's shapes; ``GET /health``.

:func:`add_collector` mounts all of it on an existing aiohttp app (the control plane's), and
starts and stops the collector with that app.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import web

from ubimesh.collector.model import IngestError, Row, normalize_trace_id, otlp_rows, zipkin_rows
from ubimesh.collector.store import SpanStore, TraceQuery, now_us, parse_annotation_query
from ubimesh.collector.writer import SpanWriter

T = TypeVar("T")

DEFAULT_RETENTION_S = 24 * 3600.0
DEFAULT_LOOKBACK_MS = 24 * 3600 * 1000
MAX_QUERY_LIMIT = 10_000


@dataclass
class CollectorOptions:
    """Where the spans live and the collector's limits (docs/telemetry.md)."""

    data_dir: Path
    retention_s: float = DEFAULT_RETENTION_S
    max_spans: int = 0
    max_body: int = 16 * 1024 * 1024
    max_request_spans: int = 10_000
    #: Spans accepted but not yet written, at most (beyond: 503).
    max_queued: int = 200_000
    sweep_interval_s: float = 10.0


class Collector:
    """The writer (background thread) and a read connection; :meth:`routes` serves them."""

    def __init__(self, options: CollectorOptions) -> None:
        self.options = options
        self.writer = SpanWriter(options.data_dir, max_queued=options.max_queued,
                                 retention_s=options.retention_s, max_spans=options.max_spans,
                                 sweep_interval_s=options.sweep_interval_s)
        self.reader = SpanStore(options.data_dir)
        # Queries run in a worker thread (one at a time on the read connection) so a slow
        # one never stalls ingest on the event loop.
        self._read_lock = asyncio.Lock()

    def start(self) -> None:
        self.writer.start()

    def stop(self) -> None:
        self.writer.stop()
        self.reader.close()

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._read_lock:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, functools.partial(fn, *args))

    # -- ingest ----------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> bytes:
        """The request body (decoded from gzip by aiohttp), at most ``max_body`` bytes."""
        limit = self.options.max_body
        if request.content_length is not None and request.content_length > limit:
            raise IngestError(f"body over {limit} bytes", 413)
        chunks = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise IngestError(f"body over {limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _ingest(self, request: web.Request,
                      decode: Callable[[bytes, int, int], list[Row]]) -> tuple[int, str]:
        """Decode, validate and queue; (status, message) for the caller to shape."""
        ctype = request.content_type
        if ctype not in ("application/json", "text/plain", "application/octet-stream") and ctype:
            return 415, (f"unsupported Content-Type {ctype!r}; this collector accepts "
                         "application/json")
        try:
            body = await self._body(request)
            rows = decode(body, now_us(), self.options.max_request_spans)
        except IngestError as exc:
            return exc.status, str(exc)
        if rows and not self.writer.offer(rows):
            return 503, "the write queue is full; retry later"
        return 0, ""

    async def post_zipkin(self, request: web.Request) -> web.StreamResponse:
        status, message = await self._ingest(request, zipkin_rows)
        if status:
            headers = {"Retry-After": "1"} if status == 503 else None
            return web.Response(status=status, text=message + "\n", headers=headers)
        return web.Response(status=202)

    async def post_otlp(self, request: web.Request) -> web.StreamResponse:
        status, message = await self._ingest(request, otlp_rows)
        if status:
            headers = {"Retry-After": "1"} if status == 503 else None
            # google.rpc.Status codes: 3 INVALID_ARGUMENT, 8 RESOURCE_EXHAUSTED,
            # 14 UNAVAILABLE
            code = {503: 14, 413: 8}.get(status, 3)
            return web.json_response({"code": code, "message": message}, status=status,
                                     headers=headers)
        return web.json_response({})

    # -- queries ---------------------------------------------------------------------------

    async def services(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._read(self.reader.services))

    async def span_names(self, request: web.Request) -> web.StreamResponse:
        service = _required(request, "serviceName").lower()
        return _json(await self._read(self.reader.span_names, service))

    async def remote_services(self, request: web.Request) -> web.StreamResponse:
        service = _required(request, "serviceName").lower()
        return _json(await self._read(self.reader.remote_services, service))

    async def traces(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        query = TraceQuery(
            end_ts_ms=_int(request, "endTs", int(time.time() * 1000)),
            lookback_ms=_int(request, "lookback", DEFAULT_LOOKBACK_MS),
            limit=min(_int(request, "limit", 10), MAX_QUERY_LIMIT),
            service=q.get("serviceName", "").lower(),
            remote_service=q.get("remoteServiceName", "").lower(),
            span_name=q.get("spanName", "").lower(),
            min_duration=_int(request, "minDuration", None),
            max_duration=_int(request, "maxDuration", None),
            annotation_query=parse_annotation_query(q.get("annotationQuery", "")),
        )
        if query.span_name == "all":  # Zipkin's UI sends "all" for any name
            query.span_name = ""
        return _raw_json(await self._read(self.reader.find_traces, query))

    async def trace(self, request: web.Request) -> web.StreamResponse:
        trace_id = _trace_id(request.match_info["traceId"])
        body = await self._read(self.reader.trace, trace_id)
        if body is None:
            return web.Response(status=404, text=f"trace {trace_id} not found\n")
        return _raw_json(body)

    async def trace_many(self, request: web.Request) -> web.StreamResponse:
        ids = [_trace_id(t) for t in _required(request, "traceIds").split(",") if t.strip()]
        return _raw_json(await self._read(self.reader.traces_by_id, ids))

    async def dependencies(self, request: web.Request) -> web.StreamResponse:
        end_ts = _int(request, "endTs", None)
        if end_ts is None:
            raise web.HTTPBadRequest(text="endTs is required\n")
        lookback = _int(request, "lookback", end_ts)
        return _json(await self._read(self.reader.dependencies, end_ts, lookback))

    async def autocomplete(self, request: web.Request) -> web.StreamResponse:
        return _json([])  # no autocompleteKeys are configured

    async def health(self, request: web.Request) -> web.StreamResponse:
        w = self.writer
        spans = await self._read(self.reader.count)
        return _json({"status": "UP", "zipkin": {"status": "UP"}, "spans": spans,
                      "queuedSpans": w.pending, "writtenSpans": w.written,
                      "rejectedSpans": w.rejected, "deletedSpans": w.deleted})

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/v2/spans", self.post_zipkin),
            web.post("/v1/traces", self.post_otlp),
            web.get("/api/v2/services", self.services),
            web.get("/api/v2/spans", self.span_names),
            web.get("/api/v2/remoteServices", self.remote_services),
            web.get("/api/v2/traces", self.traces),
            web.get("/api/v2/trace/{traceId}", self.trace),
            web.get("/api/v2/traceMany", self.trace_many),
            web.get("/api/v2/dependencies", self.dependencies),
            web.get("/api/v2/autocompleteKeys", self.autocomplete),
            web.get("/api/v2/autocompleteValues", self.autocomplete),
            web.get("/health", self.health),
        ]


def add_collector(app: web.Application, options: CollectorOptions) -> Collector:
    """Mount the collector's routes on ``app`` (not yet started) and start/stop the
    collector with it. Returns the collector."""
    collector = Collector(options)
    app.add_routes(collector.routes())

    async def on_startup(_: web.Application) -> None:
        collector.start()

    async def on_cleanup(_: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, collector.stop)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return collector


def _json(value: Any) -> web.Response:
    return _raw_json(orjson.dumps(value))


def _raw_json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


def _required(request: web.Request, name: str) -> str:
    value = request.query.get(name, "")
    if not value:
        raise web.HTTPBadRequest(text=f"{name} is required\n")
    return value


def _int(request: web.Request, name: str, default: Any) -> Any:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: {value!r} is not an integer\n") from None
    if number < 0:
        raise web.HTTPBadRequest(text=f"{name}: must not be negative\n")
    return number


def _trace_id(text: str) -> str:
    try:
        return normalize_trace_id(text.strip(), "traceId", "value")
    except IngestError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
