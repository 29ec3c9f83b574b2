"""An HTTP/1.1 upstream that answers every request with a description of what it received.

This server is the judge of the differential suite: whatever a proxy forwards, this is where it
is looked at.  It therefore shares no code with ubimesh and parses requests itself, strictly,
from asyncio streams.  It keeps the bytes it saw: the request target exactly as received, header
names with their case, header order, duplicates.

Every response carries a JSON body (``application/json``) of the form::

    {"echo": 1, "name": NAME, "method": "GET", "target": "/a?b", "version": "HTTP/1.1",
     "headers": [[name, value], ...], "body_length": 0, "body_sha256": "...",
     "chunked": false, "trailers": [[name, value], ...]}

and a response header ``x-echo-upstream: NAME``, so that a client can tell which upstream
answered even when there is no body (HEAD, 204).

Request headers that steer the response (they are echoed like any other header):

``x-echo-status: N``
    answer with status N (no body for 1xx, 204 and 304).
``x-echo-response-header: name=value``
    add a response header; may be repeated, the order is kept.
``x-echo-body-size: N``
    answer with N bytes of ``x`` (``application/octet-stream``) instead of the JSON body.
``x-echo-chunked: 1``
    send the response body with ``transfer-encoding: chunked``.
``x-echo-close: 1``
    send ``connection: close`` and close the connection after the response.

Two ways to run it:

* in-process: :class:`EchoServerPool` runs any number of named servers on one event loop in a
  background thread and keeps a log of every request each one received;
* as a subprocess: ``python -m tests.support.echo_upstream --port 0 --name NAME`` prints the
  bound port on its first stdout line and serves until it is terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

__all__ = ["EchoServerPool", "RequestRecord", "serve_forever"]

MAX_HEAD_BYTES = 256 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
# Long, so that a proxy never reuses a pooled connection just as the upstream closes it.
IDLE_TIMEOUT_S = 600.0

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHOD = _TOKEN
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(;.*)?")
# Field values: visible ASCII, obs-text, space and tab.  No CR, LF or NUL.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class BadRequest(Exception):
    """The request cannot be parsed; the connection gets a 400 and is closed."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass
class RequestRecord:
    """One request as the upstream received it."""

    name: str
    method: str
    target: str
    version: str
    headers: list[list[str]]
    body_length: int
    body_sha256: str
    chunked: bool
    trailers: list[list[str]]
    received_at: float = field(default=0.0, compare=False)
    peer: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "echo": 1,
            "name": self.name,
            "method": self.method,
            "target": self.target,
            "version": self.version,
            "headers": self.headers,
            "body_length": self.body_length,
            "body_sha256": self.body_sha256,
            "chunked": self.chunked,
            "trailers": self.trailers,
        }


def _latin1(raw: bytes) -> str:
    # latin-1 maps every byte to one code point, so nothing the proxy sent is lost or replaced.
    return raw.decode("latin-1")


def _parse_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise BadRequest("obsolete line folding")
        name, sep, value = line.partition(b":")
        if not sep:
            raise BadRequest(f"header line without colon: {line[:60]!r}")
        if not _TOKEN.fullmatch(name):
            # This also rejects whitespace between the name and the colon (RFC 9112 5.1).
            raise BadRequest(f"invalid header name: {name[:60]!r}")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise BadRequest(f"invalid header value for {name!r}")
        fields.append((name, value))
    return fields


def _split_lines(block: bytes) -> list[bytes]:
    """Split a CRLF-delimited block; a bare CR or LF anywhere is an error."""
    lines = block.split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise BadRequest("bare CR or LF in the message head")
    return lines


def _tokens(values: list[bytes]) -> list[str]:
    out: list[str] = []
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if part:
                out.append(_latin1(part).lower())
    return out


async def _read_chunked(
    reader: asyncio.StreamReader,
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        match = _CHUNK_SIZE.fullmatch(line[:-2])
        if match is None:
            raise BadRequest(f"invalid chunk size line: {line[:60]!r}")
        size = int(match.group(1), 16)
        if size == 0:
            break
        if len(body) + size > MAX_BODY_BYTES:
            raise BadRequest("body too large", 413)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("chunk data not followed by CRLF")
    trailer_lines: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        trailer_lines.append(line[:-2])
    return bytes(body), _parse_fields(
        _split_lines(b"\r\n".join(trailer_lines)) if trailer_lines else []
    )


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


class _Connection:
    def __init__(
        self,
        name: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: Callable[[RequestRecord], None],
        default_status: int = 200,
    ) -> None:
        self.name = name
        self.reader = reader
        self.writer = writer
        self.record = record
        self.default_status = default_status
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else ""

    async def run(self) -> None:
        try:
            while True:
                try:
                    keep_alive = await asyncio.wait_for(self.one_exchange(), IDLE_TIMEOUT_S)
                except BadRequest as exc:
                    await self.send_error(exc.status, exc.reason)
                    return
                if not keep_alive:
                    return
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            return
        finally:
            try:
                self.writer.close()
                await asyncio.wait_for(self.writer.wait_closed(), 2.0)
            except (TimeoutError, ConnectionError, OSError):
                pass

    async def send_error(self, status: int, reason: str) -> None:
        body = json.dumps({"echo_error": reason, "name": self.name}).encode()
        head = (
            _status_line(status)
            + b"content-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n".encode()
            + f"x-echo-upstream: {self.name}\r\n".encode()
            + b"connection: close\r\n\r\n"
        )
        try:
            self.writer.write(head + body)
            await asyncio.wait_for(self.writer.drain(), 5.0)
        except (TimeoutError, ConnectionError):
            pass

    async def one_exchange(self) -> bool:
        """Read one request and answer it; return whether the connection stays open."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise BadRequest("connection closed in the middle of a request head") from None
            raise
        except asyncio.LimitOverrunError:
            raise BadRequest("request head too large", 431) from None

        lines = _split_lines(head[:-4])
        request_line = lines[0]
        parts = request_line.split(b" ")
        if len(parts) != 3:
            raise BadRequest(f"malformed request line: {request_line[:100]!r}")
        method, target, version = parts
        if not _METHOD.fullmatch(method):
            raise BadRequest("invalid method")
        version_match = _VERSION.fullmatch(version)
        if version_match is None or version_match.group(1) != b"1":
            raise BadRequest(f"unsupported version {version!r}", 505)
        if not target or any(b <= 0x20 or b == 0x7F for b in target):
            raise BadRequest("invalid request target")
        fields = _parse_fields(lines[1:])

        by_name: dict[bytes, list[bytes]] = {}
        for name, value in fields:
            by_name.setdefault(name.lower(), []).append(value)

        if sum(1 for name, _ in fields if name.lower() == b"host") > 1:
            raise BadRequest("more than one host header")

        # A client that asks for 100-continue waits for it before sending the body (RFC 9110
        # 10.1.1); answer it as a server would, so such a request does not stall.
        has_body = b"transfer-encoding" in by_name or any(
            v.strip() not in (b"", b"0") for v in by_name.get(b"content-length", [])
        )
        if has_body and "100-continue" in _tokens(by_name.get(b"expect", [])):
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await self.writer.drain()

        # Message framing (RFC 9112 6.3): transfer-encoding wins over content-length.
        chunked = False
        body = b""
        trailers: list[tuple[bytes, bytes]] = []
        te = _tokens(by_name.get(b"transfer-encoding", []))
        force_close = False
        if te:
            if te[-1] != "chunked":
                raise BadRequest("transfer-encoding without chunked as the final coding")
            if b"content-length" in by_name:
                force_close = True
            chunked = True
            body, trailers = await _read_chunked(self.reader)
        elif b"content-length" in by_name:
            values = {v.strip() for raw in by_name[b"content-length"] for v in raw.split(b",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise BadRequest("invalid content-length")
            length = int(next(iter(values)))
            if length > MAX_BODY_BYTES:
                raise BadRequest("body too large", 413)
            body = await self.reader.readexactly(length)

        minor = int(version_match.group(2))
        connection = _tokens(by_name.get(b"connection", []))
        keep_alive = "keep-alive" in connection if minor == 0 else "close" not in connection
        if force_close:
            keep_alive = False

        record = RequestRecord(
            name=self.name,
            method=_latin1(method),
            target=_latin1(target),
            version=_latin1(version),
            headers=[[_latin1(n), _latin1(v)] for n, v in fields],
            body_length=len(body),
            body_sha256=hashlib.sha256(body).hexdigest(),
            chunked=chunked,
            trailers=[[_latin1(n), _latin1(v)] for n, v in trailers],
            received_at=time.monotonic(),
            peer=self.peer,
        )
        self.record(record)
        return await self.respond(record, by_name, keep_alive, minor)

    async def respond(
        self,
        record: RequestRecord,
        by_name: dict[bytes, list[bytes]],
        keep_alive: bool,
        minor: int,
    ) -> bool:
        status = self.default_status
        if b"x-echo-status" in by_name:
            raw_status = by_name[b"x-echo-status"][-1]
            if not raw_status.isdigit() or not 100 <= int(raw_status) <= 999:
                raise BadRequest("invalid x-echo-status")
            status = int(raw_status)
        if b"x-echo-close" in by_name:
            keep_alive = False

        if b"x-echo-body-size" in by_name:
            raw_size = by_name[b"x-echo-body-size"][-1]
            if not raw_size.isdigit() or int(raw_size) > MAX_BODY_BYTES:
                raise BadRequest("invalid x-echo-body-size")
            body = b"x" * int(raw_size)
            content_type = b"application/octet-stream"
        else:
            body = json.dumps(record.to_json(), separators=(",", ":")).encode()
            content_type = b"application/json"

        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", content_type),
            (b"x-echo-upstream", self.name.encode()),
        ]
        for spec in by_name.get(b"x-echo-response-header", []):
            name, sep, value = spec.partition(b"=")
            if not sep or not _TOKEN.fullmatch(name):
                raise BadRequest("invalid x-echo-response-header")
            headers.append((name, value))

        bodiless_status = status < 200 or status in (204, 304)
        chunked = b"x-echo-chunked" in by_name and not bodiless_status
        if bodiless_status:
            body = b""
        elif chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        else:
            headers.append((b"content-length", str(len(body)).encode()))
        if not keep_alive:
            headers.append((b"connection", b"close"))
        elif minor == 0:
            headers.append((b"connection", b"keep-alive"))

        out = bytearray(_status_line(status))
        for name, value in headers:
            out += name + b": " + value + b"\r\n"
        out += b"\r\n"
        if record.method != "HEAD" and not bodiless_status:
            if chunked:
                if body:
                    out += f"{len(body):x}\r\n".encode() + body + b"\r\n"
                out += b"0\r\n\r\n"
            else:
                out += body
        self.writer.write(bytes(out))
        await self.writer.drain()
        return keep_alive


class _EchoServer:
    def __init__(
        self, name: str, record: Callable[[RequestRecord], None], default_status: int = 200
    ) -> None:
        self.name = name
        self.record = record
        self.default_status = default_status
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(
            self.handle, host, port, limit=MAX_HEAD_BYTES, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await _Connection(
                self.name, reader, writer, self.record, self.default_status
            ).run()
        finally:
            if task is not None:
                self.tasks.discard(task)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except TimeoutError:
                pass


class EchoServerPool:
    """Named echo servers on one event loop in a background thread.

    ``port(name)`` starts the server on first use.  Every request each server receives is kept in
    an in-memory log, numbered in arrival order across all servers, so that a test can ask what
    reached any upstream since a given point (``cursor()`` / ``records_since()``).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="echo-upstreams", daemon=True
        )
        self._servers: dict[str, _EchoServer] = {}
        self._records: list[RequestRecord] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread.start()

    def _record(self, record: RequestRecord) -> None:
        with self._cond:
            self._records.append(record)
            self._cond.notify_all()

    def port(self, name: str) -> int:
        if self._closed:
            raise RuntimeError("echo pool is closed")
        server = self._servers.get(name)
        if server is None:
            server = _EchoServer(name, self._record)
            future = asyncio.run_coroutine_threadsafe(server.start(self.host, 0), self._loop)
            future.result(timeout=10)
            self._servers[name] = server
        return server.port

    def ports(self) -> dict[str, int]:
        return {name: server.port for name, server in self._servers.items()}

    def cursor(self) -> int:
        with self._cond:
            return len(self._records)

    def records_since(
        self, cursor: int, *, at_least: int = 0, timeout: float = 5.0
    ) -> list[RequestRecord]:
        """Records after ``cursor``; waits (bounded) until there are ``at_least`` of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._records) - cursor < at_least:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return list(self._records[cursor:])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def stop_all() -> None:
            await asyncio.gather(*(s.stop() for s in self._servers.values()))

        try:
            asyncio.run_coroutine_threadsafe(stop_all(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> EchoServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def serve_forever(
    name: str, host: str, port: int, log_requests: bool = False, status: int = 200
) -> None:
    def record(rec: RequestRecord) -> None:
        if log_requests:
            print(json.dumps(rec.to_json()), file=sys.stderr, flush=True)

    server = _EchoServer(name, record, status)
    bound = await server.start(host, port)
    print(bound, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="echo")
    parser.add_argument("--log-requests", action="store_true", help="print each record on stderr")
    parser.add_argument(
        "--status", type=int, default=200, help="status of requests without x-echo-status"
    )
    args = parser.parse_args(argv)
    asyncio.run(serve_forever(args.name, args.host, args.port, args.log_requests, args.status))


if __name__ == "__main__":
    main()
