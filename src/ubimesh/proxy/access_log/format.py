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

Cost: this runs once per logged request, so a format is compiled into a flat list of
``_Op`` records (an integer kind plus its precomputed arguments) that one function walks; no
closure or call per operator beyond ``_value``. The request headers the format names are
found in one pass over the request's headers (``_request_values``), whatever their number;
``%START_TIME%`` renders what depends on the whole second once per second.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from typing import Any, Final

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.formatter import (
    DEFAULT_START_TIME_FORMAT,
    compile_time_format,
    scan_format,
)
from ubimesh.proxy.routing.formatter import (
    FormatError as FormatError,
)

Address = tuple[str, int]
Value = str | int | None


class LogEntry:
    """What an access log line can show, for one HTTP request or one TCP connection.

    Built once per logged request (``logger.http_entry``) or connection
    (``logger.connection_entry``), positionally (one call, no default-then-overwrite); every
    field defaults to its "not available" value, so a TCP entry leaves the HTTP fields alone.
    ``start_time`` is wall-clock epoch seconds.
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

    def __init__(
        self,
        http: bool = False,
        start_time: float = 0.0,
        duration_ms: int = 0,
        method: str = "",
        path: str = "",
        authority: str = "",
        protocol: str = "",
        request_headers: Headers | None = None,
        response_headers: list[tuple[str, str]] | None = None,
        status: int = 0,
        flags: str = "",
        details: str = "",
        termination_details: str = "",
        bytes_received: int = 0,
        bytes_sent: int = 0,
        upstream_host: str = "",
        upstream_cluster: str = "",
        route_name: str = "",
        downstream_remote: Address | None = None,
        downstream_local: Address | None = None,
        peer_uri_san: str = "",
        sni: str = "",
    ) -> None:
        self.http = http
        self.start_time = start_time
        self.duration_ms = duration_ms
        self.method = method
        self.path = path
        self.authority = authority
        self.protocol = protocol
        self.request_headers = request_headers
        self.response_headers = response_headers
        self.status = status
        self.flags = flags
        self.details = details
        self.termination_details = termination_details
        self.bytes_received = bytes_received
        self.bytes_sent = bytes_sent
        self.upstream_host = upstream_host
        self.upstream_cluster = upstream_cluster
        self.route_name = route_name
        self.downstream_remote = downstream_remote
        self.downstream_local = downstream_local
        self.peer_uri_san = peer_uri_san
        self.sni = sni


# ---------------------------------------------------------------------------------------------
# Operators: an operator is an _Op of one of these kinds (integers: mypyc compiles the
# dispatch on them to plain comparisons).

_K_HEADER: Final = 0  # %REQ(name)% of a header (not a pseudo-header): ``main``, its index
_K_REQ: Final = 1  # any other %REQ(main?alt):len%: ``main``/``alt`` are header sources
_K_STR: Final = 2  # a str field of the entry (``attr``); "" is not available
_K_INT: Final = 3  # an int field of the entry (``attr``), always available
_K_FLAGS: Final = 4  # RESPONSE_FLAGS: "-" for none, even with omit_empty_values (as Envoy)
_K_RESP: Final = 5  # %RESP(main?alt):len%: response header names (":status" from the code)
_K_START: Final = 6  # START_TIME (``time``)
_K_ADDRESS: Final = 7  # an address field (``attr``) as ip:port ([ip]:port for IPv6)
_K_IP: Final = 8  # its IP
_K_PORT: Final = 9  # its port (a number)
_K_CONST: Final = 10  # known when compiled (HOSTNAME): folded into the literal text

# Request header sources of %REQ(...)%: a header found by _request_values (its index), or a
# pseudo-header taken from the entry's request line.
_SRC_NONE: Final = -1  # an unknown pseudo-header: never available
_SRC_METHOD: Final = -2
_SRC_PATH: Final = -3
_SRC_AUTHORITY: Final = -4
_SRC_SCHEME: Final = -5

_PSEUDO = {
    ":authority": _SRC_AUTHORITY,
    "host": _SRC_AUTHORITY,  # Envoy's header map keeps Host as :authority
    ":path": _SRC_PATH,
    ":method": _SRC_METHOD,
    ":scheme": _SRC_SCHEME,
}


#: The pseudo-headers that are one str field of the entry ("" when not available).
_PSEUDO_FIELDS = {_SRC_METHOD: "method", _SRC_PATH: "path", _SRC_AUTHORITY: "authority"}


class _StartTime:
    """START_TIME in one format: Envoy's strftime plus %f / %Nf. strftime costs microseconds,
    so what depends on the whole second is rendered once per second (``second``, ``head``,
    ``tail``); only the fraction is per line, when the format has a single fraction and
    nothing else below the second (else ``render`` does the whole format every time)."""

    __slots__ = ("digits", "head", "render", "render_head", "render_tail", "scale", "second",
                 "split", "tail")  # fmt: skip

    def __init__(self, fmt: str) -> None:
        fmt = fmt or DEFAULT_START_TIME_FORMAT
        self.render = compile_time_format(fmt)
        fractions = list(re.finditer(r"%([1-9]?)f", fmt))
        self.split = len(fractions) == 1 and "%%" not in fmt and not re.search("%E[1-9]S", fmt)
        self.digits = 0
        self.scale = 1
        self.render_head = self.render_tail = self.render
        if self.split:
            m = fractions[0]
            self.digits = int(m.group(1) or 9)
            self.scale = 10 ** (6 - self.digits) if self.digits <= 6 else 1
            self.render_head = compile_time_format(fmt[: m.start()])
            self.render_tail = compile_time_format(fmt[m.end() :])
        self.second = -1
        self.head = ""
        self.tail = ""

    def text(self, t: float) -> str:
        if not self.split:
            return self.render(t)
        whole = int(t)
        if whole != self.second:
            # A new second: the cache is keyed by it, so it can never show a stale second.
            self.head = self.render_head(whole)
            self.tail = self.render_tail(whole)
            self.second = whole
        micros = min(int((t - whole) * 1_000_000 + 0.5), 999_999)
        digits = self.digits
        if digits == 3:
            fraction = _THREE_DIGITS[micros // 1000]
        elif digits <= 6:
            fraction = str(micros // self.scale).zfill(digits)
        else:
            fraction = str(micros).zfill(6) + "0" * (digits - 6)
        return self.head + fraction + self.tail


#: "000" .. "999": the milliseconds of Envoy's default START_TIME, without formatting a number.
_THREE_DIGITS = [f"{i:03d}" for i in range(1000)]


class _Op:
    """One compiled command of a format (see the ``_K_*`` kinds for which fields it uses).
    In a text format, ``text`` is the literal text before the command. Ops belong to one
    compiled format and are used on the event loop only (``addr`` is a cache)."""

    __slots__ = ("addr", "addr_text", "alt", "alt_name", "attr", "kind", "main", "main_name",
                 "max_len", "text", "time")  # fmt: skip

    def __init__(self, kind: int, attr: str = "", text: str = "") -> None:
        self.kind = kind
        self.attr = attr
        self.text = text
        self.main = _SRC_NONE
        self.alt = _SRC_NONE
        self.main_name = ""
        self.alt_name = ""
        self.max_len = -1
        self.time: _StartTime | None = None
        # _K_ADDRESS: the last address rendered and its text (keyed by value: comparing two
        # short tuples is much cheaper than formatting one, and a connection's requests, and
        # most connections of a listener, share their addresses or their local one).
        self.addr: Address | None = None
        self.addr_text = ""


def _address(addr: Address) -> str | None:
    if not addr[0]:
        return None
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _request_source(e: LogEntry, values: list[str | None] | None, source: int) -> str | None:
    if source >= 0:
        return values[source] if values is not None else None
    if source == _SRC_METHOD:
        return e.method or None
    if source == _SRC_PATH:
        return e.path or None
    if source == _SRC_AUTHORITY:
        return e.authority or None
    if source == _SRC_SCHEME:
        return ("https" if e.peer_uri_san or e.sni else "http") if e.http else None
    return None


def _response_header(e: LogEntry, name: str) -> str | None:
    headers = e.response_headers
    if headers is None:
        return None
    if name == ":status":
        return str(e.status) if e.status else None
    for k, v in headers:
        if k == name:
            return v
    return None


def _value(op: _Op, e: LogEntry, values: list[str | None] | None) -> Value:
    """The value of a command for an entry; None (or "") when not available. ``values``: the
    request headers the format names (``_request_values``)."""
    kind = op.kind
    if kind == _K_HEADER:
        if values is None:
            return None
        return values[op.main] or None
    if kind == _K_REQ:
        v = _request_source(e, values, op.main)
        if not v and op.alt != _SRC_NONE:
            v = _request_source(e, values, op.alt)
        if not v:
            return None
        return v if op.max_len < 0 else v[: op.max_len]
    if kind == _K_STR:
        s: str = getattr(e, op.attr)
        return s or None
    if kind == _K_INT:
        n: int = getattr(e, op.attr)
        return n
    if kind == _K_START:
        t = op.time
        assert t is not None
        return t.text(e.start_time)
    if kind == _K_FLAGS:
        return e.flags or "-"
    if kind == _K_RESP:
        r = _response_header(e, op.main_name)
        if not r and op.alt_name:
            r = _response_header(e, op.alt_name)
        if not r:
            return None
        return r if op.max_len < 0 else r[: op.max_len]
    addr: Address | None = getattr(e, op.attr)
    if kind == _K_ADDRESS:
        if addr is None:
            return None
        if addr != op.addr:
            op.addr_text = _address(addr) or ""
            op.addr = addr
        return op.addr_text or None
    if addr is None or not addr[0]:
        return None
    return addr[0] if kind == _K_IP else addr[1]


_HOSTNAME = socket.gethostname()

#: Commands without argument: their kind and the entry field they read.
_SIMPLE: dict[str, tuple[int, str]] = {
    "RESPONSE_CODE": (_K_INT, "status"),
    "RESPONSE_CODE_DETAILS": (_K_STR, "details"),
    "CONNECTION_TERMINATION_DETAILS": (_K_STR, "termination_details"),
    "RESPONSE_FLAGS": (_K_FLAGS, ""),
    "DURATION": (_K_INT, "duration_ms"),
    "BYTES_RECEIVED": (_K_INT, "bytes_received"),
    "BYTES_SENT": (_K_INT, "bytes_sent"),
    "PROTOCOL": (_K_STR, "protocol"),
    "UPSTREAM_HOST": (_K_STR, "upstream_host"),
    "UPSTREAM_CLUSTER": (_K_STR, "upstream_cluster"),
    "ROUTE_NAME": (_K_STR, "route_name"),
    "DOWNSTREAM_REMOTE_ADDRESS": (_K_ADDRESS, "downstream_remote"),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": (_K_IP, "downstream_remote"),
    "DOWNSTREAM_REMOTE_PORT": (_K_PORT, "downstream_remote"),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": (_K_ADDRESS, "downstream_remote"),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": (_K_IP, "downstream_remote"),
    "DOWNSTREAM_DIRECT_REMOTE_PORT": (_K_PORT, "downstream_remote"),
    "DOWNSTREAM_LOCAL_ADDRESS": (_K_ADDRESS, "downstream_local"),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": (_K_IP, "downstream_local"),
    "DOWNSTREAM_LOCAL_PORT": (_K_PORT, "downstream_local"),
    "DOWNSTREAM_PEER_URI_SAN": (_K_STR, "peer_uri_san"),
    "REQUESTED_SERVER_NAME": (_K_STR, "sni"),
    "HOSTNAME": (_K_CONST, ""),
}

#: Every command name ubimesh implements (for messages and docs).
SUPPORTED_COMMANDS = tuple(sorted([*_SIMPLE, "REQ", "RESP", "START_TIME"]))


# ---------------------------------------------------------------------------------------------
# Compilation


class _RequestHeaders:
    """The (lower-case, non-pseudo) request header names one format reads, each with its index
    in the list ``_request_values`` returns; shared by every node of a JSON format."""

    __slots__ = ("index",)

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def source(self, name: str) -> int:
        pseudo = _PSEUDO.get(name)
        if pseudo is not None:
            return pseudo
        if name[:1] == ":":
            return _SRC_NONE
        found = self.index.get(name)
        if found is None:
            found = self.index[name] = len(self.index)
        return found


def _request_values(index: dict[str, int], e: LogEntry) -> list[str | None] | None:
    """The first value of each header in ``index`` (by its index; None when absent), in one
    pass over the request's headers. None for an entry without request headers (TCP)."""
    headers = e.request_headers
    if headers is None:
        return None
    values: list[str | None] = [None] * len(index)
    for k, v in headers.items:
        i = index.get(k)
        if i is not None and values[i] is None:
            values[i] = v
    return values


def _compile_command(
    name: str, arg: str | None, length: str | None, headers: _RequestHeaders
) -> _Op:
    if name in ("REQ", "RESP"):
        if not arg:
            raise FormatError(f"%{name}(...)% requires a header name")
        names = arg.split("?")
        if len(names) > 2:
            raise FormatError(f"more than 1 alternative header specified in token: {arg}")
        main = names[0].lower()
        alt = names[1].lower() if len(names) == 2 else None
        if name == "REQ":
            op = _Op(_K_REQ)
            op.main = headers.source(main)
            if alt is not None:
                # An unknown pseudo-header alternative stays _SRC_NONE: never available.
                op.alt = headers.source(alt)
            elif length is None:
                # The common cases, one step each: a header, or a request line field.
                if op.main >= 0:
                    op.kind = _K_HEADER
                elif op.main in _PSEUDO_FIELDS:
                    return _Op(_K_STR, _PSEUDO_FIELDS[op.main])
        else:
            op = _Op(_K_RESP)
            op.main_name = main
            op.alt_name = alt or ""
        op.max_len = int(length) if length is not None else -1
        return op
    if name == "START_TIME":
        if length is not None:
            raise FormatError("%START_TIME% does not allow a length")
        op = _Op(_K_START)
        op.time = _StartTime(arg or "")
        return op
    simple = _SIMPLE.get(name)
    if simple is None:
        raise FormatError(
            f"command %{name}% is not supported by ubimesh; supported: "
            + ", ".join(SUPPORTED_COMMANDS)
        )
    if arg is not None or length is not None:
        raise FormatError(f"%{name}% does not take any parameters or length")
    kind, attr = simple
    return _Op(kind, attr, _HOSTNAME if kind == _K_CONST else "")


def _parse(text: str, headers: _RequestHeaders) -> tuple[list[_Op], str]:
    """``text`` as its commands, each with the literal text before it, and the literal text
    after the last one; raises :class:`FormatError`."""
    pairs, tail = scan_format(
        text,
        lambda j: (
            f"incorrect format {text!r}: no valid command at position {j} "
            "(commands are %NAME%, %NAME(arg)% or %NAME(arg):LENGTH%; %% is a literal %)"
        ),
    )
    ops: list[_Op] = []
    literal: list[str] = []
    for before, m in pairs:
        literal.append(before)
        op = _compile_command(m.group(1), m.group(2), m.group(3), headers)
        if op.kind == _K_CONST:
            # Known now (HOSTNAME): part of the literal text, in a text line.
            literal.append(op.text)
        else:
            op.text = "".join(literal)
            literal.clear()
            ops.append(op)
    literal.append(tail)
    return ops, "".join(literal)


def _render_text(
    ops: list[_Op], tail: str, e: LogEntry, values: list[str | None] | None, empty: str
) -> str:
    # The most common kinds inline (this runs once per request); the others via _value.
    out: list[str] = []
    for op in ops:
        out.append(op.text)
        kind = op.kind
        if kind == _K_STR:
            s: str = getattr(e, op.attr)
            out.append(s or empty)
        elif kind == _K_INT:
            n: int = getattr(e, op.attr)
            out.append(str(n))
        elif kind == _K_HEADER:
            h = values[op.main] if values is not None else None
            out.append(h or empty)
        else:
            v = _value(op, e, values)
            if v is None or v == "":
                out.append(empty)
            elif isinstance(v, str):
                out.append(v)
            else:
                out.append(str(v))
    out.append(tail)
    return "".join(out)


#: Envoy's default access log format (when an access log names none).
DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

Formatter = Callable[[LogEntry], str]
"""A compiled format: the whole log line (text formats carry their own newline)."""


class LogFormat:
    """A compiled format: ``render`` makes the whole log line of an entry (text formats carry
    their own newline). The access log calls ``render`` directly (a native method call under
    the compiled build, where calling a ``Formatter`` goes through Python's call protocol)."""

    __slots__ = ()

    def render(self, e: LogEntry) -> str:
        raise NotImplementedError


class _TextFormat(LogFormat):
    __slots__ = ("empty", "index", "ops", "tail")

    def __init__(self, text: str, omit_empty_values: bool) -> None:
        headers = _RequestHeaders()
        self.ops, self.tail = _parse(text, headers)
        self.index = headers.index
        self.empty = "" if omit_empty_values else "-"

    def render(self, e: LogEntry) -> str:
        values = _request_values(self.index, e) if self.index else None
        return _render_text(self.ops, self.tail, e, values, self.empty)


def compile_text(text: str, omit_empty_values: bool = False) -> Formatter:
    """A text format string. Values not available print "-" ("" with omit_empty_values)."""
    return _TextFormat(text, omit_empty_values).render


# JSON: each key of the (sorted) json_format becomes a node: a constant, one typed operator,
# a string mixing text and operators, or a nested object.
_N_CONST: Final = 0
_N_TYPED: Final = 1
_N_MIXED: Final = 2
_N_OBJECT: Final = 3


class _JsonNode:
    __slots__ = ("const", "key", "kind", "object", "op", "ops", "tail")

    def __init__(self, key: str, kind: int) -> None:
        self.key = key
        self.kind = kind
        self.const: Any = None
        self.op: _Op | None = None
        self.ops: list[_Op] = []
        self.tail = ""
        self.object: list[_JsonNode] = []


def _json_node(key: str, value: Any, where: str, headers: _RequestHeaders) -> _JsonNode:
    if isinstance(value, dict):
        node = _JsonNode(key, _N_OBJECT)
        node.object = _json_object(value, where, headers)
        return node
    if isinstance(value, str):
        ops, tail = _parse(value, headers)
        if not ops:
            node = _JsonNode(key, _N_CONST)
            node.const = tail
        elif len(ops) == 1 and not ops[0].text and not tail:
            node = _JsonNode(key, _N_TYPED)
            node.op = ops[0]
        else:
            node = _JsonNode(key, _N_MIXED)
            node.ops = ops  # a string: missing values print "-", as in a text line
            node.tail = tail
        return node
    if isinstance(value, bool | int | float) or value is None:
        node = _JsonNode(key, _N_CONST)
        node.const = value
        return node
    raise FormatError(
        f"json_format{where}: only strings, numbers, booleans and nested objects are supported"
    )


def _json_object(obj: dict[str, Any], where: str, headers: _RequestHeaders) -> list[_JsonNode]:
    return [_json_node(k, obj[k], f"{where}.{k}", headers) for k in sorted(obj)]


def _render_object(
    nodes: list[_JsonNode], e: LogEntry, values: list[str | None] | None, omit: bool
) -> dict[str, Any]:
    # The most common kinds inline, as in _render_text.
    out: dict[str, Any] = {}
    v: Any
    for node in nodes:
        kind = node.kind
        if kind == _N_TYPED:
            op = node.op
            assert op is not None
            k = op.kind
            if k == _K_STR:
                v = getattr(e, op.attr)
            elif k == _K_INT:
                out[node.key] = getattr(e, op.attr)
                continue
            elif k == _K_HEADER:
                v = values[op.main] if values is not None else None
            else:
                v = _value(op, e, values)
            if v is None or v == "":
                if omit:
                    continue
                v = None
        elif kind == _N_CONST:
            v = node.const
        elif kind == _N_MIXED:
            v = _render_text(node.ops, node.tail, e, values, "-")
        else:
            v = _render_object(node.object, e, values, omit)
        out[node.key] = v
    return out


class _JsonFormat(LogFormat):
    __slots__ = ("dumps", "index", "nodes", "omit", "option")

    def __init__(self, obj: dict[str, Any], omit_empty_values: bool) -> None:
        headers = _RequestHeaders()
        self.nodes = _json_object(obj, "", headers)
        self.index = headers.index
        self.omit = omit_empty_values
        # orjson (several times faster than json here; keys are already in sorted order).
        # Loaded only for a JSON format: it pulls in datetime, which the proxy otherwise
        # never needs.
        import orjson

        self.dumps: Callable[..., bytes] = orjson.dumps
        self.option: int = orjson.OPT_APPEND_NEWLINE

    def render(self, e: LogEntry) -> str:
        values = _request_values(self.index, e) if self.index else None
        obj = _render_object(self.nodes, e, values, self.omit)
        return self.dumps(obj, option=self.option).decode()


def compile_json(source: str | dict[str, Any], omit_empty_values: bool = False) -> Formatter:
    """A json_format object (a dict, or its JSON text): one JSON object per line, keys sorted
    as Envoy writes them."""
    obj = json.loads(source) if isinstance(source, str) else source
    if not isinstance(obj, dict):
        raise FormatError("json_format must be an object")
    return _JsonFormat(obj, omit_empty_values).render


def compile_log_format(
    text_format: str | None, json_format: str = "", omit_empty_values: bool = False
) -> LogFormat:
    """The format of one access log: ``json_format`` (JSON text) when given, else
    ``text_format``, else Envoy's default format."""
    if json_format:
        obj = json.loads(json_format)
        if not isinstance(obj, dict):
            raise FormatError("json_format must be an object")
        return _JsonFormat(obj, omit_empty_values)
    text = DEFAULT_FORMAT if text_format is None else text_format
    return _TextFormat(text, omit_empty_values)


def compile_format(
    text_format: str | None, json_format: str = "", omit_empty_values: bool = False
) -> Formatter:
    """``compile_log_format`` as a function of the entry."""
    return compile_log_format(text_format, json_format, omit_empty_values).render
