"""Worker processes and the control channel between them and the main process.

Like Envoy's worker threads, but processes (the GIL allows one core per process): the main
process binds every listening socket once, forks ``--concurrency`` workers that inherit them and
accept on them, and keeps the admin interface, the configuration source and stats aggregation
for itself. Commands travel over a socketpair as length-prefixed pickles; each call has a
timeout, so a stuck worker cannot hang the admin interface.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

_HEADER = struct.Struct("!I")
#: The largest control message accepted (a snapshot of many thousand routes fits well within).
MAX_MESSAGE = 64 * 1024 * 1024
CALL_TIMEOUT = 10.0


async def _read_message(reader: asyncio.StreamReader) -> Any:
    size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
    if size > MAX_MESSAGE:
        raise ValueError(f"control message of {size} bytes is over the limit")
    return pickle.loads(await reader.readexactly(size))


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


class WorkerHandle:
    """The main process's end of one worker."""

    def __init__(self, index: int, pid: int, sock: socket.socket) -> None:
        self.index = index
        self.pid = pid
        self.sock = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def call(self, command: str, payload: Any = None, timeout: float = CALL_TIMEOUT) -> Any:
        async with self._lock:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
            assert self._reader is not None
            self._writer.write(_frame((command, payload)))
            await self._writer.drain()
            ok, result = await asyncio.wait_for(_read_message(self._reader), timeout)
            if not ok:
                raise RuntimeError(f"worker {self.index}: {result}")
            return result

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def kill(self, sig: int = signal.SIGTERM) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


Handler = Callable[[str, Any], Awaitable[Any]]


async def serve_control(sock: socket.socket, handler: Handler) -> None:
    """Worker side: answer commands until the main process closes the channel."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    while True:
        try:
            command, payload = await _read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        try:
            result = (True, await handler(command, payload))
        except Exception as exc:  # reported to the main process, which logs it
            result = (False, f"{type(exc).__name__}: {exc}")
        writer.write(_frame(result))
        await writer.drain()


def fork_worker(index: int, child: Callable[[int, socket.socket], int]) -> WorkerHandle:
    """Fork one worker running ``child(index, control_socket)``; returns the main's handle.
    Call before the main process starts its event loop."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        parent_sock.close()
        code = 1
        try:
            code = child(index, child_sock)
        finally:
            os._exit(code)
    child_sock.close()
    return WorkerHandle(index, pid, parent_sock)
