"""The fault injection filter at run time (``envoy.filters.http.fault``), as Envoy 1.40's.

Per request, in Envoy's order: the fault applies only to requests whose route targets
``upstream_cluster`` (when set; the route action's single cluster) and whose headers match
``headers``. Then:

1. Delay: the fixed delay, or with ``header_delay`` the milliseconds of
   ``x-envoy-fault-delay-request`` (no valid header: no delay), injected with the delay
   percentage (``x-envoy-fault-delay-request-percentage`` lowers it with header_delay). A delay
   is a timer on the loop; the chain resumes after it (and an abort may still follow, decided
   then). A downstream reset during the delay cancels the timer. Flag DI.
2. Abort: the fixed status, or with ``header_abort`` the status in
   ``x-envoy-fault-abort-request`` (200 to 599; else no abort), with the abort percentage
   (``x-envoy-fault-abort-request-percentage`` lowers it with header_abort). The reply is
   ``fault filter abort`` with that status. Flag FI.

``max_active_faults`` bounds the faults in progress; a fault that would exceed it is not
injected and counts in ``faults_overflow``. Deviation: Envoy counts a delayed request as active
until the stream ends; ubimesh until the delay ends (or the abort reply is written), which
never admits fewer faults than Envoy.

Stats, Envoy's names: ``http.<hcm prefix>.fault.{delays_injected,aborts_injected,
faults_overflow,response_rl_injected}`` (the last always 0) and the gauge
``http.<hcm prefix>.fault.active_faults``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ubimesh.proxy.http.filter_chain import CONTINUE, PAUSE, STOP, DecoderFilter
from ubimesh.proxy.response_flags import DI, FI, add_flag

# The route table's compiled header matcher (Envoy's HeaderUtility::matchHeaders semantics).
from ubimesh.proxy.routing.table import _HeaderCheck
from ubimesh.proxy.snapshot.types import FaultConfig, RouteAction
from ubimesh.telemetry.stats import Store

if TYPE_CHECKING:
    import asyncio

    from ubimesh.proxy.network.http_manager import ActiveStream, HttpConnection

DELAY_HEADER = "x-envoy-fault-delay-request"
DELAY_PERCENT_HEADER = "x-envoy-fault-delay-request-percentage"
ABORT_HEADER = "x-envoy-fault-abort-request"
ABORT_PERCENT_HEADER = "x-envoy-fault-abort-request-percentage"
ABORT_BODY = b"fault filter abort"
ABORT_DETAILS = "fault_filter_abort"


def _digits(value: str | None) -> int | None:
    """An unsigned decimal header value, as Envoy's SimpleAtoi into an unsigned type."""
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        return None
    return int(value)


def fires(numerator: int, denominator: int) -> bool:
    """Whether an event with probability numerator/denominator happens (Envoy's
    ``random % denominator < numerator``)."""
    if numerator <= 0:
        return False
    if numerator >= denominator:
        return True
    return random.getrandbits(32) % denominator < numerator


class DelayedStream:
    """A stream held by a fault delay: the timer, and what to undo if it is cancelled."""

    __slots__ = ("fault", "timer")

    def __init__(self, fault: FaultFilter, timer: asyncio.TimerHandle) -> None:
        self.fault = fault
        self.timer = timer

    def cancel(self) -> None:
        """The stream ended during the delay (downstream reset): drop the timer."""
        self.timer.cancel()
        self.fault.active_faults.value -= 1


class FaultFilter(DecoderFilter):
    """One fault filter of an HCM (its compiled config and stats)."""

    __slots__ = (
        "abort_percent",
        "abort_status",
        "aborts_injected",
        "active_faults",
        "config",
        "delay",
        "delay_percent",
        "delays_injected",
        "faults_overflow",
        "has_abort",
        "has_delay",
        "header_abort",
        "header_delay",
        "headers",
        "max_active",
        "upstream_cluster",
    )

    def __init__(self, config: FaultConfig, store: Store, hcm_stat_prefix: str) -> None:
        self.config = config
        p = f"http.{hcm_stat_prefix}.fault."
        self.delays_injected = store.counter(p + "delays_injected")
        self.aborts_injected = store.counter(p + "aborts_injected")
        self.faults_overflow = store.counter(p + "faults_overflow")
        self.active_faults = store.gauge(p + "active_faults")
        # response_rate_limit is refused, so Envoy's counter for it stays 0.
        store.counter(p + "response_rl_injected")
        self.headers = tuple(_HeaderCheck(h) for h in config.headers)
        self.upstream_cluster = config.upstream_cluster
        self.has_delay = config.has_delay
        self.delay = config.delay
        self.header_delay = config.header_delay
        self.delay_percent = config.delay_percent
        self.has_abort = config.has_abort
        self.abort_status = config.abort_status
        self.header_abort = config.header_abort
        self.abort_percent = config.abort_percent
        self.max_active = -1 if config.max_active_faults is None else config.max_active_faults

    def decode(self, stream: ActiveStream, conn: HttpConnection, index: int) -> int:
        if self.upstream_cluster:
            route = stream.route
            action = route.action if route is not None else None
            if type(action) is not RouteAction or action.cluster != self.upstream_cluster:
                return CONTINUE
        headers = stream.headers
        if self.headers:
            scheme = "http" if conn.tls is None else "https"
            for check in self.headers:
                if not check.matches(
                    headers, stream.method, stream.path, stream.host_header, scheme
                ):
                    return CONTINUE
        delay = self.delay_seconds(stream) if self.has_delay else None
        if delay is not None and self._charge():
            self.delays_injected.value += 1
            stream.flags = add_flag(stream.flags, DI)
            timer = conn.loop.call_later(delay, self._delay_done, stream, index)
            stream.pending_filter = DelayedStream(self, timer)
            return PAUSE
        if self.has_abort:
            status = self.abort_code(stream)
            if status is not None and self._charge():
                self._abort(stream, status)
                return STOP
        return CONTINUE

    def delay_seconds(self, stream: ActiveStream) -> float | None:
        """The delay for this request, or None (no delay configured or drawn, or 0 ms)."""
        num, den = self.delay_percent
        if self.header_delay:
            headers = stream.headers
            ms = _digits(headers.get_first(DELAY_HEADER))
            if ms is None:
                return None
            wanted = _digits(headers.get_first(DELAY_PERCENT_HEADER))
            if wanted is not None:
                num = min(wanted, num)
            seconds: float = ms / 1000.0
        else:
            fixed = self.delay
            if fixed is None:
                return None
            seconds = fixed
        if not fires(num, den) or seconds <= 0.0:
            return None
        return seconds

    def abort_code(self, stream: ActiveStream) -> int | None:
        """The abort status for this request, or None (none configured, valid or drawn)."""
        num, den = self.abort_percent
        if self.header_abort:
            headers = stream.headers
            status = _digits(headers.get_first(ABORT_HEADER))
            if status is None or not 200 <= status < 600:
                return None
            wanted = _digits(headers.get_first(ABORT_PERCENT_HEADER))
            if wanted is not None:
                num = min(wanted, num)
        else:
            status = self.abort_status
            if status is None:
                return None
        return status if fires(num, den) else None

    def _charge(self) -> bool:
        """Count one more active fault, unless max_active_faults is reached (overflow)."""
        active = self.active_faults
        if 0 <= self.max_active <= active.value:
            self.faults_overflow.value += 1
            return False
        active.value += 1
        return True

    def _abort(self, stream: ActiveStream, status: int) -> None:
        """Answer ``status`` (the fault is charged; released once the reply is written)."""
        self.aborts_injected.value += 1
        stream.details = ABORT_DETAILS
        try:
            stream.send_local_reply(status, ABORT_BODY, FI)
        finally:
            self.active_faults.value -= 1

    def _delay_done(self, stream: ActiveStream, index: int) -> None:
        stream.pending_filter = None
        if stream.done:
            self.active_faults.value -= 1
            return
        # Envoy decides the abort again after a delay (still within the same charge).
        status = self.abort_code(stream) if self.has_abort else None
        if status is not None:
            self._abort(stream, status)
            return
        self.active_faults.value -= 1
        stream.run_filters(index + 1)
