"""Access log formats and filters: Envoy's operators, "-" and null for missing values, typed
JSON values, refusals naming the command."""

from __future__ import annotations

import json
import random
import re

import pytest

from ubimesh.proto.headers import Headers
from ubimesh.proxy.access_log.filters import compile_filter
from ubimesh.proxy.access_log.format import (
    DEFAULT_FORMAT,
    FormatError,
    LogEntry,
    compile_format,
    compile_json,
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


def test_http_entry_upstream_host_follows_the_address() -> None:
    # The entry keeps the last upstream address's text: a host re-resolved to a new address
    # (Host.address replaced) or another host must show its own.
    from types import SimpleNamespace
    from typing import Any

    from ubimesh.proxy.access_log.logger import http_entry as entry_of
    from ubimesh.proxy.snapshot.types import SocketAddress

    host = SimpleNamespace(address=SocketAddress("10.0.0.7", 8080))
    up = SimpleNamespace(host=host, cluster=SimpleNamespace(name="shop"), response_started=True)
    conn = SimpleNamespace(remote=("10.1.2.3", 1), local=("10.0.0.1", 2), tls=None, sni="")
    stream: Any = SimpleNamespace(
        conn=conn, start_time=0.0, method="GET", path="/", target="/", host_header="h",
        http10=False, headers=Headers(), response_headers=[], status=200, flags="",
        details="", bytes_received=0, bytes_sent=0, route=None, upstream=up,
    )  # fmt: skip
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
    from types import SimpleNamespace
    from typing import Any

    from ubimesh.proxy.access_log.logger import http_entry as entry_of

    up = SimpleNamespace(host=None, cluster=SimpleNamespace(name="c1"), response_started=True)
    conn = SimpleNamespace(remote=("10.1.2.3", 1), local=("10.0.0.1", 2), tls=None, sni="")
    stream: Any = SimpleNamespace(
        conn=conn, start_time=0.0, method="GET", path="/", target="/", host_header="h",
        http10=False, headers=Headers(), response_headers=[], status=200, flags="",
        details="", bytes_received=0, bytes_sent=0, route=SimpleNamespace(name="r1"),
        upstream=up,
    )  # fmt: skip
    fmt = compile_text("%ROUTE_NAME% %UPSTREAM_CLUSTER%")
    assert fmt(entry_of(stream)) == "r1 c1"
    assert fmt(entry_of(stream)) == "r1 c1"
    stream.route = SimpleNamespace(name="r2")
    up.cluster = SimpleNamespace(name="c2")
    assert fmt(entry_of(stream)) == "r2 c2"
    stream.route = None
    assert fmt(entry_of(stream)) == "- c2"
