"""Mesh telemetry metadata: what a proxy needs to label Istio's mesh metrics.

The proxy does not know the mesh; the compiler tells it, in a metadata namespace Envoy ignores
(``filter_metadata["ubimesh.telemetry"]``, docs/telemetry.md "Metrics"):

- every sidecar listener gets this workload's own labels (``workload``, ``namespace``,
  ``principal``, ``app``, ``cluster``) and its ``reporter``: ``destination`` on inbound
  listeners, which also name the service whose port they serve and carry ``peers`` (SPIFFE ID
  -> workload name, for the callers' ``source_workload``), ``source`` on outbound and upstream
  listeners;
- every gateway listener reports as ``source`` with the gateway as the workload;
- every service cluster names its service (``service`` is Istio's
  ``<name>.<namespace>.svc.cluster.local``), and, when the service has exactly one workload or
  one identity, that workload and the identity its mutual TLS verifies; an ExternalService's
  cluster names the external host.

A SPIFFE ID that several workloads share (two versions of a service with the default service
account) maps to no workload in ``peers``: its callers are counted with ``source_workload``
``unknown`` rather than under a wrong name.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import struct_pb2

from ubimesh.control.compiler import mtls
from ubimesh.control.compiler.index import ExternalService, Gateway, Index, Service, Workload
from ubimesh.control.compiler.model import Message

NAMESPACE = "ubimesh.telemetry"
SOURCE = "source"
DESTINATION = "destination"


def service_host(service: Service) -> str:
    """Istio's ``destination_service``: ``<name>.<namespace>.svc.cluster.local``."""
    return f"{service.name}.{service.namespace}.svc.cluster.local"


def _set(msg: Message, values: Mapping[str, object]) -> None:
    """Put ``values`` (empty strings left out) in ``msg.metadata`` under NAMESPACE, keeping the
    other namespaces (ubimesh.rbac) as they are."""
    struct = struct_pb2.Struct()
    struct.update({k: v for k, v in values.items() if v != "" and v != {}})
    msg.metadata.filter_metadata[NAMESPACE].CopyFrom(struct)


def _workload_values(index: Index, workload: Workload) -> dict[str, object]:
    return {
        "workload": workload.name,
        "namespace": workload.namespace,
        "principal": mtls.spiffe_id(
            index.mesh.trust_domain, workload.namespace, workload.service_account
        ),
        "app": workload.service,
        "cluster": workload.site,
    }


def peers(index: Index) -> dict[str, str]:
    """SPIFFE ID -> workload name, for the IDs exactly one workload of the mesh has."""
    names: dict[str, set[str]] = {}
    td = index.mesh.trust_domain
    for w in index.workloads:
        names.setdefault(mtls.spiffe_id(td, w.namespace, w.service_account), set()).add(w.name)
    return {pid: next(iter(ws)) for pid, ws in sorted(names.items()) if len(ws) == 1}


def inbound(
    listener: Message,
    index: Index,
    workload: Workload,
    service: Service,
    callers: Mapping[str, str],
) -> None:
    """An inbound sidecar listener: reporter ``destination``, for ``service``'s port;
    ``callers`` (SPIFFE ID -> workload name) names the workloads that may call it
    (``Context.telemetry_peers``)."""
    values = _workload_values(index, workload)
    values.update(
        reporter=DESTINATION,
        service=service_host(service),
        service_name=service.name,
        service_namespace=service.namespace,
        peers=dict(callers),
    )
    _set(listener, values)


def outbound(listeners: Mapping[str, Message], index: Index, workload: Workload) -> None:
    """The sidecar's listeners not marked yet (outbound and upstream): reporter ``source``."""
    values = _workload_values(index, workload)
    values["reporter"] = SOURCE
    for listener in listeners.values():
        if NAMESPACE not in listener.metadata.filter_metadata:
            _set(listener, values)


def gateway(listeners: Mapping[str, Message], gw: Gateway) -> None:
    """Every listener of a gateway: reporter ``source``, the gateway as the workload."""
    values = {
        "reporter": SOURCE,
        "workload": gw.name,
        "namespace": gw.namespace,
        "app": gw.name,
        "cluster": gw.site,
    }
    for listener in listeners.values():
        _set(listener, values)


def service_cluster(cluster: Message, index: Index, service: Service) -> None:
    """A service's cluster: the destination service, and its workload and identity when
    there is one (the identity only when the cluster's mutual TLS verifies it)."""
    workloads = index.workloads_of.get((service.namespace, service.name), ())
    identities = mtls.service_identities(index, service)
    values: dict[str, object] = {
        "service": service_host(service),
        "service_name": service.name,
        "service_namespace": service.namespace,
        "app": service.name,
    }
    if len(workloads) == 1:
        values["workload"] = workloads[0].name
        values["namespace"] = workloads[0].namespace
        values["cluster"] = workloads[0].site
    if len(identities) == 1 and cluster.HasField("transport_socket"):
        values["principal"] = identities[0]
    _set(cluster, values)


def external_cluster(cluster: Message, external: ExternalService) -> None:
    """An ExternalService's cluster: the external host is the destination service."""
    _set(
        cluster,
        {
            "service": external.host,
            "service_name": external.name,
            "service_namespace": external.namespace,
        },
    )
