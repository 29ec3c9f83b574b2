"""Path and host rewrites of a route, and the ``location`` of a redirect, as Envoy builds them.

Path rewrites (``RouteEntryImplBase::currentUrlPathAfterRewriteWithMatchedPath``):

* ``prefix_rewrite`` replaces the part of the path the route matched: the configured prefix
  for ``prefix`` and ``path_separated_prefix`` routes (its length, so a case-insensitive match
  is replaced too), the whole configured path for ``path`` routes, and the whole path without
  its query for ``safe_regex`` routes. What follows (the rest of the path, the query) is kept.
  An empty ``prefix_rewrite`` rewrites nothing, as in Envoy.
* ``regex_rewrite`` replaces every match of the pattern in the path without its query
  (RE2 ``GlobalReplace``: an empty match right after a previous match is skipped), with
  RE2's substitution syntax (``\\0``..``\\9`` for groups, ``\\\\`` for a backslash); the
  query is kept.

The request headers are rewritten after the header rules ran (Envoy's ``finalizeRequestHeaders``
evaluates the rules, then the host rewrite, then the path rewrite), so ``%REQ(:path)%`` in a rule
sees the original path. Envoy also records the original values in ``x-envoy-original-path`` and
``x-envoy-original-host`` unless the router suppresses Envoy headers; that is the router's job.
"""

from __future__ import annotations

import functools
import re

from ubimesh.proxy.snapshot.types import (
    DirectResponseAction,
    PathMatchKind,
    RedirectAction,
    RegexRewrite,
    Route,
    RouteAction,
)


class RewriteError(ValueError):
    """A rewrite Envoy would refuse (an invalid RE2 substitution)."""


Substitution = tuple[str | int, ...]
"""A compiled RE2 substitution: literal strings and group numbers."""


@functools.lru_cache(maxsize=1024)
def compile_substitution(pattern: re.Pattern[str], substitution: str) -> Substitution:
    """Compile an RE2 rewrite string (``\\N`` is group N, ``\\\\`` a backslash; any other
    backslash is an error, and so is a group the pattern does not have)."""
    parts: list[str | int] = []
    literal: list[str] = []
    i = 0
    n = len(substitution)
    while i < n:
        c = substitution[i]
        if c != "\\":
            literal.append(c)
            i += 1
            continue
        nxt = substitution[i + 1] if i + 1 < n else ""
        if nxt == "\\":
            literal.append("\\")
        elif nxt.isdigit() and nxt.isascii():
            group = int(nxt)
            if group > pattern.groups:
                raise RewriteError(
                    f"invalid substitution {substitution!r}: requested group {group} in "
                    f"regexp {pattern.pattern!r} that has {pattern.groups} groups"
                )
            if literal:
                parts.append("".join(literal))
                literal.clear()
            parts.append(group)
        else:
            raise RewriteError(
                f"invalid substitution {substitution!r}: rewrite pattern has a backslash "
                "not followed by a digit or a backslash"
            )
        i += 2
    if literal:
        parts.append("".join(literal))
    return tuple(parts)


def regex_replace_all(pattern: re.Pattern[str], substitution: Substitution, text: str) -> str:
    """RE2's ``GlobalReplace``: replace every non-overlapping match, left to right; an empty
    match at the very end of the previous match is not a match (Python's ``re.sub`` would
    replace it)."""
    out: list[str] = []
    p = 0
    n = len(text)
    last_end = -1
    count = 0
    search = pattern.search
    while p <= n:
        m = search(text, p)
        if m is None:
            break
        start, end = m.span()
        if p < start:
            out.append(text[p:start])
        if start == end and start == last_end:
            if p < n:
                out.append(text[p])
            p += 1
            continue
        for part in substitution:
            if isinstance(part, str):
                out.append(part)
            else:
                out.append(m.group(part) or "")
        p = last_end = end
        count += 1
    if count == 0:
        return text
    if p < n:
        out.append(text[p:])
    return "".join(out)


def _path_end(path: str) -> int:
    """Index where the path part of ``path`` ends (first ``?`` or ``#``)."""
    q = path.find("?")
    h = path.find("#", 0, q if q >= 0 else len(path))
    if h >= 0:
        return h
    return q if q >= 0 else len(path)


def _rewrite(
    route: Route, path: str, prefix_rewrite: str | None, regex_rewrite: RegexRewrite | None
) -> str | None:
    if prefix_rewrite:
        match = route.match
        matched = _path_end(path) if match.kind is PathMatchKind.REGEX else len(match.value)
        return prefix_rewrite + path[matched:]
    if regex_rewrite is not None:
        end = _path_end(path)
        sub = compile_substitution(regex_rewrite.pattern, regex_rewrite.substitution)
        return regex_replace_all(regex_rewrite.pattern, sub, path[:end]) + path[end:]
    return None


def rewrite_path(route: Route, path: str) -> str | None:
    """The path (with query) after the route's ``prefix_rewrite`` / ``regex_rewrite``, or None
    when the route rewrites nothing. ``path`` must be the one the route matched. For a redirect
    route these are the redirect's rewrites."""
    action = route.action
    if isinstance(action, RouteAction | RedirectAction):
        return _rewrite(route, path, action.prefix_rewrite, action.regex_rewrite)
    return None


def rewrite_authority(action: RouteAction, upstream_hostname: str = "") -> str | None:
    """The ``:authority`` to send upstream when the route rewrites it, else None:
    ``host_rewrite_literal``, or with ``auto_host_rewrite`` the upstream host's hostname (when
    it has one)."""
    if action.host_rewrite_literal:
        return action.host_rewrite_literal
    if action.auto_host_rewrite and upstream_hostname:
        return upstream_hostname
    return None


# ---------------------------------------------------------------------------------------------
# Redirects


def _redirect_host(authority: str, new_scheme: str, new_port: str, request_proto: str) -> str:
    # Envoy's processRequestHost: drop the request's port when the redirect sets one, or when
    # the scheme changes and the port is the default one of the request's protocol.
    if not authority:
        return authority
    if authority[0] == "[":
        end = authority.rfind("]:")
        if end >= 0:
            end += 1
    else:
        end = authority.rfind(":")
    if end >= 0:
        port = authority[end:]
        remove = bool(new_port)
        if new_scheme != request_proto:
            remove = (
                remove
                or (request_proto == "https" and port == ":443")
                or (request_proto == "http" and port == ":80")
            )
        if remove:
            return authority[:end]
    return authority


_NO_REDIRECT = RedirectAction()


def direct_response_has_location(status: int) -> bool:
    """Whether Envoy adds a ``location`` to a direct response with this status (201 and 3xx,
    RFC 7231 section 7.1.2)."""
    return status == 201 or 300 <= status < 400


def redirect_location(
    route: Route,
    *,
    scheme: str,
    authority: str,
    path: str,
    forwarded_proto: str | None = None,
) -> str:
    """The ``location`` of the redirect of ``route`` (whose action is a RedirectAction), for a
    request with this ``:scheme``, Host and path (query included), as Envoy's
    ``Http::Utility::newUri`` builds it.

    A DirectResponseAction route is accepted too: Envoy adds a ``location`` built the same way
    with no redirect settings (the request's own URL) to a direct response whose status is 201
    or 3xx (see :func:`direct_response_has_location`).

    ``forwarded_proto`` is the request's x-forwarded-proto after the HCM set it (defaults to
    ``scheme``); it is the scheme kept when the redirect does not set one, and the protocol
    whose default port is dropped from the Host when the scheme changes.

    * scheme: ``scheme_redirect``, else ``https`` for ``https_redirect``, else the request's;
    * host: ``host_redirect`` (the request's port is then dropped), else the request's Host,
      without its port when ``port_redirect`` is set or when the scheme changes and the port is
      the request protocol's default (``:80`` for http, ``:443`` for https);
    * port: ``:port_redirect`` when set;
    * path: ``path_redirect`` (keeping the request's query unless the redirect path has its
      own), else the request path after the redirect's ``prefix_rewrite`` / ``regex_rewrite``;
      a leading ``/`` is added when missing; ``strip_query`` then drops the query, unless it
      came from ``path_redirect``.
    """
    action = route.action
    if isinstance(action, DirectResponseAction):
        action = _NO_REDIRECT
    elif not isinstance(action, RedirectAction):
        raise TypeError(f"route {route.name!r} is not a redirect")
    request_proto = forwarded_proto or scheme
    if action.scheme:
        final_scheme = action.scheme
    elif action.https_redirect:
        final_scheme = "https"
    else:
        final_scheme = request_proto
    port = f":{action.port}" if action.port else ""
    host = action.host or _redirect_host(authority, final_scheme, port, request_proto)
    path_has_query = False
    if action.path:
        path_has_query = "?" in action.path
        if path_has_query:
            final_path = action.path
        else:
            q = path.find("?")
            final_path = action.path if q < 0 else action.path + path[q:]
    else:
        rewritten = _rewrite(route, path, action.prefix_rewrite, action.regex_rewrite)
        final_path = path if rewritten is None else rewritten
    if not final_path.startswith("/"):
        final_path = "/" + final_path
    if action.strip_query and not path_has_query:
        q = final_path.find("?")
        if q >= 0:
            final_path = final_path[:q]
    return f"{final_scheme}://{host}{port}{final_path}"
