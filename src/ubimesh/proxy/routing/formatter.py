"""Envoy's substitution formatter for header values (``%COMMAND%`` operators).

A format string is compiled once (:func:`compile_format`) into literal parts and operator
callables; expanding it per request (:meth:`CompiledFormat.format`) is a join over those parts.
The grammar is Envoy's: ``%%`` is a literal ``%``; every other ``%`` must start a command
``%NAME%``, ``%NAME(arg)%`` or ``%NAME(arg):LENGTH%`` where NAME is ``[A-Z0-9_]+``. A stray
``%``, a lower-case name, an unknown command, a missing or superfluous argument are errors at
compile time, with Envoy's messages, as Envoy refuses such a configuration.

Header values are formatted like Envoy's ``HeaderParser`` does (omit-empty mode): a value that
is not available (a missing request header, no SNI, ...) expands to the empty string, not to
the access log's ``-``; the caller then drops a header whose whole value is empty unless the
option says ``keep_empty_value``.

Supported commands:

* ``DOWNSTREAM_REMOTE_ADDRESS``, ``DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT``,
  ``DOWNSTREAM_REMOTE_PORT``, the same three for ``DOWNSTREAM_DIRECT_REMOTE_*`` (the peer of
  the connection, where the plain ones may come from x-forwarded-for) and for
  ``DOWNSTREAM_LOCAL_*``. IPv6 addresses with a port are bracketed, ``[::1]:80``.
* ``REQ(name)``, ``REQ(name?alternative)``, with an optional ``:LENGTH`` that truncates; the
  first value of the request header (``:authority`` / ``host``, ``:path``, ``:method`` and
  ``:scheme`` included). ``RESP(...)`` is the same for response headers.
* ``PROTOCOL`` (``HTTP/1.1``), ``HOSTNAME``, ``REQUESTED_SERVER_NAME``.
* ``START_TIME`` (``2024-05-01T12:00:00.123Z``) and ``START_TIME(format)``: strftime in UTC
  plus Envoy's ``%f`` / ``%1f``..``%9f`` (fraction of the second, truncated), ``%s`` and
  ``%Es`` (epoch seconds) and ``%E3S``-style seconds with N decimals.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Callable

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.text import ascii_lower


class FormatError(ValueError):
    """A format string Envoy would refuse."""


Address = tuple[str, int]


class FormatContext:
    """What a format string can refer to, for one request.

    ``request_headers`` is the request's header multimap (it does not need to hold the
    pseudo-headers: ``method``, ``path`` (with its query), ``authority`` and ``scheme`` are
    given apart). Addresses are ``(ip, port)``; ``downstream_direct_remote`` defaults to
    ``downstream_remote``. ``start_time`` is wall-clock seconds since the epoch (``time.time()``
    when the request started). ``response_headers`` is set when formatting response headers.
    """

    __slots__ = (
        "authority",
        "downstream_direct_remote",
        "downstream_local",
        "downstream_remote",
        "method",
        "path",
        "protocol",
        "request_headers",
        "requested_server_name",
        "response_headers",
        "scheme",
        "start_time",
    )

    def __init__(
        self,
        request_headers: Headers | None = None,
        *,
        method: str = "",
        path: str = "",
        authority: str = "",
        scheme: str = "http",
        protocol: str = "HTTP/1.1",
        downstream_remote: Address | None = None,
        downstream_local: Address | None = None,
        downstream_direct_remote: Address | None = None,
        start_time: float = 0.0,
        requested_server_name: str = "",
        response_headers: Headers | None = None,
    ) -> None:
        self.request_headers = request_headers if request_headers is not None else Headers()
        self.method = method
        self.path = path
        self.authority = authority
        self.scheme = scheme
        self.protocol = protocol
        self.downstream_remote = downstream_remote
        self.downstream_local = downstream_local
        self.downstream_direct_remote = (
            downstream_direct_remote if downstream_direct_remote is not None else downstream_remote
        )
        self.start_time = start_time
        self.requested_server_name = requested_server_name
        self.response_headers = response_headers


Operator = Callable[[FormatContext], str]


class CompiledFormat:
    """A compiled format string. ``literal`` is the whole value when it has no operator (then
    :meth:`format` costs nothing)."""

    __slots__ = ("literal", "parts", "source")

    def __init__(self, source: str, parts: list[str | Operator]) -> None:
        self.source = source
        self.parts = parts
        self.literal: str | None = None
        if not parts:
            self.literal = ""
        elif len(parts) == 1 and isinstance(parts[0], str):
            self.literal = parts[0]

    def format(self, ctx: FormatContext) -> str:
        literal = self.literal
        if literal is not None:
            return literal
        return "".join([p if isinstance(p, str) else p(ctx) for p in self.parts])

    def __repr__(self) -> str:
        return f"CompiledFormat({self.source!r})"


def literal_format(text: str) -> CompiledFormat:
    """A "format" that is ``text`` verbatim (a header value without operators)."""
    return CompiledFormat(text, [text] if text else [])


# ---------------------------------------------------------------------------------------------
# Compilation

_COMMAND = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::([0-9]+))?%")


def scan_format(
    text: str, bad_command: Callable[[int], str]
) -> tuple[list[tuple[str, re.Match[str]]], str]:
    """Envoy's substitution format ``text`` as (literal text before, command) pairs, with
    ``%%`` read as a literal ``%``, and the literal text after the last command. Raises
    :class:`FormatError` with ``bad_command(position)`` where a ``%`` starts no valid command.
    Shared by header values and access log formats, which compile the commands each their own
    way."""
    pairs: list[tuple[str, re.Match[str]]] = []
    literal: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        j = text.find("%", i)
        if j < 0:
            literal.append(text[i:])
            break
        literal.append(text[i:j])
        if text.startswith("%%", j):
            literal.append("%")
            i = j + 2
            continue
        m = _COMMAND.match(text, j)
        if m is None:
            raise FormatError(bad_command(j))
        pairs.append(("".join(literal), m))
        literal.clear()
        i = m.end()
    return pairs, "".join(literal)


def compile_format(value: str) -> CompiledFormat:
    """Compile ``value``; raises :class:`FormatError` where Envoy would refuse it."""
    pairs, tail = scan_format(
        value,
        lambda j: f"Incorrect configuration: {value}. Couldn't find valid command at position {j}",
    )
    parts: list[str | Operator] = []
    for text, m in pairs:
        if text:
            parts.append(text)
        parts.append(_compile_command(m.group(1), m.group(2), m.group(3)))
    if tail:
        parts.append(tail)
    return CompiledFormat(value, parts)


def _compile_command(name: str, arg: str | None, length: str | None) -> Operator:
    if name in ("REQ", "RESP"):
        if not arg:
            raise FormatError(f"{name} requires parameters")
        names = arg.split("?")
        if len(names) > 2:
            raise FormatError(f"More than 1 alternative header specified in token: {arg}")
        main = ascii_lower(names[0])
        alt = ascii_lower(names[1]) if len(names) == 2 else None
        max_len = int(length) if length is not None else None
        return _header_operator(name == "RESP", main, alt, max_len)
    if name == "START_TIME":
        if length is not None:
            raise FormatError(f"{name} does not allow length to be specified.")
        return _start_time_operator(arg or "")
    simple = _SIMPLE.get(name)
    if simple is None:
        raise FormatError(f"Not supported field in StreamInfo: {name}")
    if arg is not None or length is not None:
        raise FormatError(f"{name} does not take any parameters or length")
    return simple


# ---------------------------------------------------------------------------------------------
# Operators


def request_header(ctx: FormatContext, name: str) -> str | None:
    """The first value of request header ``name`` (lower-case), pseudo-headers included.
    ``host`` is ``:authority``, as in Envoy's header map."""
    if name[:1] == ":" or name == "host":
        if name in (":authority", "host"):
            return ctx.authority or None
        if name == ":path":
            return ctx.path or None
        if name == ":method":
            return ctx.method or None
        if name == ":scheme":
            return ctx.scheme or None
    return ctx.request_headers.get_first(name)


def _header_operator(response: bool, main: str, alt: str | None, max_len: int | None) -> Operator:
    def lookup(ctx: FormatContext, name: str) -> str | None:
        if response:
            hs = ctx.response_headers
            return hs.get_first(name) if hs is not None else None
        return request_header(ctx, name)

    def op(ctx: FormatContext) -> str:
        value = lookup(ctx, main)
        if value is None and alt is not None:
            value = lookup(ctx, alt)
        if value is None:
            return ""
        return value if max_len is None else value[:max_len]

    return op


def _address(addr: Address | None) -> str:
    if addr is None:
        return ""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ip(addr: Address | None) -> str:
    return "" if addr is None else addr[0]


def _port(addr: Address | None) -> str:
    return "" if addr is None else str(addr[1])


_HOSTNAME = socket.gethostname()


#: Commands without argument; each is a stateless operator.
_SIMPLE: dict[str, Operator] = {
    "DOWNSTREAM_REMOTE_ADDRESS": lambda c: _address(c.downstream_remote),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda c: _ip(c.downstream_remote),
    "DOWNSTREAM_REMOTE_PORT": lambda c: _port(c.downstream_remote),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": lambda c: _address(c.downstream_direct_remote),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": lambda c: _ip(c.downstream_direct_remote),
    "DOWNSTREAM_DIRECT_REMOTE_PORT": lambda c: _port(c.downstream_direct_remote),
    "DOWNSTREAM_LOCAL_ADDRESS": lambda c: _address(c.downstream_local),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda c: _ip(c.downstream_local),
    "DOWNSTREAM_LOCAL_PORT": lambda c: _port(c.downstream_local),
    "PROTOCOL": lambda c: c.protocol,
    "REQUESTED_SERVER_NAME": lambda c: c.requested_server_name,
    "HOSTNAME": lambda c: _HOSTNAME,
}

#: Envoy's default START_TIME format, with milliseconds.
DEFAULT_START_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%3fZ"

_STRFTIME, _FRACTION, _EPOCH, _SECONDS = range(4)
_TIME_TOKEN = re.compile(r"%(?:([1-9]?)f|(E)s|s|E([0-9])S|%)")


def _start_time_operator(fmt: str) -> Operator:
    render = compile_time_format(fmt or DEFAULT_START_TIME_FORMAT)
    return lambda c: render(c.start_time)


def compile_time_format(fmt: str) -> Callable[[float], str]:
    """A renderer of epoch seconds in UTC for Envoy's date format ``fmt`` (strftime plus the
    sub-second and epoch specifiers listed in the module docstring)."""
    # Segments: (kind, strftime text, digits).
    segments: list[tuple[int, str, int]] = []
    pos = 0
    for m in _TIME_TOKEN.finditer(fmt):
        token = m.group(0)
        if token == "%%":
            continue  # left to strftime; matching it keeps "%%f" from being read as "%f"
        if m.start() > pos:
            segments.append((_STRFTIME, fmt[pos : m.start()], 0))
        if token.endswith("f"):
            segments.append((_FRACTION, "", int(m.group(1) or 9)))
        elif token.endswith("s"):
            segments.append((_EPOCH, "", 0))
        else:
            segments.append((_SECONDS, "", int(m.group(3))))
        pos = m.end()
    if pos < len(fmt):
        segments.append((_STRFTIME, fmt[pos:], 0))

    def render(t: float) -> str:
        whole = math.floor(t)
        micros = min(round((t - whole) * 1_000_000), 999_999)
        nanos = f"{micros:06d}000"
        tm = time.gmtime(whole)
        out = []
        for kind, text, digits in segments:
            if kind == _STRFTIME:
                out.append(time.strftime(text, tm))
            elif kind == _FRACTION:
                out.append(nanos[:digits])
            elif kind == _EPOCH:
                out.append(str(whole))
            else:
                out.append(f"{tm.tm_sec:02d}" + ("." + nanos[:digits] if digits else ""))
        return "".join(out)

    return render
