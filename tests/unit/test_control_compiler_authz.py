"""The authorization compiler (control/compiler/authz.py; docs/policy.md section 3).

The central test compiles a mesh of TrafficTargets and, for a matrix of requests (source
identity, service port, method, path, headers), compares what the compiled RBAC decides with
SMI's evaluation algorithm (../shared/docs/specs.md section 1.3) written out directly over the
resources. The compiled RBAC is evaluated by ``ubimesh.policy.rbac`` through the proxy's
translator when they exist, and always by ``envoy_rbac`` below, a small evaluator of the RBAC
subset the compiler emits written from Envoy's documented semantics.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from ubimesh.control.compiler import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE, compile_all
from ubimesh.control.compiler.authz import (
    EGRESS_MARK_HEADER,
    EGRESS_POLICY,
    HTTP_RBAC_FILTER,
    NETWORK_RBAC_FILTER,
    inbound_rbac,
)
from ubimesh.control.compiler.matchers import smi_path_regex
from ubimesh.control.resources import ResourceErrors, parse_documents, validate_set
from ubimesh.control.resources.model import Resource

TD = "example.org"


def sa(ns: str, name: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{name}"


def load(text: str) -> list[Resource]:
    resources = parse_documents(text, "test.yaml")
    validate_set(resources)
    return resources


MESH = f"""
apiVersion: ubimesh.io/v1alpha1
kind: Mesh
metadata: {{name: default}}
spec: {{trustDomain: {TD}, mtls: {{mode: MODE}}, authorization: {{defaultAction: ACTION}}}}
"""

SERVICES = """
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  ports:
  - {name: http, port: 8080, protocol: http}
  - {name: admin, port: 9090, protocol: http}
  - {name: db, port: 5432, protocol: tcp}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: api-1, namespace: shop}
spec:
  service: api
  address: 10.0.0.2
  sidecar: {inboundPorts: {http: 15001, admin: 15002, db: 15003}}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 80, protocol: http}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop}
spec:
  service: web
  address: 10.0.0.1
  sidecar: {inboundPorts: {http: 15001}, outboundPort: 15080}
"""


def mesh(extra: str = "", *, mode: str = "STRICT", action: str = "DENY") -> list[Resource]:
    head = MESH.replace("MODE", mode).replace("ACTION", action)
    return load(head + SERVICES + extra)


def doc(kind: str, name: str, spec: str, api: str = "", ns: str = "shop") -> str:
    api = api or {
        "TrafficTarget": "access.smi-spec.io/v1alpha3",
        "HTTPRouteGroup": "specs.smi-spec.io/v1alpha4",
        "TCPRoute": "specs.smi-spec.io/v1alpha4",
        "ExternalService": "ubimesh.io/v1alpha1",
    }[kind]
    return f"---\napiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\n" \
        f"spec: {spec}\n"


def tt(name: str, rules: str, sources: str = "[{kind: ServiceAccount, name: web}]",
       dest: str = "{kind: ServiceAccount, name: api}") -> str:
    spec = f"{{destination: {dest}, rules: {rules}, sources: {sources}}}"
    return doc("TrafficTarget", name, spec)


def inbound(resources: list[Resource]) -> dict[tuple[str, str], Any]:
    """(node, listener) -> the RBAC filter config of every inbound listener that has one."""
    return {(r.node_id, r.listener): r for r in inbound_rbac(resources)}


def listener_filters(resources: list[Resource], node: str, listener: str) -> list[str]:
    msg = compile_all(resources)[node].resources[LISTENER_TYPE][listener]
    names = []
    for chain in msg.filter_chains:
        for f in chain.filters:
            names.append(f.name)
            if f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                names.extend(h.name for h in hcm.http_filters)
    return names


# -- A small RBAC evaluator (Envoy semantics, the subset the compiler emits) ----------------


@dataclass(frozen=True)
class Req:
    principal: str | None  # the caller's URI SAN; None: no client certificate
    port: int  # the service port (which listener)
    method: str = "GET"
    path: str = "/"
    headers: Mapping[str, str] = field(default_factory=dict)


def _string(m: Any, value: str | None) -> bool:
    if value is None:
        return False
    which = m.WhichOneof("match_pattern")
    if which == "exact":
        return bool(value == m.exact)
    if which == "safe_regex":
        return re.fullmatch(m.safe_regex.regex, value) is not None
    raise AssertionError(f"matcher {which} not expected from the compiler")


def _permission(p: Any, req: Req) -> bool:
    which = p.WhichOneof("rule")
    if which == "any":
        return True
    if which == "and_rules":
        return all(_permission(r, req) for r in p.and_rules.rules)
    if which == "or_rules":
        return any(_permission(r, req) for r in p.or_rules.rules)
    if which == "url_path":
        return _string(p.url_path.path, req.path.split("?")[0])
    if which == "header":
        name = p.header.name
        value = req.method if name == ":method" else req.headers.get(name)
        return _string(p.header.string_match, value)
    raise AssertionError(f"permission {which} not expected from the compiler")


def _principal(p: Any, req: Req) -> bool:
    which = p.WhichOneof("identifier")
    if which == "any":
        return True
    if which == "authenticated":
        return _string(p.authenticated.principal_name, req.principal)
    raise AssertionError(f"principal {which} not expected from the compiler")


def envoy_rbac(config: Any, req: Req) -> tuple[bool, str]:
    """(allowed, deciding policy) of an RBAC filter config; Envoy keeps policies by name."""
    rules = config.rules
    for name in sorted(rules.policies):
        policy = rules.policies[name]
        if any(_permission(p, req) for p in policy.permissions) and any(
            _principal(p, req) for p in policy.principals
        ):
            return rules.action == rules.ALLOW, name
    return rules.action != rules.ALLOW, ""


def engine_rbac(config: Any, req: Req, http: bool) -> tuple[bool, str] | None:
    """The proxy's own engine on the same config, when it exists (None otherwise)."""
    try:
        from ubimesh.policy import rbac
        from ubimesh.proxy.xds.rbac import rbac_config_from_proto
    except ImportError:
        return None
    translated = rbac_config_from_proto(config)
    if translated.rules is None:
        return True, ""
    headers = {":method": req.method, ":path": req.path, ":authority": "api", **req.headers}

    def lookup(name: str) -> Sequence[str]:
        value = headers.get(name) if http else None
        return () if value is None else (value,)

    decision = rbac.evaluate(
        translated.rules,
        rbac.RbacInput(
            method=req.method if http else "",
            path=req.path.split("?")[0] if http else "",
            headers=lookup,
            destination_ip="10.0.0.2",
            destination_port=req.port,
            direct_remote_ip="10.0.0.1",
            remote_ip="10.0.0.1",
            principals=(req.principal,) if req.principal else (),
        ),
    )
    return decision.allowed, decision.policy


# -- SMI's algorithm, written out over the resources (specs.md 1.3) -------------------------


def smi_allowed(resources: Sequence[Resource], req: Req, protocol: str) -> bool:
    by = {(r.kind, r.namespace, r.name): r for r in resources}
    for r in resources:
        if r.kind != "TrafficTarget":
            continue
        d = r.spec["destination"]
        if (d["kind"], d["namespace"], d["name"]) != ("ServiceAccount", "shop", "api"):
            continue
        if req.principal not in {sa(s["namespace"], s["name"]) for s in r.spec["sources"]}:
            continue
        rules = r.spec["rules"]
        tcp = [by.get(("TCPRoute", r.namespace, x["name"])) for x in rules
               if x["kind"] == "TCPRoute"]
        http = [x for x in rules if x["kind"] == "HTTPRouteGroup"]

        def port_ok(route: Resource | None) -> bool:
            if route is None:
                return False
            ports = route.spec["matches"].get("ports") or []
            return not ports or req.port in ports

        def http_match(rule: Mapping[str, Any], namespace: str = r.namespace) -> bool:
            group = by.get(("HTTPRouteGroup", namespace, rule["name"]))
            if group is None:
                return False
            for m in group.spec["matches"]:
                if rule.get("matches") and m["name"] not in rule["matches"]:
                    continue
                if m.get("pathRegex") and not re.match(m["pathRegex"], req.path):
                    continue
                methods = m.get("methods") or ["*"]
                if "*" not in methods and req.method not in methods:
                    continue
                if all(
                    req.headers.get(k) is not None and re.fullmatch(v, req.headers[k])
                    for k, v in (m.get("headers") or {}).items()
                ):
                    return True
            return False

        if protocol == "tcp":
            ok = any(port_ok(t) for t in tcp)
        else:
            port_gate = not tcp or any(port_ok(t) for t in tcp)
            route_gate = (not http and bool(tcp)) or any(http_match(x) for x in http)
            ok = port_gate and route_gate
        if ok:
            return True
    return False


POLICY = (
    doc("HTTPRouteGroup", "api-routes", """
  matches:
  - {name: read, pathRegex: "/api/v1/items", methods: [GET, HEAD]}
  - {name: write, pathRegex: "/api/v1/items/[0-9]+", methods: [PUT, DELETE]}
  - {name: admin, pathRegex: "/admin", methods: ["*"]}
  - {name: beta, headers: [{x-beta: "true"}, {user-agent: ".*Mobile.*"}]}
  - {name: anything}""")
    + doc("TCPRoute", "http-port", "{matches: {ports: [8080]}}")
    + doc("TCPRoute", "db-port", "{matches: {ports: [5432]}}")
    + doc("TCPRoute", "every-port", "{matches: {ports: []}}")
    + tt("web-reads", "[{kind: TCPRoute, name: http-port}, "
         "{kind: HTTPRouteGroup, name: api-routes, matches: [read, beta]}]")
    + tt("ops-admin", "[{kind: HTTPRouteGroup, name: api-routes, matches: [admin, write]}]",
         "[{kind: ServiceAccount, name: ops, namespace: infra}]")
    + tt("web-db", "[{kind: TCPRoute, name: db-port}]")
    + tt("batch-all", "[{kind: TCPRoute, name: every-port}]",
         "[{kind: ServiceAccount, name: batch, namespace: jobs}]")
    + tt("audit-any-route", "[{kind: HTTPRouteGroup, name: api-routes, matches: [anything]}, "
         "{kind: TCPRoute, name: db-port}]",
         "[{kind: ServiceAccount, name: audit, namespace: infra}]")
)

CALLERS = [sa("shop", "web"), sa("infra", "ops"), sa("jobs", "batch"), sa("infra", "audit"),
           sa("shop", "stranger"), sa("other", "web"), None]
PORTS = {8080: "http", 9090: "http", 5432: "tcp"}
LISTENER_OF = {8080: "inbound_15001", 9090: "inbound_15002", 5432: "inbound_15003"}
REQUESTS = [
    ("GET", "/api/v1/items", {}),
    ("HEAD", "/api/v1/items/7", {}),
    ("POST", "/api/v1/items", {}),
    ("GET", "/api/v1/itemsXYZ", {}),  # anchored at the start only
    ("get", "/api/v1/items", {}),  # methods are case-sensitive
    ("PUT", "/api/v1/items/42", {}),
    ("PUT", "/api/v1/items/abc", {}),
    ("DELETE", "/admin", {}),
    ("GET", "/administrator/x", {}),
    ("GET", "/x/admin", {}),
    ("POST", "/", {"x-beta": "true", "user-agent": "Foo Mobile Safari"}),
    ("POST", "/", {"x-beta": "true"}),
    ("POST", "/", {"x-beta": "truely", "user-agent": "Mobile"}),
    ("GET", "/api/v1/items?debug=1", {}),
]


def test_compiled_rbac_decides_as_smi_says() -> None:
    resources = mesh(POLICY)
    filters = inbound(resources)
    checked = 0
    for caller, (port, protocol), (method, path, headers) in itertools.product(
        CALLERS, PORTS.items(), REQUESTS
    ):
        req = Req(caller, port, method, path, headers)
        rbac = filters[("api-1.shop", LISTENER_OF[port])]
        assert rbac.filter_name == (HTTP_RBAC_FILTER if protocol == "http" else NETWORK_RBAC_FILTER)
        want = smi_allowed(resources, req, protocol)
        got, policy = envoy_rbac(rbac.config, req)
        assert got == want, (req, policy)
        engine = engine_rbac(rbac.config, req, protocol == "http")
        if engine is not None:
            assert engine == (got, policy), req
        checked += 1
    assert checked == len(CALLERS) * len(PORTS) * len(REQUESTS)


def test_the_matrix_is_not_trivial() -> None:
    """Both answers occur on every listener, so the comparison above can fail."""
    resources = mesh(POLICY)
    for port, protocol in PORTS.items():
        answers = {
            smi_allowed(resources, Req(c, port, m, p, h), protocol)
            for c in CALLERS for m, p, h in REQUESTS
        }
        assert answers == {True, False}, port


def test_policy_names_principals_and_permissions() -> None:
    filters = inbound(mesh(POLICY))
    http = filters[("api-1.shop", "inbound_15001")].config.rules
    # web-reads: rule 0 is the TCPRoute (a port gate, no policy of its own); rule 1 the group
    # audit-any-route's port gate (TCPRoute db-port: 5432) is closed on 8080: no policy
    assert sorted(http.policies) == ["shop/batch-all/0", "shop/ops-admin/0", "shop/web-reads/1"]
    principals = [p.authenticated.principal_name.exact
                  for p in http.policies["shop/web-reads/1"].principals]
    assert principals == [sa("shop", "web")]
    assert http.policies["shop/batch-all/0"].permissions[0].any
    tcp = filters[("api-1.shop", "inbound_15003")].config
    assert tcp.stat_prefix == "inbound_15003"
    assert sorted(tcp.rules.policies) == ["shop/audit-any-route/1", "shop/batch-all/0",
                                          "shop/web-db/0"]
    # on the admin port (9090) web-reads' port gate is closed: no policy from it
    admin = filters[("api-1.shop", "inbound_15002")].config.rules
    assert "shop/web-reads/1" not in admin.policies


def test_sources_are_sorted_and_unique_with_the_mesh_trust_domain() -> None:
    resources = mesh(
        doc("TCPRoute", "all", "{matches: {ports: []}}")
        + tt("many", "[{kind: TCPRoute, name: all}]",
             "[{kind: ServiceAccount, name: z}, {kind: ServiceAccount, name: a, namespace: b},"
             " {kind: ServiceAccount, name: z, namespace: shop}]")
    )
    rules = inbound(resources)[("api-1.shop", "inbound_15003")].config.rules
    ids = [p.authenticated.principal_name.exact for p in rules.policies["shop/many/0"].principals]
    assert ids == [sa("b", "a"), sa("shop", "z")]


def test_path_regex_is_anchored_at_the_start_only() -> None:
    regex = smi_path_regex("/api")
    for path, matches in [("/api", True), ("/apiary", True), ("/api/v1", True),
                          ("/x/api", False), ("api", False)]:
        assert (re.fullmatch(regex, path) is not None) is matches, path
    # alternation stays inside the group: "/a|/b" must not become "/a" OR "/b.*" alone
    alternation = smi_path_regex("/a|/b")
    assert re.fullmatch(alternation, "/a/x") and re.fullmatch(alternation, "/b/x")


def test_default_deny_gives_every_inbound_listener_an_empty_allow_list() -> None:
    resources = mesh()
    filters = inbound(resources)
    for listener in ("inbound_15001", "inbound_15002", "inbound_15003"):
        config = filters[("api-1.shop", listener)].config
        assert config.HasField("rules") and not config.rules.policies
        assert config.rules.action == config.rules.ALLOW
    assert listener_filters(resources, "api-1.shop", "inbound_15001") == [
        "envoy.filters.network.http_connection_manager", HTTP_RBAC_FILTER,
        "envoy.filters.http.router",
    ]
    assert listener_filters(resources, "api-1.shop", "inbound_15003") == [
        NETWORK_RBAC_FILTER, "envoy.filters.network.tcp_proxy",
    ]


def test_allow_by_default_leaves_unnamed_destinations_open() -> None:
    extra = doc("TCPRoute", "all", "{matches: {ports: []}}") + tt(
        "to-web", "[{kind: TCPRoute, name: all}]",
        "[{kind: ServiceAccount, name: api}]", "{kind: ServiceAccount, name: web}")
    filters = inbound(mesh(extra, action="ALLOW"))
    assert ("api-1.shop", "inbound_15001") not in filters  # nobody names api: open
    web = filters[("web-1.shop", "inbound_15001")].config.rules  # named: default-deny
    assert sorted(web.policies) == ["shop/to-web/0"]
    assert listener_filters(mesh(extra, action="ALLOW"), "api-1.shop", "inbound_15001") == [
        "envoy.filters.network.http_connection_manager", "envoy.filters.http.router",
    ]


def test_permissive_puts_rbac_on_both_filter_chains() -> None:
    resources = mesh(mode="PERMISSIVE")
    names = listener_filters(resources, "api-1.shop", "inbound_15003")
    assert names == [NETWORK_RBAC_FILTER, "envoy.filters.network.tcp_proxy"] * 2


def test_mtls_disable_has_no_authorization_and_refuses_traffic_targets() -> None:
    resources = mesh(mode="DISABLE")
    assert inbound(resources) == {}
    config = compile_all(resources)["web-1.shop"].resources[ROUTE_TYPE]["outbound_http_15080"]
    assert "egress_denied" not in [vh.name for vh in config.virtual_hosts]
    with pytest.raises(ResourceErrors) as caught:
        mesh(doc("TCPRoute", "all", "{matches: {ports: []}}")
             + tt("t", "[{kind: TCPRoute, name: all}]"), mode="DISABLE")
    message = str(caught.value)
    assert "TrafficTarget shop/t" in message
    assert "spec.mtls.mode DISABLE" in message
    assert "set Mesh 'default' spec.mtls.mode to STRICT or PERMISSIVE" in message


def test_rules_naming_what_does_not_exist_match_nothing() -> None:
    """Compiled from unvalidated resources (the validator refuses these names): fail closed."""
    text = (MESH.replace("MODE", "STRICT").replace("ACTION", "DENY") + SERVICES
            + doc("HTTPRouteGroup", "g", "{matches: [{name: a}]}")
            + tt("no-group", "[{kind: HTTPRouteGroup, name: missing}]")
            + tt("no-match", "[{kind: HTTPRouteGroup, name: g, matches: [nope]}]")
            + tt("no-tcproute", "[{kind: TCPRoute, name: missing}]")
            + tt("gate-missing", "[{kind: TCPRoute, name: missing}, {kind: HTTPRouteGroup, "
                 "name: g}]"))
    resources = parse_documents(text, "test.yaml")
    with pytest.raises(ResourceErrors):
        validate_set(resources)
    filters = inbound(resources)
    for listener in ("inbound_15001", "inbound_15003"):
        assert not filters[("api-1.shop", listener)].config.rules.policies, listener


def test_methods_and_headers() -> None:
    resources = mesh(
        doc("HTTPRouteGroup", "g", """
  matches:
  - {name: one, methods: [POST]}
  - {name: star, methods: ["*", GET]}
  - {name: hdr, headers: {X-Tenant: "a|b"}}
  - {name: bare}""")
        + tt("m", "[{kind: HTTPRouteGroup, name: g, matches: [one]}]")
        + tt("s", "[{kind: HTTPRouteGroup, name: g, matches: [star]}]")
        + tt("h", "[{kind: HTTPRouteGroup, name: g, matches: [hdr]}]")
        + tt("b", "[{kind: HTTPRouteGroup, name: g, matches: [bare]}]")
    )
    rules = inbound(resources)[("api-1.shop", "inbound_15001")].config.rules
    one = rules.policies["shop/m/0"].permissions[0].header
    assert (one.name, one.string_match.exact) == (":method", "POST")
    assert rules.policies["shop/s/0"].permissions[0].any
    hdr = rules.policies["shop/h/0"].permissions[0].header
    assert (hdr.name, hdr.string_match.safe_regex.regex) == ("x-tenant", "a|b")
    assert rules.policies["shop/b/0"].permissions[0].any  # a match with only a name


def test_http_listeners_with_rbac_normalize_paths() -> None:
    listener = compile_all(mesh())["api-1.shop"].resources[LISTENER_TYPE]["inbound_15001"]
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert hcm.normalize_path.value and hcm.merge_slashes
    assert hcm.path_with_escaped_slashes_action == hcm.UNESCAPE_AND_FORWARD


def test_inbound_rbac_equals_what_compile_all_puts_in_the_listeners() -> None:
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac
    from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac

    resources = mesh(POLICY)
    compiled = compile_all(resources)
    found = 0
    for item in inbound_rbac(resources):
        listener = compiled[item.node_id].resources[LISTENER_TYPE][item.listener]
        chain = listener.filter_chains[0]
        if item.filter_name == NETWORK_RBAC_FILTER:
            got = network_rbac.RBAC()
            chain.filters[0].typed_config.Unpack(got)
        else:
            hcm = hcm_pb2.HttpConnectionManager()
            chain.filters[0].typed_config.Unpack(hcm)
            got = http_rbac.RBAC()
            hcm.http_filters[0].typed_config.Unpack(got)
        assert got == item.config
        found += 1
    assert found == 4  # api's three listeners and web's one


# -- Egress ---------------------------------------------------------------------------------

EXTERNALS = (
    doc("ExternalService", "pay", "{host: pay.example.com, port: 80, protocol: http}")
    + doc("ExternalService", "mail", "{host: mail.example.com, port: 25, protocol: tcp}")
    + doc("ExternalService", "open", "{host: open.example.com, port: 80, protocol: http}")
    + doc("HTTPRouteGroup", "reads", "{matches: [{name: r, pathRegex: /v1/, methods: [GET]}]}")
    + doc("TCPRoute", "all", "{matches: {ports: []}}")
    + doc("TCPRoute", "p25", "{matches: {ports: [25]}}")
    + tt("web-pay", "[{kind: HTTPRouteGroup, name: reads}]",
         dest="{kind: ExternalService, name: pay}")
    + tt("api-mail", "[{kind: TCPRoute, name: p25}]", "[{kind: ServiceAccount, name: api}]",
         dest="{kind: ExternalService, name: mail}")
)


def egress_case(action: str = "DENY", extra: str = "") -> Mapping[str, Mapping[str, Any]]:
    text = SERVICES.replace(
        "sidecar: {inboundPorts: {http: 15001}, outboundPort: 15080}",
        "sidecar: {inboundPorts: {http: 15001}, outboundPort: 15080, upstreams: "
        "[{service: mail, localPort: 15025}, {service: pay, localPort: 15081}]}",
    )
    head = MESH.replace("MODE", "STRICT").replace("ACTION", action)
    return compile_all(load(head + text + EXTERNALS + extra))["web-1.shop"].resources


def test_egress_only_to_what_a_traffic_target_allows() -> None:
    xds = egress_case()
    clusters = set(xds[CLUSTER_TYPE])
    assert "outbound|80||pay.example.com" in clusters
    assert "outbound|25||mail.example.com" not in clusters  # web is not a source of api-mail
    assert "outbound|80||open.example.com" not in clusters  # nobody names it: DENY by default
    vhosts = {vh.name: vh for vh in xds[ROUTE_TYPE]["outbound_http_15080"].virtual_hosts}
    assert "outbound|80||open.shop.external" not in vhosts
    pay = vhosts["outbound|80||pay.shop.external"]
    assert [r.name for r in pay.routes] == ["shop/web-pay/0", EGRESS_POLICY]
    assert pay.routes[0].match.safe_regex.regex == "(?:/v1/).*"
    assert_refuses(pay.routes[-1], 15080)
    catch_all = vhosts["egress_denied"]
    assert list(catch_all.domains) == ["*"]
    (route,) = catch_all.routes
    assert_refuses(route, 15080)
    # the loop: egress_denied|15080 is the outbound listener itself, whose RBAC filter refuses
    # what carries the mark
    loop = xds[CLUSTER_TYPE]["egress_denied|15080"]
    address = loop.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert (address.socket_address.address, address.socket_address.port_value) == (
        "127.0.0.1", 15080)
    rules = http_rbac_rules(xds, "outbound_http_15080")
    assert rules.action == rules.DENY and list(rules.policies) == [EGRESS_POLICY]
    (marked,) = rules.policies[EGRESS_POLICY].permissions
    assert (marked.header.name, marked.header.present_match) == (EGRESS_MARK_HEADER, True)
    # the HTTP upstream listener to pay (allowed, route-gated) refuses the rest the same way
    (upstream_vhost,) = xds[ROUTE_TYPE]["upstream_15081"].virtual_hosts
    assert_refuses(upstream_vhost.routes[-1], 15081)
    assert "egress_denied|15081" in clusters
    # the upstream listener to mail refuses (RBAC deny-all "egress") and leads nowhere
    assert listener_names(xds, "upstream_15025") == [NETWORK_RBAC_FILTER,
                                                     "envoy.filters.network.tcp_proxy"]
    assert "egress_denied" in clusters
    assert not xds[CLUSTER_TYPE]["egress_denied"].load_assignment.endpoints


def assert_refuses(route: Any, port: int) -> None:
    assert route.name == EGRESS_POLICY
    assert route.route.cluster == f"egress_denied|{port}"
    assert [(h.header.key, h.header.value) for h in route.request_headers_to_add] == [
        (EGRESS_MARK_HEADER, "egress")
    ]
    assert [(h.header.key, h.header.value) for h in route.response_headers_to_add] == [
        ("x-ubimesh-denied-by", "egress")
    ]


def http_rbac_rules(xds: Mapping[str, Any], listener: str) -> Any:
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac

    hcm = hcm_pb2.HttpConnectionManager()
    xds[LISTENER_TYPE][listener].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert [f.name for f in hcm.http_filters] == [HTTP_RBAC_FILTER, "envoy.filters.http.router"]
    config = http_rbac.RBAC()
    hcm.http_filters[0].typed_config.Unpack(config)
    return config.rules


def listener_names(xds: Mapping[str, Any], name: str) -> list[str]:
    return [f.name for f in xds[LISTENER_TYPE][name].filter_chains[0].filters]


def test_egress_allow_by_default_opens_unnamed_externals_only() -> None:
    xds = egress_case("ALLOW")
    clusters = set(xds[CLUSTER_TYPE])
    assert "outbound|80||open.example.com" in clusters  # named by nobody: open
    assert "outbound|25||mail.example.com" not in clusters  # named, web not a source


def test_egress_routes_through_a_service_to_a_forbidden_external_are_cut() -> None:
    """A GAMMA HTTPRoute of a mesh service sending to (or mirroring to) an ExternalService
    the caller may not reach does not open a way around egress control."""
    extra = (
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        "metadata: {name: alias, namespace: shop}\n"
        "spec:\n  parentRefs: [{kind: Service, name: api, port: 8080}]\n"
        "  rules:\n"
        "  - matches: [{path: {type: PathPrefix, value: /open}}]\n"
        "    backendRefs: [{kind: ExternalService, name: open, port: 80}]\n"
        "  - filters: [{type: RequestMirror, requestMirror: {backendRef: "
        "{kind: ExternalService, name: open, port: 80}}}]\n"
        "    backendRefs: [{name: api, port: 8080}]\n"
    )
    xds = egress_case(extra=extra)
    assert "outbound|80||open.example.com" not in xds[CLUSTER_TYPE]
    vhosts = {vh.name: vh for vh in xds[ROUTE_TYPE]["outbound_http_15080"].virtual_hosts}
    routes = vhosts["outbound|8080||api.shop"].routes
    denied = [r for r in routes if r.name == EGRESS_POLICY]
    assert [r.match.path_separated_prefix for r in denied] == ["/open"]
    assert_refuses(denied[0], 15080)
    assert all(not r.route.request_mirror_policies for r in routes)


def test_an_external_service_destination_must_exist() -> None:
    with pytest.raises(ResourceErrors) as caught:
        mesh(doc("TCPRoute", "all", "{matches: {ports: []}}")
             + tt("t", "[{kind: TCPRoute, name: all}]",
                  dest="{kind: ExternalService, name: nowhere}"))
    assert "spec.destination.name: 'nowhere' does not exist; expected the name of a " \
        "ExternalService of namespace 'shop'" in str(caught.value)


def test_sources_are_service_accounts_only() -> None:
    with pytest.raises(ResourceErrors) as caught:
        mesh(doc("TCPRoute", "all", "{matches: {ports: []}}")
             + tt("t", "[{kind: TCPRoute, name: all}]",
                  "[{kind: ExternalService, name: pay}]"))
    assert "spec.sources[0].kind: 'ExternalService' is not supported" in str(caught.value)
