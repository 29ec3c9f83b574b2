"""Envoy's own field constraints, read from the protos.

Envoy's API protos carry protoc-gen-validate rules (``(validate.rules)`` field options, such as
"stat_prefix must not be empty" or "connect_timeout must be greater than 0s"), and Envoy refuses a
config that breaks one. The generated Python classes do not check them, so this module reads the
rules from the descriptors and applies them, which keeps ubimesh's answer to "is this config
valid?" the same as Envoy's. Only the rule kinds that occur in the Envoy API are implemented;
a rule kind this module does not know is not checked (``KNOWN_GAPS`` lists them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

from google.protobuf import descriptor as _descriptor
from validate import validate_pb2

# Rule kinds that exist in protoc-gen-validate but are not checked here (none of them is used by
# the part of the Envoy API that ubimesh supports).
KNOWN_GAPS = ("string well_known formats other than well_known_regex", "timestamp", "bytes")

_FD = _descriptor.FieldDescriptor

# protoc-gen-validate's regexes for KnownRegex (validate.proto).
_HEADER_NAME_STRICT = re.compile(r"^:?[0-9a-zA-Z!#$%&'*+\-.^_|~`]+$")
_HEADER_VALUE_STRICT = re.compile(r"^[^\x00-\x08\x0a-\x1f\x7f]*$")
_HEADER_LOOSE = re.compile(r"^[^\x00\x0a\x0d]*$")

_NUMERIC_RULES = (
    "float",
    "double",
    "int32",
    "int64",
    "uint32",
    "uint64",
    "sint32",
    "sint64",
    "fixed32",
    "fixed64",
    "sfixed32",
    "sfixed64",
)

Report = Callable[[str, str], None]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def field_rules(field: Any) -> Any | None:
    """The ``(validate.rules)`` of a field descriptor, or None."""
    options = field.GetOptions()
    if options.HasExtension(validate_pb2.rules):
        return options.Extensions[validate_pb2.rules]
    return None


def check_message(msg: Any, path: str, only: Collection[str], report: Report) -> None:
    """Check the rules of the fields of ``msg`` named in ``only`` (the fields the caller
    supports; the others are refused anyway) and of its required oneofs; ``report(path, message)``
    is called for every broken rule. Nested messages are not entered: each translator checks the
    messages it walks."""
    descriptor = msg.DESCRIPTOR
    for oneof in descriptor.oneofs:
        if not oneof.GetOptions().Extensions[validate_pb2.required]:
            continue
        if msg.WhichOneof(oneof.name) is None and any(f.name in only for f in oneof.fields):
            names = ", ".join(f.name for f in oneof.fields if f.name in only)
            report(path, f"one of {names} is required")
    for field in descriptor.fields:
        if field.name not in only:
            continue
        rules = field_rules(field)
        if rules is None:
            continue
        fpath = _join(path, field.name)
        if field.containing_oneof is not None and msg.WhichOneof(field.containing_oneof.name) != (
            field.name
        ):
            continue
        _check_field(msg, field, rules, fpath, report)


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def _check_field(msg: Any, field: Any, rules: Any, path: str, report: Report) -> None:
    kind = rules.WhichOneof("type")
    value = getattr(msg, field.name)
    is_message = field.type == _FD.TYPE_MESSAGE
    if _is_repeated(field):
        is_map = is_message and field.message_type.GetOptions().map_entry
        if kind == "repeated":
            _check_repeated(list(value), rules.repeated, field, path, report)
        elif kind == "map" and is_map:
            _check_map(value, rules.map, path, report)
        return
    if is_message:
        present = msg.HasField(field.name)
        if rules.message.required and not present:
            report(path, "is required")
            return
        if not present or kind is None:
            return
        full_name = field.message_type.full_name
        if kind == "duration":
            _check_duration(value, rules.duration, path, report)
        elif kind == "any":
            _check_any(value, rules.any, path, report)
        elif full_name.startswith("google.protobuf.") and full_name.endswith("Value"):
            # A wrapper (UInt32Value, StringValue, ...): the scalar rules apply to its value.
            _check_scalar(value.value, kind, getattr(rules, kind), None, path, report)
        return
    _check_scalar(value, kind, getattr(rules, kind) if kind else None, field, path, report)


def _check_scalar(
    value: Any, kind: str | None, rules: Any, field: Any, path: str, report: Report
) -> None:
    if kind is None or rules is None:
        return
    if kind == "string":
        _check_string(value, rules, path, report)
    elif kind in _NUMERIC_RULES:
        _check_number(value, rules, path, report)
    elif kind == "enum":
        _check_enum(value, rules, field, path, report)
    elif kind == "bool" and rules.HasField("const") and value != rules.const:
        report(path, f"must be {str(rules.const).lower()}")


def _check_string(value: str, rules: Any, path: str, report: Report) -> None:
    if rules.ignore_empty and value == "":
        return
    if rules.HasField("const") and value != rules.const:
        report(path, f"must be {rules.const!r}")
    length = len(value)
    if rules.HasField("len") and length != rules.len:
        report(path, f"must be exactly {rules.len} characters long")
    if rules.HasField("min_len") and length < rules.min_len:
        if rules.min_len == 1:
            report(path, "must not be empty")
        else:
            report(path, f"must be at least {rules.min_len} characters long")
    if rules.HasField("max_len") and length > rules.max_len:
        report(path, f"must be at most {rules.max_len} characters long")
    size = len(value.encode("utf-8"))
    if rules.HasField("min_bytes") and size < rules.min_bytes:
        report(
            path,
            "must not be empty"
            if rules.min_bytes == 1
            else f"must be at least {rules.min_bytes} bytes long",
        )
    if rules.HasField("max_bytes") and size > rules.max_bytes:
        report(path, f"must be at most {rules.max_bytes} bytes long")
    if rules.HasField("pattern") and re.search(rules.pattern, value) is None:
        report(path, f"{value!r} does not match the pattern {rules.pattern!r}")
    if rules.HasField("prefix") and not value.startswith(rules.prefix):
        report(path, f"must start with {rules.prefix!r}")
    if rules.HasField("suffix") and not value.endswith(rules.suffix):
        report(path, f"must end with {rules.suffix!r}")
    if rules.HasField("contains") and rules.contains not in value:
        report(path, f"must contain {rules.contains!r}")
    if rules.HasField("not_contains") and rules.not_contains in value:
        report(path, f"must not contain {rules.not_contains!r}")
    if getattr(rules, "in") and value not in getattr(rules, "in"):
        report(path, f"must be one of {', '.join(getattr(rules, 'in'))}")
    if value in rules.not_in:
        report(path, f"must not be {value!r}")
    if rules.WhichOneof("well_known") == "well_known_regex":
        known = rules.well_known_regex
        if known == validate_pb2.HTTP_HEADER_NAME:
            regex = _HEADER_NAME_STRICT if rules.strict else _HEADER_LOOSE
            what = "HTTP header name"
        elif known == validate_pb2.HTTP_HEADER_VALUE:
            regex = _HEADER_VALUE_STRICT if rules.strict else _HEADER_LOOSE
            what = "HTTP header value"
        else:
            return
        if regex.match(value) is None:
            report(path, f"{value!r} is not a valid {what} (control characters are not allowed)")


def _bounds(rules: Any, convert: Callable[[Any], Any] = lambda v: v) -> dict[str, Any]:
    return {n: convert(getattr(rules, n)) for n in ("gt", "gte", "lt", "lte") if rules.HasField(n)}


def _check_bounds(
    value: Any, bounds: dict[str, Any], path: str, report: Report, fmt: Callable[[Any], str] = str
) -> None:
    """protoc-gen-validate's gt/gte/lt/lte: both a lower and an upper bound make a range, which is
    exclusive (the value must lie outside it) when the upper bound is below the lower one."""
    lower = bounds.get("gte", bounds.get("gt"))
    lower_incl = "gte" in bounds
    upper = bounds.get("lte", bounds.get("lt"))
    upper_incl = "lte" in bounds
    above = lower is None or (value >= lower if lower_incl else value > lower)
    below = upper is None or (value <= upper if upper_incl else value < upper)
    lo = None if lower is None else f"{'at least' if lower_incl else 'greater than'} {fmt(lower)}"
    hi = None if upper is None else f"{'at most' if upper_incl else 'less than'} {fmt(upper)}"
    if lower is not None and upper is not None and upper < lower:
        if not (above or below):
            report(path, f"must be {lo} or {hi}")
        return
    if not above or not below:
        report(path, "must be " + " and ".join(b for b in (lo, hi) if b))


def _check_number(value: Any, rules: Any, path: str, report: Report) -> None:
    if rules.ignore_empty and value == 0:
        return
    if rules.HasField("const") and value != rules.const:
        report(path, f"must be {rules.const}")
    _check_bounds(value, _bounds(rules), path, report)
    allowed = list(getattr(rules, "in"))
    if allowed and value not in allowed:
        report(path, f"must be one of {', '.join(str(v) for v in allowed)}")
    if value in rules.not_in:
        report(path, f"must not be {value}")


def _check_enum(value: int, rules: Any, field: Any, path: str, report: Report) -> None:
    enum_type = field.enum_type if field is not None else None
    names = enum_type.values_by_number if enum_type is not None else {}
    if rules.defined_only and enum_type is not None and value not in names:
        report(path, f"{value} is not a value of {enum_type.name}")
    if rules.HasField("const") and value != rules.const:
        report(path, f"must be {names[rules.const].name if rules.const in names else rules.const}")
    allowed = list(getattr(rules, "in"))
    if allowed and value not in allowed:
        report(
            path,
            "must be one of " + ", ".join(names[v].name if v in names else str(v) for v in allowed),
        )
    if value in rules.not_in:
        report(path, f"must not be {names[value].name if value in names else value}")


def _check_repeated(values: list[Any], rules: Any, field: Any, path: str, report: Report) -> None:
    if rules.ignore_empty and not values:
        return
    if rules.HasField("min_items") and len(values) < rules.min_items:
        report(
            path,
            "must not be empty"
            if rules.min_items == 1
            else f"must have at least {rules.min_items} items",
        )
    if rules.HasField("max_items") and len(values) > rules.max_items:
        report(path, f"must have at most {rules.max_items} items")
    if rules.unique and field.type != _FD.TYPE_MESSAGE:
        seen: set[Any] = set()
        for i, value in enumerate(values):
            if value in seen:
                report(f"{path}[{i}]", f"duplicate item {value!r}")
            seen.add(value)
    if not rules.HasField("items"):
        return
    items = rules.items
    kind = items.WhichOneof("type")
    for i, value in enumerate(values):
        ipath = f"{path}[{i}]"
        if field.type == _FD.TYPE_MESSAGE:
            full_name = field.message_type.full_name
            if kind == "duration":
                _check_duration(value, items.duration, ipath, report)
            elif kind == "any":
                _check_any(value, items.any, ipath, report)
            elif kind and full_name.startswith("google.protobuf.") and full_name.endswith("Value"):
                _check_scalar(value.value, kind, getattr(items, kind), None, ipath, report)
        else:
            _check_scalar(value, kind, getattr(items, kind) if kind else None, field, ipath, report)


def _check_map(value: Any, rules: Any, path: str, report: Report) -> None:
    if rules.ignore_empty and not value:
        return
    if rules.HasField("min_pairs") and len(value) < rules.min_pairs:
        report(
            path,
            "must not be empty"
            if rules.min_pairs == 1
            else f"must have at least {rules.min_pairs} entries",
        )
    if rules.HasField("max_pairs") and len(value) > rules.max_pairs:
        report(path, f"must have at most {rules.max_pairs} entries")
    if rules.HasField("keys") and rules.keys.WhichOneof("type") == "string":
        for key in value:
            _check_string(key, rules.keys.string, f'{path}["{key}"]', report)


def duration_seconds(value: Any) -> float:
    """A google.protobuf.Duration as float seconds."""
    return float(value.seconds) + value.nanos / 1e9


def format_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


def _check_duration(value: Any, rules: Any, path: str, report: Report) -> None:
    seconds = duration_seconds(value)
    if rules.HasField("const") and seconds != duration_seconds(rules.const):
        report(path, f"must be {format_seconds(duration_seconds(rules.const))}")

    _check_bounds(seconds, _bounds(rules, duration_seconds), path, report, format_seconds)


def _check_any(value: Any, rules: Any, path: str, report: Report) -> None:
    allowed = list(getattr(rules, "in"))
    if allowed and value.type_url not in allowed:
        report(path, f"type {value.type_url} is not allowed here (allowed: {', '.join(allowed)})")
    if value.type_url in rules.not_in:
        report(path, f"type {value.type_url} is not allowed here")
