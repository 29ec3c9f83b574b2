"""Fixtures of the integration tests: a bootstrap builder, a proxy starter, echo upstreams.

The proxy under test is ``ubimesh proxy``.  With ``UBIMESH_IT_SUBJECT=envoy`` the very same
tests run against Envoy instead (tests marked ``ubimesh_only`` are skipped): that is how the
expectations of these tests were checked against the reference implementation.

Every bootstrap is written to the test's tmp_path; listener and admin ports are picked free at
start (and picked again if the proxy could not bind them); every process and server a fixture
starts is stopped in its finalizer.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from tests.support.echo_upstream import EchoServerPool
from tests.support.http_client import Response, _read_response, _Reader, build_request
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    ProcessStartError,
    admin_get,
    envoy_binary,
    free_ports,
    wait_ready,
)
from tests.support.upstreams import ScriptedUpstream, SilentUpstream

SUBJECT = os.environ.get("UBIMESH_IT_SUBJECT", "ubimesh").strip().lower()
if SUBJECT not in ("ubimesh", "envoy"):
    raise pytest.UsageError(f"UBIMESH_IT_SUBJECT must be ubimesh or envoy, not {SUBJECT!r}")

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
UPSTREAM_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
UPSTREAM_HTTP_OPTIONS_TYPE = (
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)
_base_ids = iter(range(1, 10_000))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ubimesh_only: behaviour of ubimesh that Envoy does not have (skipped when "
        "UBIMESH_IT_SUBJECT=envoy)",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if SUBJECT != "ubimesh" and item.get_closest_marker("ubimesh_only") is not None:
        pytest.skip(f"ubimesh-only behaviour; the subject is {SUBJECT}")


# --------------------------------------------------------------------------------------------
# Bootstrap builder


def endpoint(port: int, host: str = LOOPBACK) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}


class Bootstrap:
    """An Envoy v3 bootstrap from the supported subset, with ports filled in at start.

    ``add_listener`` takes the HCM fields as keyword arguments; listener ports (and the admin
    port) are chosen by the proxy starter, so a Bootstrap can be rendered again with the same
    ports to reload a running proxy.
    """

    def __init__(self) -> None:
        self.clusters: list[dict[str, Any]] = []
        self.listeners: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    @property
    def listener_names(self) -> list[str]:
        return [name for name, _, _ in self.listeners]

    def add_cluster(
        self,
        name: str,
        ports: Sequence[int],
        *,
        connect_timeout: str = "1s",
        lb_policy: str | None = None,
        upstream_http: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """A STATIC cluster of 127.0.0.1 endpoints (no ports: no endpoint at all).

        ``upstream_http`` is the body of an upstream HttpProtocolOptions (its @type and the
        explicit HTTP/1 config are added).
        """
        cluster: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": connect_timeout,
        }
        if lb_policy is not None:
            cluster["lb_policy"] = lb_policy
        cluster["load_assignment"] = {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [endpoint(p) for p in ports]}] if ports else [],
        }
        if upstream_http is not None:
            options = {
                "@type": UPSTREAM_HTTP_OPTIONS_TYPE,
                **upstream_http,
                "explicit_http_config": {"http_protocol_options": {}},
            }
            cluster["typed_extension_protocol_options"] = {UPSTREAM_HTTP_OPTIONS_KEY: options}
        cluster.update(extra)
        self.clusters = [c for c in self.clusters if c["name"] != name] + [cluster]
        return cluster

    def add_listener(
        self,
        name: str,
        *,
        routes: list[dict[str, Any]] | None = None,
        virtual_hosts: list[dict[str, Any]] | None = None,
        listener_extra: dict[str, Any] | None = None,
        **hcm_fields: Any,
    ) -> dict[str, Any]:
        """A listener with one HCM; ``routes`` go into one virtual host for every domain."""
        if virtual_hosts is None:
            virtual_hosts = [{"name": "all", "domains": ["*"], "routes": routes or []}]
        elif routes is not None:
            raise ValueError("give routes or virtual_hosts, not both")
        hcm: dict[str, Any] = {
            "@type": HCM_TYPE,
            "stat_prefix": hcm_fields.pop("stat_prefix", name),
            "route_config": {"name": f"{name}_routes", "virtual_hosts": virtual_hosts},
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
            ],
        }
        hcm.update(hcm_fields)
        self.listeners = [entry for entry in self.listeners if entry[0] != name]
        self.listeners.append((name, hcm, dict(listener_extra or {})))
        return hcm

    def render(self, admin_port: int, ports: dict[str, int]) -> dict[str, Any]:
        listeners = []
        for name, hcm, extra in self.listeners:
            listener: dict[str, Any] = {
                "name": name,
                "address": {"socket_address": {"address": LOOPBACK, "port_value": ports[name]}},
            }
            listener.update(copy.deepcopy(extra))
            listener["filter_chains"] = [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": copy.deepcopy(hcm),
                        }
                    ]
                }
            ]
            listeners.append(listener)
        return {
            "admin": {
                "address": {"socket_address": {"address": LOOPBACK, "port_value": admin_port}}
            },
            "static_resources": {"listeners": listeners, "clusters": copy.deepcopy(self.clusters)},
        }


# --------------------------------------------------------------------------------------------
# Running proxies


class RunningProxy:
    """A started proxy: its ports, its config file and ways to look at it."""

    def __init__(
        self,
        subject: str,
        proc: ManagedProcess,
        admin_port: int,
        ports: dict[str, int],
        config_path: Path,
        argv: list[str],
    ) -> None:
        self.subject = subject
        self.proc = proc
        self.admin_port = admin_port
        self.ports = ports
        self.config_path = config_path
        self.argv = argv

    @property
    def pid(self) -> int:
        return self.proc.pid

    def port(self, name: str = "main") -> int:
        return self.ports[name]

    def write_config(self, bootstrap: Bootstrap | str) -> None:
        """Replace the config file (same ports), atomically, e.g. before SIGHUP."""
        if isinstance(bootstrap, Bootstrap):
            text = yaml.safe_dump(bootstrap.render(self.admin_port, self.ports), sort_keys=False)
        else:
            text = bootstrap
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def send_signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def admin(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        return admin_get(self.admin_port, path, timeout=timeout)

    def stats(self) -> dict[str, int]:
        """Counters and gauges of ``/stats`` (text format) as integers."""
        status, body = self.admin("/stats")
        if status != 200:
            raise AssertionError(f"/stats answered {status}: {body[:200]!r}")
        out: dict[str, int] = {}
        for line in body.decode("utf-8", "replace").splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name.strip()] = int(value)
        return out

    def processes(self) -> list[psutil.Process]:
        """The proxy process and its descendants (ubimesh workers)."""
        try:
            main = psutil.Process(self.proc.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def describe(self) -> str:
        return self.proc.describe()

    def stop(self, timeout: float = 5.0) -> int | None:
        return self.proc.stop(timeout)


class ProxyFactory:
    """Starts proxies from Bootstraps; :meth:`close` stops every one of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[RunningProxy] = []
        self._count = 0

    def argv(
        self,
        subject: str,
        config: Path,
        concurrency: int,
        log_level: str | None,
        extra: Sequence[str],
    ) -> list[str]:
        if subject == "envoy":
            exe = envoy_binary()
            if exe is None:
                raise ProcessStartError("no envoy binary on PATH")
            base_id = (os.getpid() % 10_000) * 100 + next(_base_ids) % 100
            return [
                exe, "-c", str(config), "--concurrency", str(concurrency),
                "--disable-hot-restart", "--base-id", str(base_id),
                "-l", log_level or "warn", *extra,
            ]  # fmt: skip
        exe = shutil.which("ubimesh")
        if exe is None:
            raise ProcessStartError("no ubimesh executable on PATH")
        return [
            exe, "proxy", "-c", str(config), "--concurrency", str(concurrency),
            "-l", log_level or "warning", *extra,
        ]  # fmt: skip

    @staticmethod
    def bootstrap() -> Bootstrap:
        """A new, empty Bootstrap (module-scoped fixtures cannot use the fixture)."""
        return Bootstrap()

    def start(
        self,
        bootstrap: Bootstrap,
        *,
        concurrency: int = 1,
        extra_args: Sequence[str] = (),
        log_level: str | None = None,
        subject: str | None = None,
        timeout: float = 20.0,
    ) -> RunningProxy:
        subject = subject or SUBJECT
        names = bootstrap.listener_names
        last_error: ProcessStartError | None = None
        for _attempt in range(3):
            self._count += 1
            tag = f"{subject}{self._count}"
            admin_port, *listener_ports = free_ports(1 + len(names))
            ports = dict(zip(names, listener_ports, strict=True))
            config = self.workdir / f"{tag}.yaml"
            config.write_text(yaml.safe_dump(bootstrap.render(admin_port, ports), sort_keys=False))
            argv = self.argv(subject, config, concurrency, log_level, extra_args)
            proc = ManagedProcess(tag, argv, self.workdir / f"{tag}.log", self.workdir)
            running = RunningProxy(subject, proc, admin_port, ports, config, argv)
            self.started.append(running)
            try:
                wait_ready(proc, admin_port, listener_ports, timeout)
            except ProcessStartError as exc:
                proc.stop()
                last_error = exc
                if "in use" in str(exc).lower():
                    continue  # somebody took a port between free_ports and bind: new ports
                raise
            return running
        assert last_error is not None
        raise last_error

    def close(self) -> None:
        for running in self.started:
            with contextlib.suppress(Exception):
                running.stop()


# --------------------------------------------------------------------------------------------
# A client connection


class ClientConnection:
    """One client TCP connection that can carry several requests (keep-alive, pipelining).

    Responses are parsed by :mod:`tests.support.http_client`'s reader, which keeps bytes that
    arrive early (pipelined answers) for the next read.  Reads never raise: a response that
    could not be read has ``error`` set, like :func:`send_raw`'s.
    """

    def __init__(self, port: int, host: str = LOOPBACK, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_port = self.sock.getsockname()[1]
        self.reader = _Reader(self.sock, time.monotonic() + timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (("Host", "test.local"),),
        body: bytes | None = None,
        chunks: Sequence[bytes] | None = None,
        timeout: float = 10.0,
    ) -> Response:
        headers = list(headers)
        names = {n.lower() for n, _ in headers}
        if body is not None and "content-length" not in names:
            headers.append(("Content-Length", str(len(body))))
        if chunks is not None and "transfer-encoding" not in names:
            headers.append(("Transfer-Encoding", "chunked"))
        self.send(build_request(method, target, headers, body=body, chunks=chunks))
        return self.read_response(method, timeout)

    def read_response(self, method: str = "GET", timeout: float = 10.0) -> Response:
        resp = Response(local_port=self.local_port)
        self.reader.deadline = time.monotonic() + timeout
        try:
            _read_response(self.reader, method, resp)
        except (OSError, ValueError) as exc:
            state = "no response" if resp.status is None else "incomplete response"
            resp.error = f"{state}: {type(exc).__name__}: {exc}"
        return resp

    def read_head(self, timeout: float = 5.0) -> bytes:
        """The raw bytes up to the next blank line (an interim or final response head)."""
        self.reader.deadline = time.monotonic() + timeout
        return self.reader.until(b"\r\n\r\n")

    def wait_closed(self, timeout: float) -> tuple[str, bytes]:
        """Read until the peer closes; returns (how, bytes read): how is "eof", "reset" or
        "open" (still open after ``timeout``)."""
        data = bytearray(self.reader.buf)
        self.reader.buf.clear()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "open", bytes(data)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return "open", bytes(data)
            except ConnectionResetError:
                return "reset", bytes(data)
            if not chunk:
                return "eof", bytes(data)
            data += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def subject() -> str:
    """The implementation under test: "ubimesh" or "envoy"."""
    return SUBJECT


@pytest.fixture
def bootstrap() -> Bootstrap:
    return Bootstrap()


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start proxies for one test; they are stopped when the test ends."""
    factory = ProxyFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """Start proxies shared by the tests of a module; stopped after the module."""
    factory = ProxyFactory(tmp_path_factory.mktemp("proxies"))
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_echo() -> Iterator[EchoServerPool]:
    """Echo upstreams shared by the tests of a module (use cursor()/records_since())."""
    pool = EchoServerPool()
    yield pool
    pool.close()


@pytest.fixture
def echo() -> Iterator[EchoServerPool]:
    """Echo upstreams for one test."""
    pool = EchoServerPool()
    yield pool
    pool.close()


@pytest.fixture
def connect() -> Iterator[Any]:
    """``connect(port) -> ClientConnection``; every connection is closed after the test."""
    conns: list[ClientConnection] = []

    def open_connection(port: int, timeout: float = 10.0) -> ClientConnection:
        conn = ClientConnection(port, timeout=timeout)
        conns.append(conn)
        return conn

    yield open_connection
    for conn in conns:
        conn.close()


@pytest.fixture(scope="module")
def silent() -> Iterator[SilentUpstream]:
    """An upstream that accepts and reads requests but never answers."""
    upstream = SilentUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    """An upstream whose answers the request path scripts (slow, truncated, WebSocket)."""
    upstream = ScriptedUpstream()
    yield upstream
    upstream.stop()
