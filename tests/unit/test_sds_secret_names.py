"""Which SDS secrets the proxy's ADS child asks the control plane for (``secret_names``)."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import any_pb2

from ubimesh.proxy.xds.ads_client import secret_names
from ubimesh.proxy.xds.dynamic import certificate_secret

COMBINED = tls_pb2.CommonTlsContext.CombinedCertificateValidationContext


def sds(name: str, *, ads: bool = True) -> Any:
    ref = secret_pb2.SdsSecretConfig(name=name)
    if ads:
        ref.sds_config.CopyFrom(
            config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource())
        )
    return ref


def socket(context: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(context)
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=packed)


def test_names_from_listeners_and_clusters_only_those_over_ads() -> None:
    downstream = tls_pb2.DownstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[sds("default"), sds("static-cert", ads=False)],
            validation_context_sds_secret_config=sds("ROOTCA"),
        )
    )
    upstream = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[sds("default")],
            combined_validation_context=COMBINED(
                validation_context_sds_secret_config=sds("OTHER-BUNDLE")
            ),
        )
    )
    listener = listener_pb2.Listener(
        name="in",
        filter_chains=[listener_components_pb2.FilterChain(transport_socket=socket(downstream))],
    )
    plain = listener_pb2.Listener(
        name="plain", filter_chains=[listener_components_pb2.FilterChain()]
    )
    cluster = cluster_pb2.Cluster(name="out", transport_socket=socket(upstream))
    assert secret_names([listener, plain], [cluster]) == {"default", "ROOTCA", "OTHER-BUNDLE"}
    assert secret_names([plain], []) == set()


def test_the_local_certificate_secret_holds_chain_and_key_inline() -> None:
    made = certificate_secret("default", b"CHAIN", b"KEY")
    assert made.name == "default"
    assert made.tls_certificate.certificate_chain.inline_bytes == b"CHAIN"
    assert made.tls_certificate.private_key.inline_bytes == b"KEY"
