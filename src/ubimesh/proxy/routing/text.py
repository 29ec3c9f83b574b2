"""Small string helpers shared by the routing modules (all pure, all cheap).

Envoy compares header names, host names and "ignore_case" values with ASCII-only case folding
(``absl::AsciiStrToLower``, ``absl::EqualsIgnoreCase``). Python's ``str.lower`` also folds the
latin-1 letters (``"É".lower() == "é"``), so values that are not pure ASCII go through a
translation table instead.
"""

from __future__ import annotations

_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def ascii_lower(s: str) -> str:
    """``s`` with A-Z folded to a-z and every other character unchanged."""
    if s.isascii():
        return s.lower()
    return s.translate(_ASCII_LOWER)


def path_only(path: str) -> str:
    """The path without its query string and fragment (Envoy's
    ``PathUtil::removeQueryAndFragment``): everything before the first ``?`` or ``#``."""
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    h = path.find("#")
    return path if h < 0 else path[:h]


def query_first_values(path: str) -> dict[str, str]:
    """The query parameters of ``path`` mapped to their first value.

    This is Envoy's ``QueryParamsMulti::parseQueryString`` followed by ``getFirstValue``: the
    query starts after the first ``?`` and runs to the end, parameters are split on ``&`` and at
    the first ``=``, a parameter without ``=`` has the empty value, and nothing is
    percent-decoded (``a%20b`` is the name ``a%20b``, ``+`` stays ``+``).
    """
    q = path.find("?")
    if q < 0:
        return {}
    params: dict[str, str] = {}
    for part in path[q + 1 :].split("&"):
        eq = part.find("=")
        if eq < 0:
            params.setdefault(part, "")
        else:
            params.setdefault(part[:eq], part[eq + 1 :])
    return params


def port_start(host: str) -> int:
    """Where the ``:port`` suffix of a Host value starts, or -1 (Envoy's
    ``HeaderUtility::getPortStart``): the last ``:``, unless it is inside an IPv6 literal's
    brackets. The port is not checked to be numeric, as in Envoy."""
    colon = host.rfind(":")
    if colon < 0:
        return -1
    bracket = host.rfind("]")
    if bracket < 0 or bracket < colon:
        return colon
    return -1


def strip_port(host: str) -> str:
    """``host`` without its ``:port`` suffix (if any)."""
    i = port_start(host)
    return host if i < 0 else host[:i]
