"""Header rules: evaluation within a level, order across levels, validation.

The large scenario reproduces a configuration run through Envoy 1.40 with an echo upstream; the
expected headers are what the upstream (and the client) received.
"""

from __future__ import annotations

import pytest

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.formatter import FormatContext
from ubimesh.proxy.routing.headers import HeaderRuleError, HeaderRules, compile_header_mutation
from ubimesh.proxy.routing.table import RouteTable
from ubimesh.proxy.snapshot.types import (
    AppendAction,
    DirectResponseAction,
    HeaderMutation,
    HeaderValueOption,
    PathMatchKind,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedClusterEntry,
)

OVERWRITE = AppendAction.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = AppendAction.APPEND_IF_EXISTS_OR_ADD
ABSENT = AppendAction.ADD_IF_ABSENT
IF_EXISTS = AppendAction.OVERWRITE_IF_EXISTS


def hv(
    key: str, value: str, action: AppendAction = APPEND, *, keep: bool = False
) -> HeaderValueOption:
    return HeaderValueOption(key, value, action, has_format="%" in value, keep_empty_value=keep)


def ctx_for(headers: Headers, response: Headers | None = None) -> FormatContext:
    return FormatContext(
        headers,
        method="GET",
        path="/",
        authority="example.com",
        downstream_remote=("127.0.0.1", 34274),
        response_headers=response,
    )


# -- one level ---------------------------------------------------------------------------------


def test_removal_happens_before_additions() -> None:
    rules = HeaderRules((hv("x-a", "new"),), ("x-a",))
    h = Headers([("x-a", "old"), ("x-b", "b")])
    rules.apply(h, ctx_for(h))
    assert h.items == [("x-b", "b"), ("x-a", "new")]


def test_append_actions() -> None:
    rules = HeaderRules(
        (
            hv("x-app", "1"),
            hv("x-over", "1", OVERWRITE),
            hv("x-absent", "1", ABSENT),
            hv("x-present", "1", ABSENT),
            hv("x-ifexists", "1", IF_EXISTS),
            hv("x-missing", "1", IF_EXISTS),
        ),
        (),
    )
    h = Headers(
        [("x-app", "0"), ("x-over", "0"), ("x-over", "0b"), ("x-present", "0"), ("x-ifexists", "0")]
    )
    rules.apply(h, ctx_for(h))
    assert h.get_all("x-app") == ["0", "1"]
    assert h.get_all("x-over") == ["1"]
    assert h.get_all("x-absent") == ["1"]
    assert h.get_all("x-present") == ["0"]
    assert h.get_all("x-ifexists") == ["1"]
    assert "x-missing" not in h


def test_overwrite_moves_the_header_to_the_end_like_envoy() -> None:
    rules = HeaderRules((hv("x-a", "new", OVERWRITE),), ())
    h = Headers([("x-a", "old"), ("x-b", "b")])
    rules.apply(h, ctx_for(h))
    assert h.items == [("x-b", "b"), ("x-a", "new")]


def test_checks_and_formats_see_the_headers_before_this_level_adds() -> None:
    rules = HeaderRules(
        (
            hv("x-abs", "1", ABSENT),
            hv("x-abs", "2", ABSENT),
            hv("x-new", "n"),
            hv("x-seen", "%REQ(x-new)%", keep=True),
        ),
        (),
    )
    h = Headers()
    rules.apply(h, ctx_for(h))
    assert h.get_all("x-abs") == ["1", "2"]
    assert h.get_all("x-seen") == [""]


def test_overwrites_then_appends() -> None:
    rules = HeaderRules(
        (hv("x-mix", "o", OVERWRITE), hv("x-mix", "a"), hv("x-mix", "o2", OVERWRITE)), ()
    )
    h = Headers([("x-mix", "client")])
    rules.apply(h, ctx_for(h))
    assert h.get_all("x-mix") == ["o2", "a"]


def test_empty_values_are_dropped_unless_kept() -> None:
    rules = HeaderRules(
        (
            hv("x-empty", "%REQ(x-nothere)%"),
            hv("x-keep", "%REQ(x-nothere)%", keep=True),
            hv("x-lit-empty", ""),
            hv("x-lit-keep", "", keep=True),
        ),
        (),
    )
    h = Headers()
    rules.apply(h, ctx_for(h))
    assert h.items == [("x-keep", ""), ("x-lit-keep", "")]


def test_literal_appends_take_the_static_path() -> None:
    rules = HeaderRules((hv("x-a", "1"), hv("x-b", "")), ())
    assert rules.static_appends == [("x-a", "1")]
    h = Headers()
    rules.apply(h, ctx_for(h))
    assert h.items == [("x-a", "1")]
    assert HeaderRules((hv("x-a", "%PROTOCOL%"),), ()).static_appends is None
    assert HeaderRules((hv("x-a", "1", OVERWRITE),), ()).static_appends is None


def test_names_are_lower_cased_and_values_are_not() -> None:
    rules = HeaderRules((hv("X-Key", "Value"),), ("X-Gone",))
    h = Headers([("x-gone", "1")])
    rules.apply(h, ctx_for(h))
    assert h.items == [("x-key", "Value")]


@pytest.mark.parametrize("name", [":authority", ":path", ":status", "host", "Host"])
def test_pseudo_headers_and_host_cannot_be_modified(name: str) -> None:
    with pytest.raises(HeaderRuleError, match="may not be modified"):
        HeaderRules((hv(name, "x"),), ())
    with pytest.raises(HeaderRuleError, match="may not be removed"):
        HeaderRules((), (name,))


def test_invalid_format_is_refused_at_compile_time() -> None:
    with pytest.raises(ValueError, match="Couldn't find valid command"):
        HeaderRules((hv("x-a", "50%"),), ())


def test_compile_mutation_splits_directions_and_drops_empty_ones() -> None:
    req, resp = compile_header_mutation(HeaderMutation(request_add=(hv("x-a", "1"),)))
    assert req is not None and resp is None
    req, resp = compile_header_mutation(HeaderMutation(), ("y-gone",))
    assert req is None and resp is not None and resp.removes == ("y-gone",)


# -- levels ------------------------------------------------------------------------------------


def level(tag: str) -> HeaderMutation:
    return HeaderMutation(
        request_add=(hv("x-o", tag, OVERWRITE), hv("x-ap", tag)),
        response_add=(hv("y-o", tag, OVERWRITE), hv("y-ap", tag)),
    )


def levels_table(*, most_specific_wins: bool = False) -> tuple[RouteTable, VirtualHost, Route]:
    wc = WeightedClusterEntry("echo", 1, headers=level("wc"))
    route = Route(
        "r",
        RouteMatch(PathMatchKind.PREFIX, "/"),
        RouteAction(weighted_clusters=(wc,), total_weight=1),
        headers=level("route"),
    )
    vh = VirtualHost("v", ("*",), (route,), headers=level("vh"))
    rc = RouteConfiguration("rc", (vh,), headers=level("global"))
    return (
        RouteTable(rc, most_specific_header_mutations_wins=most_specific_wins),
        vh,
        route,
    )


def run_levels(most_specific_wins: bool) -> tuple[Headers, Headers]:
    t, vh, route = levels_table(most_specific_wins=most_specific_wins)
    action = route.action
    assert isinstance(action, RouteAction)
    entry = action.weighted_clusters[0]
    req = Headers()
    t.apply_request_headers(vh, route, ctx_for(req), entry)
    resp = Headers()
    t.apply_response_headers(vh, route, ctx_for(req, resp), entry)
    return req, resp


def test_least_specific_level_wins_by_default() -> None:
    # Observed with Envoy 1.40: weighted cluster, route, virtual host, route configuration.
    req, resp = run_levels(False)
    assert req.get_all("x-o") == ["global"]
    assert req.get_all("x-ap") == ["wc", "route", "vh", "global"]
    assert resp.get_all("y-o") == ["global"]
    assert resp.get_all("y-ap") == ["wc", "route", "vh", "global"]


def test_most_specific_header_mutations_wins() -> None:
    # Observed with Envoy 1.40: the weighted cluster level still comes first.
    req, resp = run_levels(True)
    assert req.get_all("x-o") == ["route"]
    assert req.get_all("x-ap") == ["wc", "global", "vh", "route"]
    assert resp.get_all("y-ap") == ["wc", "global", "vh", "route"]


def test_without_cluster_entry_the_cluster_level_is_skipped() -> None:
    t, vh, route = levels_table()
    req = Headers()
    t.apply_request_headers(vh, route, ctx_for(req))
    assert req.get_all("x-ap") == ["route", "vh", "global"]
    assert len(t.request_header_rules(vh, route)) == 3


def test_route_of_another_virtual_host_is_an_error() -> None:
    t, vh, _ = levels_table()
    stranger = Route("s", RouteMatch(PathMatchKind.PREFIX, "/"), DirectResponseAction(200))
    with pytest.raises(ValueError, match="not a route"):
        t.request_header_rules(vh, stranger)


def test_response_rules_need_response_headers() -> None:
    t, vh, route = levels_table()
    with pytest.raises(ValueError, match="response_headers"):
        t.apply_response_headers(vh, route, ctx_for(Headers()))


def test_envoy_scenario() -> None:
    """A configuration run through Envoy 1.40; the upstream saw the headers asserted here."""
    route_rules = HeaderMutation(
        request_add=(
            hv("x-o", "route", OVERWRITE),
            hv("x-ap", "route"),
            hv("x-abs", "route1", ABSENT),
            hv("x-abs", "route2", ABSENT),
            hv("x-empty", "%REQ(x-nothere)%"),
            hv("x-keep", "%REQ(x-nothere)%", keep=True),
            hv("x-lit-empty", ""),
            hv("x-seen", "%REQ(x-ap)%"),
            hv("x-ow", "route", IF_EXISTS),
            hv("x-mix", "o", OVERWRITE),
            hv("x-mix", "a"),
            hv("x-mix", "o2", OVERWRITE),
            hv("x-client", "r", IF_EXISTS),
            hv("x-pct", "100%%"),
        ),
        request_remove=("x-rm-route", "x-vh-adds"),
        response_add=(hv("y-o", "route", OVERWRITE), hv("y-ap", "route")),
    )
    vh_rules = HeaderMutation(
        request_add=(
            hv("x-o", "vh", OVERWRITE),
            hv("x-ap", "vh"),
            hv("x-abs", "vh", ABSENT),
            hv("x-vh-adds", "vh"),
            hv("x-seen2", "%REQ(x-ap)%"),
            hv("x-rm-route", "vh"),
        ),
        request_remove=("x-ap",),
        response_add=(hv("y-o", "vh", OVERWRITE), hv("y-ap", "vh")),
    )
    global_rules = HeaderMutation(
        request_add=(hv("x-o", "global", OVERWRITE), hv("x-ap", "global")),
        response_add=(hv("y-o", "global", OVERWRITE), hv("y-ap", "global")),
        response_remove=("y-rm",),
    )
    wc = WeightedClusterEntry(
        "echo",
        1,
        HeaderMutation(
            request_add=(hv("x-o", "wc", OVERWRITE), hv("x-ap", "wc")),
            response_add=(hv("y-o", "wc", OVERWRITE), hv("y-ap", "wc")),
        ),
    )
    route = Route(
        "r",
        RouteMatch(PathMatchKind.PREFIX, "/"),
        RouteAction(weighted_clusters=(wc,), total_weight=1),
        headers=route_rules,
    )
    vh = VirtualHost("v", ("*",), (route,), headers=vh_rules)
    t = RouteTable(RouteConfiguration("rc", (vh,), headers=global_rules))
    req = Headers(
        [
            ("x-ap", "client"),
            ("x-long", "abcdef"),
            ("x-client", "c"),
            ("x-rm-route", "client"),
        ]
    )
    t.apply_request_headers(vh, route, ctx_for(req), wc)
    seen = {k: req.get_all(k) for k, _ in req.items}
    assert seen == {
        "x-long": ["abcdef"],
        "x-client": ["r"],
        "x-mix": ["o2", "a"],
        "x-abs": ["route1", "route2"],
        "x-keep": [""],
        "x-seen": ["client"],
        "x-pct": ["100%"],
        "x-ap": ["vh", "global"],
        "x-vh-adds": ["vh"],
        "x-rm-route": ["vh"],
        "x-o": ["global"],
    }
    resp = Headers([("y-rm", "1"), ("content-length", "5")])
    t.apply_response_headers(vh, route, ctx_for(req, resp), wc)
    assert resp.get_all("y-ap") == ["wc", "route", "vh", "global"]
    assert resp.get_all("y-o") == ["global"]
    assert "y-rm" not in resp


def test_route_config_response_headers_to_remove() -> None:
    route = Route("r", RouteMatch(PathMatchKind.PREFIX, "/"), DirectResponseAction(200))
    vh = VirtualHost("v", ("*",), (route,))
    t = RouteTable(RouteConfiguration("rc", (vh,), response_headers_to_remove=("x-internal",)))
    resp = Headers([("x-internal", "1"), ("x-public", "2")])
    t.apply_response_headers(vh, route, ctx_for(Headers(), resp))
    assert resp.items == [("x-public", "2")]
