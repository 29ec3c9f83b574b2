"""The cheap paths of tracing give what the general ones give: the Zipkin body written as text
equals orjson's serialization of the span dicts byte for byte (and falls back to it for values
that need escaping), the sampler's hex reading equals ``int(..., 16)``, and span ids are
random non-zero 64-bit hex, not shared with a forked worker."""

from __future__ import annotations

import itertools
import os
from types import SimpleNamespace

import orjson

from ubimesh.proxy.network.http_manager import ActiveStream
from ubimesh.proxy.snapshot.types import (
    DirectResponseAction,
    PathMatchKind,
    Route,
    RouteMatch,
    SocketAddress,
    TracingConfig,
    TracingProvider,
    TracingProviderKind,
)
from ubimesh.proxy.tracing import sampler, span, zipkin
from ubimesh.proxy.tracing.local import LOCAL, LocalInfo
from ubimesh.proxy.tracing.span import HcmTracer, Span
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.telemetry.stats import Store

RID = "00000063-1891-4d4c-8964-998ede09d368"


def recorded(i: int, **values: object) -> Span:
    """A span with a request and response record, as HcmTracer.start/finish leave it."""
    s = Span(f"{i + 1:016x}", f"{i + 17:016x}", f"{i + 5:016x}" if i % 2 else "",
             sampled=True, client=i % 3 == 0, shared=i % 2 == 0,
             name="shop:80" if i % 4 else "")  # fmt: skip
    s.start_us, s.duration_us = 1_700_000_000_000_000 + i, 1500 + i
    s.recorded = True
    s.proto, s.host, s.path, s.method = "http", "shop:80", f"/cart?id={i}", "GET"
    s.downstream_cluster = "-" if i % 2 else "edge"
    s.user_agent = "curl/8.5.0"
    s.http10 = i % 5 == 0
    s.peer = "10.0.0.7"
    s.request_id = "" if i % 3 == 1 else "00000063-1891-9d4c-8964-998ede09d368"
    s.client_trace_id = "abc" if i % 4 == 3 else ""
    s.request_size, s.response_size = 10 * i, 100 * i
    s.status = (200, 503, 0, 404)[i % 4]
    s.response_flags = "UF,URX" if i % 4 == 2 else ""
    if i % 3 != 2:
        s.cluster = "backend"
        if i % 2 == 0:
            s.upstream_address = SocketAddress("10.1.2.3", 8080 + i % 2)
    for name, value in values.items():
        setattr(s, name, value)
    return s


def body_of(spans: list[Span], local: LocalInfo) -> tuple[bytes, bytes]:
    return zipkin.encode(spans, local), zipkin.encode_dicts(spans, local)


def test_the_text_is_orjsons_serialization_of_each_span_shape() -> None:
    local = LocalInfo("node-1", "shop")
    spans = [recorded(i) for i in range(24)]
    endpoint = {"serviceName": "shop", "ipv4": zipkin.local_ipv4()}
    head = (
        ',"localEndpoint":'
        + orjson.dumps(endpoint).decode()
        + ',"tags":{"node_id":'
        + orjson.dumps(LOCAL.node_id).decode()
        + ',"http.url":"'
    )
    values: list[str] = []
    for s in spans:
        # Span by span: the text itself, not only the whole body (which could fall back).
        text = zipkin._span_text(s, head, "", values)
        assert text == orjson.dumps(zipkin.span_dict(s, endpoint)).decode()
    fast, reference = body_of(spans, local)
    assert fast == reference


def test_zone_custom_and_explicit_tags_and_odd_node_values() -> None:
    saved = LOCAL.zone, LOCAL.node_id
    LOCAL.zone, LOCAL.node_id = "eu-1", 'node "1"\\'
    try:
        spans = [recorded(i) for i in range(6)]
        spans[1].custom = {"http.method": "OVERRIDDEN", "team": "cart"}
        spans[2].tags = {"http.status_code": "200"}
        spans[3].recorded = False
        fast, reference = body_of(spans, LocalInfo("n1", "shöp"))
        assert fast == reference
        assert orjson.loads(fast)[1]["tags"]["http.method"] == "OVERRIDDEN"
        assert orjson.loads(fast)[0]["tags"]["zone"] == "eu-1"
        assert orjson.loads(fast)[0]["tags"]["node_id"] == 'node "1"\\'
    finally:
        LOCAL.zone, LOCAL.node_id = saved


def test_values_that_need_escaping_fall_back_to_orjson() -> None:
    local = LocalInfo("n1", "shop")
    for field, value in itertools.product(
        ("user_agent", "path", "host", "request_id", "proto", "method", "name"),
        ('say "hi"', "back\\slash", "tab\there", "nul\x00", "naïve", "😀", "del\x7f"),
    ):
        spans = [recorded(0), recorded(1, **{field: value}), recorded(2)]
        fast, reference = body_of(spans, local)
        assert fast == reference, (field, value)
        assert any(value in str(v) for v in orjson.loads(fast)[1]["tags"].values()) or (
            orjson.loads(fast)[1].get("name") == value
        )


def test_upstream_members_follow_the_address_object_and_escape_names() -> None:
    a, b = SocketAddress("::1", 80), SocketAddress("10.0.0.1", 81)
    members = ',"upstream_cluster":"c","upstream_cluster.name":"c","upstream_address":'
    assert zipkin._upstream_members("c", a) == members + '"[::1]:80"'
    assert zipkin._upstream_members("c", b) == members + '"10.0.0.1:81"'
    assert zipkin._upstream_members("c", a) == members + '"[::1]:80"'  # cached, its own
    assert zipkin._upstream_members("d", a) == members.replace('"c"', '"d"') + '"[::1]:80"'
    spans = [
        recorded(0, cluster='odd "name"\\', status=999, response_size=1000),
        recorded(2, status=1000),
    ]
    fast, reference = body_of(spans, LocalInfo("n1", "shop"))
    assert fast == reference and b'"upstream_cluster":"odd \\"name\\"' in fast


def test_request_id_integer_equals_int_for_every_prefix_shape() -> None:
    samples = ["00000063-1891-4d4c-8964-998ede09d368", "FFFFFFFF-x", "deadBEEF", "0000006",
               "0x123456-abc", " 1234567", "+1234567", "-1234567", "1_234567", "1234567g",
               "12345678", "gggggggg", "        ", "\uff11\uff12\uff13\uff14" * 2]  # fmt: skip
    for rid in samples:
        try:
            expected: int | None = int(rid[:8], 16) if len(rid) >= 8 else None
        except ValueError:
            expected = None
        assert sampler.request_id_integer(rid) == expected, rid


def test_trace_reason_reads_only_the_exact_nibbles() -> None:
    rid = "00000063-1891-4d4c-8964-998ede09d368"
    for nibble in "0123456789abcdefABCDEF":
        packed = rid[:14] + nibble + rid[15:]
        expected = {"9": sampler.SAMPLING, "a": sampler.SERVICE_FORCED,
                    "b": sampler.CLIENT_FORCED}.get(nibble, sampler.NOT_TRACEABLE)  # fmt: skip
        assert sampler.trace_reason(packed) == expected


def test_span_ids_are_random_nonzero_hex_and_not_inherited_by_a_fork() -> None:
    ids = {span.new_span_id() for _ in range(3 * span._IDS_PER_DRAW)}
    assert len(ids) == 3 * span._IDS_PER_DRAW
    assert all(len(i) == 16 and int(i, 16) != 0 and i == i.lower() for i in ids)
    span.new_span_id()  # the buffer now holds ids the parent has not used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id must not be the parent's next one
        os.write(write, span.new_span_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 16).decode()
    os.close(read)
    os.close(write)
    assert child != span.new_span_id()


def test_decide_draws_from_the_general_reading_when_the_prefix_is_not_plain_hex() -> None:
    # "0x000063" reads as 99 by int's rules: drawn below 1 % like the plain "00000063".
    for rid in ("0x000063-1891-4d4c-8964-998ede09d368", "+0000063-1891-4d4c-8964-998ede09d368",
                "00000063-1891-4d4c-8964-998ede09d368"):  # fmt: skip
        reason, new = sampler.decide(rid, client_trace_id=False, force_trace=False,
                                     client=10000, random_=100, overall=10000)  # fmt: skip
        assert reason == sampler.SAMPLING and new == sampler.with_reason(rid, sampler.SAMPLING)
    reason, new = sampler.decide("zz000063-1891-4d4c-8964-998ede09d368", client_trace_id=False,
                                 force_trace=False, client=10000, random_=10000,
                                 overall=10000)  # fmt: skip
    assert (reason, new) == (sampler.NOT_TRACEABLE, "zz000063-1891-4d4c-8964-998ede09d368")


def test_each_route_names_its_spans_when_routes_alternate() -> None:
    # HcmTracer remembers the last route's tracing fields: alternating routes must not mix.
    stats = Store()
    provider = TracingProvider(TracingProviderKind.ZIPKIN, "sink", "/api/v2/spans", "sink")
    t = HcmTracer(TracingConfig(provider, random_sampling=100), stats, "in",
                  ClusterManager({}, stats))  # fmt: skip
    match, action = RouteMatch(PathMatchKind.PREFIX, "/"), DirectResponseAction(200)
    cart = Route("cart", match, action, decorator="cart-op")
    plain = Route("plain", match, action)
    names = []
    for r in (cart, cart, plain, cart, None, plain):
        conn = SimpleNamespace(hcm=None, remote=("10.0.0.7", 40000), tls=None)
        s = ActiveStream(conn)  # type: ignore[arg-type]
        s.method, s.path, s.host_header = "GET", "/", "shop"
        s.headers.items = [("host", "shop"), ("x-request-id", RID)]
        started = t.start(s, r)
        assert started is not None
        names.append(started.name)
    assert names == ["cart-op", "cart-op", "shop", "cart-op", "shop", "shop"]
