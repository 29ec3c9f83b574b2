"""Resource errors: each names the file, the resource, the field, the bad value and the fix.

``str(ResourceError)`` reads
``mesh.yaml#3 Service payments/ledger: spec.ports[0].protocol: 'grpc' is not supported;
expected one of: http, tcp``: the source (file and 1-based document index), the resource's
key when it is known, the field path (names joined with ".", list indices in brackets), the
value and what it does wrong, then what is expected instead.

Loading never stops at the first problem: every error of a file set is collected and raised
as one ``ResourceErrors``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from ubimesh.control.resources.model import Key


class _Missing:
    """The value of a field that is absent (or, with a ``problem``, of no single field)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


#: ``ResourceError.value`` when the field is absent or the error is about no single value.
MISSING: Final = _Missing()

#: Values are quoted in messages up to this many characters (a whole mapping can be long).
_VALUE_CHARS = 80


def show_value(value: Any) -> str:
    """``repr`` of ``value``, shortened for one line of an error message."""
    text = repr(value)
    if len(text) > _VALUE_CHARS:
        text = text[: _VALUE_CHARS - 3] + "..."
    return text


class ResourceError(ValueError):
    """One problem with one resource.

    ``source`` is where the resource was read ("mesh.yaml#3"), ``key`` the resource when its
    kind and name are known, ``path`` the field ("spec.ports[0].protocol"; "" for the document
    as a whole), ``value`` the offending value (``MISSING`` when absent), ``expected`` what
    would be accepted, and ``problem`` what is wrong with the value ("is not supported").
    """

    def __init__(
        self,
        source: str,
        key: Key | None,
        path: str,
        value: Any,
        expected: str,
        problem: str = "",
    ) -> None:
        super().__init__(source, key, path, value, expected, problem)
        self.source = source
        self.key = key
        self.path = path
        self.value = value
        self.expected = expected
        self.problem = problem

    def __str__(self) -> str:
        head = self.source or "<input>"
        if self.key is not None:
            head += f" {self.key}"
        where = f"{self.path}: " if self.path else ""
        if self.value is MISSING:
            what = self.problem or "required field is missing"
        else:
            what = f"{show_value(self.value)} {self.problem or 'is not valid'}"
        return f"{head}: {where}{what}; expected {self.expected}"

    def __repr__(self) -> str:
        return f"ResourceError({str(self)!r})"

    def __reduce__(self) -> tuple[type[ResourceError], tuple[Any, ...]]:
        args = (self.source, self.key, self.path, self.value, self.expected, self.problem)
        return (type(self), args)


class ResourceErrors(ValueError):
    """Every error found in one set of resources (at least one). ``str()`` lists them all, one
    a line, after a count when there is more than one."""

    def __init__(self, errors: Iterable[ResourceError]) -> None:
        self.errors: list[ResourceError] = list(errors)
        if not self.errors:
            raise ValueError("ResourceErrors needs at least one error")
        super().__init__(self.errors)

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        lines = "\n".join(f"  {error}" for error in self.errors)
        return f"{len(self.errors)} resource errors:\n{lines}"

    def __repr__(self) -> str:
        return f"ResourceErrors({self.errors!r})"

    def __reduce__(self) -> tuple[type[ResourceErrors], tuple[list[ResourceError]]]:
        return (type(self), (self.errors,))
