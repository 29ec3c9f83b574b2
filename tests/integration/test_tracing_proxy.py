"""HCM tracing in a real ``ubimesh proxy`` process, reporting to a real ``ubimesh collector``.

One proxy with two listeners in front of an echo upstream: ``in`` (ingress, Zipkin tracer,
B3) and ``out`` (OUTBOUND, OpenTelemetry tracer, W3C, OTLP/HTTP JSON). The spans are read
back through the collector's Zipkin query API; what the upstream received shows the injected
context. A second test points the tracer at a TCP server that accepts and never answers:
requests go on at full speed and the exporter's failures are only counted.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.integration.test_collector_process import Collector, start_collector
from tests.support.control import wait_for
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import LOOPBACK, admin_get, free_ports, start_ubimesh

ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def cluster(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": LOOPBACK,
                                                             "port_value": port}}}}]}]}}


def zipkin(cluster_name: str, **extra: Any) -> dict[str, Any]:
    return {"name": "envoy.tracers.zipkin", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
        "collector_cluster": cluster_name, "collector_endpoint": "/api/v2/spans",
        "collector_endpoint_version": "HTTP_JSON", **extra}}


def listener(name: str, port: int, tracing: dict[str, Any], upstream: str,
             direction: str | None = None,
             routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                 ".v3.HttpConnectionManager",
        "stat_prefix": name,
        "tracing": tracing,
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            *(routes or []), {"match": {"prefix": "/"}, "route": {"cluster": upstream}}]}]},
        "http_filters": [ROUTER],
    }
    out: dict[str, Any] = {
        "name": name,
        "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }
    if direction:
        out["traffic_direction"] = direction
    return out


def get(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    return fetch(port, path, headers)[0]


def fetch(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stats(admin: int) -> dict[str, int]:
    status, body = admin_get(admin, "/stats")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = start_collector(tmp_path)
    try:
        yield c
    finally:
        c.proc.stop()


def test_zipkin_and_otlp_spans_reach_the_collector(tmp_path: Path, collector: Collector) -> None:
    with EchoServerPool() as pool:
        echo = pool.port("app")
        admin, in_port, out_port = free_ports(3)
        otel = {"name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "service_name": "otel-side",
            "http_service": {"http_uri": {"uri": f"http://{LOOPBACK}:{collector.port}/v1/traces",
                                          "cluster": "collector", "timeout": "2s"}}}}
        boot = {
            "node": {"id": "proxy-1", "cluster": "shop"},
            "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin}}},
            "static_resources": {
                "listeners": [
                    listener("in", in_port, {"provider": zipkin("collector"), "custom_tags": [
                        {"tag": "team", "literal": {"value": "blue"}},
                        {"tag": "tenant", "request_header": {"name": "x-tenant",
                                                             "default_value": "none"}}]},
                        "app", routes=[
                            {"match": {"prefix": "/quiet"}, "route": {"cluster": "app"},
                             "tracing": {"random_sampling": {"numerator": 0}}},
                            {"match": {"prefix": "/cart"}, "route": {"cluster": "app"},
                             "decorator": {"operation": "cart-op"},
                             "tracing": {"custom_tags": [{"tag": "route",
                                                          "literal": {"value": "cart"}}]}}]),
                    listener("out", out_port, {"provider": otel}, "app", "OUTBOUND", routes=[
                        {"match": {"prefix": "/pay"}, "route": {"cluster": "app"},
                         "decorator": {"operation": "pay-op"}}]),
                ],
                "clusters": [cluster("app", echo), cluster("collector", collector.port)],
            },
        }
        config = tmp_path / "proxy.yaml"
        config.write_text(yaml.safe_dump(boot))
        proxy = start_ubimesh(config, admin, [in_port, out_port], tmp_path, name="proxy")
        try:
            # 1. Zipkin, no incoming context: this proxy starts the trace (ingress, SERVER).
            cursor = pool.cursor()
            status, body = fetch(in_port, "/cart?id=1", {"x-tenant": "acme"})
            assert status == 200
            up = dict(pool.records_since(cursor, at_least=1)[0].headers)
            trace_id, span_id = up["x-b3-traceid"], up["x-b3-spanid"]
            assert trace_id == span_id and len(trace_id) == 16  # Envoy's root ids
            assert up["x-b3-sampled"] == "1" and "x-b3-parentspanid" not in up
            assert up["x-request-id"][14] == "9"  # the decision, packed as Envoy packs it
            # 2. An incoming "not sampled" is honoured: passed on, nothing reported.
            cursor = pool.cursor()
            assert get(in_port, "/cart", {"b3": "0"}) == 200
            up = dict(pool.records_since(cursor, at_least=1)[0].headers)
            assert up["b3"].endswith("-0") and "x-b3-traceid" not in up
            # 3. Malformed B3: no span at all, the headers pass as they came (Envoy).
            cursor = pool.cursor()
            assert get(in_port, "/cart", {"x-b3-traceid": "zz", "x-b3-spanid": "1" * 16}) == 200
            up = dict(pool.records_since(cursor, at_least=1)[0].headers)
            assert up["x-b3-traceid"] == "zz" and "x-b3-sampled" not in up
            # A route whose tracing samples nothing: ids go on, marked not sampled.
            cursor = pool.cursor()
            assert get(in_port, "/quiet") == 200
            up = dict(pool.records_since(cursor, at_least=1)[0].headers)
            assert up["x-b3-sampled"] == "0" and up["x-request-id"][14] == "4"
            # 4. OpenTelemetry, egress, with a W3C parent: a CLIENT child span; the route's
            # decorator names it and goes to the next hop.
            parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            cursor = pool.cursor()
            assert get(out_port, "/pay", {"traceparent": parent, "tracestate": "k=v"}) == 200
            up = dict(pool.records_since(cursor, at_least=1)[0].headers)
            version, tid, child, flags = up["traceparent"].split("-")
            assert (version, tid, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
            assert child != "00f067aa0ba902b7" and up["tracestate"] == "k=v"
            assert up["x-envoy-decorator-operation"] == "pay-op"
            wait_for("both spans stored", lambda: collector.health()["spans"] >= 2, timeout=10)
            time.sleep(0.3)  # a wrongly reported unsampled span would arrive with them
            counters = stats(admin)
        finally:
            proxy.stop()

    assert collector.health()["spans"] == 2
    assert collector.get("/api/v2/services") == ["otel-side", "shop"]
    (server,) = collector.get(f"/api/v2/trace/{trace_id}")
    assert server["id"] == span_id and "parentId" not in server
    assert server["kind"] == "SERVER" and server.get("shared") is True
    assert server["localEndpoint"]["serviceName"] == "shop"
    assert server["name"] == "cart-op"
    tags = server["tags"]
    assert tags["http.url"] == f"http://{LOOPBACK}:{in_port}/cart?id=1"
    assert tags["http.method"] == "GET" and tags["http.status_code"] == "200"
    assert tags["node_id"] == "proxy-1" and tags["component"] == "proxy"
    assert tags["upstream_cluster"] == "app" and tags["response_flags"] == "-"
    assert tags["team"] == "blue" and tags["tenant"] == "acme" and tags["route"] == "cart"
    assert tags["response_size"] == str(len(body)) and tags["request_size"] == "0"
    assert tags["guid:x-request-id"][14] == "9" and "error" not in tags
    assert 0 < server["duration"] < 5_000_000
    (client,) = collector.get("/api/v2/trace/4bf92f3577b34da6a3ce929d0e0e4736")
    assert client["kind"] == "CLIENT" and client["id"] == child
    assert client["parentId"] == "00f067aa0ba902b7"
    assert client["localEndpoint"]["serviceName"] == "otel-side"
    assert client["name"] == "pay-op"
    assert counters["tracing.zipkin.spans_sent"] == 1
    assert counters["tracing.opentelemetry.spans_sent"] == 1
    assert counters["http.in.tracing.random_sampling"] == 3
    assert counters["http.in.tracing.not_traceable"] == 1
    assert counters["http.out.tracing.random_sampling"] == 1


class BlackHole:
    """A TCP server that accepts connections and never answers (a hung collector)."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.sock.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=2)
        for c in self.accepted:
            c.close()
        self.sock.close()


def test_a_hung_collector_costs_requests_nothing(tmp_path: Path) -> None:
    hole = BlackHole()
    try:
        with EchoServerPool() as pool:
            echo = pool.port("app")
            admin, port = free_ports(2)
            provider = {"name": "envoy.tracers.zipkin", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_endpoint_version": "HTTP_JSON",
                "collector_service": {"http_uri": {
                    "uri": "http://collector/api/v2/spans", "cluster": "collector",
                    "timeout": "0.5s"}}}}
            boot = {
                "node": {"id": "p", "cluster": "edge"},
                "admin": {"address": {"socket_address": {"address": LOOPBACK,
                                                         "port_value": admin}}},
                "static_resources": {
                    "listeners": [listener("in", port, {"provider": provider}, "app")],
                    "clusters": [cluster("app", echo), cluster("collector", hole.port)],
                },
            }
            config = tmp_path / "proxy.yaml"
            config.write_text(yaml.safe_dump(boot))
            proxy = start_ubimesh(config, admin, [port], tmp_path, name="proxy")
            try:
                slowest = 0.0
                # 256 spans fill a batch (or a second passes): the exporter connects, and
                # hangs, within the loop. Bounded by count, and by time on a slow machine.
                deadline = time.monotonic() + 15.0
                sent = 0
                while time.monotonic() < deadline and sent < 300:
                    started = time.monotonic()
                    assert get(port, f"/r{sent}") == 200
                    slowest = max(slowest, time.monotonic() - started)
                    sent += 1
                wait_for("the hung export timed out",
                         lambda: stats(admin).get("tracing.zipkin.reports_failed", 0) >= 1,
                         timeout=5)
                counters = stats(admin)
            finally:
                proxy.stop()
    finally:
        hole.close()
    assert hole.accepted, "the exporter never connected to the collector"
    assert slowest < 1.0, f"a request took {slowest:.3f} s while the collector hung"
    assert counters["tracing.zipkin.spans_sent"] == 0
    assert counters["http.in.tracing.random_sampling"] == sent >= 256
