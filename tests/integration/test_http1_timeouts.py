"""Timeouts and upstream failures, as Envoy reports them.

Module proxy:

* ``main``: ``/silent`` goes to an upstream that never answers (route timeout 0.5 s),
  ``/closed`` to a port nobody listens on, ``/empty`` to a cluster without endpoints, the rest
  to a :class:`ScriptedUpstream` (``/truncate`` dies in the middle of a body);
* ``idle``: HCM ``common_http_protocol_options.idle_timeout: 0.5s``;
* ``headers``: HCM ``request_headers_timeout: 0.5s``.
"""

from __future__ import annotations

import select
import time
from typing import Any

import pytest
from tests.support.http_client import Response, build_request
from tests.support.procs import free_ports
from tests.support.upstreams import ScriptedUpstream, SilentUpstream

HOST = ("Host", "timeouts.test")


def _header(resp: Response, name: str) -> str | None:
    for n, v in resp.headers:
        if n.lower() == name.lower():
            return v
    return None




@pytest.fixture(scope="module")
def proxy(module_proxy_factory: Any, silent: SilentUpstream, scripted: ScriptedUpstream) -> Any:
    (closed_port,) = free_ports(1)  # free a moment ago, and nobody listens on it
    b = module_proxy_factory.bootstrap()
    b.add_cluster("silent", [silent.port])
    b.add_cluster("closed", [closed_port], connect_timeout="1s")
    b.add_cluster("empty", [])
    b.add_cluster("scripted", [scripted.port])
    routes = [
        {"match": {"prefix": "/silent"}, "route": {"cluster": "silent", "timeout": "0.5s"}},
        {"match": {"prefix": "/closed"}, "route": {"cluster": "closed"}},
        {"match": {"prefix": "/empty"}, "route": {"cluster": "empty"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "scripted"}},
    ]
    b.add_listener("main", routes=routes)
    b.add_listener("idle", routes=routes, common_http_protocol_options={"idle_timeout": "0.5s"})
    b.add_listener("headers", routes=routes, request_headers_timeout="0.5s")
    return module_proxy_factory.start(b)


def test_route_timeout_gives_504(proxy: Any, silent: SilentUpstream, connect: Any) -> None:
    before = len(silent.requests)
    started = time.monotonic()
    resp = connect(proxy.port()).request("GET", "/silent/route-timeout", [HOST], timeout=10)
    elapsed = time.monotonic() - started
    assert resp.status == 504, resp
    assert resp.body == b"upstream request timeout", resp.body
    assert 0.4 <= elapsed < 3.0, f"504 after {elapsed:.2f} s with a 0.5 s route timeout"
    assert len(silent.wait_requests(before + 1)) == before + 1, "the upstream never got it"


def test_connect_failure_gives_503(proxy: Any, connect: Any) -> None:
    resp = connect(proxy.port()).request("GET", "/closed/connect-failure", [HOST], timeout=10)
    assert resp.status == 503, resp
    assert resp.body.startswith(b"upstream connect error or disconnect/reset before headers"), (
        resp.body
    )


def test_no_healthy_upstream_gives_503(proxy: Any, connect: Any) -> None:
    resp = connect(proxy.port()).request("GET", "/empty/nothing", [HOST], timeout=10)
    assert resp.status == 503, resp
    assert resp.body == b"no healthy upstream", resp.body


@pytest.mark.parametrize(
    ("after_request", "limit"), [(False, 2.5), (True, 8.0)], ids=["no-request", "after-a-request"]
)
def test_idle_timeout_closes_an_idle_connection(
    proxy: Any, connect: Any, after_request: bool, limit: float
) -> None:
    """A connection that never carried a request is closed when idle_timeout (0.5 s) fires.

    Once a request has been served, Envoy 1.40 does not close at once: the idle timeout starts
    a drain (drain_timeout, default 5 s) and then a delayed close (1 s), so the connection ends
    about 6.5 s later, without a byte sent.  Any close from 0.5 s to 8 s passes.
    """
    conn = connect(proxy.port("idle"))
    if after_request:
        resp = conn.request("GET", "/idle", [HOST])
        assert resp.status == 200, resp
    started = time.monotonic()
    how, rest = conn.wait_closed(limit)
    elapsed = time.monotonic() - started
    assert how in ("eof", "reset"), (
        f"an idle connection stayed open {limit} s with idle_timeout 0.5 s"
    )
    assert rest == b"", f"bytes sent on idle close: {rest!r}"
    assert elapsed >= 0.4, f"closed after {elapsed:.2f} s, before the 0.5 s idle timeout"


def test_idle_timeout_spares_a_busy_connection(proxy: Any, connect: Any) -> None:
    """Requests every 0.2 s keep the connection open well past the 0.5 s idle timeout."""
    conn = connect(proxy.port("idle"))
    for i in range(8):
        resp = conn.request("GET", f"/busy/{i}", [HOST])
        assert resp.status == 200 and resp.error is None, (i, resp)
        time.sleep(0.2)


def test_request_headers_timeout_closes_a_slow_client(proxy: Any, connect: Any) -> None:
    """Headers trickle in, one line every 0.2 s: 0.5 s after the first byte Envoy answers
    ``408`` ``request header timeout`` with ``connection: close`` and closes."""
    conn = connect(proxy.port("headers"))
    started = time.monotonic()
    conn.send(b"GET /slow-headers HTTP/1.1\r\nHost: timeouts.test\r\n")
    answered_at = None
    for i in range(15):  # one more header line every 0.2 s, for at most 3 s
        readable, _, _ = select.select([conn.sock], [], [], 0.2)
        if readable:
            answered_at = time.monotonic() - started
            break
        try:
            conn.send(f"x-slow-{i}: {i}\r\n".encode())
        except OSError:
            break
    assert answered_at is not None, "no answer 3 s after the first header byte (timeout 0.5 s)"
    assert 0.4 <= answered_at <= 2.0, f"answered {answered_at:.2f} s after the first byte"
    resp = conn.read_response("GET", timeout=3)
    assert resp.status == 408, resp
    assert resp.body == b"request header timeout", resp.body
    assert (_header(resp, "connection") or "").lower() == "close", resp.headers
    how, rest = conn.wait_closed(3)
    assert how in ("eof", "reset"), "connection left open after the 408"
    assert rest == b"", rest


def test_request_headers_timeout_spares_a_prompt_client(proxy: Any, connect: Any) -> None:
    resp = connect(proxy.port("headers")).request("GET", "/prompt", [HOST])
    assert resp.status == 200, resp


def test_upstream_closing_mid_body_resets_the_downstream(
    proxy: Any, scripted: ScriptedUpstream, connect: Any
) -> None:
    conn = connect(proxy.port())
    conn.send(build_request("GET", "/truncate", [HOST]))
    head = conn.read_head(timeout=5)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert f"content-length: {ScriptedUpstream.TRUNCATE_DECLARED}".encode() in head.lower(), head
    started = time.monotonic()
    how, body = conn.wait_closed(5)
    elapsed = time.monotonic() - started
    assert how in ("eof", "reset"), (
        f"the downstream connection hangs after the upstream died mid-body ({len(body)} bytes)"
    )
    assert len(body) == ScriptedUpstream.TRUNCATE_SENT, len(body)
    assert elapsed < 3.0, f"the downstream connection ended only after {elapsed:.1f} s"


def test_trailing_whitespace_of_a_padded_response_header_value_is_dropped(
    proxy: Any, connect: Any
) -> None:
    """RFC 9110 5.5, and Envoy: OWS around a field value is not part of it (raw bytes: the
    test client's parser would strip it on its own)."""
    conn = connect(proxy.port())
    conn.send(build_request("GET", "/padded", [HOST]))
    head = conn.read_head(timeout=5)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"\r\nx-padded: value\r\n" in head, head
