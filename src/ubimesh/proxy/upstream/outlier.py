"""Outlier detection: passive health checking from what the data path reports about each host.

Contract used by the router and the TCP proxy: when a host has a monitor (``host.outlier`` is
not None, i.e. its cluster has outlier_detection), report each attempt's outcome on it:

- ``put_http_status(status)`` for every upstream response status received (Envoy's
  putHttpResponseCode);
- ``put_local_origin(result)`` with one of the ``LOCAL_ORIGIN_*`` / ``EXT_ORIGIN_*`` results
  below (Envoy's putResult): connect failure, connect success, per-try or route timeout before
  the response, and reset of an established request.

With outlier detection off ``host.outlier`` is None and the data path does nothing more.

The detector (``OutlierDetector``, one per cluster) follows Envoy's ``DetectorImpl``
(source/common/upstream/outlier_detection_impl.cc):

* **Consecutive errors** are counted per host on the request path (a few integer operations per
  report). A 5xx counts for ``consecutive_5xx``; 502, 503 and 504 also for
  ``consecutive_gateway_failure``; any other status resets both. Without
  ``split_external_local_origin_errors`` a connect failure counts as a 503, a timeout as a 504,
  a reset as a 500 and a final connect success (TCP proxy) as a 200; a plain connect success
  (HTTP, before the response) counts for nothing. With the split, connect failures and
  timeouts count for ``consecutive_local_origin_failure`` instead and never as HTTP statuses.
  When a count reaches its threshold the host is ejected at once, if the ejection is enforced
  (``enforcing_*`` is the percentage chance; 100 for consecutive 5xx, 0 for gateway failures by
  default) and the ejected hosts stay within ``max_ejection_percent``: Envoy ejects when
  ``(ejected + 1) / hosts <= max_ejection_percent`` (so with 3 hosts and the default 10 % no
  host is ever ejected), or when none is ejected and ``always_eject_one_host`` is set.
* **Ejection** sets the host's ``FAILED_OUTLIER_CHECK`` flag and rebuilds the cluster's load
  balancer. An ejected host comes back at the first ``interval`` tick after
  ``min(base_ejection_time x multiplier, max_ejection_time) + jitter``; the multiplier grows by
  one with each ejection (while ``multiplier x base < max + base``) and shrinks by one at each
  tick at least ``interval`` after the host came back, so a host that keeps failing stays out
  longer and longer, and one that recovers is forgiven. Coming back resets its consecutive
  counts, so it needs as many errors again (half-open: the first requests decide). A passing
  active health check brings an ejected host back at once
  (``successful_active_health_check_uneject_host``, default true).
* **Success rate and failure percentage** run at each ``interval`` tick over the requests of
  the interval just ended: hosts with at least ``success_rate_request_volume`` requests, when
  there are at least ``success_rate_minimum_hosts`` of them, are ejected below
  ``mean - stdev x success_rate_stdev_factor / 1000``; hosts with at least
  ``failure_percentage_request_volume`` requests (and ``failure_percentage_minimum_hosts`` of
  them) are ejected at ``failure_percentage_threshold`` % failures or more.

Ejection state lives on the host's monitor (``HostOutlier``), so it survives a cluster update
that keeps the host: the new detector adopts the monitors of the hosts it keeps.

Stats: ``cluster.<name>.outlier_detection.*`` as Envoy names them (``ejections_active``,
``ejections_overflow``, ``ejections_enforced_*``, ``ejections_detected_*``, and the deprecated
``ejections_total``, ``ejections_consecutive_5xx``, ``ejections_success_rate``).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ubimesh.proxy.snapshot.outlier import OutlierDetection
from ubimesh.proxy.upstream.host import FAILED_ACTIVE_HC, FAILED_OUTLIER_CHECK, Host
from ubimesh.telemetry.stats import Counter, Store

if TYPE_CHECKING:
    from ubimesh.proxy.upstream.cluster import UpstreamCluster

# Envoy's Upstream::Outlier::Result.
LOCAL_ORIGIN_TIMEOUT = 1
LOCAL_ORIGIN_CONNECT_FAILED = 2
LOCAL_ORIGIN_CONNECT_SUCCESS = 3
LOCAL_ORIGIN_CONNECT_SUCCESS_FINAL = 4
EXT_ORIGIN_REQUEST_FAILED = 5
EXT_ORIGIN_REQUEST_SUCCESS = 6


# Envoy's OutlierEjectionType, by the stat name suffix each one counts under.
CONSECUTIVE_5XX = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
SUCCESS_RATE = "success_rate"
SUCCESS_RATE_LOCAL_ORIGIN = "local_origin_success_rate"
FAILURE_PERCENTAGE = "failure_percentage"
FAILURE_PERCENTAGE_LOCAL_ORIGIN = "local_origin_failure_percentage"
EJECTION_TYPES = (
    CONSECUTIVE_5XX,
    CONSECUTIVE_GATEWAY_FAILURE,
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
    SUCCESS_RATE,
    SUCCESS_RATE_LOCAL_ORIGIN,
    FAILURE_PERCENTAGE,
    FAILURE_PERCENTAGE_LOCAL_ORIGIN,
)

# Without the split, local-origin results are reported as these HTTP statuses (Envoy's
# resultToHttpCode); LOCAL_ORIGIN_CONNECT_SUCCESS is not reported at all.
_NO_SPLIT_STATUS = {
    LOCAL_ORIGIN_TIMEOUT: 504,
    LOCAL_ORIGIN_CONNECT_FAILED: 503,
    EXT_ORIGIN_REQUEST_FAILED: 500,
    LOCAL_ORIGIN_CONNECT_SUCCESS_FINAL: 200,
    EXT_ORIGIN_REQUEST_SUCCESS: 200,
}


class OutlierStats:
    """``cluster.<name>.outlier_detection.*``."""

    __slots__ = ("detected", "ejections_active", "enforced", "enforced_total", "overflow",
                 "total", "total_5xx", "total_success_rate")  # fmt: skip

    def __init__(self, store: Store, cluster_name: str) -> None:
        p = f"cluster.{cluster_name}.outlier_detection."
        c = store.counter
        self.ejections_active = store.gauge(p + "ejections_active")
        self.overflow = c(p + "ejections_overflow")
        self.enforced_total = c(p + "ejections_enforced_total")
        self.enforced: dict[str, Counter] = {
            t: c(p + "ejections_enforced_" + t) for t in EJECTION_TYPES
        }
        self.detected: dict[str, Counter] = {
            t: c(p + "ejections_detected_" + t) for t in EJECTION_TYPES
        }
        c(p + "ejections_detected_degradation")  # Envoy's name set; never counted here
        # Deprecated in Envoy, still counted there.
        self.total = c(p + "ejections_total")
        self.total_5xx = c(p + "ejections_consecutive_5xx")
        self.total_success_rate = c(p + "ejections_success_rate")


class HostOutlier:
    """One host's monitor: its consecutive error counts, its request counts of the current
    interval, and its ejection history. The data path calls ``put_http_status`` and
    ``put_local_origin`` on ``host.outlier``: ``Host`` names this class (not a protocol), so
    that compiled callers make native calls rather than Python method calls."""

    __slots__ = (
        "c5xx",
        "cgw",
        "clo",
        "detector",
        "ext_ok",
        "ext_total",
        "host",
        "jitter",
        "last_ejection",
        "last_unejection",
        "lo_ok",
        "lo_total",
        "local_success_rate",
        "multiplier",
        "num_ejections",
        "prev_ext",
        "prev_lo",
        "split",
        "success_rate",
    )

    def __init__(self, detector: OutlierDetector, host: Host) -> None:
        self.detector = detector
        self.host = host
        self.split = detector.config.split_external_local_origin_errors
        self.c5xx = 0
        self.cgw = 0
        self.clo = 0
        self.ext_total = 0
        self.ext_ok = 0
        self.lo_total = 0
        self.lo_ok = 0
        self.prev_ext = (0, 0)
        """(total, successes) of the last complete interval (external origin)."""
        self.prev_lo = (0, 0)
        self.num_ejections = 0
        self.multiplier = 0
        """Envoy's ejectTimeBackoff: the ejection time is base x this (capped)."""
        self.last_ejection: float | None = None
        self.last_unejection: float | None = None
        self.jitter = 0.0
        self.success_rate = -1.0
        """The last success rate pass's value for this host (/clusters), -1 when none."""
        self.local_success_rate = -1.0

    # -- the data path ----------------------------------------------------------------------

    def put_http_status(self, status: int) -> None:
        self.ext_total += 1
        if 500 <= status < 600:
            d = self.detector
            if status == 502 or status == 503 or status == 504:
                self.cgw += 1
                if self.cgw == d.threshold_gateway:
                    d.on_consecutive(self, CONSECUTIVE_GATEWAY_FAILURE)
            else:
                self.cgw = 0
            self.c5xx += 1
            if self.c5xx == d.threshold_5xx:
                d.on_consecutive(self, CONSECUTIVE_5XX)
        else:
            self.ext_ok += 1
            self.c5xx = 0
            self.cgw = 0

    def put_local_origin(self, result: int) -> None:
        if not self.split:
            status = _NO_SPLIT_STATUS.get(result)
            if status is not None:
                self.put_http_status(status)
            return
        if result in (LOCAL_ORIGIN_CONNECT_SUCCESS, LOCAL_ORIGIN_CONNECT_SUCCESS_FINAL):
            self._local_ok()
        elif result in (LOCAL_ORIGIN_TIMEOUT, LOCAL_ORIGIN_CONNECT_FAILED):
            self.lo_total += 1
            self.clo += 1
            if self.clo == self.detector.threshold_local:
                self.detector.on_consecutive(self, CONSECUTIVE_LOCAL_ORIGIN_FAILURE)
        elif result == EXT_ORIGIN_REQUEST_FAILED:
            self.put_http_status(503)
        elif result == EXT_ORIGIN_REQUEST_SUCCESS:
            self.put_http_status(200)
            self._local_ok()

    def _local_ok(self) -> None:
        self.lo_total += 1
        self.lo_ok += 1
        self.clo = 0

    # -- the detector's side ----------------------------------------------------------------

    def reset_counts(self) -> None:
        self.c5xx = self.cgw = self.clo = 0

    def rotate(self) -> None:
        """End the interval: its counts become the ones the success rate pass reads."""
        self.prev_ext = (self.ext_total, self.ext_ok)
        self.prev_lo = (self.lo_total, self.lo_ok)
        self.ext_total = self.ext_ok = self.lo_total = self.lo_ok = 0
        self.success_rate = self.local_success_rate = -1.0


class OutlierDetector:
    """A cluster's outlier detector (see the module docstring).

    ``clock`` and ``rng`` are injectable for tests; ``start()`` arms the interval timer on the
    running loop, ``stop()`` cancels it. Without ``start()`` a test drives ``on_interval``.
    """

    def __init__(
        self,
        cluster: UpstreamCluster,
        config: OutlierDetection,
        store: Store,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.stats = OutlierStats(store, cluster.name)
        self.clock = clock
        self._random = (rng or random.Random()).random
        self.monitors: dict[Host, HostOutlier] = {}
        self.active = 0
        """Hosts currently ejected (the ``ejections_active`` gauge)."""
        self.threshold_5xx = config.consecutive_5xx
        self.threshold_gateway = config.consecutive_gateway_failure
        self.threshold_local = config.consecutive_local_origin_failure
        self.sr_numbers = [-1.0, -1.0, -1.0, -1.0]
        """The last success rate pass's mean and ejection threshold, external origin then
        local origin; -1 when the pass had too few hosts (/clusters' ``outlier::`` lines)."""
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    # -- membership -------------------------------------------------------------------------

    def sync_hosts(self, hosts: Iterable[Host]) -> None:
        """Follow the cluster's host set: monitor new hosts (adopting the monitor a host kept
        from a previous detector, with its ejection state) and forget removed ones."""
        wanted = list(hosts)
        keep = set(wanted)
        for h in [h for h in self.monitors if h not in keep]:
            del self.monitors[h]
        for h in wanted:
            if h in self.monitors:
                continue
            m = h.outlier
            if isinstance(m, HostOutlier):
                m.detector = self
                m.split = self.config.split_external_local_origin_errors
            else:
                m = HostOutlier(self, h)
                h.outlier = m
            self.monitors[h] = m
        self.active = sum(1 for h in self.monitors if h.health_flags & FAILED_OUTLIER_CHECK)
        self.stats.ejections_active.set(self.active)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None and not self.closed:
            self._timer = loop.call_later(self.config.interval, self._tick, loop)

    def stop(self) -> None:
        """Cancel the timer; the hosts keep their monitors (a successor may adopt them)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self.closed:
            return
        try:
            self.on_interval()
        finally:
            if not self.closed:
                self._timer = loop.call_later(self.config.interval, self._tick, loop)

    # -- ejection ---------------------------------------------------------------------------

    def on_consecutive(self, m: HostOutlier, kind: str) -> None:
        """A consecutive error count of ``m`` reached its threshold."""
        if self.closed or m.detector is not self or m.host.health_flags & FAILED_OUTLIER_CHECK:
            return
        if m.host not in self.monitors:
            return
        self.stats.detected[kind].inc()
        if kind == CONSECUTIVE_5XX:
            self.stats.total_5xx.inc()
        if self._eject(m, kind, self.clock()):
            self.cluster.refresh()
        # Reset the count that fired, whatever happened, so a new run of errors is needed.
        if kind == CONSECUTIVE_5XX:
            m.c5xx = 0
        elif kind == CONSECUTIVE_GATEWAY_FAILURE:
            m.cgw = 0
        else:
            m.clo = 0

    def _enforcing(self, kind: str) -> int:
        c = self.config
        return {
            CONSECUTIVE_5XX: c.enforcing_consecutive_5xx,
            CONSECUTIVE_GATEWAY_FAILURE: c.enforcing_consecutive_gateway_failure,
            CONSECUTIVE_LOCAL_ORIGIN_FAILURE: c.enforcing_consecutive_local_origin_failure,
            SUCCESS_RATE: c.enforcing_success_rate,
            SUCCESS_RATE_LOCAL_ORIGIN: c.enforcing_local_origin_success_rate,
            FAILURE_PERCENTAGE: c.enforcing_failure_percentage,
            FAILURE_PERCENTAGE_LOCAL_ORIGIN: c.enforcing_failure_percentage_local_origin,
        }[kind]

    def _eject(self, m: HostOutlier, kind: str, now: float) -> bool:
        """Envoy's ejectHost; True when the host was ejected (the caller refreshes)."""
        c = self.config
        ejected_percent = 100.0 * (self.active + 1) / len(self.monitors)
        allowed = ejected_percent <= min(100, c.max_ejection_percent)
        if c.always_eject_one_host:
            allowed = allowed or self.active == 0
        if not allowed:
            self.stats.overflow.inc()
            return False
        if kind in (CONSECUTIVE_5XX, SUCCESS_RATE):
            self.stats.total.inc()
        if self._random() * 100 >= self._enforcing(kind):
            return False
        self.active += 1
        self.stats.ejections_active.set(self.active)
        self.stats.enforced_total.inc()
        self.stats.enforced[kind].inc()
        m.num_ejections += 1
        m.last_ejection = now
        m.jitter = self._random() * c.max_ejection_time_jitter
        if m.multiplier * c.base_ejection_time < c.max_ejection_time + c.base_ejection_time:
            m.multiplier += 1
        m.host.health_flags |= FAILED_OUTLIER_CHECK
        return True

    def _uneject(self, m: HostOutlier, now: float) -> None:
        self.active -= 1
        self.stats.ejections_active.set(self.active)
        m.host.health_flags &= ~FAILED_OUTLIER_CHECK
        m.reset_counts()
        m.last_unejection = now

    def on_health_check_success(self, host: Host) -> None:
        """An active health check passed: an ejected host that passes comes back at once
        (``successful_active_health_check_uneject_host``)."""
        if self.closed or not self.config.successful_active_health_check_uneject_host:
            return
        m = self.monitors.get(host)
        f = host.health_flags
        if m is None or f & FAILED_ACTIVE_HC or not f & FAILED_OUTLIER_CHECK:
            return
        self._uneject(m, self.clock())
        self.cluster.refresh()

    # -- the interval -----------------------------------------------------------------------

    def on_interval(self, now: float | None = None) -> None:
        """Envoy's onIntervalTimer: lift ejections whose time is up, run the success rate and
        failure percentage passes, and let the multiplier of recovered hosts decay."""
        if now is None:
            now = self.clock()
        c = self.config
        changed = False
        for m in self.monitors.values():
            if m.host.health_flags & FAILED_OUTLIER_CHECK and m.last_ejection is not None:
                ejected_for = min(c.base_ejection_time * m.multiplier, c.max_ejection_time)
                if ejected_for + m.jitter <= now - m.last_ejection:
                    self._uneject(m, now)
                    changed = True
            m.rotate()
        changed |= self._success_rate_pass(now, local=False)
        changed |= self._success_rate_pass(now, local=True)
        for m in self.monitors.values():
            if (
                not m.host.health_flags & FAILED_OUTLIER_CHECK
                and m.last_unejection is not None
                and now - m.last_unejection >= c.interval
                and m.multiplier
            ):
                m.multiplier -= 1
        if changed:
            self.cluster.refresh()

    def _success_rate_pass(self, now: float, *, local: bool) -> bool:
        """Envoy's processSuccessRateEjections for one origin; True if a host was ejected."""
        c = self.config
        sr_hosts = c.success_rate_minimum_hosts
        sr_volume = c.success_rate_request_volume
        fp_hosts = c.failure_percentage_minimum_hosts
        fp_volume = c.failure_percentage_request_volume
        at = 2 if local else 0
        self.sr_numbers[at] = self.sr_numbers[at + 1] = -1.0
        if len(self.monitors) < sr_hosts and len(self.monitors) < fp_hosts:
            return False
        sr_valid: list[tuple[HostOutlier, float]] = []
        fp_valid: list[tuple[HostOutlier, float]] = []
        for m in self.monitors.values():
            if m.host.health_flags & FAILED_OUTLIER_CHECK:
                continue
            total, ok = m.prev_lo if local else m.prev_ext
            if not total:
                continue
            rate = ok * 100.0 / total
            if total >= min(sr_volume, fp_volume):
                if local:
                    m.local_success_rate = rate
                else:
                    m.success_rate = rate
            if total >= sr_volume:
                sr_valid.append((m, rate))
            if total >= fp_volume:
                fp_valid.append((m, rate))
        ejected = False
        if sr_valid and len(sr_valid) >= sr_hosts:
            mean = sum(r for _, r in sr_valid) / len(sr_valid)
            variance = sum((r - mean) ** 2 for _, r in sr_valid) / len(sr_valid)
            threshold = mean - c.success_rate_stdev_factor / 1000.0 * math.sqrt(variance)
            self.sr_numbers[at] = mean
            self.sr_numbers[at + 1] = threshold
            kind = SUCCESS_RATE_LOCAL_ORIGIN if local else SUCCESS_RATE
            for m, rate in sr_valid:
                if rate < threshold and not m.host.health_flags & FAILED_OUTLIER_CHECK:
                    self.stats.total_success_rate.inc()
                    self.stats.detected[kind].inc()
                    ejected |= self._eject(m, kind, now)
        if fp_valid and len(fp_valid) >= fp_hosts:
            kind = FAILURE_PERCENTAGE_LOCAL_ORIGIN if local else FAILURE_PERCENTAGE
            for m, rate in fp_valid:
                if 100.0 - rate >= c.failure_percentage_threshold and not (
                    m.host.health_flags & FAILED_OUTLIER_CHECK
                ):
                    self.stats.detected[kind].inc()
                    ejected |= self._eject(m, kind, now)
        return ejected
