"""The per-request stats path on real objects (an ``HcmRuntime`` from a bootstrap, a real
``HttpConnection`` and ``ActiveStream``): ``HcmRuntime.observe`` and Istio's HTTP series
(``MeshMetrics.observe_http``, whose histogram records are inlined for speed), and the router's
per-cluster ``RequestStats`` (per-code counters kept in a list indexed by status). Each checks
the values a hand-written ``Histogram.record`` would give, so the inlined copies cannot drift.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import yaml

from ubimesh.proxy.network.hcm_config import HcmRuntime
from ubimesh.proxy.network.http_manager import ActiveStream, HttpConnection
from ubimesh.proxy.snapshot.types import HttpConnectionManagerConfig
from ubimesh.proxy.tls.peer import PeerInfo
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.proxy.xds import load_bootstrap_dict
from ubimesh.telemetry.mesh_metrics import (
    BYTES_BUCKETS,
    DURATION_BUCKETS_MS,
    REQUEST_BYTES,
    REQUEST_DURATION,
    REQUESTS_TOTAL,
    RESPONSE_BYTES,
)
from ubimesh.telemetry.stats import DEFAULT_BUCKETS_MS, Histogram, Store

CONFIGS = Path(__file__).parent / "configs"
CALLER = "spiffe://example.org/ns/shop/sa/web"
META = {
    "reporter": "destination",
    "workload": "api-1",
    "namespace": "shop",
    "service": "api.shop.svc.cluster.local",
    "peers": {CALLER: "web-1"},
}


def _runtime(meta: dict[str, Any] | None) -> tuple[HcmRuntime, ActiveStream, Store]:
    """Must run inside an event loop (HcmRuntime keeps the running loop)."""
    d = yaml.safe_load((CONFIGS / "minimal.yaml").read_text())
    if meta is not None:
        d["static_resources"]["listeners"][0]["metadata"] = {
            "filter_metadata": {"ubimesh.telemetry": meta}
        }
    snap = load_bootstrap_dict(d)
    config = snap.listeners[0].filter_chains[0].filters[-1]
    assert isinstance(config, HttpConnectionManagerConfig)
    stats = Store()
    hcm = HcmRuntime(config, ClusterManager(snap.clusters, stats), stats)
    stream = ActiveStream(HttpConnection(hcm, 65536))
    return hcm, stream, stats


def _expected(bounds: tuple[float, ...], samples: list[float]) -> Histogram:
    h = Histogram(bounds)
    for s in samples:
        h.record(s)
    return h


def _same(h: Histogram, want: Histogram) -> None:
    assert (h.counts, h.count) == (want.counts, want.count)
    assert abs(h.sum - want.sum) < 1e-6


def _series(stats: Store, metric: str, *parts: str) -> list[str]:
    return [
        n
        for n in list(stats.counters) + list(stats.histograms)
        if n.startswith(metric + "{") and all(p in n for p in parts)
    ]


def test_bounds_are_floats() -> None:
    # Float-to-float comparisons keep the bisection fast; the values are Envoy's.
    assert all(type(b) is float for b in DEFAULT_BUCKETS_MS + BYTES_BUCKETS)
    assert DEFAULT_BUCKETS_MS[:3] == (0.5, 1, 5) and DURATION_BUCKETS_MS == DEFAULT_BUCKETS_MS
    assert Histogram((1, 10)).bounds == (1.0, 10.0)
    assert all(type(b) is float for b in Histogram((1, 10)).bounds)


def test_observe_counts_envoy_stats_and_istio_series() -> None:
    async def run() -> None:
        hcm, stream, stats = _runtime(META)
        # Samples on a bound go in that bound's bucket (Prometheus's le), as record() does.
        # The last case differs from the one before only in its flags: its own series.
        cases = [
            (200, "", 0, 1024),
            (200, "", 10, 1),
            (503, "UF", 0, 19),
            (200, "", 7, 10),
            (503, "UF", 0, 19),
            (503, "UO", 0, 19),
        ]
        durations: list[float] = []
        for status, flags, received, sent in cases:
            stream.status, stream.flags = status, flags
            stream.bytes_received, stream.bytes_sent = received, sent
            stream.start_time = time.monotonic()
            hcm.observe(stream)
            durations.append(hcm.rq_time.sum - sum(durations))
        assert stats.counters["http.ingress_http.downstream_rq_completed"].value == 6
        _same(stats.histograms["http.ingress_http.downstream_rq_time"], _expected(
            DEFAULT_BUCKETS_MS, durations))  # fmt: skip

        (ok,) = _series(stats, REQUESTS_TOTAL, 'response_code="200"')
        (failed,) = _series(stats, REQUESTS_TOTAL, 'response_code="503"', '"UF"')
        (overflow,) = _series(stats, REQUESTS_TOTAL, 'response_code="503"', '"UO"')
        assert 'response_flags="-"' in ok and 'response_flags="UF"' in failed
        assert 'connection_security_policy="none"' in ok
        assert stats.counters[ok].value == 3 and stats.counters[failed].value == 2
        assert stats.counters[overflow].value == 1
        labels = ok[ok.index("{") :]
        _same(stats.histograms[REQUEST_BYTES + labels], _expected(BYTES_BUCKETS, [0, 10, 7]))
        _same(stats.histograms[RESPONSE_BYTES + labels], _expected(BYTES_BUCKETS, [1024, 1, 10]))
        _same(stats.histograms[REQUEST_DURATION + labels], _expected(
            DURATION_BUCKETS_MS, [durations[0], durations[1], durations[3]]))  # fmt: skip

        # A mutual TLS caller is its own series, named from its SPIFFE ID.
        stream.status, stream.flags = 200, ""
        stream.conn.tls = PeerInfo(presented=True, spiffe_id=CALLER)
        hcm.observe(stream)
        (mtls,) = _series(stats, REQUESTS_TOTAL, 'connection_security_policy="mutual_tls"')
        assert f'source_principal="{CALLER}"' in mtls and 'source_workload="web-1"' in mtls
        assert stats.counters[mtls].value == 1 and stats.counters[ok].value == 3

    asyncio.run(run())


def test_no_metadata_no_istio_series() -> None:
    async def run() -> None:
        hcm, stream, stats = _runtime(None)
        assert hcm.mesh is None
        stream.status = 200
        stream.start_time = time.monotonic()
        hcm.observe(stream)
        assert not [n for n in list(stats.counters) + list(stats.histograms) if "istio" in n]
        assert stats.histograms["http.ingress_http.downstream_rq_time"].count == 1

    asyncio.run(run())


def test_request_stats_per_code_and_class() -> None:
    async def run() -> None:
        hcm, _, stats = _runtime(None)
        rs = hcm.request_stats("backend")
        for status in (200, 200, 204, 503, 0, 1001):
            rs.count(status)
        p = "cluster.backend.upstream_rq_"
        got = {k[len(p) :]: c.value for k, c in stats.counters.items() if k.startswith(p)}
        # Only what was used exists (as Envoy), besides the counters made up front.
        assert {k: v for k, v in got.items() if v} == {
            "200": 2, "204": 1, "503": 1, "0": 1, "1001": 1, "2xx": 3, "5xx": 2, "0xx": 1,
        }  # fmt: skip
        assert "404" not in got and "4xx" not in got
        rs.charge_local(504)
        assert got["completed"] == 0 and stats.counters[p + "completed"].value == 1
        assert stats.counters[p + "504"].value == 1
        for ms in (0.5, 3.0, 7000.0):
            rs.record_time(ms)
        _same(stats.histograms[p + "time"], _expected(DEFAULT_BUCKETS_MS, [0.5, 3.0, 7000.0]))
        hcm.count_status(200)
        hcm.count_status(700)
        assert stats.counters["http.ingress_http.downstream_rq_5xx"].value == 1

    asyncio.run(run())
