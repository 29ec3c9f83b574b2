"""The compiled hot path's build key leaves out packages the proxy never imports; keep it so."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ubimesh import native

PACKAGE = Path(native.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def test_nothing_in_the_proxy_imports_the_packages_left_out_of_the_build_key() -> None:
    outside = tuple(f"ubimesh.{name}" for name in native.OUTSIDE_THE_PROXY) + tuple(
        "ubimesh." + m.removesuffix(".py").replace("/", ".") for m in native.OUTSIDE_MODULES
    )
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if native.outside_the_proxy(rel):
            continue
        bad = sorted(m for m in _imports(path) if m in outside or m.startswith(outside))
        if bad:
            offenders.append(f"{rel}: {', '.join(bad)}")
    assert not offenders, (
        "these modules import a package that native.source_hash leaves out; either move the "
        "code or drop the package from native.OUTSIDE_THE_PROXY:\n" + "\n".join(offenders)
    )


def test_an_edit_outside_the_proxy_keeps_the_build_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "src" / "ubimesh"
    (tree / "proxy").mkdir(parents=True)
    (tree / "control").mkdir()
    (tree / "proxy" / "a.py").write_text("x = 1\n")
    (tree / "control" / "b.py").write_text("y = 1\n")
    monkeypatch.setattr(native, "_PACKAGE_ROOT", tree)
    monkeypatch.setattr(native, "_SRC_ROOT", tree.parent)
    before = native.source_hash()
    (tree / "control" / "b.py").write_text("y = 2\n")
    assert native.source_hash() == before
    (tree / "proxy" / "a.py").write_text("x = 2\n")
    assert native.source_hash() != before


#: Modules the serving proxy process must not load (each costs memory against the 30 MB idle
#: budget, and none is needed to serve): protobuf and grpc live in the translator child,
#: urllib.request/http.client/email come with the CLI's API client, yaml and aiohttp with the
#: control plane.
NOT_IN_THE_PROXY = (
    "google.protobuf",
    "grpc",
    "urllib.request",
    "http.client",
    "email",
    "yaml",
    "aiohttp",
    "ubimesh.control.resources",
    "ubimesh.control.store",
    "ubimesh.control.compiler",
    "ubimesh.control.ads",
    "ubimesh.control.server",
    "ubimesh.control.identity_metrics",
    "datetime",
    "cryptography",
)


def test_the_serving_process_does_not_load_what_it_does_not_need() -> None:
    code = (
        "import sys, ubimesh.cli.main, ubimesh.proxy.app, ubimesh.proxy.server, "
        "ubimesh.proxy.admin; print('\\n'.join(sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    loaded = sorted(m for m in out if m.startswith(NOT_IN_THE_PROXY))
    assert not loaded, f"the proxy's serving modules load {loaded}; import them lazily"
