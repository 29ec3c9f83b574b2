"""The compiler's mesh telemetry metadata (control/compiler/telemetry_meta.py): inbound
listeners report as ``destination`` with their service and the callers' workloads by SPIFFE ID
(an ID two workloads share names none), egress listeners and gateways as ``source``, service
clusters name their service, and their identity only when their mutual TLS verifies it. The
proxy's translator accepts all of it (the golden files cover whole outputs)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from ubimesh.control.compiler import CLUSTER_TYPE, LISTENER_TYPE, ProxyRef, compile_proxy
from ubimesh.control.resources.model import Resource

NS = "ubimesh.telemetry"


def res(kind: str, name: str, spec: dict[str, Any], namespace: str = "shop") -> Resource:
    return Resource(
        api_version="ubimesh.io/v1alpha1",
        kind=kind,
        name=name,
        namespace="" if kind == "Mesh" else namespace,
        spec=spec,
        annotations={},
    )


def workload(name: str, service: str, address: str, **extra: Any) -> Resource:
    spec = {
        "service": service,
        "address": address,
        "sidecar": {"inboundPorts": {"http": 15006}, "outboundPort": 15001},
        **extra,
    }
    return res("Workload", name, spec)


def mesh(mtls: str) -> list[Resource]:
    http = [{"name": "http", "port": 8080, "protocol": "http"}]
    return [
        res("Mesh", "mesh", {"trustDomain": "example.org", "mtls": {"mode": mtls}}),
        res("Service", "api", {"ports": http}),
        res("Service", "web", {"ports": http}),
        workload("api-1", "api", "10.0.0.1"),
        workload("web-1", "web", "10.0.0.2"),
        workload("web-2", "web", "10.0.0.3"),  # same identity as web-1 (default account)
    ]


def meta_of(msg: Any) -> dict[str, Any]:
    if NS not in msg.metadata.filter_metadata:
        return {}
    out: dict[str, Any] = json_format.MessageToDict(msg.metadata.filter_metadata[NS])
    return out


def test_sidecar_listeners_and_clusters() -> None:
    xds = compile_proxy(mesh("STRICT"), ProxyRef("api-1.shop", "sidecar", "api-1", "shop"))
    listeners = xds.resources[LISTENER_TYPE]
    inbound = meta_of(listeners["inbound_15006"])
    assert inbound == {
        "reporter": "destination",
        "workload": "api-1",
        "namespace": "shop",
        "principal": "spiffe://example.org/ns/shop/sa/api",
        "app": "api",
        "cluster": inbound["cluster"],
        "service": "api.shop.svc.cluster.local",
        "service_name": "api",
        "service_namespace": "shop",
        # default deny and no TrafficTarget: no workload may call api, so none is named
    }
    # With authorization open, every caller with an identity of its own is named; web-1 and
    # web-2 share spiffe://example.org/ns/shop/sa/web, so neither is.
    open_mesh = mesh("STRICT")
    open_mesh[0] = res("Mesh", "mesh", {"trustDomain": "example.org", "mtls": {"mode": "STRICT"},
                                        "authorization": {"defaultAction": "ALLOW"}})
    open_xds = compile_proxy(open_mesh, ProxyRef("api-1.shop", "sidecar", "api-1", "shop"))
    assert meta_of(open_xds.resources[LISTENER_TYPE]["inbound_15006"])["peers"] == {
        "spiffe://example.org/ns/shop/sa/api": "api-1"
    }
    outbound = meta_of(listeners["outbound_http_15001"])
    assert outbound["reporter"] == "source" and outbound["workload"] == "api-1"
    assert "peers" not in outbound and "service" not in outbound
    web = meta_of(xds.resources[CLUSTER_TYPE]["outbound|8080||web.shop"])
    assert web == {
        "service": "web.shop.svc.cluster.local",
        "service_name": "web",
        "service_namespace": "shop",
        "app": "web",
        "principal": "spiffe://example.org/ns/shop/sa/web",  # verified by the cluster's TLS
    }


def test_a_plaintext_cluster_names_no_principal_and_a_single_workload() -> None:
    xds = compile_proxy(mesh("DISABLE"), ProxyRef("web-1.shop", "sidecar", "web-1", "shop"))
    api = meta_of(xds.resources[CLUSTER_TYPE]["outbound|8080||api.shop"])
    assert "principal" not in api
    assert api["workload"] == "api-1" and api["namespace"] == "shop"
