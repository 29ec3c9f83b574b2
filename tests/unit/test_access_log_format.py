"""Access log formats and filters: Envoy's operators, "-" and null for missing values, typed
JSON values, refusals naming the command."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace
from typing import Any

import pytest

from ubimesh.proto.headers import Headers
from ubimesh.proxy.access_log.filters import compile_filter
from ubimesh.proxy.access_log.format import (
    DEFAULT_FORMAT,
    FormatError,
    LogEntry,
    compile_format,
    compile_json,
    compile_log_format,
    compile_text,
)
from ubimesh.proxy.routing.formatter import compile_time_format
from ubimesh.proxy.snapshot.types import AccessLogFilter


def http_entry(**overrides: object) -> LogEntry:
    e = LogEntry()
    e.http = True
    e.start_time = 1_700_000_000.25
    e.duration_ms = 12
    e.method = "GET"
    e.path = "/api/items?x=1"
    e.authority = "shop.example"
    e.protocol = "HTTP/1.1"
    e.request_headers = Headers(
        [("user-agent", "curl/8"), ("x-request-id", "rid-1"), ("x-empty", "")]
    )
    e.response_headers = [("content-type", "text/plain"), ("x-envoy-upstream-service-time", "3")]
    e.status = 200
    e.details = "via_upstream"
    e.bytes_received = 5
    e.bytes_sent = 42
    e.upstream_host = "10.0.0.7:8080"
    e.upstream_cluster = "shop"
    e.route_name = "r1"
    e.downstream_remote = ("10.1.2.3", 51000)
    e.downstream_local = ("10.0.0.1", 15006)
    e.peer_uri_san = "spiffe://mesh.local/ns/a/sa/b"
    for k, v in overrides.items():
        setattr(e, k, v)
    return e


def test_default_format_is_envoys() -> None:
    line = compile_format(None)(http_entry())
    assert line == (
        '[2023-11-14T22:13:20.250Z] "GET /api/items?x=1 HTTP/1.1" 200 - 5 42 12 3 "-" '
        '"curl/8" "rid-1" "shop.example" "10.0.0.7:8080"\n'
    )
    assert DEFAULT_FORMAT.endswith("\n")


def test_text_operators_and_missing_values() -> None:
    fmt = compile_text(
        "%REQ(:METHOD)% %REQ(:PATH):4% %REQ(X-NOPE?USER-AGENT)% %REQ(x-empty)% "
        "%RESP(CONTENT-TYPE)% "
        "%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% "
        "%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_PEER_URI_SAN% %REQUESTED_SERVER_NAME% "
        "%ROUTE_NAME% %UPSTREAM_CLUSTER% %RESPONSE_CODE_DETAILS% 100%% %START_TIME(%s.%3f)%"
    )
    assert fmt(http_entry()) == (
        "GET /api curl/8 - text/plain 10.1.2.3:51000 10.1.2.3 10.0.0.1:15006 "
        "spiffe://mesh.local/ns/a/sa/b - r1 shop via_upstream 100% 1700000000.250"
    )


def test_ipv6_addresses_are_bracketed() -> None:
    fmt = compile_text("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_PORT%")
    assert fmt(http_entry(downstream_remote=("::1", 80))) == "[::1]:80 80"


def test_tcp_entry_prints_dash_for_http_operators() -> None:
    e = LogEntry()
    e.downstream_local = ("127.0.0.1", 9000)
    e.termination_details = "rbac_access_denied_matched_policy[egress]"
    fmt = compile_text(
        "%RESPONSE_CODE% %PROTOCOL% %REQ(:METHOD)% %RESPONSE_FLAGS% "
        "%CONNECTION_TERMINATION_DETAILS% %DOWNSTREAM_PEER_URI_SAN%"
    )
    assert fmt(e) == "0 - - - rbac_access_denied_matched_policy[egress] -"


def test_omit_empty_values_in_text() -> None:
    fmt = compile_text("[%REQ(x-nope)%][%UPSTREAM_HOST%]", omit_empty_values=True)
    assert fmt(http_entry(upstream_host="")) == "[][]"


def test_json_types_nesting_and_nulls() -> None:
    fmt = compile_json(
        {
            "code": "%RESPONSE_CODE%",
            "dur": "%DURATION%",
            "rx": "%BYTES_RECEIVED%",
            "flags": "%RESPONSE_FLAGS%",
            "sni": "%REQUESTED_SERVER_NAME%",
            "mixed": "code %RESPONSE_CODE% %REQ(x-nope)%",
            "lit": "plain",
            "n": 7,
            "nested": {"b": "%UPSTREAM_HOST%", "a": "%ROUTE_NAME%"},
        }
    )
    line = fmt(http_entry())
    assert line.endswith("\n")
    assert line.index('"code"') < line.index('"dur"') < line.index('"nested"')  # sorted keys
    assert json.loads(line) == {
        "code": 200,
        "dur": 12,
        "rx": 5,
        "flags": "-",
        "sni": None,
        "mixed": "code 200 -",
        "lit": "plain",
        "n": 7,
        "nested": {"a": "r1", "b": "10.0.0.7:8080"},
    }


def test_json_omit_empty_values_drops_keys() -> None:
    fmt = compile_json({"sni": "%REQUESTED_SERVER_NAME%", "code": "%RESPONSE_CODE%"}, True)
    assert json.loads(fmt(http_entry())) == {"code": 200}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("%CONNECTION_ID%", "%CONNECTION_ID% is not supported"),
        ("%REQUEST_DURATION%", "%REQUEST_DURATION% is not supported"),
        ("%REQ()%", "requires a header name"),
        ("%REQ(a?b?c)%", "more than 1 alternative"),
        ("%DURATION(x)%", "does not take any parameters"),
        ("%START_TIME%:3", None),  # a literal ":3" after the command is fine
        ("50% off", "no valid command at position 2"),
        ("%start_time%", "no valid command"),
    ],
)
def test_refusals_name_the_command(text: str, message: str | None) -> None:
    if message is None:
        compile_text(text)
        return
    with pytest.raises(FormatError, match=re.escape(message)):
        compile_text(text)


def test_json_lists_are_refused() -> None:
    with pytest.raises(FormatError, match=r"json_format\.a"):
        compile_json({"a": ["%RESPONSE_CODE%"]})


def test_filters() -> None:
    errors = compile_filter(AccessLogFilter("status_code_filter", op="GE", value=400))
    assert errors(http_entry(status=503)) and not errors(http_entry(status=200))
    exact = compile_filter(AccessLogFilter("status_code_filter", op="EQ", value=200))
    assert exact(http_entry()) and not exact(http_entry(status=201))
    other = compile_filter(AccessLogFilter("status_code_filter", op="NE", value=200))
    assert other(http_entry(status=201)) and not other(http_entry())
    fast = compile_filter(AccessLogFilter("duration_filter", op="LE", value=12))
    assert fast(http_entry()) and not fast(http_entry(duration_ms=13))
    flagged = compile_filter(AccessLogFilter("response_flag_filter", flags=("UH", "NR")))
    assert flagged(http_entry(flags="UF,UH")) and not flagged(http_entry(flags="UF"))
    assert not flagged(http_entry())
    any_flag = compile_filter(AccessLogFilter("response_flag_filter"))
    assert any_flag(http_entry(flags="DC")) and not any_flag(http_entry())
    both = compile_filter(
        AccessLogFilter(
            "and_filter",
            filters=(
                AccessLogFilter("status_code_filter", op="GE", value=500),
                AccessLogFilter("not_health_check_filter"),
            ),
        )
    )
    assert both(http_entry(status=500)) and not both(http_entry())
    either = compile_filter(
        AccessLogFilter(
            "or_filter",
            filters=(
                AccessLogFilter("status_code_filter", op="GE", value=500),
                AccessLogFilter("duration_filter", op="GE", value=1000),
            ),
        )
    )
    assert either(http_entry(duration_ms=1500)) and not either(http_entry())


@pytest.mark.parametrize(
    "fmt", ["", "%Y-%m-%dT%H:%M:%S.%3fZ", "%s.%6f", "%H:%M:%S.%9f x", "%1f", "%8f", "%E3S"]
)
def test_start_time_cached_per_second_renders_as_envoy(fmt: str) -> None:
    fast = compile_text(f"%START_TIME({fmt})%" if fmt else "%START_TIME%")
    plain = compile_time_format(fmt or "%Y-%m-%dT%H:%M:%S.%3fZ")
    rng = random.Random(7)
    e = LogEntry()
    for _ in range(500):
        e.start_time = 1_700_000_000 + rng.random() * 3
        assert fast(e) == plain(e.start_time)


def test_start_time_cache_crosses_second_boundaries() -> None:
    # The per-second prefix is keyed by the second: going forward, back and forward again
    # across boundaries never shows a stale second.
    fast = compile_text("%START_TIME%|%START_TIME(%s.%6f)%")
    plain = compile_time_format("%Y-%m-%dT%H:%M:%S.%3fZ")
    epoch = compile_time_format("%s.%6f")
    base = 1_700_000_009
    for t in (base + 0.9994, base + 0.9996, base + 1.0, base + 1.0004, base + 0.5, base + 61.25):
        e = http_entry(start_time=t)
        assert fast(e) == f"{plain(t)}|{epoch(t)}"
    # Milliseconds are truncated, as Envoy does: .9996 is still the earlier second.
    assert fast(http_entry(start_time=base + 0.9996)).startswith("2023-11-14T22:13:29.999Z|")
    assert fast(http_entry(start_time=base + 1.0)).startswith("2023-11-14T22:13:30.000Z|")


def test_address_text_follows_the_entry() -> None:
    # The formatter keeps the last address's text: a different address must never reuse it.
    fmt = compile_text("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS%")
    assert fmt(http_entry()) == "10.1.2.3:51000 10.0.0.1:15006"
    assert fmt(http_entry(downstream_remote=("10.1.2.3", 51001))) == "10.1.2.3:51001 10.0.0.1:15006"
    assert fmt(http_entry(downstream_remote=("::1", 80))) == "[::1]:80 10.0.0.1:15006"
    assert fmt(http_entry(downstream_remote=None, downstream_local=("", 0))) == "- -"
    assert fmt(http_entry()) == "10.1.2.3:51000 10.0.0.1:15006"


def test_request_headers_first_value_and_alternatives() -> None:
    # Several commands on the same and on different headers, first value wins, an empty
    # value is "not available" (the alternative is used), pseudo-headers from the request.
    headers = Headers(
        [("x-a", ""), ("x-b", "b1"), ("x-a", "a2"), ("x-b", "b2"), ("host", "h.example")]
    )
    fmt = compile_text(
        "%REQ(X-A)% %REQ(X-A?X-B)% %REQ(X-B):1% %REQ(HOST)% %REQ(:SCHEME)% %REQ(:NOPE?X-B)% "
        "%REQ(X-NOPE?:METHOD)%"
    )
    e = http_entry(request_headers=headers)
    assert fmt(e) == "- b1 b shop.example https b1 GET"
    tcp = LogEntry()
    assert fmt(tcp) == "- - - - - - -"


def _ended_stream(conn: object, upstream: object, route: object = None) -> Any:
    """A finished GET / answered 200, as ``logger.http_entry`` reads a stream: only the
    fields it reads (the formatter runs interpreted here, so any object will do)."""
    return SimpleNamespace(
        conn=conn, start_time=0.0, method="GET", path="/", target="/", host_header="h",
        http10=False, headers=Headers(), response_headers=[], status=200, flags="",
        details="", bytes_received=0, bytes_sent=0, route=route, upstream=upstream,
    )  # fmt: skip


def test_http_entry_upstream_host_follows_the_address() -> None:
    # The entry keeps the last upstream address's text: a host re-resolved to a new address
    # (Host.address replaced) or another host must show its own.
    from ubimesh.proxy.access_log.logger import http_entry as entry_of
    from ubimesh.proxy.snapshot.types import SocketAddress

    host = SimpleNamespace(address=SocketAddress("10.0.0.7", 8080))
    up = SimpleNamespace(host=host, cluster=SimpleNamespace(name="shop"), response_started=True)
    conn = SimpleNamespace(remote=("10.1.2.3", 1), local=("10.0.0.1", 2), tls=None, sni="")
    stream = _ended_stream(conn, up)
    fmt = compile_text("%UPSTREAM_HOST% %UPSTREAM_CLUSTER% %RESPONSE_CODE_DETAILS%")
    assert fmt(entry_of(stream)) == "10.0.0.7:8080 shop via_upstream"
    host.address = SocketAddress("::1", 9090)
    assert fmt(entry_of(stream)) == "[::1]:9090 shop via_upstream"
    up.host = SimpleNamespace(address=SocketAddress("10.0.0.8", 8080))
    assert fmt(entry_of(stream)) == "10.0.0.8:8080 shop via_upstream"
    up.host = None
    assert fmt(entry_of(stream)) == "- shop via_upstream"


def test_http_entry_route_and_cluster_names_follow_the_objects() -> None:
    # The entry caches the last route's and cluster's name by identity: another route or
    # cluster must show its own name.
    from ubimesh.proxy.access_log.logger import http_entry as entry_of

    up = SimpleNamespace(host=None, cluster=SimpleNamespace(name="c1"), response_started=True)
    conn = SimpleNamespace(remote=("10.1.2.3", 1), local=("10.0.0.1", 2), tls=None, sni="")
    stream = _ended_stream(conn, up, route=SimpleNamespace(name="r1"))
    fmt = compile_text("%ROUTE_NAME% %UPSTREAM_CLUSTER%")
    assert fmt(entry_of(stream)) == "r1 c1"
    assert fmt(entry_of(stream)) == "r1 c1"
    stream.route = SimpleNamespace(name="r2")
    up.cluster = SimpleNamespace(name="c2")
    assert fmt(entry_of(stream)) == "r2 c2"
    stream.route = None
    assert fmt(entry_of(stream)) == "- c2"


def test_consecutive_lines_show_their_own_values() -> None:
    # A text format reuses the piece the previous line made for a repeated value (text and
    # numbers), and the last command carries the text after it: a value that changes, goes
    # missing or comes back must still show as itself, whether a line is rendered alone or
    # in a batch.
    fmt = compile_log_format(
        '<%REQ(:METHOD)% %RESPONSE_CODE% %BYTES_SENT% %RESPONSE_FLAGS% "%REQ(USER-AGENT)%" '
        '"%REQ(X-REQUEST-ID)%">\n',
        "",
        False,
    )
    steps: list[tuple[dict[str, object], str]] = [
        ({}, '<GET 200 42 - "curl/8" "rid-1">\n'),
        ({}, '<GET 200 42 - "curl/8" "rid-1">\n'),
        ({}, '<GET 200 42 - "curl/8" "rid-1">\n'),
        (
            {"method": "POST", "status": 503, "bytes_sent": 1024, "flags": "UF"},
            '<POST 503 1024 UF "curl/8" "rid-1">\n',
        ),
        ({"status": 503, "bytes_sent": 1024}, '<GET 503 1024 - "curl/8" "rid-1">\n'),
        ({"status": 503, "bytes_sent": 1024}, '<GET 503 1024 - "curl/8" "rid-1">\n'),
        (
            {"request_headers": Headers([("x-request-id", "rid-2")])},
            '<GET 200 42 - "-" "rid-2">\n',
        ),
        ({"method": "", "request_headers": None}, '<- 200 42 - "-" "-">\n'),
        ({}, '<GET 200 42 - "curl/8" "rid-1">\n'),
    ]
    for batch in (False, True):
        pieces: list[str] = []
        for overrides, expected in steps:
            if batch:
                fmt.render_into(http_entry(**overrides), pieces)
            else:
                assert fmt.render(http_entry(**overrides)) == expected, overrides
        if batch:
            assert "".join(pieces) == "".join(expected for _, expected in steps)
    tcp = LogEntry()
    assert fmt.render(tcp) == '<- 0 0 - "-" "-">\n'
    assert fmt.render(tcp) == '<- 0 0 - "-" "-">\n'


def test_default_format_over_consecutive_requests() -> None:
    # Envoy's default format line by line as the request ids, durations and milliseconds
    # change and the rest repeats.
    fmt = compile_log_format(None)
    lines = []
    for i in range(3):
        headers = Headers([("user-agent", "curl/8"), ("x-request-id", f"rid-{i}")])
        e = http_entry(request_headers=headers, duration_ms=i, start_time=1_700_000_000.25 + i / 2)
        lines.append(fmt.render(e))
    assert lines == [
        '[2023-11-14T22:13:20.250Z] "GET /api/items?x=1 HTTP/1.1" 200 - 5 42 0 3 "-" '
        '"curl/8" "rid-0" "shop.example" "10.0.0.7:8080"\n',
        '[2023-11-14T22:13:20.750Z] "GET /api/items?x=1 HTTP/1.1" 200 - 5 42 1 3 "-" '
        '"curl/8" "rid-1" "shop.example" "10.0.0.7:8080"\n',
        '[2023-11-14T22:13:21.250Z] "GET /api/items?x=1 HTTP/1.1" 200 - 5 42 2 3 "-" '
        '"curl/8" "rid-2" "shop.example" "10.0.0.7:8080"\n',
    ]


def test_http_entry_addresses_are_the_connections() -> None:
    # An HTTP entry reads its addresses off its connection when a format shows them.
    from ubimesh.proxy.access_log.logger import http_entry as entry_of

    conn = SimpleNamespace(remote=("10.1.2.3", 1), local=("::1", 2), tls=None, sni="")
    stream = _ended_stream(conn, None)
    fmt = compile_text(
        "%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_PORT% "
        "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_ADDRESS%"
    )
    assert fmt(entry_of(stream)) == "10.1.2.3:1 1 ::1 [::1]:2"
    json_fmt = compile_json({"r": "%DOWNSTREAM_REMOTE_ADDRESS%", "p": "%DOWNSTREAM_LOCAL_PORT%"})
    assert json.loads(json_fmt(entry_of(stream))) == {"p": 2, "r": "10.1.2.3:1"}


def test_runs_of_repeated_values_follow_each_change() -> None:
    # Consecutive commands whose values repeat go in as one piece made on an earlier line: a
    # value changing inside such a run, then changing back, must show every time.
    fmt = compile_log_format("%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE%|", "", False)
    paths = ["/a", "/a", "/a", "/a", "/b", "/b", "/b", "/a", "/a", "/a", "/c", "/a", "/a", "/a"]
    codes = [200, 200, 200, 200, 200, 200, 404, 404, 404, 200, 200, 200, 200, 200]
    pieces: list[str] = []
    for path, code in zip(paths, codes, strict=True):
        fmt.render_into(http_entry(path=path, status=code), pieces)
    assert "".join(pieces) == "".join(
        f"GET {path} HTTP/1.1 {code}|" for path, code in zip(paths, codes, strict=True)
    )
    for _ in range(6):
        pieces = []
        fmt.render_into(http_entry(), pieces)
    assert pieces == ["GET /api/items?x=1 HTTP/1.1 200|"]  # the run is one piece by now
