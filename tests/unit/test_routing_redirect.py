"""Path and host rewrites, RE2 substitutions, redirect locations.

The redirect table was observed with Envoy 1.40 (``location`` of the 301/308 answers).
"""

from __future__ import annotations

import re

import pytest

from ubimesh.proxy.routing.redirect import (
    RewriteError,
    compile_substitution,
    direct_response_has_location,
    redirect_location,
    regex_replace_all,
    rewrite_authority,
    rewrite_path,
)
from ubimesh.proxy.routing.table import RouteConfigError, RouteTable
from ubimesh.proxy.snapshot.types import (
    DirectResponseAction,
    PathMatchKind,
    RedirectAction,
    RegexRewrite,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)


def route(
    kind: PathMatchKind,
    value: str,
    action: RouteAction | RedirectAction,
    *,
    case_sensitive: bool = True,
) -> Route:
    regex = re.compile(value) if kind is PathMatchKind.REGEX else None
    return Route("r", RouteMatch(kind, value, regex, case_sensitive=case_sensitive), action)


def rr(pattern: str, substitution: str) -> RegexRewrite:
    return RegexRewrite(re.compile(pattern), substitution)


PREFIX = PathMatchKind.PREFIX
EXACT = PathMatchKind.PATH
REGEX = PathMatchKind.REGEX
SEPARATED = PathMatchKind.PATH_SEPARATED_PREFIX

# (match kind, match value, redirect, request path, Host, x-forwarded-proto, location)
REDIRECTS = [
    (EXACT, "/https", RedirectAction(https_redirect=True), "/https", "a.com", None,
     "https://a.com/https"),
    (EXACT, "/https", RedirectAction(https_redirect=True), "/https", "a.com:80", None,
     "https://a.com/https"),
    (EXACT, "/https", RedirectAction(https_redirect=True), "/https", "a.com:8080", None,
     "https://a.com:8080/https"),
    (EXACT, "/https", RedirectAction(https_redirect=True), "/https", "a.com:443", None,
     "https://a.com:443/https"),
    (EXACT, "/https", RedirectAction(https_redirect=True), "/https?x=1", "a.com:80", None,
     "https://a.com/https?x=1"),
    (EXACT, "/https", RedirectAction(https_redirect=True), "/https", "[::1]:80", None,
     "https://[::1]/https"),
    (EXACT, "/https", RedirectAction(https_redirect=True), "/https", "[::1]", None,
     "https://[::1]/https"),
    (EXACT, "/https", RedirectAction(https_redirect=True), "/https", "a.com:80", "https",
     "https://a.com:80/https"),
    (EXACT, "/scheme", RedirectAction(scheme="ftp"), "/scheme", "a.com:80", None,
     "ftp://a.com/scheme"),
    (EXACT, "/s", RedirectAction(scheme="https"), "/s", "a.com:80", None, "https://a.com/s"),
    (EXACT, "/host", RedirectAction(host="new.example"), "/host", "a.com:8080", None,
     "http://new.example/host"),
    (EXACT, "/port", RedirectAction(port=8443), "/port", "a.com:8080", None,
     "http://a.com:8443/port"),
    (EXACT, "/port", RedirectAction(port=8443), "/port", "a.com", None,
     "http://a.com:8443/port"),
    (EXACT, "/p", RedirectAction(https_redirect=True, port=443), "/p", "a.com:80", None,
     "https://a.com:443/p"),
    (EXACT, "/hp", RedirectAction(host="new.example", port=81), "/hp", "a.com:1", None,
     "http://new.example:81/hp"),
    (PREFIX, "/q", RedirectAction(port=80), "/q", "a.com:443", "https", "https://a.com:80/q"),
    (EXACT, "/path", RedirectAction(path="/newpath"), "/path?q=1", "a.com", None,
     "http://a.com/newpath?q=1"),
    (EXACT, "/pq", RedirectAction(path="/newpath?z=9", strip_query=True), "/pq?q=1", "a.com",
     None, "http://a.com/newpath?z=9"),
    (EXACT, "/ns", RedirectAction(path="newpath"), "/ns", "a.com", None,
     "http://a.com/newpath"),
    (EXACT, "/strip", RedirectAction(strip_query=True), "/strip?q=1", "a.com", None,
     "http://a.com/strip"),
    (EXACT, "/ps", RedirectAction(path="/np", strip_query=True), "/ps?q=1", "a.com", None,
     "http://a.com/np"),
    (PREFIX, "/pre/", RedirectAction(prefix_rewrite="/to/"), "/pre/a/b?q=1", "a.com", None,
     "http://a.com/to/a/b?q=1"),
    (PREFIX, "/pre2", RedirectAction(prefix_rewrite="/to"), "/pre2x", "a.com", None,
     "http://a.com/tox"),
    (PREFIX, "/rx/", RedirectAction(regex_rewrite=rr(r"^/rx/([a-z]+)/(\d+)", r"/\2/\1")),
     "/rx/abc/123/tail?q=1", "a.com", None, "http://a.com/123/abc/tail?q=1"),
    (PREFIX, "/ro", RedirectAction(regex_rewrite=rr("o", "0")), "/ro/foo?o=o", "a.com", None,
     "http://a.com/r0/f00?o=o"),
    (PREFIX, "/perm", RedirectAction(https_redirect=True, response_code=308), "/perm", "a.com",
     None, "https://a.com/perm"),
    (PREFIX, "/ps", RedirectAction(prefix_rewrite="/x", strip_query=True), "/ps/y?q", "a.com",
     None, "http://a.com/x/y"),
    (REGEX, "/re.*", RedirectAction(prefix_rewrite="/whole"), "/reX?q=1", "a.com", None,
     "http://a.com/whole?q=1"),
    (SEPARATED, "/sep", RedirectAction(prefix_rewrite="/S"), "/sep/x?q", "a.com", None,
     "http://a.com/S/x?q"),
    (EXACT, "/exactp", RedirectAction(prefix_rewrite="/E"), "/exactp?q=2", "a.com", None,
     "http://a.com/E?q=2"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "value", "action", "path", "host", "xfp", "location"), REDIRECTS)
def test_redirect_locations_as_envoy(
    kind: PathMatchKind,
    value: str,
    action: RedirectAction,
    path: str,
    host: str,
    xfp: str | None,
    location: str,
) -> None:
    r = route(kind, value, action)
    got = redirect_location(r, scheme=xfp or "http", authority=host, path=path, forwarded_proto=xfp)
    assert got == location


def test_case_insensitive_prefix_is_replaced_by_length() -> None:
    r = route(PREFIX, "/ci", RedirectAction(prefix_rewrite="/ci-"), case_sensitive=False)
    assert redirect_location(r, scheme="http", authority="a.com", path="/CI/x") == (
        "http://a.com/ci-/x"
    )


def test_scheme_defaults_to_forwarded_proto() -> None:
    r = route(PREFIX, "/", RedirectAction(path="/x"))
    got = redirect_location(
        r, scheme="http", authority="a.com:80", path="/", forwarded_proto="https"
    )
    assert got == "https://a.com:80/x"


def test_direct_responses_get_the_request_url() -> None:
    # Observed with Envoy 1.40: a 201 direct response carries location http://direct.test/created
    r = route(PREFIX, "/", DirectResponseAction(201))
    got = redirect_location(r, scheme="http", authority="direct.test", path="/created")
    assert got == "http://direct.test/created"
    assert redirect_location(r, scheme="http", authority="d.test:80", path="/x?y") == (
        "http://d.test:80/x?y"
    )
    assert direct_response_has_location(201)
    assert direct_response_has_location(302)
    assert not direct_response_has_location(200)
    assert not direct_response_has_location(404)


def test_redirect_location_needs_a_redirect_route() -> None:
    with pytest.raises(TypeError):
        redirect_location(
            route(PREFIX, "/", RouteAction(cluster="c")), scheme="http", authority="a", path="/"
        )


def test_empty_authority_stays_empty() -> None:
    r = route(PREFIX, "/", RedirectAction(https_redirect=True))
    assert redirect_location(r, scheme="http", authority="", path="/a") == "https:///a"


# -- route rewrites ----------------------------------------------------------------------------

# The example of Envoy's regex_rewrite documentation.
SERVICE = rr("^/service/([^/]+)(/.*)$", r"\2/instance/\1")

REWRITES = [
    (PREFIX, "/", RouteAction(cluster="c", prefix_rewrite="/new/"), "/old/x?q=1",
     "/new/old/x?q=1"),
    (PREFIX, "/api/", RouteAction(cluster="c", prefix_rewrite="/"), "/api/v1?x", "/v1?x"),
    (PREFIX, "/api", RouteAction(cluster="c", prefix_rewrite=""), "/api/v1", None),
    (EXACT, "/a", RouteAction(cluster="c", prefix_rewrite="/b"), "/a?x=1", "/b?x=1"),
    (REGEX, "/v[0-9]+/.*", RouteAction(cluster="c", prefix_rewrite="/all"), "/v2/x?y", "/all?y"),
    (SEPARATED, "/s", RouteAction(cluster="c", prefix_rewrite="/t"), "/s/x", "/t/x"),
    (PREFIX, "/", RouteAction(cluster="c", regex_rewrite=SERVICE), "/service/foo/v1/api?q=/x",
     "/v1/api/instance/foo?q=/x"),
    (PREFIX, "/", RouteAction(cluster="c", regex_rewrite=rr("/aaa/", "/")), "/aaa/aaa/b", "/aaa/b"),
    (PREFIX, "/", RouteAction(cluster="c", regex_rewrite=rr("x", r"\\")), "/axb", "/a\\b"),
    (PREFIX, "/", RouteAction(cluster="c", regex_rewrite=rr("b(c)?", r"[\1]")), "/ab", "/a[]"),
    (PREFIX, "/", RouteAction(cluster="c", regex_rewrite=rr("zzz", "y")), "/ab?zzz", "/ab?zzz"),
    (PREFIX, "/", RouteAction(cluster="c"), "/ab", None),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "value", "action", "path", "expected"), REWRITES)
def test_rewrite_path(
    kind: PathMatchKind, value: str, action: RouteAction, path: str, expected: str | None
) -> None:
    assert rewrite_path(route(kind, value, action), path) == expected


def test_direct_responses_rewrite_nothing() -> None:
    assert rewrite_path(route(PREFIX, "/", DirectResponseAction(200)), "/x") is None


def test_rewrite_authority() -> None:
    assert rewrite_authority(RouteAction(cluster="c", host_rewrite_literal="h.test")) == "h.test"
    assert rewrite_authority(RouteAction(cluster="c")) is None
    auto = RouteAction(cluster="c", auto_host_rewrite=True)
    assert rewrite_authority(auto, "upstream.test") == "upstream.test"
    assert rewrite_authority(auto, "") is None


# -- RE2 substitutions and GlobalReplace ----------------------------------------------------------


def test_substitution_syntax() -> None:
    p = re.compile("(a)(b)")
    assert compile_substitution(p, r"x\2\1\0\\y") == ("x", 2, 1, 0, "\\y")
    with pytest.raises(RewriteError, match="group 3"):
        compile_substitution(p, r"\3")
    with pytest.raises(RewriteError, match="backslash"):
        compile_substitution(p, r"\n")
    with pytest.raises(RewriteError, match="backslash"):
        compile_substitution(p, "trailing\\")


def test_global_replace_skips_an_empty_match_after_a_match() -> None:
    # RE2 GlobalReplace("axb", "x*", "-") is "-a-b-"; Python's re.sub gives "-a--b-".
    p = re.compile("x*")
    assert regex_replace_all(p, compile_substitution(p, "-"), "axb") == "-a-b-"
    assert re.sub("x*", "-", "axb") == "-a--b-"
    assert regex_replace_all(p, compile_substitution(p, "-"), "") == "-"
    q = re.compile("b")
    assert regex_replace_all(q, compile_substitution(q, "c"), "abab") == "acac"
    assert regex_replace_all(q, compile_substitution(q, "c"), "xyz") == "xyz"


def test_invalid_substitution_is_refused_by_the_table() -> None:
    bad = route(PREFIX, "/", RouteAction(cluster="c", regex_rewrite=rr("(a)", r"\2")))
    with pytest.raises(RouteConfigError, match="group 2"):
        RouteTable(RouteConfiguration("rc", (VirtualHost("v", ("*",), (bad,)),)))
