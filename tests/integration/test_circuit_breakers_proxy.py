"""Circuit breakers in a running ``ubimesh proxy``, with requests held open by the upstream
(what the differential cases, one request at a time, cannot reach):

* ``max_requests`` 2: a third request gets an immediate 503 ``x-envoy-overloaded`` (flag UO),
  counted as ``upstream_rq_active_overflow`` (Envoy 1.38 and later);
* ``max_connections`` 1 and ``max_pending_requests`` 1: the second request waits for the one
  connection (``upstream_cx_overflow``), the third is refused at once
  (``upstream_rq_pending_overflow``); a waiting request whose client goes away gives its
  pending slot back; the waiting request is then served on the same connection;
* TCP proxy ``max_connections`` 1: a second connection is closed at once, flag UO;
* the ``circuit_breakers.default.*_open`` and ``remaining_*`` gauges follow.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.bootstrap import FILE, HCM, ROUTER, address, listener, static_cluster
from tests.support.held_upstream import HeldUpstream
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    admin_get,
    free_ports,
    start_ubimesh,
    ubimesh_available,
)

TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
OVERFLOW_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
#: A refused request is answered by the proxy itself: well under this, even on a busy machine.
FAST = 0.5


def _log(path: Path, fmt: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "file",
            "typed_config": {
                "@type": FILE,
                "path": str(path),
                "log_format": {"text_format_source": {"inline_string": fmt}},
            },
        }
    ]


def _http(name: str, log: Path) -> dict[str, Any]:
    return {
        "name": "hcm",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": name,
            "access_log": _log(log, "%REQ(X-ID)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n"),
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name}}],
                    }
                ]
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
            ],
        },
    }


def _cluster(name: str, port: int, thresholds: dict[str, Any]) -> dict[str, Any]:
    return static_cluster(
        name, [port], connect_timeout="2s", circuit_breakers={"thresholds": [thresholds]}
    )


@dataclass
class Proxy:
    ports: dict[str, int]
    proc: ManagedProcess
    up: dict[str, HeldUpstream]
    log: Path

    def stats(self) -> dict[str, int]:
        status, body = admin_get(self.ports["admin"], "/stats", timeout=5)
        assert status == 200
        out = {}
        for line in body.decode().splitlines():
            key, _, value = line.partition(": ")
            if value.lstrip("-").isdigit():
                out[key] = int(value)
        return out

    def stat(self, name: str) -> int:
        found = self.stats()
        assert name in found, f"no stat {name}"
        return found[name]

    def wait_stat(self, name: str, value: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.stat(name)) != value:
            assert time.monotonic() < deadline, f"{name} is {now}, not {value}"
            time.sleep(0.01)

    def send(self, listener: str, xid: str) -> socket.socket:
        """A GET sent on a new connection; the answer is read later with ``answer``."""
        s = socket.create_connection((LOOPBACK, self.ports[listener]), timeout=5)
        s.sendall(f"GET / HTTP/1.1\r\nhost: cb.test\r\nx-id: {xid}\r\n\r\n".encode())
        return s

    def log_line(self, xid: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists():
                for line in self.log.read_text().splitlines():
                    if line.startswith(xid + " "):
                        return line
            time.sleep(0.05)
        raise AssertionError(f"no access log line for {xid}")


def answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one Content-Length response on ``s`` (then closed)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            assert chunk
            body += chunk
        return int(lines[0].split()[1]), headers, body
    finally:
        s.close()


def get(proxy: Proxy, listener: str, xid: str) -> tuple[int, dict[str, str], bytes, float]:
    start = time.monotonic()
    status, headers, body = answer(proxy.send(listener, xid))
    return status, headers, body, time.monotonic() - start


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    ok, why = ubimesh_available()
    if not ok:
        pytest.skip(f"ubimesh proxy does not run: {why}")
    work = tmp_path_factory.mktemp("breakers")
    log = work / "access.log"
    with HeldUpstream() as rq, HeldUpstream() as pend, HeldUpstream() as tcp:
        ups = {"rq": rq, "pend": pend, "tcp": tcp}
        names = ("admin", "rq", "pend", "tcp")
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        tcp_proxy = {
            "name": "tcp",
            "typed_config": {
                "@type": TCP,
                "stat_prefix": "tcp",
                "cluster": "tcp",
                "access_log": _log(log, "tcp %RESPONSE_FLAGS%\n"),
            },
        }
        listeners = [("rq", _http("rq", log)), ("pend", _http("pend", log)), ("tcp", tcp_proxy)]
        bootstrap = {
            "admin": {"address": address(ports["admin"])},
            "static_resources": {
                "listeners": [listener(n, ports[n], f) for n, f in listeners],
                "clusters": [
                    _cluster("rq", rq.port, {"max_requests": 2, "track_remaining": True}),
                    _cluster(
                        "pend",
                        pend.port,
                        {"max_connections": 1, "max_pending_requests": 1, "track_remaining": True},
                    ),
                    _cluster("tcp", tcp.port, {"max_connections": 1}),
                ],
            },
        }
        config = work / "bootstrap.yaml"
        config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        proc = start_ubimesh(
            config, ports["admin"], [ports[n] for n in names[1:]], work, name="breakers"
        )
        try:
            yield Proxy(ports, proc, ups, log)
        finally:
            proc.stop()


CB = "circuit_breakers.default."


def test_max_requests_overflow_is_a_fast_503_uo(proxy: Proxy) -> None:
    up = proxy.up["rq"]
    held = [proxy.send("rq", f"rq-held-{i}") for i in range(2)]
    up.wait("held", 2)
    proxy.wait_stat("cluster.rq." + CB + "rq_open", 1)
    assert proxy.stat("cluster.rq." + CB + "remaining_rq") == 0

    status, headers, body, took = get(proxy, "rq", "rq-over")
    assert (status, body) == (503, OVERFLOW_BODY)
    assert headers.get("x-envoy-overloaded") == "true"
    assert took < FAST
    assert up.requests == 2  # the upstream never saw it
    # Envoy counts a max_requests overflow as a pending overflow (its pool refuses the stream).
    assert proxy.stat("cluster.rq.upstream_rq_active_overflow") == 1
    assert proxy.stat("cluster.rq.upstream_rq_pending_overflow") == 0
    assert proxy.log_line("rq-over").split()[1:] == ["503", "UO"]

    up.release(2)
    assert [answer(s)[0] for s in held] == [200, 200]
    proxy.wait_stat("cluster.rq." + CB + "rq_open", 0)
    proxy.wait_stat("cluster.rq." + CB + "remaining_rq", 2)
    again = proxy.send("rq", "rq-again")  # the slots are back: admitted
    up.wait("held", 1)
    up.release(1)
    assert answer(again)[0] == 200


def test_pending_and_connection_limits(proxy: Proxy) -> None:
    up = proxy.up["pend"]
    first = proxy.send("pend", "p-first")
    up.wait("held", 1)
    proxy.wait_stat("cluster.pend." + CB + "cx_open", 1)
    # The second request finds the one connection busy: it waits (cx overflow), bounded.
    waiting = proxy.send("pend", "p-waiting")
    proxy.wait_stat("cluster.pend.upstream_rq_pending_active", 1)
    assert proxy.stat("cluster.pend.upstream_cx_overflow") >= 1
    assert proxy.stat("cluster.pend." + CB + "rq_pending_open") == 1
    assert proxy.stat("cluster.pend." + CB + "remaining_pending") == 0

    status, headers, body, took = get(proxy, "pend", "p-over")
    assert (status, body, headers.get("x-envoy-overloaded")) == (503, OVERFLOW_BODY, "true")
    assert took < FAST
    assert proxy.stat("cluster.pend.upstream_rq_pending_overflow") == 1
    assert proxy.log_line("p-over").split()[1:] == ["503", "UO"]

    # A waiting request whose client leaves (a reset) gives its slot back at once.
    waiting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    waiting.close()
    proxy.wait_stat("cluster.pend.upstream_rq_pending_active", 0)
    assert proxy.stat("cluster.pend." + CB + "rq_pending_open") == 0
    assert proxy.stat("cluster.pend." + CB + "remaining_pending") == 1
    second = proxy.send("pend", "p-second")
    proxy.wait_stat("cluster.pend.upstream_rq_pending_active", 1)

    # The first answer frees the connection: the waiting request is served on it.
    up.release(1)
    assert answer(first)[0] == 200
    up.wait("held", 1)
    proxy.wait_stat("cluster.pend.upstream_rq_pending_active", 0)
    up.release(1)
    assert answer(second)[0] == 200
    assert up.connections == 1
    assert up.requests == 2
    assert proxy.stat("cluster.pend.upstream_rq_pending_overflow") == 1


def test_tcp_proxy_max_connections(proxy: Proxy) -> None:
    up = proxy.up["tcp"]
    up.wait("open_connections", 0)
    proxy.wait_stat("cluster.tcp." + CB + "cx_open", 0)
    base = up.connections  # the start-up probe's connections
    overflows = proxy.stat("cluster.tcp.upstream_cx_overflow")
    first = socket.create_connection((LOOPBACK, proxy.ports["tcp"]), timeout=5)
    try:
        up.wait("open_connections", 1)
        proxy.wait_stat("cluster.tcp." + CB + "cx_open", 1)
        second = socket.create_connection((LOOPBACK, proxy.ports["tcp"]), timeout=5)
        start = time.monotonic()
        try:
            try:
                assert second.recv(10) == b""  # closed by the proxy
            except ConnectionResetError:
                pass
        finally:
            second.close()
        assert time.monotonic() - start < FAST
        assert proxy.stat("cluster.tcp.upstream_cx_overflow") == overflows + 1
        assert up.connections == base + 1
    finally:
        first.close()
    proxy.wait_stat("cluster.tcp." + CB + "cx_open", 0)
    third = socket.create_connection((LOOPBACK, proxy.ports["tcp"]), timeout=5)
    try:
        up.wait("connections", base + 2)
    finally:
        third.close()
    deadline = time.monotonic() + 5
    while "tcp UO" not in (proxy.log.read_text() if proxy.log.exists() else ""):
        assert time.monotonic() < deadline, "no UO line for the refused TCP connection"
        time.sleep(0.05)
