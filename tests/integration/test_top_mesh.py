"""``ubimesh top`` on a real ``ubimesh up`` mesh: the control plane lists the proxies with
their admin addresses (from the bootstraps' node metadata), ``top`` scrapes the Istio metrics
the proxies serve and shows the service with the traffic's rate, success rate and latency.

The mesh: gateway ``edge`` -> service ``web`` (one workload, sidecar'd, STRICT mTLS). The app
answers ``/status/500`` with 500 and anything else with 200, after 20 ms. The test sends a
steady 25 requests per second through the gateway, one in five to ``/status/500``, while
``top`` measures: web's sidecar reports them as their destination.
"""

from __future__ import annotations

import http.client
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.support.procs import free_ports
from tests.support.up import running_up

pytestmark = [pytest.mark.slow]

APP = """\
import os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        time.sleep(0.02)
        status = 500 if self.path.startswith("/status/500") else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
server.daemon_threads = True
server.serve_forever()
"""

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
metadata: {name: web-1}
spec:
  service: web
  address: 127.0.0.1
  ports: {http: %(app)d}
  sidecar: {inboundPorts: {http: %(inbound)d}, adminPort: %(admin)d}
  command: [python, %(app_path)s]
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

PORT_NAMES = ["gw", "gw_admin", "app", "inbound", "admin", "api", "xds"]
RATE = 25.0  # requests per second
TOP_TIMEOUT_S = 20.0


class Traffic:
    """Requests through the gateway at a steady RATE, every fifth one to /status/500, until
    stopped (at most ``limit_s``); counts the answers."""

    def __init__(self, port: int, limit_s: float = 30.0) -> None:
        self.port = port
        self.limit_s = limit_s
        self.codes: list[int] = []
        self.times: list[float] = []  # when each answer came (monotonic)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def rate(self, start: float, end: float) -> float:
        """Answers per second between ``start`` and ``end`` (monotonic)."""
        return sum(1 for t in self.times if start <= t <= end) / (end - start)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        start = time.monotonic()
        for n in range(int(self.limit_s * RATE)):
            if self._stop.wait(max(0.0, start + n / RATE - time.monotonic())):
                break
            path = "/status/500" if n % 5 == 4 else "/"
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                self.codes.append(response.status)
                self.times.append(time.monotonic())
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.close()


def top(traffic: Traffic, *flags: str) -> dict[str, object]:
    """``ubimesh top --once --json --interval 1s`` with ``flags``: its one JSON document, in
    which web's row is checked against ``traffic``."""
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ubimesh.cli.main",
            "top",
            "--once",
            "--json",
            "--interval",
            "1s",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=TOP_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc: dict[str, object] = json.loads(done.stdout)
    check_web(doc, traffic.rate(start, time.monotonic()))
    assert traffic.errors == [], traffic.errors[:3]
    return doc


def check_web(doc: dict[str, object], sent_rate: float) -> None:
    services = {s["service"]: s for s in doc["services"]}  # type: ignore[attr-defined]
    web = [s for name, s in services.items() if name.split(".")[0] == "web"]
    assert len(web) == 1, (
        f"no destination-side istio_requests_total for web (the proxies' Istio metrics, "
        f"docs/telemetry.md ## Metrics): {doc}"
    )
    (row,) = web
    assert row["proxies"] == 1, row
    # The rate the answers came at while top ran (RATE, or less when each request takes
    # longer than 1 / RATE: they are sent one after another).
    assert sent_rate > 3, sent_rate
    assert sent_rate / 2 < row["rps"] < sent_rate * 1.5, (row, sent_rate)
    # One in five fails: among N >= 5 consecutive requests, 0.8 give or take one.
    assert 0.6 <= row["successRate"] <= 0.95, row
    # The app takes 20 ms; the destination proxy's duration includes it.
    assert 10 <= row["p50Ms"] <= 1000, row
    assert row["p50Ms"] <= row["p99Ms"] <= 10000, row


def test_top_shows_the_mesh_traffic_from_the_control_plane_and_from_one_admin(
    tmp_path: Path,
) -> None:
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
    app = tmp_path / "status_app.py"
    app.write_text(APP)
    mesh = MESH % {**ports, "app_path": app}
    with running_up(mesh, tmp_path, ports["api"], ports["xds"]) as up:
        api = f"http://127.0.0.1:{ports['api']}"
        with Traffic(ports["gw"]) as traffic, ThreadPoolExecutor(2) as pool:
            # The three runs at once (each starts after the traffic did).
            from_control = pool.submit(
                top, traffic, "--server", api, "--token-file", str(up.data / "admin-token")
            )
            # No control plane needed with an explicit admin URL.
            from_admin = pool.submit(top, traffic, "--proxy", f"http://127.0.0.1:{ports['admin']}")
            live_top(f"127.0.0.1:{ports['admin']}")
            doc = from_control.result(timeout=TOP_TIMEOUT_S)
            from_admin.result(timeout=TOP_TIMEOUT_S)
        proxies = {p["name"]: p for p in doc["proxies"]}  # type: ignore[attr-defined]
        assert set(proxies) == {"edge.default", "web-1.default"}, proxies
        assert proxies["web-1.default"]["url"] == (
            f"http://127.0.0.1:{ports['admin']}/stats/prometheus"
        )
        assert all(p["status"] == "ok" for p in proxies.values()), proxies


def live_top(admin: str) -> None:
    """Live, stdout not a terminal: plain tables one after another; Ctrl-C exits 0."""
    live = subprocess.Popen(
        [sys.executable, "-m", "ubimesh.cli.main", "top", "--interval", "300ms", "--proxy", admin],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout = live.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stdout:
            lines.put(line)

    # A thread, so that waiting for a line has a deadline.
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        tables = 0
        deadline = time.monotonic() + TOP_TIMEOUT_S
        while tables < 2:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            tables += line.startswith("SERVICE")
        live.send_signal(signal.SIGINT)
        assert live.wait(10) == 0, live.stderr.read() if live.stderr else ""
        reader.join(5)
        rest = "".join(lines.queue)
        err = live.stderr.read() if live.stderr else ""
        assert "Traceback" not in err and "\x1b[" not in rest, err
    finally:
        if live.poll() is None:
            live.kill()
            live.wait(5)
