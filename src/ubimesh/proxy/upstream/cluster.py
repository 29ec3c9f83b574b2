"""One upstream cluster at run time: its hosts, their health, and the load balancer over them.

``UpstreamCluster.choose_host`` is on the request path of every request and TCP connection, so
all the work happens in ``refresh()`` (when hosts or their health change): hosts are grouped by
priority, Envoy's priority load is computed (``priority.py``), one picker is built per priority
level for its healthy hosts and one for its degraded hosts (``lb.py``), and the load is laid out
as a 100-slot table of pickers. When a single picker takes all the load, which is the usual case,
``choose_host`` calls it directly without drawing a priority.

Health: ``Host.healthy`` False means the host takes no traffic. A host can also be *degraded*
(configured ``health_status: DEGRADED``, later active health checks): it is still
``healthy`` but only takes the load its priority level cannot serve with fully healthy hosts,
as in Envoy. The degraded set is kept here rather than on ``Host``.

Not implemented yet: the panic threshold (Envoy's default 50 %: when too few hosts are healthy
Envoy balances over all hosts, unhealthy included; ubimesh picks among healthy hosts only, and
returns None when there are none), locality weighted balancing, zone aware routing, subsets.
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
from ubimesh.proxy.upstream.host import Host
from ubimesh.proxy.upstream.lb import MASK64, Picker, build_picker
from ubimesh.proxy.upstream.priority import (
    PriorityLoad,
    choose_priority,
    priority_load_for_counts,
)
from ubimesh.telemetry.stats import Counter, Gauge, Store

# envoy.config.core.v3.HealthStatus
HEALTH_UNKNOWN = 0
HEALTH_HEALTHY = 1
HEALTH_UNHEALTHY = 2
HEALTH_DRAINING = 3
HEALTH_TIMEOUT = 4
HEALTH_DEGRADED = 5


def endpoint_health(status: int) -> tuple[bool, bool]:
    """``(healthy, degraded)`` for a configured health_status (UNKNOWN counts as healthy)."""
    if status in (HEALTH_UNHEALTHY, HEALTH_DRAINING, HEALTH_TIMEOUT):
        return False, False
    return True, status == HEALTH_DEGRADED


def host_for_endpoint(
    cluster_name: str,
    group: LocalityEndpoints,
    endpoint: Endpoint,
    address: SocketAddress | None = None,
    hostname: str = "",
) -> Host:
    """A new Host for ``endpoint`` of ``group`` (``address`` overrides a DNS endpoint's)."""
    healthy, _ = endpoint_health(endpoint.health_status)
    return Host(
        endpoint.address if address is None else address,
        cluster_name=cluster_name,
        hostname=endpoint.hostname or hostname,
        weight=max(1, endpoint.weight),
        priority=group.priority,
        locality=group.locality,
        locality_weight=group.load_balancing_weight,
        healthy=healthy,
    )


class ClusterStats:
    """The cluster's stats (``cluster.<name>.*``), fetched once from the store.

    Connection stats are for whoever opens upstream connections (tcp_proxy here, the HTTP pool
    elsewhere); ``upstream_rq_*`` belong to the HTTP side and are not created here, except
    ``upstream_rq_total``, which Envoy's TCP pool also counts (one per proxied connection).
    """

    __slots__ = (
        "lb_healthy_panic",
        "max_host_weight",
        "membership_change",
        "membership_degraded",
        "membership_excluded",
        "membership_healthy",
        "membership_total",
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
        "upstream_cx_rx_bytes_total",
        "upstream_cx_total",
        "upstream_cx_tx_bytes_total",
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


PickFn = Callable[[int | None], Host]


class UpstreamCluster:
    """A cluster's live host set and load balancer. Build with the hosts (any priorities)."""

    def __init__(
        self,
        spec: Cluster,
        stats: Store,
        hosts: Iterable[Host] = (),
        *,
        degraded: Iterable[Host] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.tls: Any = None
        """The ``TlsEndpoint`` of the cluster's UpstreamTlsContext (set by the cluster
        manager); None for plaintext."""
        self.tls_stats: Any = None
        self.stats = ClusterStats(stats, spec.name)
        self.resources = ClusterResources(spec.circuit_breakers)
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
        self._degraded: set[Host] = set()
        self._only: PickFn | None = None
        self._fast: Callable[[], Host] | None = None
        self._table: list[PickFn] = []
        self.pickers: list[tuple[Picker | None, Picker | None]] = []
        """Per priority level: (picker over healthy hosts, picker over degraded hosts)."""
        self.set_hosts(hosts, degraded=degraded)

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

    def set_hosts(self, hosts: Iterable[Host], *, degraded: Iterable[Host] = ()) -> None:
        """Replace the host set (``degraded`` lists hosts of it that are degraded) and rebuild."""
        self.hosts = list(hosts)
        members = set(self.hosts)
        self._degraded = {h for h in degraded if h in members}
        self.stats.membership_change.inc()
        self.refresh()

    def is_degraded(self, host: Host) -> bool:
        return host in self._degraded

    def set_host_health(self, host: Host, healthy: bool, *, degraded: bool = False) -> None:
        """Mark a host (un)healthy or degraded; rebuilds the balancer only on a change."""
        was_degraded = host in self._degraded
        if host.healthy == healthy and was_degraded == degraded:
            return
        host.healthy = healthy
        if degraded:
            self._degraded.add(host)
        else:
            self._degraded.discard(host)
        self.refresh()

    def refresh(self) -> None:
        """Recompute the priority load and rebuild the pickers from the hosts' current state.

        Call after changing hosts' ``healthy`` or ``weight`` directly.
        """
        spec = self.spec
        hosts = self.hosts
        n_levels = (max(h.priority for h in hosts) + 1) if hosts else 1
        totals = [0] * n_levels
        healthy: list[list[Host]] = [[] for _ in range(n_levels)]
        degraded: list[list[Host]] = [[] for _ in range(n_levels)]
        max_weight = 0
        for h in hosts:
            p = h.priority
            totals[p] += 1
            if h.weight > max_weight:
                max_weight = h.weight
            if h.healthy:
                (degraded if h in self._degraded else healthy)[p].append(h)
        load = priority_load_for_counts(
            spec.overprovisioning_factor,
            [(totals[p], len(healthy[p]), len(degraded[p])) for p in range(n_levels)],
        )
        pickers: list[tuple[Picker | None, Picker | None]] = []
        for p in range(n_levels):
            hp = build_picker(spec, healthy[p], self._rng) if load.healthy[p] else None
            dp = build_picker(spec, degraded[p], self._rng) if load.degraded[p] else None
            pickers.append((hp, dp))
        slots: list[Picker] = []
        if load.total:
            for slot in range(100):
                p, is_degraded = choose_priority(load, slot)
                picker = pickers[p][1 if is_degraded else 0]
                assert picker is not None
                slots.append(picker)
        self.priority_load = load
        self.pickers = pickers
        self._table = [pk.pick for pk in slots]
        single = slots[0] if len({id(pk) for pk in slots}) == 1 else None
        self._only = single.pick if single is not None else None
        self._fast = single.fast if single is not None else None

        st = self.stats
        st.membership_total.set(len(hosts))
        st.membership_healthy.set(sum(len(x) for x in healthy))
        st.membership_degraded.set(sum(len(x) for x in degraded))
        st.max_host_weight.set(max_weight)

    def __repr__(self) -> str:
        return f"UpstreamCluster({self.name!r}, hosts={len(self.hosts)})"
