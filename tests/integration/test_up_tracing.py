"""``ubimesh up`` wires every proxy to the control plane's collector by default (issue 6,
Deliver 5): a request through the gateway to ``web``, which calls ``ledger`` through its
sidecar, is one whole trace there: the gateway's span at the root, then web's inbound
(SERVER) span, web's outbound (CLIENT) span and ledger's inbound (SERVER) span, each the child
of the one before, nested in time; and ``ubimesh trace`` draws it.

The applications forward the trace headers they receive (as any traced service must): a small
app written by the test, since examples/mesh/app.py does not.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tests.support.control import wait_for
from tests.support.procs import free_ports
from tests.support.up import running_up

pytestmark = [pytest.mark.slow]

APP = """\
import json, os, sys, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROPAGATE = ("traceparent", "tracestate", "x-request-id", "x-b3-traceid", "x-b3-spanid",
             "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3")
CALLS = os.environ.get("CALLS", "")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = {"service": os.environ["UBIMESH_SERVICE"]}
        if CALLS:
            headers = {k: v for k, v in self.headers.items() if k.lower() in PROPAGATE}
            headers["Host"] = CALLS
            request = urllib.request.Request(os.environ["UBIMESH_OUTBOUND"] + "/", headers=headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                body["upstream"] = json.loads(response.read())
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

MESH = """\
apiVersion: ubimesh.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {mtls: {mode: DISABLE}}
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
metadata: {name: web}
spec:
  parentRefs: [{name: edge}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {ports: [{name: http, port: 80, protocol: http}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: ledger}
spec: {ports: [{name: http, port: 80, protocol: http}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: web-1}
spec:
  service: web
  address: 127.0.0.1
  ports: {http: %(web_app)d}
  sidecar: {inboundPorts: {http: %(web_in)d}, outboundPort: %(web_out)d}
  command: [python, app.py]
  env: {CALLS: ledger.default}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: ledger-1}
spec:
  service: ledger
  address: 127.0.0.1
  ports: {http: %(ledger_app)d}
  sidecar: {inboundPorts: {http: %(ledger_in)d}}
  command: [python, app.py]
"""
PORTS = ("api", "xds", "gw", "web_app", "web_in", "web_out", "ledger_app", "ledger_in")


def get(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def test_a_request_through_the_gateway_is_one_whole_trace(tmp_path: Path) -> None:
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    (tmp_path / "app.py").write_text(APP)
    with running_up(MESH % ports, tmp_path, ports["api"], ports["xds"]) as up:
        control = json.loads((up.data / "control.json").read_text())
        collector = control["collector"]
        assert collector == control["api"]
        assert f"UBIMESH_COLLECTOR={collector}" in up.output()
        token = (up.data / "admin-token").read_text().strip()
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['gw']}/", timeout=10) as r:
            answer = json.loads(r.read())
        assert answer == {"service": "web", "upstream": {"service": "ledger"}}
        spans_of: dict[str, Any] = {}

        def whole_trace() -> bool:
            traces = get(f"{collector}/api/v2/traces?serviceName=ledger.default", token)
            if not traces:
                return False
            spans_of["trace"] = trace = get(
                f"{collector}/api/v2/trace/{traces[0][0]['traceId']}", token
            )
            return len(trace) >= 4

        wait_for("the whole trace in the collector", whole_trace, timeout=20)
        spans = spans_of["trace"]
        by_key = {(s["localEndpoint"]["serviceName"], s.get("kind")): s for s in spans}
        assert len(spans) == 4, json.dumps(spans, indent=1)
        edge = by_key[("edge.default", "SERVER")]
        web_in = by_key[("web.default", "SERVER")]
        web_out = by_key[("web.default", "CLIENT")]
        ledger = by_key[("ledger.default", "SERVER")]
        assert "parentId" not in edge  # the gateway started the trace
        chain = [edge, web_in, web_out, ledger]
        for parent, child in itertools.pairwise(chain):
            assert child["parentId"] == parent["id"], json.dumps(spans, indent=1)
            assert child["timestamp"] >= parent["timestamp"] - 1_000  # 1 ms clock slack
            assert (
                child["timestamp"] + child["duration"]
                <= parent["timestamp"] + parent["duration"] + 1_000
            )
        assert len({s["traceId"] for s in spans}) == 1 and len(spans[0]["traceId"]) == 32

        env = {k: v for k, v in os.environ.items() if not k.startswith("UBIMESH_")}
        env.update(
            COLUMNS="100",
            NO_COLOR="1",
            UBIMESH_COLLECTOR=collector,
            UBIMESH_TOKEN_FILE=str(up.data / "admin-token"),
        )
        done = subprocess.run(
            [sys.executable, "-m", "ubimesh.cli.main", "trace", edge["traceId"]],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        labels = [line.split("|")[0].rstrip() for line in done.stdout.splitlines()[1:]]
        assert [label.split()[0] for label in labels] == [
            "edge.default",
            "web.default",
            "web.default",
            "ledger.default",
        ]
        assert [len(label) - len(label.lstrip()) for label in labels] == [0, 2, 4, 6]
