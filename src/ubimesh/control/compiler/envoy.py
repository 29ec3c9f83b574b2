"""Small builders of Envoy v3 messages, limited to the fields docs/envoy-compat.md supports
(plus HCM ``rds`` and Cluster ``type: EDS`` through ADS)."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2

from ubimesh.control.compiler.model import Message

HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ROUTER_FILTER = "envoy.filters.http.router"

_LB_POLICIES = {
    "ROUND_ROBIN": cluster_pb2.Cluster.ROUND_ROBIN,
    "LEAST_REQUEST": cluster_pb2.Cluster.LEAST_REQUEST,
    "RANDOM": cluster_pb2.Cluster.RANDOM,
}


def ads_source() -> Message:
    """``{ads: {}, resource_api_version: V3}``: RDS and EDS come over the same ADS stream."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def socket_address(address: str, port: int) -> Message:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=address, port_value=port)
    )


def _packed(message: Message) -> Message:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def http_listener(
    name: str,
    address: str,
    port: int,
    *,
    use_remote_address: bool,
    filters: Sequence[Message] = (),
    normalize_paths: bool = False,
) -> Message:
    """A listener with one HTTP connection manager taking route config ``name`` from RDS;
    ``filters`` (HttpFilter messages) run before the router. ``normalize_paths``: the path is
    normalized before any filter or route sees it (RFC 3986 dot segments, merged slashes,
    escaped slashes unescaped and forwarded, as Istio's DECODE_AND_MERGE_SLASHES)."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=name),
        http_filters=[
            *filters,
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_packed(router_pb2.Router())),
        ],
    )
    hcm.use_remote_address.value = use_remote_address
    hcm.generate_request_id.value = True
    if normalize_paths:
        hcm.normalize_path.value = True
        hcm.merge_slashes = True
        hcm.path_with_escaped_slashes_action = hcm_pb2.HttpConnectionManager.UNESCAPE_AND_FORWARD
    return _listener(name, address, port, HCM_FILTER, hcm)


def tcp_listener(
    name: str, address: str, port: int, clusters: Sequence[tuple[str, int]]
) -> Message:
    """A listener proxying TCP to one cluster, or to several by weight (``(name, weight)``)."""
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=name)
    if len(clusters) == 1:
        proxy.cluster = clusters[0][0]
    else:
        proxy.weighted_clusters.clusters.extend(
            tcp_proxy_pb2.TcpProxy.WeightedCluster.ClusterWeight(name=c, weight=w)
            for c, w in clusters
        )
    return _listener(name, address, port, TCP_PROXY_FILTER, proxy)


def _listener(name: str, address: str, port: int, filter_name: str, config: Message) -> Message:
    return listener_pb2.Listener(
        name=name,
        address=socket_address(address, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(name=filter_name, typed_config=_packed(config))
                ]
            )
        ],
    )


def lb_policy(name: str) -> int:
    """The Cluster ``lb_policy`` enum value of a mesh lbPolicy name (ROUND_ROBIN if unknown)."""
    return int(_LB_POLICIES.get(name.upper(), cluster_pb2.Cluster.ROUND_ROBIN))


def eds_cluster(name: str, connect_timeout: Message, policy: str) -> Message:
    """A cluster whose endpoints come from EDS (a ClusterLoadAssignment of the same name)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        lb_policy=lb_policy(policy),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
    )
    cluster.connect_timeout.CopyFrom(connect_timeout)
    return cluster


def inline_cluster(
    name: str,
    *,
    dns: bool,
    endpoints: Sequence[tuple[str, int]],
    connect_timeout: Message,
    policy: str,
) -> Message:
    """A STATIC (``dns`` False: IP endpoints) or STRICT_DNS cluster with inline endpoints."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STRICT_DNS if dns else cluster_pb2.Cluster.STATIC,
        lb_policy=lb_policy(policy),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[lb_endpoint(a, p, 1) for a, p in endpoints]
                )
            ],
        ),
    )
    cluster.connect_timeout.CopyFrom(connect_timeout)
    return cluster


def lb_endpoint(address: str, port: int, weight: int) -> Message:
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=socket_address(address, port))
    )
    if weight != 1:  # 1 is the default; leaving it out keeps the common case small
        endpoint.load_balancing_weight.value = weight
    return endpoint


def locality_endpoints(
    locality: tuple[str, str, str], priority: int, endpoints: Sequence[Message]
) -> Message:
    region, zone, sub_zone = locality
    return endpoint_components_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(region=region, zone=zone, sub_zone=sub_zone),
        priority=priority,
        lb_endpoints=endpoints,
    )


def load_assignment(name: str, groups: Sequence[Message]) -> Message:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=groups)
