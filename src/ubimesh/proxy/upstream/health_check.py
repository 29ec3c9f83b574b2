"""Active health checking: Envoy's HTTP and TCP health checkers, one session per host.

A cluster with ``health_checks`` gets a ``HealthChecker``; each of its hosts gets a session
(``host.health_checker``), an asyncio task that checks the host, waits, and checks again. The
semantics follow Envoy's ``HealthCheckerImplBase`` (source/extensions/health_checkers/common):

* **Start.** A host that joins a health checked cluster starts with ``FAILED_ACTIVE_HC`` and its
  first check runs at once (after a random ``initial_jitter`` when set). The first success
  makes it healthy whatever ``healthy_threshold`` is. ``ClusterManager.start()`` waits, bounded
  by the checks' timeout, for every first check, as Envoy's cluster warming does, so the
  proxy does not start serving with every checked host marked failed.
* **Results.** A check passes or fails; a pass with ``x-envoy-degraded`` in the response marks
  the host ``DEGRADED_ACTIVE_HC``. A failing check is *active* (an HTTP status outside
  ``expected_statuses``, default 200, or a body without the ``receive`` payloads) or
  *network* (connect refused, reset, connection closed early, or no answer within
  ``timeout``). A healthy host turns ``FAILED_ACTIVE_HC`` at once on an active failure, and on
  the ``unhealthy_threshold``-th network failure in a row (or a failure with a status in
  ``retriable_statuses``); a failed host needs ``healthy_threshold`` passes in a row. A
  network timeout on a failed host also sets ``ACTIVE_HC_TIMEOUT``. A failing response with
  ``x-envoy-immediate-health-check-fail`` sets ``EXCLUDED_VIA_IMMEDIATE_HC_FAIL`` (left out of
  the balancer's percentages) until the host passes again.
* **Timing.** The next check is due after ``interval``, or ``unhealthy_interval`` while the
  host fails, or the edge intervals while a transition is pending, plus
  ``interval_jitter_percent`` % of it and ``interval_jitter`` at random. Until the cluster has
  carried traffic (``upstream_cx_total`` or bytes) checks run every ``no_traffic_interval``
  (default 60 s), as in Envoy; set it to the interval for tests and to check idle clusters.
* **HTTP** (HTTP/1.1): ``GET path`` with ``host`` (default: the cluster's name) and
  ``user-agent: Envoy/HC``; the connection is kept between checks when
  ``reuse_connection`` (the default) and the response allows it.
* **TCP**: connect, write ``send``, read until every ``receive`` payload has arrived in order;
  with neither payload, a connect alone passes. The connection is closed after each check
  (Envoy keeps it when there is a payload and ``reuse_connection``).

A passing check also brings back a host that outlier detection ejected
(``OutlierDetector.on_health_check_success``). Health state lives on the host, so a cluster
update that keeps a host keeps its verdict and counts: the new checker adopts the session.

Stats: ``cluster.<name>.health_check.attempt|success|failure|network_failure|passive_failure|
verify_cluster`` (counters) and ``healthy|degraded`` (gauges), as in Envoy.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

import httptools

from ubimesh.proxy.snapshot.health_check import HealthCheck, HttpHealthCheck, TcpHealthCheck
from ubimesh.proxy.upstream.host import (
    ACTIVE_HC_TIMEOUT,
    DEGRADED_ACTIVE_HC,
    EXCLUDED_VIA_IMMEDIATE_HC_FAIL,
    FAILED_ACTIVE_HC,
    PENDING_ACTIVE_HC,
    Host,
)
from ubimesh.telemetry.stats import Store

if TYPE_CHECKING:
    from ubimesh.proxy.upstream.cluster import UpstreamCluster

log = logging.getLogger(__name__)

#: Flags that belong to active health checking (cleared when a cluster stops checking).
HC_FLAGS = (
    FAILED_ACTIVE_HC
    | DEGRADED_ACTIVE_HC
    | ACTIVE_HC_TIMEOUT
    | PENDING_ACTIVE_HC
    | EXCLUDED_VIA_IMMEDIATE_HC_FAIL
)

# Envoy's HealthCheckFailureType.
ACTIVE = "active"
NETWORK = "network"
NETWORK_TIMEOUT = "network_timeout"

# Envoy's HealthTransition.
UNCHANGED = 0
CHANGED = 1
CHANGE_PENDING = 2

#: Bound on a response head, and on the bytes a TCP check reads while waiting for ``receive``.
MAX_READ = 64 * 1024


class HealthCheckStats:
    __slots__ = ("attempt", "degraded", "failure", "healthy", "network_failure",
                 "passive_failure", "success", "verify_cluster")  # fmt: skip

    def __init__(self, store: Store, cluster_name: str) -> None:
        p = f"cluster.{cluster_name}.health_check."
        self.attempt = store.counter(p + "attempt")
        self.success = store.counter(p + "success")
        self.failure = store.counter(p + "failure")
        self.network_failure = store.counter(p + "network_failure")
        self.passive_failure = store.counter(p + "passive_failure")
        self.verify_cluster = store.counter(p + "verify_cluster")
        self.healthy = store.gauge(p + "healthy")
        self.degraded = store.gauge(p + "degraded")


def payload_matches(expected: tuple[bytes, ...], data: bytes) -> bool:
    """Envoy's PayloadMatcher: every payload appears in ``data``, in order."""
    start = 0
    for part in expected:
        at = data.find(part, start)
        if at < 0:
            return False
        start = at + len(part)
    return True


class _Response:
    """httptools callbacks collecting one HTTP response."""

    def __init__(self, body_limit: int) -> None:
        self.headers: set[bytes] = set()
        self.body = bytearray()
        self.body_limit = body_limit
        self.complete = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        # llhttp forgets keep-alive once the message is complete: ask now.
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.add(name.lower())

    def on_body(self, data: bytes) -> None:
        room = self.body_limit - len(self.body)
        if room > 0:
            self.body += data[:room]

    def on_message_complete(self) -> None:
        self.complete = True


class HealthChecker:
    """The active health checker of one cluster (see the module docstring)."""

    def __init__(
        self,
        cluster: UpstreamCluster,
        config: HealthCheck,
        store: Store,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.stats = HealthCheckStats(store, cluster.name)
        self.rng = rng or random.Random()
        self.sessions: dict[Host, HealthCheckSession] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        http = config.http
        self.host_header = (http.host or cluster.name) if http is not None else ""
        self.request = b""
        """The HTTP check's request, the same for every host."""
        if http is not None:
            self.request = (
                f"{http.method} {http.path} HTTP/1.1\r\nhost: {self.host_header}\r\n"
                "user-agent: Envoy/HC\r\n\r\n"
            ).encode("latin-1")

    # -- membership and lifecycle -----------------------------------------------------------

    def sync_hosts(self, hosts: Iterable[Host]) -> None:
        """Follow the cluster's host set: a new host gets a session (and starts failed,
        unless it carries a session from a previous checker, whose state is adopted); a
        removed host's session stops."""
        wanted = list(hosts)
        keep = set(wanted)
        for h in [h for h in self.sessions if h not in keep]:
            self.sessions.pop(h).stop()
        for h in wanted:
            if h in self.sessions:
                continue
            prev = h.health_checker if isinstance(h.health_checker, HealthCheckSession) else None
            if prev is None:
                h.health_flags |= FAILED_ACTIVE_HC
            else:
                prev.stop()
            session = HealthCheckSession(self, h, prev)
            h.health_checker = session
            self.sessions[h] = session
            if self._loop is not None and not self.closed:
                session.start(self._loop)
        self.update_gauges()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None or self.closed:
            return
        self._loop = loop
        for s in self.sessions.values():
            s.start(loop)

    def stop(self) -> None:
        """Stop every session of this checker (a session adopted by a successor is already
        stopped and no longer listed on its host)."""
        self.closed = True
        for s in self.sessions.values():
            s.stop()

    async def wait_first(self, timeout: float) -> None:
        """Wait, at most ``timeout`` s, until every host has had its first result."""
        waiting = [
            s.first for s in self.sessions.values() if s.first is not None and not s.first.done()
        ]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)

    def update_gauges(self) -> None:
        healthy = degraded = 0
        for h in self.sessions:
            if not h.health_flags & FAILED_ACTIVE_HC:
                healthy += 1
            if h.health_flags & DEGRADED_ACTIVE_HC:
                degraded += 1
        self.stats.healthy.set(healthy)
        self.stats.degraded.set(degraded)

    # -- timing -----------------------------------------------------------------------------

    def interval(self, healthy: bool, transition: int) -> float:
        """Envoy's ``HealthCheckerImplBase::interval``: the wait before the next check."""
        c = self.config
        st = self.cluster.stats
        traffic = (
            st.upstream_cx_total.value
            or st.upstream_cx_tx_bytes_total.value
            or st.upstream_cx_rx_bytes_total.value
        )
        if traffic:
            if not healthy:
                unhealthy = c.unhealthy_interval if c.unhealthy_interval is not None else c.interval
                edge = c.unhealthy_edge_interval
                base = (
                    (edge if edge is not None else unhealthy)
                    if (transition == CHANGE_PENDING)
                    else unhealthy
                )
            else:
                edge = c.healthy_edge_interval
                base = (
                    (edge if edge is not None else c.interval)
                    if (transition == CHANGE_PENDING)
                    else c.interval
                )
        else:
            quiet_healthy = (
                c.no_traffic_healthy_interval
                if c.no_traffic_healthy_interval is not None
                else c.no_traffic_interval
            )
            base = (
                quiet_healthy if healthy and transition != CHANGE_PENDING else c.no_traffic_interval
            )
        return self.with_jitter(base, c.interval_jitter)

    def with_jitter(self, base: float, jitter: float) -> float:
        c = self.config
        extra = base * c.interval_jitter_percent / 100.0
        out = base
        if extra > 0:
            out += self.rng.random() * extra
        if jitter > 0:
            out += self.rng.random() * jitter
        return max(out, 0.001)

    # -- results ----------------------------------------------------------------------------

    def apply(self, host: Host, flags: int, healthy_result: bool) -> None:
        """Give ``host`` its new flags (rebuilding the balancer when that matters) and tell
        outlier detection about a pass."""
        if self.closed or host.health_checker is None:
            return
        if flags != host.health_flags:
            self.cluster.set_flags(host, flags)
            self.update_gauges()
        detector = self.cluster.outlier
        if healthy_result and detector is not None:
            detector.on_health_check_success(host)


class HealthCheckSession:
    """One host's checks (Envoy's ActiveHealthCheckSession)."""

    def __init__(self, checker: HealthChecker, host: Host, prev: HealthCheckSession | None) -> None:
        self.checker = checker
        self.host = host
        self.first_check: bool = prev.first_check if prev is not None else True
        self.num_healthy: int = prev.num_healthy if prev is not None else 0
        self.num_unhealthy: int = prev.num_unhealthy if prev is not None else 0
        self.first: asyncio.Future[None] | None = None
        """Done once the host has had its first result (made when the session starts)."""
        self.task: asyncio.Task[None] | None = None
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.task is None:
            self.first = loop.create_future()
            if not self.first_check:
                self.first.set_result(None)
            self.task = loop.create_task(self._run(), name=f"hc:{self.host!r}")

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self._close()
        if self.host.health_checker is self:
            self.host.health_checker = None

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn[1].transport.abort()

    async def _run(self) -> None:
        checker = self.checker
        c = checker.config
        try:
            if self.first_check and c.initial_jitter > 0:
                await asyncio.sleep(checker.rng.random() * c.initial_jitter)
            while True:
                try:
                    delay = await self.check_once()
                except Exception:  # a bug, not a failed check: keep checking the host
                    log.exception("health check of %r failed unexpectedly", self.host)
                    self._close()
                    delay = c.interval
                await asyncio.sleep(delay)
        finally:
            self._close()

    async def check_once(self) -> float:
        """Run one check, apply its result; returns the wait before the next one."""
        checker = self.checker
        c = checker.config
        checker.stats.attempt.inc()
        try:
            async with asyncio.timeout(c.timeout):
                if c.http is not None:
                    outcome = await self._http(c.http)
                else:
                    assert c.tcp is not None
                    outcome = await self._tcp(c.tcp)
        except TimeoutError:
            self._close()
            return self._failure(NETWORK_TIMEOUT, retriable=False)
        except (OSError, EOFError, ValueError, httptools.HttpParserError) as e:
            log.debug("health check of %r failed: %r", self.host, e)
            self._close()
            return self._failure(NETWORK, retriable=False)
        kind, immediate_fail = outcome
        if kind in ("ok", "degraded"):
            return self._success(kind == "degraded")
        if immediate_fail:
            self.host.health_flags |= EXCLUDED_VIA_IMMEDIATE_HC_FAIL
        return self._failure(ACTIVE, retriable=kind == "retriable")

    # -- the checks -------------------------------------------------------------------------

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        addr = self.host.address
        port = self.checker.config.alt_port or addr.port
        return await asyncio.open_connection(addr.host, port, limit=MAX_READ)

    async def _http(self, http: HttpHealthCheck) -> tuple[str, bool]:
        """(``ok`` | ``degraded`` | ``failed`` | ``retriable``, immediate-fail header seen)."""
        if self._conn is not None and self._conn[0].at_eof():
            self._close()  # the upstream closed the kept connection since the last check
        if self._conn is None:
            self._conn = await self._connect()
        reader, writer = self._conn
        writer.write(self.checker.request)
        response = _Response(http.response_buffer_size if http.receive else 0)
        parser = httptools.HttpResponseParser(response)
        response.parser = parser
        while not response.complete:
            data = await reader.read(MAX_READ)
            if not data:
                raise EOFError("connection closed before the response ended")
            parser.feed_data(data)
        status = parser.get_status_code()
        if not (self.checker.config.reuse_connection and response.keep_alive):
            self._close()
        immediate = b"x-envoy-immediate-health-check-fail" in response.headers
        if http.receive and not payload_matches(http.receive, bytes(response.body)):
            return "failed", immediate
        if not any(lo <= status < hi for lo, hi in http.expected_statuses):
            if any(lo <= status < hi for lo, hi in http.retriable_statuses):
                return "retriable", immediate
            return "failed", immediate
        return ("degraded" if b"x-envoy-degraded" in response.headers else "ok"), False

    async def _tcp(self, tcp: TcpHealthCheck) -> tuple[str, bool]:
        reader, writer = await self._connect()
        try:
            if tcp.send:
                writer.write(tcp.send)
                await writer.drain()
            received = b""
            while tcp.receive and not payload_matches(tcp.receive, received):
                data = await reader.read(MAX_READ)
                if not data:
                    raise EOFError("connection closed before the expected payload")
                received = (received + data)[-MAX_READ:]
            return "ok", False
        finally:
            writer.transport.abort()

    # -- Envoy's handleSuccess / setUnhealthy -----------------------------------------------

    def _success(self, degraded: bool) -> float:
        host = self.host
        checker = self.checker
        flags = host.health_flags
        self.num_unhealthy = 0
        transition = UNCHANGED
        if flags & FAILED_ACTIVE_HC:
            self.num_healthy += 1
            if self.first_check or self.num_healthy >= checker.config.healthy_threshold:
                flags &= ~(ACTIVE_HC_TIMEOUT | EXCLUDED_VIA_IMMEDIATE_HC_FAIL | FAILED_ACTIVE_HC)
                transition = CHANGED
            else:
                transition = CHANGE_PENDING
        if flags & PENDING_ACTIVE_HC:
            flags &= ~PENDING_ACTIVE_HC
            transition = CHANGED
        if degraded != bool(flags & DEGRADED_ACTIVE_HC):
            flags ^= DEGRADED_ACTIVE_HC
            if transition == UNCHANGED:
                transition = CHANGED
        checker.stats.success.inc()
        self._first_done()
        checker.apply(host, flags, True)
        return checker.interval(True, transition)

    def _failure(self, kind: str, *, retriable: bool) -> float:
        host = self.host
        checker = self.checker
        flags = host.health_flags
        self.num_healthy = 0
        transition = UNCHANGED
        network = kind in (NETWORK, NETWORK_TIMEOUT)
        if not flags & FAILED_ACTIVE_HC:
            self.num_unhealthy += 1
            if (not network and not retriable) or (
                self.num_unhealthy >= checker.config.unhealthy_threshold
            ):
                flags |= FAILED_ACTIVE_HC
                transition = CHANGED
            else:
                transition = CHANGE_PENDING
        if kind == NETWORK_TIMEOUT and flags & FAILED_ACTIVE_HC:
            flags |= ACTIVE_HC_TIMEOUT
        else:
            flags &= ~ACTIVE_HC_TIMEOUT
        if flags & PENDING_ACTIVE_HC:
            flags &= ~PENDING_ACTIVE_HC
            transition = CHANGED
        checker.stats.failure.inc()
        if network:
            checker.stats.network_failure.inc()
        self._first_done()
        checker.apply(host, flags, False)
        return checker.interval(False, transition)

    def _first_done(self) -> None:
        self.first_check = False
        if self.first is not None and not self.first.done():
            self.first.set_result(None)
