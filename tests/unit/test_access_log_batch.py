"""Access log lines are rendered in batches, off the request: a logged stream only queues its
entry; lines come out complete and in order however they were flushed (batch, timer, drain)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ubimesh.proxy.access_log import sink as sink_mod
from ubimesh.proxy.access_log.format import LogEntry, LogFormat, compile_log_format
from ubimesh.proxy.access_log.sink import FileSink, SinkStats, flush_all


def line_format() -> LogFormat:
    return compile_log_format("%RESPONSE_CODE% %PROTOCOL%\n")


def entry(status: int) -> LogEntry:
    return LogEntry(True, 0.0, 0, "GET", "/", "h", "HTTP/1.1", None, None, status)


def test_entries_are_rendered_a_batch_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    stats = SinkStats(None)
    s = FileSink(str(path), stats)
    fmt = line_format()
    batch = sink_mod.RENDER_BATCH

    async def main() -> None:
        for i in range(batch - 1):
            s.defer(fmt, entry(200 + i % 3))
        # The requests so far only queued their entries: nothing is rendered yet.
        assert not s.buffer and s.size == 0
        assert len(s.entries) == batch - 1 and s.timer is not None
        s.defer(fmt, entry(500))
        # The whole batch is rendered at once, into one string (one join per batch).
        rendered = "".join(s.buffer)
        assert not s.entries and len(s.buffer) == 1 and s.size == len(rendered)
        assert rendered.count("\n") == batch and rendered.endswith("\n500 HTTP/1.1\n")
        s.defer(fmt, entry(404))
        assert len(s.buffer) == 1 and len(s.entries) == 1  # the next batch waits again

    asyncio.run(main())
    assert s.drain()
    lines = path.read_text().splitlines()
    expected = [f"{200 + i % 3} HTTP/1.1" for i in range(batch - 1)]
    assert lines == [*expected, "500 HTTP/1.1", "404 HTTP/1.1"]
    assert stats.write_buffered.value == batch + 1


def test_rendered_lines_and_queued_entries_keep_their_order(tmp_path: Path) -> None:
    path = tmp_path / "b.log"
    s = FileSink(str(path), SinkStats(None))
    fmt = line_format()

    async def main() -> None:
        s.defer(fmt, entry(201))
        s.write("tcp line\n")  # a line handed over whole comes after the entry before it
        s.defer(fmt, entry(202))

    asyncio.run(main())
    assert s.drain()
    assert path.read_text() == "201 HTTP/1.1\ntcp line\n202 HTTP/1.1\n"


def test_the_timer_renders_and_flushes_a_partial_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink_mod, "FLUSH_INTERVAL", 0.05)
    path = tmp_path / "c.log"
    stats = SinkStats(None)
    s = FileSink(str(path), stats)
    fmt = line_format()

    async def main() -> None:
        s.defer(fmt, entry(200))
        s.defer(fmt, entry(503))
        await asyncio.sleep(0.3)
        assert not s.entries and not s.buffer and s.timer is None

    asyncio.run(main())
    assert s.drain()
    assert path.read_text() == "200 HTTP/1.1\n503 HTTP/1.1\n"
    assert stats.flushed_by_timer.value == 1


def test_exit_flush_renders_queued_entries(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    fmt = line_format()

    async def main() -> None:
        sink_mod.file_sink(str(path)).defer(fmt, entry(418))  # the timer would fire in 1 s

    asyncio.run(main())
    flush_all()
    assert path.read_text() == "418 HTTP/1.1\n"


def test_without_a_loop_an_entry_is_written_through(tmp_path: Path) -> None:
    path = tmp_path / "e.log"
    s = FileSink(str(path), SinkStats(None))
    s.defer(line_format(), entry(204))
    assert not s.entries and not s.buffer
    assert s.drain()
    assert path.read_text() == "204 HTTP/1.1\n"
