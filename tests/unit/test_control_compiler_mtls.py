"""Unit tests of mesh mTLS in the compiler (compiler/mtls.py; docs/identity.md section 4):
which clusters are mTLS, their SNI and SAN matchers, and what each mode does to inbound
listeners. The golden cases strict_sidecar, permissive_sidecar, mixed_service and
gateway_mtls cover whole outputs."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from ubimesh.control.compiler import CLUSTER_TYPE, LISTENER_TYPE, CompileError, compile_all
from ubimesh.control.compiler.mtls import BUNDLE_SECRET, CERTIFICATE_SECRET
from ubimesh.control.resources import ResourceErrors, parse_documents, validate_set
from ubimesh.control.resources.model import Resource

NS = "shop"


def res(kind: str, name: str, spec: dict[str, Any]) -> Resource:
    return Resource(
        api_version="ubimesh.io/v1alpha1",
        kind=kind,
        name=name,
        namespace="" if kind == "Mesh" else NS,
        spec=spec,
    )


def mesh(mode: str | None, trust_domain: str = "example.org") -> Resource:
    spec: dict[str, Any] = {"trustDomain": trust_domain}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    return res("Mesh", "default", spec)


def service(name: str, protocol: str = "http") -> Resource:
    return res("Service", name, {"ports": [{"name": "p", "port": 8080, "protocol": protocol}]})


def workload(name: str, svc: str, *, sidecar: bool = True, **spec: Any) -> Resource:
    body: dict[str, Any] = {"service": svc, "address": "10.0.0.9", **spec}
    if sidecar:
        body["sidecar"] = {"inboundPorts": {"p": 15001}, "outboundPort": 15080}
    return res("Workload", name, body)


def upstream_context(cluster: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext | None:
    if not cluster.HasField("transport_socket"):
        return None
    assert cluster.transport_socket.name == "envoy.transport_sockets.tls"
    context = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.typed_config.Unpack(context)
    return context


def api_cluster(resources: list[Resource]) -> cluster_pb2.Cluster:
    cluster: cluster_pb2.Cluster = compile_all(resources)[f"client.{NS}"].resources[
        CLUSTER_TYPE
    ][f"outbound|8080||api.{NS}"]
    return cluster


def base(mode: str | None, *api_workloads: Resource) -> list[Resource]:
    return [
        mesh(mode),
        service("client"),
        service("api"),
        workload("client", "client"),
        *api_workloads,
    ]


def test_sni_and_san_matchers_name_the_service_and_every_identity_of_it() -> None:
    cluster = api_cluster(
        base(
            "STRICT",
            workload("api-2", "api", serviceAccount="api-canary"),
            workload("api-1", "api"),
            workload("api-3", "api"),  # same account as api-1: listed once
        )
    )
    context = upstream_context(cluster)
    assert context is not None
    assert context.sni == f"outbound_.8080_._.api.{NS}.svc.cluster.local"
    common = context.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == [CERTIFICATE_SECRET]
    assert common.tls_certificate_sds_secret_configs[0].sds_config.HasField("ads")
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == BUNDLE_SECRET
    sans = combined.default_validation_context.match_typed_subject_alt_names
    assert [(m.san_type, m.matcher.exact) for m in sans] == [
        (3, f"spiffe://example.org/ns/{NS}/sa/api"),  # URI = 3, default account: service name
        (3, f"spiffe://example.org/ns/{NS}/sa/api-canary"),
    ]


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
def test_a_service_of_sidecar_workloads_is_called_over_mtls(mode: str) -> None:
    assert upstream_context(api_cluster(base(mode, workload("api-1", "api")))) is not None


@pytest.mark.parametrize(
    ("why", "api_workloads"),
    [
        ("one workload has no sidecar", [workload("api-1", "api"),
                                         workload("api-2", "api", sidecar=False)]),
        ("no workload at all", []),
    ],
)
def test_a_service_that_cannot_all_speak_mtls_is_called_in_plaintext(
    why: str, api_workloads: list[Resource]
) -> None:
    assert upstream_context(api_cluster(base("STRICT", *api_workloads))) is None, why


def test_a_sidecar_not_listening_for_the_port_makes_the_cluster_plaintext() -> None:
    deaf = res(
        "Workload", "api-1",
        {"service": "api", "address": "10.0.0.9", "sidecar": {"outboundPort": 15080}},
    )
    assert upstream_context(api_cluster(base("STRICT", deaf))) is None


def test_the_default_mode_is_strict() -> None:
    """Zero trust by default: a Mesh that says nothing of mTLS compiles exactly as STRICT."""
    def dump(mode: str | None) -> dict[str, Any]:
        compiled = compile_all(base(mode, workload("api-1", "api")))
        return {node: {t: {n: m.SerializeToString(deterministic=True) for n, m in r.items()}
                       for t, r in xds.resources.items()} for node, xds in compiled.items()}

    assert dump(None) == dump("STRICT")
    assert dump(None) != dump("PERMISSIVE")


def test_disable_compiles_no_tls_at_all() -> None:
    compiled = compile_all(base("DISABLE", workload("api-1", "api")))
    for xds in compiled.values():
        for cluster in xds.resources[CLUSTER_TYPE].values():
            assert not cluster.HasField("transport_socket"), cluster.name
        for listener in xds.resources[LISTENER_TYPE].values():
            assert not listener.listener_filters
            assert all(not c.HasField("transport_socket") for c in listener.filter_chains)


def inbound(mode: str, protocol: str = "http") -> listener_pb2.Listener:
    resources = [mesh(mode), service("api", protocol), workload("api-1", "api")]
    listener: listener_pb2.Listener = compile_all(resources)[f"api-1.{NS}"].resources[
        LISTENER_TYPE
    ]["inbound_15001"]
    return listener


def downstream(chain: Any) -> tls_pb2.DownstreamTlsContext:
    context = tls_pb2.DownstreamTlsContext()
    assert chain.transport_socket.typed_config.Unpack(context)
    return context


def hcm_of(chain: Any) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    assert chain.filters[0].typed_config.Unpack(hcm)
    return hcm


@pytest.mark.parametrize("protocol", ["http", "tcp"])
def test_strict_inbound_requires_a_client_certificate(protocol: str) -> None:
    listener = inbound("STRICT", protocol)
    (chain,) = listener.filter_chains
    context = downstream(chain)
    assert context.require_client_certificate.value is True
    common = context.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == [CERTIFICATE_SECRET]
    assert common.validation_context_sds_secret_config.name == BUNDLE_SECRET
    assert not listener.listener_filters
    if protocol == "http":
        hcm = hcm_of(chain)
        assert hcm.forward_client_cert_details == hcm.SANITIZE_SET
        assert hcm.set_current_client_cert_details.uri is True


def test_permissive_inbound_has_a_tls_chain_and_a_plaintext_chain() -> None:
    listener = inbound("PERMISSIVE")
    tls_chain, plain_chain = listener.filter_chains
    assert tls_chain.filter_chain_match.transport_protocol == "tls"
    assert downstream(tls_chain).require_client_certificate.value is True
    assert plain_chain.filter_chain_match.transport_protocol == "raw_buffer"
    assert not plain_chain.HasField("transport_socket")
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.tls_inspector"]
    # a plaintext caller's own x-forwarded-client-cert is dropped too
    sanitize_set = hcm_pb2.HttpConnectionManager.SANITIZE_SET
    for chain in (tls_chain, plain_chain):
        assert hcm_of(chain).forward_client_cert_details == sanitize_set


def test_an_unknown_mode_is_refused_by_the_compiler_and_the_validator() -> None:
    with pytest.raises(CompileError, match=r"spec\.mtls\.mode is 'SOMETIMES'.*STRICT"):
        compile_all([mesh("SOMETIMES"), service("api"), workload("api-1", "api")])
    text = "apiVersion: ubimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\n" \
           "spec: {mtls: {mode: SOMETIMES}}\n"
    with pytest.raises(ResourceErrors, match=r"mtls\.mode"):
        validate_set(parse_documents(text, "mesh.yaml"))


def test_the_validator_fills_in_the_compilers_default_mode() -> None:
    text = "apiVersion: ubimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {}\n"
    (validated,) = parse_documents(text, "mesh.yaml")
    validate_set([validated])
    assert validated.spec["mtls"]["mode"] == "STRICT"
