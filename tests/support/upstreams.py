"""Special upstreams for the HTTP/1.1 integration tests (tests/integration/).

The echo upstream (:mod:`tests.support.echo_upstream`) answers every request at once and keeps
whole bodies in memory.  The servers here do what it cannot:

* :class:`BulkUpstream` takes and gives bodies of any size without holding them: ``POST /sink``
  reads a body (content-length or chunked) and checks it against :class:`Pattern` on the fly,
  ``GET /source/N`` streams N bytes of the pattern and counts what it managed to send;
* :class:`SilentUpstream` reads requests and never answers;
* :class:`ScriptedUpstream` answers late (``/delay/MS``), dies in the middle of a body
  (``/truncate``) or switches protocols (``/ws``: 101, a greeting frame, then it echoes bytes).

They are plain blocking sockets with one thread per connection, which keeps them independent
of any event loop (and of ubimesh's code).  Every socket operation has a timeout, and
:meth:`ThreadedUpstream.stop` closes every socket and joins every thread with a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "BulkUpstream",
    "Pattern",
    "PatternChecker",
    "ScriptedUpstream",
    "SilentUpstream",
    "ThreadedUpstream",
    "UpstreamRequest",
    "websocket_accept",
]

LOOPBACK = "127.0.0.1"
IO_TIMEOUT_S = 30.0
MAX_HEAD = 256 * 1024
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: What the /ws upstream sends right after its 101: an unmasked text frame "hello".
WS_GREETING = b"\x81\x05hello"


# --------------------------------------------------------------------------------------------
# A deterministic byte stream, generated on the fly


class Pattern:
    """An endless, deterministic byte stream: random bytes repeating with a prime period.

    The period (a prime a little over 1 MiB) is not a multiple of any read or write size, so a
    lost, repeated or reordered piece of the stream shows up as a mismatch, and the stream is
    never materialised: :meth:`slice` returns a view into one buffer of period + 256 KiB.
    """

    PERIOD = 1_048_583
    MAX_SLICE = 256 * 1024

    def __init__(self, seed: int = 20240611) -> None:
        base = random.Random(seed).randbytes(self.PERIOD)
        self._double = base + base[: self.MAX_SLICE]
        self._view = memoryview(self._double)

    def slice(self, offset: int, size: int) -> memoryview:
        """The ``size`` bytes (at most MAX_SLICE) of the stream starting at ``offset``."""
        if size > self.MAX_SLICE:
            raise ValueError("slice too large")
        start = offset % self.PERIOD
        return self._view[start : start + size]

    def expected(self, offset: int, size: int) -> bytes:
        start = offset % self.PERIOD
        return self._double[start : start + size]

    def chunks(self, total: int, size: int = MAX_SLICE, offset: int = 0) -> Iterator[memoryview]:
        """The first ``total`` bytes of the stream (from ``offset``) as views of ``size``."""
        pos = 0
        while pos < total:
            n = min(size, total - pos)
            yield self.slice(offset + pos, n)
            pos += n


class PatternChecker:
    """Compares received bytes with the pattern; keeps the count and the first mismatch."""

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.count = 0
        self.first_mismatch: int | None = None

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, Pattern.MAX_SLICE)
            if self.first_mismatch is None:
                piece = data[pos : pos + n]
                expected = self.pattern.expected(self.count, n)
                if piece != expected:
                    first = next(i for i in range(n) if piece[i] != expected[i])
                    self.first_mismatch = self.count + first
            self.count += n
            pos += n

    @property
    def ok(self) -> bool:
        return self.first_mismatch is None


# --------------------------------------------------------------------------------------------
# Blocking HTTP/1.1 plumbing


class PeerClosed(ConnectionError):
    """The peer closed the connection (cleanly, between or inside messages)."""


class _Conn:
    """A socket with a read buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def fill(self, max_bytes: int = 262144) -> bytes:
        data = self.sock.recv(max_bytes)
        if not data:
            raise PeerClosed("peer closed the connection")
        return data

    def read_until(self, delim: bytes, limit: int = MAX_HEAD) -> bytes:
        while True:
            idx = self.buf.find(delim)
            if idx >= 0:
                out = bytes(self.buf[: idx + len(delim)])
                del self.buf[: idx + len(delim)]
                return out
            if len(self.buf) > limit:
                raise ValueError("line or head too long")
            self.buf += self.fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_some(self, max_bytes: int) -> bytes:
        """Buffered bytes first, else one recv (at most ``max_bytes``)."""
        if self.buf:
            out = bytes(self.buf[:max_bytes])
            del self.buf[:max_bytes]
            return out
        return self.fill(max_bytes)


@dataclass
class UpstreamRequest:
    """A request head as an upstream received it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    peer: str
    received_at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


def _read_request_head(conn: _Conn, peer: str) -> UpstreamRequest:
    head = conn.read_until(b"\r\n\r\n").decode("latin-1")
    lines = head[:-4].split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip(" \t")))
    return UpstreamRequest(method, target, version, headers, peer)


def _iter_body(conn: _Conn, req: UpstreamRequest) -> Iterator[bytes]:
    """The request body in pieces as they arrive (content-length or chunked)."""
    te = (req.header("transfer-encoding") or "").lower()
    if "chunked" in te:
        while True:
            size = int(conn.read_until(b"\r\n").split(b";")[0].strip(), 16)
            if size == 0:
                while conn.read_until(b"\r\n") != b"\r\n":
                    pass
                return
            left = size
            while left:
                piece = conn.read_some(min(left, 262144))
                left -= len(piece)
                yield piece
            if conn.read_exact(2) != b"\r\n":
                raise ValueError("chunk not followed by CRLF")
    length = int(req.header("content-length") or "0")
    while length:
        piece = conn.read_some(min(length, 262144))
        length -= len(piece)
        yield piece


def _response_head(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    out = f"HTTP/1.1 {status} {reason}\r\n"
    for name, value in headers:
        out += f"{name}: {value}\r\n"
    return (out + "\r\n").encode("latin-1")


def _json_response(status: int, reason: str, obj: object, close: bool = False) -> bytes:
    body = json.dumps(obj).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    if close:
        headers.append(("connection", "close"))
    return _response_head(status, reason, headers) + body


def websocket_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


# --------------------------------------------------------------------------------------------
# Servers


class ThreadedUpstream:
    """A TCP server on 127.0.0.1 with one thread per connection.

    Subclasses implement :meth:`handle`.  Request heads go to :attr:`requests` (see
    :meth:`wait_requests`); :attr:`accepted` counts connections.
    """

    name = "upstream"

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name
        self._listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind((LOOPBACK, 0))
        self._listen.listen(256)
        self._listen.settimeout(0.1)
        self.port: int = self._listen.getsockname()[1]
        self.stopping = threading.Event()
        self.accepted = 0
        self.requests: list[UpstreamRequest] = []
        self._cond = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True
        )
        self._acceptor.start()

    # -- for tests ----------------------------------------------------------------------------

    def wait_requests(self, count: int, timeout: float = 5.0) -> list[UpstreamRequest]:
        """All requests so far, once there are ``count`` (or when ``timeout`` has passed)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return list(self.requests)

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._listen.close()
        self._acceptor.join(timeout=5)
        with self._cond:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> ThreadedUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- machinery ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, addr = self._listen.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(IO_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self.accepted += 1
                self._conns.add(sock)
            thread = threading.Thread(
                target=self._serve, args=(sock, f"{addr[0]}:{addr[1]}"), daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            self.handle(_Conn(sock), peer)
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._conns.discard(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _record(self, req: UpstreamRequest) -> None:
        with self._cond:
            self.requests.append(req)
            self._cond.notify_all()

    def _idle_until_closed(self, conn: _Conn) -> None:
        """Read and drop whatever comes until the peer closes or the server stops."""
        conn.sock.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn.fill()
            except TimeoutError:
                continue

    def handle(self, conn: _Conn, peer: str) -> None:
        raise NotImplementedError


class SilentUpstream(ThreadedUpstream):
    """Accepts, reads the request head, and never answers (until the proxy gives up)."""

    name = "silent"

    def handle(self, conn: _Conn, peer: str) -> None:
        self._record(_read_request_head(conn, peer))
        self._idle_until_closed(conn)


_SOURCE = re.compile(r"/source/(\d+)")
_DELAY = re.compile(r"/delay/(\d+)")


class BulkUpstream(ThreadedUpstream):
    """``POST /sink``: check a body of any size; ``GET /source/N``: stream N pattern bytes.

    The sink answers ``{"received": N, "first_mismatch": null|offset, "seconds": s}``.
    :attr:`source_sent` is how many bytes the source handed to the kernel so far (all
    connections together), :attr:`source_done` how many sources finished.
    """

    name = "bulk"

    def __init__(self, name: str | None = None, pattern: Pattern | None = None) -> None:
        self.pattern = pattern or Pattern()
        self.source_sent = 0
        self.source_done = 0
        self.sinks: list[dict[str, object]] = []
        super().__init__(name)

    def handle(self, conn: _Conn, peer: str) -> None:
        while not self.stopping.is_set():
            try:
                req = _read_request_head(conn, peer)
            except PeerClosed:
                return
            self._record(req)
            if req.method in ("POST", "PUT") and req.target == "/sink":
                self._sink(conn, req)
                continue
            match = _SOURCE.fullmatch(req.target)
            if req.method == "GET" and match:
                self._source(conn, int(match.group(1)))
                continue
            conn.sock.sendall(_json_response(404, "Not Found", {"error": "no such path"}, True))
            return

    def _sink(self, conn: _Conn, req: UpstreamRequest) -> None:
        checker = PatternChecker(self.pattern)
        started = time.monotonic()
        for piece in _iter_body(conn, req):
            checker.feed(piece)
        result = {
            "received": checker.count,
            "first_mismatch": checker.first_mismatch,
            "seconds": round(time.monotonic() - started, 3),
        }
        with self._cond:
            self.sinks.append(result)
        conn.sock.sendall(_json_response(200, "OK", result))

    def _source(self, conn: _Conn, total: int) -> None:
        head = _response_head(
            200,
            "OK",
            [("content-type", "application/octet-stream"), ("content-length", str(total))],
        )
        conn.sock.sendall(head)
        for piece in self.pattern.chunks(total):
            if self.stopping.is_set():
                raise PeerClosed("server stopping")
            conn.sock.sendall(piece)
            with self._cond:
                self.source_sent += len(piece)
        with self._cond:
            self.source_done += 1


class ScriptedUpstream(ThreadedUpstream):
    """Misbehaves on purpose, by path.

    * ``/delay/MS``: answers 200 ``delayed MS`` after MS milliseconds;
    * ``/truncate``: announces content-length 100000, sends 1000 bytes, closes;
    * ``/padded``: 200 with the header ``x-padded`` whose value has trailing spaces and tabs;
    * ``/ws``: with ``Upgrade: websocket``, answers 101 (with Sec-WebSocket-Accept) and
      :data:`WS_GREETING` in the same write, then echoes every byte it receives until the peer
      closes; ``/ws-quiet`` does the same without the greeting;
    * anything else: 200 with a JSON body naming the path.
    """

    name = "scripted"
    TRUNCATE_DECLARED = 100_000
    TRUNCATE_SENT = 1000

    def handle(self, conn: _Conn, peer: str) -> None:
        while not self.stopping.is_set():
            try:
                req = _read_request_head(conn, peer)
            except PeerClosed:
                return
            self._record(req)
            for _ in _iter_body(conn, req):
                pass
            match = _DELAY.fullmatch(req.target)
            if match:
                if self.stopping.wait(int(match.group(1)) / 1000):
                    return
                body = f"delayed {match.group(1)}".encode()
                conn.sock.sendall(
                    _response_head(
                        200,
                        "OK",
                        [("content-type", "text/plain"), ("content-length", str(len(body)))],
                    )
                    + body
                )
                continue
            if req.target == "/padded":
                conn.sock.sendall(
                    b"HTTP/1.1 200 OK\r\nx-padded: value \t \r\ncontent-length: 0\r\n\r\n"
                )
                continue
            if req.target == "/truncate":
                conn.sock.sendall(
                    _response_head(
                        200,
                        "OK",
                        [
                            ("content-type", "application/octet-stream"),
                            ("content-length", str(self.TRUNCATE_DECLARED)),
                        ],
                    )
                    + b"t" * self.TRUNCATE_SENT
                )
                time.sleep(0.05)
                return
            upgrade = (req.header("upgrade") or "").lower()
            if req.target in ("/ws", "/ws-quiet") and upgrade == "websocket":
                key = req.header("sec-websocket-key") or ""
                conn.sock.sendall(
                    _response_head(
                        101,
                        "Switching Protocols",
                        [
                            ("upgrade", "websocket"),
                            ("connection", "Upgrade"),
                            ("sec-websocket-accept", websocket_accept(key)),
                        ],
                    )
                    + (WS_GREETING if req.target == "/ws" else b"")
                )
                self._echo_bytes(conn)
                return
            conn.sock.sendall(_json_response(200, "OK", {"scripted": req.target}))

    def _echo_bytes(self, conn: _Conn) -> None:
        conn.sock.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                data = conn.read_some(65536)
            except TimeoutError:
                continue
            except PeerClosed:
                return
            conn.sock.settimeout(IO_TIMEOUT_S)
            conn.sock.sendall(data)
            conn.sock.settimeout(0.2)
