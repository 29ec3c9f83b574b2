"""The access log writer: buffered, flushed by timer or size, never blocking the event loop,
bounded (lines dropped and counted when the writer cannot keep up), drained at shutdown."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from ubimesh.proxy.access_log import sink as sink_mod
from ubimesh.proxy.access_log.sink import FileSink, SinkStats, file_sink, flush_all
from ubimesh.telemetry.stats import Store


def wait_for(check: object, timeout: float = 3.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_lines_are_buffered_then_flushed_by_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink_mod, "FLUSH_INTERVAL", 0.1)
    path = tmp_path / "a.log"
    store = Store()

    async def main() -> None:
        s = file_sink(str(path), store)
        assert file_sink(str(path), store) is s  # one sink per path and process
        s.write("one\n")
        s.write("two\n")
        await asyncio.sleep(0.02)
        assert path.read_text() == ""  # buffered, no write per line
        await asyncio.sleep(0.3)

    asyncio.run(main())
    wait_for(lambda: path.read_text() == "one\ntwo\n")
    counters = store.snapshot().counters
    assert counters["filesystem.write_buffered"] == 2
    assert counters["filesystem.flushed_by_timer"] == 1
    flush_all()


def test_a_full_buffer_is_flushed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "b.log"
    s = FileSink(str(path), SinkStats(None))
    line = "x" * 1000 + "\n"

    async def main() -> None:
        for _ in range(sink_mod.FLUSH_BYTES // len(line) + 1):
            s.write(line)
        assert s.size == 0 and s.timer is None

    asyncio.run(main())
    assert s.drain()
    assert path.stat().st_size == (sink_mod.FLUSH_BYTES // len(line) + 1) * len(line)


def test_a_stuck_writer_drops_lines_and_never_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink_mod, "MAX_CHUNKS", 2)
    read_end, write_end = os.pipe()  # nobody reads: the writer thread blocks on a full pipe
    stats = SinkStats(None)
    s = FileSink("/dev/null", stats)
    os.close(s.fd)
    s.fd = write_end
    line = "y" * (sink_mod.FLUSH_BYTES + 1) + "\n"  # every line is a full chunk
    started = time.monotonic()
    for _ in range(10):
        s.write(line)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5
    assert stats.dropped_lines.value >= 5
    assert stats.write_buffered.value == 10

    # Unblock the writer: it finishes what was queued.
    done = threading.Event()

    def reader() -> None:
        while os.read(read_end, 1 << 16):
            pass
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert s.drain(5.0)
    os.close(write_end)
    assert done.wait(5.0)
    os.close(read_end)


def test_flush_all_writes_what_is_buffered(tmp_path: Path) -> None:
    path = tmp_path / "c.log"

    async def main() -> None:
        file_sink(str(path)).write("last words\n")  # the timer would fire in a second

    asyncio.run(main())
    flush_all()
    assert path.read_text() == "last words\n"


def test_unopenable_file_counts_drops(tmp_path: Path) -> None:
    stats = SinkStats(None)
    s = FileSink(str(tmp_path / "missing" / "d.log"), stats)
    s.write("lost\n")
    assert stats.dropped_lines.value == 1


def test_a_regular_file_is_written_by_the_loop_without_a_thread(tmp_path: Path) -> None:
    path = tmp_path / "e.log"
    stats = SinkStats(None)
    s = FileSink(str(path), stats)
    assert s.inline
    s.write("first\n")
    s.flush()
    # Written by the flush itself: no thread, nothing queued.
    assert path.read_text() == "first\n"
    assert s.thread is None and s.queue.unfinished_tasks == 0
    assert stats.write_completed.value == 1


def test_a_slow_write_moves_the_sink_to_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sink_mod, "INLINE_STALL", -1.0)  # every write counts as a stall
    path = tmp_path / "f.log"
    s = FileSink(str(path), SinkStats(None))
    s.write("on the loop\n")
    with caplog.at_level("WARNING", logger="ubimesh.access_log"):
        s.flush()
    assert path.read_text() == "on the loop\n"  # the slow write itself completed
    assert not s.inline
    assert "writing from a thread from now on" in caplog.text
    s.write("from the thread\n")
    s.flush()
    assert s.thread is not None
    assert s.drain(5.0)
    assert path.read_text() == "on the loop\nfrom the thread\n"


def test_a_pipe_or_a_device_is_written_by_the_thread() -> None:
    # /dev/stdout may be a pipe whose reader is slow: never written by the loop.
    s = FileSink("/dev/null", SinkStats(None))
    assert not s.inline
    s.write("gone\n")
    s.flush()
    assert s.thread is not None
    assert s.drain(5.0)
