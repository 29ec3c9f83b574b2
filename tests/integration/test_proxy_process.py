"""The proxy as a process: config errors, SIGHUP reload, workers, SIGTERM drain, admin.

Tests marked ``ubimesh_only`` are about ubimesh's own process model (Envoy does not reload its
bootstrap on SIGHUP, exits on SIGTERM without draining, and accepts the "unsupported" fields
below); the others hold for Envoy as well.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import yaml
from tests.support.echo_upstream import EchoServerPool
from tests.support.http_client import Response, _read_response, _Reader, build_request, send_raw
from tests.support.procs import admin_get, envoy_binary, free_ports
from tests.support.upstreams import ScriptedUpstream

HOST = ("Host", "process.test")
ECHO_ROUTE = [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]


def _header(resp: Response, name: str) -> str | None:
    for n, v in resp.headers:
        if n.lower() == name.lower():
            return v
    return None


def _echo_bootstrap(factory: Any, echo: EchoServerPool, server_name: str | None = None) -> Any:
    b = factory.bootstrap()
    b.add_cluster("echo", [echo.port("echo")])
    extra = {"server_name": server_name} if server_name is not None else {}
    b.add_listener("main", routes=ECHO_ROUTE, **extra)
    return b


def _get(port: int, target: str, timeout: float = 5.0) -> Response:
    return send_raw("127.0.0.1", port, build_request("GET", target, [HOST]), "GET", timeout)


# --------------------------------------------------------------------------------------------
# Configuration errors


@pytest.mark.ubimesh_only
@pytest.mark.parametrize(
    ("where", "path"),
    [
        ("hcm", "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
                ".delayed_close_timeout"),
        ("cluster", "static_resources.clusters[0].circuit_breakers.per_host_thresholds"),
    ],
)  # fmt: skip
def test_unsupported_field_exits_nonzero_and_names_the_field(
    proxy_factory: Any, echo: EchoServerPool, tmp_path: Any, where: str, path: str
) -> None:
    b = _echo_bootstrap(proxy_factory, echo)
    if where == "hcm":
        b.listeners[0][1]["delayed_close_timeout"] = "2s"
    else:
        b.clusters[0]["circuit_breakers"] = {"per_host_thresholds": [{"max_connections": 10}]}
    admin_port, port = free_ports(2)
    config = tmp_path / f"unsupported-{where}.yaml"
    config.write_text(yaml.safe_dump(b.render(admin_port, {"main": port}), sort_keys=False))

    envoy = envoy_binary()
    if envoy is not None:  # the field is valid Envoy configuration, just not implemented
        check = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(config), "-l", "error"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 0, f"Envoy refuses the config too:\n{check.stdout}"

    exe = shutil.which("ubimesh")
    assert exe is not None
    done = subprocess.run(
        [exe, "proxy", "-c", str(config), "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=30,  # a proxy that starts serving instead of exiting fails here
        check=False,
    )
    assert done.returncode != 0, f"exit code 0 on an unsupported field\n{done.stderr}"
    assert path in done.stderr, f"stderr does not name {path}:\n{done.stderr}"


# --------------------------------------------------------------------------------------------
# SIGHUP


class LoadClient:
    """Sends requests until stopped (at most ``limit`` each) from two threads.

    * ``fresh``: a new connection for every request; any failure counts;
    * ``kept``: keep-alive connections, reopened after ``connection: close``.  A request that
      fails on a reused connection before a single byte of the answer arrived is retried once
      on a new connection, as HTTP clients do for idempotent requests (RFC 9112 9.3.1): the
      server may close an idle connection while the request is under way.  Such retries are
      counted apart; anything else is a failure.
    """

    def __init__(self, port: int, limit: int = 20_000) -> None:
        self.port = port
        self.limit = limit
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.values: list[tuple[str, str | None]] = []  # (thread, server header) in order
        self.sent = Counter[str]()
        self.stale_retries = 0
        self.threads = [
            threading.Thread(target=self._fresh, daemon=True),
            threading.Thread(target=self._kept, daemon=True),
        ]

    def __enter__(self) -> LoadClient:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=15)

    def _ok(self, kind: str, resp: Response) -> None:
        with self.lock:
            self.sent[kind] += 1
            if resp.status != 200 or resp.error is not None:
                self.failures.append(f"{kind}: {resp.status} {resp.error} {resp.body[:80]!r}")
            else:
                self.values.append((kind, _header(resp, "server")))

    def last_value(self, kind: str = "fresh") -> str | None:
        with self.lock:
            for k, v in reversed(self.values):
                if k == kind:
                    return v
        return None

    def _fresh(self) -> None:
        request = build_request("GET", "/load/fresh", [HOST])
        for _ in range(self.limit):
            if self.stop_event.is_set():
                return
            self._ok("fresh", send_raw("127.0.0.1", self.port, request, "GET", timeout=5))

    def _kept(self) -> None:
        request = build_request("GET", "/load/kept", [HOST])
        sock: socket.socket | None = None
        reader: _Reader | None = None
        reused = False
        attempts = 0
        try:
            while attempts < self.limit and not self.stop_event.is_set():
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    reader = _Reader(sock, 0)
                    reused = False
                assert reader is not None
                resp = Response()
                reader.deadline = time.monotonic() + 5
                try:
                    sock.sendall(request)
                    _read_response(reader, "GET", resp)
                except (OSError, ValueError) as exc:
                    sock.close()
                    sock = None
                    if reused and resp.status is None and not reader.buf:
                        with self.lock:
                            self.stale_retries += 1
                        continue  # retried on a new connection; not counted as an attempt
                    resp.error = f"{type(exc).__name__}: {exc}"
                attempts += 1
                self._ok("kept", resp)
                if sock is not None and (_header(resp, "connection") or "").lower() == "close":
                    sock.close()
                    sock = None
                reused = True
        finally:
            if sock is not None:
                sock.close()


def _wait_for_value(load: LoadClient, value: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if load.last_value("fresh") == value:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.ubimesh_only
def test_sighup_reloads_under_load_without_failures(
    proxy_factory: Any, echo: EchoServerPool
) -> None:
    proxy = proxy_factory.start(_echo_bootstrap(proxy_factory, echo, "release-0"))
    with LoadClient(proxy.port()) as load:
        assert _wait_for_value(load, "release-0"), "no traffic before the first reload"
        for release in (1, 2, 3):
            proxy.write_config(_echo_bootstrap(proxy_factory, echo, f"release-{release}"))
            proxy.send_signal(signal.SIGHUP)
            assert _wait_for_value(load, f"release-{release}"), (
                f"release-{release} not served 5 s after SIGHUP; last answer: "
                f"{load.last_value()}\n{proxy.describe()}"
            )
            time.sleep(0.3)
        # Keep-alive connections opened before the last reload drain and are reopened.
        deadline = time.monotonic() + 5
        while load.last_value("kept") != "release-3" and time.monotonic() < deadline:
            time.sleep(0.02)
    print(
        f"\nreload under load: {dict(load.sent)} requests, {load.stale_retries} retried after "
        f"a keep-alive close, values seen {sorted(set(v for _, v in load.values), key=str)}"
    )
    assert proxy.proc.alive, proxy.describe()
    assert not load.failures, f"{len(load.failures)} failed requests: {load.failures[:5]}"
    assert min(load.sent.values()) > 50, f"too little traffic to mean anything: {load.sent}"
    seen = [v for k, v in load.values if k == "fresh"]
    for release in range(4):
        assert f"release-{release}" in seen
    # Once a release was seen on a new connection, older ones never come back on new ones.
    order = [int(v.rsplit("-", 1)[1]) for v in seen if v]
    assert order == sorted(order), "a new connection was served by an older configuration"
    kept_last = load.last_value("kept")
    assert kept_last == "release-3", f"5 s after the last reload keep-alive sees {kept_last}"


@pytest.mark.ubimesh_only
@pytest.mark.parametrize("used", [False, True], ids=["fresh-connection", "keep-alive-connection"])
def test_sighup_serves_a_request_sent_on_a_connection_opened_before(
    proxy_factory: Any, echo: EchoServerPool, connect: Any, used: bool
) -> None:
    """The deterministic form of the race the load test can hit: a connection accepted (and
    maybe used) under the old configuration, whose next request is sent only after the reload,
    gets an answer, not a reset.  Envoy drains the connections of an updated listener over the
    drain time instead of cutting the idle ones: checked with Envoy 1.40 and a file-based LDS
    update of server_name, both kinds of connection were still answered by the old listener."""
    proxy = proxy_factory.start(_echo_bootstrap(proxy_factory, echo, "old"))
    conn = connect(proxy.port())
    if used:
        first = conn.request("GET", "/before-reload", [HOST])
        assert first.status == 200 and _header(first, "server") == "old", first
    proxy.write_config(_echo_bootstrap(proxy_factory, echo, "new"))
    proxy.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while _header(_get(proxy.port(), "/probe"), "server") != "new":
        assert time.monotonic() < deadline, "the new config is not served 5 s after SIGHUP"
        time.sleep(0.05)
    try:
        resp = conn.request("GET", "/after-reload", [HOST], timeout=5)
    except OSError as exc:
        pytest.fail(f"the connection opened before the reload was cut: {exc!r}")
    assert resp.status == 200 and resp.error is None, (
        f"a request sent on a connection opened before the reload failed: {resp}"
    )


def _release_bootstrap(factory: Any, echo: EchoServerPool, release: str, clusters: int) -> Any:
    """One listener whose route adds ``x-release``; ``clusters`` spare clusters besides echo."""
    b = factory.bootstrap()
    b.add_cluster("echo", [echo.port("echo")])
    for i in range(clusters):
        b.add_cluster(f"spare-{i}", [echo.port("echo")])
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "echo"},
        "response_headers_to_add": [{"header": {"key": "x-release", "value": release}}],
    }
    b.add_listener("main", routes=[route])
    return b


@pytest.mark.ubimesh_only
@pytest.mark.parametrize("change", ["routes", "clusters"])
def test_a_reload_that_changes_routes_or_clusters_only_keeps_connections(
    proxy_factory: Any, echo: EchoServerPool, connect: Any, change: str
) -> None:
    """Only a changed listener drains its connections. A reload that changes routes (what an
    RDS update is) or clusters (CDS, EDS) keeps keep-alive connections open, and their next
    request is routed by the new configuration, as Envoy does for RDS, CDS and EDS."""
    proxy = proxy_factory.start(_release_bootstrap(proxy_factory, echo, "old", 0))
    conn = connect(proxy.port())
    first = conn.request("GET", "/before", [HOST])
    assert first.status == 200 and _header(first, "x-release") == "old", first
    new = "new" if change == "routes" else "old"
    spare = 1 if change == "clusters" else 0
    proxy.write_config(_release_bootstrap(proxy_factory, echo, new, spare))
    proxy.send_signal(signal.SIGHUP)

    def applied() -> bool:
        if change == "clusters":
            return b"spare-0" in proxy.admin("/clusters")[1]
        return _header(_get(proxy.port(), "/probe"), "x-release") == "new"

    deadline = time.monotonic() + 5
    while not applied():
        assert time.monotonic() < deadline, "the new config is not served 5 s after SIGHUP"
        time.sleep(0.05)
    for i in range(3):
        resp = conn.request("GET", f"/after-{i}", [HOST], timeout=5)
        assert resp.status == 200 and resp.error is None, resp
        assert _header(resp, "x-release") == new, resp
        assert _header(resp, "connection") != "close", f"drained by a {change} change: {resp}"


@pytest.mark.ubimesh_only
@pytest.mark.parametrize("breakage", ["yaml-syntax", "unknown-cluster"])
def test_invalid_config_on_sighup_keeps_the_old_one(
    proxy_factory: Any, echo: EchoServerPool, breakage: str
) -> None:
    proxy = proxy_factory.start(_echo_bootstrap(proxy_factory, echo, "good"))
    assert _header(_get(proxy.port(), "/before"), "server") == "good"
    if breakage == "yaml-syntax":
        proxy.write_config("static_resources: {listeners: [this is not: valid yaml\n")
    else:
        bad = _echo_bootstrap(proxy_factory, echo, "bad")
        bad.listeners[0][1]["route_config"]["virtual_hosts"][0]["routes"] = [
            {"match": {"prefix": "/"}, "route": {"cluster": "no-such-cluster"}}
        ]
        proxy.write_config(bad)
    proxy.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 1.5
    answers = []
    while time.monotonic() < deadline:
        resp = _get(proxy.port(), "/during")
        answers.append((resp.status, _header(resp, "server"), resp.error))
        time.sleep(0.05)
    assert proxy.proc.alive, f"the proxy died on an invalid config\n{proxy.describe()}"
    assert set(answers) == {(200, "good", None)}, Counter(answers)
    # The reload machinery still works: a valid config is picked up by the next SIGHUP.
    proxy.write_config(_echo_bootstrap(proxy_factory, echo, "fixed"))
    proxy.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while _header(_get(proxy.port(), "/after"), "server") != "fixed":
        assert time.monotonic() < deadline, "a valid config after an invalid one is not applied"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Workers


def test_concurrency_2_counts_every_request_and_uses_both_workers(
    proxy_factory: Any, echo: EchoServerPool, subject: str
) -> None:
    proxy = proxy_factory.start(_echo_bootstrap(proxy_factory, echo), concurrency=2)
    per_thread, threads_n = 60, 6
    total = per_thread * threads_n
    cursor = echo.cursor()
    failures: list[Response] = []

    def run() -> None:
        for _ in range(per_thread):
            resp = _get(proxy.port(), "/workers")
            if resp.status != 200:
                failures.append(resp)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "clients did not finish in 60 s"
    assert not failures, failures[:3]

    deadline = time.monotonic() + 5
    while (count := proxy.stats().get("http.main.downstream_rq_total")) != total:
        assert time.monotonic() < deadline, (
            f"http.main.downstream_rq_total is {count}, {total} requests were sent"
        )
        time.sleep(0.1)

    records = echo.records_since(cursor, at_least=total)
    assert len(records) == total
    if subject == "envoy":  # worker threads: Envoy counts connections per worker
        stats = proxy.stats()
        prefix = f"listener.127.0.0.1_{proxy.port()}.worker_"
        per_worker = {
            k: v for k, v in stats.items() if k.startswith(prefix) and k.endswith("cx_total")
        }
    else:  # worker processes: which one owns the upstream connection of each request
        workers = proxy.processes()[1:]
        assert len(workers) == 2, f"expected 2 worker processes, found {workers}"
        owner = {}
        for w in workers:
            for c in w.net_connections(kind="tcp"):
                if c.raddr and c.raddr.port == echo.port("echo"):
                    owner[c.laddr.port] = w.pid
        per_worker = Counter(owner.get(int(r.peer.rsplit(":", 1)[1])) for r in records)
        unmapped = per_worker.pop(None, 0)
        assert unmapped < total, (
            "no upstream connection of the requests is open in a worker any more, so the "
            "requests cannot be told apart by worker"
        )
    print(f"\n{total} requests over 2 workers of {subject}: {dict(per_worker)}")
    assert len(per_worker) == 2 and all(v > 0 for v in per_worker.values()), (
        f"not both workers got traffic: {dict(per_worker)}"
    )


# --------------------------------------------------------------------------------------------
# SIGTERM


@pytest.fixture
def scripted() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    yield upstream
    upstream.stop()


@pytest.mark.ubimesh_only
def test_sigterm_lets_an_in_flight_request_finish(
    proxy_factory: Any, scripted: ScriptedUpstream
) -> None:
    drain_time = 3.0
    b = proxy_factory.bootstrap()
    b.add_cluster("scripted", [scripted.port])
    b.add_listener("main", routes=[{"match": {"prefix": "/"}, "route": {"cluster": "scripted"}}])
    proxy = proxy_factory.start(b, extra_args=["--drain-time-s", str(drain_time)])
    result: list[Response] = []
    client = threading.Thread(
        target=lambda: result.append(_get(proxy.port(), "/delay/1500", timeout=10)), daemon=True
    )
    client.start()
    assert scripted.wait_requests(1, timeout=5), "the slow request never reached the upstream"
    sigterm_at = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    client.join(timeout=10)
    assert result, "the client got nothing within 10 s"
    resp = result[0]
    assert resp.status == 200 and resp.body == b"delayed 1500", (
        f"the in-flight request did not complete: {resp}\n{proxy.describe()}"
    )
    try:
        code = proxy.proc.popen.wait(timeout=drain_time + 2)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {drain_time + 2} s after SIGTERM\n{proxy.describe()}")
    exited_after = time.monotonic() - sigterm_at
    assert code == 0, f"exit code {code}\n{proxy.describe()}"
    assert exited_after <= drain_time + 1.0, f"exited {exited_after:.1f} s after SIGTERM"


# --------------------------------------------------------------------------------------------
# Admin


def test_admin_endpoints_answer(proxy_factory: Any, echo: EchoServerPool) -> None:
    proxy = proxy_factory.start(_echo_bootstrap(proxy_factory, echo))
    for i in range(3):
        assert _get(proxy.port(), f"/admin-check/{i}").status == 200

    status, body = admin_get(proxy.admin_port, "/ready")
    assert (status, body) == (200, b"LIVE\n")

    status, body = admin_get(proxy.admin_port, "/server_info")
    assert status == 200, body
    info = json.loads(body)
    assert info["state"] == "LIVE", info
    assert "command_line_options" in info, sorted(info)

    status, body = admin_get(proxy.admin_port, "/stats/prometheus")
    assert status == 200, body
    text = body.decode()
    assert "# TYPE envoy_http_downstream_rq_total counter" in text, text[:500]
    samples = [
        line
        for line in text.splitlines()
        if line.startswith("envoy_http_downstream_rq_total{")
        and 'envoy_http_conn_manager_prefix="main"' in line
    ]
    assert len(samples) == 1, samples
    assert float(samples[0].rsplit(" ", 1)[1]) >= 3, samples

    status, body = admin_get(proxy.admin_port, "/config_dump")
    assert status == 200, body
    configs = {c["@type"].rsplit(".", 1)[1]: c for c in json.loads(body)["configs"]}
    assert "BootstrapConfigDump" in configs, sorted(configs)
    boot = configs["BootstrapConfigDump"]["bootstrap"]
    assert [lst["name"] for lst in boot["static_resources"]["listeners"]] == ["main"]
    static_clusters = configs["ClustersConfigDump"]["static_clusters"]
    assert [c["cluster"]["name"] for c in static_clusters] == ["echo"]

    status, body = admin_get(proxy.admin_port, "/clusters")
    assert status == 200, body
    host = f"echo::127.0.0.1:{echo.port('echo')}::"
    lines = [line for line in body.decode().splitlines() if line.startswith(host)]
    assert f"{host}health_flags::healthy" in lines, lines
    assert any(line.startswith(f"{host}rq_total::") for line in lines), lines
    assert psutil.pid_exists(proxy.pid)
