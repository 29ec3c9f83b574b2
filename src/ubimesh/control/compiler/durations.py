"""Go/Envoy style duration strings ("1.5s", "250ms", "1m30s") to protobuf Durations."""

from __future__ import annotations

from functools import lru_cache

from google.protobuf import duration_pb2

from ubimesh.control.compiler.model import CompileError, Message
from ubimesh.control.resources.scalars import duration_nanos


@lru_cache(maxsize=1024)
def _nanos(text: str) -> int | None:
    try:
        return duration_nanos(text.strip())
    except ValueError:
        return None


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
