"""Access logs, ubimesh against Envoy 1.40: the same bootstrap (ports aside), the same requests,
and the same access log lines once times, ports and request ids are masked.

Covered: Envoy's default format, a text format and a json_format on an HTTP connection manager
(upstream answers, an HTTP RBAC denial with its RESPONSE_CODE_DETAILS, a direct response, no
route, a status filter); an mTLS chain whose access log shows the peer's SPIFFE ID and SNI; the
listener access log of a network RBAC denial (peer identity, destination, termination details)
and of a connection no filter chain matched.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.bootstrap import FILE, HCM, ROUTER, address, static_cluster
from tests.support.echo_upstream import EchoServerPool
from tests.support.pki import Pki
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    envoy_binary,
    free_ports,
    start_ubimesh,
    wait_ready,
)

pytestmark = pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")

HRBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NRBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TLS_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
WEB = "spiffe://example.org/ns/shop/sa/web"
OTHER = "spiffe://example.org/ns/shop/sa/other"
LISTENERS = ("http", "mtls", "gated", "nochain", "tcp")

TEXT = (
    "%RESPONSE_CODE% [%RESPONSE_CODE_DETAILS%] [%RESPONSE_FLAGS%] %REQ(:METHOD)% "
    "%REQ(:PATH):12% %REQ(X-NOPE?:AUTHORITY)% %PROTOCOL% %BYTES_RECEIVED% %BYTES_SENT% "
    "%UPSTREAM_HOST% %UPSTREAM_CLUSTER% %ROUTE_NAME% %RESP(X-ECHO-UPSTREAM)% "
    "%DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_LOCAL_ADDRESS% 100%%\n"
)
JSON = {
    "code": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "rx": "%BYTES_RECEIVED%",
    "tx": "%BYTES_SENT%",
    "route": "%ROUTE_NAME%",
    "peer": "%DOWNSTREAM_PEER_URI_SAN%",
    "up": {"host": "%UPSTREAM_HOST%", "cluster": "%UPSTREAM_CLUSTER%"},
    "mixed": "m=%REQ(:METHOD)% %REQ(x-nope)%",
    "n": 7,
}
TCP_LOG = (
    "T %RESPONSE_CODE% [%RESPONSE_CODE_DETAILS%] [%RESPONSE_FLAGS%] %UPSTREAM_HOST% "
    "%UPSTREAM_CLUSTER% %BYTES_RECEIVED% %BYTES_SENT% %PROTOCOL% %REQ(:METHOD)% %ROUTE_NAME% "
    "%DOWNSTREAM_LOCAL_ADDRESS%\n"
)
MTLS = "%RESPONSE_CODE% %DOWNSTREAM_PEER_URI_SAN% %REQUESTED_SERVER_NAME% %REQ(:PATH)%\n"
LISTENER_LOG = (
    "L %RESPONSE_CODE% [%RESPONSE_CODE_DETAILS%] [%RESPONSE_FLAGS%] %DOWNSTREAM_PEER_URI_SAN% "
    "%DOWNSTREAM_LOCAL_ADDRESS% %REQUESTED_SERVER_NAME% %REQ(:METHOD)% %PROTOCOL% "
    "%CONNECTION_TERMINATION_DETAILS%\n"
)


def _log(path: Path, fmt: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    typed: dict[str, Any] = {"@type": FILE, "path": str(path)}
    if fmt is not None:
        typed["log_format"] = fmt
    return {"name": "envoy.access_loggers.file", "typed_config": typed, **extra}


def _tls(files: dict[str, Path]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_DOWN,
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(files["server"])},
                        "private_key": {"filename": str(files["server_key"])},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(files["bundle"])}},
            },
        },
    }


def _hcm(prefix: str, logs: list[dict[str, Any]], rbac: bool = False) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if rbac:
        deny = {
            "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
            "principals": [{"any": True}],
        }
        filters.append(
            {
                "name": "envoy.filters.http.rbac",
                "typed_config": {
                    "@type": HRBAC,
                    "rules": {"action": "DENY", "policies": {"deny-admin": deny}},
                },
            }
        )
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})
    routes = [
        {"name": "r-up", "match": {"prefix": "/up"}, "route": {"cluster": "echo"}},
        {"name": "r-admin", "match": {"prefix": "/admin"}, "route": {"cluster": "echo"}},
        {
            "name": "r-direct",
            "match": {"prefix": "/direct"},
            "direct_response": {"status": 200, "body": {"inline_string": "hi"}},
        },
    ]
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": prefix,
            "access_log": logs,
            "route_config": {
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]
            },
            "http_filters": filters,
        },
    }


def bootstrap(
    ports: dict[str, int], echo_port: int, files: dict[str, Path], logs: Path
) -> dict[str, Any]:
    errors_only = {
        "status_code_filter": {"comparison": {"op": "GE", "value": {"default_value": 400}}}
    }
    http_logs = [
        _log(logs / "default.log"),
        _log(logs / "text.log", {"text_format_source": {"inline_string": TEXT}}),
        _log(logs / "json.log", {"json_format": JSON}),
        _log(logs / "errors.log", {"text_format": "%RESPONSE_CODE%\n"}, filter=errors_only),
    ]
    gate = {
        "name": "envoy.filters.network.rbac",
        "typed_config": {
            "@type": NRBAC,
            "stat_prefix": "gate",
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "web-only": {
                        "permissions": [{"any": True}],
                        "principals": [{"authenticated": {"principal_name": {"exact": WEB}}}],
                    }
                },
            },
        },
    }
    inspector = [{"name": "tls_inspector", "typed_config": {"@type": INSPECTOR}}]
    listener_log = [_log(logs / "listener.log", {"text_format": LISTENER_LOG})]
    mtls_log = [_log(logs / "mtls.log", {"text_format": MTLS})]
    tcp = {"name": "tcp", "typed_config": {"@type": TCP, "stat_prefix": "t", "cluster": "echo"}}
    logged_tcp = {
        "name": "tcp",
        "typed_config": {
            "@type": TCP,
            "stat_prefix": "t",
            "cluster": "echo",
            "access_log": [_log(logs / "tcp.log", {"text_format": TCP_LOG})],
        },
    }
    return {
        "admin": {"address": address(ports["admin"])},
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": address(ports["http"]),
                    "filter_chains": [{"filters": [_hcm("http", http_logs, rbac=True)]}],
                },
                {
                    "name": "mtls",
                    "address": address(ports["mtls"]),
                    "listener_filters": inspector,
                    "filter_chains": [
                        {"filters": [_hcm("mtls", mtls_log)], "transport_socket": _tls(files)}
                    ],
                },
                {
                    "name": "gated",
                    "address": address(ports["gated"]),
                    "listener_filters": inspector,
                    "access_log": listener_log,
                    "filter_chains": [
                        {"filters": [gate, _hcm("gated", [])], "transport_socket": _tls(files)}
                    ],
                },
                {
                    "name": "nochain",
                    "address": address(ports["nochain"]),
                    "access_log": listener_log,
                    "filter_chains": [
                        {"filter_chain_match": {"destination_port": 1}, "filters": [tcp]}
                    ],
                },
                {
                    "name": "tcp",
                    "address": address(ports["tcp"]),
                    "filter_chains": [{"filters": [logged_tcp]}],
                },
            ],
            "clusters": [static_cluster("echo", [echo_port], connect_timeout="2s")],
        },
    }


def start_envoy(
    config: Path, admin_port: int, listener_ports: list[int], work: Path
) -> ManagedProcess:
    """Envoy as tests.support.procs starts it, plus a 100 ms access log flush interval:
    Envoy's default (--file-flush-interval-msec) is 10 s, ubimesh's 1 s."""
    exe = envoy_binary()
    assert exe is not None
    argv = [exe, "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
            "--base-id", str((os.getpid() % 10_000) * 100 + 99), "-l", "warn",
            "--drain-time-s", "0", "--file-flush-interval-msec", "100"]  # fmt: skip
    proc = ManagedProcess("envoy", argv, work / "envoy.log", work)
    try:
        wait_ready(proc, admin_port, listener_ports)
    except BaseException:
        proc.stop()
        raise
    return proc


@dataclass
class Side:
    name: str
    ports: dict[str, int]
    logs: Path
    proc: ManagedProcess


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side, Path]]:
    work = tmp_path_factory.mktemp("access-log-envoy")
    pki = Pki("example.org")
    files: dict[str, Path] = {"bundle": work / "bundle.pem"}
    files["bundle"].write_bytes(pki.bundle_pem)
    for name, sid in (("server", "spiffe://example.org/ns/shop/sa/api"), ("web", WEB),
                      ("other", OTHER)):  # fmt: skip
        files[name], files[name + "_key"] = pki.write_leaf(work, name, pki.leaf(sid))
    echo = EchoServerPool()
    running: list[Side] = []
    try:
        for name, start in (("envoy", start_envoy), ("ubimesh", start_ubimesh)):
            ports = dict(zip(("admin", *LISTENERS), free_ports(len(LISTENERS) + 1), strict=True))
            logs = work / name
            logs.mkdir()
            config = work / f"{name}.json"
            config.write_text(json.dumps(bootstrap(ports, echo.port("echo"), files, logs)))
            proc = start(config, ports["admin"], [ports[n] for n in LISTENERS], work)
            running.append(Side(name, ports, logs, proc))
        yield running[0], running[1], work
    finally:
        for side in running:
            side.proc.stop()
        echo.close()


def http_get(port: int, path: str) -> int:
    sock = socket.create_connection((LOOPBACK, port), timeout=5)
    try:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: shop.local\r\nx-echo-body-size: 17\r\n"
            "x-echo-response-header: x-echo-upstream=seen\r\nconnection: close\r\n\r\n".encode()
        )
        return read_response(sock)
    finally:
        sock.close()


def read_response(sock: socket.socket) -> int:
    """The status of one response, read to the end of its body (Envoy delays closing after
    a local reply until the client closes: reading to EOF would wait a second)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(found.group(1)) if found else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]) if head else 0


def tls_get(port: int, files: Path, cert: str) -> int | None:
    """A GET over mTLS with ``cert``; None when the proxy closed the connection instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(files / f"{cert}.pem"), str(files / f"{cert}.key"))
    sock = socket.create_connection((LOOPBACK, port), timeout=5)
    try:
        tls = ctx.wrap_socket(sock, server_hostname="api.shop.local")
        tls.sendall(b"GET /who HTTP/1.1\r\nHost: shop.local\r\nconnection: close\r\n\r\n")
        return read_response(tls) or None
    except (ssl.SSLError, OSError):
        return None
    finally:
        sock.close()


def read_lines(path: Path, count: int, timeout: float = 6.0) -> list[str]:
    """The first ``count`` lines of an access log (both proxies flush once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def masked(line: str, side: Side) -> str:
    for label, port in side.ports.items():
        line = re.sub(rf"\b{port}\b", f"<{label}>", line)
    line = re.sub(r"\[\d{4}-\d\d-\d\dT[\d:.]+Z\]", "[TIME]", line)
    line = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<RID>", line)
    return line


def test_access_log_lines_match_envoys(sides: tuple[Side, Side, Path]) -> None:
    envoy, ubimesh, files = sides
    paths = ["/up/items?x=1", "/admin/users", "/direct", "/nowhere"]
    for side in (envoy, ubimesh):
        assert [http_get(side.ports["http"], p) for p in paths] == [200, 403, 200, 404]
        assert tls_get(side.ports["mtls"], files, "web") == 404
        assert tls_get(side.ports["gated"], files, "other") is None
        with socket.create_connection((LOOPBACK, side.ports["nochain"]), timeout=5) as s:
            s.settimeout(5)
            assert s.recv(10) == b""  # closed: no chain for this destination
        with socket.create_connection((LOOPBACK, side.ports["tcp"]), timeout=5) as s:
            s.sendall(
                b"GET /t HTTP/1.1\r\nHost: t\r\nx-echo-body-size: 5\r\nx-echo-close: 1\r\n\r\n"
            )
            assert read_response(s) == 200

    for name, count in (("text", 4), ("errors", 2), ("mtls", 1)):
        want = [masked(line, envoy) for line in read_lines(envoy.logs / f"{name}.log", count)]
        got = [masked(line, ubimesh) for line in read_lines(ubimesh.logs / f"{name}.log", count)]
        assert len(want) == count, (name, want)
        assert got == want, name

    # The TCP proxy log: the readiness probe's connection is logged too; the proxied
    # exchange is the connection that moved bytes.
    def proxied(side: Side) -> list[str]:
        lines = read_lines(side.logs / "tcp.log", 2)
        return [masked(x, side) for x in lines if " echo 0 0 " not in x]

    want_tcp = proxied(envoy)
    assert len(want_tcp) == 1 and proxied(ubimesh) == want_tcp

    # The listener log: Envoy writes every connection there (the readiness probes too);
    # ubimesh only refused ones: compare those, distinct (the probes repeat the NR line).
    def refusals(side: Side) -> set[str]:
        path = side.logs / "listener.log"
        deadline = time.monotonic() + 6.0
        while True:
            lines = {
                masked(x, side)
                for x in read_lines(path, 0)
                if "rbac_access_denied" in x or "filter_chain_not_found" in x
            }
            if len(lines) >= 2 or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    denied = f"L 0 [-] [-] {OTHER} 127.0.0.1:<gated> api.shop.local - - "
    expected = {
        "L 0 [filter_chain_not_found] [NR] - 127.0.0.1:<nochain> - - - -",
        denied + "rbac_access_denied_matched_policy[none]",
    }
    assert refusals(envoy) == expected
    assert refusals(ubimesh) == expected

    want_json = [json.loads(x) for x in read_lines(envoy.logs / "json.log", 4)]
    got_json = [json.loads(x) for x in read_lines(ubimesh.logs / "json.log", 4)]
    for w, g in zip(want_json, got_json, strict=True):
        for doc, side in ((w, envoy), (g, ubimesh)):
            if doc["up"]["host"]:
                doc["up"]["host"] = masked(doc["up"]["host"], side)
        assert g == w

    # Envoy's default format: DURATION and the upstream service time vary.
    def default_masked(line: str, side: Side) -> str:
        line = masked(line, side)
        return re.sub(r'^(\S+ "[^"]*" \d+ \S+ \d+ \d+) \d+ (\d+|-) ', r"\1 D U ", line)

    want = [default_masked(x, envoy) for x in read_lines(envoy.logs / "default.log", 4)]
    got = [default_masked(x, ubimesh) for x in read_lines(ubimesh.logs / "default.log", 4)]
    assert len(want) == 4 and got == want
