"""``http_manager.is_http10`` against httptools' own answer (``get_http_version() == "1.0"``),
on real parsers fed every version llhttp accepts and every mix of the headers that move
``should_keep_alive``: the shortcut must never call an HTTP/1.0 request 1.1, nor the reverse."""

from __future__ import annotations

import itertools

import httptools
import pytest

from ubimesh.proxy.network.hcm_config import REQUEST_HEADER_FLAGS
from ubimesh.proxy.network.http_manager import is_http10

HEADERS = [
    ("Connection", "close"),
    ("Connection", "keep-alive"),
    ("connection", "Keep-Alive, Upgrade"),
    ("Proxy-Connection", "keep-alive"),
    ("PROXY-CONNECTION", "close"),
    ("Connection", "x-custom"),
    ("Upgrade", "websocket"),
    ("Keep-Alive", "timeout=5"),
    ("Host", "a.example"),
]


class Recorder:
    """httptools callbacks: the codec's header flags, then both answers at the headers' end."""

    def __init__(self) -> None:
        self.flags = 0
        self.parser: httptools.HttpRequestParser | None = None
        self.answers: list[tuple[bool, bool]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.flags |= REQUEST_HEADER_FLAGS.get(name.decode("latin-1").lower(), 0)

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        shortcut = is_http10(parser, parser.should_keep_alive(), self.flags)
        self.answers.append((shortcut, parser.get_http_version() == "1.0"))
        self.flags = 0


def _answers(version: str, headers: tuple[tuple[str, str], ...]) -> list[tuple[bool, bool]]:
    recorder = Recorder()
    parser = httptools.HttpRequestParser(recorder)
    recorder.parser = parser
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    try:
        parser.feed_data(f"GET / HTTP/{version}\r\n{lines}\r\n".encode("latin-1"))
    except httptools.HttpParserUpgrade:
        pass  # raised after the headers, for Upgrade: the answers are in
    except httptools.HttpParserError:
        return []  # a version (or header mix) llhttp refuses never reaches the shortcut
    return recorder.answers


@pytest.mark.parametrize("version", ["1.0", "1.1", "0.9", "2.0", "1.2", "3.0"])
def test_the_shortcut_agrees_with_the_parsers_version(version: str) -> None:
    parsed = 0
    for n in range(3):
        for headers in itertools.combinations(HEADERS, n):
            for shortcut, truth in _answers(version, headers):
                assert shortcut == truth, (version, headers)
                parsed += 1
    if version in ("1.0", "1.1"):
        assert parsed == sum(1 for n in range(3) for _ in itertools.combinations(HEADERS, n))


def test_the_common_request_takes_the_shortcut() -> None:
    # HTTP/1.1 without a Connection header: not 1.0, without asking for the version's text.
    class NoVersion:
        def should_keep_alive(self) -> bool:
            return True

        def get_http_version(self) -> str:
            raise AssertionError("the version's text was read")

    assert is_http10(NoVersion(), True, REQUEST_HEADER_FLAGS["host"]) is False  # type: ignore[arg-type]
