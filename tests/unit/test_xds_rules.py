"""Envoy's protoc-gen-validate constraints, read from the proto descriptors."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.route.v3 import route_components_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from ubimesh.proxy.xds.rules import check_message


def broken(msg: Any, only: set[str] | None = None) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    names = only if only is not None else {f.name for f in msg.DESCRIPTOR.fields}
    check_message(msg, "m", names, lambda path, message: found.append((path, message)))
    return found


def test_valid_message_breaks_nothing() -> None:
    vh = route_components_pb2.VirtualHost(name="v", domains=["a.com"])
    assert broken(vh) == []


def test_string_min_len_and_repeated_min_items() -> None:
    vh = route_components_pb2.VirtualHost()
    assert broken(vh) == [("m.name", "must not be empty"), ("m.domains", "must not be empty")]


def test_only_the_named_fields_are_checked() -> None:
    assert broken(route_components_pb2.VirtualHost(), {"domains"}) == [
        ("m.domains", "must not be empty")
    ]


def test_repeated_string_items_header_name() -> None:
    route = route_components_pb2.Route(request_headers_to_remove=["ok", "", "bad\nname"])
    found = broken(route, {"request_headers_to_remove"})
    assert found == [
        ("m.request_headers_to_remove[1]", "must not be empty"),
        ("m.request_headers_to_remove[2]",
         "'bad\\nname' is not a valid HTTP header name (control characters are not allowed)"),
    ]


def test_numeric_range_on_a_scalar() -> None:
    action = route_components_pb2.DirectResponseAction(status=199)
    assert broken(action, {"status"}) == [("m.status", "must be at least 200 and less than 600")]
    assert broken(route_components_pb2.DirectResponseAction(status=599), {"status"}) == []


def test_numeric_rule_on_a_wrapper_applies_only_when_set() -> None:
    lb = cluster_pb2.Cluster.LeastRequestLbConfig()
    assert broken(lb, {"choice_count"}) == []
    lb.choice_count.CopyFrom(wrappers_pb2.UInt32Value(value=1))
    assert broken(lb, {"choice_count"}) == [("m.choice_count", "must be at least 2")]


def test_duration_rule() -> None:
    c = cluster_pb2.Cluster(name="c")
    c.connect_timeout.CopyFrom(duration_pb2.Duration(seconds=0))
    assert broken(c, {"connect_timeout"}) == [("m.connect_timeout", "must be greater than 0s")]
    c.connect_timeout.CopyFrom(duration_pb2.Duration(nanos=1))
    assert broken(c, {"connect_timeout"}) == []


def test_enum_defined_only() -> None:
    c = cluster_pb2.Cluster(name="c", lb_policy=42)
    assert broken(c, {"lb_policy"}) == [("m.lb_policy", "42 is not a value of LbPolicy")]


def test_required_message() -> None:
    option = base_pb2.HeaderValueOption()
    assert broken(option, {"header"}) == [("m.header", "is required")]


def test_required_oneof_lists_only_supported_members() -> None:
    match = route_components_pb2.RouteMatch()
    assert broken(match, {"prefix", "path"}) == [("m", "one of prefix, path is required")]


def test_rules_of_an_unset_oneof_member_are_skipped() -> None:
    match = route_components_pb2.RouteMatch(prefix="/")
    # path_separated_prefix has a pattern rule; it is not the member that is set.
    assert broken(match, {"prefix", "path_separated_prefix"}) == []
    match = route_components_pb2.RouteMatch(path_separated_prefix="/a/")
    assert broken(match, {"path_separated_prefix"}) == [
        ("m.path_separated_prefix", "'/a/' does not match the pattern '^[^?#]+[^?#/]$'"),
    ]


@pytest.mark.parametrize(("port", "ok"), [(1, True), (65535, True), (0, False), (65536, False)])
def test_wrapper_range(port: int, ok: bool) -> None:
    match = listener_components_pb2.FilterChainMatch()
    match.destination_port.CopyFrom(wrappers_pb2.UInt32Value(value=port))
    found = broken(match, {"destination_port"})
    assert (found == []) == ok
    if not ok:
        assert found == [("m.destination_port", "must be at least 1 and at most 65535")]
