"""``MeshPolicy.load_listeners`` splits a large mesh with a forked child: the answers must be
exactly those of doing everything in one process.

The split only happens in a single-threaded process (forking a threaded one could copy a held
lock), and the test process has threads by now (servers of other tests), so the comparison runs
in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, pickle, sys
sys.path.insert(0, {bench!r})
import policy_blast_radius as generator
from ubimesh.policy import questions, split
from ubimesh.policy.questions import MeshPolicy, blast_radius, diff

assert split.can_fork(), "expected a single-threaded process on 2+ CPUs"
resources = generator.generate(240, 900, seed=7)
assert 240 >= questions._PARALLEL_MIN_SERVICES
identity = "spiffe://cluster.local/ns/ns0/sa/svc0"

def answers(mesh):
    return [blast_radius(mesh, identity), blast_radius(mesh, identity, max_hops=1)]

forks = []
real_fork = os.fork
def counting_fork():
    pid = real_fork()
    if pid:
        forks.append(pid)
    return pid
os.fork = counting_fork

split = MeshPolicy(resources)
split.load_listeners()
assert len(forks) == 1, forks

limit = questions._PARALLEL_MIN_SERVICES
questions._PARALLEL_MIN_SERVICES = 10**9
alone = MeshPolicy(resources)
alone.load_listeners()
assert len(forks) == 1, forks
questions._PARALLEL_MIN_SERVICES = limit

assert sorted(split._listeners) == sorted(alone._listeners)
# The child's half came from the child: this process compiled only its own half.
assert 0 < len(split._compiled) < len(alone._compiled), (len(split._compiled), len(alone._compiled))
for key, listeners in alone._listeners.items():
    assert [(x.destination, x.workload) for x in split._listeners[key]] == [
        (x.destination, x.workload) for x in listeners], key
assert answers(split) == answers(alone)
assert not diff(split, alone).flips

# A child that dies before sending anything: the parent does its half itself.
real_dump = pickle.dump
def broken_dump(*args, **kwargs):
    raise RuntimeError("child broke")
pickle.dump = broken_dump
broken = MeshPolicy(resources)
broken.load_listeners()
pickle.dump = real_dump
assert len(forks) == 2, forks
assert len(broken._listeners) == len(alone._listeners) == 240
assert len(broken._compiled) == len(alone._compiled)  # everything compiled here
assert answers(broken) == answers(alone)

# `meanwhile` runs once, here, while the child works; when it raises, the child is killed
# and reaped, and the error is the caller's.
calls = []
meant = MeshPolicy(resources)
meant.load_listeners(meanwhile=lambda: calls.append(os.getpid()))
assert calls == [os.getpid()] and len(forks) == 3, (calls, forks)
assert answers(meant) == answers(alone)
def refuse():
    raise ValueError("the set is invalid")
try:
    MeshPolicy(resources).load_listeners(meanwhile=refuse)
except ValueError as exc:
    assert str(exc) == "the set is invalid"
else:
    raise AssertionError("meanwhile's error was swallowed")
assert len(forks) == 4, forks
try:
    os.waitpid(-1, os.WNOHANG)
except ChildProcessError:
    pass
else:
    raise AssertionError("a child was left behind")
print("OK")
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_split_load_gives_the_same_answers_as_one_process() -> None:
    import os

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: load_listeners does not split")
    code = SCRIPT.format(bench=str(ROOT / "bench"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "OK", run.stdout + run.stderr
