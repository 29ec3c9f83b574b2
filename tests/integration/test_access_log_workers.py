"""Access logs of a proxy with two workers: both append whole lines to one file, the lines
still buffered when SIGTERM arrives are written before the processes exit, and the writer's
stats reach /stats."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from tests.support.bootstrap import FILE, HCM, ROUTER, address
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import LOOPBACK, ManagedProcess, admin_get, free_ports, wait_ready

REQUESTS = 40


def bootstrap(admin: int, port: int, echo: int, log: Path) -> dict[str, Any]:
    access_log = {
        "name": "json",
        "typed_config": {
            "@type": FILE,
            "path": str(log),
            "log_format": {
                "json_format": {
                    "code": "%RESPONSE_CODE%",
                    "path": "%REQ(:PATH)%",
                    "upstream": "%UPSTREAM_HOST%",
                    "details": "%RESPONSE_CODE_DETAILS%",
                }
            },
        },
    }
    hcm = {
        "name": "hcm",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": "w",
            "access_log": [access_log],
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}],
                    }
                ]
            },
            "http_filters": [{"name": "router", "typed_config": {"@type": ROUTER}}],
        },
    }
    return {
        "admin": {"address": address(admin)},
        "static_resources": {
            "listeners": [
                {"name": "w", "address": address(port), "filter_chains": [{"filters": [hcm]}]}
            ],
            "clusters": [
                {
                    "name": "echo",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "echo",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(echo)}}]}],
                    },
                }
            ],
        },
    }


def get(port: int, path: str) -> int:
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: w\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_two_workers_share_the_file_and_flush_on_sigterm(tmp_path: Path) -> None:
    exe = shutil.which("ubimesh")
    if exe is None:
        pytest.skip("no ubimesh executable")
    echo = EchoServerPool()
    echo_port = echo.port("echo")
    admin, port = free_ports(2)
    log = tmp_path / "access.json"
    config = tmp_path / "proxy.json"
    config.write_text(json.dumps(bootstrap(admin, port, echo_port, log)))
    argv = [exe, "proxy", "-c", str(config), "--concurrency", "2", "-l", "warning",
            "--drain-time-s", "0"]  # fmt: skip
    proc = ManagedProcess("ubimesh", argv, tmp_path / "ubimesh.log", tmp_path)
    try:
        wait_ready(proc, admin, [port])
        assert [get(port, f"/r/{i}") for i in range(REQUESTS)] == [200] * REQUESTS
        status, body = admin_get(admin, "/stats")
        assert status == 200
        stats = dict(line.split(": ", 1) for line in body.decode().splitlines() if ": " in line)
        assert int(stats["filesystem.write_buffered"]) >= REQUESTS
        assert int(stats.get("access_log.dropped_lines", "0")) == 0
        # SIGTERM to the process group at once: lines still in the buffers (flushed each
        # second) must not be lost.
        assert proc.stop(timeout=10) == 0
    finally:
        proc.stop()
        echo.close()
    lines = log.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # whole lines, none interleaved
    assert sorted(e["path"] for e in entries) == sorted(f"/r/{i}" for i in range(REQUESTS))
    assert {e["code"] for e in entries} == {200}
    assert {e["details"] for e in entries} == {"via_upstream"}
    assert {e["upstream"] for e in entries} == {f"{LOOPBACK}:{echo_port}"}
