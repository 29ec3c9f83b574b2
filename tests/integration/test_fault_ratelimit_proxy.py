"""Fault injection and local rate limiting in a running ``ubimesh proxy`` (what the Envoy
differential test cannot pin down: timing, concurrency, connections, response flags).

* a fixed delay holds the request for its duration (a timer: the proxy keeps serving);
* ``max_active_faults`` 1: a second request during a delay is not delayed
  (``faults_overflow``);
* a downstream reset during a delay cancels it: the upstream never sees the request and
  ``active_faults`` drops at once;
* a header-controlled delay waits for the header's milliseconds;
* per-connection buckets: a keep-alive connection runs out, a new one has its own tokens;
* the access log shows DI, FI and RL, and the details of the local replies.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.support.bootstrap import FILE, HCM, ROUTER, address, listener, static_cluster
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    admin_get,
    free_ports,
    start_ubimesh,
    ubimesh_available,
)

FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
LRL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
LISTENERS = ("delay", "perconn")
DELAY = 0.4
ALL = {"default_value": {"numerator": 100}}


def _hcm(prefix: str, flt: dict[str, Any], log: Path) -> dict[str, Any]:
    return {
        "name": "hcm",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": prefix,
            "access_log": [
                {
                    "name": "file",
                    "typed_config": {
                        "@type": FILE,
                        "path": str(log),
                        "log_format": {
                            "text_format_source": {
                                "inline_string": "%REQ(X-ID)% %RESPONSE_CODE% %RESPONSE_FLAGS% "
                                "%RESPONSE_CODE_DETAILS%\n"
                            }
                        },
                    },
                }
            ],
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}],
                    }
                ]
            },
            "http_filters": [
                flt,
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
            ],
        },
    }


def bootstrap(ports: dict[str, int], echo: int, log: Path) -> dict[str, Any]:
    fault = {
        "name": "envoy.filters.http.fault",
        "typed_config": {
            "@type": FAULT,
            "max_active_faults": 1,
            "delay": {"fixed_delay": f"{DELAY}s", "percentage": {"numerator": 100}},
            # An abort only for requests that ask (header_abort) after the delay decision.
            "headers": [{"name": "x-skip", "present_match": False}],
        },
    }
    header_fault = {
        "name": "envoy.filters.http.fault",
        "typed_config": {
            "@type": FAULT,
            "delay": {"header_delay": {}, "percentage": {"numerator": 100}},
            "abort": {"header_abort": {}, "percentage": {"numerator": 100}},
        },
    }
    limit = {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": LRL,
            "stat_prefix": "perconn",
            "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "3600s"},
            "filter_enabled": ALL,
            "filter_enforced": ALL,
            "local_rate_limit_per_downstream_connection": True,
        },
    }
    listeners = [
        ("delay", _hcm("delay", fault, log)),
        ("hdr", _hcm("hdr", header_fault, log)),
        ("perconn", _hcm("perconn", limit, log)),
    ]
    return {
        "admin": {"address": address(ports["admin"])},
        "static_resources": {
            "listeners": [listener(n, ports[n], f) for n, f in listeners],
            "clusters": [static_cluster("echo", [echo], connect_timeout="2s")],
        },
    }


@dataclass
class Proxy:
    ports: dict[str, int]
    proc: ManagedProcess
    echo: EchoServerPool
    log: Path

    def stat(self, name: str) -> int:
        status, body = admin_get(self.ports["admin"], "/stats", timeout=5)
        assert status == 200
        for line in body.decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise AssertionError(f"no stat {name}")

    def wait_active_faults(self, count: int, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while self.stat("http.delay.fault.active_faults") != count:
            assert time.monotonic() < deadline, f"active_faults never reached {count}"
            time.sleep(0.01)

    def get(self, listener: str, *headers: tuple[str, str]) -> tuple[int, float]:
        """One GET on a new connection: the status and the time it took."""
        conn = http.client.HTTPConnection(LOOPBACK, self.ports[listener], timeout=5)
        start = time.monotonic()
        try:
            conn.request("GET", "/", headers=dict(headers))
            resp = conn.getresponse()
            resp.read()
            return resp.status, time.monotonic() - start
        finally:
            conn.close()

    def log_line(self, request_id: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists():
                for line in self.log.read_text().splitlines():
                    if line.startswith(request_id + " "):
                        return line
            time.sleep(0.05)
        raise AssertionError(f"no access log line for {request_id}")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    ok, why = ubimesh_available()
    if not ok:
        pytest.skip(f"ubimesh proxy does not run: {why}")
    work = tmp_path_factory.mktemp("fault-rl")
    names = ("admin", "delay", "hdr", "perconn")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    log = work / "access.log"
    with EchoServerPool() as echo:
        path = work / "bootstrap.json"
        path.write_text(json.dumps(bootstrap(ports, echo.port("echo"), log)))
        proc = start_ubimesh(path, ports["admin"], [ports[n] for n in names[1:]], work)
        try:
            yield Proxy(ports, proc, echo, log)
        finally:
            proc.stop()


def test_delay_and_overflow(proxy: Proxy) -> None:
    """Two requests at once with max_active_faults 1: one waits the delay, the other overflows
    and goes straight through; afterwards no fault is active."""
    overflow_before = proxy.stat("http.delay.fault.faults_overflow")
    first = socket.create_connection((LOOPBACK, proxy.ports["delay"]), timeout=5)
    start = time.monotonic()
    first.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nx-id: slow\r\n\r\n")
    proxy.wait_active_faults(1)  # the first request holds the only fault slot
    status, took = proxy.get("delay", ("x-id", "fast"))
    assert status == 200 and took < DELAY / 2, took
    assert first.recv(65536).startswith(b"HTTP/1.1 200")
    waited = time.monotonic() - start
    first.close()
    assert DELAY * 0.95 <= waited <= DELAY * 1.5, waited
    assert proxy.stat("http.delay.fault.faults_overflow") == overflow_before + 1
    assert proxy.stat("http.delay.fault.active_faults") == 0
    assert proxy.log_line("slow").split()[1:3] == ["200", "DI"]
    assert proxy.log_line("fast").split()[1:3] == ["200", "-"]


def test_reset_during_delay_cancels_it(proxy: Proxy) -> None:
    cursor = proxy.echo.cursor()
    sock = socket.create_connection((LOOPBACK, proxy.ports["delay"]), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nx-id: gone\r\n\r\n")
    proxy.wait_active_faults(1)
    # A reset (RST), not a half-close: the proxy finishes a half-closed client's request.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    time.sleep(0.1)  # well before the delay would end
    assert proxy.stat("http.delay.fault.active_faults") == 0
    assert "DC" in proxy.log_line("gone").split()[2]
    time.sleep(DELAY)
    assert proxy.echo.records_since(cursor, timeout=0) == []


def test_header_delay_and_abort(proxy: Proxy) -> None:
    status, took = proxy.get("hdr", ("x-envoy-fault-delay-request", "250"), ("x-id", "hd"))
    assert status == 200 and 0.24 <= took < 1.0, took
    status, _ = proxy.get("hdr", ("x-envoy-fault-abort-request", "451"), ("x-id", "ha"))
    assert status == 451
    assert proxy.log_line("ha").split()[1:] == ["451", "FI", "fault_filter_abort"]
    status, took = proxy.get("hdr", ("x-id", "hn"))
    assert status == 200 and took < 0.2


def test_buckets_per_connection(proxy: Proxy) -> None:
    conn = http.client.HTTPConnection(LOOPBACK, proxy.ports["perconn"], timeout=5)
    try:
        statuses = []
        for i in range(2):
            conn.request("GET", "/", headers={"x-id": f"pc{i}"})
            resp = conn.getresponse()
            body = resp.read()
            statuses.append(resp.status)
        assert statuses == [200, 429] and body == b"local_rate_limited"
    finally:
        conn.close()
    assert proxy.get("perconn")[0] == 200  # a new connection, a new bucket
    assert proxy.log_line("pc1").split()[1:] == ["429", "RL", "local_rate_limited"]
    assert proxy.stat("perconn.http_local_rate_limit.rate_limited") == 1
