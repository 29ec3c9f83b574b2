"""The fault proxy as a process: its CLI, its HTTP control API and client, in front of the HTTP
echo upstream run as a process that the tests also pause (SIGSTOP), resume and kill."""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path

import pytest
from tests.support.faults import start_echo_process, start_faultproxy_process

from ubimesh.testing.faultproxy import ControlError, FaultProxyThread

LOOPBACK = "127.0.0.1"


def get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_cli_and_http_control_api(tmp_path: Path) -> None:
    echo, echo_port = start_echo_process(tmp_path, name="echo-a")
    try:
        proc, port, client = start_faultproxy_process((LOOPBACK, echo_port), tmp_path)
        try:
            status, headers, body = get(port, "/first")
            assert status == 200 and headers["x-echo-upstream"] == "echo-a"
            assert json.loads(body)["target"] == "/first"

            toxic = client.add_toxic("latency", latency=200)
            assert toxic == {
                "name": "latency_downstream",
                "type": "latency",
                "stream": "downstream",
                "toxicity": 1.0,
                "attributes": {"latency": 200, "jitter": 0},
            }
            start = time.monotonic()
            assert get(port)[0] == 200
            assert 0.2 <= time.monotonic() - start < 0.5

            assert client.update_toxic("latency_downstream", jitter=5)["attributes"] == {
                "latency": 200,
                "jitter": 5,
            }
            with pytest.raises(ControlError) as info:
                client.add_toxic("latency", latency=1)  # same default name
            assert info.value.status == 409
            with pytest.raises(ControlError) as info:
                client.request("POST", "/toxics", {"type": "slicer"})
            assert info.value.status == 400 and "average_size" in info.value.message
            with pytest.raises(ControlError) as info:
                client.request("GET", "/nowhere")
            assert info.value.status == 404

            state = client.state()
            assert state["listen"] == f"{LOOPBACK}:{port}"
            assert state["upstream"] == f"{LOOPBACK}:{echo_port}"
            assert [t["name"] for t in state["toxics"]] == ["latency_downstream"]

            client.reset()
            assert client.toxics() == []
            start = time.monotonic()
            assert get(port)[0] == 200
            assert time.monotonic() - start < 0.15

            client.disable()
            with pytest.raises(ConnectionRefusedError):
                get(port)
            client.enable()
            assert get(port)[0] == 200

            stats = client.stats()
            assert stats["connections_accepted"] == 4
            assert stats["bytes_upstream"] > 0 and stats["bytes_downstream"] > 0
        finally:
            assert proc.stop() == 0  # SIGTERM: a clean stop exits 0
    finally:
        echo.stop()


def test_paused_and_killed_upstream_process(tmp_path: Path) -> None:
    echo, echo_port = start_echo_process(tmp_path, name="echo-b")
    try:
        with FaultProxyThread() as runner:
            fp = runner.start_proxy((LOOPBACK, echo_port))
            assert get(fp.port)[0] == 200

            echo.pause()  # SIGSTOP: the kernel still accepts, nobody answers
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                get(fp.port, timeout=0.3)
            assert time.monotonic() - start < 1.0
            echo.resume()
            assert get(fp.port)[0] == 200

            echo.kill()  # SIGKILL: the port is closed, the fault proxy resets its client
            assert not echo.alive
            with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
                get(fp.port)
            assert fp.stats()["upstream_connect_failures"] == 1
            probe = socket.socket()
            probe.settimeout(1)
            with probe:
                assert probe.connect_ex((LOOPBACK, echo_port)) != 0
    finally:
        echo.stop()
