"""The C head encoders (proxy/http/_head.c) against codec.py's Python ones, the source of truth
(``_encode_request_head``; the status line, ``encode_headers`` and CRLF): the same bytes for
every head they write, None (nothing written) for every head they must leave to Python, and
the codec's entry points giving the Python answer then."""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

import pytest
from tests.support.c_extension import compile_and_load

from ubimesh.proxy.http import codec


@pytest.fixture(scope="module")
def c_module(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return compile_and_load("ubimesh.proxy.http._head", tmp_path_factory.mktemp("c"))


def _text(rng: random.Random, alphabet: str, most: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(most + 1)))


def test_writes_what_python_writes_on_random_heads(c_module: ModuleType) -> None:
    rng = random.Random(6)
    # Latin-1 throughout, DEL and the upper half included: the wire is decoded as latin-1.
    alphabet = "abcXYZ09-_:/ ?=&%\t\x7f\x80\xa0\xe9\xff"
    for _ in range(2_000):
        method = rng.choice(["GET", "POST", "M-SEARCH", ""])
        target = _text(rng, alphabet, 40)
        headers = [(_text(rng, alphabet, 12), _text(rng, alphabet, 60))
                   for _ in range(rng.randrange(12))]  # fmt: skip
        expected = codec._encode_request_head(method, target, headers)
        assert c_module.request_head(method, target, headers) == expected
        start = codec.status_line(rng.choice([200, 204, 404, 503, 599]))
        expected = start + codec.encode_headers(headers) + b"\r\n"
        assert c_module.response_head(start, headers) == expected
    # The common head, written out: the exact framing, not only agreement.
    head = c_module.request_head("GET", "/1k", [("host", "a:80"), ("x-b3-sampled", "0")])
    assert head == b"GET /1k HTTP/1.1\r\nhost: a:80\r\nx-b3-sampled: 0\r\n\r\n"
    assert c_module.request_head("GET", "/", []) == b"GET / HTTP/1.1\r\n\r\n"
    head = c_module.response_head(b"HTTP/1.1 200 OK\r\n", [("content-length", "0")])
    assert head == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def latin1(text: str) -> bool:
    return all(ord(c) < 256 for c in text)


class StrSub(str):
    pass


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/\u20ac", []),  # beyond latin-1 in the target
        ("G\u0100T", "/", []),  # in the method
        ("GET", "/", [("host", "a"), ("x-name", "caf\u00e9 \u2603")]),  # in a value
        ("GET", "/", [("\U0001f600", "v")]),  # four bytes a character, in a name
        (b"GET", "/", []),  # not a str
        ("GET", None, []),
        ("GET", "/", (("host", "a"),)),  # a tuple, not a list
        ("GET", "/", [("host", "a", "b")]),  # not a pair
        ("GET", "/", [["host", "a"]]),  # a list, not a tuple
        ("GET", "/", [("host", 1)]),
        ("GET", "/", [("host", b"a")]),
    ],
)
def test_declines_what_it_must_leave_to_python(
    c_module: ModuleType, method: Any, target: Any, headers: Any
) -> None:
    assert c_module.request_head(method, target, headers) is None
    # The response head shares the header lines' checks.
    if isinstance(method, str) and isinstance(target, str) and latin1(method + target):
        assert c_module.response_head(b"HTTP/1.1 200 OK\r\n", headers) is None


def test_a_response_head_needs_a_bytes_status_line(c_module: ModuleType) -> None:
    assert c_module.response_head("HTTP/1.1 200 OK\r\n", []) is None
    assert c_module.response_head(bytearray(b"HTTP/1.1 200 OK\r\n"), []) is None


def test_a_str_subclass_is_written_as_its_text(c_module: ModuleType) -> None:
    headers = [(StrSub("host"), StrSub("a"))]
    head = c_module.request_head(StrSub("GET"), "/", headers)
    assert head == b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"


def test_the_codec_falls_back_to_python_for_a_declined_head(
    c_module: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codec, "_C_REQUEST_HEAD", c_module.request_head)
    assert codec.encode_request_head("GET", "/", [("a", "\u00e9")]) == (
        b"GET / HTTP/1.1\r\na: \xe9\r\n\r\n"
    )
    # Declined by C, then refused by Python exactly as without the build.
    with pytest.raises(UnicodeEncodeError):
        codec.encode_request_head("GET", "/", [("a", "\u20ac")])
    monkeypatch.setattr(codec, "_C_RESPONSE_HEAD", c_module.response_head)
    assert codec.encode_response_head(200, [("a", "\u00e9")]) == (
        b"HTTP/1.1 200 OK\r\na: \xe9\r\n\r\n"
    )
    with pytest.raises(UnicodeEncodeError):
        codec.encode_response_head(200, [("a", "\u20ac")])


def test_wrong_argument_counts_raise(c_module: ModuleType) -> None:
    with pytest.raises(TypeError, match="takes 3 arguments"):
        c_module.request_head("GET", "/")
    with pytest.raises(TypeError, match="takes 3 arguments"):
        c_module.request_head("GET", "/", [], [])
    with pytest.raises(TypeError, match="response_head takes 2 arguments"):
        c_module.response_head(b"HTTP/1.1 200 OK\r\n")
