"""Spans of the HTTP connection manager, with Envoy's semantics.

``HcmTracer`` is built once per HCM (per snapshot). For each request it makes the trace
decision (``sampler``), reads the caller's trace context (``context``), starts one span for
the stream and writes this hop's context into the request headers, which the router forwards
upstream. When the stream ends, a sampled span gets Envoy's standard tags and goes to the
provider's exporter, which sends it later in a batch; nothing here waits on the network.

Span identity, as Envoy's tracers make it (checked against Envoy 1.40):

* Zipkin, ingress (listener not OUTBOUND): a SERVER span. With ``shared_span_context`` (the
  default) it reuses the caller's span id and parent id, and is reported ``shared``; without,
  it gets a new id whose parent is the caller's span. A root span's trace id is its span id
  (plus 64 random high bits with ``trace_id_128bit``).
* Zipkin, egress (OUTBOUND): a CLIENT span with a new id, child of the caller's span.
* OpenTelemetry: a new span id, child of the traceparent's parent id; SERVER or CLIENT kind;
  named "ingress" or "egress <host>" (Zipkin spans are named after the Host).
* The sampling flag that came with the context wins over this hop's decision; a Zipkin request
  whose B3 headers are malformed is not traced at all and its headers pass untouched (Envoy).
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from ubimesh.proxy.snapshot.types import (
    CustomTag,
    CustomTagKind,
    Route,
    TracingConfig,
    TracingProviderKind,
)
from ubimesh.proxy.tracing import context as tc
from ubimesh.proxy.tracing import sampler
from ubimesh.proxy.tracing.local import LOCAL

if TYPE_CHECKING:
    from ubimesh.proxy.network.http_manager import ActiveStream
    from ubimesh.proxy.tracing.exporter import Exporter
    from ubimesh.proxy.upstream.cluster_manager import ClusterManager
    from ubimesh.telemetry.stats import Store

_B3_WRITTEN = frozenset({"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled"})


def new_span_id() -> str:
    """A random non-zero 64-bit id, 16 hex digits."""
    value = random.getrandbits(64)
    while not value:
        value = random.getrandbits(64)
    return f"{value:016x}"


class Span:
    """One stream's span; finished spans wait in an exporter's queue until sent."""

    __slots__ = ("client", "duration_us", "name", "parent_id", "sampled", "shared", "span_id",
                 "start_mono", "start_us", "tags", "trace_id", "tracestate")  # fmt: skip

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: str,
        *,
        sampled: bool,
        client: bool,
        shared: bool = False,
        name: str = "",
        tracestate: str = "",
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.client = client
        """CLIENT kind (egress) rather than SERVER."""
        self.shared = shared
        self.name = name
        self.tracestate = tracestate
        self.start_us = 0
        self.start_mono = 0.0
        self.duration_us = 0
        self.tags: dict[str, str] = {}

    def __repr__(self) -> str:
        return (
            f"Span({self.trace_id}/{self.span_id} parent={self.parent_id or '-'} "
            f"{'CLIENT' if self.client else 'SERVER'} sampled={self.sampled} {self.name!r})"
        )


class HcmTracer:
    """One HCM's tracing: built from its TracingConfig when the HCM runtime is built."""

    __slots__ = ("client_n", "config", "custom_tags", "egress", "exporter", "n_client_enabled",
                 "n_not_traceable", "n_random", "n_service_forced", "otel", "overall_n",
                 "random_n", "shared", "trace_id_128bit", "w3c")  # fmt: skip

    def __init__(
        self, config: TracingConfig, stats: Store, stat_prefix: str, clusters: ClusterManager
    ) -> None:
        from ubimesh.proxy.tracing.exporter import exporter_for

        self.config = config
        provider = config.provider
        self.exporter: Exporter = exporter_for(provider, clusters, stats)
        self.egress = config.egress
        self.otel = provider.kind is TracingProviderKind.OPENTELEMETRY
        self.shared = provider.shared_span_context and not self.egress
        self.w3c = provider.w3c
        self.trace_id_128bit = provider.trace_id_128bit
        self.client_n = sampler.percent_numerator(config.client_sampling)
        self.random_n = sampler.percent_numerator(config.random_sampling)
        self.overall_n = sampler.percent_numerator(config.overall_sampling)
        self.custom_tags = config.custom_tags
        p = f"http.{stat_prefix}.tracing."
        self.n_random = stats.counter(p + "random_sampling")
        self.n_service_forced = stats.counter(p + "service_forced")
        self.n_client_enabled = stats.counter(p + "client_enabled")
        self.n_not_traceable = stats.counter(p + "not_traceable")

    # -- start ----------------------------------------------------------------------------------

    def start(self, stream: ActiveStream, route: Route | None) -> Span | None:
        """Decide, extract, start the stream's span and inject this hop's context into the
        request headers. None when the request is not traced at all (malformed B3).
        ``route`` (the matched one, if any) may carry tracing settings and a decorator."""
        headers = stream.headers
        found = tc.collect(headers.items)
        rid = headers.get_first("x-request-id")
        client_n, random_n, overall_n = self.client_n, self.random_n, self.overall_n
        route_tracing = route.tracing if route is not None else None
        if route_tracing is not None:
            # Envoy takes all three from the route when it has a tracing block.
            client_n = sampler.percent_numerator(route_tracing.client_sampling)
            random_n = sampler.percent_numerator(route_tracing.random_sampling)
            overall_n = sampler.percent_numerator(route_tracing.overall_sampling)
        # x-envoy-force-trace counts only from an internal downstream; with no internal address
        # configuration there is none (and the HCM has already removed the header).
        reason, new_rid = sampler.decide(
            rid,
            client_trace_id=found is not None and "x-client-trace-id" in found,
            force_trace=False,
            client=client_n,
            random_=random_n,
            overall=overall_n,
        )
        if new_rid is not None and new_rid != rid:
            headers.set("x-request-id", new_rid)
        if reason == sampler.SAMPLING:
            self.n_random.value += 1
        elif reason == sampler.NOT_TRACEABLE:
            self.n_not_traceable.value += 1
        elif reason == sampler.CLIENT_FORCED:
            self.n_client_enabled.value += 1
        else:
            self.n_service_forced.value += 1
        traced = reason != sampler.NOT_TRACEABLE
        span = self._start_otel(stream, found, traced) if self.otel else None
        if not self.otel:
            span = self._start_zipkin(stream, found, traced)
        if span is None:
            return None
        if route is not None and route.decorator:
            # The route's operation names the span (Envoy's Decorator::apply); an egress HCM
            # also tells the next hop, whose ingress span takes the name from the header.
            span.name = route.decorator
            if self.egress and route.decorator_propagate:
                headers.set("x-envoy-decorator-operation", route.decorator)
        now = time.time()
        span.start_mono = stream.start_time
        span.start_us = int((now - (time.monotonic() - stream.start_time)) * 1_000_000)
        if span.sampled:
            self._request_tags(stream, span, new_rid, found)
            if route_tracing is not None and route_tracing.custom_tags:
                self._custom_tags(stream, span, route_tracing.custom_tags)
        return span

    def _start_zipkin(
        self, stream: ActiveStream, found: dict[str, list[str]] | None, traced: bool
    ) -> Span | None:
        ctx: tc.SpanContext | None = None
        if found is not None:
            try:
                ctx = tc.extract_b3(found)
            except tc.Malformed:
                return None
            if (ctx is None or not ctx.has_ids) and self.w3c:
                w3c = tc.extract_w3c(found)
                if w3c is not None:
                    if ctx is not None and ctx.sampled != tc.UNKNOWN:
                        w3c.sampled = ctx.sampled
                    ctx = w3c
        sampled = traced if ctx is None or ctx.sampled == tc.UNKNOWN else ctx.sampled == 1
        name = stream.host_header
        if ctx is not None and ctx.has_ids:
            if self.shared:
                span = Span(ctx.trace_id, ctx.span_id, ctx.parent_id, sampled=sampled,
                            client=False, shared=True, name=name)  # fmt: skip
            else:
                span = Span(ctx.trace_id, new_span_id(), ctx.span_id, sampled=sampled,
                            client=self.egress, name=name)  # fmt: skip
            single = ctx.single_b3
        else:
            span_id = new_span_id()
            trace_id = new_span_id() + span_id if self.trace_id_128bit else span_id
            # Envoy reports an ingress span as shared even when it starts the trace.
            span = Span(trace_id, span_id, "", sampled=sampled, client=self.egress,
                        shared=self.shared, name=name)  # fmt: skip
            single = ctx is not None and ctx.single_b3
        headers = stream.headers
        if found is not None:
            headers.items = [kv for kv in headers.items if kv[0] not in _B3_WRITTEN]
        headers.items.extend(
            tc.b3_headers(span.trace_id, span.span_id, span.parent_id, sampled, single=single)
        )
        if self.w3c:
            headers.set("traceparent", tc.traceparent(span.trace_id, span.span_id, sampled))
        return span

    def _start_otel(
        self, stream: ActiveStream, found: dict[str, list[str]] | None, traced: bool
    ) -> Span:
        ctx = tc.extract_w3c(found) if found is not None else None
        host = stream.host_header
        name = "egress " + host if self.egress else "ingress"
        if ctx is not None:
            span = Span(ctx.trace_id, new_span_id(), ctx.span_id, sampled=ctx.sampled == 1,
                        client=self.egress, name=name, tracestate=ctx.tracestate)  # fmt: skip
        else:
            span = Span(new_span_id() + new_span_id(), new_span_id(), "", sampled=traced,
                        client=self.egress, name=name)  # fmt: skip
        headers = stream.headers
        headers.set("traceparent", tc.traceparent(span.trace_id, span.span_id, span.sampled))
        if span.tracestate:
            headers.set("tracestate", span.tracestate)
        elif found is not None and "tracestate" in found:
            # A tracestate without a valid traceparent (or one that broke the grammar) is
            # dropped with it (W3C).
            headers.remove("tracestate")
        return span

    def _request_tags(
        self,
        stream: ActiveStream,
        span: Span,
        request_id: str | None,
        found: dict[str, list[str]] | None,
    ) -> None:
        """The tags read from the request, taken now: the router rewrites the headers in
        place when it forwards them."""
        headers = stream.headers
        tags = span.tags
        local = LOCAL
        tags["node_id"] = local.node_id
        if local.zone:
            tags["zone"] = local.zone
        if request_id:
            tags["guid:x-request-id"] = request_id
        if found is not None and "x-client-trace-id" in found:
            tags["guid:x-client-trace-id"] = found["x-client-trace-id"][0]
        proto = headers.get_first("x-forwarded-proto") or "http"
        path = stream.path
        limit = self.config.max_path_tag_length
        if len(path) > limit:
            path = path[:limit]
        tags["http.url"] = f"{proto}://{stream.host_header}{path}"
        tags["http.method"] = stream.method
        tags["downstream_cluster"] = headers.get_first("x-envoy-downstream-service-cluster") or "-"
        tags["user_agent"] = headers.get_first("user-agent") or "-"
        tags["http.protocol"] = "HTTP/1.0" if stream.http10 else "HTTP/1.1"
        tags["peer.address"] = stream.conn.remote[0]
        if self.custom_tags:
            self._custom_tags(stream, span, self.custom_tags)

    @staticmethod
    def _custom_tags(stream: ActiveStream, span: Span, custom_tags: tuple[CustomTag, ...]) -> None:
        headers = stream.headers
        tags = span.tags
        for custom in custom_tags:
            if custom.kind is CustomTagKind.REQUEST_HEADER:
                value = headers.get(custom.value)
                if value is None:
                    value = custom.default
                if value:
                    tags[custom.tag] = value
            else:
                tags[custom.tag] = custom.value

    # -- finish ---------------------------------------------------------------------------------

    def finish(self, stream: ActiveStream, span: Span) -> None:
        """The stream ended: tag and queue a sampled span (never blocks)."""
        if not span.sampled:
            return
        span.duration_us = max(1, int((time.monotonic() - span.start_mono) * 1_000_000))
        tags = span.tags
        status = stream.status
        tags["request_size"] = str(stream.bytes_received)
        tags["response_size"] = str(stream.bytes_sent)
        tags["component"] = "proxy"
        up = stream.upstream
        cluster = up.cluster if up is not None else None
        if cluster is not None:
            tags["upstream_cluster"] = cluster.name
            tags["upstream_cluster.name"] = cluster.name
            host = up.host if up is not None else None
            if host is not None:
                tags["upstream_address"] = str(host.address)
        tags["http.status_code"] = str(status)
        tags["response_flags"] = stream.flags or "-"
        # Envoy marks 5xx, and a stream that ended without a response, as errors.
        if status >= 500 or status == 0:
            tags["error"] = "true"
        self.exporter.add(span)
