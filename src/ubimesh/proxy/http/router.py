"""The router: the terminal HTTP filter. It turns a matched route into an upstream request.

For a ``RouteAction`` it picks the cluster (plain, weighted or from a header), asks the
cluster's load balancer for a host, takes a connection from that host's pool, rewrites the
request as the route says, writes it, and relays the response back to the ``ActiveStream``.
Redirects and direct responses are answered locally. Request mirroring sends a shadow copy that
is never waited for.

Timeouts (Envoy's semantics): the route ``timeout`` runs from the end of the downstream request
to the end of the upstream response; expiry before the response started is a 504 "upstream
request timeout" (flag UT), after it a reset.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING

from ubimesh.proxy.http.codec import LAST_CHUNK, chunk, encode_headers
from ubimesh.proxy.http.pool import (
    RESPONSE_HOP_BY_HOP,
    RH_HOP_BY_HOP,
    Http1Pool,
    UpstreamConnection,
    pool_for,
)
from ubimesh.proxy.response_flags import NC, UH, UT, add_flag, pool_failure_flag, reset_flag
from ubimesh.proxy.snapshot.types import (
    DirectResponseAction,
    MirrorPolicy,
    RedirectAction,
    Route,
    RouteAction,
    WeightedClusterEntry,
)
from ubimesh.proxy.upstream.host import Host

if TYPE_CHECKING:
    from ubimesh.proxy.network.hcm_config import HcmRuntime, RequestStats
    from ubimesh.proxy.network.http_manager import ActiveStream
    from ubimesh.proxy.upstream.cluster_manager import UpstreamCluster

_HEAD = "HEAD"

_rand = random.random


def route_request(stream: ActiveStream, route: Route) -> None:
    """Entry point from the HCM once the filters before the router let the request through."""
    action = route.action
    hcm = stream.hcm
    if type(action) is RouteAction:
        up = UpstreamRequest(stream, route, action, hcm)
        stream.upstream = up
        up.start()
    elif type(action) is RedirectAction:
        location = hcm.redirect_location(stream, route)
        stream.send_local_reply(action.response_code, b"", extra=[("location", location)])
    elif type(action) is DirectResponseAction:
        body = action.body or b""
        extra = None
        if action.status == 201 or 300 <= action.status < 400:
            # Envoy points a created resource or a redirect-like direct response at the
            # request's own URL.
            extra = [("location", f"http://{stream.host_header}{stream.path}")]
        stream.send_local_reply(action.status, body, extra=extra)
    else:  # pragma: no cover - the translator produces only the three kinds above
        raise AssertionError(f"unknown route action {action!r}")


def upstream_failure_body(reason: str) -> bytes:
    return (
        "upstream connect error or disconnect/reset before headers. reset reason: " + reason
    ).encode()


class UpstreamRequest:
    """The router's side of one stream: one upstream attempt (retries come later)."""

    __slots__ = (
        "action",
        "chunked",
        "cluster",
        "conn",
        "done",
        "ended",
        "entry",
        "hcm",
        "host",
        "mirrors",
        "paused_upstream",
        "pool",
        "ready",
        "response_started",
        "route",
        "rstats",
        "sent_at",
        "stream",
        "timeout",
        "timer",
    )  # fmt: skip

    def __init__(
        self, stream: ActiveStream, route: Route, action: RouteAction, hcm: HcmRuntime
    ) -> None:
        self.stream = stream
        self.route = route
        self.action = action
        self.hcm = hcm
        self.cluster: UpstreamCluster | None = None
        self.host: Host | None = None
        self.pool: Http1Pool | None = None
        self.conn: UpstreamConnection | None = None
        self.ready = False
        self.chunked = stream.chunked
        self.timer: asyncio.TimerHandle | None = None
        self.sent_at = 0.0
        self.response_started = False
        self.mirrors: list[ShadowRequest] | None = None
        self.done = False
        self.paused_upstream = False
        self.entry: WeightedClusterEntry | None = None
        self.rstats: RequestStats | None = None
        self.ended = False
        # Envoy's router would take x-envoy-upstream-rq-timeout-ms from internal requests;
        # without an internal address configuration there are none (the HCM strips it).
        self.timeout = action.timeout

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        stream = self.stream
        hcm = self.hcm
        action = self.action
        name, self.entry = hcm.pick_cluster(stream, action)
        cluster = hcm.clusters.get(name) if name else None
        if cluster is None:
            hcm.rq_no_cluster.value += 1
            stream.send_local_reply(action.cluster_not_found_response_code, b"", NC)
            return
        self.cluster = cluster
        hash_key = hcm.hash_key(stream, action) if action.hash_policies else None
        host = cluster.choose_host(hash_key)
        if host is None:
            cluster.stats.upstream_cx_none_healthy.value += 1
            stream.send_local_reply(503, b"no healthy upstream", UH)
            return
        self.host = host
        pool = self.pool = pool_for(host, cluster)
        host.active_requests += 1
        self.rstats = hcm.request_stats(cluster.name)
        if action.mirror_policies:
            self._start_mirrors()
        pool.acquire(self)

    def _start_mirrors(self) -> None:
        hcm = self.hcm
        for policy in self.action.mirror_policies:
            if policy.numerator < policy.denominator and (
                _rand() * policy.denominator >= policy.numerator
            ):
                continue
            cluster = hcm.clusters.get(policy.cluster)
            if cluster is None:
                continue
            host = cluster.choose_host(None)
            if host is None:
                continue
            shadow = ShadowRequest(self, host, cluster, policy)
            if self.mirrors is None:
                self.mirrors = []
            self.mirrors.append(shadow)

    # -- pool callbacks -------------------------------------------------------------------------

    def on_pool_ready(self, conn: UpstreamConnection) -> None:
        if self.done:
            if self.pool is not None:
                self.pool.release(conn)
            return
        stream = self.stream
        self.conn = conn
        rs = self.rstats
        if rs is not None:
            rs.rq_total.value += 1  # Envoy counts a request once it has a connection
        conn.attach(self, stream.method == _HEAD)
        pending = stream.take_pending_body()
        if self.mirrors:
            # Shadows copy the request before the primary rewrites its headers in place.
            for m in self.mirrors:
                m.send_head(pending)
        head = self.hcm.build_upstream_head(
            stream, self.route, self.action, self.host, self.entry, self.timeout
        )
        self.sent_at = time.monotonic()
        if pending:
            if self.chunked:
                conn.write(head + b"".join([chunk(p) for p in pending]))
            else:
                conn.write(head + b"".join(pending))
        else:
            conn.write(head)
        self.ready = True
        if stream.request_complete:
            self.decode_end()
        if conn.write_paused:
            self.on_upstream_pause()
        if stream.conn.write_paused:
            # A pipelined request starting while the client is still behind on the previous
            # response: do not read this response faster than the client takes it.
            self.pause_upstream_reading()

    def on_pool_failure(self, reason: str) -> None:
        if self.done:
            return
        if self.rstats is not None:
            self.rstats.rq_pending_failure.value += 1
        self._fail_before_response(reason, pool_failure_flag(reason))

    # -- decode path (request body) -------------------------------------------------------------

    def decode_data(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        if self.chunked:
            conn.write(chunk(data))
        else:
            conn.write(data)
        if self.mirrors:
            for m in self.mirrors:
                m.send_body(data)

    def decode_end(self) -> None:
        conn = self.conn
        if conn is None or self.ended:
            return
        self.ended = True
        if self.chunked:
            conn.write(LAST_CHUNK)
        if self.mirrors:
            for m in self.mirrors:
                m.send_end()
        timeout = self.timeout
        if timeout and self.timer is None and not self.done and not self.stream.upgrade:
            self.timer = self.hcm.loop.call_later(timeout, self._on_timeout)

    def on_downstream_upgrade_bytes(self, rest: bytes) -> None:
        """Bytes after an upgrade request's head: they belong to the tunnel."""
        stream = self.stream
        stream.conn.become_tunnel(self)
        if rest:
            self.decode_data_raw(rest)

    def decode_data_raw(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            conn.write(data)
        else:
            self.stream.on_body(data)

    # -- upstream callbacks (response) ----------------------------------------------------------

    def on_upstream_headers(
        self, status: int, headers: list[tuple[str, str]], keep_alive: bool, flags: int
    ) -> None:
        if self.done:
            return
        self.response_started = True
        stream = self.stream
        if flags & RH_HOP_BY_HOP:
            headers = [kv for kv in headers if kv[0] not in RESPONSE_HOP_BY_HOP]
        out = headers
        if status != 101:
            out.append(
                (
                    "x-envoy-upstream-service-time",
                    str(int((time.monotonic() - self.sent_at) * 1000)),
                )
            )
        rs = self.rstats
        if rs is not None:
            rs.count(status)
        if status == 101 and stream.upgrade:
            # From here on the route timeout no longer applies: the tunnel lives until one
            # side closes (or the connection idle timeout).
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            stream.encode_headers(101, out, end_stream=False)
            stream.conn.become_tunnel(self)
            return
        stream.encode_headers(status, out, False, flags)

    def on_upstream_data(self, data: bytes) -> None:
        if self.done:
            return
        stream = self.stream
        conn = stream.conn
        if conn.upgraded_to is self:
            conn.last_activity = conn.loop.time()
            conn.write(data)
        else:
            stream.encode_data(data)

    def on_upstream_end(self) -> None:
        self.conn = None
        if self.done:
            return
        stream = self.stream
        if stream.conn.upgraded_to is self:
            stream.conn.close_after_write()
            self._cleanup()
            return
        rs = self.rstats
        if rs is not None:
            rs.rq_completed.value += 1
            rs.record_time((time.monotonic() - self.sent_at) * 1000.0)
        stream.encode_end()

    def on_upstream_reset(self, reason: str) -> None:
        self.conn = None
        if self.done:
            return
        if self.rstats is not None:
            self.rstats.rq_rx_reset.value += 1
        flag = reset_flag(reason)
        if self.response_started:
            self.stream.flags = add_flag(self.stream.flags, flag)
            self.stream.reset()
            return
        self._fail_before_response(reason, flag)

    def on_upstream_upgrade(self, rest: bytes) -> None:
        if rest:
            self.on_upstream_data(rest)

    def on_upstream_read_begin(self) -> None:
        self.stream.conn.cork()

    def on_upstream_read_end(self) -> None:
        self.stream.conn.uncork()

    def on_upstream_pause(self) -> None:
        self.stream.conn.pause_reading_for_upstream()

    def on_upstream_resume(self) -> None:
        self.stream.conn.resume_reading_for_upstream()

    def pause_upstream_reading(self) -> None:
        conn = self.conn
        if conn is not None and not self.paused_upstream:
            self.paused_upstream = True
            conn.pause_reading()

    def resume_upstream_reading(self) -> None:
        conn = self.conn
        if conn is not None and self.paused_upstream:
            self.paused_upstream = False
            conn.resume_reading()

    def on_downstream_closed(self) -> None:
        """The downstream side of a tunnel closed."""
        conn = self.conn
        if conn is not None:
            conn.write_eof()
            conn.detach_and_close()
        self._cleanup()

    # -- endings --------------------------------------------------------------------------------

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        if self.rstats is not None:
            self.rstats.rq_timeout.value += 1
        if self.response_started:
            self.stream.flags = add_flag(self.stream.flags, UT)
            self.stream.reset()
            return
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.detach_and_close()
        if self.rstats is not None:
            self.rstats.charge_local(504)
        self.stream.send_local_reply(504, b"upstream request timeout", UT)

    def _fail_before_response(self, reason: str, flag: str) -> None:
        if self.rstats is not None:
            self.rstats.charge_local(503)
        self.stream.send_local_reply(503, upstream_failure_body(reason), flag)

    def on_stream_done(self) -> None:
        """The HCM is finished with the stream (response written, reset or timed out)."""
        self._cleanup()

    def _cleanup(self) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn = self.conn
        self.conn = None
        if conn is not None:
            # The response did not finish: the connection is mid-message and cannot be reused.
            conn.detach_and_close()
        pool = self.pool
        if pool is not None:
            pool.cancel(self)
        host = self.host
        if host is not None:
            host.active_requests -= 1
        stream = self.stream
        if stream.conn.read_paused_flow:
            stream.conn.resume_reading_for_upstream()


class ShadowRequest:
    """A fire-and-forget copy of a request to a mirror cluster. Its response is read and
    dropped; it never slows or fails the primary: when its connection is not ready or its
    write buffer is full, the shadow is abandoned instead of applying backpressure."""

    __slots__ = (
        "buffered",
        "buffered_bytes",
        "conn",
        "dead",
        "hcm",
        "host",
        "limit",
        "policy",
        "pool",
        "primary",
        "timer",
    )  # fmt: skip

    def __init__(
        self, primary: UpstreamRequest, host: Host, cluster: UpstreamCluster, policy: MirrorPolicy
    ) -> None:
        self.primary = primary
        self.policy = policy
        self.hcm = primary.hcm
        self.host = host
        self.conn: UpstreamConnection | None = None
        self.buffered: list[bytes] = []
        self.buffered_bytes = 0
        self.dead = False
        self.limit = cluster.spec.per_connection_buffer_limit_bytes
        pool = self.pool = pool_for(host, cluster)
        self.hcm.mirror_stats.value += 1
        pool.acquire(self)
        timeout = primary.timeout or 15.0
        self.timer: asyncio.TimerHandle | None = self.hcm.loop.call_later(timeout, self._on_timeout)

    def send_head(self, pending: list[bytes] | None) -> None:
        stream = self.primary.stream
        head = self.hcm.build_upstream_head(
            stream,
            self.primary.route,
            self.primary.action,
            self.host,
            self.primary.entry,
            self.primary.timeout,
            shadow=self.policy,
        )
        self._send(head)
        if pending:
            for p in pending:
                self.send_body(p)

    def send_body(self, data: bytes) -> None:
        self._send(chunk(data) if self.primary.chunked else data)

    def send_end(self) -> None:
        if self.primary.chunked:
            self._send(LAST_CHUNK)

    def _send(self, data: bytes) -> None:
        if self.dead:
            return
        conn = self.conn
        if conn is None:
            self.buffered.append(data)
            self.buffered_bytes += len(data)
            if self.buffered_bytes > self.limit:
                self._abandon()
            return
        if conn.write_paused:
            self._abandon()
            return
        conn.write(data)

    # UpstreamCallbacks

    def on_pool_ready(self, conn: UpstreamConnection) -> None:
        if self.dead:
            self.pool.release(conn)
            return
        self.conn = conn
        conn.attach(self, self.primary.stream.method == _HEAD)
        if self.buffered:
            conn.write(b"".join(self.buffered))
            self.buffered = []

    def on_pool_failure(self, reason: str) -> None:
        self._finish()

    def on_upstream_headers(
        self, status: int, headers: list[tuple[str, str]], keep_alive: bool, flags: int
    ) -> None:
        pass

    def on_upstream_data(self, data: bytes) -> None:
        pass

    def on_upstream_end(self) -> None:
        self.conn = None
        self._finish()

    def on_upstream_reset(self, reason: str) -> None:
        self.conn = None
        self._finish()

    def on_upstream_upgrade(self, rest: bytes) -> None:
        self._abandon()

    def on_upstream_pause(self) -> None:
        pass

    def on_upstream_resume(self) -> None:
        pass

    def on_upstream_read_begin(self) -> None:
        pass

    def on_upstream_read_end(self) -> None:
        pass

    def _on_timeout(self) -> None:
        self.timer = None
        self._abandon()

    def _abandon(self) -> None:
        if self.dead:
            return
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.detach_and_close()
        self._finish()

    def _finish(self) -> None:
        self.dead = True
        self.buffered = []
        self.buffered_bytes = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pool.cancel(self)


__all__ = ["ShadowRequest", "UpstreamRequest", "encode_headers", "route_request"]
