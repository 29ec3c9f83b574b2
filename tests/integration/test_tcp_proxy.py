"""tcp_proxy on real sockets: forwarding, half-close, backpressure, timeouts, failures."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import uvloop

from ubimesh.proxy.network.tcp_proxy import TcpProxyProtocol
from ubimesh.proxy.snapshot.types import (
    Cluster,
    DiscoveryType,
    Endpoint,
    LbPolicy,
    Locality,
    LocalityEndpoints,
    SocketAddress,
    TcpProxyConfig,
    WeightedClusterEntry,
)
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.telemetry.stats import Store

T = TypeVar("T")
LOCAL = "127.0.0.1"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Run an async test body on the given event loop, bounded by a timeout."""

    def runner(fn: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
        async def main() -> T:
            async with asyncio.timeout(timeout):
                return await fn()

        if request.param == "uvloop":
            return uvloop.run(main())
        return asyncio.run(main())

    return runner


def cluster(name: str, ports: list[int], **kw: Any) -> Cluster:
    eps = tuple(Endpoint(SocketAddress(LOCAL, p)) for p in ports)
    return Cluster(
        name, DiscoveryType.STATIC, endpoints=(LocalityEndpoints(Locality(), eps),), **kw
    )


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


class Proxy:
    """A minimal listener: one TcpProxyProtocol per accepted connection."""

    def __init__(
        self, config: TcpProxyConfig, clusters: list[Cluster], buffer_limit: int = 1 << 20
    ) -> None:
        self.store = Store()
        self.config = config
        self.manager = ClusterManager({c.name: c for c in clusters}, self.store)
        self.buffer_limit = buffer_limit
        self.protos: list[TcpProxyProtocol] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def _factory(self) -> TcpProxyProtocol:
        p = TcpProxyProtocol(self.config, self.manager, self.store, self.buffer_limit)
        self.protos.append(p)
        return p

    async def __aenter__(self) -> Proxy:
        await self.manager.start()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, LOCAL, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.manager.stop()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(LOCAL, self.port)

    def counter(self, name: str) -> int:
        return self.store.counters[name].value

    def gauge(self, name: str) -> int:
        return self.store.gauges[name].value


@contextlib.asynccontextmanager
async def server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a cancelled handler ends quietly (see below)
        finally:
            w.close()
            tasks.discard(task)

    srv = await asyncio.start_server(wrapped, LOCAL, 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        pending = list(tasks)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


# -- forwarding ------------------------------------------------------------------------------


def test_echo_and_stats(run: Callable[..., Any]) -> None:
    async def body() -> None:
        async with server(echo) as up:
            cfg = TcpProxyConfig(stat_prefix="t", cluster="echo")
            async with Proxy(cfg, [cluster("echo", [up])]) as px:
                r, w = await px.connect()
                w.write(b"hello")
                assert await r.readexactly(5) == b"hello"
                w.write(b" world")
                assert await r.readexactly(6) == b" world"
                c = px.manager.get("echo")
                assert c is not None
                # An open proxied connection counts as an active request on its host.
                assert c.hosts[0].active_requests == 1
                assert px.protos[0].host is c.hosts[0]
                w.close()
                await wait_until(lambda: px.gauge("cluster.echo.upstream_cx_active") == 0)
                assert c.hosts[0].active_requests == 0
                assert px.counter("tcp.t.downstream_cx_total") == 1
                assert px.counter("tcp.t.downstream_cx_rx_bytes_total") == 11
                assert px.counter("tcp.t.downstream_cx_tx_bytes_total") == 11
                assert px.counter("cluster.echo.upstream_cx_total") == 1
                assert px.counter("cluster.echo.upstream_cx_tx_bytes_total") == 11
                assert px.counter("cluster.echo.upstream_cx_rx_bytes_total") == 11
                assert px.counter("cluster.echo.upstream_cx_destroy") == 1

    run(body)


def test_early_data_is_buffered_until_upstream_connects(run: Callable[..., Any]) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB sent at once, limit 4 KiB

    async def body() -> None:
        async with server(echo) as up:
            cfg = TcpProxyConfig(stat_prefix="early", cluster="echo")
            async with Proxy(cfg, [cluster("echo", [up])], buffer_limit=4096) as px:
                r, w = await px.connect()
                w.write(payload)
                got = await r.readexactly(len(payload))
                assert got == payload
                w.close()

    run(body)


def test_many_concurrent_connections(run: Callable[..., Any]) -> None:
    async def body() -> None:
        async with server(echo) as up:
            cfg = TcpProxyConfig(stat_prefix="many", cluster="echo")
            async with Proxy(cfg, [cluster("echo", [up])]) as px:

                async def one(i: int) -> bytes:
                    r, w = await px.connect()
                    msg = f"conn-{i}".encode() * 100
                    w.write(msg)
                    got = await r.readexactly(len(msg))
                    w.close()
                    return got

                results = await asyncio.gather(*(one(i) for i in range(50)))
                assert results == [f"conn-{i}".encode() * 100 for i in range(50)]
                assert px.counter("tcp.many.downstream_cx_total") == 50

    run(body)


# -- half-close ------------------------------------------------------------------------------


def test_half_close_downstream_to_upstream(run: Callable[..., Any]) -> None:
    """The client shuts down its sending side; the upstream sees EOF, then answers, and the
    answer still reaches the client."""

    async def count_then_reply(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # until EOF
        w.write(f"got {len(data)} bytes".encode())
        await w.drain()

    async def body() -> None:
        async with server(count_then_reply) as up:
            cfg = TcpProxyConfig(stat_prefix="hc", cluster="u")
            async with Proxy(cfg, [cluster("u", [up])]) as px:
                r, w = await px.connect()
                w.write(b"x" * 100_000)
                w.write_eof()
                assert await r.read() == b"got 100000 bytes"
                w.close()

    run(body)


def test_half_close_upstream_to_downstream(run: Callable[..., Any]) -> None:
    """The upstream sends a banner and shuts down its sending side; the client reads it to EOF
    and can still send to the upstream afterwards."""
    received: list[bytes] = []

    async def banner_then_read(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"banner")
        await w.drain()
        w.write_eof()
        received.append(await r.read())

    async def body() -> None:
        async with server(banner_then_read) as up:
            cfg = TcpProxyConfig(stat_prefix="hc2", cluster="u")
            async with Proxy(cfg, [cluster("u", [up])]) as px:
                r, w = await px.connect()
                assert await r.read() == b"banner"  # EOF reached
                w.write(b"after-eof " * 1000)
                w.write_eof()
                await wait_until(lambda: bool(received))
                assert received == [b"after-eof " * 1000]
                # Both directions finished: the proxy closes both connections.
                await wait_until(lambda: px.gauge("cluster.u.upstream_cx_active") == 0)
                w.close()

    run(body)


# -- backpressure ----------------------------------------------------------------------------

BIG = 50 * 1024 * 1024
LIMIT = 256 * 1024


def chunk(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest() * 2048  # 64 KiB


async def sample_max(px: Proxy, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max([peak, *(p.buffered_bytes() for p in px.protos)])
        await asyncio.sleep(0.001)
    return peak


def test_download_50mb_slow_reader_bounded_buffer(run: Callable[..., Any]) -> None:
    async def blast(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for i in range(BIG // 65536):
            w.write(chunk(i))
            await w.drain()
        w.write_eof()
        await r.read()

    async def body() -> None:
        async with server(blast) as up:
            cfg = TcpProxyConfig(stat_prefix="dl", cluster="u")
            clusters = [cluster("u", [up], per_connection_buffer_limit_bytes=LIMIT)]
            async with Proxy(cfg, clusters, buffer_limit=LIMIT) as px:
                stop = asyncio.Event()
                sampler = asyncio.ensure_future(sample_max(px, stop))
                r, w = await px.connect()
                digest = hashlib.sha256()
                expected = hashlib.sha256()
                for i in range(BIG // 65536):
                    expected.update(chunk(i))
                total = 0
                reads = 0
                while data := await r.read(65536):
                    digest.update(data)
                    total += len(data)
                    reads += 1
                    if reads % 4 == 0:
                        await asyncio.sleep(0.001)  # a slow reader
                stop.set()
                peak = await sampler
                w.close()
                assert total == BIG
                assert digest.digest() == expected.digest()
                # One buffer limit on each side plus a read chunk or two in flight.
                print("peak buffered", peak)
                assert LIMIT // 2 < peak <= 2 * LIMIT + 512 * 1024, peak
                assert px.counter("tcp.dl.downstream_cx_tx_bytes_total") == BIG

    run(body, timeout=120)


def test_upload_50mb_slow_upstream_bounded_buffer(run: Callable[..., Any]) -> None:
    got: list[tuple[int, bytes]] = []

    async def slow_sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        total = 0
        reads = 0
        while data := await r.read(65536):
            digest.update(data)
            total += len(data)
            reads += 1
            if reads % 4 == 0:
                await asyncio.sleep(0.001)
        got.append((total, digest.digest()))
        w.write(b"done")
        await w.drain()

    async def body() -> None:
        async with server(slow_sink) as up:
            cfg = TcpProxyConfig(stat_prefix="ul", cluster="u")
            clusters = [cluster("u", [up], per_connection_buffer_limit_bytes=LIMIT)]
            async with Proxy(cfg, clusters, buffer_limit=LIMIT) as px:
                stop = asyncio.Event()
                sampler = asyncio.ensure_future(sample_max(px, stop))
                r, w = await px.connect()
                expected = hashlib.sha256()
                for i in range(BIG // 65536):
                    c = chunk(i)
                    expected.update(c)
                    w.write(c)
                    await w.drain()
                w.write_eof()
                assert await r.read() == b"done"
                stop.set()
                peak = await sampler
                w.close()
                assert got == [(BIG, expected.digest())]
                print("peak buffered", peak)
                assert LIMIT // 2 < peak <= 2 * LIMIT + 512 * 1024, peak
                assert px.counter("tcp.ul.downstream_flow_control_paused_reading_total") > 0
                assert px.counter("tcp.ul.downstream_flow_control_resumed_reading_total") > 0

    run(body, timeout=120)


def test_downstream_reset_flushes_pending_upstream_bytes(run: Callable[..., Any]) -> None:
    """The client goes away while the proxy still holds bytes for a stalled upstream: the
    upstream connection stays until they are written (upstream_flush_*), then closes.

    The upstream buffer limit is set above the transfer so that the proxy keeps reading the
    client (a paused transport does not notice a reset until it reads again)."""
    may_read = asyncio.Event()
    received: list[int] = []
    size = 24 * 1024 * 1024

    async def stalled(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await may_read.wait()
        received.append(len(await r.read()))

    async def body() -> None:
        nonlocal may_read
        may_read = asyncio.Event()
        async with server(stalled) as up:
            cfg = TcpProxyConfig(stat_prefix="fl", cluster="u")
            clusters = [cluster("u", [up], per_connection_buffer_limit_bytes=4 * size)]
            async with Proxy(cfg, clusters, buffer_limit=LIMIT) as px:
                _, w = await px.connect()
                for i in range(size // 65536):
                    w.write(chunk(i))
                await wait_until(lambda: px.counter("tcp.fl.downstream_cx_rx_bytes_total") == size)
                held = px.protos[0].buffered_bytes()
                assert held > 0
                # Reset (SO_LINGER 0), not FIN: a FIN would be a half-close.
                sock = w.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
                await wait_until(lambda: px.counter("tcp.fl.upstream_flush_total") == 1)
                assert px.gauge("tcp.fl.upstream_flush_active") == 1
                may_read.set()
                await wait_until(lambda: bool(received))
                await wait_until(lambda: px.gauge("tcp.fl.upstream_flush_active") == 0)
                # Everything the proxy had accepted reached the upstream, then EOF.
                assert received == [size]

    run(body)


# -- timeouts and failures -------------------------------------------------------------------


def test_idle_timeout_closes_both_sides(run: Callable[..., Any]) -> None:
    upstream_closed = asyncio.Event()

    async def echo_and_note(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await echo(r, w)
        finally:
            upstream_closed.set()

    async def body() -> None:
        nonlocal upstream_closed
        upstream_closed = asyncio.Event()
        async with server(echo_and_note) as up:
            cfg = TcpProxyConfig(stat_prefix="idle", cluster="u", idle_timeout=0.3)
            async with Proxy(cfg, [cluster("u", [up])]) as px:
                loop = asyncio.get_running_loop()
                r, w = await px.connect()
                # Traffic every 0.1 s keeps the connection alive past the timeout.
                for _ in range(8):
                    await asyncio.sleep(0.1)
                    w.write(b"k")
                    assert await r.readexactly(1) == b"k"
                start = loop.time()  # the last byte just went through
                assert px.counter("tcp.idle.idle_timeout") == 0
                with contextlib.suppress(ConnectionError):
                    assert await r.read() == b""
                elapsed = loop.time() - start
                assert 0.25 <= elapsed < 1.5
                assert px.counter("tcp.idle.idle_timeout") == 1
                await asyncio.wait_for(upstream_closed.wait(), 5)
                w.close()

    run(body)


def test_connect_failure_closes_downstream(run: Callable[..., Any]) -> None:
    async def body() -> None:
        dead = free_port()
        cfg = TcpProxyConfig(stat_prefix="cf", cluster="dead", max_connect_attempts=3)
        async with Proxy(cfg, [cluster("dead", [dead])]) as px:
            r, w = await px.connect()
            w.write(b"lost")
            with contextlib.suppress(ConnectionError):
                assert await r.read() == b""
            assert px.counter("cluster.dead.upstream_cx_connect_fail") == 3
            assert px.counter("cluster.dead.upstream_cx_connect_attempts_exceeded") == 1
            assert px.counter("cluster.dead.upstream_cx_total") == 3
            assert px.gauge("cluster.dead.upstream_cx_active") == 0
            w.close()

    run(body)


def test_connect_retries_on_another_host(run: Callable[..., Any]) -> None:
    async def body() -> None:
        async with server(echo) as alive:
            dead = free_port()
            cfg = TcpProxyConfig(stat_prefix="rt", cluster="mixed", max_connect_attempts=2)
            async with Proxy(cfg, [cluster("mixed", [dead, alive])]) as px:
                for i in range(10):
                    r, w = await px.connect()
                    w.write(b"ping%d" % i)
                    assert await r.readexactly(len(b"ping%d" % i)) == b"ping%d" % i
                    w.close()
                # Retries draw from the same round robin, so nearly every first attempt hits the
                # dead host and the second one the live host.
                assert 5 <= px.counter("cluster.mixed.upstream_cx_connect_fail") <= 10
                assert px.counter("cluster.mixed.upstream_cx_total") == 10 + px.counter(
                    "cluster.mixed.upstream_cx_connect_fail"
                )
                assert px.counter("cluster.mixed.upstream_cx_connect_attempts_exceeded") == 0

    run(body)


def test_connect_timeout(run: Callable[..., Any]) -> None:
    """An upstream whose accept queue is full never completes the handshake."""

    async def body() -> None:
        blackhole = socket.socket()
        blackhole.bind((LOCAL, 0))
        blackhole.listen(0)
        port = blackhole.getsockname()[1]
        fillers: list[socket.socket] = []
        try:
            # Fill the accept queue so that further SYNs are dropped.
            for _ in range(4):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect((LOCAL, port))
                fillers.append(s)
            probe = socket.socket()
            probe.settimeout(0.3)
            try:
                probe.connect((LOCAL, port))
                pytest.skip("this network stack completes connects to a full accept queue")
            except (TimeoutError, OSError):
                pass
            finally:
                probe.close()
            cfg = TcpProxyConfig(stat_prefix="to", cluster="bh")
            spec = cluster("bh", [port], connect_timeout=0.2)
            async with Proxy(cfg, [spec]) as px:
                loop = asyncio.get_running_loop()
                r, w = await px.connect()
                start = loop.time()
                with contextlib.suppress(ConnectionError):
                    assert await r.read() == b""
                assert loop.time() - start < 2.0
                assert px.counter("cluster.bh.upstream_cx_connect_timeout") == 1
                w.close()
        finally:
            for s in fillers:
                s.close()
            blackhole.close()

    run(body)


def test_unknown_cluster_is_no_route(run: Callable[..., Any]) -> None:
    async def body() -> None:
        cfg = TcpProxyConfig(stat_prefix="nr", cluster="missing")
        async with Proxy(cfg, []) as px:
            r, w = await px.connect()
            with contextlib.suppress(ConnectionError):
                assert await r.read() == b""
            assert px.counter("tcp.nr.downstream_cx_no_route") == 1
            w.close()

    run(body)


def test_no_healthy_host_closes_downstream(run: Callable[..., Any]) -> None:
    async def body() -> None:
        async with server(echo) as up:
            cfg = TcpProxyConfig(stat_prefix="nh", cluster="u")
            # Panic off: with the default 50 % threshold Envoy would use the failed host.
            async with Proxy(cfg, [cluster("u", [up], healthy_panic_threshold=0.0)]) as px:
                c = px.manager.get("u")
                assert c is not None
                c.set_host_health(c.hosts[0], False)
                r, w = await px.connect()
                with contextlib.suppress(ConnectionError):
                    assert await r.read() == b""
                assert px.counter("cluster.u.upstream_cx_none_healthy") == 1
                assert px.counter("cluster.u.upstream_cx_total") == 0
                w.close()

    run(body)


# -- cluster selection -----------------------------------------------------------------------


def named(tag: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    """An upstream handler that answers every connection with ``tag``."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(tag)
        await w.drain()

    return handler


def test_weighted_clusters_split(run: Callable[..., Any]) -> None:
    async def body() -> None:
        async with server(named(b"A")) as a, server(named(b"B")) as b:
            cfg = TcpProxyConfig(
                stat_prefix="wc",
                weighted_clusters=(WeightedClusterEntry("a", 1), WeightedClusterEntry("b", 3)),
            )
            async with Proxy(cfg, [cluster("a", [a]), cluster("b", [b])]) as px:
                seen: Counter[bytes] = Counter()
                n = 200
                for _ in range(n):
                    r, w = await px.connect()
                    seen[await r.read()] += 1
                    w.close()
                assert set(seen) == {b"A", b"B"}
                assert seen[b"B"] / n == pytest.approx(0.75, abs=0.1)
                assert px.counter("cluster.a.upstream_cx_total") == seen[b"A"]

    run(body)


def test_round_robin_across_hosts(run: Callable[..., Any]) -> None:
    async def body() -> None:
        async with server(named(b"1")) as p1, server(named(b"2")) as p2:
            cfg = TcpProxyConfig(stat_prefix="rr", cluster="u")
            spec = cluster("u", [p1, p2], lb_policy=LbPolicy.ROUND_ROBIN)
            async with Proxy(cfg, [spec]) as px:
                seen = []
                for _ in range(6):
                    r, w = await px.connect()
                    seen.append(await r.read())
                    w.close()
                assert Counter(seen) == {b"1": 3, b"2": 3}
                assert all(seen[i] != seen[i + 1] for i in range(5))

    run(body)
