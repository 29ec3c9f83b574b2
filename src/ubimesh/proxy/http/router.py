"""The router: the terminal HTTP filter. It turns a matched route into upstream requests.

For a ``RouteAction`` it picks the cluster (plain, weighted or from a header), asks the
cluster's load balancer for a host, takes a connection from that host's pool, rewrites the
request as the route says, writes it, and relays the response back to the ``ActiveStream``.
Redirects and direct responses are answered locally. Request mirroring sends a shadow copy that
is never waited for.

Timeouts (Envoy's semantics): the route ``timeout`` runs from the end of the downstream request
to the end of the upstream response; expiry before the response started is a 504 "upstream
request timeout" (flag UT), after it a reset. The retry policy's ``per_try_timeout`` bounds
each attempt from the moment it has a connection and the whole request was received, until
its response headers.

Retries (the route's or virtual host's ``retry_policy``; decisions in ``retry.py``): while a
retry is still possible the router keeps the request head and the body chunks it has received
(references, no copies), up to the downstream connection's buffer limit, past which retries
are off for the request. A failed attempt (a retriable status, a reset or connect failure, a
per-try timeout) is retried after Envoy's jittered backoff on a host chosen again, avoiding
hosts already tried with the previous_hosts predicate. Once response headers are forwarded
nothing is retried. A request whose method is not idempotent is retried only when none of it
reached the upstream (ubimesh's rule, stricter than Envoy's). Every attempt holds the
cluster's ``requests`` circuit breaker resource, and a scheduled retry its ``retries`` one.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Final

from ubimesh.proto.headers import Headers
from ubimesh.proxy.http.codec import LAST_CHUNK, chunk, encode_headers
from ubimesh.proxy.http.pool import (
    CONNECTION_FAILURE,
    OVERFLOW,
    PROTOCOL_ERROR,
    RESPONSE_HOP_BY_HOP,
    RH_HOP_BY_HOP,
    Http1Pool,
    UpstreamConnection,
    pool_for,
)
from ubimesh.proxy.http.retry import (
    IDEMPOTENT_METHODS,
    LIMIT_EXCEEDED,
    NO,
    YES,
    Backoff,
    PreviousPriorities,
    choose_host_with_load,
    retry_on_headers,
    retry_on_reset,
)
from ubimesh.proxy.http.retry import OVERFLOW as RETRY_OVERFLOW
from ubimesh.proxy.response_flags import (
    NC,
    UH,
    UO,
    URX,
    UT,
    add_flag,
    pool_failure_flag,
    reset_flag,
)
from ubimesh.proxy.snapshot.retry import RETRY_ON_ENVOY_RATE_LIMITED, RetryPolicy
from ubimesh.proxy.snapshot.types import (
    DirectResponseAction,
    MirrorPolicy,
    RedirectAction,
    Route,
    RouteAction,
    WeightedClusterEntry,
)
from ubimesh.proxy.upstream.host import Host
from ubimesh.proxy.upstream.outlier import (
    EXT_ORIGIN_REQUEST_FAILED,
    LOCAL_ORIGIN_CONNECT_FAILED,
    LOCAL_ORIGIN_CONNECT_SUCCESS,
    LOCAL_ORIGIN_TIMEOUT,
)

# The clock as a constant: under mypyc a Final is a C static, where ``time.monotonic`` is a
# generic attribute lookup on the module (about 200 instructions) per call.
_monotonic: Final = time.monotonic

if TYPE_CHECKING:
    from ubimesh.proxy.network.hcm_config import HcmRuntime, RequestStats
    from ubimesh.proxy.network.http_manager import ActiveStream
    from ubimesh.proxy.upstream.circuit_breaker import ResourceManager
    from ubimesh.proxy.upstream.cluster import RetryStats
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


def _flag_retry_result(stream: ActiveStream, result: int) -> None:
    """Mark a retry decision that ends the request: URX when the retries ran out, UO when the
    retries circuit breaker refused one; nothing for NO."""
    if result != NO:
        stream.flags = add_flag(stream.flags, URX if result == LIMIT_EXCEEDED else UO)


#: Pool failure reasons as Envoy words them in the local reply (its StreamResetReason text):
#: a refused or failed connect is a "remote connection failure".
_REASON_TEXT = {CONNECTION_FAILURE: "remote connection failure"}


def upstream_failure_body(reason: str, retried: bool = False) -> bytes:
    """Envoy's local reply body for a failure before the response headers."""
    return (
        "upstream connect error or disconnect/reset before headers. "
        + ("retried and the latest " if retried else "")
        + "reset reason: "
        + _REASON_TEXT.get(reason, reason)
    ).encode()


class UpstreamRequest:
    """The router's side of one stream: its upstream attempts (one unless retried)."""

    __slots__ = (
        "action",
        "attempt_timer",
        "attempts",
        "backoff",
        "backoff_timer",
        "body",
        "body_bytes",
        "chunked",
        "cluster",
        "conn",
        "done",
        "ended",
        "ended_mark",
        "ended_mark_delay",
        "entry",
        "hash_key",
        "hashing",
        "hcm",
        "head_items",
        "host",
        "in_flight",
        "mirroring",
        "mirrors",
        "paused_upstream",
        "per_try",
        "policy",
        "pool",
        "priorities",
        "ready",
        "resources",
        "response_started",
        "retries_left",
        "retry_held",
        "retry_on",
        "retry_policy",
        "retry_statuses",
        "route",
        "route_deferred",
        "rq_held",
        "rstats",
        "sent_at",
        "stream",
        "timeout",
        "timer",
        "tried",
    )  # fmt: skip

    # Set only where they are used, never read before (not in __init__: the request path
    # without a retry policy does not pay for them).
    resources: ResourceManager
    """The circuit breakers of the current attempt's cluster (set when it starts)."""
    hash_key: int | None
    head_items: list[tuple[str, str]] | None
    """The request header list before the first attempt's rewrites, for the next attempts (a
    list copy: a ``Headers`` copy costs about three times as much, on every request with a
    retry policy)."""
    body_bytes: int
    retries_left: int
    retry_on: int
    """The policy's ``on`` bits, read per response while ``policy`` is set."""
    retry_statuses: frozenset[int]
    """The statuses the policy retries."""
    backoff: Backoff
    tried: list[Host] | None
    """The hosts attempted (previous_hosts only)."""
    priorities: PreviousPriorities | None
    ended_mark: asyncio.TimerHandle | None
    """The timer decode_end armed (per-try or route), set only with a retry policy: the
    downstream request ended ``ended_mark_delay`` before it expires (``_ended_at``). Reading
    the loop's clock costs a Python method call; the timer already knows the time."""
    ended_mark_delay: float

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
        # One read of the interpreted RouteAction (its ``hot`` tuple), not four.
        self.timeout, self.hashing, self.retry_policy, self.mirroring, _ = action.hot
        self.rq_held = False
        """This attempt holds the cluster's ``requests`` resource (from its connection on)."""
        self.in_flight = False
        """An attempt is under way (from choosing its host to its end)."""
        self.attempts = 0
        self.per_try: float | None = None
        self.attempt_timer: asyncio.TimerHandle | None = None
        self.route_deferred = False
        """The route timer is deferred behind the per-try timer (see decode_end); it expires
        ``timeout`` after the request ended (``_ended_at``)."""
        # Retry state: with no retry policy, ``policy`` and ``body`` stay None and the request
        # path reads nothing else of it.
        self.policy: RetryPolicy | None = None
        """The retry policy while a retry is still possible; None once it is not."""
        self.body: list[bytes] | None = None
        """The request body chunks received so far, kept while a retry is possible."""
        self.retry_held: ResourceManager | None = None
        """The resource manager whose ``retries`` this request holds (a retry is scheduled or
        under way), as Envoy holds it until the next retry decision."""
        self.backoff_timer: asyncio.TimerHandle | None = None

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
        hash_key = self.hash_key = hcm.hash_key(stream, action) if self.hashing else None
        host = cluster.choose_host(hash_key)
        if host is None:
            cluster.stats.upstream_cx_none_healthy.value += 1
            stream.send_local_reply(503, b"no healthy upstream", UH)
            return
        self.rstats = hcm.request_stats(cluster.name)
        policy = self.retry_policy
        if policy is not None:
            self._setup_retries(policy)
        if self.mirroring:
            self._start_mirrors()
        self._start_attempt(cluster, host)

    def _setup_retries(self, policy: RetryPolicy) -> None:
        # One read of the interpreted dataclass (see RetryPolicy.hot), not three.
        on, statuses, per_try = policy.hot
        timeout = self.timeout
        if per_try is not None and not (timeout and per_try >= timeout):
            # As Envoy: a per-try timeout not shorter than the route timeout is ignored.
            self.per_try = per_try
        if not on or self.stream.upgrade:
            return
        self.policy = policy
        self.retry_on = on
        self.retry_statuses = statuses
        # The rest of the retry state is made by the first retry decision (_retry_state): a
        # request that never fails, the usual case, pays for none of it.
        self.tried = None
        self.priorities = None

    def _retry_state(self, policy: RetryPolicy) -> None:
        """Make the state only retries need, at the first retry decision: the retry count,
        the backoff and the retry modifiers, which learn the one host attempted so far."""
        self.retries_left = policy.num_retries
        self.backoff = Backoff(policy.base_interval, policy.max_interval)
        tried = self.tried = [] if policy.previous_hosts else None
        frequency = policy.previous_priorities
        priorities = self.priorities = PreviousPriorities(frequency) if frequency else None
        host = self.host
        if host is not None:
            if tried is not None:
                tried.append(host)
            if priorities is not None:
                priorities.on_host_attempted(host)

    def _idempotent(self) -> bool:
        return self.stream.method in IDEMPOTENT_METHODS

    def _start_attempt(self, cluster: UpstreamCluster, host: Host) -> None:
        self.attempts += 1
        self.host = host
        self.in_flight = True
        host.active_requests += 1
        if self.attempts > 1:
            # The retry modifiers learn every attempted host (Envoy's onHostAttempted); the
            # first attempt's host is recorded by _retry_state.
            if self.tried is not None:
                self.tried.append(host)
            if self.priorities is not None:
                self.priorities.on_host_attempted(host)
        pool = self.pool = pool_for(host, cluster)
        resources = self.resources = cluster.resources.default
        if not resources.requests.can_create():
            # max_requests: Envoy's pool fails the stream as an overflow (never retried),
            # counted as an active-request overflow.
            cluster.stats.upstream_rq_active_overflow.value += 1
            self.on_pool_failure(OVERFLOW)
            return
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
        self.resources.requests.inc()
        self.rq_held = True
        host = self.host
        assert host is not None
        monitor = host.outlier
        if monitor is not None:
            monitor.put_local_origin(LOCAL_ORIGIN_CONNECT_SUCCESS)
        rs = self.rstats
        if rs is not None:
            rs.rq_total.value += 1  # Envoy counts a request once it has a connection
        conn.attach(self, stream.method == _HEAD)
        if self.ready:
            # A retry of a request already sent once (attempts that failed to connect sent
            # nothing: the first one that connects takes the path below).
            self._send_retry(conn)
            return
        pending = stream.take_pending_body()
        if self.mirrors:
            # Shadows copy the request before the primary rewrites its headers in place.
            for m in self.mirrors:
                m.send_head(pending)
        if self.policy is not None:
            # Keep what a retry sends again: the headers before this attempt's rewrites, and
            # the body chunks (the list itself; later chunks are appended to it).
            self.head_items = stream.headers.items.copy()
            if pending is None:
                self.body = pending = []
                self.body_bytes = 0
            else:
                self.body = pending
                size = 0
                for p in pending:
                    size += len(p)
                self.body_bytes = size
        head = self.hcm.build_upstream_head(
            stream, self.route, self.action, host, self.entry, self.per_try or self.timeout
        )
        self.sent_at = _monotonic()
        if pending:
            if self.chunked:
                conn.write(head + b"".join([chunk(p) for p in pending]))
            else:
                conn.write(head + b"".join(pending))
        else:
            conn.write(head)
        self.ready = True
        if self.body is not None and self.body_bytes > stream.conn.buffer_limit:
            self._abandon_retries()
        if stream.request_complete:
            self.decode_end()
        if conn.write_paused:
            self.on_upstream_pause()
        if stream.conn.write_paused:
            # A pipelined request starting while the client is still behind on the previous
            # response: do not read this response faster than the client takes it.
            self.pause_upstream_reading()

    def _send_retry(self, conn: UpstreamConnection) -> None:
        """Write a retry attempt: the head built again from the kept headers, the kept body,
        and the end of the request if it has ended."""
        stream = self.stream
        saved = self.head_items
        if saved is not None:
            # Each attempt rewrites a fresh copy, so header rules apply once per attempt.
            stream.headers = Headers(saved)
        head = self.hcm.build_upstream_head(
            stream, self.route, self.action, self.host, self.entry, self._expected_timeout()
        )
        body = self.body
        if body:
            if self.chunked:
                head += b"".join([chunk(p) for p in body])
            else:
                head += b"".join(body)
        if self.ended and self.chunked:
            head += LAST_CHUNK
        conn.write(head)
        if self.ended:
            self._arm_per_try()
        if conn.write_paused:
            self.on_upstream_pause()

    def _expected_timeout(self) -> float | None:
        """x-envoy-expected-rq-timeout-ms for a retry, as Envoy's setTimeoutHeaders: the
        per-try timeout, or the route timeout, bounded by what is left of the route timeout."""
        timeout = self.timeout
        expected = self.per_try or timeout
        if not expected:
            return None
        expected_ms = int(expected * 1000)
        if timeout and self.ended:
            left = int(timeout * 1000) - int((self.hcm.loop.time() - self._ended_at()) * 1000)
            expected_ms = max(1, min(expected_ms, left))
        return (expected_ms + 0.5) / 1000.0

    def on_pool_failure(self, reason: str) -> None:
        if self.done:
            return
        self._end_attempt()
        rs = self.rstats
        if rs is not None and reason != OVERFLOW:
            rs.rq_pending_failure.value += 1
        result = NO
        if reason != OVERFLOW:
            host = self.host
            monitor = host.outlier if host is not None else None
            if monitor is not None:
                monitor.put_local_origin(LOCAL_ORIGIN_CONNECT_FAILED)
            policy = self.policy
            if policy is not None:
                # Nothing reached the upstream: even a non-idempotent request may go again.
                result = self._decide(retry_on_reset(policy, True, False))
                if result == YES:
                    self._retry_later()
                    return
        elif self.retry_held is not None:
            result = self._decide(False)  # Envoy never retries an overflow
        self._fail_before_response(reason, pool_failure_flag(reason), result)

    # -- decode path (request body) -------------------------------------------------------------

    def decode_data(self, data: bytes) -> None:
        conn = self.conn
        body = self.body
        if body is not None:
            body.append(data)
            self.body_bytes += len(data)
            if self.body_bytes > self.stream.conn.buffer_limit:
                self._abandon_retries()
                if self.done:
                    return
        if conn is not None:
            if self.chunked:
                conn.write(chunk(data))
            else:
                conn.write(data)
        if self.mirrors:
            for m in self.mirrors:
                m.send_body(data)

    def decode_end(self) -> None:
        if self.ended:
            return
        self.ended = True
        conn = self.conn
        if conn is not None:
            if self.chunked:
                conn.write(LAST_CHUNK)
            if self.per_try is not None:
                self._arm_per_try()
        if self.mirrors:
            for m in self.mirrors:
                m.send_end()
        timeout = self.timeout
        if timeout and self.timer is None and not self.done and not self.stream.upgrade:
            if self.attempt_timer is not None:
                # The per-try timer (shorter: _setup_retries) fires first: the route timer is
                # only armed when it fires or is cancelled (_restore_route_timer), so that a
                # request that is answered in time costs one timer, not two.
                self.route_deferred = True
            else:
                self.timer = self.hcm.call_later(timeout, self._on_timeout)
        if self.policy is not None or self.route_deferred:
            # Only this decode_end arms timers before the request has ended, so the one it
            # armed, if any, dates the end (_ended_at: retries' expected timeout, the deferred
            # route timer).
            if self.attempt_timer is not None:
                self.ended_mark = self.attempt_timer
                self.ended_mark_delay = self.per_try or 0.0
            elif self.timer is not None:
                self.ended_mark = self.timer
                self.ended_mark_delay = timeout or 0.0
            else:
                self.ended_mark = None

    def _ended_at(self) -> float:
        """The loop time at which the downstream request ended (a request with a retry
        policy that has ended; "now" when decode_end armed no timer)."""
        mark = self.ended_mark
        if mark is None:
            return self.hcm.loop.time()
        return mark.when() - self.ended_mark_delay

    def _restore_route_timer(self) -> None:
        """Arm the route timer that decode_end deferred, for what is left of it."""
        if self.route_deferred and not self.done:
            self.route_deferred = False
            deadline = self._ended_at() + (self.timeout or 0.0)
            self.timer = self.hcm.loop.call_at(deadline, self._on_timeout)

    def _arm_per_try(self) -> None:
        per_try = self.per_try
        if per_try is not None and self.attempt_timer is None and not self.stream.upgrade:
            self.attempt_timer = self.hcm.call_later(per_try, self._on_per_try_timeout)

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
        host = self.host
        monitor = host.outlier if host is not None else None
        if monitor is not None:
            monitor.put_http_status(status)
        stream = self.stream
        policy = self.policy
        if policy is not None:
            # A status the policy does not retry (the usual case) costs a set lookup and a bit
            # test; envoy-ratelimited decides on a response header.
            if (
                status in self.retry_statuses or self.retry_on & RETRY_ON_ENVOY_RATE_LIMITED
            ) and retry_on_headers(policy, status, headers):
                # A response: the request reached the upstream.
                result = self._decide(self._idempotent())
                if result == YES:
                    self._retry_stats().count_retried(status)
                    self._retry_later()
                    return
                _flag_retry_result(stream, result)  # NO: not idempotent, no flag
            elif self.retry_held is not None:
                self._decide(False)
            self._stop_retrying()
        self.response_started = True
        timer = self.attempt_timer
        if timer is not None and not self.route_deferred:
            # The per-try timeout no longer applies once the response has started (Envoy
            # ignores its expiry from then on). When it stands in for the deferred route
            # timer it stays: its expiry then arms the route timer.
            timer.cancel()
            self.attempt_timer = None
        if flags & RH_HOP_BY_HOP:
            headers = [kv for kv in headers if kv[0] not in RESPONSE_HOP_BY_HOP]
        out = headers
        if status != 101:
            out.append(
                (
                    "x-envoy-upstream-service-time",
                    str(int((_monotonic() - self.sent_at) * 1000)),
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
            rs.record_time((_monotonic() - self.sent_at) * 1000.0)
        stream.encode_end()

    def on_upstream_reset(self, reason: str) -> None:
        self.conn = None
        if self.done:
            return
        # No upstream_rq_rx_reset: on HTTP/1 the upstream can only close the connection,
        # which Envoy does not count as a remote stream reset (that is HTTP/2's RST_STREAM).
        flag = reset_flag(reason)
        if self.response_started:
            self.stream.flags = add_flag(self.stream.flags, flag)
            self.stream.reset()
            return
        result = self._sent_attempt_failed(EXT_ORIGIN_REQUEST_FAILED)
        if result != YES:
            self._fail_before_response(reason, flag, result)

    def _sent_attempt_failed(self, outlier_result: int) -> int:
        """An attempt whose request reached the upstream (its head was written when the
        connection came) failed before its response: a reset or a per-try timeout. End it,
        tell outlier detection, and retry when the policy allows. Returns the decision; YES
        means a retry is scheduled and the caller has nothing more to do."""
        self._end_attempt()
        host = self.host
        monitor = host.outlier if host is not None else None
        if monitor is not None:
            monitor.put_local_origin(outlier_result)
        policy = self.policy
        if policy is None:
            return NO
        result = self._decide(self._idempotent() and retry_on_reset(policy, False, True))
        if result == YES:
            self._retry_later()
        return result

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

    # -- retries --------------------------------------------------------------------------------

    def _retry_stats(self) -> RetryStats:
        cluster = self.cluster
        assert cluster is not None  # set before any attempt
        return cluster.stats.retry

    def _decide(self, would_retry: bool) -> int:
        """Envoy's RetryStateImpl::shouldRetry: YES (a retry is scheduled: the ``retries``
        resource is taken and counted), NO, LIMIT_EXCEEDED or OVERFLOW. A retry decided
        earlier that is followed by a failure no policy retries counts as a success, as in
        Envoy."""
        held = self.retry_held
        if held is None and not would_retry:
            return NO
        st = self._retry_stats()
        if held is not None:
            self.retry_held = None
            held.retries.dec()
            if not would_retry:
                st.success.value += 1
        if not would_retry:
            return NO
        if self.attempts == 1 and self.policy is not None:
            self._retry_state(self.policy)
        if self.retries_left <= 0:
            st.limit_exceeded.value += 1
            return LIMIT_EXCEEDED
        self.retries_left -= 1
        resources = self.resources
        if not resources.retries.can_create():
            st.overflow.value += 1
            return RETRY_OVERFLOW
        resources.retries.inc()
        self.retry_held = resources
        st.retry.value += 1
        st.backoff_exponential.value += 1
        return YES

    def _retry_later(self) -> None:
        """Give up the current attempt and start the next one after the backoff."""
        conn = self.conn
        self.conn = None
        if conn is not None:
            # Envoy resets the attempt's stream; on HTTP/1 that closes its connection.
            conn.detach_and_close()
        self._end_attempt()
        self.paused_upstream = False
        stream = self.stream
        if stream.conn.read_paused_flow:
            # The body keeps arriving into the retry buffer (bounded by the buffer limit).
            stream.conn.resume_reading_for_upstream()
        self.backoff_timer = self.hcm.call_later(self.backoff.next(), self._do_retry)

    def _do_retry(self) -> None:
        self.backoff_timer = None
        if self.done:
            return
        cluster = self.cluster
        assert cluster is not None
        # The cluster may have been replaced (CDS, reload) meanwhile: take the current one.
        current = self.hcm.clusters.get(cluster.name)
        host = self._choose_retry_host(current) if current is not None else None
        if current is None or host is None:
            cluster.stats.upstream_cx_none_healthy.value += 1
            self._release_retry()
            if self.rstats is not None:
                self.rstats.charge_local(503)
            self.stream.send_local_reply(503, b"no healthy upstream", UH)
            return
        self.cluster = current
        self._start_attempt(current, host)

    def _choose_retry_host(self, cluster: UpstreamCluster) -> Host | None:
        """A host for a retry: with previous_priorities, from the priority levels not tried
        yet; with previous_hosts, chosen again up to host_selection_retry_max_attempts times
        while it is one already tried (then the last choice stands, as in Envoy)."""
        hash_key = self.hash_key
        priorities = self.priorities
        load = priorities.priority_load(cluster) if priorities is not None else None
        tried = self.tried
        policy = self.policy
        again = 0
        if tried is not None and policy is not None:
            again = policy.host_selection_max_attempts
        while True:
            if load is None:
                host = cluster.choose_host(hash_key)
            else:
                host = choose_host_with_load(cluster, load, hash_key)
            if again <= 0 or host is None or tried is None or host not in tried:
                return host
            again -= 1

    def _abandon_retries(self) -> None:
        """The request body outgrew the buffer limit: retries are off for this request
        (Envoy's retry_or_shadow_abandoned). Between attempts nothing can carry the request
        on: 507, as Envoy answers."""
        self._retry_stats().abandoned.value += 1
        self._stop_retrying()
        if self.conn is None and not self.done:
            self.body = None
            if self.rstats is not None:
                self.rstats.charge_local(507)
            self.stream.send_local_reply(
                507, b"exceeded request buffer limit while retrying upstream"
            )

    def _stop_retrying(self) -> None:
        """No more retries for this request: drop the kept request and the retries
        resource."""
        self.policy = None
        self.body = None
        self.head_items = None
        self._release_retry()

    def _release_retry(self) -> None:
        held = self.retry_held
        if held is not None:
            self.retry_held = None
            held.retries.dec()

    # -- endings --------------------------------------------------------------------------------

    def _end_attempt(self) -> None:
        """The current attempt is over: its host's request count, its ``requests`` resource
        and its per-try timer are released."""
        if not self.in_flight:
            return
        self.in_flight = False
        host = self.host
        if host is not None:
            host.active_requests -= 1
        if self.rq_held:
            self.rq_held = False
            self.resources.requests.dec()
        timer = self.attempt_timer
        if timer is not None:
            timer.cancel()
            self.attempt_timer = None
        if self.route_deferred:
            self._restore_route_timer()

    def _on_per_try_timeout(self) -> None:
        self.attempt_timer = None
        if self.done:
            return
        if self.response_started:
            self._restore_route_timer()
            return
        self._retry_stats().per_try_timeout.value += 1
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.detach_and_close()
        result = self._sent_attempt_failed(LOCAL_ORIGIN_TIMEOUT)
        if result != YES:
            self._timeout_reply(result)

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
        awaiting = self.in_flight
        if awaiting:
            host = self.host
            monitor = host.outlier if host is not None else None
            if monitor is not None:
                monitor.put_local_origin(LOCAL_ORIGIN_TIMEOUT)
        self._end_attempt()
        if awaiting and self.rstats is not None:
            # Envoy charges the 504 to an attempt that was awaiting its response, not to a
            # request caught between attempts.
            self.rstats.charge_local(504)
        self.stream.send_local_reply(504, b"upstream request timeout", UT)

    def _timeout_reply(self, result: int) -> None:
        _flag_retry_result(self.stream, result)
        if self.rstats is not None:
            self.rstats.charge_local(504)
        self.stream.send_local_reply(504, b"upstream request timeout", UT)

    def _fail_before_response(self, reason: str, flag: str, result: int = NO) -> None:
        stream = self.stream
        _flag_retry_result(stream, result)
        # Envoy answers a malformed upstream response with 502, other failures with 503.
        status = 502 if reason == PROTOCOL_ERROR else 503
        if self.rstats is not None:
            self.rstats.charge_local(status)
        # A circuit breaker overflow is marked for the downstream, as Envoy does.
        extra = [("x-envoy-overloaded", "true")] if reason == OVERFLOW else None
        stream.send_local_reply(
            status, upstream_failure_body(reason, self.attempts > 1), flag, extra=extra
        )

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
        backoff_timer = self.backoff_timer
        if backoff_timer is not None:
            backoff_timer.cancel()
            self.backoff_timer = None
        conn = self.conn
        self.conn = None
        if conn is not None:
            # The response did not finish: the connection is mid-message and cannot be reused.
            conn.detach_and_close()
        pool = self.pool
        if pool is not None:
            pool.cancel(self)
        self._end_attempt()
        if self.retry_held is not None:
            self._release_retry()
        self.body = None
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
        self.timer: asyncio.TimerHandle | None = self.hcm.call_later(timeout, self._on_timeout)

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
