"""Envoy 1.40's Zipkin tracer reports to ``ubimesh collector``, and the collector's query API
gives the whole trace back.

Two Envoys in a row, ``edge`` (an egress listener: CLIENT spans) and ``backend`` (an ingress
listener: SERVER spans) in front of an echo upstream, each with ``envoy.tracers.zipkin``
(HTTP_JSON v2, 128-bit trace ids, B3 propagation) pointed at the collector's
``/api/v2/spans``. For each request through both: one trace with a span from each Envoy,
the backend's span joined to the edge's (shared span id or parent id), Envoy's standard tags,
and the dependency edge -> backend with one call per request (and an error for the 503).
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_collector_process import Collector, start_collector
from tests.support.control import wait_for
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import LOOPBACK, envoy_binary, free_ports, start_envoy

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary on PATH"),
]

REQUESTS = 4


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": LOOPBACK,
                                                             "port_value": port}}}}]}]}}


def _bootstrap(service: str, admin: int, listen: int, upstream: int, collector: int,
               direction: str) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                 ".v3.HttpConnectionManager",
        "stat_prefix": service,
        "generate_request_id": True,
        "tracing": {"random_sampling": {"value": 100}, "provider": {
            "name": "envoy.tracers.zipkin",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": "zipkin",
                "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": "HTTP_JSON",
                "trace_id_128bit": True,
            }}},
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "next"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "node": {"id": f"{service}-1", "cluster": service},
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin}}},
        # Report every span at once (Envoy's defaults batch 5 spans or 5 s).
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            "tracing.zipkin.min_flush_spans": 1, "tracing.zipkin.flush_interval_ms": 200}}]},
        "static_resources": {
            "listeners": [{
                "name": "main", "traffic_direction": direction,
                "address": {"socket_address": {"address": LOOPBACK, "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}],
            }],
            "clusters": [_cluster("next", upstream), _cluster("zipkin", collector)],
        },
    }


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = start_collector(tmp_path)
    try:
        yield c
    finally:
        c.proc.stop()


def test_envoy_zipkin_spans_make_whole_traces(tmp_path: Path, collector: Collector) -> None:
    with EchoServerPool() as pool:
        echo = pool.port("app")
        edge_admin, edge_port, backend_admin, backend_port = free_ports(4)
        envoys = []
        try:
            for service, admin, listen, upstream, direction in [
                ("backend", backend_admin, backend_port, echo, "INBOUND"),
                ("edge", edge_admin, edge_port, backend_port, "OUTBOUND"),
            ]:
                config = tmp_path / f"{service}.yaml"
                config.write_text(yaml.safe_dump(_bootstrap(
                    service, admin, listen, upstream, collector.port, direction)))
                envoys.append(start_envoy(config, admin, [listen], tmp_path, name=service))
            started_ms = int(time.time() * 1000)
            statuses = []
            for i in range(REQUESTS):
                conn = http.client.HTTPConnection(LOOPBACK, edge_port, timeout=10)
                headers = {"x-echo-status": "503"} if i == REQUESTS - 1 else {}
                conn.request("GET", f"/orders/{i}", headers=headers)
                resp = conn.getresponse()
                resp.read()
                statuses.append(resp.status)
                conn.close()
            assert statuses == [200] * (REQUESTS - 1) + [503]
            wait_for("every Envoy span stored",
                     lambda: collector.health()["spans"] >= 2 * REQUESTS, timeout=20)
        finally:
            for proc in envoys:
                proc.stop()

    assert collector.health()["spans"] == 2 * REQUESTS
    assert collector.get("/api/v2/services") == ["backend", "edge"]
    traces = collector.get("/api/v2/traces", serviceName="edge", limit=100)
    assert len(traces) == REQUESTS
    for trace in traces:
        assert len(trace) == 2, trace
        by_service = {s["localEndpoint"]["serviceName"]: s for s in trace}
        edge, backend = by_service["edge"], by_service["backend"]
        assert len(edge["traceId"]) == 32
        assert edge["kind"] == "CLIENT" and backend["kind"] == "SERVER"
        # joined: B3 shared span (same id) or a child of the edge's span
        assert backend["id"] == edge["id"] or backend.get("parentId") == edge["id"]
        assert backend["traceId"] == edge["traceId"]
        assert edge["tags"]["http.method"] == "GET"
        assert edge["tags"]["upstream_cluster"] == "next"
        assert edge["tags"]["http.url"].startswith("http://")
        assert edge["duration"] >= backend["duration"] > 0
        assert edge["timestamp"] <= backend["timestamp"]
        # the same trace by id
        again = collector.get(f"/api/v2/trace/{edge['traceId']}")
        assert sorted(s["id"] for s in again) == sorted(s["id"] for s in trace)
    failed = collector.get("/api/v2/traces", annotationQuery="http.status_code=503")
    assert len(failed) == 1 and all("error" in s["tags"] for s in failed[0])
    assert collector.get("/api/v2/spans", serviceName="edge") != []
    deps = collector.get("/api/v2/dependencies", endTs=int(time.time() * 1000) + 1000,
                         lookback=int(time.time() * 1000) - started_ms + 60_000)
    assert deps == [{"parent": "edge", "child": "backend", "callCount": REQUESTS,
                     "errorCount": 1}]
    print(json.dumps(traces[0], indent=1))
