"""The bounded write queue and the thread that drains it into the store.

Contract: :meth:`SpanWriter.offer` queues a request's rows and returns True, or returns False
without queueing anything when that would put more than ``max_queued`` spans in the queue (the
API answers 503 with Retry-After then): memory is bounded whatever the clients send. The
thread writes everything queued at once, up to ``max_batch`` spans per transaction, and runs
the retention sweep every ``sweep_interval_s``. It lets a small queue linger up to ``linger_s``
until ``min_batch`` spans are queued: one transaction per few requests costs a third less CPU
per span than one per request (every commit rewrites the touched index pages). A batch the
database refuses (locked past the busy timeout) stays queued and is retried, so a request that
got 202 is not lost unless the process dies. :meth:`flush` waits until everything queued so
far is written (tests, shutdown).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from ubimesh.collector.model import Row
from ubimesh.collector.store import SpanStore, now_us

log = logging.getLogger("ubimesh.collector")

#: Pause after the database refused a batch, before trying again.
RETRY_PAUSE_S = 0.1
MIN_BATCH = 1000
LINGER_S = 0.05


class SpanWriter:
    """A background thread owning the store's write connection."""

    def __init__(self, directory: Path, *, max_queued: int, max_batch: int = 20_000,
                 retention_s: float = 0.0, max_spans: int = 0,
                 sweep_interval_s: float = 10.0) -> None:
        self.store = SpanStore(directory)
        self.max_queued = max_queued
        self.max_batch = max_batch
        self.retention_us = int(retention_s * 1_000_000)
        self.max_spans = max_spans
        self.sweep_interval_s = sweep_interval_s
        self.min_batch = MIN_BATCH
        self.linger_s = LINGER_S
        self.queued = 0  # spans in the queue (guarded by _cond)
        self.written = 0
        self.rejected = 0
        self.deleted = 0
        self._queue: deque[Sequence[Row]] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._flushing = 0  # callers waiting in flush(): no lingering then
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="collector-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, rows: Sequence[Row]) -> bool:
        """Queue ``rows`` unless the queue would exceed its bound; thread-safe."""
        with self._cond:
            # the batch being written counts: it is in memory until its commit
            if self.pending + len(rows) > self.max_queued or self._stopping:
                self.rejected += len(rows)
                return False
            self._queue.append(rows)
            self.queued += len(rows)
            if self.queued >= self.min_batch or len(self._queue) == 1:
                self._cond.notify_all()
        return True

    @property
    def pending(self) -> int:
        """Spans accepted and not yet committed (queued or being written)."""
        return self.queued + self._in_flight

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every span queued before the call is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self.queued or self._in_flight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            finally:
                self._flushing -= 1
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most ``timeout``), then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.store.close()

    def _take(self) -> list[Row] | None:
        with self._cond:
            deadline = time.monotonic() + self.sweep_interval_s
            while not self._queue and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []  # time to sweep
                self._cond.wait(remaining)
            if not self._queue:
                return None  # stopping
            linger_until = time.monotonic() + self.linger_s
            while (self.queued < self.min_batch and not self._flushing
                   and not self._stopping):
                remaining = linger_until - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[Row] = []
            while self._queue and len(batch) < self.max_batch:
                rows = self._queue.popleft()
                batch.extend(rows)
            self.queued -= len(batch)
            self._in_flight = len(batch)
            return batch

    def _run(self) -> None:
        next_sweep = time.monotonic() + self.sweep_interval_s
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._write(batch)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.sweep_interval_s
                self._sweep()

    def _write(self, batch: list[Row]) -> None:
        while True:
            try:
                self.store.insert(batch)
                break
            except sqlite3.OperationalError as exc:
                if self._stopping:
                    log.error("dropping %d spans at shutdown: %s", len(batch), exc)
                    break
                log.warning("writing %d spans failed (%s); retrying", len(batch), exc)
                time.sleep(RETRY_PAUSE_S)
        with self._cond:
            self.written += len(batch)
            self._in_flight = 0
            self._cond.notify_all()

    def _sweep(self) -> None:
        if not self.retention_us and not self.max_spans:
            return
        try:
            deleted = self.store.sweep(now_us(), self.retention_us, self.max_spans)
        except sqlite3.OperationalError as exc:
            log.warning("retention sweep failed (%s); next time", exc)
            return
        self.deleted += deleted
        if deleted:
            log.info("retention: deleted %d spans", deleted)
