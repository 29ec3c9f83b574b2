"""``ubimesh up`` end to end: a gateway, two sidecar'd apps, a live change, the control plane
killed and started again without a failed request, a clean stop."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from tests.support.procs import free_ports
from tests.support.up import Up as RunningUp
from tests.support.up import running_up as support_up

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "mesh" / "app.py"

MESH = """\
apiVersion: ubimesh.io/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  address: 127.0.0.1
  adminPort: %(gw_admin)d
  listeners: [{name: web, port: %(gw)d, protocol: HTTP}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec:
  ports: [{name: http, port: 80, protocol: http}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: web-dc}
spec:
  service: web
  address: 127.0.0.1
  site: dc
  ports: {http: %(app1)d}
  sidecar: {inboundPorts: {http: %(in1)d}, adminPort: %(admin1)d}
  command: [python, %(app)s]
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: web-cloud}
spec:
  service: web
  address: 127.0.0.1
  site: cloud
  ports: {http: %(app2)d}
  sidecar: {inboundPorts: {http: %(in2)d}, adminPort: %(admin2)d}
  command: [python, %(app)s]
---
# Default-deny (STRICT mTLS): the gateway (identity sa/edge) may call web.
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: everything}
spec:
  matches: [{name: all}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: edge-to-web}
spec:
  destination: {kind: ServiceAccount, name: web}
  rules: [{kind: HTTPRouteGroup, name: everything}]
  sources: [{kind: ServiceAccount, name: edge}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edge}
spec:
  parentRefs: [{name: edge}]
  rules:
    - backendRefs: [{name: web, port: 80}]
%(filters)s"""

HEADER_FILTER = """\
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-change, value: applied}]}
"""


def get(
    port: int, path: str = "/", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if response.status == 200 else {}
    finally:
        conn.close()


PORT_NAMES = ["gw", "gw_admin", "app1", "in1", "admin1", "app2", "in2", "admin2", "api", "xds"]


@dataclass
class Up:
    """A running ``ubimesh up`` on MESH, with the ports it was given."""

    run: RunningUp
    ports: dict[str, int]

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.run.proc

    @property
    def data(self) -> Path:
        return self.run.data

    def output(self) -> str:
        return self.run.output()


@contextlib.contextmanager
def running_up(tmp_path: Path, prefix: str = "") -> Iterator[Up]:
    """``ubimesh up`` on MESH (after ``prefix``) with free ports (tests/support/up.py)."""
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
    text = prefix + MESH % {**ports, "app": APP, "filters": ""}
    with support_up(text, tmp_path, ports["api"], ports["xds"]) as run:
        yield Up(run, ports)


@pytest.mark.slow
def test_up_serves_applies_live_and_stops(tmp_path: Path) -> None:
    children: list[psutil.Process] = []
    with running_up(tmp_path) as up:
        ports, data, mesh = up.ports, up.data, tmp_path / "mesh.yaml"
        children = psutil.Process(up.proc.pid).children(recursive=True)
        assert len(children) >= 5  # control, 3 proxies, 2 apps (and their workers)

        sites = set()
        for _ in range(20):
            status, body = get(ports["gw"])
            assert status == 200, body
            sites.add(body["site"])
        assert sites == {"dc", "cloud"}

        # A change applied while requests flow: none fails, and the new route shows.
        changed = tmp_path / "changed.yaml"
        changed.write_text(MESH % {**ports, "app": APP, "filters": HEADER_FILTER})
        env = dict(os.environ, UBIMESH_SERVER=f"http://127.0.0.1:{ports['api']}",
                   UBIMESH_TOKEN_FILE=str(data / "admin-token"))
        applier = subprocess.Popen(
            [sys.executable, "-m", "ubimesh.cli.main", "apply", "-f", str(changed)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        failures, seen_change = [], False
        loop_deadline = time.monotonic() + 20
        for _ in range(2000):
            status, body = get(ports["gw"])
            if status != 200:
                failures.append(status)
            elif body["headers"].get("x-change") == "applied":  # type: ignore[union-attr]
                seen_change = True
                if applier.poll() is not None:
                    break
            if time.monotonic() > loop_deadline:
                break
        applied = applier.communicate(timeout=30)[0].decode()
        assert applier.returncode == 0, applied
        assert "httproute/edge -n default updated" in applied
        assert failures == []
        assert seen_change

        # The control plane dies: traffic goes on, `up` starts it again, changes flow again.
        control = json.loads((data / "control.json").read_text())
        os.kill(control["pid"], signal.SIGKILL)
        restarted_deadline = time.monotonic() + 30
        failures, restarted = [], False
        for _ in range(3000):
            status, _body = get(ports["gw"])
            if status != 200:
                failures.append(status)
            try:
                now = json.loads((data / "control.json").read_text())
            except (OSError, ValueError):
                now = control  # being rewritten
            if now["pid"] != control["pid"]:
                restarted = True
                break
            assert time.monotonic() < restarted_deadline, up.output()
        assert restarted and failures == []
        assert "starting the control plane again" in up.output()
        reverted = subprocess.run(
            [sys.executable, "-m", "ubimesh.cli.main", "apply", "-f", str(mesh)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30, check=False,
        )
        assert reverted.returncode == 0, reverted.stdout.decode()
        change_deadline = time.monotonic() + 15
        while True:
            status, body = get(ports["gw"])
            assert status == 200, body
            if "x-change" not in body["headers"]:  # type: ignore[operator]
                break
            assert time.monotonic() < change_deadline, "the restarted control plane's change"
            time.sleep(0.05)
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], f"children left running: {alive}"


def leaf_serial(up: Up, node: str) -> str:
    """The serial of the latest leaf the CA issued to ``node`` (``ubimesh certs status``)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{up.ports['api']}/api/v1/identity/status",
        headers={"Authorization": "Bearer " + (up.data / "admin-token").read_text().strip()},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        leaves = json.loads(answer.read())["leaves"]
    (serial,) = [leaf["serial"] for leaf in leaves if leaf.get("node") == node]
    return str(serial)


@pytest.mark.slow
def test_up_mesh_is_mtls_on_every_hop_by_default_with_no_certificate_step(
    tmp_path: Path,
) -> None:
    """A mesh file that says nothing of mTLS is STRICT: `up` makes the CA and a join token per
    proxy; the gateway calls the sidecars over mTLS (the app sees the gateway's SPIFFE ID in
    x-forwarded-client-cert, never a client-supplied one), and a plaintext caller is refused
    by a sidecar. A sidecar killed outright is started again by `up` and serves mTLS again
    with no new token (its stored credential)."""
    with running_up(tmp_path) as up:
        ports, data = up.ports, up.data
        tokens = sorted(p.name for p in (data / "tokens").iterdir())
        assert tokens == ["edge.default.token", "web-cloud.default.token",
                          "web-dc.default.token"]
        assert all((data / "tokens" / t).stat().st_mode & 0o077 == 0 for t in tokens)

        forged = "By=spiffe://evil/x;URI=spiffe://cluster.local/ns/default/sa/admin"
        sites = set()
        for _ in range(20):
            status, body = get(ports["gw"], headers={"x-forwarded-client-cert": forged})
            assert status == 200, body
            sites.add(body["site"])
            xfcc = str(body["headers"]["x-forwarded-client-cert"])  # type: ignore[index]
            assert "URI=spiffe://cluster.local/ns/default/sa/edge" in xfcc, xfcc
            assert "evil" not in xfcc and "sa/admin" not in xfcc, xfcc
        assert sites == {"dc", "cloud"}

        # STRICT: a caller without a client certificate does not get through a sidecar
        with pytest.raises((OSError, http.client.HTTPException)):
            get(ports["in1"])


        # Kill the web-dc sidecar (and its workers): `up` starts it again, with its identity.
        first_serial = leaf_serial(up, "web-dc.default")
        (sidecar,) = [
            p for p in psutil.Process(up.proc.pid).children()
            if "web-dc.default.yaml" in " ".join(p.cmdline())
        ]
        os.killpg(sidecar.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "starting proxy web-dc.default again" not in up.output():
            assert time.monotonic() < deadline, up.output()
            time.sleep(0.1)
        seen: set[object] = set()
        while "dc" not in seen:  # the gateway reaches the restarted sidecar over mTLS
            assert time.monotonic() < deadline, up.output()
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, body = get(ports["gw"])
                if status == 200:
                    seen.add(body["site"])
            time.sleep(0.1)
        # Its token was used at the first start: the restarted sidecar renewed with its
        # stored credential (a new leaf for the same node).
        assert (data / "xds-cache" / "web-dc.default" / "identity" / "svid.json").is_file()
        assert leaf_serial(up, "web-dc.default") != first_serial
