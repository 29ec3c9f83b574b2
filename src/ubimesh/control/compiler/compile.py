"""``compile_proxy`` and ``compile_all``: resources in, per-proxy ``XdsSet`` out.

Pure: no I/O, no clock, no randomness; the same resources (in any order) give byte-identical
messages and the same versions.
"""

from __future__ import annotations

from collections.abc import Sequence

from ubimesh.control.compiler.access_log import plan as access_log_plan
from ubimesh.control.compiler.context import Context
from ubimesh.control.compiler.gateway import compile_gateway
from ubimesh.control.compiler.index import build_index
from ubimesh.control.compiler.model import TYPE_URLS, CompileOptions, ProxyRef, XdsSet, version_of
from ubimesh.control.compiler.sidecar import compile_sidecar
from ubimesh.control.compiler.tracing import plan as tracing_plan
from ubimesh.control.resources.model import Resource


def empty_set() -> XdsSet:
    """What a proxy the resources do not name gets: every type URL, no resources."""
    empty = version_of({})
    return XdsSet(resources={t: {} for t in TYPE_URLS}, versions={t: empty for t in TYPE_URLS})


def _compile(ctx: Context, proxy: ProxyRef) -> XdsSet:
    key = (proxy.namespace, proxy.name)
    if proxy.role == "gateway":
        gateway = ctx.index.gateways.get(key)
        return compile_gateway(ctx, gateway) if gateway is not None else empty_set()
    workload = ctx.index.workload_by_key.get(key)
    if workload is None or workload.sidecar is None:
        return empty_set()
    return compile_sidecar(ctx, workload)


#: No control plane additions: no built-in collector.
NO_OPTIONS = CompileOptions()


def _context(resources: Sequence[Resource], options: CompileOptions) -> Context:
    ctx = Context(build_index(resources))
    ctx.tracing = tracing_plan(resources, options)
    ctx.access_log = access_log_plan(resources)
    return ctx


def compile_proxy(
    resources: Sequence[Resource], proxy: ProxyRef, options: CompileOptions = NO_OPTIONS
) -> XdsSet:
    """The xDS resources of one proxy. A proxy the resources do not describe (no such Workload
    with a ``sidecar``, no such Gateway) gets an empty set. ``options``: what the control
    plane adds (its collector's address)."""
    return _compile(_context(resources, options), proxy)


def compile_all(
    resources: Sequence[Resource], options: CompileOptions = NO_OPTIONS
) -> dict[str, XdsSet]:
    """The xDS resources of every proxy the resources name: each Workload with a ``sidecar``
    (node id ``<workload>.<namespace>``) and each Gateway (``<gateway>.<namespace>``), by node
    id. Work shared between proxies (clusters, assignments, routing) is done once."""
    ctx = _context(resources, options)
    out: dict[str, XdsSet] = {}
    for w in ctx.index.workloads:
        if w.sidecar is not None:
            node = f"{w.name}.{w.namespace}"
            out[node] = _compile(ctx, ProxyRef(node, "sidecar", w.name, w.namespace))
    for namespace, name in ctx.index.gateways:
        node = f"{name}.{namespace}"
        out[node] = _compile(ctx, ProxyRef(node, "gateway", name, namespace))
    return dict(sorted(out.items()))
