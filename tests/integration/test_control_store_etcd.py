"""etcd store specifics on real members (tests/support/etcd.py): failing over between the
members of a three-member cluster (a watch included), dead endpoints, bounded waits,
compacted history, the key layout.

Skipped, saying why, only when the etcd binary is missing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.etcd import (
    ETCD_MISSING,
    EtcdCluster,
    EtcdMember,
    b64,
    etcd_binary,
    etcd_post,
    start_etcd_cluster,
)
from tests.support.procs import free_ports

from ubimesh.control.resources.model import Key, Resource
from ubimesh.control.store import ConflictError, StoreUnavailableError, WatchError, open_store
from ubimesh.control.store.etcd import EtcdStore

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason=ETCD_MISSING)


def res(name: str = "ledger", port: int = 80) -> Resource:
    return Resource("ubimesh.io/v1alpha1", "Service", name, "payments", {"ports": [{"port": port}]})


def leader_of(cluster: EtcdCluster) -> EtcdMember:
    for member in cluster.members:
        status = etcd_post(member.client_port, "/v3/maintenance/status", {})
        assert isinstance(status, dict)
        if status["leader"] == status["header"]["member_id"]:
            return member
    raise AssertionError(f"no leader among the members\n{cluster.describe()}")


@pytest.fixture
def single(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = start_etcd_cluster(tmp_path, size=1)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_keys_and_values_layout(single: EtcdCluster) -> None:
    async def body() -> None:
        store = open_store(single.url)
        stored = await store.apply(res())
        await store.close()
        answer = etcd_post(
            single.members[0].client_port,
            "/v3/kv/range",
            {"key": b64("/ubimesh/resources/Service/payments/ledger")},
        )
        assert isinstance(answer, dict)
        [kv] = answer["kvs"]
        assert kv["mod_revision"] == stored.resource_version

    asyncio.run(body())


def test_dead_endpoints_are_skipped(single: EtcdCluster) -> None:
    dead = free_ports(2)  # nobody listens there

    async def body() -> None:
        url = f"etcd://127.0.0.1:{dead[0]},127.0.0.1:{dead[1]},{single.members[0].endpoint}"
        store = open_store(url)
        assert isinstance(store, EtcdStore)
        await store.apply(res())
        assert store.current_endpoint.endswith(f":{single.members[0].client_port}")
        watch = store.watch(since=0)
        assert (await asyncio.wait_for(anext(watch), 5.0)).resource.name == "ledger"
        await store.close()

    asyncio.run(body())


def test_unreachable_cluster_fails_in_bounded_time() -> None:
    dead = free_ports(2)

    async def body() -> None:
        store = EtcdStore(
            [("127.0.0.1", dead[0]), ("127.0.0.1", dead[1])],
            request_timeout=0.5,
            operation_timeout=1.0,
        )
        began = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            await store.get(Key("Service", "payments", "ledger"))
        assert time.monotonic() - began < 3.0
        assert f"127.0.0.1:{dead[0]}" in str(info.value) and "within 1.0 s" in str(info.value)
        with pytest.raises(WatchError, match="watch lost"):
            await asyncio.wait_for(anext(store.watch()), 5.0)
        await store.close()

    asyncio.run(body())


class RacyStore(EtcdStore):
    """An etcd store that lets another writer in between its read and its transaction once."""

    interloper: Callable[[], Awaitable[object]] | None = None

    async def _range_one(self, key: str) -> dict[str, Any] | None:
        kv = await super()._range_one(key)
        if self.interloper is not None:
            interloper, self.interloper = self.interloper, None
            await interloper()
        return kv


def test_a_write_between_read_and_transaction_is_detected(single: EtcdCluster) -> None:
    async def body() -> None:
        other = open_store(single.url)
        racy = RacyStore([("127.0.0.1", single.members[0].client_port)])
        base = await racy.apply(res())
        # Conditional: the interloper's write makes the expected version stale.
        racy.interloper = lambda: other.apply(res(port=99))
        with pytest.raises(ConflictError) as info:
            await racy.apply(res(port=81), expected_version=base.resource_version)
        stored = await other.get(base.key)
        assert stored is not None and stored.spec == {"ports": [{"port": 99}]}
        assert info.value.actual == stored.resource_version
        # Unconditional: the transaction fails, the store reads again and writes.
        racy.interloper = lambda: other.apply(res(port=98))
        final = await racy.apply(res(port=82))
        assert await other.get(base.key) == final
        assert final.spec == {"ports": [{"port": 82}]}
        # Delete: same detection.
        racy.interloper = lambda: other.apply(res(port=97))
        with pytest.raises(ConflictError):
            await racy.delete(base.key, expected_version=final.resource_version)
        await racy.close()
        await other.close()

    asyncio.run(body())


def test_watch_without_since_starts_when_established(single: EtcdCluster) -> None:
    async def body() -> None:
        store = open_store(single.url)
        await store.apply(res("before"))
        waiting = asyncio.ensure_future(anext(store.watch()))
        await asyncio.sleep(0.3)  # the stream is open by now
        await store.apply(res("after"))
        event = await asyncio.wait_for(waiting, 5.0)
        assert (event.type, event.resource.name) == ("PUT", "after")
        await store.close()

    asyncio.run(body())


def test_compacted_history_is_a_clear_error(single: EtcdCluster) -> None:
    async def body() -> None:
        store = open_store(single.url)
        for i in range(4):
            await store.apply(res(f"s{i}"))
        top = await store.revision()
        etcd_post(single.members[0].client_port, "/v3/kv/compaction", {"revision": top})
        with pytest.raises(WatchError, match=f"compacted up to revision {top}"):
            await asyncio.wait_for(anext(store.watch(since=1)), 5.0)
        # From the compaction point on, watching works.
        watch = store.watch(since=top)
        await store.apply(res("fresh"))
        assert (await asyncio.wait_for(anext(watch), 5.0)).resource.name == "fresh"
        await store.close()

    asyncio.run(body())


def test_three_members_survive_the_loss_of_the_one_in_use(tmp_path: Path) -> None:
    """The base of the HA test: kill (SIGKILL) the member the store talks to, the leader (the
    hard case: writes wait for an election); reads, writes and an open watch carry on through
    the other two, the watch without a gap."""
    cluster = start_etcd_cluster(tmp_path, size=3)
    try:
        leader = leader_of(cluster)
        # The store talks to the first endpoint that answers: put the leader first.
        members = [leader] + [m for m in cluster.members if m is not leader]

        async def body() -> None:
            store = EtcdStore(
                [("127.0.0.1", m.client_port) for m in members],
                request_timeout=1.0,
                operation_timeout=10.0,
                watch_probe_interval=1.0,
            )
            start = await store.revision()
            watch = store.watch(since=start)
            await store.apply(res("a"))
            first = await asyncio.wait_for(anext(watch), 5.0)
            assert first.resource.name == "a"

            victim = cluster.member_at(store.current_endpoint)
            assert victim is leader
            victim.kill()

            b = await store.apply(res("b"))
            await store.apply(res("a", port=81))
            key_b = Key("Service", "payments", "b")
            assert await store.delete(key_b, expected_version=b.resource_version)
            assert [r.name for r in await store.list()] == ["a"]
            assert store.current_endpoint != f"http://{victim.endpoint}"
            rest = [await asyncio.wait_for(anext(watch), 10.0) for _ in range(3)]
            assert [(e.type, e.resource.name) for e in rest] == [
                ("PUT", "b"),
                ("PUT", "a"),
                ("DELETE", "b"),
            ]
            revisions = [first.revision] + [e.revision for e in rest]
            assert revisions == sorted(set(revisions))
            await store.close()

        asyncio.run(asyncio.wait_for(body(), 30.0))
    except BaseException:
        print(cluster.describe())
        raise
    finally:
        cluster.stop()
