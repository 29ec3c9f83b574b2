"""The TCP proxy's response flags and Istio TCP metrics, on real sockets on 127.0.0.1: a
proxied connection is counted opened and closed with its bytes both ways; one to a port nobody
listens on is ``UF,URX`` (every connect attempt failed), one to a cluster without hosts ``UH``,
one to an unknown cluster ``NC``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from ubimesh.proxy.network.tcp_proxy import TcpProxyProtocol
from ubimesh.proxy.snapshot.types import (
    Cluster,
    DiscoveryType,
    Endpoint,
    Locality,
    LocalityEndpoints,
    SocketAddress,
    TcpProxyConfig,
    TelemetryMeta,
)
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.telemetry.stats import Store

LOCAL = "127.0.0.1"
META = TelemetryMeta(reporter="source", workload="web-1", namespace="shop")
DEST = TelemetryMeta(service="db.shop.svc.cluster.local", service_name="db")


def _cluster(name: str, ports: list[int]) -> Cluster:
    eps = tuple(Endpoint(SocketAddress(LOCAL, p)) for p in ports)
    return Cluster(
        name,
        DiscoveryType.STATIC,
        connect_timeout=1.0,
        endpoints=(LocalityEndpoints(Locality(), eps),) if eps else (),
        telemetry=DEST,
    )


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def _series(store: Store, metric: str) -> dict[str, int]:
    """{response_flags label: value} of ``metric``'s series."""
    out = {}
    for name, c in store.counters.items():
        if name.startswith(metric + "{"):
            flags = name.split('response_flags="', 1)[1].split('"', 1)[0]
            assert 'destination_service="db.shop.svc.cluster.local"' in name or flags in ("NC",), (
                name
            )
            out[flags] = c.value
    return out


async def _scenario() -> tuple[Store, list[TcpProxyProtocol]]:
    store = Store()

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(100) * 2)  # answers twice the bytes it got
        await w.drain()
        w.close()

    upstream = await asyncio.start_server(echo, LOCAL, 0)
    up_port = upstream.sockets[0].getsockname()[1]
    clusters = {
        "db": _cluster("db", [up_port]),
        "dead": _cluster("dead", [_dead_port()]),
        "empty": _cluster("empty", []),
    }
    manager = ClusterManager(clusters, store)
    await manager.start()
    protos: list[TcpProxyProtocol] = []
    servers = []
    try:
        for name in ("db", "dead", "empty", "nowhere"):
            config = TcpProxyConfig(stat_prefix=name, cluster=name, mesh_telemetry=META)

            def factory(config: TcpProxyConfig = config) -> TcpProxyProtocol:
                p = TcpProxyProtocol(config, manager, store, 1 << 16)
                protos.append(p)
                return p

            srv = await asyncio.get_running_loop().create_server(factory, LOCAL, 0)
            servers.append(srv)
            reader, writer = await asyncio.open_connection(LOCAL, srv.sockets[0].getsockname()[1])
            writer.write(b"hello")
            await writer.drain()
            with contextlib.suppress(ConnectionError):
                # Until the proxy closes: the echoed bytes, or nothing (a refused connection
                # whose unread bytes make the close a reset).
                await reader.read()
            writer.close()
        # Every downstream connection has gone (closed counted) before we look.
        for _ in range(200):
            if sum(_series(store, "istio_tcp_connections_closed_total").values()) == 4:
                break
            await asyncio.sleep(0.01)
    finally:
        for srv in servers:
            srv.close()
        upstream.close()
        await manager.stop()
    return store, protos


def test_tcp_flags_and_istio_tcp_metrics() -> None:
    async def main() -> Any:
        async with asyncio.timeout(20):
            return await _scenario()

    store, protos = asyncio.run(main())
    assert [p.flags for p in protos] == ["", "UF,URX", "UH", "NC"]
    opened = _series(store, "istio_tcp_connections_opened_total")
    closed = _series(store, "istio_tcp_connections_closed_total")
    assert opened == closed == {"-": 1, "UF,URX": 1, "UH": 1, "NC": 1}
    assert _series(store, "istio_tcp_received_bytes_total")["-"] == 5
    assert _series(store, "istio_tcp_sent_bytes_total")["-"] == 10
    assert _series(store, "istio_tcp_sent_bytes_total")["UF,URX"] == 0
    # Envoy's TCP pool counts one upstream "request" per proxied connection.
    assert store.counters["cluster.db.upstream_rq_total"].value == 1
    assert store.counters["cluster.dead.upstream_rq_total"].value == 0
