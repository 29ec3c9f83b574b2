"""Filter chain selection (ubimesh.proxy.chain_match) against Envoy's FilterChainMatch rules.

Envoy (source/common/listener_manager/filter_chain_manager_impl.cc) walks the criteria in order
-- destination port, server name, transport protocol, application protocols -- and at each step
keeps only the most specific candidates: an exact value beats "unset"; for server names an exact
name beats the longest matching ``*.suffix``, which beats unset. It never backtracks: once a
step has chosen, a later mismatch means "no chain", and the listener's default_filter_chain is
used (or the connection is closed).  For ALPN it tries the protocols in the order the client
offered them.

The explicit cases below are followed by a property comparing the selector with a reference
written after Envoy's lookup tables.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ubimesh.proxy.chain_match import select_filter_chain
from ubimesh.proxy.snapshot.types import FilterChain, FilterChainMatch, Listener, SocketAddress

ADDRESS = SocketAddress("127.0.0.1", 10000)


def fc(
    name: str,
    *,
    port: int | None = None,
    names: tuple[str, ...] = (),
    transport: str = "",
    alpn: tuple[str, ...] = (),
) -> FilterChain:
    return FilterChain(
        name=name,
        match=FilterChainMatch(
            destination_port=port,
            server_names=names,
            transport_protocol=transport,
            application_protocols=alpn,
        ),
        filters=(),
    )


DEFAULT = fc("default")


def listener(*chains: FilterChain, default: FilterChain | None = None) -> Listener:
    return Listener(name="l", address=ADDRESS, filter_chains=chains, default_filter_chain=default)


def pick(
    lst: Listener,
    port: int = 10000,
    sni: str = "",
    transport: str = "raw_buffer",
    alpn: tuple[str, ...] = (),
) -> str | None:
    chain = select_filter_chain(lst, port, sni, transport, alpn)
    return None if chain is None else chain.name


# -- destination port ----------------------------------------------------------------------------


def test_exact_destination_port_beats_unset() -> None:
    lst = listener(fc("any"), fc("p8080", port=8080), fc("p9090", port=9090))
    assert pick(lst, port=8080) == "p8080"
    assert pick(lst, port=9090) == "p9090"
    assert pick(lst, port=7070) == "any"


def test_only_port_chains_and_another_port_uses_the_default() -> None:
    lst = listener(fc("p8080", port=8080), default=DEFAULT)
    assert pick(lst, port=8080) == "p8080"
    assert pick(lst, port=8081) == "default"
    assert pick(listener(fc("p8080", port=8080)), port=8081) is None


def test_exact_port_that_fails_later_does_not_fall_back_to_unset_port() -> None:
    # Envoy: "There is entry for specific port but none of the filter chain matches. Instead of
    # matching catch-all port 0, the fallback filter chain is returned."
    lst = listener(
        fc("p443-a", port=443, names=("a.example.com",)),
        fc("any"),
        default=DEFAULT,
    )
    assert pick(lst, port=443, sni="a.example.com") == "p443-a"
    assert pick(lst, port=443, sni="b.example.com") == "default"
    assert pick(lst, port=80, sni="b.example.com") == "any"


def test_port_is_decided_before_server_name() -> None:
    lst = listener(fc("by-name", names=("a.example.com",)), fc("by-port", port=443))
    assert pick(lst, port=443, sni="a.example.com") == "by-port"
    assert pick(lst, port=80, sni="a.example.com") == "by-name"


# -- server names --------------------------------------------------------------------------------


def test_exact_server_name_beats_wildcard() -> None:
    lst = listener(fc("wild", names=("*.example.com",)), fc("exact", names=("www.example.com",)))
    assert pick(lst, sni="www.example.com") == "exact"
    assert pick(lst, sni="api.example.com") == "wild"


def test_longer_wildcard_beats_shorter() -> None:
    lst = listener(
        fc("short", names=("*.example.com",)),
        fc("long", names=("*.b.example.com",)),
        fc("tld", names=("*.com",)),
    )
    assert pick(lst, sni="a.b.example.com") == "long"
    assert pick(lst, sni="x.y.b.example.com") == "long"
    assert pick(lst, sni="a.c.example.com") == "short"  # a wildcard covers several labels
    assert pick(lst, sni="a.other.com") == "tld"


def test_wildcard_does_not_match_its_own_suffix() -> None:
    lst = listener(fc("wild", names=("*.example.com",)), default=DEFAULT)
    assert pick(lst, sni="example.com") == "default"
    assert pick(lst, sni="notexample.com") == "default"
    assert pick(lst, sni="a.example.com") == "wild"


def test_unset_server_names_match_anything_when_nothing_more_specific() -> None:
    lst = listener(fc("named", names=("a.example.com", "*.b.example.com")), fc("any"))
    assert pick(lst, sni="a.example.com") == "named"
    assert pick(lst, sni="x.b.example.com") == "named"
    assert pick(lst, sni="other.org") == "any"
    assert pick(lst, sni="") == "any"


def test_chain_with_server_names_needs_an_sni() -> None:
    lst = listener(fc("named", names=("a.example.com",)), default=DEFAULT)
    assert pick(lst, sni="") == "default"
    assert pick(listener(fc("named", names=("a.example.com",))), sni="") is None


def test_server_name_is_decided_before_transport_protocol() -> None:
    lst = listener(fc("by-name", names=("a.example.com",)), fc("tls", transport="tls"))
    assert pick(lst, sni="a.example.com", transport="tls") == "by-name"
    assert pick(lst, sni="b.example.com", transport="tls") == "tls"


def test_server_name_choice_is_final() -> None:
    # The exact name wins the step; its transport requirement then fails: no fallback to the
    # wildcard chain that would have matched.
    lst = listener(
        fc("exact-tls", names=("a.example.com",), transport="tls"),
        fc("wild", names=("*.example.com",)),
        default=DEFAULT,
    )
    assert pick(lst, sni="a.example.com", transport="raw_buffer") == "default"
    assert pick(lst, sni="a.example.com", transport="tls") == "exact-tls"


# -- transport protocol --------------------------------------------------------------------------


def test_transport_protocol_exact_beats_unset() -> None:
    lst = listener(fc("any"), fc("tls", transport="tls"), fc("raw", transport="raw_buffer"))
    assert pick(lst, transport="tls") == "tls"
    assert pick(lst, transport="raw_buffer") == "raw"
    lst = listener(fc("any"), fc("tls", transport="tls"))
    assert pick(lst, transport="raw_buffer") == "any"


def test_transport_protocol_mismatch_uses_the_default() -> None:
    lst = listener(fc("tls", transport="tls"), default=DEFAULT)
    assert pick(lst, transport="raw_buffer") == "default"
    assert pick(lst, transport="tls") == "tls"


def test_default_transport_protocol_is_raw_buffer() -> None:
    lst = listener(fc("tls", transport="tls"), fc("raw", transport="raw_buffer"))
    chain = select_filter_chain(lst, 10000)
    assert chain is not None and chain.name == "raw"


# -- application protocols -----------------------------------------------------------------------


def test_alpn_match_beats_unset() -> None:
    lst = listener(fc("any"), fc("h2", alpn=("h2",)))
    assert pick(lst, alpn=("h2",)) == "h2"
    assert pick(lst, alpn=("http/1.1", "h2")) == "h2"
    assert pick(lst, alpn=("http/1.1",)) == "any"
    assert pick(lst, alpn=()) == "any"


def test_alpn_mismatch_uses_the_default() -> None:
    lst = listener(fc("h2", alpn=("h2", "h2c")), default=DEFAULT)
    assert pick(lst, alpn=("http/1.1",)) == "default"
    assert pick(lst, alpn=()) == "default"
    assert pick(lst, alpn=("h2c",)) == "h2"


@pytest.mark.parametrize("order", ["http11-first", "h2-first"])
def test_alpn_follows_the_clients_preference_order(order: str) -> None:
    # Envoy's findFilterChainForApplicationProtocols iterates the connection's requested
    # protocols in order and takes the first one some chain lists; listener order is irrelevant.
    chains = [fc("http11", alpn=("http/1.1",)), fc("h2", alpn=("h2",))]
    if order == "h2-first":
        chains.reverse()
    lst = listener(*chains)
    assert pick(lst, alpn=("h2", "http/1.1")) == "h2"
    assert pick(lst, alpn=("http/1.1", "h2")) == "http11"


# -- default chain -------------------------------------------------------------------------------


def test_default_chain_when_nothing_matches_and_none_without_it() -> None:
    chains = (fc("p1", port=1), fc("named", names=("x.test",)))
    assert pick(listener(*chains, default=DEFAULT), sni="y.test") == "default"
    assert pick(listener(*chains), sni="y.test") is None
    assert pick(listener(default=DEFAULT)) == "default"
    assert pick(listener()) is None


def test_the_chain_object_itself_is_returned() -> None:
    chain = fc("only", names=("a.test",))
    lst = listener(chain, default=DEFAULT)
    assert select_filter_chain(lst, 1, "a.test") is chain
    assert select_filter_chain(lst, 1, "b.test") is DEFAULT


# -- property: Envoy's lookup tables -------------------------------------------------------------


def _key(chain: FilterChain) -> list[tuple[int, str, str, str]]:
    """Envoy's table entries for a chain: (port or 0, server name with "*" dropped or "",
    transport or "", application protocol or "")."""
    m = chain.match
    names = [n[1:] if n.startswith("*.") else n for n in m.server_names] or [""]
    return [
        (m.destination_port or 0, n, m.transport_protocol, a)
        for n in names
        for a in (m.application_protocols or ("",))
    ]


def envoy_select(
    lst: Listener, port: int, sni: str, transport: str, alpn: tuple[str, ...]
) -> FilterChain | None:
    """Envoy's FilterChainManagerImpl::findFilterChain, without IP criteria."""
    table: dict[tuple[int, str, str, str], FilterChain] = {}
    for chain in lst.filter_chains:
        for key in _key(chain):
            assert key not in table  # Envoy refuses such a listener
            table[key] = chain

    def by_port(p: int) -> FilterChain | None:
        names = {k[1] for k in table if k[0] == p}
        chosen: str | None = None
        if sni in names:
            chosen = sni
        else:
            pos = sni.find(".", 1)
            while pos != -1 and pos < len(sni) - 1:
                if sni[pos:] in names:
                    chosen = sni[pos:]
                    break
                pos = sni.find(".", pos + 1)
            if chosen is None and "" in names:
                chosen = ""
        if chosen is None:
            return None
        transports = {k[2] for k in table if k[:2] == (p, chosen)}
        if transport in transports:
            tp = transport
        elif "" in transports:
            tp = ""
        else:
            return None
        for a in alpn:
            if (p, chosen, tp, a) in table:
                return table[(p, chosen, tp, a)]
        return table.get((p, chosen, tp, ""))

    ports = {k[0] for k in table}
    if port in ports:
        return by_port(port) or lst.default_filter_chain
    if 0 in ports:
        return by_port(0) or lst.default_filter_chain
    return lst.default_filter_chain


SERVER_NAMES = [
    "a.example.com",
    "b.example.com",
    "x.a.example.com",
    "*.example.com",
    "*.a.example.com",
    "*.com",
    "example.com",
]
SNIS = ["", "a.example.com", "x.a.example.com", "y.a.example.com", "z.example.com", "example.com"]
SNIS += ["q.org", "deep.x.a.example.com"]
PROTOCOLS = ["h2", "http/1.1", "h3"]

matches = st.builds(
    FilterChainMatch,
    destination_port=st.sampled_from([None, 80, 443]),
    server_names=st.lists(st.sampled_from(SERVER_NAMES), max_size=2, unique=True).map(tuple),
    transport_protocol=st.sampled_from(["", "tls", "raw_buffer"]),
    application_protocols=st.lists(st.sampled_from(PROTOCOLS), max_size=2, unique=True).map(tuple),
)


@settings(max_examples=400)
@given(
    st.lists(matches, max_size=5),
    st.booleans(),
    st.sampled_from([80, 443, 8080]),
    st.sampled_from(SNIS),
    st.sampled_from(["tls", "raw_buffer"]),
    st.lists(st.sampled_from(PROTOCOLS), max_size=3, unique=True).map(tuple),
)
def test_selection_agrees_with_envoys_tables(
    chain_matches: list[FilterChainMatch],
    with_default: bool,
    port: int,
    sni: str,
    transport: str,
    alpn: tuple[str, ...],
) -> None:
    chains = tuple(FilterChain(f"c{i}", m, ()) for i, m in enumerate(chain_matches))
    keys = list(itertools.chain.from_iterable(_key(c) for c in chains))
    assume(len(keys) == len(set(keys)))  # Envoy rejects overlapping filter chain matches
    lst = listener(*chains, default=DEFAULT if with_default else None)
    expected = envoy_select(lst, port, sni, transport, alpn)
    got = select_filter_chain(lst, port, sni, transport, alpn)
    assert got is expected, (
        f"expected {expected and expected.name}, got {got and got.name} "
        f"for port={port} sni={sni!r} transport={transport} alpn={alpn}"
    )


@settings(max_examples=200)
@given(
    st.lists(st.lists(st.sampled_from(PROTOCOLS), max_size=2, unique=True), max_size=4),
    st.booleans(),
    st.permutations(PROTOCOLS),
    st.integers(min_value=0, max_value=len(PROTOCOLS)),
)
def test_alpn_step_agrees_with_envoys_tables(
    alpn_lists: list[list[str]], with_default: bool, offered: list[str], count: int
) -> None:
    # The same property, focused on the last step: chains that differ only in ALPN.
    chains = tuple(fc(f"c{i}", alpn=tuple(a)) for i, a in enumerate(alpn_lists))
    keys = list(itertools.chain.from_iterable(_key(c) for c in chains))
    assume(len(keys) == len(set(keys)))
    lst = listener(*chains, default=DEFAULT if with_default else None)
    alpn = tuple(offered[:count])
    expected = envoy_select(lst, 443, "", "tls", alpn)
    got = select_filter_chain(lst, 443, "", "tls", alpn)
    assert got is expected, f"expected {expected and expected.name}, got {got and got.name}"
