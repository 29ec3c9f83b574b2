"""``ProxyServer``: one process's data plane — listeners, clusters and stats for a snapshot.

It applies snapshots (the first at start, later ones on hot reload) by swapping references:
listeners whose address stays keep their socket and serve the new chains for new connections,
while connections opened under the old chains close after their current response (drain);
removed listeners stop accepting and drain; new ones bind. The cluster manager keeps hosts
(and their connection pools) of unchanged endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from dataclasses import dataclass

from ubimesh.proxy.admin import (
    CircuitBreakerThresholds,
    ClusterStatus,
    HostStatus,
    ListenerStatus,
)
from ubimesh.proxy.listener import ListenerRuntime
from ubimesh.proxy.snapshot.types import Snapshot, SocketAddress
from ubimesh.proxy.tls.manager import TlsManager
from ubimesh.proxy.tracing.local import set_local_node
from ubimesh.proxy.upstream.circuit_breaker import ResourceManager, RetryBudgetResource
from ubimesh.proxy.upstream.cluster_manager import ClusterManager, UpstreamCluster
from ubimesh.telemetry.stats import Store

log = logging.getLogger("ubimesh.server")


def _limits(priority: str, resources: ResourceManager) -> CircuitBreakerThresholds:
    """One priority's limits as Envoy's /clusters shows them: under a retry budget, the
    number of retries the budget allows now (it moves with the traffic)."""
    retries = resources.retries
    return CircuitBreakerThresholds(
        priority,
        resources.connections.max,
        resources.pending_requests.max,
        resources.requests.max,
        retries.limit() if isinstance(retries, RetryBudgetResource) else retries.max,
    )


def _both_limits(cluster: UpstreamCluster | None) -> tuple[CircuitBreakerThresholds, ...]:
    if cluster is None:
        return ()
    resources = cluster.resources
    return (_limits("DEFAULT", resources.default), _limits("HIGH", resources.high))


@dataclass
class ProxyOptions:
    """Command-line options, named like Envoy's."""

    config_path: str = ""
    concurrency: int = 1
    service_node: str = ""
    service_cluster: str = ""
    log_level: str = "info"
    drain_time_s: float = 5.0
    xds_cache_dir: str = ""
    """Where the ADS client caches the last applied resources ("" = the default,
    ``$XDG_CACHE_HOME/ubimesh/xds/<node id>``)."""
    join_token_file: str = ""
    """With node metadata ``ubimesh.identity``: the join token for the proxy's first
    certificate (passed to the ADS child, which holds the key)."""


def listener_key(addr: SocketAddress) -> tuple[str, int]:
    return (addr.host, addr.port)


class ProxyServer:
    """Serves one snapshot at a time in the current process (a worker, or the only process)."""

    def __init__(self, snapshot: Snapshot, stats: Store | None = None) -> None:
        self.snapshot = snapshot
        set_local_node(snapshot.node)
        self.stats = stats or Store()
        tls = TlsManager()
        tls.set_secrets(snapshot.secrets)
        self.clusters = ClusterManager(snapshot.clusters, self.stats, tls=tls)
        self.listeners: dict[tuple[str, int], ListenerRuntime] = {}
        self.started_at = time.time()
        self.state = "PRE_INITIALIZING"
        self.healthcheck_failed = False
        self._stopped = asyncio.Event()
        self.stats.gauge("server.concurrency").set(1)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(
        self, sockets: dict[tuple[str, int], socket.socket] | None = None, reuse_port: bool = False
    ) -> None:
        """Resolve clusters, bind (or adopt) listening sockets and start accepting."""
        started = time.monotonic()
        await self.clusters.start()
        for spec in self.snapshot.listeners:
            key = listener_key(spec.address)
            rt = ListenerRuntime(spec, self.clusters, self.stats)
            sock = sockets.get(key) if sockets else None
            if sock is None:
                rt.bind(reuse_port=reuse_port)
            await rt.start(sock)
            self.listeners[key] = rt
        self.state = "LIVE"
        self.stats.gauge("server.state").set(0)
        # A histogram in Envoy: one sample, how long starting took.
        self.stats.histogram("server.initialization_time_ms").record(
            (time.monotonic() - started) * 1000.0
        )
        log.info(
            "ubimesh proxy live: %s",
            ", ".join(
                f"{rt.spec.name}={rt.spec.address.host}:{rt.bound_port}"
                for rt in self.listeners.values()
            ),
        )

    async def apply(self, snapshot: Snapshot, reuse_port: bool = False) -> None:
        """Hot reload: swap in a new snapshot without dropping requests. New secrets apply to
        the next handshakes (the TLS endpoints rebuild their contexts)."""
        self.clusters.tls.set_secrets(snapshot.secrets)
        self.clusters.update(snapshot.clusters)
        wanted = {listener_key(spec.address): spec for spec in snapshot.listeners}
        for key, rt in list(self.listeners.items()):
            if key not in wanted:
                rt.stop_accepting()
                rt.drain()
                del self.listeners[key]
        for key, spec in wanted.items():
            existing = self.listeners.get(key)
            if existing is not None:
                existing.update(spec)
                continue
            rt = ListenerRuntime(spec, self.clusters, self.stats)
            rt.bind(reuse_port=reuse_port)
            await rt.start()
            self.listeners[key] = rt
        self.snapshot = snapshot
        set_local_node(snapshot.node)
        self.stats.counter("server.config_reloads").inc()
        log.info("applied configuration version %s", snapshot.version)

    async def drain(self, timeout: float) -> None:
        """Stop accepting, ask every connection to close after its current response, and wait
        (at most ``timeout`` seconds) for them to finish."""
        self.state = "DRAINING"
        self.stats.gauge("server.state").set(1)
        for rt in self.listeners.values():
            rt.stop_accepting()
            rt.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if sum(rt.active_connections() for rt in self.listeners.values()) == 0:
                break
            await asyncio.sleep(0.05)

    async def stop(self, drain_timeout: float = 0.0) -> None:
        if drain_timeout > 0:
            await self.drain(drain_timeout)
        for rt in self.listeners.values():
            rt.stop_accepting()
        exporters = sys.modules.get("ubimesh.proxy.tracing.exporter")
        if exporters is not None:
            # Queued spans leave before the clusters go (loaded only when something traces).
            await exporters.flush_all(self.clusters)
        await self.clusters.stop()
        # Buffered access log lines are written before the process goes (workers leave with
        # os._exit, which skips atexit); this waits for the writer threads, at most 2 s.
        from ubimesh.proxy.access_log.sink import flush_all

        flush_all()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- views for the admin interface -----------------------------------------------------------

    def bound_ports(self) -> dict[str, int]:
        return {rt.spec.name: rt.bound_port for rt in self.listeners.values()}

    def clusters_view(self) -> list[ClusterStatus]:
        """Per cluster and host: the live numbers /clusters shows."""
        out: list[ClusterStatus] = []
        for name in sorted(self.snapshot.clusters):
            cluster = self.clusters.get(name)
            hosts = []
            if cluster is not None:
                for h in cluster.hosts:
                    pool = h.pool
                    hosts.append(
                        HostStatus(
                            address=h.address,
                            hostname=h.hostname,
                            health_flags=h.flag_names(),
                            success_rate=h.outlier.success_rate if h.outlier else -1.0,
                            local_origin_success_rate=(
                                h.outlier.local_success_rate if h.outlier else -1.0
                            ),
                            weight=h.weight,
                            priority=h.priority,
                            locality=h.locality,
                            cx_active=pool.active if pool is not None else 0,
                            rq_active=h.active_requests,
                        )
                    )
            detector = cluster.outlier if cluster is not None else None
            out.append(
                ClusterStatus(
                    name=name,
                    hosts=tuple(hosts),
                    circuit_breakers=_both_limits(cluster),
                    outlier=tuple(detector.sr_numbers) if detector is not None else None,
                )
            )
        return out

    def listeners_view(self) -> list[ListenerStatus]:
        return [
            ListenerStatus(
                name=rt.spec.name,
                address=SocketAddress(rt.spec.address.host, rt.bound_port),
            )
            for rt in self.listeners.values()
        ]
