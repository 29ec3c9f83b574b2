"""Where access log lines go: one buffered file writer per path and process.

Lines are appended to an in-memory buffer on the event loop (no system call per line). The
buffer is handed to the writer when it passes ``FLUSH_BYTES`` or when ``FLUSH_INTERVAL``
(Envoy's default file_flush_interval, 1 s) has passed since its first line, whichever comes
first; the timer is armed only while the buffer holds something, so an idle proxy never wakes.

Why a writer thread and not ``os.write`` on the loop: a regular file never reports "would
block" (O_NONBLOCK is ignored for files), so a slow disk, a full pipe behind /dev/stdout or an
NFS stall would stall the event loop and every connection on it. One daemon thread per sink
does the ``write`` calls; the loop only does ``put_nowait`` of an already-joined chunk on a
queue bounded to ``MAX_CHUNKS``. When the queue is full the chunk is dropped and its lines are
counted in ``access_log.dropped_lines``: memory stays bounded whatever the disk does.

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
import logging
import os
import queue
import threading
import time

from ubimesh.telemetry.stats import Counter, Store

log = logging.getLogger("ubimesh.access_log")

FLUSH_INTERVAL = 1.0
FLUSH_BYTES = 64 * 1024
#: Chunks waiting for the writer thread (each about FLUSH_BYTES): about 4 MiB at most.
MAX_CHUNKS = 64
#: How long a flush at shutdown waits for the writer.
CLOSE_TIMEOUT = 2.0


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
        self.buffer: list[str] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None
        self.queue: queue.Queue[bytes] = queue.Queue(MAX_CHUNKS)
        self.thread: threading.Thread | None = None

    def write(self, line: str) -> None:
        """Buffer one line (it carries its own newline)."""
        self.buffer.append(line)
        self.size += len(line)
        self.stats.write_buffered.value += 1
        if self.size >= FLUSH_BYTES:
            self.flush()
        elif self.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()  # no loop (a tool, a test): write through
                return
            self.timer = loop.call_later(FLUSH_INTERVAL, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.buffer:
            self.stats.flushed_by_timer.value += 1
            self.flush()

    def flush(self) -> None:
        """Hand the buffered lines to the writer thread (or drop and count them)."""
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
        if self.thread is None:
            self.thread = threading.Thread(
                target=self._writer, name=f"access-log {self.path}", daemon=True
            )
            self.thread.start()
        try:
            self.queue.put_nowait(chunk)
        except queue.Full:
            self.stats.dropped_lines.value += lines

    def _writer(self) -> None:
        """The writer thread: one ``write`` per chunk (a loop only on a short write)."""
        while True:
            chunk = self.queue.get()
            view = memoryview(chunk)
            try:
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                # Counted off the loop: writers of several files share these counters, so
                # two increments at the same instant may count once (a stat, not a ledger).
                self.stats.write_completed.value += 1
            except OSError as exc:
                self.stats.write_failed.value += 1
                log.warning("access log %s: write failed: %s", self.path, exc)
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
