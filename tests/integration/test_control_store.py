"""The store contract (docs/control-plane.md section 2), run on both backends: SQLite on a file
under tmp_path, and a real etcd member started for this module (tests/support/etcd.py).

The etcd cases are skipped, saying why, only when the etcd binary is missing.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.etcd import ETCD_MISSING, EtcdCluster, b64, etcd_binary, etcd_post
from tests.support.etcd import start_etcd_cluster as _start_etcd

from ubimesh.control.resources.model import Key, Resource
from ubimesh.control.store import ConflictError, Store, WatchEvent, open_store

Body = Callable[[Store], Awaitable[None]]


def run(url: str, body: Body, timeout: float = 15.0) -> None:
    """Open the store at ``url``, run ``body`` on it (bounded in time), close it."""

    async def main() -> None:
        store = open_store(url)
        try:
            await asyncio.wait_for(body(store), timeout)
        finally:
            await store.close()

    asyncio.run(main())


@pytest.fixture(scope="module")
def etcd_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if etcd_binary() is None:
        pytest.skip(ETCD_MISSING)
    cluster = _start_etcd(tmp_path_factory.mktemp("etcd"), size=1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "etcd"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/store.db"
    cluster: EtcdCluster = request.getfixturevalue("etcd_single")
    # One member serves the whole module: each test starts from an empty key space.
    prefix = "/ubimesh/resources/"
    etcd_post(
        cluster.members[0].client_port,
        "/v3/kv/deleterange",
        {"key": b64(prefix), "range_end": b64(prefix[:-1] + "0")},
    )
    return cluster.url


def res(
    kind: str = "Service",
    name: str = "ledger",
    namespace: str = "payments",
    spec: dict[str, Any] | None = None,
    **meta: Any,
) -> Resource:
    api = "ubimesh.io/v1alpha1"
    return Resource(api, kind, name, namespace, spec or {"ports": [{"port": 80}]}, **meta)


async def next_events(watch: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    """The next ``count`` events, each awaited at most 5 s."""
    return [await asyncio.wait_for(anext(watch), 5.0) for _ in range(count)]


def summary(events: list[WatchEvent]) -> list[tuple[str, str, str]]:
    return [(e.type, e.resource.kind, e.resource.name) for e in events]


# --------------------------------------------------------------------------------- get / list


def test_apply_creates_and_get_reads_back(url: str) -> None:
    async def body(store: Store) -> None:
        assert await store.get(Key("Service", "payments", "ledger")) is None
        before = await store.revision()
        stored = await store.apply(res())
        assert stored.resource_version != ""
        assert int(stored.resource_version) > before
        assert await store.revision() == int(stored.resource_version)
        got = await store.get(Key("Service", "payments", "ledger"))
        assert got == stored
        assert got is not None and got.same_content(res())

    run(url, body)


def test_list_filters_by_kind_and_namespace(url: str) -> None:
    async def body(store: Store) -> None:
        await store.apply(res("Mesh", "default", "", {"trustDomain": "cluster.local"}))
        await store.apply(res("Service", "ledger", "payments"))
        await store.apply(res("Service", "api", "payments"))
        await store.apply(res("Service", "web", "shop"))
        await store.apply(res("Workload", "ledger-1", "payments", {"service": "ledger"}))

        def names(items: list[Resource]) -> list[str]:
            return [str(r.key) for r in items]

        assert names(await store.list()) == [
            "Mesh default",
            "Service payments/api",
            "Service payments/ledger",
            "Service shop/web",
            "Workload payments/ledger-1",
        ]
        assert names(await store.list(kind="Service")) == [
            "Service payments/api",
            "Service payments/ledger",
            "Service shop/web",
        ]
        assert names(await store.list(namespace="payments")) == [
            "Service payments/api",
            "Service payments/ledger",
            "Workload payments/ledger-1",
        ]
        assert names(await store.list(kind="Service", namespace="shop")) == ["Service shop/web"]
        assert names(await store.list(namespace="")) == ["Mesh default"]
        assert await store.list(kind="TrafficSplit") == []
        assert all(r.resource_version for r in await store.list())

    run(url, body)


# --------------------------------------------------------------------------------- apply


def test_update_bumps_version_and_identical_apply_is_a_no_op(url: str) -> None:
    async def body(store: Store) -> None:
        first = await store.apply(res())
        second = await store.apply(res(spec={"ports": [{"port": 81}]}))
        assert int(second.resource_version) > int(first.resource_version)
        rev = await store.revision()
        watch = store.watch(since=rev)
        # Same content (whatever version or source the caller carries): nothing changes.
        same = await store.apply(
            res(spec={"ports": [{"port": 81}]}, resource_version="1", source="x.yaml#0")
        )
        assert same.resource_version == second.resource_version
        assert await store.revision() == rev
        # A label is content: it is a change.
        third = await store.apply(res(spec={"ports": [{"port": 81}]}, labels={"tier": "db"}))
        assert int(third.resource_version) > rev
        events = await next_events(watch, 1)
        assert events[0].revision == int(third.resource_version)  # no event for the no-op
        assert events[0].resource.labels == {"tier": "db"}

    run(url, body)


def test_apply_expected_version_cases(url: str) -> None:
    async def body(store: Store) -> None:
        key = Key("Service", "payments", "ledger")
        # "" = must not exist: creates when absent ...
        created = await store.apply(res(), expected_version="")
        # ... and conflicts when present (even with identical content).
        with pytest.raises(ConflictError) as info:
            await store.apply(res(), expected_version="")
        assert info.value.key == key and info.value.actual == created.resource_version
        assert "Service payments/ledger" in str(info.value)
        assert created.resource_version in str(info.value)

        # A version: must equal the stored one.
        updated = await store.apply(
            res(spec={"ports": [{"port": 81}]}), expected_version=created.resource_version
        )
        with pytest.raises(ConflictError) as info:
            await store.apply(
                res(spec={"ports": [{"port": 82}]}), expected_version=created.resource_version
            )
        message = str(info.value)
        assert created.resource_version in message and updated.resource_version in message
        assert info.value.expected == created.resource_version
        stored = await store.get(key)
        assert stored is not None and stored.spec == {"ports": [{"port": 81}]}

        # A version for a key that does not exist.
        with pytest.raises(ConflictError) as info:
            await store.apply(res(name="nope"), expected_version=updated.resource_version)
        assert info.value.actual is None and "nothing stored" in str(info.value)
        assert await store.get(Key("Service", "payments", "nope")) is None

        # None = unconditional.
        assert (await store.apply(res(spec={"ports": [{"port": 83}]}))).resource_version

    run(url, body)


def test_concurrent_conditional_applies_one_wins(url: str) -> None:
    async def body(store: Store) -> None:
        base = await store.apply(res())
        version = base.resource_version
        attempts = [
            store.apply(res(spec={"ports": [{"port": 1000 + i}]}), expected_version=version)
            for i in range(5)
        ]
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
        winners = [o for o in outcomes if isinstance(o, Resource)]
        assert len(winners) == 1, outcomes
        assert all(isinstance(o, ConflictError) for o in outcomes if o not in winners)
        assert await store.get(base.key) == winners[0]

    run(url, body)


# --------------------------------------------------------------------------------- delete


def test_delete_cases(url: str) -> None:
    async def body(store: Store) -> None:
        key = Key("Service", "payments", "ledger")
        assert await store.delete(key) is False
        assert await store.delete(key, expected_version="") is False
        with pytest.raises(ConflictError):
            await store.delete(key, expected_version="7")

        stored = await store.apply(res())
        with pytest.raises(ConflictError):
            await store.delete(key, expected_version="")
        with pytest.raises(ConflictError) as info:
            await store.delete(key, expected_version=str(int(stored.resource_version) - 1))
        assert info.value.actual == stored.resource_version
        assert await store.get(key) == stored
        assert await store.delete(key, expected_version=stored.resource_version) is True
        assert await store.get(key) is None

        await store.apply(res())
        before = await store.revision()
        assert await store.delete(key) is True
        assert await store.revision() > before
        assert await store.list() == []

    run(url, body)


# --------------------------------------------------------------------------------- watch


def test_watch_put_and_delete_in_order(url: str) -> None:
    async def body(store: Store) -> None:
        watch = store.watch(since=await store.revision())
        a = await store.apply(res(name="a"))
        b = await store.apply(res(name="b"))
        a2 = await store.apply(res(name="a", spec={"ports": [{"port": 90}]}))
        await store.delete(b.key)
        events = await next_events(watch, 4)
        assert summary(events) == [
            ("PUT", "Service", "a"),
            ("PUT", "Service", "b"),
            ("PUT", "Service", "a"),
            ("DELETE", "Service", "b"),
        ]
        revisions = [e.revision for e in events]
        assert revisions == sorted(set(revisions))
        assert events[0].resource == a and events[1].resource == b and events[2].resource == a2
        # A DELETE carries the resource as it was last stored; its revision is the deletion's.
        assert events[3].resource == b
        assert events[3].revision > int(a2.resource_version)
        assert events[3].revision == await store.revision()

    run(url, body)


def test_watch_since_replays_history_and_filters_kind(url: str) -> None:
    async def body(store: Store) -> None:
        await store.apply(res(name="old"))
        mark = await store.revision()
        await store.apply(res(name="new"))
        await store.apply(res("Workload", "w1", spec={"service": "new"}))
        await store.delete(Key("Service", "payments", "old"))

        everything = store.watch(since=mark)
        assert summary(await next_events(everything, 3)) == [
            ("PUT", "Service", "new"),
            ("PUT", "Workload", "w1"),
            ("DELETE", "Service", "old"),
        ]
        services = store.watch(kind="Service", since=mark)
        assert summary(await next_events(services, 2)) == [
            ("PUT", "Service", "new"),
            ("DELETE", "Service", "old"),
        ]
        # History then live, without a gap or a repeat.
        await store.apply(res(name="later"))
        assert summary(await next_events(services, 1)) == [("PUT", "Service", "later")]
        assert summary(await next_events(everything, 1)) == [("PUT", "Service", "later")]

    run(url, body)


def test_watchers_running_before_writes(url: str) -> None:
    async def body(store: Store) -> None:
        start = await store.revision()

        async def collect(kind: str | None, count: int) -> list[WatchEvent]:
            return await next_events(store.watch(kind=kind, since=start), count)

        everything = asyncio.ensure_future(collect(None, 4))
        workloads = asyncio.ensure_future(collect("Workload", 2))
        await asyncio.sleep(0.2)  # both consumers are waiting before anything is written
        await store.apply(res(name="s1"))
        await store.apply(res("Workload", "w1", spec={"service": "s1"}))
        await store.apply(res(name="s2"))
        await store.delete(Key("Workload", "payments", "w1"))
        got_all, got_workloads = await asyncio.gather(everything, workloads)
        assert summary(got_all) == [
            ("PUT", "Service", "s1"),
            ("PUT", "Workload", "w1"),
            ("PUT", "Service", "s2"),
            ("DELETE", "Workload", "w1"),
        ]
        assert summary(got_workloads) == [("PUT", "Workload", "w1"), ("DELETE", "Workload", "w1")]
        assert [e.revision for e in got_workloads] == [got_all[1].revision, got_all[3].revision]

    run(url, body)


def test_revision_is_monotonic(url: str) -> None:
    async def body(store: Store) -> None:
        seen = [await store.revision()]
        for i in range(5):
            await store.apply(res(name=f"s{i}"))
            seen.append(await store.revision())
        await store.apply(res(name="s0"))  # no-op
        seen.append(await store.revision())
        await store.delete(Key("Service", "payments", "s1"))
        seen.append(await store.revision())
        assert all(b > a for a, b in itertools.pairwise(seen[:6]))
        assert seen[6] == seen[5]
        assert seen[7] > seen[6]

    run(url, body)


def test_values_round_trip_exactly(url: str) -> None:
    spec = {
        "ports": [{"name": "http", "port": 8080, "protocol": "http", "targetPort": 9090}],
        "nested": {"deep": {"list": [1, 2.5, -3, True, False, None, "x"], "empty": {}}},
        "emptyList": [],
        "text": "héllo wörld ✓ 你好 🚀 \"quoted\" back\\slash\nnewline",
        "big": 2**53,
        "small": 1e-9,
    }
    original = res(
        "Service",
        "ledger",
        "payments",
        spec,
        labels={"app": "ledger", "ünï": "côdé"},
        annotations={"note": "☃ snow", "json": '{"a": [1, 2]}'},
    )

    async def body(store: Store) -> None:
        watch = store.watch(since=await store.revision())
        stored = await store.apply(original)
        got = await store.get(original.key)
        assert got is not None
        assert got.to_dict() == stored.to_dict()
        assert got.spec == spec and got.labels == original.labels
        assert got.annotations == original.annotations
        assert got.api_version == original.api_version
        [listed] = await store.list()
        assert listed.to_dict() == stored.to_dict()
        [event] = await next_events(watch, 1)
        assert event.resource.to_dict() == stored.to_dict()

    run(url, body)


# --------------------------------------------------------------------------------- open_store


@pytest.mark.parametrize(
    "bad",
    ["postgres://x", "sqlite://relative.db", "sqlite:///tmp/dir/", "etcd://", "etcd://host",
     "etcd://127.0.0.1:99999", "etcd://127.0.0.1:2379,nohost", ""],
)  # fmt: skip
def test_open_store_refuses_bad_urls(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "sqlite:///" in message and "etcd://host:port" in message


def test_keys_with_slashes_are_refused(url: str) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(ValueError, match="name 'a/b' contains '/'"):
            await store.apply(res(name="a/b"))
        with pytest.raises(ValueError, match="name is empty"):
            await store.get(Key("Service", "payments", ""))

    run(url, body)
