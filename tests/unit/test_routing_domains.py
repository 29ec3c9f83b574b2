"""Virtual host selection by Host, with Envoy's precedence.

The expectations were observed with Envoy 1.40: virtual hosts answering their own name, and
requests with the Host values below.
"""

from __future__ import annotations

import pytest

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.table import RouteConfigError, RouteTable
from ubimesh.proxy.snapshot.types import (
    DirectResponseAction,
    PathMatchKind,
    Route,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)


def vhost(name: str, *domains: str) -> VirtualHost:
    route = Route("r", RouteMatch(PathMatchKind.PREFIX, "/"), DirectResponseAction(200))
    return VirtualHost(name, domains, (route,))


def table(*vhosts: VirtualHost, ignore_port: bool = False) -> RouteTable:
    return RouteTable(
        RouteConfiguration("rc", tuple(vhosts)), ignore_port_in_host_matching=ignore_port
    )


ENVOY_VHOSTS = (
    vhost("exact", "foo.com", "bar.com:8080"),
    vhost("suf", "*.foo.com"),
    vhost("suf2", "*-bar.foo.com"),
    vhost("sufport", "*.foo.com:80"),
    vhost("pre", "foo.*"),
    vhost("pre2", "foo.bar.*"),
    vhost("star", "*"),
)

OBSERVED = [
    ("foo.com", "exact"),
    ("FOO.COM", "exact"),
    ("foo.com:80", "pre"),  # the port is part of the Host: no exact match, "foo.*" matches
    ("bar.com:8080", "exact"),
    ("bar.com", "star"),
    ("a.foo.com", "suf"),
    ("x-bar.foo.com", "suf2"),  # the longest suffix wins
    ("-bar.foo.com", "suf"),  # a wildcard never matches the empty string
    (".foo.com", "star"),
    ("a.foo.com:80", "sufport"),
    ("a.foo.com:81", "star"),
    ("foo.bar.baz", "pre2"),  # the longest prefix wins
    ("foo.x", "pre"),
    ("foo.", "star"),
    ("foo.com.", "pre"),
    ("zzz", "star"),
    ("[::1]:80", "star"),
]

OBSERVED_IGNORING_PORT = [
    ("foo.com:80", "exact"),
    ("bar.com:8080", "star"),  # the domain keeps its port, the Host loses it
    ("a.foo.com:80", "suf"),
    ("a.foo.com:81", "suf"),
    ("x-bar.foo.com:1", "suf2"),
]


@pytest.mark.parametrize(("host", "expected"), OBSERVED)
def test_domain_precedence_as_envoy(host: str, expected: str) -> None:
    selected = table(*ENVOY_VHOSTS).select_virtual_host(host)
    assert selected is not None
    assert selected.name == expected


@pytest.mark.parametrize(("host", "expected"), OBSERVED_IGNORING_PORT)
def test_ignore_port_in_host_matching(host: str, expected: str) -> None:
    selected = table(*ENVOY_VHOSTS, ignore_port=True).select_virtual_host(host)
    assert selected is not None
    assert selected.name == expected


def test_ignore_port_keeps_ipv6_literals() -> None:
    t = table(vhost("v6", "[::1]"), vhost("foo", "foo"), vhost("star", "*"), ignore_port=True)

    def name(host: str) -> str | None:
        v = t.select_virtual_host(host)
        return None if v is None else v.name

    assert name("[::1]") == "v6"
    assert name("[::1]:80") == "v6"
    assert name("foo:") == "foo"
    assert name("foo:abc") == "foo"  # Envoy does not check that the port is numeric
    assert name("foo:80:90") == "star"


def test_no_default_virtual_host_is_none() -> None:
    t = table(vhost("only", "only.test"))
    assert t.select_virtual_host("other.test") is None
    assert t.select_virtual_host("only.test:80") is None
    selected = t.select_virtual_host("ONLY.test")
    assert selected is not None and selected.name == "only"


def test_configured_domains_are_case_insensitive() -> None:
    selected = table(vhost("v", "API.Example.COM")).select_virtual_host("api.example.com")
    assert selected is not None and selected.name == "v"


def test_wildcard_in_the_middle_is_literal() -> None:
    t = table(vhost("lit", "a*b"), vhost("star", "*"))
    a = t.select_virtual_host("a*b")
    b = t.select_virtual_host("axb")
    assert a is not None and a.name == "lit"
    assert b is not None and b.name == "star"


def test_double_star_is_a_suffix_wildcard() -> None:
    t = table(vhost("stars", "**"), vhost("star", "*"))
    a = t.select_virtual_host("x*")
    b = t.select_virtual_host("*")
    assert a is not None and a.name == "stars"
    assert b is not None and b.name == "star"  # "*" alone is not longer than the suffix "*"


def test_non_ascii_host_folds_ascii_only() -> None:
    t = table(vhost("latin", "\u00e9.com"), vhost("star", "*"))
    a = t.select_virtual_host("\u00e9.COM")
    b = t.select_virtual_host("\u00c9.com")
    assert a is not None and a.name == "latin"
    assert b is not None and b.name == "star"


def test_duplicate_domains_are_refused() -> None:
    with pytest.raises(RouteConfigError, match=r"Duplicate entry of domain a\.com"):
        table(vhost("a", "a.com"), vhost("b", "A.com"))
    with pytest.raises(RouteConfigError, match="single wildcard"):
        table(vhost("a", "*"), vhost("b", "*"))
    with pytest.raises(RouteConfigError, match="Duplicate"):
        table(vhost("a", "*.x.com"), vhost("b", "*.X.com"))


def test_route_combines_selection_and_matching() -> None:
    t = table(*ENVOY_VHOSTS)
    found = t.route("x-bar.foo.com", "GET", "/anything", Headers())
    assert found is not None
    assert found[0].name == "suf2"
    assert found[1].name == "r"
    assert table(vhost("only", "only.test")).route("nope", "GET", "/", Headers()) is None
