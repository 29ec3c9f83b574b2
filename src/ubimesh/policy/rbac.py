"""The RBAC engine: Envoy's role-based access control, as plain data and one ``evaluate``.

This module is the contract of docs/policy.md section 1. The proxy's RBAC filters
(``envoy.filters.http.rbac``, ``envoy.filters.network.rbac``) and ``ubimesh policy`` both call
``evaluate`` on the same data, which the translator (``ubimesh.proxy.xds.rbac``) makes from
Envoy's protos. It is pure (no protobuf, no I/O) and compiled by mypyc (``native.HOT_MODULES``).

Semantics (Envoy 1.40's ``RoleBasedAccessControlEngineImpl``, checked by differential tests):

* Policies are tried in name order (Envoy keeps them in a ``std::map``); the first one that
  matches decides. A policy matches when one of its permissions and one of its principals
  match.
* ALLOW: allowed iff a policy matches. DENY: denied iff a policy matches. LOG: always allowed.
  ``Decision.policy`` is the matching policy's name, "" when none matched.
* ``IdAuthenticated``: the connection is TLS (``RbacInput.principals`` is not empty); with a
  matcher, one of the peer's names (URI SANs, DNS SANs, then the subject) must match it.
* Header matchers follow Envoy's ``HeaderUtility``, as the router does: each value of a
  repeated header is tried on its own; a missing header matches only ``present_match: false``
  (or, inverted, ``present_match: true``) unless ``treat_missing_header_as_empty``.
* ``PermUrlPath`` matches the path without its query; a request with no path (the network
  filter's input) never matches it.

Speed: the principals and destination checks depend on the connection only.
``for_connection`` decides them once per connection and keeps the policies that can still
match; ``evaluate`` gives the same answer on the cut rules for every request of that connection,
``constant_decision`` tells when no request can change the answer any more, and
``request_reads`` what of a request the rules look at (two requests that agree on it get the
same answer). Matchers are prepared once, when a policy is built (``_StringTest``,
``_HeaderTest``): reading an Enum's ``value`` per request would cost more than the match. A
header lookup that subclasses ``HeaderLookup`` is called directly by compiled code.

The dataclasses define ``__reduce__`` so that a snapshot pickled by the pure-Python translator
loads into the compiled classes (and back).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ubimesh.proxy.routing.text import ascii_lower
from ubimesh.proxy.snapshot.types import (
    HeaderMatcher,
    HeaderMatchKind,
    StringMatcher,
    StringMatchKind,
)


class RbacAction(enum.Enum):
    """envoy.config.rbac.v3.RBAC.Action."""

    ALLOW = "ALLOW"
    DENY = "DENY"
    LOG = "LOG"


# ---------------------------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True, slots=True)
class Cidr:
    """envoy.config.core.v3.CidrRange, ready to test: ``version`` 4 or 6, ``network`` the
    prefix with the host bits cleared, ``mask`` the prefix length as a bit mask; ``text`` is
    ``address/len`` for messages. Build it with ``make_cidr``."""

    version: int
    network: int
    mask: int
    text: str

    def __reduce__(self) -> tuple[Any, ...]:
        return (Cidr, (self.version, self.network, self.mask, self.text))


def make_cidr(address: str, prefix_len: int) -> Cidr:
    """A CidrRange as Envoy builds it: host bits beyond ``prefix_len`` are cleared and a length
    above the address's bit count means the whole address. Raises ValueError for an address
    that is not an IP."""
    ip = ipaddress.ip_address(address)
    bits = 32 if ip.version == 4 else 128
    length = max(0, min(prefix_len, bits))
    mask = ((1 << length) - 1) << (bits - length)
    return Cidr(ip.version, int(ip) & mask, mask, f"{address}/{prefix_len}")


def ip_value(ip: str) -> tuple[int, int]:
    """(version, integer) of an IP address string; (0, 0) when ``ip`` is not one."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return 0, 0
    return parsed.version, int(parsed)


def cidr_contains(cidr: Cidr, ip: str) -> bool:
    """Whether ``ip`` lies in ``cidr`` (an address of the other IP version never does)."""
    version, value = ip_value(ip)
    return version == cidr.version and value & cidr.mask == cidr.network


# ---------------------------------------------------------------------------------------------
# String and header matching (the router's semantics: ubimesh.proxy.routing.table)

# The kinds as module constants, compared by identity: reading an Enum member's ``value``, or a
# member from its class, costs hundreds of nanoseconds; a module constant does not.
_S_EXACT: Final = StringMatchKind.EXACT
_S_PREFIX: Final = StringMatchKind.PREFIX
_S_SUFFIX: Final = StringMatchKind.SUFFIX
_S_CONTAINS: Final = StringMatchKind.CONTAINS
_H_EXACT: Final = HeaderMatchKind.EXACT
_H_PREFIX: Final = HeaderMatchKind.PREFIX
_H_SUFFIX: Final = HeaderMatchKind.SUFFIX
_H_CONTAINS: Final = HeaderMatchKind.CONTAINS
_H_REGEX: Final = HeaderMatchKind.REGEX
_H_PRESENT: Final = HeaderMatchKind.PRESENT
_H_ANY: Final = HeaderMatchKind.ANY

#: Kind codes shared by both matcher kinds.
_EXACT: Final = 0
_PREFIX: Final = 1
_SUFFIX: Final = 2
_CONTAINS: Final = 3
_REGEX: Final = 4
_PRESENCE: Final = 5
_CODES: Final = {"exact": _EXACT, "prefix": _PREFIX, "suffix": _SUFFIX, "contains": _CONTAINS,
                 "safe_regex": _REGEX}  # fmt: skip


class _StringTest:
    """A string matcher ready to test: its kind as a code, the text (lower-cased for
    ``ignore_case``), the compiled regex. Built once with the policy that holds it."""

    __slots__ = ("code", "fold", "regex", "text")

    def __init__(self, code: int, text: str, fold: bool, regex: re.Pattern[str] | None) -> None:
        self.code = code
        self.fold = fold and code != _REGEX
        self.text = ascii_lower(text) if self.fold else text
        self.regex = regex

    def matches(self, s: str) -> bool:
        code = self.code
        if code == _REGEX:
            regex = self.regex
            return regex is not None and regex.fullmatch(s) is not None
        if self.fold:
            s = ascii_lower(s)
        if code == _EXACT:
            return s == self.text
        if code == _PREFIX:
            return s.startswith(self.text)
        if code == _SUFFIX:
            return s.endswith(self.text)
        if code == _CONTAINS:
            return self.text in s
        return False


def _string_test(m: StringMatcher) -> _StringTest:
    kind = m.kind
    if kind is _S_EXACT:
        code = _EXACT
    elif kind is _S_PREFIX:
        code = _PREFIX
    elif kind is _S_SUFFIX:
        code = _SUFFIX
    elif kind is _S_CONTAINS:
        code = _CONTAINS
    else:
        code = _REGEX
    return _StringTest(code, m.value, m.ignore_case, m.regex)


class HeaderLookup:
    """A header lookup (``RbacInput.headers``) that compiled code calls directly: subclass it
    and override ``lookup``, which returns the values as a list (empty when absent). Any other
    callable works as well, through an ordinary call."""

    def lookup(self, name: str) -> list[str]:
        return []

    def __call__(self, name: str) -> Sequence[str]:
        return self.lookup(name)


class _CallableLookup(HeaderLookup):
    """A plain callable as a HeaderLookup."""

    def __init__(self, fn: Callable[[str], Sequence[str]]) -> None:
        self.fn = fn

    def lookup(self, name: str) -> list[str]:
        return list(self.fn(name))


def _lookup_of(headers: Callable[[str], Sequence[str]]) -> HeaderLookup:
    return headers if isinstance(headers, HeaderLookup) else _CallableLookup(headers)


_NO_LOOKUP: Final = HeaderLookup()


class _HeaderTest:
    """A HeaderMatcher ready to test (Envoy's HeaderUtility rules)."""

    __slots__ = ("any", "invert", "missing_empty", "name", "present", "test")

    def __init__(self, m: HeaderMatcher) -> None:
        kind = m.kind
        self.name = m.name
        self.invert = m.invert
        self.missing_empty = m.treat_missing_as_empty
        self.any = kind is _H_ANY
        # "present" for ANY (no specifier) and PRESENT: the presence it requires.
        self.present = True if kind is _H_ANY else m.present
        self.test: _StringTest | None = None
        if kind is _H_EXACT:
            self.test = _StringTest(_EXACT, m.value, m.ignore_case, None)
        elif kind is _H_PREFIX:
            self.test = _StringTest(_PREFIX, m.value, m.ignore_case, None)
        elif kind is _H_SUFFIX:
            self.test = _StringTest(_SUFFIX, m.value, m.ignore_case, None)
        elif kind is _H_CONTAINS:
            self.test = _StringTest(_CONTAINS, m.value, m.ignore_case, None)
        elif kind is _H_REGEX:
            self.test = _StringTest(_REGEX, m.value, False, m.regex)

    def matches(self, headers: HeaderLookup) -> bool:
        values = headers.lookup(self.name)
        test = self.test
        if not values:
            if not self.missing_empty:
                # A missing header matches only "present_match: false" (or, inverted, true).
                return test is None and self.present == self.invert
            values = [""]
        if test is None:
            result = self.present
        elif len(values) == 1:
            result = test.matches(values[0])
        else:
            result = False
            for v in values:
                if test.matches(v):
                    result = True
                    break
        return result != self.invert


def text_matches(
    kind: str, value: str, ignore_case: bool, regex: re.Pattern[str] | None, s: str
) -> bool:
    """Envoy's StringMatcher: ``kind`` is the matcher kind's value ("exact", "prefix",
    "suffix", "contains", "safe_regex"); ``ignore_case`` folds ASCII letters and does not
    apply to regexes, which must match the whole string."""
    code = _CODES.get(kind, _PRESENCE)
    return _StringTest(code, value, ignore_case, regex).matches(s)


def string_matches(m: StringMatcher, s: str) -> bool:
    return _string_test(m).matches(s)


def header_matches(m: HeaderMatcher, headers: Callable[[str], Sequence[str]]) -> bool:
    """Envoy's HeaderMatcher against the values ``headers`` gives for its name."""
    return _HeaderTest(m).matches(_lookup_of(headers))


# ---------------------------------------------------------------------------------------------
# Permissions: what the request is


@dataclass(frozen=True, slots=True)
class PermAny:
    def __reduce__(self) -> tuple[Any, ...]:
        return (PermAny, ())


class PermHeader:
    """``header``: one value of the header matches ``matcher``."""

    __slots__ = ("check", "matcher")

    def __init__(self, matcher: HeaderMatcher) -> None:
        self.matcher = matcher
        self.check = _HeaderTest(matcher)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PermHeader) and other.matcher == self.matcher

    def __hash__(self) -> int:
        return hash(("PermHeader", self.matcher))

    def __repr__(self) -> str:
        return f"PermHeader(matcher={self.matcher!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PermHeader, (self.matcher,))


class PermUrlPath:
    """``url_path``: the path without its query matches ``matcher``."""

    __slots__ = ("check", "matcher")

    def __init__(self, matcher: StringMatcher) -> None:
        self.matcher = matcher
        self.check = _string_test(matcher)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PermUrlPath) and other.matcher == self.matcher

    def __hash__(self) -> int:
        return hash(("PermUrlPath", self.matcher))

    def __repr__(self) -> str:
        return f"PermUrlPath(matcher={self.matcher!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PermUrlPath, (self.matcher,))


@dataclass(frozen=True, slots=True)
class PermDestinationPort:
    port: int

    def __reduce__(self) -> tuple[Any, ...]:
        return (PermDestinationPort, (self.port,))


@dataclass(frozen=True, slots=True)
class PermDestinationIp:
    cidr: Cidr

    def __reduce__(self) -> tuple[Any, ...]:
        return (PermDestinationIp, (self.cidr,))


@dataclass(frozen=True, slots=True)
class PermAnd:
    rules: tuple[Permission, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return (PermAnd, (self.rules,))


@dataclass(frozen=True, slots=True)
class PermOr:
    rules: tuple[Permission, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return (PermOr, (self.rules,))


@dataclass(frozen=True, slots=True)
class PermNot:
    rule: Permission

    def __reduce__(self) -> tuple[Any, ...]:
        return (PermNot, (self.rule,))


Permission = (
    PermAny
    | PermHeader
    | PermUrlPath
    | PermDestinationPort
    | PermDestinationIp
    | PermAnd
    | PermOr
    | PermNot
)


# ---------------------------------------------------------------------------------------------
# Principals: who the caller is


@dataclass(frozen=True, slots=True)
class IdAny:
    def __reduce__(self) -> tuple[Any, ...]:
        return (IdAny, ())


class IdAuthenticated:
    """``authenticated``: None matches any TLS connection."""

    __slots__ = ("check", "matcher")

    def __init__(self, matcher: StringMatcher | None) -> None:
        self.matcher = matcher
        self.check = None if matcher is None else _string_test(matcher)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdAuthenticated) and other.matcher == self.matcher

    def __hash__(self) -> int:
        return hash(("IdAuthenticated", self.matcher))

    def __repr__(self) -> str:
        return f"IdAuthenticated(matcher={self.matcher!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (IdAuthenticated, (self.matcher,))


class IdHeader:
    """``header`` as a principal."""

    __slots__ = ("check", "matcher")

    def __init__(self, matcher: HeaderMatcher) -> None:
        self.matcher = matcher
        self.check = _HeaderTest(matcher)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdHeader) and other.matcher == self.matcher

    def __hash__(self) -> int:
        return hash(("IdHeader", self.matcher))

    def __repr__(self) -> str:
        return f"IdHeader(matcher={self.matcher!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (IdHeader, (self.matcher,))


@dataclass(frozen=True, slots=True)
class IdSourceIp:
    """``source_ip`` (deprecated in Envoy): the connection's remote address, which without the
    PROXY protocol is the direct remote address."""

    cidr: Cidr

    def __reduce__(self) -> tuple[Any, ...]:
        return (IdSourceIp, (self.cidr,))


@dataclass(frozen=True, slots=True)
class IdDirectRemoteIp:
    cidr: Cidr

    def __reduce__(self) -> tuple[Any, ...]:
        return (IdDirectRemoteIp, (self.cidr,))


@dataclass(frozen=True, slots=True)
class IdRemoteIp:
    """``remote_ip``: the downstream address after x-forwarded-for processing."""

    cidr: Cidr

    def __reduce__(self) -> tuple[Any, ...]:
        return (IdRemoteIp, (self.cidr,))


@dataclass(frozen=True, slots=True)
class IdAnd:
    ids: tuple[Principal, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return (IdAnd, (self.ids,))


@dataclass(frozen=True, slots=True)
class IdOr:
    ids: tuple[Principal, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return (IdOr, (self.ids,))


@dataclass(frozen=True, slots=True)
class IdNot:
    id: Principal

    def __reduce__(self) -> tuple[Any, ...]:
        return (IdNot, (self.id,))


Principal = (
    IdAny
    | IdAuthenticated
    | IdHeader
    | IdSourceIp
    | IdDirectRemoteIp
    | IdRemoteIp
    | IdAnd
    | IdOr
    | IdNot
)


# ---------------------------------------------------------------------------------------------
# Policies, rules, one filter's configuration


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    permissions: tuple[Permission, ...]
    principals: tuple[Principal, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return (Policy, (self.name, self.permissions, self.principals))


@dataclass(frozen=True, slots=True)
class RbacRules:
    """envoy.config.rbac.v3.RBAC. ``policies`` are sorted by name (``sorted_rules`` does it)."""

    action: RbacAction
    policies: tuple[Policy, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return (RbacRules, (self.action, self.policies))


def sorted_rules(action: RbacAction, policies: Sequence[Policy]) -> RbacRules:
    """RbacRules with ``policies`` in Envoy's order (by name, as a std::map keeps them)."""
    return RbacRules(action, tuple(sorted(policies, key=_policy_name)))


def _policy_name(policy: Policy) -> str:
    return policy.name


@dataclass(frozen=True, slots=True)
class RbacConfig:
    """One RBAC filter: ``rules`` are enforced (None: nothing is), ``shadow_rules`` are
    evaluated and counted only. The stat prefixes are inserted after ``rbac.`` in the stat
    names, as Envoy does. ``track_per_rule_stats`` is the HTTP filter's option of that name."""

    rules: RbacRules | None
    shadow_rules: RbacRules | None
    rules_stat_prefix: str = ""
    shadow_rules_stat_prefix: str = ""
    track_per_rule_stats: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            RbacConfig,
            (
                self.rules,
                self.shadow_rules,
                self.rules_stat_prefix,
                self.shadow_rules_stat_prefix,
                self.track_per_rule_stats,
            ),
        )


# ---------------------------------------------------------------------------------------------
# What one evaluation sees, and its answer


def no_headers(name: str) -> Sequence[str]:
    """The header lookup of a connection (the network filter): no header at all."""
    return ()


@dataclass(slots=True)
class RbacInput:
    """What one evaluation sees; built once per request (HTTP) or once per connection (network
    filter: method and path empty, no headers).

    ``path`` is the path the router forwards (after normalize_path, merge_slashes and the
    escaped-slashes action) without the query string. ``headers`` maps a lower-case name to
    its values, each value of a repeated header separately (Envoy matches them one by one;
    the headers Envoy folds into one, such as x-forwarded-for, come as one value), including
    ``:method``, ``:path`` (with the query), ``:authority`` (also under ``host``) and
    ``:scheme``. ``principals`` are the TLS peer's names in Envoy's order: URI SANs, DNS SANs,
    then the subject; ``()`` for a plaintext connection, ``("",)`` (the empty subject) for TLS
    without a client certificate.

    Not frozen: the proxy keeps one per connection and sets the request's fields on it (a
    compiled dataclass still runs the interpreted ``__init__`` of ``dataclasses``, too slow to
    build one per request)."""

    method: str
    path: str
    headers: Callable[[str], Sequence[str]]
    destination_ip: str
    destination_port: int
    direct_remote_ip: str
    remote_ip: str
    principals: tuple[str, ...]


class Decision:
    """``policy``: the deciding policy's name, "" when none matched. Immutable by convention;
    a plain class for the same reason as RbacInput."""

    __slots__ = ("allowed", "policy")

    def __init__(self, allowed: bool, policy: str) -> None:
        self.allowed = allowed
        self.policy = policy

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Decision)
            and other.allowed == self.allowed
            and other.policy == self.policy
        )

    def __hash__(self) -> int:
        return hash((self.allowed, self.policy))

    def __repr__(self) -> str:
        return f"Decision(allowed={self.allowed!r}, policy={self.policy!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Decision, (self.allowed, self.policy))


_ALLOW: Final = RbacAction.ALLOW
_DENY: Final = RbacAction.DENY
_ALLOWED_BY_DEFAULT = Decision(True, "")
_DENIED_BY_DEFAULT = Decision(False, "")


def evaluate(rules: RbacRules, request: RbacInput) -> Decision:
    """Envoy's decision for ``request`` under ``rules`` (see the module docstring)."""
    lookup = _lookup_of(request.headers)
    for policy in rules.policies:
        if _policy_matches(policy, request, lookup):
            return Decision(rules.action is not _DENY, policy.name)
    if rules.action is _ALLOW:
        return _DENIED_BY_DEFAULT
    return _ALLOWED_BY_DEFAULT


def _policy_matches(policy: Policy, request: RbacInput, lookup: HeaderLookup) -> bool:
    for permission in policy.permissions:
        if _permission_matches(permission, request, lookup):
            break
    else:
        return False
    for principal in policy.principals:  # noqa: SIM110 (a loop: any() would build a generator per call)
        if _principal_matches(principal, request, lookup):
            return True
    return False


def _permission_matches(p: Permission, request: RbacInput, lookup: HeaderLookup) -> bool:
    if isinstance(p, PermAny):
        return True
    if isinstance(p, PermHeader):
        return p.check.matches(lookup)
    if isinstance(p, PermUrlPath):
        path = request.path
        return bool(path) and p.check.matches(path)
    if isinstance(p, PermDestinationPort):
        return request.destination_port == p.port
    if isinstance(p, PermDestinationIp):
        return cidr_contains(p.cidr, request.destination_ip)
    if isinstance(p, PermAnd):
        for rule in p.rules:  # noqa: SIM110 (a loop: any() would build a generator per call)
            if not _permission_matches(rule, request, lookup):
                return False
        return True
    if isinstance(p, PermOr):
        for rule in p.rules:  # noqa: SIM110 (a loop: any() would build a generator per call)
            if _permission_matches(rule, request, lookup):
                return True
        return False
    return not _permission_matches(p.rule, request, lookup)


def _principal_matches(p: Principal, request: RbacInput, lookup: HeaderLookup) -> bool:
    if isinstance(p, IdAny):
        return True
    if isinstance(p, IdAuthenticated):
        return authenticated_matches(p, request.principals)
    if isinstance(p, IdHeader):
        return p.check.matches(lookup)
    if isinstance(p, (IdSourceIp, IdDirectRemoteIp)):
        return cidr_contains(p.cidr, request.direct_remote_ip)
    if isinstance(p, IdRemoteIp):
        return cidr_contains(p.cidr, request.remote_ip)
    if isinstance(p, IdAnd):
        for one in p.ids:  # noqa: SIM110 (a loop: any() would build a generator per call)
            if not _principal_matches(one, request, lookup):
                return False
        return True
    if isinstance(p, IdOr):
        for one in p.ids:  # noqa: SIM110 (a loop: any() would build a generator per call)
            if _principal_matches(one, request, lookup):
                return True
        return False
    return not _principal_matches(p.id, request, lookup)


def authenticated_matches(p: IdAuthenticated, principals: tuple[str, ...]) -> bool:
    """Envoy's AuthenticatedMatcher: any TLS connection without a matcher; with one, some
    URI SAN, DNS SAN or the subject must match it."""
    check = p.check
    if check is None:
        return len(principals) > 0
    for name in principals:  # noqa: SIM110 (a loop: any() would build a generator per call)
        if check.matches(name):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Deciding per connection what the connection alone decides

# Three-valued results of the connection cut: a node the connection decides becomes one of
# these; one that needs the request stays (simplified).
_YES = 1
_NO = 0


def for_connection(rules: RbacRules, conn: RbacInput) -> RbacRules:
    """``rules`` cut for one connection: what depends on the connection only (principals,
    direct remote address, destination address and port) is decided with ``conn`` (its method,
    path, headers and remote_ip are not looked at); policies that can no longer match are
    dropped, and a decided part becomes ``PermAny``/``IdAny``. For every request on that
    connection, ``evaluate`` on the result equals ``evaluate`` on ``rules``."""
    kept: list[Policy] = []
    for policy in rules.policies:
        perms = _cut_permissions(policy.permissions, conn)
        if not perms:
            continue
        ids = _cut_principals(policy.principals, conn)
        if not ids:
            continue
        kept.append(Policy(policy.name, perms, ids))
    return RbacRules(rules.action, tuple(kept))


def constant_decision(rules: RbacRules) -> Decision | None:
    """The decision every request gets under ``rules`` when it does not depend on the request
    (no policy left, or the first policy matches anything); None otherwise."""
    policies = rules.policies
    if not policies:
        return _DENIED_BY_DEFAULT if rules.action is _ALLOW else _ALLOWED_BY_DEFAULT
    first = policies[0]
    if (
        len(first.permissions) == 1
        and isinstance(first.permissions[0], PermAny)
        and len(first.principals) == 1
        and isinstance(first.principals[0], IdAny)
    ):
        return Decision(rules.action is not _DENY, first.name)
    return None


class RequestReads:
    """What ``evaluate`` can read of a request under some rules, besides what the connection
    decides: the path, the values of these headers, the remote address. Two requests that agree
    on these get the same decision (the proxy keeps decisions by them, per connection)."""

    __slots__ = ("header_names", "path", "remote_ip")

    def __init__(self, path: bool, header_names: tuple[str, ...], remote_ip: bool) -> None:
        self.path = path
        self.header_names = header_names
        self.remote_ip = remote_ip


def request_reads(rules: RbacRules) -> RequestReads:
    """What of a request ``rules`` look at (see RequestReads)."""
    names: list[str] = []
    flags = [False, False]  # path, remote ip
    for policy in rules.policies:
        for perm in policy.permissions:
            _perm_reads(perm, names, flags)
        for principal in policy.principals:
            _principal_reads(principal, names, flags)
    return RequestReads(flags[0], tuple(names), flags[1])


def _perm_reads(p: Permission, names: list[str], flags: list[bool]) -> None:
    if isinstance(p, PermHeader):
        if p.matcher.name not in names:
            names.append(p.matcher.name)
    elif isinstance(p, PermUrlPath):
        flags[0] = True
    elif isinstance(p, (PermAnd, PermOr)):
        for rule in p.rules:
            _perm_reads(rule, names, flags)
    elif isinstance(p, PermNot):
        _perm_reads(p.rule, names, flags)


def _principal_reads(p: Principal, names: list[str], flags: list[bool]) -> None:
    if isinstance(p, IdHeader):
        if p.matcher.name not in names:
            names.append(p.matcher.name)
    elif isinstance(p, IdRemoteIp):
        flags[1] = True
    elif isinstance(p, (IdAnd, IdOr)):
        for one in p.ids:
            _principal_reads(one, names, flags)
    elif isinstance(p, IdNot):
        _principal_reads(p.id, names, flags)


def _cut_permissions(perms: tuple[Permission, ...], conn: RbacInput) -> tuple[Permission, ...]:
    """The permissions that may still match (``(PermAny(),)`` if one surely does)."""
    out: list[Permission] = []
    for p in perms:
        cut = _cut_permission(p, conn)
        if isinstance(cut, int):
            if cut == _YES:
                return (PermAny(),)
            continue
        out.append(cut)
    return tuple(out)


def _cut_permission(p: Permission, conn: RbacInput) -> Permission | int:
    if isinstance(p, PermAny):
        return _YES
    if isinstance(p, (PermDestinationPort, PermDestinationIp)):
        return _YES if _permission_matches(p, conn, _NO_LOOKUP) else _NO
    if isinstance(p, PermAnd):
        rest: list[Permission] = []
        for rule in p.rules:
            cut = _cut_permission(rule, conn)
            if isinstance(cut, int):
                if cut == _NO:
                    return _NO
                continue
            rest.append(cut)
        if not rest:
            return _YES
        return rest[0] if len(rest) == 1 else PermAnd(tuple(rest))
    if isinstance(p, PermOr):
        rest = []
        for rule in p.rules:
            cut = _cut_permission(rule, conn)
            if isinstance(cut, int):
                if cut == _YES:
                    return _YES
                continue
            rest.append(cut)
        if not rest:
            return _NO
        return rest[0] if len(rest) == 1 else PermOr(tuple(rest))
    if isinstance(p, PermNot):
        cut = _cut_permission(p.rule, conn)
        if isinstance(cut, int):
            return _NO if cut == _YES else _YES
        return PermNot(cut)
    return p  # header, url_path: the request decides


def _cut_principals(ids: tuple[Principal, ...], conn: RbacInput) -> tuple[Principal, ...]:
    out: list[Principal] = []
    for p in ids:
        cut = _cut_principal(p, conn)
        if isinstance(cut, int):
            if cut == _YES:
                return (IdAny(),)
            continue
        out.append(cut)
    return tuple(out)


def _cut_principal(p: Principal, conn: RbacInput) -> Principal | int:
    if isinstance(p, (IdAny, IdAuthenticated, IdSourceIp, IdDirectRemoteIp)):
        return _YES if _principal_matches(p, conn, _NO_LOOKUP) else _NO
    if isinstance(p, IdAnd):
        rest: list[Principal] = []
        for one in p.ids:
            cut = _cut_principal(one, conn)
            if isinstance(cut, int):
                if cut == _NO:
                    return _NO
                continue
            rest.append(cut)
        if not rest:
            return _YES
        return rest[0] if len(rest) == 1 else IdAnd(tuple(rest))
    if isinstance(p, IdOr):
        rest = []
        for one in p.ids:
            cut = _cut_principal(one, conn)
            if isinstance(cut, int):
                if cut == _YES:
                    return _YES
                continue
            rest.append(cut)
        if not rest:
            return _NO
        return rest[0] if len(rest) == 1 else IdOr(tuple(rest))
    if isinstance(p, IdNot):
        cut = _cut_principal(p.id, conn)
        if isinstance(cut, int):
            return _NO if cut == _YES else _YES
        return IdNot(cut)
    return p  # header, remote_ip: the request decides
