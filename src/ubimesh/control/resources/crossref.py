"""Cross-reference checks over a whole resource set (what the store holds plus what is being
applied): every name a resource uses must exist, and nothing may bind a port twice."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ubimesh.control.resources.bindings import binding_errors
from ubimesh.control.resources.errors import MISSING, ResourceError, ResourceErrors
from ubimesh.control.resources.index import Index, describe_ports, find_port, port_names
from ubimesh.control.resources.loader import duplicate_errors
from ubimesh.control.resources.model import Key, Resource
from ubimesh.control.resources.schema import child

#: Reports one problem of the resource being checked: (path, value, expected, problem).
Fail = Callable[[str, Any, str, str], None]


def validate_set(resources: Iterable[Resource]) -> None:
    """Check the references between ``resources`` (each already valid on its own). Raises
    ``ResourceErrors`` listing every problem: duplicates, more than one Mesh, names that do
    not exist, split loops, and ports bound twice on one address."""
    items = list(resources)
    errors = duplicate_errors(items)
    index = Index(items)
    checks = _Checks(index, items)
    for resource in items:
        check = _BY_KIND.get(resource.kind)
        if check is not None:
            check(checks, resource, _reporter(resource, errors))
    errors.extend(binding_errors(items, index))
    if errors:
        raise ResourceErrors(errors)


def _reporter(resource: Resource, errors: list[ResourceError]) -> Fail:
    def fail(path: str, value: Any, expected: str, problem: str) -> None:
        errors.append(
            ResourceError(resource.source, resource.key, path, value, expected, problem)
        )

    return fail


def overlay(base: Iterable[Resource], changes: Iterable[Resource]) -> list[Resource]:
    """``base`` with each of ``changes`` replacing the resource of the same key (or added):
    the set to validate before applying ``changes`` to a store holding ``base``."""
    merged: dict[Key, Resource] = {r.key: r for r in base}
    for r in changes:
        merged[r.key] = r
    return list(merged.values())


class _Checks:
    def __init__(self, index: Index, items: list[Resource]) -> None:
        self.index = index
        self.first_mesh: Resource | None = None
        #: (namespace, root service) -> the first TrafficSplit of that root.
        self.split_roots: dict[tuple[str, str], Resource] = {}
        #: The Mesh in force and its mTLS mode (TrafficTargets need identities).
        self.mesh_name = "default"
        self.mtls_mode = "STRICT"
        for r in items:
            if r.kind == "TrafficSplit":
                self.split_roots.setdefault((r.namespace, r.spec["service"]), r)
        mesh = next((r for r in items if r.kind == "Mesh"), None)
        if mesh is not None:
            self.mesh_name = mesh.name
            self.mtls_mode = str((mesh.spec.get("mtls") or {}).get("mode") or "STRICT")

    def lookup(
        self, fail: Fail, path: str, namespace: str, name: str, kind: str = "Service"
    ) -> Resource | None:
        """The ``kind`` named at ``path``, or ``None`` after reporting that it does not exist."""
        found = self.index.get(kind, namespace, name)
        if found is None:
            fail(path, name, f"the name of a {kind} of namespace {namespace!r}", "does not exist")
        return found

    def mesh(self, r: Resource, fail: Fail) -> None:
        if self.first_mesh is None:
            self.first_mesh = r
        elif self.first_mesh.key != r.key:
            first = self.first_mesh
            fail("metadata.name", r.name, "one Mesh per mesh",
                 f"is a second Mesh (the first is {first.name!r} at {first.source or '<input>'})")

    def workload(self, r: Resource, fail: Fail) -> None:
        spec = r.spec
        service = self.lookup(fail, "spec.service", r.namespace, spec["service"])
        sidecar = spec.get("sidecar", {})
        if service is not None:
            names = port_names(service)
            expected = f"a port name of {service.key}: {', '.join(names)}"
            for field, ports in (("spec.ports", spec.get("ports", {})),
                                 ("spec.sidecar.inboundPorts", sidecar.get("inboundPorts", {}))):
                for name in ports:
                    if name not in names:
                        fail(child(field, name), name, expected, "is not a port of the service")
        for i, upstream in enumerate(sidecar.get("upstreams", [])):
            path = f"spec.sidecar.upstreams[{i}]"
            namespace, name = upstream["namespace"], upstream["service"]
            # A Service first, else an ExternalService (how a workload reaches, for example,
            # a database outside the mesh over TCP); the compiler resolves it the same way.
            external = self.index.get("ExternalService", namespace, name)
            if external is not None and self.index.get("Service", namespace, name) is None:
                if "port" in upstream and upstream["port"] not in (
                    external.spec["port"], str(external.spec["port"])
                ):
                    fail(f"{path}.port", upstream["port"],
                         f"the port of {external.key}: {external.spec['port']}",
                         "is not the external service's port")
                continue
            target = self.index.get("Service", namespace, name)
            if target is None:
                fail(f"{path}.service", name,
                     f"the name of a Service or ExternalService of namespace {namespace!r}",
                     "does not exist")
            elif "port" in upstream:
                self.port(fail, f"{path}.port", target, upstream["port"])

    def port(
        self, fail: Fail, path: str, service: Resource, ref: str | int
    ) -> dict[str, Any] | None:
        found = find_port(service, ref)
        if found is None:
            fail(path, ref, f"a port of {service.key}: {describe_ports(service)}",
                 "is not a port of the service")
        return found

    def gateway(self, r: Resource, fail: Fail) -> None:
        for i, listener in enumerate(r.spec["listeners"]):
            backend = listener.get("backend")
            if backend is None:
                continue
            path = f"spec.listeners[{i}].backend"
            service = self.lookup(fail, f"{path}.service", r.namespace, backend["service"])
            if service is not None:
                self.port(fail, f"{path}.port", service, backend["port"])

    def traffic_target(self, r: Resource, fail: Fail) -> None:
        if self.mtls_mode == "DISABLE":
            # Authorization needs the caller's verified identity; without mTLS there is none,
            # and a policy that silently allowed (or denied) everything would lie.
            fail("", MISSING,
                 f"mTLS on: set Mesh {self.mesh_name!r} spec.mtls.mode to STRICT or "
                 "PERMISSIVE, or delete this TrafficTarget",
                 f"cannot be enforced: Mesh {self.mesh_name!r} has spec.mtls.mode DISABLE, "
                 "so callers have no identity to authorize")
        destination = r.spec["destination"]
        if destination["kind"] == "ExternalService":
            self.lookup(fail, "spec.destination.name", destination["namespace"],
                        destination["name"], "ExternalService")
        for i, rule in enumerate(r.spec["rules"]):
            path = f"spec.rules[{i}]"
            spec_object = self.lookup(fail, f"{path}.name", r.namespace, rule["name"],
                                       rule["kind"])
            if spec_object is None or "matches" not in rule:
                continue
            names = [m["name"] for m in spec_object.spec["matches"]]
            for j, name in enumerate(rule["matches"]):
                if name not in names:
                    fail(f"{path}.matches[{j}]", name,
                         f"a match name of {spec_object.key}: {', '.join(names)}",
                         "is not a match of the group")

    def traffic_split(self, r: Resource, fail: Fail) -> None:
        spec = r.spec
        root = spec["service"]
        self.lookup(fail, "spec.service", r.namespace, root)
        first = self.split_roots[(r.namespace, root)]
        if first.key != r.key:
            fail("spec.service", root, "one TrafficSplit per root service",
                 f"is already split by {first.key}")
        for i, backend in enumerate(spec["backends"]):
            path = f"spec.backends[{i}].service"
            name = backend["service"]
            if name == root:
                fail(path, name, "a backend other than the root (splits are not "
                     "self-referential)", "is the split's own root service")
                continue
            self.lookup(fail, path, r.namespace, name)
            other = self.split_roots.get((r.namespace, name))
            if other is not None:
                fail(path, name, "a Service that is not split itself (splits are not "
                     "hierarchical)", f"is the root of {other.key}")
        for i, match in enumerate(spec.get("matches", [])):
            self.lookup(fail, f"spec.matches[{i}].name", r.namespace, match["name"],
                         "HTTPRouteGroup")

    def http_route(self, r: Resource, fail: Fail) -> None:
        spec = r.spec
        for i, parent in enumerate(spec["parentRefs"]):
            path = f"spec.parentRefs[{i}]"
            found = self.lookup(fail, f"{path}.name", parent["namespace"], parent["name"],
                                 parent["kind"])
            if found is not None and parent["kind"] == "Gateway":
                self._gateway_parent(fail, path, found, parent)
            elif found is not None:
                self._service_parent(fail, path, found, parent)
        for i, rule in enumerate(spec["rules"]):
            for j, ref in enumerate(rule.get("backendRefs", [])):
                self._backend(fail, f"spec.rules[{i}].backendRefs[{j}]", ref)
            for j, filt in enumerate(rule.get("filters", [])):
                if filt["type"] == "RequestMirror":
                    self._backend(fail, f"spec.rules[{i}].filters[{j}].requestMirror.backendRef",
                                  filt["requestMirror"]["backendRef"])

    def _gateway_parent(
        self, fail: Fail, path: str, gateway: Resource, parent: Mapping[str, Any]
    ) -> None:
        listeners = gateway.spec["listeners"]
        http = [x for x in listeners if x["protocol"] == "HTTP"]
        chosen = http
        if "sectionName" in parent:
            chosen = [x for x in listeners if x["name"] == parent["sectionName"]]
            if not chosen or chosen[0]["protocol"] != "HTTP":
                names = ", ".join(x["name"] for x in http) or "(none)"
                fail(f"{path}.sectionName", parent["sectionName"],
                     f"an HTTP listener name of {gateway.key}: {names}",
                     "is not an HTTP listener of the gateway")
                return
        if "port" in parent:
            chosen = [x for x in chosen if x["port"] == parent["port"]]
            if not chosen:
                ports = ", ".join(str(x["port"]) for x in http) or "(none)"
                fail(f"{path}.port", parent["port"],
                     f"an HTTP listener port of {gateway.key}: {ports}",
                     "is not an HTTP listener port of the gateway")
                return
        if not chosen:
            fail(f"{path}.name", parent["name"], "a Gateway with an HTTP listener",
                 "has no HTTP listener")

    def _service_parent(
        self, fail: Fail, path: str, service: Resource, parent: Mapping[str, Any]
    ) -> None:
        if "port" in parent:
            port = self.port(fail, f"{path}.port", service, parent["port"])
            if port is not None and port["protocol"] != "http":
                fail(f"{path}.port", parent["port"], "an http port of the service",
                     "is a tcp port (HTTPRoutes route HTTP)")
        elif not any(p["protocol"] == "http" for p in service.spec["ports"]):
            fail(f"{path}.name", parent["name"], "a Service with an http port",
                 "has no http port")

    def _backend(self, fail: Fail, path: str, ref: Mapping[str, Any]) -> None:
        found = self.lookup(fail, f"{path}.name", ref["namespace"], ref["name"], ref["kind"])
        if found is None or "port" not in ref:
            return
        if ref["kind"] == "Service":
            self.port(fail, f"{path}.port", found, ref["port"])
        elif ref["port"] != found.spec["port"]:
            fail(f"{path}.port", ref["port"], f"the port of {found.key}: {found.spec['port']}",
                 "is not the external service's port")


_BY_KIND: dict[str, Callable[[_Checks, Resource, Fail], None]] = {
    "Mesh": _Checks.mesh,
    "Workload": _Checks.workload,
    "Gateway": _Checks.gateway,
    "TrafficTarget": _Checks.traffic_target,
    "TrafficSplit": _Checks.traffic_split,
    "HTTPRoute": _Checks.http_route,
}
