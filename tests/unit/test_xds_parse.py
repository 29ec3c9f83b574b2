"""Reading bootstrap files: YAML or JSON text, then the dict into protobuf, with every error
named by its path."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from ubimesh.proxy.xds import ConfigError, ConfigErrors, load_bootstrap, load_bootstrap_text
from ubimesh.proxy.xds.parse import parse_text

CONFIGS = Path(__file__).parent / "configs"
L0 = "static_resources.listeners[0]"
HCM = L0 + ".filter_chains[0].filters[0].typed_config"
R0 = HCM + ".route_config.virtual_hosts[0].routes[0]"


def minimal() -> dict[str, Any]:
    loaded = yaml.safe_load((CONFIGS / "minimal.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def write(tmp_path: Path, text: str, name: str = "bootstrap.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def errors_of(path: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap(path)
    assert info.value.source == path
    return [(e.path, e.message) for e in info.value.errors]


# ---------------------------------------------------------------------------------------------
# Text


def test_yaml_and_json_give_the_same_snapshot(tmp_path: Path) -> None:
    source = minimal()
    from_yaml = load_bootstrap(write(tmp_path, yaml.safe_dump(source)))
    from_json = load_bootstrap(write(tmp_path, json.dumps(source, indent=2), "bootstrap.json"))
    assert from_yaml == from_json
    assert from_yaml.version == from_json.version


def test_json_is_told_by_content_not_by_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(minimal()), "bootstrap.conf")
    assert load_bootstrap(path).listeners[0].name == "ingress"


def test_yaml_flow_mapping_that_is_not_json(tmp_path: Path) -> None:
    path = write(tmp_path, "{node: {id: flow, cluster: c}}")
    assert load_bootstrap(path).node.id == "flow"


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        static_resources:
          listeners:
          - name: a
           address: {}
        """)
    ((where, message),) = errors_of(path)
    assert where == ""
    assert message.startswith("invalid YAML:")
    assert "line 4" in message


def test_json_trailing_comma_is_fine_because_yaml_takes_it(tmp_path: Path) -> None:
    path = write(tmp_path, '{"node": {"id": "a",}}', "bootstrap.json")
    assert load_bootstrap(path).node.id == "a"


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "node": {"id": "a"]\n}\n', "bootstrap.json")
    ((where, message),) = errors_of(path)
    assert where == ""
    assert message.startswith("invalid JSON at line 2")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        node:
          id: a
          id: b
        """)
    ((_where, message),) = errors_of(path)
    assert "duplicate key 'id'" in message
    assert "line 3" in message


def test_duplicate_json_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '{"node": {"id": "a", "id": "b"}}', "bootstrap.json")
    ((_where, message),) = errors_of(path)
    assert message == "invalid JSON: duplicate key 'id'"


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        defaults: &node {id: a, cluster: c}
        """)
    with pytest.raises(ConfigErrors):  # "defaults" is not a Bootstrap field
        load_bootstrap(path)
    value = parse_text("base: &b {id: a, cluster: c}\nnode:\n  <<: *b\n  id: z\n")
    assert value["node"] == {"id": "z", "cluster": "c"}


def test_yaml_timestamps_and_base60_numbers_stay_strings() -> None:
    value = parse_text("a: 2001-12-14\nb: 1:30\nc: 10\nd: 1.5\ne: 1e3\nf: true\n")
    assert value == {"a": "2001-12-14", "b": "1:30", "c": 10, "d": 1.5, "e": 1000.0, "f": True}


def test_empty_file(tmp_path: Path) -> None:
    assert errors_of(write(tmp_path, "# nothing\n")) == [("", "the config is empty")]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    ((_where, message),) = errors_of(write(tmp_path, "- a\n- b\n"))
    assert message == "the config must be a mapping (a JSON object), not a list"


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.yaml")
    ((where, message),) = errors_of(path)
    assert where == ""
    assert message.startswith(f"cannot read {path}")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"node: {id: \xe9}\n")
    ((_where, message),) = errors_of(str(path))
    assert message.startswith(f"cannot read {path}")


# ---------------------------------------------------------------------------------------------
# Dict to protobuf


def test_unknown_fields_are_all_reported_with_a_suggestion() -> None:
    d = minimal()
    d["static_resources"]["listeners"][0]["adress"] = {}
    d["static_resources"]["clusters"][0]["conect_timeout"] = "1s"
    d["static_resources"]["clusters"][0]["zzz"] = 1
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_text(json.dumps(d))
    assert [(e.path, e.message) for e in info.value.errors] == [
        (L0 + ".adress", "unknown field: envoy.config.listener.v3.Listener has no field 'adress'; "
         "did you mean 'address'?"),
        ("static_resources.clusters[0].conect_timeout", "unknown field: "
         "envoy.config.cluster.v3.Cluster has no field 'conect_timeout'; did you mean "
         "'connect_timeout'?"),
        ("static_resources.clusters[0].zzz",
         "unknown field: envoy.config.cluster.v3.Cluster has no field 'zzz'"),
    ]


def test_unknown_field_inside_a_typed_config() -> None:
    d = minimal()
    typed = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    typed["stat_prefx"] = "x"
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_text(yaml.safe_dump(d))
    (error,) = info.value.errors
    assert error.path == HCM + ".stat_prefx"
    assert "HttpConnectionManager has no field 'stat_prefx'; did you mean 'stat_prefix'?" in (
        error.message
    )


def test_camel_case_and_snake_case_are_both_accepted_but_not_together() -> None:
    d = minimal()
    cluster = d["static_resources"]["clusters"][0]
    cluster["connectTimeout"] = "2s"
    assert load_bootstrap_text(json.dumps(d)).clusters["backend"].connect_timeout == 2.0
    cluster["connect_timeout"] = "3s"
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_text(json.dumps(d))
    assert [(e.path, e.message) for e in info.value.errors] == [
        ("static_resources.clusters[0].connect_timeout",
         "set twice (as 'connectTimeout' and 'connect_timeout')"),
    ]


def test_two_members_of_a_oneof() -> None:
    d = minimal()
    match = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["match"]
    match["path"] = "/exact"
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_text(json.dumps(d))
    (error,) = info.value.errors
    assert error.path == R0 + ".match.path"
    assert error.message.startswith("only one of prefix, path, safe_regex")
    assert error.message.endswith("and prefix is set too")


@pytest.mark.parametrize(
    ("text", "path", "expected"),
    [
        ("port_value: abc", L0 + ".address.socket_address.port_value", "invalid value"),
        ("port_value: 70000", L0 + ".address.socket_address.port_value", "at most 65535"),
        ("port_value: -1", L0 + ".address.socket_address.port_value", "invalid value"),
        ("port_value: [1]", L0 + ".address.socket_address.port_value", "invalid value"),
    ],
)
def test_bad_scalar_values(text: str, path: str, expected: str) -> None:
    d = minimal()
    d["static_resources"]["listeners"][0]["address"]["socket_address"].update(yaml.safe_load(text))
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_text(json.dumps(d))
    assert any(e.path == path and expected in e.message for e in info.value.errors), [
        str(e) for e in info.value.errors
    ]


def test_bad_enum_and_duration_values() -> None:
    d = minimal()
    cluster = d["static_resources"]["clusters"][0]
    cluster["type"] = "STATICC"
    cluster["connect_timeout"] = "5 seconds"
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_text(json.dumps(d))
    errors = {e.path: e.message for e in info.value.errors}
    assert set(errors) == {"static_resources.clusters[0].type",
                           "static_resources.clusters[0].connect_timeout"}
    assert "STATICC" in errors["static_resources.clusters[0].type"]
    assert "duration" in errors["static_resources.clusters[0].connect_timeout"]


@pytest.mark.parametrize(
    ("where", "value", "expected"),
    [
        ("listeners", {"name": "x"}, "expected a list, got a mapping"),
        ("clusters", "backend", "expected a list, got a string"),
    ],
)
def test_wrong_shapes(where: str, value: Any, expected: str) -> None:
    d = minimal()
    d["static_resources"][where] = value
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_text(json.dumps(d))
    assert (f"static_resources.{where}", expected) in [
        (e.path, e.message) for e in info.value.errors
    ]


def test_scalar_where_a_message_belongs_keeps_later_indices() -> None:
    d = minimal()
    listeners = d["static_resources"]["listeners"]
    listeners.insert(0, "not-a-listener")
    listeners[1]["name"] = "second"
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_text(json.dumps(d))
    assert [(e.path, e.message) for e in info.value.errors] == [
        ("static_resources.listeners[0]", "expected a mapping (Listener), got a string"),
    ]


def test_typed_config_without_type() -> None:
    d = minimal()
    typed = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    del typed["@type"]
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_text(json.dumps(d))
    assert [(e.path, e.message) for e in info.value.errors] == [
        (HCM, "@type is required (the type URL of the packed message)"),
    ]


def test_unknown_type_url_is_named_and_the_rest_still_checked() -> None:
    d = minimal()
    typed = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    typed["http_filters"].insert(0, {"name": "x", "typed_config": {
        "@type": "type.googleapis.com/acme.filters.Magic", "power": 9000}})
    d["static_resources"]["clusters"][0]["connect_timeout"] = "0s"
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_text(json.dumps(d))
    assert [(e.path, e.message) for e in info.value.errors] == [
        (HCM + ".http_filters[0].typed_config",
         "not supported by ubimesh (typed config type acme.filters.Magic); remove it, or see "
         "docs/envoy-compat.md for the supported subset"),
        ("static_resources.clusters[0].connect_timeout", "must be greater than 0s"),
    ]


def test_null_means_unset() -> None:
    d = minimal()
    d["node"] = None
    d["static_resources"]["clusters"][0]["connect_timeout"] = None
    snap = load_bootstrap_text(json.dumps(d))
    assert snap.clusters["backend"].connect_timeout == 5.0


def test_config_errors_str_lists_everything(tmp_path: Path) -> None:
    d = minimal()
    d["static_resources"]["listeners"][0]["foo"] = 1
    d["static_resources"]["clusters"][0]["lb_policy"] = "MAGLEV"
    path = write(tmp_path, yaml.safe_dump(d))
    with pytest.raises(ConfigError) as info:  # ConfigErrors is a ConfigError
        load_bootstrap(path)
    text = str(info.value)
    assert isinstance(info.value, ConfigErrors) and info.value.source == path
    assert text.startswith("2 configuration errors:\n")
    assert f"\n  {L0}.foo: unknown field" in text
    assert "\n  static_resources.clusters[0].lb_policy: not supported by ubimesh (lb_policy " \
           "MAGLEV)" in text
