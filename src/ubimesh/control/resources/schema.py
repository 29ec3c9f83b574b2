"""A small declarative schema engine: a spec is described by a tree of nodes, and one walk
checks a document against it, fills defaults and collects every problem.

``node.check(value, path, ctx)`` returns the normalized value (plain JSON types, defaults
filled) and reports problems to ``ctx``; it never raises. After a problem the returned value
is meaningless, and the caller discards the whole result when ``ctx.issues`` is not empty.

``Obj`` refuses fields it does not declare, treats a ``null`` field as absent, and runs its
``post`` hook (cross-field rules and defaults) only when its own fields were all valid, so a
bad field yields one error rather than a cascade.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ubimesh.control.resources.errors import MISSING
from ubimesh.control.resources.scalars import dns_label_problem


@dataclass(frozen=True)
class Issue:
    """One problem found by a walk (the loader adds the source and the resource key)."""

    path: str
    value: Any
    expected: str
    problem: str


class Ctx:
    """The state of one walk: the problems found, and the namespace of the resource being
    checked (some defaults are "the resource's own namespace")."""

    __slots__ = ("issues", "namespace")

    def __init__(self, namespace: str = "") -> None:
        self.issues: list[Issue] = []
        self.namespace = namespace

    def fail(self, path: str, value: Any, expected: str, problem: str = "") -> None:
        self.issues.append(Issue(path, value, expected, problem))


@functools.lru_cache(maxsize=4096)
def child(path: str, key: str) -> str:
    """The path of field ``key`` under ``path`` ("spec" + "ports" -> "spec.ports"); a key that
    is not a plain identifier is quoted in brackets (labels['app.kubernetes.io/name']).
    Memoized: every field of every document asks, and the same few hundred paths repeat."""
    if key.replace("-", "_").isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


class Node:
    """One schema node. ``expected`` describes the accepted values for error messages."""

    expected: str = "a value"

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        raise NotImplementedError


class Str(Node):
    """A non-empty string, optionally refined by ``rule`` (returns a problem or ``None``)."""

    def __init__(
        self, expected: str = "a string", rule: Callable[[str], str | None] | None = None
    ) -> None:
        self.expected = expected
        self.rule = rule

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if not isinstance(value, str):
            ctx.fail(path, value, self.expected, "is not a string")
        elif not value:
            ctx.fail(path, value, self.expected, "is empty")
        elif self.rule is not None:
            problem = self.rule(value)
            if problem is not None:
                ctx.fail(path, value, self.expected, problem)
        return value


class AnyStr(Node):
    """Any string, the empty one included (header values, label values)."""

    expected = "a string"

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if not isinstance(value, str):
            ctx.fail(path, value, "a string (quote numbers and booleans in YAML)",
                     "is not a string")
        return value


class Int(Node):
    """An integer in ``lo..hi`` (booleans and floats are refused: weights are whole)."""

    def __init__(self, lo: int, hi: int, expected: str | None = None) -> None:
        self.lo = lo
        self.hi = hi
        self.expected = expected or f"an integer {lo}..{hi}"

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            ctx.fail(path, value, self.expected, "is not an integer")
        elif not self.lo <= value <= self.hi:
            ctx.fail(path, value, self.expected, "is out of range")
        return value


class Bool(Node):
    expected = "true or false"

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if not isinstance(value, bool):
            ctx.fail(path, value, self.expected, "is not a boolean")
        return value


class Enum(Node):
    """One of a fixed set of strings, compared exactly."""

    def __init__(self, *values: str) -> None:
        self.values = frozenset(values)
        self.expected = "one of: " + ", ".join(values)

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if not isinstance(value, str) or value not in self.values:
            ctx.fail(path, value, self.expected, "is not supported")
        return value


class Refused(Node):
    """A field that is recognized but not (yet) accepted; ``expected`` says why and what to do."""

    def __init__(self, expected: str, problem: str = "is not supported yet") -> None:
        self.expected = expected
        self.problem = problem

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        ctx.fail(path, value, self.expected, self.problem)
        return value


class ListOf(Node):
    """A list of ``item``; ``unique`` names fields of object items that must not repeat (
    compared case-insensitively with ``fold_case``), ``unique_items`` refuses repeated
    scalar items."""

    def __init__(
        self,
        item: Node,
        *,
        min_items: int = 0,
        unique: Sequence[str] = (),
        unique_items: bool = False,
        fold_case: bool = False,
        expected: str | None = None,
    ) -> None:
        self.item = item
        self.min_items = min_items
        self.unique = tuple(unique)
        self.unique_items = unique_items
        self.fold_case = fold_case
        at_least = f" of at least {min_items}" if min_items else ""
        self.expected = expected or f"a list{at_least} ({item.expected})"

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if not isinstance(value, list):
            ctx.fail(path, value, self.expected, "is not a list")
            return value
        if len(value) < self.min_items:
            ctx.fail(path, value, self.expected, "has too few items")
        out = [self.item.check(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
        for field in self.unique:
            self._check_unique(
                out, path, ctx, field, [v.get(field) if isinstance(v, dict) else None for v in out]
            )
        if self.unique_items:
            self._check_unique(out, path, ctx, "", list(out))
        return out

    def _check_unique(
        self, out: list[Any], path: str, ctx: Ctx, field: str, keys: list[Any]
    ) -> None:
        seen: dict[Any, int] = {}
        for i, k in enumerate(keys):
            if k is None or not isinstance(k, str | int):
                continue
            if self.fold_case and isinstance(k, str):
                k = k.lower()
            if k in seen:
                where = f"{path}[{i}]" + (f".{field}" if field else "")
                ctx.fail(where, out[i] if not field else out[i][field],
                         f"unique {field or 'items'} within {path}",
                         f"is used twice (also at {path}[{seen[k]}])")
            else:
                seen[k] = i


class MapOf(Node):
    """A mapping whose keys are checked by ``key`` and whose values by ``value``."""

    def __init__(self, key: Node, value: Node, expected: str | None = None) -> None:
        self.key = key
        self.value = value
        self.expected = expected or f"a mapping of {key.expected} to {value.expected}"

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if not isinstance(value, dict):
            ctx.fail(path, value, self.expected, "is not a mapping")
            return value
        out: dict[Any, Any] = {}
        for k, v in value.items():
            where = child(path, str(k))
            self.key.check(k, where, ctx)
            out[k] = self.value.check(v, where, ctx)
        return out


class _Fill:
    def __repr__(self) -> str:
        return "FILL"


#: A field default meaning "the field's own node applied to {}" (an object of its defaults).
FILL: Final = _Fill()
_NONE: Final = object()


@dataclass(frozen=True)
class F:
    """A field of an ``Obj``: its node, whether it is required, and its default (a plain value,
    copied on use, or ``FILL``)."""

    node: Node
    required: bool = False
    default: Any = _NONE


def req(node: Node) -> F:
    return F(node, required=True)


def opt(node: Node, default: Any = _NONE) -> F:
    return F(node, default=default)


#: A hook run after an object's fields are valid: it may fill defaults that depend on other
#: fields and report cross-field problems.
PostHook = Callable[[dict[str, Any], str, Ctx], None]


class Obj(Node):
    """A mapping with declared fields; unknown fields are refused."""

    def __init__(
        self, fields: Mapping[str, F], post: PostHook | None = None, expected: str = "a mapping"
    ) -> None:
        self.fields = dict(fields)
        self.post = post
        self.expected = expected
        self._known = "one of: " + ", ".join(self.fields)
        #: The fields that matter when absent (required, or with a default), in order.
        self._absent = [
            (n, f) for n, f in self.fields.items() if f.required or f.default is not _NONE
        ]
        #: Each field's check, bound once (every field of every document is checked).
        self._checks: dict[str, Callable[[Any, str, Ctx], Any]] = {
            n: f.node.check for n, f in self.fields.items()
        }

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if not isinstance(value, dict):
            ctx.fail(path, value, self.expected, "is not a mapping")
            return value
        before = len(ctx.issues)
        out: dict[str, Any] = {}
        checks = self._checks
        for k, v in value.items():
            check = checks.get(k) if isinstance(k, str) else None
            if check is None:
                ctx.fail(child(path, str(k)), MISSING, self._known, "unknown field")
            elif v is not None:  # null means absent, as kubectl reads it
                out[k] = check(v, child(path, k), ctx)
        for name, field in self._absent:
            if name in out:
                continue
            if field.required:
                ctx.fail(child(path, name), MISSING, field.node.expected)
            elif field.default is FILL:
                out[name] = field.node.check({}, child(path, name), ctx)
            elif field.default is not _NONE:
                out[name] = _copy(field.default)
        if self.post is not None and len(ctx.issues) == before:
            self.post(out, path, ctx)
        return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# Nodes used by several kinds.

PORT: Final = Int(1, 65535, "a port number 1..65535")
NAME: Final = Str("a DNS-1123 label (lower case letters, digits and '-', at most 63)",
                  dns_label_problem)
DURATION_EXPECTED: Final = 'a duration such as "1s", "250ms" or "1m30s"'


class PortRef(Node):
    """A service port by name ("http") or by number (8080)."""

    expected = "a service port name or number"

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if isinstance(value, str):
            NAME.check(value, path, ctx)
        elif isinstance(value, int) and not isinstance(value, bool):
            PORT.check(value, path, ctx)
        else:
            ctx.fail(path, value, self.expected, "is neither a port name nor a number")
        return value
