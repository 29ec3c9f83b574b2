"""The HTTP/1 pool under circuit breakers, on real loopback sockets: the bounded queue of
waiting requests, the connection limit, cancel, connect failures and a rebuilt cluster."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ubimesh.proxy.http.pool import (
    CONNECTION_FAILURE,
    OVERFLOW,
    UpstreamConnection,
    pool_for,
)
from ubimesh.proxy.snapshot.circuit_breakers import CircuitBreakers, Thresholds
from ubimesh.proxy.snapshot.types import Cluster, DiscoveryType, SocketAddress
from ubimesh.proxy.upstream.cluster import UpstreamCluster
from ubimesh.proxy.upstream.host import Host
from ubimesh.telemetry.stats import Store

LOCAL = "127.0.0.1"


class Waiter:
    """The router's side of one acquire: records what the pool said."""

    def __init__(self) -> None:
        self.conn: UpstreamConnection | None = None
        self.failure: str | None = None
        self.done = asyncio.get_running_loop().create_future()

    def on_pool_ready(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.done.set_result("ready")

    def on_pool_failure(self, reason: str) -> None:
        self.failure = reason
        self.done.set_result("failed")

    def __getattr__(self, name: str) -> Any:  # the response callbacks are not used here
        if name.startswith("on_upstream"):
            return lambda *a: None
        raise AttributeError(name)


def _cluster(port: int, store: Store, limits: Thresholds) -> tuple[UpstreamCluster, Host]:
    spec = Cluster(
        name="c",
        type=DiscoveryType.STATIC,
        connect_timeout=2.0,
        circuit_breakers=CircuitBreakers(default=limits),
    )
    host = Host(SocketAddress(LOCAL, port))
    return UpstreamCluster(spec, store, [host]), host


async def _server() -> asyncio.Server:
    async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()

    return await asyncio.start_server(hold, LOCAL, 0)


def test_waiting_requests_are_bounded_and_served_in_order() -> None:
    async def body() -> None:
        server = await _server()
        port = server.sockets[0].getsockname()[1]
        store = Store()
        cluster, host = _cluster(port, store, Thresholds(max_connections=1, max_pending_requests=3))
        pool = pool_for(host, cluster)
        res = cluster.resources.default
        a, b, c, d = Waiter(), Waiter(), Waiter(), Waiter()
        pool.acquire(a)
        pool.acquire(b)
        pool.acquire(c)
        pool.acquire(d)  # three wait already (a for its connection): refused at once
        assert d.failure == OVERFLOW
        assert store.counters["cluster.c.upstream_rq_pending_overflow"].value == 1
        assert store.counters["cluster.c.upstream_cx_overflow"].value >= 1
        assert res.pending_requests.count == 3
        assert await asyncio.wait_for(a.done, 2) == "ready"
        assert res.connections.count == 1
        assert res.pending_requests.count == 2
        pool.cancel(c)
        assert res.pending_requests.count == 1
        assert store.gauges["cluster.c.upstream_rq_pending_active"].value == 1
        assert a.conn is not None
        pool.release(a.conn)  # the one connection goes to b, the oldest waiting request
        assert await asyncio.wait_for(b.done, 2) == "ready"
        assert b.conn is a.conn
        assert not c.done.done()
        assert res.pending_requests.count == 0
        assert res.connections.count == 1
        b.conn.abort()
        await asyncio.sleep(0.05)
        assert res.connections.count == 0
        server.close()

    asyncio.run(body())


def test_a_failed_connect_fails_every_waiting_request() -> None:
    async def body() -> None:
        with socket.socket() as s:
            s.bind((LOCAL, 0))
            port = s.getsockname()[1]  # nothing listens there
        store = Store()
        cluster, host = _cluster(port, store, Thresholds(max_connections=1))
        pool = pool_for(host, cluster)
        waiters = [Waiter() for _ in range(3)]
        for w in waiters:
            pool.acquire(w)
        for w in waiters:
            assert await asyncio.wait_for(w.done, 2) == "failed"
            assert w.failure == CONNECTION_FAILURE
        res = cluster.resources.default
        assert (res.connections.count, res.pending_requests.count) == (0, 0)
        assert store.gauges["cluster.c.circuit_breakers.default.cx_open"].value == 0

    asyncio.run(body())


def test_a_rebuilt_cluster_takes_over_the_pool() -> None:
    async def body() -> None:
        server = await _server()
        port = server.sockets[0].getsockname()[1]
        store = Store()
        old, host = _cluster(port, store, Thresholds(max_connections=1))
        pool = pool_for(host, old)
        first = Waiter()
        pool.acquire(first)
        assert await asyncio.wait_for(first.done, 2) == "ready"
        # A reload rebuilds the cluster around the same host (and pool), with a higher limit.
        new = UpstreamCluster(
            Cluster(
                name="c",
                type=DiscoveryType.STATIC,
                circuit_breakers=CircuitBreakers(default=Thresholds(max_connections=2)),
            ),
            store,
            [host],
        )
        assert pool_for(host, new) is pool
        second = Waiter()
        pool.acquire(second)
        assert await asyncio.wait_for(second.done, 2) == "ready"
        assert old.resources.default.connections.count == 1
        assert new.resources.default.connections.count == 1
        assert first.conn is not None
        first.conn.abort()  # the old cluster's connection gives its slot back to the old one
        await asyncio.sleep(0.05)
        assert old.resources.default.connections.count == 0
        assert new.resources.default.connections.count == 1
        assert old.resources.default.connection_pools.count == 0
        assert new.resources.default.connection_pools.count == 1
        server.close()

    asyncio.run(body())
