"""HTTP/1.1 wire helpers shared by the downstream and upstream codecs: serialization of heads,
chunk framing and the cached Date header. Pure functions over bytes and strings.

Header names go out lower-case, as Envoy's HTTP/1 codec writes them by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

# The clock as a constant: under mypyc a Final is a C static, where ``time.time`` is a
# generic attribute lookup on the module (about 200 instructions) per call.
_wall_clock: Final = time.time

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

#: Reason phrases for the status codes a proxy produces or commonly relays.
REASONS: dict[int, str] = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
    204: "No Content", 206: "Partial Content", 301: "Moved Permanently", 302: "Found",
    303: "See Other", 304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Payload Too Large", 414: "URI Too Long", 426: "Upgrade Required",
    429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
    507: "Insufficient Storage",
}  # fmt: skip

_STATUS_LINES: dict[int, bytes] = {
    code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in REASONS.items()
}


def status_line(code: int) -> bytes:
    line = _STATUS_LINES.get(code)
    if line is None:
        line = f"HTTP/1.1 {code} {REASONS.get(code, 'Unknown')}\r\n".encode()
    return line


#: "0" .. "1023": statuses, durations and small byte counts as text without formatting a
#: number (a list: compiled, indexing a tuple constant boxes it first).
_SMALL_INTS: Final = [str(i) for i in range(1024)]


def int_text(n: int) -> str:
    """``str(n)``, from a table for 0 to 1023 (access log lines, span text)."""
    return _SMALL_INTS[n] if 0 <= n < 1024 else str(n)


def _append_header_lines(parts: list[str], headers: list[tuple[str, str]]) -> None:
    # Pieces for one join, not a string per line: an f-string per header line costs about
    # 500 instructions and an allocation under mypyc (bench/telemetry_cpu.py --callgrind).
    for k, v in headers:
        parts.append(k)
        parts.append(": ")
        parts.append(v)
        parts.append("\r\n")


def encode_headers(headers: list[tuple[str, str]]) -> bytes:
    """``name: value`` lines for a head; the caller adds the start line and final CRLF."""
    parts: list[str] = []
    _append_header_lines(parts, headers)
    return "".join(parts).encode("latin-1")


_RequestHead = Callable[[str, str, list[tuple[str, str]]], bytes | None]
_ResponseHead = Callable[[bytes, list[tuple[str, str]]], bytes | None]


def _load_head_encoders() -> tuple[_RequestHead | None, _ResponseHead | None]:
    try:
        from ubimesh.proxy.http._head import request_head, response_head
    except ImportError:  # not built, or the compiled hot path is off (UBIMESH_NATIVE=0)
        return None, None
    return request_head, response_head


#: The C encoders (_head.c), looked up when this module is imported, which the proxy does
#: after ``native.enable()``.
_C_HEAD: Final = _load_head_encoders()
_C_REQUEST_HEAD: Final = _C_HEAD[0]
_C_RESPONSE_HEAD: Final = _C_HEAD[1]


def encode_response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """A whole HTTP/1.1 response head: the status line, the header lines and the empty line.
    Written by the C encoder when the build has it, like ``encode_request_head``."""
    start = status_line(status)
    c = _C_RESPONSE_HEAD
    if c is not None:
        head = c(start, headers)
        if head is not None:
            return head
    return start + encode_headers(headers) + CRLF


def encode_request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """A whole HTTP/1.1 request head: the request line, the header lines and the empty line.
    Written by the C encoder when the build has it (about 60 instructions a header line
    instead of 500); a head it declines (a str beyond latin-1, or not a str) by
    ``_encode_request_head``, the source of truth."""
    c = _C_REQUEST_HEAD
    if c is not None:
        head = c(method, target, headers)
        if head is not None:
            return head
    return _encode_request_head(method, target, headers)


def _encode_request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    # The pieces' list is made at its final size, ": " already in place: appending grew it
    # by reallocations, and an item stored costs less than one appended (about 55
    # instructions a header line less; bench/telemetry_cpu.py --callgrind).
    parts = [": "] * (4 * len(headers) + 5)
    parts[0] = method
    parts[1] = " "
    parts[2] = target
    parts[3] = " HTTP/1.1\r\n"
    i = 4
    for k, v in headers:
        parts[i] = k
        parts[i + 2] = v
        parts[i + 3] = "\r\n"
        i += 4
    parts[i] = "\r\n"
    return "".join(parts).encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of chunked transfer coding (RFC 9112 section 7.1). Empty data gives no bytes:
    an empty chunk would be the last-chunk and end the body early."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(epoch: float) -> str:
    """IMF-fixdate (RFC 9110 section 5.6.7), e.g. "Sun, 06 Nov 1994 08:49:37 GMT"."""
    t = time.gmtime(epoch)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


class DateCache:
    """The RFC 9110 Date value, formatted at most once per second (Envoy's DateProvider)."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def get(self) -> str:
        now = int(_wall_clock())
        if now != self._second:
            self._second = now
            self._value = http_date(now)
        return self._value


DATE = DateCache()
