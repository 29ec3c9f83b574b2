"""The RBAC filters' helpers: per-policy stat names and their Prometheus labels, Envoy's
x-forwarded-for address rule, the rate-limited denial log."""

from __future__ import annotations

import logging

import pytest

from ubimesh.proxy.http.rbac import DenialLog, last_xff_address, peer_principals, policy_stat_name
from ubimesh.proxy.tls.peer import NO_PEER_CERTIFICATE, PeerInfo
from ubimesh.telemetry.prometheus import extract_tags


def test_policy_names_in_stat_names() -> None:
    assert policy_stat_name("shop/web-to-api/0") == "shop_web-to-api_0"
    assert policy_stat_name("a.b c") == "a_b_c"
    assert policy_stat_name("") == "none"


@pytest.mark.parametrize(
    ("stat", "name", "tags"),
    [
        (
            "http.ingress.rbac.policy.shop_web-to-api_0.denied",
            "http.rbac.policy.denied",
            {
                "envoy.rbac_policy_name": "shop_web-to-api_0",
                "envoy.http_conn_manager_prefix": "ingress",
            },
        ),
        (
            "http.ingress.rbac.main.policy.none.denied",
            "http.rbac.policy.denied",
            {
                "envoy.rbac_policy_name": "none",
                "envoy.rbac_http_prefix": "main",
                "envoy.http_conn_manager_prefix": "ingress",
            },
        ),
        (
            "db_rbac.rbac.policy.data_app-to-db_0.denied",
            "rbac.policy.denied",
            {"envoy.rbac_policy_name": "data_app-to-db_0", "envoy.rbac_prefix": "db_rbac"},
        ),
        ("db_rbac.rbac.denied", "rbac.denied", {"envoy.rbac_prefix": "db_rbac"}),
    ],
)
def test_per_policy_counters_get_a_policy_label(stat: str, name: str, tags: dict[str, str]) -> None:
    extracted, found = extract_tags(stat)
    assert extracted == name
    assert dict(found) == tags


@pytest.mark.parametrize(
    ("xff", "skip", "expected"),
    [
        (None, 0, None),
        ("10.0.0.1", 0, "10.0.0.1"),
        ("10.0.0.1, 192.168.0.1", 0, "192.168.0.1"),
        ("10.0.0.1, 192.168.0.1", 1, "10.0.0.1"),
        ("10.0.0.1", 1, None),  # nothing left after skipping
        ("not-an-ip", 0, None),
        ("10.0.0.1,", 0, None),  # Envoy keeps the whole string when the comma ends it
        (" 2001:db8::1 ", 0, "2001:db8::1"),
    ],
)
def test_last_xff_address_is_envoys(xff: str | None, skip: int, expected: str | None) -> None:
    assert last_xff_address(xff, skip) == expected


def test_principals_of_a_connection() -> None:
    assert peer_principals(None) == ()
    assert peer_principals(NO_PEER_CERTIFICATE) == ("",)
    peer = PeerInfo(True, "spiffe://a/b", ("spiffe://a/b",), ("b.a",), "CN=b")
    assert peer_principals(peer) == ("spiffe://a/b", "b.a", "CN=b")


def test_the_denial_log_keeps_to_its_limit(caplog: pytest.LogCaptureFixture) -> None:
    log = DenialLog(limit=3)
    with caplog.at_level(logging.WARNING, logger="ubimesh.rbac"):
        for _ in range(10):
            log.denied("l", "127.0.0.1:1", "-", "GET", "h", "/p", 80, "")
        assert len(caplog.records) == 3
        assert "policy=none" in caplog.records[0].getMessage()
        log.window -= 1.0  # the second is over: the next denial reports the 7 left out
        log.denied("l", "127.0.0.1:1", "-", "GET", "h", "/p", 80, "p")
    messages = [r.getMessage() for r in caplog.records]
    assert "RBAC denied: 7 more denials in one second were not logged" in messages
    assert messages[-1].endswith("policy=p")
