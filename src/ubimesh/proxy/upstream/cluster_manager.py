"""The cluster manager: every upstream cluster of the current configuration, kept resolved.

``ClusterManager(clusters, stats)`` builds one ``UpstreamCluster`` per configured cluster:

* STATIC (and EDS, whose endpoints the translator puts in ``Cluster.endpoints``): one Host per
  endpoint, built at once.
* STRICT_DNS: every endpoint's name is resolved and every address becomes a Host (with the
  endpoint's weight, priority and locality); refreshed every ``dns_refresh_rate``. A failed
  resolution keeps that endpoint's previous hosts (none the first time) and is retried at the
  next refresh, as in Envoy.
* LOGICAL_DNS: the first endpoint's name, first address, as a single Host. A later resolution
  to another address updates that Host's ``address`` in place, so the Host (and its pool) stay:
  new connections go to the new address, as with Envoy's logical host.

``await start()`` resolves DNS clusters once, waiting at most ``dns_timeout`` seconds (clusters
still unresolved keep resolving in the background with no hosts meanwhile). ``update()`` swaps
in a new configuration: unchanged clusters are untouched, changed ones are rebuilt keeping the
Host objects (and so their connection pools) of endpoints that are still there, and the pools of
hosts that went away are closed with ``host.pool.close()``. A changed cluster whose connection
settings changed (transport socket, buffer limit, timeouts, max requests per connection) gets
fresh hosts, since pools built for the old settings must not be reused.

Health: a cluster with ``outlier_detection`` gets an ``OutlierDetector`` (``outlier.py``) and one
with ``health_checks`` a ``HealthChecker`` (``health_check.py``), started with the manager (or at
once when the cluster comes with an update) and stopped, timers and tasks cancelled, when the
cluster is replaced or removed. Hosts carry their health flags and their monitor and session,
so a rebuilt cluster's new detector and checker adopt the state of the hosts it keeps (an
ejected host stays ejected, a failed one failed), as Envoy keeps host health across updates.

Stats: ``cluster_manager.cluster_added|cluster_modified|cluster_removed`` (counters),
``cluster_manager.active_clusters|warming_clusters`` (gauges) and the per-cluster stats of
``ClusterStats``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Iterator, Mapping
from typing import Any

from ubimesh.proxy.snapshot.types import (
    Cluster,
    DiscoveryType,
    Endpoint,
    LocalityEndpoints,
    SocketAddress,
)
from ubimesh.proxy.tls.manager import TlsManager
from ubimesh.proxy.upstream.cluster import (
    ClusterStats,
    UpstreamCluster,
    host_for_endpoint,
)
from ubimesh.proxy.upstream.dns import resolve
from ubimesh.proxy.upstream.health_check import HC_FLAGS, HealthChecker, HealthCheckSession
from ubimesh.proxy.upstream.host import FAILED_OUTLIER_CHECK, Host
from ubimesh.proxy.upstream.outlier import OutlierDetector
from ubimesh.telemetry.stats import Store

__all__ = ["ClusterManager", "ClusterStats", "UpstreamCluster"]

log = logging.getLogger(__name__)

_DNS_TYPES = (DiscoveryType.STRICT_DNS, DiscoveryType.LOGICAL_DNS)


def _pool_compatible(old: Cluster, new: Cluster) -> bool:
    """Whether connections made for ``old`` may serve ``new``."""
    return (
        old.transport_socket == new.transport_socket
        and old.per_connection_buffer_limit_bytes == new.per_connection_buffer_limit_bytes
        and old.connect_timeout == new.connect_timeout
        and old.idle_timeout == new.idle_timeout
        and old.max_requests_per_connection == new.max_requests_per_connection
    )


class _DnsTarget:
    """One endpoint of a DNS cluster and the hosts its name last resolved to."""

    __slots__ = ("endpoint", "failing", "group", "hosts")

    def __init__(self, group: LocalityEndpoints, endpoint: Endpoint) -> None:
        self.group = group
        self.endpoint = endpoint
        self.hosts: list[Host] = []
        self.failing = False


class _DnsDriver:
    """Keeps one STRICT_DNS or LOGICAL_DNS cluster resolved."""

    def __init__(
        self,
        manager: ClusterManager,
        cluster: UpstreamCluster,
        seed: _DnsDriver | None,
    ) -> None:
        self.manager = manager
        self.cluster = cluster
        spec = cluster.spec
        pairs = [(g, e) for g in spec.endpoints for e in g.endpoints]
        if spec.type is DiscoveryType.LOGICAL_DNS:
            pairs = pairs[:1]
        self.targets = [_DnsTarget(g, e) for g, e in pairs]
        self.task: asyncio.Task[None] | None = None
        self.first: asyncio.Future[None] | None = None
        self.resolved_once = False
        if seed is not None:
            self._seed(seed)

    def _seed(self, old: _DnsDriver) -> None:
        """Start from ``old``'s resolution for targets with the same name and port."""
        old_spec = old.cluster.spec
        spec = self.cluster.spec
        if (
            old_spec.type is not spec.type
            or old_spec.dns_lookup_family is not spec.dns_lookup_family
        ):
            return
        by_name: dict[SocketAddress, list[_DnsTarget]] = {}
        for t in old.targets:
            by_name.setdefault(t.endpoint.address, []).append(t)
        for t in self.targets:
            candidates = by_name.get(t.endpoint.address)
            if not candidates:
                continue
            src = candidates.pop(0)
            status_changed = src.endpoint.health_status != t.endpoint.health_status
            for h in src.hosts:
                h.weight = max(1, t.endpoint.weight)
                h.priority = t.group.priority
                h.locality = t.group.locality
                h.locality_weight = t.group.load_balancing_weight
                if status_changed:
                    h.set_eds_status(t.endpoint.health_status)
            t.hosts = list(src.hosts)
        if any(t.hosts for t in self.targets):
            self.resolved_once = True

    def hosts(self) -> list[Host]:
        return [h for t in self.targets for h in t.hosts]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.task is not None:
            return
        self.first = loop.create_future()
        if self.resolved_once:
            self.first.set_result(None)
        self.task = loop.create_task(self._run(), name=f"dns:{self.cluster.name}")

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.first is not None and not self.first.done():
            self.first.cancel()

    async def _run(self) -> None:
        spec = self.cluster.spec
        while not self.cluster.closed:
            try:
                await self.resolve_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug, not a DNS failure: keep the refresh loop alive
                log.exception("DNS refresh of cluster %s failed", spec.name)
            if self.first is not None and not self.first.done():
                self.first.set_result(None)
            await asyncio.sleep(spec.dns_refresh_rate)

    async def resolve_once(self) -> None:
        cluster = self.cluster
        spec = cluster.spec
        stats = cluster.stats
        stats.update_attempt.inc()
        timeout = self.manager.dns_timeout
        results = await asyncio.gather(
            *(
                resolve(
                    t.endpoint.address.host,
                    t.endpoint.address.port,
                    spec.dns_lookup_family,
                    timeout=timeout,
                )
                for t in self.targets
            ),
            return_exceptions=True,
        )
        if cluster.closed:
            return
        failed = False
        changed = not self.resolved_once
        removed: list[Host] = []
        logical = spec.type is DiscoveryType.LOGICAL_DNS
        for t, res in zip(self.targets, results, strict=True):
            name = t.endpoint.address.host
            if isinstance(res, BaseException):
                failed = True
                level = logging.DEBUG if t.failing else logging.WARNING
                log.log(
                    level,
                    "cluster %s: cannot resolve %s (%s); %s",
                    spec.name,
                    name,
                    res or type(res).__name__,
                    "keeping previous hosts" if t.hosts else "it has no hosts",
                )
                t.failing = True
                continue
            t.failing = False
            if logical:
                addr = res[0]
                if t.hosts:
                    host = t.hosts[0]
                    if host.address != addr:
                        log.info("cluster %s: %s moved to %s", spec.name, name, addr)
                        host.address = addr
                else:
                    t.hosts = [host_for_endpoint(spec.name, t.group, t.endpoint, addr, name)]
                    changed = True
                continue
            old = {h.address: h for h in t.hosts}
            new_hosts: list[Host] = []
            for addr in res:
                h = old.pop(addr, None)
                if h is None:
                    h = host_for_endpoint(spec.name, t.group, t.endpoint, addr, name)
                new_hosts.append(h)
            if (
                old
                or len(new_hosts) != len(t.hosts)
                or any(a is not b for a, b in zip(new_hosts, t.hosts, strict=True))
            ):
                changed = True
            removed.extend(old.values())
            t.hosts = new_hosts
        (stats.update_failure if failed else stats.update_success).inc()
        if not changed:
            stats.update_no_rebuild.inc()
        else:
            self._apply()
            for h in removed:
                self.manager.close_host(h)
        if not self.resolved_once:
            self.resolved_once = True
            self.manager.warming_done()

    def _apply(self) -> None:
        # Hosts carry their EDS flags (set when made, or when the configured status changed).
        cluster = self.cluster
        all_hosts = self.hosts()
        if not all_hosts:
            cluster.stats.update_empty.inc()
        cluster.set_hosts(all_hosts)


class ClusterManager:
    """All upstream clusters, by name. See the module docstring."""

    def __init__(
        self,
        clusters: Mapping[str, Cluster],
        stats: Store,
        *,
        dns_timeout: float = 5.0,
        rng: random.Random | None = None,
        tls: TlsManager | None = None,
    ) -> None:
        self.tls = tls if tls is not None else TlsManager()
        """The process's TLS state (secrets, contexts): clusters with an UpstreamTlsContext
        and listeners' TLS filter chains take their endpoints from it."""
        self.dns_timeout = dns_timeout
        """Bound on one DNS resolution, and on how long ``start()`` waits for the first ones."""
        self._store = stats
        self._rng = rng
        self._clusters: dict[str, UpstreamCluster] = {}
        self._drivers: dict[str, _DnsDriver] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._cluster_added = stats.counter("cluster_manager.cluster_added")
        self._cluster_modified = stats.counter("cluster_manager.cluster_modified")
        self._cluster_removed = stats.counter("cluster_manager.cluster_removed")
        self._active = stats.gauge("cluster_manager.active_clusters")
        self._warming = stats.gauge("cluster_manager.warming_clusters")
        for spec in clusters.values():
            self._clusters[spec.name] = self._build(spec, None, None)
            self._cluster_added.inc()
        self._active.set(len(self._clusters))

    # -- lookups ----------------------------------------------------------------------------

    def get(self, name: str) -> UpstreamCluster | None:
        return self._clusters.get(name)

    @property
    def clusters(self) -> Mapping[str, UpstreamCluster]:
        """The current clusters by name (read only; for admin endpoints)."""
        return self._clusters

    def __iter__(self) -> Iterator[UpstreamCluster]:
        return iter(list(self._clusters.values()))

    def __len__(self) -> int:
        return len(self._clusters)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start DNS resolution, outlier detection and active health checks, and wait (at
        most ``dns_timeout``) for the first round of resolutions and (at most the checks'
        timeout) for every host's first health check, as Envoy's cluster warming does."""
        self._loop = asyncio.get_running_loop()
        for driver in self._drivers.values():
            driver.start(self._loop)
        for cluster in self._clusters.values():
            if cluster.outlier is not None:
                cluster.outlier.start(self._loop)
            if cluster.health_checker is not None:
                cluster.health_checker.start(self._loop)
        checkers = [c.health_checker for c in self._clusters.values() if c.health_checker]
        if checkers:
            bound = max(hc.config.timeout for hc in checkers) + 0.5
            await asyncio.gather(*(hc.wait_first(bound) for hc in checkers))
        waiting = [
            d.first for d in self._drivers.values() if d.first is not None and not d.first.done()
        ]
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=self.dns_timeout)
            if pending:
                names = [n for n, d in self._drivers.items() if d.first in pending]
                log.warning(
                    "DNS clusters not resolved after %.1fs (still trying): %s",
                    self.dns_timeout,
                    ", ".join(sorted(names)),
                )

    async def stop(self) -> None:
        """Stop DNS refreshes, outlier detection and health checks; close every host's pool."""
        self._stopped = True
        drivers = list(self._drivers.values())
        for d in drivers:
            d.stop()
        self._drivers.clear()
        tasks = [d.task for d in drivers if d.task is not None]
        for cluster in self._clusters.values():
            checker = cluster.health_checker
            if checker is not None:
                tasks.extend(s.task for s in checker.sessions.values() if s.task is not None)
            self._stop_health(cluster, removed=False)
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for cluster in self._clusters.values():
            cluster.closed = True
            for h in cluster.hosts:
                self.close_host(h)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)

    # -- reconfiguration --------------------------------------------------------------------

    def update(self, clusters: Mapping[str, Cluster]) -> None:
        """Swap in a new set of clusters (see the module docstring for what is kept)."""
        wanted = {spec.name: spec for spec in clusters.values()}
        for name in [n for n in self._clusters if n not in wanted]:
            old = self._clusters.pop(name)
            self._retire(old, self._drivers.pop(name, None), keep=())
            self._cluster_removed.inc()
        for name, spec in wanted.items():
            old_cluster = self._clusters.get(name)
            if old_cluster is None:
                self._clusters[name] = self._build(spec, None, None)
                self._cluster_added.inc()
                continue
            if old_cluster.spec is spec or old_cluster.spec == spec:
                continue
            old_driver = self._drivers.pop(name, None)
            if _pool_compatible(old_cluster.spec, spec):
                new = self._build(spec, old_cluster, old_driver)
            else:
                new = self._build(spec, None, None)
            self._clusters[name] = new
            self._retire(old_cluster, old_driver, keep=new.hosts)
            self._cluster_modified.inc()
        self._active.set(len(self._clusters))

    def _retire(
        self,
        cluster: UpstreamCluster,
        driver: _DnsDriver | None,
        keep: list[Host] | tuple[()],
    ) -> None:
        cluster.closed = True
        self._stop_health(cluster, removed=not keep)
        if driver is not None:
            driver.stop()
            if not driver.resolved_once:
                self.warming_done()
        kept = {id(h) for h in keep}
        for h in cluster.hosts:
            if id(h) not in kept:
                self.close_host(h)

    def _build(
        self,
        spec: Cluster,
        previous: UpstreamCluster | None,
        old_driver: _DnsDriver | None,
    ) -> UpstreamCluster:
        """A cluster for ``spec``, reusing hosts of ``previous`` (and of its DNS driver)."""
        rng = random.Random(self._rng.random()) if self._rng is not None else None
        if spec.type in _DNS_TYPES:
            cluster = UpstreamCluster(spec, self._store, rng=rng)
            self._attach_tls(cluster)
            self._attach_health(cluster)
            driver = _DnsDriver(self, cluster, old_driver)
            if driver.resolved_once:
                driver._apply()
            else:
                self._warming.inc()
            self._drivers[spec.name] = driver
            if self._loop is not None and not self._stopped:
                driver.start(self._loop)
            return cluster
        hosts = self._static_hosts(spec, previous)
        cluster = UpstreamCluster(spec, self._store, hosts, rng=rng)
        self._attach_tls(cluster)
        self._attach_health(cluster)
        return cluster

    def _attach_tls(self, cluster: UpstreamCluster) -> None:
        """Give a cluster with an UpstreamTlsContext its TLS endpoint and ssl stats."""
        context = cluster.spec.transport_socket
        if context is not None:
            from ubimesh.proxy.tls.downstream import TlsStats

            cluster.tls = self.tls.endpoint(context)
            cluster.tls_stats = TlsStats(self._store.counter, f"cluster.{cluster.name}.")

    def _attach_health(self, cluster: UpstreamCluster) -> None:
        """Give the cluster its outlier detector and health checker (which adopt the state of
        the hosts it kept), or clear what a previous configuration left on its hosts."""
        spec = cluster.spec
        rng = random.Random(self._rng.random()) if self._rng is not None else None
        running = self._loop is not None and not self._stopped
        before = [h.health_flags for h in cluster.hosts]
        if spec.outlier_detection is not None:
            detector = OutlierDetector(cluster, spec.outlier_detection, self._store, rng=rng)
            cluster.outlier = detector
            detector.sync_hosts(cluster.hosts)
            if running:
                assert self._loop is not None
                detector.start(self._loop)
        else:
            for h in cluster.hosts:
                h.outlier = None
                h.health_flags &= ~FAILED_OUTLIER_CHECK
        if spec.health_checks:
            checker = HealthChecker(cluster, spec.health_checks[0], self._store, rng=rng)
            cluster.health_checker = checker
            checker.sync_hosts(cluster.hosts)
            if running:
                assert self._loop is not None
                checker.start(self._loop)
        else:
            for h in cluster.hosts:
                if isinstance(h.health_checker, HealthCheckSession):
                    h.health_checker.stop()
                h.health_checker = None
                h.health_flags &= ~HC_FLAGS
        # The cluster built its balancer from these hosts already: rebuild it only when a
        # flag changed (a new checked host starts failed; a dropped checker or detector
        # clears its bits).
        if [h.health_flags for h in cluster.hosts] != before:
            cluster.refresh()

    @staticmethod
    def _stop_health(cluster: UpstreamCluster, *, removed: bool) -> None:
        detector = cluster.outlier
        if detector is not None:
            detector.stop()
            if removed:
                detector.stats.ejections_active.set(0)
        checker = cluster.health_checker
        if checker is not None:
            checker.stop()
            if removed:
                checker.stats.healthy.set(0)
                checker.stats.degraded.set(0)

    @staticmethod
    def _static_hosts(spec: Cluster, previous: UpstreamCluster | None) -> list[Host]:
        reusable: dict[SocketAddress, list[Host]] = {}
        old_status: dict[SocketAddress, list[int]] = {}
        if previous is not None:
            for h in previous.hosts:
                reusable.setdefault(h.address, []).append(h)
            for g in previous.spec.endpoints:
                for e in g.endpoints:
                    old_status.setdefault(e.address, []).append(e.health_status)
        hosts: list[Host] = []
        for g in spec.endpoints:
            for e in g.endpoints:
                candidates = reusable.get(e.address)
                if not candidates:
                    hosts.append(host_for_endpoint(spec.name, g, e))
                    continue
                h = candidates.pop(0)
                statuses = old_status.get(e.address) or [-1]
                same_status = statuses.pop(0) == e.health_status
                h.weight = max(1, e.weight)
                h.priority = g.priority
                h.locality = g.locality
                h.locality_weight = g.load_balancing_weight
                h.hostname = e.hostname
                if not same_status:
                    # Envoy keeps a host's flags across updates; only a changed configured
                    # status replaces its EDS ones (active HC and ejection state stay).
                    h.set_eds_status(e.health_status)
                hosts.append(h)
        return hosts

    # -- helpers ----------------------------------------------------------------------------

    def warming_done(self) -> None:
        self._warming.dec()

    def close_host(self, host: Host) -> None:
        """Close ``host.pool`` if it has a ``close()``; awaits a coroutine result in a task."""
        pool = host.pool
        close = getattr(pool, "close", None) if pool is not None else None
        if close is None:
            return
        try:
            result = close()
        except Exception:
            log.exception("closing the pool of %r failed", host)
            return
        if not inspect.isawaitable(result):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if inspect.iscoroutine(result):
                result.close()
            return
        fut = asyncio.ensure_future(result, loop=loop)
        self._tasks.add(fut)
        fut.add_done_callback(self._task_done)

    def _task_done(self, fut: asyncio.Future[Any]) -> None:
        self._tasks.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("closing a pool failed", exc_info=fut.exception())
