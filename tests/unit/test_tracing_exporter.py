"""Span export (ubimesh.proxy.tracing.exporter, zipkin, otlp): the bodies are what the
collector's own ingest accepts, the queue is bounded (drops counted), and a provider without
a usable cluster only counts skipped reports."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from ubimesh.collector.model import otlp_rows, zipkin_rows
from ubimesh.proxy.snapshot.types import TracingProvider, TracingProviderKind
from ubimesh.proxy.tracing import exporter, otlp, zipkin
from ubimesh.proxy.tracing.local import LocalInfo
from ubimesh.proxy.tracing.span import Span
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.telemetry.stats import Store

PROVIDER = TracingProvider(TracingProviderKind.ZIPKIN, "missing", "/api/v2/spans", "zipkin")


def spans() -> list[Span]:
    root = Span("463ac35c9f6413ad", "463ac35c9f6413ad", "", sampled=True, client=False,
                shared=True, name="shop:80")  # fmt: skip
    child = Span("463ac35c9f6413ad", "72485a3953bb6124", "463ac35c9f6413ad", sampled=True,
                 client=True, name="egress db", tracestate="k=v")  # fmt: skip
    for i, s in enumerate((root, child)):
        s.start_us, s.duration_us = 1_700_000_000_000_000 + i, 1500 - i
        s.tags = {"http.status_code": "503" if i else "200", **({"error": "true"} if i else {})}
    return [root, child]


def test_zipkin_body_is_accepted_by_the_collector() -> None:
    body = zipkin.encode(spans(), LocalInfo("n1", "shop"))
    assert len(zipkin_rows(body, 0, 100)) == 2
    root, child = orjson.loads(body)
    assert root["kind"] == "SERVER" and root["shared"] is True and "parentId" not in root
    assert child["kind"] == "CLIENT" and child["parentId"] == root["id"]
    assert root["localEndpoint"]["serviceName"] == "shop"


def test_otlp_body_is_accepted_by_the_collector() -> None:
    body = otlp.encode(spans(), LocalInfo("n1", "shop"), "shop-otel")
    assert len(otlp_rows(body, 0, 100)) == 2
    doc = orjson.loads(body)
    resource = doc["resourceSpans"][0]
    assert {"key": "service.name", "value": {"stringValue": "shop-otel"}} in (
        resource["resource"]["attributes"])
    root, child = resource["scopeSpans"][0]["spans"]
    assert root["traceId"] == "0" * 16 + "463ac35c9f6413ad" and root["kind"] == 2
    assert child["kind"] == 3 and child["parentSpanId"] == root["spanId"]
    assert child["traceState"] == "k=v" and child["status"] == {"code": 2}
    assert int(child["endTimeUnixNano"]) - int(child["startTimeUnixNano"]) == 1499 * 1000


def test_the_queue_is_bounded_and_a_missing_cluster_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter, "MAX_QUEUED_SPANS", 10)
    monkeypatch.setattr(exporter, "BATCH_SPANS", 4)
    monkeypatch.setattr(exporter, "FLUSH_INTERVAL", 0.05)

    async def run() -> exporter.Exporter:
        stats = Store()
        clusters = ClusterManager({}, stats)
        e = exporter.exporter_for(PROVIDER, clusters, stats)
        assert exporter.exporter_for(PROVIDER, clusters, stats) is e
        # No task runs until this coroutine yields: 2 batches leave, 10 wait, 2 are dropped.
        for _ in range(20):
            e.add(spans()[0])
        assert e.queued == 10 and e.spans_dropped.value == 2
        assert [b.count for b in e.closed] == [4, 4] and e.open is not None
        for _ in range(50):
            if not e.queued and not e.tasks:
                break
            await asyncio.sleep(0.02)
        await exporter.flush_all(clusters, timeout=1)
        return e

    e = asyncio.run(run())
    assert e.spans_dropped.value == 2
    assert e.reports_skipped.value == 5  # 18 spans, batches of 4: every one skipped
    assert e.spans_sent.value == 0 and e.queued == 0 and not e.closed
