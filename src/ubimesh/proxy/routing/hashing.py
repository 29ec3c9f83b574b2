"""Route hash policies: the 64-bit key a RING_HASH or MAGLEV load balancer places a request by.

This is Envoy's ``HashPolicyImpl::generateHash``: the policies are evaluated in order; each one
that yields a value is folded into the key as ``key = rotl64(key, 1) ^ value`` (rotating keeps
two identical policies from cancelling out); a policy marked ``terminal`` stops the evaluation
once a key exists. No policy yielding a value means no key (the load balancer then picks at
random).

Values are hashed with xxHash64, as in Envoy, so that with the same ring a ubimesh proxy sends a
given key to the same host Envoy would:

* header: every value of the header (a request may repeat it), sorted and concatenated (so the
  order of repeated headers does not matter); ``:authority``/``host``, ``:path``, ``:method`` and
  ``:scheme`` can be used;
* cookie: the first cookie of that name in the ``cookie`` headers, with surrounding double quotes
  removed; an empty or absent cookie yields nothing (generating a cookie, ``ttl``, is refused
  by the translator);
* source IP (connection_properties): the downstream peer's IP as text;
* query parameter: its first value, not decoded.
"""

from __future__ import annotations

from collections.abc import Sequence

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.text import query_first_values
from ubimesh.proxy.snapshot.types import HashPolicy, HashPolicyKind
from ubimesh.proxy.upstream.hashing import xxh64

_MASK64 = (1 << 64) - 1
_HEADER = HashPolicyKind.HEADER
_COOKIE = HashPolicyKind.COOKIE
_SOURCE_IP = HashPolicyKind.SOURCE_IP
_QUERY = HashPolicyKind.QUERY_PARAMETER


def cookie_value(headers: Headers, name: str) -> str:
    """The value of cookie ``name`` (Envoy's ``Http::Utility::parseCookieValue``): the first
    ``name=value`` pair across the ``cookie`` headers, names compared exactly, leading spaces
    skipped, a value wrapped in double quotes unwrapped; "" when absent."""
    for header, value in headers.items:
        if header != "cookie":
            continue
        for pair in value.split(";"):
            eq = pair.find("=")
            if eq < 0:
                continue
            if pair[:eq].lstrip(" ") == name:
                v = pair[eq + 1 :]
                if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                    v = v[1:-1]
                return v
    return ""


def _header_values(
    headers: Headers, name: str, path: str, authority: str | None, method: str
) -> list[str]:
    if name[:1] == ":" or name == "host":
        if name in (":authority", "host"):
            if authority is None:
                return headers.get_all("host")
            return [authority] if authority else []
        if name == ":path":
            return [path] if path else []
        if name == ":method":
            return [method] if method else []
    return headers.get_all(name)


def policy_value(
    policy: HashPolicy,
    headers: Headers,
    source_ip: str | None,
    path: str,
    *,
    authority: str | None = None,
    method: str = "",
    query: dict[str, str] | None = None,
) -> int | None:
    """The hash one policy yields for this request, or None."""
    kind = policy.kind
    if kind is _HEADER:
        values = _header_values(headers, policy.name, path, authority, method)
        if not values:
            return None
        if len(values) > 1:
            values.sort()
        return xxh64("".join(values).encode("latin-1"))
    if kind is _COOKIE:
        value = cookie_value(headers, policy.name)
        return xxh64(value.encode("latin-1")) if value else None
    if kind is _SOURCE_IP:
        return xxh64(source_ip.encode("latin-1")) if source_ip else None
    if kind is _QUERY:
        params = query if query is not None else query_first_values(path)
        param = params.get(policy.name)
        return None if param is None else xxh64(param.encode("latin-1"))
    return None


def compute_hash(
    policies: Sequence[HashPolicy],
    headers: Headers,
    source_ip: str | None,
    path: str,
    *,
    authority: str | None = None,
    method: str = "",
) -> int | None:
    """The request's 64-bit hash key under ``policies``, or None when no policy applies.

    ``headers`` are the request headers, ``source_ip`` the downstream peer's IP (``"10.0.0.1"``,
    ``"::1"``), ``path`` the request path with its query. ``authority`` is the Host for
    ``:authority`` policies (None: the ``host`` header); ``method`` serves ``:method``."""
    key: int | None = None
    query: dict[str, str] | None = None
    for policy in policies:
        if policy.kind is _QUERY and query is None:
            query = query_first_values(path)
        value = policy_value(
            policy, headers, source_ip, path, authority=authority, method=method, query=query
        )
        if value is not None:
            key = value if key is None else (((key << 1) | (key >> 63)) & _MASK64) ^ value
        if policy.terminal and key is not None:
            break
    return key
