"""The SQLite store: everything in one file (WAL mode), watch fan-out in process.

Tables: ``resources`` (kind, namespace, name, json, version), ``changes`` (the last
``change_log_limit`` changes: revision, type, key, json, version; replayed by
``watch(since=...)``) and ``meta`` (the global ``revision`` and the ``compacted`` revision below
which the change log has been trimmed). Every change takes the next revision; a resource's
``resource_version`` is the revision of its last change.

Every database call runs on one worker thread owned by the store (a single-thread executor):
calls are serialized, the event loop only waits for their results, and writes are
``BEGIN IMMEDIATE`` transactions, so the read-compare-write of ``apply`` is atomic even against
other processes using the file (their waits are bounded by ``busy_timeout``).

Watchers are fed from this store's own writes: two Store objects on the same file (in one
process or several) share data and revisions but do not see each other's writes as events.
Run one store per file and share it.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import sqlite3
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ubimesh.control.resources.model import Key, Resource
from ubimesh.control.store.base import (
    StoreError,
    WatchError,
    WatchEvent,
    check_expected,
    check_key,
)

__all__ = ["SqliteStore"]

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (k, v) VALUES ('revision', 0), ('compacted', 0);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    json TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY, type TEXT NOT NULL,
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    json TEXT NOT NULL, version INTEGER NOT NULL
);
"""


def _encode(resource: Resource) -> str:
    # The version lives in its own column; the JSON is the content only.
    return json.dumps(resource.with_version("").to_dict(), ensure_ascii=False)


def _decode(text: str, version: int, where: str) -> Resource:
    try:
        return Resource.from_dict(json.loads(text)).with_version(str(version))
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"SQLite store: stored {where} is unreadable: {exc!r}") from exc


@dataclass(frozen=True)
class _Row:
    type: Literal["PUT", "DELETE"]
    revision: int
    json: str
    version: int


class _Subscriber:
    """One watcher's bounded queue. Fed on the event loop thread only."""

    def __init__(self, kind: str | None, limit: int) -> None:
        self.kind = kind
        self.limit = limit
        self.items: deque[WatchEvent] = deque()
        self.wakeup = asyncio.Event()
        self.error: WatchError | None = None
        self.closed = False

    def offer(self, event: WatchEvent) -> bool:
        """Queue ``event``; False (and the subscriber ended) when the queue is full."""
        if len(self.items) >= self.limit:
            resume = self.items[-1].revision if self.items else event.revision - 1
            self.error = WatchError(
                f"SQLite store: watcher fell behind ({self.limit} events unread) and was "
                f"ended; list again and watch(since={resume}) to resume",
                resume_from=resume,
            )
            self.wakeup.set()
            return False
        self.items.append(event)
        self.wakeup.set()
        return True

    def end(self) -> None:
        self.closed = True
        self.wakeup.set()

    async def get(self) -> WatchEvent:
        # Events queued before an error or close are delivered first.
        while not self.items:
            if self.error is not None:
                raise self.error
            if self.closed:
                raise StopAsyncIteration
            self.wakeup.clear()
            await self.wakeup.wait()
        return self.items.popleft()


class _SqliteWatch:
    """The iterator ``SqliteStore.watch`` returns. It subscribes when created, so no change
    committed after ``watch()`` returns is missed, even before the first ``__anext__``."""

    def __init__(self, store: SqliteStore, kind: str | None, since: int | None) -> None:
        self._store = store
        self._kind = kind
        self._since = since
        self._sub = _Subscriber(kind, store.watch_queue_limit)
        self._replay: deque[WatchEvent] | None = None if since is not None else deque()
        # Events at or below this revision were delivered (or replayed): live copies are dropped.
        self._last = since if since is not None else 0
        if store.closed:
            self._sub.end()
        else:
            store._subscribers.add(self._sub)

    def __aiter__(self) -> _SqliteWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._replay is None:
            assert self._since is not None
            if self._store.closed:
                raise StopAsyncIteration
            try:
                self._replay = deque(await self._store._history(self._kind, self._since))
            except WatchError:
                await self.aclose()
                raise
        while True:
            event = self._replay.popleft() if self._replay else await self._sub.get()
            if event.revision > self._last:
                self._last = event.revision
                return event

    async def aclose(self) -> None:
        self._sub.end()
        self._store._subscribers.discard(self._sub)


class SqliteStore:
    """``Store`` on one SQLite file (or ``:memory:``). See the module docstring."""

    def __init__(
        self,
        path: str,
        *,
        change_log_limit: int = 10_000,
        watch_queue_limit: int = 1024,
        busy_timeout: float = 5.0,
    ) -> None:
        if change_log_limit < 1:
            raise ValueError(f"change_log_limit {change_log_limit!r}: expected at least 1")
        if watch_queue_limit < 1:
            raise ValueError(f"watch_queue_limit {watch_queue_limit!r}: expected at least 1")
        self.path = path
        self.change_log_limit = change_log_limit
        self.watch_queue_limit = watch_queue_limit
        self.closed = False
        # Subscribers are held weakly: a watch iterator dropped without aclose() goes away.
        self._subscribers: weakref.WeakSet[_Subscriber] = weakref.WeakSet()
        try:
            conn = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL: durable across process crashes, may lose the last commits on power loss.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store sqlite://{path}: {exc}") from exc
        self._conn = conn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ubimesh-sqlite")

    # ------------------------------------------------------------------------- plumbing

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self.closed:
            raise StoreError(f"SQLite store sqlite://{self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _publish(self, event: WatchEvent) -> None:
        """Fan ``event`` out (event loop thread; scheduled by the worker right after commit,
        so events are published in revision order)."""
        for sub in list(self._subscribers):
            if sub.kind is not None and sub.kind != event.resource.kind:
                continue
            if not sub.offer(event):
                self._subscribers.discard(sub)

    def _write(
        self,
        loop: asyncio.AbstractEventLoop,
        body: Callable[[sqlite3.Connection], _Row | None],
        key: Key,
    ) -> _Row | None:
        """Run ``body`` in a write transaction; record its change (if any) in the log."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = body(conn)
            if row is not None:
                conn.execute("UPDATE meta SET v = ? WHERE k = 'revision'", (row.revision,))
                conn.execute(
                    "INSERT INTO changes (revision, type, kind, namespace, name, json, version)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        row.revision,
                        row.type,
                        key.kind,
                        key.namespace,
                        key.name,
                        row.json,
                        row.version,
                    ),
                )
                floor = row.revision - self.change_log_limit
                if floor > 0:
                    conn.execute("DELETE FROM changes WHERE revision <= ?", (floor,))
                    conn.execute(
                        "UPDATE meta SET v = max(v, ?) WHERE k = 'compacted'", (floor,)
                    )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if row is not None:
            resource = _decode(row.json, row.version, f"change {row.revision}")
            loop.call_soon_threadsafe(
                self._publish, WatchEvent(row.type, resource, row.revision)
            )
        return row

    @staticmethod
    def _current(conn: sqlite3.Connection, key: Key) -> tuple[str, int] | None:
        found = conn.execute(
            "SELECT json, version FROM resources WHERE kind = ? AND namespace = ? AND name = ?",
            (key.kind, key.namespace, key.name),
        ).fetchone()
        return None if found is None else (str(found[0]), int(found[1]))

    @staticmethod
    def _next_revision(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT v FROM meta WHERE k = 'revision'").fetchone()[0]) + 1

    # ------------------------------------------------------------------------- the Store API

    async def get(self, key: Key) -> Resource | None:
        check_key(key)

        def read() -> Resource | None:
            cur = self._current(self._conn, key)
            return None if cur is None else _decode(cur[0], cur[1], str(key))

        return await self._run(read)

    async def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> list[Resource]:
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if namespace is not None:
            where.append("namespace = ?")
            args.append(namespace)
        sql = "SELECT kind, namespace, name, json, version FROM resources"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY kind, namespace, name"

        def read() -> list[Resource]:
            rows = self._conn.execute(sql, args).fetchall()
            return [_decode(r[3], r[4], str(Key(r[0], r[1], r[2]))) for r in rows]

        return await self._run(read)

    async def apply(self, resource: Resource, *, expected_version: str | None = None) -> Resource:
        key = resource.key
        check_key(key)
        text = _encode(resource)
        loop = asyncio.get_running_loop()
        kept: list[int] = []

        def body(conn: sqlite3.Connection) -> _Row | None:
            cur = self._current(conn, key)
            check_expected(key, expected_version, None if cur is None else str(cur[1]))
            if cur is not None and _decode(cur[0], cur[1], str(key)).same_content(resource):
                kept.append(cur[1])
                return None
            revision = self._next_revision(conn)
            conn.execute(
                "INSERT OR REPLACE INTO resources (kind, namespace, name, json, version)"
                " VALUES (?, ?, ?, ?, ?)",
                (key.kind, key.namespace, key.name, text, revision),
            )
            return _Row("PUT", revision, text, revision)

        row = await self._run(self._write, loop, body, key)
        version = row.version if row is not None else kept[0]
        return resource.with_version(str(version))

    async def delete(self, key: Key, *, expected_version: str | None = None) -> bool:
        check_key(key)
        loop = asyncio.get_running_loop()

        def body(conn: sqlite3.Connection) -> _Row | None:
            cur = self._current(conn, key)
            check_expected(key, expected_version, None if cur is None else str(cur[1]))
            if cur is None:
                return None
            conn.execute(
                "DELETE FROM resources WHERE kind = ? AND namespace = ? AND name = ?",
                (key.kind, key.namespace, key.name),
            )
            return _Row("DELETE", self._next_revision(conn), cur[0], cur[1])

        return await self._run(self._write, loop, body, key) is not None

    def watch(self, *, kind: str | None = None, since: int | None = None) -> _SqliteWatch:
        if since is not None and (not isinstance(since, int) or since < 0):
            raise ValueError(f"watch since={since!r}: expected a revision >= 0 or None")
        return _SqliteWatch(self, kind, since)

    async def _history(self, kind: str | None, since: int) -> builtins.list[WatchEvent]:
        """Changes after ``since`` from the change log; WatchError if it was trimmed past."""

        def read() -> builtins.list[WatchEvent]:
            conn = self._conn
            compacted = int(
                conn.execute("SELECT v FROM meta WHERE k = 'compacted'").fetchone()[0]
            )
            if since < compacted:
                raise WatchError(
                    f"SQLite store: cannot watch since revision {since}: the change log only "
                    f"holds changes after revision {compacted}; list again and watch from "
                    f"revision() instead",
                )
            sql = "SELECT revision, type, json, version FROM changes WHERE revision > ?"
            args: list[Any] = [since]
            if kind is not None:
                sql += " AND kind = ?"
                args.append(kind)
            events = []
            for revision, type_, text, version in conn.execute(sql + " ORDER BY revision", args):
                resource = _decode(text, version, f"change {revision}")
                kind_of: Literal["PUT", "DELETE"] = "DELETE" if type_ == "DELETE" else "PUT"
                events.append(WatchEvent(kind_of, resource, int(revision)))
            return events

        return await self._run(read)

    async def revision(self) -> int:
        def read() -> int:
            return int(self._conn.execute("SELECT v FROM meta WHERE k = 'revision'").fetchone()[0])

        return await self._run(read)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sub in list(self._subscribers):
            sub.end()
        self._subscribers.clear()
        # Queued calls finish first: the worker runs them in order.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)
