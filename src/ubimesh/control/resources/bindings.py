"""Listener and port collisions: two things of a set that would bind the same port on the
same address.

A workload's sidecar binds its inbound ports on the workload's address and its outbound,
upstream and admin ports on 127.0.0.1 of the same machine; its application listens on
127.0.0.1 (behind a sidecar) or on the workload's address (without one). A gateway binds its
listeners on its address and its admin port on 127.0.0.1. Loopback and unspecified
addresses (127.0.0.1, 0.0.0.0, ::1, ::) all mean "this machine", which is how ``ubimesh up``
runs a whole mesh; other addresses are separate machines.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence

from ubimesh.control.resources.errors import ResourceError
from ubimesh.control.resources.index import Index
from ubimesh.control.resources.model import Resource
from ubimesh.control.resources.schema import child

_LOCAL = "local"


def binding_errors(resources: Sequence[Resource], index: Index) -> list[ResourceError]:
    """An error for each port that something earlier in ``resources`` already binds."""
    taken: dict[tuple[str, int], tuple[Resource, str]] = {}
    errors = []
    for resource in resources:
        for host, port, path, what in _bindings(resource, index):
            first = taken.setdefault((host, port), (resource, path))
            if first == (resource, path):
                continue
            owner = first[1] if first[0] is resource else f"{first[0].key} ({first[1]})"
            errors.append(
                ResourceError(resource.source, resource.key, path, port,
                              f"a port free on {_describe(host)}",
                              f"{what}is already taken by {owner}")
            )
    return errors


def _host(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return _LOCAL if ip.is_loopback or ip.is_unspecified else address


def _loopback_of(address: str) -> str:
    host = _host(address)
    return _LOCAL if host == _LOCAL else f"127.0.0.1@{address}"


def _describe(host: str) -> str:
    if host == _LOCAL:
        return "this machine (127.0.0.1, 0.0.0.0)"
    if host.startswith("127.0.0.1@"):
        return f"127.0.0.1 of the machine at {host.removeprefix('127.0.0.1@')}"
    return host


def _bindings(resource: Resource, index: Index) -> Iterator[tuple[str, int, str, str]]:
    """(host, port, field path, what binds it) for every port ``resource`` binds."""
    spec = resource.spec
    if resource.kind == "Gateway":
        for i, listener in enumerate(spec["listeners"]):
            yield _host(spec["address"]), listener["port"], f"spec.listeners[{i}].port", ""
        if "adminPort" in spec:
            yield _loopback_of(spec["address"]), spec["adminPort"], "spec.adminPort", ""
    elif resource.kind == "Workload":
        yield from _workload_bindings(resource, index)


def _workload_bindings(
    resource: Resource, index: Index
) -> Iterator[tuple[str, int, str, str]]:
    spec = resource.spec
    address = spec["address"]
    sidecar = spec.get("sidecar")
    local = _loopback_of(address)
    if sidecar is not None:
        for name, port in sidecar.get("inboundPorts", {}).items():
            yield _host(address), port, child("spec.sidecar.inboundPorts", name), ""
        if "outboundPort" in sidecar:
            yield local, sidecar["outboundPort"], "spec.sidecar.outboundPort", ""
        for i, upstream in enumerate(sidecar.get("upstreams", [])):
            yield local, upstream["localPort"], f"spec.sidecar.upstreams[{i}].localPort", ""
        if "adminPort" in sidecar:
            yield local, sidecar["adminPort"], "spec.sidecar.adminPort", ""
    service = index.get("Service", resource.namespace, spec["service"])
    if service is None:
        return
    app_host = local if sidecar is not None else _host(address)
    seen: set[int] = set()  # two service ports may share one application port
    for port in service.spec["ports"]:
        app_port = spec.get("ports", {}).get(port["name"], port["targetPort"])
        if app_port in seen:
            continue
        seen.add(app_port)
        yield (app_host, app_port, child("spec.ports", port["name"]),
               f"(the application port of service port {port['name']!r}) ")
