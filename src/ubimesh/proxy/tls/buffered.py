"""Decrypted bytes into one reused buffer: the application side of a TLS connection.

The event loop's TLS protocol (uvloop's, and asyncio's since Python 3.11) has two ways to hand
decrypted bytes to its application protocol. For a plain ``asyncio.Protocol`` it calls
``SSLObject.read(256 KiB)`` per TLS record: CPython allocates the full 256 KiB for each call
and shrinks it to the record's size. Above glibc's mmap threshold (128 KiB, until the process
happens to free a larger block and glibc raises it) that is ``mmap``, a page fault, ``mremap``
and ``munmap`` for every read: about 45 µs of CPU per request on the benchmark VM. For a
buffered protocol the TLS protocol decrypts straight into the buffer ``get_buffer`` returns.

``BufferedApp`` is that buffered protocol: it sits between the TLS protocol and the real
application protocol (``HttpConnection``, ``UpstreamConnection``, the TCP proxy's sides), lends
the TLS protocol one buffer per thread, and passes each batch on to ``data_received`` as
``bytes``, exactly what the application would have received without it. Everything else is
forwarded unchanged. A batch larger than the buffer is delivered in buffer-sized pieces (the
TLS protocol asks for the rest on the next loop iteration).
"""

from __future__ import annotations

import asyncio
import threading

#: Bytes decrypted per call at most (four full TLS records); the rest waits one loop iteration.
BUFFER_SIZE = 64 * 1024


class _Buffers(threading.local):
    """One decryption buffer per thread: the bytes are copied out before the application runs,
    so every connection of a thread's event loop can share it."""

    def __init__(self) -> None:
        self.buffer = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buffer)


_buffers = _Buffers()


class BufferedApp(asyncio.BufferedProtocol):
    """Application protocol of a TLS transport that forwards to ``app`` (see the module)."""

    __slots__ = ("_data_received", "_view", "app")

    def __init__(self, app: asyncio.Protocol) -> None:
        self.app = app
        self._data_received = app.data_received
        self._view = _buffers.view

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._data_received(self._view[:nbytes].tobytes())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.app.connection_made(transport)

    def eof_received(self) -> bool | None:
        return self.app.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()
