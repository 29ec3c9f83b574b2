"""The registry: a proxy that joins with ``ubimesh.workload`` metadata becomes a Workload (and
an endpoint in other proxies' config) while it is connected, and leaves after a grace period."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.control import ControlReplica, start_control, start_mesh_proxy, wait_for
from tests.support.procs import ManagedProcess, admin_get, free_ports

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


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlReplica]:
    replica = start_control(tmp_path, grace=0.5)
    try:
        yield replica
    finally:
        replica.stop()


def start_proxy(tmp_path: Path, plane: ControlReplica, node: str, role: str,
                workload: dict[str, Any] | None = None) -> tuple[ManagedProcess, int]:
    return start_mesh_proxy(tmp_path, node, role, [plane.xds], workload=workload, wait=False,
                            log_level="info")


def test_joining_proxy_registers_its_workload(tmp_path: Path, plane: ControlReplica) -> None:
    gw_port, app_port = free_ports(2)
    plane.call("POST", "/api/v1/apply", MESH % {"gw": gw_port})
    gateway, gw_admin = start_proxy(tmp_path, plane, "edge.default", "gateway")
    joiner, _ = start_proxy(tmp_path, plane, "joiner.default", "sidecar",
                            {"service": "web", "address": "127.0.0.1", "ports": {"http": app_port}})
    try:
        wait_for("the registered workload", lambda: any(
            w["metadata"]["name"] == "joiner"
            for w in plane.call("GET", "/api/v1/resources/workloads")["items"]))
        workload = plane.call("GET", "/api/v1/resources/workloads/default/joiner")
        assert workload["metadata"]["annotations"]["ubimesh.io/registered-by"] == "joiner.default"
        # The two proxies connect independently: the gateway may come after the joiner.
        # The registry records the registration once the store's write has returned.
        wait_for("both proxies connected, the joiner registered", lambda: {
            "edge.default", "joiner.default"} <= {
            p["id"] for p in plane.call("GET", "/api/v1/proxies")["items"]
            if p["registered"] or p["id"] == "edge.default"})
        proxies = {p["id"]: p for p in plane.call("GET", "/api/v1/proxies")["items"]}
        assert proxies["joiner.default"]["registered"] == "Workload default/joiner"
        assert proxies["joiner.default"]["registration"] == "registered"
        assert proxies["edge.default"]["role"] == "gateway"
        assert proxies["edge.default"]["registration"] == "none"

        endpoint = f"127.0.0.1:{app_port}"

        def gateway_has_endpoint() -> bool:
            try:
                return endpoint in admin_get(gw_admin, "/clusters")[1].decode()
            except OSError:
                return False

        try:
            wait_for("the endpoint in the gateway's clusters", gateway_has_endpoint)
        except AssertionError as exc:
            # Seen once in CI, not reproduced: show both sides of the ADS stream.
            proxies = plane.call("GET", "/api/v1/proxies")
            raise AssertionError(
                f"{exc}\n/api/v1/proxies: {proxies}\n--- gateway:\n{gateway.describe()}\n"
                f"--- control plane:\n{plane.proc.log_tail()}"
            ) from None

        joiner.stop()
        wait_for("the workload to leave", lambda: not any(
            w["metadata"]["name"] == "joiner"
            for w in plane.call("GET", "/api/v1/resources/workloads")["items"]))
        wait_for("the endpoint to leave", lambda: not gateway_has_endpoint())
    finally:
        joiner.stop()
        gateway.stop()


def test_bad_registration_is_refused(tmp_path: Path, plane: ControlReplica) -> None:
    plane.call("POST", "/api/v1/apply", MESH % {"gw": free_ports(1)[0]})
    joiner, _ = start_proxy(tmp_path, plane, "bad.default", "sidecar",
                            {"service": "nosuch", "address": "127.0.0.1"})
    try:
        # The proxy is listed as soon as its stream opens; the registry's decision on its
        # workload follows once the store has answered.
        def decided() -> list[dict[str, str]]:
            listed = [p for p in plane.call("GET", "/api/v1/proxies")["items"]
                      if p["id"] == "bad.default"]
            for p in listed:
                assert p["registration"] in ("pending", "refused"), p
            return [p for p in listed if p["registration"] != "pending"]

        wait_for("the proxy to connect and its registration to be decided",
                 lambda: bool(decided()))
        (proxy,) = decided()
        assert proxy["registration"] == "refused", proxy
        assert "spec.service" in proxy["registrationError"], proxy
        assert proxy["registered"] == ""
        assert plane.call("GET", "/api/v1/resources/workloads")["items"] == []
    finally:
        joiner.stop()
