"""HCM ``tracing`` translation (ubimesh.proxy.xds.tracing): the Zipkin and OpenTelemetry
providers become a TracingConfig; what ubimesh does not do is refused with the field path and
the fix; a listener's traffic_direction OUTBOUND makes its HCMs' spans egress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ubimesh.proxy.snapshot.types import (
    CustomTag,
    CustomTagKind,
    HttpConnectionManagerConfig,
    RouteTracing,
    Snapshot,
    TracingConfig,
    TracingProvider,
    TracingProviderKind,
)
from ubimesh.proxy.xds import ConfigErrors, load_bootstrap_dict

CONFIGS = Path(__file__).parent / "configs"
HCM = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
ZIPKIN = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"
OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"


def doc_with(tracing: dict[str, Any], direction: str | None = None) -> dict[str, Any]:
    doc = yaml.safe_load((CONFIGS / "minimal.yaml").read_text())
    lst = doc["static_resources"]["listeners"][0]
    lst["filter_chains"][0]["filters"][0]["typed_config"]["tracing"] = tracing
    if direction:
        lst["traffic_direction"] = direction
    assert isinstance(doc, dict)
    return doc


def tracing_of(snapshot: Snapshot) -> TracingConfig:
    hcm = snapshot.listeners[0].filter_chains[0].filters[-1]
    assert isinstance(hcm, HttpConnectionManagerConfig) and hcm.tracing is not None
    return hcm.tracing


def errors(tracing: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_dict(doc_with(tracing))
    return [(e.path, e.message) for e in info.value.errors]


def zipkin(**fields: Any) -> dict[str, Any]:
    config = {"@type": ZIPKIN, "collector_cluster": "backend",
              "collector_endpoint": "/api/v2/spans", "collector_endpoint_version": "HTTP_JSON"}
    return {"name": "envoy.tracers.zipkin", "typed_config": {**config, **fields}}


def test_zipkin_with_envoys_defaults_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    t = tracing_of(load_bootstrap_dict(doc_with({"provider": zipkin()})))
    assert t == TracingConfig(TracingProvider(TracingProviderKind.ZIPKIN, "backend",
                                              "/api/v2/spans", "backend"))  # fmt: skip
    assert (t.random_sampling, t.client_sampling, t.overall_sampling) == (100, 100, 100)
    assert t.provider.shared_span_context and not t.egress
    monkeypatch.setenv("UBIMESH_TEST_REGION", "eu")
    t = tracing_of(load_bootstrap_dict(doc_with({
        "provider": zipkin(shared_span_context=False, trace_id_128bit=True,
                           collector_hostname="zipkin.local",
                           trace_context_option="USE_B3_WITH_W3C_PROPAGATION"),
        "random_sampling": {"value": 2.5}, "overall_sampling": {"value": 50},
        "client_sampling": {"value": 0}, "max_path_tag_length": 64, "verbose": True,
        "custom_tags": [
            {"tag": "a", "literal": {"value": "x"}},
            {"tag": "b", "request_header": {"name": "X-Tenant", "default_value": "none"}},
            {"tag": "c", "environment": {"name": "UBIMESH_TEST_REGION"}},
        ]}, direction="OUTBOUND")))
    p = t.provider
    assert (p.shared_span_context, p.trace_id_128bit, p.w3c, p.host) == (
        False, True, True, "zipkin.local")
    assert (t.random_sampling, t.overall_sampling, t.client_sampling) == (2.5, 50, 0)
    assert t.max_path_tag_length == 64 and t.verbose and t.egress
    assert t.custom_tags == (CustomTag("a", CustomTagKind.LITERAL, "x"),
                             CustomTag("b", CustomTagKind.REQUEST_HEADER, "x-tenant", "none"),
                             CustomTag("c", CustomTagKind.ENVIRONMENT, "eu"))  # fmt: skip


def test_opentelemetry_over_http() -> None:
    t = tracing_of(load_bootstrap_dict(doc_with({"provider": {
        "name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": OTEL, "service_name": "shop",
            "http_service": {"http_uri": {"uri": "http://otel:4318/v1/traces",
                                          "cluster": "backend", "timeout": "0.25s"},
                             "request_headers_to_add": [
                                 {"header": {"key": "Authorization", "value": "k"}}]}}}})))
    assert t.provider == TracingProvider(
        TracingProviderKind.OPENTELEMETRY, "backend", "/v1/traces", "otel:4318", 0.25,
        (("authorization", "k"),), service_name="shop")


def test_refusals_name_the_field_and_the_fix() -> None:
    hcm_tracing = f"{HCM}.tracing"
    typed = f"{hcm_tracing}.provider.typed_config"
    got = errors({"provider": zipkin(collector_endpoint_version="HTTP_PROTO")})
    assert got[0][0] == f"{typed}.collector_endpoint_version" and "HTTP_JSON" in got[0][1]
    got = errors({"provider": zipkin(collector_endpoint_version=None)})
    assert "HTTP_JSON" in got[0][1]
    got = errors({"provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
        "@type": OTEL, "grpc_service": {"envoy_grpc": {"cluster_name": "backend"}}}}})
    assert got[0][0] == f"{typed}.grpc_service"
    assert "OTLP over gRPC is not implemented; use http_service" in got[0][1]
    got = errors({"provider": zipkin(), "spawn_upstream_span": True})
    assert got[0][0] == f"{hcm_tracing}.spawn_upstream_span"
    got = errors({"random_sampling": {"value": 10}})
    assert got[0][0] == f"{hcm_tracing}.provider" and "is required" in got[0][1]
    got = errors({"provider": zipkin(collector_cluster="nowhere")})
    assert got[0][0] == f"{typed}.collector_cluster" and "nowhere" in got[0][1]
    got = errors({"provider": zipkin(), "custom_tags": [
        {"tag": "m", "metadata": {"kind": {"request": {}}, "metadata_key": {"key": "k"}}}]})
    assert got[0][0] == f"{hcm_tracing}.custom_tags[0].metadata"
    got = errors({"provider": {"name": "envoy.tracers.datadog", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.DatadogConfig",
        "collector_cluster": "backend", "service_name": "x"}}})
    assert got == [(f"{typed}", got[0][1])] and "DatadogConfig" in got[0][1]


def test_route_decorator_and_tracing() -> None:
    doc = doc_with({"provider": zipkin()})
    vhost = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]
    vhost["routes"][0]["decorator"] = {"operation": "checkout", "propagate": False}
    vhost["routes"][0]["tracing"] = {
        "random_sampling": {"numerator": 5, "denominator": "TEN_THOUSAND"},
        "overall_sampling": {"numerator": 50},
        "custom_tags": [{"tag": "route", "literal": {"value": "r"}}]}
    hcm = load_bootstrap_dict(doc).listeners[0].filter_chains[0].filters[-1]
    assert isinstance(hcm, HttpConnectionManagerConfig)
    route = hcm.route_config.virtual_hosts[0].routes[0]
    assert (route.decorator, route.decorator_propagate) == ("checkout", False)
    assert route.tracing == RouteTracing(100.0, 0.05, 50.0,
                                         (CustomTag("route", CustomTagKind.LITERAL, "r"),))
