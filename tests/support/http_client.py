"""Two small HTTP/1.x clients with one result type.

* :func:`send_raw` writes exactly the bytes it is asked to (header order, case, duplicates, odd
  request targets, chunked bodies, HTTP/1.0) on a fresh socket and parses the answer itself.
* :func:`send_httpclient` uses :mod:`http.client` with ``skip_host``/``skip_accept_encoding``, so
  that it too sends only the headers it was given.

Both record the client's local port (needed to normalise ``%DOWNSTREAM_REMOTE_ADDRESS%``) and
bound every wait with a timeout.  A request that gets no response yields a :class:`Response`
whose ``error`` says what happened instead of raising.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Response", "build_request", "send_httpclient", "send_raw"]


@dataclass
class Response:
    status: int | None = None
    reason: str = ""
    version: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    local_port: int = 0
    error: str | None = None


def build_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None = None,
    chunks: Sequence[bytes] | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    """The exact bytes of a request; ``chunks`` sends the body chunked (no header is added)."""
    out = bytearray(f"{method} {target} {version}\r\n".encode("latin-1"))
    for name, value in headers:
        out += f"{name}: {value}\r\n".encode("latin-1")
    out += b"\r\n"
    if chunks is not None:
        for chunk in chunks:
            out += f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        out += b"0\r\n\r\n"
    elif body:
        out += body
    return bytes(out)


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("response not complete before the deadline")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            raise ConnectionError("connection closed by peer")
        self.buf += data

    def until(self, delim: bytes) -> bytes:
        while True:
            idx = self.buf.find(delim)
            if idx >= 0:
                out = bytes(self.buf[: idx + len(delim)])
                del self.buf[: idx + len(delim)]
                return out
            self._fill()

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self) -> bytes:
        try:
            while True:
                self._fill()
        except ConnectionError:
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out


def _read_response(reader: _Reader, method: str, resp: Response) -> None:
    while True:
        head = reader.until(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        resp.version, resp.status, resp.reason = version, int(code), reason
        resp.headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            resp.headers.append((name, value.strip(" \t")))
        if not 100 <= resp.status < 200 or resp.status == 101:
            break
        # Interim 1xx responses (100 Continue) are skipped, as clients do.
    lower = {n.lower(): v for n, v in resp.headers}
    if method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
        return
    if "chunked" in lower.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = reader.until(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while reader.until(b"\r\n") != b"\r\n":
                    pass
                break
            body += reader.exactly(size)
            reader.exactly(2)
        resp.body = bytes(body)
    elif "content-length" in lower:
        resp.body = reader.exactly(int(lower["content-length"]))
    else:
        resp.body = reader.rest()


def send_raw(
    host: str,
    port: int,
    data: bytes,
    method: str,
    timeout: float = 10.0,
) -> Response:
    """Send ``data`` on a new connection and read one response (``method`` tells about HEAD)."""
    resp = Response()
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        resp.error = f"connect failed: {exc!r}"
        return resp
    with sock:
        resp.local_port = sock.getsockname()[1]
        try:
            sock.sendall(data)
        except OSError:
            # The server may answer (431, 400) and close before it has read everything; what it
            # answered is still in our receive buffer.
            pass
        try:
            _read_response(_Reader(sock, deadline), method, resp)
        except (OSError, ValueError) as exc:
            if resp.status is None:
                resp.error = f"no response: {type(exc).__name__}"
            else:
                resp.error = f"incomplete response: {type(exc).__name__}"
    return resp


def send_httpclient(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Response:
    """Send one request with :mod:`http.client`, adding no header of its own."""
    resp = Response()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
        assert conn.sock is not None
        resp.local_port = conn.sock.getsockname()[1]
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body)
        r = conn.getresponse()
        resp.status, resp.reason = r.status, r.reason
        resp.version = "HTTP/1.1" if r.version == 11 else "HTTP/1.0"
        resp.headers = list(r.getheaders())
        resp.body = r.read()
    except (OSError, http.client.HTTPException) as exc:
        if resp.status is None:
            resp.error = f"no response: {type(exc).__name__}"
        else:
            resp.error = f"incomplete response: {type(exc).__name__}"
    finally:
        conn.close()
    return resp
