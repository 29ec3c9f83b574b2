"""OTLP/HTTP JSON (``POST /v1/traces``): an ExportTraceServiceRequest built as plain dicts
(hex ids and integer enums, as the OTLP JSON mapping wants)."""

from __future__ import annotations

from typing import Any

import orjson

from ubimesh import __version__
from ubimesh.proxy.tracing.batch import SpanBatch
from ubimesh.proxy.tracing.local import LOCAL, LocalInfo
from ubimesh.proxy.tracing.span import Span

_SERVER = 2
_CLIENT = 3
_ERROR = 2
#: W3C flags plus "is-remote known" (0x100) and "parent is remote" (0x200).
_REMOTE_PARENT = 0x300
_LOCAL_ROOT = 0x100


class OtlpBatch(SpanBatch):
    """A batch of OpenTelemetry spans: kept as they are added, written by ``body``."""

    __slots__ = ("service_name",)

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name

    def body(self) -> bytes:
        return encode(self.spans, LOCAL, self.service_name)


def encode(spans: list[Span], local: LocalInfo, service_name: str) -> bytes:
    """One resource (this proxy: ``service.name``), one scope, the spans."""
    out = []
    for s in spans:
        tags = s.tag_dict()
        start_ns = s.start_us * 1000
        span: dict[str, Any] = {
            "traceId": s.trace_id if len(s.trace_id) == 32 else s.trace_id.rjust(32, "0"),
            "spanId": s.span_id,
            "name": s.name or "ingress",
            "kind": _CLIENT if s.client else _SERVER,
            "startTimeUnixNano": str(start_ns),
            "endTimeUnixNano": str(start_ns + s.duration_us * 1000),
            "flags": (1 if s.sampled else 0) | (_REMOTE_PARENT if s.parent_id else _LOCAL_ROOT),
            "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in tags.items()],
        }
        if s.parent_id:
            span["parentSpanId"] = s.parent_id
        if s.tracestate:
            span["traceState"] = s.tracestate
        if tags.get("error") == "true":
            span["status"] = {"code": _ERROR}
        out.append(span)
    resource = [
        {"key": "service.name", "value": {"stringValue": service_name}},
        {"key": "telemetry.sdk.name", "value": {"stringValue": "ubimesh"}},
    ]
    if local.node_id:
        resource.append({"key": "service.instance.id", "value": {"stringValue": local.node_id}})
    return orjson.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {"attributes": resource},
                    "scopeSpans": [
                        {"scope": {"name": "ubimesh", "version": __version__}, "spans": out}
                    ],
                }
            ]
        }
    )
