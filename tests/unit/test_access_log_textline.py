"""The C text-line renderer (access_log/_textline.c) against format.py's Python renderer, the
source of truth: the extension is compiled here as ``ubimesh build-native`` compiles it, and
both render the same random entries with every command it takes, byte for byte."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from tests.support.c_extension import compile_and_load

from ubimesh.proto.headers import Headers
from ubimesh.proxy.access_log.format import (
    DEFAULT_FORMAT,
    LogEntry,
    _render_text,
    _TextFormat,
    c_program,
    compile_log_format,
)
from ubimesh.proxy.access_log.sink import FileSink, SinkStats


@pytest.fixture(scope="module")
def textline(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return compile_and_load("ubimesh.proxy.access_log._textline", tmp_path_factory.mktemp("c"))


EVERY_COMMAND = (
    '%REQ(:METHOD)% "%REQ(:PATH)%" %REQ(:AUTHORITY)% %REQ(:SCHEME)% %REQ(HOST)% '
    "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):5% %REQ(X-A?X-B)% %REQ(:UNKNOWN?X-A)% %REQ(X-A):0% "
    "%REQ(X-B):3% %REQ(USER-AGENT)% %RESP(:STATUS)% %RESP(X-R?:STATUS)% %RESP(X-R):3% "
    "%RESP(X-R?X-S):0% %RESP(X-S?X-R)% %RESPONSE_CODE% %RESPONSE_CODE_DETAILS% "
    "%CONNECTION_TERMINATION_DETAILS% %RESPONSE_FLAGS% %DURATION% %BYTES_RECEIVED% "
    "%BYTES_SENT% %PROTOCOL% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %ROUTE_NAME% "
    "%DOWNSTREAM_PEER_URI_SAN% %REQUESTED_SERVER_NAME% %HOSTNAME% tail é\n"
)
START_TIMES = (
    "[%START_TIME%]",
    "%START_TIME(%s)%",
    "%START_TIME(%Y/%m/%d %H:%M:%S.%3f)% x",
    "<%START_TIME(%6f|%Y)%>",
    "%START_TIME(%9f)%",
    "%START_TIME(%1f)%%START_TIME(%8f)%",
    "%START_TIME(%f %f)%",  # two fractions: the whole format every line
    "%START_TIME(%%%Y.%3f)%",  # %%: likewise
    "%START_TIME(%E3S)%",
    "%START_TIME(%s.%3f)% %START_TIME(%Es)%",
)
FORMATS = (DEFAULT_FORMAT, EVERY_COMMAND, *START_TIMES, "%RESPONSE_FLAGS%")

STRINGS = ("", "a", "GET", "/p?q=1", "shop.example", "café", "x" * 300, "-", " ")
WIDE = ("ü→", "日本")  # beyond latin-1: the C renderer declines, Python renders
HEADER_NAMES = ("user-agent", "x-a", "x-b", "x-envoy-original-path", "x-request-id", "host")
RESPONSE_NAMES = ("x-r", "x-s", ":status", "content-type")


def random_entry(rng: random.Random, wide: bool) -> LogEntry:
    pool = STRINGS + WIDE if wide else STRINGS

    def text() -> str:
        return rng.choice(pool)

    def items(names: tuple[str, ...]) -> list[tuple[str, str]]:
        return [(rng.choice(names), text()) for _ in range(rng.randrange(0, 6))]

    http = rng.random() < 0.9
    second = 1_700_000_000 + rng.randrange(3)  # few seconds: the per-second cache hits too
    fraction = rng.choice((0.0, 0.0004999, 0.0005, 0.25, 0.9999994, 0.9999996, rng.random()))
    return LogEntry(
        http,
        second + fraction,
        rng.choice((0, 1, 999, 1024, 2**40)),
        text(),
        text(),
        text(),
        rng.choice(("HTTP/1.1", "HTTP/1.0", "")),
        Headers(items(HEADER_NAMES)) if http and rng.random() < 0.9 else None,
        items(RESPONSE_NAMES) if http and rng.random() < 0.8 else None,
        rng.choice((0, 200, 404, 503, 1000)),
        rng.choice(("", "UH", "UF,URX")),
        text(),
        text(),
        rng.choice((0, 5, 300, 2**40)),
        rng.choice((0, 42, 70_000)),
        text(),
        text(),
        text(),
        None,
        None,
        rng.choice(("", "spiffe://mesh.local/ns/a/sa/b")),
        rng.choice(("", "shop.example")),
    )


class Spy:
    """The C program, counting the lines it rendered and those it declined."""

    def __init__(self, program: Any) -> None:
        self.program = program
        self.rendered = 0
        self.declined = 0

    def __call__(self, *args: Any) -> bool:
        done = bool(self.program(*args))
        if done:
            self.rendered += 1
        else:
            self.declined += 1
        return done


@pytest.mark.parametrize("omit", [False, True])
@pytest.mark.parametrize("text", FORMATS)
def test_c_lines_equal_python_lines(textline: ModuleType, text: str, omit: bool) -> None:
    fmt = _TextFormat(text, omit)
    program = c_program(fmt.ops, textline.Program)
    assert program is not None
    spy = Spy(program)
    fmt.program = spy
    rng = random.Random(f"{text}{omit}")
    for i in range(400):
        wide = i % 4 == 3
        entry = random_entry(rng, wide)
        c_line = fmt.render(entry)
        assert c_line == _render_text(fmt.ops, fmt.tail, entry), (text, entry.__class__)
        # A canonical str, as Python makes: text whose characters are all ASCII is stored as
        # ASCII. ``isascii`` reads the storage flag, not the characters, so a line stored as
        # latin-1 (which ``==`` above would not notice) fails here.
        assert c_line.isascii() == all(ord(c) < 128 for c in c_line)
    assert spy.rendered >= 250  # the latin-1 entries
    assert spy.declined <= 100  # at most the wide ones


def test_entries_without_http_fields(textline: ModuleType) -> None:
    fmt = _TextFormat(EVERY_COMMAND, False)
    fmt.program = c_program(fmt.ops, textline.Program)
    entry = LogEntry(start_time=1_700_000_000.5, duration_ms=3, bytes_sent=9, flags="UF")
    assert fmt.render(entry) == _render_text(fmt.ops, fmt.tail, entry)
    # 16 request and response commands not available, then RESPONSE_CODE's 0.
    assert fmt.render(entry).startswith('- "-" ' + "- " * 14 + "0 - - UF 3 0 9 - ")


def test_formats_it_does_not_take(textline: ModuleType) -> None:
    for text in ("%DOWNSTREAM_REMOTE_ADDRESS%", "%REQ(:PATH)% → %DURATION%"):
        fmt = _TextFormat(text, False)
        assert c_program(fmt.ops, textline.Program) is None
    assert c_program(_TextFormat("no command", False).ops, textline.Program) is None


def test_program_refuses_bad_ops_and_calls(textline: ModuleType) -> None:
    program = textline.Program
    op = (2, 0, 0, "", -1, "", -1, "", "", "-", None, None, None, 0)
    with pytest.raises(ValueError, match="kind 7"):
        program([(7, *op[1:])])
    with pytest.raises(ValueError, match="field 11"):
        program([(2, 11, *op[2:])])
    with pytest.raises(ValueError, match="latin-1"):
        program([(*op[:7], "→", *op[8:])])
    with pytest.raises(ValueError, match="START_TIME needs"):
        program([(6, *op[1:])])
    with pytest.raises(TypeError, match="14 items"):
        program([op[:5]])
    p = program([op])
    with pytest.raises(TypeError, match=f"takes {textline.N_ARGS} arguments"):
        p([], 0.0)
    args: list[Any] = [[], 0.0, *["GET"] * 11, 200, 0, 0, 0, "", True, None, None]
    assert len(args) == textline.N_ARGS
    assert p(*args) is True and args[0] == ["GET"]
    args[4] = "→"  # beyond latin-1, but a field the format does not show
    args[0] = []
    assert p(*args) is True and args[0] == ["GET"]
    args[2] = "→"  # the method, which it shows: declined, nothing appended
    args[0] = []
    assert p(*args) is False and args[0] == []


def test_lines_rendered_in_c_keep_their_place_among_queued_entries(
    textline: ModuleType, tmp_path: Path
) -> None:
    """A format rendered in C writes its line as the request ends (``FileSink.render_now``);
    entries of a JSON format on the same file, queued before it, come first."""
    text = _TextFormat("%RESPONSE_CODE% %REQ(USER-AGENT)%\n", False)
    text.program = c_program(text.ops, textline.Program)
    json_format = compile_log_format(None, '{"code": "%RESPONSE_CODE%"}')
    assert text.program is not None and json_format.program is None
    path = tmp_path / "mixed.log"
    stats = SinkStats(None)
    sink = FileSink(str(path), stats)

    def entry(status: int, agent: str) -> LogEntry:
        headers = Headers([("user-agent", agent)])
        return LogEntry(True, 0.0, 0, "GET", "/", "h", "HTTP/1.1", headers, None, status)

    async def main() -> None:
        sink.defer(json_format, entry(201, "a"))
        sink.render_now(text, entry(202, "b"))
        # The queued entry was rendered first, then the C line went straight in.
        assert not sink.entries and sink.size == len("".join(sink.buffer))
        sink.render_now(text, entry(203, "ü→"))  # declined by C: Python renders it
        sink.defer(json_format, entry(204, "d"))

    asyncio.run(main())
    assert sink.drain()
    assert path.read_text(encoding="utf-8").splitlines() == [
        '{"code":201}',
        "202 b",
        "203 ü→",
        '{"code":204}',
    ]
    assert stats.write_buffered.value == 4
