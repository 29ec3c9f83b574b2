"""Where access log lines go: one buffered file writer per path and process.

Lines are appended to an in-memory buffer on the event loop (no system call per line). The
buffer is handed to the writer when it passes ``FLUSH_BYTES`` or when ``FLUSH_INTERVAL``
(Envoy's default file_flush_interval, 1 s) has passed since its first line, whichever comes
first; the timer is armed only while the buffer holds something, so an idle proxy never wakes.

How a line gets here. A text format that the C renderer takes (``format.py``, ``_textline.c``:
every text format without an address command, when ``ubimesh build-native`` has built it) is
rendered as its request ends (``render_now``): one call writes the whole line, while the
entry's header lists are still in the CPU's caches. Measured against queuing and rendering
64 at a time, that was 6 % more throughput for the bench's 1 % telemetry target (bench/
telemetry_cpu.py --corun, tree A/B), where the C renderer alone, still queued, was not faster:
most likely the entries a batch held had gone cold by the time they were rendered and freed.

Other formats (JSON, and text lines in pure Python) queue their entries (``defer``) and are
rendered ``RENDER_BATCH`` at a time: logging a line is about 56,000 instructions in pure
Python. Counted with callgrind, the proxy executes exactly as many per request as the
micro-benchmark does, but in place, between a request's parsing, routing, kernel socket work
and the next request, they take about 4 times as long (instruction and data cache misses,
mispredicted branches; bench/telemetry_cpu.py): that was issue 6's "unexplained" telemetry
cost. Rendered back to back, the formatter's code stays warm; a request pays for building its
``LogEntry`` and one append. The order of lines in a file is the order of
``defer``/``render_now``/``write`` calls, and a flush (timer, size, drain, exit) renders what
is pending first. The entries hold the stream's request and response header lists, which are
not changed once a stream has ended; at most ``RENDER_BATCH`` are held.

Where the ``write`` calls happen. A pipe, a socket or a terminal (/dev/stdout behind a slow
reader) can block a writer for as long as its reader pleases, so for those one daemon thread
per sink does the writing: the loop only does ``put_nowait`` of an already-joined chunk on a
queue bounded to ``MAX_CHUNKS``; when the queue is full the chunk is dropped and its lines are
counted in ``access_log.dropped_lines``, so memory stays bounded whatever the reader does.
A regular file is written by the loop itself, one ``write`` per chunk (about every 300
lines): the kernel copies it into the page cache and returns, typically in tens of µs. The
thread cost more than that: each chunk handed over took several GIL handoffs between it and
the loop, about 0.1 context switches per logged request and up to a third more CPU per
request under load (bench/telemetry_cpu.py, ``ctx sw/req``). A regular file can still stall
(dirty-page throttling, NFS, a FUSE file system), so a write that takes longer than
``INLINE_STALL`` moves the sink to the thread for good, with a warning: one stall at most.

Several workers (forked processes) share a file: it is opened with O_APPEND and every chunk is
whole lines, written by one ``write`` call (looping only on a short write), so lines of
different workers do not interleave inside a line for regular files. /dev/stdout and
/dev/stderr write to a duplicate of the process's fd 1 / 2 (that also works when they are a
socket, which opening /dev/stdout would not).

Stats (per process, summed by /stats across workers): ``filesystem.write_buffered`` (lines
accepted), ``filesystem.write_completed`` (chunks written), ``filesystem.write_failed``,
``filesystem.flushed_by_timer`` (Envoy's names) and ``access_log.dropped_lines``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import queue
import stat
import threading
import time
from typing import TYPE_CHECKING, Final

from ubimesh.telemetry.stats import Counter, Store

if TYPE_CHECKING:
    from ubimesh.proxy.access_log.format import LogEntry, LogFormat

log = logging.getLogger("ubimesh.access_log")

FLUSH_INTERVAL = 1.0
FLUSH_BYTES = 64 * 1024
#: Entries queued by ``defer`` before they are rendered together (see the module docstring):
#: enough for the formatter to run hot, few enough that rendering them (about 0.3 ms compiled,
#: 1 ms in pure Python) is not a latency step.
RENDER_BATCH: Final = 64  # Final: a C constant under mypyc, not a module dict lookup
#: Chunks waiting for the writer thread (each about FLUSH_BYTES): about 4 MiB at most.
MAX_CHUNKS = 64
#: How long a flush at shutdown waits for the writer.
CLOSE_TIMEOUT = 2.0
#: A write of a regular file on the loop that takes longer than this (seconds) moves the sink
#: to its writer thread for good (see the module docstring).
INLINE_STALL = 0.01


class SinkStats:
    __slots__ = ("dropped_lines", "flushed_by_timer", "write_buffered", "write_completed",
                 "write_failed")  # fmt: skip

    def __init__(self, store: Store | None) -> None:
        def counter(name: str) -> Counter:
            return store.counter(name) if store is not None else Counter()

        self.write_buffered = counter("filesystem.write_buffered")
        self.write_completed = counter("filesystem.write_completed")
        self.write_failed = counter("filesystem.write_failed")
        self.flushed_by_timer = counter("filesystem.flushed_by_timer")
        self.dropped_lines = counter("access_log.dropped_lines")


def _open(path: str) -> int:
    if path == "/dev/stdout":
        return os.dup(1)
    if path == "/dev/stderr":
        return os.dup(2)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


class FileSink:
    """A buffered, never-blocking line writer for one path (see the module docstring)."""

    def __init__(self, path: str, stats: SinkStats) -> None:
        self.path = path
        self.stats = stats
        self.fd = -1
        try:
            self.fd = _open(path)
        except OSError as exc:
            # The translator checked the directory; a file that cannot be opened now (its
            # permissions) loses its lines, counted, rather than stopping the proxy.
            log.error("access log %s cannot be opened: %s; its lines are dropped", path, exc)
        self.inline = False
        """Whether the loop writes (a regular file that has not stalled) rather than the
        writer thread."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):  # unknown: the thread, the safe side
                self.inline = stat.S_ISREG(os.fstat(self.fd).st_mode)
        self.buffer: list[str] = []
        """Whole lines: a line handed to ``write``, or a rendered batch of lines."""
        self.size = 0
        self.entries: list[LogEntry] = []
        """Entries not rendered yet, each with its format in ``formats`` (same index)."""
        self.formats: list[LogFormat] = []
        self.timer: asyncio.TimerHandle | None = None
        self.queue: queue.Queue[bytes] = queue.Queue(MAX_CHUNKS)
        self.thread: threading.Thread | None = None

    def defer(self, fmt: LogFormat, entry: LogEntry) -> None:
        """Queue one entry, to be rendered with ``fmt`` with the next batch (the request path:
        one append; see the module docstring)."""
        entries = self.entries
        entries.append(entry)
        self.formats.append(fmt)
        self.stats.write_buffered.value += 1
        if len(entries) >= RENDER_BATCH:
            self.render_pending()
            if self.size >= FLUSH_BYTES:
                self.flush()
                return
        if self.timer is None:
            self._arm()

    def render_now(self, fmt: LogFormat, entry: LogEntry) -> None:
        """Render one entry with ``fmt`` straight into the buffer, after any entry queued
        before it: for a format rendered in C (``LogFormat.program``), which is cheaper while
        the entry's headers are still in the cache than a batch later."""
        if self.entries:
            self.render_pending()
        buffer = self.buffer
        start = len(buffer)
        fmt.render_into(entry, buffer)
        added = 0
        for i in range(start, len(buffer)):  # one line from C; pieces if it declined
            added += len(buffer[i])
        self._buffered(added)

    def render_pending(self) -> None:
        """Render the queued entries, in order, into one string appended to the buffer.

        The formats append each line's pieces to one list, joined once for the whole batch: a
        string per line would be built, measured and copied again by ``flush``'s join (a
        fifth of a text line's cost was that per-line join and its allocations)."""
        entries = self.entries
        if not entries:
            return
        formats = self.formats
        self.entries = []
        self.formats = []
        pieces: list[str] = []
        for i in range(len(entries)):
            formats[i].render_into(entries[i], pieces)
        rendered = "".join(pieces)
        self.buffer.append(rendered)
        self.size += len(rendered)

    def write(self, line: str) -> None:
        """Buffer one line (it carries its own newline), after any entry queued before it."""
        if self.entries:
            self.render_pending()
        self.buffer.append(line)
        self._buffered(len(line))

    def _buffered(self, size: int) -> None:
        """Count one line of ``size`` characters just added to the buffer; flush at
        ``FLUSH_BYTES``, else make sure the timer will."""
        self.size += size
        self.stats.write_buffered.value += 1
        if self.size >= FLUSH_BYTES:
            self.flush()
        elif self.timer is None:
            self._arm()

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop (a tool, a test): write through
            return
        self.timer = loop.call_later(FLUSH_INTERVAL, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.buffer or self.entries:
            self.stats.flushed_by_timer.value += 1
            self.flush()

    def flush(self) -> None:
        """Render what is queued and hand the buffered lines to the writer thread (or drop and
        count them)."""
        if self.entries:
            self.render_pending()
        buffered = self.buffer
        if not buffered:
            return
        lines = len(buffered)
        chunk = "".join(buffered).encode("utf-8", "backslashreplace")
        self.buffer = []
        self.size = 0
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        if self.fd < 0:
            self.stats.dropped_lines.value += lines
            return
        if self.inline:
            self._write_inline(chunk)
            return
        if self.thread is None:
            self.thread = threading.Thread(
                target=self._writer, name=f"access-log {self.path}", daemon=True
            )
            self.thread.start()
        try:
            self.queue.put_nowait(chunk)
        except queue.Full:
            self.stats.dropped_lines.value += lines

    def _write_inline(self, chunk: bytes) -> None:
        """Write ``chunk`` from the loop (a regular file); a slow write moves the sink to the
        writer thread for the chunks after it."""
        started = time.monotonic()
        self._write_chunk(chunk)
        took = time.monotonic() - started
        if took > INLINE_STALL:
            self.inline = False
            log.warning(
                "access log %s: a write took %.0f ms on the event loop; writing from a "
                "thread from now on", self.path, took * 1000,
            )  # fmt: skip

    def _write_chunk(self, chunk: bytes) -> None:
        """One chunk, whole (a loop only on a short write); counted as written or failed."""
        view = memoryview(chunk)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            # Counted off the loop too (the thread): writers of several files share these
            # counters, so two increments at the same instant may count once (a stat, not
            # a ledger).
            self.stats.write_completed.value += 1
        except OSError as exc:
            self.stats.write_failed.value += 1
            log.warning("access log %s: write failed: %s", self.path, exc)

    def _writer(self) -> None:
        """The writer thread: one ``write`` per chunk (a loop only on a short write)."""
        while True:
            chunk = self.queue.get()
            try:
                self._write_chunk(chunk)
            finally:
                self.queue.task_done()

    def drain(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Flush and wait (up to ``timeout``) until the writer has written everything queued;
        the sink stays usable. Returns whether everything was written."""
        self.flush()
        if self.thread is None:
            return True
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True


_sinks: dict[str, FileSink] = {}
_owner_pid = 0


def file_sink(path: str, store: Store | None = None) -> FileSink:
    """The process's sink for ``path`` (one per path, whatever the number of access logs
    writing there). A forked worker gets its own: the parent's threads do not survive a fork."""
    global _owner_pid
    pid = os.getpid()
    if pid != _owner_pid:
        _sinks.clear()
        _owner_pid = pid
    sink = _sinks.get(path)
    if sink is None:
        # The store's counters are shared by name: every sink counts into the same ones.
        sink = _sinks[path] = FileSink(path, SinkStats(store))
    return sink


def flush_all(timeout: float = CLOSE_TIMEOUT) -> None:
    """Write out every buffered line (graceful shutdown, and at exit). The writer threads are
    daemons: nothing else is needed for the process to end."""
    if os.getpid() != _owner_pid:
        return
    deadline = time.monotonic() + timeout
    for sink in list(_sinks.values()):
        sink.drain(max(0.0, deadline - time.monotonic()))


atexit.register(flush_all)
