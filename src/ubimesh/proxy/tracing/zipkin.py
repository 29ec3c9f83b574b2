"""Zipkin v2 JSON (``POST /api/v2/spans``): the body Envoy's Zipkin tracer sends."""

from __future__ import annotations

from typing import Any

import orjson

from ubimesh.proxy.tracing.local import LocalInfo, local_ipv4
from ubimesh.proxy.tracing.span import Span


def encode(spans: list[Span], local: LocalInfo) -> bytes:
    """A JSON array of Zipkin v2 spans. The local endpoint is this proxy: its service name is
    the node's cluster, as Envoy's; the port is left out (unknown)."""
    endpoint: dict[str, Any] = {"serviceName": local.service}
    ipv4 = local_ipv4()
    if ipv4:
        endpoint["ipv4"] = ipv4
    out = []
    # Each span's tags are built here, from its record, rather than on the request path; the
    # batch is then encoded in one orjson call.
    for s in spans:
        span: dict[str, Any] = {
            "traceId": s.trace_id,
            "id": s.span_id,
            "kind": "CLIENT" if s.client else "SERVER",
            "timestamp": s.start_us,
            "duration": s.duration_us,
            "localEndpoint": endpoint,
            "tags": s.tag_dict(),
        }
        if s.name:
            span["name"] = s.name
        if s.parent_id:
            span["parentId"] = s.parent_id
        if s.shared:
            span["shared"] = True
        out.append(span)
    return orjson.dumps(out)
