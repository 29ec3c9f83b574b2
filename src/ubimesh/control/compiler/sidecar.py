"""A workload's sidecar: inbound listeners, the outbound HTTP listener and its upstreams.

- ``inbound_<inboundPort>`` on ``address:inboundPort`` for each ``sidecar.inboundPorts`` entry,
  HTTP (RDS ``inbound_<inboundPort>``: one ``*`` virtual host) or TCP per the service port's
  protocol, to the STATIC cluster ``inbound|<service port>||<service>.<namespace>`` at
  ``127.0.0.1:<application port>``. The inbound route has no timeout (``0s``): the calling
  side's route enforces the timeout the route asked for. mTLS per the mesh's mode
  (compiler/mtls.py: STRICT, PERMISSIVE or DISABLE).
- ``outbound_http_<outboundPort>`` on ``127.0.0.1``: every HTTP service and HTTP
  ExternalService of the mesh by Host (``Context.outbound_route_config``).
- ``upstream_<localPort>`` on ``127.0.0.1`` per ``sidecar.upstreams`` entry: one service (or
  ExternalService) port, over HTTP (RDS ``upstream_<localPort>``: one ``*`` virtual host) or
  TCP (tcp_proxy, TrafficSplit weights applied).
"""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from google.protobuf import duration_pb2

from ubimesh.control.compiler import envoy, mtls
from ubimesh.control.compiler.clusters import inbound_cluster_name
from ubimesh.control.compiler.context import Context
from ubimesh.control.compiler.index import Upstream, Workload
from ubimesh.control.compiler.model import Message, XdsSet

LOOPBACK = "127.0.0.1"


def compile_sidecar(ctx: Context, workload: Workload) -> XdsSet:
    sidecar = workload.sidecar
    assert sidecar is not None
    listeners: dict[str, Message] = {}
    routes: dict[str, Message] = {}
    local_clusters: dict[str, Message] = {}
    used: set[str] = set()
    service = ctx.index.services.get((workload.namespace, workload.service))

    for port_name, inbound_port in sorted(sidecar.inbound_ports.items()):
        port = service.port_named(port_name) if service else None
        if service is None or port is None:
            continue
        name = f"inbound_{inbound_port}"
        cluster = inbound_cluster_name(service, port)
        local_clusters[cluster] = envoy.inline_cluster(
            cluster,
            dns=False,
            endpoints=[(LOOPBACK, workload.app_port(port))],
            connect_timeout=ctx.clusters.connect_timeout(service),
            policy=ctx.clusters.lb_policy(service),
        )
        if port.protocol == "http":
            listeners[name] = envoy.http_listener(
                name, workload.address, inbound_port, use_remote_address=False
            )
            action = rc.RouteAction(cluster=cluster, timeout=duration_pb2.Duration())
            route = rc.Route(match=rc.RouteMatch(prefix="/"), route=action)
            routes[name] = _one_host(name, [route])
        else:
            listeners[name] = envoy.tcp_listener(
                name, workload.address, inbound_port, [(cluster, 1)]
            )
        mtls.secure_inbound(listeners[name], ctx.index.mesh.mtls_mode)

    if sidecar.outbound_port is not None:
        name = f"outbound_http_{sidecar.outbound_port}"
        listeners[name] = envoy.http_listener(
            name, LOOPBACK, sidecar.outbound_port, use_remote_address=False
        )
        config, clusters = ctx.outbound_route_config(workload.namespace, sidecar.outbound_port)
        routes[name] = config
        used.update(clusters)

    for upstream in sidecar.upstreams:
        _upstream(ctx, upstream, listeners, routes, used)

    return ctx.xds_set(listeners, routes, used, local_clusters, workload.site)


def _one_host(name: str, routes: list[Message]) -> Message:
    return route_pb2.RouteConfiguration(
        name=name, virtual_hosts=[rc.VirtualHost(name=name, domains=["*"], routes=routes)]
    )


def _upstream(
    ctx: Context,
    upstream: Upstream,
    listeners: dict[str, Message],
    routes: dict[str, Message],
    used: set[str],
) -> None:
    """One upstream listener, to a Service (first) or else an ExternalService of that name;
    an upstream naming neither (or a port it does not have) gets no listener."""
    name = f"upstream_{upstream.local_port}"
    key = (upstream.namespace, upstream.service)
    service = ctx.index.services.get(key)
    if service is not None:
        port = service.find_port(upstream.port)
        if port is None:
            return
        if port.protocol == "http":
            service_routes, clusters = ctx.routes.service_routes(service, port)
            used.update(clusters)
            routes[name] = _one_host(name, list(service_routes))
            listeners[name] = envoy.http_listener(
                name, LOOPBACK, upstream.local_port, use_remote_address=False
            )
        else:
            targets = ctx.routes.split_targets(service, port)
            used.update(c for c, _ in targets)
            listeners[name] = envoy.tcp_listener(name, LOOPBACK, upstream.local_port, targets)
        return
    ext = ctx.index.externals.get(key)
    if ext is None or upstream.port not in (None, "", ext.port, str(ext.port)):
        return
    if ext.protocol == "http":
        route, cluster = ctx.external_route(ext)
        routes[name] = _one_host(name, [route])
        listeners[name] = envoy.http_listener(
            name, LOOPBACK, upstream.local_port, use_remote_address=False
        )
    else:
        cluster = ctx.clusters.external(ext)
        listeners[name] = envoy.tcp_listener(name, LOOPBACK, upstream.local_port, [(cluster, 1)])
    used.add(cluster)
