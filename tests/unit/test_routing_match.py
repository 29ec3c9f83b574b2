"""Route matching: path, headers, query parameters, gRPC, route order.

Where a comment says "observed", the expectation was checked against Envoy 1.40 with direct
response routes named after the matcher under test.
"""

from __future__ import annotations

import re

import pytest

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.table import RouteConfigError, RouteTable, is_grpc_request
from ubimesh.proxy.snapshot.types import (
    DirectResponseAction,
    HeaderMatcher,
    HeaderMatchKind,
    PathMatchKind,
    QueryParameterMatcher,
    Route,
    RouteConfiguration,
    RouteMatch,
    StringMatcher,
    StringMatchKind,
    VirtualHost,
)

FALLBACK = Route("fallback", RouteMatch(PathMatchKind.PREFIX, "/"), DirectResponseAction(200))


def build(*routes: Route) -> tuple[RouteTable, VirtualHost]:
    vh = VirtualHost("v", ("*",), (*routes, FALLBACK))
    return RouteTable(RouteConfiguration("rc", (vh,))), vh


def matched(
    routes: tuple[Route, ...] | Route,
    path: str,
    headers: list[tuple[str, str]] | None = None,
    *,
    method: str = "GET",
    authority: str | None = "example.com:1",
    scheme: str = "http",
) -> str | None:
    t, vh = build(*(routes if isinstance(routes, tuple) else (routes,)))
    r = t.match_route(vh, method, path, Headers(headers or []), authority=authority, scheme=scheme)
    return None if r is None else r.name


def path_route(
    name: str, kind: PathMatchKind, value: str = "", *, case_sensitive: bool = True
) -> Route:
    regex = re.compile(value) if kind is PathMatchKind.REGEX else None
    return Route(
        name,
        RouteMatch(kind, value, regex=regex, case_sensitive=case_sensitive),
        DirectResponseAction(200),
    )


# -- paths -------------------------------------------------------------------------------------

PATHS = [
    # (kind, value, case_sensitive, path, matches)
    (PathMatchKind.PREFIX, "/api", True, "/api/v1", True),
    (PathMatchKind.PREFIX, "/api", True, "/apix", True),
    (PathMatchKind.PREFIX, "/api", True, "/API/v1", False),
    (PathMatchKind.PREFIX, "/a?b", True, "/a?b", False),  # matched on the path without query
    (PathMatchKind.PREFIX, "/CI/Foo", False, "/ci/foobar", True),  # observed
    (PathMatchKind.PATH, "/ep", True, "/ep?x", True),  # observed
    (PathMatchKind.PATH, "/ep", True, "/ep/", False),  # observed
    (PathMatchKind.PATH, "/CP", False, "/cp?x", True),  # observed
    (PathMatchKind.PATH, "/CP", False, "/cpx", False),  # observed
    (PathMatchKind.REGEX, "/re/[0-9]+", True, "/re/12", True),  # observed
    (PathMatchKind.REGEX, "/re/[0-9]+", True, "/re/12?z", True),  # observed
    (PathMatchKind.REGEX, "/re/[0-9]+", True, "/re/12a", False),  # full match, observed
    (PathMatchKind.REGEX, "/re/[0-9]+", True, "/xre/12", False),  # observed
    (PathMatchKind.REGEX, "/rx", False, "/RX", False),  # case_sensitive ignored, observed
    (PathMatchKind.PATH_SEPARATED_PREFIX, "/p/x", True, "/p/x", True),  # observed
    (PathMatchKind.PATH_SEPARATED_PREFIX, "/p/x", True, "/p/x/", True),  # observed
    (PathMatchKind.PATH_SEPARATED_PREFIX, "/p/x", True, "/p/x?q", True),  # observed
    (PathMatchKind.PATH_SEPARATED_PREFIX, "/p/x", True, "/p/xy", False),  # observed
    (PathMatchKind.PATH_SEPARATED_PREFIX, "/p/x", True, "/P/x", False),  # observed
    (PathMatchKind.PATH_SEPARATED_PREFIX, "/p/x", False, "/P/X/y", True),
    (PathMatchKind.PATH_SEPARATED_PREFIX, "/p/x", True, "/p/x#frag", True),
]


@pytest.mark.parametrize(("kind", "value", "case_sensitive", "path", "matches"), PATHS)
def test_path_matching(
    kind: PathMatchKind, value: str, case_sensitive: bool, path: str, matches: bool
) -> None:
    route = path_route("r", kind, value, case_sensitive=case_sensitive)
    assert matched(route, path) == ("r" if matches else "fallback")


def test_first_matching_route_wins() -> None:
    routes = (
        path_route("a", PathMatchKind.PREFIX, "/a"),
        path_route("ab", PathMatchKind.PREFIX, "/ab"),
        path_route("exact", PathMatchKind.PATH, "/abc"),
    )
    assert matched(routes, "/abc") == "a"
    assert matched(routes[1:], "/abc") == "ab"
    assert matched(routes[2:], "/abc") == "exact"


def test_no_route_is_none() -> None:
    vh = VirtualHost("v", ("*",), (path_route("a", PathMatchKind.PREFIX, "/a"),))
    t = RouteTable(RouteConfiguration("rc", (vh,)))
    assert t.match_route(vh, "GET", "/b", Headers()) is None


def test_case_insensitive_matching_folds_ascii_only() -> None:
    route = path_route("r", PathMatchKind.PREFIX, "/CAF\u00c9", case_sensitive=False)
    assert matched(route, "/caf\u00c9/x") == "r"
    assert matched(route, "/Caf\u00e9/x") == "fallback"


def test_regex_route_without_compiled_regex_is_refused() -> None:
    bad = Route("r", RouteMatch(PathMatchKind.REGEX, "/x"), DirectResponseAction(200))
    with pytest.raises(RouteConfigError):
        build(bad)


def test_virtual_host_from_another_table_still_matches() -> None:
    t, _ = build()
    other = VirtualHost("o", ("*",), (path_route("o", PathMatchKind.PREFIX, "/"),))
    r = t.match_route(other, "GET", "/x", Headers())
    assert r is not None and r.name == "o"


# -- headers -----------------------------------------------------------------------------------


def header_route(path: str, matcher: HeaderMatcher) -> Route:
    return Route(
        path[1:],
        RouteMatch(PathMatchKind.PATH, path, headers=(matcher,)),
        DirectResponseAction(200),
    )


EXACT_V = HeaderMatcher("x-a", HeaderMatchKind.EXACT, "v")

HEADERS = [
    # (matcher, request headers, matches) -- all observed with Envoy 1.40
    (HeaderMatcher("x-a", HeaderMatchKind.EXACT, "v", invert=True), [], False),
    (HeaderMatcher("x-a", HeaderMatchKind.EXACT, "v", invert=True), [("x-a", "v")], False),
    (HeaderMatcher("x-a", HeaderMatchKind.EXACT, "v", invert=True), [("x-a", "w")], True),
    (
        HeaderMatcher("x-a", HeaderMatchKind.EXACT, "v", invert=True, treat_missing_as_empty=True),
        [],
        True,
    ),
    (HeaderMatcher("x-a", HeaderMatchKind.PRESENT, present=False), [], True),
    (HeaderMatcher("x-a", HeaderMatchKind.PRESENT, present=False), [("x-a", "")], False),
    (HeaderMatcher("x-a", HeaderMatchKind.PRESENT, present=False, invert=True), [], False),
    (
        HeaderMatcher("x-a", HeaderMatchKind.PRESENT, present=False, invert=True),
        [("x-a", "1")],
        True,
    ),
    (HeaderMatcher("x-a", HeaderMatchKind.PRESENT, invert=True), [], True),
    (HeaderMatcher("x-a", HeaderMatchKind.PRESENT, invert=True), [("x-a", "1")], False),
    (HeaderMatcher("x-a", HeaderMatchKind.PRESENT, treat_missing_as_empty=True), [], True),
    (
        HeaderMatcher("x-a", HeaderMatchKind.PRESENT, present=False, treat_missing_as_empty=True),
        [],
        False,
    ),
    (HeaderMatcher("x-a", HeaderMatchKind.ANY), [("x-a", "")], True),
    (HeaderMatcher("x-a", HeaderMatchKind.ANY), [], False),
    (
        HeaderMatcher(
            "x-a", HeaderMatchKind.REGEX, regex=re.compile("^$"), treat_missing_as_empty=True
        ),
        [],
        True,
    ),
    (
        HeaderMatcher("x-a", HeaderMatchKind.PREFIX, "AbC", ignore_case=True),
        [("x-a", "aBcdef")],
        True,
    ),
    (HeaderMatcher("x-a", HeaderMatchKind.PREFIX, "AbC"), [("x-a", "aBcdef")], False),
    (
        HeaderMatcher("x-a", HeaderMatchKind.SUFFIX, "DEF", ignore_case=True),
        [("x-a", "abcdef")],
        True,
    ),
    (
        HeaderMatcher("x-a", HeaderMatchKind.CONTAINS, "Cd", ignore_case=True),
        [("x-a", "abcdef")],
        True,
    ),
    (HeaderMatcher("x-a", HeaderMatchKind.CONTAINS, "Cd"), [("x-a", "abcdef")], False),
    (HeaderMatcher("x-a", HeaderMatchKind.EXACT, "ABC", ignore_case=True), [("x-a", "abc")], True),
    (
        HeaderMatcher("x-a", HeaderMatchKind.EXACT, "ABC", ignore_case=True),
        [("x-a", "abcd")],
        False,
    ),
    # A single header value holding a comma is one value.
    (HeaderMatcher("x-a", HeaderMatchKind.EXACT, "1,2"), [("x-a", "1,2")], True),
    # Repeated headers: each value is tried; they are not joined (observed, Envoy 1.40).
    (HeaderMatcher("x-a", HeaderMatchKind.EXACT, "1,2"), [("x-a", "1"), ("x-a", "2")], False),
    (HeaderMatcher("x-a", HeaderMatchKind.EXACT, "2"), [("x-a", "1"), ("x-a", "2")], True),
    (HeaderMatcher("x-a", HeaderMatchKind.EXACT, "1"), [("x-a", "2"), ("x-a", "1")], True),
    (HeaderMatcher("x-a", HeaderMatchKind.PREFIX, "1,"), [("x-a", "1"), ("x-a", "2")], False),
    (HeaderMatcher("x-a", HeaderMatchKind.CONTAINS, ","), [("x-a", "1"), ("x-a", "2")], False),
    (HeaderMatcher("x-a", HeaderMatchKind.SUFFIX, "2"), [("x-a", "2"), ("x-a", "1")], True),
    (
        HeaderMatcher("x-a", HeaderMatchKind.REGEX, regex=re.compile("1,2")),
        [("x-a", "1"), ("x-a", "2")],
        False,
    ),
    # invert_match applies after trying every value.
    (
        HeaderMatcher("x-a", HeaderMatchKind.EXACT, "1", invert=True),
        [("x-a", "1"), ("x-a", "2")],
        False,
    ),
    (
        HeaderMatcher("x-a", HeaderMatchKind.EXACT, "1", invert=True),
        [("x-a", "3"), ("x-a", "4")],
        True,
    ),
    # Two cookie headers are two values too.
    (
        HeaderMatcher("cookie", HeaderMatchKind.EXACT, "a=1; b=2"),
        [("cookie", "a=1"), ("cookie", "b=2")],
        False,
    ),
]


@pytest.mark.parametrize(("matcher", "headers", "matches"), HEADERS)
def test_header_matchers_as_envoy(
    matcher: HeaderMatcher, headers: list[tuple[str, str]], matches: bool
) -> None:
    assert matched(header_route("/h", matcher), "/h", headers) == ("h" if matches else "fallback")


PSEUDO = [
    # (matcher, method, path, matches)
    (HeaderMatcher(":method", HeaderMatchKind.EXACT, "POST"), "GET", "/h", False),
    (HeaderMatcher(":method", HeaderMatchKind.EXACT, "POST"), "POST", "/h", True),
    (HeaderMatcher(":authority", HeaderMatchKind.EXACT, "example.com:1"), "GET", "/h", True),
    (HeaderMatcher("host", HeaderMatchKind.EXACT, "example.com:1"), "GET", "/h", True),
    (HeaderMatcher("host", HeaderMatchKind.PRESENT, present=False), "GET", "/h", False),
    (HeaderMatcher(":path", HeaderMatchKind.EXACT, "/h?x=1"), "GET", "/h?x=1", True),
    (HeaderMatcher(":path", HeaderMatchKind.EXACT, "/h?x=1"), "GET", "/h", False),
    (HeaderMatcher(":scheme", HeaderMatchKind.EXACT, "http"), "GET", "/h", True),
    (HeaderMatcher(":protocol", HeaderMatchKind.PRESENT, present=False), "GET", "/h", True),
]


@pytest.mark.parametrize(("matcher", "method", "path", "matches"), PSEUDO)
def test_pseudo_header_matchers(
    matcher: HeaderMatcher, method: str, path: str, matches: bool
) -> None:
    result = matched(header_route("/h", matcher), path, method=method)
    assert result == ("h" if matches else "fallback")


def test_authority_defaults_to_the_host_header() -> None:
    route = header_route("/h", HeaderMatcher(":authority", HeaderMatchKind.EXACT, "a.test"))
    assert matched(route, "/h", [("host", "a.test")], authority=None) == "h"
    assert matched(route, "/h", [("host", "b.test")], authority=None) == "fallback"
    assert matched(route, "/h", [("host", "b.test")], authority="a.test") == "h"


def test_all_header_matchers_must_hold() -> None:
    route = Route(
        "both",
        RouteMatch(
            PathMatchKind.PREFIX,
            "/",
            headers=(
                HeaderMatcher("x-a", HeaderMatchKind.EXACT, "1"),
                HeaderMatcher("x-b", HeaderMatchKind.PRESENT),
            ),
        ),
        DirectResponseAction(200),
    )
    assert matched(route, "/", [("x-a", "1"), ("x-b", "")]) == "both"
    assert matched(route, "/", [("x-a", "1")]) == "fallback"
    assert matched(route, "/", [("x-b", "1")]) == "fallback"


# -- query parameters ---------------------------------------------------------------------------


def query_route(matcher: QueryParameterMatcher) -> Route:
    return Route(
        "q",
        RouteMatch(PathMatchKind.PREFIX, "/q", query_parameters=(matcher,)),
        DirectResponseAction(200),
    )


def exact(value: str, *, ignore_case: bool = False) -> StringMatcher:
    return StringMatcher(StringMatchKind.EXACT, value, ignore_case=ignore_case)


QUERIES = [
    # (matcher, path, matches) -- observed with Envoy 1.40
    (QueryParameterMatcher("a"), "/q?a", True),
    (QueryParameterMatcher("a"), "/q?b=1&a=", True),
    (QueryParameterMatcher("a"), "/q?A=1", False),
    (QueryParameterMatcher("a"), "/q?b", False),
    (QueryParameterMatcher("a"), "/q", False),
    (QueryParameterMatcher("a", present=False), "/q?a=1", False),
    (QueryParameterMatcher("a", present=False), "/q?b", True),
    (QueryParameterMatcher("a", exact("1")), "/q?a=2&a=1", False),  # first value only
    (QueryParameterMatcher("a", exact("1")), "/q?a=1&a=2", True),
    (QueryParameterMatcher("a b", exact("x y")), "/q?a%20b=x%20y", False),  # not decoded
    (QueryParameterMatcher("a b", exact("x y")), "/q?a+b=x+y", False),
    (QueryParameterMatcher("a", exact("")), "/q?a", True),
    (QueryParameterMatcher("a", exact("")), "/q?a=", True),
    (QueryParameterMatcher("a", exact("X", ignore_case=True)), "/q?a=x", True),
    (QueryParameterMatcher("a", exact("=b")), "/q?a==b", True),
    (
        QueryParameterMatcher("a", StringMatcher(StringMatchKind.PREFIX, "ab")),
        "/q?x&a=abc&a=zz",
        True,
    ),
    (
        QueryParameterMatcher(
            "a", StringMatcher(StringMatchKind.REGEX, "", regex=re.compile("[0-9]+"))
        ),
        "/q?a=12x",
        False,
    ),
]


@pytest.mark.parametrize(("matcher", "path", "matches"), QUERIES)
def test_query_parameter_matchers(matcher: QueryParameterMatcher, path: str, matches: bool) -> None:
    assert matched(query_route(matcher), path) == ("q" if matches else "fallback")


# -- gRPC --------------------------------------------------------------------------------------

GRPC = [
    ("application/grpc", True),
    ("application/grpc+proto", True),
    ("application/grpc-web", False),
    ("application/grpcx", False),
    ("Application/GRPC", False),
    (None, False),
]


@pytest.mark.parametrize(("content_type", "matches"), GRPC)
def test_grpc_matching(content_type: str | None, matches: bool) -> None:
    route = Route("g", RouteMatch(PathMatchKind.PREFIX, "/g", grpc=True), DirectResponseAction(200))
    headers = [] if content_type is None else [("content-type", content_type)]
    assert matched(route, "/g", headers) == ("g" if matches else "fallback")
    assert is_grpc_request(Headers(headers)) is matches
