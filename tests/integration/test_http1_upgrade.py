"""HTTP/1.1 Upgrade (WebSocket) through the proxy.

Listener ``ws`` has ``upgrade_configs: [{upgrade_type: websocket}]``, listener ``plain`` has
none; both route to a :class:`ScriptedUpstream` whose ``/ws`` answers 101, sends a greeting
frame and then echoes every byte.

What Envoy 1.40 does when an upgrade is not configured was learnt by running these tests
against it (``UBIMESH_IT_SUBJECT=envoy``): a request with ``Connection: upgrade`` and an
``Upgrade`` type that no upgrade_config enables gets ``403`` with an empty body and
``connection: close``, the connection is closed and nothing reaches the upstream.  An
``Upgrade`` header without ``Connection: upgrade`` is no upgrade request at all: it is
forwarded as a plain request, without the Upgrade header.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.support.http_client import Response, build_request
from tests.support.upstreams import WS_GREETING, ScriptedUpstream, websocket_accept

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _header(resp: Response, name: str) -> str | None:
    for n, v in resp.headers:
        if n.lower() == name.lower():
            return v
    return None


def ws_frame(opcode: int, payload: bytes, mask: bool = True) -> bytes:
    """One final WebSocket frame (RFC 6455 5.2); clients must mask."""
    head = bytearray([0x80 | opcode])
    mask_bit = 0x80 if mask else 0
    if len(payload) < 126:
        head.append(mask_bit | len(payload))
    elif len(payload) < 65536:
        head.append(mask_bit | 126)
        head += struct.pack("!H", len(payload))
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", len(payload))
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + key + masked


def _upgrade_request(extra: list[tuple[str, str]]) -> bytes:
    return build_request(
        "GET",
        "/ws",
        [
            ("Host", "ws.test"),
            *extra,
            ("Sec-WebSocket-Key", WS_KEY),
            ("Sec-WebSocket-Version", "13"),
        ],
    )


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def proxy(module_proxy_factory: Any, scripted: ScriptedUpstream) -> Any:
    b = module_proxy_factory.bootstrap()
    b.add_cluster("scripted", [scripted.port])
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "scripted"}}]
    b.add_listener("ws", routes=routes, upgrade_configs=[{"upgrade_type": "websocket"}])
    b.add_listener("plain", routes=routes)
    return module_proxy_factory.start(b)


def _read_exactly(conn: Any, n: int, timeout: float = 5.0) -> bytes:
    conn.reader.deadline = time.monotonic() + timeout
    return conn.reader.exactly(n)


def test_websocket_upgrade_and_frames_both_ways(
    proxy: Any, scripted: ScriptedUpstream, connect: Any
) -> None:
    before = len(scripted.requests)
    conn = connect(proxy.port("ws"))
    conn.send(_upgrade_request([("Connection", "Upgrade"), ("Upgrade", "websocket")]))
    resp = conn.read_response("GET", timeout=5)
    assert resp.status == 101, resp
    assert (_header(resp, "upgrade") or "").lower() == "websocket", resp.headers
    assert "upgrade" in (_header(resp, "connection") or "").lower(), resp.headers
    assert _header(resp, "sec-websocket-accept") == websocket_accept(WS_KEY), resp.headers

    # The upstream saw an upgrade request.
    req = scripted.wait_requests(before + 1)[before]
    assert (req.header("upgrade") or "").lower() == "websocket", req.headers
    assert "upgrade" in (req.header("connection") or "").lower(), req.headers

    # Upstream -> client: the greeting the upstream sends on its own after the 101.
    assert _read_exactly(conn, len(WS_GREETING)) == WS_GREETING

    # Client -> upstream -> client: small and large frames come back byte for byte.
    for payload in (b"ping 1", random.Random(7).randbytes(200_000), b"ping 3"):
        frame = ws_frame(0x2, payload)
        conn.send(frame)
        assert _read_exactly(conn, len(frame), timeout=10) == frame

    # Several frames in one write, then a close frame; all are echoed.
    burst = b"".join(ws_frame(0x1, f"msg {i}".encode()) for i in range(20))
    close = ws_frame(0x8, struct.pack("!H", 1000))
    conn.send(burst + close)
    assert _read_exactly(conn, len(burst) + len(close)) == burst + close


def test_upgrade_without_upgrade_configs_is_refused_as_envoy_does(
    proxy: Any, scripted: ScriptedUpstream, connect: Any
) -> None:
    before = len(scripted.requests)
    conn = connect(proxy.port("plain"))
    conn.send(_upgrade_request([("Connection", "Upgrade"), ("Upgrade", "websocket")]))
    resp = conn.read_response("GET", timeout=5)
    assert resp.status == 403, resp
    assert resp.body == b"", resp.body
    assert _header(resp, "content-length") == "0", resp.headers
    assert (_header(resp, "connection") or "").lower() == "close", resp.headers
    how, rest = conn.wait_closed(3)
    assert (how, rest) in (("eof", b""), ("reset", b"")), (how, rest)
    # A plain request afterwards reaches the upstream; the refused upgrade never did.
    check = connect(proxy.port("plain")).request("GET", "/after", [("Host", "ws.test")])
    assert check.status == 200, check
    assert [r.target for r in scripted.wait_requests(before + 1)[before:]] == ["/after"]


def test_upgrade_type_not_configured_is_refused(
    proxy: Any, scripted: ScriptedUpstream, connect: Any
) -> None:
    before = len(scripted.requests)
    conn = connect(proxy.port("ws"))
    conn.send(_upgrade_request([("Connection", "upgrade"), ("Upgrade", "foo")]))
    resp = conn.read_response("GET", timeout=5)
    assert resp.status == 403, resp
    how, _ = conn.wait_closed(3)
    assert how in ("eof", "reset"), "connection left open after a refused upgrade"
    assert len(scripted.wait_requests(before + 1, timeout=0.3)) == before


@pytest.mark.parametrize("listener", ["ws", "plain"])
def test_upgrade_header_without_connection_upgrade_is_a_plain_request(
    proxy: Any, scripted: ScriptedUpstream, connect: Any, listener: str
) -> None:
    before = len(scripted.requests)
    conn = connect(proxy.port(listener))
    conn.send(_upgrade_request([("Upgrade", "websocket")]))
    resp = conn.read_response("GET", timeout=5)
    assert resp.status == 200, resp
    assert resp.body == b'{"scripted": "/ws"}', resp.body
    req = scripted.wait_requests(before + 1)[before]
    assert req.header("upgrade") is None, f"Upgrade forwarded: {req.headers}"
    # The connection stays usable for HTTP.
    again = conn.request("GET", "/again", [("Host", "ws.test")])
    assert again.status == 200, again
