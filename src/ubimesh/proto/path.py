"""Request path normalization, as Envoy's HTTP connection manager does it.

Three HCM options act on the path part of ``:path`` (never on the query, which is kept as is),
in this order (``ConnectionManagerUtility::maybeNormalizePath``):

1. ``path_with_escaped_slashes_action``: unless KEEP_UNCHANGED, ``%2F``/``%2f`` become ``/``
   and ``%5C``/``%5c`` become ``\\``. If any was found, REJECT_REQUEST answers 400 right away
   and UNESCAPE_AND_REDIRECT answers a 307 whose ``location`` is the path after all three
   steps; UNESCAPE_AND_FORWARD just goes on.
2. ``normalize_path``: RFC 3986 section 6 normalization as Chromium's URL canonicalizer does it
   (Envoy calls ``url::CanonicalizePath``): backslashes become slashes; ``.`` and ``..``
   segments (also written ``%2e``) are resolved and never climb above the root; a dot segment
   of literal dots may carry ``;parameters``, dropped with it up to the next ``/`` (Envoy 1.40
   reads ``/x/..;a/y`` as ``/y`` and ``/x/.;a/y`` as ``/x/y``, as servlet containers do);
   percent-encoded unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded; other escapes
   are kept with their case ("Envoy does not perform case normalization"); characters that may
   not appear in a path (space, ``"``, ``<``, ``>``, ``^``, backtick, ``{``, ``|``, ``}``,
   controls, non-ASCII) are percent-encoded; a ``%`` that does not start an escape is kept, but
   when decoding would make it start one (``%%30%30``) it is written ``%25``. A NUL, raw or as
   ``%00``, makes the path invalid: 400. Consecutive slashes are left alone.

   One deliberate difference: Envoy leaves a dot segment written with escaped dots and
   parameters (``/x/%2e%2e;/y``) unresolved and forwards it decoded (``/x/..;/y``), a path
   that its own normalization, and a servlet container, then read as another (``/y``): what
   authorization saw is not what the upstream serves. Resolving it instead would forward some
   paths Envoy refuses (``/admin/%2e%2e;`` is ``/`` then). ubimesh refuses such a path (400),
   so its output is always a fixed point of the normalization.
3. ``merge_slashes``: runs of ``/`` collapse to one, except that a path made only of slashes
   keeps two (``///`` becomes ``//``), as Envoy's implementation does.

Everything is written for the common case first: a path with no ``%``, ``\\``, ``//``, dot
segment or character to escape is returned as is after a couple of string scans.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

from ubimesh.proxy.snapshot.types import PathWithEscapedSlashesAction


class PathAction(enum.Enum):
    FORWARD = 0
    REJECT = 1
    """Answer 400."""
    REDIRECT = 2
    """Answer 307 with ``location`` set to the new path."""


class NormalizedPath(NamedTuple):
    action: PathAction
    path: str
    """The path (with its query) to route and forward, or to redirect to."""

    @property
    def reject(self) -> bool:
        return self.action is PathAction.REJECT

    @property
    def redirect(self) -> bool:
        return self.action is PathAction.REDIRECT


# NamedTuple's generated __new__ is a Python function; _make goes straight to tuple.__new__.
_result = NormalizedPath._make
_FORWARD = PathAction.FORWARD
_KEEP = PathWithEscapedSlashesAction.KEEP_UNCHANGED
_REJECT = PathWithEscapedSlashesAction.REJECT_REQUEST
_REDIRECT = PathWithEscapedSlashesAction.UNESCAPE_AND_REDIRECT


def normalize_request_path(
    path: str,
    *,
    normalize: bool = False,
    merge_slashes: bool = False,
    escaped_slashes: PathWithEscapedSlashesAction = _KEEP,
) -> NormalizedPath:
    """Apply the HCM's path options to ``path`` (the request target, query included)."""
    q = path.find("?")
    if q < 0:
        part, query = path, ""
    else:
        part, query = path[:q], path[q:]
    action = _FORWARD
    if escaped_slashes is not _KEEP and "%" in part:
        unescaped = unescape_slashes(part)
        if unescaped is not part:
            if escaped_slashes is _REJECT:
                return _result((PathAction.REJECT, path))
            if escaped_slashes is _REDIRECT:
                action = PathAction.REDIRECT
            part = unescaped
    if normalize:
        canonical = canonicalize_path(part)
        if canonical is None:
            return _result((PathAction.REJECT, path))
        part = canonical
    if merge_slashes and "//" in part:
        part = merge_path_slashes(part)
    return _result((action, part + query))


class PathNormalizer:
    """:func:`normalize_request_path` with the options bound once (per HCM config)."""

    __slots__ = ("active", "escaped_slashes", "merge_slashes", "normalize")

    def __init__(
        self,
        *,
        normalize: bool = False,
        merge_slashes: bool = False,
        escaped_slashes: PathWithEscapedSlashesAction = _KEEP,
    ) -> None:
        self.normalize = normalize
        self.merge_slashes = merge_slashes
        self.escaped_slashes = escaped_slashes
        self.active = normalize or merge_slashes or escaped_slashes is not _KEEP
        """False when every option is off: the path never changes."""

    def __call__(self, path: str) -> NormalizedPath:
        if not self.active:
            return _result((_FORWARD, path))
        return normalize_request_path(
            path,
            normalize=self.normalize,
            merge_slashes=self.merge_slashes,
            escaped_slashes=self.escaped_slashes,
        )


# ---------------------------------------------------------------------------------------------
# Escaped slashes


def unescape_slashes(part: str) -> str:
    """``part`` with ``%2F``/``%2f`` decoded to ``/`` and ``%5C``/``%5c`` to ``\\`` (one pass,
    as ``absl::StrReplaceAll``). Returns ``part`` itself (same object) when nothing changed."""
    if "%" not in part:
        return part
    out = part
    if "%2" in out:
        out = out.replace("%2F", "/").replace("%2f", "/")
    if "%5" in out:
        out = out.replace("%5C", "\\").replace("%5c", "\\")
    return part if out == part else out


# ---------------------------------------------------------------------------------------------
# Merge slashes


def merge_path_slashes(part: str) -> str:
    """Envoy's ``PathTransformer::mergeSlashes`` on a path without query: keep one leading and
    one trailing ``/`` if present and join the non-empty segments with single slashes."""
    if "//" not in part:
        return part
    prefix = "/" if part.startswith("/") else ""
    suffix = "/" if part.endswith("/") else ""
    return prefix + "/".join([s for s in part.split("/") if s]) + suffix


# ---------------------------------------------------------------------------------------------
# RFC 3986 normalization (Chromium's CanonicalizePath)

# Per-character classes of Chromium's kPathCharLookup (url_canon_path.cc) for 8-bit input.
_PASS = 0  # copied as is
_UNESCAPE = 1  # unreserved: copied, and decoded when it arrives percent-encoded
_ESCAPE = 2  # percent-encoded on output
_SPECIAL = 3  # "." "%" "\": handled by the loop
_INVALID = 4  # NUL: the path is invalid

_CLASS = [_ESCAPE] * 256
_CLASS[0] = _INVALID
for _c in "!$&'()*+,/:;=@[]":
    _CLASS[ord(_c)] = _PASS
for _c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~":
    _CLASS[ord(_c)] = _UNESCAPE
for _c in ".%\\":
    _CLASS[ord(_c)] = _SPECIAL
del _c

_HEX = frozenset("0123456789abcdefABCDEF")

# A path that canonicalization leaves unchanged: it starts with "/", has only characters that
# are copied as is (dots included) and no "%" or "\"; dot segments are checked apart.
_CANONICAL_CHARS = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,/:;=@\[\]]*")


def canonicalize_path(part: str) -> str | None:
    """The RFC 3986 normalization of ``part`` (a path without query) as Envoy computes it, or
    None when the path is invalid (Envoy answers 400)."""
    if "/." not in part and _CANONICAL_CHARS.fullmatch(part) is not None:
        return part
    return _canonicalize(part)


def _is_dot(s: str, i: int, end: int) -> int:
    """Length of a dot at ``i``: 1 for ".", 3 for "%2e"/"%2E", else 0."""
    c = s[i]
    if c == ".":
        return 1
    if c == "%" and i + 3 <= end and s[i + 1] == "2" and s[i + 2] in "eE":
        return 3
    return 0


def _decode_escape(s: str, i: int, end: int) -> int:
    """The byte encoded by the escape at ``i`` (``s[i] == "%"``), or -1."""
    if i + 3 > end:
        return -1
    a = s[i + 1]
    b = s[i + 2]
    if a in _HEX and b in _HEX:
        return int(a + b, 16)
    return -1


def _canonicalize(spec: str) -> str | None:
    end = len(spec)
    if end == 0:
        return "/"
    out: list[str] = []
    if spec[0] not in "/\\":
        out.append("/")
    ok = True
    # Index in ``out`` of the last "%" that did not start a valid escape in the input.
    last_invalid_percent = -1
    i = 0
    while i < end:
        ch = spec[i]
        code = ord(ch)
        kind = _CLASS[code] if code < 256 else _ESCAPE
        if kind in (_PASS, _UNESCAPE):
            out.append(ch)
        elif kind == _SPECIAL:
            dot = _is_dot(spec, i, end)
            if dot:
                if out and out[-1] == "/":
                    # A dot right after a slash: maybe a "." or ".." segment.
                    after = i + dot
                    if after == end:
                        i += dot - 1  # "/." at the end: current directory
                    elif spec[after] in "/\\":
                        i += dot  # "./": skip it and its slash
                    elif spec[after] == ";":
                        # ".;params": current directory, parameters dropped up to the slash.
                        if dot != 1:
                            ok = False  # "%2e;": see the module docstring
                        i = _end_of_parameters(spec, after, end)
                    else:
                        dot2 = _is_dot(spec, after, end)
                        after2 = after + dot2
                        if dot2 and after2 < end and spec[after2] == ";":
                            if dot != 1 or dot2 != 1:
                                ok = False  # "%2e%2e;": see the module docstring
                            after2 = _end_of_parameters(spec, after2, end)
                        if dot2 and (after2 == end or spec[after2] in "/\\"):
                            # "..": back up to the previous slash, never above the first one.
                            _back_up_to_previous_slash(out)
                            if last_invalid_percent >= len(out):
                                last_invalid_percent = -1
                            i = after2 if after2 < end else after2 - 1
                        else:
                            out.append(".")
                            i += dot - 1
                else:
                    out.append(".")
                    i += dot - 1
            elif ch == "\\":
                out.append("/")
            else:  # "%"
                value = _decode_escape(spec, i, end)
                if value < 0:
                    last_invalid_percent = len(out)
                    out.append("%")
                else:
                    i += 2
                    value_kind = _CLASS[value]
                    if value_kind == _UNESCAPE:
                        out.append(chr(value))
                        if last_invalid_percent >= 0 and last_invalid_percent + 3 >= len(out):
                            _check_for_nested_escapes(spec, i + 1, end, last_invalid_percent, out)
                    else:
                        if value_kind == _INVALID:
                            ok = False
                        out.append("%")
                        out.append(spec[i - 1])
                        out.append(spec[i])
        elif kind == _ESCAPE:
            if code < 256:
                out.extend(f"%{code:02X}")
            else:  # not latin-1: escape its UTF-8 bytes
                for byte in ch.encode("utf-8"):
                    out.extend(f"%{byte:02X}")
        else:  # _INVALID
            out.extend(f"%{code:02X}")
            ok = False
        i += 1
    return "".join(out) if ok else None


def _end_of_parameters(spec: str, i: int, end: int) -> int:
    """Index of the "/" that ends the ``;parameters`` starting at ``i``, or ``end``. Only a
    literal "/" ends them (Envoy drops a backslash or an escaped slash with them)."""
    slash = spec.find("/", i, end)
    return end if slash < 0 else slash


def _back_up_to_previous_slash(out: list[str]) -> None:
    # ``out`` ends with "/". Drop the last segment, keeping the slash before it; the first
    # slash (index 0) is never removed.
    i = len(out) - 1
    if i == 0:
        return
    i -= 1
    while out[i] != "/" and i > 0:
        i -= 1
    del out[i + 1 :]


def _check_for_nested_escapes(
    spec: str, next_input: int, end: int, last_invalid_percent: int, out: list[str]
) -> None:
    # Chromium's CheckForNestedEscapes: the output now ends with "%c" or "%cc" where the "%"
    # did not start an escape in the input; if it does now, write that "%" as "%25" so that a
    # second normalization cannot decode it.
    length = len(out)
    last_unescaped = out[-1]
    append_next = last_invalid_percent == length - 2
    if append_next:
        if next_input == end or ord(spec[next_input]) >= 0x80:
            return
        out.append(spec[next_input])
    if (
        len(out) >= last_invalid_percent + 3
        and out[last_invalid_percent + 1] in _HEX
        and out[last_invalid_percent + 2] in _HEX
    ):
        if not append_next:
            out.append(out[last_invalid_percent + 1])
        out[last_invalid_percent + 1] = "2"
        out[last_invalid_percent + 2] = "5"
        out.append(last_unescaped)
    elif append_next:
        del out[length:]
