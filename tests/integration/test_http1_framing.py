"""HTTP/1.1 message framing through the proxy, as Envoy does it.

One proxy serves the whole module:

* ``main``: every host goes to echo upstream ``a``, except ``b.test`` which goes to ``b``;
* ``limits``: the same routes with ``max_headers_count: 20`` and ``max_request_headers_kb: 8``.

The echo upstreams describe in JSON what they received; their log tells which upstream
connection (``peer``) carried each request.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import pytest
from tests.support.echo_upstream import EchoServerPool
from tests.support.http_client import Response, build_request, send_raw

HOST = ("Host", "framing.test")


def _header(resp: Response, name: str) -> str | None:
    for n, v in resp.headers:
        if n.lower() == name.lower():
            return v
    return None


def _echo(resp: Response) -> dict[str, Any]:
    assert resp.error is None, f"response not read: {resp.error} (status {resp.status})"
    assert _header(resp, "content-type") == "application/json", resp.headers
    return json.loads(resp.body)


def _upstream_header_names(record: dict[str, Any]) -> set[str]:
    return {name.lower() for name, _ in record["headers"]}


def _to(cluster: str) -> dict[str, Any]:
    return {"match": {"prefix": "/"}, "route": {"cluster": cluster}}


@pytest.fixture(scope="module")
def proxy(module_proxy_factory: Any, module_echo: EchoServerPool) -> Any:
    b = module_proxy_factory.bootstrap()
    b.add_cluster("a", [module_echo.port("a")])
    b.add_cluster("b", [module_echo.port("b")])
    vhosts = [
        {"name": "b", "domains": ["b.test"], "routes": [_to("b")]},
        {"name": "a", "domains": ["*"], "routes": [_to("a")]},
    ]
    b.add_listener("main", virtual_hosts=vhosts)
    b.add_listener(
        "limits",
        virtual_hosts=vhosts,
        common_http_protocol_options={"max_headers_count": 20},
        max_request_headers_kb=8,
    )
    return module_proxy_factory.start(b)


def _not_forwarded(echo: EchoServerPool, cursor: int, proxy: Any, what: str) -> None:
    """Nothing reached an upstream since ``cursor`` but a marker request sent afterwards.

    The marker makes the check deterministic: the echo log is ordered, so a request that was
    forwarded before the marker would be in the log before it.
    """
    marker = send_raw(
        "127.0.0.1",
        proxy.port(),
        build_request("GET", "/marker", [HOST, ("x-marker", what)]),
        "GET",
        timeout=5,
    )
    assert marker.status == 200, f"marker request failed: {marker}"
    records = echo.records_since(cursor, at_least=1, timeout=5)
    seen = [(r.name, r.method, r.target) for r in records]
    assert [r.target for r in records] == ["/marker"], f"{what} reached an upstream: {seen}"


# --------------------------------------------------------------------------------------------
# Connections


def test_keep_alive_reuses_upstream_connection(
    proxy: Any, module_echo: EchoServerPool, connect: Any
) -> None:
    conn = connect(proxy.port())
    cursor = module_echo.cursor()
    first = conn.request("GET", "/keep-alive/1", [HOST])
    second = conn.request("GET", "/keep-alive/2", [HOST])
    assert (first.status, second.status) == (200, 200), (first, second)
    for resp in (first, second):
        assert (_header(resp, "connection") or "").lower() != "close", resp.headers
    assert _echo(first)["target"] == "/keep-alive/1"
    assert _echo(second)["target"] == "/keep-alive/2"
    records = module_echo.records_since(cursor, at_least=2)
    assert [r.target for r in records] == ["/keep-alive/1", "/keep-alive/2"]
    assert records[0].peer == records[1].peer, (
        "the second request of a keep-alive client connection was sent on a new upstream "
        f"connection: {records[0].peer} then {records[1].peer}"
    )


def test_pipelined_requests_answered_in_order(
    proxy: Any, module_echo: EchoServerPool, connect: Any
) -> None:
    body = b"second request body"
    data = (
        build_request("GET", "/pipe/1", [HOST, ("x-seq", "1")])
        + build_request(
            "POST", "/pipe/2", [HOST, ("x-seq", "2"), ("Content-Length", str(len(body)))], body
        )
        + build_request("GET", "/pipe/3", [HOST, ("x-seq", "3"), ("x-echo-chunked", "1")])
    )
    conn = connect(proxy.port())
    conn.send(data)  # all three requests in one write
    answers = [conn.read_response("GET", timeout=10) for _ in range(3)]
    echoed = [_echo(resp) for resp in answers]
    assert [e["target"] for e in echoed] == ["/pipe/1", "/pipe/2", "/pipe/3"]
    for i, e in enumerate(echoed, 1):
        assert ["x-seq", str(i)] in [[n.lower(), v] for n, v in e["headers"]], e
    assert echoed[1]["method"] == "POST"
    assert echoed[1]["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echoed[0]["body_length"] == 0 and echoed[2]["body_length"] == 0


# --------------------------------------------------------------------------------------------
# Request bodies


def _random_body(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_content_length_body_arrives_intact(proxy: Any, connect: Any) -> None:
    body = _random_body(1_000_003, 1)
    resp = connect(proxy.port()).request(
        "POST", "/body/cl", [HOST, ("Content-Type", "application/octet-stream")], body=body
    )
    assert resp.status == 200, resp
    echoed = _echo(resp)
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_body_arrives_intact(proxy: Any, connect: Any) -> None:
    body = _random_body(700_001, 2)
    sizes = [1, 2, 100, 8192, 65_543, 300_000]
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(body[pos : pos + size])
        pos += size
    chunks.append(body[pos:])
    assert b"".join(chunks) == body
    resp = connect(proxy.port()).request("POST", "/body/chunked", [HOST], chunks=chunks)
    assert resp.status == 200, resp
    echoed = _echo(resp)
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


# --------------------------------------------------------------------------------------------
# Response framing


@pytest.mark.parametrize(
    ("method", "extra", "status"),
    [
        ("HEAD", [], 200),
        ("GET", [("x-echo-status", "204")], 204),
        ("GET", [("x-echo-status", "304")], 304),
    ],
    ids=["HEAD", "204", "304"],
)
def test_bodiless_responses_keep_the_connection_in_sync(
    proxy: Any, connect: Any, method: str, extra: list[tuple[str, str]], status: int
) -> None:
    """No body bytes follow HEAD, 204 and 304 answers: the next response on the connection
    parses cleanly (it would not if the proxy had sent a body or a chunked terminator)."""
    conn = connect(proxy.port())
    resp = conn.request(method, "/bodiless", [HOST, *extra])
    assert resp.status == status, resp
    assert resp.error is None, resp.error
    assert _header(resp, "transfer-encoding") is None, resp.headers
    if status in (204, 304):
        assert _header(resp, "content-length") in (None, "0"), resp.headers
    else:  # HEAD: the length a GET would have
        assert _header(resp, "content-length") is not None, resp.headers
    follow = conn.request("GET", "/after-bodiless", [HOST])
    assert follow.status == 200, follow
    assert _echo(follow)["target"] == "/after-bodiless"


def test_chunked_response(proxy: Any, connect: Any) -> None:
    conn = connect(proxy.port())
    resp = conn.request("GET", "/chunked-response", [HOST, ("x-echo-chunked", "1")])
    assert resp.status == 200, resp
    assert (_header(resp, "transfer-encoding") or "").lower() == "chunked", resp.headers
    assert _header(resp, "content-length") is None, resp.headers
    assert _echo(resp)["target"] == "/chunked-response"
    follow = conn.request("GET", "/after-chunked", [HOST])
    assert _echo(follow)["target"] == "/after-chunked"


def test_content_length_response(proxy: Any, connect: Any) -> None:
    conn = connect(proxy.port())
    resp = conn.request("GET", "/cl-response", [HOST, ("x-echo-body-size", "300001")])
    assert resp.status == 200, resp
    assert _header(resp, "content-length") == "300001", resp.headers
    assert _header(resp, "transfer-encoding") is None, resp.headers
    assert resp.body == b"x" * 300001
    follow = conn.request("GET", "/after-cl", [HOST])
    assert _echo(follow)["target"] == "/after-cl"


def test_http10_client_gets_a_framed_answer_and_close(proxy: Any, connect: Any) -> None:
    """HTTP/1.0 is not accepted by default (http_protocol_options.accept_http_10 is false):
    Envoy answers 426 Upgrade Required, with a content-length (a 1.0 client cannot read
    chunked), and closes the connection."""
    conn = connect(proxy.port())
    conn.send(build_request("GET", "/http10", [HOST], version="HTTP/1.0"))
    resp = conn.read_response("GET", timeout=5)
    assert resp.status == 426, resp
    assert resp.error is None, resp.error
    assert _header(resp, "transfer-encoding") is None, resp.headers
    length = _header(resp, "content-length")
    assert length is not None and int(length) == len(resp.body), (resp.headers, resp.body)
    how, rest = conn.wait_closed(3)
    assert (how, rest) in (("eof", b""), ("reset", b"")), (how, rest)


def test_hop_by_hop_headers_are_not_forwarded(
    proxy: Any, module_echo: EchoServerPool, connect: Any
) -> None:
    hop_by_hop = [
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("TE", "gzip"),
        ("Proxy-Connection", "keep-alive"),
        ("Upgrade", "foo/2"),  # no upgrade_configs, and Connection does not name it
    ]
    resp = connect(proxy.port()).request(
        "GET", "/hop", [HOST, *hop_by_hop, ("x-end-to-end", "kept")]
    )
    assert resp.status == 200, resp
    echoed = _echo(resp)
    received = _upstream_header_names(echoed)
    leaked = received & {"connection", "keep-alive", "te", "proxy-connection", "upgrade"}
    assert not leaked, f"hop-by-hop headers forwarded: {leaked} in {echoed['headers']}"
    assert ["x-end-to-end", "kept"] in echoed["headers"]


# --------------------------------------------------------------------------------------------
# Requests the proxy refuses


def test_content_length_with_transfer_encoding_is_refused(
    proxy: Any, module_echo: EchoServerPool, connect: Any
) -> None:
    cursor = module_echo.cursor()
    conn = connect(proxy.port())
    conn.send(
        build_request(
            "POST",
            "/smuggle",
            [HOST, ("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
            body=b"5\r\nhello\r\n0\r\n\r\n",
        )
    )
    resp = conn.read_response("POST", timeout=5)
    assert resp.status == 400, resp
    how, _ = conn.wait_closed(3)
    assert how in ("eof", "reset"), "connection left open after a framing error"
    _not_forwarded(module_echo, cursor, proxy, "content-length + transfer-encoding")


@pytest.mark.parametrize(
    "request_line",
    [b"GET /a b HTTP/1.1", b"G(T / HTTP/1.1", b"GET / HTTP/1.x", b"GET / HTTP/1.1 extra"],
    ids=["space-in-target", "bad-method", "bad-version", "trailing-token"],
)
def test_malformed_request_line_gets_400_and_close(
    proxy: Any, module_echo: EchoServerPool, connect: Any, request_line: bytes
) -> None:
    cursor = module_echo.cursor()
    conn = connect(proxy.port())
    conn.send(request_line + b"\r\nHost: framing.test\r\n\r\n")
    resp = conn.read_response("GET", timeout=5)
    assert resp.status == 400, resp
    how, rest = conn.wait_closed(3)
    assert how in ("eof", "reset"), f"connection still open after 400 (read {rest!r})"
    _not_forwarded(module_echo, cursor, proxy, repr(request_line))


def test_too_many_headers_get_431(proxy: Any, module_echo: EchoServerPool, connect: Any) -> None:
    port = proxy.port("limits")
    few = connect(port).request("GET", "/few", [HOST] + [(f"x-h{i}", "v") for i in range(15)])
    assert few.status == 200, f"16 headers must pass a limit of 20: {few}"
    cursor = module_echo.cursor()
    conn = connect(port)
    resp = conn.request("GET", "/many", [HOST] + [(f"x-h{i}", "v") for i in range(30)])
    assert resp.status == 431, resp
    how, _ = conn.wait_closed(3)
    assert how in ("eof", "reset"), "connection left open after 431"
    _not_forwarded(module_echo, cursor, proxy, "31 headers")


def test_too_large_headers_get_431(proxy: Any, module_echo: EchoServerPool, connect: Any) -> None:
    port = proxy.port("limits")
    small = connect(port).request("GET", "/small", [HOST, ("x-big", "v" * 6000)])
    assert small.status == 200, f"6 kB of headers must pass a limit of 8 KiB: {small}"
    cursor = module_echo.cursor()
    conn = connect(port)
    resp = conn.request("GET", "/large", [HOST, ("x-big", "v" * 10_000)])
    assert resp.status == 431, resp
    how, _ = conn.wait_closed(3)
    assert how in ("eof", "reset"), "connection left open after 431"
    _not_forwarded(module_echo, cursor, proxy, "10 kB header")


def test_duplicate_host_is_folded_as_envoy_does(
    proxy: Any, module_echo: EchoServerPool, connect: Any
) -> None:
    """Two Host headers.  RFC 9112 section 3.2 says a server must answer 400, but Envoy 1.40
    (checked with this very test, UBIMESH_IT_SUBJECT=envoy) accepts the request: it folds the
    two values into one ``host: first,second``, routes on that and forwards it."""
    cursor = module_echo.cursor()
    conn = connect(proxy.port())
    conn.send(build_request("GET", "/two-hosts", [HOST, ("Host", "other.test")]))
    resp = conn.read_response("GET", timeout=5)
    assert resp.status == 200, resp
    echoed = _echo(resp)
    hosts = [v for n, v in echoed["headers"] if n.lower() == "host"]
    assert hosts == ["framing.test,other.test"], echoed["headers"]
    records = module_echo.records_since(cursor, at_least=1)
    assert [r.target for r in records] == ["/two-hosts"]


# --------------------------------------------------------------------------------------------
# Expect and absolute-form


def test_expect_100_continue(proxy: Any, module_echo: EchoServerPool, connect: Any) -> None:
    body = b"the body, sent after 100 Continue"
    conn = connect(proxy.port())
    conn.send(
        build_request(
            "POST",
            "/expect",
            [HOST, ("Expect", "100-continue"), ("Content-Length", str(len(body)))],
        )
    )
    interim = conn.read_head(timeout=3)  # the body has not been sent yet
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
    conn.send(body)
    resp = conn.read_response("POST", timeout=5)
    assert resp.status == 200, resp
    echoed = _echo(resp)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "expect" not in _upstream_header_names(echoed), echoed["headers"]


def test_absolute_form_routes_by_its_authority(
    proxy: Any, module_echo: EchoServerPool, connect: Any
) -> None:
    conn = connect(proxy.port())
    conn.send(build_request("GET", "http://b.test/absolute?q=1", [("Host", "a.test")]))
    resp = conn.read_response("GET", timeout=5)
    assert resp.status == 200, resp
    assert _header(resp, "x-echo-upstream") == "b", "routed by Host instead of the URI authority"
    echoed = _echo(resp)
    assert echoed["target"] == "/absolute?q=1"
    hosts = [v for n, v in echoed["headers"] if n.lower() == "host"]
    assert hosts == ["b.test"], echoed["headers"]
