"""The admin server over real sockets on 127.0.0.1.

The server runs on its own event loop in a background thread (asyncio and uvloop); the tests
talk to it with ``http.client`` and raw sockets, every wait bounded. ``FakeHooks`` is a real
``AdminHooks`` implementation with fixed data (the proxy's own hooks are tested with the proxy).
The last test compares the Prometheus page with a running Envoy's for the same stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import uvloop

from ubimesh.proxy.admin import (
    AdminHooks,
    AdminServer,
    CircuitBreakerThresholds,
    ClusterStatus,
    HostStatus,
    ListenerStatus,
)
from ubimesh.proxy.snapshot.types import Locality, SocketAddress
from ubimesh.telemetry.stats import DEFAULT_BUCKETS_MS, StatsSnapshot, Store

HOST = "127.0.0.1"
WAIT = 5.0
ADMIN_TYPE = "type.googleapis.com/envoy.admin.v3."

# ---------------------------------------------------------------------------------------------
# Fixed data behind the hooks


def _stats() -> StatsSnapshot:
    s = Store()
    s.counter("cluster.backend.upstream_rq_total").inc(12)
    s.counter("cluster.backend.upstream_rq_2xx").inc(11)
    s.counter("cluster.backend.upstream_rq_5xx").inc(1)
    s.counter("http.ingress.downstream_rq_total").inc(12)
    s.counter("http.ingress.downstream_rq_4xx")
    s.gauge("server.live").set(1)
    s.gauge("http.ingress.downstream_cx_active").set(2)
    for v in (1.5, 3.0, 7.0):
        s.histogram("http.ingress.downstream_rq_time").record(v)
    return s.snapshot()


CONFIG_DUMP: dict[str, Any] = {
    "configs": [
        {
            "@type": ADMIN_TYPE + "BootstrapConfigDump",
            "bootstrap": {"node": {"id": "node-1", "cluster": "edge"}, "admin": {}},
            "last_updated": "2026-01-01T00:00:00Z",
        },
        {
            "@type": ADMIN_TYPE + "ClustersConfigDump",
            "version_info": "v1",
            "static_clusters": [
                {"cluster": {"name": "backend", "type": "STATIC", "connect_timeout": "1s"}},
                {"cluster": {"name": "other", "type": "STATIC"}},
            ],
        },
        {
            "@type": ADMIN_TYPE + "ListenersConfigDump",
            "static_listeners": [
                {"listener": {"name": "l1", "address": {}}},
                {"listener": {"name": "l2", "address": {}}},
            ],
        },
        {
            "@type": ADMIN_TYPE + "EndpointsConfigDump",
            "static_endpoint_configs": [{"endpoint_config": {"cluster_name": "backend"}}],
        },
    ]
}


class FakeHooks:
    """AdminHooks with fixed data; some methods are coroutines, some plain, as the protocol
    allows. Records what the mutating endpoints asked for."""

    def __init__(self) -> None:
        self.healthcheck_failed = False
        self.drains: list[tuple[bool, bool]] = []
        self.quit_called = threading.Event()
        self.fail_clusters = False
        self.slow_listeners = 0.0
        self.on_quit: Callable[[], Awaitable[None]] | None = None

    async def stats_snapshot(self) -> StatsSnapshot:
        return _stats()

    def server_info(self) -> dict[str, Any]:
        return {
            "version": "ubimesh/test",
            "state": "DRAINING" if self.healthcheck_failed else "LIVE",
            "uptime_current_epoch": "3s",
            "uptime_all_epochs": "3s",
            "hot_restart_version": "disabled",
            "command_line_options": {"concurrency": 1, "service_node": "node-1"},
            "node": {"id": "node-1", "cluster": "edge"},
        }

    def config_dump(self) -> Mapping[str, Any]:
        return CONFIG_DUMP

    async def clusters(self) -> Sequence[ClusterStatus]:
        if self.fail_clusters:
            raise RuntimeError("cluster manager is gone")
        return [
            ClusterStatus(
                "backend",
                hosts=(
                    HostStatus(
                        SocketAddress("10.0.0.1", 8080),
                        hostname="a.example",
                        cx_total=4,
                        cx_active=1,
                        rq_total=9,
                        rq_success=8,
                        rq_error=1,
                        locality=Locality(region="eu", zone="eu-1"),
                    ),
                    HostStatus(
                        SocketAddress("10.0.0.2", 8080),
                        health_flags=("failed_active_hc", "failed_eds_health"),
                        weight=3,
                        priority=1,
                    ),
                ),
                circuit_breakers=(
                    CircuitBreakerThresholds(),
                    CircuitBreakerThresholds(priority="HIGH"),
                ),
            ),
            ClusterStatus("other", added_via_api=True),
        ]

    async def listeners(self) -> Sequence[ListenerStatus]:
        if self.slow_listeners:
            await asyncio.sleep(self.slow_listeners)
        return [
            ListenerStatus("l1", SocketAddress("0.0.0.0", 10000)),
            ListenerStatus("l2", SocketAddress("::1", 10001)),
        ]

    def is_ready(self) -> bool:
        return not self.healthcheck_failed

    def set_healthcheck_failed(self, failed: bool) -> None:
        self.healthcheck_failed = failed

    async def drain_listeners(self, graceful: bool, inbound_only: bool) -> None:
        self.drains.append((graceful, inbound_only))

    def quit(self) -> Awaitable[None] | None:
        if self.on_quit is not None:
            return self.on_quit()
        self.quit_called.set()
        return None


class LoggingFakeHooks(FakeHooks):
    def __init__(self) -> None:
        super().__init__()
        self.levels: dict[str, str] = {"admin": "info", "http": "info"}

    def set_log_levels(self, levels: Mapping[str, str]) -> Mapping[str, str]:
        for name in levels:
            if name and name not in self.levels:
                raise KeyError(name)
        for name, level in levels.items():
            for target in [name] if name else list(self.levels):
                self.levels[target] = level
        return self.levels


def _check_protocol(h: FakeHooks) -> AdminHooks:
    return h  # mypy checks FakeHooks against the protocol here


# ---------------------------------------------------------------------------------------------
# Harness


class Harness:
    def __init__(self, hooks: FakeHooks, loop_kind: str, **options: Any) -> None:
        self.hooks = hooks
        self.loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = AdminServer(SocketAddress(HOST, 0), hooks, **options)
        self.port = self.call(self.server.start())

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=WAIT)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path)

    def post(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", path)

    def connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=WAIT)
        sock.settimeout(WAIT)
        return sock


def read_all(sock: socket.socket, limit: float = WAIT) -> bytes:
    """Read until the server closes the connection (bounded by ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    chunks: list[bytes] = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return b"".join(chunks)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
    raise AssertionError(f"connection still open after {limit} s; got {b''.join(chunks)[:200]!r}")


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read ``count`` content-length framed responses from a keep-alive connection."""
    buf = b""
    out: list[tuple[int, dict[str, str], bytes]] = []
    deadline = time.monotonic() + WAIT
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            assert time.monotonic() < deadline, "response head did not arrive"
            data = sock.recv(65536)
            assert data, "connection closed early"
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers["content-length"])
        while len(buf) < length:
            assert time.monotonic() < deadline, "response body did not arrive"
            data = sock.recv(65536)
            assert data, "connection closed early"
            buf += data
        out.append((status, headers, buf[:length]))
        buf = buf[length:]
    return out


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def admin(loop_kind: str) -> Iterator[Harness]:
    h = Harness(FakeHooks(), loop_kind)
    try:
        yield h
    finally:
        h.close()


@contextlib.contextmanager
def harness(loop_kind: str, hooks: FakeHooks | None = None, **options: Any) -> Iterator[Harness]:
    h = Harness(hooks or FakeHooks(), loop_kind, **options)
    try:
        yield h
    finally:
        h.close()


TEXT = "text/plain; charset=UTF-8"
JSON = "application/json"

# ---------------------------------------------------------------------------------------------
# Paths


def test_read_only_paths(admin: Harness) -> None:
    cases = [
        ("/", 200, "text/html; charset=UTF-8"),
        ("/help", 200, TEXT),
        ("/ready", 200, TEXT),
        ("/server_info", 200, JSON),
        ("/config_dump", 200, JSON),
        ("/clusters", 200, TEXT),
        ("/clusters?format=json", 200, JSON),
        ("/listeners", 200, TEXT),
        ("/listeners?format=json", 200, JSON),
        ("/stats", 200, TEXT),
        ("/stats?format=json", 200, JSON),
        ("/stats?format=html", 200, "text/html; charset=UTF-8"),
        ("/stats?format=prometheus", 200, "text/plain; version=0.0.4; charset=utf-8"),
        ("/stats/prometheus", 200, "text/plain; version=0.0.4; charset=utf-8"),
        ("/hot_restart_version", 200, TEXT),
        ("/runtime", 200, JSON),
        ("/certs", 200, JSON),
        ("/no/such/path", 404, TEXT),
        ("/stats?format=xml", 400, TEXT),
        ("/stats?filter=(", 400, TEXT),
        ("/stats?type=Everything", 400, TEXT),
        ("/stats?histogram_buckets=fancy", 400, TEXT),
        ("/stats/prometheus?histogram_buckets=disjoint", 400, TEXT),
        ("/stats/prometheus?filter=[", 400, TEXT),
        ("/clusters?filter=(", 400, TEXT),
        ("/config_dump?resource=nothing_here", 404, "text/plain"),
        ("/config_dump?name_regex=(", 400, TEXT),
    ]
    for path, status, ctype in cases:
        got_status, headers, _ = admin.get(path)
        assert (path, got_status, headers["content-type"]) == (path, status, ctype)
        assert headers["cache-control"] == "no-cache, max-age=0"
        assert headers["x-content-type-options"] == "nosniff"


def test_help_and_unknown_path(admin: Harness) -> None:
    _, _, body = admin.get("/help")
    text = body.decode()
    assert text.startswith("admin commands are:\n")
    assert "  /quitquitquit (POST): exit the server\n" in text
    assert "  /stats: print server stats\n      usedonly: " in text
    _, _, body = admin.get("/no/such/path")
    assert body.decode() == "invalid path. " + text
    _, _, home = admin.get("/")
    assert b"<a href='/stats'>/stats</a>" in home
    assert b"action='/quitquitquit' method='post'" in home


def test_ready_server_info_hot_restart(admin: Harness) -> None:
    assert admin.get("/ready")[2] == b"LIVE\n"
    info = json.loads(admin.get("/server_info")[2])
    assert info["state"] == "LIVE"
    assert info["command_line_options"]["concurrency"] == 1
    assert admin.get("/hot_restart_version")[2] == b"disabled"
    assert json.loads(admin.get("/runtime")[2]) == {"layers": [], "entries": {}}
    assert json.loads(admin.get("/certs")[2]) == {"certificates": []}
    # Envoy pretty-prints with one space of indentation.
    assert admin.get("/server_info")[2].startswith(b'{\n "version": "ubimesh/test",\n')


def test_stats_paths(admin: Harness) -> None:
    text = admin.get("/stats")[2].decode()
    assert "cluster.backend.upstream_rq_total: 12\n" in text
    assert "http.ingress.downstream_rq_time: P0(nan," in text
    only = admin.get("/stats?filter=upstream_rq_[0-9]xx")[2].decode()
    assert only == "cluster.backend.upstream_rq_2xx: 11\ncluster.backend.upstream_rq_5xx: 1\n"
    # "+" in a filter is a regex operator, not a space.
    plus = admin.get("/stats?filter=upstream_rq_[0-9]+xx$")[2].decode()
    assert plus == only
    inverted = admin.get("/stats?filter=^cluster%5C.&invert_filter")[2].decode()
    assert "cluster." not in inverted and "server.live: 1" in inverted
    used = admin.get("/stats?usedonly&filter=downstream_rq_")[2].decode()
    assert "downstream_rq_4xx" not in used and "downstream_rq_total: 12" in used
    gauges = admin.get("/stats?type=Gauges")[2].decode()
    assert gauges == "http.ingress.downstream_cx_active: 2\nserver.live: 1\n"
    doc = json.loads(admin.get("/stats?format=json&filter=^server")[2])
    assert doc == {"stats": [{"name": "server.live", "value": 1}]}
    cum = admin.get("/stats?filter=rq_time&histogram_buckets=cumulative")[2].decode()
    assert cum.startswith("http.ingress.downstream_rq_time: B0.5(0,0) B1(0,0) B5(0,2) B10(0,3)")
    prom = admin.get("/stats/prometheus")[2].decode()
    assert prom == admin.get("/stats?format=prometheus")[2].decode()
    labels = 'envoy_response_code_class="2",envoy_cluster_name="backend"'
    assert f"envoy_cluster_upstream_rq_xx{{{labels}}} 11\n" in prom
    assert "# TYPE envoy_http_downstream_rq_time histogram\n" in prom
    _check_exposition_shape(prom)
    summary = admin.get("/stats/prometheus?histogram_buckets=summary&filter=rq_time")[2].decode()
    assert summary.startswith("# TYPE envoy_http_downstream_rq_time summary\n")
    _check_exposition_shape(summary)
    filtered = admin.get("/stats/prometheus?filter=^server%5C.&usedonly")[2].decode()
    assert filtered == "# TYPE envoy_server_live gauge\nenvoy_server_live{} 1\n"


_SAMPLE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*\{(?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\.)*",?)*\} \S+')


def _check_exposition_shape(text: str) -> None:
    """Every line is a TYPE line or a sample of the family declared last (the full strict
    check of the format is in tests/unit/test_prometheus.py)."""
    assert text.endswith("\n")
    family = None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
            continue
        assert _SAMPLE.fullmatch(line), line
        assert family is not None and line.startswith(family), line


def test_clusters(admin: Harness) -> None:
    text = admin.get("/clusters")[2].decode()
    lines = text.splitlines()
    assert lines[:10] == [
        "backend::observability_name::backend",
        "backend::default_priority::max_connections::1024",
        "backend::default_priority::max_pending_requests::1024",
        "backend::default_priority::max_requests::1024",
        "backend::default_priority::max_retries::3",
        "backend::high_priority::max_connections::1024",
        "backend::high_priority::max_pending_requests::1024",
        "backend::high_priority::max_requests::1024",
        "backend::high_priority::max_retries::3",
        "backend::added_via_api::false",
    ]
    host = [ln for ln in lines if ln.startswith("backend::10.0.0.1:8080::")]
    assert [ln.split("::")[2] for ln in host] == [
        *("cx_active", "cx_connect_fail", "cx_total", "rq_active", "rq_error"),
        *("rq_pending_active", "rq_success", "rq_timeout", "rq_total"),
        *("hostname", "health_flags", "weight", "region", "zone", "sub_zone"),
        *("canary", "priority", "success_rate", "local_origin_success_rate"),
    ]
    assert "backend::10.0.0.1:8080::cx_total::4" in lines
    assert "backend::10.0.0.1:8080::health_flags::healthy" in lines
    assert "backend::10.0.0.1:8080::zone::eu-1" in lines
    assert "backend::10.0.0.2:8080::health_flags::/failed_active_hc/failed_eds_health" in lines
    assert "backend::10.0.0.2:8080::priority::1" in lines
    assert "other::added_via_api::true" in lines
    only = admin.get("/clusters?filter=^oth")[2].decode()
    assert only == "other::observability_name::other\nother::added_via_api::true\n"

    doc = json.loads(admin.get("/clusters?format=json")[2])
    backend, other = doc["cluster_statuses"]
    assert other == {
        "name": "other",
        "added_via_api": True,
        "host_statuses": [],
        "observability_name": "other",
    }
    h1, h2 = backend["host_statuses"]
    assert h1["address"] == {"socket_address": {"address": "10.0.0.1", "port_value": 8080}}
    stats = {s["name"]: s for s in h1["stats"]}
    assert stats["cx_total"] == {"value": "4", "name": "cx_total"}
    assert stats["rq_timeout"] == {"name": "rq_timeout"}  # zero values are left out
    assert stats["cx_active"] == {"type": "GAUGE", "value": "1", "name": "cx_active"}
    assert h1["health_status"] == {"eds_health_status": "HEALTHY"}
    assert h1["locality"] == {"region": "eu", "zone": "eu-1"}
    assert h2["health_status"] == {
        "failed_active_health_check": True,
        "eds_health_status": "UNHEALTHY",
    }
    assert h2["weight"] == 3 and h2["priority"] == 1
    assert backend["circuit_breakers"]["thresholds"][1]["priority"] == "HIGH"


def test_listeners(admin: Harness) -> None:
    assert admin.get("/listeners")[2] == b"l1::0.0.0.0:10000\nl2::[::1]:10001\n"
    doc = json.loads(admin.get("/listeners?format=json")[2])
    assert doc["listener_statuses"][1] == {
        "name": "l2",
        "local_address": {"socket_address": {"address": "::1", "port_value": 10001}},
    }


def test_config_dump(admin: Harness) -> None:
    doc = json.loads(admin.get("/config_dump")[2])
    types = [c["@type"] for c in doc["configs"]]
    assert types == [
        ADMIN_TYPE + t for t in ("BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump")
    ]
    with_eds = json.loads(admin.get("/config_dump?include_eds")[2])
    assert with_eds["configs"][-1]["@type"] == ADMIN_TYPE + "EndpointsConfigDump"

    clusters = json.loads(admin.get("/config_dump?resource=static_clusters")[2])
    assert [c["@type"] for c in clusters["configs"]] == [
        ADMIN_TYPE + "ClustersConfigDump.StaticCluster"
    ] * 2
    assert clusters["configs"][0]["cluster"]["name"] == "backend"

    masked = json.loads(admin.get("/config_dump?resource=static_clusters&mask=cluster.name")[2])
    assert masked["configs"][1] == {
        "@type": ADMIN_TYPE + "ClustersConfigDump.StaticCluster",
        "cluster": {"name": "other"},
    }
    node = json.loads(admin.get("/config_dump?mask=bootstrap.node.id")[2])
    assert node["configs"][0] == {
        "@type": ADMIN_TYPE + "BootstrapConfigDump",
        "bootstrap": {"node": {"id": "node-1"}},
    }
    named = json.loads(admin.get("/config_dump?name_regex=l1")[2])
    listeners = next(c for c in named["configs"] if c["@type"].endswith("ListenersConfigDump"))
    assert [e["listener"]["name"] for e in listeners["static_listeners"]] == ["l1"]
    clusters_cfg = next(c for c in named["configs"] if c["@type"].endswith("ClustersConfigDump"))
    assert clusters_cfg["static_clusters"] == []  # full match: "l1" is not "backend"
    status, _, body = admin.get("/config_dump?resource=nothing_here")
    assert (status, body) == (404, b"nothing_here not found in config dump")


# ---------------------------------------------------------------------------------------------
# Mutating paths


POST_ONLY = [
    "/healthcheck/fail",
    "/healthcheck/ok",
    "/drain_listeners",
    "/quitquitquit",
    "/logging",
]


def test_post_only_paths_refuse_other_methods(admin: Harness) -> None:
    for path in POST_ONLY:
        for method in ("GET", "PUT", "HEAD"):
            status, headers, body = admin.request(method, path)
            assert status == 405, (method, path)
            assert headers["content-type"] == TEXT
            if method != "HEAD":
                assert body == f"Method {method} not allowed, POST required.".encode()
    assert not admin.hooks.healthcheck_failed
    assert admin.hooks.drains == []
    assert not admin.hooks.quit_called.is_set()


def test_healthcheck_fail_and_ok(admin: Harness) -> None:
    assert admin.post("/healthcheck/fail")[2] == b"OK\n"
    assert admin.hooks.healthcheck_failed
    status, _, body = admin.get("/ready")
    assert (status, body) == (503, b"DRAINING\n")
    assert admin.post("/healthcheck/ok")[:3:2] == (200, b"OK\n")
    assert admin.get("/ready")[:3:2] == (200, b"LIVE\n")


def test_drain_listeners(admin: Harness) -> None:
    assert admin.post("/drain_listeners")[2] == b"OK\n"
    assert admin.post("/drain_listeners?graceful&inboundonly")[2] == b"OK\n"
    assert admin.post("/drain_listeners?graceful")[2] == b"OK\n"
    assert admin.hooks.drains == [(False, False), (True, True), (True, False)]


def test_quitquitquit_answers_then_quits(admin: Harness) -> None:
    status, _, body = admin.request("POST", "/quitquitquit", body=b"", headers={})
    assert (status, body) == (200, b"OK\n")
    assert admin.hooks.quit_called.wait(WAIT)


def test_quit_hook_may_stop_the_admin_server(loop_kind: str) -> None:
    hooks = FakeHooks()
    with harness(loop_kind, hooks) as h:

        async def stop_admin() -> None:
            await h.server.stop()
            hooks.quit_called.set()

        hooks.on_quit = stop_admin
        assert h.post("/quitquitquit")[2] == b"OK\n"
        assert hooks.quit_called.wait(WAIT)
        with pytest.raises(OSError):
            h.get("/ready")


def test_logging_in_process() -> None:
    logger = logging.getLogger("ubimesh.proxy.admin")
    saved = {
        name: lg.level
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and (name == "ubimesh" or name.startswith("ubimesh."))
    }
    try:
        with harness("asyncio") as h:
            status, _, body = h.post("/logging")
            assert status == 200
            text = body.decode()
            assert text.startswith("active loggers:\n")
            assert "  ubimesh.proxy.admin: " in text
            text = h.post("/logging?paths=ubimesh.proxy.admin:error")[2].decode()
            assert "  ubimesh.proxy.admin: error\n" in text
            assert logger.level == logging.ERROR
            text = h.post("/logging?level=debug")[2].decode()
            assert "  ubimesh.proxy.admin: debug\n" in text and "  ubimesh: debug\n" in text
            text = h.post("/logging?ubimesh.proxy.admin=trace")[2].decode()
            assert "  ubimesh.proxy.admin: trace\n" in text
            status, _, body = h.post("/logging?level=loud")
            assert status == 400 and body.startswith(b"error: unknown logger level")
            status, _, body = h.post("/logging?paths=no.such.logger:info")
            assert status == 400 and body.startswith(b"error: unknown logger name")
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        for name, lg in logging.Logger.manager.loggerDict.items():
            mine = name == "ubimesh" or name.startswith("ubimesh.")
            if isinstance(lg, logging.Logger) and mine and name not in saved:
                lg.setLevel(logging.NOTSET)


def test_logging_through_the_hook(loop_kind: str) -> None:
    hooks = LoggingFakeHooks()
    with harness(loop_kind, hooks) as h:
        assert (
            h.post("/logging?http=debug")[2] == b"active loggers:\n  admin: info\n  http: debug\n"
        )
        assert (
            h.post("/logging?level=error")[2] == b"active loggers:\n  admin: error\n  http: error\n"
        )
        assert h.post("/logging?paths=bogus:info")[0] == 400


# ---------------------------------------------------------------------------------------------
# HTTP behaviour and robustness


def test_head_has_no_body(admin: Harness) -> None:
    sock = admin.connect()
    with sock:
        sock.sendall(b"HEAD /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 5" in head
    assert body == b""


def test_keep_alive_and_pipelining(admin: Harness) -> None:
    sock = admin.connect()
    with sock:
        sock.sendall(
            b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /listeners HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /healthcheck/fail HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        )
        responses = read_responses(sock, 3)
        assert [(s, b) for s, _, b in responses] == [
            (200, b"LIVE\n"),
            (200, b"l1::0.0.0.0:10000\nl2::[::1]:10001\n"),
            (200, b"OK\n"),
        ]
        # Still open: one more request on the same connection.
        sock.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(sock, 1)[0][0] == 503


def test_http10_closes(admin: Harness) -> None:
    sock = admin.connect()
    with sock:
        sock.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close\r\n" in data
    assert data.endswith(b"\r\n\r\nLIVE\n")


def test_expect_continue(admin: Harness) -> None:
    sock = admin.connect()
    with sock:
        sock.sendall(
            b"POST /healthcheck/fail HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = sock.recv(64)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"body")
        assert read_responses(sock, 1)[0][2] == b"OK\n"


def test_huge_request_refused(admin: Harness) -> None:
    # Headers over 60 KiB, sent in one go.
    sock = admin.connect()
    with sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 431 ")
    # A request line over the limit.
    sock = admin.connect()
    with sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(b"GET /stats?filter=" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 431 ")
    # Too many headers.
    sock = admin.connect()
    with sock:
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
        sock.sendall(b"GET /ready HTTP/1.1\r\n" + many + b"\r\n")
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 431 ")
    # A body over the limit, refused from its Content-Length before it is sent.
    sock = admin.connect()
    with sock:
        sock.sendall(b"POST /healthcheck/fail HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n")
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 413 ")
    # A chunked body over the limit.
    sock = admin.connect()
    with sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(b"POST /healthcheck/ok HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(20):
                sock.sendall(b"2000\r\n" + b"x" * 0x2000 + b"\r\n")
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert not admin.hooks.healthcheck_failed
    # The server is fine afterwards.
    assert admin.get("/ready")[0] == 200


def test_garbage_is_a_bad_request(admin: Harness) -> None:
    for junk in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n",  # TLS hello
        b"GET /ready HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    ):
        sock = admin.connect()
        with sock:
            sock.sendall(junk)
            data = read_all(sock)
        assert data.startswith(b"HTTP/1.1 400 "), junk
    # "*" is no admin path; an absolute-form request-target is served by its path.
    sock = admin.connect()
    with sock:
        sock.sendall(b"OPTIONS * HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 404 ")
    sock = admin.connect()
    with sock:
        sock.sendall(b"GET http://admin.local/ready HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert read_all(sock).endswith(b"\r\n\r\nLIVE\n")


def test_slow_client_times_out(loop_kind: str) -> None:
    with harness(loop_kind, request_timeout=0.3, idle_timeout=0.4) as h:
        # Half a request, then silence: 408 and close.
        sock = h.connect()
        with sock:
            sock.sendall(b"GET /ready HTTP/1.1\r\nHost:")
            started = time.monotonic()
            data = read_all(sock, limit=3.0)
            assert data.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < 2.5
        # A byte at a time, never finishing: the deadline runs from the first byte.
        sock = h.connect()
        with sock:
            started = time.monotonic()
            closed = False
            for ch in b"GET /ready HTTP/1.1\r\nX-Slow: " + b"z" * 100:
                try:
                    sock.sendall(bytes([ch]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.05)
                if time.monotonic() - started > 3.0:
                    break
            if not closed:
                data = read_all(sock, limit=3.0)
                assert data.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < 3.0
        # An idle keep-alive connection is closed without a response.
        sock = h.connect()
        with sock:
            sock.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_responses(sock, 1)[0][0] == 200
            started = time.monotonic()
            assert read_all(sock, limit=3.0) == b""
            assert time.monotonic() - started < 2.5


def test_failing_and_slow_hooks(loop_kind: str) -> None:
    hooks = FakeHooks()
    with harness(loop_kind, hooks, handler_timeout=0.3) as h:
        hooks.fail_clusters = True
        status, headers, body = h.get("/clusters")
        assert status == 500 and headers["content-type"] == TEXT
        assert b"cluster manager is gone" in body
        hooks.slow_listeners = 2.0
        started = time.monotonic()
        assert h.get("/listeners")[0] == 503
        assert time.monotonic() - started < 1.5
        assert h.get("/ready")[0] == 200  # still serving


def test_binds_the_admin_address_only(admin: Harness) -> None:
    assert admin.server.address == SocketAddress(HOST, 0)
    assert admin.port > 0
    # Linux routes all of 127/8 to loopback: a listener on 0.0.0.0 would accept on 127.0.0.2.
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.2", admin.port), timeout=WAIT),
    ):
        pass


def test_connection_limit(loop_kind: str) -> None:
    with harness(loop_kind, max_connections=2) as h:
        a, b = h.connect(), h.connect()
        with a, b:
            a.sendall(b"GET /ready HTTP/1.1\r\n\r\n")
            b.sendall(b"GET /ready HTTP/1.1\r\n\r\n")
            assert read_responses(a, 1)[0][0] == 200
            assert read_responses(b, 1)[0][0] == 200
            c = h.connect()
            with c:
                assert read_all(c) == b""  # closed on accept
        # Once those are gone there is room again.
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if h.get("/ready")[0] == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_stop_closes_open_connections(loop_kind: str) -> None:
    h = Harness(FakeHooks(), loop_kind)
    try:
        sock = h.connect()
        with sock:
            sock.sendall(b"GET /ready HTTP/1.1\r\n\r\n")
            assert read_responses(sock, 1)[0][0] == 200
            h.call(h.server.stop())
            assert read_all(sock) == b""
        with pytest.raises(OSError):
            socket.create_connection((HOST, h.port), timeout=WAIT).close()
    finally:
        h.close()


# ---------------------------------------------------------------------------------------------
# Against Envoy: the same stats give the same Prometheus names, labels and order


ENVOY_CONFIG = """
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: %(admin)d}}
static_resources:
  listeners:
  - name: http
    address: {socket_address: {address: 127.0.0.1, port_value: %(http)d}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": %(hcm)s
          stat_prefix: ingress_http
          route_config:
            virtual_hosts:
            - name: vh
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {cluster: backend}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": %(router)s}
  - name: tcp
    address: {socket_address: {address: 127.0.0.1, port_value: %(tcp)d}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": %(tcp_proxy)s
          stat_prefix: tcp_stats
          cluster: backend
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(dead)d}}}
"""


_EXT = "type.googleapis.com/envoy.extensions.filters."
ENVOY_TYPES = {
    "hcm": _EXT + "network.http_connection_manager.v3.HttpConnectionManager",
    "router": _EXT + "http.router.v3.Router",
    "tcp_proxy": _EXT + "network.tcp_proxy.v3.TcpProxy",
}


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _fetch(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=WAIT) as resp:
        return str(resp.read().decode())


class StaticHooks(FakeHooks):
    def __init__(self, snap: StatsSnapshot) -> None:
        super().__init__()
        self.snap = snap

    async def stats_snapshot(self) -> StatsSnapshot:
        return self.snap


@pytest.mark.envoy
def test_prometheus_matches_envoy(tmp_path: Path) -> None:
    exe = shutil.which("envoy")
    if exe is None:
        pytest.skip("no envoy binary on PATH")
    admin_port, http_port, tcp_port, dead_port = _free_ports(4)
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(
        ENVOY_CONFIG
        % {
            "admin": admin_port,
            "http": http_port,
            "tcp": tcp_port,
            "dead": dead_port,
            **ENVOY_TYPES,
        }
    )
    log = open(tmp_path / "envoy.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [exe, "-c", str(cfg), "--concurrency", "2", "--disable-hot-restart", "-l", "error"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "envoy.log").read_text()
            try:
                if _fetch(admin_port, "/ready") == "LIVE\n":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "envoy did not become ready"
            time.sleep(0.05)
        for _ in range(3):  # upstream is down: 503s fill response-code stats
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://{HOST}:{http_port}/x", timeout=WAIT).read()
        with (
            contextlib.suppress(OSError),
            socket.create_connection((HOST, tcp_port), timeout=WAIT) as s,
        ):
            s.sendall(b"x")
            s.recv(1)
        snap = StatsSnapshot()
        envoy_text = _fetch(admin_port, "/stats?type=Counters")
        for line in envoy_text.splitlines():
            name, value = line.rsplit(": ", 1)
            snap.counters[name] = int(value)
        for line in _fetch(admin_port, "/stats?type=Gauges").splitlines():
            name, value = line.rsplit(": ", 1)
            snap.gauges[name] = int(value)
        for line in _fetch(
            admin_port, "/stats?type=Histograms&histogram_buckets=disjoint"
        ).splitlines():
            name, rest = line.split(": ", 1)
            counts = [int(c) for c in re.findall(r"B[^(]+\(\d+,(\d+)\)", rest)] or [0] * len(
                DEFAULT_BUCKETS_MS
            )
            snap.histograms[name] = {
                "bounds": list(DEFAULT_BUCKETS_MS),
                "counts": [*counts, 0],
                "sum": 0.0,
                "count": sum(counts),
            }
        envoy_prom = _fetch(admin_port, "/stats/prometheus")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()

    assert len(snap.counters) > 100 and snap.histograms
    h = Harness(StaticHooks(snap), "asyncio")
    try:
        ours = h.get("/stats/prometheus")[2].decode()
        ours_text = h.get("/stats?type=Counters")[2].decode()
    finally:
        h.close()

    def shape(text: str) -> list[str]:
        # Values drift between Envoy's two pages and Envoy's _sum comes from its own
        # histograms: compare every line but without its value.
        return [ln if ln.startswith("#") else ln.rsplit(" ", 1)[0] for ln in text.splitlines()]

    assert shape(ours) == shape(envoy_prom)
    assert ours_text == envoy_text
