"""HTTP/1.1 framing properties, end to end through a real ``ubimesh proxy`` process.

One proxy (``--concurrency 1``) serves the module: every request goes to one echo upstream
(tests.support.echo_upstream), which answers with what it received (body_length, body_sha256)
or, when asked with ``x-echo-body-size``, with that many ``x`` bytes, chunked on request.

Hypothesis draws bodies, chunkings and the way the bytes are cut into TCP writes; the client
here writes exactly those bytes and reads the answers with its own strict parser, so that a
proxy that loses, adds or reorders a byte -- or leaves its parser out of step with the stream
-- fails a property.  Each property also sends a follow-up request on the same connection: a
body read one byte short or long shows up there.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.bootstrap import address, static_cluster
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    ProcessStartError,
    free_ports,
    start_ubimesh,
)

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HOST = "framing.props"
IO_TIMEOUT = 5.0

PROPS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the proxy -----------------------------------------------------------------------------------


def _bootstrap(admin_port: int, listen_port: int, upstream_port: int) -> dict[str, Any]:
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "props",
        "route_config": {
            "name": "props_routes",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}],
                }
            ],
        },
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
    }
    return {
        "admin": {"address": address(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "main",
                    "address": address(listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [static_cluster("echo", [upstream_port], connect_timeout="1s")],
        },
    }


@dataclass
class Proxy:
    port: int
    proc: ManagedProcess

    def describe(self) -> str:
        return self.proc.describe()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    workdir: Path = tmp_path_factory.mktemp("framing_props")
    with EchoServerPool() as pool:
        upstream = pool.port("echo")
        proc: ManagedProcess | None = None
        for attempt in range(3):
            admin_port, listen_port = free_ports(2)
            config = workdir / f"bootstrap{attempt}.yaml"
            config.write_text(yaml.safe_dump(_bootstrap(admin_port, listen_port, upstream)))
            try:
                proc = start_ubimesh(
                    config, admin_port, [listen_port], workdir, f"ubimesh{attempt}"
                )
                break
            except ProcessStartError as exc:
                if "in use" not in str(exc).lower() or attempt == 2:
                    raise
        assert proc is not None
        try:
            yield Proxy(listen_port, proc)
        finally:
            proc.stop()


# -- a strict client -----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool
    raw_head: bytes = field(repr=False, default=b"")

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name]
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def json(self) -> dict[str, Any]:
        assert self.header("content-type") == "application/json", self.raw_head
        return json.loads(self.body)


class FramingError(AssertionError):
    pass


_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)(;[^\r\n]*)?")


class Client:
    """One keep-alive connection; writes exactly what it is given, parses answers strictly."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.sock = socket.create_connection((LOOPBACK, proxy.port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.deadline = 0.0

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send_in_pieces(self, data: bytes, cuts: list[int], pause: bool) -> None:
        """Send ``data`` as separate writes cut at ``cuts`` (offsets; any order, any value)."""
        points = sorted({c % len(data) for c in cuts if len(data) > 1} - {0})
        start = 0
        for point in [*points, len(data)]:
            self.sock.sendall(data[start:point])
            start = point
            if pause:
                time.sleep(0.001)  # let the proxy see this piece as a read of its own

    def _fill(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"no complete response within {IO_TIMEOUT} s; have {self.buf[:200]!r}"
            )
        self.sock.settimeout(remaining)
        data = self.sock.recv(262144)
        if not data:
            alive = "" if self.proxy.proc.alive else "\n" + self.proxy.describe()
            raise FramingError(f"connection closed; unparsed bytes {self.buf[:200]!r}{alive}")
        self.buf += data

    def _until(self, delim: bytes) -> bytes:
        while (idx := self.buf.find(delim)) < 0:
            self._fill()
        out = bytes(self.buf[:idx])
        del self.buf[: idx + len(delim)]
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_response(self) -> Response:
        self.deadline = time.monotonic() + IO_TIMEOUT
        head = self._until(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        m = _STATUS.fullmatch(lines[0])
        if m is None:
            raise FramingError(f"bad status line {lines[0]!r}")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            f = _FIELD.fullmatch(line)
            if f is None:
                raise FramingError(f"bad header line {line!r}")
            headers.append((f.group(1).decode("latin-1"), f.group(2).decode("latin-1")))
        names = [n.lower() for n, _ in headers]
        status = int(m.group(1))
        te = [v for n, v in headers if n.lower() == "transfer-encoding"]
        if te:
            if names.count("content-length"):
                raise FramingError(f"both transfer-encoding and content-length: {head!r}")
            if [v.lower() for v in te] != ["chunked"]:
                raise FramingError(f"unexpected transfer-encoding {te}")
            body = self._read_chunked()
            return Response(status, headers, body, True, head)
        lengths = [v for n, v in headers if n.lower() == "content-length"]
        if len(lengths) != 1 or not lengths[0].isdigit():
            raise FramingError(f"a keep-alive response needs one content-length: {head!r}")
        return Response(status, headers, self._exactly(int(lengths[0])), False, head)

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = self._until(b"\r\n")
            m = _CHUNK_SIZE.fullmatch(line)
            if m is None:
                raise FramingError(f"bad chunk size line {line!r}")
            size = int(m.group(1), 16)
            if size == 0:
                break
            body += self._exactly(size)
            if self._exactly(2) != b"\r\n":
                raise FramingError("chunk data not followed by CRLF")
        while self._until(b"\r\n") != b"":  # trailers, if any
            pass
        return bytes(body)

    def assert_nothing_pending(self) -> None:
        """No bytes beyond the responses read so far (nothing extra was sent)."""
        self.sock.settimeout(0.05)
        try:
            extra = self.sock.recv(65536)
        except TimeoutError:
            extra = b""
        assert not self.buf and not extra, f"unexpected bytes: {(bytes(self.buf) + extra)[:200]!r}"

    def follow_up(self) -> None:
        """A plain GET on the same connection still works: the stream is still in step."""
        self.sock.sendall(f"GET /follow-up HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        resp = self.read_response()
        assert resp.status == 200, resp
        record = resp.json()
        assert record["target"] == "/follow-up", record
        assert record["body_length"] == 0, record
        self.assert_nothing_pending()


def head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}"]
    lines += [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def split_by_sizes(body: bytes, sizes: list[int]) -> list[bytes]:
    """Cut ``body`` into chunks whose sizes cycle through ``sizes``; no empty chunk."""
    parts: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(body):
        n = sizes[i % len(sizes)]
        parts.append(body[pos : pos + n])
        pos += n
        i += 1
    return parts


# -- strategies ----------------------------------------------------------------------------------

body_sizes = st.one_of(
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=0, max_value=200_000),
    st.sampled_from([0, 1, 16383, 16384, 16385, 65535, 65536, 65537, 131072, 200_000]),
)
chunk_sizes = st.lists(
    st.one_of(st.integers(1, 16), st.integers(1, 70_000)), min_size=1, max_size=16
)
cuts = st.lists(st.integers(min_value=0, max_value=2**31), max_size=12)


# -- properties ----------------------------------------------------------------------------------


@PROPS
@given(
    size=body_sizes,
    seed=st.integers(min_value=0, max_value=2**32),
    chunked=st.booleans(),
    sizes=chunk_sizes,
    write_cuts=cuts,
    pause=st.booleans(),
)
def test_request_body_arrives_byte_identical(
    proxy: Proxy,
    size: int,
    seed: int,
    chunked: bool,
    sizes: list[int],
    write_cuts: list[int],
    pause: bool,
) -> None:
    body = random.Random(seed).randbytes(size)
    if chunked:
        framed = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in split_by_sizes(body, sizes))
        wire = head("POST", "/upload", [("Transfer-Encoding", "chunked")]) + framed + b"0\r\n\r\n"
    else:
        wire = head("POST", "/upload", [("Content-Length", str(size))]) + body
    with Client(proxy) as client:
        client.send_in_pieces(wire, write_cuts, pause)
        resp = client.read_response()
        assert resp.status == 200, resp
        record = resp.json()
        assert record["method"] == "POST"
        assert record["body_length"] == size, record
        assert record["body_sha256"] == hashlib.sha256(body).hexdigest()
        client.follow_up()


@PROPS
@given(
    responses=st.lists(st.tuples(body_sizes, st.booleans()), min_size=1, max_size=3),
)
def test_response_body_arrives_intact(proxy: Proxy, responses: list[tuple[int, bool]]) -> None:
    with Client(proxy) as client:
        for size, chunked in responses:
            extra = [("x-echo-body-size", str(size))]
            if chunked:
                extra.append(("x-echo-chunked", "1"))
            client.sock.sendall(head("GET", f"/bytes/{size}", extra))
            resp = client.read_response()
            assert resp.status == 200, resp
            assert resp.header("content-type") == "application/octet-stream"
            assert len(resp.body) == size
            assert resp.body == b"x" * size
            if not resp.chunked:
                assert resp.header("content-length") == str(size)
        client.follow_up()


pipelined_requests = st.lists(
    st.one_of(
        st.tuples(st.just("json"), st.text("abcxyz0123-_.~", max_size=12), st.just(False)),
        st.tuples(
            st.just("bytes"), st.integers(min_value=0, max_value=40_000).map(str), st.booleans()
        ),
    ),
    min_size=1,
    max_size=8,
)


@PROPS
@given(requests=pipelined_requests, write_cuts=cuts, pause=st.booleans())
def test_pipelined_gets_are_answered_in_order(
    proxy: Proxy, requests: list[tuple[str, str, bool]], write_cuts: list[int], pause: bool
) -> None:
    wire = bytearray()
    targets: list[str] = []
    for seq, (kind, arg, chunked) in enumerate(requests):
        extra = [("x-echo-response-header", f"x-seq={seq}")]
        if kind == "json":
            target = f"/p/{seq}?q={arg}"
        else:
            target = f"/p/{seq}/bytes"
            extra.append(("x-echo-body-size", arg))
            if chunked:
                extra.append(("x-echo-chunked", "1"))
        targets.append(target)
        wire += head("GET", target, extra)
    with Client(proxy) as client:
        client.send_in_pieces(bytes(wire), write_cuts, pause)
        for seq, (kind, arg, _) in enumerate(requests):
            resp = client.read_response()
            assert resp.status == 200, resp
            assert resp.header("x-seq") == str(seq), f"response {seq} out of order: {resp}"
            if kind == "json":
                record = resp.json()
                assert record["target"] == targets[seq]
                assert record["method"] == "GET"
                assert record["body_length"] == 0
            else:
                assert resp.body == b"x" * int(arg)
        client.follow_up()
