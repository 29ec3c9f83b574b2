"""SQLite store specifics: one WAL file that persists, a bounded change log, bounded watcher
queues (a slow watcher is ended, writers never wait for it), eager subscription, close."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from ubimesh.control.resources.model import Key, Resource
from ubimesh.control.store import ConflictError, WatchError, open_store
from ubimesh.control.store.sqlite import SqliteStore


def res(name: str = "ledger", port: int = 80) -> Resource:
    return Resource("ubimesh.io/v1alpha1", "Service", name, "payments", {"ports": [{"port": port}]})


def test_file_persists_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "store.db"

    async def first() -> str:
        store = open_store(f"sqlite://{path}")
        stored = await store.apply(res())
        await store.apply(res("other"))
        await store.close()
        return stored.resource_version

    async def second(version: str) -> None:
        store = open_store(f"sqlite://{path}")
        got = await store.get(Key("Service", "payments", "ledger"))
        assert got is not None and got.resource_version == version
        assert await store.revision() == 2
        updated = await store.apply(res(port=81), expected_version=version)
        assert updated.resource_version == "3"
        await store.close()

    version = asyncio.run(first())
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"resources", "changes", "meta"} <= tables
    asyncio.run(second(version))


def test_memory_store() -> None:
    async def body() -> None:
        store = open_store("sqlite://:memory:")
        assert (await store.apply(res())).resource_version == "1"
        assert [r.name for r in await store.list()] == ["ledger"]
        await store.close()

    asyncio.run(body())


def test_watch_subscribes_when_created(tmp_path: Path) -> None:
    async def body() -> None:
        store = open_store(f"sqlite://{tmp_path}/s.db")
        watch = store.watch()  # since=None: from now, even before the first __anext__
        await store.apply(res())
        event = await asyncio.wait_for(anext(watch), 2.0)
        assert (event.type, event.resource.name, event.revision) == ("PUT", "ledger", 1)
        await store.close()

    asyncio.run(body())


def test_slow_watcher_is_ended_and_writers_do_not_wait(tmp_path: Path) -> None:
    async def body() -> None:
        store = SqliteStore(str(tmp_path / "s.db"), watch_queue_limit=3)
        slow = store.watch()
        fast = store.watch()
        fast_seen: list[int] = []
        for i in range(6):
            await store.apply(res(f"s{i}"))
            fast_seen.append((await asyncio.wait_for(anext(fast), 2.0)).revision)
        assert fast_seen == [1, 2, 3, 4, 5, 6]
        # The slow watcher gets what it had queued, then a clear error saying where to resume.
        got = [(await anext(slow)).revision for _ in range(3)]
        assert got == [1, 2, 3]
        with pytest.raises(WatchError, match=r"fell behind .*watch\(since=3\)") as info:
            await anext(slow)
        assert info.value.resume_from == 3
        # Resuming as told loses nothing.
        resumed = store.watch(since=3)
        assert [(await anext(resumed)).revision for _ in range(3)] == [4, 5, 6]
        await store.close()

    asyncio.run(body())


def test_change_log_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "s.db"

    async def body() -> None:
        store = SqliteStore(str(path), change_log_limit=3)
        for i in range(6):
            await store.apply(res(f"s{i}"))
        with pytest.raises(WatchError, match="only holds changes after revision 3"):
            await anext(store.watch(since=2))
        replay = store.watch(since=3)
        assert [(await anext(replay)).resource.name for _ in range(3)] == ["s3", "s4", "s5"]
        await store.close()

    asyncio.run(body())
    with sqlite3.connect(path) as conn:
        assert [r[0] for r in conn.execute("SELECT revision FROM changes ORDER BY 1")] == [4, 5, 6]


def test_close_ends_watchers(tmp_path: Path) -> None:
    async def body() -> None:
        store = open_store(f"sqlite://{tmp_path}/s.db")
        watch = store.watch()
        waiting = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.05)
        await store.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 2.0)

    asyncio.run(body())


def test_two_stores_on_one_file_share_data_and_conflicts(tmp_path: Path) -> None:
    """Not a supported setup for watching (each store only sees its own writes as events),
    but data and optimistic concurrency stay right: writes are IMMEDIATE transactions."""

    async def body() -> None:
        one = open_store(f"sqlite://{tmp_path}/s.db")
        two = open_store(f"sqlite://{tmp_path}/s.db")
        base = await one.apply(res())
        await two.apply(res(port=81), expected_version=base.resource_version)
        with pytest.raises(ConflictError):
            await one.apply(res(port=82), expected_version=base.resource_version)
        assert await one.revision() == await two.revision() == 2
        await one.close()
        await two.close()

    asyncio.run(body())


def test_calls_are_fast_and_leave_the_loop_free(tmp_path: Path) -> None:
    """The database runs on the store's worker thread; a write round trip stays well under the
    budget even on a busy machine (no fsync per commit in WAL with synchronous=NORMAL)."""

    async def body() -> None:
        store = open_store(f"sqlite://{tmp_path}/s.db")
        began = time.perf_counter()
        for i in range(50):
            await store.apply(res(f"s{i}"))
        per_write = (time.perf_counter() - began) / 50
        assert per_write < 0.02, f"{per_write * 1000:.2f} ms per write"
        await store.close()

    asyncio.run(body())
