"""Header rules of routes, virtual hosts, route configurations and weighted clusters.

One level's rules (``request_headers_to_add`` / ``request_headers_to_remove``, or the response
pair) compile into a :class:`HeaderRules`. Applying it follows Envoy's
``HeaderParser::evaluateHeaders``:

1. every header in the removal list is removed;
2. every value to add is formatted, against the headers as they are after step 1 (so
   ``%REQ(x)%`` does not see what this level adds); an empty result is skipped unless
   ``keep_empty_value``; ADD_IF_ABSENT and OVERWRITE_IF_EXISTS look at the headers as they are
   after step 1 too, so two ADD_IF_ABSENT entries for the same absent header both add it;
3. the overwrites are applied (each one replaces every value of its header by one, placed at the
   end as Envoy's ``setReferenceKey`` does), then the appends.

Envoy refuses to add or remove a ``:``-prefixed header or ``host`` (":-prefixed or host headers
may not be modified" / "... removed"), for requests and responses alike; compiling such a rule
raises :class:`HeaderRuleError` with the same text.

Which levels apply and in which order is the route table's business (``RouteTable``), see
:func:`ubimesh.proxy.routing.table.RouteTable.request_header_rules`.
"""

from __future__ import annotations

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.formatter import (
    CompiledFormat,
    FormatContext,
    compile_format,
    literal_format,
)
from ubimesh.proxy.routing.text import ascii_lower
from ubimesh.proxy.snapshot.types import AppendAction, HeaderMutation, HeaderValueOption


class HeaderRuleError(ValueError):
    """A header rule Envoy would refuse."""


_APPEND = AppendAction.APPEND_IF_EXISTS_OR_ADD
_ADD_IF_ABSENT = AppendAction.ADD_IF_ABSENT
_OVERWRITE_IF_EXISTS = AppendAction.OVERWRITE_IF_EXISTS


def is_modifiable_header(name: str) -> bool:
    """Envoy's ``HeaderUtility::isModifiableHeader`` / ``isRemovableHeader``: not a
    pseudo-header and not ``host``."""
    return not name.startswith(":") and ascii_lower(name) != "host"


class HeaderAdd:
    """One compiled header to add."""

    __slots__ = ("action", "keep_empty", "key", "value")

    def __init__(self, option: HeaderValueOption) -> None:
        key = ascii_lower(option.key)
        if not is_modifiable_header(key):
            raise HeaderRuleError(":-prefixed or host headers may not be modified")
        self.key = key
        self.value: CompiledFormat = (
            compile_format(option.value) if option.has_format else literal_format(option.value)
        )
        self.action = option.append_action
        self.keep_empty = option.keep_empty_value


class HeaderRules:
    """The compiled rules of one level for one direction (request or response)."""

    __slots__ = ("adds", "removes", "static_appends")

    def __init__(self, adds: tuple[HeaderValueOption, ...], removes: tuple[str, ...]) -> None:
        names: list[str] = []
        for name in removes:
            lowered = ascii_lower(name)
            if not is_modifiable_header(lowered):
                raise HeaderRuleError(":-prefixed or host headers may not be removed")
            if lowered not in names:
                names.append(lowered)
        self.removes = tuple(names)
        self.adds = tuple(HeaderAdd(option) for option in adds)
        # The common case: literal values, appended. Then applying is a list extend.
        static: list[tuple[str, str]] = []
        all_static = True
        for add in self.adds:
            literal = add.value.literal
            if literal is None or add.action is not _APPEND:
                all_static = False
                break
            if literal or add.keep_empty:
                static.append((add.key, literal))
        self.static_appends: list[tuple[str, str]] | None = static if all_static else None

    def __bool__(self) -> bool:
        return bool(self.adds or self.removes)

    def __repr__(self) -> str:
        adds = [(a.key, a.value.source, a.action.name) for a in self.adds]
        return f"HeaderRules(removes={self.removes!r}, adds={adds!r})"

    def apply(self, headers: Headers, ctx: FormatContext) -> None:
        """Apply these rules to ``headers`` (request headers: ``ctx.request_headers`` should be
        the same object; response headers: ``ctx.response_headers``)."""
        for name in self.removes:
            headers.remove(name)
        static = self.static_appends
        if static is not None:
            headers.items.extend(static)
            return
        overwrites: list[tuple[str, str]] = []
        appends: list[tuple[str, str]] = []
        for add in self.adds:
            value = add.value.format(ctx)
            if not value and not add.keep_empty:
                continue
            action = add.action
            if action is _APPEND:
                appends.append((add.key, value))
            elif action is _ADD_IF_ABSENT:
                if add.key not in headers:
                    appends.append((add.key, value))
            elif action is _OVERWRITE_IF_EXISTS:
                if add.key in headers:
                    overwrites.append((add.key, value))
            else:
                overwrites.append((add.key, value))
        for key, value in overwrites:
            headers.remove(key)
            headers.items.append((key, value))
        if appends:
            headers.items.extend(appends)


def compile_header_mutation(
    mutation: HeaderMutation, extra_response_removes: tuple[str, ...] = ()
) -> tuple[HeaderRules | None, HeaderRules | None]:
    """The (request, response) rules of one level; None for a direction with no rule.
    ``extra_response_removes`` is RouteConfiguration.response_headers_to_remove when the
    translator keeps it apart from the level's mutation."""
    request = HeaderRules(mutation.request_add, mutation.request_remove)
    response = HeaderRules(
        mutation.response_add, mutation.response_remove + tuple(extra_response_removes)
    )
    return (request or None), (response or None)


def apply_header_rules(
    rules: tuple[HeaderRules, ...], headers: Headers, ctx: FormatContext
) -> None:
    """Apply levels of rules in the given order (a later level wins an overwrite)."""
    for level in rules:
        level.apply(headers, ctx)
