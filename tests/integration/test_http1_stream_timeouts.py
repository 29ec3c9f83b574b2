"""request_timeout, stream_idle_timeout and the route's idle_timeout, as Envoy applies them.

* ``idle``: HCM ``stream_idle_timeout: 0.5s``; the route timeout is off, so only the stream
  idle timeout can end a request to an upstream that never answers;
* ``slowbody``: HCM ``request_timeout: 0.5s``: a request whose body never finishes;
* ``routeidle``: HCM defaults (5 min), but the route sets ``idle_timeout: 0.5s``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from tests.support.http_client import build_request
from tests.support.upstreams import SilentUpstream

HOST = ("Host", "stream-timeouts.test")



@pytest.fixture(scope="module")
def proxy(module_proxy_factory: Any, silent: SilentUpstream) -> Any:
    b = module_proxy_factory.bootstrap()
    b.add_cluster("silent", [silent.port])
    no_route_timeout = [{"match": {"prefix": "/"}, "route": {"cluster": "silent", "timeout": "0s"}}]
    b.add_listener("idle", routes=no_route_timeout, stream_idle_timeout="0.5s")
    b.add_listener("slowbody", routes=no_route_timeout, request_timeout="0.5s")
    route_idle = [
        {
            "match": {"prefix": "/"},
            "route": {"cluster": "silent", "timeout": "0s", "idle_timeout": "0.5s"},
        }
    ]
    b.add_listener("routeidle", routes=route_idle)
    return module_proxy_factory.start(b)


@pytest.mark.parametrize("listener", ["idle", "routeidle"])
def test_stream_idle_timeout_gives_408(proxy: Any, connect: Any, listener: str) -> None:
    started = time.monotonic()
    resp = connect(proxy.port(listener)).request("GET", "/never", [HOST], timeout=10)
    elapsed = time.monotonic() - started
    assert resp.status == 408, resp
    assert resp.body == b"stream timeout", resp.body
    assert 0.4 <= elapsed < 3.0, f"408 after {elapsed:.2f} s with a 0.5 s idle timeout"


def test_request_timeout_gives_408_for_an_unfinished_body(proxy: Any, connect: Any) -> None:
    conn = connect(proxy.port("slowbody"))
    started = time.monotonic()
    conn.send(build_request("POST", "/upload", [HOST, ("Content-Length", "100")]) + b"abc")
    resp = conn.read_response("POST", timeout=10)
    elapsed = time.monotonic() - started
    assert resp.status == 408, resp
    assert resp.body == b"request timeout", resp.body
    assert 0.4 <= elapsed < 3.0, f"408 after {elapsed:.2f} s with a 0.5 s request timeout"
