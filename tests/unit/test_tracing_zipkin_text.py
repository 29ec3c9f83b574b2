"""The cheap paths of tracing give what the general ones give: the Zipkin body the C span
writer (tracing/_zipkin_text.c, compiled here as ``ubimesh build-native`` compiles it) makes
equals orjson's serialization of the span dicts byte for byte (a span with a value that needs
escaping is written by orjson in its place), the sampler's hex reading equals
``int(..., 16)``, and span ids are random non-zero 64-bit hex, not shared with a forked
worker."""

from __future__ import annotations

import itertools
import os
import random
from types import ModuleType, SimpleNamespace
from typing import Any

import orjson
import pytest
from tests.support.c_extension import compile_and_load

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


@pytest.fixture(scope="module")
def c_module(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return compile_and_load("ubimesh.proxy.tracing._zipkin_text", tmp_path_factory.mktemp("c"))


class Spy:
    """The C SpanText, counting the spans it wrote and those it declined (then ``raw``)."""

    made: list[Spy] = []

    def __init__(self, module: ModuleType, head: str, zone_part: str) -> None:
        self.inner = module.SpanText(head, zone_part)
        self.written = 0
        self.declined = 0
        Spy.made.append(self)

    def __call__(self, *args: Any) -> bool:
        ok: bool = self.inner(*args)
        if ok:
            self.written += 1
        else:
            self.declined += 1
        return ok

    def raw(self, data: bytes) -> None:
        self.inner.raw(data)

    def body(self) -> bytes:
        body: bytes = self.inner.body()
        return body


@pytest.fixture
def text_type(c_module: ModuleType) -> Any:
    Spy.made.clear()
    return lambda head, zone_part: Spy(c_module, head, zone_part)


def body_of(spans: list[Span], local: LocalInfo, text_type: Any) -> tuple[bytes, bytes]:
    """The batch's body through the C writer, and the reference."""
    batch = zipkin.ZipkinBatch(local, text_type)
    assert batch.text is not None
    for s in spans:
        batch.add(s)
    assert batch.count == len(spans)
    return batch.body(), zipkin.encode_dicts(spans, local)


def declined() -> int:
    return sum(spy.declined for spy in Spy.made)


def written() -> int:
    return sum(spy.written for spy in Spy.made)


def test_the_text_is_orjsons_serialization_of_each_span_shape(text_type: Any) -> None:
    local = LocalInfo("node-1", "shop")
    spans = [recorded(i) for i in range(24)]
    endpoint = {"serviceName": "shop", "ipv4": zipkin.local_ipv4()}
    for s in spans:
        # Span by span: the text itself, written by the C (not declined).
        fast, _ = body_of([s], local, text_type)
        assert fast == b"[" + orjson.dumps(zipkin.span_dict(s, endpoint)) + b"]"
    assert written() == len(spans) and declined() == 0
    fast, reference = body_of(spans, local, text_type)
    assert fast == reference


def test_zone_custom_and_explicit_tags_and_odd_node_values(text_type: Any) -> None:
    saved = LOCAL.zone, LOCAL.node_id
    LOCAL.zone, LOCAL.node_id = "eu-1", 'node "1"\\'
    try:
        spans = [recorded(i) for i in range(6)]
        spans[1].custom = {"http.method": "OVERRIDDEN", "team": "cart"}
        spans[2].tags = {"http.status_code": "200"}
        spans[3].recorded = False
        fast, reference = body_of(spans, LocalInfo("n1", "shop"), text_type)
        assert fast == reference
        # The three spans with custom, explicit or no recorded tags: by orjson, in place.
        assert (written(), declined()) == (3, 0)
        assert orjson.loads(fast)[1]["tags"]["http.method"] == "OVERRIDDEN"
        assert orjson.loads(fast)[0]["tags"]["zone"] == "eu-1"
        assert orjson.loads(fast)[0]["tags"]["node_id"] == 'node "1"\\'
        # A node value beyond ASCII: the C takes no such head, the batch is the dicts'.
        batch = zipkin.ZipkinBatch(LocalInfo("n1", "shöp"), text_type)
        assert batch.text is None
        for s in spans:
            batch.add(s)
        assert batch.body() == zipkin.encode_dicts(spans, LocalInfo("n1", "shöp"))
    finally:
        LOCAL.zone, LOCAL.node_id = saved


def test_values_that_need_escaping_fall_back_to_orjson(text_type: Any) -> None:
    local = LocalInfo("n1", "shop")
    for field, value in itertools.product(
        ("user_agent", "path", "host", "request_id", "proto", "method", "name", "peer",
         "downstream_cluster", "client_trace_id", "response_flags", "parent_id", "span_id",
         "trace_id"),
        ('say "hi"', "back\\slash", "tab\there", "nul\x00", "esc\x1f", "naïve", "😀"),
    ):  # fmt: skip
        Spy.made.clear()
        spans = [recorded(0), recorded(1, **{field: value}), recorded(2)]
        fast, reference = body_of(spans, local, text_type)
        assert fast == reference, (field, value)
        # Only the span with the value is declined (and written by orjson in its place).
        assert (written(), declined()) == (2, 1), (field, value)
    # DEL needs no escaping (orjson writes it as it is): the C writes it.
    Spy.made.clear()
    fast, reference = body_of([recorded(0, path="/del\x7f")], local, text_type)
    assert fast == reference and (written(), declined()) == (1, 0)


def test_upstream_members_follow_the_address_object_and_escape_names(text_type: Any) -> None:
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
    fast, reference = body_of(spans, LocalInfo("n1", "shop"), text_type)
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


def test_equal_spans_and_a_value_changing_in_the_middle_of_a_batch(text_type: Any) -> None:
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
            fast, reference = body_of(spans, local, text_type)
            assert fast == reference, (field, value)


def test_a_value_needing_escaping_is_declined_wherever_it_is_in_a_batch(text_type: Any) -> None:
    local = LocalInfo("n1", "shop")
    for field, _, needing_escape in CHANGES:
        for value in needing_escape:
            # In the middle of a batch, first in one, and alone: each time only that span
            # is declined, and plain spans after it are written by the C again.
            for shape in ((0, 1, 0), (1, 0), (1,), (1, 1, 0, 0)):
                Spy.made.clear()
                spans = [steady(i, **({field: value} if bad else {})) for i, bad in
                         enumerate(shape)]  # fmt: skip
                fast, reference = body_of(spans, local, text_type)
                assert fast == reference, (field, value, shape)
                assert declined() == sum(shape), (field, value, shape)
                assert written() == len(shape) - sum(shape), (field, value, shape)


def test_optional_members_present_and_absent_alternating(text_type: Any) -> None:
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
        fast, reference = body_of(spans, local, text_type)
        assert fast == reference, field
    # Every combination of the optional members, each span after another shape.
    shapes = list(itertools.product((False, True), repeat=len(optional)))
    spans = [
        steady(i, **{f: v for (f, v), on in zip(optional.items(), shape, strict=True) if on})
        for i, shape in enumerate(shapes)
    ]
    fast, reference = body_of(spans, local, text_type)
    assert fast == reference
    assert len(orjson.loads(fast)) == len(shapes)


def test_batches_in_a_row_and_a_changing_node(text_type: Any) -> None:
    saved = LOCAL.zone, LOCAL.node_id
    try:
        local = LocalInfo("n1", "shop")
        for zone, node in (("", "n1"), ("eu-1", "n1"), ("eu-1", "n2"), ("", "n2"), ("", "n1")):
            LOCAL.zone, LOCAL.node_id = zone, node
            # Two batches of the same spans: each has the node of its start.
            for _ in range(2):
                fast, reference = body_of([steady(i) for i in range(3)], local, text_type)
                assert fast == reference, (zone, node)
        # The local endpoint is in the head too.
        for service in ("shop", "cart", "shop"):
            fast, reference = body_of([steady(0), steady(1)], LocalInfo("n1", service), text_type)
            assert fast == reference
        # An empty batch, a batch of one and a mixed batch (dicts between texts).
        assert body_of([], local, text_type) == (b"[]", b"[]")
        mixed = [steady(0), steady(1), steady(2), steady(3)]
        mixed[0].custom = {"team": "cart"}
        mixed[2].tags = {"http.status_code": "200"}
        fast, reference = body_of(mixed, local, text_type)
        assert fast == reference
        fast, reference = body_of(mixed[1:2], local, text_type)
        assert fast == reference
    finally:
        LOCAL.zone, LOCAL.node_id = saved


def test_timestamps_and_durations_of_every_width(text_type: Any) -> None:
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
    fast, reference = body_of(spans, local, text_type)
    assert fast == reference
    assert [span["timestamp"] for span in orjson.loads(fast)] == starts
    # A second changing in the middle of a batch, and back.
    for starts in ([base, base + 1_000_000, base], [base + 999_999, base + 1_000_000]):
        spans = [steady(i, start_us=start) for i, start in enumerate(starts)]
        fast, reference = body_of(spans, local, text_type)
        assert fast == reference


def test_the_writer_refuses_what_it_cannot_write_and_grows_its_buffer(c_module: ModuleType) -> None:
    text_type = c_module.SpanText
    for head, zone in (("é", ""), ("", "ü"), (b"x", ""), ("", None)):
        with pytest.raises(ValueError, match="must be an ASCII str"):
            text_type(head, zone)
    t = text_type(',"tags":{"http.url":"', "")
    args: list[Any] = ["a", "b", "", False, False, 1, 2, "http", "h", "/", "GET", "-", "-",
                       False, "p", "", "", 0, 0, "", 200, "", ""]  # fmt: skip
    assert len(t) == 0 and t(*args) is True and len(t) == 1
    with pytest.raises(TypeError):
        t(*args[:-1])
    with pytest.raises(TypeError):
        t(*args, name="x")
    with pytest.raises(TypeError):
        t.raw("not bytes")
    # Values of another type, or ints beyond 64 bits: declined, nothing written.
    for at, value in ((0, b"a"), (0, None), (3, 1), (5, 2**64), (5, -(2**63) - 1), (5, 1.0),
                      (5, True), (17, "1"), (13, None), (19, "ü"), (19, 1)):  # fmt: skip
        bad = list(args)
        bad[at] = value
        assert t(*bad) is False, (at, value)
    assert len(t) == 1
    # The extremes of 64 bits are written as Python writes them.
    wide = list(args)
    wide[5], wide[6] = 2**63 - 1, -(2**63)
    assert t(*wide) is True
    body = orjson.loads(t.body())
    assert [(s["timestamp"], s["duration"]) for s in body] == [(1, 2), (2**63 - 1, -(2**63))]
    # body() empties the batch; a batch far beyond the first buffer (4 KiB) and values of
    # 100 KB are copied whole.
    assert len(t) == 0 and t.body() == b"[]"
    long_path = "/" + "x" * 100_000
    for i in range(300):
        many = list(args)
        many[9] = long_path if i % 100 == 0 else f"/{i}"
        assert t(*many)
    t.raw(b'{"raw":true}')
    spans = orjson.loads(t.body())
    assert len(spans) == 301 and spans[-1] == {"raw": True}
    assert spans[0]["tags"]["http.url"] == "http://h" + long_path
    assert spans[299]["tags"]["http.url"] == "http://h/299"


def test_without_the_build_a_batch_is_written_from_the_dicts() -> None:
    local = LocalInfo("n1", "shop")
    spans = [steady(i) for i in range(5)]
    batch = zipkin.ZipkinBatch(local, None)
    for s in spans:
        batch.add(s)
    assert batch.text is None and batch.count == 5 and batch.spans == spans
    assert batch.body() == zipkin.encode_dicts(spans, local)


def test_random_spans_equal_the_dicts(text_type: Any) -> None:
    rng = random.Random(6)
    texts = ("", "-", "a", "shop:80", "/p?q=1&r=2", "x" * 9, "y" * 300, "h2load/1.59.0",
             'q"uote', "back\\slash", "ctl\x01", "tab\t", "del\x7f", "café", "日本",
             "😀")  # fmt: skip
    ints = (0, 1, 255, 256, 2**30 - 1, 2**30, 2**60 + 7, 2**62, -1, -(2**31), 1_700_000_000_123_456)
    addresses = (None, SocketAddress("10.0.0.1", 80), SocketAddress("::1", 8080))
    local = LocalInfo("n1", "shop")
    saved = LOCAL.zone, LOCAL.node_id
    try:
        for batch_no in range(20):
            LOCAL.zone = rng.choice(("", "eu-1"))
            spans = []
            for i in range(100):
                s = steady(batch_no * 100 + i)
                for field in ("proto", "host", "path", "method", "downstream_cluster",
                              "user_agent", "peer", "request_id", "client_trace_id",
                              "response_flags", "name", "parent_id", "trace_id",
                              "span_id"):  # fmt: skip
                    if rng.random() < 0.3:
                        setattr(s, field, rng.choice(texts))
                for field in ("start_us", "duration_us", "request_size", "response_size",
                              "status"):  # fmt: skip
                    if rng.random() < 0.3:
                        setattr(s, field, rng.choice(ints))
                s.client, s.shared, s.http10 = (rng.random() < 0.5 for _ in range(3))
                s.cluster = rng.choice((None, "backend", 'odd "c"', "célèbre"))
                s.upstream_address = rng.choice(addresses)
                if rng.random() < 0.05:
                    s.custom = {"team": rng.choice(texts)}
                spans.append(s)
            fast, reference = body_of(spans, local, text_type)
            assert fast == reference, batch_no
        # Both ways were taken, many times.
        assert written() > 200 and declined() > 200
    finally:
        LOCAL.zone, LOCAL.node_id = saved
