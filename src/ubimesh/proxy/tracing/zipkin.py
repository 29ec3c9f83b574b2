"""Zipkin v2 JSON (``POST /api/v2/spans``): the body Envoy's Zipkin tracer sends.

Contract: a batch's body (``ZipkinBatch.body``, ``encode``) is exactly what ``orjson.dumps``
makes of its spans as dicts (``encode_dicts``: ``span_dict``, with ``Span.tag_dict``'s tags).

With the native build, a span whose tags come from its record (every span the HCM makes,
unless it has custom tags) is written as JSON text into the batch's body when it is added,
as its stream ends, by the C ``SpanText`` (``_zipkin_text.c``; its header is the contract):
its values are checked and copied into one buffer, and the body is one bytes object. A span
the C declines (a value that is not ASCII or needs escaping) and any other span is written
by orjson from its dict, in its place. Without the build, the batch keeps its spans and
writes the body from the dicts when it is sent. tests/unit/test_tracing_zipkin_text.py holds
the two ways to the same bytes; bench/telemetry_cpu.py --callgrind measures them (trace100).

The upstream members of a span (``upstream_cluster``, ``upstream_cluster.name`` and
``upstream_address``) are escaped by orjson once per cluster and address object and kept
(``_UPSTREAM_MEMBERS``, bounded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import orjson

from ubimesh.proxy.tracing.batch import SpanBatch
from ubimesh.proxy.tracing.local import LOCAL, LocalInfo, local_ipv4
from ubimesh.proxy.tracing.span import Span

if TYPE_CHECKING:
    from ubimesh.proxy.tracing._zipkin_text import SpanText

#: The upstream tag members (``upstream_cluster``, ``upstream_cluster.name`` and
#: ``upstream_address``) of an upstream address object and its cluster, escaped by orjson once
#: (``str`` of a frozen SocketAddress is interpreted code, about 2k instructions). Keyed by the
#: address object's id; the object is kept so the id stays its own.
_UPSTREAM_MEMBERS: Final[dict[int, tuple[object, str, str]]] = {}
_CLUSTER_MEMBERS: Final[dict[str, str]] = {}
_CACHE_MAX: Final = 1024


def _load_span_text_type() -> type[SpanText] | None:
    try:
        from ubimesh.proxy.tracing._zipkin_text import SpanText
    except ImportError:  # not built, or the compiled hot path is off (UBIMESH_NATIVE=0)
        return None
    return SpanText


#: Looked up when this module is imported, which the proxy does after ``native.enable()``.
_SPAN_TEXT_TYPE: Final = _load_span_text_type()


class ZipkinBatch(SpanBatch):
    """A batch of Zipkin spans; with ``text_type`` (the C ``SpanText``, by default the
    build's) each span is written into the body as it is added (module docstring); without
    it the batch keeps its spans. The local endpoint and node are this process's (``local``)
    when the batch is started."""

    __slots__ = ("endpoint", "text")

    def __init__(
        self, local: LocalInfo, text_type: type[SpanText] | None = _SPAN_TEXT_TYPE
    ) -> None:
        super().__init__()
        self.endpoint = _endpoint(local)
        self.text: SpanText | None = None
        if text_type is not None:
            # Values that come from the node (configuration) are escaped by orjson, once a
            # batch. The tags name the process's node (LOCAL), as Span.tag_dict does.
            head = (
                ',"localEndpoint":' + orjson.dumps(self.endpoint).decode()
                + ',"tags":{"node_id":' + orjson.dumps(LOCAL.node_id).decode()
                + ',"http.url":"'
            )  # fmt: skip
            zone_part = ',"zone":' + orjson.dumps(LOCAL.zone).decode() if LOCAL.zone else ""
            try:
                self.text = text_type(head, zone_part)
            except ValueError:  # a node value beyond ASCII: the dicts write this batch
                self.text = None

    def add(self, span: Span) -> None:
        text = self.text
        if text is None:
            super().add(span)
            return
        self.count += 1
        if span.tags is None and span.recorded and span.custom is None:
            upstream = ""
            cluster = span.cluster
            if cluster is not None:
                upstream = _LAST_UPSTREAM.members(cluster, span.upstream_address)
            if text(
                span.trace_id, span.span_id, span.parent_id, span.client, span.shared,
                span.start_us, span.duration_us, span.proto, span.host, span.path, span.method,
                span.downstream_cluster, span.user_agent, span.http10, span.peer,
                span.request_id, span.client_trace_id, span.request_size, span.response_size,
                upstream, span.status, span.response_flags, span.name,
            ):  # fmt: skip
                return
        # Custom or explicit tags, or a value the C declined: orjson writes it in its place.
        text.raw(orjson.dumps(span_dict(span, self.endpoint)))

    def body(self) -> bytes:
        text = self.text
        if text is None:
            return _dicts_body(self.spans, self.endpoint)
        return text.body()


def encode(spans: list[Span], local: LocalInfo) -> bytes:
    """A JSON array of Zipkin v2 spans, as a batch of them sends it. The local endpoint is
    this proxy: its service name is the node's cluster, as Envoy's; the port is left out."""
    batch = ZipkinBatch(local)
    for s in spans:
        batch.add(s)
    return batch.body()


def encode_dicts(spans: list[Span], local: LocalInfo) -> bytes:
    """``encode``'s body made from the spans as dicts (the reference the text must equal)."""
    return _dicts_body(spans, _endpoint(local))


def _dicts_body(spans: list[Span], endpoint: dict[str, Any]) -> bytes:
    return orjson.dumps([span_dict(s, endpoint) for s in spans])


def _endpoint(local: LocalInfo) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"serviceName": local.service}
    ipv4 = local_ipv4()
    if ipv4:
        endpoint["ipv4"] = ipv4
    return endpoint


def span_dict(s: Span, endpoint: dict[str, Any]) -> dict[str, Any]:
    """One span as Zipkin v2 JSON, before serialization."""
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
    return span


def _cluster_members(cluster: str) -> str:
    found = _CLUSTER_MEMBERS.get(cluster)
    if found is None:
        name = orjson.dumps(cluster).decode()
        found = ',"upstream_cluster":' + name + ',"upstream_cluster.name":' + name
        if len(_CLUSTER_MEMBERS) >= _CACHE_MAX:
            _CLUSTER_MEMBERS.clear()
        _CLUSTER_MEMBERS[cluster] = found
    return found


def _upstream_members(cluster: str, address: object) -> str:
    key = id(address)
    found = _UPSTREAM_MEMBERS.get(key)
    if found is not None and found[0] is address and found[1] == cluster:
        return found[2]
    text = _cluster_members(cluster) + ',"upstream_address":' + orjson.dumps(str(address)).decode()
    if len(_UPSTREAM_MEMBERS) >= _CACHE_MAX:
        _UPSTREAM_MEMBERS.clear()
    _UPSTREAM_MEMBERS[key] = (address, cluster, text)
    return text


class _LastUpstream:
    """The upstream members of the last span's cluster and address, keyed on the very
    objects (held, so their ids stay theirs): steady traffic goes to few upstreams, and two
    pointer comparisons cost less than the caches' lookups."""

    __slots__ = ("address", "cluster", "text")

    def __init__(self) -> None:
        self.cluster: str | None = None
        self.address: object = None
        self.text = ""

    def members(self, cluster: str, address: object) -> str:
        """``cluster``'s members, and ``address``'s unless it is None."""
        if cluster is self.cluster and address is self.address:
            return self.text
        text = _cluster_members(cluster) if address is None else _upstream_members(cluster, address)
        self.cluster = cluster
        self.address = address
        self.text = text
        return text


_LAST_UPSTREAM: Final = _LastUpstream()
