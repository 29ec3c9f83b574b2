"""Retry decisions, backoff and counters for the router (Envoy's RetryStateImpl).

The router (``router.py``) owns the per-request state; this module holds what does not depend
on it: whether a response or a failure is retriable under a policy, Envoy's fully jittered
exponential backoff and the previous_priorities load (the retry counters are the cluster's:
``ClusterStats.retry``). Nothing here runs when a request has
no retry policy, and on a request with one nothing here runs until an attempt fails.

ubimesh differs from Envoy on purpose in one rule (docs/envoy-compat.md): a request whose
method is not idempotent (anything but GET, HEAD, OPTIONS, TRACE, PUT, DELETE) is retried only
when nothing of it reached the upstream (a connect failure); Envoy retries it like any other
when ``retry_on`` matches.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ubimesh.proxy.snapshot.retry import (
    RESET_ANY,
    RETRY_ON_CONNECT_FAILURE,
    RETRY_ON_ENVOY_RATE_LIMITED,
    RETRY_ON_RESET_BEFORE_REQUEST,
    RetryPolicy,
)
from ubimesh.proxy.upstream.host import Host
from ubimesh.proxy.upstream.lb import build_picker
from ubimesh.proxy.upstream.priority import PriorityLoad, choose_priority, level_health

if TYPE_CHECKING:
    from ubimesh.proxy.upstream.cluster import UpstreamCluster

#: Methods whose requests may be sent again without changing their effect (RFC 9110 9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# RetryStatus: what a decision came to (Envoy's RetryStatus).
NO = 0
YES = 1
LIMIT_EXCEEDED = 2
"""The policy would retry but no retries are left: flag URX."""
OVERFLOW = 3
"""The policy would retry but the cluster's retries circuit breaker is full: flag UO."""


def retry_on_headers(policy: RetryPolicy, status: int, headers: list[tuple[str, str]]) -> bool:
    """Whether a response with ``status`` and ``headers`` is retriable under ``policy``
    (Envoy's wouldRetryFromHeaders). With ``envoy-ratelimited`` in retry_on, Envoy decides on
    ``x-envoy-ratelimited: true`` alone, whatever the other conditions."""
    if policy.on & RETRY_ON_ENVOY_RATE_LIMITED:
        for k, v in headers:
            if k == "x-envoy-ratelimited":
                return v == "true"
        return False
    return status in policy.statuses


def retry_on_reset(policy: RetryPolicy, connect_failure: bool, request_started: bool) -> bool:
    """Whether a failure before the response is retriable under ``policy`` (Envoy's
    wouldRetryFromReset): a connect failure (``connect_failure``) with connect-failure; any
    reset, connect failure or per-try timeout with reset, 5xx or gateway-error; with
    reset-before-request, one before any request byte was written (``request_started``
    False). refused-stream is an HTTP/2 reset reason that HTTP/1 never produces."""
    on = policy.on
    if connect_failure and on & RETRY_ON_CONNECT_FAILURE:
        return True
    if on & RETRY_ON_RESET_BEFORE_REQUEST and not request_started:
        return True
    return bool(on & RESET_ANY)


class Backoff:
    """Envoy's JitteredExponentialBackOffStrategy: the n-th backoff (n from 1) is uniform in
    [0, (2^n - 1) * base), capped at ``max_interval``; times in seconds, drawn in whole
    milliseconds as Envoy does."""

    __slots__ = ("base_ms", "max_ms", "n", "rand")

    def __init__(self, base: float, maximum: float, rand: random.Random | None = None) -> None:
        self.base_ms = max(1, round(base * 1000))
        self.max_ms = max(1, round(maximum * 1000))
        self.n = 1
        self.rand = rand if rand is not None else random

    def next(self) -> float:
        """The next backoff in seconds."""
        ceiling = ((1 << self.n) - 1) * self.base_ms
        if ceiling <= self.max_ms:
            self.n += 1
        return min(self.rand.randrange(ceiling), self.max_ms) / 1000.0


class PreviousPriorities:
    """Envoy's previous_priorities retry priority: once ``frequency`` attempts were made, and
    again after every ``frequency`` more, retries leave out the priority levels of the hosts
    attempted so far; the load of the levels left is spread as Envoy spreads priority load.
    When no level is left, retries go back to the cluster's own load for good (Envoy's
    behaviour: its reset of the excluded levels does not take effect)."""

    __slots__ = ("attempted", "excluded", "frequency", "load")

    def __init__(self, frequency: int) -> None:
        self.frequency = frequency
        self.attempted: list[Host] = []
        self.excluded: set[int] = set()
        self.load: PriorityLoad | None = None

    def on_host_attempted(self, host: Host) -> None:
        self.attempted.append(host)

    def priority_load(self, cluster: UpstreamCluster) -> PriorityLoad | None:
        """The priority load for the next retry's host, or None for the cluster's own."""
        n = len(self.attempted)
        if n < self.frequency:
            return None
        if n % self.frequency == 0:
            self.excluded.update(h.priority for h in self.attempted)
            self.load = adjusted_priority_load(cluster, self.excluded)
            if self.load is None:
                self.attempted.clear()
        return self.load


def adjusted_priority_load(cluster: UpstreamCluster, excluded: set[int]) -> PriorityLoad | None:
    """The cluster's priority load with the ``excluded`` levels taken out (Envoy's
    RetryPriority adjustForAttemptedPriorities), or None when no other level is available.
    Host counts per level are the cluster's own (``UpstreamCluster.levels``)."""
    factor = cluster.spec.overprovisioning_factor
    levels = cluster.levels
    n_levels = len(levels)
    health = [
        0 if p in excluded else level_health(factor, len(healthy), counted)
        for p, (counted, healthy, _) in enumerate(levels)
    ]
    degraded_health = [
        0 if p in excluded else level_health(factor, len(degraded), counted)
        for p, (counted, _, degraded) in enumerate(levels)
    ]
    total = min(100, sum(health) + sum(degraded_health))
    if total == 0:
        return None
    load_h = [0] * n_levels
    load_d = [0] * n_levels
    left = 100
    while left:  # as Envoy: the rounding remainder goes round again from the first level
        for p in range(n_levels):
            delta = min(left, health[p] * 100 // total)
            load_h[p] += delta
            left -= delta
        for p in range(n_levels):
            delta = min(left, degraded_health[p] * 100 // total)
            load_d[p] += delta
            left -= delta
    return PriorityLoad(tuple(load_h), tuple(load_d))


def choose_host_with_load(
    cluster: UpstreamCluster, load: PriorityLoad, hash_key: int | None
) -> Host | None:
    """A host of ``cluster`` with the priority drawn from ``load`` (not the cluster's own)."""
    p, is_degraded = choose_priority(load, random.getrandbits(32))
    picker = cluster.pickers[p][1 if is_degraded else 0] if p < len(cluster.pickers) else None
    if picker is None:
        # A level the cluster's own load gives nothing has no picker yet: make one for this
        # choice (retries only).
        if p >= len(cluster.levels):
            return None
        _, healthy, degraded = cluster.levels[p]
        picker = build_picker(cluster.spec, degraded if is_degraded else healthy, random.Random())
        if picker is None:
            return None
    return picker.pick(hash_key)


__all__ = [
    "IDEMPOTENT_METHODS",
    "LIMIT_EXCEEDED",
    "NO",
    "OVERFLOW",
    "YES",
    "Backoff",
    "PreviousPriorities",
    "adjusted_priority_load",
    "choose_host_with_load",
    "retry_on_headers",
    "retry_on_reset",
]
