"""Span export: a bounded queue per provider, batched POSTs over the provider's cluster.

``add`` (called when a stream ends) adds the span to the open batch (``batch.SpanBatch``;
Zipkin's writes the span's JSON there and then, OTLP's keeps the span): a batch is closed at
``BATCH_SPANS`` spans or ``FLUSH_INTERVAL`` seconds after its first, and leaves in a task of
its own. At most ``MAX_IN_FLIGHT`` POSTs are outstanding and each has the provider's timeout,
so a slow or dead collector only fills the queue of closed batches; beyond
``MAX_QUEUED_SPANS`` spans in the open and closed batches new spans are dropped and counted.
Requests never wait on any of it. Each worker process exports its own spans.

The POSTs go over keep-alive HTTP/1.1 connections of a small client of its own
(``CollectorConnection``: one prebuilt head, the response parsed by httptools, as the proxy's
own upstream connections are). aiohttp, used before, cost about 350 µs of CPU per POST in the
proxy's event loop (URL parsing, multidicts, its stream machinery), over 1 µs per span at 256
spans a batch; this client costs a few tens of µs per POST (bench/telemetry_cpu.py).

Stats (Envoy's names under ``tracing.zipkin.`` or ``tracing.opentelemetry.``): ``spans_sent``,
``timer_flushed``, ``reports_sent`` (accepted POSTs), ``reports_dropped`` (answered with
another status), ``reports_failed`` (connection error or timeout),
``reports_skipped_no_cluster`` (no such cluster, or no healthy host), and ubimesh's
``spans_dropped`` (queue full).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import httptools

from ubimesh.proxy.http.codec import encode_headers
from ubimesh.proxy.snapshot.types import SocketAddress, TracingProvider, TracingProviderKind
from ubimesh.proxy.tracing import local as local_mod

# The encoders are imported with the exporter (when an HCM's tracer is built), not at the
# first batch: an import there ran inside the request path's measured window.
from ubimesh.proxy.tracing import otlp, zipkin
from ubimesh.proxy.tracing.batch import SpanBatch

if TYPE_CHECKING:
    from ubimesh.proxy.tracing.span import Span
    from ubimesh.proxy.upstream.cluster_manager import ClusterManager
    from ubimesh.telemetry.stats import Store

log = logging.getLogger("ubimesh.tracing")

BATCH_SPANS = 256
FLUSH_INTERVAL = 1.0
MAX_QUEUED_SPANS = 8192
MAX_IN_FLIGHT = 2


class CollectorError(Exception):
    """The collector connection failed or closed before a whole response came."""


class CollectorConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a collector, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.keep_alive = False
        self.status = 0
        """The status of the response being read (0 before its head)."""

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(CollectorError(f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if exc is None and self.status and waiter is not None and not waiter.done():
            # A response without a length ends with the connection.
            self.waiter = None
            waiter.set_result(self.status)
            return
        self._fail(CollectorError(f"connection closed: {exc!r}"))

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        waiter = self.waiter
        self.waiter = None
        self.keep_alive = self.parser.should_keep_alive()
        if waiter is not None and not waiter.done():
            waiter.set_result(self.parser.get_status_code())

    # -- use ----------------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def request(self, head: bytes, body: bytes) -> asyncio.Future[int]:
        """Send one request; the future gets the response's status code."""
        assert self.transport is not None and self.waiter is None
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self.keep_alive = False
        self.status = 0
        # Two buffers, not their concatenation: a span batch's body is a few hundred KiB.
        self.transport.writelines((head, body))
        return waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Exporter:
    """One provider's queue and sender in this process."""

    def __init__(self, provider: TracingProvider, clusters: ClusterManager, stats: Store) -> None:
        self.provider = provider
        self.clusters = clusters
        self.zipkin = provider.kind is TracingProviderKind.ZIPKIN
        p = "tracing.zipkin." if self.zipkin else "tracing.opentelemetry."
        self.spans_sent = stats.counter(p + "spans_sent")
        self.spans_dropped = stats.counter(p + "spans_dropped")
        self.timer_flushed = stats.counter(p + "timer_flushed")
        self.reports_sent = stats.counter(p + "reports_sent")
        self.reports_dropped = stats.counter(p + "reports_dropped")
        self.reports_failed = stats.counter(p + "reports_failed")
        self.reports_skipped = stats.counter(p + "reports_skipped_no_cluster")
        # The module's limits, read once (compiled, each read of a module global is a dict
        # lookup on every span); tests change them before they make an exporter.
        self.batch_spans = BATCH_SPANS
        self.max_queued = MAX_QUEUED_SPANS
        self.open: SpanBatch | None = None
        """The batch spans are added to; None until the next span."""
        self.closed: list[SpanBatch] = []
        """Batches waiting for a POST (at most MAX_IN_FLIGHT are in flight)."""
        self.queued = 0
        """Spans in ``open`` and ``closed``."""
        self.in_flight = 0
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.idle: list[tuple[SocketAddress, CollectorConnection]] = []
        """Keep-alive connections not in use, with the collector address each goes to."""
        if self.zipkin:
            # The address Zipkin spans report (looked up once, through the interfaces) is
            # found now rather than while the first batch is encoded, among requests.
            local_mod.local_ipv4()
        headers = {
            "content-type": "application/json",
            "host": provider.host,
            # Zipkin's advice: a reporter's own POSTs are not to be traced.
            **({"b3": "0"} if self.zipkin else {}),
            **dict(provider.headers),
        }
        # Everything but the content-length is the same for every POST.
        self.head_start = (
            f"POST {provider.path} HTTP/1.1\r\n".encode("latin-1")
            + encode_headers(list(headers.items()))
            + b"content-length: "
        )

    def add(self, span: Span) -> None:
        if self.queued >= self.max_queued:
            self.spans_dropped.value += 1
            return
        batch = self.open
        if batch is None:
            batch = self.open = self.new_batch()
        batch.add(span)
        self.queued += 1
        if batch.count >= self.batch_spans:
            self.open = None
            self.closed.append(batch)
            self._flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._on_timer)

    def new_batch(self) -> SpanBatch:
        """An empty batch of this provider's encoding (Zipkin's node and endpoint are this
        process's now)."""
        if self.zipkin:
            return zipkin.ZipkinBatch(local_mod.LOCAL)
        return otlp.OtlpBatch(self.provider.service_name or "unknown_service:envoy")

    def _close_open(self) -> None:
        """Close the open batch, if any: it waits in ``closed`` for a POST slot."""
        if self.open is not None:
            self.closed.append(self.open)
            self.open = None

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_flushed.value += 1
        self._close_open()
        self._flush()

    def _flush(self) -> None:
        """Send closed batches while a POST slot is free; the rest wait for ``_send``'s end
        or the timer."""
        closed = self.closed
        while closed and self.in_flight < MAX_IN_FLIGHT:
            self._start_send(closed.pop(0))
        if (closed or self.open is not None) and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._on_timer)

    def _start_send(self, batch: SpanBatch) -> None:
        self.queued -= batch.count
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: SpanBatch) -> None:
        try:
            await self._post(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure only costs these spans
            self.reports_failed.value += 1
            log.debug("span export to %s failed: %r", self.provider.cluster, exc)
        finally:
            self.in_flight -= 1
        if self.closed:
            self._flush()

    async def _post(self, batch: SpanBatch) -> None:
        provider = self.provider
        cluster = self.clusters.get(provider.cluster)
        host = cluster.choose_host(None) if cluster is not None else None
        if host is None:
            self.reports_skipped.value += 1
            return
        address = host.address
        body = batch.body()
        head = self.head_start + b"%d\r\n\r\n" % len(body)
        status = await asyncio.wait_for(self._exchange(address, head, body), provider.timeout)
        if 200 <= status < 300:
            self.reports_sent.value += 1
            self.spans_sent.value += batch.count
        else:
            self.reports_dropped.value += 1
            log.debug("collector %s answered %d", address, status)

    async def _exchange(self, address: SocketAddress, head: bytes, body: bytes) -> int:
        """One POST on an idle keep-alive connection to ``address``, or a new one."""
        conn: CollectorConnection | None = None
        idle = self.idle
        while idle:
            at, candidate = idle.pop()
            if at == address and not candidate.closed:
                conn = candidate
                break
            candidate.close()  # another address (the cluster changed) or closed meanwhile
        if conn is None:
            loop = asyncio.get_running_loop()
            _transport, conn = await loop.create_connection(
                CollectorConnection, address.host, address.port
            )
        try:
            status = await conn.request(head, body)
        except BaseException:
            conn.close()  # a cancelled (timed out) or failed exchange leaves it unusable
            raise
        if conn.keep_alive and not conn.closed and len(idle) < MAX_IN_FLIGHT:
            idle.append((address, conn))
        else:
            conn.close()
        return status

    async def flush(self, timeout: float) -> None:
        """Send what is queued (shutdown), waiting at most ``timeout`` seconds, then close."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._close_open()
        closed, self.closed = self.closed, []
        for batch in closed:
            self._start_send(batch)
        if self.tasks:
            _done, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
            for task in pending:
                task.cancel()
        idle, self.idle = self.idle, []
        for _address, conn in idle:
            conn.close()


_EXPORTERS: dict[tuple[TracingProvider, int], Exporter] = {}


def exporter_for(provider: TracingProvider, clusters: ClusterManager, stats: Store) -> Exporter:
    """The process's exporter for ``provider`` (HCMs with equal providers share one; a new
    snapshot keeps the queue)."""
    key = (provider, id(clusters))
    found = _EXPORTERS.get(key)
    if found is None:
        found = _EXPORTERS[key] = Exporter(provider, clusters, stats)
    return found


async def flush_all(clusters: ClusterManager, timeout: float = 2.0) -> None:
    """Flush and forget the exporters that send through ``clusters`` (server stop)."""
    mine = [(k, e) for k, e in _EXPORTERS.items() if e.clusters is clusters]
    for key, _exporter in mine:
        del _EXPORTERS[key]
    if mine:
        await asyncio.gather(*(e.flush(timeout) for _k, e in mine), return_exceptions=True)
