"""No generated path gets past a deny on ``/admin`` through ubimesh's path normalization.

The HCM of the bypass matrix (tests/integration/test_path_bypass.py): ``normalize_path``,
``merge_slashes`` and an escaped-slash action. For every generated request path:

* what is forwarded is a fixed point of the normalization: authorization, routing and any
  later reader that normalizes the same way see the same path;
* if it is forwarded, a lenient upstream (:func:`upstream_view`, the same reading as the
  integration test's) does not serve ``/admin`` or anything under it unless the path the proxy
  routes on starts with ``/admin`` (case-insensitively), i.e. unless the deny matched.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ubimesh.proto.path import PathAction, normalize_request_path
from ubimesh.proxy.snapshot.types import PathWithEscapedSlashesAction as Escaped

DOTS = st.sampled_from([".", "..", "%2e", "%2E%2e", ".%2e", "%2e.", "..."])
NAMES = st.one_of(
    st.sampled_from(["admin", "ADMIN", "Admin", "%61dmin", "%41DMIN", "adm%69n", "users"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~", min_size=1, max_size=6),
)
PARAMS = st.sampled_from(["", "", "", ";", ";x", ";jsessionid=1"])
ODD = st.sampled_from(
    ["", "%2f", "%2F", "%5c", "%5C", "\\", "%00", "%25", "%", "%3b", "%23", "?", "%2f..", "..%2f"]
)
#: A segment: dots or a name, maybe with ;parameters, maybe next to an escape or separator.
segments = st.one_of(
    st.tuples(DOTS, PARAMS),
    st.tuples(NAMES, PARAMS),
    st.tuples(ODD, NAMES),
    st.tuples(DOTS, ODD),
).map("".join)
separators = st.sampled_from(["/", "/", "//"])


@st.composite
def request_paths(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.tuples(separators, segments), min_size=1, max_size=6))
    path = "".join(sep + seg for sep, seg in parts)
    if draw(st.booleans()):
        path += draw(separators)
    return path


ACTIONS = [Escaped.UNESCAPE_AND_REDIRECT, Escaped.REJECT_REQUEST, Escaped.UNESCAPE_AND_FORWARD]


# The same reading as tests/integration/test_path_bypass.py's upstream_view (test modules do
# not import each other).
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode(text: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segs = path.split("/")[1:]
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        if seg in (".", ".."):
            if seg == ".." and out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def upstream_view(target: str) -> str:
    """Query cut, backslashes as slashes, ``..;x`` as ``..``, decoded once, cut at a NUL,
    dot segments resolved, slashes merged."""
    path = target.split("?", 1)[0].split("#", 1)[0].replace("\\", "/")
    segs = []
    for seg in path.split("/"):
        name, sep, _ = seg.partition(";")
        segs.append(name if sep and _decode(name) in (".", "..") else seg)
    raw = _decode("/".join(segs)).split("\x00", 1)[0].replace("\\", "/")
    resolved = _remove_dot_segments(raw if raw.startswith("/") else "/" + raw)
    return re.sub(r"/{2,}", "/", resolved)


def _is_admin(path: str) -> bool:
    p = path.lower()
    return p == "/admin" or p.startswith("/admin/")


def _normalize(path: str, action: Escaped) -> tuple[PathAction, str]:
    result = normalize_request_path(
        path, normalize=True, merge_slashes=True, escaped_slashes=action
    )
    return result.action, result.path


# normalize_path on dot segments with ;parameters: request path -> what Envoy 1.40 forwarded
# (observed with a route answering %REQ(:PATH)%), and where ubimesh forwards something else.
SEMICOLON_DOTS = [
    ("/..;/admin", "/admin"),
    ("/.;/admin", "/admin"),
    ("/x/..;/y", "/y"),
    ("/x/..;a;b/y", "/y"),
    ("/x/.;a/y", "/x/y"),
    ("/x/.;%41/y", "/x/y"),
    ("/x/..;", "/"),
    ("/x/..;a", "/"),
    ("/x/.;", "/x/"),
    ("/x/..;.;/y", "/y"),
    ("/x/.;./y", "/x/y"),
    ("/x/..;a/b/..;c/d", "/d"),
    ("/x/;/..;/y", "/x/y"),
    ("/x/..;{/y", "/y"),  # the dropped parameters are not escaped ...
    ("/x/..;%00/y", "/y"),  # ... nor checked for NUL
    ("/x/..;a\\y", "/"),  # only a literal slash ends them
    ("/x/..;a%2fy/z", "/z"),
    ("/x/..;a?q=/..;/b", "/?q=/..;/b"),
    ("/x/a.;/y", "/x/a.;/y"),  # not a dot segment
    ("/x/a..;/y", "/x/a..;/y"),
    ("/x/...;/y", "/x/...;/y"),
    ("/x;a/../y", "/y"),
    ("/x/..%3b/y", "/x/..%3b/y"),  # an escaped ";" is data
]
#: Envoy resolves literal dots only: it forwards these as shown, which its own normalization
#: (and a servlet container) reads as the path in the last column. ubimesh refuses them (400):
#: resolving them would forward some that Envoy refuses (/admin/%2e%2e; is / then).
SEMICOLON_ESCAPED_DOTS = [
    ("/x/%2e%2e;a/y", "/x/..;a/y", "/y"),
    ("/x/%2e.;a/y", "/x/..;a/y", "/y"),
    ("/x/.%2e;/y", "/x/..;/y", "/y"),
    ("/x/%2e;/y", "/x/.;/y", "/x/y"),
    ("/admin/%2E%2e;", "/admin/..;", "/"),
]


@pytest.mark.parametrize(("path", "envoy"), SEMICOLON_DOTS)
def test_dot_segments_with_parameters_as_envoy(path: str, envoy: str) -> None:
    assert _normalize(path, Escaped.KEEP_UNCHANGED) == (PathAction.FORWARD, envoy)


@pytest.mark.parametrize(("path", "envoy", "reread"), SEMICOLON_ESCAPED_DOTS)
def test_escaped_dot_segments_with_parameters_are_refused(
    path: str, envoy: str, reread: str
) -> None:
    assert _normalize(path, Escaped.KEEP_UNCHANGED)[0] is PathAction.REJECT
    # What Envoy forwards is not a fixed point of its own normalization.
    assert _normalize(envoy, Escaped.KEEP_UNCHANGED) == (PathAction.FORWARD, reread)


def test_upstream_view_sees_what_it_should() -> None:
    assert upstream_view("/x/..;y/%61dmin") == "/admin"
    assert upstream_view("/a%2f..%2fadmin") == "/admin"
    assert upstream_view("/%2561dmin") == "/%61dmin"


@settings(max_examples=500, deadline=None)
@given(path=request_paths(), action=st.sampled_from(ACTIONS))
@example(path="/..;/admin", action=Escaped.UNESCAPE_AND_REDIRECT)
@example(path="/x/%2e%2e;/admin", action=Escaped.UNESCAPE_AND_REDIRECT)
@example(path="/x/.%2e;y/admin", action=Escaped.UNESCAPE_AND_FORWARD)
def test_forwarded_paths_are_fixed_points(path: str, action: Escaped) -> None:
    kind, out = _normalize(path, action)
    if kind is PathAction.REJECT:
        return
    # A redirect's location comes back as a new request; it must then be forwarded as is.
    again = _normalize(out, action)
    assert again == (PathAction.FORWARD, out), (path, kind, out, again)


@settings(max_examples=500, deadline=None)
@given(path=request_paths(), action=st.sampled_from(ACTIONS))
@example(path="/..;/admin", action=Escaped.UNESCAPE_AND_REDIRECT)
@example(path="/public/%2e%2e;jsessionid=1/admin", action=Escaped.UNESCAPE_AND_REDIRECT)
def test_what_an_upstream_serves_is_what_the_deny_saw(path: str, action: Escaped) -> None:
    kind, out = _normalize(path, action)
    if kind is not PathAction.FORWARD:
        return  # refused, or redirected (the location is checked as a request of its own)
    if _is_admin(upstream_view(out)):
        routed = out.split("?", 1)[0]
        assert routed.lower().startswith("/admin"), (path, out, upstream_view(out))
