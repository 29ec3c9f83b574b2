"""The header value formatter: command operators, grammar errors, START_TIME formats.

Expectations marked "observed" come from Envoy 1.40 (request_headers_to_add values seen by an
echo upstream; errors from ``envoy --mode validate``).
"""

from __future__ import annotations

import socket

import pytest

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.formatter import (
    FormatContext,
    FormatError,
    compile_format,
    compile_time_format,
    literal_format,
)

START = 1795645558.439387  # 2026-11-25T22:25:58.439387Z


@pytest.fixture
def ctx() -> FormatContext:
    return FormatContext(
        Headers([("x-long", "abcdef"), ("x-dup", "1"), ("x-dup", "2"), ("x-empty", "")]),
        method="GET",
        path="/old/x?q=1",
        authority="example.com",
        scheme="http",
        protocol="HTTP/1.1",
        downstream_remote=("127.0.0.1", 34274),
        downstream_local=("127.0.0.1", 41565),
        start_time=START,
        response_headers=Headers([("content-length", "647")]),
    )


EXPANSIONS = [
    ("%PROTOCOL%", "HTTP/1.1"),
    ("%DOWNSTREAM_REMOTE_ADDRESS%", "127.0.0.1:34274"),
    ("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "127.0.0.1"),
    ("%DOWNSTREAM_REMOTE_PORT%", "34274"),
    ("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%", "127.0.0.1:34274"),
    ("%DOWNSTREAM_LOCAL_ADDRESS%", "127.0.0.1:41565"),
    ("%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "127.0.0.1"),
    ("%DOWNSTREAM_LOCAL_PORT%", "41565"),
    ("%REQ(:AUTHORITY)%", "example.com"),
    ("%REQ(host)%", "example.com"),
    ("%REQ(:PATH)%", "/old/x?q=1"),
    ("%REQ(:METHOD)%", "GET"),
    ("%REQ(:scheme)%", "http"),
    ("%REQ(x-long):3%", "abc"),
    ("%REQ(x-long):0%", ""),
    ("%REQ(x-long):10%", "abcdef"),
    ("%REQ(X-LONG)%", "abcdef"),
    ("%REQ(x-nothere?x-long)%", "abcdef"),
    ("%REQ(x-empty?x-long)%", ""),  # present but empty: no fallback
    ("%REQ(x-dup)%", "1"),  # the first value
    ("%REQ(x-nothere)%", ""),
    ("x%REQ(x-nothere)%y", "xy"),
    ("%REQ(x-long)%%REQ(x-long):1%", "abcdefa"),
    ("%RESP(content-length)%", "647"),
    ("%RESP(x-long)%", ""),
    ("%REQUESTED_SERVER_NAME%", ""),
    ("%START_TIME%", "2026-11-25T22:25:58.439Z"),
    ("%START_TIME()%", "2026-11-25T22:25:58.439Z"),
    ("%START_TIME(%Y/%s/%3f/%f)%", "2026/1795645558/439/439387000"),
    ("%START_TIME(%6f|%9f|%1f|%E3S|%Es)%", "439387|439387000|4|58.439|1795645558"),
    ("%START_TIME(%%)%", "%"),
    ("%START_TIME(%H:%M)%", "22:25"),
    ("a%%b", "a%b"),
    ("100%%", "100%"),
    ("plain", "plain"),
    ("", ""),
]


@pytest.mark.parametrize(("source", "expected"), EXPANSIONS)
def test_expansions_as_envoy(ctx: FormatContext, source: str, expected: str) -> None:
    assert compile_format(source).format(ctx) == expected


def test_hostname() -> None:
    assert compile_format("%HOSTNAME%").format(FormatContext()) == socket.gethostname()


def test_ipv6_addresses_are_bracketed_with_a_port() -> None:
    ctx = FormatContext(downstream_remote=("::1", 8080), downstream_local=("fe80::1", 80))
    assert compile_format("%DOWNSTREAM_REMOTE_ADDRESS%").format(ctx) == "[::1]:8080"
    assert compile_format("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%").format(ctx) == "::1"
    assert compile_format("%DOWNSTREAM_LOCAL_ADDRESS%").format(ctx) == "[fe80::1]:80"


def test_direct_remote_is_the_peer_when_given() -> None:
    ctx = FormatContext(
        downstream_remote=("203.0.113.9", 0), downstream_direct_remote=("10.0.0.2", 1234)
    )
    assert compile_format("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%").format(ctx) == "203.0.113.9"
    assert compile_format("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%").format(ctx) == "10.0.0.2:1234"


def test_missing_addresses_and_response_expand_to_nothing() -> None:
    ctx = FormatContext()
    assert compile_format("[%DOWNSTREAM_REMOTE_ADDRESS%]").format(ctx) == "[]"
    assert compile_format("[%DOWNSTREAM_LOCAL_PORT%]").format(ctx) == "[]"
    assert compile_format("[%RESP(x)%]").format(ctx) == "[]"
    assert compile_format("[%REQ(:authority)%]").format(ctx) == "[]"


ERRORS = [
    ("50%", "Incorrect configuration: 50%. Couldn't find valid command at position 2"),
    ("%FOO_BAR%", "Not supported field in StreamInfo: FOO_BAR"),
    ("%protocol%", "Couldn't find valid command at position 0"),
    ("%REQ%", "REQ requires parameters"),
    ("%REQ()%", "REQ requires parameters"),
    ("%RESP%", "RESP requires parameters"),
    ("%PROTOCOL(x)%", "PROTOCOL does not take any parameters or length"),
    ("%PROTOCOL:3%", "PROTOCOL does not take any parameters or length"),
    ("% PROTOCOL%", "Couldn't find valid command at position 0"),
    ("%%%", "Couldn't find valid command at position 2"),
    ("%REQ(a?b?c)%", "More than 1 alternative header specified in token: a?b?c"),
    ("%REQ(a)b%", "Couldn't find valid command at position 0"),
    ("%START_TIME(%Y):3%", "START_TIME does not allow length to be specified."),
]


@pytest.mark.parametrize(("source", "message"), ERRORS)
def test_errors_as_envoy(source: str, message: str) -> None:
    with pytest.raises(FormatError) as excinfo:
        compile_format(source)
    assert message in str(excinfo.value)


def test_literal_formats_cost_nothing(ctx: FormatContext) -> None:
    compiled = compile_format("no operators, 100%% sure")
    assert compiled.literal == "no operators, 100% sure"
    assert compile_format("%PROTOCOL%").literal is None
    lit = literal_format("50% literal")
    assert lit.literal == "50% literal"
    assert lit.format(ctx) == "50% literal"
    assert literal_format("").format(ctx) == ""


def test_formats_read_the_headers_when_expanded(ctx: FormatContext) -> None:
    compiled = compile_format("<%REQ(x-late)%>")
    assert compiled.format(ctx) == "<>"
    ctx.request_headers.add("x-late", "now")
    assert compiled.format(ctx) == "<now>"


def test_time_format_renderer() -> None:
    render = compile_time_format("%Y-%m-%d %H:%M:%S|%E0S|%2f|%%f|%s")
    assert render(0.5) == "1970-01-01 00:00:00|00|50|%f|0"
    assert compile_time_format("%E6S")(59.000001) == "59.000001"
