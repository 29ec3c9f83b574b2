"""The ``ubimesh proxy`` process: configuration, workers, admin, signals.

With ``--concurrency 1`` everything runs in one process (lowest memory, no IPC). With N > 1 the
main process binds the listeners, forks N workers that serve traffic, and keeps the admin
interface and stats aggregation; SIGHUP reloads the bootstrap in every worker. A configuration
that fails to load on reload is logged and changes nothing (the last good one keeps serving).

With ``dynamic_resources.ads_config`` the configuration comes from a control plane: an ADS
client runs in a child process (``xds/ads_link.py``, ``xds/ads_client.py``) and every snapshot
it sends is applied like a reload. Until the first one (from the control plane or its disk
cache) no listener is open and /ready answers 503 (state INITIALIZING, as Envoy's).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from ubimesh import __version__
from ubimesh.proxy.admin import AdminServer, ClusterStatus, ListenerStatus
from ubimesh.proxy.server import ProxyOptions, ProxyServer, listener_key
from ubimesh.proxy.snapshot.types import Snapshot, SocketAddress
from ubimesh.proxy.xds.ads_link import AdsChild
from ubimesh.runtime.heap import tune_heap
from ubimesh.runtime.workers import WorkerHandle, fork_worker, serve_control
from ubimesh.telemetry.stats import StatsSnapshot, Store, merge_snapshots

if TYPE_CHECKING:
    from ubimesh.proxy.tls.expiry import ExpiryTracker

log = logging.getLogger("ubimesh.proxy")


def load_snapshot(options: ProxyOptions) -> Snapshot:
    """Translate the bootstrap file in a child process (ubimesh.proxy.xds.compile), so that
    this process never loads protobuf. Raises ConfigError listing every error's path."""
    return _compile(options)[0]


def _compile(options: ProxyOptions) -> tuple[Snapshot, bool]:
    """``load_snapshot``, and whether the bootstrap asks for ADS (the snapshot is then its
    static part alone)."""
    from ubimesh.proxy.xds.compile import compile_bootstrap

    compiled = compile_bootstrap(
        options.config_path,
        service_node=options.service_node or None,
        service_cluster=options.service_cluster or None,
    )
    return compiled.snapshot, compiled.ads


def ads_child_args(options: ProxyOptions) -> list[str]:
    """The ADS client child's options after the config path."""
    args = ["--log-level", options.log_level if options.log_level != "trace" else "debug"]
    if options.log_level in ("warn", "off"):
        args[1] = "warning" if options.log_level == "warn" else "critical"
    if options.service_node:
        args += ["--service-node", options.service_node]
    if options.service_cluster:
        args += ["--service-cluster", options.service_cluster]
    if options.xds_cache_dir:
        args += ["--cache-dir", options.xds_cache_dir]
    if options.join_token_file:
        args += ["--join-token-file", options.join_token_file]
    return args


def install_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class ProxyApp:
    """The main process. Implements the admin hooks over one in-process server or workers."""

    def __init__(self, options: ProxyOptions, snapshot: Snapshot, *, ads: bool = False) -> None:
        self.options = options
        self.snapshot = snapshot
        self.ads: AdsChild | None = None
        if ads:
            self.ads = AdsChild(options.config_path, ads_child_args(options), self.apply_from_ads)
        self._ads_task: asyncio.Task[None] | None = None
        self.started_at = time.time()
        self.server: ProxyServer | None = None
        self.workers: list[WorkerHandle] = []
        self.admin: AdminServer | None = None
        self.stats = Store()
        self.state = "PRE_INITIALIZING"
        self.dynamic: dict[str, Any] = {}
        """What the ADS client sent with the applied snapshot (for /config_dump)."""
        self.healthcheck_failed = False
        self._quit = asyncio.Event()
        self.reloads = self.stats.counter("server.config_reload_total")
        self.reload_failures = self.stats.counter("server.config_reload_failed")
        self._expiry: ExpiryTracker | None = None  # made at the first stats read

    # -- run ----------------------------------------------------------------------------------

    async def run(self, sockets: dict[tuple[str, int], socket.socket] | None = None) -> int:
        loop = asyncio.get_running_loop()
        if not self.workers:
            self.server = ProxyServer(self.snapshot, self.stats)
            try:
                await self.server.start(sockets)
            except OSError as exc:
                print(f"ubimesh proxy: cannot start the listeners: {exc}", file=sys.stderr)
                await self.server.stop()
                return 1
        if self.snapshot.admin is not None:
            self.admin = AdminServer(self.snapshot.admin.address, self)
            port = await self.admin.start()
            log.info("admin listening on %s:%d", self.snapshot.admin.address.host, port)
        if self.ads is not None:
            self.state = "INITIALIZING"
            self._ads_task = loop.create_task(self.ads.run())
        else:
            self.state = "LIVE"
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        loop.add_signal_handler(signal.SIGTERM, self._quit.set)
        loop.add_signal_handler(signal.SIGINT, self._quit.set)
        tune_heap()
        await self._quit.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        self.state = "DRAINING"
        if self.ads is not None:
            await self.ads.stop()
        if self._ads_task is not None:
            self._ads_task.cancel()
        timeout = self.options.drain_time_s
        if self.server is not None:
            await self.server.stop(drain_timeout=timeout)
        for w in self.workers:
            try:
                await w.call("stop", timeout, timeout=timeout + 2)
            except Exception:  # a dead or stuck worker is killed below anyway
                pass
        for w in self.workers:
            w.kill()
        for w in self.workers:
            deadline = time.monotonic() + 2
            while w.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if w.alive():
                w.kill(signal.SIGKILL)
        if self.admin is not None:
            await self.admin.stop()

    async def reload(self) -> None:
        """SIGHUP: load the bootstrap again; apply it only if it is valid."""
        if self.ads is not None:
            log.warning(
                "SIGHUP ignored: the configuration comes from the control plane (ADS); "
                "restart the proxy to change the bootstrap"
            )
            return
        try:
            snapshot = load_snapshot(self.options)
        except Exception as exc:
            self.reload_failures.inc()
            log.error("reload refused, keeping the last good configuration: %s", exc)
            return
        self.reloads.inc()
        await self._apply(snapshot)

    async def _apply(self, snapshot: Snapshot) -> str:
        """Swap ``snapshot`` in, here and in every worker; returns "" or what went wrong."""
        problems = []
        if self.server is not None:
            try:
                await self.server.apply(snapshot)
            except OSError as exc:
                problems.append(f"cannot open a listener: {exc}")
        for w in self.workers:
            try:
                await w.call("apply", snapshot)
            except Exception as exc:
                log.error("worker %d failed to apply the configuration: %s", w.index, exc)
                problems.append(f"worker {w.index}: {exc}")
        self.snapshot = snapshot
        return "; ".join(problems)

    async def apply_from_ads(self, snapshot: Snapshot, info: dict[str, Any]) -> str:
        """A snapshot from the ADS client: applied as a reload; the first one makes the proxy
        LIVE. Returns "" or the reason it could not be applied (the client NACKs with it)."""
        if self.state == "DRAINING":
            return "the proxy is shutting down"
        problem = await self._apply(snapshot)
        if problem:
            self.reload_failures.inc()
            log.error("configuration from %s not fully applied: %s", info.get("origin"), problem)
            return problem
        self.reloads.inc()
        self.dynamic = info
        if self.state == "INITIALIZING":
            self.state = "LIVE"
            log.info("initialized from %s: LIVE", info.get("origin", "xds"))
        return ""

    # -- admin hooks --------------------------------------------------------------------------

    def _update_cert_expiry(self) -> None:
        """``server.days_until_first_cert_expiring`` (Envoy's) and
        ``server.seconds_until_first_cert_expiring`` from the applied snapshot, at read time."""
        from ubimesh.proxy.tls.expiry import NO_CERTIFICATE_DAYS, ExpiryTracker

        if self._expiry is None:
            self._expiry = ExpiryTracker()
        when = self._expiry.first_expiry(self.snapshot)
        days = self.stats.gauge("server.days_until_first_cert_expiring")
        seconds = self.stats.gauge("server.seconds_until_first_cert_expiring")
        if when is None:
            days.set(NO_CERTIFICATE_DAYS)
            seconds.set(NO_CERTIFICATE_DAYS)
        else:
            left = max(0, int(when - time.time()))
            days.set(left // 86400)
            seconds.set(left)

    async def stats_snapshot(self) -> StatsSnapshot:
        self._update_cert_expiry()
        snaps = [self.stats.snapshot()]
        for w in self.workers:
            try:
                snaps.append(await w.call("stats"))
            except Exception as exc:
                log.warning("worker %d did not answer for stats: %s", w.index, exc)
        return merge_snapshots(snaps)

    def is_ready(self) -> bool:
        return self.state == "LIVE"

    def server_info(self) -> dict[str, Any]:
        uptime = int(time.time() - self.started_at)
        return {
            "version": f"ubimesh/{__version__}",
            "state": self.state,
            "hot_restart_version": "disabled",
            "command_line_options": {
                "concurrency": self.options.concurrency,
                "config_path": self.options.config_path,
                "service_node": self.options.service_node or self.snapshot.node.id,
                "service_cluster": self.options.service_cluster or self.snapshot.node.cluster,
                "log_level": self.options.log_level,
                "drain_time": f"{self.options.drain_time_s}s",
            },
            "node": {"id": self.snapshot.node.id, "cluster": self.snapshot.node.cluster},
            "uptime_current_epoch": f"{uptime}s",
            "uptime_all_epochs": f"{uptime}s",
        }

    def config_dump(self) -> dict[str, Any]:
        dump = self._static_config_dump()
        if self.dynamic:
            add_dynamic(dump, self.dynamic)
        return dump

    def _static_config_dump(self) -> dict[str, Any]:
        return {
            "configs": [
                {
                    "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
                    "bootstrap": self.snapshot.source,
                    "last_updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                {
                    "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
                    "version_info": self.snapshot.version,
                    "static_listeners": [
                        {"listener": lst}
                        for lst in self.snapshot.source.get("static_resources", {}).get(
                            "listeners", []
                        )
                    ],
                },
                {
                    "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                    "version_info": self.snapshot.version,
                    "static_clusters": [
                        {"cluster": c}
                        for c in self.snapshot.source.get("static_resources", {}).get(
                            "clusters", []
                        )
                    ],
                },
            ]
        }

    async def clusters(self) -> list[ClusterStatus]:
        if self.server is not None:
            return self.server.clusters_view()
        views = []
        for w in self.workers:
            try:
                views.append(await w.call("clusters"))
            except Exception as exc:
                log.warning("worker %d did not answer for clusters: %s", w.index, exc)
        return merge_cluster_views(views)

    async def listeners(self) -> list[ListenerStatus]:
        if self.server is not None:
            return self.server.listeners_view()
        if self.workers:
            try:
                result: list[ListenerStatus] = await self.workers[0].call("listeners")
                return result
            except Exception as exc:
                log.warning("worker 0 did not answer for listeners: %s", exc)
        return []

    def set_healthcheck_failed(self, failed: bool) -> None:
        self.healthcheck_failed = failed
        self.stats.gauge("server.healthcheck_failed").set(1 if failed else 0)

    async def drain_listeners(self, graceful: bool = False, inbound_only: bool = False) -> None:
        del inbound_only  # every ubimesh listener is treated as inbound for now
        if self.server is not None:
            await self.server.drain(self.options.drain_time_s if graceful else 0.0)
        for w in self.workers:
            try:
                await w.call("drain", self.options.drain_time_s if graceful else 0.0)
            except Exception as exc:
                log.warning("worker %d did not drain: %s", w.index, exc)

    def quit(self) -> None:
        self._quit.set()


#: Type URL -> (the config dump's @type, its list of dynamic resources, the resource key).
_DYNAMIC_DUMP = {
    "type.googleapis.com/envoy.config.listener.v3.Listener": (
        "ListenersConfigDump", "dynamic_listeners", "listener"),
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": (
        "ClustersConfigDump", "dynamic_active_clusters", "cluster"),
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": (
        "RoutesConfigDump", "dynamic_route_configs", "route_config"),
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": (
        "EndpointsConfigDump", "dynamic_endpoint_configs", "endpoint_config"),
}  # fmt: skip


def add_dynamic(dump: dict[str, Any], info: dict[str, Any]) -> None:
    """Add the resources the ADS client delivered to a config dump, in Envoy's shape."""
    configs: list[dict[str, Any]] = dump["configs"]
    by_type = {c["@type"].rsplit(".", 1)[-1]: c for c in configs}
    for type_url, (dump_type, key, field) in _DYNAMIC_DUMP.items():
        section = by_type.get(dump_type)
        if section is None:
            section = {"@type": f"type.googleapis.com/envoy.admin.v3.{dump_type}"}
            configs.append(section)
        version = info.get("versions", {}).get(type_url, "")
        entries = []
        for name, resource in info.get("resources", {}).get(type_url, []):
            entry = {"version_info": version, field: resource}
            if key == "dynamic_listeners":
                entry = {"name": name, "active_state": entry}
            entries.append(entry)
        section[key] = entries


def merge_cluster_views(views: list[list[ClusterStatus]]) -> list[ClusterStatus]:
    """Sum per-host live numbers across workers (every worker has the same clusters)."""
    if not views:
        return []
    merged: list[ClusterStatus] = []
    for i, cluster in enumerate(views[0]):
        hosts = []
        for j, host in enumerate(cluster.hosts):
            cx = rq = 0
            for view in views:
                if i < len(view) and j < len(view[i].hosts):
                    cx += view[i].hosts[j].cx_active
                    rq += view[i].hosts[j].rq_active
            hosts.append(dataclasses.replace(host, cx_active=cx, rq_active=rq))
        merged.append(dataclasses.replace(cluster, hosts=tuple(hosts)))
    return merged


# -- worker process ---------------------------------------------------------------------------


def _worker_main(
    index: int,
    control: socket.socket,
    snapshot: Snapshot,
    sockets: dict[tuple[str, int], socket.socket],
) -> int:  # pragma: no cover - runs in forked children; covered by integration tests
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    install_loop()

    async def main() -> int:
        stats = Store()
        server = ProxyServer(snapshot, stats)
        await server.start(sockets)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        async def handle(command: str, payload: Any) -> Any:
            if command == "stats":
                return stats.snapshot()
            if command == "clusters":
                return server.clusters_view()
            if command == "listeners":
                return server.listeners_view()
            if command == "apply":
                await server.apply(payload, reuse_port=True)
                return None
            if command == "drain":
                await server.drain(float(payload or 0.0))
                return None
            if command == "stop":
                await server.stop(drain_timeout=float(payload or 0.0))
                stop.set()
                return None
            raise ValueError(f"unknown command {command!r}")

        control_task = loop.create_task(serve_control(control, handle))
        tune_heap()
        await stop.wait()
        control_task.cancel()
        # A SIGTERM sent to the whole process group reaches the worker before any "stop"
        # command: write the buffered access log lines (os._exit follows, skipping atexit).
        from ubimesh.proxy.access_log.sink import flush_all

        flush_all()
        return 0

    return asyncio.run(main())


def run_proxy(options: ProxyOptions) -> int:
    """Entry point of ``ubimesh proxy``: returns the process exit code."""
    from ubimesh.proxy.xds.errors import ConfigError

    try:
        snapshot, ads = _compile(options)
    except ConfigError as exc:
        print(
            f"ubimesh proxy: invalid configuration in {options.config_path}:\n{exc}",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"ubimesh proxy: cannot read {options.config_path}: {exc}", file=sys.stderr)
        return 1
    if ads:
        # Listeners open with the first configuration from the control plane (or its cache),
        # static ones included, as in Envoy; until then the proxy only runs its admin.
        snapshot = dataclasses.replace(snapshot, listeners=())
    app = ProxyApp(options, snapshot, ads=ads)
    if options.concurrency <= 1:
        install_loop()
        return asyncio.run(app.run())
    # Multi-process: one SO_REUSEPORT socket per worker and listener, so the kernel spreads
    # connections over the workers. The first is bound here so that port 0 resolves to one
    # port for every worker.
    from ubimesh.proxy.listener import ListenerRuntime

    n = options.concurrency
    per_worker: list[dict[tuple[str, int], socket.socket]] = [{} for _ in range(n)]
    try:
        for spec in snapshot.listeners:
            first = ListenerRuntime.bind_socket(spec.address, reuse_port=True)
            key = listener_key(spec.address)
            per_worker[0][key] = first
            bound = SocketAddress(spec.address.host, first.getsockname()[1])
            for i in range(1, n):
                per_worker[i][key] = ListenerRuntime.bind_socket(bound, reuse_port=True)
    except OSError as exc:
        print(f"ubimesh proxy: {exc}", file=sys.stderr)
        return 1

    def child(idx: int, ctl: socket.socket) -> int:
        # Keep only this worker's sockets: a copy of a sibling's would keep it in the
        # kernel's reuseport group after that sibling died.
        for j, socks in enumerate(per_worker):
            if j != idx:
                for sock in socks.values():
                    sock.close()
        return _worker_main(idx, ctl, snapshot, per_worker[idx])

    for i in range(n):
        app.workers.append(fork_worker(i, child))
    for socks in per_worker:
        for sock in socks.values():
            sock.close()
    app.stats.gauge("server.concurrency").set(options.concurrency)
    log.info("started %d workers: %s", options.concurrency, [w.pid for w in app.workers])
    install_loop()
    return asyncio.run(app.run())


__all__ = ["ProxyApp", "run_proxy"]
