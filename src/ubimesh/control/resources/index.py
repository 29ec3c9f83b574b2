"""An index of a resource set by kind, namespace and name (for cross-reference checks)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ubimesh.control.resources.model import Resource


class Index:
    """Resources by ``(kind, namespace, name)``; the first of duplicates wins (duplicates are
    reported separately)."""

    def __init__(self, resources: Iterable[Resource]) -> None:
        self._by: dict[tuple[str, str, str], Resource] = {}
        for r in resources:
            self._by.setdefault((r.kind, r.namespace, r.name), r)

    def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        return self._by.get((kind, namespace, name))


def port_names(service: Resource) -> list[str]:
    return [p["name"] for p in service.spec["ports"]]


def find_port(service: Resource, ref: str | int) -> dict[str, Any] | None:
    """The port of ``service`` that ``ref`` names: a port name, or a port number."""
    field = "name" if isinstance(ref, str) else "port"
    for port in service.spec["ports"]:
        if port[field] == ref:
            return dict(port)
    return None


def describe_ports(service: Resource) -> str:
    return ", ".join(f"{p['name']} ({p['port']}/{p['protocol']})" for p in service.spec["ports"])
