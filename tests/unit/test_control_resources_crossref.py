"""Cross-references over a resource set and port collisions (validate_set, overlay)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ubimesh.control.resources import (
    KINDS,
    Resource,
    ResourceErrors,
    load_files,
    overlay,
    validate_document,
    validate_set,
)

EXAMPLE = Path(__file__).parent / "control_resources" / "mesh.yaml"


def make(kind: str, name: str, spec: Any, namespace: str = "payments") -> Resource:
    metadata = {"name": name} if kind == "Mesh" else {"name": name, "namespace": namespace}
    return validate_document({"apiVersion": KINDS[kind].api_version, "kind": kind,
                              "metadata": metadata, "spec": spec}, f"{name}.yaml#1")


def problems(resources: list[Resource]) -> list[str]:
    with pytest.raises(ResourceErrors) as info:
        validate_set(resources)
    return [str(e) for e in info.value.errors]


def service(name: str, *ports: tuple[str, int, str], namespace: str = "payments") -> Resource:
    return make("Service", name, {"ports": [
        {"name": n, "port": p, "protocol": proto} for n, p, proto in ports]}, namespace)


LEDGER = service("ledger", ("http", 8080, "http"), ("db", 5432, "tcp"))
V2 = service("ledger-v2", ("http", 8080, "http"))


def test_the_example_set_is_valid_and_overlay_replaces_by_key() -> None:
    base = load_files([EXAMPLE])
    validate_set(base)
    changed = make("Service", "ledger", {"ports": [{"name": "web", "port": 1, "protocol": "http"}]})
    merged = overlay(base, [changed])
    assert len(merged) == len(base) and changed in merged
    # The workload, the gateway and the route now name ports the changed service lacks.
    with pytest.raises(ResourceErrors) as info:
        validate_set(merged)
    assert [(e.source.rpartition("/")[2], e.path, e.value) for e in info.value.errors] == [
        ("mesh.yaml#4", "spec.ports.http", "http"),
        ("mesh.yaml#4", "spec.ports.db", "db"),
        ("mesh.yaml#4", "spec.sidecar.inboundPorts.http", "http"),
        ("mesh.yaml#6", "spec.listeners[1].backend.port", "db"),
        ("mesh.yaml#12", "spec.rules[0].backendRefs[0].port", 8080),
    ]


def test_workload_references() -> None:
    w = make("Workload", "w", {"service": "ledger", "address": "10.0.0.1",
                               "ports": {"htp": 9000},
                               "sidecar": {"inboundPorts": {"grpc": 15001}, "upstreams": [
                                   {"service": "nope", "localPort": 9001},
                                   {"service": "ledger-v2", "port": "db", "localPort": 9002},
                                   {"service": "ledger-v2", "port": 8081, "localPort": 9003},
                               ]}})
    orphan = make("Workload", "o", {"service": "ghost", "address": "10.0.0.2"})
    assert problems([LEDGER, V2, w, orphan]) == [
        "w.yaml#1 Workload payments/w: spec.ports.htp: 'htp' is not a port of the service; "
        "expected a port name of Service payments/ledger: http, db",
        "w.yaml#1 Workload payments/w: spec.sidecar.inboundPorts.grpc: 'grpc' is not a port of "
        "the service; expected a port name of Service payments/ledger: http, db",
        "w.yaml#1 Workload payments/w: spec.sidecar.upstreams[0].service: 'nope' does not "
        "exist; expected the name of a Service or ExternalService of namespace 'payments'",
        "w.yaml#1 Workload payments/w: spec.sidecar.upstreams[1].port: 'db' is not a port of "
        "the service; expected a port of Service payments/ledger-v2: http (8080/http)",
        "w.yaml#1 Workload payments/w: spec.sidecar.upstreams[2].port: 8081 is not a port of "
        "the service; expected a port of Service payments/ledger-v2: http (8080/http)",
        "o.yaml#1 Workload payments/o: spec.service: 'ghost' does not exist; expected the name "
        "of a Service of namespace 'payments'",
    ]


def test_a_service_of_another_namespace_does_not_count() -> None:
    other = service("ledger", ("http", 80, "http"), namespace="shop")
    w = make("Workload", "w", {"service": "ledger", "address": "10.0.0.1"})
    assert len(problems([other, w])) == 1
    up = make("Workload", "u", {"service": "ledger", "address": "10.0.0.2", "sidecar": {
        "upstreams": [{"service": "ledger", "namespace": "shop", "localPort": 1000}]}})
    validate_set([LEDGER, other, up])


def test_traffic_target_references() -> None:
    group = make("HTTPRouteGroup", "routes", {"matches": [{"name": "read"}, {"name": "write"}]})
    tt = make("TrafficTarget", "tt", {
        "destination": {"kind": "ServiceAccount", "name": "ledger"},
        "sources": [{"kind": "ServiceAccount", "name": "web"}],
        "rules": [{"kind": "HTTPRouteGroup", "name": "routes", "matches": ["read", "delete"]},
                  {"kind": "TCPRoute", "name": "routes"}],
    })
    assert problems([group, tt]) == [
        "tt.yaml#1 TrafficTarget payments/tt: spec.rules[0].matches[1]: 'delete' is not a "
        "match of the group; expected a match name of HTTPRouteGroup payments/routes: read, "
        "write",
        "tt.yaml#1 TrafficTarget payments/tt: spec.rules[1].name: 'routes' does not exist; "
        "expected the name of a TCPRoute of namespace 'payments'",
    ]


def test_traffic_split_references_self_reference_and_hierarchy() -> None:
    v1 = service("ledger-v1", ("http", 8080, "http"))
    split = make("TrafficSplit", "canary", {"service": "ledger", "backends": [
        {"service": "ledger", "weight": 1}, {"service": "ledger-v2", "weight": 1},
        {"service": "ghost", "weight": 1}], "matches": [{"kind": "HTTPRouteGroup", "name": "g"}]})
    nested = make("TrafficSplit", "nested", {"service": "ledger-v2", "backends": [
        {"service": "ledger-v1", "weight": 1}]})
    twin = make("TrafficSplit", "twin", {"service": "ledger", "backends": [
        {"service": "ledger-v1", "weight": 1}]})
    assert problems([LEDGER, v1, V2, split, nested, twin]) == [
        "canary.yaml#1 TrafficSplit payments/canary: spec.backends[0].service: 'ledger' is the "
        "split's own root service; expected a backend other than the root (splits are not "
        "self-referential)",
        "canary.yaml#1 TrafficSplit payments/canary: spec.backends[1].service: 'ledger-v2' is "
        "the root of TrafficSplit payments/nested; expected a Service that is not split itself "
        "(splits are not hierarchical)",
        "canary.yaml#1 TrafficSplit payments/canary: spec.backends[2].service: 'ghost' does not "
        "exist; expected the name of a Service of namespace 'payments'",
        "canary.yaml#1 TrafficSplit payments/canary: spec.matches[0].name: 'g' does not exist; "
        "expected the name of a HTTPRouteGroup of namespace 'payments'",
        "twin.yaml#1 TrafficSplit payments/twin: spec.service: 'ledger' is already split by "
        "TrafficSplit payments/canary; expected one TrafficSplit per root service",
    ]


def test_http_route_references() -> None:
    gw = make("Gateway", "edge", {"listeners": [
        {"name": "web", "port": 80, "protocol": "HTTP"},
        {"name": "pg", "port": 5432, "protocol": "TCP",
         "backend": {"service": "ledger", "port": "pg"}}]})
    ext = make("ExternalService", "stripe", {"host": "api.stripe.com", "port": 443,
                                             "protocol": "http"})
    route = make("HTTPRoute", "r", {
        "parentRefs": [{"name": "edge", "sectionName": "pg"}, {"name": "edge", "port": 81},
                       {"name": "nope"}, {"kind": "Service", "name": "ledger", "port": 5432},
                       {"kind": "Service", "name": "ledger", "port": 8080}, {"name": "edge"}],
        "rules": [{"backendRefs": [{"name": "ledger", "port": 9999},
                                   {"kind": "ExternalService", "name": "stripe", "port": 80},
                                   {"kind": "ExternalService", "name": "stripe"}],
                   "filters": [{"type": "RequestMirror", "requestMirror": {
                       "backendRef": {"name": "ghost", "port": 80}}}]}],
    })
    assert problems([LEDGER, gw, ext, route]) == [
        "edge.yaml#1 Gateway payments/edge: spec.listeners[1].backend.port: 'pg' is not a port "
        "of the service; expected a port of Service payments/ledger: http (8080/http), db "
        "(5432/tcp)",
        "r.yaml#1 HTTPRoute payments/r: spec.parentRefs[0].sectionName: 'pg' is not an HTTP "
        "listener of the gateway; expected an HTTP listener name of Gateway payments/edge: web",
        "r.yaml#1 HTTPRoute payments/r: spec.parentRefs[1].port: 81 is not an HTTP listener "
        "port of the gateway; expected an HTTP listener port of Gateway payments/edge: 80",
        "r.yaml#1 HTTPRoute payments/r: spec.parentRefs[2].name: 'nope' does not exist; "
        "expected the name of a Gateway of namespace 'payments'",
        "r.yaml#1 HTTPRoute payments/r: spec.parentRefs[3].port: 5432 is a tcp port (HTTPRoutes "
        "route HTTP); expected an http port of the service",
        "r.yaml#1 HTTPRoute payments/r: spec.rules[0].backendRefs[0].port: 9999 is not a port "
        "of the service; expected a port of Service payments/ledger: http (8080/http), db "
        "(5432/tcp)",
        "r.yaml#1 HTTPRoute payments/r: spec.rules[0].backendRefs[1].port: 80 is not the "
        "external service's port; expected the port of ExternalService payments/stripe: 443",
        "r.yaml#1 HTTPRoute payments/r: spec.rules[0].filters[0].requestMirror.backendRef.name: "
        "'ghost' does not exist; expected the name of a Service of namespace 'payments'",
    ]


def test_at_most_one_mesh_and_duplicates() -> None:
    a = make("Mesh", "a", {})
    b = make("Mesh", "b", {})
    assert problems([a, b, LEDGER, LEDGER]) == [
        "ledger.yaml#1 Service payments/ledger: metadata.name: 'ledger' is defined twice (also "
        "at ledger.yaml#1); expected each resource once in a set",
        "b.yaml#1 Mesh b: metadata.name: 'b' is a second Mesh (the first is 'a' at a.yaml#1); "
        "expected one Mesh per mesh",
    ]


def test_port_collisions_on_one_address() -> None:
    def wl(name: str, address: str, **spec: Any) -> Resource:
        return make("Workload", name, {"service": "ledger-v2", "address": address, **spec})

    a = wl("a", "127.0.0.1", ports={"http": 9001}, sidecar={"inboundPorts": {"http": 15001},
                                                            "outboundPort": 15100})
    b = wl("b", "127.0.0.2", ports={"http": 9002}, sidecar={"inboundPorts": {"http": 15001},
                                                            "adminPort": 9001})
    c = wl("c", "10.0.0.1")  # no sidecar: the app binds 10.0.0.1:8080
    d = wl("d", "10.0.0.1")  # the same
    e = wl("e", "10.0.0.2", sidecar={"outboundPort": 15001})  # another machine: free
    gw = make("Gateway", "gw", {"address": "0.0.0.0", "listeners": [
        {"name": "web", "port": 15100, "protocol": "HTTP"}]})
    assert problems([V2, a, b, c, d, e, gw]) == [
        "b.yaml#1 Workload payments/b: spec.sidecar.inboundPorts.http: 15001 is already taken "
        "by Workload payments/a (spec.sidecar.inboundPorts.http); expected a port free on this "
        "machine (127.0.0.1, 0.0.0.0)",
        "b.yaml#1 Workload payments/b: spec.sidecar.adminPort: 9001 is already taken by "
        "Workload payments/a (spec.ports.http); expected a port free on this machine "
        "(127.0.0.1, 0.0.0.0)",
        "d.yaml#1 Workload payments/d: spec.ports.http: 8080 (the application port of service "
        "port 'http') is already taken by Workload payments/c (spec.ports.http); expected a "
        "port free on 10.0.0.1",
        "gw.yaml#1 Gateway payments/gw: spec.listeners[0].port: 15100 is already taken by "
        "Workload payments/a (spec.sidecar.outboundPort); expected a port free on this machine "
        "(127.0.0.1, 0.0.0.0)",
    ]


def test_one_workloads_own_ports_collide_too() -> None:
    w = make("Workload", "w", {"service": "ledger-v2", "address": "10.0.0.1",
                               "sidecar": {"inboundPorts": {"http": 8080}, "outboundPort": 8080}})
    assert problems([V2, w]) == [
        "w.yaml#1 Workload payments/w: spec.ports.http: 8080 (the application port of service "
        "port 'http') is already taken by spec.sidecar.outboundPort; expected a port free on "
        "127.0.0.1 of the machine at 10.0.0.1",
    ]
