"""A real Envoy (1.40) configured by the ubimesh ADS server, and following a change.

Envoy's bootstrap has nothing but the ADS cluster; listener, route configuration, clusters and
endpoints all come from an XdsSet built by hand and served by :class:`AdsServer`.  The test then
changes the snapshot (the route moves to a new EDS cluster on another upstream and adds a
response header) and checks that Envoy follows within a bounded time, and that the server saw
Envoy ACK every type and NACK none.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2

from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import ManagedProcess, envoy_binary, free_ports, launch_envoy, wait_ready
from ubimesh.control.ads import CDS, EDS, LDS, RDS, AdsServer, SnapshotCache
from ubimesh.control.compiler.model import XdsSet, message_digest, version_of

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary on PATH"),
]

NODE_ID = "edge.default"
FOLLOW_WITHIN = 10.0  # seconds Envoy may take to apply a pushed change


def ads_source() -> Any:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def socket_address(port: int) -> Any:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )


def eds_cluster(name: str) -> Any:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=duration_pb2.Duration(seconds=1),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
    )


def assignment(name: str, port: int) -> Any:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=socket_address(port))
                    )
                ]
            )
        ],
    )


def http_listener(name: str, port: int) -> Any:
    router = any_pb2.Any()
    router.Pack(router_pb2.Router())
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=name),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=router)],
    )
    packed = any_pb2.Any()
    packed.Pack(hcm)
    return listener_pb2.Listener(
        name=name,
        address=socket_address(port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=packed
                    )
                ]
            )
        ],
    )


def route_config(name: str, cluster_name: str, header: tuple[str, str] | None = None) -> Any:
    vhost = route_components_pb2.VirtualHost(
        name="all",
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(cluster=cluster_name),
            )
        ],
    )
    if header is not None:
        vhost.response_headers_to_add.append(
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=header[0], value=header[1]))
        )
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vhost])


def xds_set(clusters: dict[str, int], listener_port: int, route: Any) -> XdsSet:
    resources: dict[str, dict[str, Any]] = {
        CDS: {name: eds_cluster(name) for name in clusters},
        EDS: {name: assignment(name, port) for name, port in clusters.items()},
        LDS: {"ingress": http_listener("ingress", listener_port)},
        RDS: {route.name: route},
    }
    versions = {
        t: version_of({n: message_digest(m) for n, m in named.items()})
        for t, named in resources.items()
    }
    return XdsSet(resources=resources, versions=versions)


def bootstrap(ads_port: int, admin_port: int) -> dict[str, Any]:
    return {
        "node": {"id": NODE_ID, "cluster": "edge"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "ubimesh-xds"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "ubimesh-xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                            ".HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "ubimesh-xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": ads_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }


def get(port: int) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        conn.request("GET", "/hello")
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def wait_for_upstream(
    port: int, upstream: str, header: str | None, within: float
) -> tuple[float, list[object]]:
    """Seconds until a request through Envoy is answered by ``upstream`` (with ``header``), and
    the answers on the way that were not a 200 from some upstream."""
    start = time.monotonic()
    last: object = "no request made"
    failures: list[object] = []
    while time.monotonic() - start < within:
        try:
            status, headers = get(port)
            last = (status, headers)
            if status != 200 or "x-echo-upstream" not in headers:
                failures.append(last)
            elif headers["x-echo-upstream"] == upstream and (header is None or header in headers):
                return time.monotonic() - start, failures
        except OSError as exc:
            last = exc
            failures.append(exc)
        time.sleep(0.01)
    raise AssertionError(f"Envoy did not reach {upstream} within {within} s; last: {last}")


@pytest.fixture
def echo() -> Iterator[EchoServerPool]:
    pool = EchoServerPool()
    try:
        yield pool
    finally:
        pool.close()


def test_envoy_is_configured_over_ads_and_follows_a_change(
    tmp_path: Path, echo: EchoServerPool
) -> None:
    one, two = echo.port("one"), echo.port("two")

    async def body() -> None:
        cache = SnapshotCache()
        server = AdsServer(cache)
        ads_port = await server.start("127.0.0.1", 0)
        envoy: ManagedProcess | None = None
        try:
            admin_port, listener_port = free_ports(2)
            cache.set(
                NODE_ID,
                xds_set(
                    {"backend-one": one}, listener_port, route_config("ingress", "backend-one")
                ),
            )
            config = tmp_path / "envoy.json"
            config.write_text(json.dumps(bootstrap(ads_port, admin_port)))
            envoy = launch_envoy(config, tmp_path, name="envoy-ads")
            # /ready turns 200 once Envoy's initial ADS fetch (CDS, EDS, LDS, RDS) is applied.
            await asyncio.to_thread(wait_ready, envoy, admin_port, [listener_port], 30.0)
            cursor = echo.cursor()
            await asyncio.to_thread(wait_for_upstream, listener_port, "one", None, 5.0)
            assert [r.target for r in echo.records_since(cursor, at_least=1)][:1] == ["/hello"]

            # The route moves to a new cluster on the other upstream and adds a header: Envoy
            # must warm the new cluster (CDS, then EDS) before the route (RDS) uses it.
            cache.set(
                NODE_ID,
                xds_set(
                    {"backend-one": one, "backend-two": two},
                    listener_port,
                    route_config("ingress", "backend-two", ("x-ads-version", "2")),
                ),
            )
            took, failures = await asyncio.to_thread(
                wait_for_upstream, listener_port, "two", "x-ads-version", FOLLOW_WITHIN
            )
            assert took < FOLLOW_WITHIN
            # Make before break: the route moved only once the new cluster was warm, so no
            # request in between failed (a route to a warming cluster answers 503).
            assert failures == []
            # Every request after the switch goes to "two": the change was not half-applied.
            for _ in range(5):
                status, headers = await asyncio.to_thread(get, listener_port)
                assert status == 200 and headers["x-echo-upstream"] == "two"
                assert headers["x-ads-version"] == "2"

            # Envoy ACKed every response (the last ACK may still be on its way; a subscription
            # change that carries the latest nonce counts as an ACK too) and NACKed none; the
            # change re-sent CDS, EDS and RDS, not the unchanged listener.
            def all_acked(stats: dict[str, Any]) -> bool:
                sent, acks = stats["responses_sent"], stats["acks"]
                return all(acks.get(t, 0) >= n for t, n in sent.items())

            stats = server.stats()
            for _ in range(100):
                if all_acked(stats):
                    break
                await asyncio.sleep(0.05)
                stats = server.stats()
            assert stats["nacks"] == {}, stats["recent_nacks"]
            assert all_acked(stats), stats
            assert stats["responses_sent"][LDS] == 1, stats
            assert all(stats["responses_sent"][t] >= 2 for t in (CDS, EDS, RDS)), stats
            assert stats["nodes_connected"] == [NODE_ID]
        finally:
            if envoy is not None:
                envoy.stop()
            await server.stop(0.5)

    asyncio.run(asyncio.wait_for(body(), 90))
