"""A workload's sidecar: inbound listeners, the outbound HTTP listener and its upstreams.

- ``inbound_<inboundPort>`` on ``address:inboundPort`` for each ``sidecar.inboundPorts`` entry,
  HTTP (RDS ``inbound_<inboundPort>``: one ``*`` virtual host) or TCP per the service port's
  protocol, to the STATIC cluster ``inbound|<service port>||<service>.<namespace>`` at
  ``127.0.0.1:<application port>``. The inbound route has no timeout (``0s``): the calling
  side's route enforces the timeout the route asked for. mTLS per the mesh's mode
  (compiler/mtls.py: STRICT, PERMISSIVE or DISABLE).
- ``outbound_http_<outboundPort>`` on ``127.0.0.1``: every HTTP service and every HTTP
  ExternalService the workload may reach, by Host (``Context.outbound_route_config``).
- ``upstream_<localPort>`` on ``127.0.0.1`` per ``sidecar.upstreams`` entry: one service (or
  ExternalService) port, over HTTP (RDS ``upstream_<localPort>``: one ``*`` virtual host) or
  TCP (tcp_proxy, TrafficSplit weights applied).

Authorization (compiler/authz.py): inbound listeners get their RBAC filter; outbound and
upstream listeners reach only the ExternalServices the workload is granted, and refuse the
rest (``authz.egress_denied_route``; a TCP upstream to a forbidden one: RBAC deny-all).
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from google.protobuf import duration_pb2

from ubimesh.control.compiler import access_log, authz, envoy, mtls, telemetry_meta, tracing
from ubimesh.control.compiler.authz import EgressGrant
from ubimesh.control.compiler.clusters import inbound_cluster_name
from ubimesh.control.compiler.context import Context
from ubimesh.control.compiler.index import Upstream, Workload
from ubimesh.control.compiler.model import Message, XdsSet
from ubimesh.control.compiler.mtls import spiffe_id

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
        rules = ctx.authz.inbound_rules(workload, port)
        if port.protocol == "http":
            listeners[name] = envoy.http_listener(
                name,
                workload.address,
                inbound_port,
                use_remote_address=False,
                filters=[authz.http_rbac_filter(rules)] if rules is not None else [],
                normalize_paths=rules is not None,
            )
            action = rc.RouteAction(cluster=cluster, timeout=duration_pb2.Duration())
            route = rc.Route(match=rc.RouteMatch(prefix="/"), route=action)
            routes[name] = _one_host(name, [route])
        else:
            listeners[name] = envoy.tcp_listener(
                name, workload.address, inbound_port, [(cluster, 1)]
            )
            if rules is not None:
                authz.add_network_rbac(listeners[name], rules)
        mtls.secure_inbound(listeners[name], ctx.index.mesh.mtls_mode)
        telemetry_meta.inbound(listeners[name], ctx.index, workload, service,
                               ctx.telemetry_peers(workload.namespace, workload.service_account))

    grants = ctx.authz.egress(workload)
    if sidecar.outbound_port is not None:
        name = f"outbound_http_{sidecar.outbound_port}"
        listeners[name] = _egress_listener(ctx, name, sidecar.outbound_port, grants, local_clusters)
        config, clusters = ctx.outbound_route_config(
            workload.namespace, sidecar.outbound_port, grants
        )
        routes[name] = config
        used.update(clusters)

    for upstream in sidecar.upstreams:
        _upstream(ctx, upstream, grants, listeners, routes, used, local_clusters)

    tracing.instrument(ctx.tracing, listeners, local_clusters, tracing.service_name(
        workload.service, workload.namespace), ctx.clusters.connect_timeout(None), sidecar=True)
    telemetry_meta.outbound(listeners, ctx.index, workload)
    access_log.decorate(ctx.access_log, listeners, spiffe_id(
        ctx.index.mesh.trust_domain, workload.namespace, workload.service_account))
    return ctx.xds_set(listeners, routes, used, local_clusters, workload.site)


def _one_host(name: str, routes: list[Message]) -> Message:
    return route_pb2.RouteConfiguration(
        name=name, virtual_hosts=[rc.VirtualHost(name=name, domains=["*"], routes=routes)]
    )


def _egress_listener(
    ctx: Context,
    name: str,
    port: int,
    grants: Sequence[EgressGrant],
    local_clusters: dict[str, Message],
) -> Message:
    """An HTTP egress listener (outbound, or upstream) on ``127.0.0.1:port``. Under
    authorization its RBAC filter refuses what its routes send back marked
    (``authz.egress_denied_route``), through its own loop cluster; the proxy adds
    ``x-ubimesh-denied-by`` to the local application's denials; where a route gate limits what
    may go to an ExternalService, the path is normalized before the routes see it."""
    if not ctx.authz.enabled:
        return envoy.http_listener(name, LOOPBACK, port, use_remote_address=False)
    listener = envoy.http_listener(
        name,
        LOOPBACK,
        port,
        use_remote_address=False,
        filters=[ctx.authz.egress_filter],
        normalize_paths=any(g.matches is not None for g in grants),
    )
    authz.denial_header_always(listener)
    loop = authz.egress_loop_cluster_name(port)
    local_clusters[loop] = authz.egress_loop_cluster(port, ctx.clusters.connect_timeout(None))
    return listener


def _upstream(
    ctx: Context,
    upstream: Upstream,
    grants: Sequence[EgressGrant],
    listeners: dict[str, Message],
    routes: dict[str, Message],
    used: set[str],
    local_clusters: dict[str, Message],
) -> None:
    """One upstream listener, to a Service (first) or else an ExternalService of that name;
    an upstream naming neither (or a port it does not have) gets no listener. One to an
    ExternalService the workload may not reach refuses everything (``_refused``)."""
    name = f"upstream_{upstream.local_port}"
    key = (upstream.namespace, upstream.service)
    service = ctx.index.services.get(key)
    if service is not None:
        port = service.find_port(upstream.port)
        if port is None:
            return
        if port.protocol == "http":
            service_routes, clusters = ctx.routes.service_routes(service, port)
            forbidden = ctx.forbidden_clusters(grants)
            if forbidden:
                service_routes = tuple(
                    authz.strip_forbidden(service_routes, forbidden, upstream.local_port)
                )
            used.update(clusters - forbidden)
            routes[name] = _one_host(name, list(service_routes))
            listeners[name] = _egress_listener(ctx, name, upstream.local_port, [], local_clusters)
        else:
            targets = ctx.routes.split_targets(service, port)
            used.update(c for c, _ in targets)
            listeners[name] = envoy.tcp_listener(name, LOOPBACK, upstream.local_port, targets)
        return
    ext = ctx.index.externals.get(key)
    if ext is None or upstream.port not in (None, "", ext.port, str(ext.port)):
        return
    grant = next((g for g in grants if g.external == ext), None)
    if grant is None:
        _refused(ctx, name, upstream.local_port, ext.protocol, listeners, routes, local_clusters)
        return
    if ext.protocol == "http":
        action, cluster = ctx.external_action(ext)
        routes[name] = _one_host(name, authz.grant_routes(grant, action, upstream.local_port))
        listeners[name] = _egress_listener(
            ctx, name, upstream.local_port, [grant], local_clusters
        )
    else:
        cluster = ctx.clusters.external(ext)
        listeners[name] = envoy.tcp_listener(name, LOOPBACK, upstream.local_port, [(cluster, 1)])
    used.add(cluster)


def _refused(
    ctx: Context,
    name: str,
    local_port: int,
    protocol: str,
    listeners: dict[str, Message],
    routes: dict[str, Message],
    local_clusters: dict[str, Message],
) -> None:
    """An upstream listener to a destination the workload may not reach: it keeps its port,
    so the application's attempt is answered (HTTP 403 / TCP closed) and logged by the proxy
    as an RBAC denial by policy ``egress``; no route or cluster leads anywhere."""
    if protocol == "http":
        routes[name] = _one_host(name, [authz.egress_denied_route(local_port)])
        listeners[name] = _egress_listener(ctx, name, local_port, [], local_clusters)
        return
    blackhole = authz.BLACKHOLE_CLUSTER
    local_clusters[blackhole] = authz.blackhole_cluster(ctx.clusters.connect_timeout(None))
    listeners[name] = envoy.tcp_listener(name, LOOPBACK, local_port, [(blackhole, 1)])
    authz.add_network_rbac(listeners[name], authz.deny_all(authz.EGRESS_POLICY))
