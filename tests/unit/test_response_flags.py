"""Envoy's response flags: names, print order, combination, and the mapping from pool and
reset reasons (ubimesh.proxy.response_flags)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ubimesh.proxy import response_flags as rf
from ubimesh.proxy.http import pool

SRC = Path(__file__).resolve().parents[2] / "src" / "ubimesh"

# Envoy's CoreResponseFlag bits, lowest first (envoy/stream_info/stream_info.h): the order in
# which Envoy prints them.
ENVOY_ORDER = [
    "LH",
    "UH",
    "UT",
    "LR",
    "UR",
    "UF",
    "UC",
    "UO",
    "NR",
    "DI",
    "FI",
    "RL",
    "UAEX",
    "RLSE",
    "DC",
    "URX",
    "SI",
    "IH",
    "DPE",
    "UMSDR",
    "RFCF",
    "NFCF",
    "DT",
    "UPE",
    "NC",
    "OM",
    "DF",
    "DO",
    "DR",
    "UDO",
]


def test_names_and_order_are_envoys() -> None:
    assert list(rf.ALL) == ENVOY_ORDER
    assert len(set(rf.ALL)) == len(rf.ALL)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("UF",), "UF"),
        (("URX", "UF"), "UF,URX"),  # a TCP proxy whose every connect attempt failed
        (("UF", "URX"), "UF,URX"),
        (("DC", "UT"), "UT,DC"),
        (("NC", "UH", "LH"), "LH,UH,NC"),
        (("UC", "UC"), "UC"),
        (("", "SI", ""), "SI"),
        ((), ""),
    ],
)
def test_combine_prints_in_envoys_order_each_once(flags: tuple[str, ...], expected: str) -> None:
    assert rf.combine(*flags) == expected


def test_add_flag_keeps_existing_text() -> None:
    assert rf.add_flag("", "") == ""
    assert rf.add_flag("UT", "") == "UT"
    assert rf.add_flag("UT,DC", "UH") == "UH,UT,DC"


def test_unknown_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="RBAC"):
        rf.add_flag("", "RBAC")
    with pytest.raises(ValueError, match="uf"):
        rf.parse("UH,uf")


def test_istio_label_text() -> None:
    assert rf.label_text("") == "-"
    assert rf.label_text("UF,URX") == "UF,URX"
    assert rf.parse("-") == ()
    assert rf.parse("UF,URX") == ("UF", "URX")


@pytest.mark.parametrize(
    ("reason", "flag"),
    [
        (pool.CONNECTION_TERMINATION, "UC"),
        (pool.CONNECTION_FAILURE, "UF"),
        (pool.CONNECTION_TIMEOUT, "UF"),
        (pool.PROTOCOL_ERROR, "UPE"),
        (pool.OVERFLOW, "UO"),
        ("remote reset", "UR"),
    ],
)
def test_reset_reasons_map_as_envoys_router(reason: str, flag: str) -> None:
    assert rf.reset_flag(reason) == flag


def test_pool_failures_are_uf_or_overflow() -> None:
    assert rf.pool_failure_flag(pool.CONNECTION_FAILURE) == "UF"
    assert rf.pool_failure_flag(pool.CONNECTION_TIMEOUT) == "UF"
    assert rf.pool_failure_flag(pool.CONNECTION_TERMINATION) == "UF"
    assert rf.pool_failure_flag(pool.OVERFLOW) == "UO"


def test_every_flag_literal_in_the_proxy_is_envoys() -> None:
    """Flags written as literals (local replies in hcm_config and friends) are Envoy names."""
    literal = re.compile(r"""LocalReply = \(\d+, b"[^"]*", "([^"]*)\"""")
    found = []
    for path in (SRC / "proxy").rglob("*.py"):
        found += literal.findall(path.read_text())
    assert found, "the pattern no longer finds hcm_config's local replies"
    assert [f for f in found if f and f not in rf.ALL] == []
