"""envoy.config.route.v3: RouteConfiguration, VirtualHost, Route and the route actions."""

from __future__ import annotations

import os
from typing import Any

from ubimesh.proxy.snapshot.retry import RETRY_ON_NAMES, RetryPolicy, retriable_statuses
from ubimesh.proxy.snapshot.types import (
    DirectResponseAction,
    HashPolicy,
    HashPolicyKind,
    MirrorPolicy,
    PathMatchKind,
    QueryParameterMatcher,
    RedirectAction,
    RegexRewrite,
    Route,
    RouteAction,
    RouteActionKind,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedClusterEntry,
)
from ubimesh.proxy.xds import common, extensions
from ubimesh.proxy.xds.context import Ctx, item, join, seconds, timeout, wrapped
from ubimesh.proxy.xds.local_ratelimit import per_filter_configs
from ubimesh.proxy.xds.tracing import route_decorator, route_tracing

HEADERS = common.HEADER_MUTATION_FIELDS

_NOT_YET = "not implemented yet"

_ROUTE_CONFIGURATION = {
    "name",
    "virtual_hosts",
    "validate_clusters",
    "max_direct_response_body_size_bytes",
    *HEADERS,
    "most_specific_header_mutations_wins",
    "ignore_port_in_host_matching",
}
_ROUTE_CONFIGURATION_HINTS = {
    "vhds": "VHDS is " + _NOT_YET,
    "request_mirror_policies": "set request_mirror_policies on the routes' route actions",
}

_VIRTUAL_HOST = {"name", "domains", "routes", "typed_per_filter_config", "retry_policy", *HEADERS}
_VIRTUAL_HOST_HINTS = {
    "require_tls": "downstream TLS is " + _NOT_YET,
    "retry_policy_typed_config": "retry policy extensions are " + _NOT_YET + "; use retry_policy",
    "hedge_policy": "request hedging is " + _NOT_YET,
    "include_request_attempt_count": "x-envoy-attempt-count is " + _NOT_YET,
    "include_attempt_count_in_response": "x-envoy-attempt-count is " + _NOT_YET,
    "include_is_timeout_retry_header": "x-envoy-is-timeout-retry is " + _NOT_YET,
    "cors": "the CORS filter is " + _NOT_YET,
    "rate_limits": "route rate_limits are " + _NOT_YET + "; put local rate limit actions in "
    "the LocalRateLimit filter's own rate_limits",
    "request_mirror_policies": "set request_mirror_policies on the routes' route actions",
}

_ROUTE = {
    "name",
    "match",
    "route",
    "redirect",
    "direct_response",
    "decorator",
    "tracing",
    "typed_per_filter_config",
    *HEADERS,
}
_ROUTE_HINTS: dict[str, str] = {}

_ROUTE_MATCH = {
    "prefix",
    "path",
    "safe_regex",
    "path_separated_prefix",
    "case_sensitive",
    "headers",
    "query_parameters",
    "grpc",
}
_ROUTE_MATCH_HINTS = {"runtime_fraction": "ubimesh has no runtime"}

_QUERY_PARAMETER_MATCHER = {"name", "string_match", "present_match"}

_ROUTE_ACTION = {
    "cluster",
    "cluster_header",
    "weighted_clusters",
    "prefix_rewrite",
    "regex_rewrite",
    "host_rewrite_literal",
    "auto_host_rewrite",
    "timeout",
    "idle_timeout",
    "request_mirror_policies",
    "hash_policy",
    "upgrade_configs",
    "host_rewrite_header",
    "cluster_not_found_response_code",
    "retry_policy",
}
_ROUTE_ACTION_HINTS = {
    "hedge_policy": "request hedging is " + _NOT_YET,
    "rate_limits": "route rate_limits are " + _NOT_YET + "; put local rate limit actions in "
    "the LocalRateLimit filter's own rate_limits",
    "cors": "the CORS filter is " + _NOT_YET,
    "max_stream_duration": "stream durations are " + _NOT_YET,
}

_RETRY_POLICY = {
    "retry_on",
    "num_retries",
    "per_try_timeout",
    "retry_host_predicate",
    "host_selection_retry_max_attempts",
    "retriable_status_codes",
    "retry_back_off",
    "retry_priority",
}
_RETRY_POLICY_HINTS = {
    "per_try_idle_timeout": "per-try idle timeouts are " + _NOT_YET,
    "retry_options_predicates": "retry options predicates are " + _NOT_YET,
    "rate_limited_retry_back_off": "rate limited retry backoff is "
    + _NOT_YET
    + "; use retry_back_off",
    "retriable_headers": "retriable_headers is " + _NOT_YET + "; use retriable_status_codes",
    "retriable_request_headers": "retriable_request_headers is "
    + _NOT_YET
    + "; give the requests that should be retried a route of their own",
}
_RETRY_BACK_OFF = {"base_interval", "max_interval"}
_RETRY_HOST_PREDICATE = {"name", "typed_config"}
_RETRY_PRIORITY = {"name", "typed_config"}
_PREVIOUS_PRIORITIES = {"update_frequency"}
#: retry_on values Envoy knows that ubimesh refuses, and why.
_RETRY_ON_REFUSED = {
    "retriable-headers": "retriable_headers is " + _NOT_YET,
    "http3-post-connect-failure": "ubimesh has no HTTP/3 upstreams",
}
#: Envoy's retry_on values for gRPC (x-envoy-retry-grpc-on), refused as a group.
_GRPC_RETRY_ON = {"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}

_WEIGHTED_CLUSTER = {"clusters", "total_weight"}
_CLUSTER_WEIGHT = {"name", "weight", *HEADERS}
_CLUSTER_WEIGHT_HINTS = {
    "typed_per_filter_config": "per-route filter configuration (RBACPerRoute) is " + _NOT_YET,
}

_MIRROR = {"cluster", "runtime_fraction", "disable_shadow_host_suffix_append"}
_RUNTIME_FRACTION = {"default_value"}
_RUNTIME_FRACTION_HINTS = {"runtime_key": "ubimesh has no runtime; use default_value alone"}

_HASH_POLICY = {"header", "cookie", "connection_properties", "query_parameter", "terminal"}
_HASH_HEADER = {"header_name"}
_HASH_COOKIE = {"name"}
_HASH_COOKIE_HINTS = {
    "ttl": "generating the cookie is " + _NOT_YET,
    "path": "needs ttl",
    "attributes": "needs ttl",
}
_HASH_CONNECTION = {"source_ip"}
_HASH_QUERY = {"name"}

_UPGRADE = {"upgrade_type", "enabled"}
_UPGRADE_HINTS = {"connect_config": "CONNECT is " + _NOT_YET}

_REDIRECT = {
    "scheme_redirect",
    "https_redirect",
    "host_redirect",
    "port_redirect",
    "path_redirect",
    "prefix_rewrite",
    "regex_rewrite",
    "response_code",
    "strip_query",
}
_DIRECT_RESPONSE = {"status", "body"}
_DATA_SOURCE = {"filename", "inline_bytes", "inline_string"}
_DATA_SOURCE_HINTS = {"environment_variable": "use inline_string or filename"}
_REGEX_REWRITE = {"pattern", "substitution"}

_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}
#: RouteAction.ClusterNotFoundResponseCode: SERVICE_UNAVAILABLE, NOT_FOUND, INTERNAL_SERVER_ERROR.
_CLUSTER_NOT_FOUND_CODES = {0: 503, 1: 404, 2: 500}
_MAX_DIRECT_RESPONSE_BODY = 4096
_UINT32_MAX = 2**32 - 1


def route_configuration(
    ctx: Ctx, msg: Any, path: str, *, dynamic: bool = False
) -> RouteConfiguration:
    """envoy.config.route.v3.RouteConfiguration, inline in an HCM or (``dynamic``) from RDS.
    As in Envoy, ``validate_clusters`` defaults to true inline and to false over RDS."""
    ctx.fields(msg, path, _ROUTE_CONFIGURATION, _ROUTE_CONFIGURATION_HINTS)
    validate_clusters = wrapped(msg, "validate_clusters", not dynamic)
    max_body = wrapped(msg, "max_direct_response_body_size_bytes", _MAX_DIRECT_RESPONSE_BODY)
    rc = _RouteConfigScope(ctx, msg.name, validate_clusters, max_body)
    vhosts_path = join(path, "virtual_hosts")
    vhosts = tuple(
        rc.virtual_host(vh, item(vhosts_path, i)) for i, vh in enumerate(msg.virtual_hosts)
    )
    headers = common.header_mutation(ctx, msg, path)
    return RouteConfiguration(
        name=msg.name,
        virtual_hosts=vhosts,
        headers=headers,
        response_headers_to_remove=headers.response_remove,
        most_specific_header_mutations_wins=msg.most_specific_header_mutations_wins,
        ignore_port_in_host_matching=msg.ignore_port_in_host_matching,
    )


class _RouteConfigScope:
    """What the routes of one route configuration share: the domain set (domains must be unique
    across the whole configuration), whether clusters are validated, the body size limit."""

    def __init__(self, ctx: Ctx, name: str, validate_clusters: bool, max_body: int) -> None:
        self.ctx = ctx
        self.name = name
        self.validate_clusters = validate_clusters
        self.max_body = max_body
        self.domains: dict[str, str] = {}
        self.vhost_retry: RetryPolicy | None = None
        """The retry policy of the virtual host being translated (its routes inherit it)."""

    def refer(self, cluster: str, path: str, what: str) -> None:
        if cluster:
            self.ctx.refer_cluster(cluster, path, what, checked=self.validate_clusters)

    # -- virtual hosts -------------------------------------------------------------------------

    def virtual_host(self, msg: Any, path: str) -> VirtualHost:
        ctx = self.ctx
        ctx.fields(msg, path, _VIRTUAL_HOST, _VIRTUAL_HOST_HINTS)
        domains_path = join(path, "domains")
        domains = []
        for i, domain in enumerate(msg.domains):
            dpath = item(domains_path, i)
            lowered = domain.lower()
            domains.append(lowered)
            if not _valid_wildcard(lowered):
                ctx.error(
                    dpath,
                    f"invalid domain {domain!r}: a wildcard must be a single '*' at "
                    "the start or the end of the domain, or '*' alone (Envoy would take it "
                    "literally, and it could never match)",
                )
            previous = self.domains.get(lowered)
            if previous is not None:
                if lowered == "*":
                    ctx.error(
                        dpath,
                        "only a single wildcard domain '*' is permitted in route "
                        f"configuration {self.name!r} (also at {previous})",
                    )
                else:
                    ctx.error(
                        dpath,
                        f"duplicate domain {lowered!r}: domains must be unique "
                        f"across route configuration {self.name!r} (also at {previous})",
                    )
            else:
                self.domains[lowered] = dpath
        self.vhost_retry = (
            retry_policy(ctx, msg.retry_policy, join(path, "retry_policy"))
            if msg.HasField("retry_policy")
            else None
        )
        routes_path = join(path, "routes")
        routes = tuple(self.route(r, item(routes_path, i)) for i, r in enumerate(msg.routes))
        return VirtualHost(
            name=msg.name,
            domains=tuple(domains),
            routes=routes,
            headers=common.header_mutation(ctx, msg, path),
            typed_per_filter_config=per_filter_configs(
                ctx, msg.typed_per_filter_config, join(path, "typed_per_filter_config")
            ),
        )

    # -- routes --------------------------------------------------------------------------------

    def route(self, msg: Any, path: str) -> Route:
        ctx = self.ctx
        ctx.fields(msg, path, _ROUTE, _ROUTE_HINTS)
        if msg.HasField("match"):
            match = route_match(ctx, msg.match, join(path, "match"))
        else:
            match = RouteMatch(PathMatchKind.PREFIX)  # the constraint check reported it
        which = msg.WhichOneof("action")
        action: RouteActionKind
        if which == "route":
            action = self.route_action(msg.route, join(path, "route"))
        elif which == "redirect":
            action = redirect_action(ctx, msg.redirect, join(path, "redirect"))
        elif which == "direct_response":
            action = self.direct_response(msg.direct_response, join(path, "direct_response"))
        else:
            action = DirectResponseAction(404)  # missing or unsupported: already reported
        decorator, propagate = route_decorator(ctx, msg, path)
        return Route(
            name=msg.name,
            match=match,
            action=action,
            headers=common.header_mutation(ctx, msg, path),
            decorator=decorator,
            decorator_propagate=propagate,
            tracing=route_tracing(ctx, msg.tracing, join(path, "tracing"))
            if msg.HasField("tracing")
            else None,
            typed_per_filter_config=per_filter_configs(
                ctx, msg.typed_per_filter_config, join(path, "typed_per_filter_config")
            ),
        )

    def route_action(self, msg: Any, path: str) -> RouteAction:
        ctx = self.ctx
        ctx.fields(msg, path, _ROUTE_ACTION, _ROUTE_ACTION_HINTS)
        cluster = ""
        cluster_header = ""
        weighted: tuple[WeightedClusterEntry, ...] = ()
        total = 0
        which = msg.WhichOneof("cluster_specifier")
        if which == "cluster":
            cluster = msg.cluster
            self.refer(cluster, join(path, "cluster"), "route")
        elif which == "cluster_header":
            cluster_header = msg.cluster_header.lower()
        elif which == "weighted_clusters":
            weighted, total = self.weighted_clusters(
                msg.weighted_clusters, join(path, "weighted_clusters")
            )
        prefix_rewrite = msg.prefix_rewrite if msg.prefix_rewrite else None
        regex_rewrite = None
        if msg.HasField("regex_rewrite"):
            rpath = join(path, "regex_rewrite")
            if prefix_rewrite is not None:
                ctx.error(path, "specify only one of prefix_rewrite or regex_rewrite")
            regex_rewrite = regex_match_and_substitute(ctx, msg.regex_rewrite, rpath)
        mirrors_path = join(path, "request_mirror_policies")
        mirrors = tuple(
            self.mirror_policy(m, item(mirrors_path, i))
            for i, m in enumerate(msg.request_mirror_policies)
        )
        hash_path = join(path, "hash_policy")
        hashes = tuple(
            h
            for i, p in enumerate(msg.hash_policy)
            if (h := hash_policy(ctx, p, item(hash_path, i))) is not None
        )
        return RouteAction(
            cluster=cluster,
            weighted_clusters=weighted,
            total_weight=total,
            cluster_header=cluster_header,
            prefix_rewrite=prefix_rewrite,
            regex_rewrite=regex_rewrite,
            host_rewrite_literal=msg.host_rewrite_literal,
            auto_host_rewrite=wrapped(msg, "auto_host_rewrite", False),
            timeout=timeout(msg, "timeout", 15.0),
            idle_timeout=seconds(msg.idle_timeout) if msg.HasField("idle_timeout") else None,
            mirror_policies=mirrors,
            hash_policies=hashes,
            host_rewrite_header=msg.host_rewrite_header.lower(),
            cluster_not_found_response_code=_CLUSTER_NOT_FOUND_CODES[
                msg.cluster_not_found_response_code
            ],
            upgrade_websocket=route_upgrades(
                ctx, msg.upgrade_configs, join(path, "upgrade_configs")
            ),
            # As in Envoy, a route's retry policy replaces its virtual host's (no merging).
            retry_policy=retry_policy(ctx, msg.retry_policy, join(path, "retry_policy"))
            if msg.HasField("retry_policy")
            else self.vhost_retry,
        )

    def weighted_clusters(
        self, msg: Any, path: str
    ) -> tuple[tuple[WeightedClusterEntry, ...], int]:
        ctx = self.ctx
        ctx.fields(msg, path, _WEIGHTED_CLUSTER, {"runtime_key_prefix": "ubimesh has no runtime"})
        entries = []
        clusters_path = join(path, "clusters")
        for i, cw in enumerate(msg.clusters):
            cpath = item(clusters_path, i)
            ctx.fields(cw, cpath, _CLUSTER_WEIGHT, _CLUSTER_WEIGHT_HINTS)
            if not cw.name:
                ctx.error(join(cpath, "name"), "is required")
            self.refer(cw.name, join(cpath, "name"), "weighted cluster")
            if not cw.HasField("weight"):
                ctx.error(join(cpath, "weight"), "is required")
            entries.append(
                WeightedClusterEntry(
                    cw.name, cw.weight.value, headers=common.header_mutation(ctx, cw, cpath)
                )
            )
        total = sum(e.weight for e in entries)
        if entries and total == 0:
            ctx.error(clusters_path, "the sum of the weights must be greater than 0")
        if total > _UINT32_MAX:
            ctx.error(clusters_path, f"the sum of the weights ({total}) exceeds {_UINT32_MAX}")
        if msg.HasField("total_weight") and msg.total_weight.value != total:
            ctx.error(
                join(path, "total_weight"),
                f"is {msg.total_weight.value} but the weights add up to {total}; Envoy ignores "
                f"total_weight (it is deprecated) and uses the sum: set it to {total} or remove it",
            )
        return tuple(entries), total

    def mirror_policy(self, msg: Any, path: str) -> MirrorPolicy:
        ctx = self.ctx
        ctx.fields(
            msg,
            path,
            _MIRROR,
            {
                "cluster_header": "use cluster",
                "trace_sampled": "tracing of shadow requests is " + _NOT_YET,
            },
        )
        if not msg.cluster:
            ctx.error(join(path, "cluster"), "is required")
        self.refer(msg.cluster, join(path, "cluster"), "mirror")
        numerator, denominator = 100, 100
        if msg.HasField("runtime_fraction"):
            fpath = join(path, "runtime_fraction")
            ctx.fields(msg.runtime_fraction, fpath, _RUNTIME_FRACTION, _RUNTIME_FRACTION_HINTS)
            numerator, denominator = common.fractional_percent(
                ctx, msg.runtime_fraction.default_value, join(fpath, "default_value")
            )
        return MirrorPolicy(
            msg.cluster,
            numerator=numerator,
            denominator=denominator,
            disable_shadow_host_suffix_append=msg.disable_shadow_host_suffix_append,
        )

    def direct_response(self, msg: Any, path: str) -> DirectResponseAction:
        ctx = self.ctx
        ctx.fields(msg, path, _DIRECT_RESPONSE, {"body_format": "use a plain body"})
        body = None
        if msg.HasField("body"):
            bpath = join(path, "body")
            body = data_source(ctx, msg.body, bpath)
            if body is not None and len(body) > self.max_body:
                ctx.error(
                    bpath,
                    f"response body size is {len(body)} bytes; the maximum is "
                    f"{self.max_body} (max_direct_response_body_size_bytes)",
                )
        return DirectResponseAction(msg.status, body)


def retry_policy(ctx: Ctx, msg: Any, path: str) -> RetryPolicy:
    """envoy.config.route.v3.RetryPolicy, on a route or a virtual host. Unknown retry_on
    values are refused (Envoy ignores them), and so are the gRPC ones (no gRPC upstreams)."""
    ctx.fields(msg, path, _RETRY_POLICY, _RETRY_POLICY_HINTS)
    on_path = join(path, "retry_on")
    names: list[str] = []
    on = 0
    for raw in msg.retry_on.split(","):
        name = raw.strip()
        if not name:
            continue
        bit = RETRY_ON_NAMES.get(name)
        if bit is not None:
            names.append(name)
            on |= bit
        elif name in _RETRY_ON_REFUSED:
            ctx.unsupported(on_path, f"retry_on value {name!r}: {_RETRY_ON_REFUSED[name]}")
        elif name in _GRPC_RETRY_ON:
            ctx.unsupported(
                on_path, f"retry_on value {name!r}: gRPC retry conditions are " + _NOT_YET
            )
        else:
            ctx.error(
                on_path,
                f"unknown retry_on value {name!r} (Envoy would ignore it); use a comma-separated "
                "list of " + ", ".join(sorted(RETRY_ON_NAMES)),
            )
    codes = frozenset(int(c) for c in msg.retriable_status_codes)
    for i, code in enumerate(msg.retriable_status_codes):
        if not 100 <= code <= 599:
            ctx.error(
                item(join(path, "retriable_status_codes"), i),
                f"{code} is not an HTTP status code (100-599)",
            )
    base, maximum = 0.025, 0.25
    if msg.HasField("retry_back_off"):
        bpath = join(path, "retry_back_off")
        ctx.fields(msg.retry_back_off, bpath, _RETRY_BACK_OFF)
        base = seconds(msg.retry_back_off.base_interval)
        maximum = base * 10
        if msg.retry_back_off.HasField("max_interval"):
            maximum = seconds(msg.retry_back_off.max_interval)
            if maximum < base:
                ctx.error(
                    join(bpath, "max_interval"),
                    f"is {maximum:g}s, less than base_interval ({base:g}s); Envoy refuses this: "
                    "make max_interval at least base_interval",
                )
        if base < 0.001:
            ctx.error(join(bpath, "base_interval"), "must be at least 1ms")
    previous_hosts = False
    ppath = join(path, "retry_host_predicate")
    for i, predicate in enumerate(msg.retry_host_predicate):
        ipath = item(ppath, i)
        ctx.fields(predicate, ipath, _RETRY_HOST_PREDICATE)
        if predicate.HasField("typed_config"):
            found = extensions.unpack(
                ctx,
                predicate.typed_config,
                join(ipath, "typed_config"),
                extensions.RETRY_HOST_PREDICATES,
                "as a retry host predicate",
            )
            if found is not None:
                ctx.fields(found, join(ipath, "typed_config"), ())
                previous_hosts = True
        else:
            ctx.error(
                join(ipath, "typed_config"),
                "is required: set it to "
                "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
            )
    update_frequency = 0
    if msg.HasField("retry_priority"):
        rpath = join(path, "retry_priority")
        ctx.fields(msg.retry_priority, rpath, _RETRY_PRIORITY)
        tpath = join(rpath, "typed_config")
        if msg.retry_priority.HasField("typed_config"):
            config = extensions.unpack(
                ctx,
                msg.retry_priority.typed_config,
                tpath,
                extensions.RETRY_PRIORITIES,
                "as a retry priority",
            )
            if config is not None:
                ctx.fields(config, tpath, _PREVIOUS_PRIORITIES)
                update_frequency = config.update_frequency
                if update_frequency <= 0:
                    ctx.error(join(tpath, "update_frequency"), "must be greater than 0")
        else:
            ctx.error(
                tpath,
                "is required: set it to envoy.extensions.retry.priority.previous_priorities.v3"
                ".PreviousPrioritiesConfig",
            )
    attempts = msg.host_selection_retry_max_attempts
    if attempts < 0:
        ctx.error(join(path, "host_selection_retry_max_attempts"), "must not be negative")
    return RetryPolicy(
        retry_on=frozenset(names),
        num_retries=wrapped(msg, "num_retries", 1),
        on=on,
        statuses=retriable_statuses(on, codes),
        per_try_timeout=timeout(msg, "per_try_timeout", None),
        base_interval=base,
        max_interval=maximum,
        previous_hosts=previous_hosts,
        host_selection_max_attempts=max(0, attempts),
        previous_priorities=max(0, update_frequency),
    )


def _valid_wildcard(domain: str) -> bool:
    if "*" not in domain or domain == "*":
        return True
    if domain.startswith("*"):
        return "*" not in domain[1:]
    if domain.endswith("*"):
        return "*" not in domain[:-1]
    return False


def data_source(ctx: Ctx, msg: Any, path: str) -> bytes | None:
    """envoy.config.core.v3.DataSource; a file is read now, as Envoy does."""
    ctx.fields(msg, path, _DATA_SOURCE, _DATA_SOURCE_HINTS)
    which = msg.WhichOneof("specifier")
    if which == "inline_string":
        return bytes(msg.inline_string.encode("utf-8"))
    if which == "inline_bytes":
        return bytes(msg.inline_bytes)
    if which == "filename":
        fpath = join(path, "filename")
        if not msg.filename:
            return None
        if not os.path.isfile(msg.filename):
            ctx.error(fpath, f"file {msg.filename} does not exist")
            return None
        try:
            with open(msg.filename, "rb") as f:
                return f.read()
        except OSError as exc:
            ctx.error(fpath, f"cannot read {msg.filename}: {exc.strerror or exc}")
    return None


def route_match(ctx: Ctx, msg: Any, path: str) -> RouteMatch:
    """envoy.config.route.v3.RouteMatch."""
    ctx.fields(msg, path, _ROUTE_MATCH, _ROUTE_MATCH_HINTS)
    case_sensitive = wrapped(msg, "case_sensitive", True)
    which = msg.WhichOneof("path_specifier")
    regex = None
    value = ""
    if which == "safe_regex":
        kind = PathMatchKind.REGEX
        value = msg.safe_regex.regex
        regex = common.regex_matcher(ctx, msg.safe_regex, join(path, "safe_regex"))
        if not case_sensitive:
            ctx.error(
                join(path, "case_sensitive"),
                "does not apply to safe_regex (Envoy ignores "
                "it); remove it and write (?i) in the regex for a case-insensitive match",
            )
            case_sensitive = True
    elif which in ("prefix", "path", "path_separated_prefix"):
        kind = PathMatchKind(which)
        value = getattr(msg, which)
        if not case_sensitive:
            value = value.lower()
    else:
        kind = PathMatchKind.PREFIX  # missing or unsupported: already reported
    headers_path = join(path, "headers")
    headers = tuple(
        common.header_matcher(ctx, h, item(headers_path, i)) for i, h in enumerate(msg.headers)
    )
    qp_path = join(path, "query_parameters")
    query = tuple(
        query_parameter_matcher(ctx, q, item(qp_path, i))
        for i, q in enumerate(msg.query_parameters)
    )
    if msg.HasField("grpc"):
        ctx.fields(msg.grpc, join(path, "grpc"), ())
    return RouteMatch(
        kind=kind,
        value=value,
        regex=regex,
        case_sensitive=case_sensitive,
        headers=headers,
        query_parameters=query,
        grpc=msg.HasField("grpc"),
    )


def query_parameter_matcher(ctx: Ctx, msg: Any, path: str) -> QueryParameterMatcher:
    """envoy.config.route.v3.QueryParameterMatcher. As in Envoy, ``present_match`` requires the
    parameter to be present whatever its value (false included), and so does a matcher with no
    specifier at all."""
    ctx.fields(msg, path, _QUERY_PARAMETER_MATCHER)
    matcher = None
    if msg.HasField("string_match"):
        matcher = common.string_matcher(ctx, msg.string_match, join(path, "string_match"))
    return QueryParameterMatcher(msg.name, matcher=matcher, present=True)


def regex_match_and_substitute(ctx: Ctx, msg: Any, path: str) -> RegexRewrite | None:
    """envoy.type.matcher.v3.RegexMatchAndSubstitute. The substitution keeps RE2's syntax
    (``\\1`` for a group, ``\\\\`` for a backslash); the request path applies it like RE2's
    GlobalReplace (proxy/routing/redirect.py)."""
    ctx.fields(msg, path, _REGEX_REWRITE)
    if not msg.HasField("pattern"):
        return None
    pattern = common.regex_matcher(ctx, msg.pattern, join(path, "pattern"))
    if pattern is None:
        return None
    common.check_substitution(ctx, pattern, msg.substitution, join(path, "substitution"))
    return RegexRewrite(pattern, msg.substitution)


def hash_policy(ctx: Ctx, msg: Any, path: str) -> HashPolicy | None:
    """envoy.config.route.v3.RouteAction.HashPolicy. ``connection_properties`` with
    ``source_ip: false`` hashes nothing, in Envoy too: it gives no policy."""
    ctx.fields(msg, path, _HASH_POLICY, {"filter_state": "filter state is " + _NOT_YET})
    which = msg.WhichOneof("policy_specifier")
    terminal = msg.terminal
    spath = join(path, which or "")
    if which == "header":
        ctx.fields(msg.header, spath, _HASH_HEADER, {"regex_rewrite": _NOT_YET})
        return HashPolicy(HashPolicyKind.HEADER, msg.header.header_name.lower(), terminal)
    if which == "cookie":
        ctx.fields(msg.cookie, spath, _HASH_COOKIE, _HASH_COOKIE_HINTS)
        return HashPolicy(HashPolicyKind.COOKIE, msg.cookie.name, terminal)
    if which == "connection_properties":
        ctx.fields(msg.connection_properties, spath, _HASH_CONNECTION)
        if not msg.connection_properties.source_ip:
            return None
        return HashPolicy(HashPolicyKind.SOURCE_IP, "", terminal)
    if which == "query_parameter":
        ctx.fields(msg.query_parameter, spath, _HASH_QUERY)
        if not msg.query_parameter.name:
            ctx.error(join(spath, "name"), "must not be empty")
        return HashPolicy(HashPolicyKind.QUERY_PARAMETER, msg.query_parameter.name, terminal)
    return None


def route_upgrades(ctx: Ctx, configs: Any, path: str) -> bool | None:
    """RouteAction.upgrade_configs: the route's websocket override (None: none)."""
    result = None
    seen: set[str] = set()
    for i, config in enumerate(configs):
        upath = item(path, i)
        ctx.fields(config, upath, _UPGRADE, _UPGRADE_HINTS)
        kind = config.upgrade_type.lower()
        if kind in seen:
            ctx.error(join(upath, "upgrade_type"), f"duplicate upgrade {config.upgrade_type}")
        seen.add(kind)
        if kind != "websocket":
            if kind:
                ctx.unsupported(
                    join(upath, "upgrade_type"),
                    f"upgrade type {config.upgrade_type!r}; only websocket is",
                )
            continue
        result = wrapped(config, "enabled", True)
    return result


def redirect_action(ctx: Ctx, msg: Any, path: str) -> RedirectAction:
    """envoy.config.route.v3.RedirectAction."""
    ctx.fields(msg, path, _REDIRECT)
    regex_rewrite = None
    if msg.HasField("regex_rewrite"):
        rpath = join(path, "regex_rewrite")
        regex_rewrite = regex_match_and_substitute(ctx, msg.regex_rewrite, rpath)
    which_path = msg.WhichOneof("path_rewrite_specifier")
    prefix_rewrite = msg.prefix_rewrite if which_path == "prefix_rewrite" else None
    return RedirectAction(
        scheme=msg.scheme_redirect,
        host=msg.host_redirect,
        port=msg.port_redirect,
        path=msg.path_redirect,
        prefix_rewrite=prefix_rewrite,
        regex_rewrite=regex_rewrite,
        response_code=_REDIRECT_CODES.get(msg.response_code, 301),
        strip_query=msg.strip_query,
        https_redirect=msg.https_redirect,
    )
