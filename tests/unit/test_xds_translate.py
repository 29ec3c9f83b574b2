"""The bootstrap translator: supported fields reach the snapshot with Envoy's values and defaults;
everything else is refused with its path."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from ubimesh.proxy.snapshot.types import (
    AccessLogConfig,
    AppendAction,
    DirectResponseAction,
    DiscoveryType,
    DnsLookupFamily,
    ForwardClientCertDetails,
    HashPolicyKind,
    HeaderMatchKind,
    HeadersWithUnderscoresAction,
    HttpConnectionManagerConfig,
    LbPolicy,
    NetworkRbacConfig,
    PathMatchKind,
    PathWithEscapedSlashesAction,
    RedirectAction,
    Route,
    RouteAction,
    RouterConfig,
    Snapshot,
    SocketAddress,
    StringMatchKind,
    TcpProxyConfig,
)
from ubimesh.proxy.xds import (
    ConfigErrors,
    load_bootstrap,
    load_bootstrap_dict,
    translate_bootstrap,
)

CONFIGS = Path(__file__).parent / "configs"

TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"

L0 = "static_resources.listeners[0]"
FC0 = L0 + ".filter_chains[0]"
HCM = FC0 + ".filters[0].typed_config"
RC = HCM + ".route_config"
VH = RC + ".virtual_hosts[0]"
R0 = VH + ".routes[0]"
C0 = "static_resources.clusters[0]"
EP0 = C0 + ".load_assignment.endpoints[0].lb_endpoints[0].endpoint"


def base() -> dict[str, Any]:
    """minimal.yaml as a dict: one HCM listener, one static cluster "backend"."""
    loaded = yaml.safe_load((CONFIGS / "minimal.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def hcm(d: dict[str, Any]) -> dict[str, Any]:
    return d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def vhost(d: dict[str, Any]) -> dict[str, Any]:
    return hcm(d)["route_config"]["virtual_hosts"][0]


def route(d: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return vhost(d)["routes"][i]


def listener(d: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return d["static_resources"]["listeners"][i]


def cluster(d: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return d["static_resources"]["clusters"][i]


def add_cluster(d: dict[str, Any], name: str, address: str = "127.0.0.1") -> dict[str, Any]:
    new = copy.deepcopy(cluster(d))
    new["name"] = name
    new["load_assignment"]["cluster_name"] = name
    new["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]["address"] = address
    d["static_resources"]["clusters"].append(new)
    return new


def errors_of(d: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_dict(d)
    return [(e.path, e.message) for e in info.value.errors]


def one_error(d: dict[str, Any]) -> tuple[str, str]:
    found = errors_of(d)
    assert len(found) == 1, found
    return found[0]


def the_hcm(snapshot: Snapshot, listener_index: int = 0) -> HttpConnectionManagerConfig:
    config = snapshot.listeners[listener_index].filter_chains[0].filters[0]
    assert isinstance(config, HttpConnectionManagerConfig)
    return config


def the_route(snapshot: Snapshot, i: int = 0) -> Route:
    return the_hcm(snapshot).route_config.virtual_hosts[0].routes[i]


def the_action(snapshot: Snapshot, i: int = 0) -> RouteAction:
    action = the_hcm(snapshot).route_config.virtual_hosts[0].routes[i].action
    assert isinstance(action, RouteAction)
    return action


# ---------------------------------------------------------------------------------------------
# The full sample: every supported field reaches the snapshot


@pytest.fixture(scope="module")
def full() -> Snapshot:
    return load_bootstrap(str(CONFIGS / "full.yaml"))


def test_full_node_and_admin(full: Snapshot) -> None:
    assert (full.node.id, full.node.cluster) == ("gateway-1", "edge")
    assert full.admin is not None
    assert full.admin.address == SocketAddress("127.0.0.1", 9901)
    assert full.admin.access_log_path == "/dev/null"


def test_full_listener(full: Snapshot) -> None:
    http, tcp = full.listeners
    assert http.name == "http"
    assert http.address == SocketAddress("0.0.0.0", 8000)
    assert http.per_connection_buffer_limit_bytes == 32768
    assert http.filter_chains[0].name == "main"
    assert not http.needs_tls_inspector
    assert tcp.needs_tls_inspector


def test_full_hcm(full: Snapshot) -> None:
    h = the_hcm(full)
    assert h.codec_type == "HTTP1"
    assert h.stat_prefix == "edge_http"
    assert h.generate_request_id is False
    assert h.preserve_external_request_id is True
    assert h.use_remote_address is True
    assert h.xff_num_trusted_hops == 1
    assert h.skip_xff_append is False
    assert h.server_name == "ubimesh-edge"
    assert h.server_header_transformation == "APPEND_IF_ABSENT"
    assert h.idle_timeout == 120.0
    assert h.max_headers_count == 80
    assert h.headers_with_underscores_action is HeadersWithUnderscoresAction.REJECT_REQUEST
    assert h.max_request_headers_kb == 32
    assert h.request_timeout == 30.0
    assert h.request_headers_timeout == 10.0
    assert h.stream_idle_timeout is None  # 0s disables
    assert h.drain_timeout == 2.0
    assert h.upgrade_types == frozenset({"websocket"})  # "WebSocket" in the config
    assert h.normalize_path is True
    assert h.merge_slashes is True
    assert h.path_with_escaped_slashes_action is PathWithEscapedSlashesAction.UNESCAPE_AND_REDIRECT
    assert h.forward_client_cert_details is ForwardClientCertDetails.APPEND_FORWARD
    rbac, fault, ratelimit, router = h.http_filters
    assert rbac.type_name == "envoy.extensions.filters.http.rbac.v3.RBAC"
    assert fault.type_name == "envoy.extensions.filters.http.fault.v3.HTTPFault"
    assert ratelimit.config.stat_prefix == "edge_rl"
    assert router.name == "envoy.filters.http.router"
    assert router.type_name == "envoy.extensions.filters.http.router.v3.Router"
    assert router.config == RouterConfig(dynamic_stats=False, suppress_envoy_headers=True)


def test_full_route_configuration_headers(full: Snapshot) -> None:
    rc = the_hcm(full).route_config
    assert rc.name == "edge_routes"
    (add,) = rc.headers.request_add
    assert (add.key, add.value) == ("x-edge", "%DOWNSTREAM_REMOTE_ADDRESS%")
    assert add.append_action is AppendAction.OVERWRITE_IF_EXISTS_OR_ADD
    assert add.has_format is True
    assert rc.headers.request_remove == ("x-internal",)
    (served_by,) = rc.headers.response_add
    assert (served_by.key, served_by.has_format) == ("x-served-by", False)
    assert served_by.append_action is AppendAction.APPEND_IF_EXISTS_OR_ADD
    assert rc.headers.response_remove == ("x-powered-by",)
    assert rc.response_headers_to_remove == ("x-powered-by",)


def test_full_virtual_hosts(full: Snapshot) -> None:
    shop, fallback = the_hcm(full).route_config.virtual_hosts
    assert shop.name == "shop"
    assert shop.domains == ("shop.example.com", "*.shop.example.com", "shop.example.*")
    (vhost_add,) = shop.headers.request_add
    # append: false is OVERWRITE_IF_EXISTS_OR_ADD
    assert vhost_add.append_action is AppendAction.OVERWRITE_IF_EXISTS_OR_ADD
    assert vhost_add.keep_empty_value is True
    assert fallback.domains == ("*",)
    assert fallback.routes[0].action == DirectResponseAction(404, None)


def test_full_match_and_weighted_route(full: Snapshot) -> None:
    r = the_hcm(full).route_config.virtual_hosts[0].routes[0]
    assert r.name == "api-split"
    m = r.match
    assert (m.kind, m.value, m.case_sensitive) == (PathMatchKind.PREFIX, "/api/", False)
    canary, debug, tenant = m.headers
    assert (canary.name, canary.kind, canary.value, canary.ignore_case) == (
        "x-canary", HeaderMatchKind.EXACT, "yes", True,
    )
    assert (debug.kind, debug.present) == (HeaderMatchKind.PRESENT, False)
    assert tenant.kind is HeaderMatchKind.REGEX and tenant.invert is True
    assert tenant.regex is not None and tenant.regex.fullmatch("t-42")
    version, trace = m.query_parameters
    assert version.matcher is not None
    assert (version.matcher.kind, version.matcher.value) == (StringMatchKind.PREFIX, "v2")
    assert (trace.matcher, trace.present) == (None, True)

    a = r.action
    assert isinstance(a, RouteAction)
    assert [(w.name, w.weight) for w in a.weighted_clusters] == [("api-v1", 90), ("api-v2", 10)]
    assert a.total_weight == 100
    assert a.weighted_clusters[0].headers.request_add[0].key == "x-version"
    assert a.weighted_clusters[1].headers.response_remove == ("x-v2-debug",)
    assert a.prefix_rewrite == "/"
    assert a.timeout == 3.0
    assert a.idle_timeout == 0.0  # explicitly disabled for this route
    (mirror,) = a.mirror_policies
    assert (mirror.cluster, mirror.numerator, mirror.denominator) == ("api-shadow", 5, 10_000)
    assert [(h.kind, h.name, h.terminal) for h in a.hash_policies] == [
        (HashPolicyKind.HEADER, "x-user", True),
        (HashPolicyKind.COOKIE, "session", False),
        (HashPolicyKind.SOURCE_IP, "", False),
        (HashPolicyKind.QUERY_PARAMETER, "user", False),
    ]


def test_full_regex_rewrite(full: Snapshot) -> None:
    r = the_hcm(full).route_config.virtual_hosts[0].routes[1]
    assert r.match.kind is PathMatchKind.REGEX
    assert r.match.regex is not None and r.match.regex.fullmatch("/items/12")
    a = r.action
    assert isinstance(a, RouteAction)
    assert a.regex_rewrite is not None
    assert a.regex_rewrite.pattern.fullmatch("/items/12")
    assert a.regex_rewrite.substitution == "/v1/items/\\1"  # RE2's syntax, as configured
    assert a.host_rewrite_literal == "items.internal"


def test_full_other_routes(full: Snapshot) -> None:
    routes = the_hcm(full).route_config.virtual_hosts[0].routes
    ws = routes[2]
    assert ws.match.kind is PathMatchKind.PATH_SEPARATED_PREFIX
    assert isinstance(ws.action, RouteAction)
    assert ws.action.auto_host_rewrite is True
    assert ws.action.upgrade_websocket is True
    grpc = routes[3]
    assert grpc.match.grpc is True
    assert isinstance(grpc.action, RouteAction)
    assert grpc.action.cluster_header == "x-target-cluster"
    assert grpc.action.timeout is None  # 0s disables the route timeout
    assert routes[4].action == RedirectAction(
        host="new.example.com", port=8443, path="/new", response_code=308,
        strip_query=True, https_redirect=True,
    )
    assert routes[5].action == RedirectAction(
        scheme="http", prefix_rewrite="/documentation", response_code=302
    )
    health = routes[6]
    assert health.action == DirectResponseAction(200, b"ok\n")
    assert health.headers.response_add[0].append_action is AppendAction.ADD_IF_ABSENT


def test_full_tcp_listener(full: Snapshot) -> None:
    tcp = full.listeners[1]
    sni, alpn = tcp.filter_chains
    assert sni.match.server_names == ("db.example.com", "*.db.example.com")
    assert sni.match.transport_protocol == "tls"
    rbac, proxy = sni.filters
    assert isinstance(rbac, NetworkRbacConfig) and rbac.stat_prefix == "db_rbac"
    assert proxy == TcpProxyConfig(
        stat_prefix="db",
        cluster="db",
        idle_timeout=None,
        max_connect_attempts=3,
        access_log=(AccessLogConfig(name="envoy.access_loggers.stderr", path="/dev/stderr"),),
    )
    assert tcp.rbac_denial_header == "always"
    assert alpn.match.destination_port == 8001
    assert alpn.match.application_protocols == ("h2", "http/1.1")
    (weighted,) = alpn.filters
    assert isinstance(weighted, TcpProxyConfig)
    assert [(w.name, w.weight) for w in weighted.weighted_clusters] == [("db", 1), ("api-v1", 3)]
    assert weighted.total_weight == 4
    assert tcp.default_filter_chain is not None
    assert tcp.default_filter_chain.name == "default"


def test_full_static_cluster(full: Snapshot) -> None:
    c = full.clusters["api-v1"]
    assert c.type is DiscoveryType.STATIC
    assert c.connect_timeout == 0.25
    assert c.lb_policy is LbPolicy.LEAST_REQUEST
    assert c.least_request.choice_count == 3
    assert c.per_connection_buffer_limit_bytes == 65536
    assert c.idle_timeout == 30.0
    assert c.max_requests_per_connection == 100
    assert c.overprovisioning_factor == 200
    eu, us = c.endpoints
    assert (eu.locality.region, eu.locality.zone, eu.locality.sub_zone) == ("eu", "eu-1a", "rack-3")
    assert eu.load_balancing_weight == 3 and eu.priority == 0
    first, second = eu.endpoints
    assert (first.address, first.weight, first.hostname, first.health_status) == (
        SocketAddress("10.0.0.1", 8080), 2, "api-1", 1,
    )
    assert (second.address, second.weight) == (SocketAddress("fd00::2", 8080), 1)
    assert us.priority == 1 and us.load_balancing_weight is None
    assert us.endpoints[0].health_status == 3  # DRAINING


def test_full_dns_clusters(full: Snapshot) -> None:
    v2 = full.clusters["api-v2"]
    assert v2.type is DiscoveryType.STRICT_DNS
    assert v2.lb_policy is LbPolicy.RING_HASH
    assert (v2.ring_hash.minimum_ring_size, v2.ring_hash.maximum_ring_size) == (64, 4096)
    assert v2.dns_refresh_rate == 30.0
    assert v2.dns_lookup_family is DnsLookupFamily.V4_ONLY
    assert v2.max_requests_per_connection == 10
    assert v2.idle_timeout is None
    assert [e.address.host for e in v2.endpoints[0].endpoints] == [
        "api-v2.internal", "api-v2b.internal",
    ]
    shadow = full.clusters["api-shadow"]
    assert shadow.type is DiscoveryType.LOGICAL_DNS
    assert shadow.lb_policy is LbPolicy.RANDOM
    assert shadow.dns_lookup_family is DnsLookupFamily.V4_PREFERRED
    assert full.clusters["db"].connect_timeout == 2.0


def test_full_source_and_version(full: Snapshot) -> None:
    assert full.source["node"]["id"] == "gateway-1"
    assert len(full.version) == 12
    assert full.version == load_bootstrap(str(CONFIGS / "full.yaml")).version


# ---------------------------------------------------------------------------------------------
# Envoy's defaults


def test_hcm_defaults() -> None:
    h = the_hcm(load_bootstrap_dict(base()))
    assert h.codec_type == "AUTO"
    assert h.generate_request_id is True
    assert h.use_remote_address is False
    assert h.server_name == "envoy"
    assert h.server_header_transformation == "OVERWRITE"
    assert h.idle_timeout == 3600.0
    assert h.stream_idle_timeout == 300.0
    assert h.request_timeout is None
    assert h.request_headers_timeout is None
    assert h.drain_timeout == 5.0
    assert h.max_request_headers_kb == 60
    assert h.max_headers_count == 100
    assert h.headers_with_underscores_action is HeadersWithUnderscoresAction.ALLOW
    assert h.path_with_escaped_slashes_action is PathWithEscapedSlashesAction.KEEP_UNCHANGED
    assert h.forward_client_cert_details is ForwardClientCertDetails.SANITIZE
    assert h.upgrade_types == frozenset()
    assert h.normalize_path is False and h.merge_slashes is False
    assert h.http_filters[0].config == RouterConfig(dynamic_stats=True)


def test_hcm_idle_timeout_zero_disables() -> None:
    d = base()
    hcm(d)["common_http_protocol_options"] = {"idle_timeout": "0s"}
    hcm(d)["request_timeout"] = "0s"
    h = the_hcm(load_bootstrap_dict(d))
    assert h.idle_timeout is None
    assert h.request_timeout is None


def test_route_defaults() -> None:
    snap = load_bootstrap_dict(base())
    r = the_hcm(snap).route_config.virtual_hosts[0].routes[0]
    assert r.name == ""
    assert r.match.case_sensitive is True
    assert r.headers.empty
    a = the_action(snap)
    assert a.cluster == "backend"
    assert a.timeout == 15.0
    assert a.idle_timeout is None
    assert a.prefix_rewrite is None and a.regex_rewrite is None
    assert a.upgrade_websocket is None


def test_route_fractional_timeout() -> None:
    d = base()
    route(d)["route"]["timeout"] = "0.250s"
    route(d)["route"]["idle_timeout"] = "90s"
    a = the_action(load_bootstrap_dict(d))
    assert math.isclose(a.timeout or 0, 0.25)
    assert a.idle_timeout == 90.0


def test_cluster_and_listener_defaults() -> None:
    snap = load_bootstrap_dict(base())
    c = snap.clusters["backend"]
    assert c.type is DiscoveryType.STATIC
    assert c.connect_timeout == 5.0
    assert c.lb_policy is LbPolicy.ROUND_ROBIN
    assert c.idle_timeout == 3600.0
    assert c.max_requests_per_connection is None
    assert c.overprovisioning_factor == 140
    assert c.per_connection_buffer_limit_bytes == 1024 * 1024
    assert c.dns_refresh_rate == 5.0
    assert c.dns_lookup_family is DnsLookupFamily.AUTO
    assert (c.ring_hash.minimum_ring_size, c.least_request.choice_count) == (1024, 2)
    assert c.endpoints[0].endpoints[0].weight == 1
    lst = snap.listeners[0]
    assert lst.per_connection_buffer_limit_bytes == 1024 * 1024
    assert lst.default_filter_chain is None
    assert lst.needs_tls_inspector is False
    assert snap.admin is None
    assert snap.node.id == "" and snap.node.cluster == ""


def test_weighted_cluster_total_weight_may_equal_the_sum() -> None:
    d = base()
    add_cluster(d, "other")
    route(d)["route"] = {"weighted_clusters": {
        "clusters": [{"name": "backend", "weight": 1}, {"name": "other", "weight": 4}],
        "total_weight": 5,
    }}
    assert the_action(load_bootstrap_dict(d)).total_weight == 5


def test_mirror_defaults_to_every_request() -> None:
    d = base()
    route(d)["route"]["request_mirror_policies"] = [{"cluster": "backend"}]
    (mirror,) = the_action(load_bootstrap_dict(d)).mirror_policies
    assert (mirror.numerator, mirror.denominator) == (100, 100)


def test_mirror_fraction_above_denominator_is_capped() -> None:
    d = base()
    route(d)["route"]["request_mirror_policies"] = [{
        "cluster": "backend",
        "runtime_fraction": {"default_value": {"numerator": 150}},
    }]
    (mirror,) = the_action(load_bootstrap_dict(d)).mirror_policies
    assert (mirror.numerator, mirror.denominator) == (100, 100)


def test_hash_policy_source_ip_false_hashes_nothing() -> None:
    d = base()
    route(d)["route"]["hash_policy"] = [{"connection_properties": {"source_ip": False}}]
    assert the_action(load_bootstrap_dict(d)).hash_policies == ()


def test_route_upgrade_can_disable_websocket() -> None:
    d = base()
    hcm(d)["upgrade_configs"] = [{"upgrade_type": "websocket"}]
    route(d)["route"]["upgrade_configs"] = [{"upgrade_type": "WEBSOCKET", "enabled": False}]
    snap = load_bootstrap_dict(d)
    assert the_hcm(snap).upgrade_types == frozenset({"websocket"})
    assert the_action(snap).upgrade_websocket is False


def test_hcm_upgrade_disabled_is_not_enabled() -> None:
    d = base()
    hcm(d)["upgrade_configs"] = [{"upgrade_type": "websocket", "enabled": False}]
    assert the_hcm(load_bootstrap_dict(d)).upgrade_types == frozenset()


def test_header_names_are_lower_cased() -> None:
    d = base()
    route(d)["match"]["headers"] = [{"name": "X-Mixed", "prefix_match": "A"}]
    route(d)["request_headers_to_add"] = [{"header": {"key": "X-Added", "value": "V"}}]
    route(d)["request_headers_to_remove"] = ["X-Gone"]
    route(d)["route"]["hash_policy"] = [{"header": {"header_name": "X-Hash"}}]
    r = the_hcm(load_bootstrap_dict(d)).route_config.virtual_hosts[0].routes[0]
    assert r.match.headers[0].name == "x-mixed"
    assert r.match.headers[0].value == "A"  # values keep their case
    assert r.headers.request_add[0].key == "x-added"
    assert r.headers.request_add[0].value == "V"
    assert r.headers.request_remove == ("x-gone",)
    assert isinstance(r.action, RouteAction)
    assert r.action.hash_policies[0].name == "x-hash"


@pytest.mark.parametrize(
    ("spec", "kind", "value", "present"),
    [
        ({"exact_match": "a"}, HeaderMatchKind.EXACT, "a", True),
        ({"prefix_match": "a"}, HeaderMatchKind.PREFIX, "a", True),
        ({"suffix_match": "a"}, HeaderMatchKind.SUFFIX, "a", True),
        ({"contains_match": "a"}, HeaderMatchKind.CONTAINS, "a", True),
        ({"present_match": True}, HeaderMatchKind.PRESENT, "", True),
        ({"present_match": False}, HeaderMatchKind.PRESENT, "", False),
        ({}, HeaderMatchKind.ANY, "", True),
        ({"string_match": {"suffix": ".js"}}, HeaderMatchKind.SUFFIX, ".js", True),
        ({"string_match": {"contains": "x"}}, HeaderMatchKind.CONTAINS, "x", True),
        ({"string_match": {"safe_regex": {"regex": "a+"}}}, HeaderMatchKind.REGEX, "a+", True),
    ],
)
def test_header_matcher_kinds(
    spec: dict[str, Any], kind: HeaderMatchKind, value: str, present: bool
) -> None:
    d = base()
    route(d)["match"]["headers"] = [{"name": "x", "treat_missing_header_as_empty": True, **spec}]
    (matcher,) = the_route(load_bootstrap_dict(d)).match.headers
    assert (matcher.kind, matcher.value, matcher.present) == (kind, value, present)
    assert matcher.treat_missing_as_empty is True
    assert (matcher.regex is not None) == (kind is HeaderMatchKind.REGEX)


def test_query_parameter_present_match_false_still_requires_presence() -> None:
    # Envoy ignores present_match's value: false also means "present" (config_utility.cc).
    d = base()
    route(d)["match"]["query_parameters"] = [{"name": "a", "present_match": False}, {"name": "b"}]
    a, b = the_route(load_bootstrap_dict(d)).match.query_parameters
    assert (a.matcher, a.present) == (None, True)
    assert (b.matcher, b.present) == (None, True)


def test_regex_classes_have_re2_ascii_meaning() -> None:
    d = base()
    route(d)["match"] = {"safe_regex": {"regex": "/v\\d+/\\w+"}}
    regex = the_route(load_bootstrap_dict(d)).match.regex
    assert regex is not None
    assert regex.fullmatch("/v12/abc_9")
    assert not regex.fullmatch("/v\u0663/abc")  # ARABIC-INDIC DIGIT THREE is not RE2's \d
    assert not regex.fullmatch("/v1/\u00e9t\u00e9")  # nor are accented letters \w


def test_one_error_per_problem() -> None:
    d = base()
    hcm(d)["http_filters"][0]["name"] = ""
    assert errors_of(d) == [(HCM + ".http_filters[0].name", "must not be empty")]


def test_case_insensitive_path_match_is_lower_cased() -> None:
    d = base()
    route(d)["match"] = {"path": "/Foo/BAR", "case_sensitive": False}
    m = the_hcm(load_bootstrap_dict(d)).route_config.virtual_hosts[0].routes[0].match
    assert (m.kind, m.value, m.case_sensitive) == (PathMatchKind.PATH, "/foo/bar", False)


def test_domains_are_lower_cased() -> None:
    d = base()
    vhost(d)["domains"] = ["Example.COM", "*.Example.org"]
    vh = the_hcm(load_bootstrap_dict(d)).route_config.virtual_hosts[0]
    assert vh.domains == ("example.com", "*.example.org")


def test_server_names_are_lower_cased_and_need_tls_inspector() -> None:
    d = base()
    listener(d)["filter_chains"][0]["filter_chain_match"] = {"server_names": ["API.Example.com"]}
    lst = load_bootstrap_dict(d).listeners[0]
    assert lst.filter_chains[0].match.server_names == ("api.example.com",)
    assert lst.needs_tls_inspector is True


def test_listener_without_name_is_named_after_its_address() -> None:
    d = base()
    del listener(d)["name"]
    assert load_bootstrap_dict(d).listeners[0].name == "127.0.0.1:10000"


def test_direct_response_inline_bytes_and_file(tmp_path: Path) -> None:
    body = tmp_path / "body.html"
    body.write_bytes(b"<h1>hi</h1>")
    d = base()
    route(d).pop("route")
    route(d)["direct_response"] = {"status": 503, "body": {"filename": str(body)}}
    second = copy.deepcopy(route(d))
    second["direct_response"] = {"status": 200, "body": {"inline_bytes": "AAEC"}}  # base64
    vhost(d)["routes"].append(second)
    routes = the_hcm(load_bootstrap_dict(d)).route_config.virtual_hosts[0].routes
    assert routes[0].action == DirectResponseAction(503, b"<h1>hi</h1>")
    assert routes[1].action == DirectResponseAction(200, b"\x00\x01\x02")


def test_service_node_and_cluster_override_the_bootstrap() -> None:
    d = base()
    d["node"] = {"id": "from-file", "cluster": "file-cluster"}
    snap = load_bootstrap_dict(d, service_node="from-cli")
    assert (snap.node.id, snap.node.cluster) == ("from-cli", "file-cluster")
    snap = load_bootstrap_dict(d, service_cluster="cli-cluster")
    assert (snap.node.id, snap.node.cluster) == ("from-file", "cli-cluster")


def test_version_follows_content_not_spelling() -> None:
    d = base()
    camel = copy.deepcopy(d)
    hcm(camel)["statPrefix"] = hcm(camel).pop("stat_prefix")
    assert load_bootstrap_dict(d).version == load_bootstrap_dict(camel).version
    changed = copy.deepcopy(d)
    hcm(changed)["stat_prefix"] = "other"
    assert load_bootstrap_dict(d).version != load_bootstrap_dict(changed).version


def test_source_is_the_raw_dict() -> None:
    d = base()
    snap = load_bootstrap_dict(d)
    assert snap.source == d


def test_json_file_with_camel_case() -> None:
    snap = load_bootstrap(str(CONFIGS / "minimal.json"))
    assert snap.node.id == "json-node"
    (tcp,) = snap.listeners[0].filter_chains[0].filters
    assert tcp == TcpProxyConfig(stat_prefix="tcp", cluster="backend", idle_timeout=30.0)
    c = snap.clusters["backend"]
    assert c.connect_timeout == 1.5
    assert c.endpoints[0].endpoints[0].address == SocketAddress("::1", 9000)


def test_listeners_on_port_zero_may_share_an_address() -> None:
    d = base()
    listener(d)["address"]["socket_address"]["port_value"] = 0
    second = copy.deepcopy(listener(d))
    second["name"] = "second"
    d["static_resources"]["listeners"].append(second)
    assert len(load_bootstrap_dict(d).listeners) == 2


def test_validate_clusters_false_allows_unknown_clusters() -> None:
    d = base()
    hcm(d)["route_config"]["validate_clusters"] = False
    route(d)["route"]["cluster"] = "not-yet"
    assert the_action(load_bootstrap_dict(d)).cluster == "not-yet"


def test_upstream_http_protocol_options_legacy_field() -> None:
    d = base()
    cluster(d)["common_http_protocol_options"] = {"idle_timeout": "7s",
                                                  "max_requests_per_connection": 0}
    c = load_bootstrap_dict(d).clusters["backend"]
    assert c.idle_timeout == 7.0
    assert c.max_requests_per_connection is None  # 0 is "no limit"


# ---------------------------------------------------------------------------------------------
# Refused: valid Envoy configuration that ubimesh does not implement


def _set(target: str, **values: Any) -> Any:
    """A mutation that updates the dict that ``target`` picks from the config."""
    pickers = {
        "root": lambda d: d,
        "listener": listener,
        "chain": lambda d: listener(d)["filter_chains"][0],
        "hcm": hcm,
        "rc": lambda d: hcm(d)["route_config"],
        "vhost": vhost,
        "route": route,
        "match": lambda d: route(d)["match"],
        "action": lambda d: route(d)["route"],
        "router": lambda d: hcm(d)["http_filters"][0]["typed_config"],
        "cluster": cluster,
        "endpoint": lambda d: cluster(d)["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
            "endpoint"
        ],
    }

    def mutate(d: dict[str, Any]) -> None:
        pickers[target](d).update(copy.deepcopy(values))

    return mutate


REFUSED = [
    ("dynamic_resources", _set("root", dynamic_resources={"lds_config": {"ads": {}}}), "ADS"),
    ("layered_runtime",
     _set("root", layered_runtime={"layers": [{"name": "x", "static_layer": {}}]}), "runtime"),
    ("node.metadata", _set("root", node={"id": "a", "metadata": {"k": "v"}}), "metadata"),
    ("admin.profile_path", _set("root", admin={"profile_path": "/tmp/p"}), ""),
    (L0 + ".listener_filters[0].typed_config", _set("listener", listener_filters=[{
        "name": "envoy.filters.listener.http_inspector",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener"
                         ".http_inspector.v3.HttpInspector"}}]), "http_inspector"),
    (L0 + ".socket_options", _set("listener", socket_options=[{"level": 1, "name": 2}]), ""),
    (L0 + ".address.socket_address.protocol",
     _set("listener", address={"socket_address": {"address": "127.0.0.1", "port_value": 1,
                                                  "protocol": "UDP"}}), "TCP"),
    (L0 + ".address.pipe", _set("listener", address={"pipe": {"path": "/tmp/s"}}), "Unix"),
    (FC0 + ".transport_socket", _set("chain", transport_socket={
        "name": "envoy.transport_sockets.raw_buffer",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets"
                         ".raw_buffer.v3.RawBuffer"}}), "TLS"),
    (FC0 + ".filter_chain_match.source_ports", _set("chain", filter_chain_match={
        "source_ports": [1234]}), "source port"),
    (HCM + ".rds", lambda d: (hcm(d).pop("route_config"), hcm(d).update(rds={
        "route_config_name": "r", "config_source": {"ads": {}}})), "RDS"),
    (HCM + ".codec_type", _set("hcm", codec_type="HTTP2"), "HTTP2"),
    (HCM + ".codec_type", _set("hcm", codec_type="HTTP3"), "HTTP3"),
    (HCM + ".access_log[0].filter.runtime_filter", _set("hcm", access_log=[{"name": "x",
        "filter": {"runtime_filter": {"runtime_key": "k"}}, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": "/dev/stdout"}}]), "access log filter"),
    (HCM + ".tracing.spawn_upstream_span", _set("hcm", tracing={"spawn_upstream_span": True}),
     "upstream spans"),
    (HCM + ".http_protocol_options.accept_http_10",
     _set("hcm", http_protocol_options={"accept_http_10": True}), "HTTP/1"),
    (HCM + ".common_http_protocol_options.max_stream_duration",
     _set("hcm", common_http_protocol_options={"max_stream_duration": "1s"}), ""),
    (HCM + ".upgrade_configs[0].upgrade_type", _set("hcm", upgrade_configs=[
        {"upgrade_type": "CONNECT"}]), "websocket"),
    (HCM + ".http_filters[0].typed_config.start_child_span", _set("router", start_child_span=True),
     "child spans"),
    (HCM + ".http_filters[0].typed_config.respect_expected_rq_timeout",
     _set("router", respect_expected_rq_timeout=True), ""),
    (RC + ".vhds", _set("rc", vhds={"config_source": {"ads": {}}}), "VHDS"),
    (VH + ".require_tls", _set("vhost", require_tls="ALL"), "TLS"),
    (VH + ".hedge_policy", _set("vhost", hedge_policy={"initial_requests": 2}), "hedging"),
    (R0 + ".route.hedge_policy", _set("action", hedge_policy={"initial_requests": 2}), "hedging"),
    (R0 + ".route.max_stream_duration", _set("action", max_stream_duration={}), ""),
    (R0 + ".route.cluster_specifier_plugin", lambda d: route(d).update(route={
        "cluster_specifier_plugin": "plugin"}), ""),
    (R0 + '.typed_per_filter_config["envoy.filters.http.router"]', _set(
        "route", typed_per_filter_config={
            "envoy.filters.http.router": {"@type": "type.googleapis.com/google.protobuf.Empty"}}),
     "per-route"),
    (R0 + ".tracing.operation", _set("route", tracing={"operation": "x"}), "formatters"),
    (R0 + ".match.runtime_fraction", _set("match", runtime_fraction={
        "default_value": {"numerator": 1}}), "runtime"),
    (R0 + ".match.headers[0].range_match", _set("match", headers=[{
        "name": "x", "range_match": {"start": 1, "end": 2}}]), "range"),
    (R0 + ".match.headers[0].string_match.custom", _set("match", headers=[{
        "name": "x", "string_match": {"custom": {"name": "c", "typed_config": {
            "@type": "type.googleapis.com/google.protobuf.Empty"}}}}]), "custom"),
    (R0 + ".route.request_mirror_policies[0].runtime_fraction.runtime_key",
     _set("action", request_mirror_policies=[{"cluster": "backend", "runtime_fraction": {
         "default_value": {"numerator": 1}, "runtime_key": "k"}}]), "runtime"),
    (R0 + ".route.hash_policy[0].cookie.ttl", _set("action", hash_policy=[{
        "cookie": {"name": "c", "ttl": "10s"}}]), "cookie"),
    (R0 + ".route.hash_policy[0].filter_state", _set("action", hash_policy=[{
        "filter_state": {"key": "k"}}]), ""),
    (R0 + ".route.upgrade_configs[0].upgrade_type", _set("action", upgrade_configs=[{
        "upgrade_type": "h2c"}]), "websocket"),
    (R0 + ".route.host_rewrite_path_regex", _set("action", host_rewrite_path_regex={
        "pattern": {"regex": "x"}, "substitution": "y"}), ""),
    (R0 + ".direct_response.body.environment_variable", lambda d: route(d).update(
        {"direct_response": {"status": 200, "body": {"environment_variable": "HOME"}}},
        route=None), ""),
    (C0 + ".type", _set("cluster", type="EDS", eds_cluster_config={"eds_config": {"ads": {}}}),
     "EDS"),
    (C0 + ".eds_cluster_config", _set("cluster", type="EDS", eds_cluster_config={
        "eds_config": {"ads": {}}}), "EDS"),
    (C0 + ".type", _set("cluster", type="ORIGINAL_DST", lb_policy="CLUSTER_PROVIDED"),
     "ORIGINAL_DST"),
    (C0 + ".lb_policy", _set("cluster", lb_policy="MAGLEV"), "MAGLEV"),
    (C0 + ".circuit_breakers.per_host_thresholds",
     _set("cluster", circuit_breakers={"per_host_thresholds": [{}]}), "per-host"),
    (C0 + ".circuit_breakers.thresholds[0].max_connection_pools",
     _set("cluster", circuit_breakers={"thresholds": [{"max_connection_pools": 2}]}),
     "pool"),
    (C0 + ".health_checks[0].grpc_health_check", _set("cluster", health_checks=[{
        "timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1,
        "grpc_health_check": {}}]), "gRPC"),
    (C0 + ".health_checks[0].http_health_check.service_name_matcher", _set(
        "cluster", health_checks=[{
            "timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1,
            "http_health_check": {"path": "/", "service_name_matcher": {"exact": "x"}}}]),
     "healthchecked"),
    (C0 + ".outlier_detection.monitors", _set("cluster", outlier_detection={
        "monitors": [{"name": "m"}]}), "extensions"),
    (C0 + ".common_lb_config.zone_aware_lb_config", _set("cluster", common_lb_config={
        "zone_aware_lb_config": {}}), "zone"),
    (C0 + ".transport_socket", _set("cluster", transport_socket={
        "name": "envoy.transport_sockets.raw_buffer",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets"
                         ".raw_buffer.v3.RawBuffer"}}), "TLS"),
    (C0 + ".http2_protocol_options", _set("cluster", http2_protocol_options={}), "HTTP/2"),
    (C0 + ".ring_hash_lb_config.hash_function", _set("cluster", lb_policy="RING_HASH",
                                                     ring_hash_lb_config={
                                                         "hash_function": "MURMUR_HASH_2"}),
     "XX_HASH"),
    (C0 + '.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3'
     '.HttpProtocolOptions"].explicit_http_config.http2_protocol_options',
     _set("cluster", typed_extension_protocol_options={
         "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
             "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
             "explicit_http_config": {"http2_protocol_options": {}}}}), "HTTP/2"),
    (EP0 + ".health_check_config", _set("endpoint", health_check_config={"port_value": 1}),
     "health"),
]


@pytest.mark.parametrize(("path", "mutate", "detail"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_its_path(path: str, mutate: Any, detail: str) -> None:
    d = base()
    mutate(d)
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_dict(d)
    matching = [e for e in info.value.errors if e.path == path]
    assert matching, [str(e) for e in info.value.errors]
    error = matching[0]
    assert error.unsupported
    assert "not supported by ubimesh" in error.message
    assert "docs/envoy-compat.md" in error.message
    assert detail in error.message
    assert str(error).startswith(path + ": ")


def test_unknown_typed_config_type_is_named() -> None:
    d = base()
    hcm(d)["http_filters"].insert(0, {"name": "cors", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}})
    path, message = one_error(d)
    assert path == HCM + ".http_filters[0].typed_config"
    assert "envoy.extensions.filters.http.cors.v3.Cors" in message
    assert "not supported by ubimesh" in message


def test_typed_config_of_the_wrong_kind_is_named() -> None:
    d = base()
    hcm(d)["http_filters"].insert(0, {"name": "tcp", "typed_config": {
        "@type": TCP_PROXY_TYPE, "stat_prefix": "x", "cluster": "backend"}})
    path, message = one_error(d)
    assert path == HCM + ".http_filters[0].typed_config"
    assert "TcpProxy as an HTTP filter" in message
    assert "envoy.extensions.filters.http.router.v3.Router" in message


# ---------------------------------------------------------------------------------------------
# Invalid: Envoy refuses these too (or could never serve them)


def _dup_listener(d: dict[str, Any]) -> None:
    second = copy.deepcopy(listener(d))
    second["address"]["socket_address"]["port_value"] = 10001
    d["static_resources"]["listeners"].append(second)


def _dup_address(d: dict[str, Any]) -> None:
    second = copy.deepcopy(listener(d))
    second["name"] = "other"
    d["static_resources"]["listeners"].append(second)


def _two_vhosts(d: dict[str, Any], *domains: list[str]) -> None:
    first = vhost(d)
    hosts = hcm(d)["route_config"]["virtual_hosts"]
    hosts.clear()
    for i, names in enumerate(domains):
        vh = copy.deepcopy(first)
        vh["name"] = f"vh{i}"
        vh["domains"] = names
        hosts.append(vh)


INVALID = [
    ("static_resources.listeners[1].name", _dup_listener, "duplicate listener name 'ingress'"),
    ("static_resources.listeners[1].address", _dup_address, "duplicate address 127.0.0.1:10000"),
    (L0 + ".address.socket_address.address",
     lambda d: listener(d)["address"]["socket_address"].update(address="localhost"),
     "malformed IP address 'localhost'"),
    (L0 + ".filter_chains", lambda d: listener(d).update(filter_chains=[]),
     "no filter chains specified"),
    (FC0 + ".filters", lambda d: listener(d)["filter_chains"][0].update(filters=[]),
     "terminal network filter"),
    (FC0 + ".filters[0]", lambda d: listener(d)["filter_chains"][0]["filters"].append({
        "name": "tcp", "typed_config": {"@type": TCP_PROXY_TYPE, "stat_prefix": "t",
                                        "cluster": "backend"}}),
     "must be the last filter in a network filter chain"),
    (FC0 + ".filters[0].typed_config",
     lambda d: listener(d)["filter_chains"][0]["filters"][0].pop("typed_config"),
     "is required"),
    (FC0 + ".filter_chain_match.server_names[0]", lambda d: listener(d)["filter_chains"][0].update(
        filter_chain_match={"server_names": ["api*.example.com"]}), "partial wildcards"),
    ("static_resources.listeners[0].filter_chains[1].filter_chain_match",
     lambda d: listener(d)["filter_chains"].extend([
         dict(copy.deepcopy(listener(d)["filter_chains"][0]),
              filter_chain_match={"server_names": ["b.com"]})]) or listener(d)[
         "filter_chains"][0].update(filter_chain_match={"server_names": ["a.com", "b.com"]}),
     "overlapping matching rules: static_resources.listeners[0].filter_chains[0]"),
    ("static_resources.listeners[0].filter_chains[1].filter_chain_match",
     lambda d: listener(d)["filter_chains"].append(copy.deepcopy(listener(d)["filter_chains"][0])),
     "overlapping"),
    (L0 + ".default_filter_chain.filter_chain_match", lambda d: listener(d).update(
        default_filter_chain=dict(copy.deepcopy(listener(d)["filter_chains"][0]),
                                  filter_chain_match={"destination_port": 80})),
     "ignores its filter_chain_match"),
    (FC0 + ".filter_chain_match.destination_port", lambda d: listener(d)["filter_chains"][0].update(
        filter_chain_match={"destination_port": 0}), "at least 1"),
    (L0 + ".listener_filters[0].typed_config.enable_ja3_fingerprinting",
     lambda d: listener(d).update(listener_filters=[{
         "name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters"
                                         ".listener.tls_inspector.v3.TlsInspector",
                                         "enable_ja3_fingerprinting": True}}]),
     "not supported by ubimesh"),
    (HCM + ".stat_prefix", lambda d: hcm(d).update(stat_prefix=""), "must not be empty"),
    (HCM, lambda d: hcm(d).pop("route_config"), "one of route_config is required"),
    (HCM + ".http_filters", lambda d: hcm(d).update(http_filters=[]), "must end with the router"),
    (HCM + ".http_filters[0]", lambda d: hcm(d)["http_filters"].append(
        copy.deepcopy(hcm(d)["http_filters"][0])), "must be the last filter"),
    (HCM + ".http_filters[0].typed_config",
     lambda d: hcm(d)["http_filters"][0].pop("typed_config"), "is required"),
    (HCM + ".max_request_headers_kb", lambda d: hcm(d).update(max_request_headers_kb=9000),
     "at most 8192"),
    (HCM + ".common_http_protocol_options.max_headers_count",
     lambda d: hcm(d).update(common_http_protocol_options={"max_headers_count": 0}), "at least 1"),
    (HCM + ".upgrade_configs[1].upgrade_type", lambda d: hcm(d).update(upgrade_configs=[
        {"upgrade_type": "websocket"}, {"upgrade_type": "WebSocket"}]), "same name"),
    (VH + ".domains[1]", lambda d: vhost(d).update(domains=["a.com", "A.COM"]),
     "duplicate domain 'a.com'"),
    (VH + ".domains[0]", lambda d: vhost(d).update(domains=["a*b.com"]), "invalid domain"),
    (VH + ".domains[0]", lambda d: vhost(d).update(domains=["*a*"]), "invalid domain"),
    (RC + ".virtual_hosts[1].domains[0]", lambda d: _two_vhosts(d, ["*"], ["*"]),
     "only a single wildcard domain"),
    (RC + ".virtual_hosts[1].domains[0]", lambda d: _two_vhosts(d, ["*.a.com"], ["*.A.com"]),
     "duplicate domain '*.a.com'"),
    (VH + ".domains", lambda d: vhost(d).update(domains=[]), "must not be empty"),
    (VH + ".name", lambda d: vhost(d).update(name=""), "must not be empty"),
    (R0 + ".route.cluster", lambda d: route(d)["route"].update(cluster="nope"),
     "route: unknown cluster 'nope'"),
    (R0 + ".route.weighted_clusters.clusters[1].name", lambda d: route(d).update(route={
        "weighted_clusters": {"clusters": [{"name": "backend", "weight": 1},
                                           {"name": "nope", "weight": 1}]}}),
     "weighted cluster: unknown cluster 'nope'"),
    (R0 + ".route.request_mirror_policies[0].cluster", lambda d: route(d)["route"].update(
        request_mirror_policies=[{"cluster": "nope"}]), "mirror: unknown cluster 'nope'"),
    (R0 + ".route.request_mirror_policies[0].cluster", lambda d: route(d)["route"].update(
        request_mirror_policies=[{"runtime_fraction": {"default_value": {"numerator": 1}}}]),
     "is required"),
    (R0 + ".route.request_mirror_policies[0].trace_sampled", lambda d: route(d)["route"].update(
        request_mirror_policies=[{"cluster": "backend", "trace_sampled": True}]), "tracing"),
    (C0 + ".respect_dns_ttl", _set("cluster", respect_dns_ttl=True), "dns_refresh_rate"),
    (R0 + ".route.weighted_clusters.clusters[0].weight", lambda d: route(d).update(route={
        "weighted_clusters": {"clusters": [{"name": "backend"}]}}), "is required"),
    (R0 + ".route.weighted_clusters.clusters", lambda d: route(d).update(route={
        "weighted_clusters": {"clusters": [{"name": "backend", "weight": 0}]}}),
     "greater than 0"),
    (R0 + ".route.weighted_clusters.total_weight", lambda d: route(d).update(route={
        "weighted_clusters": {"clusters": [{"name": "backend", "weight": 3}],
                              "total_weight": 100}}), "set it to 3"),
    (R0 + ".route.weighted_clusters.clusters", lambda d: route(d).update(route={
        "weighted_clusters": {"clusters": []}}), "must not be empty"),
    (R0 + ".route", lambda d: route(d).update(route={"cluster": "backend", "prefix_rewrite": "/",
                                                     "regex_rewrite": {"pattern": {"regex": "a"},
                                                                       "substitution": "b"}}),
     "only one of prefix_rewrite or regex_rewrite"),
    (R0 + ".route.regex_rewrite.substitution", lambda d: route(d)["route"].update(regex_rewrite={
        "pattern": {"regex": "(a)"}, "substitution": "\\2"}), "group"),
    (R0 + ".route.regex_rewrite.substitution", lambda d: route(d)["route"].update(regex_rewrite={
        "pattern": {"regex": "a"}, "substitution": "\\n"}), "invalid escape"),
    (R0 + ".route.cluster_header", lambda d: route(d).update(route={"cluster_header": ""}),
     "must not be empty"),
    (R0 + ".route", lambda d: route(d).update(route={"timeout": "1s"}),
     "one of cluster, cluster_header, weighted_clusters is required"),
    (R0, lambda d: route(d).pop("route"), "one of route, redirect, direct_response is required"),
    (R0 + ".match", lambda d: route(d).update(match={}),
     "one of prefix, path, safe_regex, path_separated_prefix is required"),
    (R0 + ".match", lambda d: route(d).pop("match"), "is required"),
    (R0 + ".match.path_separated_prefix", lambda d: route(d).update(match={
        "path_separated_prefix": "/a/"}), "does not match the pattern"),
    (R0 + ".match.safe_regex.regex", lambda d: route(d).update(match={"safe_regex": {
        "regex": "(unclosed"}}), "invalid regex '(unclosed'"),
    (R0 + ".match.safe_regex.regex", lambda d: route(d).update(match={"safe_regex": {
        "regex": "(a)\\1"}}), "backreferences"),
    (R0 + ".match.safe_regex.regex", lambda d: route(d).update(match={"safe_regex": {
        "regex": "a(?!b)"}}), "lookaround"),
    (R0 + ".match.safe_regex.regex", lambda d: route(d).update(match={"safe_regex": {
        "regex": "/a\\Z"}}), "\\Z (RE2 spells it \\z)"),
    (R0 + ".match.safe_regex.regex", lambda d: route(d).update(match={"safe_regex": {
        "regex": "(?>a)"}}), "atomic groups"),
    (HCM + ".http_filters[0].name", lambda d: hcm(d)["http_filters"][0].update(name=""),
     "must not be empty"),
    (FC0 + ".filters[0].typed_config.cluster", lambda d: listener(d)["filter_chains"][0].update(
        filters=[{"name": "t", "typed_config": {"@type": TCP_PROXY_TYPE, "stat_prefix": "t",
                                                "cluster": ""}}]), "must not be empty"),
    (R0 + ".match.safe_regex.google_re2.max_program_size", lambda d: route(d).update(match={
        "safe_regex": {"regex": "a", "google_re2": {"max_program_size": 100}}}),
     "not supported by ubimesh"),
    (R0 + ".match.case_sensitive", lambda d: route(d).update(match={
        "safe_regex": {"regex": "/a"}, "case_sensitive": False}), "does not apply to safe_regex"),
    (R0 + ".match.headers[0].string_match.ignore_case", lambda d: route(d)["match"].update(
        headers=[{"name": "x", "string_match": {"safe_regex": {"regex": "a"},
                                                "ignore_case": True}}]),
     "ignore_case has no effect for safe_regex"),
    (R0 + ".match.headers[0].name",
     lambda d: route(d)["match"].update(headers=[{"exact_match": "a"}]), "must not be empty"),
    (R0 + ".match.headers[0].prefix_match", lambda d: route(d)["match"].update(
        headers=[{"name": "x", "prefix_match": ""}]), "must not be empty"),
    (R0 + ".match.query_parameters[0].name", lambda d: route(d)["match"].update(
        query_parameters=[{"present_match": True}]), "must not be empty"),
    (R0 + ".request_headers_to_add[0].header.key", lambda d: route(d).update(
        request_headers_to_add=[{"header": {"key": ":authority", "value": "x"}}]),
     ":-prefixed or host headers may not be modified"),
    (R0 + ".response_headers_to_add[0].header.key", lambda d: route(d).update(
        response_headers_to_add=[{"header": {"key": "Host", "value": "x"}}]),
     ":-prefixed or host headers may not be modified"),
    (R0 + ".request_headers_to_remove[0]", lambda d: route(d).update(
        request_headers_to_remove=[":path"]), "may not be removed"),
    (R0 + ".request_headers_to_add[0]", lambda d: route(d).update(request_headers_to_add=[{
        "header": {"key": "x", "value": "y"}, "append": True, "append_action": "ADD_IF_ABSENT"}]),
     "both append and append_action"),
    (R0 + ".request_headers_to_add[0].header.value", lambda d: route(d).update(
        request_headers_to_add=[{"header": {"key": "x", "value": "100%"}}]),
     "no valid %COMMAND% at position 3"),
    (R0 + ".request_headers_to_add[0].header.value", lambda d: route(d).update(
        request_headers_to_add=[{"header": {"key": "x", "value": "a\nb"}}]),
     "is not a valid HTTP header value"),
    (R0 + ".request_headers_to_add[0].header", lambda d: route(d).update(
        request_headers_to_add=[{"append_action": "ADD_IF_ABSENT"}]), "is required"),
    (R0 + ".direct_response.status", lambda d: route(d).update(route=None, direct_response={
        "status": 700}), "at least 200 and less than 600"),
    (R0 + ".direct_response.body", lambda d: route(d).update(route=None, direct_response={
        "status": 200, "body": {"inline_string": "x" * 4097}}),
     "response body size is 4097 bytes; the maximum is 4096"),
    (R0 + ".direct_response.body.filename", lambda d: route(d).update(route=None,
                                                                       direct_response={
        "status": 200, "body": {"filename": "/nonexistent/ubimesh/body"}}), "does not exist"),
    (R0 + ".redirect.response_code", lambda d: route(d).update(route=None, redirect={
        "response_code": 7}), "7 is not a value of RedirectResponseCode"),
    (R0 + ".route.upgrade_configs[1].upgrade_type", lambda d: route(d)["route"].update(
        upgrade_configs=[{"upgrade_type": "websocket"}, {"upgrade_type": "Websocket"}]),
     "duplicate upgrade"),
    (R0 + ".route.hash_policy[0]", lambda d: route(d)["route"].update(hash_policy=[
        {"terminal": True}]), "is required"),
    (R0 + ".route.hash_policy[0].header.header_name", lambda d: route(d)["route"].update(
        hash_policy=[{"header": {}}]), "must not be empty"),
    (FC0 + ".filters[0].typed_config.cluster", lambda d: listener(d)["filter_chains"][0].update(
        filters=[{"name": "t", "typed_config": {"@type": TCP_PROXY_TYPE, "stat_prefix": "t",
                                                "cluster": "nope"}}]),
     "tcp_proxy: unknown cluster 'nope'"),
    (FC0 + ".filters[0].typed_config.max_connect_attempts",
     lambda d: listener(d)["filter_chains"][0].update(filters=[{"name": "t", "typed_config": {
         "@type": TCP_PROXY_TYPE, "stat_prefix": "t", "cluster": "backend",
         "max_connect_attempts": 0}}]), "at least 1"),
    (FC0 + ".filters[0].typed_config.weighted_clusters.clusters[0].weight",
     lambda d: listener(d)["filter_chains"][0].update(filters=[{"name": "t", "typed_config": {
         "@type": TCP_PROXY_TYPE, "stat_prefix": "t",
         "weighted_clusters": {"clusters": [{"name": "backend", "weight": 0}]}}}]),
     "at least 1"),
    ("static_resources.clusters[1].name", lambda d: d["static_resources"]["clusters"].append(
        copy.deepcopy(cluster(d))), "duplicate cluster 'backend'"),
    (C0 + ".name", lambda d: cluster(d).update(name=""), "must not be empty"),
    (C0 + ".connect_timeout", lambda d: cluster(d).update(connect_timeout="0s"),
     "greater than 0s"),
    (C0 + ".dns_refresh_rate", lambda d: cluster(d).update(dns_refresh_rate="0.0005s"),
     "greater than 0.001s"),
    (EP0 + ".address.socket_address.address", lambda d: cluster(d)["load_assignment"][
        "endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"].update(
        address="backend.local"), "STATIC cluster endpoints must be IP addresses"),
    (C0 + ".load_assignment", lambda d: cluster(d).update(type="LOGICAL_DNS") or cluster(d)[
        "load_assignment"]["endpoints"][0]["lb_endpoints"].append(copy.deepcopy(cluster(d)[
            "load_assignment"]["endpoints"][0]["lb_endpoints"][0])),
     "LOGICAL_DNS clusters must have a single"),
    (C0 + ".load_assignment", lambda d: cluster(d).update(type="LOGICAL_DNS") or cluster(d)[
        "load_assignment"].update(endpoints=[]), "LOGICAL_DNS clusters must have a single"),
    (C0 + ".load_assignment.cluster_name", lambda d: cluster(d)["load_assignment"].pop(
        "cluster_name"), "must not be empty"),
    (C0 + ".load_assignment.endpoints[0].priority", lambda d: cluster(d)["load_assignment"][
        "endpoints"][0].update(priority=129), "at most 128"),
    (C0 + ".load_assignment.endpoints[0].lb_endpoints[0].load_balancing_weight",
     lambda d: cluster(d)["load_assignment"]["endpoints"][0]["lb_endpoints"][0].update(
         load_balancing_weight=0), "at least 1"),
    (C0 + ".load_assignment.policy.overprovisioning_factor", lambda d: cluster(d)[
        "load_assignment"].update(policy={"overprovisioning_factor": 0}), "greater than 0"),
    (C0 + ".ring_hash_lb_config", lambda d: cluster(d).update(lb_policy="RING_HASH",
                                                              ring_hash_lb_config={
        "minimum_ring_size": 100, "maximum_ring_size": 10}),
     "minimum_ring_size (100) > maximum_ring_size (10)"),
    (C0 + ".ring_hash_lb_config.maximum_ring_size", lambda d: cluster(d).update(
        lb_policy="RING_HASH", ring_hash_lb_config={"maximum_ring_size": 8388609}),
     "at most 8388608"),
    (C0 + ".ring_hash_lb_config", lambda d: cluster(d).update(ring_hash_lb_config={}),
     "needs lb_policy RING_HASH"),
    (C0 + ".least_request_lb_config", lambda d: cluster(d).update(least_request_lb_config={}),
     "needs lb_policy LEAST_REQUEST"),
    (C0 + ".least_request_lb_config.choice_count", lambda d: cluster(d).update(
        lb_policy="LEAST_REQUEST", least_request_lb_config={"choice_count": 1}), "at least 2"),
    (C0 + ".max_requests_per_connection", lambda d: cluster(d).update(
        max_requests_per_connection=3, common_http_protocol_options={
            "max_requests_per_connection": 4}), "only one of max_requests_per_connection"),
    (C0 + ".common_http_protocol_options", lambda d: cluster(d).update(
        common_http_protocol_options={"idle_timeout": "1s"}, typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                ".HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "common_http_protocol_options": {"idle_timeout": "2s"}}}), "in one place"),
    (C0 + '.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3'
     '.HttpProtocolOptions"]', lambda d: cluster(d).update(typed_extension_protocol_options={
         "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
             "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
             ".HttpProtocolOptions"}}), "one of explicit_http_config is required"),
    ("admin.address", lambda d: d.update(admin={"access_log_path": "/dev/null"}),
     "is required with an admin access log"),
    ("admin.access_log[0].typed_config", lambda d: d.update(admin={
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}},
        "access_log_path": "/dev/null", "access_log": [{"name": "f", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": "/tmp/x"}}]}), "more than one admin access log"),
]


@pytest.mark.parametrize(("path", "mutate", "expected"), INVALID,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(INVALID)])
def test_invalid_config_names_the_field(path: str, mutate: Any, expected: str) -> None:
    d = base()
    mutate(d)
    found = errors_of(d)
    assert any(p == path and expected in m for p, m in found), found


def test_every_error_is_reported_at_once() -> None:
    d = base()
    listener(d)["address"]["socket_address"]["address"] = "localhost"
    hcm(d)["tracing"] = {}
    route(d)["route"]["cluster"] = "nope"
    route(d)["route"]["hedge_policy"] = {"initial_requests": 2}
    vhost(d)["domains"] = ["a", "a"]
    cluster(d)["connect_timeout"] = "0s"
    cluster(d)["circuit_breakers"] = {"per_host_thresholds": [{}]}
    paths = {p for p, _m in errors_of(d)}
    assert paths == {
        L0 + ".address.socket_address.address",
        HCM + ".tracing.provider",
        R0 + ".route.cluster",
        R0 + ".route.hedge_policy",
        VH + ".domains[1]",
        C0 + ".connect_timeout",
        C0 + ".circuit_breakers.per_host_thresholds",
    }


def test_errors_inside_a_refused_field_are_not_repeated() -> None:
    d = base()
    route(d)["route"]["hedge_policy"] = {"initial_requestz": 2}  # misspelt inside a refused field
    assert errors_of(d) == [
        (R0 + ".route.hedge_policy",
         "not supported by ubimesh (request hedging is not implemented yet); remove it, or see "
         "docs/envoy-compat.md for the supported subset"),
    ]


ONE_ERROR = [
    ("missing match", lambda d: route(d).pop("match"), (R0 + ".match", "is required")),
    ("header option without header", lambda d: route(d).update(
        request_headers_to_add=[{"append_action": "ADD_IF_ABSENT"}]),
     (R0 + ".request_headers_to_add[0].header", "is required")),
    ("rewrite without pattern", lambda d: route(d)["route"].update(
        regex_rewrite={"substitution": "x"}), (R0 + ".route.regex_rewrite.pattern", "is required")),
    ("lb endpoint without endpoint", lambda d: cluster(d)["load_assignment"]["endpoints"][0][
        "lb_endpoints"][0].pop("endpoint"),
     (C0 + ".load_assignment.endpoints[0].lb_endpoints[0].endpoint", "is required")),
    ("endpoint without address", lambda d: cluster(d)["load_assignment"]["endpoints"][0][
        "lb_endpoints"][0]["endpoint"].pop("address"), (EP0 + ".address", "is required")),
    ("listener without address", lambda d: listener(d).pop("address"),
     (L0 + ".address", "is required")),
    ("undefined enum number", lambda d: cluster(d).update(dns_lookup_family=9),
     (C0 + ".dns_lookup_family", "9 is not a value of DnsLookupFamily")),
    ("undefined enum number without a proto rule", lambda d: hcm(d).update(
        path_with_escaped_slashes_action=9),
     (HCM + ".path_with_escaped_slashes_action",
      "9 is not a value of PathWithEscapedSlashesAction")),
    ("undefined cluster type", lambda d: cluster(d).update(type=9),
     (C0 + ".type", "9 is not a value of DiscoveryType")),
]


@pytest.mark.parametrize(("case", "mutate", "expected"), ONE_ERROR, ids=[c[0] for c in ONE_ERROR])
def test_one_problem_one_error(case: str, mutate: Any, expected: tuple[str, str]) -> None:
    d = base()
    mutate(d)
    assert errors_of(d) == [expected]


def test_translate_a_proto_built_in_code() -> None:
    bootstrap = json_format.ParseDict(base(), bootstrap_pb2.Bootstrap())
    snap = translate_bootstrap(bootstrap)
    assert snap.source["static_resources"]["clusters"][0]["name"] == "backend"
    assert snap.version == load_bootstrap_dict(base()).version
    bootstrap.static_resources.clusters[0].dns_lookup_family = 9  # open enum: any number fits
    with pytest.raises(ConfigErrors) as info:
        translate_bootstrap(bootstrap)
    assert [(e.path, e.message) for e in info.value.errors] == [
        (C0 + ".dns_lookup_family", "9 is not a value of DnsLookupFamily"),
    ]
