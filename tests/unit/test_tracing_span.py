"""The HCM's span logic (ubimesh.proxy.tracing.span): an unsampled request carries its ids
upstream but leaves no span; a sampled one keeps a record from which the export builds
Envoy's tags; malformed B3 is not traced at all."""

from __future__ import annotations

import asyncio
import re
import time
from types import SimpleNamespace
from typing import Any

import orjson

from ubimesh.proxy.network.hcm_config import F_TRACE, REQUEST_HEADER_FLAGS, new_request_id
from ubimesh.proxy.network.http_manager import ActiveStream
from ubimesh.proxy.snapshot.types import (
    CustomTag,
    CustomTagKind,
    SocketAddress,
    TracingConfig,
    TracingProvider,
    TracingProviderKind,
)
from ubimesh.proxy.tracing import sampler, zipkin
from ubimesh.proxy.tracing.context import TRACE_HEADERS
from ubimesh.proxy.tracing.local import LOCAL
from ubimesh.proxy.tracing.span import HcmTracer, Span
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.telemetry.stats import Store

PROVIDER = TracingProvider(TracingProviderKind.ZIPKIN, "sink", "/api/v2/spans", "sink")
#: First 8 hex digits 0x00000063 = 99: drawn 99 of 10000 (sampled at 1 %, not at 0.5 %).
RID = "00000063-1891-4d4c-8964-998ede09d368"
HEX16 = re.compile(r"[0-9a-f]{16}")


def tracer(**config: Any) -> tuple[HcmTracer, Store]:
    stats = Store()
    return HcmTracer(
        TracingConfig(PROVIDER, **config), stats, "in", ClusterManager({}, stats)
    ), stats


def stream(*extra: tuple[str, str], path: str = "/cart?id=1") -> ActiveStream:
    conn = SimpleNamespace(hcm=None, remote=("10.0.0.7", 40000), tls=None)
    s = ActiveStream(conn)  # type: ignore[arg-type]
    s.method, s.path, s.host_header = "GET", path, "shop"
    s.headers.items = [("host", "shop"), ("x-request-id", RID), *extra]
    # What the codec notes as the headers arrive (the tracer reads the trace header flag).
    for k, _ in s.headers.items:
        s.hflags |= REQUEST_HEADER_FLAGS.get(k, 0)
    return s


def route(decorator: str = "", *, egress_propagate: bool = True) -> Any:
    return SimpleNamespace(tracing=None, decorator=decorator, decorator_propagate=egress_propagate)


def test_an_unsampled_request_sends_its_ids_and_keeps_no_span() -> None:
    t, stats = tracer(random_sampling=0.5)
    s = stream()
    assert t.start(s, None) is None
    up = dict(s.headers.items)
    assert up["x-b3-traceid"] == up["x-b3-spanid"] and HEX16.fullmatch(up["x-b3-spanid"])
    assert up["x-b3-sampled"] == "0" and "x-b3-parentspanid" not in up
    assert up["x-request-id"] == RID  # no decision packed
    assert stats.counter("http.in.tracing.not_traceable").value == 1


def test_an_egress_decorator_goes_upstream_sampled_or_not_but_not_for_malformed_b3() -> None:
    t, _ = tracer(random_sampling=0.5, egress=True)
    s = stream()
    assert t.start(s, route("pay-op")) is None
    assert s.headers.get("x-envoy-decorator-operation") == "pay-op"
    bad = [("x-b3-traceid", "zz"), ("x-b3-spanid", "1" * 16)]
    s = stream(*bad)
    assert t.start(s, route("pay-op")) is None
    assert s.headers.items == [("host", "shop"), ("x-request-id", RID), *bad]


def test_a_sampled_span_is_tagged_from_its_record_at_export() -> None:
    tags = (
        CustomTag("team", CustomTagKind.LITERAL, "blue"),
        CustomTag("user_agent", CustomTagKind.REQUEST_HEADER, "x-agent", "none"),
        CustomTag("http.status_code", CustomTagKind.LITERAL, "replaced by the response's"),
    )
    t, stats = tracer(random_sampling=1, custom_tags=tags, max_path_tag_length=5)
    s = stream(("x-forwarded-proto", "https"), ("user-agent", "curl"), ("x-agent", "bot"))
    LOCAL.node_id = "proxy-1"

    async def run() -> Span | None:
        span = t.start(s, route("cart-op"))
        # The router rewrites the request headers after start(): the record keeps its values.
        s.headers.items = []
        if span is not None:
            s.status, s.bytes_sent, s.flags = 503, 12, "UF"
            cluster = SimpleNamespace(name="app")
            s.upstream = SimpleNamespace(  # type: ignore[assignment]
                cluster=cluster, host=SimpleNamespace(address=SocketAddress("10.0.0.9", 80))
            )
            t.finish(s, span, time.monotonic())
            t.exporter.open, t.exporter.queued = None, 0
            if t.exporter.timer is not None:
                t.exporter.timer.cancel()
        return span

    span = asyncio.run(run())
    assert span is not None and span.name == "cart-op" and span.shared
    assert stats.counter("http.in.tracing.random_sampling").value == 1
    (body,) = orjson.loads(zipkin.encode([span], LOCAL))
    assert body["id"] == body["traceId"] == span.span_id and body["name"] == "cart-op"
    assert body["tags"] == {
        "node_id": "proxy-1",
        "guid:x-request-id": RID[:14] + "9" + RID[15:],
        "http.url": "https://shop/cart",
        "http.method": "GET",
        "downstream_cluster": "-",
        "user_agent": "bot",
        "http.protocol": "HTTP/1.1",
        "peer.address": "10.0.0.7",
        "team": "blue",
        "request_size": "0",
        "response_size": "12",
        "component": "proxy",
        "upstream_cluster": "app",
        "upstream_cluster.name": "app",
        "upstream_address": "10.0.0.9:80",
        "http.status_code": "503",
        "response_flags": "UF",
        "error": "true",
    }


def test_the_decision_rewrites_the_request_id_in_place() -> None:
    t, _ = tracer(random_sampling=1)
    s = stream(("accept", "*/*"))
    assert t.start(s, None) is not None
    names = [k for k, _ in s.headers.items]
    assert names[:3] == ["host", "x-request-id", "accept"]
    assert s.headers.get("x-request-id") == RID[:14] + "9" + RID[15:]
    # A repeated x-request-id (the HCM coalesces it; kept safe anyway) ends up as one.
    s = stream(("x-request-id", "other"))
    assert t.start(s, None) is not None
    assert s.headers.get_all("x-request-id") == [RID[:14] + "9" + RID[15:]]


def test_the_codec_flags_every_trace_header() -> None:
    # start() reads trace headers only when the codec flagged one (F_TRACE): every header it
    # parses must carry the flag, or its context would be ignored.
    for name in TRACE_HEADERS:
        assert REQUEST_HEADER_FLAGS[name] & F_TRACE
    t, _ = tracer(random_sampling=0.5)
    s = stream(("x-b3-traceid", "1" * 16), ("x-b3-spanid", "2" * 16))
    assert s.hflags & F_TRACE and t.start(s, None) is None
    # The caller's context went upstream (ingress shares its span), not a new root trace.
    names = [k for k, _ in s.headers.items]
    assert names.count("x-b3-traceid") == 1 and names.count("x-b3-spanid") == 1
    up = dict(s.headers.items)
    assert up["x-b3-traceid"] == "1" * 16 and up["x-b3-spanid"] == "2" * 16


def test_the_id_the_hcm_generated_is_found_without_a_scan_and_rewritten_in_place() -> None:
    # No x-request-id arrived (no F_REQUEST_ID): the HCM appended the one it generated, last.
    t, _ = tracer(random_sampling=100)
    s = stream()
    generated = new_request_id()
    s.headers.items = [("host", "shop"), ("x-request-id", generated)]
    s.hflags = REQUEST_HEADER_FLAGS["host"]
    assert t.start(s, None) is not None
    assert s.headers.items[1] == ("x-request-id", generated[:14] + "9" + generated[15:])
    # Not the generated string (an equal copy, or another request's): found by the scan.
    s = stream()
    s.headers.items = [("x-request-id", "".join(list(generated))), ("host", "shop")]
    s.hflags = REQUEST_HEADER_FLAGS["host"]
    assert t.start(s, None) is not None
    assert s.headers.items[0] == ("x-request-id", generated[:14] + "9" + generated[15:])


def test_a_request_without_headers_has_no_request_id() -> None:
    # An empty header list (an HTTP/1.0 request, no id generated) must not take the generated
    # id's fast path (the empty string is one object).
    t, stats = tracer(random_sampling=100)
    s = stream()
    s.headers.items = []
    s.hflags = 0
    sampler.GENERATED.note("", b"", 0)
    assert t.start(s, None) is None
    assert stats.counter("http.in.tracing.not_traceable").value == 1


def test_the_record_reads_the_request_headers_around_the_trace_headers_it_replaces() -> None:
    # The record only reads the request's own headers (not those the provider appended);
    # _start_zipkin drops the caller's B3 headers first, which moves the later ones up.
    t, _ = tracer(random_sampling=100)
    b3 = [("x-b3-traceid", "1" * 16), ("x-b3-spanid", "2" * 16), ("x-b3-sampled", "1")]
    s = stream(*b3, ("user-agent", "curl"), ("x-forwarded-proto", "https"),
               ("x-envoy-downstream-service-cluster", "web"))  # fmt: skip
    span = t.start(s, None)
    assert span is not None and span.span_id == "2" * 16
    assert (span.user_agent, span.proto, span.downstream_cluster) == ("curl", "https", "web")


def test_finish_dates_the_span_from_the_streams_start() -> None:
    t, _ = tracer(random_sampling=100)
    s = stream()
    s.start_time = time.monotonic() - 0.5

    async def run() -> Span | None:
        span = t.start(s, None)
        if span is not None:
            wall, now = time.time(), time.monotonic()
            t.finish(s, span, now)
            assert abs(span.duration_us - (now - s.start_time) * 1e6) <= 1
            assert abs(span.start_us - (wall - 0.5) * 1e6) < 50_000
            # The cluster's name is remembered for the last cluster object only: the same
            # objects again (a memo keyed on anything looser would give a stale name).
            clusters = {n: SimpleNamespace(name=n) for n in ("a", "b")}
            for name in ("a", "b", "b", "a", "a"):
                s.upstream = SimpleNamespace(  # type: ignore[assignment]
                    cluster=clusters[name], host=None
                )
                t.finish(s, span, now)
                assert span.cluster == name
            t.exporter.open, t.exporter.queued = None, 0
            if t.exporter.timer is not None:
                t.exporter.timer.cancel()
        return span

    assert asyncio.run(run()) is not None
