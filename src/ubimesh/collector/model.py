"""Decode, validate and normalize spans into storage rows.

Contract: :func:`zipkin_rows` takes a Zipkin v2 JSON body (an array of spans) and
:func:`otlp_rows` an OTLP/HTTP JSON body (``ExportTraceServiceRequest``); both return one
:data:`Row` per span, or raise :class:`IngestError` naming the span (its index, or its path in
the OTLP document) and the field. Nothing is stored from a request that has an error.

Normalization follows Zipkin's: ids and service and span names are lowercased; a 32-digit
trace id whose high 64 bits are zero is the 64-bit id (so a Zipkin trace exported through OTLP,
which left-pads ids, still joins). OTLP spans are mapped onto Zipkin's model (see
:func:`otlp_span_to_zipkin`), so both ingest paths store the same thing.

The row's last item is the span as Zipkin v2 JSON (normalized), which the query API returns
as is: reading a trace never re-encodes spans.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

#: (trace_id, span_id, parent_id, service, name, kind, timestamp µs, duration µs,
#:  remote_service, error 0/1, span JSON)
Row = tuple[str, str, str, str, str, str, int, int, str, int, bytes]

KINDS = frozenset(("CLIENT", "SERVER", "PRODUCER", "CONSUMER"))
#: OTLP SpanKind numbers (and their enum names, which some exporters send) -> Zipkin kind.
OTLP_KINDS: dict[Any, str] = {
    2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER",
    "SPAN_KIND_SERVER": "SERVER", "SPAN_KIND_CLIENT": "CLIENT",
    "SPAN_KIND_PRODUCER": "PRODUCER", "SPAN_KIND_CONSUMER": "CONSUMER",
}
OTLP_LOCAL_KINDS = frozenset((0, 1, "SPAN_KIND_UNSPECIFIED", "SPAN_KIND_INTERNAL"))

_TRACE_ID = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_ZERO64 = "0" * 16
_INT64_MAX = (1 << 63) - 1


class IngestError(ValueError):
    """A request that cannot be accepted: ``status`` (400, 413) and a message for the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _load(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(f"malformed JSON: {exc}") from None


def normalize_trace_id(value: object, where: str, field: str = "traceId") -> str:
    """``value`` as a lowercase 16- or 32-digit hex trace id (64-bit ids padded to 128 bits
    with zeros come back as 16 digits); IngestError naming ``where`` and ``field``."""
    if not isinstance(value, str):
        raise IngestError(f"{where}.{field}: missing or not a string")
    tid = value if value.islower() or value.isdigit() else value.lower()
    if _TRACE_ID.fullmatch(tid) is None:
        raise IngestError(f"{where}.{field}: {value!r} is not 16 or 32 hex digits")
    if len(tid) == 32 and tid.startswith(_ZERO64):
        tid = tid[16:]
    if tid == _ZERO64:
        raise IngestError(f"{where}.{field}: all zeros is not a valid id")
    return tid


def _span_id(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise IngestError(f"{where}.{field}: missing or not a string")
    sid = value if value.islower() or value.isdigit() else value.lower()
    if _SPAN_ID.fullmatch(sid) is None:
        raise IngestError(f"{where}.{field}: {value!r} is not 16 hex digits")
    if sid == _ZERO64:
        raise IngestError(f"{where}.{field}: all zeros is not a valid id")
    return sid


def _micros(value: object, where: str, field: str) -> int:
    if type(value) is not int or value < 0 or value > _INT64_MAX:
        raise IngestError(f"{where}.{field}: {value!r} is not a non-negative integer (µs)")
    return value


def _endpoint(value: object, where: str, field: str) -> str:
    """Validate an Endpoint in place (lowercasing serviceName); returns the service name."""
    if not isinstance(value, dict):
        raise IngestError(f"{where}.{field}: not an object")
    port = value.get("port")
    if port is not None and (type(port) is not int or not 0 <= port <= 65535):
        raise IngestError(f"{where}.{field}.port: {port!r} is not a port number")
    service = value.get("serviceName")
    if service is None:
        return ""
    if not isinstance(service, str):
        raise IngestError(f"{where}.{field}.serviceName: not a string")
    if not service.islower():
        service = service.lower()
        value["serviceName"] = service
    return service


def zipkin_span_row(span: object, where: str, now_us: int) -> Row:
    """Validate and normalize one Zipkin v2 span (a decoded JSON object, changed in place)."""
    if not isinstance(span, dict):
        raise IngestError(f"{where}: not a JSON object")
    get = span.get
    trace_id = normalize_trace_id(get("traceId"), where)
    if trace_id is not span["traceId"]:
        span["traceId"] = trace_id
    span_id = _span_id(get("id"), where, "id")
    if span_id is not span["id"]:
        span["id"] = span_id
    parent = get("parentId")
    if parent is None:
        parent_id = ""
    else:
        parent_id = _span_id(parent, where, "parentId")
        if parent_id is not parent:
            span["parentId"] = parent_id
    name = get("name")
    if name is None:
        name = ""
    elif not isinstance(name, str):
        raise IngestError(f"{where}.name: not a string")
    elif not name.islower():
        name = name.lower()
        span["name"] = name
    kind = get("kind")
    if kind is None:
        kind = ""
    elif kind not in KINDS:
        raise IngestError(f"{where}.kind: {kind!r} is not one of CLIENT, SERVER, PRODUCER, "
                          "CONSUMER")
    timestamp = get("timestamp")
    # A span without a timestamp (a late, shared half) is indexed at its arrival time.
    ts = now_us if timestamp is None else _micros(timestamp, where, "timestamp")
    duration = get("duration")
    dur = 0 if duration is None else _micros(duration, where, "duration")
    local = get("localEndpoint")
    service = "" if local is None else _endpoint(local, where, "localEndpoint")
    remote = get("remoteEndpoint")
    remote_service = "" if remote is None else _endpoint(remote, where, "remoteEndpoint")
    tags = get("tags")
    error = 0
    if tags is not None:
        if not isinstance(tags, dict):
            raise IngestError(f"{where}.tags: not an object")
        for key, value in tags.items():
            if not isinstance(value, str):
                raise IngestError(f"{where}.tags.{key}: value {value!r} is not a string")
        error = 1 if "error" in tags else 0
    annotations = get("annotations")
    if annotations is not None:
        if not isinstance(annotations, list):
            raise IngestError(f"{where}.annotations: not an array")
        for i, annotation in enumerate(annotations):
            if not isinstance(annotation, dict) or not isinstance(annotation.get("value"), str):
                raise IngestError(f"{where}.annotations[{i}]: needs a string value")
            _micros(annotation.get("timestamp"), where, f"annotations[{i}].timestamp")
    return (trace_id, span_id, parent_id, service, name, kind, ts, dur, remote_service, error,
            orjson.dumps(span))


def zipkin_rows(body: bytes, now_us: int, max_spans: int) -> list[Row]:
    """Rows for a Zipkin v2 ``POST /api/v2/spans`` body; IngestError ("span 3: ...") else."""
    spans = _load(body)
    if not isinstance(spans, list):
        raise IngestError("expected a JSON array of spans")
    if len(spans) > max_spans:
        raise IngestError(f"{len(spans)} spans in one request; the limit is {max_spans}", 413)
    return [zipkin_span_row(span, f"span {i}", now_us) for i, span in enumerate(spans)]


# -- OTLP ---------------------------------------------------------------------------------


def any_value_text(value: object) -> str:
    """An OTLP AnyValue as a Zipkin tag string (scalars as text, arrays and maps as JSON)."""
    if not isinstance(value, dict):
        return ""
    if "stringValue" in value:
        return str(value["stringValue"])
    if "boolValue" in value:
        return "true" if value["boolValue"] else "false"
    if "intValue" in value:
        return str(value["intValue"])
    if "doubleValue" in value:
        return str(value["doubleValue"])
    if "arrayValue" in value:
        items = (value["arrayValue"] or {}).get("values") or []
        return orjson.dumps([any_value_text(item) for item in items]).decode()
    if "kvlistValue" in value:
        pairs = (value["kvlistValue"] or {}).get("values") or []
        return orjson.dumps({p.get("key", ""): any_value_text(p.get("value"))
                             for p in pairs if isinstance(p, dict)}).decode()
    if "bytesValue" in value:
        return str(value["bytesValue"])
    return ""


def _attributes(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, list):
        raise IngestError(f"{where}.attributes: not an array")
    out: dict[str, str] = {}
    for i, kv in enumerate(value):
        if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
            raise IngestError(f"{where}.attributes[{i}]: needs a string key")
        out[kv["key"]] = any_value_text(kv.get("value"))
    return out


def _nanos(value: object, where: str, field: str) -> int:
    """A fixed64 nanosecond time: a decimal string or a number (proto3 JSON allows both)."""
    if type(value) is int:
        nanos = value
    elif isinstance(value, str) and value.isdigit():
        nanos = int(value)
    else:
        raise IngestError(f"{where}.{field}: missing or not an integer (ns)")
    if nanos < 0 or nanos > (1 << 64) - 1:
        raise IngestError(f"{where}.{field}: out of range")
    return nanos


#: OTLP attributes that describe the peer, read into Zipkin's remoteEndpoint (older and
#: current semantic-convention names).
_PEER_SERVICE = "peer.service"
_PEER_IP = ("net.peer.ip", "network.peer.address", "server.address", "net.sock.peer.addr")
_PEER_PORT = ("net.peer.port", "network.peer.port", "server.port", "net.sock.peer.port")


def _remote_endpoint(tags: dict[str, str]) -> dict[str, Any] | None:
    endpoint: dict[str, Any] = {}
    service = tags.get(_PEER_SERVICE)
    if service:
        endpoint["serviceName"] = service.lower()
    for key in _PEER_IP:
        ip = tags.get(key)
        if ip:
            endpoint["ipv6" if ":" in ip else "ipv4"] = ip
            break
    for key in _PEER_PORT:
        port = tags.get(key, "")
        if port.isdigit() and 0 < int(port) <= 65535:
            endpoint["port"] = int(port)
            break
    return endpoint or None


def otlp_span_to_zipkin(span: object, where: str, service: str,
                        scope: dict[str, str]) -> dict[str, Any]:
    """One OTLP/JSON span as a Zipkin v2 span (a dict in Zipkin's JSON shape).

    Mapping (docs/telemetry.md): ids hex, lowercased; ``kind`` 2..5 -> SERVER, CLIENT,
    PRODUCER, CONSUMER (0, 1 -> absent); times ns -> µs (duration rounded up, at least 1);
    attributes -> tags (non-strings as text); ``peer.service`` / ``net.peer.ip`` /
    ``net.peer.port`` (and their newer names) -> remoteEndpoint; events -> annotations;
    ``status.code`` 1 -> tag ``otel.status_code=OK``, 2 -> ``otel.status_code=ERROR`` and
    ``error=<message or "true">``; the scope -> ``otel.scope.name`` / ``otel.scope.version``.
    """
    if not isinstance(span, dict):
        raise IngestError(f"{where}: not a JSON object")
    trace_id = normalize_trace_id(span.get("traceId"), where)
    span_id = _span_id(span.get("spanId"), where, "spanId")
    out: dict[str, Any] = {"traceId": trace_id, "id": span_id}
    parent = span.get("parentSpanId")
    if parent:
        out["parentId"] = _span_id(parent, where, "parentSpanId")
    name = span.get("name")
    if not isinstance(name, str) or not name:
        raise IngestError(f"{where}.name: missing or empty")
    kind = span.get("kind", 0)
    if kind in OTLP_KINDS:
        out["kind"] = OTLP_KINDS[kind]
    elif kind not in OTLP_LOCAL_KINDS:
        raise IngestError(f"{where}.kind: {kind!r} is not a SpanKind (0-5)")
    out["name"] = name.lower()
    start = _nanos(span.get("startTimeUnixNano"), where, "startTimeUnixNano")
    end = _nanos(span.get("endTimeUnixNano"), where, "endTimeUnixNano")
    if end < start:
        raise IngestError(f"{where}.endTimeUnixNano: before startTimeUnixNano")
    out["timestamp"] = start // 1000
    out["duration"] = max(1, -((start - end) // 1000))  # ceil: Zipkin rounds sub-µs up
    if service:
        out["localEndpoint"] = {"serviceName": service}
    tags = _attributes(span.get("attributes"), where)
    remote = _remote_endpoint(tags)
    if remote is not None:
        out["remoteEndpoint"] = remote
    events = span.get("events")
    if events:
        if not isinstance(events, list):
            raise IngestError(f"{where}.events: not an array")
        annotations = []
        for i, event in enumerate(events):
            if not isinstance(event, dict) or not isinstance(event.get("name"), str):
                raise IngestError(f"{where}.events[{i}].name: missing or not a string")
            nanos = _nanos(event.get("timeUnixNano"), where, f"events[{i}].timeUnixNano")
            annotations.append({"timestamp": nanos // 1000, "value": event["name"]})
        out["annotations"] = annotations
    status = span.get("status")
    if status is not None:
        if not isinstance(status, dict):
            raise IngestError(f"{where}.status: not an object")
        code = status.get("code", 0)
        if code in (2, "STATUS_CODE_ERROR"):
            tags["otel.status_code"] = "ERROR"
            tags["error"] = str(status.get("message") or "true")
        elif code in (1, "STATUS_CODE_OK"):
            tags["otel.status_code"] = "OK"
        elif code not in (0, "STATUS_CODE_UNSET"):
            raise IngestError(f"{where}.status.code: {code!r} is not 0, 1 or 2")
    tags.update(scope)
    if tags:
        out["tags"] = tags
    return out


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise IngestError(f"{where}: not an array")
    return value


def otlp_rows(body: bytes, now_us: int, max_spans: int) -> list[Row]:
    """Rows for an OTLP/HTTP JSON ``POST /v1/traces`` body (ExportTraceServiceRequest);
    IngestError naming e.g. ``resourceSpans[0].scopeSpans[1].spans[3].spanId`` else."""
    request = _load(body)
    if not isinstance(request, dict):
        raise IngestError("expected an ExportTraceServiceRequest JSON object")
    rows: list[Row] = []
    for r, resource_spans in enumerate(_list(request.get("resourceSpans"), "resourceSpans")):
        rwhere = f"resourceSpans[{r}]"
        if not isinstance(resource_spans, dict):
            raise IngestError(f"{rwhere}: not an object")
        resource = resource_spans.get("resource") or {}
        if not isinstance(resource, dict):
            raise IngestError(f"{rwhere}.resource: not an object")
        service = _attributes(resource.get("attributes"), f"{rwhere}.resource").get(
            "service.name", "").lower()
        # instrumentationLibrarySpans: the name before OTLP 0.15, still sent by old exporters
        scopes = resource_spans.get("scopeSpans") or resource_spans.get(
            "instrumentationLibrarySpans")
        for s, scope_spans in enumerate(_list(scopes, f"{rwhere}.scopeSpans")):
            swhere = f"{rwhere}.scopeSpans[{s}]"
            if not isinstance(scope_spans, dict):
                raise IngestError(f"{swhere}: not an object")
            scope = scope_spans.get("scope") or scope_spans.get("instrumentationLibrary") or {}
            scope_tags: dict[str, str] = {}
            if isinstance(scope, dict):
                if scope.get("name"):
                    scope_tags["otel.scope.name"] = str(scope["name"])
                if scope.get("version"):
                    scope_tags["otel.scope.version"] = str(scope["version"])
            spans = _list(scope_spans.get("spans"), f"{swhere}.spans")
            if len(rows) + len(spans) > max_spans:
                raise IngestError(f"more than {max_spans} spans in one request", 413)
            for i, span in enumerate(spans):
                zipkin = otlp_span_to_zipkin(span, f"{swhere}.spans[{i}]", service, scope_tags)
                rows.append(zipkin_span_row(zipkin, f"{swhere}.spans[{i}]", now_us))
    return rows
