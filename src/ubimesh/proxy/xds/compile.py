"""Compile a bootstrap in a child process: ``python -m ubimesh.proxy.xds.compile FILE``.

The serving process never imports protobuf or the generated Envoy classes (about 8 MB of
resident memory that the request path does not need). It runs this module as a short-lived
child instead, which translates the file and writes one pickled answer to stdout:
``("ok", Snapshot, ads)`` or ``("error", message)``. The child also isolates the parser: whatever
a hostile or broken file does to it, the serving process keeps its last good snapshot.
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from ubimesh.proxy.snapshot.types import Snapshot
from ubimesh.proxy.xds.errors import ConfigError

#: How long translating one bootstrap may take before it is abandoned.
COMPILE_TIMEOUT = 120.0


class CompileError(ConfigError):
    """The child refused the file (the message lists every error with its path) or failed."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Compiled:
    """A translated bootstrap. ``ads`` is true when it has ``dynamic_resources.ads_config``:
    then ``snapshot`` is its static part alone, and an ADS client (``ads_link.AdsChild``) must
    run to get the rest."""

    snapshot: Snapshot
    ads: bool


def compile_in_child(
    path: str, service_node: str | None = None, service_cluster: str | None = None
) -> Snapshot:
    """Translate ``path`` in a child process; raises CompileError with the child's message."""
    return compile_bootstrap(path, service_node, service_cluster).snapshot


def compile_bootstrap(
    path: str, service_node: str | None = None, service_cluster: str | None = None
) -> Compiled:
    """``compile_in_child``, also telling whether the bootstrap asks for ADS."""
    argv = [sys.executable, "-m", "ubimesh.proxy.xds.compile", path]
    if service_node:
        argv += ["--service-node", service_node]
    if service_cluster:
        argv += ["--service-cluster", service_cluster]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=COMPILE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CompileError(f"translating {path} took more than {COMPILE_TIMEOUT:.0f} s") from exc
    if proc.returncode != 0 or not proc.stdout:
        detail = proc.stderr.decode(errors="replace").strip()
        raise CompileError(detail or f"the translator exited with code {proc.returncode}")
    # The child is our own code run from our own interpreter: its pickle is trusted.
    kind, payload, *rest = pickle.loads(proc.stdout)
    if kind != "ok":
        raise CompileError(str(payload))
    assert isinstance(payload, Snapshot)
    return Compiled(payload, bool(rest and rest[0]))


def _has_ads(source: dict[str, Any]) -> bool:
    """Whether a (valid) bootstrap's raw dict has dynamic_resources.ads_config, in either
    spelling (snake_case or JSON camelCase)."""
    dynamic = source.get("dynamic_resources", source.get("dynamicResources")) or {}
    return isinstance(dynamic, dict) and bool(dynamic.get("ads_config", dynamic.get("adsConfig")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ubimesh.proxy.xds.compile")
    parser.add_argument("path")
    parser.add_argument("--service-node", default=None)
    parser.add_argument("--service-cluster", default=None)
    args = parser.parse_args(argv)
    from ubimesh.proxy.xds.bootstrap import load_bootstrap

    answer: tuple[Any, ...]
    try:
        snapshot = load_bootstrap(
            args.path, service_node=args.service_node, service_cluster=args.service_cluster
        )
        answer = ("ok", snapshot, _has_ads(snapshot.source))
    except ConfigError as exc:
        answer = ("error", str(exc))
    except OSError as exc:
        answer = ("error", f"cannot read {args.path}: {exc}")
    sys.stdout.buffer.write(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
