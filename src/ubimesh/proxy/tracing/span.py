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

import os
import time
from typing import TYPE_CHECKING, Any, Final

from ubimesh.proxy.name_memo import NameMemo
from ubimesh.proxy.network.hcm_config import F_REQUEST_ID, F_TRACE
from ubimesh.proxy.snapshot.types import (
    CustomTag,
    CustomTagKind,
    Route,
    RouteTracing,
    TracingConfig,
    TracingProviderKind,
)
from ubimesh.proxy.tracing import context as tc
from ubimesh.proxy.tracing import sampler
from ubimesh.proxy.tracing.context import TRACE_HEADERS
from ubimesh.proxy.tracing.local import LOCAL

if TYPE_CHECKING:
    from ubimesh.proxy.network.http_manager import ActiveStream
    from ubimesh.proxy.tracing.exporter import Exporter
    from ubimesh.proxy.upstream.cluster_manager import ClusterManager
    from ubimesh.telemetry.stats import Store

_B3_WRITTEN: Final = frozenset(
    {"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled"}
)
#: The x-b3-sampled header items, made once (a tuple built per request, and freed, cost more
#: than the list append it goes into). Typed Any so that compiled code appends the object
#: itself: as ``tuple[str, str]`` it would be unboxed and boxed into a new tuple at each use.
_SAMPLED_1: Final[Any] = ("x-b3-sampled", "1")
_SAMPLED_0: Final[Any] = ("x-b3-sampled", "0")
#: The codec's flags for "an x-request-id or a trace header arrived" (hcm_config).
_ID_OR_TRACE: Final = F_REQUEST_ID | F_TRACE
_NO_ITEM: Final = ("", "")
# The clock as a constant, as on the rest of the request path: under mypyc a Final is a C
# static, where ``time.time`` is a generic attribute lookup on the module per call.
_wall_clock: Final = time.time


#: Ids are cut from random bytes drawn for this many at a time, as Envoy's random generator
#: prefetches 256 64-bit values: one getrandom call and one hex conversion per 256 ids.
_IDS_PER_DRAW: Final = 256
_ZERO8: Final = bytes(8)


class _IdSource:
    """Random 64-bit ids as 16 hex digits, cut from a buffer of hex digits drawn in bulk.

    A ``random.getrandbits`` call plus a ``{:016x}`` format cost about 4k instructions per id
    (the format goes through ``str.format``'s general machinery); a slice of the buffer costs
    about a tenth of that. Splitting the buffer into 256 strings at once costs as much per id
    (one string each either way) and more in all (bench/telemetry_cpu.py --callgrind)."""

    __slots__ = ("at", "digits")

    def __init__(self) -> None:
        self.digits = ""
        self.at = 0

    def forget(self) -> None:
        """Drop the buffer: a forked worker must not hand out ids its parent drew."""
        self.digits = ""
        self.at = 0

    def take(self) -> str:
        """A random non-zero 64-bit id, 16 lower-case hex digits."""
        at = self.at
        digits = self.digits
        if at >= len(digits):
            digits = self.digits = _draw_digits()
            at = 0
        self.at = at + 16
        return digits[at : at + 16]


def _draw_digits() -> str:
    """The hex digits of ``_IDS_PER_DRAW`` random ids, none of them zero (B3 forbids an
    all-zero id). One search per draw replaces a comparison per id: a draw with eight zero
    bytes anywhere (aligned to an id or not, about 2^-53 per draw) is made again."""
    while True:
        raw = os.urandom(8 * _IDS_PER_DRAW)
        if _ZERO8 not in raw:
            return raw.hex()


_IDS: Final = _IdSource()
os.register_at_fork(after_in_child=_IDS.forget)


def new_span_id() -> str:
    """A random non-zero 64-bit id, 16 hex digits."""
    return _IDS.take()


class Span:
    """One sampled stream's span; finished spans wait in an exporter's queue until sent.

    Only a sampled request gets one (an unsampled one only carries its ids upstream). The
    span keeps a compact record of what its tags are made of: the request's values, taken
    when it starts (the router rewrites the headers in place when it forwards them), and the
    response's, taken when it finishes. ``tag_dict`` builds Envoy's tags from the record at
    export time, off the request path. ``tags``, when set, are the span's tags as given.
    """

    __slots__ = ("client", "client_trace_id", "cluster", "custom", "downstream_cluster",
                 "duration_us", "host", "http10", "method", "name", "parent_id", "path", "peer",
                 "proto", "recorded", "request_id", "request_size", "response_flags",
                 "response_size", "sampled", "shared", "span_id", "start_mono", "start_us",
                 "status", "tags", "trace_id", "tracestate", "upstream_address",
                 "user_agent")  # fmt: skip

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
        self.tags: dict[str, str] | None = None
        """Explicit tags; None: built from the record by ``tag_dict``."""
        self.recorded = False
        """Whether the request record below was taken (``HcmTracer.start``)."""
        self.request_id = ""
        self.client_trace_id = ""
        self.proto = ""
        self.host = ""
        self.path = ""
        """Already cut to the tracing's max_path_tag_length."""
        self.method = ""
        self.downstream_cluster = ""
        self.user_agent = ""
        self.http10 = False
        self.peer = ""
        self.custom: dict[str, str] | None = None
        """The custom tags' values (HCM's then route's), None without custom tags."""
        self.request_size = 0
        self.response_size = 0
        self.status = 0
        self.response_flags = ""
        self.cluster: str | None = None
        """The upstream cluster's name, None when the request got no cluster."""
        self.upstream_address: object = None
        """The upstream host's SocketAddress (printed at export), None without a host."""

    def __repr__(self) -> str:
        return (
            f"Span({self.trace_id}/{self.span_id} parent={self.parent_id or '-'} "
            f"{'CLIENT' if self.client else 'SERVER'} sampled={self.sampled} {self.name!r})"
        )

    def tag_dict(self) -> dict[str, str]:
        """The span's tags, as Envoy's HCM sets them: the request's, the custom tags (which
        may replace them), then the response's (which replace any custom tag of their name)."""
        given = self.tags
        if given is not None:
            return given
        if not self.recorded:
            return {}
        local = LOCAL
        # One dict display for the tags every span has (the cheapest way to build them), then
        # the optional ones; the tags' order carries no meaning in either export format.
        tags = {
            "node_id": local.node_id,
            "http.url": self.proto + "://" + self.host + self.path,
            "http.method": self.method,
            "downstream_cluster": self.downstream_cluster,
            "user_agent": self.user_agent,
            "http.protocol": "HTTP/1.0" if self.http10 else "HTTP/1.1",
            "peer.address": self.peer,
        }
        if local.zone:
            tags["zone"] = local.zone
        if self.request_id:
            tags["guid:x-request-id"] = self.request_id
        if self.client_trace_id:
            tags["guid:x-client-trace-id"] = self.client_trace_id
        custom = self.custom
        if custom is not None:
            tags.update(custom)
        tags["request_size"] = str(self.request_size)
        tags["response_size"] = str(self.response_size)
        tags["component"] = "proxy"
        cluster = self.cluster
        if cluster is not None:
            tags["upstream_cluster"] = cluster
            tags["upstream_cluster.name"] = cluster
            if self.upstream_address is not None:
                tags["upstream_address"] = str(self.upstream_address)
        status = self.status
        tags["http.status_code"] = str(status)
        tags["response_flags"] = self.response_flags or "-"
        # Envoy marks 5xx, and a stream that ended without a response, as errors.
        if status >= 500 or status == 0:
            tags["error"] = "true"
        return tags


class HcmTracer:
    """One HCM's tracing: built from its TracingConfig when the HCM runtime is built."""

    __slots__ = ("client_n", "cluster_name", "config", "custom_tags", "egress", "exporter",
                 "memo_decorator", "memo_route", "memo_tracing", "n_client_enabled",
                 "n_not_traceable", "n_random", "n_service_forced", "otel", "overall_n",
                 "path_limit", "random_n", "shared", "trace_id_128bit", "w3c")  # fmt: skip

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
        self.path_limit = config.max_path_tag_length
        p = f"http.{stat_prefix}.tracing."
        self.n_random = stats.counter(p + "random_sampling")
        self.n_service_forced = stats.counter(p + "service_forced")
        self.n_client_enabled = stats.counter(p + "client_enabled")
        self.n_not_traceable = stats.counter(p + "not_traceable")
        # The last route seen and what tracing reads of it: routes are frozen, and reading
        # two attributes of one (not compiled) costs about 300 instructions a request.
        self.memo_route: Route | None = None
        self.memo_tracing: RouteTracing | None = None
        self.memo_decorator = ""
        self.cluster_name = NameMemo()

    # -- start ----------------------------------------------------------------------------------

    def start(self, stream: ActiveStream, route: Route | None) -> Span | None:
        """Decide, extract, start the stream's span and inject this hop's context into the
        request headers. Returns the span of a sampled request; None for an unsampled one
        (its context still goes upstream, but nothing is reported, so nothing is kept) and for
        one that is not traced at all (malformed B3).
        ``route`` (the matched one, if any) may carry tracing settings and a decorator."""
        headers = stream.headers
        items = headers.items
        # The x-request-id (the first of its name: the HCM folds repeats into one, a request
        # built otherwise may have several) and the trace headers (usually none at an edge).
        rid: str | None = None
        rid_at = -1
        rid_count = 0
        found: dict[str, list[str]] | None = None
        flags = stream.hflags
        n = len(items)
        last = items[n - 1] if n else _NO_ITEM
        if (
            not flags & _ID_OR_TRACE
            and last[1] is sampler.GENERATED.text
            and last[0] == "x-request-id"
        ):
            # The codec saw neither an x-request-id nor a trace header, and the last item is the
            # id the HCM just generated and appended (the very string): nothing to look for.
            rid = last[1]
            rid_at = n - 1
            rid_count = 1
        else:
            # One pass finds the x-request-id and, only when the codec saw one, the trace
            # headers (without, no set lookup per name: about 70 instructions each).
            traced = flags & F_TRACE != 0
            for i, (k, v) in enumerate(items):
                if k == "x-request-id":
                    if rid is None:
                        rid = v
                        rid_at = i
                    rid_count += 1
                elif traced and k in TRACE_HEADERS:
                    if found is None:
                        found = {k: [v]}
                    else:
                        values = found.get(k)
                        if values is None:
                            found[k] = [v]
                        else:
                            values.append(v)
        client_n, random_n, overall_n = self.client_n, self.random_n, self.overall_n
        route_tracing: RouteTracing | None = None
        decorator = ""
        if route is not None:
            if route is self.memo_route:
                route_tracing = self.memo_tracing
                decorator = self.memo_decorator
            else:
                route_tracing = route.tracing
                decorator = route.decorator
                self.memo_route = route
                self.memo_tracing = route_tracing
                self.memo_decorator = decorator
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
        # decide returns the id it was given (the same object) unless it wrote a decision in.
        if new_rid is not None and new_rid is not rid:
            if rid_count == 1:
                items[rid_at] = ("x-request-id", new_rid)
            else:
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
        # The request's own headers end here: the provider only adds trace headers after them
        # (or drops some), and _record_request reads no trace header.
        request_items = len(headers.items)
        if self.otel:
            span = self._start_otel(stream, found, traced)
        elif found is None:
            span = self._start_zipkin_root(stream, traced)
        else:
            span = self._start_zipkin(stream, found, traced)
        if span is _MALFORMED:
            return None
        if route is not None and decorator:
            # The route's operation names the span (Envoy's Decorator::apply); an egress HCM
            # also tells the next hop (sampled or not), whose ingress span takes the name from
            # the header.
            if self.egress and route.decorator_propagate:
                headers.set("x-envoy-decorator-operation", decorator)
            if span is not None:
                span.name = decorator
        if span is None:
            return None
        # The wall clock time of the start is worked out in finish() (from the stream's
        # monotonic start, as here): one clock read per span instead of three.
        span.start_mono = stream.start_time
        self._record_request(stream, span, new_rid, found, request_items)
        if route_tracing is not None and route_tracing.custom_tags:
            self._custom_tags(stream, span, route_tracing.custom_tags)
        return span

    def _start_zipkin_root(self, stream: ActiveStream, traced: bool) -> Span | None:
        """Zipkin without incoming trace headers (the common case at an edge): this hop starts
        the trace; an unsampled one only sends its ids upstream, as Envoy's."""
        ids = _IDS
        span_id = ids.take()
        trace_id = ids.take() + span_id if self.trace_id_128bit else span_id
        items = stream.headers.items
        items.append(("x-b3-traceid", trace_id))
        items.append(("x-b3-spanid", span_id))
        items.append(_SAMPLED_1 if traced else _SAMPLED_0)
        if self.w3c:
            stream.headers.set("traceparent", tc.traceparent(trace_id, span_id, traced))
        if not traced:
            return None
        # Envoy reports an ingress span as shared even when it starts the trace.
        return Span(trace_id, span_id, "", sampled=True, client=self.egress,
                    shared=self.shared, name=stream.host_header)  # fmt: skip

    def _start_zipkin(
        self, stream: ActiveStream, found: dict[str, list[str]], traced: bool
    ) -> Span | None:
        """Zipkin with incoming trace headers. ``_MALFORMED`` when the B3 headers are broken;
        None when the request is not sampled (its context goes upstream all the same)."""
        try:
            ctx = tc.extract_b3(found)
        except tc.Malformed:
            return _MALFORMED
        if (ctx is None or not ctx.has_ids) and self.w3c:
            w3c = tc.extract_w3c(found)
            if w3c is not None:
                if ctx is not None and ctx.sampled != tc.UNKNOWN:
                    w3c.sampled = ctx.sampled
                ctx = w3c
        sampled = traced if ctx is None or ctx.sampled == tc.UNKNOWN else ctx.sampled == 1
        shared = False
        client = self.egress
        if ctx is not None and ctx.has_ids:
            trace_id = ctx.trace_id
            if self.shared:
                span_id, parent_id, shared, client = ctx.span_id, ctx.parent_id, True, False
            else:
                span_id, parent_id = new_span_id(), ctx.span_id
            single = ctx.single_b3
        else:
            span_id = new_span_id()
            trace_id = new_span_id() + span_id if self.trace_id_128bit else span_id
            parent_id = ""
            # Envoy reports an ingress span as shared even when it starts the trace.
            shared = self.shared
            single = ctx is not None and ctx.single_b3
        headers = stream.headers
        headers.items = [kv for kv in headers.items if kv[0] not in _B3_WRITTEN]
        headers.items.extend(tc.b3_headers(trace_id, span_id, parent_id, sampled, single=single))
        if self.w3c:
            headers.set("traceparent", tc.traceparent(trace_id, span_id, sampled))
        if not sampled:
            return None
        return Span(trace_id, span_id, parent_id, sampled=True, client=client, shared=shared,
                    name=stream.host_header)  # fmt: skip

    def _start_otel(
        self, stream: ActiveStream, found: dict[str, list[str]] | None, traced: bool
    ) -> Span | None:
        """OpenTelemetry: a new span id, child of the traceparent's; None when not sampled."""
        ctx = tc.extract_w3c(found) if found is not None else None
        if ctx is not None:
            trace_id, span_id, parent_id = ctx.trace_id, new_span_id(), ctx.span_id
            sampled = ctx.sampled == 1
            tracestate = ctx.tracestate
        else:
            trace_id, span_id, parent_id = new_span_id() + new_span_id(), new_span_id(), ""
            sampled = traced
            tracestate = ""
        headers = stream.headers
        headers.set("traceparent", tc.traceparent(trace_id, span_id, sampled))
        if tracestate:
            headers.set("tracestate", tracestate)
        elif found is not None and "tracestate" in found:
            # A tracestate without a valid traceparent (or one that broke the grammar) is
            # dropped with it (W3C).
            headers.remove("tracestate")
        if not sampled:
            return None
        name = "egress " + stream.host_header if self.egress else "ingress"
        return Span(trace_id, span_id, parent_id, sampled=True, client=self.egress, name=name,
                    tracestate=tracestate)  # fmt: skip

    def _record_request(
        self,
        stream: ActiveStream,
        span: Span,
        request_id: str | None,
        found: dict[str, list[str]] | None,
        request_items: int,
    ) -> None:
        """Record what the request's tags are made of, now: the router rewrites the headers
        in place when it forwards them. The headers it reads are among the first
        ``request_items`` (the provider's trace headers come after them)."""
        span.recorded = True
        if request_id:
            span.request_id = request_id
        if found is not None and "x-client-trace-id" in found:
            span.client_trace_id = found["x-client-trace-id"][0]
        proto: str | None = None
        downstream: str | None = None
        agent: str | None = None
        # One pass for the three headers (each the first of its name, as get_first), over the
        # request's own headers only: the trace headers this hop appended would cost three
        # comparisons each. The provider may have dropped some trace headers, which leaves
        # the list shorter and every request header still in it.
        items = stream.headers.items
        for i in range(min(request_items, len(items))):
            k, v = items[i]
            if k == "x-forwarded-proto":
                if proto is None:
                    proto = v
            elif k == "user-agent":
                if agent is None:
                    agent = v
            elif k == "x-envoy-downstream-service-cluster" and downstream is None:
                downstream = v
        span.proto = proto or "http"
        span.host = stream.host_header
        path = stream.path
        if len(path) > self.path_limit:
            path = path[: self.path_limit]
        span.path = path
        span.method = stream.method
        span.downstream_cluster = downstream or "-"
        span.user_agent = agent or "-"
        span.http10 = stream.http10
        span.peer = stream.conn.remote[0]
        if self.custom_tags:
            self._custom_tags(stream, span, self.custom_tags)

    @staticmethod
    def _custom_tags(stream: ActiveStream, span: Span, custom_tags: tuple[CustomTag, ...]) -> None:
        headers = stream.headers
        tags = span.custom
        if tags is None:
            tags = span.custom = {}
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

    def finish(self, stream: ActiveStream, span: Span, now: float) -> None:
        """The stream ended at ``now`` (the monotonic clock, which the HCM reads once for all
        its bookkeeping): record the response in the span and queue it (never blocks)."""
        if not span.sampled:
            return
        elapsed = now - span.start_mono
        span.duration_us = max(1, int(elapsed * 1_000_000))
        # The start on the wall clock, as Envoy reports it: now's, less the time elapsed.
        span.start_us = int((_wall_clock() - elapsed) * 1_000_000)
        span.status = stream.status
        span.request_size = stream.bytes_received
        span.response_size = stream.bytes_sent
        span.response_flags = stream.flags
        up = stream.upstream
        if up is not None:
            cluster = up.cluster
            if cluster is not None:
                span.cluster = self.cluster_name.name_of(cluster)
                host = up.host
                if host is not None:
                    span.upstream_address = host.address
        self.exporter.add(span)


#: What the Zipkin start returns for malformed B3 headers (the request is not traced at all).
_MALFORMED: Final = Span("", "", "", sampled=False, client=False)
