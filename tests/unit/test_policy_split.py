"""``ubimesh.policy.split.share``: numbered items done by this process and a forked child give
``{i: work(i)}``; a failing item raises what doing them in order raises; a dead or hung child
costs its items, not the answer. Forking happens only in a single-threaded process (the test
process has threads by now), so the checks run in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ubimesh.policy import split

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import os, time
from ubimesh.policy import split

assert split.can_fork(), "expected a single-threaded process on 2+ CPUs"
parent = os.getpid()

def work(i):
    time.sleep(0.01)
    return (i * i, os.getpid())

done = split.share(30, work)
assert sorted(done) == list(range(30)) and all(done[i][0] == i * i for i in done), done
pids = {pid for _, pid in done.values()}
assert parent in pids and len(pids) == 2, pids  # both took items

calls = []
done = split.share(5, lambda i: i, meanwhile=lambda: calls.append(os.getpid()))
assert done == {i: i for i in range(5)} and calls == [parent], (done, calls)

# Two failing items: always the first in order, whichever process met which.
def failing(i):
    time.sleep(0.005)
    if i in (4, 17):
        raise ValueError(f"item {i}")
    return i
for _ in range(3):
    try:
        split.share(24, failing)
    except ValueError as exc:
        assert str(exc) == "item 4", exc
    else:
        raise AssertionError("no error")

# A child that dies, or hangs, on its first item: this process does everything.
def dying(i):
    if os.getpid() != parent:
        os._exit(3)
    return i
assert split.share(10, dying) == {i: i for i in range(10)}
split.CHILD_GRACE_S = 0.3
def hanging(i):
    if os.getpid() != parent:
        time.sleep(60)
    return i
started = time.monotonic()
assert split.share(10, hanging) == {i: i for i in range(10)}
assert time.monotonic() - started < 10

try:
    os.waitpid(-1, os.WNOHANG)
except ChildProcessError:
    pass
else:
    raise AssertionError("a child was left behind")
print("OK")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_share_in_a_fresh_process() -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: share does not fork")
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert run.returncode == 0 and run.stdout.strip() == "OK", run.stdout + run.stderr


def test_share_in_a_threaded_process_runs_everything_here() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, args=(10,))
    thread.start()
    try:
        assert not split.can_fork()
        calls: list[int] = []
        done = split.share(3, lambda i: (i, os.getpid()), meanwhile=lambda: calls.append(1))
    finally:
        release.set()
        thread.join()
    assert done == {i: (i, os.getpid()) for i in range(3)} and calls == [1]
    with pytest.raises(ValueError, match="at most 255"):
        split.share(256, lambda i: i)
