"""A TCP fault proxy for tests, in the spirit of Toxiproxy.

Tests put a :class:`FaultProxy` between a ubimesh proxy (or any client) and an upstream, then
add *toxics* to it at run time: latency, bandwidth limits, resets, black holes, slicing,
truncation, slow closes, and a switch that takes the whole proxy down.  It is asyncio, bound to
loopback only, and can run three ways:

* on the caller's event loop: ``await FaultProxy(upstream).start()``;
* in a background thread with its own loop, driven from synchronous test code:
  ``with FaultProxyThread() as runner: handle = runner.start_proxy(("127.0.0.1", port))``;
* as a process: ``python -m ubimesh.testing.faultproxy --listen 127.0.0.1:0 --upstream
  HOST:PORT --control 127.0.0.1:0`` prints ``{"listen": PORT, "control": PORT, ...}`` as one
  JSON line, then serves until SIGTERM or SIGINT.  :class:`FaultProxyClient` drives it.

Every control path goes through one JSON API (:meth:`FaultProxy.api`), served over HTTP by the
control server and called directly by :class:`ProxyHandle`, so the in-process handle and the
HTTP client behave the same:

=========  ==================  ===================================================
GET        /proxy              state: listen, upstream, enabled, toxics, stats
POST       /proxy              ``{"enabled": bool, "down_mode": "refuse"|"reset",
                               "upstream": "HOST:PORT"}`` (any subset)
GET        /toxics             list of toxics
POST       /toxics             create: ``{"type", "name"?, "stream"?, "toxicity"?,
                               "attributes"?}``
GET        /toxics/NAME        one toxic
POST       /toxics/NAME        update: ``{"toxicity"?, "attributes"?}`` (merged)
DELETE     /toxics/NAME        remove
POST       /reset              remove every toxic and enable the proxy
GET        /stats              counters
=========  ==================  ===================================================

Errors answer 400 (invalid), 404 (no such toxic or path) or 409 (name taken) with
``{"error": "..."}``.

Toxics (``stream`` is ``"downstream"``, data from the upstream to the client, by default, or
``"upstream"``, data from the client to the upstream; times in ms unless said):

``latency`` {latency, jitter}
    each chunk is forwarded ``latency ± jitter`` after it was read; chunks keep their order and
    a stream is delayed, not slowed (reading goes on while chunks wait, in a bounded queue).
``bandwidth`` {rate}
    at most ``rate`` KiB/s (1 KiB = 1024 bytes).
``slicer`` {average_size, size_variation, delay}
    each chunk is written in pieces of ``average_size ± size_variation`` bytes, ``delay``
    microseconds apart (TCP_NODELAY is set, so pieces leave as separate segments).
``limit_data`` (alias ``truncate``) {bytes}
    forwards ``bytes`` bytes of the stream, counted from when the toxic applied to the
    connection, then closes the connection (FIN both ways).
``reset_peer`` (alias ``reset``) {timeout, bytes}
    resets both sockets of the connection (RST: SO_LINGER 0): ``timeout`` ms after the toxic
    applied (0: at once, which for a new connection means on accept, before the upstream is
    even connected), or, when ``bytes`` is 0 or more, once that many bytes of the stream were
    forwarded and acknowledged by the peer.
``timeout`` {timeout}
    stops forwarding the stream (data read is dropped, as Toxiproxy does); after ``timeout``
    ms (unless 0) the connection is closed.
``blackhole`` {timeout}
    the whole connection stops forwarding in both directions; a connection accepted while it
    is on is never connected upstream and stays dead for its lifetime.  After ``timeout`` ms
    (unless 0) the connection is closed.
``slow_close`` {delay}
    the end of the stream (FIN) is passed on ``delay`` ms late.

Each toxic has a ``toxicity`` (0..1): when it first applies to a connection (and again when
it is updated), it is drawn whether the toxic is active for that connection.  As in
Toxiproxy, adding, updating or removing a toxic applies to new **and existing** connections:
a timer-based toxic starts counting when it reaches a connection (on accept for a new one),
and an update restarts it.

``down``: ``POST /proxy {"enabled": false}`` with ``down_mode`` ``"refuse"`` (default) stops
listening while keeping the port bound (Linux: connect(AF_UNSPEC) on the listening socket), so
new connections are refused (ECONNREFUSED) and the port cannot be taken meanwhile; ``"reset"``
keeps accepting and resets every new connection.  Either way, existing connections are closed
(``refuse``) or reset (``reset``), as Toxiproxy does when a proxy is disabled.

When the upstream cannot be connected (refused, or no answer within ``connect_timeout``), the
client connection is reset, which is the closest a TCP relay gets to passing on a refusal.

Bounds: at most ``max_connections`` connections (more are reset on accept and counted as
rejected); per connection and direction one read of ``READ_SIZE`` bytes, a queue of
``QUEUE_CHUNKS`` chunks and the transport's write buffer; a connection idle for
``idle_timeout`` seconds or whose peer does not take data for ``io_timeout`` seconds is closed;
control requests are capped in size and time.  :meth:`FaultProxy.stop` closes everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import fcntl
import http.client
import ipaddress
import json
import random
import signal
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "ControlError",
    "FaultProxy",
    "FaultProxyClient",
    "FaultProxyThread",
    "ProxyHandle",
    "Toxic",
    "main",
]

T = TypeVar("T")

READ_SIZE = 16 * 1024
QUEUE_CHUNKS = 8
MAX_CONTROL_HEAD = 16 * 1024
MAX_CONTROL_BODY = 64 * 1024
CONTROL_IO_TIMEOUT_S = 5.0
#: How long a reset or close after N bytes waits for the peer to acknowledge those bytes.
FLUSH_TIMEOUT_S = 2.0

STREAMS = ("downstream", "upstream")
DOWN_MODES = ("refuse", "reset")
ALIASES = {"truncate": "limit_data", "reset": "reset_peer"}
#: Attribute names and defaults of every toxic type.
ATTRIBUTES: dict[str, dict[str, int]] = {
    "latency": {"latency": 0, "jitter": 0},
    "bandwidth": {"rate": 0},
    "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
    "limit_data": {"bytes": 0},
    "reset_peer": {"timeout": 0, "bytes": -1},
    "timeout": {"timeout": 0},
    "blackhole": {"timeout": 0},
    "slow_close": {"delay": 0},
}


class ControlError(Exception):
    """A control request failed; ``status`` is the HTTP status the control API answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# Toxics


_toxic_ids = iter(range(1, sys.maxsize))


@dataclass
class Toxic:
    """One fault; ``uid`` identifies it across updates, ``version`` changes with each update."""

    name: str
    type: str
    stream: str = "downstream"
    toxicity: float = 1.0
    attributes: dict[str, int] = field(default_factory=dict)
    uid: int = field(default_factory=lambda: next(_toxic_ids))
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
            "attributes": dict(self.attributes),
        }

    def attr(self, key: str) -> int:
        return self.attributes[key]


def _check_toxicity(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ControlError(400, f"toxicity must be a number from 0 to 1, not {value!r}")
    return float(value)


def _merge_attributes(kind: str, current: dict[str, int], given: Any) -> dict[str, int]:
    """``current`` updated with ``given``, validated for a toxic of type ``kind``."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ControlError(400, f"attributes must be an object, not {given!r}")
    known = ATTRIBUTES[kind]
    merged = dict(current)
    for key, value in given.items():
        if key not in known:
            raise ControlError(
                400, f"{kind} has no attribute {key!r}; it takes {', '.join(sorted(known))}"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise ControlError(400, f"{kind}.{key} must be an integer, not {value!r}")
        low = -1 if (kind, key) == ("reset_peer", "bytes") else 0
        if value < low:
            raise ControlError(400, f"{kind}.{key} must be at least {low}, not {value}")
        merged[key] = value
    if kind == "bandwidth" and merged["rate"] <= 0:
        raise ControlError(400, "bandwidth.rate (KiB/s) must be more than 0")
    if kind == "slicer":
        if merged["average_size"] <= 0:
            raise ControlError(400, "slicer.average_size (bytes) must be more than 0")
        if merged["size_variation"] >= merged["average_size"]:
            raise ControlError(400, "slicer.size_variation must be less than average_size")
    return merged


def make_toxic(spec: dict[str, Any], name_taken: Callable[[str], bool]) -> Toxic:
    """A validated :class:`Toxic` from a JSON ``spec`` (see the module docstring)."""
    if not isinstance(spec, dict):
        raise ControlError(400, "a toxic is a JSON object")
    unknown = set(spec) - {"name", "type", "stream", "toxicity", "attributes"}
    if unknown:
        raise ControlError(400, f"unknown toxic field(s) {sorted(unknown)}")
    kind = spec.get("type")
    if not isinstance(kind, str):
        raise ControlError(400, "a toxic needs a type")
    kind = ALIASES.get(kind, kind)
    if kind not in ATTRIBUTES:
        raise ControlError(
            400, f"unknown toxic type {kind!r}; known: {', '.join(sorted(ATTRIBUTES))}"
        )
    stream = spec.get("stream", "downstream")
    if stream not in STREAMS:
        raise ControlError(400, f"stream must be one of {STREAMS}, not {stream!r}")
    name = spec.get("name") or f"{kind}_{stream}"
    if not isinstance(name, str) or "/" in name:
        raise ControlError(400, f"invalid toxic name {name!r}")
    if name_taken(name):
        raise ControlError(409, f"a toxic named {name!r} exists already")
    toxicity = _check_toxicity(spec.get("toxicity", 1.0))
    attributes = _merge_attributes(kind, ATTRIBUTES[kind], spec.get("attributes"))
    return Toxic(name=name, type=kind, stream=stream, toxicity=toxicity, attributes=attributes)


# --------------------------------------------------------------------------------------------
# Socket helpers


def _set_rst_on_close(sock: Any) -> None:
    """Make the next close of ``sock`` send RST instead of FIN (SO_LINGER on, 0 s)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _abort(writer: asyncio.StreamWriter | None, rst: bool) -> None:
    if writer is None:
        return
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            _set_rst_on_close(sock)
        writer.transport.abort()
    else:
        writer.close()


def _unsent_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes the kernel has not had acknowledged yet (SIOCOUTQ); 0 if unknown."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def _stop_listening(sock: socket.socket, port: int) -> bool:
    """Turn a listening socket back into a bound, non-listening one (Linux only).

    connect() with an AF_UNSPEC address disconnects a socket; on a listening TCP socket Linux
    moves it to CLOSE while keeping its bound port (when that port was bound explicitly), so
    new connections are refused and the port stays ours.  Returns False where that does not
    work (the caller then closes the socket and binds the port again on enable).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        unspec = (ctypes.c_char * 16)()  # a sockaddr whose sa_family is 0 (AF_UNSPEC)
        if int(libc.connect(sock.fileno(), unspec, 16)) != 0:
            return False
        return int(sock.getsockname()[1]) == port
    except (OSError, AttributeError):
        return False


def _check_loopback(host: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise ValueError(f"the fault proxy listens on loopback only, not on {host!r}")


def parse_hostport(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``[v6]:PORT`` too) as a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------------------------
# Connections


class _ToxicState:
    """What one toxic has done to one connection."""

    __slots__ = ("active", "bytes", "timer", "version")

    def __init__(self, active: bool, version: int) -> None:
        self.active = active
        self.version = version
        self.bytes = 0
        self.timer: asyncio.TimerHandle | None = None


class _Link:
    """One client connection and its upstream connection, with a pump for each direction."""

    def __init__(
        self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.down_reader = reader
        self.down_writer = writer
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.states: dict[int, _ToxicState] = {}
        self.closed = False
        self.finished = asyncio.Event()
        self.blackholed = False

    # -- toxics -------------------------------------------------------------------------------

    def apply(self, toxics: Iterable[Toxic]) -> None:
        """Bring this connection up to date with the proxy's toxics (new, updated, removed)."""
        if self.closed:
            return
        current = {t.uid: t for t in toxics}
        for uid in [u for u in self.states if u not in current]:
            gone = self.states.pop(uid)
            if gone.timer is not None:
                gone.timer.cancel()
        for toxic in current.values():
            state = self.states.get(toxic.uid)
            if state is None:
                active = self.proxy.rng.random() < toxic.toxicity
                state = self.states[toxic.uid] = _ToxicState(active, toxic.version)
            elif state.version == toxic.version:
                continue
            else:  # updated: draw again (the toxicity may have changed), restart its count
                state.version = toxic.version
                state.active = self.proxy.rng.random() < toxic.toxicity
                state.bytes = 0
                if state.timer is not None:
                    state.timer.cancel()
                    state.timer = None
            if state.active:
                self._arm(toxic, state)
                if self.ended():  # a reset_peer with timeout 0 acts at once
                    return
        self.blackholed = any(
            t.type == "blackhole" and self.states[t.uid].active for t in current.values()
        )

    def _arm(self, toxic: Toxic, state: _ToxicState) -> None:
        loop = asyncio.get_running_loop()
        if toxic.type in ("timeout", "blackhole") and toxic.attr("timeout") > 0:
            state.timer = loop.call_later(toxic.attr("timeout") / 1000, self.close)
        elif toxic.type == "reset_peer" and toxic.attr("bytes") < 0:
            if toxic.attr("timeout") == 0:
                self.reset(by_toxic=True)
            else:
                state.timer = loop.call_later(toxic.attr("timeout") / 1000, self.reset, True)

    def active(self, stream: str) -> list[tuple[Toxic, _ToxicState]]:
        out = []
        for toxic in self.proxy.toxics.values():
            if toxic.stream != stream:
                continue
            state = self.states.get(toxic.uid)
            if state is not None and state.active:
                out.append((toxic, state))
        return out

    # -- ending -------------------------------------------------------------------------------

    def ended(self) -> bool:
        """Whether the link was closed or reset (a call, so that type checkers re-read it)."""
        return self.closed

    def close(self) -> None:
        """Close both sockets with FIN."""
        self._end(rst=False)

    def reset(self, by_toxic: bool = False) -> None:
        """Close both sockets with RST."""
        if by_toxic and not self.closed:
            self.proxy.counters["connections_reset"] += 1
        self._end(rst=True)

    def _end(self, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for state in self.states.values():
            if state.timer is not None:
                state.timer.cancel()
        _abort(self.down_writer, rst)
        _abort(self.up_writer, rst)
        self.finished.set()

    # -- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        proxy = self.proxy
        with contextlib.suppress(OSError):
            self.down_writer.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
        self.apply(proxy.toxics.values())
        if self.closed:
            return
        if not self.blackholed:
            try:
                async with asyncio.timeout(proxy.connect_timeout):
                    self.up_reader, self.up_writer = await asyncio.open_connection(
                        *proxy.upstream, limit=READ_SIZE
                    )
            except (OSError, TimeoutError):
                proxy.counters["upstream_connect_failures"] += 1
                self.reset()
                return
            if self.ended():  # a toxic or stop() ended the link while it was connecting
                _abort(self.up_writer, rst=True)
                return
            with contextlib.suppress(OSError):
                self.up_writer.get_extra_info("socket").setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
                )
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(self._pump("upstream", self.down_reader, self.up_writer)),
        ]
        if self.up_reader is not None:
            pumps.append(
                loop.create_task(self._pump("downstream", self.up_reader, self.down_writer))
            )
        all_pumped = asyncio.gather(*pumps)
        ended = loop.create_task(self.finished.wait())
        try:
            waiters: list[asyncio.Future[Any]] = [all_pumped, ended]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            for task in pumps:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await all_pumped
            self.close()

    async def _pump(
        self,
        stream: str,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter | None,
    ) -> None:
        """Move one direction: a reader task fills a bounded queue, this task drains it."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        reader = asyncio.get_running_loop().create_task(self._read(src, queue))
        try:
            while not self.closed:
                item = await queue.get()
                if item is None:
                    await self._end_stream(stream, dst)
                    return
                await self._forward(stream, item[0], item[1], dst)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _read(
        self, src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        idle = self.proxy.idle_timeout
        try:
            while True:
                async with asyncio.timeout(idle):
                    data = await src.read(READ_SIZE)
                if not data:
                    break
                await queue.put((time.monotonic(), data))
        except TimeoutError:
            self.close()
            return
        except OSError:
            # The peer reset (or the socket broke): pass the abrupt end on to the other side.
            self.reset()
            return
        await queue.put(None)

    async def _end_stream(self, stream: str, dst: asyncio.StreamWriter | None) -> None:
        for toxic, _ in self.active(stream):
            if toxic.type == "slow_close":
                await asyncio.sleep(toxic.attr("delay") / 1000)
        if dst is None or self.closed:
            return
        try:
            if dst.can_write_eof():
                dst.write_eof()
            else:
                dst.close()
        except OSError:
            self.reset()

    async def _forward(
        self, stream: str, stamp: float, data: bytes, dst: asyncio.StreamWriter | None
    ) -> None:
        counters = self.proxy.counters
        toxics = self.active(stream)
        if dst is None or self.blackholed or any(t.type == "timeout" for t, _ in toxics):
            counters[f"bytes_dropped_{stream}"] += len(data)
            return
        delay = 0.0
        for toxic, _ in toxics:
            if toxic.type == "latency":
                jitter = toxic.attr("jitter")
                delay += (toxic.attr("latency") + self.proxy.rng.uniform(-jitter, jitter)) / 1000
        if delay > 0:
            wait = stamp + delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.closed:
                return
            toxics = self.active(stream)  # they may have changed while the chunk waited
        # Byte limits: forward up to the nearest limit, then act on it.
        cut = len(data)
        action: str | None = None
        for toxic, state in toxics:
            limit = toxic.attr("bytes") if toxic.type in ("limit_data", "reset_peer") else -1
            if limit < 0:  # reset_peer's bytes is -1 when it is time-triggered
                continue
            room = max(0, limit - state.bytes)
            if room <= cut:
                # At equal limits the reset wins: it is the harsher fault.
                if room < cut or action != "reset_peer":
                    action = toxic.type
                cut = room
        if cut:
            await self._send(toxics, data[:cut], dst)
            counters[f"bytes_{stream}"] += cut
            counters[f"bytes_dropped_{stream}"] += len(data) - cut
            for _, state in toxics:
                state.bytes += cut
        else:
            counters[f"bytes_dropped_{stream}"] += len(data)
        if action is not None and not self.closed:
            await self._flushed(dst)
            if action == "reset_peer":
                self.reset(by_toxic=True)
            else:
                self.close()

    async def _send(
        self, toxics: list[tuple[Toxic, _ToxicState]], data: bytes, dst: asyncio.StreamWriter
    ) -> None:
        rng = self.proxy.rng
        pieces = [data]
        gap = 0.0
        for toxic, _ in toxics:
            if toxic.type == "slicer":
                avg, var = toxic.attr("average_size"), toxic.attr("size_variation")
                gap = toxic.attr("delay") / 1e6
                pieces, i = [], 0
                while i < len(data):
                    size = avg + rng.randint(-var, var)
                    pieces.append(data[i : i + size])
                    i += size
                break
        rate = 0
        for toxic, _ in toxics:
            if toxic.type == "bandwidth":
                rate = toxic.attr("rate") * 1024
                break
        step = max(1, rate // 20) if rate else 0  # pace in ~50 ms steps
        for n, piece in enumerate(pieces):
            if n and gap:
                await asyncio.sleep(gap)
            parts = [piece[i : i + step] for i in range(0, len(piece), step)] if step else [piece]
            for part in parts:
                if self.closed:
                    return
                dst.write(part)
                await self._drain(dst)
                if rate:
                    await asyncio.sleep(len(part) / rate)

    async def _drain(self, dst: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.proxy.io_timeout):
                await dst.drain()
        except TimeoutError:
            self.close()
        except OSError:
            self.reset()

    async def _flushed(self, dst: asyncio.StreamWriter) -> None:
        """Wait (bounded) until the peer has acknowledged every byte written to ``dst``."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while not self.closed and _unsent_bytes(dst) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.002)


# --------------------------------------------------------------------------------------------
# The proxy


class FaultProxy:
    """A TCP relay from ``listen`` to ``upstream`` whose faults are set at run time.

    Create it, ``await start()``, change it through :meth:`api` (or the methods it wraps),
    ``await stop()``.  All methods must be called on the loop the proxy was started on;
    :class:`FaultProxyThread` and :class:`FaultProxyClient` are the ways in from elsewhere.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        name: str = "faultproxy",
        control: tuple[str, int] | None = None,
        max_connections: int = 1024,
        connect_timeout: float = 5.0,
        idle_timeout: float = 300.0,
        io_timeout: float = 60.0,
        seed: int | None = None,
    ) -> None:
        _check_loopback(listen[0])
        if control is not None:
            _check_loopback(control[0])
        self.name = name
        self.upstream = upstream
        self.listen_addr = listen
        self.control_addr = control
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        self.rng = random.Random(seed)
        self.toxics: dict[str, Toxic] = {}
        self.enabled = True
        self.down_mode = "refuse"
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "connections_accepted",
                "connections_rejected",
                "connections_reset",
                "upstream_connect_failures",
                "bytes_upstream",
                "bytes_downstream",
                "bytes_dropped_upstream",
                "bytes_dropped_downstream",
            ),
            0,
        )
        self.links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._control: asyncio.Server | None = None
        self.port = 0
        self.control_port = 0

    # -- life ---------------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        """Bind and listen (and serve the control API if ``control`` was given)."""
        host, port = self.listen_addr
        probe = None
        if port == 0:
            # Linux keeps the port of a socket that stops listening (see _stop_listening) only
            # if it was bound to that port explicitly; so let a probe socket pick the port and
            # bind ours to it explicitly while the probe still holds it (both SO_REUSEADDR and
            # not listening: allowed), which leaves no window for anyone else to take it.
            probe = self._new_socket()
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        try:
            sock = self._new_socket()
            sock.bind((host, port))
        finally:
            if probe is not None:
                probe.close()
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._listen()
        if self.control_addr is not None:
            self._control = await asyncio.start_server(
                self._serve_control, *self.control_addr, limit=MAX_CONTROL_HEAD
            )
            self.control_port = self._control.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening, close every connection and the control server."""
        self._stop_accepting()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for link in list(self.links):
            link.close()
        if self._control is not None:
            self._control.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._control.wait_closed()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # a strong reference, so the task is not collected mid-flight
        task.add_done_callback(self._tasks.discard)

    def _new_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.listen_addr[0] else socket.AF_INET
        sock = socket.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        return sock

    def _listen(self) -> None:
        if self._sock is None:  # _stop_listening failed earlier: bind the same port again
            sock = self._new_socket()
            sock.bind((self.listen_addr[0], self.port))
            self._sock = sock
        self._sock.listen(128)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(self._sock))

    def _stop_accepting(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.05)  # out of resources: let connections finish
                    continue
                return
            self.counters["connections_accepted"] += 1
            if (not self.enabled and self.down_mode == "reset") or len(
                self.links
            ) >= self.max_connections:
                if self.enabled:
                    self.counters["connections_rejected"] += 1
                else:
                    self.counters["connections_reset"] += 1
                _set_rst_on_close(conn)
                conn.close()
                continue
            self._spawn(self._handle(conn))

    async def _handle(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=READ_SIZE)
        except OSError:
            conn.close()
            return
        link = _Link(self, reader, writer)
        self.links.add(link)
        try:
            await link.run()
        finally:
            link.close()
            self.links.discard(link)

    # -- control ------------------------------------------------------------------------------

    def _changed(self) -> None:
        toxics = list(self.toxics.values())
        for link in list(self.links):
            link.apply(toxics)

    def stats(self) -> dict[str, int]:
        return {**self.counters, "connections_active": len(self.links)}

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": f"{self.listen_addr[0]}:{self.port}",
            "upstream": f"{self.upstream[0]}:{self.upstream[1]}",
            "enabled": self.enabled,
            "down_mode": self.down_mode,
            "toxics": [t.to_json() for t in self.toxics.values()],
            "stats": self.stats(),
        }

    def add_toxic(self, spec: dict[str, Any]) -> Toxic:
        toxic = make_toxic(spec, lambda n: n in self.toxics)
        self.toxics[toxic.name] = toxic
        self._changed()
        return toxic

    def update_toxic(self, name: str, spec: dict[str, Any]) -> Toxic:
        toxic = self._toxic(name)
        if not isinstance(spec, dict) or set(spec) - {"toxicity", "attributes"}:
            raise ControlError(400, "an update takes only toxicity and attributes")
        attributes = _merge_attributes(toxic.type, toxic.attributes, spec.get("attributes"))
        if "toxicity" in spec:
            toxic.toxicity = _check_toxicity(spec["toxicity"])
        toxic.attributes = attributes
        toxic.version += 1
        self._changed()
        return toxic

    def remove_toxic(self, name: str) -> None:
        self._toxic(name)
        del self.toxics[name]
        self._changed()

    def _toxic(self, name: str) -> Toxic:
        try:
            return self.toxics[name]
        except KeyError:
            raise ControlError(404, f"no toxic named {name!r}") from None

    def set_enabled(self, enabled: bool, down_mode: str | None = None) -> None:
        """Take the proxy down (see the module docstring) or bring it back up."""
        if down_mode is not None:
            if down_mode not in DOWN_MODES:
                raise ControlError(400, f"down_mode must be one of {DOWN_MODES}")
            self.down_mode = down_mode
        if enabled == self.enabled:
            return
        self.enabled = enabled
        if enabled:
            if self._accepting is None:
                self._listen()
            return
        if self.down_mode == "refuse":
            self._stop_accepting()
            if self._sock is not None and not _stop_listening(self._sock, self.port):
                self._sock.close()
                self._sock = None
        for link in list(self.links):
            if self.down_mode == "reset":
                link.reset(by_toxic=True)
            else:
                link.close()

    def api(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """Answer one control request: ``(status, JSON value)``; see the module docstring."""
        try:
            return self._api(method, path.rstrip("/") or "/", body)
        except ControlError as exc:
            return exc.status, {"error": exc.message}

    def _api(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if path == "/proxy" and method == "GET":
            return 200, self.state()
        if path == "/proxy" and method == "POST":
            if not isinstance(body, dict) or set(body) - {"enabled", "down_mode", "upstream"}:
                raise ControlError(400, "POST /proxy takes enabled, down_mode and upstream")
            if "upstream" in body:
                try:
                    self.upstream = parse_hostport(str(body["upstream"]))
                except ValueError as exc:
                    raise ControlError(400, str(exc)) from None
            enabled = body.get("enabled", self.enabled)
            if not isinstance(enabled, bool):
                raise ControlError(400, "enabled must be true or false")
            self.set_enabled(enabled, body.get("down_mode"))
            return 200, self.state()
        if path == "/stats" and method == "GET":
            return 200, self.stats()
        if path == "/reset" and method == "POST":
            self.toxics.clear()
            self._changed()
            self.set_enabled(True)
            return 200, self.state()
        if path == "/toxics" and method == "GET":
            return 200, [t.to_json() for t in self.toxics.values()]
        if path == "/toxics" and method == "POST":
            return 200, self.add_toxic(body).to_json()
        if path.startswith("/toxics/"):
            name = path[len("/toxics/") :]
            if method == "GET":
                return 200, self._toxic(name).to_json()
            if method == "POST":
                return 200, self.update_toxic(name, body).to_json()
            if method == "DELETE":
                self.remove_toxic(name)
                return 204, None
        raise ControlError(404, f"no route for {method} {path}")

    async def _serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One HTTP/1.1 request per connection, JSON in and out, then close."""
        try:
            async with asyncio.timeout(CONTROL_IO_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    key, _, value = line.partition(":")
                    if key.strip().lower() == "content-length":
                        length = int(value.strip())
                if not 0 <= length <= MAX_CONTROL_BODY:
                    raise ValueError("control request body too large")
                raw = await reader.readexactly(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    status, answer = 400, {"error": "the body is not JSON"}
                else:
                    status, answer = self.api(method, target.split("?", 1)[0], body)
                payload = b"" if status == 204 else json.dumps(answer).encode()
                reason = http.client.responses.get(status, "")
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
            pass  # a broken control request gets no answer; the client sees the close
        finally:
            writer.close()


# --------------------------------------------------------------------------------------------
# Synchronous control: the in-process handle and the HTTP client share these methods


class _Controls:
    """Control methods over one request primitive (subclasses provide :meth:`request`)."""

    def request(self, method: str, path: str, body: Any = None) -> Any:
        raise NotImplementedError

    def add_toxic(
        self,
        type: str,  # Toxiproxy's field name
        name: str | None = None,
        stream: str = "downstream",
        toxicity: float = 1.0,
        **attributes: int,
    ) -> dict[str, Any]:
        """Add a toxic; returns it as JSON.  Raises :class:`ControlError` on a bad spec."""
        spec: dict[str, Any] = {
            "type": type,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": attributes,
        }
        if name is not None:
            spec["name"] = name
        result: dict[str, Any] = self.request("POST", "/toxics", spec)
        return result

    def update_toxic(
        self, name: str, toxicity: float | None = None, **attributes: int
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {"attributes": attributes}
        if toxicity is not None:
            spec["toxicity"] = toxicity
        result: dict[str, Any] = self.request("POST", f"/toxics/{name}", spec)
        return result

    def remove_toxic(self, name: str) -> None:
        self.request("DELETE", f"/toxics/{name}")

    def toxics(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/toxics")
        return result

    def disable(self, mode: str = "refuse") -> None:
        """Take the proxy down: ``"refuse"`` new connections, or ``"reset"`` them."""
        self.request("POST", "/proxy", {"enabled": False, "down_mode": mode})

    def enable(self) -> None:
        self.request("POST", "/proxy", {"enabled": True})

    def set_upstream(self, host: str, port: int) -> None:
        """Send new connections to ``host:port`` (existing ones keep their upstream)."""
        self.request("POST", "/proxy", {"upstream": f"{host}:{port}"})

    def reset(self) -> None:
        """Remove every toxic and enable the proxy."""
        self.request("POST", "/reset")

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/proxy")
        return result

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = self.request("GET", "/stats")
        return result


def _result(status: int, answer: Any) -> Any:
    if status >= 400:
        message = answer.get("error", str(answer)) if isinstance(answer, dict) else str(answer)
        raise ControlError(status, message)
    return answer


class FaultProxyClient(_Controls):
    """Drives a fault proxy's control API over HTTP (each call: one connection, bounded)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            payload = None if body is None else json.dumps(body)
            headers = {} if payload is None else {"content-type": "application/json"}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return _result(resp.status, json.loads(raw) if raw else None)


class ProxyHandle(_Controls):
    """A :class:`FaultProxy` running in a :class:`FaultProxyThread`, driven synchronously."""

    def __init__(self, runner: FaultProxyThread, proxy: FaultProxy) -> None:
        self._runner = runner
        self.proxy = proxy

    @property
    def port(self) -> int:
        """The port clients connect to (on ``host``)."""
        return self.proxy.port

    @property
    def host(self) -> str:
        return self.proxy.listen_addr[0]

    @property
    def control_port(self) -> int:
        """The HTTP control API's port, 0 unless the proxy was started with ``control=True``."""
        return self.proxy.control_port

    def request(self, method: str, path: str, body: Any = None) -> Any:
        async def call() -> tuple[int, Any]:
            return self.proxy.api(method, path, body)

        return _result(*self._runner.call(call()))

    def stop(self) -> None:
        self._runner.call(self.proxy.stop())


class FaultProxyThread:
    """An event loop in a daemon thread that runs fault proxies for synchronous tests.

    ``with FaultProxyThread() as runner: handle = runner.start_proxy(("127.0.0.1", port))``;
    leaving the block stops every proxy started on it and joins the thread (bounded).
    """

    def __init__(self, call_timeout: float = 10.0) -> None:
        self.call_timeout = call_timeout
        self._loop = asyncio.new_event_loop()
        self._proxies: list[FaultProxy] = []
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="faultproxy", daemon=True
        )
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the runner's loop and return its result (or raise its error)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.call_timeout)

    def start_proxy(
        self,
        upstream: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        control: bool = False,
        **options: Any,
    ) -> ProxyHandle:
        """Start a :class:`FaultProxy` (options as its constructor) and return its handle."""
        proxy = FaultProxy(
            upstream, listen, control=("127.0.0.1", 0) if control else None, **options
        )
        self.call(proxy.start())
        self._proxies.append(proxy)
        return ProxyHandle(self, proxy)

    def stop(self, timeout: float = 10.0) -> None:
        if not self._thread.is_alive():
            return

        async def stop_all() -> None:
            await asyncio.gather(*(p.stop() for p in self._proxies), return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(stop_all(), self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> FaultProxyThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Command line


async def _serve(args: argparse.Namespace) -> None:
    proxy = FaultProxy(
        parse_hostport(args.upstream),
        parse_hostport(args.listen),
        name=args.name,
        control=parse_hostport(args.control),
        max_connections=args.max_connections,
        seed=args.seed,
    )
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        json.dumps(
            {
                "listen": proxy.port,
                "control": proxy.control_port,
                "upstream": args.upstream,
                "name": args.name,
            }
        ),
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await proxy.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ubimesh.testing.faultproxy",
        description="A Toxiproxy-style TCP fault proxy for tests (loopback only).",
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--control", default="127.0.0.1:0", help="HOST:PORT of the JSON API")
    parser.add_argument("--name", default="faultproxy")
    parser.add_argument("--max-connections", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=None, help="seed for jitter and toxicity")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (ValueError, OSError) as exc:
        print(f"faultproxy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
