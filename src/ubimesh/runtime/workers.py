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
    """The main process's end of one worker.

    Every call carries a sequence number and its reply echoes it. One reader task takes
    whole frames off the channel and hands each reply to the call that is waiting for it; a
    call that timed out has stopped waiting, so its late reply is dropped instead of being
    taken by the next call, and a timeout can never leave half a frame unread.
    """

    def __init__(self, index: int, pid: int, sock: socket.socket) -> None:
        self.index = index
        self.pid = pid
        self.sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self._next_id = 0
        self._closed_reason = ""
        self._open_lock = asyncio.Lock()

    async def _ensure_open(self) -> asyncio.StreamWriter:
        # Calls may start together: only the first opens the stream (a second reader on the
        # same socket would steal half of the replies).
        async with self._open_lock:
            if self._writer is None:
                reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
                loop = asyncio.get_running_loop()
                self._reader_task = loop.create_task(self._read_replies(reader))
            return self._writer

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                call_id, ok, result = await _read_message(reader)
                future = self._pending.pop(call_id, None)
                if future is not None and not future.done():
                    future.set_result((ok, result))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            self._closed_reason = f"control channel closed: {type(exc).__name__}"
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError(self._closed_reason))
        self._pending.clear()

    async def call(self, command: str, payload: Any = None, timeout: float = CALL_TIMEOUT) -> Any:
        """Run ``command`` in the worker; RuntimeError carries the worker's error, TimeoutError
        means no reply within ``timeout`` seconds, ConnectionError a closed channel."""
        if self._closed_reason:
            raise ConnectionError(f"worker {self.index}: {self._closed_reason}")
        writer = await self._ensure_open()
        self._next_id += 1
        call_id = self._next_id
        future: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            writer.write(_frame((call_id, command, payload)))
            await writer.drain()
            ok, result = await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(call_id, None)
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

#: The main process's ends of the channels of the workers forked so far (see fork_worker).
_PARENT_ENDS: list[socket.socket] = []


async def serve_control(sock: socket.socket, handler: Handler) -> None:
    """Worker side: answer commands until the main process closes the channel."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    while True:
        try:
            call_id, command, payload = await _read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        try:
            result: tuple[int, bool, Any] = (call_id, True, await handler(command, payload))
            frame = _frame(result)
        except Exception as exc:  # reported to the main process, which logs it
            frame = _frame((call_id, False, f"{type(exc).__name__}: {exc}"))
        writer.write(frame)
        await writer.drain()


def fork_worker(index: int, child: Callable[[int, socket.socket], int]) -> WorkerHandle:
    """Fork one worker running ``child(index, control_socket)``; returns the main's handle.
    Call before the main process starts its event loop."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        parent_sock.close()
        # The main process's ends of the channels to earlier workers: a copy kept here would
        # hold those channels open after the main process closes them.
        for other in _PARENT_ENDS:
            other.close()
        _PARENT_ENDS.clear()
        code = 1
        try:
            code = child(index, child_sock)
        finally:
            os._exit(code)
    child_sock.close()
    _PARENT_ENDS.append(parent_sock)
    return WorkerHandle(index, pid, parent_sock)
