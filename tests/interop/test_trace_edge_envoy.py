"""One trace from the edge: Envoy 1.40 starts it, ubimesh proxies and services carry it on.

    client -> Envoy edge (Zipkin tracer, 100 %, ingress) -> ubimesh gateway (OUTBOUND)
           -> ubimesh sidecar of svc-a (inbound) -> svc-a, which forwards the trace headers
           -> the same sidecar (outbound) -> ubimesh sidecar of svc-b (inbound) -> svc-b

Every proxy reports to one ``ubimesh collector``. Each request must give one trace with the
five spans Envoy's semantics make (B3, shared span context): Envoy's SERVER root, the
gateway's CLIENT span, svc-a's SERVER span sharing that id, svc-a's CLIENT span, svc-b's
SERVER span sharing that one; the parent links form one tree rooted at Envoy's span, and
every child starts after and ends before its parent.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_collector_process import Collector, start_collector
from tests.integration.test_tracing_proxy import ROUTER, cluster, listener, zipkin
from tests.support.control import wait_for
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    envoy_binary,
    free_ports,
    launch_envoy,
    launch_ubimesh,
    wait_ready,
)

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary on PATH"),
]

REQUESTS = 2
#: What a service copies from its inbound request to its outbound call (the thin library
#: Envoy's docs ask applications for).
PROPAGATED = ("x-request-id", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
              "x-b3-sampled", "x-b3-flags", "b3", "traceparent", "tracestate")
#: Clock tolerance between processes on one host, in µs.
SLACK_US = 2000


class Service:
    """A tiny HTTP service in a thread; with ``forward_to`` it calls that port (its sidecar's
    outbound listener) with the trace headers of the request it serves."""

    def __init__(self, forward_to: int | None = None) -> None:
        forward = forward_to

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # http.server's naming
                status, body = 200, b"svc-b"
                if forward is not None:
                    headers = {k: v for k in PROPAGATED if (v := self.headers.get(k))}
                    conn = http.client.HTTPConnection(LOOPBACK, forward, timeout=5)
                    try:
                        conn.request("GET", "/inventory", headers={"host": "svc-b", **headers})
                        resp = conn.getresponse()
                        status, body = resp.status, resp.read()
                    finally:
                        conn.close()
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _ubimesh(service: str, admin: int, listeners: list[dict[str, Any]],
             clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"node": {"id": f"{service}-1", "cluster": service},
            "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def _envoy(admin: int, port: int, gateway: int, collector: int) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                 ".v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "tracing": {"random_sampling": {"value": 100}, "provider": zipkin("zipkin")},
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "gateway"}}]}]},
        "http_filters": [ROUTER],
    }
    return {
        "node": {"id": "edge-1", "cluster": "edge"},
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin}}},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            "tracing.zipkin.min_flush_spans": 1, "tracing.zipkin.flush_interval_ms": 200}}]},
        "static_resources": {
            "listeners": [{
                "name": "edge",
                "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}],
            }],
            "clusters": [cluster("gateway", gateway), cluster("zipkin", collector)],
        },
    }


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = start_collector(tmp_path)
    try:
        yield c
    finally:
        c.proc.stop()


def test_one_trace_from_an_envoy_edge(tmp_path: Path, collector: Collector) -> None:
    (edge_admin, edge_port, gw_admin, gw_port, a_admin, a_in, a_out, b_admin,
     b_in) = free_ports(9)
    svc_b = Service()
    svc_a = Service(forward_to=a_out)
    tracing = {"provider": zipkin("collector")}
    to_collector = cluster("collector", collector.port)
    configs = {
        "gateway": (_ubimesh("gateway", gw_admin, [
            listener("gateway", gw_port, tracing, "svc-a", "OUTBOUND")],
            [cluster("svc-a", a_in), to_collector]), gw_admin, [gw_port]),
        "svc-a": (_ubimesh("svc-a", a_admin, [
            listener("inbound", a_in, tracing, "app", "INBOUND"),
            listener("outbound", a_out, tracing, "svc-b", "OUTBOUND")],
            [cluster("app", svc_a.port), cluster("svc-b", b_in), to_collector]),
            a_admin, [a_in, a_out]),
        "svc-b": (_ubimesh("svc-b", b_admin, [
            listener("inbound", b_in, tracing, "app", "INBOUND")],
            [cluster("app", svc_b.port), to_collector]), b_admin, [b_in]),
        "edge": (_envoy(edge_admin, edge_port, gw_port, collector.port), edge_admin,
                 [edge_port]),
    }
    procs: list[tuple[ManagedProcess, int, list[int]]] = []
    try:
        for name, (boot, admin, ports) in configs.items():
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(boot))
            launch = launch_envoy if name == "edge" else launch_ubimesh
            procs.append((launch(path, tmp_path, name), admin, ports))
        for proc, admin, ports in procs:
            wait_ready(proc, admin, ports, 20)
        for i in range(REQUESTS):
            conn = http.client.HTTPConnection(LOOPBACK, edge_port, timeout=10)
            conn.request("GET", f"/checkout/{i}")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"svc-b")
            conn.close()
        wait_for("every span stored",
                 lambda: collector.health()["spans"] >= 5 * REQUESTS, timeout=15)
    finally:
        for proc, _admin, _ports in procs:
            proc.stop()
        svc_a.close()
        svc_b.close()

    assert collector.health()["spans"] == 5 * REQUESTS
    traces = collector.get("/api/v2/traces", serviceName="edge", limit=10)
    assert len(traces) == REQUESTS
    for trace in traces:
        check_trace(trace)


def check_trace(trace: list[dict[str, Any]]) -> None:
    """One trace id, the five expected spans, one tree rooted at Envoy's span, timing nested."""
    assert len({s["traceId"] for s in trace}) == 1
    kinds = sorted((s["localEndpoint"]["serviceName"], s["kind"]) for s in trace)
    assert kinds == [("edge", "SERVER"), ("gateway", "CLIENT"), ("svc-a", "CLIENT"),
                     ("svc-a", "SERVER"), ("svc-b", "SERVER")], kinds
    by = {(s["localEndpoint"]["serviceName"], s["kind"]): s for s in trace}
    root = by["edge", "SERVER"]
    assert "parentId" not in root
    # B3 with shared span context: a SERVER span shares its caller's CLIENT span id (and
    # parent); a CLIENT span is a new span whose parent is the span that called it.
    expected = [
        (("gateway", "CLIENT"), ("edge", "SERVER"), "child"),
        (("svc-a", "SERVER"), ("gateway", "CLIENT"), "shared"),
        (("svc-a", "CLIENT"), ("svc-a", "SERVER"), "child"),
        (("svc-b", "SERVER"), ("svc-a", "CLIENT"), "shared"),
    ]
    for child_key, parent_key, link in expected:
        child, parent = by[child_key], by[parent_key]
        if link == "shared":
            assert child["id"] == parent["id"] and child.get("shared") is True, (child, parent)
            assert child.get("parentId") == parent.get("parentId")
        else:
            assert child["parentId"] == parent["id"] and child["id"] != parent["id"]
        assert child["timestamp"] + SLACK_US >= parent["timestamp"], (child_key, parent_key)
        child_end = child["timestamp"] + child["duration"]
        assert child_end <= parent["timestamp"] + parent["duration"] + SLACK_US, child_key
    # every span hangs off the root: following parent links from any span reaches Envoy's
    ids = {s["id"] for s in trace}
    for s in trace:
        assert s.get("parentId", root["id"]) in ids
    for key in by:
        assert by[key]["tags"]["http.status_code"] == "200"
        assert by[key]["tags"]["guid:x-request-id"] == root["tags"]["guid:x-request-id"]
