"""Access log filters (``AccessLog.filter``), compiled into predicates over a ``LogEntry``."""

from __future__ import annotations

from collections.abc import Callable

from ubimesh.proxy.access_log.format import LogEntry
from ubimesh.proxy.snapshot.types import AccessLogFilter

Predicate = Callable[[LogEntry], bool]

#: Envoy's response flag short names (ResponseFlagFilter.flags accepts these).
RESPONSE_FLAGS = frozenset(
    {"LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE",
     "DC", "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF",
     "DO", "DR", "UDO"}
)  # fmt: skip

#: The filter kinds ubimesh implements (AccessLogFilter's oneof field names).
SUPPORTED_KINDS = (
    "status_code_filter",
    "duration_filter",
    "not_health_check_filter",
    "and_filter",
    "or_filter",
    "response_flag_filter",
)


def _compare(op: str, value: int, field: Callable[[LogEntry], int]) -> Predicate:
    if op == "GE":
        return lambda e: field(e) >= value
    if op == "LE":
        return lambda e: field(e) <= value
    if op == "NE":
        return lambda e: field(e) != value
    return lambda e: field(e) == value


def _has_flag(wanted: frozenset[str]) -> Predicate:
    def match(e: LogEntry) -> bool:
        flags = e.flags
        if not flags:
            return False
        if not wanted:
            return True  # an empty list matches any flag
        return any(f in wanted for f in flags.split(","))

    return match


def compile_filter(spec: AccessLogFilter) -> Predicate:
    """The predicate of ``spec``: true when the entry is to be logged."""
    kind = spec.kind
    if kind == "status_code_filter":
        return _compare(spec.op, spec.value, lambda e: e.status)
    if kind == "duration_filter":
        return _compare(spec.op, spec.value, lambda e: e.duration_ms)
    if kind == "response_flag_filter":
        return _has_flag(frozenset(spec.flags))
    if kind == "and_filter":
        subs = tuple(compile_filter(f) for f in spec.filters)
        return lambda e: all(p(e) for p in subs)
    if kind == "or_filter":
        subs = tuple(compile_filter(f) for f in spec.filters)
        return lambda e: any(p(e) for p in subs)
    if kind == "not_health_check_filter":
        # ubimesh has no health checks: no request is a health check.
        return lambda e: True
    raise ValueError(f"unsupported access log filter {kind!r}")  # the translator refuses it
