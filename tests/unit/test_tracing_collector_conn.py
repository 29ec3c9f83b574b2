"""The span exporter's own HTTP/1.1 client (``CollectorConnection``) against real sockets:
batches share one keep-alive connection, a close-delimited answer still counts, a non-2xx
answer is a dropped report, and a collector that never answers times out (failed report) and
loses the connection rather than the proxy's memory."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ubimesh.proxy.snapshot.types import TracingProvider, TracingProviderKind
from ubimesh.proxy.tracing import exporter
from ubimesh.proxy.tracing.span import Span
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.proxy.xds import load_bootstrap_dict
from ubimesh.telemetry.stats import Store

Handler = Callable[["_Counting", asyncio.StreamWriter], Awaitable[None]]


def clusters_for(port: int, stats: Store) -> ClusterManager:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    snap = load_bootstrap_dict(
        {
            "static_resources": {
                "clusters": [
                    {
                        "name": "sink",
                        "type": "STATIC",
                        "connect_timeout": "1s",
                        "load_assignment": {
                            "cluster_name": "sink",
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
                        },
                    }
                ]
            }
        }
    )
    return ClusterManager(snap.clusters, stats)


def span(i: int) -> Span:
    s = Span(f"{i + 1:016x}", f"{i + 1:016x}", "", sampled=True, client=False)
    s.tags = {"http.status_code": "200"}
    return s


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One whole request (head and content-length body), None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def run_export(handler: Handler, batches: int, timeout: float = 2.0) -> tuple[Store, list[int]]:
    """Send ``batches`` batches of 2 spans, one after the other, to a server running
    ``handler``; returns the stats and the number of requests per accepted connection."""
    connections: list[int] = []

    async def main() -> Store:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(0)
            await handler(_Counting(reader, connections, len(connections) - 1), writer)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stats = Store()
        clusters = clusters_for(port, stats)
        provider = TracingProvider(
            TracingProviderKind.ZIPKIN, "sink", "/api/v2/spans", "sink", timeout=timeout
        )
        e = exporter.exporter_for(provider, clusters, stats)
        for b in range(batches):
            batch = e.new_batch()
            batch.add(span(2 * b))
            batch.add(span(2 * b + 1))
            await e._send(batch)
        await exporter.flush_all(clusters, timeout=1)
        server.close()
        return stats

    return asyncio.run(asyncio.wait_for(main(), 20)), connections


class _Counting:
    """A StreamReader that counts the requests read on its connection."""

    def __init__(self, reader: asyncio.StreamReader, counts: list[int], index: int) -> None:
        self.reader, self.counts, self.index = reader, counts, index

    async def request(self) -> bytes | None:
        got = await read_request(self.reader)
        if got is not None:
            self.counts[self.index] += 1
        return got


async def keep_alive_202(reader: _Counting, writer: asyncio.StreamWriter) -> None:
    while (req := await reader.request()) is not None:
        assert req.startswith(b"POST /api/v2/spans HTTP/1.1\r\n")
        assert b"\r\nb3: 0\r\n" in req and req.endswith(b"]")
        writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
    writer.close()


async def close_delimited_200(reader: _Counting, writer: asyncio.StreamWriter) -> None:
    if await reader.request() is not None:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{}")
        await writer.drain()
    writer.close()


async def always_503(reader: _Counting, writer: asyncio.StreamWriter) -> None:
    while await reader.request() is not None:
        writer.write(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy")
        await writer.drain()
    writer.close()


async def never_answers(reader: _Counting, writer: asyncio.StreamWriter) -> None:
    await reader.request()
    await reader.request()  # EOF: the exporter gave up and closed the connection
    writer.close()


def counters(stats: Store) -> dict[str, int]:
    return {
        k.removeprefix("tracing.zipkin."): v
        for k, v in stats.snapshot().counters.items()
        if k.startswith("tracing.zipkin.")
    }


def test_batches_share_one_keep_alive_connection() -> None:
    stats, connections = run_export(keep_alive_202, 3)
    c = counters(stats)
    assert c["reports_sent"] == 3 and c["spans_sent"] == 6
    assert connections == [3]


def test_a_close_delimited_answer_counts_and_is_not_reused() -> None:
    stats, connections = run_export(close_delimited_200, 2)
    c = counters(stats)
    assert c["reports_sent"] == 2 and c["spans_sent"] == 4
    assert connections == [1, 1]


def test_an_error_status_is_a_dropped_report() -> None:
    stats, connections = run_export(always_503, 2)
    c = counters(stats)
    assert c["reports_dropped"] == 2 and c["spans_sent"] == 0
    assert connections == [2]


def test_a_silent_collector_times_out_and_loses_the_connection() -> None:
    stats, connections = run_export(never_answers, 2, timeout=0.2)
    c = counters(stats)
    assert c["reports_failed"] == 2 and c["reports_sent"] == 0
    assert connections == [1, 1]  # each timed-out connection was closed, not reused
