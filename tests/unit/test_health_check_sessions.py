"""Active health checks (upstream/health_check.py) against real sockets on 127.0.0.1.

Each test drives the sessions with ``check_once()`` (no timers), against a small asyncio
HTTP or TCP server in the same loop whose answers the test changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ubimesh.proxy.snapshot.health_check import HealthCheck, HttpHealthCheck, TcpHealthCheck
from ubimesh.proxy.snapshot.outlier import OutlierDetection
from ubimesh.proxy.snapshot.types import (
    Cluster,
    DiscoveryType,
    Endpoint,
    Locality,
    LocalityEndpoints,
    SocketAddress,
)
from ubimesh.proxy.upstream.cluster import UpstreamCluster
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.proxy.upstream.health_check import HealthChecker, HealthCheckSession
from ubimesh.proxy.upstream.host import (
    ACTIVE_HC_TIMEOUT,
    DEGRADED_ACTIVE_HC,
    EXCLUDED_VIA_IMMEDIATE_HC_FAIL,
    FAILED_ACTIVE_HC,
    FAILED_OUTLIER_CHECK,
    Host,
)
from ubimesh.telemetry.stats import Store

LOOPBACK = "127.0.0.1"


class HttpServer:
    """Answers every request with ``status`` (and ``headers``, ``body``); records requests."""

    def __init__(self) -> None:
        self.status = 200
        self.headers: list[str] = []
        self.body = b"ok"
        self.requests: list[bytes] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(w)
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                extra = "".join(h + "\r\n" for h in self.headers)
                line = f"HTTP/1.1 {self.status} X\r\ncontent-length: {len(self.body)}\r\n"
                w.write((line + extra + "\r\n").encode() + self.body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:  # as a process that died: kept connections go too
            w.transport.abort()
        await self.server.wait_closed()


def run(body: Callable[[HttpServer], Awaitable[None]]) -> None:
    """Run ``body`` on a fresh loop with a started HttpServer (stopped afterwards), bounded."""

    async def main() -> None:
        server = HttpServer()
        await server.start()
        try:
            await body(server)
        finally:
            if server.server is not None and server.server.is_serving():
                await server.stop()

    asyncio.run(asyncio.wait_for(main(), 20.0))


def cluster_with(port: int, hc: HealthCheck, store: Store | None = None) -> UpstreamCluster:
    host = Host(SocketAddress(LOOPBACK, port), cluster_name="svc")
    other = Host(SocketAddress(LOOPBACK, 1), cluster_name="svc")  # never checked directly
    store = store or Store()
    c = UpstreamCluster(
        Cluster("svc", DiscoveryType.STATIC, health_checks=(hc,)), store, [host, other]
    )
    checker = HealthChecker(c, hc, store)
    c.health_checker = checker
    checker.sync_hosts(c.hosts)
    c.refresh()
    return c


def ok(h: Host) -> bool:
    """``h.healthy`` (a function, so that mypy does not narrow the property)."""
    return h.healthy


def session(c: UpstreamCluster) -> HealthCheckSession:
    s = c.hosts[0].health_checker
    assert isinstance(s, HealthCheckSession)
    return s


def hc(**kw: object) -> HealthCheck:
    base: dict[str, object] = {
        "timeout": 1.0, "interval": 0.1, "unhealthy_threshold": 2, "healthy_threshold": 2,
        "http": HttpHealthCheck(path="/healthz"),
    }  # fmt: skip
    base.update(kw)
    return HealthCheck(**base)  # type: ignore[arg-type]


async def _test_new_host_starts_failed_and_one_success_makes_it_healthy(http: HttpServer) -> None:
    c = cluster_with(http.port, hc())
    h = c.hosts[0]
    assert h.health_flags & FAILED_ACTIVE_HC and not ok(h)
    await session(c).check_once()
    assert ok(h)  # the first check passes at once, whatever healthy_threshold is
    head = http.requests[0].decode()
    assert head.startswith("GET /healthz HTTP/1.1\r\n")
    assert "host: svc\r\n" in head.lower() and "user-agent: envoy/hc\r\n" in head.lower()
    st = c.health_checker.stats
    assert (st.attempt.value, st.success.value, st.healthy.value) == (1, 1, 1)


def test_new_host_starts_failed_and_one_success_makes_it_healthy() -> None:
    run(_test_new_host_starts_failed_and_one_success_makes_it_healthy)


async def _test_bad_status_fails_at_once_and_recovery_needs_healthy_threshold(
    http: HttpServer,
) -> None:
    c = cluster_with(http.port, hc())
    h, s = c.hosts[0], session(c)
    await s.check_once()
    http.status = 503
    await s.check_once()
    assert not ok(h)  # an active failure: no unhealthy_threshold
    assert h not in {c.choose_host() for _ in range(20)} or c.panic[0]
    http.status = 200
    await s.check_once()
    assert not ok(h)  # 1 of healthy_threshold 2
    await s.check_once()
    assert ok(h)
    assert http.connections == 1  # reuse_connection: one connection for every check


def test_bad_status_fails_at_once_and_recovery_needs_healthy_threshold() -> None:
    run(_test_bad_status_fails_at_once_and_recovery_needs_healthy_threshold)


async def _test_network_failures_count_to_unhealthy_threshold(http: HttpServer) -> None:
    c = cluster_with(http.port, hc(unhealthy_threshold=3))
    h, s = c.hosts[0], session(c)
    await s.check_once()
    await http.stop()
    await s.check_once()
    await s.check_once()
    assert ok(h)
    await s.check_once()
    assert not ok(h)
    st = c.health_checker.stats
    assert st.network_failure.value == 3 and st.failure.value == 3


def test_network_failures_count_to_unhealthy_threshold() -> None:
    run(_test_network_failures_count_to_unhealthy_threshold)


async def _test_retriable_status_counts_like_a_network_failure(http: HttpServer) -> None:
    c = cluster_with(
        http.port, hc(http=HttpHealthCheck(path="/", retriable_statuses=((503, 504),)))
    )
    h, s = c.hosts[0], session(c)
    await s.check_once()
    http.status = 503
    await s.check_once()
    assert ok(h)
    await s.check_once()
    assert not ok(h)


def test_retriable_status_counts_like_a_network_failure() -> None:
    run(_test_retriable_status_counts_like_a_network_failure)


async def _test_expected_statuses_receive_degraded_and_immediate_fail(http: HttpServer) -> None:
    check = HttpHealthCheck(path="/", expected_statuses=((200, 300),), receive=(b"o", b"k"))
    c = cluster_with(http.port, hc(http=check, healthy_threshold=1))
    h, s = c.hosts[0], session(c)
    http.status = 201
    http.body = b"ok"
    await s.check_once()
    assert ok(h)
    http.body = b"ko"  # "o" then "k" in order: no
    await s.check_once()
    assert not ok(h)
    http.body = b"ok"
    http.headers = ["x-envoy-degraded: 1"]
    await s.check_once()
    assert ok(h) and h.health_flags & DEGRADED_ACTIVE_HC and h.degraded
    http.status = 500
    http.headers = ["x-envoy-immediate-health-check-fail: true"]
    await s.check_once()
    assert h.health_flags & EXCLUDED_VIA_IMMEDIATE_HC_FAIL and not ok(h)
    http.status = 200
    http.headers = []
    await s.check_once()
    assert ok(h) and not h.health_flags & (EXCLUDED_VIA_IMMEDIATE_HC_FAIL | DEGRADED_ACTIVE_HC)


def test_expected_statuses_receive_degraded_and_immediate_fail() -> None:
    run(_test_expected_statuses_receive_degraded_and_immediate_fail)


async def _test_timeout_is_a_network_failure_with_its_flag() -> None:
    async def hang(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()  # read until the checker gives up; never answer
        w.close()

    server = await asyncio.start_server(hang, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        c = cluster_with(port, hc(timeout=0.05, unhealthy_threshold=1))
        h, s = c.hosts[0], session(c)
        h.health_flags &= ~FAILED_ACTIVE_HC
        await s.check_once()
        assert h.health_flags & FAILED_ACTIVE_HC and h.health_flags & ACTIVE_HC_TIMEOUT
    finally:
        server.close()
        await server.wait_closed()


def test_timeout_is_a_network_failure_with_its_flag() -> None:
    run(lambda _server: _test_timeout_is_a_network_failure_with_its_flag())


async def _test_tcp_connect_only_and_payloads() -> None:
    got: list[bytes] = []

    async def pong(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read(100)
        got.append(data)
        if data == b"PING":
            w.write(b"PO")
            await w.drain()
            w.write(b"NG")
            await w.drain()
        w.close()

    server = await asyncio.start_server(pong, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        c = cluster_with(port, hc(http=None, tcp=TcpHealthCheck()))
        await session(c).check_once()
        assert ok(c.hosts[0])
        c = cluster_with(port, hc(http=None, tcp=TcpHealthCheck(send=b"PING", receive=(b"PONG",))))
        await session(c).check_once()
        assert ok(c.hosts[0]) and b"PING" in got
        c = cluster_with(port, hc(http=None, tcp=TcpHealthCheck(send=b"HELLO", receive=(b"PONG",))))
        await session(c).check_once()
        assert not ok(c.hosts[0])  # closed without the payload
    finally:
        server.close()
        await server.wait_closed()
    c = cluster_with(port, hc(http=None, tcp=TcpHealthCheck()))
    await session(c).check_once()
    assert not ok(c.hosts[0])  # nothing listens any more


def test_tcp_connect_only_and_payloads() -> None:
    run(lambda _server: _test_tcp_connect_only_and_payloads())


def test_interval_follows_traffic_and_transitions() -> None:
    check = hc(
        interval=1.0, unhealthy_interval=2.0, unhealthy_edge_interval=3.0,
        healthy_edge_interval=4.0, no_traffic_interval=60.0, no_traffic_healthy_interval=90.0,
    )  # fmt: skip
    c = cluster_with(1, check)
    checker = c.health_checker
    assert isinstance(checker, HealthChecker)
    assert checker.interval(True, 0) == 90.0
    assert checker.interval(False, 0) == 60.0
    c.stats.upstream_cx_total.inc()
    assert checker.interval(True, 0) == 1.0
    assert checker.interval(True, 2) == 4.0  # CHANGE_PENDING
    assert checker.interval(False, 0) == 2.0
    assert checker.interval(False, 2) == 3.0
    jittered = HealthChecker(
        c, hc(interval=1.0, interval_jitter_percent=50, interval_jitter=0.2), Store()
    )
    values = {jittered.interval(True, 0) for _ in range(50)}
    assert min(values) >= 1.0 and max(values) < 1.7 and len(values) > 10


def _static(port: int, hc_: HealthCheck, outlier: OutlierDetection | None = None) -> Cluster:
    group = LocalityEndpoints(Locality(), (Endpoint(SocketAddress(LOOPBACK, port)),))
    return Cluster(
        "svc", DiscoveryType.STATIC, endpoints=(group,), health_checks=(hc_,),
        outlier_detection=outlier,
    )  # fmt: skip


async def _test_cluster_manager_waits_for_first_checks_and_keeps_state_across_updates(
    http: HttpServer,
) -> None:
    store = Store()
    cm = ClusterManager({"svc": _static(http.port, hc(interval=30.0))}, store)
    c1 = cm.get("svc")
    assert c1 is not None
    h = c1.hosts[0]
    assert not ok(h)
    await cm.start()
    try:
        assert ok(h)  # start() waited for the first check
        h.health_flags |= FAILED_OUTLIER_CHECK  # as if ejected: the state must survive
        spec = _static(http.port, hc(interval=31.0), OutlierDetection(interval=30.0))
        cm.update({"svc": spec})
        c2 = cm.get("svc")
        assert c2 is not None and c2.hosts == [h] and h.outlier is not None
        assert h.health_flags & FAILED_OUTLIER_CHECK and c2.outlier.active == 1
        session2 = h.health_checker
        assert isinstance(session2, HealthCheckSession) and session2.task is not None
        assert session2.checker is c2.health_checker and not session2.first_check
        cm.update({"svc": Cluster("svc", DiscoveryType.STATIC, endpoints=spec.endpoints)})
        # (read through getattr, so that mypy does not keep its narrowing)
        assert getattr(h, "health_checker") is None and getattr(h, "outlier") is None  # noqa: B009
        assert ok(h)
        await asyncio.sleep(0)
        assert getattr(session2, "task") is None  # noqa: B009 - the old session was stopped
    finally:
        await cm.stop()


def test_cluster_manager_waits_for_first_checks_and_keeps_state_across_updates() -> None:
    run(_test_cluster_manager_waits_for_first_checks_and_keeps_state_across_updates)
