"""Translation of the small shared messages: addresses, regexes, string and header matchers,
header mutations, fractional percents."""

from __future__ import annotations

import importlib
import ipaddress
import re
from typing import Any

from ubimesh.proxy.snapshot.types import (
    AppendAction,
    HeaderMatcher,
    HeaderMatchKind,
    HeaderMutation,
    HeaderValueOption,
    SocketAddress,
    StringMatcher,
    StringMatchKind,
)
from ubimesh.proxy.xds.context import Ctx, item, join

# ---------------------------------------------------------------------------------------------
# Addresses

_ADDRESS = {"socket_address"}
_ADDRESS_HINTS = {
    "pipe": "Unix domain sockets are not implemented",
    "envoy_internal_address": "internal listeners are not implemented",
}
_SOCKET_ADDRESS = {"address", "port_value"}
_SOCKET_ADDRESS_HINTS = {
    "protocol": "only TCP is implemented",
    "named_port": "use port_value",
}


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def socket_address(ctx: Ctx, msg: Any, path: str, *, ip_only: str = "") -> SocketAddress:
    """envoy.config.core.v3.Address holding a socket_address. When ``ip_only`` is given the
    address must be an IP, and ``ip_only`` explains why (it ends the error message)."""
    ctx.fields(msg, path, _ADDRESS, _ADDRESS_HINTS)
    sock_path = join(path, "socket_address")
    if not msg.HasField("socket_address"):
        return SocketAddress("", 0)  # reported by the constraint check or as unsupported
    sock = msg.socket_address
    ctx.fields(sock, sock_path, _SOCKET_ADDRESS, _SOCKET_ADDRESS_HINTS)
    if ip_only and sock.address and not is_ip(sock.address):
        ctx.error(join(sock_path, "address"), f"malformed IP address {sock.address!r}: {ip_only}")
    return SocketAddress(sock.address, sock.port_value)


# ---------------------------------------------------------------------------------------------
# Regular expressions (Envoy: RE2, full match; ubimesh: Python's re)

try:
    _sre_parser: Any = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - re._parser exists on the Pythons ubimesh supports
    _sre_parser = None

# Python regex features that RE2 (and so Envoy) does not have.
_NOT_RE2 = {
    "ASSERT": "lookaround assertions ((?=...), (?!...), (?<=...), (?<!...))",
    "ASSERT_NOT": "lookaround assertions ((?=...), (?!...), (?<=...), (?<!...))",
    "GROUPREF": "backreferences (\\1, (?P=name))",
    "GROUPREF_EXISTS": "conditional groups ((?(1)...))",
    "ATOMIC_GROUP": "atomic groups ((?>...))",
    "POSSESSIVE_REPEAT": "possessive quantifiers (*+, ++, ?+)",
    "AT_END_STRING": "\\Z (RE2 spells it \\z)",
}


def _re2_gap(parsed: Any) -> str | None:
    """The first Python-only feature used in a parsed pattern, or None."""
    for op, av in parsed:
        name = str(op)
        if name in _NOT_RE2:
            return _NOT_RE2[name]
        if name == "AT" and str(av) in _NOT_RE2:
            return _NOT_RE2[str(av)]
        stack = [av]
        while stack:
            value = stack.pop()
            if isinstance(value, _sre_parser.SubPattern):
                found = _re2_gap(value)
                if found:
                    return found
            elif isinstance(value, tuple | list):
                stack.extend(value)
    return None


def compile_pattern(ctx: Ctx, pattern: str, path: str) -> re.Pattern[str] | None:
    """Compile an RE2 pattern with Python's re, refusing what RE2 would refuse where the two
    differ in a way that can be detected. ``re.ASCII`` gives \\d, \\w and \\s RE2's (ASCII)
    meaning. The request path uses ``fullmatch`` for matching, as Envoy does."""
    try:
        compiled = re.compile(pattern, re.ASCII)
    except re.error as exc:
        ctx.error(path, f"invalid regex {pattern!r}: {exc}")
        return None
    if _sre_parser is not None:
        gap = _re2_gap(_sre_parser.parse(pattern))
        if gap:
            ctx.error(path, f"invalid regex {pattern!r}: RE2 (Envoy's regex engine) has no {gap}")
            return None
    return compiled


_REGEX_MATCHER = {"regex", "google_re2"}
_GOOGLE_RE2_HINTS = {"max_program_size": "RE2 program sizes do not apply to Python's re"}


def regex_matcher(ctx: Ctx, msg: Any, path: str) -> re.Pattern[str] | None:
    """envoy.type.matcher.v3.RegexMatcher."""
    ctx.fields(msg, path, _REGEX_MATCHER)
    if msg.HasField("google_re2"):
        ctx.fields(msg.google_re2, join(path, "google_re2"), (), _GOOGLE_RE2_HINTS)
    if not msg.regex:
        return None  # the constraint check reported it
    return compile_pattern(ctx, msg.regex, join(path, "regex"))


def check_substitution(ctx: Ctx, pattern: re.Pattern[str], text: str, path: str) -> None:
    """Check an RE2 rewrite string (``\\0``-``\\9`` for groups, ``\\\\`` for a backslash).
    RE2 finds a bad one (a group the pattern does not have, another escape) only when it
    rewrites a request, and Envoy loads such a config; ubimesh refuses it up front."""
    i = 0
    while i < len(text):
        if text[i] != "\\":
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt.isdigit() and nxt.isascii() and int(nxt) > pattern.groups:
            ctx.error(
                path,
                f"\\{nxt} refers to a group the pattern does not have (it has {pattern.groups})",
            )
        elif nxt != "\\" and not (nxt.isdigit() and nxt.isascii()):
            ctx.error(
                path,
                f"invalid escape '\\{nxt}' at position {i} (RE2 rewrites allow only "
                "\\0 to \\9 and \\\\)",
            )
        i += 2


# ---------------------------------------------------------------------------------------------
# String and header matchers

_STRING_MATCHER = {"exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"}
_STRING_MATCHER_HINTS = {"custom": "custom matcher extensions are not implemented"}
_STRING_KINDS = {
    "exact": StringMatchKind.EXACT,
    "prefix": StringMatchKind.PREFIX,
    "suffix": StringMatchKind.SUFFIX,
    "contains": StringMatchKind.CONTAINS,
}


def string_matcher(ctx: Ctx, msg: Any, path: str) -> StringMatcher | None:
    """envoy.type.matcher.v3.StringMatcher."""
    ctx.fields(msg, path, _STRING_MATCHER, _STRING_MATCHER_HINTS)
    which = msg.WhichOneof("match_pattern")
    if which is None or which == "custom":
        return None  # reported by the constraint check, or refused as unsupported
    if which == "safe_regex":
        if msg.ignore_case:
            ctx.error(join(path, "ignore_case"), "ignore_case has no effect for safe_regex")
        rpath = join(path, "safe_regex")
        regex = regex_matcher(ctx, msg.safe_regex, rpath)
        return StringMatcher(StringMatchKind.REGEX, msg.safe_regex.regex, regex=regex)
    return StringMatcher(_STRING_KINDS[which], getattr(msg, which), ignore_case=msg.ignore_case)


_HEADER_MATCHER = {
    "name",
    "exact_match",
    "safe_regex_match",
    "present_match",
    "prefix_match",
    "suffix_match",
    "contains_match",
    "string_match",
    "invert_match",
    "treat_missing_header_as_empty",
}
_HEADER_MATCHER_HINTS = {"range_match": "integer range matching is not implemented"}
_HEADER_KINDS = {
    "exact_match": HeaderMatchKind.EXACT,
    "prefix_match": HeaderMatchKind.PREFIX,
    "suffix_match": HeaderMatchKind.SUFFIX,
    "contains_match": HeaderMatchKind.CONTAINS,
}
_STRING_TO_HEADER_KIND = {
    StringMatchKind.EXACT: HeaderMatchKind.EXACT,
    StringMatchKind.PREFIX: HeaderMatchKind.PREFIX,
    StringMatchKind.SUFFIX: HeaderMatchKind.SUFFIX,
    StringMatchKind.CONTAINS: HeaderMatchKind.CONTAINS,
    StringMatchKind.REGEX: HeaderMatchKind.REGEX,
}


def header_matcher(ctx: Ctx, msg: Any, path: str) -> HeaderMatcher:
    """envoy.config.route.v3.HeaderMatcher."""
    ctx.fields(msg, path, _HEADER_MATCHER, _HEADER_MATCHER_HINTS)
    name = msg.name.lower()
    common = {
        "invert": msg.invert_match,
        "treat_missing_as_empty": msg.treat_missing_header_as_empty,
    }
    which = msg.WhichOneof("header_match_specifier")
    if which is None:
        return HeaderMatcher(name, HeaderMatchKind.ANY, **common)
    if which == "present_match":
        return HeaderMatcher(name, HeaderMatchKind.PRESENT, present=msg.present_match, **common)
    if which == "safe_regex_match":
        regex = regex_matcher(ctx, msg.safe_regex_match, join(path, which))
        return HeaderMatcher(
            name, HeaderMatchKind.REGEX, msg.safe_regex_match.regex, regex=regex, **common
        )
    if which == "string_match":
        matcher = string_matcher(ctx, msg.string_match, join(path, which))
        if matcher is None:
            return HeaderMatcher(name, HeaderMatchKind.ANY, **common)
        return HeaderMatcher(
            name,
            _STRING_TO_HEADER_KIND[matcher.kind],
            matcher.value,
            regex=matcher.regex,
            ignore_case=matcher.ignore_case,
            **common,
        )
    if which in _HEADER_KINDS:
        return HeaderMatcher(name, _HEADER_KINDS[which], getattr(msg, which), **common)
    # An unsupported specifier (range_match): already refused by ctx.fields.
    return HeaderMatcher(name, HeaderMatchKind.ANY, **common)


# ---------------------------------------------------------------------------------------------
# Header mutation

# Envoy's substitution-format command: %NAME%, %NAME(args)%, %NAME(args):LENGTH%.
_FORMAT_COMMAND = re.compile(r"%[A-Z0-9_]+(\([^)]*\))?(:[0-9]+)?%")


def format_error(value: str) -> str | None:
    """Why ``value`` is not a valid Envoy substitution format string, or None. ``%%`` is a
    literal percent sign; every other ``%`` must start a %COMMAND%. Which commands exist is up to
    the formatter that expands them per request, not checked here."""
    i = 0
    while True:
        j = value.find("%", i)
        if j < 0:
            return None
        if value.startswith("%%", j):
            i = j + 2
            continue
        match = _FORMAT_COMMAND.match(value, j)
        if match is None:
            return (
                f"invalid format string {value!r}: no valid %COMMAND% at position {j} "
                "(write %% for a literal %)"
            )
        i = match.end()


_HEADER_VALUE_OPTION = {"header", "append", "append_action", "keep_empty_value"}
_HEADER_VALUE = {"key", "value"}
_HEADER_VALUE_HINTS = {"raw_value": "use value"}


def _modifiable(name: str) -> bool:
    return not name.startswith(":") and name.lower() != "host"


def header_value_option(ctx: Ctx, msg: Any, path: str) -> HeaderValueOption:
    """envoy.config.core.v3.HeaderValueOption (a header to add)."""
    ctx.fields(msg, path, _HEADER_VALUE_OPTION)
    header = msg.header
    hpath = join(path, "header")
    if msg.HasField("header"):  # else the constraint check reported it
        ctx.fields(header, hpath, _HEADER_VALUE, _HEADER_VALUE_HINTS)
    key = header.key.lower()
    if key and not _modifiable(key):
        ctx.error(join(hpath, "key"), ":-prefixed or host headers may not be modified")
    action = ctx.enum(
        msg, "append_action", path, AppendAction, AppendAction.APPEND_IF_EXISTS_OR_ADD
    )
    if msg.HasField("append"):
        if msg.append_action != 0:
            ctx.error(path, "both append and append_action are set; set only append_action")
        action = (
            AppendAction.APPEND_IF_EXISTS_OR_ADD
            if msg.append.value
            else AppendAction.OVERWRITE_IF_EXISTS_OR_ADD
        )
    problem = format_error(header.value)
    if problem:
        ctx.error(join(hpath, "value"), problem)
    return HeaderValueOption(
        key,
        header.value,
        append_action=action,
        has_format="%" in header.value,
        keep_empty_value=msg.keep_empty_value,
    )


def headers_to_remove(ctx: Ctx, names: Any, path: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, name in enumerate(names):
        lowered = name.lower()
        if lowered and not _modifiable(lowered):
            ctx.error(item(path, i), ":-prefixed or host headers may not be removed")
        out.append(lowered)
    return tuple(out)


HEADER_MUTATION_FIELDS = (
    "request_headers_to_add",
    "request_headers_to_remove",
    "response_headers_to_add",
    "response_headers_to_remove",
)


def header_mutation(ctx: Ctx, msg: Any, path: str) -> HeaderMutation:
    """The four header mutation fields that RouteConfiguration, VirtualHost, Route and
    WeightedCluster.ClusterWeight share (the caller has already run ``ctx.fields``)."""

    def adds(name: str) -> tuple[HeaderValueOption, ...]:
        fpath = join(path, name)
        return tuple(
            header_value_option(ctx, option, item(fpath, i))
            for i, option in enumerate(getattr(msg, name))
        )

    return HeaderMutation(
        request_add=adds("request_headers_to_add"),
        request_remove=headers_to_remove(
            ctx, msg.request_headers_to_remove, join(path, "request_headers_to_remove")
        ),
        response_add=adds("response_headers_to_add"),
        response_remove=headers_to_remove(
            ctx, msg.response_headers_to_remove, join(path, "response_headers_to_remove")
        ),
    )


# ---------------------------------------------------------------------------------------------
# Percentages

_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}


def fractional_percent(ctx: Ctx, msg: Any, path: str) -> tuple[int, int]:
    """envoy.type.v3.FractionalPercent as (numerator, denominator). Envoy treats a numerator
    above the denominator as 100%; so does the value returned here (it is capped)."""
    ctx.fields(msg, path, {"numerator", "denominator"})
    denominator = _DENOMINATORS.get(msg.denominator, 100)
    return min(msg.numerator, denominator), denominator
