"""Micro-benchmark of the per-request stats work: Istio's mesh metrics and Envoy's stats.

Times, per request, on real objects (an ``HcmRuntime`` built from a bootstrap like the S1
bench's, a real ``HttpConnection`` and ``ActiveStream`` built once, status 200, 1 KiB
response):

* ``observe plain``: ``HcmRuntime.observe`` of the S1 listener (no mesh metrics, no access
  log, no tracing): Envoy's ``downstream_rq_time`` and ``downstream_rq_completed``;
* ``observe mesh``: the same listener marked for mesh metrics (reporter ``destination``,
  plaintext caller); ``mesh share`` is the difference, what the metrics add per request;
* ``observe_http in/mtls/out``: ``MeshMetrics.observe_http`` alone for a plaintext inbound
  caller, a mutual TLS inbound caller and an outbound (reporter ``source``) request;
* ``upstream stats``: the router's per-request cluster stats (``RequestStats.count`` of the
  status, ``upstream_rq_completed``, ``upstream_rq_time``) and ``count_status``.

Run with ``UBIMESH_NATIVE=0`` semantics by default (this script enables the compiled modules
only with ``--native``, after ``ubimesh build-native``).

    python bench/micro_mesh_metrics.py [--native] [-n 50000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

META = {
    "reporter": "destination",
    "workload": "upstream-v1",
    "namespace": "bench",
    "principal": "spiffe://bench.local/ns/bench/sa/upstream",
    "app": "upstream",
    "version": "v1",
    "service": "upstream.bench.svc.cluster.local",
    "service_name": "upstream",
    "service_namespace": "bench",
}
CALLER = "spiffe://bench.local/ns/bench/sa/client"


def _bootstrap(meta: dict[str, str] | None) -> dict[str, Any]:
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress_http",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "local",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                    }
                ]
            },
            "http_filters": [router],
        },
    }
    listener: dict[str, Any] = {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
        "filter_chains": [{"filters": [hcm]}],
    }
    if meta is not None:
        listener["metadata"] = {"filter_metadata": {"ubimesh.telemetry": meta}}
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                            "port_value": 2}}}}  # fmt: skip
    cluster = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "upstream",
                            "endpoints": [{"lb_endpoints": [endpoint]}]},
        "metadata": {"filter_metadata": {"ubimesh.telemetry": {
            "service": "upstream.bench.svc.cluster.local", "service_name": "upstream",
            "service_namespace": "bench", "workload": "upstream-v1", "namespace": "bench"}}},
    }  # fmt: skip
    return {"static_resources": {"listeners": [listener], "clusters": [cluster]}}


def _time(fn: Callable[[int], None], n: int, repeat: int) -> float:
    """Best (least disturbed) µs per call over ``repeat`` runs of ``n`` calls."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(n)
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return min(runs)


async def _run(n: int, repeat: int) -> dict[str, float]:
    from ubimesh.proxy.http.router import UpstreamRequest
    from ubimesh.proxy.network.hcm_config import HcmRuntime
    from ubimesh.proxy.network.http_manager import ActiveStream, HttpConnection
    from ubimesh.proxy.snapshot.types import HttpConnectionManagerConfig, RouteAction
    from ubimesh.proxy.tls.peer import PeerInfo
    from ubimesh.proxy.upstream.cluster_manager import ClusterManager
    from ubimesh.proxy.xds import load_bootstrap_dict
    from ubimesh.telemetry.mesh_metrics import MeshMetrics
    from ubimesh.telemetry.stats import Store

    def runtime(meta: dict[str, str] | None) -> tuple[HcmRuntime, ActiveStream]:
        snap = load_bootstrap_dict(_bootstrap(meta))
        config = snap.listeners[0].filter_chains[0].filters[-1]
        assert isinstance(config, HttpConnectionManagerConfig)
        stats = Store()
        hcm = HcmRuntime(config, ClusterManager(snap.clusters, stats), stats)
        conn = HttpConnection(hcm, 65536)
        conn.remote = ("127.0.0.1", 40000)
        stream = ActiveStream(conn)
        stream.method, stream.path, stream.target = "GET", "/1k", "/1k"
        stream.start_time = time.monotonic()
        stream.status, stream.bytes_sent, stream.bytes_received = 200, 1024, 0
        return hcm, stream

    out: dict[str, float] = {}
    plain, ps = runtime(None)
    mesh_hcm, ms = runtime(META)

    def observe(hcm: HcmRuntime, stream: ActiveStream) -> Callable[[int], None]:
        def run(k: int) -> None:
            f = hcm.observe
            for _ in range(k):
                f(stream)

        return run

    out["observe plain"] = _time(observe(plain, ps), n, repeat)
    out["observe mesh"] = _time(observe(mesh_hcm, ms), n, repeat)
    out["mesh share"] = out["observe mesh"] - out["observe plain"]

    mesh = mesh_hcm.mesh
    assert mesh is not None

    def observe_http(mm: MeshMetrics, stream: ActiveStream) -> Callable[[int], None]:
        def run(k: int) -> None:
            f = mm.observe_http
            for _ in range(k):
                f(stream, 2.5)

        return run

    out["observe_http in"] = _time(observe_http(mesh, ms), n, repeat)
    ms.conn.tls = PeerInfo(presented=True, spiffe_id=CALLER)
    out["observe_http mtls"] = _time(observe_http(mesh, ms), n, repeat)
    ms.conn.tls = None

    out_meta = dict(META, reporter="source")
    out_hcm, os_ = runtime(out_meta)
    route = out_hcm.table.route("x", "GET", "/1k", os_.headers)
    assert route is not None
    r = route[1]
    assert isinstance(r.action, RouteAction)
    up = UpstreamRequest(os_, r, r.action, out_hcm)
    up.cluster = out_hcm.clusters.get("upstream")
    os_.upstream = up
    out_mesh = out_hcm.mesh
    assert out_mesh is not None
    out["observe_http out"] = _time(observe_http(out_mesh, os_), n, repeat)

    rs = plain.request_stats("upstream")

    def upstream_stats(k: int) -> None:
        count_status = plain.count_status
        for _ in range(k):
            rs.count(200)
            rs.rq_completed.value += 1
            rs.record_time(1.5)
            count_status(200)

    out["upstream stats"] = _time(upstream_stats, n, repeat)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--native", action="store_true", help="use the compiled hot path")
    parser.add_argument("-n", type=int, default=50000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if args.native:
        from ubimesh import native

        if not native.enable():
            raise SystemExit("no compiled hot path for this source (ubimesh build-native)")
    results = asyncio.run(_run(args.n, args.repeat))
    for name, us in results.items():
        print(f"{name:20s} {us:7.3f} µs")


if __name__ == "__main__":
    main()
