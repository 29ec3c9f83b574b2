"""The compiler's tracing (control/compiler/tracing.py) and Mesh ``spec.tracing`` validation:
every HTTP connection manager of every sidecar and gateway gets the same ``tracing`` block
pointing at ``ubimesh-collector``; TCP listeners and meshes without tracing are unchanged."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.trace.v3 import opentelemetry_pb2, zipkin_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from ubimesh.control.compiler import CLUSTER_TYPE, LISTENER_TYPE, compile_all
from ubimesh.control.compiler.model import CompileError, CompileOptions, XdsSet
from ubimesh.control.compiler.tracing import COLLECTOR_CLUSTER, OPENTELEMETRY, ZIPKIN
from ubimesh.control.resources import Resource, ResourceErrors, parse_documents, validate_set

MESH = """\
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {ports: [{name: http, port: 80, protocol: http}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: db}
spec: {ports: [{name: pg, port: 5432, protocol: tcp}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: web-1}
spec:
  service: web
  address: 127.0.0.1
  ports: {http: 8081}
  sidecar:
    inboundPorts: {http: 15001}
    outboundPort: 15080
    upstreams: [{service: db, localPort: 15432}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  address: 127.0.0.1
  listeners:
  - {name: web, port: 18080, protocol: HTTP}
  - {name: pg, port: 18432, protocol: TCP, backend: {service: db, port: pg}}
"""
BUILTIN = CompileOptions(collector="127.0.0.1:15000")


def resources(tracing: str | None = None) -> list[Resource]:
    text = MESH
    if tracing is not None:
        text += (
            "---\napiVersion: ubimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\n"
            f"spec:\n  mtls: {{mode: DISABLE}}\n  tracing: {tracing}\n"
        )
    out = parse_documents(text, "mesh.yaml")
    validate_set(out)
    return out


def hcms(xds: XdsSet) -> dict[str, Any]:
    """Each listener's (first) HTTP connection manager, by listener name."""
    out: dict[str, Any] = {}
    for name, listener in xds.resources[LISTENER_TYPE].items():
        for chain in listener.filter_chains:
            for flt in chain.filters:
                hcm = hcm_pb2.HttpConnectionManager()
                if flt.typed_config.Unpack(hcm):
                    out.setdefault(name, hcm)
    return out


def provider_config(hcm: Any, message: Any) -> Any:
    config = message()
    assert hcm.tracing.provider.typed_config.Unpack(config)
    return config


def test_builtin_collector_on_every_http_listener() -> None:
    compiled = compile_all(resources(), BUILTIN)
    sidecar, gateway = compiled["web-1.default"], compiled["edge.default"]
    for xds, http_listeners in (
        (sidecar, {"inbound_15001", "outbound_http_15080"}),
        (gateway, {"gateway_web"}),
    ):
        found = hcms(xds)
        assert set(found) == http_listeners  # TCP listeners have no HCM
        for hcm in found.values():
            assert hcm.tracing.provider.name == ZIPKIN
            assert hcm.tracing.random_sampling.value == 100.0
            zipkin = provider_config(hcm, zipkin_pb2.ZipkinConfig)
            assert zipkin.collector_cluster == COLLECTOR_CLUSTER
            assert zipkin.collector_endpoint == "/api/v2/spans"
            assert zipkin.collector_endpoint_version == zipkin_pb2.ZipkinConfig.HTTP_JSON
            assert zipkin.trace_id_128bit
            assert zipkin.shared_span_context.value is False
            assert zipkin.HasField("shared_span_context")
        cluster = xds.resources[CLUSTER_TYPE][COLLECTOR_CLUSTER]
        assert cluster.type == cluster.STATIC
        address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
        assert (address.socket_address.address, address.socket_address.port_value) == (
            "127.0.0.1",
            15000,
        )
    listeners = sidecar.resources[LISTENER_TYPE]
    assert listeners["inbound_15001"].traffic_direction == base_pb2.INBOUND
    assert listeners["outbound_http_15080"].traffic_direction == base_pb2.OUTBOUND
    assert listeners["upstream_15432"].traffic_direction == base_pb2.UNSPECIFIED  # TCP
    # a gateway receives from outside the mesh: server spans, direction left unspecified
    assert gateway.resources[LISTENER_TYPE]["gateway_web"].traffic_direction == 0


def test_no_collector_or_disabled_means_no_tracing_at_all() -> None:
    plain = compile_all(resources("{enabled: true}"))  # builtin, but no collector
    assert compile_all(resources("{enabled: false}"), BUILTIN) == plain
    for xds in plain.values():
        assert COLLECTOR_CLUSTER not in xds.resources[CLUSTER_TYPE]
        assert not any(h.HasField("tracing") for h in hcms(xds).values())
    # with tracing, only listeners and clusters change: versions say so
    traced = compile_all(resources("{}"), BUILTIN)["web-1.default"]
    before = plain["web-1.default"]
    changed = {t for t in traced.versions if traced.versions[t] != before.versions[t]}
    assert changed == {LISTENER_TYPE, CLUSTER_TYPE}


def test_opentelemetry_to_an_external_collector_by_name() -> None:
    mesh = resources("{provider: opentelemetry, address: 'otel.example:4318', sampling: 1.5}")
    compiled = compile_all(mesh)  # no builtin collector needed
    for node, service in (("web-1.default", "web.default"), ("edge.default", "edge.default")):
        xds = compiled[node]
        for hcm in hcms(xds).values():
            assert hcm.tracing.provider.name == OPENTELEMETRY
            assert hcm.tracing.random_sampling.value == 1.5
            otel = provider_config(hcm, opentelemetry_pb2.OpenTelemetryConfig)
            assert otel.service_name == service
            assert otel.http_service.http_uri.uri == "http://otel.example:4318/v1/traces"
            assert otel.http_service.http_uri.cluster == COLLECTOR_CLUSTER
            assert otel.http_service.http_uri.timeout.seconds > 0
        cluster = xds.resources[CLUSTER_TYPE][COLLECTOR_CLUSTER]
        assert cluster.type == cluster.STRICT_DNS


def test_zipkin_address_with_a_path() -> None:
    mesh = resources("{provider: zipkin, address: 'http://10.0.0.5:9411/zipkin/spans'}")
    hcm = hcms(compile_all(mesh, BUILTIN)["edge.default"])["gateway_web"]
    zipkin = provider_config(hcm, zipkin_pb2.ZipkinConfig)
    assert zipkin.collector_endpoint == "/zipkin/spans"
    assert zipkin.collector_hostname == "10.0.0.5:9411"


@pytest.mark.parametrize(
    ("tracing", "message"),
    [
        ("{provider: zipkin}", "spec.tracing.address: required field is missing"),
        ("{address: 'a:9411'}", "spec.tracing.address: 'a:9411' is not used by the builtin"),
        (
            "{provider: zipkin, address: 'https://z:9411'}",
            "spec.tracing.address: 'https://z:9411' uses https://, which is not supported",
        ),
        ("{provider: zipkin, address: jaeger}", "'jaeger' has no port (e.g. :9411"),
        ("{sampling: 101}", "spec.tracing.sampling: 101 is out of range; expected a percent"),
        ("{sampling: 'all'}", "spec.tracing.sampling: 'all' is not a number"),
        (
            "{provider: jaeger}",
            "spec.tracing.provider: 'jaeger' is not supported; expected "
            "one of: builtin, zipkin, opentelemetry",
        ),
        ("{enabled: 1}", "spec.tracing.enabled: 1 is not a boolean"),
    ],
)
def test_validation_names_the_field_the_value_and_the_fix(tracing: str, message: str) -> None:
    with pytest.raises(ResourceErrors) as info:
        resources(tracing)
    assert message in str(info.value.errors[0])


def test_a_hand_made_bad_mesh_is_a_compile_error() -> None:
    mesh = Resource("ubimesh.io/v1alpha1", "Mesh", "default", "", {"tracing": {"sampling": -1}})
    with pytest.raises(CompileError, match=r"spec.tracing.sampling is -1"):
        compile_all([mesh, *resources()], BUILTIN)
