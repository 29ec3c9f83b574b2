"""The HTTP connection manager (HCM): the terminal network filter for HTTP/1.1.

One ``HttpConnection`` per downstream connection runs the HTTP/1.1 server codec (httptools)
and, for each request, an ``ActiveStream``: request headers are checked against the limits,
the path is normalized, the HCM's header rules are applied (x-forwarded-*, x-request-id),
the HTTP filters run in order (RBAC filters, then the router, which is terminal) and the response
comes back through ``encode_headers``/``encode_data``/``encode_end``.

Requests on one connection are answered strictly in order. A pipelined request is parsed as soon
as its bytes arrive but waits (with its body buffered up to the connection's buffer limit, then
reading pauses) until the response before it has been written: the only safe way to pipeline
to upstreams that are not pipelined themselves.

Flow control: when the downstream transport's write buffer passes the high watermark, the
upstream connection feeding it stops reading; when an upstream's write buffer fills up, the
downstream stops reading. Every buffer is bounded by ``per_connection_buffer_limit_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final, cast

import httptools

from ubimesh.proto.headers import Headers
from ubimesh.proxy.http import codec
from ubimesh.proxy.http.codec import DATE, LAST_CHUNK, chunk, encode_response_head
from ubimesh.proxy.http.filter_chain import CONTINUE
from ubimesh.proxy.http.pool import RESPONSE_HEADER_FLAGS, RH_CONTENT_LENGTH, RH_SERVER
from ubimesh.proxy.network.hcm_config import (
    F_CONNECTION,
    F_CONTENT_LENGTH,
    F_EXPECT,
    F_HOST,
    F_REPEATED,
    F_TRANSFER_ENCODING,
    ONCE_MASK,
    REQUEST_HEADER_FLAGS,
)
from ubimesh.proxy.response_flags import DC, DPE, NR, SI, add_flag
from ubimesh.proxy.snapshot.types import (
    HeadersWithUnderscoresAction,
    Route,
    RouteAction,
    VirtualHost,
)

# The clock as a constant: under mypyc a Final is a C static, where ``time.monotonic`` is a
# generic attribute lookup on the module (about 200 instructions) per call.
_monotonic: Final = time.monotonic

if TYPE_CHECKING:
    from ubimesh.proxy.http.fault import DelayedStream
    from ubimesh.proxy.http.rbac import RbacConnection
    from ubimesh.proxy.http.router import UpstreamRequest
    from ubimesh.proxy.network.hcm_config import HcmRuntime
    from ubimesh.proxy.tls.peer import PeerInfo
    from ubimesh.proxy.tracing.span import Span

log = logging.getLogger("ubimesh.http")

# Response flags (Envoy's short names, ubimesh.proxy.response_flags) the connection manager
# sets; the router sets its own.


_FLAGS = REQUEST_HEADER_FLAGS


def is_http10(parser: httptools.HttpRequestParser, keep_alive: bool, hflags: int) -> bool:
    """Whether the request whose headers ``parser`` just finished is HTTP/1.0, given its
    ``should_keep_alive()`` and the codec's header flags. With no Connection or
    Proxy-Connection header, llhttp keeps a request's connection alive exactly when its
    version is 1.1 or later (llhttp_should_keep_alive: major and minor above 0), so such a
    request is not 1.0, and only the others need the version's text: httptools formats it
    with ``str.format``, about 2,200 instructions a request."""
    if keep_alive and not hflags & F_CONNECTION:
        return False
    return parser.get_http_version() == "1.0"


class _RequestRejected(Exception):
    """Raised inside a parser callback to stop parsing after a local reply was sent."""


class ActiveStream:
    """One request/response exchange on a downstream connection."""

    __slots__ = (
        "body_expected",
        "bytes_received",
        "bytes_sent",
        "chunked",
        "conn",
        "details",
        "done",
        "expect_continue",
        "flags",
        "hcm",
        "headers",
        "hflags",
        "host_header",
        "http10",
        "keep_alive",
        "method",
        "path",
        "pending_body",
        "pending_bytes",
        "pending_filter",
        "request_complete",
        "request_timer",
        "response_chunked",
        "response_close",
        "response_extra",
        "response_headers",
        "response_headers_only",
        "response_started",
        "route",
        "span",
        "start_time",
        "started",
        "status",
        "target",
        "upgrade",
        "upstream",
        "vhost",
    )  # fmt: skip

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.hcm = conn.hcm
        self.method = ""
        self.target = ""
        self.path = ""
        self.headers = Headers()
        self.http10 = False
        self.keep_alive = True
        self.chunked = False
        self.body_expected = False
        self.request_complete = False
        self.upgrade = False
        self.route: Route | None = None
        self.vhost: VirtualHost | None = None
        self.upstream: UpstreamRequest | None = None
        self.span: Span | None = None
        """The stream's trace span (HCM tracing only); the HCM finishes it in observe()."""
        self.started = False
        self.start_time = 0.0
        self.pending_body: list[bytes] | None = None
        self.pending_bytes = 0
        self.response_started = False
        self.response_chunked = False
        self.response_close = False
        self.response_headers_only = False
        self.response_headers: list[tuple[str, str]] | None = None
        """The response head as written (a reference, for access logs' %RESP(...)%)."""
        self.status = 0
        self.flags = ""
        """Envoy's response flags as it prints them ("" for none, else e.g. "UF,URX"); set
        only through ``ubimesh.proxy.response_flags.add_flag``."""
        self.details = ""
        """Envoy's response code details when the proxy answered for a reason (RBAC)."""
        self.done = False
        self.host_header = ""
        self.bytes_received = 0
        self.bytes_sent = 0
        self.request_timer: asyncio.TimerHandle | None = None
        self.expect_continue = False
        self.hflags = 0
        """F_* flags of the request headers seen (ubimesh.proxy.network.hcm_config)."""
        self.pending_filter: DelayedStream | None = None
        """A decoder filter holding the request (a fault delay); cancelled on a reset."""
        self.response_extra: list[tuple[str, str]] | None = None
        """Headers a decoder filter adds to the response (x-ratelimit-*); None: none."""

    # -- decode path (request) ----------------------------------------------------------------

    def begin(self) -> None:
        """Start processing: the previous response on the connection is done and the request
        headers are complete. Runs the HCM request rules, then the filter chain."""
        self.started = True
        hcm = self.hcm
        conn = self.conn
        hcm.rq_total.value += 1
        hcm.rq_active.value += 1
        if self.expect_continue and not self.request_complete:
            conn.write(codec.CONTINUE_100)
        rejection = hcm.prepare_request(self, conn)
        if rejection is not None:
            status, body, flag, extra = rejection
            self.send_local_reply(status, body, flag, close=status == 400, extra=extra)
            return
        route = hcm.route_table_match(self)
        tracer = hcm.tracer
        if tracer is not None:
            # After the request rules and routing, as Envoy: the decision reads the final
            # x-request-id and the route's tracing; the context goes into the headers the
            # router forwards. The HCM finishes the span in observe().
            self.span = tracer.start(self, route)
        if hcm.decoder_filters is not None:
            # Fault or local rate limit filters: the whole chain, in http_filters order (RBAC
            # filters included), then the router; a filter may pause it (a fault delay).
            self.route = route
            self.run_filters(0)
            return
        rbac = hcm.rbac
        if rbac is not None:
            # RBAC runs before the router (which answers 404 for no route). Envoy has found
            # the route by then (the filter looks for per-route config), so a denial gets the
            # route's response header rules like any local reply.
            self.route = route
            if not rbac.allow(self, conn):
                return
        self.start_router(route)

    def run_filters(self, start: int) -> None:
        """Run the HCM's decoder filters from ``start`` (ubimesh.proxy.http.filter_chain);
        when all continue, start the router. A filter that stops answered the request; one
        that pauses calls this again with the next index when it resumes."""
        chain = self.hcm.decoder_filters
        assert chain is not None
        conn = self.conn
        for i in range(start, len(chain)):
            if chain[i].decode(self, conn, i) != CONTINUE:
                return
        self.start_router(self.route)

    def start_router(self, route: Route | None) -> None:
        """After the decoder filters: no route is a 404; else arm the request and stream
        idle timers and hand the request to the router."""
        hcm = self.hcm
        conn = self.conn
        if route is None:
            hcm.rq_no_route.value += 1
            self.send_local_reply(404, b"", NR)
            return
        self.route = route
        # request_timeout: the whole request must arrive in time (most requests are complete
        # with their headers, and then no timer is needed).
        if hcm.request_timeout and not self.request_complete:
            self.request_timer = conn.loop.call_later(hcm.request_timeout, self._on_request_timeout)
        action = route.action
        idle = action.idle_timeout if type(action) is RouteAction else None
        conn.watch_stream_idle(hcm.stream_idle_timeout if idle is None else idle)
        hcm.router_factory(self, route)

    def _on_request_timeout(self) -> None:
        self.request_timer = None
        if self.done or self.request_complete:
            return
        self.hcm.rq_timeout.value += 1
        self.send_local_reply(408, b"request timeout", "", close=True)

    def on_stream_idle_timeout(self) -> None:
        """No bytes moved either way for the stream idle timeout (flag SI)."""
        self.hcm.rq_idle_timeout.value += 1
        if self.response_started:
            self.flags = add_flag(self.flags, SI)
            self.reset()
            return
        self.send_local_reply(408, b"stream timeout", SI, close=True)

    def on_body(self, data: bytes) -> None:
        self.bytes_received += len(data)
        up = self.upstream
        if up is not None and up.ready:
            up.decode_data(data)
            return
        if self.done:
            return  # a local reply was sent: the rest of the body is discarded
        pending = self.pending_body
        if pending is None:
            pending = self.pending_body = []
        pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > self.conn.buffer_limit:
            self.conn.pause_reading_for_buffer()

    def on_request_complete(self) -> None:
        self.request_complete = True
        timer = self.request_timer
        if timer is not None:
            timer.cancel()
            self.request_timer = None
        up = self.upstream
        if up is not None and up.ready:
            up.decode_end()

    def take_pending_body(self) -> list[bytes] | None:
        """The router takes the body bytes that arrived before it was ready."""
        pending = self.pending_body
        self.pending_body = None
        if self.pending_bytes:
            self.pending_bytes = 0
            self.conn.resume_reading_for_buffer()
        return pending

    # -- encode path (response) ---------------------------------------------------------------

    def encode_headers(
        self, status: int, headers: list[tuple[str, str]], end_stream: bool, flags: int = -1
    ) -> None:
        """Write the response head. ``headers`` are the upstream's (hop-by-hop already
        removed by the caller) plus the router's additions; ``end_stream`` means no body.
        ``flags`` are the RH_* bits of ``headers`` when the caller knows them (-1: look)."""
        if self.done or self.response_started:
            return
        self.response_started = True
        self.status = status
        hcm = self.hcm
        conn = self.conn
        out = headers
        route = self.route
        if route is not None:
            up = self.upstream
            mutated = hcm.apply_response_mutations(self, route, out, up.entry if up else None)
            if mutated is not out:
                out = mutated
                flags = -1
        extra = self.response_extra
        if extra is not None:
            out.extend(extra)
        if flags < 0:
            flags = 0
            for k, _ in out:
                kind = RESPONSE_HEADER_FLAGS.get(k)
                if kind is not None:
                    flags |= kind
        server = hcm.server_header
        if server is not None:
            if not flags & RH_SERVER:
                out.append(("server", server))
            elif hcm.server_overwrite:
                out = [kv for kv in out if kv[0] != "server"]
                out.append(("server", server))
        out.append(("date", DATE.get()))
        if self.upgrade and status == 101:
            out.append(("connection", "upgrade"))
            out.append(("upgrade", "websocket"))
        else:
            head_request = self.method == "HEAD"
            no_body = end_stream or head_request or status in (204, 304)
            has_length = flags & RH_CONTENT_LENGTH
            if head_request and not has_length and not self.http10 and status not in (204, 304):
                # What a GET would have carried (Envoy announces chunked framing on HEAD).
                out.append(("transfer-encoding", "chunked"))
            if not no_body and not has_length:
                if self.http10:
                    self.response_close = True
                else:
                    self.response_chunked = True
                    out.append(("transfer-encoding", "chunked"))
            elif end_stream and not head_request and status not in (204, 304) and not has_length:
                out.append(("content-length", "0"))
            if not self.keep_alive or conn.draining or not self.request_complete:
                # A response that ends before its request did: the rest of the request body
                # cannot be told apart from a next request, so the connection closes (Envoy).
                self.response_close = True
            if self.response_close:
                out.append(("connection", "close"))
            elif self.http10:
                out.append(("connection", "keep-alive"))
            self.response_headers_only = no_body
        hcm.count_status(status)
        self.response_headers = out
        # bytes_sent counts body bytes only, as Envoy's %BYTES_SENT%; the head is not counted.
        conn.write(encode_response_head(status, out))
        if end_stream:
            self.encode_end()

    def encode_data(self, data: bytes) -> None:
        if self.done or self.response_headers_only or not data:
            return
        self.conn.last_activity = self.conn.loop.time()
        self.bytes_sent += len(data)
        if self.response_chunked:
            self.conn.write(chunk(data))
        else:
            self.conn.write(data)

    def encode_end(self) -> None:
        if self.done:
            return
        if self.response_chunked:
            self.conn.write(LAST_CHUNK)
        self.finish()

    def send_local_reply(
        self,
        status: int,
        body: bytes,
        flag: str = "",
        close: bool = False,
        content_type: str = "text/plain",
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        """Answer the request from the proxy itself (Envoy's sendLocalReply)."""
        if flag:
            self.flags = add_flag(self.flags, flag)
        if self.response_started:
            # Too late for a reply: the client already has part of a response.
            self.reset()
            return
        if close:
            self.keep_alive = False
        headers: list[tuple[str, str]] = []
        if extra:
            headers.extend(extra)
        if body:
            headers.append(("content-length", str(len(body))))
            headers.append(("content-type", content_type))
        self.encode_headers(status, headers, end_stream=not body)
        if body and not self.done:
            self.encode_data(body)
            self.encode_end()

    def reset(self) -> None:
        """Abandon the exchange: the downstream connection is closed without a response."""
        if self.done:
            return
        self.done = True
        self._release()
        self.conn.close_now()

    def finish(self) -> None:
        """The response is completely written."""
        if self.done:
            return
        self.done = True
        self._release()
        self.conn.on_stream_done(self)

    def _release(self) -> None:
        timer = self.request_timer
        if timer is not None:
            timer.cancel()
            self.request_timer = None
        if self.started:
            self.hcm.rq_active.value -= 1
            self.hcm.observe(self)
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.on_stream_done()

    def on_downstream_reset(self) -> None:
        """The downstream connection went away mid-exchange."""
        if self.done:
            return
        self.flags = add_flag(self.flags, DC)
        self.done = True
        pending = self.pending_filter
        if pending is not None:
            self.pending_filter = None
            pending.cancel()
        self._release()


class HttpConnection(asyncio.Protocol):
    """An HTTP/1.1 downstream connection: the server codec and its stream queue."""

    def __init__(self, hcm: HcmRuntime, buffer_limit: int) -> None:
        self.hcm = hcm
        self.buffer_limit = buffer_limit
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote = ("", 0)
        self.local = ("", 0)
        self.sni = ""
        """The SNI the client sent (set by the chain selector when it read the ClientHello)."""
        self.tls: PeerInfo | None = None
        """The TLS side of the connection once verified (None: plaintext): the peer's SPIFFE
        ID and certificate hash, for the HTTP filters and x-forwarded-client-cert. Set by
        the TLS gate before ``connection_made``."""
        self.rbac: RbacConnection | None = None
        self.filter_state: dict[int, object] | None = None
        """Decoder filters' per-connection state (local rate limit buckets), by filter."""
        """What the HTTP RBAC filters keep for this connection (from its first request)."""
        self.closed = False
        self.draining = False
        # The stream being parsed, and the queue of streams awaiting their turn; the head of
        # ``streams`` is the one being answered.
        self.decoding: ActiveStream | None = None
        self.streams: list[ActiveStream] = []
        self.header_bytes = 0
        self.header_count = 0
        self.url_parts: list[bytes] = []
        self.read_paused_buffer = False
        self.read_paused_flow = False
        self.write_paused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.headers_timer: asyncio.TimerHandle | None = None
        self.upgraded_to: UpstreamRequest | None = None
        self.underscore_reject = False
        self.in_headers = False
        self.corked: list[bytes] | None = None
        self.loop = hcm.loop
        self.last_activity = 0.0
        """Loop time of the last bytes moved, or of the moment the connection went idle: what
        both the connection idle timeout and the stream idle timeout measure from."""
        self.stream_idle: float | None = None
        self.stream_timer: asyncio.TimerHandle | None = None
        self.opened_at = 0.0
        """Loop time the connection was accepted (downstream_cx_length_ms)."""

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote = (peer[0], peer[1])
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.local = (sockname[0], sockname[1])
        hcm = self.hcm
        gate = hcm.network_rbac
        if gate is not None and not gate.admit(self.remote, self.local, self.tls, self.sni):
            # Denied by an RBAC network filter: the HCM never sees the connection.
            self.closed = True
            self.transport = None
            transport.abort()
            return
        transport.set_write_buffer_limits(high=self.buffer_limit, low=self.buffer_limit // 4)
        hcm.cx_total.value += 1
        hcm.cx_http1_total.value += 1
        hcm.cx_active.value += 1
        self.opened_at = self.loop.time()
        hcm.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return  # refused by an RBAC network filter (TLS may still hand over a record)
        self.last_activity = self.loop.time()
        up = self.upgraded_to
        if up is not None:
            up.decode_data_raw(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._on_upgrade_bytes(data[offset:])
        except httptools.HttpParserCallbackError as exc:
            # Raised by our own callbacks: after a local reply (e.g. 431) on purpose, or by a
            # bug, which must not go unnoticed.
            cause = exc.__context__
            if cause is not None and not isinstance(cause, _RequestRejected):
                log.error("internal error while handling a request", exc_info=cause)
            if not self.closed:
                self.close_after_write()
        except httptools.HttpParserError as exc:
            self._protocol_error(exc)

    def eof_received(self) -> bool | None:
        # The client half-closed. Finish the response in flight, then close (Envoy closes
        # the connection once the current stream completes).
        if self.streams:
            self.draining = True
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self.transport is None:
            return
        self.closed = True
        hcm = self.hcm
        hcm.cx_active.value -= 1
        hcm.cx_destroy.value += 1
        hcm.cx_length.record((self.loop.time() - self.opened_at) * 1000.0)
        hcm.connections.discard(self)
        for t in (self.idle_timer, self.headers_timer, self.stream_timer):
            if t is not None:
                t.cancel()
        self.idle_timer = self.headers_timer = self.stream_timer = None
        streams = self.streams
        self.streams = []
        for s in streams:
            s.on_downstream_reset()
        if self.decoding is not None and self.decoding not in streams:
            self.decoding.on_downstream_reset()
        self.decoding = None
        up = self.upgraded_to
        if up is not None:
            self.upgraded_to = None
            up.on_downstream_closed()
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.streams:
            up = self.streams[0].upstream
            if up is not None:
                up.pause_upstream_reading()
        elif self.upgraded_to is not None:
            self.upgraded_to.pause_upstream_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.streams:
            up = self.streams[0].upstream
            if up is not None:
                up.resume_upstream_reading()
        elif self.upgraded_to is not None:
            self.upgraded_to.resume_upstream_reading()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        s = ActiveStream(self)
        self.decoding = s
        self.header_bytes = 0
        self.header_count = 0
        self.url_parts = []
        self.underscore_reject = False
        self.in_headers = True
        if self.headers_timer is None and self.hcm.request_headers_timeout:
            self.headers_timer = self.loop.call_later(
                self.hcm.request_headers_timeout, self._on_headers_timeout
            )

    def on_url(self, url: bytes) -> None:
        self.url_parts.append(url)
        self.header_bytes += len(url)
        if self.header_bytes > self.hcm.max_header_bytes:
            self._reject_headers(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        s = self.decoding
        if s is None:
            return
        if not self.in_headers:
            return  # trailers: not forwarded (HTTP/1.1 trailers are rare and Envoy drops them)
        hcm = self.hcm
        self.header_count += 1
        self.header_bytes += len(name) + len(value)
        if self.header_count > hcm.max_headers_count or self.header_bytes > hcm.max_header_bytes:
            self._reject_headers(431)
        key = name.decode("latin-1").lower()
        if hcm.check_underscores and "_" in key:
            if hcm.underscores_action is HeadersWithUnderscoresAction.DROP_HEADER:
                hcm.dropped_headers_with_underscores.value += 1
                return
            self.underscore_reject = True
        # RFC 9110 5.5: a field value has no leading or trailing whitespace. llhttp drops the
        # leading OWS but keeps the trailing; Envoy's codec drops both, so matches and
        # forwarded values see "blue" for "x:  blue  ".
        val = value.rstrip(b" \t").decode("latin-1")
        s.headers.items.append((key, val))
        kind = _FLAGS.get(key)
        if kind is not None:
            # Note what the request rules and the framing need, so nothing rescans the list.
            seen = s.hflags
            if kind & seen & ONCE_MASK:
                kind |= F_REPEATED
            s.hflags = seen | kind
            if kind & F_HOST:
                if not s.host_header:
                    s.host_header = val
            elif kind & F_CONTENT_LENGTH:
                if val != "0":
                    s.body_expected = True
            elif kind & F_TRANSFER_ENCODING:
                s.chunked = True
                s.body_expected = True
            elif kind & F_EXPECT and val.lower() == "100-continue":
                s.expect_continue = True

    def on_headers_complete(self) -> None:
        s = self.decoding
        self.in_headers = False
        if s is None:
            return
        if self.headers_timer is not None:
            self.headers_timer.cancel()
            self.headers_timer = None
        parser = self.parser
        s.method = parser.get_method().decode("ascii")
        s.target = b"".join(self.url_parts).decode("latin-1")
        s.keep_alive = keep_alive = parser.should_keep_alive()
        s.http10 = is_http10(parser, keep_alive, s.hflags)
        s.upgrade = parser.should_upgrade()
        s.start_time = _monotonic()
        if not s.body_expected and not s.upgrade:
            # Nothing more to read for this request: it is complete now, which is what the
            # router's timeout and the close-on-early-response rule look at.
            s.request_complete = True
        self.streams.append(s)
        if self.underscore_reject:
            self.hcm.requests_rejected_with_underscores.value += 1
            s.started = True
            self.hcm.rq_total.value += 1
            self.hcm.rq_active.value += 1
            s.send_local_reply(400, b"Bad Request", DPE, close=True)
            return
        if len(self.streams) == 1:
            s.begin()
        elif len(self.streams) > self.hcm.max_pipelined:
            self.pause_reading_for_buffer()

    def on_body(self, body: bytes) -> None:
        s = self.decoding
        if s is not None:
            s.on_body(body)

    def on_message_complete(self) -> None:
        s = self.decoding
        self.decoding = None
        if s is not None:
            s.on_request_complete()

    # -- stream lifecycle ---------------------------------------------------------------------

    def on_stream_done(self, s: ActiveStream) -> None:
        streams = self.streams
        if streams and streams[0] is s:
            streams.pop(0)
        elif s in streams:
            streams.remove(s)
        if self.closed:
            return
        # response_close also covers a response that started before its request ended
        # (encode_headers): the rest of that body cannot be told apart from a next request.
        if s.response_close or not s.keep_alive or (self.draining and not streams):
            self.close_after_write()
            return
        if streams:
            nxt = streams[0]
            if not nxt.started:
                nxt.begin()
        else:
            if self.read_paused_buffer:
                self.resume_reading_for_buffer()
            self._arm_idle()

    # -- flow control -------------------------------------------------------------------------

    def pause_reading_for_buffer(self) -> None:
        if not self.read_paused_buffer and self.transport is not None:
            self.read_paused_buffer = True
            if not self.read_paused_flow:
                self.transport.pause_reading()

    def resume_reading_for_buffer(self) -> None:
        if self.read_paused_buffer and self.transport is not None:
            self.read_paused_buffer = False
            if not self.read_paused_flow and not self.closed:
                self.transport.resume_reading()

    def pause_reading_for_upstream(self) -> None:
        if not self.read_paused_flow and self.transport is not None:
            self.read_paused_flow = True
            if not self.read_paused_buffer:
                self.transport.pause_reading()

    def resume_reading_for_upstream(self) -> None:
        if self.read_paused_flow and self.transport is not None:
            self.read_paused_flow = False
            if not self.read_paused_buffer and not self.closed:
                self.transport.resume_reading()

    # -- writing and closing ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        out = self.corked
        if out is not None:
            out.append(data)
            return
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def cork(self) -> None:
        """Collect writes until ``uncork``: a response head, its body and its last chunk that
        come out of one upstream read leave in one write (one syscall, one TCP segment)."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        out = self.corked
        if out is None:
            return
        self.corked = None
        if out:
            transport = self.transport
            if transport is not None and not self.closed:
                transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close_after_write(self) -> None:
        self.uncork()
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.close()

    def close_now(self) -> None:
        transport = self.transport
        if transport is not None:
            self.closed = True
            transport.abort()

    def start_drain(self, idle_grace: float = 0.0) -> None:
        """Drain: the next response carries ``connection: close``. An idle connection is closed
        after ``idle_grace`` seconds if it stays idle: closing it at once would race a request
        the client may be sending right now (on reload, connections accepted a moment ago are
        exactly in that state)."""
        self.draining = True
        if self.streams or self.decoding is not None:
            return
        if idle_grace <= 0:
            self.close_after_write()
            return
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.loop.call_later(idle_grace, self._close_if_still_idle)

    def _close_if_still_idle(self) -> None:
        self.idle_timer = None
        if not self.streams and self.decoding is None:
            self.close_after_write()

    # -- upgrades (WebSocket) -----------------------------------------------------------------

    def _on_upgrade_bytes(self, rest: bytes) -> None:
        s = self.streams[0] if self.streams else None
        if s is None or s.upstream is None:
            if s is not None and not s.done:
                return
            self.close_now()
            return
        s.upstream.on_downstream_upgrade_bytes(rest)

    def become_tunnel(self, up: UpstreamRequest) -> None:
        """After a 101: every later byte goes to the upstream untouched."""
        self.upgraded_to = up

    # -- timers and errors --------------------------------------------------------------------

    def watch_stream_idle(self, timeout: float | None) -> None:
        """Apply the stream idle timeout to the stream now starting. One timer per
        connection checks the last activity when it fires and re-arms for the rest."""
        previous = self.stream_idle
        self.stream_idle = timeout
        self.last_activity = self.loop.time()
        if not timeout:
            return
        if self.stream_timer is not None and previous is not None and timeout < previous:
            # A shorter timeout than the one the timer was armed for: arm it anew.
            self.stream_timer.cancel()
            self.stream_timer = None
        if self.stream_timer is None:
            self.stream_timer = self.loop.call_later(timeout, self._on_stream_idle)

    def _on_stream_idle(self) -> None:
        self.stream_timer = None
        timeout = self.stream_idle
        if self.closed or not timeout or not self.streams:
            return
        remaining = self.last_activity + timeout - self.loop.time()
        if remaining > 0.001:
            self.stream_timer = self.loop.call_later(remaining, self._on_stream_idle)
            return
        stream = self.streams[0]
        if stream.started and not stream.done:
            stream.on_stream_idle_timeout()

    def _arm_idle(self) -> None:
        """Note that the connection became idle. One timer per connection checks the idle
        time when it fires and re-arms itself for the rest, instead of a new timer for
        every request."""
        timeout = self.hcm.idle_timeout
        if not timeout or self.closed:
            return
        self.last_activity = self.loop.time()
        if self.idle_timer is None:
            self.idle_timer = self.loop.call_later(timeout, self._on_idle_timeout)

    def _on_idle_timeout(self) -> None:
        self.idle_timer = None
        timeout = self.hcm.idle_timeout
        if self.closed or not timeout:
            return
        if self.streams or self.decoding is not None:
            # Busy: look again one full timeout after it next goes idle.
            self.idle_timer = self.loop.call_later(timeout, self._on_idle_timeout)
            return
        remaining = self.last_activity + timeout - self.loop.time()
        if remaining > 0.001:
            self.idle_timer = self.loop.call_later(remaining, self._on_idle_timeout)
            return
        self.hcm.cx_idle_timeout.value += 1
        self.close_after_write()

    def _on_headers_timeout(self) -> None:
        self.headers_timer = None
        self.hcm.rx_request_timeout.value += 1
        if self.streams and self.streams[-1] is self.decoding:
            self.close_now()
            return
        self._local_error(408, close=True, body=b"request header timeout")

    def _reject_headers(self, status: int) -> None:
        self._local_error(status, close=True)
        raise _RequestRejected(status)

    def _protocol_error(self, exc: Exception) -> None:
        log.debug("downstream protocol error from %s: %s", self.remote, exc)
        self.hcm.rx_codec_error.value += 1
        self._local_error(400, close=True)

    def _local_error(self, status: int, close: bool, body: bytes | None = None) -> None:
        """Answer a request that never became a stream (or a broken one), then close."""
        if self.closed:
            return
        if body is None:
            body = codec.REASONS.get(status, "").encode()
        s = self.decoding
        if s is not None and s.started:
            if s.response_started:
                self.close_now()
                return
            s.send_local_reply(status, body, DPE, close=True)
            return
        if self.streams and self.streams[0].started and not self.streams[0].done:
            # A response is in flight for an earlier request: do not interleave; just close
            # after it by refusing to read more.
            self.draining = True
            self.pause_reading_for_buffer()
            return
        self.hcm.count_status(status)
        head = [
            ("content-length", str(len(body))),
            ("content-type", "text/plain"),
            ("server", self.hcm.server_header or "envoy"),
            ("date", DATE.get()),
            ("connection", "close"),
        ]
        self.write(encode_response_head(status, head) + body)
        self.close_after_write()
