"""Per-request cost of access logging one HTTP stream (`python bench/micro_access_log.py`).

Times ``log_stream`` (the entry read from the stream, the line rendered, the line handed to
the sink) for Envoy's default text format and for a typical JSON format (the mesh's keys),
plus the pieces (render alone, sink write alone). The stream is a real ``ActiveStream`` on a
real ``HcmRuntime``, filled as the proxy fills one for ``GET /1k`` proxied to an upstream; the
sink writes to /dev/null through the real buffered writer (a flush every 64 KiB). The
compiled modules are used when a build matches the sources, as in `ubimesh proxy`
(``UBIMESH_NATIVE=0``: pure Python). CPU time (not wall time: the machine may be shared),
median of ``--repeat`` runs, in µs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import timeit
from typing import Any

from ubimesh import native

# Before the request path is imported, as `ubimesh proxy` does: the compiled modules when a
# build matches the sources (`ubimesh build-native`) and UBIMESH_NATIVE is not 0.
native.enable()

from ubimesh.proto.headers import Headers  # noqa: E402
from ubimesh.proxy.access_log import logger  # noqa: E402
from ubimesh.proxy.access_log.format import compile_format  # noqa: E402
from ubimesh.proxy.http.router import UpstreamRequest  # noqa: E402
from ubimesh.proxy.network.hcm_config import HcmRuntime  # noqa: E402
from ubimesh.proxy.network.http_manager import ActiveStream, HttpConnection  # noqa: E402
from ubimesh.proxy.snapshot.types import (  # noqa: E402
    AccessLogConfig,
    HttpConnectionManagerConfig,
    RouteAction,
)
from ubimesh.proxy.upstream.cluster_manager import ClusterManager  # noqa: E402
from ubimesh.proxy.xds.bootstrap import load_bootstrap_text  # noqa: E402
from ubimesh.telemetry.stats import Store  # noqa: E402

#: A typical JSON format (Istio's default JSON access log keys).
JSON_FORMAT = json.dumps(
    {
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "response_code_details": "%RESPONSE_CODE_DETAILS%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "duration": "%DURATION%",
        "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
        "user_agent": "%REQ(USER-AGENT)%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "authority": "%REQ(:AUTHORITY)%",
        "upstream_host": "%UPSTREAM_HOST%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "route_name": "%ROUTE_NAME%",
    }
)


#: The S1 bootstrap with one file access log (nothing is bound: only its objects are built).
BOOTSTRAP = """
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: 18000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.\
http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          route_config:
            virtual_hosts:
            - name: local
              domains: ['*']
              routes: [{match: {prefix: /}, route: {cluster: upstream}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18080}}}
"""


def make_stream() -> ActiveStream:
    """An ended stream as the proxy leaves it for ``GET /1k`` (wrk-like request headers plus
    what the HCM adds, nginx-like response head), made of the proxy's own objects (so the
    compiled classes under the compiled build). Call it with a running event loop."""
    snapshot = load_bootstrap_text(BOOTSTRAP)
    store = Store()
    clusters = ClusterManager(snapshot.clusters, store)
    hcm_config = snapshot.listeners[0].filter_chains[0].filters[-1]
    assert isinstance(hcm_config, HttpConnectionManagerConfig)
    hcm = HcmRuntime(hcm_config, clusters, store)
    conn = HttpConnection(hcm, 1 << 20)
    conn.remote = ("127.0.0.1", 40312)
    conn.local = ("127.0.0.1", 18000)
    route = hcm_config.route_config.virtual_hosts[0].routes[0]
    action = route.action
    assert isinstance(action, RouteAction)
    s = ActiveStream(conn)
    s.method = "GET"
    s.target = s.path = "/1k"
    s.host_header = "127.0.0.1:18000"
    s.headers = Headers(
        [
            ("host", "127.0.0.1:18000"),
            ("user-agent", "wrk"),
            ("accept", "*/*"),
            ("x-forwarded-proto", "http"),
            ("x-request-id", "6d3f3c1e-1a2b-4c5d-8e9f-0a1b2c3d4e5f"),
            ("x-envoy-expected-rq-timeout-ms", "15000"),
        ]
    )
    s.response_headers = [
        ("server", "nginx"),
        ("date", "Thu, 26 Nov 2026 07:00:00 GMT"),
        ("content-type", "application/octet-stream"),
        ("content-length", "1024"),
        ("last-modified", "Thu, 26 Nov 2026 06:00:00 GMT"),
        ("etag", '"6565a0c0-400"'),
        ("accept-ranges", "bytes"),
        ("x-envoy-upstream-service-time", "1"),
    ]
    s.status = 200
    s.bytes_received = 0
    s.bytes_sent = 1024
    s.start_time = time.monotonic()
    s.route = route
    up = UpstreamRequest(s, route, action, hcm)
    cluster = clusters.get("upstream")
    assert cluster is not None
    up.cluster = cluster
    up.host = cluster.hosts[0]
    up.response_started = True
    s.upstream = up
    return s


def _per_call_us(fn: Any, number: int, repeat: int) -> float:
    runs = timeit.repeat(fn, number=number, repeat=repeat, timer=time.thread_time)
    return statistics.median(runs) / number * 1e6


def _measure_format(
    name: str, json_format: str, stream: ActiveStream, number: int, repeat: int
) -> dict[str, float]:
    logs = logger.build_access_logs(
        [AccessLogConfig(name="bench", path="/dev/null", json_format=json_format)]
    )
    assert logs is not None
    log_stream = logger.log_stream
    fmt = compile_format(None, json_format)
    entry = logger.http_entry(stream)
    line = fmt(entry)
    sink = logs[0].sink
    return {
        f"log_stream {name}": _per_call_us(lambda: log_stream(logs, stream), number, repeat),
        f"render only {name}": _per_call_us(lambda: fmt(entry), number, repeat),
        f"sink write only {name}": _per_call_us(lambda: sink.write(line), number, repeat),
    }


async def _measure(number: int, repeat: int) -> dict[str, float]:
    # In a running loop, as in the proxy: the sink arms its flush timer rather than writing
    # through.
    stream = make_stream()
    results = _measure_format("default text", "", stream, number, repeat)
    results.update(_measure_format("typical json", JSON_FORMAT, stream, number, repeat))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000, help="calls per run")
    parser.add_argument("--repeat", type=int, default=7, help="runs (median reported)")
    parser.add_argument("--cpu", type=int, default=-1, help="CPU to pin to (default: none)")
    args = parser.parse_args(argv)
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    results = asyncio.run(_measure(args.number, args.repeat))
    print("compiled" if getattr(logger, "__file__", "").endswith(".so") else "pure Python")
    for name, us in results.items():
        print(f"{name:32s} {us:7.2f} us/req")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
