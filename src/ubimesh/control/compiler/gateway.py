"""A Gateway: one listener ``gateway_<listener name>`` per listener on ``address:port``.

HTTP listeners route by Host with the HTTPRoutes attached to them (``parentRefs`` naming the
gateway, with ``sectionName`` naming the listener and ``port`` its port when given). A route's
hostnames are intersected with the listener's ``hosts`` (Gateway API wildcard rules; a route
with no hostnames takes the listener's); a route with no hostname in common is not attached.
There is one virtual host per hostname, holding the rules of every route attached with that
hostname, most specific first; its domains are the hostname and ``hostname:<listener port>``
(``*`` alone for the catch-all). TCP listeners proxy to their ``backend`` (a Service port, with
its TrafficSplit weights, or an ExternalService).
"""

from __future__ import annotations

from collections import defaultdict

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2

from ubimesh.control.compiler import access_log, envoy, telemetry_meta, tracing
from ubimesh.control.compiler.context import Context
from ubimesh.control.compiler.index import Gateway, GatewayListener, HTTPRoute
from ubimesh.control.compiler.model import Message, XdsSet
from ubimesh.control.compiler.routes import Targets


def compile_gateway(ctx: Context, gateway: Gateway) -> XdsSet:
    listeners: dict[str, Message] = {}
    routes: dict[str, Message] = {}
    used: set[str] = set()
    for listener in gateway.listeners:
        name = f"gateway_{listener.name}"
        if listener.protocol == "http":
            listeners[name] = envoy.http_listener(
                name, gateway.address, listener.port, use_remote_address=True
            )
            routes[name] = _route_config(ctx, gateway, listener, name, used)
        else:
            targets = _tcp_targets(ctx, gateway, listener)
            if not targets:
                continue
            used.update(c for c, _ in targets)
            listeners[name] = envoy.tcp_listener(name, gateway.address, listener.port, targets)
    local_clusters: dict[str, Message] = {}
    tracing.instrument(ctx.tracing, listeners, local_clusters, tracing.service_name(
        gateway.name, gateway.namespace), ctx.clusters.connect_timeout(None), sidecar=False)
    telemetry_meta.gateway(listeners, gateway)
    access_log.decorate(ctx.access_log, listeners, f"gateway/{gateway.namespace}/{gateway.name}")
    return ctx.xds_set(listeners, routes, used, local_clusters, gateway.site)


def _tcp_targets(ctx: Context, gateway: Gateway, listener: GatewayListener) -> Targets:
    backend = listener.backend
    if backend is None:
        return ()
    key = (backend.namespace, backend.service)
    service = ctx.index.services.get(key)
    if service is not None:
        port = service.find_port(backend.port)
        return ctx.routes.split_targets(service, port) if port is not None else ()
    ext = ctx.index.externals.get(key)
    if ext is not None:
        return ((ctx.clusters.external(ext), 1),)
    return ()


def _attached(route: HTTPRoute, gateway: Gateway, listener: GatewayListener) -> bool:
    for ref in route.parent_refs:
        if str(ref.get("kind") or "Gateway") != "Gateway":
            continue
        if str(ref.get("name")) != gateway.name:
            continue
        if str(ref.get("namespace") or route.namespace) != gateway.namespace:
            continue
        if ref.get("sectionName") not in (None, "", listener.name):
            continue
        if ref.get("port") not in (None, "", listener.port):
            continue
        return True
    return False


def intersect_hostnames(route_hosts: tuple[str, ...], listener_hosts: tuple[str, ...]) -> list[str]:
    """Gateway API hostname intersection: the route hostnames a listener accepts, a wildcard
    narrowed to the more specific side (``*.example.com`` x ``api.example.com`` ->
    ``api.example.com``)."""
    if not route_hosts:
        return sorted(set(listener_hosts))
    out: set[str] = set()
    for lh in listener_hosts:
        for rh in route_hosts:
            if lh == "*" or lh == rh:
                out.add(rh)
            elif rh == "*":
                out.add(lh)
            elif _covers(lh, rh):
                out.add(rh)
            elif _covers(rh, lh):
                out.add(lh)
    return sorted(out)


def _covers(wild: str, host: str) -> bool:
    """``*.example.com`` covers ``a.example.com`` and ``*.a.example.com`` (not itself)."""
    return wild.startswith("*.") and host != wild and host.endswith(wild[1:])


def _route_config(
    ctx: Context, gateway: Gateway, listener: GatewayListener, name: str, used: set[str]
) -> Message:
    by_host: dict[str, list[HTTPRoute]] = defaultdict(list)
    for route in ctx.index.http_routes:
        if _attached(route, gateway, listener):
            for host in intersect_hostnames(route.hostnames, listener.hosts):
                by_host[host].append(route)
    vhosts = []
    for host in sorted(by_host):
        domains = ["*"] if host == "*" else [host, f"{host}:{listener.port}"]
        vhosts.append(
            rc.VirtualHost(
                name=host, domains=domains, routes=ctx.routes.http_route_routes(by_host[host], used)
            )
        )
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=vhosts)
