"""``ubimesh.policy.questions`` on small meshes: can, blast_radius and diff, the compiler's
RBAC evaluated by the engine; and, on the generated 50-service mesh, blast radius and diff
agreeing with ``can`` on concrete requests (an SMI oracle written from specs.md 1.3 decides
which routes a request matches)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from ubimesh.control.resources import parse_documents, validate_set
from ubimesh.control.resources.model import Resource
from ubimesh.policy.questions import (
    ANY_ROUTE,
    MeshPolicy,
    QuestionError,
    Route,
    blast_radius,
    can,
    diff,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import policy_blast_radius as generator

TD = "spiffe://example.org/ns/default/sa"
WEB, API, DB, BATCH, OPS = (f"{TD}/{n}" for n in ("web", "api", "db", "batch", "ops"))

BASE = """
apiVersion: ubimesh.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {trustDomain: example.org}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {ports: [{name: http, port: 80, protocol: http}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: api}
spec:
  ports:
  - {name: http, port: 8080, protocol: http}
  - {name: admin-tcp, port: 9000, protocol: tcp}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: db}
spec: {ports: [{name: pg, port: 5432, protocol: tcp}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: web-1}
spec: {service: web, address: 10.0.0.1, sidecar: {inboundPorts: {http: 15001}}}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: api-1}
spec:
  service: api
  address: 10.0.0.2
  sidecar: {inboundPorts: {http: 15001, admin-tcp: 15002}}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: api-2}
spec:
  service: api
  address: 10.0.0.3
  sidecar: {inboundPorts: {http: 15001, admin-tcp: 15002}}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: db-1}
spec: {service: db, address: 10.0.0.4, sidecar: {inboundPorts: {pg: 15001}}}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: api-routes}
spec:
  matches:
  - {name: read, methods: [GET], pathRegex: /api/.*}
  - {name: write, methods: [POST], pathRegex: /api/items}
  - {name: admin, pathRegex: /admin, headers: {x-role: admin}}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: pg}
spec: {matches: {ports: [5432]}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: web-to-api}
spec:
  destination: {kind: ServiceAccount, name: api}
  sources: [{kind: ServiceAccount, name: web}]
  rules: [{kind: HTTPRouteGroup, name: api-routes, matches: [read]}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: api-to-db}
spec:
  destination: {kind: ServiceAccount, name: db}
  sources: [{kind: ServiceAccount, name: api}]
  rules: [{kind: TCPRoute, name: pg}]
"""


def resources(*texts: str) -> list[Resource]:
    out: list[Resource] = []
    for n, text in enumerate(texts):
        out.extend(parse_documents(text, f"test{n}.yaml"))
    validate_set(out)
    return out


def mesh(*extra: str) -> MeshPolicy:
    return MeshPolicy(resources(BASE, *extra))


def target(name: str, destination: str, sources: list[str], rules: str) -> str:
    subjects = ", ".join(f"{{kind: ServiceAccount, name: {s}}}" for s in sources)
    return f"""
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: {name}}}
spec:
  destination: {{kind: ServiceAccount, name: {destination}}}
  sources: [{subjects}]
  rules: {rules}
"""


# -- can ---------------------------------------------------------------------------------------


def test_a_listed_source_on_a_listed_route_is_allowed_on_every_workload() -> None:
    answer = can(mesh(), WEB, "api", port=8080, method="GET", path="/api/orders?x=1")
    assert answer.allowed
    assert [(r.workload, r.allowed, r.policy) for r in answer.rows] == [
        ("api-1", True, "default/web-to-api/0"),
        ("api-2", True, "default/web-to-api/0"),
    ]
    assert {r.destination.identity for r in answer.rows} == {API}


def test_a_route_the_rule_does_not_select_is_denied_by_no_policy() -> None:
    answer = can(mesh(), WEB, "api", port="http", method="POST", path="/api/items")
    assert not answer.allowed
    assert {(r.allowed, r.policy) for r in answer.rows} == {(False, "")}


def test_a_source_not_listed_is_denied() -> None:
    answer = can(mesh(), DB, "api", port=8080, method="GET", path="/api/orders")
    assert not answer.allowed and {r.policy for r in answer.rows} == {""}


def test_http_rules_never_open_a_tcp_port_and_tcp_routes_do() -> None:
    # web-to-api has only HTTPRouteGroup rules: the api's tcp port stays closed to web.
    tcp = can(mesh(), WEB, "api", port=9000)
    assert not tcp.allowed
    assert all("tcp port" in r.note for r in tcp.rows)
    # api-to-db: a TCPRoute rule on port 5432.
    db = can(mesh(), API, "db")
    assert db.allowed and {r.policy for r in db.rows} == {"default/api-to-db/0"}
    assert not can(mesh(), WEB, "db").allowed


def test_every_port_without_port_and_a_service_as_source() -> None:
    answer = can(mesh(), "web", "api", method="GET", path="/api/x")
    assert {(r.destination.port, r.allowed) for r in answer.rows} == {(8080, True),
                                                                       (9000, False)}
    assert {r.source for r in answer.rows} == {WEB}
    assert not answer.allowed  # one denial is enough for exit 3


def test_the_path_authorized_is_the_path_forwarded() -> None:
    m = mesh()
    # Dot segments and double slashes are resolved before RBAC, as the proxy does.
    assert can(m, WEB, "api", port=8080, path="/x/../api/orders").allowed
    assert can(m, WEB, "api", port=8080, path="//api//orders").allowed
    assert can(m, WEB, "api", port=8080, path="/api%2Forders").allowed  # unescaped, forwarded
    # pathRegex is anchored at the start only (SMI): /api/.* does not match /v1/api/x.
    assert not can(m, WEB, "api", port=8080, path="/v1/api/x").allowed
    assert not can(m, WEB, "api", port=8080, path="/api/../admin").allowed


def test_header_routes_need_the_header() -> None:
    m = mesh(target("ops-to-api", "api", ["ops"],
                    "[{kind: HTTPRouteGroup, name: api-routes, matches: [admin]}]"))
    assert not can(m, OPS, "api", port=8080, path="/admin/users").allowed
    answer = can(m, OPS, "api", port=8080, path="/admin/users", headers=[("X-Role", "admin")])
    assert answer.allowed and {r.policy for r in answer.rows} == {"default/ops-to-api/0"}
    assert not can(m, OPS, "api", port=8080, path="/admin", headers=[("x-role", "root")]).allowed


ALLOW_BY_DEFAULT = "spec: {trustDomain: example.org, authorization: {defaultAction: ALLOW}}"


def allow_by_default(*extra: str) -> MeshPolicy:
    return MeshPolicy(resources(BASE.replace("spec: {trustDomain: example.org}",
                                             ALLOW_BY_DEFAULT), *extra))


def test_default_allow_leaves_untargeted_destinations_open() -> None:
    m = allow_by_default()
    assert m.index.mesh.default_action == "ALLOW"
    # web is named by no TrafficTarget: no RBAC filter, anyone may call it.
    answer = can(m, DB, "web")
    assert answer.allowed and {r.policy for r in answer.rows} == {""}
    assert all("no RBAC filter" in r.note for r in answer.rows)
    # api is named by one: default-deny there.
    assert not can(m, DB, "api", port=8080, path="/api/x").allowed


def test_errors_name_the_flag_the_value_and_the_fix() -> None:
    m = mesh()
    with pytest.raises(QuestionError, match=r"--to 'nope'.*NAME.NAMESPACE.*api.default"):
        can(m, WEB, "nope")
    with pytest.raises(QuestionError, match=r"--from 'ghost'.*no service 'ghost'"):
        can(m, "ghost", "api")
    with pytest.raises(QuestionError, match=r"--port 7.*http:8080"):
        can(m, WEB, "api", port=7)
    with pytest.raises(QuestionError, match=r"--path 'api'"):
        can(m, WEB, "api", path="api")
    with pytest.raises(QuestionError, match="IDENTITY 'web'"):
        blast_radius(m, "web")


# -- blast radius ------------------------------------------------------------------------------


def test_blast_radius_is_breadth_first_with_routes_and_policies() -> None:
    answer = blast_radius(mesh(), WEB)
    rows = [(r.hops, r.source, r.destination.service, r.destination.port, r.route.name,
             r.policy) for r in answer.reached]
    assert rows == [
        (1, WEB, "api", 8080, "api-routes/read", "default/web-to-api/0"),
        (2, API, "db", 5432, "*", "default/api-to-db/0"),
    ]
    read = answer.reached[0].route
    assert read == Route("api-routes/read", ("GET",), "/api/.*", ())
    assert answer.identities == ((WEB, 0), (API, 1), (DB, 2))
    assert [r.hops for r in blast_radius(mesh(), WEB, max_hops=1).reached] == [1]
    # db reaches nothing: nothing names it as a source.
    assert blast_radius(mesh(), DB).reached == ()


def test_blast_radius_lists_each_route_once_at_its_fewest_hops() -> None:
    m = mesh(
        target("db-to-api", "api", ["db"],
               "[{kind: HTTPRouteGroup, name: api-routes}]"),  # every match
        target("web-to-db", "db", ["web"], "[{kind: TCPRoute, name: pg}]"),
    )
    answer = blast_radius(m, WEB)
    rows = {(r.destination.service, r.route.name): (r.hops, r.source) for r in answer.reached}
    assert rows == {
        ("api", "api-routes/read"): (1, WEB),
        ("db", "*"): (1, WEB),
        ("api", "api-routes/write"): (2, DB),
        ("api", "api-routes/admin"): (2, DB),
    }


def test_a_rule_naming_a_missing_match_allows_only_what_exists() -> None:
    # The validator refuses this; a store edited by hand (or an older one) may still hold it,
    # and the compiler fails closed.
    extra = target("batch-to-api", "api", ["batch"],
                   "[{kind: HTTPRouteGroup, name: api-routes, matches: [write, gone]}]")
    m = MeshPolicy([*resources(BASE), *parse_documents(extra, "unchecked.yaml")])
    reached = {(r.hops, r.destination.service, r.route.name)
               for r in blast_radius(m, BATCH).reached}
    assert reached == {(1, "api", "api-routes/write"), (2, "db", "*")}
    assert not can(m, BATCH, "api", port=8080, path="/api/x").allowed
    assert can(m, BATCH, "api", port=8080, method="POST", path="/api/items").allowed


# -- diff --------------------------------------------------------------------------------------


def test_diff_reports_new_allows_and_new_denies_with_their_policies() -> None:
    before = mesh()
    after = MeshPolicy(resources(BASE.replace("matches: [read]", "matches: [read, write]")
                                 # HTTP rules never match opaque TCP
                                 .replace("rules: [{kind: TCPRoute, name: pg}]",
                                          "rules: [{kind: HTTPRouteGroup, name: api-routes}]")))
    flips = diff(before, after).flips
    assert [(f.kind, f.source, f.destination.service, f.route.name, f.policy_before,
             f.policy_after) for f in flips] == [
        ("new-deny", API, "db", "*", "default/api-to-db/0", ""),
        ("new-allow", WEB, "api", "api-routes/write", "", "default/web-to-api/0"),
    ]
    assert diff(before, mesh()).flips == ()


def test_diff_of_a_narrowed_rule_flips_the_routes_no_longer_covered() -> None:
    wide = mesh(target("ops-to-api", "api", ["ops"], "[{kind: HTTPRouteGroup, name: "
                                                      "api-routes}]"))
    narrow = mesh(target("ops-to-api", "api", ["ops"], "[{kind: HTTPRouteGroup, name: "
                                                        "api-routes, matches: [read]}]"))
    flips = diff(wide, narrow)
    assert {(f.kind, f.route.name) for f in flips.flips} == {
        ("new-deny", "api-routes/write"), ("new-deny", "api-routes/admin")}
    assert flips.count("new-allow") == 0
    back = diff(narrow, wide)
    assert {(f.kind, f.route.name) for f in back.flips} == {
        ("new-allow", "api-routes/write"), ("new-allow", "api-routes/admin")}


def test_opening_a_destination_to_everyone_is_a_new_allow_for_every_identity() -> None:
    flips = diff(mesh(), allow_by_default()).flips
    web_flips = {f.source for f in flips if f.destination.service == "web"}
    assert web_flips == {WEB, API, DB}
    assert all(f.route == ANY_ROUTE and f.kind == "new-allow" for f in flips)


# -- agreement on the generated mesh -------------------------------------------------------------


def _sample(match: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    """A request that matches ``match`` (the generator's regexes are literal but for .*)."""
    method = (match.get("methods") or ["GET"])[0]
    path = str(match.get("pathRegex", "/")).replace(".*", "x")
    headers = {k: v.split("|")[0] for k, v in (match.get("headers") or {}).items()}
    return method, path, headers


def _smi_matches(match: dict[str, Any], method: str, path: str, headers: dict[str, str]) -> bool:
    """specs.md 1.3: pathRegex anchored at the start, methods exact (* any), header regexes
    full-matched."""
    methods = match.get("methods") or []
    if methods and "*" not in methods and method not in methods:
        return False
    if match.get("pathRegex") and not re.match(match["pathRegex"], path):
        return False
    return all(
        name in headers and re.fullmatch(regex, headers[name])
        for name, regex in (match.get("headers") or {}).items()
    )


def test_blast_radius_agrees_with_can_on_every_route_of_the_generated_mesh() -> None:
    m = MeshPolicy(generator.generate(50, 200, seed=7, workloads=2))
    by_name = {f"api-routes/{x['name']}": x for x in generator.ROUTE_MATCHES}
    checked = allowed = 0
    for identity in m.identities():
        reached: dict[tuple[str, str, int], set[str]] = {}
        for d, route in m.reach_map(identity):
            reached.setdefault((d.service, d.identity, d.port), set()).add(route.name)
        for service in m.index.services.values():
            for port in service.ports:
                requests = ([_sample(x) for x in generator.ROUTE_MATCHES]
                            if port.protocol == "http" else [("GET", "/", {})])
                for method, path, headers in requests:
                    answer = m.can([identity], service, port=port.port, method=method,
                                   path=path, headers=list(headers.items()))
                    for row in answer.rows:
                        names = reached.get((service.name, row.destination.identity, port.port),
                                            set())
                        expected = "*" in names or any(
                            _smi_matches(by_name[name], method, path, headers)
                            for name in names if name in by_name
                        )
                        assert row.allowed == expected, (identity, row, names)
                        checked += 1
                        allowed += row.allowed
    assert checked > 10_000 and 100 < allowed < checked / 2, (checked, allowed)
