"""Unit tests of the control-plane compiler's rules (the golden files cover whole outputs)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from ubimesh.control.compiler import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    TYPE_URLS,
    CompileError,
    ProxyRef,
    compile_all,
    compile_proxy,
    proxy_ref,
)
from ubimesh.control.compiler.durations import parse_nanos
from ubimesh.control.compiler.gateway import intersect_hostnames
from ubimesh.control.compiler.matchers import prefix_replacement, smi_path_regex
from ubimesh.control.resources.model import Resource


def res(
    kind: str, name: str, spec: dict[str, Any], namespace: str = "default", **meta: Any
) -> Resource:
    return Resource(
        api_version="ubimesh.io/v1alpha1",
        kind=kind,
        name=name,
        namespace="" if kind == "Mesh" else namespace,
        spec=spec,
        annotations=meta.get("annotations", {}),
    )


def http_service(name: str, namespace: str = "default", *ports: int, **extra: Any) -> Resource:
    numbers = ports or (8080,)
    return res(
        "Service",
        name,
        {"ports": [{"name": f"p{p}", "port": p, "protocol": "http"} for p in numbers], **extra},
        namespace,
    )


def client(namespace: str = "default", **sidecar: Any) -> Resource:
    return res(
        "Workload",
        "client-1",
        {
            "service": "client",
            "address": "127.0.0.1",
            "sidecar": {"inboundPorts": {"p80": 15001}, "outboundPort": 15080, **sidecar},
        },
        namespace,
    )


CLIENT = ProxyRef("client-1.default", "sidecar", "client-1", "default")


def outbound_vhosts(resources: list[Resource], proxy: ProxyRef = CLIENT) -> dict[str, Any]:
    xds = compile_proxy(resources, proxy)
    config = xds.resources[ROUTE_TYPE]["outbound_http_15080"]
    return {vh.name: vh for vh in config.virtual_hosts}


# -- ProxyRef -------------------------------------------------------------------------------


def test_proxy_ref_splits_the_node_id_and_defaults_to_sidecar() -> None:
    assert proxy_ref("ledger-1.payments", {}) == ProxyRef(
        "ledger-1.payments", "sidecar", "ledger-1", "payments"
    )
    assert proxy_ref("in.gw.edge", {"ubimesh.role": "gateway"}) == ProxyRef(
        "in.gw.edge", "gateway", "in.gw", "edge"
    )


@pytest.mark.parametrize(
    ("node", "metadata", "needle"),
    [("nodot", {}, "'<name>.<namespace>'"), ("a.b", {"ubimesh.role": "mesh"}, "'mesh'")],
)
def test_proxy_ref_refuses_bad_input(node: str, metadata: dict[str, str], needle: str) -> None:
    with pytest.raises(CompileError, match=re.escape(needle)):
        proxy_ref(node, metadata)


def test_unknown_proxy_gets_every_type_url_and_no_resources() -> None:
    xds = compile_proxy([http_service("api")], CLIENT)
    assert set(xds.resources) == set(TYPE_URLS) == set(xds.versions)
    assert all(not named for named in xds.resources.values())


# -- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nanos"),
    [("1.5s", 1_500_000_000), ("250ms", 250_000_000), ("1m30s", 90_000_000_000), ("0s", 0),
     ("0", 0), ("2h", 7_200_000_000_000), ("10us", 10_000)],
)
def test_durations(text: str, nanos: int) -> None:
    assert parse_nanos(text, "x") == nanos


def test_a_bad_duration_names_the_field_and_value() -> None:
    resources = [http_service("api", requestTimeout="soon"), http_service("client"), client()]
    with pytest.raises(CompileError, match=r"Service default/api: spec.requestTimeout: 'soon'"):
        compile_proxy(resources, CLIENT)


# -- SMI and Gateway API translations -------------------------------------------------------


def test_smi_path_regex_is_anchored_at_the_start_only() -> None:
    pattern = re.compile(smi_path_regex("/api"))
    assert all(pattern.fullmatch(p) for p in ("/api", "/api/x", "/apiary"))
    assert not pattern.fullmatch("/v1/api")
    assert re.compile(smi_path_regex(".*")).fullmatch("/anything")
    alternation = re.compile(smi_path_regex("/a|/b"))
    assert alternation.fullmatch("/b/c") and not alternation.fullmatch("/c/b")


def _rewrite(prefix: str, replacement: str, path: str) -> str:
    """Apply a ReplacePrefixMatch as Envoy would (prefix_rewrite or RE2 GlobalReplace)."""
    replaced = prefix_replacement({"path": {"type": "PathPrefix", "value": prefix}}, replacement)
    assert replaced is not None
    literal, regex_rewrite = replaced
    if regex_rewrite is None:
        stripped = prefix.rstrip("/")
        assert path.startswith(stripped)
        return literal + path[len(stripped):]
    return re.sub(regex_rewrite.pattern.regex, regex_rewrite.substitution, path)


@pytest.mark.parametrize(
    ("prefix", "replacement", "path", "expected"),
    [
        ("/foo", "/bar", "/foo/x", "/bar/x"),
        ("/foo/", "/bar", "/foo", "/bar"),
        ("/foo", "/", "/foo/x", "/x"),
        ("/foo", "/", "/foo", "/"),
        ("/", "/v2", "/abc", "/v2/abc"),
    ],
)
def test_replace_prefix_match_replaces_whole_path_elements(
    prefix: str, replacement: str, path: str, expected: str
) -> None:
    assert _rewrite(prefix, replacement, path) == expected


@pytest.mark.parametrize(
    ("route", "listener", "expected"),
    [
        ((), ("*",), ["*"]),
        (("a.example.com",), ("*",), ["a.example.com"]),
        (("a.example.com", "b.test"), ("*.example.com",), ["a.example.com"]),
        (("*.example.com",), ("a.example.com",), ["a.example.com"]),
        (("*",), ("x.test",), ["x.test"]),
        (("b.test",), ("a.test",), []),
    ],
)
def test_hostname_intersection(
    route: tuple[str, ...], listener: tuple[str, ...], expected: list[str]
) -> None:
    assert intersect_hostnames(route, listener) == expected


# -- outbound domains -----------------------------------------------------------------------


def test_domains_are_unique_across_namespaces_and_ports() -> None:
    resources = [
        http_service("client", "default", 80),
        http_service("api", "default", 8080, 9090),
        http_service("api", "other", 8080),
        res("ExternalService", "api-ext", {"host": "api", "port": 8080, "protocol": "http"}),
        client(),
        # not about policy: every ExternalService reachable
        res("Mesh", "default", {"authorization": {"defaultAction": "ALLOW"}}),
    ]
    vhosts = outbound_vhosts(resources)
    seen: list[str] = [d for vh in vhosts.values() for d in vh.domains]
    assert len(seen) == len(set(seen)), "a domain is offered twice"
    own = vhosts["outbound|8080||api.default"].domains
    assert "api" in own and "api:8080" in own
    # the bare name belongs to the client's namespace; other namespaces need NAME.NS
    assert "api" not in vhosts["outbound|8080||api.other"].domains
    assert "api.other" in vhosts["outbound|8080||api.other"].domains
    # a second port of one service keeps its :port names only
    assert "api:9090" in vhosts["outbound|9090||api.default"].domains
    assert "api.default" not in vhosts["outbound|9090||api.default"].domains
    ext = vhosts["outbound|8080||api-ext.default.external"].domains
    assert "api-ext.default.external" in ext and "api" not in ext


def test_split_with_only_zero_weights_goes_to_the_root() -> None:
    resources = [
        http_service("client", "default", 80),
        http_service("api"),
        http_service("api-v2"),
        res(
            "TrafficSplit",
            "s",
            {"service": "api", "backends": [{"service": "api-v2", "weight": 0}]},
        ),
        client(),
    ]
    route = outbound_vhosts(resources)["outbound|8080||api.default"].routes
    assert len(route) == 1
    assert route[0].route.cluster == "outbound|8080||api.default"


def test_split_matches_naming_a_missing_group_split_nothing() -> None:
    resources = [
        http_service("client", "default", 80),
        http_service("api"),
        http_service("api-v2"),
        res(
            "TrafficSplit",
            "s",
            {
                "service": "api",
                "matches": [{"kind": "HTTPRouteGroup", "name": "absent"}],
                "backends": [{"service": "api-v2", "weight": 1}],
            },
        ),
        client(),
    ]
    routes = outbound_vhosts(resources)["outbound|8080||api.default"].routes
    assert [r.route.cluster for r in routes] == ["outbound|8080||api.default"]


def test_endpoints_follow_sidecars_sites_and_weights() -> None:
    resources = [
        http_service("client", "default", 80),
        http_service("api"),
        client(),
        res("Workload", "a", {"service": "api", "address": "10.0.0.1", "weight": 5,
                              "sidecar": {"inboundPorts": {"p8080": 15006}}}),
        res("Workload", "b", {"service": "api", "address": "10.0.0.2", "site": "far",
                              "ports": {"p8080": 9999}, "locality": {"region": "r1"}}),
    ]
    cla = compile_proxy(resources, CLIENT).resources[ENDPOINT_TYPE]["outbound|8080||api.default"]
    groups = [(g.priority, g.locality.region, g.locality.sub_zone,
               [(e.endpoint.address.socket_address.address,
                 e.endpoint.address.socket_address.port_value,
                 e.load_balancing_weight.value or 1) for e in g.lb_endpoints])
              for g in cla.endpoints]
    assert groups == [
        (0, "", "default", [("10.0.0.1", 15006, 5)]),
        (1, "r1", "", [("10.0.0.2", 9999, 1)]),
    ]


def test_versions_follow_content_only() -> None:
    base = [http_service("client", "default", 80), http_service("api"), client()]
    first = compile_proxy(base, CLIENT)
    again = compile_proxy(list(reversed(base)), CLIENT)
    assert first.versions == again.versions
    changed = compile_proxy(
        [http_service("client", "default", 80), http_service("api", lbPolicy="RANDOM"), client()],
        CLIENT,
    )
    assert changed.versions[CLUSTER_TYPE] != first.versions[CLUSTER_TYPE]
    assert changed.versions[LISTENER_TYPE] == first.versions[LISTENER_TYPE]
    assert changed.versions[ROUTE_TYPE] == first.versions[ROUTE_TYPE]


def test_compile_all_names_sidecars_and_gateways_only() -> None:
    resources = [
        http_service("client", "default", 80),
        http_service("api"),
        client(),
        res("Workload", "api-1", {"service": "api", "address": "10.0.0.1"}),
        res("Gateway", "in", {"listeners": [{"name": "web", "port": 8000, "protocol": "HTTP"}]},
            "edge", annotations={"ubimesh.io/site": "east"}),
    ]
    assert sorted(compile_all(resources)) == ["client-1.default", "in.edge"]


def test_a_gateway_backend_naming_a_split_root_is_split_over_its_backends() -> None:
    """SMI: every client, ingress included, splits traffic for the root service; two
    backendRefs keep their own weights (1:1 here) and each root's split is scaled within."""
    resources = [
        http_service("ledger"),
        http_service("ledger-v1"),
        http_service("ledger-v2"),
        http_service("web"),
        res(
            "TrafficSplit",
            "canary",
            {
                "service": "ledger",
                "backends": [
                    {"service": "ledger-v1", "weight": 90},
                    {"service": "ledger-v2", "weight": 10},
                ],
            },
        ),
        res("Gateway", "edge", {"listeners": [{"name": "web", "port": 8000, "protocol": "HTTP"}]}),
        res(
            "HTTPRoute",
            "r",
            {
                "parentRefs": [{"kind": "Gateway", "name": "edge", "namespace": "default"}],
                "rules": [
                    {
                        "backendRefs": [
                            {"name": "ledger", "port": 8080, "weight": 1},
                            {"name": "web", "port": 8080, "weight": 1},
                        ]
                    }
                ],
            },
        ),
    ]
    xds = compile_proxy(resources, ProxyRef("edge.default", "gateway", "edge", "default"))
    (config,) = xds.resources[ROUTE_TYPE].values()
    (route,) = config.virtual_hosts[0].routes
    weights = {c.name: c.weight.value for c in route.route.weighted_clusters.clusters}
    assert weights == {
        "outbound|8080||ledger-v1.default": 90,
        "outbound|8080||ledger-v2.default": 10,
        "outbound|8080||web.default": 100,
    }
    assert "outbound|8080||ledger-v1.default" in xds.resources[CLUSTER_TYPE]
