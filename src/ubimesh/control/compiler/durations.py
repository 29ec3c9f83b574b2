"""Go/Envoy style duration strings ("1.5s", "250ms", "1m30s") to protobuf Durations."""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

from google.protobuf import duration_pb2

from ubimesh.control.compiler.model import CompileError, Message

_UNIT_NANOS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


@lru_cache(maxsize=1024)
def _nanos(text: str) -> int | None:
    value = text.strip()
    if value == "0":
        return 0
    if not value:
        return None
    total = Fraction(0)
    pos = 0
    while pos < len(value):
        part = _PART.match(value, pos)
        if part is None:
            return None
        total += Fraction(part.group(1)) * _UNIT_NANOS[part.group(2)]
        pos = part.end()
    return int(total)


def parse_nanos(text: str, where: str) -> int:
    """Whole nanoseconds of ``text``; ``where`` names the field for the error message."""
    nanos = _nanos(str(text))
    if nanos is None:
        raise CompileError(
            f"{where}: {text!r} is not a duration; expected e.g. '1.5s', '250ms', '1m30s'"
        )
    return nanos


def duration(text: str, where: str) -> Message:
    """A ``google.protobuf.Duration`` for ``text``."""
    nanos = parse_nanos(text, where)
    return duration_pb2.Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)
