"""The policy evaluator's compiler context (``questions._AuthorizationContext``) skips only
what labels or versions a listener: its sidecar inbound listeners have exactly the filter
chains, addresses and names the control plane's own context gives the proxies."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from ubimesh.control.compiler.context import Context
from ubimesh.control.compiler.index import Sidecar, build_index
from ubimesh.control.compiler.model import LISTENER_TYPE
from ubimesh.control.compiler.sidecar import compile_sidecar
from ubimesh.control.resources import validate_document
from ubimesh.policy.questions import MeshPolicy, _AuthorizationContext

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import policy_blast_radius as generator


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
def test_inbound_listeners_are_the_proxies_but_for_metadata(mode: str) -> None:
    docs = generator.generate_documents(30, 90, seed=5, workloads=2)
    docs[0]["spec"]["mtls"]["mode"] = mode
    resources = [validate_document(d, f"gen#{i}") for i, d in enumerate(docs)]
    index = build_index(resources)
    real, quick = Context(index), _AuthorizationContext(index)
    real.access_log = quick.access_log = None  # as MeshPolicy sets it
    compared = 0
    for workload in index.workloads:
        assert workload.sidecar is not None
        inbound = dataclasses.replace(
            workload, sidecar=Sidecar(dict(workload.sidecar.inbound_ports), None, ())
        )
        want = compile_sidecar(real, inbound).resources[LISTENER_TYPE]
        got = compile_sidecar(quick, inbound).resources[LISTENER_TYPE]
        assert sorted(got) == sorted(want)
        for name, listener in want.items():
            mine = type(listener)()
            mine.CopyFrom(got[name])
            theirs = type(listener)()
            theirs.CopyFrom(listener)
            assert mine.HasField("metadata")  # the telemetry labels are still there
            mine.ClearField("metadata")
            theirs.ClearField("metadata")
            assert mine.SerializeToString(deterministic=True) == theirs.SerializeToString(
                deterministic=True
            ), (workload.name, name)
            compared += 1
    assert compared >= 60
    assert isinstance(MeshPolicy(resources).ctx, _AuthorizationContext)
