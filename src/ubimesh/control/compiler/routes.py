"""Routes: how requests for one service (or one gateway host) are routed, as Envoy ``Route``s.

Routing of a service port, seen from a client (sidecar outbound, sidecar upstream):

1. HTTPRoutes whose ``parentRefs`` name the Service (GAMMA) replace the default routing: their
   rules, every match one Envoy route, sorted most specific first (``matchers.precedence``,
   ties by route namespace/name and rule order). A request matching no rule gets a 404.
2. Else a TrafficSplit of the service splits by weight over the backends exposing the same
   port number (zero weights dropped; none left: the root service). With ``matches`` only
   requests matching the referenced HTTPRouteGroups are split; a catch-all route goes to the
   root service.
3. Else one route ``/`` to the service's cluster.

Route timeouts: an HTTPRoute rule's ``timeouts`` (the smaller of ``request`` and
``backendRequest`` when both are set, since there are no retries), else the largest
``requestTimeout`` of the rule's backend services, else the Mesh ``defaults.requestTimeout``.
An HTTPRoute backendRef naming the root service of a TrafficSplit (one without ``matches``)
is split over the split's backends, as SMI asks of every client, gateways included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.v3 import percent_pb2

from ubimesh.control.compiler import matchers, resilience
from ubimesh.control.compiler.clusters import ClusterRegistry
from ubimesh.control.compiler.durations import duration, parse_nanos
from ubimesh.control.compiler.index import HTTPRoute, Index, Service, ServicePort
from ubimesh.control.compiler.model import Message

#: (cluster name, weight) pairs, as a route or tcp_proxy sends traffic.
Targets = tuple[tuple[str, int], ...]
#: Routes, and the clusters they name.
RoutesAndClusters = tuple[tuple[Message, ...], frozenset[str]]

_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}
_DENOMINATORS = {
    100: percent_pb2.FractionalPercent.HUNDRED,
    10_000: percent_pb2.FractionalPercent.TEN_THOUSAND,
    1_000_000: percent_pb2.FractionalPercent.MILLION,
}
#: Gateway API: a rule without backendRefs (and no redirect) answers 503, a rule whose
#: backendRefs are all invalid (unknown, or weight 0) answers 500.
NO_BACKENDS_STATUS = 503
INVALID_BACKENDS_STATUS = 500


def _ns_of(ref: Mapping[str, Any], default: str) -> str:
    return str(ref.get("namespace") or default)


class RouteBuilder:
    """Builds routes against one Index, caching per-service routing (it is proxy-neutral)."""

    def __init__(self, index: Index, clusters: ClusterRegistry) -> None:
        self.index = index
        self.clusters = clusters
        self._service_routes: dict[tuple[str, str, int], RoutesAndClusters] = {}
        self._gamma: dict[tuple[str, str], list[tuple[HTTPRoute, Mapping[str, Any]]]] = {}
        for route in index.http_routes:
            for ref in route.parent_refs:
                if str(ref.get("kind") or "Gateway") != "Service":
                    continue
                key = (_ns_of(ref, route.namespace), str(ref["name"]))
                self._gamma.setdefault(key, []).append((route, ref))

    # -- one service -------------------------------------------------------------------------

    def service_routes(
        self, service: Service, port: ServicePort
    ) -> RoutesAndClusters:
        """The routes for requests to ``service`` at ``port``, and the clusters they name."""
        key = (service.namespace, service.name, port.port)
        cached = self._service_routes.get(key)
        if cached is None:
            used: set[str] = set()
            routes = self._gamma_routes(service, port, used)
            if routes is None:
                routes = self._split_routes(service, port, used)
            cached = (tuple(routes), frozenset(used))
            self._service_routes[key] = cached
        return cached

    def split_targets(self, service: Service, port: ServicePort) -> Targets:
        """Where the default routing of ``service:port`` sends traffic (TrafficSplit applied)."""
        split = self.index.splits_of.get((service.namespace, service.name))
        weights: dict[str, int] = {}
        if split is not None:
            for backend in split.backends:
                target = self.index.services.get((service.namespace, backend.service))
                if backend.weight <= 0 or target is None:
                    continue
                target_port = target.port_numbered(port.port)
                if target_port is None:  # SMI: only backends exposing the root port take part
                    continue
                name = self.clusters.service(target, target_port)
                weights[name] = weights.get(name, 0) + backend.weight
        if not weights:
            return ((self.clusters.service(service, port), 1),)
        return tuple(sorted(weights.items()))

    def _split_routes(self, service: Service, port: ServicePort, used: set[str]) -> list[Message]:
        timeout = self.service_timeout([service])
        root = self.clusters.service(service, port)
        used.add(root)
        targets = self.split_targets(service, port)
        used.update(name for name, _ in targets)
        split = self.index.splits_of.get((service.namespace, service.name))
        routes = []
        if split is not None and split.matches and targets != ((root, 1),):
            for group_name in split.matches:
                group = self.index.route_groups.get((split.namespace, group_name), ())
                for match in group:
                    route_name = f"{split.namespace}/{split.name}/{group_name}/{match.get('name')}"
                    routes.append(
                        rc.Route(
                            name=route_name,
                            match=matchers.smi_match(match),
                            route=self._action(targets, timeout, [service]),
                        )
                    )
            targets = ((root, 1),)  # what the split's matches do not select goes to the root
        catch_all = rc.Route(
            match=rc.RouteMatch(prefix="/"), route=self._action(targets, timeout, [service])
        )
        routes.append(catch_all)
        return routes

    def _gamma_routes(
        self, service: Service, port: ServicePort, used: set[str]
    ) -> list[Message] | None:
        attached = [
            route
            for route, ref in self._gamma.get((service.namespace, service.name), ())
            if ref.get("port") in (None, "", port.port)
        ]
        if not attached:
            return None
        return self.http_route_routes(attached, used)

    # -- HTTPRoute rules ---------------------------------------------------------------------

    def http_route_routes(self, routes: Sequence[HTTPRoute], used: set[str]) -> list[Message]:
        """Every rule of ``routes`` as Envoy routes, one per match, most specific first."""
        keyed = []
        for route in sorted(routes, key=lambda r: (r.namespace, r.name)):
            for rule_index, rule in enumerate(route.rules):
                rule_matches = list(rule.get("matches") or ()) or [{}]
                for match_index, match in enumerate(rule_matches):
                    sort_key = (*matchers.precedence(match), route.namespace, route.name,
                                rule_index, match_index)
                    keyed.append((sort_key, self._rule_route(route, rule_index, rule, match, used)))
        keyed.sort(key=lambda item: item[0])
        return [route for _, route in keyed]

    def _rule_route(
        self,
        route: HTTPRoute,
        rule_index: int,
        rule: Mapping[str, Any],
        match: Mapping[str, Any],
        used: set[str],
    ) -> Message:
        where = f"HTTPRoute {route.namespace}/{route.name}: spec.rules[{rule_index}]"
        out = rc.Route(
            name=f"{route.namespace}/{route.name}/rule{rule_index}",
            match=matchers.gateway_match(match),
        )
        filters = list(rule.get("filters") or ())
        redirect = next((f for f in filters if f.get("type") == "RequestRedirect"), None)
        for f in filters:
            kind = f.get("type")
            if kind == "RequestHeaderModifier":
                _modify_headers(f.get("requestHeaderModifier") or {}, out, request=True)
            elif kind == "ResponseHeaderModifier":
                _modify_headers(f.get("responseHeaderModifier") or {}, out, request=False)
        if redirect is not None:
            out.redirect.CopyFrom(_redirect(redirect.get("requestRedirect") or {}, match))
            return out
        refs = list(rule.get("backendRefs") or ())
        targets, services = self._backend_targets(refs, route.namespace)
        if not targets:
            status = NO_BACKENDS_STATUS if not refs else INVALID_BACKENDS_STATUS
            out.direct_response.status = status
            return out
        used.update(name for name, _ in targets)
        action = self._action(targets, self._rule_timeout(rule, services, where), services)
        for f in filters:
            kind = f.get("type")
            if kind == "RequestMirror":
                mirror = self._mirror(f.get("requestMirror") or {}, route.namespace)
                if mirror is not None:
                    used.add(mirror.cluster)
                    action.request_mirror_policies.append(mirror)
            elif kind == "URLRewrite":
                _rewrite(f.get("urlRewrite") or {}, match, action)
        out.route.CopyFrom(action)
        return out

    def _backend_targets(
        self, refs: Sequence[Mapping[str, Any]], namespace: str
    ) -> tuple[Targets, list[Service]]:
        """The weighted clusters of a rule's backendRefs. A backendRef naming the root of a
        TrafficSplit (one without ``matches``) is split over that split's backends, as SMI
        asks of every client, ingress included: each backend gets the ref's weight times its
        share, in integers (each ref's shares are scaled to a common denominator)."""
        shares: list[tuple[int, Targets]] = []
        services: list[Service] = []
        for ref in refs:
            weight = int(ref.get("weight", 1))
            resolved = self.backend_cluster(ref, namespace)
            if resolved is None or weight <= 0:
                continue
            name, service = resolved
            targets: Targets = ((name, 1),)
            if service is not None:
                services.append(service)
                split = self.index.splits_of.get((service.namespace, service.name))
                port = service.find_port(ref.get("port"))
                if split is not None and not split.matches and port is not None:
                    targets = self.split_targets(service, port)
            shares.append((weight, targets))
        denominator = math.lcm(*(sum(w for _, w in t) for _, t in shares)) if shares else 1
        weights: dict[str, int] = {}
        for weight, targets in shares:
            scale = denominator // sum(w for _, w in targets)
            for name, share in targets:
                weights[name] = weights.get(name, 0) + weight * share * scale
        return tuple(sorted(weights.items())), services

    def backend_cluster(
        self, ref: Mapping[str, Any], namespace: str
    ) -> tuple[str, Service | None] | None:
        """The cluster a backendRef names (and its Service), None when it names nothing."""
        kind = str(ref.get("kind") or "Service")
        key = (_ns_of(ref, namespace), str(ref.get("name")))
        if kind == "ExternalService":
            ext = self.index.externals.get(key)
            if ext is None or ref.get("port") not in (None, "", ext.port):
                return None
            return self.clusters.external(ext), None
        service = self.index.services.get(key)
        if service is None:
            return None
        port = service.find_port(ref.get("port"))
        if port is None:
            return None
        return self.clusters.service(service, port), service

    def _mirror(self, mirror: Mapping[str, Any], namespace: str) -> Message | None:
        resolved = self.backend_cluster(mirror.get("backendRef") or {}, namespace)
        if resolved is None:
            return None
        policy = rc.RouteAction.RequestMirrorPolicy(cluster=resolved[0])
        fraction = _mirror_fraction(mirror)
        if fraction is not None:
            policy.runtime_fraction.CopyFrom(base_pb2.RuntimeFractionalPercent(default_value=fraction))
        return policy

    # -- shared ------------------------------------------------------------------------------

    def service_timeout(self, services: Sequence[Service]) -> Message:
        """The largest ``requestTimeout`` of ``services`` (each defaulting to the mesh's)."""
        mesh = self.index.mesh.request_timeout
        best = (mesh, parse_nanos(mesh, "Mesh: spec.defaults.requestTimeout"))
        for i, service in enumerate(services):
            text = service.request_timeout or mesh
            where = f"Service {service.namespace}/{service.name}: spec.requestTimeout"
            nanos = parse_nanos(text, where)
            if i == 0 or nanos > best[1]:
                best = (text, nanos)
        return duration(best[0], "requestTimeout")

    def _rule_timeout(
        self, rule: Mapping[str, Any], services: Sequence[Service], where: str
    ) -> Message:
        timeouts = rule.get("timeouts") or {}
        given = []
        for field in ("request", "backendRequest"):
            text = timeouts.get(field)
            if text:
                nanos = parse_nanos(str(text), f"{where}.timeouts.{field}")
                given.append((nanos == 0, nanos, str(text), field))
        if given:
            # 0 means "no timeout" in Gateway API: a set non-zero timeout wins over it.
            _, _, text, field = min(given)
            return duration(text, f"{where}.timeouts.{field}")
        return self.service_timeout(services)

    def _action(
        self, targets: Targets, timeout: Message, services: Sequence[Service] = ()
    ) -> Message:
        """A RouteAction to ``targets`` with ``timeout`` and the retry policy of ``services``
        (compiler/resilience.py; the mesh's when none is given, e.g. ExternalServices)."""
        action = rc.RouteAction()
        if len(targets) == 1:
            action.cluster = targets[0][0]
        else:
            for name, weight in targets:
                cw = action.weighted_clusters.clusters.add(name=name)
                cw.weight.value = weight
        action.timeout.CopyFrom(timeout)
        retry = resilience.retry_policy(self.index, services)
        if retry is not None:
            action.retry_policy.CopyFrom(retry)
        return action


def _header_value(name: str, value: str, *, overwrite: bool) -> Message:
    option = base_pb2.HeaderValueOption(
        # Envoy expands %COMMAND% in header values; Gateway API values are literal.
        header=base_pb2.HeaderValue(key=name.lower(), value=value.replace("%", "%%")),
        append_action=(
            base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
            if overwrite
            else base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
        ),
    )
    return option


def _modify_headers(spec: Mapping[str, Any], route: Message, *, request: bool) -> None:
    to_add = route.request_headers_to_add if request else route.response_headers_to_add
    to_remove = route.request_headers_to_remove if request else route.response_headers_to_remove
    for header in spec.get("set") or ():
        to_add.append(_header_value(str(header["name"]), str(header["value"]), overwrite=True))
    for header in spec.get("add") or ():
        to_add.append(_header_value(str(header["name"]), str(header["value"]), overwrite=False))
    to_remove.extend(str(name).lower() for name in spec.get("remove") or ())


def _mirror_fraction(mirror: Mapping[str, Any]) -> Message | None:
    """``percent`` (0-100) or ``fraction`` {numerator, denominator (default 100)}; None (every
    request) when neither is given. Other denominators are scaled to per-million."""
    if mirror.get("percent") is not None:
        return percent_pb2.FractionalPercent(
            numerator=int(mirror["percent"]), denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    fraction = mirror.get("fraction")
    if not fraction:
        return None
    numerator = int(fraction.get("numerator", 0))
    denominator = int(fraction.get("denominator") or 100)
    if denominator in _DENOMINATORS:
        return percent_pb2.FractionalPercent(
            numerator=numerator, denominator=_DENOMINATORS[denominator]
        )
    return percent_pb2.FractionalPercent(
        numerator=round(numerator * 1_000_000 / denominator),
        denominator=percent_pb2.FractionalPercent.MILLION,
    )


def _redirect(spec: Mapping[str, Any], match: Mapping[str, Any]) -> Message:
    # Gateway API's default status is 302 (Envoy's is 301).
    code = int(spec.get("statusCode") or 302)
    redirect = rc.RedirectAction(response_code=_REDIRECT_CODES.get(code, rc.RedirectAction.FOUND))
    if spec.get("scheme"):
        redirect.scheme_redirect = str(spec["scheme"])
    if spec.get("hostname"):
        redirect.host_redirect = str(spec["hostname"])
    if spec.get("port"):
        redirect.port_redirect = int(spec["port"])
    path = spec.get("path") or {}
    if path.get("type") == "ReplaceFullPath":
        redirect.path_redirect = str(path.get("replaceFullPath") or "/")
    elif path.get("type") == "ReplacePrefixMatch":
        replaced = matchers.prefix_replacement(match, str(path.get("replacePrefixMatch") or "/"))
        if replaced is not None:
            prefix, regex_rewrite = replaced
            if regex_rewrite is not None:
                redirect.regex_rewrite.CopyFrom(regex_rewrite)
            else:
                redirect.prefix_rewrite = prefix
    return redirect


def _rewrite(spec: Mapping[str, Any], match: Mapping[str, Any], action: Message) -> None:
    if spec.get("hostname"):
        action.host_rewrite_literal = str(spec["hostname"])
    path = spec.get("path") or {}
    if path.get("type") == "ReplaceFullPath":
        action.regex_rewrite.CopyFrom(
            matchers.full_path_replacement(str(path.get("replaceFullPath") or "/"))
        )
    elif path.get("type") == "ReplacePrefixMatch":
        replaced = matchers.prefix_replacement(match, str(path.get("replacePrefixMatch") or "/"))
        if replaced is not None:
            prefix, regex_rewrite = replaced
            if regex_rewrite is not None:
                action.regex_rewrite.CopyFrom(regex_rewrite)
            else:
                action.prefix_rewrite = prefix
