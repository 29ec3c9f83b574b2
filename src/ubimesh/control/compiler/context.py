"""One compile call's shared state: the index, the cluster registry, the route builder and
the caches that let every proxy of ``compile_all`` reuse what another already built."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2

from ubimesh.control.compiler import telemetry_meta
from ubimesh.control.compiler.access_log import DEFAULT_PLAN, AccessLogPlan
from ubimesh.control.compiler.authz import (
    Authorization,
    EgressGrant,
    egress_denied_vhost,
    forbidden_clusters,
    grant_routes,
    strip_forbidden,
)
from ubimesh.control.compiler.clusters import ClusterRegistry
from ubimesh.control.compiler.index import ExternalService, Index, Service, ServicePort
from ubimesh.control.compiler.model import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    Message,
    XdsSet,
    message_digest,
    version_entry,
    version_of,
    version_of_entries,
)
from ubimesh.control.compiler.routes import RouteBuilder
from ubimesh.control.compiler.tracing import TracingPlan


def service_domains(service: Service, port: ServicePort, *, short: bool) -> list[str]:
    """A service's hostnames, each also with ``:<port>``. The bare name only when ``short``."""
    names = [service.fqdn, f"{service.fqdn}.svc", f"{service.fqdn}.svc.cluster.local"]
    if short:
        names.insert(0, service.name)
    return [d for n in names for d in (n, f"{n}:{port.port}")]


def external_domains(ext: ExternalService) -> list[str]:
    names = [ext.host, f"{ext.name}.{ext.namespace}.external"]
    return [d for n in names for d in (n, f"{n}:{ext.port}")]


class Context:
    """Caches shared by every proxy compiled from one set of resources."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.clusters = ClusterRegistry(index)
        self.routes = RouteBuilder(index, self.clusters)
        self.authz = Authorization(index)
        #: Where spans go (compiler/tracing.py); None: no tracing. Set by compile.py.
        self.tracing: TracingPlan | None = None
        #: Access logs (compiler/access_log.py); None: none. Set by compile.py.
        self.access_log: AccessLogPlan | None = DEFAULT_PLAN
        self._peers: dict[str, str] | None = None
        self._peers_of: dict[tuple[str, str], dict[str, str]] = {}
        self._outbound: dict[tuple[object, ...], tuple[Message, frozenset[str]]] = {}
        self._digests: dict[int, tuple[Message, bytes]] = {}
        self._groups: dict[tuple[frozenset[str], str], _ClusterGroup] = {}

    def telemetry_peers(self, namespace: str, account: str) -> dict[str, str]:
        """SPIFFE ID -> workload name of the callers an inbound listener of ``account``'s
        workloads can see (compiler/telemetry_meta.py): the mesh's workloads (with an ID only
        one of them has) that authorization lets call it. Built once per mesh and account: a
        listener never carries the names of workloads that cannot reach it, and the map does
        not grow with the mesh in a default-deny mesh."""
        key = (namespace, account)
        found = self._peers_of.get(key)
        if found is None:
            if self._peers is None:
                self._peers = telemetry_meta.peers(self.index)
            allowed = self.authz.callers(namespace, account)
            found = (
                self._peers
                if allowed is None
                else {pid: name for pid, name in self._peers.items() if pid in allowed}
            )
            self._peers_of[key] = found
        return found

    def external_action(self, ext: ExternalService) -> tuple[Message, str]:
        """The route action to an external service (Host rewritten to the external host)."""
        cluster = self.clusters.external(ext)
        action = rc.RouteAction(
            cluster=cluster,
            host_rewrite_literal=ext.host if ext.port == 80 else f"{ext.host}:{ext.port}",
        )
        action.timeout.CopyFrom(self.routes.service_timeout([]))
        return action, cluster

    def forbidden_clusters(self, grants: Sequence[EgressGrant]) -> set[str]:
        """The clusters of the ExternalServices a proxy with ``grants`` may not reach."""
        if not self.authz.enabled:
            return set()
        return forbidden_clusters(self.index, grants, self.clusters.external)

    def outbound_route_config(
        self, namespace: str, port: int, grants: Sequence[EgressGrant]
    ) -> tuple[Message, frozenset[str]]:
        """Route configuration ``outbound_http_<port>`` of a sidecar in ``namespace`` allowed
        ``grants`` (compiler/authz.py): one virtual host per (HTTP service, port) and per
        granted HTTP ExternalService, and, with authorization on, the catch-all that refuses
        every other Host (``authz.egress_denied_route``).

        Domains must be unique in a route configuration, so: the bare service name is offered
        to sidecars of the service's own namespace only; a hostname already taken (a second
        HTTP port of one service, two ExternalServices with one host) stays with the first
        virtual host in (namespace, name, port) order."""
        key = (namespace, port, tuple(g.signature() for g in grants))
        cached = self._outbound.get(key)
        if cached is not None:
            return cached
        forbidden = self.forbidden_clusters(grants)
        taken: set[str] = set()
        used: set[str] = set()
        vhosts = []
        for service in self.index.services.values():
            for sport in service.ports:
                if sport.protocol != "http":
                    continue
                routes, clusters = self.routes.service_routes(service, sport)
                if forbidden:
                    routes = tuple(strip_forbidden(routes, forbidden, port))
                used.update(clusters - forbidden)
                domains = _claim(
                    service_domains(service, sport, short=service.namespace == namespace), taken
                )
                vhosts.append(
                    rc.VirtualHost(
                        name=f"outbound|{sport.port}||{service.fqdn}",
                        domains=domains,
                        routes=routes,
                    )
                )
        for grant in grants:
            ext = grant.external
            if ext.protocol != "http":
                continue
            action, cluster = self.external_action(ext)
            used.add(cluster)
            domains = _claim(external_domains(ext), taken)
            if domains:
                vhosts.append(
                    rc.VirtualHost(
                        name=f"outbound|{ext.port}||{ext.name}.{ext.namespace}.external",
                        domains=domains,
                        routes=grant_routes(grant, action, port),
                    )
                )
        if self.authz.enabled:
            vhosts.append(egress_denied_vhost(port))
        built = (
            route_pb2.RouteConfiguration(name=f"outbound_http_{port}", virtual_hosts=vhosts),
            frozenset(used),
        )
        self._outbound[key] = built
        return built

    def digest(self, message: Message) -> bytes:
        """The message's digest, computed once per message object in this compile call (the
        message is kept alive with it, so its id cannot be reused meanwhile)."""
        entry = self._digests.get(id(message))
        if entry is None:
            entry = (message, message_digest(message))
            self._digests[id(message)] = entry
        return entry[1]

    def xds_set(
        self,
        listeners: Mapping[str, Message],
        routes: Mapping[str, Message],
        clusters: Iterable[str],
        local_clusters: Mapping[str, Message],
        site: str,
    ) -> XdsSet:
        """Assemble a proxy's set: its listeners and routes, the registry's clusters it names
        (EDS ones with their assignments from ``site``) and its own ``local_clusters``."""
        group = self._group(frozenset(clusters), site)
        cds: Mapping[str, Message]
        if local_clusters:
            local = [(n, version_entry(n, self.digest(m))) for n, m in local_clusters.items()]
            merged = sorted([*group.cluster_entries, *local])
            every = {**group.clusters, **local_clusters}
            cds = {name: every[name] for name, _ in merged}
            cds_version = version_of_entries(entry for _, entry in merged)
        else:
            cds, cds_version = group.clusters, group.clusters_version
        resources = {
            CLUSTER_TYPE: cds,
            ENDPOINT_TYPE: group.assignments,
            LISTENER_TYPE: dict(sorted(listeners.items())),
            ROUTE_TYPE: dict(sorted(routes.items())),
        }
        versions = {
            CLUSTER_TYPE: cds_version,
            ENDPOINT_TYPE: group.assignments_version,
            LISTENER_TYPE: self._version(resources[LISTENER_TYPE]),
            ROUTE_TYPE: self._version(resources[ROUTE_TYPE]),
        }
        return XdsSet(resources=resources, versions=versions)

    def _version(self, named: Mapping[str, Message]) -> str:
        return version_of({n: self.digest(m) for n, m in named.items()})

    def _group(self, names: frozenset[str], site: str) -> _ClusterGroup:
        """The registry clusters ``names`` and their assignments from ``site``, built once per
        distinct (names, site): proxies of one namespace and site usually share one."""
        key = (names, site)
        group = self._groups.get(key)
        if group is None:
            clusters: dict[str, Message] = {}
            entries = []
            assignments: dict[str, Message] = {}
            for name in sorted(names):
                clusters[name] = self.clusters.cluster(name)
                entries.append((name, version_entry(name, self.digest(clusters[name]))))
                if self.clusters.is_eds(name):
                    assignments[name] = self.clusters.assignment(name, site)
            group = _ClusterGroup(
                # shared by every proxy of the group: read-only views
                clusters=MappingProxyType(clusters),
                cluster_entries=tuple(entries),
                clusters_version=version_of_entries(entry for _, entry in entries),
                assignments=MappingProxyType(assignments),
                assignments_version=self._version(assignments),
            )
            self._groups[key] = group
        return group


@dataclass(frozen=True)
class _ClusterGroup:
    clusters: Mapping[str, Message]
    cluster_entries: tuple[tuple[str, bytes], ...]  # (name, version entry), by name
    clusters_version: str
    assignments: Mapping[str, Message]
    assignments_version: str


def _claim(domains: list[str], taken: set[str]) -> list[str]:
    mine = [d for d in domains if d not in taken]
    taken.update(mine)
    return mine
