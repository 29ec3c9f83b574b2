"""The control plane's HTTP API, against a real ``ubimesh control`` process (SQLite, port 0)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

SERVICE = """\
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: ledger, namespace: payments}
spec:
  ports: [{name: http, port: %d, protocol: http}]
"""
WORKLOAD = """\
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: ledger-1, namespace: payments}
spec: {service: ledger, address: 127.0.0.1, ports: {http: 18999}}
"""


class Control:
    """A ``ubimesh control`` child; ``call`` speaks to its API."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.log = open(data_dir / "control.out", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ubimesh.cli.main", "control", "--data-dir", str(data_dir),
             "--api-address", "127.0.0.1:0", "--xds-address", "127.0.0.1:0", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        addresses = data_dir / "control.json"
        while not addresses.exists():
            assert self.proc.poll() is None, (data_dir / "control.out").read_text()
            assert time.monotonic() < deadline, "ubimesh control did not start in 20 s"
            time.sleep(0.05)
        info = json.loads(addresses.read_text())
        self.api: str = info["api"]
        self.xds: str = info["xds"]
        self.token = (data_dir / "admin-token").read_text().strip()

    def call(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        *,
        token: str | None = None,
        content_type: str = "application/yaml",
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        data = body.encode() if isinstance(body, str) else body
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.api + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self.log.close()


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    plane = Control(tmp_path)
    yield plane
    assert plane.stop() == 0, (tmp_path / "control.out").read_text()


def test_token_is_required_and_created_0600(control: Control) -> None:
    mode = (control.data_dir / "admin-token").stat().st_mode & 0o777
    assert mode == 0o600
    assert control.token in (control.data_dir / "control.out").read_text()
    assert control.call("GET", "/api/v1/resources/services", token="")[0] == 401
    status, body = control.call("GET", "/api/v1/resources/services", token="x" + control.token)
    assert status == 401 and "token" in body["error"]
    with urllib.request.urlopen(control.api + "/healthz", timeout=5) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_apply_get_list_delete(control: Control) -> None:
    status, body = control.call("POST", "/api/v1/apply", SERVICE % 80 + "---\n" + WORKLOAD)
    assert status == 200, body
    assert [r["action"] for r in body["results"]] == ["created", "created"]
    status, body = control.call("POST", "/api/v1/apply", SERVICE % 80)
    assert body["results"][0]["action"] == "unchanged"
    status, body = control.call("POST", "/api/v1/apply", SERVICE % 81)
    assert body["results"][0]["action"] == "updated"

    status, svc = control.call("GET", "/api/v1/resources/svc/payments/ledger")
    assert status == 200 and svc["spec"]["ports"][0]["port"] == 81
    assert svc["metadata"]["resourceVersion"]
    status, listed = control.call("GET", "/api/v1/resources/workloads?namespace=payments")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["ledger-1"]
    assert control.call("GET", "/api/v1/resources/workloads?namespace=other")[1]["items"] == []
    status, body = control.call("GET", "/api/v1/resources/gadgets")
    assert status == 404 and "gadgets" in body["error"]

    # The service still has a workload: deleting it alone would leave a dangling reference.
    status, body = control.call("DELETE", "/api/v1/resources/service/payments/ledger")
    assert status == 400
    assert any(d["field"] == "spec.service" for d in body["details"]), body
    status, body = control.call(
        "POST", "/api/v1/delete",
        json.dumps({"keys": [{"kind": "Workload", "namespace": "payments", "name": "ledger-1"},
                             {"kind": "Service", "namespace": "payments", "name": "ledger"}]}),
        content_type="application/json",
    )
    assert status == 200 and len(body["deleted"]) == 2, body
    assert control.call("GET", "/api/v1/resources/service/payments/ledger")[0] == 404
    assert control.call("DELETE", "/api/v1/resources/service/payments/ledger")[0] == 404


def test_dry_run_and_diff_change_nothing(control: Control) -> None:
    status, body = control.call("POST", "/api/v1/apply?dryRun=true", SERVICE % 80)
    assert status == 200 and body["dryRun"] and body["results"][0]["action"] == "created"
    assert control.call("GET", "/api/v1/resources/service/payments/ledger")[0] == 404
    control.call("POST", "/api/v1/apply", SERVICE % 80)
    status, body = control.call("POST", "/api/v1/diff", SERVICE % 8080)
    assert status == 200 and body["changed"] is True
    diff = body["results"][0]["diff"]
    assert "-    port: 80\n" in diff and "+    port: 8080\n" in diff, diff
    status, body = control.call("POST", "/api/v1/diff", SERVICE % 80)
    assert body["changed"] is False and body["results"][0]["diff"] == ""
    assert control.call("GET", "/api/v1/resources/service/payments/ledger")[1]["spec"][
        "ports"][0]["port"] == 80


def test_resource_version_conflict_is_409(control: Control) -> None:
    control.call("POST", "/api/v1/apply", SERVICE % 80)
    stored = control.call("GET", "/api/v1/resources/service/payments/ledger")[1]
    version = stored["metadata"]["resourceVersion"]
    stored["spec"]["ports"][0]["port"] = 81
    status, body = control.call("POST", "/api/v1/apply", yaml.safe_dump(stored))
    assert status == 200, body
    stored["spec"]["ports"][0]["port"] = 82  # still carries the old version
    status, body = control.call("POST", "/api/v1/apply", yaml.safe_dump(stored))
    assert status == 409 and version in body["error"], body
    assert control.call("GET", "/api/v1/resources/service/payments/ledger")[1]["spec"][
        "ports"][0]["port"] == 81


def test_validation_errors_name_the_field(control: Control) -> None:
    bad = SERVICE.replace("protocol: http", "protocol: grpc") % 80
    status, body = control.call("POST", "/api/v1/apply?source=mesh.yaml", bad)
    assert status == 400
    (detail,) = body["details"]
    assert detail["field"] == "spec.ports[0].protocol"
    assert detail["value"] == "grpc"
    assert detail["resource"] == "Service payments/ledger"
    assert detail["source"].startswith("mesh.yaml")
    assert "http" in detail["expected"]
    # A cross-reference: the workload's service does not exist.
    status, body = control.call("POST", "/api/v1/apply", WORKLOAD)
    assert status == 400 and body["details"][0]["field"] == "spec.service", body
    assert control.call("GET", "/api/v1/resources/workloads")[1]["items"] == []


def test_body_size_is_bounded(control: Control) -> None:
    huge = "# " + "x" * (9 * 1024 * 1024) + "\n" + SERVICE % 80
    status, body = control.call("POST", "/api/v1/apply", huge)
    assert status == 413 and "error" in body


def test_watch_streams_events(control: Control) -> None:
    lines: list[dict[str, Any]] = []
    request = urllib.request.Request(
        control.api + "/api/v1/watch?kind=svc",
        headers={"Authorization": f"Bearer {control.token}"},
    )

    def read() -> None:
        with urllib.request.urlopen(request, timeout=10) as response:
            for raw in response:
                lines.append(json.loads(raw))
                if len(lines) >= 2:
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.3)  # let the watch be established
    control.call("POST", "/api/v1/apply", SERVICE % 80 + "---\n" + WORKLOAD)
    control.call("POST", "/api/v1/delete", json.dumps({"keys": [
        {"kind": "Workload", "namespace": "payments", "name": "ledger-1"},
        {"kind": "Service", "namespace": "payments", "name": "ledger"}]}),
        content_type="application/json")
    reader.join(10)
    assert [(e["type"], e["resource"]["kind"]) for e in lines] == [
        ("PUT", "Service"), ("DELETE", "Service")
    ], lines
    assert lines[1]["revision"] > lines[0]["revision"]
