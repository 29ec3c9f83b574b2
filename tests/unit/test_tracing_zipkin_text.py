"""The cheap paths of tracing give what the general ones give: the Zipkin body written as text
equals orjson's serialization of the span dicts byte for byte (and falls back to it for values
that need escaping), the sampler's hex reading equals ``int(..., 16)``, and span ids are
random non-zero 64-bit hex, not shared with a forked worker."""

from __future__ import annotations

import itertools
import os
from types import SimpleNamespace

import orjson
import pytest

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
    runs = zipkin._Runs()
    runs.start_batch(head, "")
    for s in spans:
        # Span by span: the text itself, not only the whole body (which could fall back).
        text = zipkin._span_text(s, runs, True, values)
        assert text == orjson.dumps(zipkin.span_dict(s, endpoint)).decode()
        # Again: now from the kept runs.
        assert zipkin._span_text(s, runs, False, values) == "," + text
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


def steady(i: int, **values: object) -> Span:
    """A span of steady traffic: the same request and response as the one before, new ids."""
    s = Span(f"{i + 1:016x}", f"{i + 1:016x}", "", sampled=True, client=False, shared=True,
             name="shop:80")  # fmt: skip
    s.start_us, s.duration_us = 1_700_000_000_000_000 + 1000 * i, 900 + i
    s.recorded = True
    s.proto, s.host, s.path, s.method = "http", "shop:80", "/1k", "GET"
    s.downstream_cluster, s.user_agent, s.peer = "-", "h2load nghttp2/1.59.0", "127.0.0.1"
    s.request_id = f"{i:08x}-1891-4d4c-8964-998ede09d368"
    s.request_size, s.response_size, s.status = 0, 1024, 200
    s.cluster, s.upstream_address = "backend", SocketAddress("127.0.0.1", 8080)
    for name, value in values.items():
        setattr(s, name, value)
    return s


#: Each kept member of either run, with another plain value and values needing escaping.
CHANGES: list[tuple[str, object, tuple[object, ...]]] = [
    ("proto", "https", ('ht"tp', "ht\\tp", "h\x01", "hé")),
    ("host", "cart:81", ('ca"rt', "c\\art", "c\nart", "cärt", "c😀")),
    ("path", "/2k?x=1\x7f", ('/"', "/\\", "/\t", "/\x1f", "/ü")),  # DEL: no escape
    ("method", "POST", ('PO"ST', "P\x1f")),
    ("downstream_cluster", "edge", ('e"dge', "e\\", "é")),
    ("user_agent", "curl/8.5.0", ('say "hi"', "tab\there", "naïve")),
    ("http10", True, ()),
    ("peer", "10.0.0.7", ('1"', "1\x00")),
    ("request_id", "", ('r"id', "r\\id", "rïd")),
    ("client_trace_id", "abc", ('a"bc', "a\x02", "äbc")),
    ("request_size", 2048, ()),
    ("response_size", 1_000_000, ()),
    ("status", 503, ()),
    ("status", 0, ()),
    ("response_flags", "UF,URX", ('U"F', "UF\\", "ÜF")),
    ("name", "", ('n"ame', "nam\x1b", "nämé")),
    ("parent_id", "00000000000000aa", ('0"', "ä0")),
    ("shared", False, ()),
    ("client", True, ()),
    ("cluster", 'odd "name"\\', ()),
    ("cluster", None, ()),
    ("upstream_address", None, ()),
    ("upstream_address", SocketAddress("::1", 80), ()),
    ("trace_id", "00000000000000ff00000000000000ff", ('f"f', "f\\f", "ff\x00", "fé")),
    ("span_id", "00000000000000ee", ('e"e', "é")),
]


def test_runs_of_equal_spans_and_a_value_changing_in_the_middle_of_a_batch() -> None:
    local = LocalInfo("n1", "shop")
    for field, plain, needing_escape in CHANGES:
        # A run of equal spans, one value changing in the middle (for one span, then for
        # the rest of the batch), and back: each run is rendered again or reused.
        for value in (plain, *needing_escape):
            spans = [steady(i) for i in range(3)]
            spans += [steady(3, **{field: value})]
            spans += [steady(i) for i in range(4, 6)]
            spans += [steady(i, **{field: value}) for i in range(6, 9)]
            spans += [steady(9)]
            fast, reference = body_of(spans, local)
            assert fast == reference, (field, value)


def test_a_value_needing_escaping_falls_back_whether_its_run_was_kept_or_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    local = LocalInfo("n1", "shop")
    fell_back: list[int] = []
    dicts = zipkin.encode_dicts

    def spy(spans: list[Span], local: LocalInfo) -> bytes:
        fell_back.append(len(spans))
        return dicts(spans, local)

    def fast_and_fell_back(spans: list[Span]) -> tuple[bytes, bool]:
        fell_back.clear()
        with monkeypatch.context() as m:
            m.setattr(zipkin, "encode_dicts", spy)
            fast = zipkin.encode(spans, local)
        assert fast == dicts(spans, local)
        return fast, bool(fell_back)

    for field, _, needing_escape in CHANGES:
        for value in needing_escape:
            # The runs are kept from a plain batch, then a span's value needs escaping: in
            # the middle of the batch (after reused runs) and first in one.
            assert fast_and_fell_back([steady(0), steady(1)])[1] is False
            assert fast_and_fell_back([steady(2), steady(3, **{field: value})])[1], field
            assert fast_and_fell_back([steady(4, **{field: value}), steady(5)])[1], field
            # A batch of only the bad span, twice: a run that failed the check is not kept,
            # so the second batch must fall back too (not reuse a run rendered unchecked).
            for _ in range(2):
                assert fast_and_fell_back([steady(6, **{field: value})])[1], field
            # After the bad span's batch, a plain one is written as text again.
            assert fast_and_fell_back([steady(7), steady(8)])[1] is False


def test_optional_members_present_and_absent_alternating() -> None:
    local = LocalInfo("n1", "shop")
    optional = {
        "request_id": "",
        "client_trace_id": "abc",
        "parent_id": "00000000000000aa",
        "name": "",
        "shared": False,
        "cluster": None,
        "upstream_address": None,
        "status": 0,
        "response_flags": "UF",
    }
    for field, value in optional.items():
        spans = [steady(i, **({field: value} if i % 2 else {})) for i in range(8)]
        fast, reference = body_of(spans, local)
        assert fast == reference, field
    # Every combination of the optional members, each span after another shape.
    shapes = list(itertools.product((False, True), repeat=len(optional)))
    spans = [
        steady(i, **{f: v for (f, v), on in zip(optional.items(), shape, strict=True) if on})
        for i, shape in enumerate(shapes)
    ]
    fast, reference = body_of(spans, local)
    assert fast == reference
    assert len(orjson.loads(fast)) == len(shapes)


def test_runs_across_batch_boundaries_and_a_changing_node() -> None:
    saved = LOCAL.zone, LOCAL.node_id
    try:
        local = LocalInfo("n1", "shop")
        for zone, node in (("", "n1"), ("eu-1", "n1"), ("eu-1", "n2"), ("", "n2"), ("", "n1")):
            LOCAL.zone, LOCAL.node_id = zone, node
            # Two batches of the same spans: the second starts from the first's runs.
            for _ in range(2):
                fast, reference = body_of([steady(i) for i in range(3)], local)
                assert fast == reference, (zone, node)
        # The local endpoint is in the head too.
        for service in ("shop", "cart", "shop"):
            fast, reference = body_of([steady(0), steady(1)], LocalInfo("n1", service))
            assert fast == reference
        # An empty batch, a batch of one and a mixed batch (dicts between texts).
        assert body_of([], local) == (b"[]", b"[]")
        mixed = [steady(0), steady(1), steady(2), steady(3)]
        mixed[0].custom = {"team": "cart"}
        mixed[2].tags = {"http.status_code": "200"}
        fast, reference = body_of(mixed, local)
        assert fast == reference
        fast, reference = body_of(mixed[1:2], local)
        assert fast == reference
    finally:
        LOCAL.zone, LOCAL.node_id = saved


def test_timestamps_and_durations_of_every_width() -> None:
    local = LocalInfo("n1", "shop")
    base = 1_700_000_000_000_000
    starts = [0, 1, 999, 1000, 999_999, 1_000_000, 1_000_001, 1_000_999_999, base, base + 7,
              base + 70, base + 999, base + 1000, base + 1001, base + 999_999, base + 1_000_000,
              base + 1_000_000, base - 1, base + 10**9 + 123_456, 10**18 + 5]  # fmt: skip
    durations = [1, 9, 1023, 1024, 999_999, 10**12]
    spans = [
        steady(i, start_us=start, duration_us=durations[i % len(durations)])
        for i, start in enumerate(starts)
    ]
    fast, reference = body_of(spans, local)
    assert fast == reference
    assert [span["timestamp"] for span in orjson.loads(fast)] == starts
    # A second changing in the middle of a batch, and back.
    for starts in ([base, base + 1_000_000, base], [base + 999_999, base + 1_000_000]):
        spans = [steady(i, start_us=start) for i, start in enumerate(starts)]
        fast, reference = body_of(spans, local)
        assert fast == reference
