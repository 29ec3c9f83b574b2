"""Upstream replicas that fail on cue, for the retry tests (integration and differential).

Each request carries ``x-test-id: ID`` (steady across a proxy's retries, since the proxy sends
the same headers again) and ``x-script: A,B,C``: the n-th attempt of ID (counted over every
replica of the same :class:`Ledger`) does the n-th step, the last step repeating:

* ``NNN``: answer status NNN with a small body (``attempt N``);
* ``reset``: close the connection without answering;
* ``hang``: never answer (until the proxy closes the connection or the server stops);
* ``delayMS``: answer 200 after MS milliseconds;
* ``partial``: answer 200 with content-length 1000, send 10 bytes, close;
* ``stall``: answer 200 with content-length 1000, send 10 bytes, then nothing more.

A replica can also be told to answer every request the same way (``always=``), whatever the
script says. Every attempt is written to the shared ledger (replica, method, target, body
length and digest, the x-envoy-* headers), which is how the tests count executions. Plain
blocking sockets and threads (``tests.support.upstreams.ThreadedUpstream``): no proxy code.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

from tests.support.upstreams import (
    PeerClosed,
    ThreadedUpstream,
    _Conn,
    _iter_body,
    _read_request_head,
    _response_head,
)

__all__ = ["Attempt", "Ledger", "RetryReplica"]


@dataclass
class Attempt:
    """One request as a replica received it."""

    test_id: str
    number: int
    replica: str
    method: str
    target: str
    body_length: int
    body_sha256: str
    step: str
    headers: dict[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)


class Ledger:
    """Attempts per test id, shared by the replicas of one test module."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.attempts: list[Attempt] = []
        self._counts: dict[str, int] = {}

    def next_number(self, test_id: str) -> int:
        with self._lock:
            n = self._counts.get(test_id, 0) + 1
            self._counts[test_id] = n
            return n

    def record(self, attempt: Attempt) -> None:
        with self._lock:
            self.attempts.append(attempt)
            self._lock.notify_all()

    def of(self, test_id: str) -> list[Attempt]:
        with self._lock:
            return [a for a in self.attempts if a.test_id == test_id]

    def wait(self, test_id: str, count: int, timeout: float = 3.0) -> list[Attempt]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [a for a in self.attempts if a.test_id == test_id]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self._lock.wait(left)


class RetryReplica(ThreadedUpstream):
    """One replica; see the module docstring."""

    def __init__(self, name: str, ledger: Ledger, always: str | None = None) -> None:
        self.ledger = ledger
        self.always = always
        super().__init__(name)

    def handle(self, conn: _Conn, peer: str) -> None:
        while not self.stopping.is_set():
            try:
                req = _read_request_head(conn, peer)
            except PeerClosed:
                return
            self._record(req)
            digest = hashlib.sha256()
            length = 0
            for piece in _iter_body(conn, req):
                digest.update(piece)
                length += len(piece)
            test_id = req.header("x-test-id") or ""
            number = self.ledger.next_number(test_id)
            steps = [s.strip() for s in (req.header("x-script") or "200").split(",")]
            step = self.always or steps[min(number, len(steps)) - 1]
            self.ledger.record(
                Attempt(
                    test_id,
                    number,
                    self.name,
                    req.method,
                    req.target,
                    length,
                    digest.hexdigest(),
                    step,
                    {n.lower(): v for n, v in req.headers if n.lower().startswith("x-envoy")},
                )
            )
            if step == "reset":
                return
            if step == "hang":
                self._idle_until_closed(conn)
                return
            if step == "stall":
                conn.sock.sendall(
                    _response_head(200, "OK", [("content-length", "1000")]) + b"s" * 10
                )
                self._idle_until_closed(conn)
                return
            if step == "partial":
                conn.sock.sendall(
                    _response_head(200, "OK", [("content-length", "1000")]) + b"p" * 10
                )
                time.sleep(0.05)
                return
            status = 200
            if step.startswith("delay"):
                if self.stopping.wait(int(step[5:]) / 1000):
                    return
            else:
                status = int(step)
            body = f"attempt {number}".encode()
            conn.sock.sendall(
                _response_head(
                    status,
                    "X",
                    [
                        ("content-type", "text/plain"),
                        ("content-length", str(len(body))),
                        ("x-replica", self.name),
                    ],
                )
                + body
            )
