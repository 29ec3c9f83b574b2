"""Access log formats: Envoy's substitution format strings (``%COMMAND%`` operators) for text
lines and ``json_format`` objects, compiled once and applied to a ``LogEntry`` per log line.

The grammar is Envoy's (``routing/formatter.py`` has the same for header values): ``%%`` is a
literal ``%``; any other ``%`` starts ``%NAME%``, ``%NAME(arg)%`` or ``%NAME(arg):LENGTH%``.
A command ubimesh does not implement is refused when the configuration is loaded, naming it.

Values as Envoy writes them: a value that is not available (a missing header, no upstream, a
TCP connection's HTTP fields) is ``-`` in a text line and ``null`` in JSON, or nothing at all
with ``omit_empty_values``. In JSON, the numeric operators (``RESPONSE_CODE``, ``DURATION``,
``BYTES_*``, ports) are numbers when they are the whole value of a key; a value mixing text
and operators is a string.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from typing import Any

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.formatter import DEFAULT_START_TIME_FORMAT, compile_time_format

Address = tuple[str, int]
Value = str | int | None


class FormatError(ValueError):
    """A format Envoy (or ubimesh) refuses; the message names the command."""


class LogEntry:
    """What an access log line can show, for one HTTP request or one TCP connection.

    Filled in once per logged request (``logger.http_entry``) or connection
    (``logger.connection_entry``); every field has the "not available" value by default, so
    a TCP entry leaves the HTTP fields alone. ``start_time`` is wall-clock epoch seconds.
    """

    __slots__ = (
        "authority",
        "bytes_received",
        "bytes_sent",
        "details",
        "downstream_local",
        "downstream_remote",
        "duration_ms",
        "flags",
        "http",
        "method",
        "path",
        "peer_uri_san",
        "protocol",
        "request_headers",
        "response_headers",
        "route_name",
        "sni",
        "start_time",
        "status",
        "termination_details",
        "upstream_cluster",
        "upstream_host",
    )

    def __init__(self) -> None:
        self.http = False
        self.start_time = 0.0
        self.duration_ms = 0
        self.method = ""
        self.path = ""
        self.authority = ""
        self.protocol = ""
        self.request_headers: Headers | None = None
        self.response_headers: list[tuple[str, str]] | None = None
        self.status = 0
        self.flags = ""
        self.details = ""
        self.termination_details = ""
        self.bytes_received = 0
        self.bytes_sent = 0
        self.upstream_host = ""
        self.upstream_cluster = ""
        self.route_name = ""
        self.downstream_remote: Address | None = None
        self.downstream_local: Address | None = None
        self.peer_uri_san = ""
        self.sni = ""


Operator = Callable[[LogEntry], Value]
"""One command: its value for an entry; None (or "") when not available."""


# ---------------------------------------------------------------------------------------------
# Operators


def _address(addr: Address | None) -> Value:
    if addr is None or not addr[0]:
        return None
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ip(addr: Address | None) -> Value:
    return addr[0] or None if addr is not None else None


def _port(addr: Address | None) -> Value:
    return addr[1] if addr is not None and addr[0] else None


def _flags(e: LogEntry) -> Value:
    # Envoy prints "-" for no flag even in omit-empty mode; "" is "not available" here.
    return e.flags or "-"


_HOSTNAME = socket.gethostname()

#: Commands without argument.
_SIMPLE: dict[str, Operator] = {
    "RESPONSE_CODE": lambda e: e.status,
    "RESPONSE_CODE_DETAILS": lambda e: e.details or None,
    "CONNECTION_TERMINATION_DETAILS": lambda e: e.termination_details or None,
    "RESPONSE_FLAGS": _flags,
    "DURATION": lambda e: e.duration_ms,
    "BYTES_RECEIVED": lambda e: e.bytes_received,
    "BYTES_SENT": lambda e: e.bytes_sent,
    "PROTOCOL": lambda e: e.protocol or None,
    "UPSTREAM_HOST": lambda e: e.upstream_host or None,
    "UPSTREAM_CLUSTER": lambda e: e.upstream_cluster or None,
    "ROUTE_NAME": lambda e: e.route_name or None,
    "DOWNSTREAM_REMOTE_ADDRESS": lambda e: _address(e.downstream_remote),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda e: _ip(e.downstream_remote),
    "DOWNSTREAM_REMOTE_PORT": lambda e: _port(e.downstream_remote),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": lambda e: _address(e.downstream_remote),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": lambda e: _ip(e.downstream_remote),
    "DOWNSTREAM_DIRECT_REMOTE_PORT": lambda e: _port(e.downstream_remote),
    "DOWNSTREAM_LOCAL_ADDRESS": lambda e: _address(e.downstream_local),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda e: _ip(e.downstream_local),
    "DOWNSTREAM_LOCAL_PORT": lambda e: _port(e.downstream_local),
    "DOWNSTREAM_PEER_URI_SAN": lambda e: e.peer_uri_san or None,
    "REQUESTED_SERVER_NAME": lambda e: e.sni or None,
    "HOSTNAME": lambda e: _HOSTNAME,
}

#: Every command name ubimesh implements (for messages and docs).
SUPPORTED_COMMANDS = tuple(sorted([*_SIMPLE, "REQ", "RESP", "START_TIME"]))


def request_header(e: LogEntry, name: str) -> str | None:
    """The first value of request header ``name`` (lower-case); pseudo-headers from the
    request line, ``host`` being ``:authority`` as in Envoy's header map."""
    if name[:1] == ":" or name == "host":
        if name in (":authority", "host"):
            return e.authority or None
        if name == ":path":
            return e.path or None
        if name == ":method":
            return e.method or None
        if name == ":scheme":
            return ("https" if e.peer_uri_san or e.sni else "http") if e.http else None
        return None
    headers = e.request_headers
    return headers.get_first(name) if headers is not None else None


def response_header(e: LogEntry, name: str) -> str | None:
    headers = e.response_headers
    if headers is None:
        return None
    if name == ":status":
        return str(e.status) if e.status else None
    for k, v in headers:
        if k == name:
            return v
    return None


def _header_operator(response: bool, main: str, alt: str | None, max_len: int | None) -> Operator:
    lookup = response_header if response else request_header

    def op(e: LogEntry) -> Value:
        value = lookup(e, main)
        if not value and alt is not None:
            value = lookup(e, alt)
        if not value:
            return None
        return value if max_len is None else value[:max_len]

    return op


_FRACTION = re.compile(r"%([1-9]?)f")


def _start_time_operator(fmt: str) -> Operator:
    """START_TIME: Envoy's strftime plus %f / %Nf. strftime costs microseconds, so what
    depends on the whole second is rendered once per second; only the fraction is per line
    (when the format has a single fraction and nothing else below the second)."""
    fmt = fmt or DEFAULT_START_TIME_FORMAT
    render = compile_time_format(fmt)
    fractions = list(_FRACTION.finditer(fmt))
    if len(fractions) != 1 or "%%" in fmt or re.search("%E[1-9]S", fmt):
        return lambda e: render(e.start_time)
    m = fractions[0]
    digits = int(m.group(1) or 9)
    head = compile_time_format(fmt[: m.start()])
    tail = compile_time_format(fmt[m.end() :])
    scale = 10 ** (6 - digits) if digits <= 6 else 1
    second = [-1]
    texts = ["", ""]  # what head and tail render for that second

    def start_time(e: LogEntry) -> Value:
        t = e.start_time
        whole = int(t)
        if whole != second[0]:
            second[0] = whole
            texts[0] = head(whole)
            texts[1] = tail(whole)
        micros = min(int((t - whole) * 1_000_000 + 0.5), 999_999)
        if digits <= 6:
            return f"{texts[0]}{micros // scale:0{digits}d}{texts[1]}"
        return f"{texts[0]}{micros:06d}{'0' * (digits - 6)}{texts[1]}"

    return start_time


# ---------------------------------------------------------------------------------------------
# Compilation

_COMMAND = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::([0-9]+))?%")


def _compile_command(name: str, arg: str | None, length: str | None) -> Operator:
    if name in ("REQ", "RESP"):
        if not arg:
            raise FormatError(f"%{name}(...)% requires a header name")
        names = arg.split("?")
        if len(names) > 2:
            raise FormatError(f"more than 1 alternative header specified in token: {arg}")
        max_len = int(length) if length is not None else None
        alt = names[1].lower() if len(names) == 2 else None
        return _header_operator(name == "RESP", names[0].lower(), alt, max_len)
    if name == "START_TIME":
        if length is not None:
            raise FormatError("%START_TIME% does not allow a length")
        return _start_time_operator(arg or "")
    simple = _SIMPLE.get(name)
    if simple is None:
        raise FormatError(
            f"command %{name}% is not supported by ubimesh; supported: "
            + ", ".join(SUPPORTED_COMMANDS)
        )
    if arg is not None or length is not None:
        raise FormatError(f"%{name}% does not take any parameters or length")
    return simple


def parse_format(text: str) -> list[str | Operator]:
    """``text`` as literal strings and operators; raises :class:`FormatError`."""
    parts: list[str | Operator] = []
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
            raise FormatError(
                f"incorrect format {text!r}: no valid command at position {j} "
                "(commands are %NAME%, %NAME(arg)% or %NAME(arg):LENGTH%; %% is a literal %)"
            )
        op = _compile_command(m.group(1), m.group(2), m.group(3))
        if literal:
            joined = "".join(literal)
            if joined:
                parts.append(joined)
            literal.clear()
        parts.append(op)
        i = m.end()
    joined = "".join(literal)
    if joined:
        parts.append(joined)
    return parts


#: Envoy's default access log format (when an access log names none).
DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

Formatter = Callable[[LogEntry], str]
"""A compiled format: the whole log line (text formats carry their own newline)."""


def compile_text(text: str, omit_empty_values: bool = False) -> Formatter:
    """A text format string. Values not available print "-" ("" with omit_empty_values)."""
    parts = parse_format(text)
    empty = "" if omit_empty_values else "-"
    if len(parts) == 1 and isinstance(parts[0], str):
        constant = parts[0]
        return lambda e: constant

    def render(e: LogEntry) -> str:
        # One loop, no call per value beyond the operator's own: this runs once per request.
        out: list[str] = []
        for p in parts:
            if isinstance(p, str):
                out.append(p)
                continue
            v = p(e)
            if v is None or v == "":
                out.append(empty)
            elif isinstance(v, str):
                out.append(v)
            else:
                out.append(str(v))
        return "".join(out)

    return render


# JSON: each key of the (sorted) json_format becomes a node: a constant, one typed operator,
# a string mixing text and operators, or a nested object.
_Node = Callable[[LogEntry], Any]
_MISSING = object()


def _json_node(value: Any, where: str, omit: bool) -> _Node:
    if isinstance(value, dict):
        return _json_object(value, where, omit)
    if isinstance(value, str):
        parts = parse_format(value)
        if not parts:
            return lambda e: ""
        if len(parts) == 1:
            only = parts[0]
            if isinstance(only, str):
                return lambda e: only
            op = only

            def typed(e: LogEntry) -> Any:
                v = op(e)
                return _MISSING if v is None or v == "" else v

            return typed
        mixed = compile_text(value)
        return mixed
    if isinstance(value, bool | int | float) or value is None:
        return lambda e: value
    raise FormatError(
        f"json_format{where}: only strings, numbers, booleans and nested objects are supported"
    )


def _json_object(obj: dict[str, Any], where: str, omit: bool) -> _Node:
    nodes = [(k, _json_node(obj[k], f"{where}.{k}", omit)) for k in sorted(obj)]

    def render(e: LogEntry) -> Any:
        out: dict[str, Any] = {}
        for k, node in nodes:
            v = node(e)
            if v is _MISSING:
                if omit:
                    continue
                v = None
            out[k] = v
        return out

    return render


def compile_json(source: str | dict[str, Any], omit_empty_values: bool = False) -> Formatter:
    """A json_format object (a dict, or its JSON text): one JSON object per line, keys sorted
    as Envoy writes them."""
    obj = json.loads(source) if isinstance(source, str) else source
    if not isinstance(obj, dict):
        raise FormatError("json_format must be an object")
    node = _json_object(obj, "", omit_empty_values)
    # orjson (several times faster than json here; keys are already in sorted order). Loaded
    # only for a JSON format: it pulls in datetime, which the proxy otherwise never needs.
    import orjson

    dumps = orjson.dumps
    newline = orjson.OPT_APPEND_NEWLINE
    return lambda e: dumps(node(e), option=newline).decode()


def compile_format(
    text_format: str | None, json_format: str = "", omit_empty_values: bool = False
) -> Formatter:
    """The formatter of one access log: ``json_format`` (JSON text) when given, else
    ``text_format``, else Envoy's default format."""
    if json_format:
        return compile_json(json_format, omit_empty_values)
    return compile_text(DEFAULT_FORMAT if text_format is None else text_format, omit_empty_values)
