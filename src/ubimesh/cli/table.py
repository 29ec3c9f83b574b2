"""``ubimesh get``'s table: NAME, NAMESPACE, then a few columns that matter for the kind."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Spec = Mapping[str, Any]


def _ports(spec: Spec) -> str:
    return ",".join(
        f"{p.get('name')}:{p.get('port')}/{p.get('protocol', 'http')}"
        for p in spec.get("ports", [])
    )


def _sidecar(spec: Spec) -> str:
    sidecar = spec.get("sidecar")
    if not sidecar:
        return "-"
    parts = [f"{k}:{v}" for k, v in (sidecar.get("inboundPorts") or {}).items()]
    if sidecar.get("outboundPort"):
        parts.append(f"out:{sidecar['outboundPort']}")
    return ",".join(parts) or "yes"


def _listeners(spec: Spec) -> str:
    return ",".join(
        f"{item.get('name')}:{item.get('port')}/{item.get('protocol', 'HTTP')}"
        for item in spec.get("listeners", [])
    )


def _backends(spec: Spec) -> str:
    return ",".join(f"{b.get('service')}={b.get('weight')}" for b in spec.get("backends", []))


def _parents(spec: Spec) -> str:
    parents = spec.get("parentRefs", [])
    return ",".join(f"{p.get('kind', 'Gateway')}/{p.get('name')}" for p in parents)


#: Per kind: (column header, value from the spec).
COLUMNS: dict[str, list[tuple[str, Callable[[Spec], str]]]] = {
    "Mesh": [
        ("TRUST DOMAIN", lambda s: str(s.get("trustDomain", ""))),
        ("MTLS", lambda s: str((s.get("mtls") or {}).get("mode", ""))),
    ],
    "Service": [("PORTS", _ports)],
    "Workload": [
        ("SERVICE", lambda s: str(s.get("service", ""))),
        ("ADDRESS", lambda s: str(s.get("address", ""))),
        ("SITE", lambda s: str(s.get("site", ""))),
        ("SIDECAR", _sidecar),
    ],
    "Gateway": [("ADDRESS", lambda s: str(s.get("address", ""))), ("LISTENERS", _listeners)],
    "ExternalService": [
        ("HOST", lambda s: str(s.get("host", ""))),
        ("PORT", lambda s: str(s.get("port", ""))),
        ("PROTOCOL", lambda s: str(s.get("protocol", ""))),
    ],
    "TrafficSplit": [("SERVICE", lambda s: str(s.get("service", ""))), ("BACKENDS", _backends)],
    "HTTPRoute": [
        ("PARENTS", _parents),
        ("HOSTNAMES", lambda s: ",".join(s.get("hostnames", [])) or "*"),
    ],
}


def render_table(items: Sequence[Mapping[str, Any]]) -> str:
    """Items (kubectl-shaped dicts, one kind) as an aligned text table, one line each."""
    kind = str(items[0].get("kind", "")) if items else ""
    columns = COLUMNS.get(kind, [])
    rows = [["NAME", "NAMESPACE", *[header for header, _ in columns]]]
    for item in items:
        meta = item.get("metadata") or {}
        spec = item.get("spec") or {}
        rows.append(
            [
                str(meta.get("name", "")),
                str(meta.get("namespace", "")) or "-",
                *[(value(spec) or "-") for _, value in columns],
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
    )
