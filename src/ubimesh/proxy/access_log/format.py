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
closure per operator, only native calls to small typed helpers. Entry fields are read by
number (``_F_*``: native slot reads), not by name (``getattr`` is a generic lookup). A header
command scans the request's headers (``Headers.get_first``): a format names a few headers,
and comparing lower-case names (by length first) is cheaper than hashing every header name of
the request into a dict, or than one pass matching every name the format wants (measured,
compiled: about 170 instructions a header for such a pass, about 60 in ``get_first``).
``%START_TIME%`` renders what depends on the whole second once per second.

A text format without address commands is also compiled for the C renderer
(``_textline.c``, built by ``ubimesh build-native``; ``c_program``), which writes the whole line
in one call; it declines a line with a value beyond latin-1, and this module's renderer,
the source of truth that a test compares it with, does that line. Without the build:
A text line is appended as pieces to a list the sink joins once per batch of lines
(``LogFormat.render_into``); each piece costs its append and its share of the join, so a
command's value goes in with its literal text as one piece when it can, and consecutive
commands whose values are the previous line's as one piece made on an earlier line
(``_render_text_into``).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ubimesh.proto.headers import Headers
from ubimesh.proxy.http.codec import int_text
from ubimesh.proxy.routing.formatter import (
    DEFAULT_START_TIME_FORMAT,
    compile_time_format,
    scan_format,
)
from ubimesh.proxy.routing.formatter import (
    FormatError as FormatError,
)

if TYPE_CHECKING:
    from ubimesh.proxy.network.http_manager import HttpConnection

Address = tuple[str, int]
Value = str | int | None


class LogEntry:
    """What an access log line can show, for one HTTP request or one TCP connection.

    Built once per logged request (``logger.http_entry``) or connection
    (``logger.connection_entry``), positionally (one call, no default-then-overwrite); every
    field defaults to its "not available" value, so a TCP entry leaves the HTTP fields alone.
    ``start_time`` is wall-clock epoch seconds. An HTTP entry names its downstream
    ``connection`` and leaves ``downstream_remote``/``downstream_local`` None: the addresses
    are read off the connection only by a format that shows them (compiled, reading a
    connection's address makes a new tuple and port int, a few hundred instructions).
    """

    __slots__ = (
        "authority",
        "bytes_received",
        "bytes_sent",
        "connection",
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
        connection: HttpConnection | None = None,
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
        self.connection = connection


# ---------------------------------------------------------------------------------------------
# Operators: an operator is an _Op of one of these kinds (integers: mypyc compiles the
# dispatch on them to plain comparisons).

_K_HEADER: Final = 0  # %REQ(name)% of a header (not a pseudo-header), named ``main_name``
_K_REQ: Final = 1  # any other %REQ(main?alt):len%: ``main``/``alt`` are header sources
_K_STR: Final = 2  # a str field of the entry (``field``, a _F_* str field); "" is not available
_K_INT: Final = 3  # an int field of the entry (``field``, a _F_* int field), always available
_K_FLAGS: Final = 4  # RESPONSE_FLAGS: "-" for none, even with omit_empty_values (as Envoy)
_K_RESP: Final = 5  # %RESP(main?alt):len%: response header names (":status" from the code)
_K_START: Final = 6  # START_TIME (``time``)
_K_ADDRESS: Final = 7  # an address field (``field``) as ip:port ([ip]:port for IPv6)
_K_IP: Final = 8  # its IP
_K_PORT: Final = 9  # its port (a number)
_K_CONST: Final = 10  # known when compiled (HOSTNAME): folded into the literal text

# Request header sources of %REQ(...)%: a header (named by the op's ``main_name`` or
# ``alt_name``), or a pseudo-header taken from the entry's request line.
_SRC_HEADER: Final = 0
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


# Entry fields, by number: ``_str_field``/``_int_field``/``_address_field`` read them with an
# if-chain that mypyc compiles to native slot reads (``getattr(e, name)`` went through the
# generic attribute lookup: a type MRO walk and a dict probe by name, about 200 instructions a
# field, a tenth of a line's cost).
_F_METHOD: Final = 0
_F_PATH: Final = 1
_F_AUTHORITY: Final = 2
_F_PROTOCOL: Final = 3
_F_UPSTREAM_HOST: Final = 4
_F_DETAILS: Final = 5
_F_TERMINATION_DETAILS: Final = 6
_F_UPSTREAM_CLUSTER: Final = 7
_F_ROUTE_NAME: Final = 8
_F_PEER_URI_SAN: Final = 9
_F_SNI: Final = 10
# int fields
_F_STATUS: Final = 0
_F_DURATION: Final = 1
_F_BYTES_RECEIVED: Final = 2
_F_BYTES_SENT: Final = 3
# address fields
_F_REMOTE: Final = 0
_F_LOCAL: Final = 1

#: The pseudo-headers that are one str field of the entry ("" when not available).
_PSEUDO_FIELDS = {_SRC_METHOD: _F_METHOD, _SRC_PATH: _F_PATH, _SRC_AUTHORITY: _F_AUTHORITY}


def _str_field(e: LogEntry, field: int) -> str:
    # The fields of Envoy's default format first.
    if field == _F_METHOD:
        return e.method
    if field == _F_PATH:
        return e.path
    if field == _F_AUTHORITY:
        return e.authority
    if field == _F_PROTOCOL:
        return e.protocol
    if field == _F_UPSTREAM_HOST:
        return e.upstream_host
    if field == _F_DETAILS:
        return e.details
    if field == _F_TERMINATION_DETAILS:
        return e.termination_details
    if field == _F_UPSTREAM_CLUSTER:
        return e.upstream_cluster
    if field == _F_ROUTE_NAME:
        return e.route_name
    if field == _F_PEER_URI_SAN:
        return e.peer_uri_san
    return e.sni


def _int_field(e: LogEntry, field: int) -> int:
    if field == _F_STATUS:
        return e.status
    if field == _F_DURATION:
        return e.duration_ms
    if field == _F_BYTES_RECEIVED:
        return e.bytes_received
    return e.bytes_sent


def _address_field(e: LogEntry, field: int) -> Address | None:
    conn = e.connection
    if conn is not None:  # an HTTP entry (see LogEntry)
        return conn.remote if field == _F_REMOTE else conn.local
    return e.downstream_remote if field == _F_REMOTE else e.downstream_local


_strftime: Final = time.strftime
_gmtime: Final = time.gmtime


def _whole_second_format(fmt: str) -> Callable[[float], str]:
    """``compile_time_format(fmt)`` for a part of a split START_TIME format (no fraction, no
    ``%%``), made cheaper where it can be: it runs once per second, about 8,000 instructions
    of interpreted Python, which the few requests of a quiet second all share. Text without a
    directive (Envoy's default tail, ``Z``) is a constant; plain strftime directives are one
    ``time.strftime`` call; Envoy's own ``%s`` / ``%Es`` / ``%E<n>S`` keep the general
    renderer."""
    if "%" not in fmt:
        return lambda t: fmt
    if re.search("%(E?s|E[0-9]S)", fmt):
        return compile_time_format(fmt)
    return lambda t: _strftime(fmt, _gmtime(int(t)))


class _StartTime:
    """START_TIME in one format: Envoy's strftime plus %f / %Nf. strftime costs microseconds,
    so what depends on the whole second is rendered once per second (``second``, ``head``,
    ``tail``); only the fraction is per line, when the format has a single fraction and
    nothing else below the second (else ``render`` does the whole format every time)."""

    __slots__ = ("const_tail", "digits", "fraction_tails", "head", "head_piece", "prefix", "render",
                 "render_head", "render_tail", "scale", "second", "split", "suffix", "tail",
                 "tail_piece")  # fmt: skip

    def __init__(self, fmt: str) -> None:
        fmt = fmt or DEFAULT_START_TIME_FORMAT
        self.render = compile_time_format(fmt)
        fractions = list(re.finditer(r"%([1-9]?)f", fmt))
        self.split = len(fractions) == 1 and "%%" not in fmt and not re.search("%E[1-9]S", fmt)
        self.digits = 0
        self.scale = 1
        self.render_head = self.render_tail = self.render
        self.const_tail: str | None = None
        if self.split:
            m = fractions[0]
            self.digits = int(m.group(1) or 9)
            self.scale = 10 ** (6 - self.digits) if self.digits <= 6 else 1
            self.render_head = _whole_second_format(fmt[: m.start()])
            self.render_tail = _whole_second_format(fmt[m.end() :])
            tail = fmt[m.end() :]
            if self.digits == 3 and "%" not in tail:
                self.const_tail = tail
        self.second = -1
        self.head = ""
        self.tail = ""
        # In a text line: the literal text before and after the time (``set_literals``), and
        # the head and tail of the current second with them, so a line's time is 3 pieces;
        # 2 with milliseconds and a tail that is the same every second (``const_tail``:
        # Envoy's default, "Z"): ``fraction_tails`` is the milliseconds with the tail and the
        # suffix, by millisecond (made once: 1,000 short strings, about 60 KB).
        self.prefix = ""
        self.suffix = ""
        self.head_piece = ""
        self.tail_piece = ""
        self.fraction_tails: list[str] = []

    def set_literals(self, prefix: str, suffix: str) -> None:
        self.prefix = prefix
        self.suffix = suffix
        self.second = -1  # the pieces are made again with the next second
        tail = self.const_tail
        self.fraction_tails = [] if tail is None else [d + tail + suffix for d in _THREE_DIGITS]

    def text(self, t: float) -> str:
        if not self.split:
            return self.render(t)
        fraction = self._digits(self._micros(t))
        return self.head + fraction + self.tail

    def append_to(self, out: list[str], t: float) -> None:
        """Append ``prefix + text(t) + suffix`` to ``out`` as pieces (``out`` is joined later:
        no concatenation per line)."""
        if not self.split:
            out.append(f"{self.prefix}{self.render(t)}{self.suffix}")
            return
        micros = self._micros(t)
        out.append(self.head_piece)
        fraction_tails = self.fraction_tails
        if fraction_tails:
            out.append(fraction_tails[micros // 1000])
        else:
            out.append(self._digits(micros))
            out.append(self.tail_piece)

    def _micros(self, t: float) -> int:
        """The microseconds of ``t`` (a split format), after ``head`` and ``tail`` are made
        those of its second."""
        whole = int(t)
        if whole != self.second:
            # A new second: the cache is keyed by it, so it can never show a stale second.
            self.head = self.render_head(whole)
            self.tail = self.render_tail(whole)
            self.head_piece = self.prefix + self.head
            self.tail_piece = self.tail + self.suffix
            self.second = whole
        micros = int((t - whole) * 1_000_000 + 0.5)
        if micros > 999_999:  # not min(): under mypyc that boxes both ints for a generic call
            micros = 999_999
        return micros

    def _digits(self, micros: int) -> str:
        """The fraction digits of ``micros``."""
        digits = self.digits
        if digits == 3:
            return _THREE_DIGITS[micros // 1000]
        if digits <= 6:
            return str(micros // self.scale).zfill(digits)
        return str(micros).zfill(6) + "0" * (digits - 6)


#: "000" .. "999": the milliseconds of Envoy's default START_TIME, without formatting a number.
_THREE_DIGITS: Final = [f"{i:03d}" for i in range(1000)]


class _Op:
    """One compiled command of a format (see the ``_K_*`` kinds for which fields it uses).
    In a text format, ``text`` is the literal text before the command and ``suffix`` the
    literal text after it when it is the line's last command. Ops belong to one compiled
    format and are used on the event loop only (``addr``, ``last``, ``piece`` and
    ``run_piece`` are caches)."""

    __slots__ = ("addr", "addr_text", "alt", "alt_name", "field", "kind", "last", "last_int",
                 "main", "main_name", "max_len", "missing", "piece", "run_piece", "run_start",
                 "suffix", "text", "time")  # fmt: skip

    def __init__(self, kind: int, field: int = 0, text: str = "") -> None:
        self.kind = kind
        self.field = field
        self.text = text
        self.suffix = ""
        self.missing = ""
        """In a text format: ``text``, what a value that is not available prints, ``suffix``."""
        # The last value rendered in a text line (``last``, or ``last_int`` for a number) and,
        # once a value has come twice in a row, its piece ``text + value + suffix`` (else
        # ""): consecutive lines mostly repeat a value (the method, protocol, status, host,
        # user agent, upstream host), and one piece instead of two (or three) saves an
        # append and a share of the join. Made on every change, the piece would cost more
        # than it saves for a value that always changes (a request id): a concatenation is
        # an allocation, about 400 instructions, a piece about 100.
        self.last = ""
        self.last_int = -1
        self.piece = ""
        # And the run of hits (see _render_text_into) this command continued on the previous
        # line: the number of the command that started it (-1: none) and, once a line has
        # had that run too, the piece of the whole run up to this command (else "").
        self.run_start = -1
        self.run_piece = ""
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

    def set_literals(self, text: str, missing: str, suffix: str) -> None:
        """Set the literal text around the command (``missing``: what a value that is not
        available prints) and reset the caches made with the old."""
        self.text = text
        self.suffix = suffix
        self.missing = text + missing + suffix
        self.last = ""
        self.last_int = -1
        self.piece = ""
        self.run_start = -1
        self.run_piece = ""
        if self.time is not None:
            self.time.set_literals(text, suffix)


def _address(addr: Address) -> str | None:
    if not addr[0]:
        return None
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _request_header(e: LogEntry, name: str) -> str:
    """The first value of request header ``name``; "" when absent (or a TCP entry)."""
    headers = e.request_headers
    if headers is None:
        return ""
    return headers.get_first(name) or ""


def _request_source(e: LogEntry, source: int, name: str) -> str | None:
    if source == _SRC_HEADER:
        return _request_header(e, name) or None
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


def _request_text(op: _Op, e: LogEntry) -> str:
    """A _K_REQ command's value, "" when not available (a str, not a ``Value``: the text
    renderer appends it with no boxing or generic comparison)."""
    v = _request_source(e, op.main, op.main_name)
    if not v and op.alt != _SRC_NONE:
        v = _request_source(e, op.alt, op.alt_name)
    if not v:
        return ""
    return v if op.max_len < 0 else v[: op.max_len]


def _response_text(op: _Op, e: LogEntry) -> str:
    """A _K_RESP command's value, "" when not available."""
    r = _response_header(e, op.main_name)
    if not r and op.alt_name:
        r = _response_header(e, op.alt_name)
    if not r:
        return ""
    return r if op.max_len < 0 else r[: op.max_len]


def _value(op: _Op, e: LogEntry) -> Value:
    """The value of a command for an entry; None (or "") when not available."""
    kind = op.kind
    if kind == _K_HEADER:
        return _request_header(e, op.main_name) or None
    if kind == _K_REQ:
        return _request_text(op, e) or None
    if kind == _K_STR:
        return _str_field(e, op.field) or None
    if kind == _K_INT:
        return _int_field(e, op.field)
    if kind == _K_START:
        t = op.time
        assert t is not None
        return t.text(e.start_time)
    if kind == _K_FLAGS:
        return e.flags or "-"
    if kind == _K_RESP:
        return _response_text(op, e) or None
    addr = _address_field(e, op.field)
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

#: Commands without argument: their kind and the entry field they read (a _F_* number).
_SIMPLE: dict[str, tuple[int, int]] = {
    "RESPONSE_CODE": (_K_INT, _F_STATUS),
    "RESPONSE_CODE_DETAILS": (_K_STR, _F_DETAILS),
    "CONNECTION_TERMINATION_DETAILS": (_K_STR, _F_TERMINATION_DETAILS),
    "RESPONSE_FLAGS": (_K_FLAGS, 0),
    "DURATION": (_K_INT, _F_DURATION),
    "BYTES_RECEIVED": (_K_INT, _F_BYTES_RECEIVED),
    "BYTES_SENT": (_K_INT, _F_BYTES_SENT),
    "PROTOCOL": (_K_STR, _F_PROTOCOL),
    "UPSTREAM_HOST": (_K_STR, _F_UPSTREAM_HOST),
    "UPSTREAM_CLUSTER": (_K_STR, _F_UPSTREAM_CLUSTER),
    "ROUTE_NAME": (_K_STR, _F_ROUTE_NAME),
    "DOWNSTREAM_REMOTE_ADDRESS": (_K_ADDRESS, _F_REMOTE),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": (_K_IP, _F_REMOTE),
    "DOWNSTREAM_REMOTE_PORT": (_K_PORT, _F_REMOTE),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": (_K_ADDRESS, _F_REMOTE),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": (_K_IP, _F_REMOTE),
    "DOWNSTREAM_DIRECT_REMOTE_PORT": (_K_PORT, _F_REMOTE),
    "DOWNSTREAM_LOCAL_ADDRESS": (_K_ADDRESS, _F_LOCAL),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": (_K_IP, _F_LOCAL),
    "DOWNSTREAM_LOCAL_PORT": (_K_PORT, _F_LOCAL),
    "DOWNSTREAM_PEER_URI_SAN": (_K_STR, _F_PEER_URI_SAN),
    "REQUESTED_SERVER_NAME": (_K_STR, _F_SNI),
    "HOSTNAME": (_K_CONST, 0),
}

#: Every command name ubimesh implements (for messages and docs).
SUPPORTED_COMMANDS = tuple(sorted([*_SIMPLE, "REQ", "RESP", "START_TIME"]))


# ---------------------------------------------------------------------------------------------
# Compilation


def _source(name: str) -> int:
    """The %REQ(...)% source of a lower-case header name."""
    pseudo = _PSEUDO.get(name)
    if pseudo is not None:
        return pseudo
    if name[:1] == ":":
        return _SRC_NONE
    return _SRC_HEADER


def _compile_command(name: str, arg: str | None, length: str | None) -> _Op:
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
            op.main = _source(main)
            op.main_name = main
            if alt is not None:
                # An unknown pseudo-header alternative stays _SRC_NONE: never available.
                op.alt = _source(alt)
                op.alt_name = alt
            elif length is None:
                # The common cases, one step each: a header, or a request line field.
                if op.main == _SRC_HEADER:
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
    kind, field = simple
    return _Op(kind, field, _HOSTNAME if kind == _K_CONST else "")


def _missing_mark(op: _Op, empty: str) -> str:
    # RESPONSE_FLAGS prints "-" for none, even with omit_empty_values (as Envoy).
    return "-" if op.kind == _K_FLAGS else empty


def _parse(text: str, empty: str) -> tuple[list[_Op], str]:
    """``text`` as its commands, each with the literal text before it, and the literal text
    after the last one; raises :class:`FormatError`. ``empty``: what a value that is not
    available prints ("-", or "" with omit_empty_values)."""
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
        op = _compile_command(m.group(1), m.group(2), m.group(3))
        if op.kind == _K_CONST:
            # Known now (HOSTNAME): part of the literal text, in a text line.
            literal.append(op.text)
        else:
            op.set_literals("".join(literal), _missing_mark(op, empty), "")
            literal.clear()
            ops.append(op)
    literal.append(tail)
    return ops, "".join(literal)


def _render_text(ops: list[_Op], tail: str, e: LogEntry) -> str:
    out: list[str] = []
    _render_text_into(out, ops, tail, e)
    return "".join(out)


def _render_text_into(out: list[str], ops: list[_Op], tail: str, e: LogEntry) -> None:
    """Append the pieces of a text line to ``out`` (joined by the caller, a whole batch of
    lines at once: one join, not one per line). Each piece costs an append and a share of
    the join (about 100 instructions), so what repeats from one line to the next is
    appended in as few pieces as it can be:

    * a command whose value is the previous line's (a "hit") is one piece with its literal
      text, the one made for it (``_Op.piece``); a value that is not available too;
    * consecutive hits are one piece, the one the last command of the run made for it
      (``_Op.run_piece``); the run's piece so far is held in ``pending`` until the run
      ends.

    A piece is made only the second time in a row that it would be used (a value, or a run
    starting at the same command), so values that change every line (a request id) cost
    no concatenation: one costs an allocation, about 400 instructions.
    """
    # The kinds of Envoy's default format inline (this runs once per request); others via
    # _value.
    # (Tests are on ints and bools where they can be: compiled, a str's truth is a call.)
    run = -1  # the number of the op that started the current run of hits; -1: none
    pending = ""  # the piece of the current run (ops ``run`` to the previous one)
    for number, op in enumerate(ops):
        kind = op.kind
        hit = False
        piece = ""  # the op's piece when it is a hit
        v = ""  # else its value ("": not available)
        if kind == _K_INT:
            # As for a str value below, keyed by the number: a repeated one is not even
            # formatted.
            n = _int_field(e, op.field)
            if n == op.last_int:
                hit = True
                piece = op.piece
                if not piece:
                    piece = op.piece = f"{op.text}{int_text(n)}{op.suffix}"
            else:
                op.last_int = n
                op.piece = ""
                v = int_text(n)
        elif kind == _K_START:
            if run >= 0:
                out.append(pending)
                pending = ""
            run = -1
            t = op.time
            assert t is not None
            t.append_to(out, e.start_time)  # with op.text and op.suffix
            continue
        else:
            if kind == _K_STR:
                v = _str_field(e, op.field)
            elif kind == _K_HEADER:
                v = _request_header(e, op.main_name)
            elif kind == _K_FLAGS:
                v = e.flags
            elif kind == _K_REQ:
                v = _request_text(op, e)
            elif kind == _K_RESP:
                v = _response_text(op, e)
            else:
                v = _value_text(op, e)
            if v == op.last:  # "" (not available) included
                hit = True
                piece = op.piece
                if not piece:  # the second line in a row with this value
                    piece = op.piece = f"{op.text}{v}{op.suffix}" if v else op.missing
            else:
                op.last = v
                op.piece = ""
        if not hit:  # the run ends
            if run >= 0:
                out.append(pending)
                pending = ""
            run = -1
            op.run_start = -1
            if v:
                out.append(op.text)
                out.append(v)
                if op.suffix:
                    out.append(op.suffix)
            else:
                out.append(op.missing)
        elif run < 0:  # a hit starting a run
            run = number
            op.run_start = -1
            pending = piece
        elif op.run_start == run:  # the same run as on the previous line
            run_piece = op.run_piece
            if not run_piece:
                run_piece = op.run_piece = pending + piece
            pending = run_piece
        else:
            # Not the run this op ended on the previous line: remember this one (its piece
            # is made if the next line has it too), and start a run of its own for now.
            op.run_start = run
            op.run_piece = ""
            run = number
            out.append(pending)
            pending = piece
    if run >= 0:
        out.append(pending)
    if tail:
        out.append(tail)


def _value_text(op: _Op, e: LogEntry) -> str:
    """``_value`` as text, "" when not available."""
    v = _value(op, e)
    if v is None:
        return ""
    return v if isinstance(v, str) else str(v)


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
    their own newline); ``render_into`` appends the same line to a list, possibly in pieces.
    The sink calls ``render_into`` directly (a native method call under the compiled build,
    where calling a ``Formatter`` goes through Python's call protocol)."""

    __slots__ = ("program",)

    def __init__(self) -> None:
        self.program: CProgram | None = None
        """The format compiled for the C renderer (a text format, with the build); None: it
        is rendered in Python. A logger renders a line with a program as its request ends,
        others with the sink's next batch (see sink.py)."""

    def render(self, e: LogEntry) -> str:
        raise NotImplementedError

    def render_into(self, e: LogEntry, out: list[str]) -> None:
        """Append the line of ``e`` to ``out``, in one or more pieces (the sink joins a whole
        batch of lines at once)."""
        out.append(self.render(e))


class _TextFormat(LogFormat):
    __slots__ = ("ops", "tail")

    def __init__(self, text: str, omit_empty_values: bool) -> None:
        super().__init__()
        empty = "" if omit_empty_values else "-"
        self.ops, self.tail = _parse(text, empty)
        if self.ops and self.tail:
            # The text after the last command goes in that command's piece: one piece less.
            last = self.ops[-1]
            last.set_literals(last.text, _missing_mark(last, empty), self.tail)
            self.tail = ""
        self.program = c_program(self.ops, _C_PROGRAM_TYPE)

    def render(self, e: LogEntry) -> str:
        out: list[str] = []
        self.render_into(e, out)
        return "".join(out)

    def render_into(self, e: LogEntry, out: list[str]) -> None:
        program = self.program
        if program is not None:
            # The C renderer (_textline.c): the whole line in one pass. It declines (False) a
            # value that is not a latin-1 str, which the Python renderer below handles.
            headers = e.request_headers
            if program(
                out,
                e.start_time,
                e.method,  # the str fields in _F_* order
                e.path,
                e.authority,
                e.protocol,
                e.upstream_host,
                e.details,
                e.termination_details,
                e.upstream_cluster,
                e.route_name,
                e.peer_uri_san,
                e.sni,
                e.status,  # the int fields in _F_* order
                e.duration_ms,
                e.bytes_received,
                e.bytes_sent,
                e.flags,
                e.http,
                headers.items if headers is not None else None,
                e.response_headers,
            ):
                return
        _render_text_into(out, self.ops, self.tail, e)


# ---------------------------------------------------------------------------------------------
# The C renderer of text lines (_textline.c), when ``ubimesh build-native`` has built it.

CProgram = Callable[..., bool]
"""A compiled text format in C: called with the line's list and the entry's fields (see
``_TextFormat.render_into``), it appends the line and returns True, or returns False."""


ProgramType = Callable[[list[tuple[object, ...]]], CProgram]
"""The C ``Program`` type: compiles a text format's ops (see ``c_program``)."""


def _load_program_type() -> ProgramType | None:
    try:
        from ubimesh.proxy.access_log._textline import Program
    except ImportError:  # not built, or the compiled hot path is off (UBIMESH_NATIVE=0)
        return None
    return Program


#: Looked up when this module is imported, which the proxy does after ``native.enable()``.
_C_PROGRAM_TYPE: Final = _load_program_type()


def c_program(ops: list[_Op], program_type: ProgramType | None) -> CProgram | None:
    """``ops`` compiled by ``program_type`` (the C ``Program``); None when there is none, the
    format has no command, or it shows what the C renderer does not (addresses, literal text
    beyond latin-1): the Python renderer does those lines."""
    if program_type is None or not ops:
        return None
    items: list[tuple[object, ...]] = []
    for op in ops:
        kind = op.kind
        if kind in (_K_ADDRESS, _K_IP, _K_PORT):
            return None
        render: object = None
        render_head: object = None
        render_tail: object = None
        digits = 0
        t = op.time
        if kind == _K_START and t is not None:
            if t.split:
                render_head, render_tail, digits = t.render_head, t.render_tail, t.digits
            else:
                render = t.render
        items.append((kind, op.field, op.main, op.main_name, op.alt, op.alt_name, op.max_len,
                      op.text, op.suffix, op.missing, render, render_head, render_tail,
                      digits))  # fmt: skip
    try:
        return program_type(items)
    except ValueError:
        return None


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


def _json_node(key: str, value: Any, where: str) -> _JsonNode:
    if isinstance(value, dict):
        node = _JsonNode(key, _N_OBJECT)
        node.object = _json_object(value, where)
        return node
    if isinstance(value, str):
        ops, tail = _parse(value, "-")
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


def _json_object(obj: dict[str, Any], where: str) -> list[_JsonNode]:
    return [_json_node(k, obj[k], f"{where}.{k}") for k in sorted(obj)]


def _render_object(nodes: list[_JsonNode], e: LogEntry, omit: bool) -> dict[str, Any]:
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
                v = _str_field(e, op.field)
            elif k == _K_INT:
                out[node.key] = _int_field(e, op.field)
                continue
            elif k == _K_HEADER:
                v = _request_header(e, op.main_name)
            else:
                v = _value(op, e)
            if v is None or v == "":
                if omit:
                    continue
                v = None
        elif kind == _N_CONST:
            v = node.const
        elif kind == _N_MIXED:
            v = _render_text(node.ops, node.tail, e)
        else:
            v = _render_object(node.object, e, omit)
        out[node.key] = v
    return out


class _JsonFormat(LogFormat):
    __slots__ = ("dumps", "nodes", "omit", "option")

    def __init__(self, obj: dict[str, Any], omit_empty_values: bool) -> None:
        super().__init__()
        self.nodes = _json_object(obj, "")
        self.omit = omit_empty_values
        # orjson (several times faster than json here; keys are already in sorted order).
        # Loaded only for a JSON format: it pulls in datetime, which the proxy otherwise
        # never needs.
        import orjson

        self.dumps: Callable[..., bytes] = orjson.dumps
        self.option: int = orjson.OPT_APPEND_NEWLINE

    def render(self, e: LogEntry) -> str:
        obj = _render_object(self.nodes, e, self.omit)
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
