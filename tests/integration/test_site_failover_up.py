"""Site failover in a ``ubimesh up`` mesh (issue 7, item 5 and its two-site scenario).

The edge gateway lives in site ``dc``; service ``web`` has two workloads in ``dc`` and one in
``cloud``. The control plane gives the gateway ``dc`` as priority 0 and ``cloud`` as priority 1,
with the mesh's default resilience (retries with previous hosts and previous priorities,
outlier detection), here with short ejection times. Under steady GETs:

1. all traffic stays in ``dc`` while it is healthy;
2. every ``dc`` application is killed: requests fail over to ``cloud`` with no failure seen by
   the client (the retries carry the requests in flight, outlier detection empties priority 0);
3. the applications come back: traffic returns to ``dc``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from tests.support.procs import free_ports
from tests.support.up import running_up

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "mesh" / "app.py"

MESH = """\
apiVersion: ubimesh.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  defaults:
    outlierDetection: {interval: 0.5s, baseEjectionTime: 1s}
---
apiVersion: ubimesh.io/v1alpha1
kind: Gateway
metadata:
  name: edge
  annotations: {ubimesh.io/site: dc}
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
%(workloads)s
---
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
"""

WORKLOAD = """\
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: %(name)s}
spec:
  service: web
  address: 127.0.0.1
  site: %(site)s
  ports: {http: %(app)d}
  sidecar: {inboundPorts: {http: %(inbound)d}, adminPort: %(admin)d}
  command: [python, %(script)s]
"""

WORKLOADS = (("web-dc-1", "dc"), ("web-dc-2", "dc"), ("web-cloud", "cloud"))


def get_site(port: int) -> tuple[int, str]:
    """Status and answering site of one GET to the gateway (0 and the error on failure)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
        site = json.loads(body).get("site", "") if resp.status == 200 else body.decode()[:200]
        return resp.status, site
    except (OSError, http.client.HTTPException) as exc:
        return 0, repr(exc)
    finally:
        conn.close()


def sites_until(port: int, seconds: float) -> list[tuple[int, str]]:
    """GETs back to back for ``seconds`` (at most 5,000)."""
    out = []
    deadline = time.monotonic() + seconds
    for _ in range(5000):
        if time.monotonic() >= deadline:
            break
        out.append(get_site(port))
    return out


def app_processes(up_pid: int, names: set[str]) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(up_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if str(APP) in " ".join(p.cmdline()) and p.environ().get("UBIMESH_WORKLOAD") in names:
                found.append(p)
    return found


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[int, int]]:
    names = ["gw", "gw_admin", "api", "xds"]
    allocated = free_ports(len(names) + 3 * len(WORKLOADS))
    ports = dict(zip(names, allocated, strict=False))
    extra = allocated[len(names) :]
    workloads = ""
    for i, (name, site) in enumerate(WORKLOADS):
        app, inbound, admin = extra[3 * i : 3 * i + 3]
        workloads += WORKLOAD % {
            "name": name,
            "site": site,
            "app": app,
            "inbound": inbound,
            "admin": admin,
            "script": APP,
        }
    text = MESH % {**ports, "workloads": workloads}
    with running_up(text, tmp_path, ports["api"], ports["xds"]) as up:
        yield up.proc.pid, ports["gw"]


@pytest.mark.slow
def test_site_failover_and_return(mesh: tuple[int, int], tmp_path: Path) -> None:
    up_pid, gw = mesh
    # 1. Healthy: priority 0 (dc) takes everything.
    healthy = sites_until(gw, 1.5)
    assert healthy and all(s == 200 for s, _ in healthy), healthy[:5]
    assert {site for _, site in healthy} == {"dc"}

    # 2. Site dc is lost: its applications are killed (their sidecars answer 503 UF).
    dc_apps = app_processes(up_pid, {"web-dc-1", "web-dc-2"})
    assert len(dc_apps) == 2
    saved = [(p.cmdline(), p.environ(), p.cwd()) for p in dc_apps]
    for p in dc_apps:
        p.kill()
    psutil.wait_procs(dc_apps, timeout=5)
    lost = sites_until(gw, 3.0)
    failed = [r for r in lost if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(lost)} GETs failed during failover: {failed[:3]}"
    assert {site for _, site in lost[-20:]} == {"cloud"}

    # 3. dc heals: its applications start again on their ports; traffic comes back to dc.
    restarted = []
    try:
        for i, (argv, env, cwd) in enumerate(saved):
            log = open(tmp_path / f"dc-app-{i}.log", "wb")  # noqa: SIM115 - closed below
            restarted.append(
                (subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=log), log)
            )
        back: list[tuple[int, str]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            back += sites_until(gw, 0.5)
            if back[-10:] and all(site == "dc" for _, site in back[-10:]):
                break
        failed = [r for r in back if r[0] != 200]
        assert not failed, f"{len(failed)} GETs failed while dc came back: {failed[:3]}"
        assert all(site == "dc" for _, site in back[-10:]), back[-10:]
    finally:
        for proc, log in restarted:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is None:
                proc.kill()
            log.close()
