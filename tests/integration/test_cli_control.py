"""``ubimesh apply/get/delete/diff/bootstrap`` against a real ``ubimesh control`` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MESH = ROOT / "examples" / "mesh" / "mesh.yaml"


def ubimesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ubimesh.cli.main", *args], capture_output=True, text=True,
        timeout=60, env=env, check=False,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A control plane; yields the environment that points the CLI at it."""
    out = open(tmp_path / "control.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ubimesh.cli.main", "control", "--data-dir", str(tmp_path),
         "--api-address", "127.0.0.1:0", "--xds-address", "127.0.0.1:0"],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "control.json").exists():
            assert proc.poll() is None, (tmp_path / "control.out").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        api = json.loads((tmp_path / "control.json").read_text())["api"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("UBIMESH_")}
        env.update(UBIMESH_SERVER=api, UBIMESH_TOKEN_FILE=str(tmp_path / "admin-token"))
        yield env
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        out.close()


def test_apply_get_diff_delete(server: dict[str, str], tmp_path: Path) -> None:
    done = ubimesh("apply", "-f", str(MESH), env=server)
    assert done.returncode == 0, done.stderr
    assert "service/web -n default created" in done.stdout
    assert "httproute/edge-routes -n default created" in done.stdout

    table = ubimesh("get", "workloads", env=server)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "NAMESPACE", "SERVICE", "ADDRESS", "SITE"]
    assert {r.split()[0] for r in rows} == {"web-dc", "web-cloud", "ledger-v1", "ledger-v2"}
    one = ubimesh("get", "svc", "web", "-o", "json", env=server)
    assert json.loads(one.stdout)["spec"]["ports"][0]["port"] == 80
    assert ubimesh("get", "svc", "nope", env=server).returncode == 1

    assert ubimesh("diff", "-f", str(MESH), env=server).returncode == 0
    changed = tmp_path / "changed.yaml"
    changed.write_text(MESH.read_text().replace("weight: 90", "weight: 50"))
    diff = ubimesh("diff", "-f", str(changed), env=server)
    assert diff.returncode == 1
    assert "-  - service: ledger-v1\n-    weight: 90" in diff.stdout or "weight: 90" in diff.stdout
    assert "+    weight: 50" in diff.stdout, diff.stdout

    dry = ubimesh("apply", "-f", str(changed), "--dry-run", env=server)
    assert "trafficsplit/ledger-canary -n default updated (dry run)" in dry.stdout
    assert ubimesh("diff", "-f", str(changed), env=server).returncode == 1  # still not applied

    gone = ubimesh("delete", "-f", str(MESH), env=server)
    assert gone.returncode == 0, gone.stderr
    assert ubimesh("get", "svc", "-o", "yaml", env=server).stdout == ""


def test_errors_exit_1_one_per_line(server: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MESH.read_text().replace("protocol: http}", "protocol: grpc}"))
    done = ubimesh("apply", "-f", str(bad), env=server)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4, done.stderr  # four services, each one error
    assert all("spec.ports[0].protocol" in line and "bad.yaml#" in line for line in lines)
    assert ubimesh("get", "svc", "-o", "json", env=server).stdout.count('"name"') == 0

    wrong = dict(server, UBIMESH_TOKEN="wrong")
    wrong.pop("UBIMESH_TOKEN_FILE")
    denied = ubimesh("get", "svc", env=wrong)
    assert denied.returncode == 1 and "token" in denied.stderr
    assert ubimesh("delete", "svc", env=server).returncode == 2
    assert ubimesh("get", env=server).returncode == 2


def test_local_dry_run_needs_no_server(tmp_path: Path) -> None:
    env = dict(os.environ, UBIMESH_SERVER="http://127.0.0.1:9")
    ok = ubimesh("apply", "-f", str(MESH), "--dry-run", "--local", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "workload/web-dc -n default valid (dry run, local)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(MESH.read_text().replace("service: web\n", "service: webb\n"))
    refused = ubimesh("apply", "-f", str(bad), "--dry-run", "--local", env=env)
    assert refused.returncode == 1
    assert refused.stderr.count("spec.service") == 2, refused.stderr
    unreachable = ubimesh("apply", "-f", str(MESH), env=env)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_bootstrap_is_a_valid_envoy_bootstrap(tmp_path: Path) -> None:
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
    from google.protobuf import json_format

    out = tmp_path / "b.yaml"
    done = ubimesh("bootstrap", "--node", "web-dc.default", "--xds", "127.0.0.1:15010",
                   "--admin-port", "9901", "--workload", "{service: web, address: 127.0.0.1}",
                   "-o", str(out))
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load(out.read_text())
    message = json_format.ParseDict(data, bootstrap_pb2.Bootstrap())
    assert message.node.id == "web-dc.default"
    assert message.node.metadata["ubimesh.workload"]["service"] == "web"
    assert message.dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name == (
        "ubimesh-xds"
    )
    assert ubimesh("bootstrap", "--node", "nodots").returncode == 2
