"""The benchmark's targets are what its docs say they are (bench/run.py's target_bootstrap):
the telemetry bars compare targets that differ by exactly the three features measured."""

from __future__ import annotations

import copy
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ubimesh import native

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def run() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # run.py imports its benchlib package
    try:
        spec = importlib.util.spec_from_file_location("ubimesh_bench_run", BENCH / "run.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def hcm_of(cfg: dict[str, Any]) -> dict[str, Any]:
    listener = cfg["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def test_telemetry_all_off_keeps_the_default_request_ids(run: ModuleType, tmp_path: Path) -> None:
    # It used to get S1's bootstrap, whose request ids are off (to match nginx and HAProxy), so
    # the bars charged request-id generation to telemetry.
    plain = run.target_bootstrap("telemetry", "ubimesh", 1001, 1002, 1003, ["1k"], tmp_path)
    assert hcm_of(plain)["generate_request_id"] is True
    s1 = run.target_bootstrap("s1", "ubimesh", 1001, 1002, 1003, ["1k"], tmp_path)
    assert hcm_of(s1)["generate_request_id"] is False


@pytest.mark.parametrize("target", ["ubimesh-telemetry", "ubimesh-telemetry-1pct"])
def test_telemetry_targets_differ_from_all_off_by_the_three_features(
    run: ModuleType, tmp_path: Path, target: str
) -> None:
    plain = run.target_bootstrap("telemetry", "ubimesh", 1001, 1002, 1003, ["1k"], tmp_path)
    full = run.target_bootstrap("telemetry", target, 1001, 1002, 1003, ["1k"], tmp_path)
    stripped = copy.deepcopy(full)
    listener = stripped["static_resources"]["listeners"][0]
    assert "ubimesh.telemetry" in listener.pop("metadata")["filter_metadata"]  # mesh metrics
    hcm = hcm_of(stripped)
    assert hcm.pop("access_log")[0]["name"] == "envoy.access_loggers.file"
    assert hcm.pop("tracing")["provider"]["name"] == "envoy.tracers.zipkin"
    clusters = stripped["static_resources"]["clusters"]
    # The span sink's cluster (the tracer's collector).
    sinks = [c for c in clusters if c["name"] == "span_sink"]
    assert len(sinks) == 1
    clusters.remove(sinks[0])
    assert stripped == plain


def test_a_target_started_without_the_runs_build_stops_the_run(
    run: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A source edit during a run makes the build stale; a target started after it logs that
    it runs pure Python, and the run stops instead of reporting it. The log line is the one
    ``ubimesh.native.enable`` writes when no build matches (here: an empty build cache)."""
    monkeypatch.setenv("UBIMESH_NATIVE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("UBIMESH_NATIVE", raising=False)
    with caplog.at_level(logging.INFO, logger="ubimesh.native"):
        assert native.enable() is False
    log = tmp_path / "ubimesh.log"
    popen = subprocess.Popen(["true"])
    popen.wait(timeout=10)
    managed = run.Managed("ubimesh", ["true"], popen, log)
    log.write_text("[INFO][ubimesh.native] compiled hot path in use (/cache/abc)\n")
    run.refuse_stale_build(managed)  # the build the run began with: fine
    log.write_text(caplog.text)
    with pytest.raises(run.BenchError, match="source file changed during the run"):
        run.refuse_stale_build(managed)
