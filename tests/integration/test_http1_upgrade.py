"""HTTP/1.1 Upgrade (WebSocket) through the proxy.

Listener ``ws`` has ``upgrade_configs: [{upgrade_type: websocket}]``, listener ``plain`` has
none; both route to a :class:`ScriptedUpstream`.  The WebSocket sessions go through listener
``tunnel`` (websocket enabled) to an upstream of their own, whose ``/ws`` answers 101 and a
greeting frame in one write and ``/ws-quiet`` just the 101; both then echo every byte.

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


def _upgrade_request(extra: list[tuple[str, str]], target: str = "/ws") -> bytes:
    return build_request(
        "GET",
        target,
        [
            ("Host", "ws.test"),
            *extra,
            ("Sec-WebSocket-Key", WS_KEY),
            ("Sec-WebSocket-Version", "13"),
        ],
    )



TUNNELS = ("frames", "greeting", "reuse")


@pytest.fixture(scope="module")
def tunnels() -> Iterator[dict[str, ScriptedUpstream]]:
    """One upstream, cluster and listener per WebSocket test, so that a session gone wrong
    cannot leave anything behind (say, an upgraded connection in a pool) for another test."""
    upstreams = {name: ScriptedUpstream(f"tunnel-{name}") for name in TUNNELS}
    yield upstreams
    for upstream in upstreams.values():
        upstream.stop()


@pytest.fixture(scope="module")
def proxy(
    module_proxy_factory: Any, scripted: ScriptedUpstream, tunnels: dict[str, ScriptedUpstream]
) -> Any:
    b = module_proxy_factory.bootstrap()
    b.add_cluster("scripted", [scripted.port])
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "scripted"}}]
    websocket = [{"upgrade_type": "websocket"}]
    b.add_listener("ws", routes=routes, upgrade_configs=websocket)
    b.add_listener("plain", routes=routes)
    for name, upstream in tunnels.items():
        b.add_cluster(f"tunnel-{name}", [upstream.port])
        b.add_listener(
            f"tunnel-{name}",
            routes=[{"match": {"prefix": "/"}, "route": {"cluster": f"tunnel-{name}"}}],
            upgrade_configs=websocket,
        )
    return module_proxy_factory.start(b)


def _read_exactly(conn: Any, n: int, timeout: float = 5.0) -> bytes:
    conn.reader.deadline = time.monotonic() + timeout
    try:
        return conn.reader.exactly(n)
    except (OSError, ValueError) as exc:
        got = bytes(conn.reader.buf)
        raise AssertionError(
            f"wanted {n} bytes, the connection ended ({type(exc).__name__}: {exc}) after "
            f"{len(got)}: {got[:80]!r}"
        ) from None


def _open_session(
    proxy: Any, name: str, upstream: ScriptedUpstream, connect: Any, target: str
) -> Any:
    """Upgrade a connection to listener tunnel-``name`` and check the 101 and what the
    upstream saw; returns the connection."""
    before = len(upstream.requests)
    conn = connect(proxy.port(f"tunnel-{name}"))
    conn.send(
        _upgrade_request([("Connection", "Upgrade"), ("Upgrade", "websocket")], target=target)
    )
    resp = conn.read_response("GET", timeout=5)
    assert resp.status == 101, resp
    assert (_header(resp, "upgrade") or "").lower() == "websocket", resp.headers
    assert "upgrade" in (_header(resp, "connection") or "").lower(), resp.headers
    assert _header(resp, "sec-websocket-accept") == websocket_accept(WS_KEY), resp.headers
    req = upstream.wait_requests(before + 1)[before]
    assert req.target == target
    assert (req.header("upgrade") or "").lower() == "websocket", req.headers
    assert "upgrade" in (req.header("connection") or "").lower(), req.headers
    return conn


def test_websocket_frames_flow_both_ways(
    proxy: Any, tunnels: dict[str, ScriptedUpstream], connect: Any
) -> None:
    """Client frames reach the upstream, whose echo comes back byte for byte."""
    conn = _open_session(proxy, "frames", tunnels["frames"], connect, "/ws-quiet")
    for payload in (b"ping 1", random.Random(7).randbytes(200_000), b"ping 3"):
        frame = ws_frame(0x2, payload)
        conn.send(frame)
        assert _read_exactly(conn, len(frame), timeout=10) == frame
    # Several frames in one write, then a close frame; all are echoed.
    burst = b"".join(ws_frame(0x1, f"msg {i}".encode()) for i in range(20))
    close = ws_frame(0x8, struct.pack("!H", 1000))
    conn.send(burst + close)
    assert _read_exactly(conn, len(burst) + len(close)) == burst + close


def test_websocket_bytes_sent_with_the_101_are_delivered(
    proxy: Any, tunnels: dict[str, ScriptedUpstream], connect: Any
) -> None:
    """The upstream writes its 101 and a first frame at once (one TCP segment): the frame is
    not lost, and the session goes on."""
    conn = _open_session(proxy, "greeting", tunnels["greeting"], connect, "/ws")
    assert _read_exactly(conn, len(WS_GREETING)) == WS_GREETING
    frame = ws_frame(0x1, b"after the greeting")
    conn.send(frame)
    assert _read_exactly(conn, len(frame)) == frame


def test_an_upgraded_upstream_connection_is_never_reused(
    proxy: Any, tunnels: dict[str, ScriptedUpstream], connect: Any
) -> None:
    """After a WebSocket session that carried data, a plain request to the same cluster gets
    an HTTP answer on a new upstream connection (not the bytes of the finished tunnel)."""
    upstream = tunnels["reuse"]
    conn = _open_session(proxy, "reuse", upstream, connect, "/ws-quiet")
    frame = ws_frame(0x1, b"some session data")
    conn.send(frame)
    conn.wait_closed(0.5)  # whatever comes back; the frames test checks the echo
    conn.close()
    accepted = upstream.accepted
    resp = connect(proxy.port("tunnel-reuse")).request(
        "GET", "/plain-after-ws", [("Host", "ws.test")]
    )
    assert resp.status == 200, resp
    assert resp.body == b'{"scripted": "/plain-after-ws"}', resp.body
    assert upstream.accepted == accepted + 1, "no new upstream connection was opened"


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
