"""Properties of the routing core: domain precedence, route order, matchers, weighted picks."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.hashing import compute_hash
from ubimesh.proxy.routing.table import RouteTable
from ubimesh.proxy.routing.text import query_first_values
from ubimesh.proxy.routing.weighted import pick_weighted
from ubimesh.proxy.snapshot.types import (
    DirectResponseAction,
    HashPolicy,
    HashPolicyKind,
    HeaderMatcher,
    HeaderMatchKind,
    PathMatchKind,
    Route,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedClusterEntry,
)

# -- domain precedence ---------------------------------------------------------------------------

labels = st.text(alphabet="ab.-", min_size=0, max_size=5)
domains = st.one_of(
    labels.filter(bool),
    labels.map(lambda s: "*" + s),
    labels.map(lambda s: s + "*"),
    st.just("*"),
)


def reference_vhost(domain_lists: list[list[str]], host: str) -> int | None:
    """Envoy's precedence written the slow, obvious way."""
    host = host.lower()
    exact: list[int] = []
    suffixes: list[tuple[int, int]] = []  # (wildcard length, vhost)
    prefixes: list[tuple[int, int]] = []
    star: list[int] = []
    for i, ds in enumerate(domain_lists):
        for d in ds:
            if d == "*":
                star.append(i)
            elif d.startswith("*"):
                if len(host) > len(d) - 1 and host.endswith(d[1:]):
                    suffixes.append((len(d) - 1, i))
            elif d.endswith("*"):
                if len(host) > len(d) - 1 and host.startswith(d[:-1]):
                    prefixes.append((len(d) - 1, i))
            elif d == host:
                exact.append(i)
    if exact:
        return exact[0]
    for found in (suffixes, prefixes):
        if found:
            return max(found, key=lambda t: t[0])[1]
    return star[0] if star else None


@st.composite
def route_configs(draw: st.DrawFn) -> list[list[str]]:
    all_domains = draw(st.lists(domains, min_size=1, max_size=10, unique=True))
    n = draw(st.integers(min_value=1, max_value=min(4, len(all_domains))))
    groups: list[list[str]] = [[] for _ in range(n)]
    for i, d in enumerate(all_domains):
        groups[i % n].append(d)
    return groups


@settings(max_examples=400)
@given(route_configs(), st.text(alphabet="abAB.-:", max_size=8))
def test_domain_precedence_matches_reference(groups: list[list[str]], host: str) -> None:
    route = Route("r", RouteMatch(PathMatchKind.PREFIX, "/"), DirectResponseAction(200))
    vhosts = tuple(VirtualHost(str(i), tuple(ds), (route,)) for i, ds in enumerate(groups))
    table = RouteTable(RouteConfiguration("rc", vhosts))
    selected = table.select_virtual_host(host)
    expected = reference_vhost(groups, host)
    assert (None if selected is None else int(selected.name)) == expected


# -- route order ---------------------------------------------------------------------------------

prefixes = st.text(alphabet="/ab", max_size=4).map(lambda s: "/" + s)


@settings(max_examples=300)
@given(st.lists(prefixes, min_size=1, max_size=8), st.text(alphabet="/ab?=", max_size=8))
def test_first_matching_prefix_wins(route_prefixes: list[str], tail: str) -> None:
    path = "/" + tail
    routes = tuple(
        Route(str(i), RouteMatch(PathMatchKind.PREFIX, p), DirectResponseAction(200))
        for i, p in enumerate(route_prefixes)
    )
    vh = VirtualHost("v", ("*",), routes)
    got = RouteTable(RouteConfiguration("rc", (vh,))).match_route(vh, "GET", path, Headers())
    path_only = path.split("?", 1)[0]
    expected = next((str(i) for i, p in enumerate(route_prefixes) if path_only.startswith(p)), None)
    assert (None if got is None else got.name) == expected


# -- header matchers -----------------------------------------------------------------------------

kinds = st.sampled_from(
    [
        HeaderMatchKind.EXACT,
        HeaderMatchKind.PREFIX,
        HeaderMatchKind.SUFFIX,
        HeaderMatchKind.CONTAINS,
    ]
)
values = st.text(alphabet="aAb,", max_size=3)


def header_matches(matcher: HeaderMatcher, headers: Headers) -> bool:
    route = Route(
        "m", RouteMatch(PathMatchKind.PREFIX, "/", headers=(matcher,)), DirectResponseAction(200)
    )
    vh = VirtualHost("v", ("*",), (route,))
    return (
        RouteTable(RouteConfiguration("rc", (vh,))).match_route(vh, "GET", "/", headers) is not None
    )


@settings(max_examples=300)
@given(kinds, values, st.booleans(), st.lists(values, min_size=1, max_size=3))
def test_invert_flips_the_result_for_present_headers(
    kind: HeaderMatchKind, value: str, ignore_case: bool, header_values: list[str]
) -> None:
    headers = Headers([("x-h", v) for v in header_values])
    plain = HeaderMatcher("x-h", kind, value, ignore_case=ignore_case)
    inverted = HeaderMatcher("x-h", kind, value, ignore_case=ignore_case, invert=True)
    assert header_matches(plain, headers) != header_matches(inverted, headers)
    # "Any value matches" semantics.
    assert header_matches(plain, headers) == any(
        header_matches(plain, Headers([("x-h", v)])) for v in header_values
    )


@settings(max_examples=100)
@given(kinds, values, st.booleans())
def test_missing_header_never_matches_a_value_matcher(
    kind: HeaderMatchKind, value: str, invert: bool
) -> None:
    assert not header_matches(HeaderMatcher("x-h", kind, value, invert=invert), Headers())


# -- query strings ---------------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.text(alphabet="ab", max_size=2), st.none() | st.text(alphabet="ab=", max_size=2)
        ),
        max_size=5,
    )
)
def test_query_first_values(pairs: list[tuple[str, str | None]]) -> None:
    query = "&".join(k if v is None else f"{k}={v}" for k, v in pairs)
    expected: dict[str, str] = {}
    for k, v in pairs:
        expected.setdefault(k, "" if v is None else v)
    assert query_first_values("/p?" + query) == (expected if pairs else {"": ""})


# -- weighted picks --------------------------------------------------------------------------------

weights = st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=5).filter(
    lambda ws: sum(ws) > 0
)


def weighted_entries(ws: list[int]) -> tuple[WeightedClusterEntry, ...]:
    return tuple(WeightedClusterEntry(str(i), w) for i, w in enumerate(ws))


@settings(max_examples=100)
@given(weights)
def test_one_cycle_of_values_picks_each_entry_weight_times(ws: list[int]) -> None:
    entries = weighted_entries(ws)
    total = sum(ws)
    counts = Counter(pick_weighted(entries, total, v) for v in range(total))
    assert [counts[e] for e in entries] == ws


@settings(max_examples=25, deadline=None)
@given(weights)
def test_random_picks_follow_the_weights(ws: list[int]) -> None:
    entries = weighted_entries(ws)
    total = sum(ws)
    rng = random.Random(1234)
    draws = 10_000
    counts = Counter(pick_weighted(entries, total, rng.getrandbits(64)) for _ in range(draws))
    for entry, w in zip(entries, ws, strict=True):
        share = 100 * counts[entry] / draws
        assert abs(share - 100 * w / total) <= 2.0


# -- hashing ---------------------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.lists(st.text(alphabet="abc", max_size=3), min_size=1, max_size=4), st.randoms())
def test_header_hash_ignores_the_order_of_repeated_headers(
    vals: list[str], rnd: random.Random
) -> None:
    shuffled = list(vals)
    rnd.shuffle(shuffled)
    policy = [HashPolicy(HashPolicyKind.HEADER, "x-k")]
    a = compute_hash(policy, Headers([("x-k", v) for v in vals]), None, "/")
    b = compute_hash(policy, Headers([("x-k", v) for v in shuffled]), None, "/")
    assert a == b
    assert a is not None and 0 <= a < 2**64
