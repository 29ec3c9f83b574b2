"""An HTTP/1.1 upstream that holds requests: the test decides when each one is answered.

It runs its own event loop in a background thread, so a test can drive a proxy with plain
blocking sockets and still control the upstream. Every request (head read, body by
Content-Length) either waits for ``release()`` (``delay=None``) or is answered after ``delay``
seconds; the answer is ``200`` with body ``ok`` on a keep-alive connection. A connection that
sends no HTTP at all (a TCP proxy test) is simply held open. Counters: ``connections``
(accepted so far), ``open_connections``, ``requests`` (heads read), ``held`` (waiting for a
release now).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from tests.support.procs import LOOPBACK


class HeldUpstream:
    def __init__(self, delay: float | None = None) -> None:
        self.delay = delay
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0
        self.connections = 0
        self.open_connections = 0
        self.requests = 0
        self.held = 0
        self._gate: asyncio.Semaphore | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> HeldUpstream:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()

    async def _start(self) -> int:
        self._gate = asyncio.Semaphore(0)
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        server = self._server
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections += 1
        self.open_connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                if self.delay is None:
                    gate = self._gate
                    assert gate is not None
                    self.held += 1
                    try:
                        await gate.acquire()
                    finally:
                        self.held -= 1
                elif self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def release(self, n: int = 1) -> None:
        """Let ``n`` held requests (the oldest first) be answered."""
        gate = self._gate
        assert gate is not None
        for _ in range(n):
            self.loop.call_soon_threadsafe(gate.release)

    def wait(self, what: str, value: int, timeout: float = 5.0) -> None:
        """Wait until the counter ``what`` equals ``value`` (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while getattr(self, what) != value:
            assert time.monotonic() < deadline, f"{what} is {getattr(self, what)}, not {value}"
            time.sleep(0.005)
