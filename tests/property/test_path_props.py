"""Properties of path normalization."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ubimesh.proto.path import (
    PathAction,
    canonicalize_path,
    merge_path_slashes,
    normalize_request_path,
)
from ubimesh.proxy.snapshot.types import PathWithEscapedSlashesAction as Escaped

# Pieces that exercise every branch of the canonicalizer: dots, escaped dots, slashes and
# backslashes, escapes of every class, stray percent signs, characters to escape.
PIECES = [
    "/", "/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "%", "%%",
    "%41", "%7e", "%3a", "%25", "%30", "2", "e", "f", "a", "b", "~", "-", "{", " ", "%zz",
    "\u00e9", ";", "=",
]  # fmt: skip

paths = st.lists(st.sampled_from(PIECES), max_size=14).map(lambda xs: "/" + "".join(xs))
queries = st.sampled_from(["", "?", "?a=/../b//c", "?x=%2F&y=.."])


def has_dot_segment(path: str) -> bool:
    return any(seg in (".", "..") for seg in path.split("/")[1:])


@settings(max_examples=500)
@given(paths)
def test_normalized_paths_have_no_dot_segments(path: str) -> None:
    out = canonicalize_path(path)
    if out is None:
        return
    assert out.startswith("/")
    assert not has_dot_segment(out)
    assert "\\" not in out


@settings(max_examples=500)
@given(paths)
def test_normalization_is_idempotent(path: str) -> None:
    once = canonicalize_path(path)
    if once is None:
        return
    assert canonicalize_path(once) == once


@settings(max_examples=300)
@given(paths)
def test_merged_paths_have_no_double_slash(path: str) -> None:
    merged = merge_path_slashes(path)
    if merged.strip("/"):
        assert "//" not in merged
    else:
        # Envoy keeps a leading and a trailing slash: an all-slash path keeps at most two.
        assert merged in ("/", "//")
    assert merge_path_slashes(merged) == merged
    # Only empty segments go away.
    assert [s for s in merged.split("/") if s] == [s for s in path.split("/") if s]


@settings(max_examples=300)
@given(paths, queries)
def test_query_is_kept_verbatim(path: str, query: str) -> None:
    result = normalize_request_path(
        path + query,
        normalize=True,
        merge_slashes=True,
        escaped_slashes=Escaped.UNESCAPE_AND_FORWARD,
    )
    if result.action is PathAction.REJECT:
        return
    assert result.path.endswith(query)
    assert "?" not in result.path[: len(result.path) - len(query)]


@settings(max_examples=300)
@given(paths)
def test_full_pipeline_is_stable(path: str) -> None:
    # Forwarding what the pipeline produced through it again changes nothing (a request that
    # was redirected comes back as its target).
    first = normalize_request_path(
        path,
        normalize=True,
        merge_slashes=True,
        escaped_slashes=Escaped.UNESCAPE_AND_REDIRECT,
    )
    if first.action is PathAction.REJECT:
        return
    again = normalize_request_path(
        first.path,
        normalize=True,
        merge_slashes=True,
        escaped_slashes=Escaped.UNESCAPE_AND_REDIRECT,
    )
    if "%2f" in first.path.lower() or "%5c" in first.path.lower():
        # Decoding can reveal a new escaped slash ("%252F" stays, "%%32F"-like nesting is
        # escaped), so only check that nothing is rejected.
        assert again.action is not PathAction.REJECT
    else:
        assert again == (PathAction.FORWARD, first.path)


@settings(max_examples=300)
@given(st.text(alphabet="abc/.-_~", max_size=20).map(lambda s: "/" + s))
def test_unchanged_when_nothing_to_do(path: str) -> None:
    # Without escapes, backslashes, dot segments or double slashes, the path is untouched.
    if "//" in path or has_dot_segment(path):
        return
    assert normalize_request_path(path, normalize=True, merge_slashes=True) == (
        PathAction.FORWARD,
        path,
    )
