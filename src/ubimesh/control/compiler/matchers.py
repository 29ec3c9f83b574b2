"""Request matchers: SMI HTTPRouteGroup matches and Gateway API HTTPRoute matches to Envoy
``RouteMatch`` messages, and the rewrite helpers that depend on the matched path."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from ubimesh.control.compiler.model import Message

_ANY_METHOD = "*"


def smi_path_regex(pattern: str) -> str:
    """SMI ``pathRegex`` is anchored at the start only (specs.md 1.1); Envoy's ``safe_regex``
    must match the whole path, so ``p`` becomes ``(?:p).*``."""
    return f"(?:{pattern}).*"


def regex(pattern: str) -> Message:
    return regex_pb2.RegexMatcher(regex=pattern)


def string_match(kind: str, value: str) -> Message:
    """``Exact`` (the default) or ``RegularExpression`` (full match) as a StringMatcher."""
    if kind == "RegularExpression":
        return string_pb2.StringMatcher(safe_regex=regex(value))
    return string_pb2.StringMatcher(exact=value)


def method_matcher(methods: Sequence[str]) -> Message | None:
    """A ``:method`` header matcher for ``methods``; None when any method matches (``*``, or no
    method listed). Several methods become one anchored alternation."""
    if not methods or _ANY_METHOD in methods:
        return None
    unique = sorted(set(methods))
    if len(unique) == 1:
        return rc.HeaderMatcher(name=":method", string_match=string_match("Exact", unique[0]))
    alternation = "|".join(re.escape(m) for m in unique)
    return rc.HeaderMatcher(
        name=":method", string_match=string_match("RegularExpression", alternation)
    )


def smi_match(match: Mapping[str, Any]) -> Message:
    """One HTTPRouteGroup match (path regex AND methods AND header regexes) as a RouteMatch."""
    path = match.get("pathRegex")
    route_match = (
        rc.RouteMatch(safe_regex=regex(smi_path_regex(str(path))))
        if path
        else rc.RouteMatch(prefix="/")
    )
    methods = method_matcher([str(m) for m in match.get("methods") or ()])
    if methods is not None:
        route_match.headers.append(methods)
    headers = match.get("headers") or {}
    for name in sorted(headers):
        route_match.headers.append(
            rc.HeaderMatcher(
                name=str(name).lower(),
                string_match=string_match("RegularExpression", str(headers[name])),
            )
        )
    return route_match


def path_of(match: Mapping[str, Any]) -> tuple[str, str]:
    """The (type, value) of a Gateway API match's path; ``PathPrefix /`` when absent."""
    path = match.get("path") or {}
    return str(path.get("type") or "PathPrefix"), str(path.get("value") or "/")


def gateway_match(match: Mapping[str, Any]) -> Message:
    """One Gateway API HTTPRouteMatch as a RouteMatch.

    ``PathPrefix`` matches whole path elements: ``/foo`` (or ``/foo/``) matches ``/foo`` and
    ``/foo/bar`` but not ``/foobar``, which is Envoy's ``path_separated_prefix``; ``/`` is a
    plain ``prefix``."""
    kind, value = path_of(match)
    if kind == "Exact":
        route_match = rc.RouteMatch(path=value)
    elif kind == "RegularExpression":
        route_match = rc.RouteMatch(safe_regex=regex(value))
    else:
        trimmed = value.rstrip("/")
        route_match = (
            rc.RouteMatch(path_separated_prefix=trimmed) if trimmed else rc.RouteMatch(prefix="/")
        )
    for header in match.get("headers") or ():
        route_match.headers.append(
            rc.HeaderMatcher(
                name=str(header["name"]).lower(),
                string_match=string_match(str(header.get("type") or "Exact"), str(header["value"])),
            )
        )
    for param in match.get("queryParams") or ():
        route_match.query_parameters.append(
            rc.QueryParameterMatcher(
                name=str(param["name"]),
                string_match=string_match(str(param.get("type") or "Exact"), str(param["value"])),
            )
        )
    method = match.get("method")
    if method:
        route_match.headers.append(
            rc.HeaderMatcher(name=":method", string_match=string_match("Exact", str(method)))
        )
    return route_match


def precedence(match: Mapping[str, Any]) -> tuple[int, int, int, int, int]:
    """Sort key of a Gateway API match, most specific first: exact paths, then regexes, then
    prefixes (longest first), then a method, then more header and query matches."""
    kind, value = path_of(match)
    rank = {"Exact": 0, "RegularExpression": 1}.get(kind, 2)
    return (
        rank,
        -len(value.rstrip("/") if rank == 2 else value),
        0 if match.get("method") else 1,
        -len(match.get("headers") or ()),
        -len(match.get("queryParams") or ()),
    )


def substitution(text: str) -> str:
    """``text`` as an RE2 substitution (backslashes doubled)."""
    return text.replace("\\", "\\\\")


def prefix_replacement(
    match: Mapping[str, Any], replacement: str
) -> tuple[str, Message | None] | None:
    """Gateway API ``ReplacePrefixMatch`` for one match: ``("prefix", None)`` with the value to
    put in ``prefix_rewrite``, or ``("", RegexMatchAndSubstitute)`` where Envoy's plain prefix
    rewrite would differ; None for a regex match (no prefix to replace: left unrewritten).

    The matched prefix is replaced element-wise, as Gateway API asks: with prefix ``/foo``,
    ``/foo/bar`` becomes ``/bar`` under replacement ``/`` (not ``//bar``), and with prefix ``/``
    ``/abc`` becomes ``/v2/abc`` under replacement ``/v2`` (not ``/v2abc``).
    """
    kind, value = path_of(match)
    if kind == "RegularExpression":
        return None
    prefix = value.rstrip("/")
    target = replacement.rstrip("/")
    if not target:
        return "", regex_pb2.RegexMatchAndSubstitute(
            pattern=regex(f"^{re.escape(prefix)}/*"), substitution="/"
        )
    if not prefix:
        return "", regex_pb2.RegexMatchAndSubstitute(
            pattern=regex("^/"), substitution=substitution(target + "/")
        )
    return target, None


def full_path_replacement(replacement: str) -> Message:
    """Gateway API ``ReplaceFullPath``: the whole path (not the query) becomes ``replacement``."""
    return regex_pb2.RegexMatchAndSubstitute(
        pattern=regex("^.*$"), substitution=substitution(replacement)
    )
