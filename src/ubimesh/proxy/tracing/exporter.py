"""Span export: a bounded queue per provider, batched POSTs over the provider's cluster.

``add`` (called when a stream ends) only appends to a list: a batch leaves when
``BATCH_SPANS`` spans are queued or ``FLUSH_INTERVAL`` seconds after the first of them, in a
task of its own, through aiohttp (imported only when a proxy traces). At most
``MAX_IN_FLIGHT`` POSTs are outstanding and each has the provider's timeout, so a slow or dead
collector only fills the queue; beyond ``MAX_QUEUED_SPANS`` new spans are dropped and counted.
Requests never wait on any of it. Each worker process exports its own spans.

Stats (Envoy's names under ``tracing.zipkin.`` or ``tracing.opentelemetry.``): ``spans_sent``,
``timer_flushed``, ``reports_sent`` (accepted POSTs), ``reports_dropped`` (answered with
another status), ``reports_failed`` (connection error or timeout),
``reports_skipped_no_cluster`` (no such cluster, or no healthy host), and ubimesh's
``spans_dropped`` (queue full).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ubimesh.proxy.snapshot.types import TracingProvider, TracingProviderKind
from ubimesh.proxy.tracing import local as local_mod

if TYPE_CHECKING:
    from ubimesh.proxy.tracing.span import Span
    from ubimesh.proxy.upstream.cluster_manager import ClusterManager
    from ubimesh.telemetry.stats import Store

log = logging.getLogger("ubimesh.tracing")

BATCH_SPANS = 256
FLUSH_INTERVAL = 1.0
MAX_QUEUED_SPANS = 8192
MAX_IN_FLIGHT = 2


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
        self.queue: list[Span] = []
        self.in_flight = 0
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.session: Any = None
        # aiohttp is imported now, while the configuration is built: importing it at the
        # first flush would stall the event loop (and every request) for a good fraction
        # of a second.
        import aiohttp

        self.aiohttp: Any = aiohttp
        self.headers = {
            "content-type": "application/json",
            "host": provider.host,
            # Zipkin's advice: a reporter's own POSTs are not to be traced.
            **({"b3": "0"} if self.zipkin else {}),
            **dict(provider.headers),
        }

    def add(self, span: Span) -> None:
        queue = self.queue
        if len(queue) >= MAX_QUEUED_SPANS:
            self.spans_dropped.value += 1
            return
        queue.append(span)
        if len(queue) >= BATCH_SPANS:
            self._flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_flushed.value += 1
        self._flush()

    def _flush(self) -> None:
        while self.queue and self.in_flight < MAX_IN_FLIGHT:
            batch = self.queue[:BATCH_SPANS]
            del self.queue[:BATCH_SPANS]
            self._start_send(batch)
        if self.queue and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._on_timer)

    def _start_send(self, batch: list[Span]) -> None:
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def encode(self, batch: list[Span]) -> bytes:
        local = local_mod.LOCAL
        if self.zipkin:
            from ubimesh.proxy.tracing import zipkin

            return zipkin.encode(batch, local)
        from ubimesh.proxy.tracing import otlp

        return otlp.encode(batch, local, self.provider.service_name or "unknown_service:envoy")

    async def _send(self, batch: list[Span]) -> None:
        try:
            await self._post(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure only costs these spans
            self.reports_failed.value += 1
            log.debug("span export to %s failed: %r", self.provider.cluster, exc)
        finally:
            self.in_flight -= 1
        if len(self.queue) >= BATCH_SPANS:
            self._flush()

    async def _post(self, batch: list[Span]) -> None:
        provider = self.provider
        cluster = self.clusters.get(provider.cluster)
        host = cluster.choose_host(None) if cluster is not None else None
        if host is None:
            self.reports_skipped.value += 1
            return
        aiohttp = self.aiohttp
        session = self.session
        if session is None:
            session = self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT),
                timeout=aiohttp.ClientTimeout(total=provider.timeout),
                skip_auto_headers=("User-Agent",),
            )
        url = f"http://{host.address}{provider.path}"
        body = self.encode(batch)
        async with session.post(url, data=body, headers=self.headers) as resp:
            await resp.read()
            if 200 <= resp.status < 300:
                self.reports_sent.value += 1
                self.spans_sent.value += len(batch)
            else:
                self.reports_dropped.value += 1
                log.debug("collector %s answered %d", url, resp.status)

    async def flush(self, timeout: float) -> None:
        """Send what is queued (shutdown), waiting at most ``timeout`` seconds, then close."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.queue:
            batch = self.queue[:BATCH_SPANS]
            del self.queue[:BATCH_SPANS]
            self._start_send(batch)
        if self.tasks:
            _done, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
            for task in pending:
                task.cancel()
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


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
