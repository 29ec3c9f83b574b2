"""``MeshPolicy.load_listeners`` splits a large mesh with a forked child: the answers must be
exactly those of doing everything in one process."""

from __future__ import annotations

import os
import pickle
import sys
import threading
from pathlib import Path

import pytest

from ubimesh.control.resources.model import Resource
from ubimesh.policy import questions
from ubimesh.policy.questions import MeshPolicy, blast_radius, diff

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import policy_blast_radius as generator

SERVICES = 240  # above the split threshold, small enough to stay quick
RULES = 900


@pytest.fixture(scope="module")
def resources() -> list[Resource]:
    return generator.generate(SERVICES, RULES, seed=7)


def _answers(mesh: MeshPolicy) -> list[object]:
    identity = "spiffe://cluster.local/ns/ns0/sa/svc0"
    return [blast_radius(mesh, identity), blast_radius(mesh, identity, max_hops=1)]


def test_split_load_gives_the_same_answers_as_one_process(
    resources: list[Resource], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SERVICES >= questions._PARALLEL_MIN_SERVICES
    # The split runs only from a single-threaded process on more than one CPU; say so
    # instead of passing without exercising it.
    if not questions._can_fork():
        pytest.skip(f"no split here: {threading.active_count()} threads or one CPU")
    forks: list[int] = []
    real_fork = os.fork

    def counting_fork() -> int:
        pid = real_fork()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", counting_fork)
    split = MeshPolicy(resources)
    split.load_listeners()
    assert len(forks) == 1
    monkeypatch.setattr(questions, "_PARALLEL_MIN_SERVICES", 10**9)
    alone = MeshPolicy(resources)
    alone.load_listeners()
    assert len(forks) == 1
    assert sorted(split._listeners) == sorted(alone._listeners)
    for key, listeners in alone._listeners.items():
        assert [(x.destination, x.workload) for x in split._listeners[key]] == [
            (x.destination, x.workload) for x in listeners
        ]
    assert _answers(split) == _answers(alone)
    assert not diff(split, alone).flips


def test_a_failing_child_is_made_up_for_by_the_parent(
    resources: list[Resource], monkeypatch: pytest.MonkeyPatch
) -> None:
    if not questions._can_fork():
        pytest.skip(f"no split here: {threading.active_count()} threads or one CPU")
    alone = MeshPolicy(resources)
    monkeypatch.setattr(questions, "_PARALLEL_MIN_SERVICES", 10**9)
    alone.load_listeners()
    monkeypatch.undo()
    # The child dies before sending anything: pickling fails there.
    real_dump = pickle.dump

    def broken_dump(*args: object, **kwargs: object) -> None:
        raise RuntimeError("child broke")

    monkeypatch.setattr(pickle, "dump", broken_dump)
    split = MeshPolicy(resources)
    split.load_listeners()
    monkeypatch.setattr(pickle, "dump", real_dump)
    assert len(split._listeners) == len(alone._listeners) == SERVICES
    assert _answers(split) == _answers(alone)
