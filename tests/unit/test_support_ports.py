"""The test harness's port picker: ports from separate calls never collide."""

from __future__ import annotations

import itertools

import pytest
from tests.support import procs


def test_separate_calls_never_hand_out_the_same_port() -> None:
    # Nothing binds the ports in between, as when a test picks a sidecar's inbound ports and
    # then its admin ports before starting anything: the free-looking port must not repeat.
    seen: set[int] = set()
    for _ in range(300):
        ports = procs.free_ports(4)
        assert len(set(ports)) == 4
        assert not seen & set(ports), sorted(seen & set(ports))
        seen.update(ports)
    lo, hi = procs.FREE_PORT_RANGE
    assert all(lo <= p < hi for p in seen)


def test_the_memory_of_handed_out_ports_is_bounded() -> None:
    # More ports than the memory holds: the oldest are forgotten, so the range never runs dry.
    for _ in range(procs._RECENT_LIMIT // 50 + 10):
        procs.free_ports(50)
    assert len(procs._recent) == procs._RECENT_LIMIT


def test_xdist_workers_pick_from_disjoint_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    full = (20000, 32768)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert procs._worker_slice(full) == full
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    slices = []
    for k in range(3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{k}")
        slices.append(procs._worker_slice(full))
    assert slices[0][0] == full[0] and slices[-1][1] <= full[1]
    for (_, hi), (lo, _) in itertools.pairwise(slices):
        assert hi <= lo  # disjoint, in order
    assert all(hi - lo >= 4000 for lo, hi in slices)
