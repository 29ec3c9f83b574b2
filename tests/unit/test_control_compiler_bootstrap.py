"""The identity part of generated bootstraps (control/bootstrap.py ``identity_metadata``): the
node metadata a proxy reads to get its certificate (docs/identity.md)."""

from __future__ import annotations

import pytest

from ubimesh.control.bootstrap import build_bootstrap

ID = "spiffe://cluster.local/ns/shop/sa/web"
API = "http://127.0.0.1:15000"


def test_a_proxy_with_an_identity_carries_it_the_api_and_its_token_file() -> None:
    bootstrap = build_bootstrap(
        node_id="web-1.shop", xds=[("127.0.0.1", 15010)], identity=ID, control_api=API,
        join_token_file="/run/web-1.token",
    )
    assert bootstrap["node"]["metadata"] == {
        "ubimesh.role": "sidecar",
        "ubimesh.identity": ID,
        "ubimesh.control_api": API,
        "ubimesh.join_token_file": "/run/web-1.token",
    }


def test_a_proxy_without_one_carries_none_of_it() -> None:
    bootstrap = build_bootstrap(node_id="web-1.shop", xds=[("127.0.0.1", 15010)])
    assert bootstrap["node"]["metadata"] == {"ubimesh.role": "sidecar"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"identity": ID, "control_api": API}, "join_token_file: missing"),
        ({"identity": "web", "control_api": API, "join_token_file": "t"}, "not a SPIFFE ID"),
        ({"identity": ID, "control_api": "127.0.0.1:1", "join_token_file": "t"},
         "not an http"),
    ],
)
def test_an_incomplete_or_malformed_identity_is_refused_naming_the_argument(
    kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_bootstrap(node_id="web-1.shop", xds=[("127.0.0.1", 15010)], **kwargs)
