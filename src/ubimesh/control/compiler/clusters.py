"""Clusters and their endpoints: names, CDS messages and EDS ClusterLoadAssignments.

The registry hands out cluster names to the route and listener builders and remembers what
each name stands for; the messages are built once per compile call and shared by every proxy
that needs them (EDS assignments once per (cluster, proxy site), since priorities depend on
the site).

Endpoints: every Workload of the service. A workload with a sidecar listening for the port
(``sidecar.inboundPorts``) is reached at ``address:inboundPort``, any other at
``address:<application port>``. Locality is the workload's ``locality`` when given, else
``{sub_zone: <site>}`` so that each site is a locality of its own. Priority 0 holds the
proxy's own site, priority 1 every other site (Envoy fails over by priority). The endpoint's
``load_balancing_weight`` is the workload's ``weight``. A service's cluster is mTLS or not as
compiler/mtls.py says (the same for every proxy).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass

from ubimesh.control.compiler import envoy, mtls, resilience, telemetry_meta
from ubimesh.control.compiler.durations import duration
from ubimesh.control.compiler.index import ExternalService, Index, Service, ServicePort
from ubimesh.control.compiler.model import Message


def service_cluster_name(service: Service, port: ServicePort) -> str:
    return f"outbound|{port.port}||{service.fqdn}"


def external_cluster_name(external: ExternalService) -> str:
    return f"outbound|{external.port}||{external.host}"


def inbound_cluster_name(service: Service, port: ServicePort) -> str:
    return f"inbound|{port.port}||{service.fqdn}"


@dataclass(frozen=True)
class _ServiceTarget:
    service: Service
    port: ServicePort


class ClusterRegistry:
    """Names clusters as they are referenced and builds each one once."""

    def __init__(self, index: Index) -> None:
        self._index = index
        self._targets: dict[str, _ServiceTarget | ExternalService] = {}
        self._clusters: dict[str, Message] = {}
        self._assignments: dict[tuple[str, str], Message] = {}

    def service(self, service: Service, port: ServicePort) -> str:
        """The EDS cluster of ``service`` at ``port``."""
        name = service_cluster_name(service, port)
        if name not in self._targets:
            self._targets[name] = _ServiceTarget(service, port)
        return name

    def external(self, external: ExternalService) -> str:
        """The cluster of an external service. Two ExternalServices with the same host and port
        share one cluster; the first by (namespace, name) defines its addresses."""
        name = external_cluster_name(external)
        if name not in self._targets:
            self._targets[name] = external
        return name

    def connect_timeout(self, service: Service | None) -> Message:
        text = (service.connect_timeout if service else None) or self._index.mesh.connect_timeout
        return duration(text, f"{_where(service)}connectTimeout")

    def lb_policy(self, service: Service | None) -> str:
        return (service.lb_policy if service else None) or self._index.mesh.lb_policy

    def cluster(self, name: str) -> Message:
        """The Cluster message for a name this registry handed out."""
        built = self._clusters.get(name)
        if built is None:
            target = self._targets[name]
            if isinstance(target, ExternalService):
                built = self._external_cluster(name, target)
                telemetry_meta.external_cluster(built, target)
            else:
                built = envoy.eds_cluster(
                    name, self.connect_timeout(target.service), self.lb_policy(target.service)
                )
                mtls.secure_cluster(built, self._index, target.service, target.port)
                resilience.harden_cluster(built, self._index, target.service)
                telemetry_meta.service_cluster(built, self._index, target.service)
            self._clusters[name] = built
        return built

    def is_eds(self, name: str) -> bool:
        return isinstance(self._targets.get(name), _ServiceTarget)

    def assignment(self, name: str, site: str) -> Message:
        """The ClusterLoadAssignment of EDS cluster ``name`` seen from a proxy in ``site``."""
        key = (name, site)
        built = self._assignments.get(key)
        if built is None:
            target = self._targets[name]
            assert isinstance(target, _ServiceTarget)
            built = self._build_assignment(name, target, site)
            self._assignments[key] = built
        return built

    def _external_cluster(self, name: str, ext: ExternalService) -> Message:
        if ext.addresses:
            endpoints = [(a, ext.port) for a in ext.addresses]
            dns = False
        else:
            endpoints = [(ext.host, ext.port)]
            dns = not _is_ip(ext.host)
        return envoy.inline_cluster(
            name,
            dns=dns,
            endpoints=endpoints,
            connect_timeout=self.connect_timeout(None),
            policy=self._index.mesh.lb_policy,
        )

    def _build_assignment(self, name: str, target: _ServiceTarget, site: str) -> Message:
        service, port = target.service, target.port
        groups: dict[tuple[int, tuple[str, str, str]], list[tuple[str, int, int]]] = (
            defaultdict(list)
        )
        for w in self._index.workloads_of.get((service.namespace, service.name), ()):
            if w.sidecar is not None and port.name in w.sidecar.inbound_ports:
                endpoint_port = w.sidecar.inbound_ports[port.name]
            else:
                endpoint_port = w.app_port(port)
            locality = w.locality or ("", "", w.site)
            priority = 0 if w.site == site else 1
            groups[(priority, locality)].append((w.address, endpoint_port, w.weight))
        return envoy.load_assignment(
            name,
            [
                envoy.locality_endpoints(
                    locality,
                    priority,
                    [envoy.lb_endpoint(a, p, wt) for a, p, wt in sorted(groups[key])],
                )
                for key in sorted(groups)
                for priority, locality in (key,)
            ],
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _where(service: Service | None) -> str:
    if service is None:
        return "Mesh: spec.defaults."
    return f"Service {service.namespace}/{service.name}: spec."
