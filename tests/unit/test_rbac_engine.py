"""The RBAC engine (ubimesh.policy.rbac): Envoy's semantics on plain data, the per-connection
cut giving the same answers as the full rules, and matchers equal to the router's."""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubimesh.policy.rbac import (
    Decision,
    IdAnd,
    IdAny,
    IdAuthenticated,
    IdDirectRemoteIp,
    IdHeader,
    IdNot,
    IdOr,
    IdRemoteIp,
    IdSourceIp,
    PermAnd,
    PermAny,
    PermDestinationIp,
    PermDestinationPort,
    PermHeader,
    Permission,
    PermNot,
    PermOr,
    PermUrlPath,
    Policy,
    Principal,
    RbacAction,
    RbacInput,
    RbacRules,
    cidr_contains,
    constant_decision,
    evaluate,
    for_connection,
    make_cidr,
    no_headers,
    request_reads,
    sorted_rules,
    text_matches,
)
from ubimesh.policy.rbac import _lookup_of as _lookup_of
from ubimesh.proto.headers import Headers
from ubimesh.proxy.http.rbac import MEMO_SIZE, CutRules
from ubimesh.proxy.routing.table import _HeaderCheck, string_test
from ubimesh.proxy.snapshot.types import (
    HeaderMatcher,
    HeaderMatchKind,
    StringMatcher,
    StringMatchKind,
)

WEB = "spiffe://example.org/ns/shop/sa/web"
API = "spiffe://example.org/ns/shop/sa/api"


def exact(value: str) -> StringMatcher:
    return StringMatcher(StringMatchKind.EXACT, value)


def hdr(name: str, value: str, **kw: object) -> HeaderMatcher:
    return HeaderMatcher(name, HeaderMatchKind.EXACT, value, **kw)  # type: ignore[arg-type]


def request(
    *,
    method: str = "GET",
    path: str = "/",
    headers: dict[str, Sequence[str]] | None = None,
    dst: tuple[str, int] = ("127.0.0.1", 8080),
    src: str = "127.0.0.1",
    remote: str | None = None,
    principals: tuple[str, ...] = (),
) -> RbacInput:
    values = dict(headers or {})
    values.setdefault(":method", (method,))
    values.setdefault(":path", (path,))
    return RbacInput(
        method=method,
        path=path.partition("?")[0],
        headers=lambda name: values.get(name, ()),
        destination_ip=dst[0],
        destination_port=dst[1],
        direct_remote_ip=src,
        remote_ip=src if remote is None else remote,
        principals=principals,
    )


def policy(name: str, perms: Sequence[Permission], ids: Sequence[Principal]) -> Policy:
    return Policy(name, tuple(perms), tuple(ids))


def rules(action: RbacAction, *policies: Policy) -> RbacRules:
    return sorted_rules(action, policies)


ANY_POLICY = (PermAny(),), (IdAny(),)

# -- actions and policy order ---------------------------------------------------------------------


def test_allow_allows_only_what_a_policy_matches() -> None:
    r = rules(RbacAction.ALLOW, policy("get", [PermHeader(hdr(":method", "GET"))], [IdAny()]))
    assert evaluate(r, request(method="GET")) == Decision(True, "get")
    assert evaluate(r, request(method="POST")) == Decision(False, "")


def test_deny_denies_what_a_policy_matches() -> None:
    r = rules(RbacAction.DENY, policy("admin", [PermUrlPath(exact("/admin"))], [IdAny()]))
    assert evaluate(r, request(path="/admin?x=1")) == Decision(False, "admin")
    assert evaluate(r, request(path="/admin/")) == Decision(True, "")


def test_log_always_allows_and_names_the_match() -> None:
    r = rules(RbacAction.LOG, policy("p", [PermDestinationPort(1)], [IdAny()]))
    assert evaluate(r, request(dst=("127.0.0.1", 1))) == Decision(True, "p")
    assert evaluate(r, request()) == Decision(True, "")


def test_no_policies() -> None:
    assert evaluate(rules(RbacAction.ALLOW), request()) == Decision(False, "")
    assert evaluate(rules(RbacAction.DENY), request()) == Decision(True, "")


def test_policies_are_tried_in_name_order_not_config_order() -> None:
    # Envoy keeps policies in a std::map: "a" is tried before "b" whatever the YAML order.
    late = policy("b-late", [PermAny()], [IdAny()])
    early = policy("a-early", [PermAny()], [IdAny()])
    r = sorted_rules(RbacAction.DENY, [late, early])
    assert [p.name for p in r.policies] == ["a-early", "b-late"]
    assert evaluate(r, request()).policy == "a-early"
    # Byte order, as std::string compares: upper case before lower case, "10" before "9".
    r = sorted_rules(RbacAction.ALLOW, [policy(n, *ANY_POLICY) for n in ("p9", "p10", "Z")])
    assert evaluate(r, request()).policy == "Z"
    assert [p.name for p in r.policies] == ["Z", "p10", "p9"]


def test_a_policy_needs_a_permission_and_a_principal() -> None:
    p = policy("p", [PermDestinationPort(1), PermAny()], [IdSourceIp(make_cidr("10.0.0.0", 8))])
    r = rules(RbacAction.ALLOW, p)
    assert not evaluate(r, request(src="127.0.0.1")).allowed
    assert evaluate(r, request(src="10.9.9.9")).allowed


# -- permissions ----------------------------------------------------------------------------------


def test_and_or_not_permissions() -> None:
    get = PermHeader(hdr(":method", "GET"))
    api = PermUrlPath(StringMatcher(StringMatchKind.PREFIX, "/api/"))
    port = PermDestinationPort(8080)
    perm = PermAnd((get, PermOr((api, PermNot(port)))))
    r = rules(RbacAction.ALLOW, policy("p", [perm], [IdAny()]))
    assert evaluate(r, request(path="/api/x")).allowed
    assert not evaluate(r, request(path="/web")).allowed
    assert evaluate(r, request(path="/web", dst=("127.0.0.1", 9090))).allowed
    assert not evaluate(r, request(method="POST", path="/api/x")).allowed


def test_destination_ip() -> None:
    r = rules(
        RbacAction.ALLOW, policy("p", [PermDestinationIp(make_cidr("127.0.0.0", 24))], [IdAny()])
    )
    assert evaluate(r, request(dst=("127.0.0.9", 1))).allowed
    assert not evaluate(r, request(dst=("127.0.1.9", 1))).allowed
    assert not evaluate(r, request(dst=("::1", 1))).allowed  # other IP version


def test_url_path_ignores_the_query_and_never_matches_without_a_path() -> None:
    anything = PermUrlPath(StringMatcher(StringMatchKind.REGEX, ".*", regex=re.compile(".*")))
    r = rules(RbacAction.ALLOW, policy("p", [anything], [IdAny()]))
    assert evaluate(r, request(path="/")).allowed
    network = request(method="", path="")
    assert not evaluate(r, network).allowed
    q = rules(RbacAction.ALLOW, policy("p", [PermUrlPath(exact("/a"))], [IdAny()]))
    assert evaluate(q, request(path="/a?b=/c")).allowed


def test_header_values_are_matched_one_by_one() -> None:
    # Envoy 1.40: a repeated header matches when one of its values does (never "1,2").
    one = rules(RbacAction.ALLOW, policy("p", [PermHeader(hdr("x-a", "2"))], [IdAny()]))
    joined = rules(RbacAction.ALLOW, policy("p", [PermHeader(hdr("x-a", "1,2"))], [IdAny()]))
    req = request(headers={"x-a": ("1", "2")})
    assert evaluate(one, req).allowed
    assert not evaluate(joined, req).allowed


@pytest.mark.parametrize(
    ("matcher", "present", "absent"),
    [
        (HeaderMatcher("x", HeaderMatchKind.ANY), True, False),
        (HeaderMatcher("x", HeaderMatchKind.PRESENT, present=False), False, True),
        (HeaderMatcher("x", HeaderMatchKind.PRESENT, invert=True), False, True),
        (HeaderMatcher("x", HeaderMatchKind.EXACT, "v", invert=True), False, False),
        (HeaderMatcher("x", HeaderMatchKind.EXACT, "", treat_missing_as_empty=True), False, True),
        (HeaderMatcher("x", HeaderMatchKind.PREFIX, "V", ignore_case=True), True, False),
    ],
)
def test_header_presence_rules(matcher: HeaderMatcher, present: bool, absent: bool) -> None:
    r = rules(RbacAction.ALLOW, policy("p", [PermHeader(matcher)], [IdAny()]))
    assert evaluate(r, request(headers={"x": ("v",)})).allowed is present
    assert evaluate(r, request()).allowed is absent


# -- principals -----------------------------------------------------------------------------------


def test_authenticated_without_a_name_is_any_tls_connection() -> None:
    r = rules(RbacAction.ALLOW, policy("p", [PermAny()], [IdAuthenticated(None)]))
    assert not evaluate(r, request(principals=())).allowed  # plaintext
    assert evaluate(r, request(principals=("",))).allowed  # TLS, no client certificate
    assert evaluate(r, request(principals=(WEB, "O=x"))).allowed


def test_authenticated_names_uri_dns_and_subject() -> None:
    peer = (WEB, "web.shop.svc", "CN=web,O=shop")
    for name in peer:
        r = rules(RbacAction.ALLOW, policy("p", [PermAny()], [IdAuthenticated(exact(name))]))
        assert evaluate(r, request(principals=peer)).allowed, name
    r = rules(RbacAction.ALLOW, policy("p", [PermAny()], [IdAuthenticated(exact(API))]))
    assert not evaluate(r, request(principals=peer)).allowed
    prefix = IdAuthenticated(StringMatcher(StringMatchKind.PREFIX, "spiffe://example.org/ns/shop/"))
    assert evaluate(
        rules(RbacAction.ALLOW, policy("p", [PermAny()], [prefix])), request(principals=peer)
    ).allowed


def test_source_direct_and_remote_addresses() -> None:
    ten = make_cidr("10.0.0.0", 8)
    req = request(src="127.0.0.1", remote="10.1.2.3")
    assert not evaluate(
        rules(RbacAction.ALLOW, policy("p", [PermAny()], [IdSourceIp(ten)])), req
    ).allowed
    assert not evaluate(
        rules(RbacAction.ALLOW, policy("p", [PermAny()], [IdDirectRemoteIp(ten)])), req
    ).allowed
    assert evaluate(
        rules(RbacAction.ALLOW, policy("p", [PermAny()], [IdRemoteIp(ten)])), req
    ).allowed


def test_and_or_not_principals() -> None:
    web = IdAuthenticated(exact(WEB))
    batch = IdHeader(hdr("x-caller", "batch"))
    ids = IdOr((IdAnd((web, IdNot(batch))), IdAnd((IdNot(web), batch))))
    r = rules(RbacAction.ALLOW, policy("p", [PermAny()], [ids]))
    assert evaluate(r, request(principals=(WEB,))).allowed
    assert not evaluate(r, request(principals=(WEB,), headers={"x-caller": ("batch",)})).allowed
    assert evaluate(r, request(principals=(API,), headers={"x-caller": ("batch",)})).allowed
    assert not evaluate(r, request(principals=(API,))).allowed


# -- CIDR ranges ----------------------------------------------------------------------------------


def test_cidr_ranges_as_envoy_builds_them() -> None:
    assert cidr_contains(make_cidr("10.1.2.3", 8), "10.200.0.1")  # host bits ignored
    assert cidr_contains(make_cidr("0.0.0.0", 0), "203.0.113.9")
    assert not cidr_contains(make_cidr("0.0.0.0", 0), "::1")
    assert cidr_contains(make_cidr("127.0.0.1", 99), "127.0.0.1")  # clamped to 32
    assert not cidr_contains(make_cidr("127.0.0.1", 99), "127.0.0.2")
    assert cidr_contains(make_cidr("fd00::", 8), "fd12::1")
    assert not cidr_contains(make_cidr("10.0.0.0", 8), "not an ip")
    with pytest.raises(ValueError):
        make_cidr("example.com", 8)


# -- the per-connection cut -----------------------------------------------------------------------


def test_the_cut_keeps_only_what_the_connection_can_still_match() -> None:
    r = rules(
        RbacAction.ALLOW,
        *[
            policy(f"p{i:03}", [PermAny()], [IdAuthenticated(exact(f"{WEB}-{i}"))])
            for i in range(100)
        ],
        policy("z-path", [PermUrlPath(exact("/open"))], [IdAny()]),
    )
    conn = request(principals=(f"{WEB}-42",))
    cut = for_connection(r, conn)
    assert [p.name for p in cut.policies] == ["p042", "z-path"]
    assert cut.policies[0] == Policy("p042", (PermAny(),), (IdAny(),))
    assert constant_decision(cut) == Decision(True, "p042")
    stranger = for_connection(r, request(principals=("spiffe://other",)))
    assert [p.name for p in stranger.policies] == ["z-path"]
    assert constant_decision(stranger) is None
    assert constant_decision(for_connection(r, request())) is None


def test_constant_decisions() -> None:
    assert constant_decision(rules(RbacAction.ALLOW)) == Decision(False, "")
    assert constant_decision(rules(RbacAction.DENY)) == Decision(True, "")
    assert constant_decision(rules(RbacAction.DENY, policy("d", *ANY_POLICY))) == Decision(
        False, "d"
    )
    assert constant_decision(rules(RbacAction.LOG, policy("l", *ANY_POLICY))) == Decision(True, "l")


# Random rules over a small universe, so that matches happen often.
_PATHS = ["/", "/a", "/a/b", "/admin"]
_IDS = [WEB, API, "web.shop", ""]
_IPS = ["127.0.0.1", "10.0.0.1", "10.1.0.1", "192.168.1.1"]
_CIDRS = [make_cidr("10.0.0.0", 8), make_cidr("10.1.0.0", 16), make_cidr("127.0.0.0", 8)]

_string_matchers = st.builds(
    StringMatcher,
    st.sampled_from([StringMatchKind.EXACT, StringMatchKind.PREFIX, StringMatchKind.SUFFIX]),
    st.sampled_from(["/a", "/", "b", WEB, "spiffe://example.org/", "web.shop"]),
)
_header_matchers = st.builds(
    HeaderMatcher,
    st.sampled_from(["x-a", ":method", ":path", "host"]),
    st.sampled_from([HeaderMatchKind.EXACT, HeaderMatchKind.PREFIX, HeaderMatchKind.PRESENT]),
    st.sampled_from(["GET", "1", "/a", "h"]),
    invert=st.booleans(),
)
_leaf_permissions: st.SearchStrategy[Permission] = st.one_of(
    st.just(PermAny()),
    st.builds(PermHeader, _header_matchers),
    st.builds(PermUrlPath, _string_matchers),
    st.builds(PermDestinationPort, st.sampled_from([80, 8080])),
    st.builds(PermDestinationIp, st.sampled_from(_CIDRS)),
)
_permissions: st.SearchStrategy[Permission] = st.recursive(
    _leaf_permissions,
    lambda inner: st.one_of(
        st.builds(PermAnd, st.lists(inner, min_size=1, max_size=3).map(tuple)),
        st.builds(PermOr, st.lists(inner, min_size=1, max_size=3).map(tuple)),
        st.builds(PermNot, inner),
    ),
    max_leaves=6,
)
_leaf_principals: st.SearchStrategy[Principal] = st.one_of(
    st.just(IdAny()),
    st.builds(IdAuthenticated, st.one_of(st.none(), _string_matchers)),
    st.builds(IdHeader, _header_matchers),
    st.builds(IdSourceIp, st.sampled_from(_CIDRS)),
    st.builds(IdDirectRemoteIp, st.sampled_from(_CIDRS)),
    st.builds(IdRemoteIp, st.sampled_from(_CIDRS)),
)
_principals: st.SearchStrategy[Principal] = st.recursive(
    _leaf_principals,
    lambda inner: st.one_of(
        st.builds(IdAnd, st.lists(inner, min_size=1, max_size=3).map(tuple)),
        st.builds(IdOr, st.lists(inner, min_size=1, max_size=3).map(tuple)),
        st.builds(IdNot, inner),
    ),
    max_leaves=6,
)
_policies = st.builds(
    Policy,
    st.sampled_from(["a", "b", "c", "d", "e"]),
    st.lists(_permissions, min_size=1, max_size=3).map(tuple),
    st.lists(_principals, min_size=1, max_size=3).map(tuple),
)
_rules = st.builds(
    lambda action, ps: sorted_rules(action, list({p.name: p for p in ps}.values())),
    st.sampled_from(list(RbacAction)),
    st.lists(_policies, max_size=5),
)
_connections = st.builds(
    lambda dst, port, src, names: (dst, port, src, names),
    st.sampled_from(_IPS),
    st.sampled_from([80, 8080]),
    st.sampled_from(_IPS),
    st.one_of(st.just(()), st.lists(st.sampled_from(_IDS), min_size=1, max_size=3).map(tuple)),
)
_requests = st.builds(
    lambda method, path, xa, remote: (method, path, xa, remote),
    st.sampled_from(["GET", "POST"]),
    st.sampled_from(_PATHS),
    st.lists(st.sampled_from(["1", "2", "h"]), max_size=2).map(tuple),
    st.sampled_from(_IPS),
)


@settings(max_examples=250, deadline=None)
@given(_rules, _connections, st.lists(_requests, min_size=1, max_size=4))
def test_the_cut_gives_the_same_answers(
    r: RbacRules,
    conn: tuple[str, int, str, tuple[str, ...]],
    reqs: list[tuple[str, str, tuple[str, ...], str]],
) -> None:
    dst, port, src, names = conn
    base = RbacInput("", "", no_headers, dst, port, src, src, names)
    cut = for_connection(r, base)
    constant = constant_decision(cut)
    for method, path, xa, remote in reqs:
        headers = {":method": (method,), ":path": (path,), "host": ("h",), "x-a": xa}
        q = RbacInput(
            method, path, lambda n, h=headers: h.get(n, ()), dst, port, src, remote, names
        )  # type: ignore[misc]
        full = evaluate(r, q)
        assert evaluate(cut, q) == full
        if constant is not None:
            assert constant == full


# -- matchers equal the router's ------------------------------------------------------------------

_texts = st.text(alphabet="aAbB/-.", max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["exact", "prefix", "suffix", "contains"]), _texts, st.booleans(), _texts)
def test_string_matching_equals_the_routers(kind: str, value: str, ignore: bool, s: str) -> None:
    router = string_test(StringMatchKind(kind), value, ignore, None)
    assert text_matches(kind, value, ignore, None, s) is router(s)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(HeaderMatchKind)),
    _texts,
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.lists(_texts, max_size=3),
)
def test_header_matching_equals_the_routers(
    kind: HeaderMatchKind,
    value: str,
    ignore: bool,
    present: bool,
    invert: bool,
    missing_empty: bool,
    values: list[str],
) -> None:
    regex = re.compile(re.escape(value) + ".*") if kind is HeaderMatchKind.REGEX else None
    m = HeaderMatcher(
        "x-h", kind, value, regex, ignore and regex is None, present, invert, missing_empty
    )
    router = _HeaderCheck(m).matches(
        Headers([("x-h", v) for v in values]), "GET", "/", None, "http"
    )
    r = rules(RbacAction.ALLOW, policy("p", [PermHeader(m)], [IdAny()]))
    assert evaluate(r, request(headers={"x-h": tuple(values)})).allowed is router


# -- data -----------------------------------------------------------------------------------------


def test_rules_survive_pickling() -> None:
    r = rules(
        RbacAction.DENY,
        policy(
            "p",
            [PermAnd((PermNot(PermDestinationIp(make_cidr("::1", 128))), PermUrlPath(exact("/"))))],
            [IdOr((IdAuthenticated(None), IdRemoteIp(make_cidr("10.0.0.0", 8))))],
        ),
    )
    assert pickle.loads(pickle.dumps(r)) == r


# -- what the proxy keeps per connection ----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(_rules, _connections, _requests, _requests)
def test_requests_that_agree_on_what_the_rules_read_get_the_same_decision(
    r: RbacRules,
    conn: tuple[str, int, str, tuple[str, ...]],
    one: tuple[str, str, tuple[str, ...], str],
    two: tuple[str, str, tuple[str, ...], str],
) -> None:
    dst, port, src, names = conn
    cut = for_connection(r, RbacInput("", "", no_headers, dst, port, src, src, names))
    reads = request_reads(cut)

    def make(req: tuple[str, str, tuple[str, ...], str]) -> tuple[RbacInput, tuple[object, ...]]:
        method, path, xa, remote = req
        headers = {":method": (method,), ":path": (path,), "host": ("h",), "x-a": xa}
        q = RbacInput(method, path, lambda n: headers.get(n, ()), dst, port, src, remote, names)
        key = (
            path if reads.path else "",
            *(tuple(headers.get(n, ())) for n in reads.header_names),
            *((remote,) if reads.remote_ip else ()),
        )
        return q, key

    (q1, k1), (q2, k2) = make(one), make(two)
    if k1 == k2:
        assert evaluate(cut, q1) == evaluate(cut, q2)


def test_the_connection_memo_gives_evaluates_answers_and_stays_bounded() -> None:
    r = rules(
        RbacAction.ALLOW,
        policy("a", [PermUrlPath(StringMatcher(StringMatchKind.PREFIX, "/ok"))], [IdAny()]),
        policy("b", [PermHeader(hdr("x-a", "1"))], [IdRemoteIp(make_cidr("10.0.0.0", 8))]),
    )
    cut = CutRules(for_connection(r, request()))
    assert cut.constant is None
    assert cut.reads.path and cut.reads.header_names == ("x-a",) and cut.reads.remote_ip
    for i in range(3 * MEMO_SIZE):
        for q in (
            request(path=f"/ok/{i}"),
            request(path=f"/no/{i}", headers={"x-a": ("1",)}, remote="10.1.1.1"),
            request(path=f"/no/{i}", headers={"x-a": ("1",)}, remote="192.168.1.1"),
            request(path="/no", headers={"x-a": ("1", "2")}, remote="10.1.1.1"),
        ):
            lookup = _lookup_of(q.headers)
            assert cut.decide(q, lookup) == evaluate(r, q)
            assert len(cut.memo) <= MEMO_SIZE
