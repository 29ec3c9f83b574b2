"""SpiffeId parsing: the specs.md 2.1 vectors, with go-spiffe's reasons."""

from __future__ import annotations

import pytest

from ubimesh.identity import SpiffeId, SpiffeIdError


@pytest.mark.parametrize(
    ("text", "td", "path"),
    [
        ("spiffe://example.org/ns/default/sa/web", "example.org", "/ns/default/sa/web"),
        ("spiffe://td_1.example-2.org/a.b/C_D-9", "td_1.example-2.org", "/a.b/C_D-9"),
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/..a/.b", "example.org", "/..a/.b"),
    ],
)
def test_valid_ids_parse_and_print_back(text: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(text)
    assert (sid.trust_domain, sid.path) == (td, path)
    assert str(sid) == text
    assert sid.is_workload == bool(path)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "cannot be empty"),
        ("spiffe://Example.org/x", "trust domain characters are limited to lowercase letters"),
        ("spiffe://example.org/", "path cannot have a trailing slash"),
        ("spiffe://example.org/x/", "path cannot have a trailing slash"),
        ("spiffe://example.org//x", "path cannot contain empty segments"),
        ("spiffe://example.org/./x", "path cannot contain dot segments"),
        ("spiffe://example.org/x/..", "path cannot contain dot segments"),
        ("spiffe://example.org/a%20b", "path segment characters are limited to letters"),
        ("spiffe://ex:8080/x", "trust domain characters are limited"),
        ("spiffe://u@ex/x", "trust domain characters are limited"),
        ("spiffe://ex/x?y", "path segment characters are limited"),
        ("spiffe://ex/x#y", "path segment characters are limited"),
        ("http://ex/x", "scheme is missing or invalid"),
        ("SPIFFE://ex/x", "scheme is missing or invalid"),
        ("spiffe:///x", "trust domain is missing"),
        ("spiffe://" + "a" * 256, "trust domain is longer than 255 bytes"),
        ("spiffe://ex/" + "a" * 2048, "is longer than 2048 bytes"),
    ],
)
def test_invalid_ids_are_refused_with_the_rule(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(text)
    assert reason in info.value.reason
    assert reason in str(info.value)


def test_the_longest_allowed_id_is_accepted() -> None:
    text = "spiffe://ex/" + "a" * (2048 - len("spiffe://ex/"))
    assert len(text) == 2048
    assert str(SpiffeId.parse(text)) == text


def test_for_service_account_builds_and_validates() -> None:
    sid = SpiffeId.for_service_account("cluster.local", "default", "web")
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/web"
    assert sid == SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")
    with pytest.raises(SpiffeIdError):
        SpiffeId.for_service_account("cluster.local", "de fault", "web")
