"""Priority levels: how much of the traffic each priority receives (Envoy's "priority load").

Envoy's algorithm (load_balancer_impl.cc, ``recalculatePerPriorityState``), with integer
percentages throughout:

1. Each priority level gets a health score: ``min(100, factor * healthy / total)`` where
   ``factor`` is the overprovisioning factor in percent (default 140) and ``total`` counts every
   host of the level. Degraded hosts get a degraded score the same way.
2. The normalized total availability is ``min(100, sum(health) + sum(degraded))``. When it is 0
   nothing can take traffic: every load is 0 here, and the cluster (``cluster.py``) applies
   Envoy's panic threshold on top (total panic: load by host counts over all hosts).
3. Load 100 is handed out in priority order, healthy first: level ``i`` receives
   ``min(left, health[i] * 100 // normalized)``. What is left goes to degraded hosts the same
   way, and any rounding remainder to the first level with healthy (else degraded) hosts.

So with P0 50 % healthy and factor 140, P0 scores 70 and gets 70 % of the traffic; P1 (fully
healthy) gets the 30 % that spills over. When the levels together are less than 100 % available
the shares are scaled up so that they still sum to 100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def level_health(overprovisioning_factor: int, available: int, total: int) -> int:
    """Health (or degraded) score of one level, 0..100."""
    if total <= 0:
        return 0
    return min(100, overprovisioning_factor * available // total)


def _distribute(
    out: list[int], availability: Sequence[int], total_load: int, normalized: int
) -> tuple[int, int]:
    first = -1
    for i, a in enumerate(availability):
        if first < 0 and a > 0:
            first = i
        share = min(total_load, a * 100 // normalized)
        out[i] = share
        total_load -= share
    return first, total_load


@dataclass(frozen=True, slots=True)
class PriorityLoad:
    """Per-level percentages of traffic for healthy and for degraded hosts (sum 100, or all
    zeros when no level has an available host)."""

    healthy: tuple[int, ...]
    degraded: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.healthy) + sum(self.degraded)


def compute_priority_load(health: Sequence[int], degraded: Sequence[int]) -> PriorityLoad:
    """Turn per-level health and degraded scores (0..100 each) into the priority load."""
    if len(health) != len(degraded):
        raise ValueError("health and degraded must have one entry per priority level")
    n = len(health)
    healthy_load = [0] * n
    degraded_load = [0] * n
    normalized = min(100, sum(health) + sum(degraded))
    if normalized == 0:
        return PriorityLoad(tuple(healthy_load), tuple(degraded_load))
    first_healthy, left = _distribute(healthy_load, health, 100, normalized)
    first_degraded, left = _distribute(degraded_load, degraded, left, normalized)
    if left:
        if first_healthy >= 0:
            healthy_load[first_healthy] += left
        else:
            degraded_load[first_degraded] += left
    return PriorityLoad(tuple(healthy_load), tuple(degraded_load))


def priority_load_for_counts(
    overprovisioning_factor: int, levels: Sequence[tuple[int, int, int]]
) -> PriorityLoad:
    """Priority load from ``(total, healthy, degraded)`` host counts per level."""
    health = [level_health(overprovisioning_factor, h, t) for t, h, _ in levels]
    degraded = [level_health(overprovisioning_factor, d, t) for t, _, d in levels]
    return compute_priority_load(health, degraded)


def choose_priority(load: PriorityLoad, hash_value: int) -> tuple[int, bool]:
    """Envoy's ``choosePriority``: map ``hash_value % 100`` onto the cumulative load.

    Returns ``(priority, degraded)``. The cluster precomputes this into a 100-slot table, so
    the hot path never calls it; it is kept for the table builder and for tests.
    """
    h = hash_value % 100 + 1
    acc = 0
    for i, share in enumerate(load.healthy):
        acc += share
        if h <= acc:
            return i, False
    for i, share in enumerate(load.degraded):
        acc += share
        if h <= acc:
            return i, True
    return 0, False
