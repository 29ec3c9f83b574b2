"""HTTP/1.1 upstream connections and the per-host keep-alive pool.

An ``UpstreamConnection`` is the client-side codec: it writes request bytes the router gives it
and turns the response bytes into calls on the ``UpstreamCallbacks`` attached for the current
request (one request at a time: no upstream pipelining, as in Envoy). When a response ends
cleanly on a reusable connection, the connection goes back to its host's ``Http1Pool``.

Pool contract: ``Http1Pool.acquire(cb)`` calls ``cb.on_pool_ready(conn)`` (synchronously when an
idle connection exists, later otherwise) or ``cb.on_pool_failure(reason)`` exactly once, unless
the caller first calls ``Http1Pool.cancel(cb)``. ``on_pool_failure`` may come synchronously
too: ``OVERFLOW`` when the cluster's circuit breakers have no pending-request slot left (the
router answers 503 with flag UO), ``CONNECTION_TERMINATION`` on a closed pool. Idle
connections are reused last-in first-out (the warmest one first) and closed after the
cluster's idle timeout. Every queue here is bounded: waiting requests by the cluster's
``max_pending_requests``, connections being made by its ``max_connections`` (plus at most one
per host that has none), idle connections by ``MAX_IDLE_PER_HOST``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import httptools

from ubimesh.proxy.tls.buffered import BufferedApp
from ubimesh.proxy.upstream.circuit_breaker import Resource, ResourceManager
from ubimesh.proxy.upstream.host import Host

if TYPE_CHECKING:
    from ubimesh.proxy.tls.downstream import TlsStats
    from ubimesh.proxy.tls.manager import TlsEndpoint
    from ubimesh.proxy.tls.verify import PeerVerifier
    from ubimesh.proxy.upstream.cluster import UpstreamCluster

log = logging.getLogger("ubimesh.upstream")

#: Idle connections kept per host at most; beyond that a released connection is closed.
MAX_IDLE_PER_HOST = 1024

# Reset reasons, worded as Envoy words them in local replies and logs.
CONNECTION_FAILURE = "connection failure"
CONNECTION_TIMEOUT = "connection timeout"
CONNECTION_TERMINATION = "connection termination"
PROTOCOL_ERROR = "protocol error"
OVERFLOW = "overflow"


# Response header flags, collected as the headers arrive so that nobody rescans the list.
RH_HOP_BY_HOP = 1
RH_CONTENT_LENGTH = 2
RH_SERVER = 4
#: Response headers that describe only the upstream hop and are not relayed (Envoy's list).
RESPONSE_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "trailer"}
)
RESPONSE_HEADER_FLAGS: dict[str, int] = {
    **dict.fromkeys(RESPONSE_HOP_BY_HOP, RH_HOP_BY_HOP),
    "content-length": RH_CONTENT_LENGTH,
    "server": RH_SERVER,
}  # fmt: skip


class UpstreamCallbacks(Protocol):
    """What the router side of a request implements to receive the upstream's response."""

    def on_pool_ready(self, conn: UpstreamConnection) -> None: ...
    def on_pool_failure(self, reason: str) -> None: ...
    def on_upstream_headers(
        self, status: int, headers: list[tuple[str, str]], keep_alive: bool, flags: int
    ) -> None:
        """``flags`` are the RH_* bits of the headers present (see RESPONSE_HEADER_FLAGS)."""

    def on_upstream_data(self, data: bytes) -> None: ...
    def on_upstream_end(self) -> None: ...
    def on_upstream_reset(self, reason: str) -> None: ...
    def on_upstream_upgrade(self, rest: bytes) -> None: ...
    def on_upstream_pause(self) -> None: ...
    def on_upstream_read_begin(self) -> None: ...
    def on_upstream_read_end(self) -> None: ...
    def on_upstream_resume(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an upstream host."""

    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.callbacks: UpstreamCallbacks | None = None
        self.requests = 0
        self.closed = False
        self.idle_since = 0.0
        self.write_paused = False
        self.cx_resource: Resource | None = None
        """The circuit-breaker slot (cluster ``connections``) this connection holds until it
        closes; None once given back."""
        # Per-response state.
        self._headers: list[tuple[str, str]] = []
        self._flags = 0
        self._headers_done = False
        self._expect_no_body = False
        self._upgraded = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        limit = self.pool.buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 4)

    def data_received(self, data: bytes) -> None:
        reader = self.callbacks
        if reader is None:
            # Bytes on an idle connection (the upstream broke framing) or after a tunnel
            # ended: never reuse the connection.
            self.abort()
            return
        if self._upgraded:
            reader.on_upstream_data(data)
            return
        reader.on_upstream_read_begin()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded = True
            offset = exc.args[0] if exc.args else len(data)
            cb = self.callbacks
            if cb is not None:
                cb.on_upstream_upgrade(data[offset:])
        except httptools.HttpParserError:
            self._fail(PROTOCOL_ERROR)
        finally:
            reader.on_upstream_read_end()

    def eof_received(self) -> bool | None:
        # A close-delimited response body ends with EOF: let the parser see it through
        # connection_lost. Returning None closes the transport.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.on_closed(self)
        cb = self.callbacks
        if cb is None:
            return
        if self._headers_done and not self._upgraded:
            # A response without length ends at EOF (RFC 9112 section 6.3, rule 8).
            try:
                self.parser.feed_data(b"")
            except httptools.HttpParserError:
                pass
            if self.callbacks is None:
                return
        self.callbacks = None
        if self._upgraded:
            cb.on_upstream_end()
        else:
            cb.on_upstream_reset(CONNECTION_TERMINATION)

    def pause_writing(self) -> None:
        self.write_paused = True
        cb = self.callbacks
        if cb is not None:
            cb.on_upstream_pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        cb = self.callbacks
        if cb is not None:
            cb.on_upstream_resume()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._headers_done:
            key = name.decode("latin-1").lower()
            # Surrounding whitespace is not part of a field value (RFC 9110 5.5); httptools
            # drops the leading part only. Envoy's codec strips both.
            self._headers.append((key, value.rstrip(b" \t").decode("latin-1")))
            kind = RESPONSE_HEADER_FLAGS.get(key)
            if kind is not None:
                self._flags |= kind

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim responses (100 Continue, 103 Early Hints) are consumed here: the proxy
            # answers Expect: 100-continue itself, as Envoy does by default.
            self._headers = []
            self._flags = 0
            return
        self._headers_done = True
        headers = self._headers
        flags = self._flags
        self._headers = []
        self._flags = 0
        cb = self.callbacks
        if cb is not None:
            cb.on_upstream_headers(status, headers, self.parser.should_keep_alive(), flags)
            if self._expect_no_body and status != 101:
                # HEAD: the parser would wait for a body that never comes. Finish now and start
                # a fresh parser for the next response on this connection.
                self.parser = httptools.HttpResponseParser(self)
                self._finish(keep_alive=True)

    def on_body(self, body: bytes) -> None:
        cb = self.callbacks
        if cb is not None:
            cb.on_upstream_data(body)

    def on_message_complete(self) -> None:
        if not self._headers_done or self._upgraded or self.parser.get_status_code() == 101:
            # The end of an interim response, or of a 101 head: what follows is a tunnel.
            return
        self._finish(self.parser.should_keep_alive())

    # -- used by the router -----------------------------------------------------------------

    def attach(self, callbacks: UpstreamCallbacks, expect_no_body: bool) -> None:
        self.callbacks = callbacks
        self._headers_done = False
        self._expect_no_body = expect_no_body
        self.requests += 1

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed and transport.can_write_eof():
            transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def detach_and_close(self) -> None:
        """The request gave up on this connection (downstream reset, timeout): close it,
        since the rest of its response would desynchronise a reuse."""
        self.callbacks = None
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    # -- internals --------------------------------------------------------------------------

    def _finish(self, keep_alive: bool) -> None:
        cb = self.callbacks
        self.callbacks = None
        self._headers_done = False
        if cb is not None:
            cb.on_upstream_end()
        if keep_alive and not self.closed:
            self.pool.release(self)
        else:
            self.abort()

    def _fail(self, reason: str) -> None:
        cb = self.callbacks
        self.callbacks = None
        self.abort()
        if cb is not None:
            cb.on_upstream_reset(reason)


def pool_for(host: Host, cluster: UpstreamCluster) -> Http1Pool:
    """The host's connection pool, made on first use.

    A host (and its pool) can outlive its ``UpstreamCluster``: a reload that leaves the
    connection settings alone rebuilds the cluster around the same hosts. The first request
    through the new cluster points the pool at the new cluster's circuit breakers; what the
    old ones admitted is given back to them (each connection and pending request remembers its
    ``Resource``)."""
    pool: Http1Pool | None = host.pool
    if pool is None:
        pool = host.pool = Http1Pool(host, cluster)
    elif pool.owner is not cluster:
        pool.adopt(cluster)
    return pool


class Http1Pool:
    """Keep-alive connections to one host, and the requests waiting for one.

    Envoy's HTTP/1 pool with the cluster's circuit breakers (routing priority DEFAULT, the only
    one routes can use):

    * an idle connection serves a request at once (last in, first out);
    * otherwise the request waits in ``queue`` (FIFO) for a connection. Waiting takes one of
      the cluster's ``max_pending_requests``; when none is left the request fails at once with
      ``OVERFLOW`` (``upstream_rq_pending_overflow``), so the queue is bounded;
    * a new connection is opened while more requests wait than connections are being made,
      if the cluster's ``max_connections`` allows it; else ``upstream_cx_overflow`` is counted
      and the request waits for a busy connection of this host to be released. A host with no
      connection at all still gets one (Envoy does the same: otherwise its waiting requests
      could never be served);
    * a failed connect fails every waiting request (Envoy purges its pending streams: the
      caller decides whether to try elsewhere);
    * a released connection goes to the oldest waiting request, on the next loop iteration
      (Envoy's "upstream ready" callback), not from inside the parser callback that ended the
      previous response.
    """

    def __init__(self, host: Host, cluster: UpstreamCluster) -> None:
        self.host = host
        spec = self.cluster = cluster.spec
        self.buffer_limit = spec.per_connection_buffer_limit_bytes
        self.max_requests = spec.max_requests_per_connection or 0
        self.idle: list[UpstreamConnection] = []
        self.queue: deque[UpstreamCallbacks] = deque()
        """Requests waiting for a connection, oldest first."""
        self.pending: dict[UpstreamCallbacks, Resource] = {}
        """The requests in ``queue`` -> the pending-requests resource each one holds."""
        self.connecting = 0
        """Connections being made (each will serve the oldest waiting request, or go idle)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = 0
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self._sweeper: asyncio.TimerHandle | None = None
        self._serve_soon: asyncio.Handle | None = None
        # The cluster's TLS endpoint (UpstreamTlsContext), None for plaintext. A pool serves
        # one cluster version: a change of transport socket makes new hosts and pools, so TLS
        # and plaintext connections never share a pool.
        self.tls: TlsEndpoint | None = cluster.tls
        self.tls_stats: TlsStats | None = cluster.tls_stats
        self.owner = cluster
        # The cluster's connection stats (the same objects tcp_proxy and /clusters use) and
        # circuit breakers.
        self.stats = cluster.stats
        self.resources: ResourceManager = cluster.resources.default
        self._pool_resource: Resource | None = self.resources.connection_pools
        self._pool_resource.inc()

    def adopt(self, cluster: UpstreamCluster) -> None:
        """Serve ``cluster``, a rebuild of the one this pool was made for (same connection
        settings): new connections and waiting requests count against its circuit breakers."""
        self.owner = cluster
        self.stats = cluster.stats
        self.resources = cluster.resources.default
        if self._pool_resource is not None and not self.closed:
            self._pool_resource.dec()
            self._pool_resource = self.resources.connection_pools
            self._pool_resource.inc()

    # -- requests ---------------------------------------------------------------------------

    def acquire(self, cb: UpstreamCallbacks) -> None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                cb.on_pool_ready(conn)
                return
        if self.closed:
            cb.on_pool_failure(CONNECTION_TERMINATION)
            return
        res = self.resources.pending_requests
        stats = self.stats
        if not res.can_create():
            stats.upstream_rq_pending_overflow.value += 1
            cb.on_pool_failure(OVERFLOW)
            return
        res.inc()
        stats.upstream_rq_pending_total.value += 1
        stats.upstream_rq_pending_active.value += 1
        self.pending[cb] = res
        queue = self.queue
        queue.append(cb)
        if len(queue) > self.connecting:
            self._try_connect()

    def cancel(self, cb: UpstreamCallbacks) -> None:
        """Forget a waiting request (no callback follows); does nothing for one that was
        served or failed already."""
        res = self.pending.pop(cb, None)
        if res is not None:
            self.queue.remove(cb)
            res.dec()
            self.stats.upstream_rq_pending_active.value -= 1

    def _next_waiting(self) -> UpstreamCallbacks:
        """Take the oldest waiting request out of the queue (there is one)."""
        cb = self.queue.popleft()
        self.pending.pop(cb).dec()
        self.stats.upstream_rq_pending_active.value -= 1
        return cb

    def _fail_waiting(self, reason: str) -> None:
        """Fail every request waiting now. Requests that arrive meanwhile (a caller trying
        again from its failure callback) wait for the next connection instead."""
        queue = self.queue
        failed = list(queue)
        queue.clear()
        pending = self.pending
        active = self.stats.upstream_rq_pending_active
        for cb in failed:
            pending.pop(cb).dec()
            active.value -= 1
        for cb in failed:
            cb.on_pool_failure(reason)

    def _serve_waiting(self) -> None:
        """Give idle connections to waiting requests, oldest request first."""
        self._serve_soon = None
        idle = self.idle
        queue = self.queue
        while queue and idle:
            conn = idle.pop()
            if not conn.closed:
                self._next_waiting().on_pool_ready(conn)

    # -- connections ------------------------------------------------------------------------

    def _try_connect(self) -> None:
        """Open one more connection if the cluster's max_connections allows it (or this host
        has none at all)."""
        res = self.resources.connections
        if not res.can_create():
            self.stats.upstream_cx_overflow.value += 1
            if self.active or self.connecting:
                return
        res.inc()
        self.connecting += 1
        proto = UpstreamConnection(self)
        proto.cx_resource = res
        task = self.loop.create_task(self._connect(proto))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, proto: UpstreamConnection) -> None:
        addr = self.host.address
        stats = self.stats
        stats.upstream_cx_total.value += 1
        tls = self.tls
        timeout = self.cluster.connect_timeout
        verifier = None
        options: dict[str, Any] = {}
        factory: Callable[[], asyncio.BaseProtocol] = lambda: proto  # noqa: E731
        try:
            if tls is not None:
                # Raises TlsUnavailable (a ValueError) when a secret is missing; the handshake
                # is part of the connect timeout.
                context, verifier = tls.current()
                options = {
                    "ssl": context,
                    "server_hostname": tls.sni,
                    "ssl_handshake_timeout": timeout,
                }
                # Decrypted bytes go through a reused buffer (tls/buffered.py).
                factory = lambda: BufferedApp(proto)  # noqa: E731
            await asyncio.wait_for(
                self.loop.create_connection(factory, addr.host, addr.port, **options),
                timeout=timeout,
            )
        except TimeoutError:
            stats.upstream_cx_connect_timeout.value += 1
            self._failed(proto, CONNECTION_TIMEOUT)
            return
        except (OSError, ValueError) as exc:
            # ssl.SSLError (a failed handshake) is an OSError.
            log.debug("connect to %s failed: %s", addr, exc)
            if tls is not None and self.tls_stats is not None:
                self.tls_stats.connection_error.value += 1
            self._failed(proto, CONNECTION_FAILURE)
            return
        self.connecting -= 1
        stats.upstream_cx_active.value += 1
        self.active += 1
        if verifier is not None and not self._verified(proto, verifier):
            proto.abort()
            stats.upstream_cx_connect_fail.value += 1
            self._fail_waiting(CONNECTION_FAILURE)
            return
        if self.closed:
            proto.abort()
            return
        if self.queue:
            self._next_waiting().on_pool_ready(proto)
        else:
            self.release(proto)

    def _verified(self, proto: UpstreamConnection, verifier: PeerVerifier) -> bool:
        """Whether the server of a new TLS connection passes the SAN and SVID checks."""
        from ubimesh.proxy.tls.verify import PeerRejected

        transport = proto.transport
        tls_stats = self.tls_stats
        try:
            verifier.verify(
                transport.get_extra_info("ssl_object") if transport is not None else None
            )
        except PeerRejected as exc:
            if tls_stats is not None:
                tls_stats.fail_verify.value += 1
            log.info("upstream %s refused: %s", self.host.address, exc)
            return False
        if tls_stats is not None:
            tls_stats.handshake.value += 1
        return True

    def _failed(self, proto: UpstreamConnection, reason: str) -> None:
        """A connect that did not complete: give its connection back, fail the waiters."""
        self.connecting -= 1
        self._release_cx(proto)
        self.stats.upstream_cx_connect_fail.value += 1
        self._fail_waiting(reason)

    @staticmethod
    def _release_cx(conn: UpstreamConnection) -> None:
        """Give the connection's circuit-breaker slot back (once)."""
        res = conn.cx_resource
        if res is not None:
            conn.cx_resource = None
            res.dec()

    def release(self, conn: UpstreamConnection) -> None:
        max_requests = self.max_requests
        if max_requests and conn.requests >= max_requests:
            self.stats.upstream_cx_max_requests.value += 1
            conn.abort()
            return
        if self.closed or len(self.idle) >= MAX_IDLE_PER_HOST:
            conn.abort()
            return
        loop = self.loop
        conn.idle_since = loop.time()
        self.idle.append(conn)
        if self.queue and self._serve_soon is None:
            self._serve_soon = loop.call_soon(self._serve_waiting)
        if self._sweeper is None and self.cluster.idle_timeout:
            self._sweeper = loop.call_later(self._sweep_interval(), self._sweep)

    def on_closed(self, conn: UpstreamConnection) -> None:
        self.active -= 1
        self.stats.upstream_cx_active.value -= 1
        self._release_cx(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if len(self.queue) > self.connecting and not self.closed:
            # A slot of this host's (and the cluster's) connections is free again.
            self._try_connect()

    def close(self) -> None:
        """Close idle connections now and fail the waiting requests; busy connections close
        when their request ends."""
        self.closed = True
        for conn in self.idle:
            conn.abort()
        self.idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._serve_soon is not None:
            self._serve_soon.cancel()
            self._serve_soon = None
        if self._pool_resource is not None:
            self._pool_resource.dec()
            self._pool_resource = None
        self._fail_waiting(CONNECTION_TERMINATION)

    def _sweep_interval(self) -> float:
        timeout = self.cluster.idle_timeout or 1.0
        return max(0.05, min(timeout / 2, 5.0))

    def _sweep(self) -> None:
        self._sweeper = None
        timeout = self.cluster.idle_timeout
        if not timeout:
            return
        loop = self.loop
        deadline = loop.time() - timeout
        keep = []
        for conn in self.idle:
            if conn.idle_since <= deadline:
                self.stats.upstream_cx_idle_timeout.value += 1
                conn.abort()
            else:
                keep.append(conn)
        self.idle[:] = keep
        if self.idle:
            self._sweeper = loop.call_later(self._sweep_interval(), self._sweep)
