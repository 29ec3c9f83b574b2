"""Trace context propagation: B3 (single and multi-header) and W3C traceparent/tracestate.

Extraction reads a request's headers once (``collect``) and parses what the provider uses;
injection writes this hop's span into the headers the upstream gets. Parsing follows the
specs (../shared/docs/specs.md section 3): ids are lower-case hex of the exact length, not all
zeros; a B3 ``b3`` single header wins over ``x-b3-*``; a W3C traceparent that breaks a rule is
ignored together with its tracestate; a tracestate that breaks the grammar is dropped whole.
"""

from __future__ import annotations

import os
from typing import Final

#: The request headers tracing looks at (one pass over the header list finds them all). The
#: codec flags a request that has any (hcm_config.F_TRACE): most have none.
TRACE_HEADERS: Final = frozenset(
    {
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "traceparent",
        "tracestate",
        "x-client-trace-id",
        "x-envoy-force-trace",
    }
)
_B3_MULTI = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags")
_HEX = frozenset("0123456789abcdef")
_ZERO16 = "0" * 16
_ZERO32 = "0" * 32

UNKNOWN = -1
"""``SpanContext.sampled`` when the headers carried no decision (B3's "defer")."""


class Malformed(Exception):
    """Trace headers are present but break their format (Envoy's Zipkin tracer then traces
    nothing for the request and leaves the headers as they are)."""


class SpanContext:
    """What the downstream sent: the caller's trace and span ids, its decision, the W3C
    tracestate to pass on, and which B3 form it used (so the upstream gets the same one)."""

    __slots__ = ("debug", "parent_id", "sampled", "single_b3", "span_id", "trace_id", "tracestate")

    def __init__(
        self,
        trace_id: str = "",
        span_id: str = "",
        parent_id: str = "",
        sampled: int = UNKNOWN,
        *,
        debug: bool = False,
        tracestate: str = "",
        single_b3: bool = False,
    ) -> None:
        self.trace_id = trace_id
        """16 or 32 lower-case hex digits ("" when only a sampling decision came)."""
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        """1, 0 or UNKNOWN."""
        self.debug = debug
        self.tracestate = tracestate
        self.single_b3 = single_b3

    def __repr__(self) -> str:
        return (
            f"SpanContext({self.trace_id!r}, {self.span_id!r}, {self.parent_id!r}, "
            f"sampled={self.sampled}, debug={self.debug}, tracestate={self.tracestate!r}, "
            f"single_b3={self.single_b3})"
        )

    @property
    def has_ids(self) -> bool:
        return bool(self.trace_id)


def collect(items: list[tuple[str, str]]) -> dict[str, list[str]] | None:
    """The trace headers of a request (name -> values in arrival order), None when there are
    none (the common case at an edge)."""
    found: dict[str, list[str]] | None = None
    for k, v in items:
        if k in TRACE_HEADERS:
            if found is None:
                found = {}
            values = found.get(k)
            if values is None:
                found[k] = [v]
            else:
                values.append(v)
    return found


def _is_hex(value: str, lengths: tuple[int, ...]) -> bool:
    return len(value) in lengths and all(c in _HEX for c in value)


def _b3_id(value: str, lengths: tuple[int, ...], what: str) -> str:
    if not _is_hex(value, lengths):
        raise Malformed(f"{what} {value!r} is not {' or '.join(map(str, lengths))} hex digits")
    if value in (_ZERO16, _ZERO32):
        raise Malformed(f"{what} is all zeros")
    return value


def extract_b3(found: dict[str, list[str]]) -> SpanContext | None:
    """The B3 context of a request (``collect``'s result): the single ``b3`` header if present,
    else ``x-b3-*`` (the first value of each wins). None without B3 headers; raises
    ``Malformed`` for present but invalid ones."""
    single = found.get("b3")
    if single is not None:
        return _parse_b3_single(single[0].strip())
    if not any(name in found for name in _B3_MULTI):
        return None
    first = {name: found[name][0].strip() for name in _B3_MULTI if name in found}
    sampled = UNKNOWN
    debug = first.get("x-b3-flags") == "1"
    raw = first.get("x-b3-sampled")
    if raw is not None:
        if raw in ("1", "true"):
            sampled = 1
        elif raw in ("0", "false"):
            sampled = 0
        else:
            raise Malformed(f"x-b3-sampled {raw!r} is not 1 or 0")
    if debug:
        sampled = 1
    trace_id = first.get("x-b3-traceid")
    span_id = first.get("x-b3-spanid")
    if trace_id is None and span_id is None:
        if "x-b3-parentspanid" in first:
            raise Malformed("x-b3-parentspanid without x-b3-traceid and x-b3-spanid")
        return SpanContext(sampled=sampled, debug=debug)
    if trace_id is None or span_id is None:
        raise Malformed("x-b3-traceid and x-b3-spanid go together")
    parent = first.get("x-b3-parentspanid")
    return SpanContext(
        _b3_id(trace_id, (16, 32), "x-b3-traceid"),
        _b3_id(span_id, (16,), "x-b3-spanid"),
        "" if parent is None else _b3_id(parent, (16,), "x-b3-parentspanid"),
        sampled,
        debug=debug,
    )


def _b3_state(state: str) -> tuple[int, bool]:
    if state == "1":
        return 1, False
    if state == "0":
        return 0, False
    if state == "d":
        return 1, True
    raise Malformed(f"b3 sampling state {state!r} is not 1, 0 or d")


def _parse_b3_single(value: str) -> SpanContext:
    if len(value) == 1:
        sampled, debug = _b3_state(value)
        return SpanContext(sampled=sampled, debug=debug, single_b3=True)
    parts = value.split("-")
    if not 2 <= len(parts) <= 4:
        raise Malformed(f"b3 {value!r} is not traceid-spanid[-sampled[-parentspanid]]")
    sampled, debug = UNKNOWN, False
    if len(parts) >= 3:
        sampled, debug = _b3_state(parts[2])
    return SpanContext(
        _b3_id(parts[0], (16, 32), "b3 trace id"),
        _b3_id(parts[1], (16,), "b3 span id"),
        _b3_id(parts[3], (16,), "b3 parent span id") if len(parts) == 4 else "",
        sampled,
        debug=debug,
        single_b3=True,
    )


def extract_w3c(found: dict[str, list[str]]) -> SpanContext | None:
    """The W3C context (traceparent, with tracestate only when traceparent is valid), or
    None: absent, repeated or invalid traceparent (the trace restarts, per the spec)."""
    values = found.get("traceparent")
    if values is None or len(values) != 1:
        return None
    parsed = parse_traceparent(values[0])
    if parsed is None:
        return None
    trace_id, parent_id, flags = parsed
    states = found.get("tracestate")
    tracestate = ""
    if states:
        tracestate = clean_tracestate(",".join(states))
    return SpanContext(trace_id, parent_id, "", flags & 1, tracestate=tracestate)


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """(trace id, parent id, flags) of a traceparent header, or None when it breaks the
    rules (version ff, wrong lengths, upper case, all-zero ids, junk after version 00)."""
    v = value.strip(" \t")
    if len(v) < 55 or v[2] != "-" or not _is_hex(v[:2], (2,)):
        return None
    version = v[:2]
    if version == "ff":
        return None
    if version == "00" and len(v) != 55:
        return None
    if len(v) > 55 and v[55] != "-":
        return None
    if v[35] != "-" or v[52] != "-":
        return None
    trace_id, parent_id, flags = v[3:35], v[36:52], v[53:55]
    if not (_is_hex(trace_id, (32,)) and _is_hex(parent_id, (16,)) and _is_hex(flags, (2,))):
        return None
    if trace_id == _ZERO32 or parent_id == _ZERO16:
        return None
    return trace_id, parent_id, int(flags, 16)


def _valid_key(key: str) -> bool:
    if not 1 <= len(key) <= 256:
        return False
    first = key[0]
    if not ("a" <= first <= "z" or "0" <= first <= "9"):
        return False
    return all("a" <= c <= "z" or "0" <= c <= "9" or c in "_-*/@" for c in key)


def clean_tracestate(value: str) -> str:
    """A tracestate list re-joined without empty members, or "" when any member breaks the
    grammar or there are more than 32 (the whole list is dropped then, as the W3C test
    harness expects)."""
    members = []
    for raw in value.split(","):
        member = raw.strip(" \t")
        if not member:
            continue
        key, eq, val = member.partition("=")
        if not eq or not _valid_key(key) or not 1 <= len(val) <= 256 or val.endswith(" "):
            return ""
        if any(c in ",=" or not " " <= c <= "~" for c in val):
            return ""
        members.append(member)
    if len(members) > 32:
        return ""
    return ",".join(members)


def new_id64() -> str:
    """A random non-zero 64-bit id as 16 hex digits."""
    while True:
        h = os.urandom(8).hex()
        if h != _ZERO16:
            return h


def strip_b3(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``items`` without any B3 header (before writing this hop's)."""
    return [kv for kv in items if kv[0] != "b3" and not kv[0].startswith("x-b3-")]


def b3_headers(
    trace_id: str, span_id: str, parent_id: str, sampled: bool, *, single: bool
) -> list[tuple[str, str]]:
    """This hop's B3 headers, in the form the downstream used (Envoy writes ``b3`` back when
    it came as ``b3``, else the multi-header form)."""
    flag = "1" if sampled else "0"
    if single:
        value = f"{trace_id}-{span_id}-{flag}"
        return [("b3", value + "-" + parent_id if parent_id else value)]
    out = [("x-b3-traceid", trace_id), ("x-b3-spanid", span_id)]
    if parent_id:
        out.append(("x-b3-parentspanid", parent_id))
    out.append(("x-b3-sampled", flag))
    return out


def traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    """A version-00 traceparent; a 64-bit trace id is left-padded to 128 bits."""
    tid = trace_id if len(trace_id) == 32 else trace_id.rjust(32, "0")
    return f"00-{tid}-{span_id}-{'01' if sampled else '00'}"
