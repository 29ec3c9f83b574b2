"""Authorization: SMI TrafficTargets compiled to Envoy RBAC, and egress control
(docs/policy.md section 3; SMI semantics in ../shared/docs/specs.md section 1.3).

Inbound. Authorization is on when the Mesh's ``mtls.mode`` is STRICT or PERMISSIVE (with
DISABLE callers have no identity; the validator refuses TrafficTargets then). Each sidecar
inbound listener of a workload whose identity is the destination of a TrafficTarget, and
under ``defaultAction: DENY`` every sidecar inbound listener, gets an RBAC filter with action
ALLOW: ``envoy.filters.http.rbac`` before the router of an HTTP listener,
``envoy.filters.network.rbac`` (stat prefix: the listener's name) before tcp_proxy on a TCP
listener. No policy: nothing is allowed. Under ``defaultAction: ALLOW`` a workload whose
identity no TrafficTarget names gets no filter.

One policy per (TrafficTarget, rule) that can allow traffic on the listener, named
``<namespace>/<traffictarget>/<rule index>``. Principals: ``authenticated.principal_name.exact``
of each source's SPIFFE ID (sorted, each once). Permissions follow specs.md's algorithm:

- the port gate (a TrafficTarget with TCPRoute rules allows only their ports; ports ``[]``:
  every port) is decided here: a listener serves exactly one service port, so a rule whose
  gate excludes that port gives no policy on it, and ``destination_port`` (which would see
  the sidecar's inbound port, not the service port) is never emitted;
- HTTP listener: a TrafficTarget with HTTPRouteGroup rules gives one policy per group rule,
  its permission the OR of the selected matches, each the AND of ``url_path`` (``safe_regex``
  ``(?:<pathRegex>).*``: SMI anchors at the start only), a ``:method`` header (none for
  ``*``), and each header's value regex; a match with none of these is ``any``. A
  TrafficTarget with only TCPRoute rules gives one ``any`` policy per TCPRoute rule whose
  port gate passes;
- TCP listener: one ``any`` policy per TCPRoute rule whose ports include the service port;
  HTTPRouteGroup rules never match opaque TCP.

A rule naming a group, TCPRoute or match that does not exist matches nothing (fail closed):
it gives no policy. An HTTP listener with an RBAC filter also normalizes the path before the
filter sees it (``envoy.http_listener``'s ``normalize_paths``), so the path authorized is the
path forwarded.

Egress. An ExternalService is reachable from a workload when a TrafficTarget whose
destination is ``{kind: ExternalService}`` lists the workload's service account (the rules'
gates apply: the sidecar routes only the allowed HTTP matches), or, under ``defaultAction:
ALLOW``, when no TrafficTarget names the ExternalService; with authorization off, always. A
workload not allowed gets no route or cluster to it. With authorization on, every sidecar
HTTP egress listener (``outbound_http_*``, HTTP ``upstream_*``) refuses what it may not send:
the outbound listener's catch-all virtual host (any Host no other claims), the rest of a
route-gated ExternalService, a route of a mesh service leading to a forbidden ExternalService,
and an HTTP upstream listener to a forbidden one all end in ``egress_denied_route``: 403, RBAC
policy ``egress``, ``x-ubimesh-denied-by: egress``, logged by the proxy as any RBAC denial. A
TCP upstream listener to a forbidden ExternalService keeps its port with an RBAC DENY-all
policy ``egress`` (the connection is closed) before a tcp_proxy to a cluster with no
endpoints. Listener metadata asks the proxy for ``x-ubimesh-denied-by`` on every denial of
these listeners: their caller is the local application.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import path_pb2, string_pb2
from google.protobuf import any_pb2, struct_pb2

from ubimesh.control.compiler import envoy, matchers
from ubimesh.control.compiler.index import (
    ExternalService,
    Index,
    ServicePort,
    TrafficRule,
    TrafficTarget,
    Workload,
    build_index,
)
from ubimesh.control.compiler.model import Message
from ubimesh.control.compiler.mtls import DISABLE, spiffe_id
from ubimesh.control.resources.model import Resource

HTTP_RBAC_FILTER = "envoy.filters.http.rbac"
NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
#: The policy (and ``x-ubimesh-denied-by`` value) of every egress denial.
EGRESS_POLICY = "egress"
DENIED_BY_HEADER = "x-ubimesh-denied-by"
#: Listener metadata the proxy reads (docs/policy.md section 2): who gets the denial header.
RBAC_METADATA = "ubimesh.rbac"
#: The catch-all virtual host of a sidecar's outbound listener.
EGRESS_VHOST = "egress_denied"
#: The request header marking a request the sidecar refuses to send (``egress_denied_route``).
EGRESS_MARK_HEADER = "x-ubimesh-egress-denied"
#: The cluster with no endpoints behind a TCP upstream listener to a forbidden destination
#: (tcp_proxy needs a cluster; the RBAC filter closes the connection before it is used).
BLACKHOLE_CLUSTER = "egress_denied"

SERVICE_ACCOUNT = "ServiceAccount"
EXTERNAL_SERVICE = "ExternalService"
HTTP_ROUTE_GROUP = "HTTPRouteGroup"
TCP_ROUTE = "TCPRoute"


def policy_name(target: TrafficTarget, rule_index: int) -> str:
    """``<namespace>/<traffictarget name>/<rule index>``: what denials and ``ubimesh policy``
    show."""
    return f"{target.namespace}/{target.name}/{rule_index}"


@dataclass(frozen=True)
class EgressGrant:
    """What one workload may send to one ExternalService: everything (``matches`` None), or
    only HTTP requests matching one of ``matches`` ((policy name, SMI match) pairs)."""

    external: ExternalService
    matches: tuple[tuple[str, Mapping[str, Any]], ...] | None

    def signature(self) -> tuple[str, str, tuple[tuple[str, str], ...] | None]:
        """Equal for equal grants (the matches are named by policy and match name)."""
        named = (
            None
            if self.matches is None
            else tuple((policy, str(m.get("name"))) for policy, m in self.matches)
        )
        return (self.external.namespace, self.external.name, named)


class Authorization:
    """The TrafficTargets of one compile call, read once; what each workload's inbound
    listeners allow and which ExternalServices it may reach, each computed once per
    (identity, port) and shared by every workload with that identity."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.enabled = index.mesh.mtls_mode != DISABLE
        self.default_deny = index.mesh.default_action == "DENY"
        self._to_account: dict[tuple[str, str], list[TrafficTarget]] = {}
        self._to_external: dict[tuple[str, str], list[TrafficTarget]] = {}
        for target in sorted(index.traffic_targets, key=lambda t: (t.namespace, t.name)):
            d = target.destination
            by = self._to_external if d.kind == EXTERNAL_SERVICE else self._to_account
            by.setdefault((d.namespace, d.name), []).append(target)
        #: The HttpFilter of every sidecar HTTP egress listener (``egress_marker_rules``).
        self.egress_filter = http_rbac_filter(egress_marker_rules())
        self._inbound: dict[tuple[str, str, int, str], Message | None] = {}
        # Keyed by id() of the route group match, which is kept alive in the value: many
        # TrafficTargets of a namespace select the same matches, and building the messages is
        # most of the cost of compiling authorization for a large mesh.
        self._match_permissions: dict[int, tuple[Mapping[str, Any], Message]] = {}
        self._egress: dict[tuple[str, str], tuple[EgressGrant, ...]] = {}

    # -- inbound ---------------------------------------------------------------------------

    def callers(self, namespace: str, account: str) -> frozenset[str] | None:
        """The SPIFFE IDs a TrafficTarget lets call the workloads running as ``account``
        (what a default-deny mesh admits); None when anyone may (authorization off or
        default-allow)."""
        if not self.enabled or not self.default_deny:
            return None
        td = self.index.mesh.trust_domain
        return frozenset(
            spiffe_id(td, s.namespace, s.name)
            for target in self._to_account.get((namespace, account), ())
            for s in target.sources
            if s.kind == SERVICE_ACCOUNT
        )

    def inbound_rules(self, workload: Workload, port: ServicePort) -> Message | None:
        """The RBAC rules (``config.rbac.v3.RBAC``, action ALLOW) of ``workload``'s inbound
        listener for service port ``port``; None when the listener gets no RBAC filter."""
        key = (workload.namespace, workload.service_account, port.port, port.protocol)
        if key not in self._inbound:
            self._inbound[key] = self._build_inbound(key[0], key[1], port)
        return self._inbound[key]

    def _build_inbound(self, namespace: str, account: str, port: ServicePort) -> Message | None:
        if not self.enabled:
            return None
        targets = self._to_account.get((namespace, account), [])
        if not targets and not self.default_deny:
            return None
        rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)
        for target in targets:
            principals = self._principals(target)
            for index, permission in self._permissions(target, port.port, port.protocol):
                rules.policies[policy_name(target, index)].CopyFrom(
                    rbac_pb2.Policy(permissions=[permission], principals=principals)
                )
        return rules

    def _principals(self, target: TrafficTarget) -> list[Message]:
        td = self.index.mesh.trust_domain
        ids = sorted(
            {
                spiffe_id(td, s.namespace, s.name)
                for s in target.sources
                if s.kind == SERVICE_ACCOUNT
            }
        )
        return [
            rbac_pb2.Principal(
                authenticated=rbac_pb2.Principal.Authenticated(
                    principal_name=string_pb2.StringMatcher(exact=identity)
                )
            )
            for identity in ids
        ]

    def _permissions(
        self, target: TrafficTarget, port: int, protocol: str
    ) -> list[tuple[int, Message]]:
        """(rule index, permission) of each rule of ``target`` that can allow traffic on
        service port ``port`` of ``protocol`` (specs.md 1.3's ``rules_permit``)."""
        tcp = [(i, r) for i, r in enumerate(target.rules) if r.kind == TCP_ROUTE]
        http = [(i, r) for i, r in enumerate(target.rules) if r.kind == HTTP_ROUTE_GROUP]
        tcp_open = [i for i, r in tcp if self._port_ok(target, r, port)]
        if protocol != "http" or not http:
            # Opaque TCP, or HTTP with only TCPRoute rules (the route gate is open): each
            # TCPRoute rule whose ports include ``port`` allows everything on it.
            return [(i, _ANY) for i in tcp_open]
        if tcp and not tcp_open:
            return []  # the port gate is closed: no HTTPRouteGroup rule applies here
        out = []
        for i, rule in http:
            permission = _or(
                [self._match_permission(m) for _, m in self._selected(target, rule, i)]
            )
            if permission is not None:
                out.append((i, permission))
        return out

    def _match_permission(self, match: Mapping[str, Any]) -> Message:
        found = self._match_permissions.get(id(match))
        if found is None:
            found = self._match_permissions[id(match)] = (match, _match_permission(match))
        return found[1]

    def _port_ok(self, target: TrafficTarget, rule: TrafficRule, port: int) -> bool:
        ports = self.index.tcp_routes.get((target.namespace, rule.name))
        return ports is not None and (not ports or port in ports)

    def _selected(
        self, target: TrafficTarget, rule: TrafficRule, index: int
    ) -> list[tuple[str, Mapping[str, Any]]]:
        """The HTTPRouteGroup matches ``rule`` selects, with its policy name: every match
        when it names none; [] when the group does not exist."""
        group = self.index.route_groups.get((target.namespace, rule.name), ())
        wanted = set(rule.matches) if rule.matches else None
        name = policy_name(target, index)
        return [(name, m) for m in group if wanted is None or str(m.get("name")) in wanted]

    # -- egress ----------------------------------------------------------------------------

    def egress(self, workload: Workload) -> tuple[EgressGrant, ...]:
        """The ExternalServices ``workload`` may reach and how, by (namespace, name)."""
        key = (workload.namespace, workload.service_account)
        grants = self._egress.get(key)
        if grants is None:
            grants = tuple(
                grant
                for ext in self.index.externals.values()
                if (grant := self._grant(ext, key)) is not None
            )
            self._egress[key] = grants
        return grants

    def _grant(self, ext: ExternalService, account: tuple[str, str]) -> EgressGrant | None:
        if not self.enabled:
            return EgressGrant(ext, None)
        targets = self._to_external.get((ext.namespace, ext.name), [])
        if not targets:
            return None if self.default_deny else EgressGrant(ext, None)
        allowed: list[tuple[str, Mapping[str, Any]]] = []
        for target in targets:
            sources = {(s.namespace, s.name) for s in target.sources if s.kind == SERVICE_ACCOUNT}
            if account not in sources:
                continue
            tcp = [r for r in target.rules if r.kind == TCP_ROUTE]
            http = [(i, r) for i, r in enumerate(target.rules) if r.kind == HTTP_ROUTE_GROUP]
            port_gate = not tcp or any(self._port_ok(target, r, ext.port) for r in tcp)
            if not port_gate:
                continue
            if ext.protocol != "http" or not http:
                if tcp:  # an opaque-TCP external needs a TCPRoute rule
                    return EgressGrant(ext, None)
                continue
            for i, rule in http:
                allowed.extend(self._selected(target, rule, i))
        if not allowed:
            return None
        if any(_match_permission(m) is _ANY for _, m in allowed):
            return EgressGrant(ext, None)
        return EgressGrant(ext, tuple(allowed))


# -- RBAC messages --------------------------------------------------------------------------

_ANY = rbac_pb2.Permission(any=True)


def _and(rules: Sequence[Message]) -> Message:
    if not rules:
        return _ANY
    if len(rules) == 1:
        return rules[0]
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=rules))


def _or(rules: Sequence[Message]) -> Message | None:
    """OR of ``rules``; None (matches nothing) for none; ``any`` when one is ``any``."""
    if not rules:
        return None
    if any(r is _ANY for r in rules):
        return _ANY
    if len(rules) == 1:
        return rules[0]
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=rules))


def _match_permission(match: Mapping[str, Any]) -> Message:
    """One HTTPRouteGroup match as a permission: path AND method AND every header (``_ANY``
    itself when it has none of them)."""
    parts = []
    path = match.get("pathRegex")
    if path:
        parts.append(
            rbac_pb2.Permission(
                url_path=path_pb2.PathMatcher(
                    path=string_pb2.StringMatcher(
                        safe_regex=matchers.regex(matchers.smi_path_regex(str(path)))
                    )
                )
            )
        )
    method = matchers.method_matcher([str(m) for m in match.get("methods") or ()])
    if method is not None:
        parts.append(rbac_pb2.Permission(header=method))
    headers = match.get("headers") or {}
    for name in sorted(headers):
        parts.append(
            rbac_pb2.Permission(
                header=rc.HeaderMatcher(
                    name=str(name).lower(),
                    string_match=matchers.string_match("RegularExpression", str(headers[name])),
                )
            )
        )
    return _and(parts)


def deny_all(policy: str) -> Message:
    """RBAC rules denying everything, decided by ``policy``."""
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    rules.policies[policy].CopyFrom(
        rbac_pb2.Policy(permissions=[_ANY], principals=[rbac_pb2.Principal(any=True)])
    )
    return rules


def blackhole_cluster(connect_timeout: Message) -> Message:
    """``BLACKHOLE_CLUSTER``: STATIC, no endpoints."""
    cluster = cluster_pb2.Cluster(
        name=BLACKHOLE_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=BLACKHOLE_CLUSTER),
    )
    cluster.connect_timeout.CopyFrom(connect_timeout)
    return cluster


def _packed(message: Message) -> Message:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def http_rbac(rules: Message) -> Message:
    return http_rbac_pb2.RBAC(rules=rules)


def network_rbac(rules: Message, stat_prefix: str) -> Message:
    return network_rbac_pb2.RBAC(rules=rules, stat_prefix=stat_prefix)


@dataclass(frozen=True)
class InboundRbac:
    """The RBAC filter of one sidecar inbound listener, as ``compile_all`` puts it there."""

    node_id: str  # "<workload>.<namespace>"
    workload: Workload
    listener: str  # "inbound_<inboundPort>"
    port: ServicePort  # the service port the listener serves
    filter_name: str  # HTTP_RBAC_FILTER or NETWORK_RBAC_FILTER
    config: Message  # extensions.filters.{http,network}.rbac.v3.RBAC


def inbound_filter(rules: Message, port: ServicePort, listener: str) -> tuple[str, Message]:
    """(filter name, typed config) of the RBAC filter with ``rules`` on the inbound
    ``listener`` serving ``port``."""
    if port.protocol == "http":
        return HTTP_RBAC_FILTER, http_rbac(rules)
    return NETWORK_RBAC_FILTER, network_rbac(rules, listener)


def inbound_rbac(resources: Sequence[Resource]) -> list[InboundRbac]:
    """Every sidecar inbound listener's RBAC filter, without compiling routes or clusters:
    what ``ubimesh policy`` evaluates. The same code puts the same messages in
    ``compile_all``'s listeners; listeners without a filter (authorization off, or an
    ``ALLOW`` destination no TrafficTarget names) are left out."""
    index = build_index(resources)
    auth = Authorization(index)
    out = []
    for w in index.workloads:
        service = index.services.get((w.namespace, w.service))
        if w.sidecar is None or service is None:
            continue
        for port_name, inbound_port in sorted(w.sidecar.inbound_ports.items()):
            port = service.port_named(port_name)
            if port is None:
                continue
            rules = auth.inbound_rules(w, port)
            if rules is None:
                continue
            listener = f"inbound_{inbound_port}"
            name, config = inbound_filter(rules, port, listener)
            out.append(InboundRbac(f"{w.name}.{w.namespace}", w, listener, port, name, config))
    return out


def http_rbac_filter(rules: Message) -> Message:
    """The ``envoy.filters.http.rbac`` HttpFilter enforcing ``rules``."""
    return hcm_pb2.HttpFilter(name=HTTP_RBAC_FILTER, typed_config=_packed(http_rbac(rules)))


def add_network_rbac(listener: Message, rules: Message) -> None:
    """Put ``envoy.filters.network.rbac`` with ``rules`` (stat prefix: the listener's name)
    before the terminal filter of ``listener``'s one filter chain, in place."""
    (chain,) = listener.filter_chains
    chain.filters.insert(
        0,
        listener_components_pb2.Filter(
            name=NETWORK_RBAC_FILTER, typed_config=_packed(network_rbac(rules, listener.name))
        ),
    )


def denial_header_always(listener: Message) -> None:
    """Listener metadata asking the proxy to add ``x-ubimesh-denied-by`` to every denial it
    answers on ``listener`` (the caller is the local application: a mesh caller without a
    client certificate)."""
    meta = struct_pb2.Struct()
    meta.update({"denial_header": "always"})
    listener.metadata.CopyFrom(base_pb2.Metadata(filter_metadata={RBAC_METADATA: meta}))


def egress_loop_cluster_name(port: int) -> str:
    """The cluster through which the HTTP egress listener on ``port`` refuses a request."""
    return f"egress_denied|{port}"


def egress_loop_cluster(port: int, connect_timeout: Message) -> Message:
    """``egress_loop_cluster_name(port)``: the listener itself, ``127.0.0.1:port``."""
    name = egress_loop_cluster_name(port)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[envoy.lb_endpoint("127.0.0.1", port, 1)]
                )
            ],
        ),
    )
    cluster.connect_timeout.CopyFrom(connect_timeout)
    return cluster


def egress_marker_rules() -> Message:
    """The RBAC rules of every sidecar HTTP egress listener: DENY, policy ``egress``, for a
    request carrying ``EGRESS_MARK_HEADER`` (see ``egress_denied_route``)."""
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    marked = rbac_pb2.Permission(
        header=rc.HeaderMatcher(name=EGRESS_MARK_HEADER, present_match=True)
    )
    rules.policies[EGRESS_POLICY].CopyFrom(
        rbac_pb2.Policy(permissions=[marked], principals=[rbac_pb2.Principal(any=True)])
    )
    return rules


def egress_denied_route(port: int) -> Message:
    """The route of a request the HTTP egress listener on ``port`` may not send anywhere.

    It goes back into the same listener marked with ``EGRESS_MARK_HEADER``, where the
    listener's RBAC filter (``egress_marker_rules``) refuses it: 403 ``RBAC: access denied``,
    decided by policy ``egress``, so the proxy's RBAC denial log names the listener, the
    destination (the Host the application asked for) and the policy, and counts it, with no
    egress-specific code in the proxy; Envoy runs it unchanged. A request carrying the mark
    from the application is refused the same way at once. ``x-ubimesh-denied-by: egress`` is
    also set by the route, for a proxy that leaves the header to listener metadata."""
    action = rc.RouteAction(cluster=egress_loop_cluster_name(port))
    route = rc.Route(name=EGRESS_POLICY, match=rc.RouteMatch(prefix="/"), route=action)
    route.request_headers_to_add.append(_header(EGRESS_MARK_HEADER, EGRESS_POLICY))
    route.response_headers_to_add.append(_header(DENIED_BY_HEADER, EGRESS_POLICY))
    return route


def _header(name: str, value: str) -> Message:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def egress_denied_vhost(port: int) -> Message:
    """The outbound listener's catch-all: every Host no other virtual host claims."""
    return rc.VirtualHost(name=EGRESS_VHOST, domains=["*"], routes=[egress_denied_route(port)])


def grant_routes(grant: EgressGrant, action: Message, port: int) -> list[Message]:
    """The routes to an allowed ExternalService on the egress listener on ``port``: ``/`` with
    ``action`` for a full grant; else one route per allowed match (named after its policy),
    then the denial."""
    if grant.matches is None:
        return [rc.Route(match=rc.RouteMatch(prefix="/"), route=action)]
    routes = [
        rc.Route(name=policy, match=matchers.smi_match(match), route=action)
        for policy, match in grant.matches
    ]
    routes.append(egress_denied_route(port))
    return routes


def forbidden_clusters(index: Index, grants: Iterable[EgressGrant], cluster_of: Any) -> set[str]:
    """The clusters of ExternalServices no grant allows (two ExternalServices sharing a host
    and port share a cluster: allowed if either is)."""
    every = {cluster_of(ext) for ext in index.externals.values()}
    return every - {cluster_of(g.external) for g in grants}


def strip_forbidden(
    routes: Sequence[Message], forbidden: set[str], port: int
) -> list[Message]:
    """``routes`` (of the egress listener on ``port``) with every use of a ``forbidden``
    cluster removed: a mirror to one is dropped, a route sending to one (alone or among
    weighted clusters) refuses as ``egress_denied_route`` does (keeping its match). Routes
    untouched are not copied."""
    out = []
    for route in routes:
        if route.WhichOneof("action") != "route" or not _touches(route.route, forbidden):
            out.append(route)
            continue
        action = route.route
        sends = (
            [action.cluster]
            if action.WhichOneof("cluster_specifier") == "cluster"
            else [c.name for c in action.weighted_clusters.clusters]
        )
        if any(c in forbidden for c in sends):
            denied = egress_denied_route(port)
            denied.match.CopyFrom(route.match)
            out.append(denied)
            continue
        copy = rc.Route()
        copy.CopyFrom(route)
        kept = [m for m in copy.route.request_mirror_policies if m.cluster not in forbidden]
        del copy.route.request_mirror_policies[:]
        copy.route.request_mirror_policies.extend(kept)
        out.append(copy)
    return out


def _touches(action: Message, forbidden: set[str]) -> bool:
    names = {action.cluster} | {c.name for c in action.weighted_clusters.clusters}
    names |= {m.cluster for m in action.request_mirror_policies}
    return bool(names & forbidden)
