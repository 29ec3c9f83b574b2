"""Active health checks, outlier detection and priority failover through a real proxy process.

Upstreams are real processes (the HTTP echo upstream) or threads (a TCP echo) on 127.0.0.1 that
the tests kill and start again on the same port. The proxy's view is read from admin
``/clusters`` (Envoy's ``health_flags``) and from who answers the traffic. Every expectation
here also holds for Envoy 1.40 (``UBIMESH_IT_SUBJECT=envoy``), and the last test compares the
health flags of both on one configuration.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.conftest import ProxyFactory
from tests.support.bootstrap import HCM, ROUTER, address, listener
from tests.support.faults import start_echo_process
from tests.support.procs import LOOPBACK, ManagedProcess, envoy_binary, free_ports

TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"

#: Fast checks: a dead host is failed within 2 x 0.2 s (+ connect errors are immediate).
HEALTH_CHECK = {
    "timeout": "0.5s",
    "interval": "0.2s",
    "no_traffic_interval": "0.2s",
    "unhealthy_threshold": 2,
    "healthy_threshold": 1,
    "http_health_check": {"path": "/healthz"},
}


# --------------------------------------------------------------------------------------------
# Upstreams that die and come back on the same port


class EchoProcess:
    """The HTTP echo upstream as a process on a fixed port, to kill and start again."""

    def __init__(self, workdir: Path, name: str, port: int) -> None:
        self.workdir, self.name, self.port = workdir, name, port
        self.proc: ManagedProcess | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        self.proc, port = start_echo_process(
            self.workdir, self.name, port=self.port, log_name=f"{self.name}-{self.runs}"
        )
        assert port == self.port

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture
def echoes(tmp_path: Path) -> Iterator[Callable[[str], EchoProcess]]:
    made: list[EchoProcess] = []

    def make(name: str) -> EchoProcess:
        e = EchoProcess(tmp_path, name, free_ports(1)[0])
        e.start()
        made.append(e)
        return e

    yield make
    for e in made:
        e.stop()


class TcpEcho:
    """A TCP echo server on a given port (threads; ``stop`` joins them, bounded)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server((LOOPBACK, port))
        self.sock.settimeout(0.2)
        self.port = port
        self.connections = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.settimeout(5.0)
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._accept.join(5)
        for t in self._threads:
            t.join(5)


# --------------------------------------------------------------------------------------------
# Configuration and observation


class Config:
    """A bootstrap for ProxyFactory.start: listeners are (name, filter) pairs."""

    def __init__(self, clusters: list[dict[str, Any]], filters: dict[str, dict[str, Any]]):
        self.clusters = clusters
        self.filters = filters

    @property
    def listener_names(self) -> list[str]:
        return list(self.filters)

    def render(self, admin_port: int, ports: dict[str, int]) -> dict[str, Any]:
        listeners = [listener(name, ports[name], f) for name, f in self.filters.items()]
        return {
            "admin": {"address": address(admin_port)},
            "static_resources": {"listeners": listeners, "clusters": self.clusters},
        }


def http_listener(cluster: str) -> dict[str, Any]:
    route = [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": "in",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": route}]},
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
            ],
        },
    }


def tcp_listener(cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": TCP_PROXY_TYPE, "stat_prefix": "t", "cluster": cluster},
    }


def lb_endpoint(port: int, **extra: Any) -> dict[str, Any]:
    ep = {"endpoint": {"address": address(port)}}
    return {**ep, **extra}


def cluster(name: str, levels: list[list[dict[str, Any]]], **extra: Any) -> dict[str, Any]:
    """A STATIC cluster with one locality per priority level."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"priority": p, "lb_endpoints": eps} for p, eps in enumerate(levels) if eps
            ],
        },
        **extra,
    }


def health_flags(proxy: Any, name: str) -> dict[int, str]:
    """Port -> health_flags of every host of cluster ``name`` (admin /clusters)."""
    status, body = proxy.admin("/clusters")
    assert status == 200, body
    out = {}
    for line in body.decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == name and parts[2] == "health_flags":
            out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return out


def wait_flags(proxy: Any, name: str, want: dict[int, str], timeout: float = 5.0) -> float:
    """Wait until the listed hosts show these flags; returns how long it took."""
    start = time.monotonic()
    got: dict[int, str] = {}
    while time.monotonic() - start < timeout:
        got = health_flags(proxy, name)
        if all(got.get(port) == flags for port, flags in want.items()):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"after {timeout} s /clusters shows {got}, wanted {want}")


def answers(connect: Any, port: int, n: int, *, strict: bool = True) -> Counter[str]:
    """Send ``n`` GETs on one connection; count the upstreams that answered. Every answer
    must be a 200 (unless not ``strict``: then other statuses count as "error")."""
    conn = connect(port)
    seen: Counter[str] = Counter()
    for _ in range(n):
        resp = conn.request("GET", "/", timeout=5)
        if resp.status != 200 and not strict:
            seen["error"] += 1
            continue
        assert resp.status == 200, resp
        seen[dict((k.lower(), v) for k, v in resp.headers)["x-echo-upstream"]] += 1
    return seen


def answers_soon(
    connect: Any, port: int, n: int, ok: Callable[[Counter[str]], bool], timeout: float = 3.0
) -> Counter[str]:
    """``answers`` until ``ok(seen)``, bounded. Envoy applies health changes to its balancer
    at most every ``update_merge_window`` (1 s by default; ubimesh at once), so the traffic
    may lag /clusters by up to a second."""
    deadline = time.monotonic() + timeout
    while True:
        seen = answers(connect, port, n, strict=False)
        if ("error" not in seen and ok(seen)) or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# Tests


def test_active_hc_takes_a_dead_host_out_and_brings_it_back(
    proxy_factory: ProxyFactory, echoes: Callable[[str], EchoProcess], connect: Any
) -> None:
    a, b, c = echoes("a"), echoes("b"), echoes("c")
    eps = [lb_endpoint(e.port) for e in (a, b, c)]
    cfg = Config([cluster("svc", [eps], health_checks=[HEALTH_CHECK])],
                 {"main": http_listener("svc")})  # fmt: skip
    proxy = proxy_factory.start(cfg)  # type: ignore[arg-type]
    wait_flags(proxy, "svc", {a.port: "healthy", b.port: "healthy", c.port: "healthy"})
    assert set(answers(connect, proxy.port(), 12)) == {"a", "b", "c"}

    b.kill()
    took = wait_flags(proxy, "svc", {b.port: "/failed_active_hc"})
    assert took < 2.0, f"a dead host was marked failed after {took:.1f} s (2 x 0.2 s interval)"
    assert set(answers(connect, proxy.port(), 20)) == {"a", "c"}  # none failed, none to b

    b.start()  # same port: the next passing check brings it back (healthy_threshold 1)
    wait_flags(proxy, "svc", {b.port: "healthy"})
    assert "b" in answers_soon(connect, proxy.port(), 12, lambda seen: "b" in seen)
    stats = proxy.stats()
    assert stats["cluster.svc.health_check.healthy"] == 3
    assert stats["cluster.svc.health_check.network_failure"] >= 2


def test_priority_failover_follows_health_and_comes_back(
    proxy_factory: ProxyFactory, echoes: Callable[[str], EchoProcess], connect: Any
) -> None:
    p0 = [echoes("p0a"), echoes("p0b")]
    p1 = [echoes("p1a"), echoes("p1b")]
    levels = [[lb_endpoint(e.port) for e in p0], [lb_endpoint(e.port) for e in p1]]
    cfg = Config([cluster("svc", levels, health_checks=[HEALTH_CHECK])],
                 {"main": http_listener("svc")})  # fmt: skip
    proxy = proxy_factory.start(cfg)  # type: ignore[arg-type]
    wait_flags(proxy, "svc", {e.port: "healthy" for e in p0 + p1})
    assert set(answers(connect, proxy.port(), 20)) == {"p0a", "p0b"}  # the local site only

    p0[0].kill()  # P0 half healthy: 50 % x 1.4 = 70 % stays, 30 % spills to P1
    wait_flags(proxy, "svc", {p0[0].port: "/failed_active_hc"})
    answers_soon(connect, proxy.port(), 10, lambda seen: "p0a" not in seen)
    n = 300
    seen = answers(connect, proxy.port(), n)
    spilled = (seen["p1a"] + seen["p1b"]) / n
    assert 0.2 <= spilled <= 0.4, seen
    assert "p0a" not in seen

    p0[1].kill()  # P0 gone: everything to P1
    wait_flags(proxy, "svc", {p0[1].port: "/failed_active_hc"})
    want = {"p1a", "p1b"}
    assert set(answers_soon(connect, proxy.port(), 20, lambda seen: set(seen) == want)) == want

    for e in p0:
        e.start()
    wait_flags(proxy, "svc", {e.port: "healthy" for e in p0})
    home = {"p0a", "p0b"}  # and back to the local site
    assert set(answers_soon(connect, proxy.port(), 20, lambda seen: set(seen) == home)) == home


def test_outlier_detection_ejects_after_5_connect_failures_and_readmits(
    proxy_factory: ProxyFactory,
) -> None:
    good = [TcpEcho(free_ports(1)[0]) for _ in range(2)]
    dead_port = free_ports(1)[0]
    revived: TcpEcho | None = None
    try:
        eps = [lb_endpoint(dead_port)] + [lb_endpoint(g.port) for g in good]
        outlier = {"interval": "0.2s", "base_ejection_time": "1s", "max_ejection_percent": 50}
        cfg = Config([cluster("svc", [eps], outlier_detection=outlier)],
                     {"main": tcp_listener("svc")})  # fmt: skip
        proxy = proxy_factory.start(cfg)  # type: ignore[arg-type]

        def one() -> bool:
            """One proxied connection: True when it echoed."""
            with socket.create_connection((LOOPBACK, proxy.port()), timeout=5) as s:
                s.sendall(b"ping")
                try:
                    return s.recv(16) == b"ping"
                except OSError:
                    return False

        results = [one() for _ in range(30)]
        failures = results.count(False)
        assert 1 <= failures <= 5, results  # ejected by the 5th consecutive connect failure
        assert all(results[-12:]), results
        assert health_flags(proxy, "svc")[dead_port] == "/failed_outlier_check"
        stats = proxy.stats()
        assert stats["cluster.svc.outlier_detection.ejections_enforced_consecutive_5xx"] == 1
        assert stats["cluster.svc.outlier_detection.ejections_active"] == 1

        revived = TcpEcho(dead_port)  # the replica recovers; after 1 s it is tried again
        wait_flags(proxy, "svc", {dead_port: "healthy"}, timeout=5.0)
        assert all(one() for _ in range(9))
        assert revived.connections >= 2  # back in the rotation and answering
        assert proxy.stats()["cluster.svc.outlier_detection.ejections_active"] == 0
    finally:
        for g in good:
            g.stop()
        if revived is not None:
            revived.stop()


@pytest.mark.skipif(envoy_binary() is None, reason="needs the envoy binary")
def test_health_flags_match_envoy(
    proxy_factory: ProxyFactory, echoes: Callable[[str], EchoProcess]
) -> None:
    up = echoes("up")
    dead = free_ports(3)
    eps = [
        lb_endpoint(up.port),
        lb_endpoint(dead[0]),
        lb_endpoint(dead[1], health_status="DRAINING"),
        lb_endpoint(dead[2], health_status="UNHEALTHY"),
    ]
    hc = {**HEALTH_CHECK, "unhealthy_threshold": 1}
    cfg = Config(
        [
            cluster("svc", [eps], health_checks=[hc]),
            cluster("plain", [eps], outlier_detection={"interval": "0.2s"}),
        ],
        {"main": http_listener("svc")},
    )
    seen = {}
    for subject in ("envoy", "ubimesh"):
        proxy = proxy_factory.start(cfg, subject=subject)  # type: ignore[arg-type]
        wait_flags(proxy, "svc", {up.port: "healthy"})
        time.sleep(0.5)  # more rounds of checks: nothing may change
        _, body = proxy.admin("/clusters")
        outlier = [line for line in body.decode().splitlines() if "::outlier::" in line]
        seen[subject] = (health_flags(proxy, "svc"), health_flags(proxy, "plain"), outlier)
        proxy.stop()
    assert seen["ubimesh"] == seen["envoy"]
    assert len(seen["envoy"][2]) == 4  # plain's outlier:: lines (svc has no detector)
    assert seen["envoy"][0] == {
        up.port: "healthy",
        dead[0]: "/failed_active_hc",
        dead[1]: "/failed_active_hc/eds_status_draining",
        dead[2]: "/failed_active_hc/failed_eds_health",
    }


@pytest.mark.skipif(envoy_binary() is None, reason="needs the envoy binary")
def test_circuit_breaker_lines_match_envoy(proxy_factory: ProxyFactory) -> None:
    """/clusters shows each cluster's limits per priority, as Envoy does: set, defaulted (a
    priority with no thresholds entry) and with a retry budget."""
    port = free_ports(1)[0]
    limits = {"max_connections": 7, "max_pending_requests": 8, "max_requests": 9}
    budget = {"budget_percent": {"value": 50.0}, "min_retry_concurrency": 4}
    set_limits = [{**limits, "max_retries": 2}, {"priority": "HIGH", "max_connections": 3}]
    budgeted = [{"max_retries": 5, "retry_budget": budget}]
    cfg = Config(
        [
            cluster("set", [[lb_endpoint(port)]], circuit_breakers={"thresholds": set_limits}),
            cluster("budget", [[lb_endpoint(port)]], circuit_breakers={"thresholds": budgeted}),
            cluster("plain", [[lb_endpoint(port)]]),
        ],
        {"main": http_listener("plain")},
    )
    seen = {}
    for subject in ("envoy", "ubimesh"):
        proxy = proxy_factory.start(cfg, subject=subject)  # type: ignore[arg-type]
        try:
            _, text = proxy.admin("/clusters")
            _, doc = proxy.admin("/clusters?format=json")
        finally:
            proxy.stop()
        lines = [ln for ln in text.decode().splitlines() if "_priority::" in ln]
        statuses = json.loads(doc)["cluster_statuses"]
        seen[subject] = (
            sorted(lines),
            {s["name"]: s.get("circuit_breakers") for s in statuses if s["name"] != "main"},
        )
    assert seen["ubimesh"] == seen["envoy"]
    lines = seen["envoy"][0]
    assert "set::default_priority::max_requests::9" in lines
    assert "set::high_priority::max_connections::3" in lines
    assert "plain::high_priority::max_retries::3" in lines
    # Under a retry budget: what the budget allows now (idle: min_retry_concurrency).
    assert "budget::default_priority::max_retries::4" in lines
