"""The registry: a proxy that joins with ``ubimesh.workload`` metadata becomes a Workload (and
an endpoint in other proxies' config) while it is connected, and leaves after a grace period."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.procs import ManagedProcess, admin_get, free_ports

from ubimesh.control.bootstrap import build_bootstrap, parse_address

MESH = """\
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec:
  ports: [{name: http, port: 80, protocol: http}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  address: 127.0.0.1
  listeners: [{name: web, port: %(gw)d, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edge}
spec:
  parentRefs: [{name: edge}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"""


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[dict[str, Any]]:
    out = open(tmp_path / "control.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ubimesh.cli.main", "control", "--data-dir", str(tmp_path),
         "--api-address", "127.0.0.1:0", "--xds-address", "127.0.0.1:0",
         "--registration-grace", "0.5"],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        wait_for("control.json", lambda: (tmp_path / "control.json").exists()
                 or proc.poll() is not None)
        assert proc.poll() is None, (tmp_path / "control.out").read_text()
        info = json.loads((tmp_path / "control.json").read_text())
        info["token"] = (tmp_path / "admin-token").read_text().strip()
        yield info
    finally:
        proc.terminate()
        proc.wait(10)
        out.close()


def call(plane: dict[str, Any], method: str, path: str, body: str | None = None) -> Any:
    request = urllib.request.Request(
        plane["api"] + path, data=body.encode() if body else None, method=method,
        headers={"Authorization": f"Bearer {plane['token']}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def start_proxy(tmp_path: Path, plane: dict[str, Any], node: str, role: str,
                workload: dict[str, Any] | None = None) -> tuple[ManagedProcess, int]:
    (admin,) = free_ports(1)
    bootstrap = build_bootstrap(node_id=node, role=role, xds=[parse_address(plane["xds"])],
                                admin_port=admin, workload=workload)
    path = tmp_path / f"{node}.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    proc = ManagedProcess(
        node, [sys.executable, "-m", "ubimesh.cli.main", "proxy", "-c", str(path), "-l",
               "warning", "--drain-time-s", "0"], tmp_path / f"{node}.log", tmp_path,
    )
    return proc, admin


def test_joining_proxy_registers_its_workload(tmp_path: Path, plane: dict[str, Any]) -> None:
    gw_port, app_port = free_ports(2)
    call(plane, "POST", "/api/v1/apply", MESH % {"gw": gw_port})
    gateway, gw_admin = start_proxy(tmp_path, plane, "edge.default", "gateway")
    joiner, _ = start_proxy(tmp_path, plane, "joiner.default", "sidecar",
                            {"service": "web", "address": "127.0.0.1", "ports": {"http": app_port}})
    try:
        wait_for("the registered workload", lambda: any(
            w["metadata"]["name"] == "joiner"
            for w in call(plane, "GET", "/api/v1/resources/workloads")["items"]))
        workload = call(plane, "GET", "/api/v1/resources/workloads/default/joiner")
        assert workload["metadata"]["annotations"]["ubimesh.io/registered-by"] == "joiner.default"
        proxies = {p["id"]: p for p in call(plane, "GET", "/api/v1/proxies")["items"]}
        assert proxies["joiner.default"]["registered"] == "Workload default/joiner"
        assert proxies["edge.default"]["role"] == "gateway"

        endpoint = f"127.0.0.1:{app_port}"

        def gateway_has_endpoint() -> bool:
            try:
                return endpoint in admin_get(gw_admin, "/clusters")[1].decode()
            except OSError:
                return False

        wait_for("the endpoint in the gateway's clusters", gateway_has_endpoint)

        joiner.stop()
        wait_for("the workload to leave", lambda: not any(
            w["metadata"]["name"] == "joiner"
            for w in call(plane, "GET", "/api/v1/resources/workloads")["items"]))
        wait_for("the endpoint to leave", lambda: not gateway_has_endpoint())
    finally:
        joiner.stop()
        gateway.stop()


def test_bad_registration_is_refused(tmp_path: Path, plane: dict[str, Any]) -> None:
    call(plane, "POST", "/api/v1/apply", MESH % {"gw": free_ports(1)[0]})
    joiner, _ = start_proxy(tmp_path, plane, "bad.default", "sidecar",
                            {"service": "nosuch", "address": "127.0.0.1"})
    try:
        wait_for("the proxy to connect", lambda: any(
            p["id"] == "bad.default" for p in call(plane, "GET", "/api/v1/proxies")["items"]))
        (proxy,) = [p for p in call(plane, "GET", "/api/v1/proxies")["items"]
                    if p["id"] == "bad.default"]
        assert "spec.service" in proxy["registrationError"], proxy
        assert proxy["registered"] == ""
        assert call(plane, "GET", "/api/v1/resources/workloads")["items"] == []
    finally:
        joiner.stop()
