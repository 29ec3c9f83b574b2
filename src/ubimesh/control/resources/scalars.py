"""Checks for single values: names, durations, regular expressions, addresses.

Each ``*_problem`` function returns ``None`` for a good value, or what is wrong with it (the
text that follows the value in an error message).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from fractions import Fraction

#: DNS-1123 label: what Kubernetes accepts as a namespace or Service name. Names are labels
#: (no dots) so that "NAME.NAMESPACE" hostnames and "<workload>.<namespace>" node ids parse.
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
#: A DNS name (RFC 1123 hostname), case-insensitive, without a trailing dot.
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*"
)
#: An HTTP field name (RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Go/Envoy durations: one or more "<decimal><unit>" ("1m30s", "1.5s", "250ms"), or "0".
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NANOS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


@functools.lru_cache(maxsize=8192)  # names repeat across a mesh's documents
def dns_label_problem(value: str) -> str | None:
    if _DNS_LABEL.fullmatch(value):
        return None
    if len(value) > 63:
        return "is longer than 63 characters"
    return "is not a DNS-1123 label"


def dns_name_problem(value: str) -> str | None:
    return None if _DNS_NAME.fullmatch(value) else "is not a DNS name"


def hostname_problem(value: str) -> str | None:
    """A route hostname: a DNS name, optionally with a leading "*." wildcard label."""
    name = value[2:] if value.startswith("*.") else value
    return None if _DNS_NAME.fullmatch(name) else "is not a hostname"


def host_problem(value: str) -> str | None:
    """A DNS name or an IP address."""
    if ip_problem(value) is None or _DNS_NAME.fullmatch(value):
        return None
    return "is neither a DNS name nor an IP address"


def ip_problem(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "is not an IP address"
    return None


def header_name_problem(value: str) -> str | None:
    return None if _TOKEN.fullmatch(value) else "is not an HTTP header name"


def duration_nanos(text: str) -> int:
    """Whole nanoseconds in a Go/Envoy duration string ("1.5s", "250ms", "1m30s", "0"),
    computed exactly (no float rounding, as a protobuf Duration needs); ``ValueError`` for
    anything else (negative durations included)."""
    if text == "0":
        return 0
    if not text:
        raise ValueError("'' is not a duration")
    total = Fraction(0)
    at = 0
    while at < len(text):
        part = _DURATION_PART.match(text, at)
        if part is None:
            raise ValueError(f"{text!r} is not a duration")
        total += Fraction(part.group(1)) * _UNIT_NANOS[part.group(2)]
        at = part.end()
    return int(total)


def parse_duration(text: str) -> float:
    """Seconds in a Go/Envoy duration string (see ``duration_nanos``)."""
    return duration_nanos(text) / 1e9


def duration_problem(value: str) -> str | None:
    try:
        parse_duration(value)
    except ValueError:
        return "is not a duration"
    return None


#: What RE2 (Envoy's regex engine) lacks that Python's ``re`` has, by the text that opens it.
_GROUP_OPENERS = {
    "(?=": "uses a lookahead",
    "(?!": "uses a negative lookahead",
    "(?<=": "uses a lookbehind",
    "(?<!": "uses a negative lookbehind",
    "(?P=": "uses a backreference",
    "(?(": "uses a conditional group",
    "(?>": "uses an atomic group",
    "(?#": "uses a comment group",
}


def regex_problem(value: str) -> str | None:
    """``None`` when ``value`` compiles with Python's ``re`` and uses nothing RE2 refuses
    (lookaround, backreferences, conditionals, atomic groups, possessive quantifiers), so the
    Python proxy and Envoy agree on what it matches."""
    try:
        re.compile(value)
    except re.error as exc:
        return f"is not a regular expression ({exc})"
    return _re2_problem(value)


def _re2_problem(pattern: str) -> str | None:
    # A scan of the pattern text that skips escapes and character classes; the pattern is
    # already known to compile, so brackets balance.
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt.isdigit() and nxt != "0":
                return "uses a backreference (RE2, Envoy's regex engine, has none)"
            i += 2
            continue
        if c == "[":
            i = _skip_class(pattern, i)
            continue
        if c == "(":
            for opener, what in _GROUP_OPENERS.items():
                if pattern.startswith(opener, i):
                    return f"{what} (RE2, Envoy's regex engine, has none)"
        if c in "*+?}" and pattern[i + 1 : i + 2] == "+":
            return "uses a possessive quantifier (RE2, Envoy's regex engine, has none)"
        i += 1
    return None


def _skip_class(pattern: str, i: int) -> int:
    """The index just past the character class that opens at ``pattern[i]``."""
    i += 1
    if pattern[i : i + 1] == "^":
        i += 1
    if pattern[i : i + 1] == "]":  # a "]" first in a class is a literal
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


#: Kubernetes label and annotation keys: an optional DNS-subdomain prefix and "/", then a name
#: of at most 63 characters (letters, digits, "-", "_", "." inside).
_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(
    r"(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?" + _LABEL_NAME
)
_LABEL_VALUE = re.compile(f"(?:{_LABEL_NAME})?")


def label_key_problem(value: str) -> str | None:
    prefix, _, name = value.rpartition("/")
    if len(prefix) > 253 or not _LABEL_KEY.fullmatch(value):
        return "is not a label key"
    return None if len(name) <= 63 else "is not a label key"


def label_value_problem(value: str) -> str | None:
    return None if _LABEL_VALUE.fullmatch(value) else "is not a label value"
