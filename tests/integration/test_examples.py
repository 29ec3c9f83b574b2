"""The README's main job: the example edge bootstrap loads in ubimesh and in Envoy, and the
demo serves the routes it prints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tests.support.procs import port_accepts

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "examples" / "edge" / "bootstrap.yaml"


def test_example_bootstrap_validates_in_ubimesh() -> None:
    ubimesh = shutil.which("ubimesh")
    assert ubimesh is not None
    proc = subprocess.run(
        [ubimesh, "proxy", "-c", str(BOOTSTRAP), "--mode", "validate"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


@pytest.mark.envoy
def test_example_bootstrap_validates_in_envoy() -> None:
    envoy = shutil.which("envoy")
    if envoy is None:
        pytest.skip("no envoy binary")
    proc = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(BOOTSTRAP)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


@pytest.mark.skipif(
    any(port_accepts(p) for p in (10000, 9901, 18081, 18082, 18083, 18084, 18085)),
    reason="the demo's fixed ports are in use on this machine",
)
def test_demo_serves_what_it_prints() -> None:
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--seconds", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_accepts(10000) and time.monotonic() < deadline:
            assert demo.poll() is None, demo.stdout.read() if demo.stdout else ""
            time.sleep(0.1)
        status, _, body = _get("http://127.0.0.1:10000/")
        assert status == 200 and json.loads(body)["service"] == "web-dc"
        status, _, body = _get("http://127.0.0.1:10000/static/app.js")
        assert json.loads(body)["service"] == "web-cloud"
        assert json.loads(body)["path"] == "/assets/app.js"
        status, _, body = _get("http://127.0.0.1:10000/api/orders")
        assert json.loads(body)["service"] in ("api-v1", "api-v2-canary")
        status, headers, _ = _get("http://127.0.0.1:10000/old/logo.png")
        assert status == 308
        assert headers["location"] == "http://127.0.0.1:10000/static/logo.png"
        status, headers, body = _get("http://127.0.0.1:10000/healthz")
        assert (status, body) == (200, b"ok\n")
        assert headers["x-served-by"] == "ubimesh-edge"
    finally:
        demo.terminate()
        try:
            demo.wait(timeout=15)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait(timeout=5)
