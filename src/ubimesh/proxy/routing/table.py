"""The route table: virtual host selection and route matching, compiled once per
RouteConfiguration.

Virtual host selection (``RouteMatcher::findVirtualHost`` in Envoy 1.40)
-----------------------------------------------------------------------

The Host (``:authority``) is lower-cased (ASCII) and matched **as given, port included**:
``foo.com:8080`` matches the domain ``foo.com:8080``, not ``foo.com`` (``foo.com:80`` is matched by
``foo.*`` if there is one). Stripping the port is the HTTP connection manager's business
(``strip_matching_host_port`` / ``strip_any_host_port`` rewrite the Host before routing) or the
route configuration's ``ignore_port_in_host_matching``, which the snapshot types do not carry:
pass ``ignore_port_in_host_matching=True`` to get it (the port after the last ``:``, outside IPv6
brackets, is dropped before matching). The precedence is:

1. an exact domain;
2. the longest suffix wildcard (``*.foo.com``, ``*-bar.foo.com``); a wildcard never matches the
   empty string, so ``*.foo.com`` does not match ``.foo.com``;
3. the longest prefix wildcard (``foo.*``, ``foo-*``), same rule;
4. the ``*`` virtual host;

and None when none applies (404). A domain that starts with ``*`` (other than ``*`` itself) is a
suffix wildcard and one that ends with ``*`` a prefix wildcard; a ``*`` elsewhere is literal.
Envoy refuses a domain listed twice (in any case) and two ``*`` virtual hosts; so does
:class:`RouteTable` (:class:`RouteConfigError`).

Route matching (``RouteEntryImplBase::matchRoute``)
---------------------------------------------------

Routes are tried in order and the first that matches wins. A route matches when all of these
hold:

* the path, without query string and fragment: ``prefix`` (starts with), ``path`` (equals),
  ``safe_regex`` (the regex matches the whole path) or ``path_separated_prefix`` (equals, or
  starts with the prefix followed by ``/``); ``case_sensitive: false`` compares ASCII
  case-insensitively and does not apply to ``safe_regex``;
* every header matcher. The request's values of the header are tried one by one and the matcher
  holds when one of them matches (Envoy 1.40 matches each value of a repeated header; it does
  not join them with ``,``), then ``invert_match`` flips the result. A missing header fails
  every matcher except ``present_match: false`` (absent), and with ``invert_match`` only
  ``present_match: true`` matches it; with ``treat_missing_header_as_empty`` a missing header is
  matched as the empty string. ``:method``, ``:authority`` (also ``host``), ``:path`` (with its
  query) and ``:scheme`` are matched from the request line. ``ignore_case`` folds ASCII only
  and does not apply to regexes;
* every query parameter matcher, against the parameter's first value (the query is split on
  ``&`` and ``=``, nothing is decoded); a matcher without a string match requires the parameter
  to be present (``present_match: false``: absent);
* for ``grpc``, a content-type of ``application/grpc`` or ``application/grpc+...``.

Header rules
------------

Envoy applies the header rules from the most specific level to the least specific one, so that
the least specific wins an overwrite: weighted cluster, route, virtual host, route
configuration ("Headers are appended to requests/responses in the following order: weighted
cluster level headers, route level headers, virtual host level headers and finally global
route_config level headers", docs: configuration/http/http_conn_man/headers, "Custom
request/response headers"). With ``most_specific_header_mutations_wins`` the route
configuration, virtual host and route levels run in the reverse order; the weighted cluster
level still runs first (observed with Envoy 1.40). The order is the same for responses.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.formatter import FormatContext
from ubimesh.proxy.routing.headers import HeaderRules, compile_header_mutation
from ubimesh.proxy.routing.redirect import compile_substitution
from ubimesh.proxy.routing.text import ascii_lower, query_first_values, strip_port
from ubimesh.proxy.snapshot.types import (
    HeaderMatcher,
    HeaderMatchKind,
    PathMatchKind,
    QueryParameterMatcher,
    RedirectAction,
    Route,
    RouteAction,
    RouteConfiguration,
    StringMatcher,
    StringMatchKind,
    VirtualHost,
    WeightedClusterEntry,
)


class RouteConfigError(ValueError):
    """A route configuration Envoy would refuse."""


# ---------------------------------------------------------------------------------------------
# String matching

StringTest = Callable[[str], bool]


def string_test(
    kind: StringMatchKind | HeaderMatchKind,
    value: str,
    ignore_case: bool,
    regex: re.Pattern[str] | None,
) -> StringTest:
    """A predicate for Envoy's StringMatcher semantics (exact, prefix, suffix, contains,
    safe_regex as a full match); ``ignore_case`` folds ASCII letters and is ignored for
    regexes."""
    name = kind.value
    if name == "safe_regex":
        if regex is None:
            raise RouteConfigError("safe_regex matcher without a compiled regex")
        fullmatch = regex.fullmatch
        return lambda s: fullmatch(s) is not None
    if ignore_case:
        v = ascii_lower(value)
        if name == "exact":
            return lambda s: len(s) == len(v) and ascii_lower(s) == v
        if name == "prefix":
            return lambda s: ascii_lower(s[: len(v)]) == v
        if name == "suffix":
            return lambda s: len(s) >= len(v) and ascii_lower(s[len(s) - len(v) :]) == v
        if name == "contains":
            return lambda s: v in ascii_lower(s)
    else:
        if name == "exact":
            return lambda s: s == value
        if name == "prefix":
            return lambda s: s.startswith(value)
        if name == "suffix":
            return lambda s: s.endswith(value)
        if name == "contains":
            return lambda s: value in s
    raise RouteConfigError(f"unsupported string match {name!r}")


# ---------------------------------------------------------------------------------------------
# Header and query parameter matchers

# Where a header matcher takes its value from.
_FROM_HEADERS = 0
_FROM_METHOD = 1
_FROM_AUTHORITY = 2
_FROM_PATH = 3
_FROM_SCHEME = 4
_FROM_NOWHERE = 5  # another pseudo-header: never present on an HTTP/1 request

_PSEUDO_SOURCES = {
    ":method": _FROM_METHOD,
    ":authority": _FROM_AUTHORITY,
    "host": _FROM_AUTHORITY,
    ":path": _FROM_PATH,
    ":scheme": _FROM_SCHEME,
}


class _HeaderCheck:
    __slots__ = ("invert", "missing_as_empty", "name", "presence_only", "present", "source", "test")

    def __init__(self, m: HeaderMatcher) -> None:
        name = ascii_lower(m.name)
        self.name = name
        if name in _PSEUDO_SOURCES:
            self.source = _PSEUDO_SOURCES[name]
        elif name.startswith(":"):
            self.source = _FROM_NOWHERE
        else:
            self.source = _FROM_HEADERS
        self.invert = m.invert
        self.missing_as_empty = m.treat_missing_as_empty
        self.presence_only = m.kind in (HeaderMatchKind.PRESENT, HeaderMatchKind.ANY)
        # ANY (no specifier) is "present"; PRESENT carries present_match.
        self.present = True if m.kind is HeaderMatchKind.ANY else m.present
        self.test: StringTest | None = (
            None if self.presence_only else string_test(m.kind, m.value, m.ignore_case, m.regex)
        )

    def matches(
        self, headers: Headers, method: str, path: str, authority: str | None, scheme: str
    ) -> bool:
        source = self.source
        if source == _FROM_HEADERS:
            values = headers.get_all(self.name)
        elif source == _FROM_AUTHORITY:
            if authority is None:
                values = headers.get_all("host")
            else:
                values = [authority] if authority else []
        elif source == _FROM_METHOD:
            values = [method] if method else []
        elif source == _FROM_PATH:
            values = [path] if path else []
        elif source == _FROM_SCHEME:
            values = [scheme] if scheme else []
        else:
            values = []
        if not values:
            if not self.missing_as_empty:
                # Envoy: a missing header only matches "present_match: false", or with
                # invert_match "present_match: true".
                return self.presence_only and (self.present == self.invert)
            values = [""]
        if self.presence_only:
            result = self.present
        else:
            test = self.test
            assert test is not None
            result = False
            for v in values:
                if test(v):
                    result = True
                    break
        return result != self.invert


class _QueryCheck:
    __slots__ = ("name", "present", "test")

    def __init__(self, m: QueryParameterMatcher) -> None:
        self.name = m.name
        self.present = m.present
        matcher: StringMatcher | None = m.matcher
        self.test: StringTest | None = (
            None
            if matcher is None
            else string_test(matcher.kind, matcher.value, matcher.ignore_case, matcher.regex)
        )

    def matches(self, params: dict[str, str]) -> bool:
        value = params.get(self.name)
        if self.test is None:
            return (value is not None) == self.present
        return value is not None and self.test(value)


def is_grpc_request(headers: Headers) -> bool:
    """Envoy's ``Grpc::Common::isGrpcRequestHeaders``: the content-type is ``application/grpc``
    or starts with ``application/grpc+`` (``application/grpc-web`` is not gRPC)."""
    ct = headers.get_first("content-type")
    return ct is not None and ct.startswith("application/grpc") and (len(ct) == 16 or ct[16] == "+")


# ---------------------------------------------------------------------------------------------
# Compiled routes and virtual hosts

_PREFIX = 0
_EXACT = 1
_REGEX = 2
_SEPARATED = 3
_KINDS = {
    PathMatchKind.PREFIX: _PREFIX,
    PathMatchKind.PATH: _EXACT,
    PathMatchKind.REGEX: _REGEX,
    PathMatchKind.PATH_SEPARATED_PREFIX: _SEPARATED,
}


class CompiledRoute:
    """A route with its matchers and header rules compiled."""

    __slots__ = (
        "case_sensitive",
        "cluster_rules",
        "extra",
        "fast_prefix",
        "grpc",
        "headers",
        "kind",
        "query",
        "regex",
        "request_rules",
        "response_rules",
        "route",
        "value",
    )

    def __init__(
        self,
        route: Route,
        levels: tuple[tuple[HeaderRules | None, HeaderRules | None], ...],
        most_specific_wins: bool,
    ) -> None:
        self.route = route
        match = route.match
        self.kind = _KINDS[match.kind]
        self.case_sensitive = match.case_sensitive or self.kind == _REGEX
        self.value = match.value if self.case_sensitive else ascii_lower(match.value)
        self.regex = match.regex
        # A case-sensitive prefix, the common case, is tested inline by the matching loop.
        self.fast_prefix: str | None = (
            self.value if self.kind == _PREFIX and self.case_sensitive else None
        )
        if self.kind == _REGEX and self.regex is None:
            raise RouteConfigError(f"route {route.name!r}: safe_regex without a compiled regex")
        self.headers = tuple(_HeaderCheck(h) for h in match.headers)
        self.query = tuple(_QueryCheck(q) for q in match.query_parameters)
        self.grpc = match.grpc
        self.extra = bool(self.headers or self.query or self.grpc)
        action = route.action
        if isinstance(action, RouteAction | RedirectAction) and action.regex_rewrite is not None:
            try:
                compile_substitution(
                    action.regex_rewrite.pattern, action.regex_rewrite.substitution
                )
            except ValueError as e:
                raise RouteConfigError(f"route {route.name!r}: {e}") from None
        # levels: route, virtual host, route configuration (most to least specific).
        if most_specific_wins:
            levels = levels[::-1]
        self.request_rules = tuple(lv[0] for lv in levels if lv[0] is not None)
        self.response_rules = tuple(lv[1] for lv in levels if lv[1] is not None)
        self.cluster_rules: dict[int, tuple[HeaderRules | None, HeaderRules | None]] = {}
        if isinstance(action, RouteAction):
            for entry in action.weighted_clusters:
                if not entry.headers.empty:
                    self.cluster_rules[id(entry)] = compile_header_mutation(entry.headers)

    def path_matches(self, path: str, lowered: str) -> bool:
        """``path`` is the path without query; ``lowered`` its ASCII lower-case form."""
        kind = self.kind
        p = path if self.case_sensitive else lowered
        if kind == _PREFIX:
            return p.startswith(self.value)
        if kind == _EXACT:
            return p == self.value
        if kind == _SEPARATED:
            v = self.value
            return p.startswith(v) and (len(p) == len(v) or p[len(v)] == "/")
        regex = self.regex
        assert regex is not None
        return regex.fullmatch(path) is not None


class CompiledVirtualHost:
    __slots__ = ("routes", "routes_by_id", "vhost")

    def __init__(self, vhost: VirtualHost, routes: tuple[CompiledRoute, ...]) -> None:
        self.vhost = vhost
        self.routes = routes
        self.routes_by_id = {id(r.route): r for r in routes}


def _compile_vhost(
    vhost: VirtualHost,
    global_levels: tuple[HeaderRules | None, HeaderRules | None],
    most_specific_wins: bool,
) -> CompiledVirtualHost:
    vhost_levels = compile_header_mutation(vhost.headers)
    routes = tuple(
        CompiledRoute(
            r,
            (compile_header_mutation(r.headers), vhost_levels, global_levels),
            most_specific_wins,
        )
        for r in vhost.routes
    )
    return CompiledVirtualHost(vhost, routes)


# ---------------------------------------------------------------------------------------------
# The table


class RouteTable:
    """A RouteConfiguration compiled for the request path. Build it once per configuration;
    it is immutable afterwards and safe to share."""

    __slots__ = (
        "_by_id",
        "_default",
        "_exact",
        "_global_levels",
        "_ignore_port",
        "_most_specific_wins",
        "_prefixes",
        "_suffixes",
        "config",
    )

    def __init__(
        self,
        config: RouteConfiguration,
        *,
        ignore_port_in_host_matching: bool = False,
        most_specific_header_mutations_wins: bool = False,
    ) -> None:
        self.config = config
        self._ignore_port = ignore_port_in_host_matching
        self._most_specific_wins = most_specific_header_mutations_wins
        self._global_levels = compile_header_mutation(
            config.headers, config.response_headers_to_remove
        )
        self._by_id: dict[int, CompiledVirtualHost] = {}
        self._exact: dict[str, CompiledVirtualHost] = {}
        self._default: CompiledVirtualHost | None = None
        suffixes: dict[int, dict[str, CompiledVirtualHost]] = {}
        prefixes: dict[int, dict[str, CompiledVirtualHost]] = {}
        for vhost in config.virtual_hosts:
            compiled = _compile_vhost(
                vhost, self._global_levels, most_specific_header_mutations_wins
            )
            self._by_id[id(vhost)] = compiled
            for raw in vhost.domains:
                domain = ascii_lower(raw)
                if domain == "*":
                    if self._default is not None:
                        raise RouteConfigError(
                            f"Only a single wildcard domain is permitted in route {config.name}"
                        )
                    self._default = compiled
                    continue
                if domain.startswith("*"):
                    key = domain[1:]
                    table = suffixes.setdefault(len(key), {})
                elif domain.endswith("*"):
                    key = domain[:-1]
                    table = prefixes.setdefault(len(key), {})
                else:
                    key = domain
                    table = self._exact
                if key in table:
                    raise RouteConfigError(
                        "Only unique values for domains are permitted. Duplicate entry of "
                        f"domain {domain} in route {config.name}"
                    )
                table[key] = compiled
        # Longest wildcard first.
        self._suffixes = tuple(sorted(suffixes.items(), reverse=True))
        self._prefixes = tuple(sorted(prefixes.items(), reverse=True))

    # -- virtual hosts --------------------------------------------------------------------------

    def _find(self, authority: str) -> CompiledVirtualHost | None:
        host = authority.lower() if authority.isascii() else ascii_lower(authority)
        if self._ignore_port:
            host = strip_port(host)
        found = self._exact.get(host)
        if found is not None:
            return found
        n = len(host)
        for length, table in self._suffixes:
            if length < n:
                found = table.get(host[n - length :])
                if found is not None:
                    return found
        for length, table in self._prefixes:
            if length < n:
                found = table.get(host[:length])
                if found is not None:
                    return found
        return self._default

    def select_virtual_host(self, authority: str) -> VirtualHost | None:
        """The virtual host for a Host (``:authority``) value, as received (with any port)."""
        found = self._find(authority)
        return None if found is None else found.vhost

    def _compiled(self, vhost: VirtualHost) -> CompiledVirtualHost:
        compiled = self._by_id.get(id(vhost))
        if compiled is None or compiled.vhost is not vhost:
            # Not one of this table's virtual hosts: compile it (slow, but correct).
            compiled = _compile_vhost(vhost, self._global_levels, self._most_specific_wins)
        return compiled

    # -- routes ---------------------------------------------------------------------------------

    def match_route(
        self,
        vhost: VirtualHost,
        method: str,
        path: str,
        headers: Headers,
        *,
        authority: str | None = None,
        scheme: str = "http",
    ) -> Route | None:
        """The first route of ``vhost`` that matches, or None (404).

        ``path`` is the request path as routed (normalized by the HCM), query included;
        ``headers`` the request headers. ``authority`` serves ``:authority`` header matchers
        (None: the ``host`` header of ``headers``); ``scheme`` serves ``:scheme``."""
        cvh = self._by_id.get(id(vhost))
        if cvh is None or cvh.vhost is not vhost:
            cvh = self._compiled(vhost)
        compiled = self._match(cvh, method, path, headers, authority, scheme)
        return None if compiled is None else compiled.route

    def _match(
        self,
        cvh: CompiledVirtualHost,
        method: str,
        path: str,
        headers: Headers,
        authority: str | None,
        scheme: str,
    ) -> CompiledRoute | None:
        # The path without query and fragment (Envoy's removeQueryAndFragment).
        q = path.find("?")
        p = path if q < 0 else path[:q]
        if "#" in p:
            p = p[: p.find("#")]
        lowered = ""
        lowered_done = False
        params: dict[str, str] | None = None
        for r in cvh.routes:
            prefix = r.fast_prefix
            if prefix is not None:
                if not p.startswith(prefix):
                    continue
            else:
                if not r.case_sensitive and not lowered_done:
                    lowered = ascii_lower(p)
                    lowered_done = True
                if not r.path_matches(p, lowered):
                    continue
            if r.extra:
                if r.grpc and not is_grpc_request(headers):
                    continue
                ok = True
                for h in r.headers:
                    if not h.matches(headers, method, path, authority, scheme):
                        ok = False
                        break
                if not ok:
                    continue
                if r.query:
                    if params is None:
                        params = query_first_values(path)
                    for qc in r.query:
                        if not qc.matches(params):
                            ok = False
                            break
                    if not ok:
                        continue
            return r
        return None

    def route(
        self,
        authority: str,
        method: str,
        path: str,
        headers: Headers,
        *,
        scheme: str = "http",
    ) -> tuple[VirtualHost, Route] | None:
        """Virtual host selection and route matching in one call; None when either fails."""
        cvh = self._find(authority)
        if cvh is None:
            return None
        compiled = self._match(cvh, method, path, headers, authority, scheme)
        return None if compiled is None else (cvh.vhost, compiled.route)

    # -- header rules ---------------------------------------------------------------------------

    def _compiled_route(self, vhost: VirtualHost, route: Route) -> CompiledRoute:
        cvh = self._compiled(vhost)
        compiled = cvh.routes_by_id.get(id(route))
        if compiled is None or compiled.route is not route:
            raise ValueError(f"route {route.name!r} is not a route of virtual host {vhost.name!r}")
        return compiled

    def request_header_rules(
        self, vhost: VirtualHost, route: Route, cluster: WeightedClusterEntry | None = None
    ) -> tuple[HeaderRules, ...]:
        """The request header rules for a request routed by ``route`` of ``vhost`` (and sent
        to the weighted ``cluster`` entry, if any), in the order to apply them."""
        compiled = self._compiled_route(vhost, route)
        if cluster is not None:
            extra = compiled.cluster_rules.get(id(cluster))
            if extra is not None and extra[0] is not None:
                return (extra[0], *compiled.request_rules)
        return compiled.request_rules

    def response_header_rules(
        self, vhost: VirtualHost, route: Route, cluster: WeightedClusterEntry | None = None
    ) -> tuple[HeaderRules, ...]:
        """The response header rules, in the order to apply them."""
        compiled = self._compiled_route(vhost, route)
        if cluster is not None:
            extra = compiled.cluster_rules.get(id(cluster))
            if extra is not None and extra[1] is not None:
                return (extra[1], *compiled.response_rules)
        return compiled.response_rules

    def apply_request_headers(
        self,
        vhost: VirtualHost,
        route: Route,
        ctx: FormatContext,
        cluster: WeightedClusterEntry | None = None,
    ) -> None:
        """Apply the request header rules to ``ctx.request_headers``."""
        headers = ctx.request_headers
        for rules in self.request_header_rules(vhost, route, cluster):
            rules.apply(headers, ctx)

    def apply_response_headers(
        self,
        vhost: VirtualHost,
        route: Route,
        ctx: FormatContext,
        cluster: WeightedClusterEntry | None = None,
    ) -> None:
        """Apply the response header rules to ``ctx.response_headers`` (which must be set)."""
        headers = ctx.response_headers
        if headers is None:
            raise ValueError("apply_response_headers needs ctx.response_headers")
        for rules in self.response_header_rules(vhost, route, cluster):
            rules.apply(headers, ctx)
