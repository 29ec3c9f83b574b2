"""HTTP/1.1 wire helpers (ubimesh.proxy.http.codec): Date formatting, chunk framing, heads.

Every check compares against something written independently of the module: the standard
library's ``email.utils.formatdate`` for dates, a strict chunked decoder written here, and
:mod:`http.client` reading a head from a real socket.
"""

from __future__ import annotations

import email.utils
import http.client
import itertools
import re
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubimesh.proto.headers import HOP_BY_HOP
from ubimesh.proxy.http.codec import (
    CONTINUE_100,
    CRLF,
    DATE,
    LAST_CHUNK,
    REASONS,
    DateCache,
    chunk,
    encode_headers,
    http_date,
    status_line,
)

# Fri, 31 Dec 9999 23:59:59 GMT: the last second with a four-digit year.
LAST_FOUR_DIGIT_YEAR_EPOCH = 253402300799

# -- http_date -----------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=LAST_FOUR_DIGIT_YEAR_EPOCH))
def test_http_date_matches_formatdate_for_integer_epochs(epoch: int) -> None:
    assert http_date(epoch) == email.utils.formatdate(epoch, usegmt=True)


@given(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=999_999),
)
def test_http_date_matches_formatdate_for_fractional_epochs(seconds: int, micros: int) -> None:
    # formatdate goes through datetime, which rounds to microseconds: a fraction that is a whole
    # number of microseconds is truncated to the second by both. Below 2**32 a float holds such
    # an epoch to within half a microsecond, so the rounding cannot carry into the next second.
    epoch = seconds + micros / 1e6
    assert int(epoch) == seconds  # the float did not round up to the next second
    assert http_date(epoch) == email.utils.formatdate(epoch, usegmt=True)


IMF_FIXDATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT"
)


@given(st.integers(min_value=0, max_value=LAST_FOUR_DIGIT_YEAR_EPOCH))
def test_http_date_is_imf_fixdate_and_parses_back(epoch: int) -> None:
    value = http_date(epoch)
    assert IMF_FIXDATE.fullmatch(value), value
    parsed = email.utils.parsedate_to_datetime(value)
    assert parsed.timestamp() == epoch


def test_http_date_known_values() -> None:
    # RFC 9110 section 5.6.7's example, and the epoch itself.
    assert http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert http_date(784111777.999) == "Sun, 06 Nov 1994 08:49:37 GMT"  # truncated, not rounded


# -- DateCache -----------------------------------------------------------------------------------


def _wait_until_fraction_above(fraction: float) -> None:
    """Sleep until the wall clock is at least ``fraction`` into a second (bounded: < 1 s)."""
    now = time.time()
    if now % 1 < fraction:
        time.sleep(fraction - now % 1)


@pytest.mark.parametrize("cache", [DateCache(), DATE], ids=["new", "module"])
def test_date_cache_is_current_and_changes_at_most_once_a_second(cache: DateCache) -> None:
    # Straddle a second boundary: start late in a second and sample for ~0.25 s.
    _wait_until_fraction_above(0.85)
    samples: list[tuple[int, str, int]] = []
    end = time.time() + 0.25
    while True:
        before = time.time()
        if before > end:
            break
        value = cache.get()
        after = time.time()
        samples.append((int(before), value, int(after)))
        time.sleep(0.0005)
    assert len(samples) > 10
    seconds_seen = {s for s, _, _ in samples} | {a for _, _, a in samples}
    assert len(seconds_seen) >= 2, "the sampling did not cross a second boundary"

    for before, value, after in samples:
        # The value is the Date of the second the call happened in.
        assert value in {http_date(s) for s in range(before, after + 1)}, (before, value)
        if before == after:
            assert value == http_date(before)

    values = [v for _, v, _ in samples]
    changes = sum(1 for a, b in itertools.pairwise(values) if a != b)
    assert changes <= max(seconds_seen) - min(seconds_seen)
    # Values only move forward.
    order = [email.utils.parsedate_to_datetime(v) for v in values]
    assert order == sorted(order)


def test_date_cache_formats_once_per_second() -> None:
    cache = DateCache()
    for _ in range(20):  # retry if a call pair straddles a second boundary
        t0 = int(time.time())
        first = cache.get()
        second = cache.get()
        if int(time.time()) == t0:
            # The very same string object: it was formatted once, not per call.
            assert second is first
            assert first == http_date(t0)
            return
    pytest.fail("could not make two calls within one second")


# -- chunk ---------------------------------------------------------------------------------------


class ChunkedError(ValueError):
    pass


def decode_chunked(data: bytes) -> tuple[bytes, bytes]:
    """A strict RFC 9112 section 7.1 decoder: (body, bytes after the message).

    Chunk extensions and trailer fields are not expected from the encoder and are rejected.
    """
    body = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise ChunkedError(f"no CRLF after chunk size at {pos}")
        size_text = data[pos:eol]
        if not re.fullmatch(rb"[0-9A-Fa-f]+", size_text):
            raise ChunkedError(f"bad chunk size {size_text!r}")
        size = int(size_text, 16)
        pos = eol + 2
        if size == 0:
            break
        if pos + size + 2 > len(data):
            raise ChunkedError("chunk data truncated")
        body += data[pos : pos + size]
        pos += size
        if data[pos : pos + 2] != b"\r\n":
            raise ChunkedError(f"chunk data not followed by CRLF at {pos}")
        pos += 2
    if data[pos : pos + 2] != b"\r\n":
        raise ChunkedError("trailer section not empty or not terminated")
    return bytes(body), data[pos + 2 :]


def test_reference_decoder_rejects_bad_framing() -> None:
    # The decoder is the judge below; make sure it can say no.
    for bad in (b"3\r\nabcd\r\n0\r\n\r\n", b"4\r\nabc\r\n0\r\n\r\n", b"z\r\n", b"3\r\nabc\r\n"):
        with pytest.raises(ChunkedError):
            decode_chunked(bad)
    assert decode_chunked(b"3\r\nabc\r\n0\r\n\r\nNEXT") == (b"abc", b"NEXT")


@given(st.lists(st.binary(min_size=1, max_size=5000), max_size=12), st.binary(max_size=20))
def test_chunks_decode_back_to_the_body(parts: list[bytes], after: bytes) -> None:
    wire = b"".join(chunk(p) for p in parts) + LAST_CHUNK + after
    body, rest = decode_chunked(wire)
    assert body == b"".join(parts)
    assert rest == after  # the message ends exactly where it should


@given(st.binary(min_size=1, max_size=70_000))
def test_one_chunk_is_size_line_data_crlf(data: bytes) -> None:
    encoded = chunk(data)
    size_line, _, rest = encoded.partition(b"\r\n")
    assert int(size_line, 16) == len(data)
    assert re.fullmatch(rb"[0-9a-fA-F]+", size_line)
    assert rest == data + CRLF


def test_chunk_sizes_are_hex() -> None:
    assert chunk(b"x" * 10) == b"a\r\n" + b"x" * 10 + b"\r\n"
    assert chunk(b"x" * 255).startswith(b"ff\r\n")
    assert chunk(b"x" * 4096).startswith(b"1000\r\n")
    assert LAST_CHUNK == b"0\r\n\r\n"


# -- status_line ---------------------------------------------------------------------------------

STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ([\t !-~]+)\r\n")


@pytest.mark.parametrize(
    ("code", "line"),
    [
        (200, b"HTTP/1.1 200 OK\r\n"),
        (404, b"HTTP/1.1 404 Not Found\r\n"),
        (413, b"HTTP/1.1 413 Payload Too Large\r\n"),
        (426, b"HTTP/1.1 426 Upgrade Required\r\n"),
        (431, b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        (503, b"HTTP/1.1 503 Service Unavailable\r\n"),
        (504, b"HTTP/1.1 504 Gateway Timeout\r\n"),
        (299, b"HTTP/1.1 299 Unknown\r\n"),
        (599, b"HTTP/1.1 599 Unknown\r\n"),
    ],
)
def test_status_line_known_and_unknown(code: int, line: bytes) -> None:
    assert status_line(code) == line


@given(st.integers(min_value=100, max_value=999))
def test_status_line_shape(code: int) -> None:
    line = status_line(code)
    m = STATUS_LINE.fullmatch(line)
    assert m is not None, line
    assert int(m.group(1)) == code
    assert m.group(2).decode() == REASONS.get(code, "Unknown")


def test_continue_line() -> None:
    assert status_line(100) + CRLF == CONTINUE_100


# -- encode_headers ------------------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
header_names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20)
# Field values: visible latin-1 and inner spaces/tabs; no leading or trailing whitespace (a parser
# strips it), no CR, LF or NUL.
_vchar = st.characters(min_codepoint=0x21, max_codepoint=0xFF, blacklist_characters="\x7f")
header_values = st.builds(
    lambda first, middle: (first + middle).rstrip(" \t") if first else "",
    st.text(alphabet=_vchar, max_size=1),
    st.text(alphabet=st.one_of(_vchar, st.sampled_from(" \t")), max_size=30),
)


def _parse_head_with_http_client(head: bytes) -> http.client.HTTPResponse:
    """Let http.client read ``head`` from a real socket (the far end of a socketpair)."""
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(5)
        right.settimeout(5)
        left.sendall(head)
        left.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(right)
        resp.begin()
        return resp


@settings(max_examples=60)
@given(st.integers(min_value=200, max_value=599), st.lists(st.tuples(header_names, header_values)))
def test_head_parses_back_with_http_client(code: int, headers: list[tuple[str, str]]) -> None:
    headers = [*headers, ("content-length", "0")]
    head = status_line(code) + encode_headers(headers) + CRLF
    resp = _parse_head_with_http_client(head)
    assert resp.status == code
    assert resp.getheaders() == headers


def test_encode_headers_exact_bytes() -> None:
    assert encode_headers([]) == b""
    assert encode_headers([("a", "1"), ("b", ""), ("a", "2")]) == b"a: 1\r\nb: \r\na: 2\r\n"
    # Values are latin-1: every byte an HTTP/1.1 peer sent goes back out unchanged.
    assert encode_headers([("x", "caf\xe9\xff")]) == b"x: caf\xe9\xff\r\n"
    with pytest.raises(UnicodeEncodeError):
        encode_headers([("x", "\u20ac")])


@given(st.lists(st.tuples(header_names, st.text(alphabet=_vchar, max_size=10))))
def test_encode_headers_round_trips_latin1(headers: list[tuple[str, str]]) -> None:
    lines = encode_headers(headers).decode("latin-1").split("\r\n")
    assert lines[-1] == ""
    assert [tuple(line.split(": ", 1)) for line in lines[:-1]] == headers


def test_hop_by_hop() -> None:
    for name in ("connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer"):
        assert name in HOP_BY_HOP
    for name in ("content-length", "host", "x-forwarded-for", "date"):
        assert name not in HOP_BY_HOP
