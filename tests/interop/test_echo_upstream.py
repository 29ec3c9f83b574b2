"""The echo upstream is the judge of the differential suite, so it is tested on its own."""

from __future__ import annotations

import hashlib
import json
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.echo_upstream import EchoServerPool
from tests.support.http_client import build_request, send_httpclient, send_raw

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pool() -> Iterator[EchoServerPool]:
    p = EchoServerPool()
    try:
        yield p
    finally:
        p.close()


def _raw(pool: EchoServerPool, data: bytes, method: str = "GET", name: str = "judge"):
    return send_raw("127.0.0.1", pool.port(name), data, method, timeout=5)


def test_records_exact_target_header_names_order_and_duplicates(pool: EchoServerPool) -> None:
    headers = [("Host", "h.test"), ("X-Mixed", "1"), ("x-dup", "a"), ("X-DUP", "b"), ("e", "")]
    resp = _raw(pool, build_request("GET", "/p/../q?a=%2F&b", headers))
    assert resp.status == 200
    assert ("x-echo-upstream", "judge") in resp.headers
    echo = json.loads(resp.body)
    assert echo["name"] == "judge"
    assert echo["method"] == "GET"
    assert echo["target"] == "/p/../q?a=%2F&b"
    assert echo["version"] == "HTTP/1.1"
    assert echo["headers"] == [list(h) for h in headers]
    assert echo["body_length"] == 0


def test_chunked_body_with_extensions_and_trailers(pool: EchoServerPool) -> None:
    data = (
        b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    echo = json.loads(_raw(pool, data, "POST").body)
    assert echo["chunked"] is True
    assert echo["body_length"] == 13
    assert echo["body_sha256"] == hashlib.sha256(b"abc0123456789").hexdigest()
    assert echo["trailers"] == [["X-Trailer", "t"]]


def test_content_length_body_and_pipelined_keep_alive(pool: EchoServerPool) -> None:
    cursor = pool.cursor()
    first = build_request("POST", "/1", [("Host", "h"), ("Content-Length", "5")], b"hello")
    second = build_request("GET", "/2", [("Host", "h"), ("Connection", "close")])
    resp = _raw(pool, first + second, "POST")
    assert json.loads(resp.body)["body_length"] == 5
    records = pool.records_since(cursor, at_least=2, timeout=5)
    assert [r.target for r in records] == ["/1", "/2"]
    assert records[0].peer == records[1].peer, "both requests came on one connection"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",  # whitespace before the colon
        b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",  # obsolete line folding
        b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two Host headers
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\nx",  # conflicting lengths
        b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",  # malformed request line
    ],
)
def test_rejects_malformed_requests(pool: EchoServerPool, data: bytes) -> None:
    resp = _raw(pool, data)
    assert resp.status == 400
    assert "echo_error" in json.loads(resp.body)


def test_response_controls(pool: EchoServerPool) -> None:
    headers = [
        ("Host", "h"),
        ("x-echo-status", "503"),
        ("x-echo-response-header", "X-One=1"),
        ("x-echo-response-header", "x-two=a=b"),
    ]
    resp = send_httpclient("127.0.0.1", pool.port("judge"), "GET", "/", headers)
    assert resp.status == 503
    assert ("X-One", "1") in resp.headers
    assert ("x-two", "a=b") in resp.headers

    sized = [("Host", "h"), ("x-echo-body-size", "70000"), ("x-echo-chunked", "1")]
    resp = send_httpclient("127.0.0.1", pool.port("judge"), "GET", "/", sized)
    assert resp.body == b"x" * 70000
    assert ("transfer-encoding", "chunked") in resp.headers

    resp = _raw(pool, build_request("GET", "/", [("Host", "h"), ("x-echo-status", "204")]))
    assert resp.status == 204
    assert resp.body == b""


def test_head_has_no_body_but_is_logged(pool: EchoServerPool) -> None:
    cursor = pool.cursor()
    resp = _raw(pool, build_request("HEAD", "/h", [("Host", "h")]), "HEAD")
    assert resp.status == 200
    assert resp.body == b""
    length = int(dict(resp.headers)["content-length"])
    assert length > 0
    (record,) = pool.records_since(cursor, at_least=1)
    assert record.method == "HEAD"


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, "connection closed before a complete response head"
        data += chunk
    return data


def test_expect_100_continue_is_answered(pool: EchoServerPool) -> None:
    with socket.create_connection(("127.0.0.1", pool.port("judge")), timeout=5) as sock:
        sock.sendall(
            b"POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        )
        assert _read_head(sock) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"ok")
        assert _read_head(sock).startswith(b"HTTP/1.1 200 OK\r\n")


def test_http10_closes_unless_keep_alive(pool: EchoServerPool) -> None:
    resp = _raw(pool, build_request("GET", "/", [("Host", "h")], version="HTTP/1.0"))
    assert resp.status == 200
    assert ("connection", "close") in resp.headers


def test_standalone_subprocess_prints_its_port() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.echo_upstream", "--port", "0", "--name", "solo"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "the echo subprocess printed no port within 10 s"
        port = int(proc.stdout.readline())
        resp = send_httpclient("127.0.0.1", port, "GET", "/x", [("Host", "h")], timeout=5)
        assert resp.status == 200
        assert json.loads(resp.body)["name"] == "solo"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
