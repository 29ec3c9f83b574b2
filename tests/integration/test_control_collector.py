"""The trace collector inside ``ubimesh control`` (docs/telemetry.md, "Tracing in a ubimesh
mesh"; docs/control-plane.md):

- a real Envoy gateway configured over ADS by the control plane sends its spans to the
  control plane's collector (compiled HCM ``tracing``, cluster ``ubimesh-collector``), found
  through the Zipkin query API (which wants the admin token) and through ``ubimesh traces`` /
  ``ubimesh trace``; the trace id is the one the upstream received in ``x-b3-traceid``;
- shutdown writes the spans still queued;
- ``--collector-address`` (own listener, ``--collector-open-query``) and ``--no-collector``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.control import ControlReplica, start_control, wait_for
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import envoy_binary, free_ports, launch_envoy, wait_ready

from ubimesh.control.bootstrap import build_bootstrap, parse_address

MESH = """\
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
kind: Workload
metadata: {name: web-1}
spec: {service: web, address: 127.0.0.1, ports: {http: %(echo)d}}
"""
#: Envoy's Zipkin reporter sends when 5 spans are buffered (else every 5 s).
REQUESTS = 5


def get(url: str, token: str = "") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=10
        ) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def post_spans(url: str, spans: list[dict[str, Any]]) -> int:
    request = urllib.request.Request(
        url + "/api/v2/spans", json.dumps(spans).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def collector_of(control: ControlReplica) -> str:
    return str(json.loads((control.data_dir / "control.json").read_text())["collector"])


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UBIMESH_")}
    env.update(COLUMNS="100", NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "ubimesh.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlReplica]:
    replica = start_control(tmp_path)
    try:
        yield replica
    finally:
        replica.stop()


@pytest.mark.envoy
@pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary on PATH")
def test_envoy_gateway_reports_to_the_control_planes_collector(
    control: ControlReplica, tmp_path: Path
) -> None:
    collector = collector_of(control)
    assert collector == control.api  # mounted on the API's listener by default
    pool = EchoServerPool()
    gw, admin = free_ports(2)
    envoy = None
    try:
        control.apply(MESH % {"gw": gw, "echo": pool.port("web")})
        bootstrap = build_bootstrap(
            node_id="edge.default",
            role="gateway",
            admin_port=admin,
            xds=[parse_address(control.xds)],
            cluster="edge.default",
        )
        config = tmp_path / "envoy.yaml"
        config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        envoy = launch_envoy(config, tmp_path)
        wait_ready(envoy, admin, [gw], 30.0)
        cursor = pool.cursor()
        for i in range(REQUESTS):
            with urllib.request.urlopen(f"http://127.0.0.1:{gw}/hello/{i}", timeout=10) as r:
                assert r.status == 200
        trace_ids = {
            value
            for record in pool.records_since(cursor)
            for name, value in record.headers
            if name.lower() == "x-b3-traceid"
        }
        assert len(trace_ids) == REQUESTS  # Envoy started one trace per request
        query = f"{collector}/api/v2/traces?serviceName=edge.default&limit=50"
        status, body = get(query)
        assert status == 401, body  # the query API is the admin's

        def all_reported() -> bool:
            status, traces = get(query, control.token)
            assert status == 200, traces
            return {t[0]["traceId"] for t in traces} >= trace_ids

        wait_for("Envoy's spans in the collector", all_reported, timeout=15)
        _, traces = get(query, control.token)
        spans = [s for t in traces for s in t if s["traceId"] in trace_ids]
        assert len(spans) == REQUESTS
        for span in spans:
            assert len(span["traceId"]) == 32  # trace_id_128bit
            assert span["kind"] == "SERVER"
            assert span["localEndpoint"]["serviceName"] == "edge.default"
            assert span["tags"]["http.status_code"] == "200"
            assert span["tags"]["upstream_cluster"] == "outbound|80||web.default"
        trace_id = sorted(trace_ids)[0]
        token_file = control.data_dir / "admin-token"
        done = cli(
            "traces",
            "--collector",
            collector,
            "--token-file",
            str(token_file),
            "--service",
            "edge.default",
            "--limit",
            "50",
        )
        assert done.returncode == 0, done.stderr
        assert trace_id in done.stdout and "edge.default:" in done.stdout
        done = cli("trace", trace_id, "--collector", collector, "--token-file", str(token_file))
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[1].startswith("edge.default ")
        done = cli("trace", trace_id, "--collector", collector)  # no token
        assert done.returncode == 1 and "wants the admin token" in done.stderr
    finally:
        if envoy is not None:
            envoy.stop()
        pool.close()


def test_shutdown_writes_queued_spans_and_the_collector_flags(tmp_path: Path) -> None:
    # default: on the API's listener; stopping right after ingest keeps every span
    control = start_control(tmp_path, "plain")
    now = int(time.time() * 1e6)
    spans = [
        {
            "traceId": f"{i + 1:032x}",
            "id": f"{i + 1:016x}",
            "name": "op",
            "timestamp": now,
            "duration": 10,
            "localEndpoint": {"serviceName": "batch"},
        }
        for i in range(200)
    ]
    assert post_spans(collector_of(control), spans) == 202  # no token needed to ingest
    assert control.stop() == 0
    with sqlite3.connect(control.data_dir / "collector" / "spans.db") as db:
        assert db.execute("SELECT count(*) FROM spans").fetchone()[0] == len(spans)

    # its own listener, queries open; the API does not serve it then
    control = start_control(
        tmp_path,
        "own",
        extra=[
            "--collector-address",
            "127.0.0.1:0",
            "--collector-open-query",
            "--collector-retention",
            "1h",
        ],
    )
    try:
        collector = collector_of(control)
        assert collector.startswith("http://127.0.0.1:") and collector != control.api
        assert post_spans(collector, spans[:1]) == 202
        wait_for("one span", lambda: get(collector + "/health")[1]["spans"] == 1, timeout=10)
        assert get(collector + "/api/v2/services") == (200, ["batch"])
        status, _ = get(control.api + "/api/v2/services", control.token)
        assert status == 404
    finally:
        control.stop()

    control = start_control(tmp_path, "off", extra=["--no-collector"])
    try:
        assert collector_of(control) == ""
        status, _ = get(control.api + "/api/v2/services", control.token)
        assert status == 404
    finally:
        control.stop()
    done = cli("control", "--collector-retention", "soon")
    assert done.returncode == 2 and "--collector-retention: 'soon' is not a duration" in (
        done.stderr
    )
