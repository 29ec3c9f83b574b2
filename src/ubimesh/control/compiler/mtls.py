"""Mesh mTLS (docs/identity.md section 4): what ``Mesh.spec.mtls.mode`` compiles to.

- ``STRICT``: every sidecar inbound listener terminates mTLS (``require_client_certificate``);
  every cluster to a mesh service (see ``is_mesh_service``) originates mTLS.
- ``PERMISSIVE``: as STRICT, but inbound listeners also accept plaintext: the TLS inspector
  picks one of two filter chains, ``transport_protocol: tls`` (mTLS) or ``raw_buffer``.
- ``DISABLE``: plaintext everywhere (the default until every proxy gets its identity from the
  control plane: a proxy with TLS configuration but no certificate cannot serve).

Certificates never appear in the compiled configuration: the proxy's own certificate is the
SDS secret ``default`` (made by the proxy or its agent) and the trust bundle is the SDS secret
``ROOTCA`` (served by the control plane over ADS), both referenced with ``{ads: {}}``.

A service is a mesh service (its clusters are mTLS) when it has at least one workload and every
workload has a sidecar listening for the port (``sidecar.inboundPorts``): the endpoints of a
workload without one speak plaintext, and one cluster has one transport socket. A service that
mixes both is plaintext; under STRICT its sidecar workloads then refuse those calls, so give
every workload of a service a sidecar.

The client checks the server's identity: the cluster's validation context is ROOTCA combined
with one exact URI SAN matcher per identity of the service's workloads
(``spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>``). The SNI is Istio's
``outbound_.<port>_._.<service>.<namespace>.svc.cluster.local``.

Inbound HTTP connection managers use ``forward_client_cert_details: SANITIZE_SET`` with
``set_current_client_cert_details: {uri: true}``: the application sees the verified caller's
SPIFFE ID in ``x-forwarded-client-cert``, and a caller-supplied one is always dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2

from ubimesh.control.compiler.envoy import ads_source
from ubimesh.control.compiler.index import MTLS_MODES, Index, Service, ServicePort
from ubimesh.control.compiler.model import Message

STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
DISABLE = "DISABLE"
MODES = MTLS_MODES

#: SDS secret names (Istio's): the proxy's own certificate and the trust bundle.
CERTIFICATE_SECRET = "default"
BUNDLE_SECRET = "ROOTCA"
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def outbound_sni(service: Service, port: ServicePort) -> str:
    """The SNI a client sends to ``service`` at ``port`` (Istio's form)."""
    return f"outbound_.{port.port}_._.{service.name}.{service.namespace}.svc.cluster.local"


def is_mesh_service(index: Index, service: Service, port: ServicePort) -> bool:
    """True when every workload of ``service`` (at least one) has a sidecar listening for
    ``port``: then, and only then, its cluster for ``port`` is mTLS (module docstring)."""
    workloads = index.workloads_of.get((service.namespace, service.name), ())
    return bool(workloads) and all(
        w.sidecar is not None and port.name in w.sidecar.inbound_ports for w in workloads
    )


def service_identities(index: Index, service: Service) -> list[str]:
    """The SPIFFE IDs of ``service``'s workloads: sorted, each once."""
    workloads = index.workloads_of.get((service.namespace, service.name), ())
    td = index.mesh.trust_domain
    return sorted({spiffe_id(td, w.namespace, w.service_account) for w in workloads})


def _sds(name: str) -> Message:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_source())


def _common(san_ids: Sequence[str] | None) -> Message:
    """The ``default`` certificate by SDS; ROOTCA by SDS, combined with URI SAN matchers when
    ``san_ids`` is given (the client side)."""
    common = tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[_sds(CERTIFICATE_SECRET)]
    )
    if san_ids is None:
        common.validation_context_sds_secret_config.CopyFrom(_sds(BUNDLE_SECRET))
    else:
        combined = common.combined_validation_context
        combined.validation_context_sds_secret_config.CopyFrom(_sds(BUNDLE_SECRET))
        combined.default_validation_context.match_typed_subject_alt_names.extend(
            common_pb2.SubjectAltNameMatcher(
                san_type=common_pb2.SubjectAltNameMatcher.URI,
                matcher=string_pb2.StringMatcher(exact=identity),
            )
            for identity in san_ids
        )
    return common


def _transport_socket(context: Message) -> Message:
    packed = any_pb2.Any()
    packed.Pack(context)
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=packed)


def downstream_tls() -> Message:
    """The inbound side: the proxy's certificate, a client certificate required and verified
    against ROOTCA. Which identities may call is authorization's job, not the handshake's."""
    context = tls_pb2.DownstreamTlsContext(common_tls_context=_common(None))
    context.require_client_certificate.value = True
    return _transport_socket(context)


def upstream_tls(sni: str, san_ids: Sequence[str]) -> Message:
    """The outbound side: the proxy's certificate, the server verified against ROOTCA and
    required to be one of ``san_ids``."""
    return _transport_socket(
        tls_pb2.UpstreamTlsContext(common_tls_context=_common(san_ids), sni=sni)
    )


def secure_cluster(cluster: Message, index: Index, service: Service, port: ServicePort) -> None:
    """Give ``cluster`` (to ``service`` at ``port``) its mTLS transport socket when the mesh's
    mode asks for it and the service is a mesh service; otherwise leave it plaintext."""
    if index.mesh.mtls_mode == DISABLE or not is_mesh_service(index, service, port):
        return
    cluster.transport_socket.CopyFrom(
        upstream_tls(outbound_sni(service, port), service_identities(index, service))
    )


def secure_inbound(listener: Message, mode: str) -> None:
    """Make a sidecar inbound ``listener`` (one plaintext filter chain, as envoy.py builds it)
    what ``mode`` asks for, in place: its HCM, if any, sets x-forwarded-client-cert
    (SANITIZE_SET, URI); STRICT puts mTLS on the chain; PERMISSIVE adds the TLS inspector and
    an mTLS chain before the plaintext one. DISABLE leaves the listener as it is."""
    if mode == DISABLE:
        return
    (chain,) = listener.filter_chains
    for f in chain.filters:
        if f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
            hcm = hcm_pb2.HttpConnectionManager()
            f.typed_config.Unpack(hcm)
            hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
            hcm.set_current_client_cert_details.uri = True
            f.typed_config.Pack(hcm)
    if mode == STRICT:
        chain.transport_socket.CopyFrom(downstream_tls())
        return
    tls_chain = listener_components_pb2.FilterChain()
    tls_chain.CopyFrom(chain)
    tls_chain.filter_chain_match.transport_protocol = "tls"
    tls_chain.transport_socket.CopyFrom(downstream_tls())
    chain.filter_chain_match.transport_protocol = "raw_buffer"
    del listener.filter_chains[:]
    listener.filter_chains.extend([tls_chain, chain])
    inspector = any_pb2.Any()
    inspector.Pack(tls_inspector_pb2.TlsInspector())
    listener.listener_filters.append(
        listener_components_pb2.ListenerFilter(name=TLS_INSPECTOR, typed_config=inspector)
    )
