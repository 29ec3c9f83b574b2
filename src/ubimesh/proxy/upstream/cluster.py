"""One upstream cluster at run time: its hosts, their health, and the load balancer over them.

``UpstreamCluster.choose_host`` is on the request path of every request and TCP connection, so
all the work happens in ``refresh()`` (when hosts or their health change): hosts are grouped by
priority, Envoy's priority load is computed (``priority.py``), one picker is built per priority
level for its healthy hosts and one for its degraded hosts (``lb.py``), and the load is laid out
as a 100-slot table of pickers. When a single picker takes all the load, which is the usual case,
``choose_host`` calls it directly without drawing a priority.

Health: each host carries Envoy's health flags (``host.py``): EDS ``health_status``, active
health checks (``health_check.py``) and outlier detection (``outlier.py``) each set their own
bit, and a host with any ``FAILED_*`` bit is unhealthy. A *degraded* host is still healthy but
only takes the load its priority level cannot serve with fully healthy hosts, as in Envoy.

Panic threshold (``Cluster.healthy_panic_threshold``, Envoy's default 50 %, 0 disables it),
as Envoy's ``LoadBalancerBase`` computes it: a priority level whose healthy plus degraded
share of its (non-excluded) hosts is below the threshold is *in panic*, unless the levels
together are fully available (normalized total availability 100). A level in panic balances
over all its hosts, unhealthy included. When every level is in panic (*total panic*), the load
is spread over the levels by their host counts instead of their health. Each pick from a level
in panic counts ``lb_healthy_panic``.

Not implemented yet: locality weighted balancing, zone aware routing, subsets.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from ubimesh.proxy.snapshot.types import (
    Cluster,
    Endpoint,
    LbPolicy,
    LocalityEndpoints,
    SocketAddress,
)
from ubimesh.proxy.upstream.circuit_breaker import ClusterResources
from ubimesh.proxy.upstream.host import (
    DEGRADED_EDS_HEALTH,
    DEGRADED_MASK,
    EXCLUDED_MASK,
    FAILED_EDS_HEALTH,
    FAILED_MASK,
    Host,
)
from ubimesh.proxy.upstream.lb import MASK64, Picker, build_picker
from ubimesh.proxy.upstream.priority import (
    PriorityLoad,
    choose_priority,
    level_health,
    priority_load_for_counts,
)
from ubimesh.telemetry.stats import Counter, Gauge, Store


def host_for_endpoint(
    cluster_name: str,
    group: LocalityEndpoints,
    endpoint: Endpoint,
    address: SocketAddress | None = None,
    hostname: str = "",
) -> Host:
    """A new Host for ``endpoint`` of ``group`` (``address`` overrides a DNS endpoint's)."""
    host = Host(
        endpoint.address if address is None else address,
        cluster_name=cluster_name,
        hostname=endpoint.hostname or hostname,
        weight=max(1, endpoint.weight),
        priority=group.priority,
        locality=group.locality,
        locality_weight=group.load_balancing_weight,
    )
    host.set_eds_status(endpoint.health_status)
    return host


class RetryStats:
    """A cluster's retry counters (``cluster.<name>.upstream_rq_retry*`` and friends; the
    router counts them), made with the cluster as Envoy makes them; the
    ``cluster.<name>.retry.upstream_rq_*`` counters of responses that were retried are made
    when a response is first retried (by code, by class, and completed), as Envoy's are."""

    __slots__ = (
        "abandoned",
        "backoff_exponential",
        "by_code",
        "limit_exceeded",
        "overflow",
        "per_try_timeout",
        "prefix",
        "retry",
        "retry_completed",
        "store",
        "success",
    )

    def __init__(self, store: Store, prefix: str) -> None:
        """``prefix`` is the cluster's stat prefix, ``cluster.<name>.``."""
        self.store = store
        self.prefix = prefix
        c = store.counter
        self.retry: Counter = c(prefix + "upstream_rq_retry")
        self.success: Counter = c(prefix + "upstream_rq_retry_success")
        self.overflow: Counter = c(prefix + "upstream_rq_retry_overflow")
        self.limit_exceeded: Counter = c(prefix + "upstream_rq_retry_limit_exceeded")
        self.backoff_exponential: Counter = c(prefix + "upstream_rq_retry_backoff_exponential")
        self.per_try_timeout: Counter = c(prefix + "upstream_rq_per_try_timeout")
        self.abandoned: Counter = c(prefix + "retry_or_shadow_abandoned")
        # Envoy makes the ``retry.`` counters when a response is first retried.
        self.retry_completed: Counter | None = None
        self.by_code: dict[int, tuple[Counter, Counter]] = {}

    def count_retried(self, status: int) -> None:
        """A response that was retried instead of forwarded (Envoy charges it under
        ``retry.``: its code, its class and ``retry.upstream_rq_completed``)."""
        pair = self.by_code.get(status)
        if pair is None:
            p = self.prefix + "retry.upstream_rq_"
            pair = self.by_code[status] = (
                self.store.counter(f"{p}{status}"),
                self.store.counter(f"{p}{min(status // 100, 5)}xx"),
            )
        pair[0].value += 1
        pair[1].value += 1
        completed = self.retry_completed
        if completed is None:
            completed = self.retry_completed = self.store.counter(
                self.prefix + "retry.upstream_rq_completed"
            )
        completed.value += 1


class ClusterStats:
    """The cluster's stats (``cluster.<name>.*``), fetched once from the store.

    Connection stats are for whoever opens upstream connections (tcp_proxy here, the HTTP pool
    elsewhere); ``upstream_rq_*`` belong to the HTTP side and are not created here, except
    ``upstream_rq_total``, which Envoy's TCP pool also counts (one per proxied connection),
    and the circuit breakers' pending and overflow counters.
    """

    __slots__ = (
        "lb_healthy_panic",
        "max_host_weight",
        "membership_change",
        "membership_degraded",
        "membership_excluded",
        "membership_healthy",
        "membership_total",
        "retry",
        "update_attempt",
        "update_empty",
        "update_failure",
        "update_no_rebuild",
        "update_success",
        "upstream_cx_active",
        "upstream_cx_connect_attempts_exceeded",
        "upstream_cx_connect_fail",
        "upstream_cx_connect_timeout",
        "upstream_cx_destroy",
        "upstream_cx_destroy_local",
        "upstream_cx_destroy_remote",
        "upstream_cx_idle_timeout",
        "upstream_cx_max_requests",
        "upstream_cx_none_healthy",
        "upstream_cx_overflow",
        "upstream_cx_rx_bytes_total",
        "upstream_cx_total",
        "upstream_cx_tx_bytes_total",
        "upstream_rq_active_overflow",
        "upstream_rq_pending_active",
        "upstream_rq_pending_overflow",
        "upstream_rq_pending_total",
        "upstream_rq_total",
    )

    def __init__(self, store: Store, name: str) -> None:
        p = f"cluster.{name}."
        g = store.gauge
        c = store.counter
        self.membership_total: Gauge = g(p + "membership_total")
        self.membership_healthy: Gauge = g(p + "membership_healthy")
        self.membership_degraded: Gauge = g(p + "membership_degraded")
        self.membership_excluded: Gauge = g(p + "membership_excluded")
        self.max_host_weight: Gauge = g(p + "max_host_weight")
        self.membership_change: Counter = c(p + "membership_change")
        self.lb_healthy_panic: Counter = c(p + "lb_healthy_panic")
        self.update_attempt: Counter = c(p + "update_attempt")
        self.update_success: Counter = c(p + "update_success")
        self.update_failure: Counter = c(p + "update_failure")
        self.update_empty: Counter = c(p + "update_empty")
        self.update_no_rebuild: Counter = c(p + "update_no_rebuild")
        self.upstream_cx_total: Counter = c(p + "upstream_cx_total")
        self.upstream_cx_active: Gauge = g(p + "upstream_cx_active")
        self.upstream_cx_connect_fail: Counter = c(p + "upstream_cx_connect_fail")
        self.upstream_cx_connect_timeout: Counter = c(p + "upstream_cx_connect_timeout")
        self.upstream_cx_connect_attempts_exceeded: Counter = c(
            p + "upstream_cx_connect_attempts_exceeded"
        )
        self.upstream_cx_none_healthy: Counter = c(p + "upstream_cx_none_healthy")
        self.upstream_cx_idle_timeout: Counter = c(p + "upstream_cx_idle_timeout")
        self.upstream_cx_max_requests: Counter = c(p + "upstream_cx_max_requests")
        self.upstream_cx_destroy: Counter = c(p + "upstream_cx_destroy")
        self.upstream_cx_destroy_local: Counter = c(p + "upstream_cx_destroy_local")
        self.upstream_cx_destroy_remote: Counter = c(p + "upstream_cx_destroy_remote")
        self.upstream_cx_rx_bytes_total: Counter = c(p + "upstream_cx_rx_bytes_total")
        self.upstream_cx_tx_bytes_total: Counter = c(p + "upstream_cx_tx_bytes_total")
        self.upstream_rq_total: Counter = c(p + "upstream_rq_total")
        # Circuit breakers (upstream/circuit_breaker.py): overflows of max_connections (the
        # pool and tcp_proxy), max_pending_requests (the pool), max_requests (the router;
        # Envoy >= 1.38 counts it as an active-request overflow, not a pending one) and
        # max_retries or the retry budget (the router: ``retry.overflow``); requests waiting
        # in the pool for a connection.
        self.upstream_cx_overflow: Counter = c(p + "upstream_cx_overflow")
        self.upstream_rq_active_overflow: Counter = c(p + "upstream_rq_active_overflow")
        self.upstream_rq_pending_overflow: Counter = c(p + "upstream_rq_pending_overflow")
        self.upstream_rq_pending_total: Counter = c(p + "upstream_rq_pending_total")
        self.upstream_rq_pending_active: Gauge = g(p + "upstream_rq_pending_active")
        self.retry = RetryStats(store, p)


PickFn = Callable[[int | None], Host]


class UpstreamCluster:
    """A cluster's live host set and load balancer. Build with the hosts (any priorities)."""

    def __init__(
        self,
        spec: Cluster,
        stats: Store,
        hosts: Iterable[Host] = (),
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.tls: Any = None
        """The ``TlsEndpoint`` of the cluster's UpstreamTlsContext (set by the cluster
        manager); None for plaintext."""
        self.tls_stats: Any = None
        self.stats = ClusterStats(stats, spec.name)
        self.resources = ClusterResources(spec.circuit_breakers, stats, spec.name)
        """Circuit breakers per routing priority (``circuit_breaker.py``)."""
        self.hosts: list[Host] = []
        self.priority_load = PriorityLoad((), ())
        """The current priority load (healthy and degraded percentages per level)."""
        self.closed = False
        """Set when the cluster manager removed or replaced this cluster."""
        self._rng = rng if rng is not None else random.Random()
        self._random = self._rng.random
        self._getrandbits = self._rng.getrandbits
        self._hash_lb = spec.lb_policy in (LbPolicy.RING_HASH, LbPolicy.MAGLEV)
        self._members: set[Host] = set()
        self.panic: tuple[bool, ...] = (False,)
        """Per priority level: whether it is in panic (balances over all its hosts)."""
        self.outlier: Any = None
        """The cluster's outlier detector (``outlier.OutlierDetector``); None when off."""
        self.health_checker: Any = None
        """The cluster's active health checker (``health_check.HealthChecker``); None when
        the cluster has no health checks."""
        self._only: PickFn | None = None
        self._fast: Callable[[], Host] | None = None
        self._table: list[PickFn] = []
        self.pickers: list[tuple[Picker | None, Picker | None]] = []
        """Per priority level: (picker over healthy hosts, picker over degraded hosts)."""
        self.levels: list[tuple[int, list[Host], list[Host]]] = []
        """Per priority level, as the last ``refresh()`` counted them: how many hosts count
        (not excluded), and the healthy and the degraded ones (retries re-spread the load
        over these; ``http/retry.py``)."""
        self.set_hosts(hosts)

    # -- hot path ---------------------------------------------------------------------------

    def choose_host(self, hash_key: int | None = None) -> Host | None:
        """A host for a new request or connection, or None when no host is available.

        ``hash_key`` (a 64-bit hash from the route's hash policies) is used by RING_HASH and
        MAGLEV and ignored by the other policies.
        """
        fast = self._fast
        if fast is not None:
            return fast()
        return self._choose(hash_key)

    def _choose(self, hash_key: int | None) -> Host | None:
        only = self._only
        if only is not None:
            return only(hash_key)
        table = self._table
        if not table:
            return None
        if self._hash_lb:
            h = self._getrandbits(64) if hash_key is None else hash_key & MASK64
            return table[h % 100](h)
        return table[int(self._random() * 100)](hash_key)

    # -- membership and health --------------------------------------------------------------

    def set_hosts(self, hosts: Iterable[Host]) -> None:
        """Replace the host set and rebuild; the hosts keep the health flags they carry."""
        self.hosts = list(hosts)
        # New hosts get their monitor and health check session (and a new checked host its
        # initial FAILED_ACTIVE_HC) before the balancer sees them.
        if self.outlier is not None:
            self.outlier.sync_hosts(self.hosts)
        if self.health_checker is not None:
            self.health_checker.sync_hosts(self.hosts)
        self.stats.membership_change.inc()
        self.refresh()

    def is_degraded(self, host: Host) -> bool:
        return host.degraded

    def set_host_health(self, host: Host, healthy: bool, *, degraded: bool = False) -> None:
        """Set a host's EDS verdict (unhealthy, or healthy and possibly degraded); rebuilds
        the balancer only on a change."""
        flags = host.health_flags & ~(FAILED_EDS_HEALTH | DEGRADED_EDS_HEALTH)
        if not healthy:
            flags |= FAILED_EDS_HEALTH
        elif degraded:
            flags |= DEGRADED_EDS_HEALTH
        self.set_flags(host, flags)

    def set_flags(self, host: Host, flags: int) -> None:
        """Give ``host`` these health flags; rebuilds the balancer when that changes which
        hosts are healthy, degraded or excluded."""
        old = host.health_flags
        if old == flags:
            return
        host.health_flags = flags
        mask = FAILED_MASK | DEGRADED_MASK | EXCLUDED_MASK
        if (old & mask) != (flags & mask) and host in self._members:
            self.refresh()

    def refresh(self) -> None:
        """Recompute the priority load and panic, and rebuild the pickers from the hosts'
        current flags. Call after changing hosts' flags or ``weight`` directly."""
        spec = self.spec
        hosts = self.hosts
        self._members = set(hosts)
        n_levels = (max(h.priority for h in hosts) + 1) if hosts else 1
        everyone: list[list[Host]] = [[] for _ in range(n_levels)]
        counted = [0] * n_levels
        healthy: list[list[Host]] = [[] for _ in range(n_levels)]
        degraded: list[list[Host]] = [[] for _ in range(n_levels)]
        max_weight = 0
        excluded = 0
        for h in hosts:
            p = h.priority
            everyone[p].append(h)
            if h.weight > max_weight:
                max_weight = h.weight
            f = h.health_flags
            if f & EXCLUDED_MASK:
                excluded += 1
                continue
            counted[p] += 1
            if not f & FAILED_MASK:
                (degraded if f & DEGRADED_MASK else healthy)[p].append(h)
        load = priority_load_for_counts(
            spec.overprovisioning_factor,
            [(counted[p], len(healthy[p]), len(degraded[p])) for p in range(n_levels)],
        )
        panic = self._panic_levels(counted, healthy, degraded)
        if panic and all(panic) and hosts:
            load = _total_panic_load([len(e) for e in everyone])
        rng = self._rng
        panic_stat = self.stats.lb_healthy_panic
        pickers: list[tuple[Picker | None, Picker | None]] = []
        for p in range(n_levels):
            if panic and panic[p] and (load.healthy[p] or load.degraded[p]):
                inner = build_picker(spec, everyone[p], rng)
                assert inner is not None
                everything = _PanicPicker(inner, panic_stat)
                pickers.append((everything, everything))
                continue
            hp = build_picker(spec, healthy[p], rng) if load.healthy[p] else None
            dp = build_picker(spec, degraded[p], rng) if load.degraded[p] else None
            pickers.append((hp, dp))
        slots: list[Picker] = []
        if load.total:
            for slot in range(100):
                p, is_degraded = choose_priority(load, slot)
                picker = pickers[p][1 if is_degraded else 0]
                assert picker is not None
                slots.append(picker)
        self.priority_load = load
        self.panic = tuple(panic) if panic else (False,) * n_levels
        self.levels = [(counted[p], healthy[p], degraded[p]) for p in range(n_levels)]
        self.pickers = pickers
        self._table = [pk.pick for pk in slots]
        single = slots[0] if len({id(pk) for pk in slots}) == 1 else None
        self._only = single.pick if single is not None else None
        self._fast = single.fast if single is not None else None

        st = self.stats
        st.membership_total.set(len(hosts))
        st.membership_healthy.set(sum(len(x) for x in healthy))
        st.membership_degraded.set(sum(len(x) for x in degraded))
        st.membership_excluded.set(excluded)
        st.max_host_weight.set(max_weight)

    def _panic_levels(
        self,
        counted: list[int],
        healthy: list[list[Host]],
        degraded: list[list[Host]],
    ) -> list[bool]:
        """Envoy's ``recalculatePerPriorityPanic``: which levels are in panic (empty: none)."""
        threshold = min(100.0, self.spec.healthy_panic_threshold)
        if threshold <= 0:
            return []
        factor = self.spec.overprovisioning_factor
        availability = sum(
            level_health(factor, len(healthy[p]), n) + level_health(factor, len(degraded[p]), n)
            for p, n in enumerate(counted)
        )
        if availability >= 100:  # normalized total availability 100: nobody panics
            return []
        out = []
        for p, n in enumerate(counted):
            if n == 0:
                out.append(True)
                continue
            available = 100.0 * (len(healthy[p]) + len(degraded[p])) / n
            out.append(available < threshold)
        return out if any(out) else []

    def __repr__(self) -> str:
        return f"UpstreamCluster({self.name!r}, hosts={len(self.hosts)})"


class _PanicPicker:
    """A level in panic: picks among all its hosts and counts ``lb_healthy_panic`` per pick."""

    __slots__ = ("_inner", "_stat", "fast")

    def __init__(self, inner: Picker, stat: Counter) -> None:
        self._inner = inner
        self._stat = stat
        inner_fast = inner.fast
        self.fast: Callable[[], Host] | None = None
        if inner_fast is not None:

            def fast() -> Host:
                stat.value += 1
                return inner_fast()

            self.fast = fast

    def pick(self, hash_key: int | None) -> Host:
        self._stat.value += 1
        return self._inner.pick(hash_key)


def _total_panic_load(counts: list[int]) -> PriorityLoad:
    """Envoy's ``recalculateLoadInTotalPanic``: load by host count, remainder to the first
    non-empty level."""
    total = sum(counts)
    shares = [100 * n // total for n in counts]
    first = next(i for i, n in enumerate(counts) if n)
    shares[first] += 100 - sum(shares)
    return PriorityLoad(tuple(shares), (0,) * len(counts))
