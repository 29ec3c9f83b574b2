"""The translator with dynamic resources: ADS settings, RDS, EDS, and what it refuses."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format

from ubimesh.proxy.snapshot.types import DiscoveryType, SocketAddress
from ubimesh.proxy.xds import ConfigErrors, extensions, load_bootstrap_dict
from ubimesh.proxy.xds.ads_client import endpoint_names, read_cache, route_names, write_cache
from ubimesh.proxy.xds.context import Ctx
from ubimesh.proxy.xds.dynamic import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    Resources,
)
from ubimesh.proxy.xds.parse import parse_message
from ubimesh.proxy.xds.translate import translate_bootstrap

H2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
H2_PATH = (
    'static_resources.clusters[0].typed_extension_protocol_options["envoy.extensions.upstreams'
    '.http.v3.HttpProtocolOptions"].explicit_http_config.http2_protocol_options'
)
ADS_SERVICE = "dynamic_resources.ads_config.grpc_services"


def base() -> dict[str, Any]:
    return {
        "node": {"id": "n", "cluster": "c", "metadata": {"ubimesh.role": "sidecar"}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC", "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds", "type": "STRICT_DNS", "connect_timeout": "1s",
            "typed_extension_protocol_options": copy.deepcopy(H2),
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "xds.example", "port_value": 15010}}}}]}]},
        }]},
    }  # fmt: skip


def parsed(d: dict[str, Any]) -> Any:
    bootstrap, errors, _quiet = parse_message(d, extensions.Bootstrap)
    assert errors == []
    return bootstrap


def errors_of(d: dict[str, Any], resources: Resources | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        translate_bootstrap(parsed(d), d, dynamic_resources=resources)
    return [(e.path, e.message) for e in info.value.errors]


def msg(cls: Any, d: dict[str, Any]) -> Any:
    return json_format.ParseDict(d, cls())


def listener(name: str = "main", rds: str = "routes", **hcm_extra: Any) -> Any:
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                 ".v3.HttpConnectionManager",
        "stat_prefix": "in",
        "rds": {"route_config_name": rds,
                "config_source": {"ads": {}, "resource_api_version": "V3"}},
        "http_filters": [{"name": "router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        **hcm_extra,
    }  # fmt: skip
    return msg(listener_pb2.Listener, {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}},
        "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}],
    })  # fmt: skip


def routes(name: str = "routes", cluster: str = "web", **action: Any) -> Any:
    return msg(route_pb2.RouteConfiguration, {
        "name": name,
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": cluster, **action}}]}],
    })  # fmt: skip


def eds_cluster(name: str = "web", service_name: str = "") -> Any:
    config: dict[str, Any] = {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
    if service_name:
        config["service_name"] = service_name
    return msg(cluster_pb2.Cluster, {"name": name, "type": "EDS", "connect_timeout": "1s",
                                     "eds_cluster_config": config})


def assignment(name: str = "web", address: str = "10.0.0.7") -> Any:
    return msg(endpoint_pb2.ClusterLoadAssignment, {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": address, "port_value": 9000}}}}]}],
    })  # fmt: skip


def delivered(**by_type: list[Any]) -> Resources:
    types = {"lds": LISTENER_TYPE, "rds": ROUTE_TYPE, "cds": CLUSTER_TYPE, "eds": ENDPOINT_TYPE}
    out = Resources(versions={types[k]: f"{k}1" for k in by_type})
    for key, msgs in by_type.items():
        t = types[key]
        for m in msgs:
            out.of(t)[m.cluster_name if t == ENDPOINT_TYPE else m.name] = m
    return out


# ---------------------------------------------------------------------------------------------
# The bootstrap


def test_an_ads_bootstrap_alone_gives_its_static_part() -> None:
    snapshot = load_bootstrap_dict(base())
    assert snapshot.listeners == ()
    assert set(snapshot.clusters) == {"xds"}


def test_the_whole_set_translates_into_one_snapshot() -> None:
    resources = delivered(
        lds=[listener()], rds=[routes()], cds=[eds_cluster("web", "web-svc")],
        eds=[assignment("web-svc")],
    )  # fmt: skip
    snapshot = translate_bootstrap(parsed(base()), base(), dynamic_resources=resources)
    assert [lst.name for lst in snapshot.listeners] == ["main"]
    hcm = snapshot.listeners[0].filter_chains[0].filters[0]
    assert hcm.route_config.name == "routes"  # type: ignore[union-attr]
    web = snapshot.clusters["web"]
    assert web.type is DiscoveryType.EDS
    assert web.endpoints[0].endpoints[0].address == SocketAddress("10.0.0.7", 9000)
    # The version follows the delivered versions.
    resources.versions[ROUTE_TYPE] = "rds2"
    again = translate_bootstrap(parsed(base()), base(), dynamic_resources=resources)
    assert again.version != snapshot.version


def test_errors_in_delivered_resources_name_the_resource() -> None:
    resources = delivered(
        lds=[listener()], rds=[routes(hedge_policy={"initial_requests": 2})], cds=[eds_cluster()],
        eds=[assignment(address="web.example")],
    )  # fmt: skip
    found = errors_of(base(), resources)
    paths = [p for p, _ in found]
    assert "rds[routes].virtual_hosts[0].routes[0].route.hedge_policy" in paths
    assert (
        "eds[web].endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address" in paths
    )


def test_missing_rds_and_eds_resources_are_reported() -> None:
    found = errors_of(base(), delivered(lds=[listener()], cds=[eds_cluster()]))
    assert (
        "lds[main].filter_chains[0].filters[0].typed_config.rds.route_config_name",
        "RouteConfiguration 'routes' has not been received over ADS",
    ) in found
    assert (
        "cds[web].eds_cluster_config",
        "ClusterLoadAssignment 'web' has not been received over ADS",
    ) in found


def test_rds_routes_to_unknown_clusters_are_allowed_unless_validated() -> None:
    # validate_clusters defaults to false over RDS, as in Envoy.
    resources = delivered(lds=[listener()], rds=[routes(cluster="nope")])
    translate_bootstrap(parsed(base()), base(), dynamic_resources=resources)
    rc = routes(cluster="nope")
    rc.validate_clusters.value = True
    found = errors_of(base(), delivered(lds=[listener()], rds=[rc]))
    assert found == [
        ("rds[routes].virtual_hosts[0].routes[0].route.cluster", "route: unknown cluster 'nope'")
    ]


def test_a_cds_cluster_may_not_shadow_a_static_one() -> None:
    clash = msg(cluster_pb2.Cluster, {"name": "xds", "connect_timeout": "1s"})
    found = errors_of(base(), delivered(cds=[clash]))
    assert found[0][0] == "cds[xds].name"
    assert "duplicate cluster 'xds'" in found[0][1]


# ---------------------------------------------------------------------------------------------
# ADS settings refused


def _refused(mutate: Any) -> list[tuple[str, str]]:
    d = base()
    mutate(d)
    return errors_of(d)


def test_rest_and_delta_are_refused() -> None:
    for api_type in ("REST", "DELTA_GRPC"):
        found = _refused(
            lambda d, a=api_type: d["dynamic_resources"]["ads_config"].update(api_type=a)
        )
        assert found[0][0] == "dynamic_resources.ads_config.api_type"
        assert f"api_type {api_type}; only GRPC (state-of-the-world ADS)" in found[0][1]


def test_google_grpc_and_several_services_are_refused() -> None:
    found = _refused(lambda d: d["dynamic_resources"]["ads_config"].update(
        grpc_services=[{"google_grpc": {"target_uri": "x:1", "stat_prefix": "x"}}]))
    assert found[0][0] == ADS_SERVICE + "[0].google_grpc"
    assert "use envoy_grpc with cluster_name naming a static cluster" in found[0][1]
    found = _refused(lambda d: d["dynamic_resources"]["ads_config"]["grpc_services"].append(
        {"envoy_grpc": {"cluster_name": "xds"}}))
    assert found[0][0] == ADS_SERVICE + "[1]"
    assert "more than one gRPC service" in found[0][1]


def test_the_ads_cluster_must_exist() -> None:
    found = _refused(lambda d: d["dynamic_resources"]["ads_config"].update(
        grpc_services=[{"envoy_grpc": {"cluster_name": "nope"}}]))
    assert (
        ADS_SERVICE + "[0].envoy_grpc.cluster_name",
        "unknown cluster 'nope': it must be a cluster of static_resources",
    ) in found
    # The old ADS cluster lost its right to HTTP/2 options.
    assert [p for p, _ in found] == [H2_PATH, ADS_SERVICE + "[0].envoy_grpc.cluster_name"]


def test_a_config_source_other_than_ads_is_refused() -> None:
    found = _refused(lambda d: d["dynamic_resources"].update(
        lds_config={"path_config_source": {"path": "/tmp/l.yaml"}}))
    assert found[0][0] == "dynamic_resources.lds_config.path_config_source"
    assert "only ads: {} is supported" in found[0][1]


def test_http2_only_on_a_cluster_used_solely_for_ads() -> None:
    d = base()
    d["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"] = "x"
    d["static_resources"]["clusters"].append(copy.deepcopy(d["static_resources"]["clusters"][0]))
    d["static_resources"]["clusters"][1]["name"] = "x"
    found = errors_of(d)
    assert found[0][0] == H2_PATH
    assert "HTTP/2 upstreams are not implemented yet" in found[0][1]
    # The ADS cluster itself, once traffic is routed to it:
    found = errors_of(base(), delivered(lds=[listener()], rds=[routes(cluster="xds")]))
    assert len(found) == 1 and found[0][0] == H2_PATH
    assert "HTTP/2 upstreams are not implemented yet" in found[0][1]
    assert "rds[routes].virtual_hosts[0].routes[0].route.cluster sends traffic to 'xds'" in (
        found[0][1]
    )


def test_without_ads_rds_eds_and_metadata_are_refused() -> None:
    d = base()
    del d["dynamic_resources"]
    d["static_resources"]["clusters"][0]["typed_extension_protocol_options"] = {}
    d["static_resources"]["clusters"].append(
        json_format.MessageToDict(eds_cluster(), preserving_proto_field_name=True))
    found = dict(errors_of(d))
    assert "node.metadata" in found
    assert "static_resources.clusters[1].type" in found
    assert "ubimesh takes EDS over ADS only" in found["static_resources.clusters[1].type"]


# ---------------------------------------------------------------------------------------------
# What the ADS client derives from resources


def test_subscriptions_follow_the_resources() -> None:
    assert route_names([listener(rds="a"), listener(rds="b")]) == {"a", "b"}
    assert endpoint_names([eds_cluster("web", "svc"), eds_cluster("api")]) == {"svc", "api"}


def test_the_cache_round_trips(tmp_path: Any) -> None:
    resources = delivered(lds=[listener()], rds=[routes()], cds=[eds_cluster()],
                          eds=[assignment()])
    write_cache(tmp_path / "c", resources)
    back = read_cache(tmp_path / "c")
    assert back is not None
    assert back.versions == resources.versions
    assert back.by_type == resources.by_type
    assert read_cache(tmp_path / "none") is None
    (tmp_path / "c" / "ads-cache.json").write_text("{broken")
    assert read_cache(tmp_path / "c") is None


def test_the_ads_tables_of_the_compat_doc_match_the_translator() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "envoy-compat.md").read_text()
    tables: dict[str, set[str]] = {}
    current = None
    for line in doc.splitlines():
        heading = re.match(r"^#### `([\w.]+)`", line)
        if heading:
            current = tables.setdefault(heading.group(1), set())
        elif line.startswith("#"):
            current = None
        row = re.match(r"^\| (.+?) \| yes \|", line)
        if row and current is not None:
            current.update(re.findall(r"`(\w+)`", row.group(1)))
    ctx = Ctx()
    resources = delivered(lds=[listener()], rds=[routes()], cds=[eds_cluster()],
                          eds=[assignment()])
    translate_bootstrap(parsed(base()), base(), dynamic_resources=resources, ctx=ctx)
    assert len(tables) == 7
    for name, fields in tables.items():
        assert ctx.whitelists[name] == fields, name
